"""Streaming generation: audio chunks while the token loop runs, equal to the offline output.

Why this works exactly: with MusicGen's delay pattern, codebook level d of frame f is produced at
sequence position 1 + d + f, so frame f is *final* (every codebook known) once position
f + 1 + max_delay has been generated. Final frames never change, so they can be decoded right
away. EnCodec's decoder is non-causal, but `EncodecStreamDecoder` holds back a bounded number of
frames (`latency_frames`) and returns audio that equals the offline decode of all codes. The
tokens themselves come from the same `iter_tokens` loop, seeds, windows and conditioning that
`MusicGenPipeline.generate` uses, so `concat(stream(...))` equals `generate(...)` for one seed.

Latency (in decoder steps, one per sequence position): without an audio prompt the first chunk
of `c` frames is ready after `c + latency_frames + max_delay` steps (1 s chunk on MusicGen:
50 + 7 + 3 = 60 of the 503 steps of 10 s). With an audio prompt, the prompt's audio is emitted
before the first step.

Chunk layout: every chunk is float32 `[B, channels, samples]`, also for B == 1 (the shape does
not depend on the batch, like `generate`'s audio); use `chunk[0]` for `[channels, samples]`,
which `ProgressiveWavWriter.write` takes. Every chunk holds exactly `chunk_frames * hop` samples
(`chunk_frames = round(chunk_seconds * frame_rate)`), except the last one (1 .. that many).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from mlx_music.runtime.delay_pattern import build_pattern, codebook_delays, first_free_position
from mlx_music.runtime.generate import iter_tokens
from mlx_music.runtime.sampling import SamplingConfig
from mlx_music.runtime.pipeline import normalize_prompts

if TYPE_CHECKING:  # the pipeline imports this module lazily; avoid a cycle at import time
    from mlx_music.runtime.pipeline import AudioInput, MusicGenPipeline

ChromaArg = np.ndarray | Callable[[int, int], np.ndarray] | None
StepCallback = Callable[[int, int], None]  # (steps done, total steps) over all windows

__all__ = ["Window", "plan_windows", "FrameStream", "stream_audio"]


@dataclass(frozen=True)
class Window:
    """One window of a (possibly extended) generation, in global frame numbers."""

    index: int
    start: int  # global frame of the window's local frame 0
    frames: int  # frames the window holds (context included)
    keep: int  # leading frames that are context from earlier output (0 for the first window)
    prompt_frames: int  # leading frames known before the window starts (prompt or context)
    seed: int | None


def plan_windows(window: int, num_frames: int, prompt_frames: int, stride: int,
                 seed: int | None, frame_rate: int) -> list[Window]:
    """The windows `runtime.extend.generate_long` runs, in the same order and with the same seeds.

    Kept as a plan (not a loop that calls the model) so streaming knows the total number of
    steps up front and can mirror the offline generation window by window.
    """
    if num_frames > window and not 0 < stride < window:
        raise ValueError(f"--extend-stride {stride / frame_rate}: must be between 0 and the window "
                         f"({window / frame_rate:.1f} s), exclusive")
    if prompt_frames >= num_frames:
        raise ValueError(f"--duration: the audio prompt is already {prompt_frames / frame_rate:.2f} s; ask for a "
                         "longer total duration (the output includes the prompt)")
    if prompt_frames >= window:
        # A prompt longer than one window is kept whole: a first "window" with nothing to
        # generate, then later windows continue from its last `window - stride` frames.
        plan = [Window(0, 0, prompt_frames, 0, prompt_frames, seed)]
    else:
        first = min(num_frames, window)
        plan = [Window(0, 0, first, 0, prompt_frames, seed)]
    total = plan[0].frames
    while total < num_frames:
        keep = window - stride
        n = min(window, keep + (num_frames - total))
        idx = len(plan)
        plan.append(Window(idx, total - keep, n, keep, keep, None if seed is None else seed + idx))
        total += n - keep
    return plan


class FrameStream:
    """Runs the token loop window by window and tracks which frames are final.

    Iterating yields after every decoder step (and once at the start of each window, for frames
    known before any step, e.g. an audio prompt); `final` is then the number of leading global
    frames whose codes are final, and `codes(upto)` returns them as numpy (B, K, upto). Tokens
    stay on the device until asked for, so a caller that only fetches once per chunk adds one
    host sync per chunk, not one per step.
    """

    def __init__(self, pipe: "MusicGenPipeline", prompts: Sequence[str], num_frames: int, *,
                 sampling: SamplingConfig, seed: int | None, chroma: ChromaArg,
                 prompt_codes: np.ndarray | None, extend_stride: float):
        self.pipe = pipe
        self.prompts = list(prompts)
        self.num_frames = num_frames
        self.sampling = sampling
        self.chroma = chroma
        b = len(self.prompts)
        if prompt_codes is not None and prompt_codes.shape[0] == 1 and b > 1:
            prompt_codes = np.repeat(prompt_codes, b, axis=0)
        self.prompt_codes = prompt_codes
        p = 0 if prompt_codes is None else prompt_codes.shape[-1]
        stride = int(round(extend_stride * pipe.frame_rate))
        self.plan = plan_windows(pipe.max_frames, num_frames, p, stride, seed, pipe.frame_rate)
        self.delays = codebook_delays(pipe.num_codebooks, pipe.audio_channels)
        self.max_delay = int(self.delays.max())
        self.step_counts = [self._steps_in(w) for w in self.plan]
        self.total_steps = sum(self.step_counts)
        self.steps = 0
        self.final = 0
        self._codes = np.full((b, pipe.num_codebooks, num_frames), -1, dtype=np.int32)
        self._fetched = 0  # global frames already copied into _codes
        # state of the running window
        self._win: Window | None = None
        self._seq: np.ndarray | None = None  # (B, K, S) host copy of the window's sequence
        self._pending: list[mx.array] = []  # tokens of positions _pending_from.. not yet on host
        self._pending_from = 0

    # -------------------------------------------------------------- planning
    def _pattern(self, w: Window, prompt: np.ndarray | None) -> np.ndarray:
        return build_pattern(w.frames, self.pipe.num_codebooks, self.pipe.audio_channels, self.pipe.pad_id,
                             prompt=prompt, batch=len(self.prompts))

    def _steps_in(self, w: Window) -> int:
        """Decoder steps of one window: positions from the first free one (>= 1) to the end."""
        if w.prompt_frames >= w.frames:
            return 0  # fully known (a prompt of a window or more): the model does not run
        return w.frames + self.max_delay - w.prompt_frames  # first free position is 1 + prompt

    def _chroma_for(self, w: Window) -> np.ndarray | None:
        # Same per-window rule as runtime.extend.generate_long, so windows see the same melody.
        if self.chroma is None or isinstance(self.chroma, np.ndarray):
            return self.chroma
        return self.chroma(w.start, w.frames)

    # ------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[int]:
        pipe = self.pipe
        for w in self.plan:
            if w.index == 0:
                prompt = self.prompt_codes
            else:
                self.codes(w.start + w.keep)  # the context must be on the host
                prompt = self._codes[..., w.start:w.start + w.keep]
            pattern = self._pattern(w, prompt)
            start = max(1, first_free_position(pattern))
            self._win, self._seq = w, pattern.copy()
            self._pending, self._pending_from = [], start
            self._advance(start)
            yield self.steps
            if w.prompt_frames >= w.frames:
                continue  # nothing to generate (generate_long does not run the model either)
            cond = pipe.condition(self.prompts, self.sampling, self._chroma_for(w))
            for pos, tok in iter_tokens(pipe.model, cond, pattern, self.sampling, w.seed, pipe.compile_step):
                self._pending.append(tok)
                self.steps += 1
                self._advance(pos + 1)
                yield self.steps
            self.codes(self.final)  # the next window's context, and frees the window's tokens
        self._win = self._seq = None

    def _advance(self, known_positions: int) -> None:
        """Positions 0..known_positions-1 of the running window are known: update `final`."""
        w = self._win
        local = min(max(known_positions - 1 - self.max_delay, 0), w.frames)
        self.final = max(self.final, w.start + local)

    def codes(self, upto: int | None = None) -> np.ndarray:
        """Final codes of global frames [0, upto) as (B, K, upto) int32 (a view; do not modify)."""
        upto = self.final if upto is None else upto
        if upto > self.final:
            raise ValueError(f"frames up to {upto} requested, only {self.final} are final")
        if upto > self._fetched:
            w = self._win
            if self._pending:
                toks = np.array(mx.stack(self._pending, axis=-1))  # one host sync for the batch
                self._seq[:, :, self._pending_from:self._pending_from + toks.shape[-1]] = toks
                self._pending_from += toks.shape[-1]
                self._pending = []
            lo, hi = self._fetched - w.start, upto - w.start  # local frames to copy
            for k, d in enumerate(self.delays):
                self._codes[:, k, self._fetched:upto] = self._seq[:, k, 1 + d + lo:1 + d + hi]
            self._fetched = upto
        return self._codes[..., :upto]


class _ChunkDecoder:
    """Incremental EnCodec decode of (B, K, n) codes into (B, channels, n * hop) float32 numpy."""

    def __init__(self, pipe: "MusicGenPipeline"):
        enc = pipe.model.audio_encoder
        self.channels = pipe.audio_channels
        # One mono codec stream per channel, exactly as `decode_codes` splits stereo codes.
        self.decoders = [enc.stream_decoder() for _ in range(self.channels)]
        self.latency_frames = self.decoders[0].latency_frames
        self.hop = enc.hop_length

    def _split(self, codes: np.ndarray) -> list[mx.array]:
        if self.channels == 1:
            return [mx.array(codes)]
        return [mx.array(codes[:, c::self.channels]) for c in range(self.channels)]

    def push(self, codes: np.ndarray) -> np.ndarray:
        parts = [d.push(c) for d, c in zip(self.decoders, self._split(codes))]
        return np.array(mx.concatenate(parts, axis=1).astype(mx.float32))

    def flush(self) -> np.ndarray:
        parts = [d.flush() for d in self.decoders]
        return np.array(mx.concatenate(parts, axis=1).astype(mx.float32))


def _chunks_from_frames(pipe: "MusicGenPipeline", frames: FrameStream, chunk_frames: int,
                        on_step: StepCallback | None, bar: Any) -> Iterator[np.ndarray]:
    decoder = _ChunkDecoder(pipe)
    chunk_samples = chunk_frames * decoder.hop
    latency = decoder.latency_frames
    pushed = 0  # frames handed to the codec
    emitted = 0  # frames of audio yielded
    pending = np.zeros((len(frames.prompts), decoder.channels, 0), np.float32)  # decoded, not yielded
    t0 = time.perf_counter()
    stats: dict[str, float] = {"first_chunk_steps": -1, "first_chunk_seconds": -1.0}
    shown = 0

    def cut(last: bool) -> Iterator[np.ndarray]:
        """Yield whole chunks from `pending` (and the remainder too when `last`)."""
        nonlocal pending, emitted
        n = pending.shape[-1]
        end = n if last else n - n % chunk_samples
        for i in range(0, end, chunk_samples):
            if stats["first_chunk_steps"] < 0:
                stats["first_chunk_steps"] = frames.steps
                stats["first_chunk_seconds"] = time.perf_counter() - t0
            emitted += chunk_frames
            yield np.ascontiguousarray(pending[..., i:min(i + chunk_samples, end)])
        pending = pending[..., end:]

    def add(audio: np.ndarray) -> None:
        nonlocal pending
        if audio.shape[-1]:
            pending = audio if not pending.shape[-1] else np.concatenate([pending, audio], axis=-1)

    for steps in frames:
        if on_step is not None and steps:
            on_step(steps, frames.total_steps)
        if bar is not None and frames.final > shown:
            bar.update((frames.final - shown) / pipe.frame_rate)
            shown = frames.final
        # Push only once the codec can return at least one whole chunk: every push re-runs the
        # codec's edge context, so pushing each step would multiply the decode cost.
        if frames.final - latency < emitted + chunk_frames:
            continue
        add(decoder.push(frames.codes(frames.final)[..., pushed:]))
        pushed = frames.final
        yield from cut(last=False)
    # Everything is final now; the codec's held-back tail needs the end-of-signal padding.
    if pushed < frames.num_frames:
        add(decoder.push(frames.codes(frames.num_frames)[..., pushed:]))
    add(decoder.flush())
    yield from cut(last=True)
    if bar is not None:
        bar.close()
    dt = time.perf_counter() - t0
    pipe.last_stats = {"steps": frames.total_steps, "seconds": dt,
                       "steps_per_s": frames.total_steps / dt if dt else float("inf"), **stats}


def stream_audio(pipe: "MusicGenPipeline", prompts: str | Sequence[str], duration: float = 10.0, *,
                 chunk_seconds: float = 1.0, guidance_scale: float | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 greedy: bool = False, seed: int | None = None, melody: "AudioInput | None" = None,
                 audio_prompt: "AudioInput | None" = None, extend_stride: float = 18.0,
                 progress: bool = False, on_step: StepCallback | None = None) -> Iterator[np.ndarray]:
    """Generate like `MusicGenPipeline.generate`, yielding audio as it becomes final.

    Yields float32 chunks `[B, channels, samples]` (B == 1 too; see the module docstring), each
    `round(chunk_seconds * frame_rate)` frames long except the last. Their concatenation equals
    `generate(...)`'s audio for the same arguments and seed; with `audio_prompt` it starts with
    the prompt. `on_step(steps_done, total_steps)` is called after every decoder step, over all
    windows. Arguments are checked here, before the first chunk is requested, so errors surface
    at call time. After the stream ends, `pipe.last_stats` holds steps, seconds and
    `first_chunk_steps` / `first_chunk_seconds` (time to first audio).
    """
    prompts = normalize_prompts(prompts)
    if isinstance(chunk_seconds, bool) or not isinstance(chunk_seconds, (int, float)) \
            or not math.isfinite(chunk_seconds) or chunk_seconds <= 0:
        raise ValueError(f"--chunk-seconds {chunk_seconds}: must be a positive number of seconds")
    chunk_frames = max(1, int(round(chunk_seconds * pipe.frame_rate)))
    sampling = pipe.sampling_config(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                                    top_p=top_p, do_sample=False if greedy else None)
    num_frames = pipe.frames_for(duration)
    chroma: ChromaArg = None
    if melody is not None:  # the same per-window melody policy as MusicGenPipeline.generate
        wavs = pipe.melody_waveforms(melody, len(prompts))
        if num_frames <= pipe.max_frames:
            chroma = pipe.melody_chroma(wavs)
        else:  # each window sees its own (wrapping) slice of the melody
            chroma = lambda start, n: pipe.melody_chroma(wavs, start, n)  # noqa: E731
    prompt_codes = pipe.encode_audio(audio_prompt) if audio_prompt is not None else None
    frames = FrameStream(pipe, prompts, num_frames, sampling=sampling, seed=seed, chroma=chroma,
                         prompt_codes=prompt_codes, extend_stride=extend_stride)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=round(num_frames / pipe.frame_rate, 2), unit="s", desc="stream",
                   bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} s of audio [{elapsed}<{remaining}]")
    return _chunks_from_frames(pipe, frames, chunk_frames, on_step, bar)
