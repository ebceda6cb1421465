"""The token loop: prefill the conditioning, then one fixed-shape decoder step per position.

Classifier-free guidance runs the conditional and unconditional rows as one batch of 2B. Known
positions of the delay pattern (BOS, pad, prompt frames) are forced inside the loop, on the
device; the host only waits once per step for the step it launched (MLX async evaluation keeps
the next graph building while the previous step computes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_music.models.musicgen import MusicGen
from mlx_music.runtime.delay_pattern import first_free_position
from mlx_music.runtime.sampling import SamplingConfig, apply_cfg, select_tokens


@dataclass
class Conditioning:
    """Decoder conditioning for 2B rows (CFG) or B rows (no CFG)."""

    text_states: mx.array  # (rows, S, h), zeros for null rows
    text_mask: mx.array  # (rows, S)
    chroma: mx.array | None = None  # melody models: (rows, Tc, 12)

    @property
    def rows(self) -> int:
        return self.text_states.shape[0]


def prefix_length(model: MusicGen, cond: Conditioning) -> int:
    """Decoder positions taken by the conditioning prefix (melody models only)."""
    return model.chroma_length + cond.text_states.shape[1] if model.is_melody else 0


def iter_tokens(
    model: MusicGen,
    cond: Conditioning,
    pattern: np.ndarray,
    sampling: SamplingConfig,
    seed: int | None = None,
    compile_step: bool = True,
) -> Iterator[tuple[int, mx.array]]:
    """Yield (position, tokens (B, K) mx.array) for every position from the first free one on.

    Positions before the first free one are known already (pattern values). The yielded arrays
    may still be computing (async); evaluate them only when needed.
    """
    b, k, s_total = pattern.shape
    cfg = sampling.uses_cfg
    if cond.rows != (2 * b if cfg else b):
        raise ValueError(f"conditioning has {cond.rows} rows, expected {2 * b if cfg else b}")
    seq = mx.array(pattern)
    start = max(1, first_free_position(pattern))
    runner = _runner_for(model, cond.rows, prefix_length(model, cond) + s_total, _activation_dtype(model),
                         sampling, compile_step)
    try:
        cache = runner.reset()
        logits = model.prefill(runner.rows(seq[:, :, :start]), cache, text_states=cond.text_states,
                               text_mask=cond.text_mask, chroma=cond.chroma)[:, :, -1, :]
        key = mx.random.key(int(seed) if seed is not None else int(np.random.randint(0, 2**31 - 1)))
        advance, last = runner.functions()
        for pos in range(start, s_total):
            if pos + 1 < s_total:
                # One compiled call per position: sample this position, then run the decoder on it.
                tok, logits, key = advance(logits, seq[:, :, pos], key)
                mx.async_eval(tok, logits, key)
            else:
                tok, key = last(logits, seq[:, :, pos], key)
            yield pos, tok
    finally:
        runner.busy = False


class _StepRunner:
    """The KV cache and compiled per-position functions of one generation shape.

    Kept on the model between generations (see `_runner_for`) so that the next generation of the
    same shape reuses both: no new cache allocation and, above all, no re-trace of the ~500-op
    decoder step (tracing a fresh closure costs tens to hundreds of ms per call).

    Reusing the cache without zeroing it is safe: the offset restarts at 0, prefill and every step
    write their slot before attending, and the self-attention mask hides every slot past the
    current position, so stale values from the previous generation are never read. Cross-attention
    K/V are replaced by `prefill`.
    """

    def __init__(self, model: MusicGen, rows: int, max_len: int, dtype: mx.Dtype,
                 sampling: SamplingConfig, compile_step: bool):
        self.model = model
        # The compiled trace holds the weights as constants: remember which arrays it saw, so a
        # later load_weights/update makes `_runner_for` build a new runner instead of reusing it.
        self.weights = _weight_arrays(model)
        self.cfg = sampling.uses_cfg
        self.sampling = sampling
        self.compile_step = compile_step
        self.cache = model.make_cache(rows, max_len, dtype)
        self.busy = False
        self._functions: tuple[Callable, Callable] | None = None

    def rows(self, x: mx.array) -> mx.array:  # duplicate code rows for the unconditional half
        return mx.concatenate([x, x], axis=0) if self.cfg else x

    def reset(self):
        self.busy = True
        self.cache.offset = mx.array(0, dtype=mx.int32)
        return self.cache

    def _choose(self, last: mx.array, forced: mx.array, key: mx.array) -> tuple[mx.array, mx.array]:
        key, sub = mx.random.split(key)  # same key sequence as sampling one position at a time
        if self.cfg:
            last = apply_cfg(last, self.sampling.guidance_scale)
        tok = select_tokens(last, self.sampling, sub)
        return mx.where(forced >= 0, forced, tok), key

    def _advance(self, last: mx.array, forced: mx.array, key: mx.array):
        tok, key = self._choose(last, forced, key)
        logits = self.model.step(self.rows(tok[:, :, None]), self.cache)[:, :, -1, :]
        return tok, logits, key

    def functions(self) -> tuple[Callable, Callable]:
        """(advance, last): sampling fused with the decoder step, and sampling alone (last position).

        Compiled on first use, after prefill has put the cross-attention entries into the cache
        state, so the traced state tree is the one every later call passes.
        """
        if self._functions is None:
            if self.compile_step:
                st = self.cache.state
                self._functions = (mx.compile(self._advance, inputs=st, outputs=st), mx.compile(self._choose))
            else:
                self._functions = (self._advance, self._choose)
        return self._functions


def _runner_for(model: MusicGen, rows: int, max_len: int, dtype: mx.Dtype, sampling: SamplingConfig,
                compile_step: bool) -> _StepRunner:
    """The model's cached runner for this shape, or a new one (which then replaces it).

    Only one is kept, to bound memory (a 30 s large-model cache is ~2 GB). A runner still in use
    (an unfinished iterator) is never shared: the caller gets a private one.
    """
    model.decoder.pack_for_decode()  # fewer, larger matmuls per step; no-op when already packed
    key = (rows, max_len, dtype, sampling, compile_step)
    cached: dict = model.__dict__.setdefault("_mlx_music_runners", {})
    runner = cached.get(key)
    if runner is not None and not runner.busy and _same_arrays(runner.weights, _weight_arrays(model)):
        return runner
    runner = _StepRunner(model, rows, max_len, dtype, sampling, compile_step)
    if not any(r.busy for r in cached.values()):  # replace an idle one; never drop a busy one
        cached.clear()
        cached[key] = runner
    return runner


def _weight_arrays(model: MusicGen) -> list[mx.array]:
    return [a for _, a in tree_flatten(model.decoder.parameters())]


def _same_arrays(a: list[mx.array], b: list[mx.array]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _activation_dtype(model: MusicGen):
    """Cache dtype: the decoder's float weight dtype (fp32 when weights are quantized)."""
    fc1 = model.decoder.layers[0].fc1
    w = getattr(fc1, "scales", fc1.weight)  # quantized layers: the scales carry the float dtype
    return w.dtype if w.dtype in (mx.float32, mx.float16, mx.bfloat16) else mx.float32


def generate_tokens(
    model: MusicGen,
    cond: Conditioning,
    pattern: np.ndarray,
    sampling: SamplingConfig,
    seed: int | None = None,
    compile_step: bool = True,
    on_step: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Fill the -1 entries of `pattern` (B, K, S); returns the completed (B, K, S) int32 sequence."""
    start = max(1, first_free_position(pattern))
    total = pattern.shape[-1] - start
    out: list[mx.array] = []
    for i, (_pos, tok) in enumerate(iter_tokens(model, cond, pattern, sampling, seed, compile_step), 1):
        out.append(tok)
        if on_step is not None:
            on_step(i, total)
    seq = mx.array(pattern[:, :, :start])
    if out:
        seq = mx.concatenate([seq, mx.stack(out, axis=-1)], axis=-1)
    return np.array(seq)
