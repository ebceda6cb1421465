"""Next-token selection: classifier-free guidance, temperature, top-k, top-p; all in MLX so it
runs on the device with no host round trip."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class SamplingConfig:
    guidance_scale: float = 3.0
    temperature: float = 1.0
    top_k: int = 250
    top_p: float = 0.0  # 0 disables nucleus filtering
    do_sample: bool = True

    def validate(self) -> "SamplingConfig":
        import math

        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(f"--guidance {self.guidance_scale}: must be >= 0 (1 disables guidance)")
        if self.do_sample and not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"--temperature {self.temperature}: must be > 0 (use --greedy for argmax decoding)")
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k}: must be >= 0 (0 disables top-k)")
        if not (0.0 <= self.top_p <= 1.0) or (self.top_p != self.top_p):
            raise ValueError(f"--top-p {self.top_p}: must be in (0, 1], or 0 to disable")
        return self

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale != 1.0


def apply_cfg(logits: mx.array, scale: float) -> mx.array:
    """logits: (2B, ...) with conditional rows first. uncond + scale * (cond - uncond)."""
    cond, uncond = mx.split(logits, 2, axis=0)
    return uncond + (cond - uncond) * scale


def top_k_filter(logits: mx.array, k: int) -> mx.array:
    """Keep the k largest logits on the last axis (ties at the threshold kept), -inf elsewhere."""
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    kth = mx.sort(logits, axis=-1)[..., vocab - k: vocab - k + 1]
    return mx.where(logits < kth, -mx.inf, logits)


def top_p_filter(logits: mx.array, p: float) -> mx.array:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches p.

    A token is kept when the probability mass strictly above it is < p, so the most likely
    token always survives.
    """
    if p <= 0.0 or p >= 1.0:
        return logits
    probs = mx.softmax(logits.astype(mx.float32), axis=-1)
    order = mx.argsort(-probs, axis=-1)
    sorted_probs = mx.take_along_axis(probs, order, axis=-1)
    mass_before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < p
    # Scatter the keep mask back to vocabulary order.
    inv = mx.argsort(order, axis=-1)
    keep = mx.take_along_axis(keep_sorted, inv, axis=-1)
    return mx.where(keep, logits, -mx.inf)


def select_tokens(logits: mx.array, cfg: SamplingConfig, key: mx.array | None) -> mx.array:
    """logits (..., vocab) → token ids (...). Greedy when do_sample is False."""
    logits = logits.astype(mx.float32)
    if not cfg.do_sample:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    logits = logits / cfg.temperature
    logits = top_k_filter(logits, cfg.top_k)
    logits = top_p_filter(logits, cfg.top_p)
    return mx.random.categorical(logits, axis=-1, key=key).astype(mx.int32)
