"""The frame generator: the one token loop behind `generate`, `stream`, the server and batch jobs.

A batch is a list of independent `Request` rows, each with its own prompt, duration, seed,
sampling settings, melody and audio prompt. `FrameGenerator` owns everything between them and the
codes:

- the window plan: one window when the longest row fits the model's window, else audiocraft's
  sliding window (``models/genmodel.py``): each next window is prompted with the last
  ``window - stride`` frames and adds its new frames;
- the per-window conditioning (text, the melody slice of that window, the audio prompt in the
  first window) and the CFG null rows, through `Conditioner`;
- sampling, through `TokenLoop` and `sampling.select_tokens`.

A row gives the same codes alone or in a batch: its pattern ends where its own would (later
positions are forced pad), its keys come from its own seed (window w uses ``seed + w``, as
before, modulo 2**32: `sampling.derive_seed`), and conditioning is computed per row.

With MusicGen's delay pattern, codebook level d of frame f is sampled at position 1 + d + f of
its window, so frame f is final (all codebooks known) once position f + 1 + max_delay is done;
`FrameGenerator` yields after every step with the number of leading frames that are final.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import mlx.core as mx
import numpy as np

from mlx_music.runtime.conditioning import AudioInput
from mlx_music.runtime.delay_pattern import build_pattern, codebook_delays
from mlx_music.runtime.sampling import RowSampling, SamplingConfig, derive_seed, row_keys

# The window MusicGen was trained on and generates in one pass (longer audio slides it); written
# to config.json["generation"]["max_duration"] by the converter, from here.
MAX_DURATION = 30.0
# audiocraft's MusicGen advances a 30 s window by 18 s: later windows keep 12 s of context. A
# model with another window keeps that ratio unless its config.json names its family's stride
# (generation.extend_stride: AudioGen's 2 s, written by the audiocraft converter).
STRIDE_RATIO = 18.0 / MAX_DURATION


@dataclass(frozen=True)
class Request:
    """One row of a batch. ``None`` settings take the checkpoint's defaults."""

    prompt: str
    duration: float  # seconds of output, the audio prompt included
    seed: int | None = None
    guidance_scale: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    greedy: bool | None = None
    melody: AudioInput | None = None  # melody models only
    audio_prompt: AudioInput | None = None  # audio to continue
    # MAGNeT checkpoints only (runtime/magnet_generation.py); refused for MusicGen
    max_cfg_coef: float | None = None
    min_cfg_coef: float | None = None
    decoding_steps: Sequence[int] | None = None
    span_arrangement: str | None = None


@dataclass(frozen=True)
class Row:
    """A request resolved against the model: frames, settings, seed, prepared inputs."""

    prompt: str
    frames: int
    seed: int
    sampling: SamplingConfig
    melody: np.ndarray | None  # mono waveform at the chroma rate
    prompt_codes: np.ndarray | None  # (K, P)


@dataclass(frozen=True)
class Window:
    """One window, in global frames: it holds [start, start + frames); ``keep`` leading frames
    are context from earlier windows (0 in the first)."""

    index: int
    start: int
    frames: int
    keep: int


def plan_windows(window: int, num_frames: int, prompt_frames: int, stride: int) -> list[Window]:
    """The windows that produce ``num_frames`` frames (a prompt of ``prompt_frames`` included).

    A prompt longer than a window is kept whole: a first window with nothing to generate, then
    windows continuing from its last ``window - stride`` frames. Raises ValueError naming
    ``extend_stride`` when a needed stride is not inside (0, window).
    """
    if num_frames > window and not 0 < stride < window:
        raise ValueError(f"extend_stride: {stride} frames must be between 0 and the window "
                         f"({window} frames), exclusive")
    first = prompt_frames if prompt_frames >= window else min(num_frames, window)
    plan = [Window(0, 0, first, 0)]
    total = first
    while total < num_frames:
        keep = window - stride
        n = min(window, keep + num_frames - total)
        plan.append(Window(len(plan), total - keep, n, keep))
        total += n - keep
    return plan


