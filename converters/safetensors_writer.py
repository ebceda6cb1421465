"""Streaming, sharded safetensors writer.

Shapes and dtypes of every output tensor are known before any data is read (the plan), so each
shard's header is written first and tensors are streamed into it one by one: memory holds one
tensor at a time, never a shard. Files are hashed while written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DTYPE_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "U8": 1}


@dataclass
class OutputTensor:
    key: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPE_SIZE[self.dtype]


def plan_shards(items: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for it in items:
        if shards[-1] and size + it.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


class ShardWriter:
    """Write one shard: header now, then `write(key, array)` in the planned order."""

    def __init__(self, path: Path, items: list[OutputTensor], metadata: dict[str, str] | None = None):
        self.path = path
        self.items = items
        self._next = 0
        header: dict = {"__metadata__": metadata or {"format": "mlx"}}
        offset = 0
        for it in items:
            header[it.key] = {"dtype": it.dtype, "shape": list(it.shape), "data_offsets": [offset, offset + it.nbytes]}
            offset += it.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self.sha = hashlib.sha256()
        self.size = 0
        self._f = open(path, "wb")
        self._emit(len(raw).to_bytes(8, "little") + raw)

    def _emit(self, data) -> None:
        self._f.write(data)
        self.sha.update(data)
        self.size += len(data)

    def write(self, key: str, array: np.ndarray) -> None:
        it = self.items[self._next]
        if key != it.key:
            raise RuntimeError(f"writer expected {it.key}, got {key}")
        if tuple(array.shape) != tuple(it.shape) or array.nbytes != it.nbytes:
            raise RuntimeError(f"{key}: planned {it.shape}/{it.dtype}, got {array.shape}/{array.dtype}")
        self._emit(memoryview(np.ascontiguousarray(array)).cast("B"))
        self._next += 1

    def close(self) -> str:
        if self._next != len(self.items):
            raise RuntimeError(f"{self.path.name}: {len(self.items) - self._next} tensors never written")
        self._f.flush()
        self._f.close()
        return self.sha.hexdigest()

    def abort(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass
