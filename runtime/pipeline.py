"""`MusicGenPipeline`, what `load` returns: requests in, audio out, through one frame generator.

    result = model.generate(["80s pop", "calm piano"], duration=10.0, seed=0)
    result.audio[0]            # float32 [channels, samples] of the first prompt
    for chunk in model.stream("ambient", duration=20.0, chunk_seconds=1.0):
        chunk.audio[0]         # the next float32 [channels, samples] of that prompt

`generate` and `stream` take the same arguments and share every step up to the codec: `generate`
drains the `FrameGenerator` and decodes once; `stream` decodes frames as they become final. Both
decode with the same block decoder, so their samples are identical. Each prompt is a row with its
own seed (``seed + row``); `generate_batch` / `stream_batch` take `Request` rows with their own
prompt, duration, seed and settings (what the server and batch jobs use).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from mlx_music.models.musicgen import MusicGen
from mlx_music.runtime.audio_io import AudioInputError, decode_audio_input, load_audio_input
from mlx_music.runtime.codec import Codec
from mlx_music.runtime.conditioning import AudioInput, Conditioner, melody_waveform
from mlx_music.runtime.generation import MAX_DURATION, FrameGenerator, Request, Row, resolve_stride
from mlx_music.runtime.magnet_generation import MagnetFrameGenerator, MagnetSampling, clip_frames
from mlx_music.runtime.sampling import RowSampling, SamplingConfig, check_seed, derive_seed, random_seed
from mlx_music.runtime.text import TextTokenizer
from mlx_music.runtime.token_loop import Conditioning, TokenLoop, prefix_length


@dataclass
class GenerationStats:
    steps: int = 0  # decoder steps, over all windows
    seconds: float = 0.0  # wall time from the first step to the last audio
    first_audio_seconds: float | None = None  # stream: time to the first chunk
    first_audio_steps: int | None = None  # stream: decoder steps before the first chunk

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds else float("inf")


@dataclass
class GenerationResult:
    """``audio[i]``: float32 [channels, samples] of row i; ``codes[i]``: int32 [K, frames]."""

    audio: list[np.ndarray]
    codes: list[np.ndarray]
    sample_rate: int
    seeds: list[int]
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass
class AudioChunk:
    """The next stretch of audio: ``audio[i]`` is float32 [channels, samples] of row i, empty
    once row i has ended. ``start`` is the first sample's index in the output."""

    audio: list[np.ndarray]
    start: int
    sample_rate: int
    seeds: list[int]
    stats: GenerationStats


