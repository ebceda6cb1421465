"""Next-token selection: classifier-free guidance (CFG), temperature, top-k, top-p.

Everything runs in MLX on the device, vectorised over rows: each row of a batch carries its own
settings and its own random key, so a row samples the same tokens whether it runs alone or
batched with others (the batch only stacks independent requests).

Numerical contract (every setting has a defined result, never garbage):
- temperature: logits are shifted so the row maximum is 0 before dividing, so a tiny
  temperature (even one where ``logits / T`` would overflow float32) gives the T → 0 limit,
  the argmax; only finite T > 0 is accepted.
- top-p: the most likely token always survives, so top-p → 0 is the argmax.
- top-k: k >= vocabulary size keeps every token (the same as 0, "off").
- guidance: ``uncond + s · (cond − uncond)`` is clamped to the finite float32 range before the
  shift, so a huge scale gives its s → ∞ limit instead of inf − inf = NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Mapping, Sequence

import mlx.core as mx
import numpy as np

# The one source of generation defaults (audiocraft's and transformers' MusicGen defaults).
# A checkpoint's config.json "generation" section may override them; the converter writes these.
DEFAULTS: Mapping[str, Any] = {"guidance_scale": 3.0, "temperature": 1.0, "top_k": 250, "top_p": 0.0,
                               "greedy": False}

_F32_MAX = float(np.finfo(np.float32).max)

# The one seed range, [0, 2**32 - 1], everywhere (API, CLI, batch rows, server): what every
# language and JSON parser holds exactly, and numpy's range. Derived seeds (row ``seed + i``,
# window ``seed + w``) wrap modulo 2**32 (`derive_seed`), so they never leave it. -1 is refused
# (leave the seed out for a random one).
SEED_MAX = 2**32 - 1


def check_seed(seed: Any, name: str = "seed", hint: str = "leave it out for a random seed") -> int | None:
    """``seed`` as an int in [0, SEED_MAX], or None (a random seed is chosen later).

    Call it before any work (model load, audio decoding). Raises ValueError starting with
    ``name`` (the API parameter, a CLI flag, a batch key) for anything else: -1, a bool, a float,
    a string, a number outside the range."""
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) \
            or not 0 <= int(seed) <= SEED_MAX:
        raise ValueError(f"{name} {seed!r}: must be an integer in [0, {SEED_MAX}] ({hint})")
    return int(seed)


def derive_seed(seed: int, offset: int) -> int:
    """The seed of row/window ``offset`` of a request seeded ``seed``: (seed + offset) mod 2**32."""
    return (int(seed) + int(offset)) % (SEED_MAX + 1)


def random_seed() -> int:
    """A fresh seed in [0, SEED_MAX] (from the OS, not numpy's global state)."""
    import secrets

    return secrets.randbelow(SEED_MAX + 1)


def check_number(name: str, v: Any, ok: Callable[[float], bool], expected: str) -> None:
    """A setting must be a finite real number (not a bool) for which ``ok`` holds; else ValueError
    ``"<name> <value>: must be <expected>"``."""
    number = not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))
    if not (number and math.isfinite(float(v)) and ok(float(v))):
        raise ValueError(f"{name} {v!r}: must be {expected}")


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings of one row. ``top_k=0`` and ``top_p=0`` turn those filters off."""

    guidance_scale: float = DEFAULTS["guidance_scale"]
    temperature: float = DEFAULTS["temperature"]
    top_k: int = DEFAULTS["top_k"]
    top_p: float = DEFAULTS["top_p"]
    greedy: bool = DEFAULTS["greedy"]

    @classmethod
    def from_defaults(cls, defaults: Mapping[str, Any] | None = None, **overrides: Any) -> "SamplingConfig":
        """Checkpoint defaults (config.json "generation"), then non-None ``overrides``; validated.

        Raises ValueError naming the parameter (``temperature``, ``top_k``, ...) on a bad value.
        """
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in {**DEFAULTS, **(defaults or {})}.items() if k in names}
        if (defaults or {}).get("do_sample") is False:  # older config.json files
            values["greedy"] = True
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validate()

    def validate(self) -> "SamplingConfig":
        check_number("guidance_scale", self.guidance_scale, lambda v: v >= 0, ">= 0 (1 turns guidance off)")
        if not self.greedy:
            check_number("temperature", self.temperature, lambda v: v > 0, "> 0 (use greedy for argmax decoding)")
        check_number("top_k", self.top_k, lambda v: v >= 0 and v == int(v), "an integer >= 0 (0 turns top-k off)")
        check_number("top_p", self.top_p, lambda v: 0 <= v <= 1, "in (0, 1], or 0 to turn it off")
        return replace(self, top_k=int(self.top_k), greedy=bool(self.greedy))

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale != 1.0


@dataclass(frozen=True)
class RowSampling:
    """Per-row settings of a batch as (B,) device arrays, plus the batch-wide static choices."""

    guidance: mx.array  # (B,) float32
    inv_temperature: mx.array  # (B,) float32
    top_k: mx.array  # (B,) int32, vocabulary size where off
    top_p: mx.array  # (B,) float32, 1 where off
    greedy: mx.array  # (B,) bool
    cfg: bool  # any row uses CFG: the batch runs 2B rows (conditional first, then null)
    sample: bool  # any row samples (False: the whole batch is greedy)
    top_k_max: int  # the largest k of the rows that filter with top-k (0: none does)
    top_p_on: bool  # any row filters with top-p

    @classmethod
    def stack(cls, rows: Sequence[SamplingConfig], vocab: int) -> "RowSampling":
        # Clipped to float32's range: 1 / 1e-39 or a guidance of 1e300 must not become inf.
        f32 = lambda xs: mx.array(np.clip(np.asarray(xs, np.float64), -_F32_MAX, _F32_MAX).astype(np.float32))  # noqa: E731
        return cls(guidance=f32([r.guidance_scale for r in rows]),
                   inv_temperature=f32([0.0 if r.greedy else 1.0 / r.temperature for r in rows]),
                   top_k=mx.array(np.asarray([r.top_k if 0 < r.top_k < vocab else vocab for r in rows], np.int32)),
                   top_p=f32([r.top_p if 0 < r.top_p < 1 else 1.0 for r in rows]),
                   greedy=mx.array(np.asarray([r.greedy for r in rows], bool)),
                   cfg=any(r.uses_cfg for r in rows), sample=not all(r.greedy for r in rows),
                   top_k_max=max([r.top_k for r in rows if 0 < r.top_k < vocab and not r.greedy], default=0),
                   top_p_on=any(0 < r.top_p < 1 and not r.greedy for r in rows))

    @property
    def static(self) -> tuple[bool, bool, int, bool]:
        """The choices a compiled step is specialised on (the arrays are its inputs)."""
        return (self.cfg, self.sample, self.top_k_max, self.top_p_on)

    def arrays(self) -> list[mx.array]:
        return [self.guidance, self.inv_temperature, self.top_k, self.top_p, self.greedy]

    def with_arrays(self, arrays: Sequence[mx.array]) -> "RowSampling":
        g, t, k, p, gr = arrays
        return replace(self, guidance=g, inv_temperature=t, top_k=k, top_p=p, greedy=gr)


def apply_cfg(logits: mx.array, guidance: mx.array) -> mx.array:
    """(2B, K, V) logits, conditional rows first → (B, K, V) guided logits.

    ``uncond + s · (cond − uncond)`` (audiocraft's ``LMModel._sample_next_token``); rows with
    s == 1 return ``cond`` exactly, so they match a run without CFG bit for bit.
    """
    cond, uncond = mx.split(logits.astype(mx.float32), 2, axis=0)
    s = guidance[:, None, None]
    guided = mx.clip(uncond + (cond - uncond) * s, -_F32_MAX, _F32_MAX)
    return mx.where(s == 1.0, cond, guided)


def filtered_logits(logits: mx.array, rs: RowSampling) -> mx.array:
    """(B, K, V) → temperature-scaled logits with top-k / top-p applied (-inf outside)."""
    logits = logits - logits.max(axis=-1, keepdims=True)  # max 0: no overflow when dividing by T
    scaled = logits * rs.inv_temperature[:, None, None]
    scaled = mx.where(mx.isnan(scaled), -mx.inf, scaled)  # -inf * 0 (greedy rows)
    if rs.top_k_max:  # keep logits >= the k-th largest (ties at the threshold kept)
        # Only the top k_max values need sorting: mx.topk, then a sort of those few (a full sort
        # of the vocabulary per row and codebook dominated the step at larger batches).
        top = mx.sort(mx.topk(scaled, rs.top_k_max, axis=-1), axis=-1)  # ascending, (B, K, k_max)
        at = mx.clip(rs.top_k_max - rs.top_k, 0, rs.top_k_max - 1)[:, None, None]
        kth = mx.take_along_axis(top, mx.broadcast_to(at, top.shape[:-1] + (1,)), axis=-1)
        kth = mx.where((rs.top_k >= logits.shape[-1])[:, None, None], -mx.inf, kth)  # rows without top-k
        scaled = mx.where(scaled < kth, -mx.inf, scaled)
    if not rs.top_p_on:
        return scaled
    # top-p: keep a token when the mass strictly above it is < p (the best token always stays).
    probs = mx.softmax(scaled, axis=-1)
    desc = mx.sort(probs, axis=-1)[..., ::-1]
    above = mx.cumsum(desc, axis=-1) - desc
    keep_desc = above < rs.top_p[:, None, None]
    # Smallest kept probability per row: tokens below it are cut (ties kept, as with top-k).
    floor = mx.min(mx.where(keep_desc, desc, mx.inf), axis=-1, keepdims=True)
    return mx.where(probs < floor, -mx.inf, scaled)


def select_tokens(logits: mx.array, rs: RowSampling, keys: mx.array) -> tuple[mx.array, mx.array]:
    """Guided logits (B, K, V) and per-row keys (B, 2) → tokens (B, K) int32 and the next keys.

    Sampling is the Gumbel-max form of ``mx.random.categorical`` with each row's own key, so a
    row's tokens do not depend on the other rows of the batch.
    """
    split = mx.vmap(mx.random.split)(keys)  # (B, 2, 2): next key, this step's key
    nxt, sub = split[:, 0], split[:, 1]
    b, k, v = logits.shape
    greedy_tok = mx.argmax(logits, axis=-1)
    if not rs.sample:
        return greedy_tok.astype(mx.int32), nxt
    scaled = filtered_logits(logits, rs)
    noise = mx.vmap(lambda key: mx.random.gumbel(shape=(k, v), key=key))(sub)
    sampled = mx.argmax(scaled + noise, axis=-1)
    tok = mx.where(rs.greedy[:, None], greedy_tok, sampled)
    return tok.astype(mx.int32), nxt


def row_keys(seeds: Sequence[int]) -> mx.array:
    """(B, 2) uint32 keys, one per row seed (each in [0, SEED_MAX]; see `check_seed`)."""
    return mx.stack([mx.random.key(int(s)) for s in seeds])
