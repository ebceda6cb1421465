"""The float dtypes an MLX checkpoint's weights can have: one table for the converter and runtime."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class FloatDType:
    name: str  # config.json["dtype"] and --dtype spelling; also the mlx.core / numpy attribute name
    safetensors: str  # dtype in a safetensors header
    short: str  # in output folder names (musicgen-small-fp16)

    @property
    def mlx(self) -> mx.Dtype:
        return getattr(mx, self.name)


FLOAT_DTYPES: dict[str, FloatDType] = {d.name: d for d in (
    FloatDType("float32", "F32", "fp32"),
    FloatDType("float16", "F16", "fp16"),
    FloatDType("bfloat16", "BF16", "bf16"),
)}
DTYPE_NAMES = tuple(FLOAT_DTYPES)  # ("float32", "float16", "bfloat16")