class MusicGenPipeline:
    def __init__(self, model: MusicGen, config: dict, tokenizer: TextTokenizer, path: Path | None = None):
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.path = path
        self.sample_rate = int(config["sample_rate"])
        self.frame_rate = int(config["frame_rate"])
        self.audio_channels = int(config["audio_channels"])
        self.num_codebooks = int(config["num_codebooks"])
        self.pad_id = int(config["decoder"]["pad_token_id"])
        self.vocab_size = int(config["decoder"]["vocab_size"])
        self.is_melody = model.is_melody
        self.is_magnet = config.get("model_type") == "magnet"  # MAGNeT: the masked-decoding generator
        self.compile_step = True  # False: eager decoder step, for debugging
        self.codec = Codec(model.audio_encoder, self.audio_channels)
        self.conditioner = Conditioner(model, tokenizer, config)
        self._loops: dict[tuple, TokenLoop] = {}
        if self.is_melody:
            # The text sits in the decoder's positions: cap it so prefix + a full window fits the
            # position table (a longer prompt is truncated with a warning).
            room = config["decoder"]["max_position_embeddings"] - prefix_length(model, 0) \
                - (self.max_frames + self._max_delay + 1)
            self.tokenizer.max_tokens = max(2, min(self.tokenizer.max_tokens, room))

    # ---------------------------------------------------------------- limits
    @property
    def defaults(self) -> dict:
        """The checkpoint's generation defaults (config.json "generation"; see sampling.DEFAULTS)."""
        return self.config.setdefault("generation", {})

    @property
    def _max_delay(self) -> int:
        return self.num_codebooks // self.audio_channels - 1

    @property
    def max_frames(self) -> int:
        """Frames one window holds: the trained duration, never past the position table."""
        by_duration = round(float(self.defaults.get("max_duration", MAX_DURATION)) * self.frame_rate)
        prefix = prefix_length(self.model, 64)  # melody: chroma + a typical text length
        by_positions = self.config["decoder"]["max_position_embeddings"] - 1 - self._max_delay - prefix
        return max(1, min(by_duration, by_positions))

    @property
    def window_seconds(self) -> float:
        return self.max_frames / self.frame_rate

    # -------------------------------------------------------------- requests
    def requests(self, prompts: str | Sequence[str], duration: float = 10.0, *, seed: int | None = None,
                 **settings: Any) -> list[Request]:
        """Prompts and shared settings → one `Request` per prompt; row i gets ``seed + i`` (mod 2**32).

        ``seed`` in [0, 2**32 - 1] (`sampling.check_seed`); None picks one at random for the call.
        Raises ValueError naming the parameter."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts: give at least one prompt (a string, or a list of strings)")
        melody = settings.pop("melody", None)  # one for all prompts, or a list: one per prompt
        melodies = melody if isinstance(melody, list) and len(melody) != 1 else \
            (melody if isinstance(melody, list) else [melody]) * len(prompts)
        if len(melodies) != len(prompts):
            raise ValueError(f"melody: got {len(melodies)} melodies for {len(prompts)} prompts")
        seed = check_seed(seed)
        seed = random_seed() if seed is None else seed
        return [Request(p, duration, derive_seed(seed, i), melody=m, **settings)
                for i, (p, m) in enumerate(zip(prompts, melodies))]

    def resolve(self, req: Request) -> Row:
        """A `Request` checked and prepared: ValueError names the API parameter at fault."""
        d = req.duration
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d <= 0:
            raise ValueError(f"duration {d!r}: must be a positive number of seconds")
        magnet = {k: getattr(req, k) for k in _MAGNET_SETTINGS}
        if self.is_magnet:
            sampling = MagnetSampling.from_defaults(self.defaults, self.num_codebooks, guidance_scale=req.guidance_scale,
                                                    temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                                    greedy=req.greedy, **magnet)
        else:
            for k, v in magnet.items():
                if v is not None:
                    raise ValueError(f"{k}: applies to MAGNeT checkpoints only")
            sampling = SamplingConfig.from_defaults(self.defaults, guidance_scale=req.guidance_scale,
                                                    temperature=req.temperature, top_k=req.top_k,
                                                    top_p=req.top_p, greedy=req.greedy)
        melody = None
        if req.melody is not None:
            if not self.is_melody:
                raise ValueError("melody: this checkpoint is not a melody model (use a musicgen-melody variant)")
            melody = _naming("melody", melody_waveform, req.melody, int(self.config["melody"]["sampling_rate"]),
                             self.input_seconds(d)["melody"])
        codes = None
        if req.audio_prompt is not None:
            codes = _naming("audio_prompt", self.encode_audio, req.audio_prompt, self.input_seconds(d)["audio_prompt"])
        seed = random_seed() if req.seed is None else check_seed(req.seed)
        frames = max(1, round(d * self.frame_rate))
        if self.is_magnet:
            frames = self._magnet_frames(d, frames, sampling)
        return Row(req.prompt, frames, seed, sampling, melody, codes)

    def output_frames(self, duration: float) -> int:
        """Frames of audio a request of ``duration`` seconds gives with the checkpoint's defaults:
        ``round(duration x frame rate)``; MAGNeT's default span arrangement trims to whole spans."""
        frames = max(1, round(duration * self.frame_rate))
        if not self.is_magnet:
            return frames
        return clip_frames(frames, self.model.magnet.span_len, self.defaults.get("span_arrangement", "nonoverlap"))

    def _magnet_frames(self, duration: float, frames: int, sampling: MagnetSampling) -> int:
        """A MAGNeT clip's frames: at most the checkpoint's segment (audiocraft makes one clip and
        defines no joining of windows), trimmed to whole spans for ``nonoverlap``."""
        segment = self.model.magnet.segment_frames
        if frames > segment:
            raise ValueError(f"duration {duration}: this MAGNeT checkpoint makes clips of at most "
                             f"{segment / self.frame_rate:g} s (its training segment; longer audio is not defined)")
        span = self.model.magnet.span_len
        out = clip_frames(frames, span, sampling.span_arrangement)
        if out < max(1, span):
            raise ValueError(f"duration {duration}: too short for MAGNeT spans of {span} frames "
                             f"(at least {span / self.frame_rate:g} s)")
        return out

    def frames(self, requests: Sequence[Request | Row], extend_stride: float | None = None) -> FrameGenerator:
        """The frame generator of a batch of requests (see `FrameGenerator`). A `Row` that
        `resolve` already made is used as it is (the server checks each row alone before batching
        it, and its audio inputs are decoded and encoded once)."""
        if not requests:
            raise ValueError("prompts: give at least one prompt")
        for r in requests:  # cheap checks of every row before any row's audio is decoded
            if not isinstance(r, Row):
                check_seed(r.seed)
        rows = [r if isinstance(r, Row) else self.resolve(r) for r in requests]
        if self.is_magnet:
            if extend_stride is not None:
                raise ValueError("extend_stride: MAGNeT makes one clip of at most its training segment; "
                                 "there is no sliding window")
            return MagnetFrameGenerator(self, rows)
        window = self.max_frames
        longest = max(r.frames for r in rows)
        stride = resolve_stride(extend_stride, window, self.frame_rate, self.defaults.get("extend_stride")) \
            if longest > window else window
        return FrameGenerator(self, rows, window, stride)

    def token_loop(self, rows: int, cond: Conditioning, length: int, rs: RowSampling) -> TokenLoop:
        """The cached `TokenLoop` for this shape, or a new one (replacing the idle cached ones)."""
        max_len = length + (prefix_length(self.model, cond.text_states.shape[1]))
        key = (rows, max_len, rs.static, self.compile_step)
        loop = self._loops.get(key)
        if loop is None or not loop.matches(self.model):
            loop = TokenLoop(self.model, 2 * rows if rs.cfg else rows, max_len, rs.static, self.compile_step)
            self._loops = {k: v for k, v in self._loops.items() if v.busy}  # bound memory
            self._loops[key] = loop
        return loop

    # -------------------------------------------------------------- adapters
    @property
    def adapter(self):
        """The LoRA adapter applied now (a `runtime.adapters.Adapter`), or None for the base."""
        slot = getattr(self, "_adapter_slot", None)
        return slot.adapter if slot is not None else None

    def set_adapter(self, adapter) -> None:
        """Apply an MLX LoRA adapter (folder, hub repo id or `Adapter`), or None for the base model.

        Switching is exact and needs no reload: the base weights of every module an adapter has
        touched are kept, and each switch recomputes them (see `runtime.adapters.AdapterSlot`).
        Raises ValueError naming the adapter and module at fault; the model is left unchanged."""
        from mlx_music.runtime.adapters import AdapterSlot

        if any(loop.busy for loop in self._loops.values()):
            raise ValueError("adapter: cannot switch while a generation is running")
        if getattr(self, "_adapter_slot", None) is None:
            self._adapter_slot = AdapterSlot(self.model, self.config)
        self._adapter_slot.set(adapter)
        self._loops = {}  # their compiled steps hold the previous weights

    def input_seconds(self, duration: float) -> dict[str, float]:
        """The most seconds of each input audio (``"melody"``, ``"audio_prompt"``) that a request
        of ``duration`` seconds can use: decode and resample no more (`audio_io.read_audio`'s
        ``max_seconds``), so the work on an upload follows the request, not the file's header.

        melody: the chroma window (``config["melody"]["chunk_length"]``, 30 s) when the output fits
        one window (the melody is used whole, as transformers' extractor: it keeps 30 s); else the
        output plus one window (each window reads one window of melody from its start time).
        audio_prompt: ``duration`` plus a second (a prompt that long is refused in any case: the
        output includes it); a longer file is refused without being decoded further.
        """
        frames = max(1, round(duration * self.frame_rate))
        melody = float((self.config.get("melody") or {}).get("chunk_length", 30))
        if frames > self.max_frames:
            melody = (frames + self.max_frames) / self.frame_rate
        return {"melody": melody, "audio_prompt": float(duration) + 1.0}

    # ----------------------------------------------------------------- codec
    def encode_audio(self, audio: AudioInput, max_seconds: float | None = None) -> np.ndarray:
        """An audio prompt (path or (waveform, sr)) → codes (K, frames) int32.

        Resampled to the codec rate (soxr); a mono prompt for a stereo model is duplicated.
        Silence is refused (continuing silence is almost surely a wrong file). ``max_seconds``:
        a longer prompt is refused (ValueError) after decoding only that many seconds.
        Raises `AudioInputError` (a ValueError) naming the file."""
        wav, sr, src = decode_audio_input(audio, require_signal=True,
                                          max_seconds=None if max_seconds is None else max_seconds + 0.5)
        if max_seconds is not None and wav.shape[-1] > max_seconds * sr:
            raise AudioInputError(src, f"longer than {max_seconds:g} s; the total duration must be longer "
                                       "than the prompt (the output includes it)")
        try:
            wav = load_audio_input((wav, sr), self.sample_rate, channels=self.audio_channels)
        except AudioInputError as err:
            raise AudioInputError(src, err.problem) from None
        return self.codec.encode(wav)

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        """Codes (B, K, frames) → float32 audio (B, channels, frames * hop), as `generate` decodes
        (the block decoder `stream` uses too, so their samples are identical)."""
        return self.codec.decode_blocks(codes)

    # -------------------------------------------------------------- generate
    def generate(self, prompts: str | Sequence[str], duration: float = 10.0, *, seed: int | None = None,
                 guidance_scale: float | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, greedy: bool | None = None,
                 melody: AudioInput | list[AudioInput] | None = None, audio_prompt: AudioInput | None = None,
                 extend_stride: float | None = None, progress: bool = False, max_cfg_coef: float | None = None,
                 min_cfg_coef: float | None = None, decoding_steps: Sequence[int] | None = None,
                 span_arrangement: str | None = None) -> GenerationResult:
        """Text (+ melody, + audio prompt) → `GenerationResult` with one row per prompt.

        ``duration`` in seconds includes ``audio_prompt``. Longer than one window (30 s on the
        published models) uses a sliding window that advances ``extend_stride`` seconds (default
        the window x 18/30, audiocraft's 18 s of 30 s). ``None`` settings take the checkpoint's
        defaults (guidance 3, top-k 250, sampling). Raises ValueError naming the parameter.

        MAGNeT checkpoints (``runtime/magnet_generation.py``): one clip of at most the training
        segment (longer is refused); ``temperature`` is the initial one, guidance is annealed from
        ``max_cfg_coef`` to ``min_cfg_coef`` (``guidance_scale`` is refused), ``decoding_steps`` per
        codebook and ``span_arrangement`` ('nonoverlap', 'stride1'); defaults from the checkpoint.
        """
        reqs = self.requests(prompts, duration, seed=seed, guidance_scale=guidance_scale, temperature=temperature,
                             top_k=top_k, top_p=top_p, greedy=greedy, melody=melody, audio_prompt=audio_prompt,
                             max_cfg_coef=max_cfg_coef, min_cfg_coef=min_cfg_coef, decoding_steps=decoding_steps,
                             span_arrangement=span_arrangement)
        return self.generate_batch(reqs, extend_stride=extend_stride, progress=progress)

    def generate_batch(self, requests: Sequence[Request | Row], *, extend_stride: float | None = None,
                       progress: bool = False) -> GenerationResult:
        """Independent rows, each with its own prompt, duration, seed and settings.

        Each row's codes and samples equal the row run alone, unless rows carry audio prompts of
        different lengths: the longer prompt's extra frames then run through the decoder step
        rather than the prefill, which rounds differently and can change sampled tokens."""
        frames = self.frames(requests, extend_stride)
        t0 = time.perf_counter()
        with _progress_bar(progress, frames, self.frame_rate, "generate") as bar:
            for final in frames:
                bar(final)
        codes = frames.codes(frames.num_frames)
        # Each row decoded alone, so its samples do not depend on the batch (see `_chunks`).
        audio = [self.decode_codes(codes[i:i + 1, :, :r.frames])[0] for i, r in enumerate(frames.rows)]
        stats = GenerationStats(frames.steps, time.perf_counter() - t0)
        return GenerationResult(audio, [codes[i, :, :r.frames].copy() for i, r in enumerate(frames.rows)],
                                self.sample_rate, [r.seed for r in frames.rows], stats)

    # ---------------------------------------------------------------- stream
    def stream(self, prompts: str | Sequence[str], duration: float = 10.0, *, chunk_seconds: float = 1.0,
               seed: int | None = None, guidance_scale: float | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, greedy: bool | None = None,
               melody: AudioInput | list[AudioInput] | None = None, audio_prompt: AudioInput | None = None,
               extend_stride: float | None = None, progress: bool = False, max_cfg_coef: float | None = None,
               min_cfg_coef: float | None = None, decoding_steps: Sequence[int] | None = None,
               span_arrangement: str | None = None) -> Iterator[AudioChunk]:
        """Like `generate`, as `AudioChunk`s of ``chunk_seconds`` (the last may be shorter) yielded
        as soon as their frames are final. Concatenated, the chunks equal `generate`'s audio.
        Arguments are checked here, before the first chunk. MAGNeT: no frame is final before the
        last decoding pass, so every chunk comes at the end (the same samples as `generate`)."""
        reqs = self.requests(prompts, duration, seed=seed, guidance_scale=guidance_scale, temperature=temperature,
                             top_k=top_k, top_p=top_p, greedy=greedy, melody=melody, audio_prompt=audio_prompt,
                             max_cfg_coef=max_cfg_coef, min_cfg_coef=min_cfg_coef, decoding_steps=decoding_steps,
                             span_arrangement=span_arrangement)
        return self.stream_batch(reqs, chunk_seconds=chunk_seconds, extend_stride=extend_stride, progress=progress)

    def stream_batch(self, requests: Sequence[Request | Row], *, chunk_seconds: float = 1.0,
                     extend_stride: float | None = None, progress: bool = False) -> Iterator[AudioChunk]:
        """`stream` of independent rows; each row's samples equal the same request run alone."""
        if isinstance(chunk_seconds, bool) or not isinstance(chunk_seconds, (int, float)) \
                or not math.isfinite(chunk_seconds) or chunk_seconds <= 0:
            raise ValueError(f"chunk_seconds {chunk_seconds!r}: must be a positive number of seconds")
        frames = self.frames(requests, extend_stride)
        return self._chunks(frames, max(1, round(chunk_seconds * self.frame_rate)), progress)

    def _chunks(self, frames: FrameGenerator, chunk_frames: int, progress: bool) -> Iterator[AudioChunk]:
        hop = self.codec.hop
        # One decoder per row: EnCodec on several rows at once rounds differently (by an ulp) from
        # a row alone, and a row's samples must not depend on its batch.
        groups = [_RowDecoder(r.frames, i, self.codec.stream_decoder(), hop) for i, r in enumerate(frames.rows)]
        stats = GenerationStats()
        seeds = [r.seed for r in frames.rows]
        t0 = time.perf_counter()
        emitted = 0  # frames of audio yielded
        with _progress_bar(progress, frames, self.frame_rate, "stream") as bar:
            for final in frames:
                bar(final)
                while emitted < frames.num_frames:
                    end = min(emitted + chunk_frames, frames.num_frames)
                    if not all([g.pump(frames, end) for g in groups]):  # every group pumps
                        break
                    audio = [g.take(emitted, end) for g in groups]
                    stats.steps, stats.seconds = frames.steps, time.perf_counter() - t0
                    if stats.first_audio_seconds is None:
                        stats.first_audio_seconds, stats.first_audio_steps = stats.seconds, frames.steps
                    yield AudioChunk(audio, emitted * hop, self.sample_rate, seeds, stats)
                    emitted = end