class FrameGenerator:
    """Iterate to run the token loop window by window; read final codes with `codes`.

    Each iteration step yields the number of leading global frames that are final (for every
    row; a row never has more than its own ``frames``). Tokens stay on the device until `codes`
    asks for them, so a caller that reads once per chunk syncs once per chunk, not per step.
    """

    def __init__(self, pipe: Any, rows: Sequence[Row], window: int, stride: int):
        self.pipe = pipe
        self.rows = list(rows)
        self.num_codebooks = pipe.num_codebooks
        self.delays = codebook_delays(pipe.num_codebooks, pipe.audio_channels)
        self.max_delay = int(self.delays.max())
        self.num_frames = max(r.frames for r in self.rows)
        prompt_lengths = {0 if r.prompt_codes is None else r.prompt_codes.shape[-1] for r in self.rows}
        longest = max(prompt_lengths)
        if longest >= window and len(prompt_lengths) > 1:
            raise ValueError("audio_prompt: prompts longer than a window need equal lengths in one batch")
        for r in self.rows:
            p = 0 if r.prompt_codes is None else r.prompt_codes.shape[-1]
            if p >= r.frames:
                raise ValueError(f"duration: the audio prompt is already {p / pipe.frame_rate:.2f} s; ask "
                                 "for a longer total duration (the output includes the prompt)")
        self.window = window
        self.plan = plan_windows(window, self.num_frames, longest, stride)
        self.sampling = RowSampling.stack([r.sampling for r in self.rows], pipe.vocab_size)
        self.total_steps = sum(self._steps(w) for w in self.plan)
        self.steps = 0
        self.final = 0
        self._codes = np.zeros((len(self.rows), self.num_codebooks, self.num_frames), np.int32)
        self._fetched = 0
        self._window: Window | None = None
        self._seq: np.ndarray | None = None
        self._pending: list[mx.array] = []
        self._pending_from = 0

    # ------------------------------------------------------------------- plan
    def _row_frames(self, row: Row, w: Window) -> int:
        """Frames row ``row`` holds in window ``w`` (at least its context)."""
        return max(w.keep, min(w.frames, row.frames - w.start))

    def _pattern(self, w: Window) -> np.ndarray:
        """(B, K, S) pattern of the window: each row's own pattern, padded after its end."""
        s = 1 + w.frames + self.max_delay
        out = np.full((len(self.rows), self.num_codebooks, s), self.pipe.pad_id, np.int32)
        for i, row in enumerate(self.rows):
            if w.index == 0:
                prompt = row.prompt_codes
            else:
                prompt = self._codes[i, :, w.start:w.start + w.keep]
            p = build_pattern(self._row_frames(row, w), self.num_codebooks, self.pipe.audio_channels,
                              self.pipe.pad_id, prompt=None if prompt is None else prompt[None])
            out[i, :, :p.shape[-1]] = p[0]
        return out

    def _steps(self, w: Window) -> int:
        known = w.keep if w.index else min((0 if r.prompt_codes is None else r.prompt_codes.shape[-1])
                                           for r in self.rows)
        return 0 if known >= w.frames else w.frames + self.max_delay - known

    # -------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[int]:
        pipe = self.pipe
        cfg = self.sampling.cfg
        text = pipe.conditioner.text([r.prompt for r in self.rows], cfg)
        melodies = [r.melody for r in self.rows]
        whole = [r.frames <= self.window for r in self.rows]  # as each row would be alone
        for w in self.plan:
            if w.index:
                self.codes(w.start + w.keep)  # the context must be on the host
            pattern = self._pattern(w)
            free = np.argwhere((pattern == -1).any(axis=(0, 1)))
            start = int(free[0, 0]) if len(free) else pattern.shape[-1]
            self._window, self._seq = w, pattern
            self._pending, self._pending_from = [], max(1, start)
            self._advance(max(1, start))
            yield self.final
            if not len(free):
                continue  # nothing to sample (a prompt of a window or more)
            cond = pipe.conditioner.window(text, melodies, cfg, w.start, self.window, whole)
            loop = pipe.token_loop(len(self.rows), cond, pattern.shape[-1], self.sampling)
            keys = row_keys([derive_seed(r.seed, w.index) for r in self.rows])
            for pos, tok, keys in loop.run(cond, pattern, self.sampling, keys):
                self._pending.append(tok)
                self.steps += 1
                self._advance(pos + 1)
                yield self.final
            self.codes(self.final)  # next window's context; frees this window's tokens
        self._window = self._seq = None

    def _advance(self, known_positions: int) -> None:
        w = self._window
        local = min(max(known_positions - 1 - self.max_delay, 0), w.frames)
        self.final = max(self.final, w.start + local)

    def codes(self, upto: int | None = None) -> np.ndarray:
        """Final codes of global frames [0, upto) as (B, K, upto) int32 (a view; do not modify).

        Frames past a row's own end hold 0 and are not part of its output.
        """
        upto = self.final if upto is None else upto
        if upto > self.final:
            raise ValueError(f"frames up to {upto} requested, only {self.final} are final")
        if upto > self._fetched:
            w = self._window
            if self._pending:
                toks = np.array(mx.stack(self._pending, axis=-1))  # one host sync for the batch
                self._seq[:, :, self._pending_from:self._pending_from + toks.shape[-1]] = toks
                self._pending_from += toks.shape[-1]
                self._pending = []
            lo, hi = self._fetched - w.start, upto - w.start
            for k, d in enumerate(self.delays):
                self._codes[:, k, self._fetched:upto] = self._seq[:, k, 1 + d + lo:1 + d + hi]
            for i, row in enumerate(self.rows):  # pad ids past a row's end are not codes
                self._codes[i, :, max(row.frames, self._fetched):upto] = 0
            self._fetched = upto
        return self._codes[..., :upto]


def resolve_stride(extend_stride: float | None, window: int, frame_rate: int,
                   family_default: float | None = None) -> int:
    """Stride in frames: ``extend_stride`` seconds; else the model family's default
    (config.json ``generation.extend_stride``: AudioGen's 2 s, audiocraft's
    ``AudioGen.set_generation_params``), else the window times `STRIDE_RATIO` (MusicGen's 18 s of
    30 s). A family default that does not fit inside the window (a shrunk window) falls back to
    the ratio. Raises ValueError naming ``extend_stride`` for a bad given value."""
    if extend_stride is None:
        if isinstance(family_default, (int, float)) and not isinstance(family_default, bool) \
                and math.isfinite(family_default) and 0 < round(family_default * frame_rate) < window:
            return round(family_default * frame_rate)
        return max(1, round(window * STRIDE_RATIO))
    if isinstance(extend_stride, bool) or not isinstance(extend_stride, (int, float)) \
            or not math.isfinite(extend_stride):
        raise ValueError(f"extend_stride {extend_stride!r}: must be a number of seconds")
    stride = round(extend_stride * frame_rate)
    if not 0 < stride < window:
        raise ValueError(f"extend_stride {extend_stride}: must be between 0 and the window "
                         f"({window / frame_rate:.2f} s), exclusive")
    return stride
