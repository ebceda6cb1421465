"""`MusicGenPipeline`: text (+ melody, + audio prompt) → audio, the object `runtime.load` returns."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import mlx.core as mx
import numpy as np

from mlx_music.models.musicgen import MusicGen
from mlx_music.runtime.delay_pattern import build_pattern, revert_pattern
from mlx_music.runtime.generate import Conditioning, generate_tokens
from mlx_music.runtime.sampling import SamplingConfig
from mlx_music.runtime.text import TextTokenizer

AudioInput = Any  # a path, or a (waveform, sample_rate) tuple


def normalize_prompts(prompts: str | Sequence[str]) -> list[str]:
    """One prompt or a list of them → a non-empty list of strings (ValueError otherwise)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts: give at least one prompt")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts: every prompt must be a string")
    return prompts


class MusicGenPipeline:
    def __init__(self, model: MusicGen, config: dict, tokenizer: TextTokenizer, path: Path | None = None):
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.path = path
        self.sample_rate: int = int(config["sample_rate"])
        self.frame_rate: int = int(config["frame_rate"])
        self.audio_channels: int = int(config["audio_channels"])
        self.num_codebooks: int = int(config["num_codebooks"])
        self.pad_id: int = int(config["decoder"]["pad_token_id"])
        self.is_melody: bool = config["model_type"] == "musicgen_melody"
        self.last_stats: dict[str, float] = {}
        self.compile_step = True  # compile the decoder step (False: eager, for debugging)
        if self.is_melody:
            # Melody models put the text in the decoder's positions: cap it so that prefix + a full
            # window always fits the position table (a longer prompt is truncated with a warning).
            delay = self.num_codebooks // self.audio_channels - 1
            room = (config["decoder"]["max_position_embeddings"] - config["melody"]["chroma_length"]
                    - (self.max_frames + delay + 1))
            self.tokenizer.max_tokens = max(2, min(self.tokenizer.max_tokens, room))

    # ------------------------------------------------------------------ limits
    @property
    def max_frames(self) -> int:
        """Frames one window may hold: the trained 30 s, and never beyond the position table."""
        gen = self.config.get("generation", {})
        by_duration = int(round(float(gen.get("max_duration", 30.0)) * self.frame_rate))
        delay = self.num_codebooks // self.audio_channels - 1
        prefix = (self.config["melody"]["chroma_length"] + 64) if self.is_melody else 0
        by_positions = self.config["decoder"]["max_position_embeddings"] - 1 - delay - prefix
        return max(1, min(by_duration, by_positions))

    def frames_for(self, duration: float) -> int:
        if not isinstance(duration, (int, float)) or not math.isfinite(duration) or duration <= 0:
            raise ValueError(f"--duration {duration}: must be a positive number of seconds")
        return max(1, int(round(duration * self.frame_rate)))

    def sampling_config(self, **overrides: Any) -> SamplingConfig:
        gen = dict(self.config.get("generation", {}))
        for k, v in overrides.items():
            if v is not None:
                gen[k] = v
        return SamplingConfig(guidance_scale=float(gen.get("guidance_scale", 3.0)),
                              temperature=float(gen.get("temperature", 1.0)),
                              top_k=int(gen.get("top_k", 250)), top_p=float(gen.get("top_p", 0.0)),
                              do_sample=bool(gen.get("do_sample", True))).validate()

    # ------------------------------------------------------------ conditioning
    def condition(self, prompts: Sequence[str], sampling: SamplingConfig,
                  chroma: np.ndarray | None = None) -> Conditioning:
        ids, mask = self.tokenizer(list(prompts))
        states, m = self.model.encode_text(mx.array(ids), mx.array(mask))
        chroma_rows = None
        if self.is_melody:
            b = len(prompts)
            null = np.zeros((b, 1, self.model.num_chroma), np.float32)
            null[..., 0] = 1.0
            c = null if chroma is None else chroma.astype(np.float32)
            if c.shape[0] == 1 and b > 1:
                c = np.repeat(c, b, axis=0)
            if sampling.uses_cfg:
                # null melody rows: bin 0 on for every frame (tiling makes length irrelevant)
                c_null = np.zeros_like(c)
                c_null[..., 0] = 1.0
                c = np.concatenate([c, c_null], axis=0)
            chroma_rows = mx.array(c)
        if sampling.uses_cfg:
            states = mx.concatenate([states, mx.zeros_like(states)], axis=0)
            m = mx.concatenate([m, mx.zeros_like(m)], axis=0)
        return Conditioning(states, m, chroma_rows)

    def melody_waveforms(self, melody: AudioInput | Sequence[AudioInput], batch: int) -> list[np.ndarray]:
        """Melody inputs → one mono float64 waveform per prompt at the chroma sample rate.

        Resampled with the chroma module's sinc resampler (the reference extractor's), not soxr:
        a different resampler moves energy between FFT bins and can flip near-tie chroma frames.
        """
        from mlx_music.runtime.audio_io import load_audio_input, read_audio
        from mlx_music.runtime.chroma import sinc_resample

        if not self.is_melody:
            raise ValueError("--melody: this checkpoint is not a melody model (use a musicgen-melody variant)")
        target = self.config["melody"]["sampling_rate"]
        items = list(melody) if isinstance(melody, list) else [melody]
        wavs = []
        for item in items:
            if isinstance(item, tuple):
                wav = load_audio_input(item, int(item[1]) if len(item) == 2 else target, require_signal=True)
                sr = int(item[1])
            else:
                wav, sr = read_audio(item, require_signal=True)
            mono = wav.astype(np.float64).mean(axis=0)  # channel mean first, as the reference does
            wavs.append(sinc_resample(mono, sr, target) if sr != target else mono)
        if len(wavs) == 1 and batch > 1:
            wavs = wavs * batch
        if len(wavs) != batch:
            raise ValueError(f"--melody: got {len(wavs)} melodies for {batch} prompts")
        return wavs

    def melody_chroma(self, wavs: list[np.ndarray], start_frame: int = 0,
                      num_frames: int | None = None) -> np.ndarray:
        """One-hot chroma (B, T, 12) of the melody slice under frames [start, start + n).

        The slice wraps around a melody shorter than the output, as audiocraft does for long
        generations; a batch is padded to its longest clip, as the reference extractor does.
        """
        from mlx_music.runtime.chroma import ChromaExtractor

        mcfg = self.config["melody"]
        extractor = ChromaExtractor(sampling_rate=mcfg["sampling_rate"], n_fft=mcfg["n_fft"],
                                    hop_length=mcfg["hop_length"], chunk_length=mcfg["chunk_length"],
                                    num_chroma=mcfg["num_chroma"])
        if start_frame == 0 and num_frames is None:
            return extractor(wavs, mcfg["sampling_rate"])
        spf = mcfg["sampling_rate"] / self.frame_rate  # melody samples per codec frame
        a, n = int(round(start_frame * spf)), int(round((num_frames or 0) * spf))
        sliced = [np.take(w, np.arange(a, a + n) % w.shape[-1], axis=-1) for w in wavs]
        return extractor(sliced, mcfg["sampling_rate"])

    # ------------------------------------------------------------------ codecs
    def decode_codes(self, codes: np.ndarray | mx.array) -> np.ndarray:
        """(B, K, F) frame-aligned codes → float32 audio (B, channels, F * hop)."""
        codes = mx.array(codes)
        enc = self.model.audio_encoder
        if self.audio_channels == 1:
            audio = enc.decode(codes)
        else:  # stereo: even codebooks are the left channel, odd the right
            audio = mx.concatenate([enc.decode(codes[:, 0::2]), enc.decode(codes[:, 1::2])], axis=1)
        return np.array(audio.astype(mx.float32))

    def encode_audio(self, audio: AudioInput) -> np.ndarray:
        """An audio prompt → (1, K, F) codes (stereo: channels encoded separately, interleaved)."""
        from mlx_music.runtime.audio_io import load_audio_input

        # Continuing silence is almost surely a wrong file: refuse it like a silent melody.
        wav = load_audio_input(audio, self.sample_rate, channels=self.audio_channels, require_signal=True)  # (C, S)
        x = mx.array(wav[:, None, :])  # (C, 1, S): each channel through the mono codec
        codes = np.array(self.model.audio_encoder.encode(x))  # (C, nq, F)
        if self.audio_channels == 1:
            return codes[:1]
        nq = codes.shape[1]
        out = np.empty((1, 2 * nq, codes.shape[2]), dtype=codes.dtype)
        out[0, 0::2], out[0, 1::2] = codes[0], codes[1]
        return out

    # ---------------------------------------------------------------- generate
    def generate_codes(self, prompts: Sequence[str], num_frames: int, *, sampling: SamplingConfig,
                       seed: int | None = None, chroma: np.ndarray | None = None,
                       prompt_codes: np.ndarray | None = None,
                       on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Frame-aligned codes (B, K, num_frames) for one window (≤ max_frames)."""
        b = len(prompts)
        if num_frames > self.max_frames:
            raise ValueError(f"{num_frames} frames exceed one window ({self.max_frames}); use generate()")
        if prompt_codes is not None and prompt_codes.shape[0] == 1 and b > 1:
            prompt_codes = np.repeat(prompt_codes, b, axis=0)
        pattern = build_pattern(num_frames, self.num_codebooks, self.audio_channels, self.pad_id,
                                prompt=prompt_codes, batch=b)
        cond = self.condition(prompts, sampling, chroma)
        t0 = time.perf_counter()
        seq = generate_tokens(self.model, cond, pattern, sampling, seed, self.compile_step, on_step)
        dt = time.perf_counter() - t0
        steps = pattern.shape[-1] - 1
        self.last_stats = {"steps": steps, "seconds": dt, "steps_per_s": steps / dt if dt else float("inf")}
        return revert_pattern(seq, num_frames, self.audio_channels)

    def generate(self, prompts: str | Sequence[str], duration: float = 10.0, *,
                 guidance_scale: float | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
                 seed: int | None = None, melody: AudioInput | None = None,
                 audio_prompt: AudioInput | None = None, extend_stride: float = 18.0,
                 progress: bool = False, return_codes: bool = False):
        """Text (+ melody, + audio prompt) → (audio float32 [B, channels, samples], sample_rate).

        With `audio_prompt`, the output starts with the prompt and continues it; durations longer
        than one 30 s window are generated with a sliding window (`extend_stride` seconds).
        """
        from mlx_music.runtime.extend import generate_long

        prompts = normalize_prompts(prompts)
        sampling = self.sampling_config(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                                        top_p=top_p, do_sample=False if greedy else None)
        frames = self.frames_for(duration)
        chroma = None
        if melody is not None:
            wavs = self.melody_waveforms(melody, len(prompts))
            if frames <= self.max_frames:
                chroma = self.melody_chroma(wavs)
            else:  # each window sees its own slice of the melody
                chroma = lambda start, n: self.melody_chroma(wavs, start, n)  # noqa: E731
        prompt_codes = self.encode_audio(audio_prompt) if audio_prompt is not None else None
        codes = generate_long(self, prompts, frames, sampling=sampling, seed=seed, chroma=chroma,
                              prompt_codes=prompt_codes, extend_stride=extend_stride, progress=progress)
        audio = self.decode_codes(codes)
        if return_codes:
            return audio, self.sample_rate, codes
        return audio, self.sample_rate

    def stream(self, prompts: str | Sequence[str], duration: float = 10.0, *, chunk_seconds: float = 1.0,
               guidance_scale: float | None = None, temperature: float | None = None, top_k: int | None = None,
               top_p: float | None = None, greedy: bool = False, seed: int | None = None,
               melody: AudioInput | None = None, audio_prompt: AudioInput | None = None,
               extend_stride: float = 18.0, progress: bool = False,
               on_step: Callable[[int, int], None] | None = None):
        """Like `generate`, but an iterator of float32 audio chunks yielded as soon as they are
        final: [channels, samples] for one prompt given as a string, [B, channels, samples] for a
        list. Their concatenation equals `generate`'s audio for the same seed. Bad arguments raise
        here, before the first chunk. See runtime/streaming.py for chunk sizes and latency."""
        from mlx_music.runtime.streaming import stream_audio

        chunks = stream_audio(self, prompts, duration, chunk_seconds=chunk_seconds, guidance_scale=guidance_scale,
                            temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, seed=seed,
                            melody=melody, audio_prompt=audio_prompt, extend_stride=extend_stride,
                            progress=progress, on_step=on_step)
        if not isinstance(prompts, str):
            return chunks
        return (c[0] for c in chunks)
