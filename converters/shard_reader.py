"""Lazy, tensor-by-tensor access to a Hugging Face checkpoint in any hub layout.

Layouts: `model.safetensors`; sharded safetensors + `model.safetensors.index.json`;
`pytorch_model.bin`; sharded `.bin` + `pytorch_model.bin.index.json`. Only headers are read up front;
tensor data is read when asked for. `.bin` files are pickles: they are opened only with
`torch.load(weights_only=True, mmap=True)`, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import pickle
import sys
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SourceError, name_some
from mlx_music._meta import pip_hint
from mlx_music.runtime.records import loads_json

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling: F32, F16, BF16, ...
    file: str

    @property
    def nbytes(self) -> int:
        size = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1}.get(self.dtype, 4)
        return int(np.prod(self.shape, dtype=np.int64)) * size


_TORCH_TO_ST = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
                "torch.float64": "F64", "torch.int64": "I64", "torch.int32": "I32",
                "torch.int16": "I16", "torch.int8": "I8", "torch.uint8": "U8", "torch.bool": "BOOL"}
FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


def _torch():
    try:
        import torch
    except ImportError:
        raise SourceError(f"reading checkpoints needs torch: {pip_hint('convert')}") from None
    return torch


_ST_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
             "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
             "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
_ST_ITEMSIZE = {name: np.dtype(t).itemsize for name, t in _ST_NUMPY.items()}


class _SafetensorsFile:
    """A safetensors file read with positioned reads (no mmap, no torch).

    Every byte of a tensor is read once into memory we own and free, so resident memory stays at
    the tensors in flight, not at the pages of a mapping that grows with the checkpoint. The
    header is validated completely before any tensor is used.
    """

    def __init__(self, path: Path):
        self.path = path
        bad = lambda why: SourceError(f"{path}: not a valid safetensors file ({why})")  # noqa: E731
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes: shorter than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise bad(f"header length {n} exceeds the file size {size}")
            try:
                header = loads_json(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise bad(f"header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise bad("header must be a JSON object")
        header.pop("__metadata__", None)
        self.data_start, data_len = 8 + n, size - 8 - n
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (TypeError, KeyError, ValueError):
                raise bad(f"tensor {key}: entry needs dtype, shape and data_offsets") from None
            if dtype not in _ST_ITEMSIZE:
                raise bad(f"tensor {key} has unsupported dtype {dtype!r}")
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not all(
                    isinstance(o, int) for o in (begin, end)):
                raise bad(f"tensor {key}: shape and data_offsets must be non-negative integers")
            if not 0 <= begin <= end <= data_len:
                raise bad(f"tensor {key}: data offsets [{begin}, {end}] out of range (the file holds "
                          f"{data_len} data bytes; truncated?)")
            if end - begin != int(np.prod(shape, dtype=np.int64)) * _ST_ITEMSIZE[dtype]:
                raise bad(f"tensor {key}: data offsets [{begin}, {end}] do not match shape {list(shape)} {dtype}")
            self.entries[key] = (dtype, shape, begin, end)

    def read(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[key]
        with open(self.path, "rb") as f:
            raw = os.pread(f.fileno(), end - begin, self.data_start + begin)
        if len(raw) != end - begin:
            raise SourceError(f"{self.path}: tensor {key} is cut short (file changed while reading?)")
        arr = np.frombuffer(raw, dtype=_ST_NUMPY[dtype]).reshape(shape)
        if dtype == "BF16":  # bfloat16 is the top half of a float32
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float32) if dtype in ("F16", "F64") else arr


def _release_pages(t) -> None:
    """Tell the kernel the mmapped pages under a consumed tensor can go (MADV_DONTNEED): a
    read-only file mapping simply re-reads them if ever touched again."""
    nbytes = t.untyped_storage().nbytes() if t.numel() else 0
    if not nbytes or not sys.platform.startswith("linux"):
        return
    page = mmap.PAGESIZE
    start = -(-t.untyped_storage().data_ptr() // page) * page
    end = (t.untyped_storage().data_ptr() + nbytes) // page * page
    if end > start:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # 4 = MADV_DONTNEED


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


class _Shard:
    """One weight file; opened on first use, then shared by the worker threads."""

    def __init__(self, path: Path):
        self.path = path
        self.kind = "bin" if path.suffix == ".bin" else "safetensors"
        self._handle = None
        self._lock = threading.Lock()

    def open(self):
        with self._lock:
            if self._handle is None:
                self._handle = self._open_safetensors() if self.kind == "safetensors" else self._open_bin()
            return self._handle

    def _open_safetensors(self):
        if not self.path.exists():
            raise SourceError(f"{self.path}: weight file not found")
        return _SafetensorsFile(self.path)

    def _open_bin(self):
        torch = _torch()
        sd = load_pickled_dict(self.path, what="weight file", expected="a dict of tensors")
        bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)]
        if bad:
            raise SourceError(f"{self.path}: holds non-tensor entries: {name_some(map(str, bad))}")
        return sd

    def infos(self) -> list[TensorInfo]:
        h = self.open()
        out = []
        if self.kind == "safetensors":
            for k, (dtype, shape, _b, _e) in h.entries.items():
                out.append(TensorInfo(k, shape, dtype, self.path.name))
        else:
            for k, v in h.items():
                dt = _TORCH_TO_ST.get(str(v.dtype))
                if dt is None:
                    raise SourceError(f"{self.path}: tensor {k} has unsupported dtype {v.dtype}")
                out.append(TensorInfo(k, tuple(v.shape), dt, self.path.name))
        return out

    def read(self, key: str) -> np.ndarray:
        """The tensor as float32 numpy (all MusicGen weights are floating point)."""
        h = self.open()
        if self.kind == "safetensors":
            return h.read(key)
        torch = _torch()
        try:
            t = h[key]
            # Our own copy, then drop the mapped pages: RSS does not grow with the checkpoint.
            arr = t.to(torch.float32).contiguous().numpy().copy() if t.dtype.is_floating_point \
                else t.contiguous().numpy().copy()
            _release_pages(t)
        except SourceError:
            raise
        except Exception as e:
            raise SourceError(f"{self.path}: cannot read tensor {key} ({str(e).splitlines()[0][:200]})") from None
        return arr

    def close(self) -> None:
        self._handle = None


def load_pickled_dict(path: Path, *, what: str, expected: str,
                      explain: Callable[[str], str | None] | None = None) -> dict:
    """A PyTorch zip checkpoint holding a dict, read with ``torch.load(weights_only=True, mmap=True)``.

    Nothing in the pickle is executed: anything but tensors and plain data is refused. Errors are
    one-line `SourceError`s naming ``path``; ``what`` names the file in "not found", ``expected``
    the dict it must hold, and ``explain(message)`` may word a refused pickle for the caller's format.
    """
    torch = _torch()
    if not path.exists():
        raise SourceError(f"{path}: {what} not found")
    try:
        is_zip = zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, OSError):  # a damaged end record can raise instead of answering
        is_zip = False
    if not is_zip:
        raise SourceError(f"{path}: not a PyTorch zip checkpoint (truncated, corrupt, or a legacy pickle, "
                          "which cannot be loaded safely with mmap)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        text = str(e).strip()
        first = text.splitlines()[0][:200] if text else "unsafe pickle"
        raise SourceError(f"{path}: " + ((explain(text) if explain else None) or
                                         "refused to load: the pickle needs more than tensors and plain data "
                                         f"(weights_only=True rejected it, nothing was executed: {first})")) from None
    except Exception as e:
        raise SourceError(f"{path}: cannot read PyTorch checkpoint "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(obj, dict):
        raise SourceError(f"{path}: expected {expected}, found {type(obj).__name__}")
    return obj


class CheckpointReader:
    """All tensors of a checkpoint folder, indexed by key, read lazily."""

    def __init__(self, folder: Path | str, prefer: tuple[str, ...] = ("safetensors", "bin"), workers: int = 4):
        self.folder = Path(folder)
        self.layout, files, self.index_file = self._find_layout(prefer)
        self.shards = {f: _Shard(self.folder / f) for f in files}
        self.workers = workers
        # Headers of all shards, in parallel: one slow (network) disk should not serialise them.
        with ThreadPoolExecutor(max(1, min(workers, len(self.shards)))) as pool:
            per_shard = list(pool.map(lambda s: s.infos(), self.shards.values()))
        self.tensors: dict[str, TensorInfo] = {}
        dups = []
        for infos in per_shard:
            for info in infos:
                if info.key in self.tensors:
                    dups.append(f"{info.key} ({self.tensors[info.key].file} and {info.file})")
                self.tensors[info.key] = info
        if dups:
            raise SourceError(f"{self.folder}: tensors stored in several shards: {name_some(dups, 4)}")
        bad_dtype = [i.key for i in self.tensors.values() if i.dtype not in FLOAT_DTYPES]
        if bad_dtype:
            raise SourceError(f"{self.folder}: non-float tensors are not MusicGen weights: {name_some(bad_dtype)}")
        if self.index_file:
            self._check_index()

    def _find_layout(self, prefer):
        if not self.folder.is_dir():
            raise SourceError(f"{self.folder}: checkpoint folder not found")
        candidates = {
            "safetensors": (SAFETENSORS_INDEX, "model.safetensors"),
            "bin": (BIN_INDEX, "pytorch_model.bin"),
        }
        for fmt in prefer:
            index, single = candidates[fmt]
            if (self.folder / index).exists():
                self._index = self._read_index(self.folder / index)
                files = sorted(set(self._index.values()))
                return f"{fmt}-sharded", files, index
            if (self.folder / single).exists():
                return f"{fmt}-single", [single], None
        raise SourceError(f"{self.folder}: no weights found; expected model.safetensors, "
                          f"{SAFETENSORS_INDEX}, pytorch_model.bin or {BIN_INDEX}")

    def _read_index(self, path: Path) -> dict[str, str]:
        try:
            data = loads_json(path.read_text())
            wm = data["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise TypeError("weight_map must map keys to file names")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise SourceError(f"{path}: invalid index JSON ({type(e).__name__}: {e})") from None
        for f in set(wm.values()):
            if "/" in f or "\\" in f or f.startswith(".."):
                raise SourceError(f"{path}: shard name {f!r} must be a plain file name")
            if not (self.folder / f).exists():
                raise SourceError(f"{path}: shard {f} listed in the index is missing")
        return wm

    def _check_index(self) -> None:
        index = self._index
        missing = [k for k, f in index.items() if k not in self.tensors or self.tensors[k].file != f]
        if missing:
            k = sorted(missing)[0]
            where = self.tensors[k].file if k in self.tensors else "no shard"
            raise SourceError(f"{self.folder / self.index_file}: key {k} mapped to {index[k]} but found in "
                              f"{where} ({len(missing)} such keys)")
        extra = [k for k in self.tensors if k not in index]
        if extra:
            raise SourceError(f"{self.folder / self.index_file}: shard tensors not in the index: {name_some(extra)}")
        # A shard file sitting in the folder but absent from the index is a sign of a mixed download.
        pattern = "model-*-of-*.safetensors" if self.index_file == SAFETENSORS_INDEX else "pytorch_model-*-of-*.bin"
        strays = [p.name for p in self.folder.glob(pattern) if p.name not in self.shards]
        if strays:
            raise SourceError(f"{self.folder / self.index_file}: shard files not in the index: {name_some(strays)}")

    @property
    def files(self) -> list[str]:
        return sorted(self.shards) + ([self.index_file] if self.index_file else [])

    def read(self, key: str) -> np.ndarray:
        info = self.tensors.get(key)
        if info is None:
            raise SourceError(f"{self.folder}: tensor {key} not found")
        arr = self.shards[info.file].read(key)
        if tuple(arr.shape) != info.shape:
            raise SourceError(f"{self.folder / info.file}: tensor {key} has shape {arr.shape}, "
                              f"header says {info.shape}")
        return arr

    def read_many(self, keys: list[str]) -> list[np.ndarray]:
        return [self.read(k) for k in keys]

    def close(self) -> None:
        for s in self.shards.values():
            s.close()
