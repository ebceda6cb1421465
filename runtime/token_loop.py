"""The token loop of one window: prefill the conditioning, then one compiled step per position.

Classifier-free guidance runs the conditional and null rows as one batch of 2B. Positions the
delay pattern already knows (BOS, pad, prompt or context frames) are forced inside the loop, on
the device; the host waits only for the step it launched, while MLX's async evaluation builds the
next one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_music.models.musicgen import MusicGen
from mlx_music.runtime.delay_pattern import first_free_position
from mlx_music.runtime.sampling import RowSampling, apply_cfg, select_tokens


@dataclass
class Conditioning:
    """Decoder conditioning of one window for 2B rows (CFG: conditional, then null) or B rows."""

    text_states: mx.array  # (rows, S, h); zeros for null rows
    # (rows, S): text models: the tokens cross-attended to (none for null rows); melody models:
    # the text slots of the decoder prefix each row attends to (a null row: its conditional row's)
    text_mask: mx.array
    chroma: mx.array | None = None  # melody models: (rows, Tc, 12)

    @property
    def rows(self) -> int:
        return self.text_states.shape[0]


class TokenLoop:
    """The KV cache and compiled step of one shape (rows, positions, dtype, static sampling).

    Reused across windows and generations of that shape: no new cache and, above all, no new
    trace of the decoder step (tracing costs tens to hundreds of ms). Reusing the cache without
    zeroing it is safe: the offset restarts at 0, every write precedes the reads of its slot, and
    the self-attention mask hides every slot past the current position.
    """

    def __init__(self, model: MusicGen, rows: int, max_len: int, static: tuple, compile_step: bool = True):
        self.model = model
        self.weights = _weight_arrays(model)  # the trace holds the weights: rebuild if they change
        self.cfg = static[0]
        self.cache = model.make_cache(rows, max_len, _activation_dtype(model))
        self.compile_step = compile_step
        self._fns: tuple[Callable, Callable] | None = None
        self.busy = False

    def matches(self, model: MusicGen) -> bool:
        w = _weight_arrays(model)
        return not self.busy and len(w) == len(self.weights) and all(a is b for a, b in zip(w, self.weights))

    def _rows(self, x: mx.array) -> mx.array:  # the null half sees the same codes
        return mx.concatenate([x, x], axis=0) if self.cfg else x

    def _choose(self, last: mx.array, forced: mx.array, keys: mx.array, rs: RowSampling):
        if self.cfg:
            last = apply_cfg(last, rs.guidance)
        tok, keys = select_tokens(last, rs, keys)
        return mx.where(forced >= 0, forced, tok), keys

    def _functions(self, rs: RowSampling) -> tuple[Callable, Callable]:
        """(advance, last): sample a position and run the decoder on it; sampling alone.

        Compiled on first use, after prefill has put the cross-attention K/V into the cache state.
        """
        if self._fns is None:
            def advance(last, forced, keys, *arrays):
                tok, keys = self._choose(last, forced, keys, rs.with_arrays(arrays))
                logits = self.model.step(self._rows(tok[:, :, None]), self.cache)[:, :, -1, :]
                return tok, logits, keys

            def last_position(last, forced, keys, *arrays):
                return self._choose(last, forced, keys, rs.with_arrays(arrays))

            if self.compile_step:
                st = self.cache.state
                advance = mx.compile(advance, inputs=st, outputs=st)
                last_position = mx.compile(last_position)
            self._fns = (advance, last_position)
        return self._fns

    def _prefill(self, codes: mx.array, cond: Conditioning) -> mx.array:
        """Condition the cache and run the known codes. Melody models mask each row's text padding
        in the prefix (`MusicgenDecoder.__call__`'s ``prefix_mask``), so a row's positions and
        attention are its own whatever the other prompts of the batch."""
        if not self.model.is_melody:
            return self.model.prefill(codes, self.cache, text_states=cond.text_states, text_mask=cond.text_mask,
                                      chroma=cond.chroma)
        prefix = self.model.melody_prefix(cond.text_states, cond.chroma, batch_size=codes.shape[0])
        chroma_slots = mx.ones((codes.shape[0], prefix.shape[1] - cond.text_mask.shape[1]), mx.bool_)
        keep = mx.concatenate([chroma_slots, cond.text_mask.astype(mx.bool_)], axis=1)
        return self.model.decoder(codes, self.cache, prefix=prefix, prefix_mask=keep)

    def run(self, cond: Conditioning, pattern: np.ndarray, rs: RowSampling,
            keys: mx.array) -> Iterator[tuple[int, mx.array, mx.array]]:
        """Yield (position, tokens (B, K), keys (B, 2)) for every position from the first free one.

        ``pattern`` (B, K, S) holds known values and -1 where to sample. Yielded arrays may still
        be computing; evaluate them only when needed.
        """
        b, _, s_total = pattern.shape
        if cond.rows != (2 * b if self.cfg else b):
            raise ValueError(f"conditioning has {cond.rows} rows, expected {2 * b if self.cfg else b}")
        self.busy = True
        try:
            seq = mx.array(pattern)
            start = max(1, first_free_position(pattern))
            self.cache.offset = mx.array(0, dtype=mx.int32)
            logits = self._prefill(self._rows(seq[:, :, :start]), cond)[:, :, -1, :]
            advance, last_position = self._functions(rs)
            arrays = rs.arrays()
            for pos in range(start, s_total):
                if pos + 1 < s_total:
                    tok, logits, keys = advance(logits, seq[:, :, pos], keys, *arrays)
                    mx.async_eval(tok, logits, keys)
                else:
                    tok, keys = last_position(logits, seq[:, :, pos], keys, *arrays)
                yield pos, tok, keys
        finally:
            self.busy = False


def prefix_length(model: MusicGen, text_tokens: int) -> int:
    """Decoder positions taken by the conditioning prefix (melody models only)."""
    return model.chroma_length + text_tokens if model.is_melody else 0


def _weight_arrays(model: MusicGen) -> list[mx.array]:
    return [a for _, a in tree_flatten(model.decoder.parameters())]


def _activation_dtype(model: MusicGen) -> mx.Dtype:
    """Cache dtype: the decoder's float weight dtype (fp32 when weights are quantized)."""
    fc1 = model.decoder.layers[0].fc1
    w = getattr(fc1, "scales", fc1.weight)  # quantized layers: the scales carry the float dtype
    return w.dtype if w.dtype in (mx.float32, mx.float16, mx.bfloat16) else mx.float32
