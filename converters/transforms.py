"""Numeric tensor transforms named by manifest rules (numpy, one tensor at a time)."""

from __future__ import annotations

import numpy as np

from mlx_music.runtime.dtypes import FLOAT_DTYPES


def fuse_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """w = g * v / ||v||, the norm taken over every axis but 0 (PyTorch's weight_norm dim=0).

    For ConvTranspose1d, axis 0 of the PyTorch weight is the input channel, and g is (in, 1, 1);
    the same formula holds because it is applied before any layout transpose.
    """
    axes = tuple(range(1, v.ndim))
    norm = np.sqrt(np.sum(np.square(v, dtype=np.float32), axis=axes, keepdims=True, dtype=np.float32))
    return (v * (g / norm)).astype(np.float32)


def apply_recipe(op: str, arrays: list[np.ndarray], transpose: tuple[int, ...] | None) -> np.ndarray:
    if op == "copy":
        out = arrays[0]
    elif op == "weight_norm":
        out = fuse_weight_norm(*arrays)
    elif op == "sum":
        out = arrays[0].copy()
        for a in arrays[1:]:
            out += a
    elif op.startswith("split:"):  # row block i of n (audiocraft's fused in_proj_weight)
        i, n = (int(x) for x in op.split(":")[1:])
        rows = arrays[0].shape[0] // n
        out = arrays[0][i * rows:(i + 1) * rows]
    else:  # pragma: no cover - manifests are validated when the plan is built
        raise ValueError(f"unknown op {op}")
    if transpose is not None:
        out = np.transpose(out, transpose)
    return np.ascontiguousarray(out)


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 as uint16 bits, rounding to nearest even (what torch/MLX do)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def cast(x: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
    """Return (array whose raw bytes are the tensor, safetensors dtype name)."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}")
    # numpy has no bfloat16: its bits travel as uint16.
    raw = to_bfloat16_bits(x) if dtype == "bfloat16" else x.astype(getattr(np, dtype), copy=False)
    return raw, FLOAT_DTYPES[dtype].safetensors