def _naming(param: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, its `AudioInputError` ("file: problem") re-raised with the API parameter in
    front ("melody file: problem"), as every parameter error starts."""
    try:
        return fn(*args)
    except AudioInputError as err:
        raise AudioInputError(f"{param} {err.source}", err.problem) from None


_MAGNET_SETTINGS = ("max_cfg_coef", "min_cfg_coef", "decoding_steps", "span_arrangement")  # Request fields


class _RowDecoder:
    """The block decoder of one row, fed as its frames become final."""

    def __init__(self, frames: int, row: int, decoder: Any, hop: int):
        self.frames, self.row, self.decoder, self.hop = frames, row, decoder, hop
        self.pushed = 0  # frames handed to the decoder
        self.start = 0  # frame of audio[..., 0]
        self.audio = np.zeros((decoder.codec.channels, 0), np.float32)  # decoded, not yet taken

    @property
    def covered(self) -> int:
        return self.start + self.audio.shape[-1] // self.hop

    def pump(self, gen: FrameGenerator, end: int) -> bool:
        """Decode what is needed for frames up to ``end``; True once they are decoded.

        Codes are pushed only when the codec can return the whole span (or at the row's end),
        since each push costs a host sync."""
        need = min(end, self.frames)
        if self.covered >= need:
            return True
        target = min(gen.final, self.frames)
        if target >= min(self.frames, need + self.decoder.latency_frames) and target > self.pushed:
            more = [self.decoder.push(gen.codes(target)[self.row:self.row + 1, :, self.pushed:target])[0]]
            self.pushed = target
            if target == self.frames:
                more.append(self.decoder.flush()[0])
            self.audio = np.concatenate([self.audio, *more], axis=-1)
        return self.covered >= need

    def take(self, begin: int, end: int) -> np.ndarray:
        """Audio (channels, samples) of frames [begin, end), cut at the row's end."""
        end = max(begin, min(end, self.frames))
        lo, hi = (begin - self.start) * self.hop, (end - self.start) * self.hop
        out = np.ascontiguousarray(self.audio[:, lo:hi])
        self.audio, self.start = self.audio[:, hi:], end
        return out


class _progress_bar:
    """`progress.audio_bar` over the frames of a generator (a no-op when off)."""

    def __init__(self, on: bool, frames: FrameGenerator, frame_rate: int, desc: str):
        self.bar, self.shown, self.rate = None, 0, frame_rate
        if on:
            from mlx_music.runtime.progress import audio_bar

            self.bar = audio_bar(frames.num_frames, frame_rate, desc)

    def __enter__(self):
        return self

    def __call__(self, final: int) -> None:
        if self.bar is not None and final > self.shown:
            self.bar.update(final - self.shown)  # integer frames: never past the total
            self.shown = final

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
