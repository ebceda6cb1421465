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

from mlx_models.musicgen import MusicGen
from runtime.delay_pattern import first_free_position
from runtime.sampling import SamplingConfig, apply_cfg, select_tokens


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
    cache = model.make_cache(cond.rows, prefix_length(model, cond) + s_total, _activation_dtype(model))

    def rows(x: mx.array) -> mx.array:  # duplicate code rows for the unconditional half
        return mx.concatenate([x, x], axis=0) if cfg else x

    logits = model.prefill(rows(seq[:, :, :start]), cache, text_states=cond.text_states,
                           text_mask=cond.text_mask, chroma=cond.chroma)[:, :, -1, :]
    key = mx.random.key(int(seed) if seed is not None else int(np.random.randint(0, 2**31 - 1)))

    def choose(last: mx.array, forced: mx.array, subkey: mx.array) -> mx.array:
        if cfg:
            last = apply_cfg(last, sampling.guidance_scale)
        tok = select_tokens(last, sampling, subkey)
        return mx.where(forced >= 0, forced, tok)

    def step(tokens: mx.array) -> mx.array:
        return model.step(rows(tokens[:, :, None]), cache)[:, :, -1, :]

    step_fn = mx.compile(step, inputs=cache.state, outputs=cache.state) if compile_step else step
    for pos in range(start, s_total):
        key, sub = mx.random.split(key)
        tok = choose(logits, seq[:, :, pos], sub)
        if pos + 1 < s_total:
            logits = step_fn(tok)
            mx.async_eval(logits, tok)
        yield pos, tok


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
