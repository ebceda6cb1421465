"""MLX LoRA adapters applied to a loaded checkpoint at run time, and switched without reloading.

An MLX adapter folder (written by ``mlx-music convert-adapter`` from a PEFT LoRA adapter):

    adapter_config.json   {"format": "mlx-music-adapter", "format_version": 1, "peft_type": "LORA",
                           "base_model", "r", "lora_alpha", "use_rslora",
                           "modules": {MLX module path: {"kind", "rank", "scale", "shape", "source"}}}
    adapters.safetensors  "<module>.lora_a" (rank, cols) and "<module>.lora_b" (rows, rank), float32
    conversion.json       the record: PEFT source, sha256 and size of both files

Every module, Linear or Embedding, is in one form: ``W += scale * lora_b @ lora_a`` where ``W`` is
the checkpoint-layout weight ``<module>.weight`` (notes/SPEC.md names), so an adapter is applied
with the model in its checkpoint layout (`MusicGen.unfuse`), then fused again.

`AdapterSlot` keeps the base arrays of every module an adapter has touched, so switching is exact:
each switch recomputes ``base + delta`` (or restores ``base``), never subtracts an old delta. The
switch assigns new arrays, which is how the pipeline's cached token loops notice the change.

Quantized modules are refused: an adapter whose module is quantized in the checkpoint cannot be
added to packed weights without re-quantizing (which would make switching inexact); merge it at
conversion instead (``convert --adapter ... -q``), which quantizes the merged weights once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_music.models.musicgen import MusicGen, checkpoint_shapes
from mlx_music.runtime.checkpoint import RECORD
from mlx_music.runtime.records import loads_json

ADAPTER_FORMAT = "mlx-music-adapter"
FORMAT_VERSION = 1
CONFIG = "adapter_config.json"
WEIGHTS = "adapters.safetensors"

__all__ = ["ADAPTER_FORMAT", "Adapter", "AdapterError", "AdapterSlot", "adapter_from_config", "check_adapter",
           "load_adapter"]


class AdapterError(ValueError):
    """A bad, incomplete or mismatched adapter. One line, starting with "adapter"."""


@dataclass
class Adapter:
    """An MLX LoRA adapter: per module (MLX path) its factors and scale."""

    path: Path | None
    config: dict
    arrays: dict[str, tuple[mx.array, mx.array]] | None = None  # module -> (lora_a, lora_b)

    @property
    def modules(self) -> dict[str, dict]:
        return self.config["modules"]

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else "(in memory)"

    def delta(self, module: str) -> mx.array:
        """float32 ``scale * lora_b @ lora_a``, shaped like ``<module>.weight``."""
        a, b = self.arrays[module]
        return (b @ a) * mx.array(float(self.modules[module]["scale"]), mx.float32)


def _bad(where: Any, why: str) -> AdapterError:
    return AdapterError(f"adapter {where}: {why}")


def adapter_from_config(config: Any, where: Any = "(in memory)") -> Adapter:
    """Check an MLX adapter_config.json's structure; an Adapter without arrays."""
    if not isinstance(config, dict):
        raise _bad(where, f"{CONFIG} must be a JSON object")
    if config.get("format") != ADAPTER_FORMAT:
        if "peft_type" in config:
            raise _bad(where, "is a PEFT adapter, not an MLX one; convert it first with "
                              "`mlx-music convert-adapter` (or merge it with `mlx-music convert --adapter`)")
        raise _bad(where, f"{CONFIG} format {config.get('format')!r} is not {ADAPTER_FORMAT!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise _bad(where, f"{CONFIG} format_version {config.get('format_version')!r}: expected {FORMAT_VERSION}")
    mods = config.get("modules")
    if not isinstance(mods, dict) or not mods:
        raise _bad(where, f"{CONFIG} modules: expected a non-empty object")
    for name, m in mods.items():
        ok = (isinstance(m, dict) and isinstance(m.get("rank"), int) and m["rank"] > 0
              and isinstance(m.get("shape"), list) and len(m["shape"]) == 2
              and all(isinstance(d, int) and d > 0 for d in m["shape"])
              and isinstance(m.get("scale"), (int, float)) and not isinstance(m.get("scale"), bool)
              and math.isfinite(m["scale"]))
        if not ok:
            raise _bad(where, f"{CONFIG} module {name}: expected rank (int), shape [rows, cols] and a finite scale")
    return Adapter(None, config)


def _folder(path_or_repo: str | os.PathLike, revision: str | None) -> Path:
    from mlx_music.runtime.hub import ModelNotFoundError, _HubRepo, _local_folder

    raw = os.fspath(path_or_repo)
    try:
        local = _local_folder(raw, revision, "adapter", "an MLX adapter")
        if local is not None:
            return local
        return _HubRepo(raw, revision, None, None).download([CONFIG, WEIGHTS, RECORD])
    except ModelNotFoundError as e:
        msg = str(e)
        if not msg.startswith("adapter"):
            msg = f"adapter {msg}" if msg.startswith(raw) else f"adapter {raw}: {msg}"
        raise AdapterError(msg) from None


def load_adapter(path_or_repo: str | os.PathLike, revision: str | None = None) -> Adapter:
    """Read and check an MLX adapter folder (or hub repo id). Raises AdapterError (one line)."""
    folder = _folder(path_or_repo, revision)
    cfg_path, w_path = folder / CONFIG, folder / WEIGHTS
    if not cfg_path.is_file():
        raise _bad(folder, f"{CONFIG} missing (not an adapter folder)")
    try:
        config = loads_json(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _bad(folder, f"{CONFIG} is not valid JSON ({' '.join(str(e).split())})") from None
    adapter = adapter_from_config(config, folder)
    if not w_path.is_file():
        raise _bad(folder, f"{WEIGHTS} missing")
    rec_path = folder / RECORD
    if rec_path.is_file():
        try:
            size = loads_json(rec_path.read_text(encoding="utf-8"))["files"][WEIGHTS]["size"]
        except (OSError, ValueError, KeyError, TypeError):
            raise _bad(folder, f"{RECORD} is unreadable or does not list {WEIGHTS}") from None
        if w_path.stat().st_size != size:
            raise _bad(folder, f"{WEIGHTS} has {w_path.stat().st_size} bytes, {RECORD} records {size} "
                               "(truncated or modified copy)")
    try:
        tensors = mx.load(str(w_path))
    except Exception as e:  # MLX raises RuntimeError/ValueError on corrupt files
        raise _bad(folder, f"{WEIGHTS} cannot be read ({str(e).splitlines()[0][:200]})") from None
    expected = {f"{m}.{p}" for m in adapter.modules for p in ("lora_a", "lora_b")}
    missing, extra = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected tensor {extra[0]}"
        raise _bad(folder, f"{WEIGHTS} does not match {CONFIG} ({what})")
    arrays = {}
    for name, m in adapter.modules.items():
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        rows, cols = m["shape"]
        if tuple(a.shape) != (m["rank"], cols) or tuple(b.shape) != (rows, m["rank"]):
            raise _bad(folder, f"module {name}: lora_a {list(a.shape)} / lora_b {list(b.shape)} do not fit "
                               f"rank {m['rank']} and shape {m['shape']}")
        if not mx.issubdtype(a.dtype, mx.floating) or not mx.issubdtype(b.dtype, mx.floating):
            raise _bad(folder, f"module {name}: lora_a/lora_b must be float tensors")
        arrays[name] = (a.astype(mx.float32), b.astype(mx.float32))
    mx.eval(arrays)
    adapter.path, adapter.arrays = folder, arrays
    return adapter


def check_adapter(adapter: Adapter, config: dict) -> None:
    """The adapter fits the checkpoint of `config`: each module exists with its shape, unquantized."""
    shapes = checkpoint_shapes(config)
    quantized = ((config.get("quantization") or {}).get("modules")) or {}
    for name, m in adapter.modules.items():
        key = f"{name}.weight"
        if key not in shapes or len(shapes[key]) != 2:
            raise _bad(adapter.label, f"module {name}: not in this checkpoint (target module not in the model)")
        if tuple(shapes[key]) != tuple(m["shape"]):
            raise _bad(adapter.label, f"module {name}: shape {m['shape']} does not match the checkpoint's "
                                      f"{list(shapes[key])} (an adapter for a different base?)")
        if name in quantized:
            raise _bad(adapter.label, f"module {name}: quantized ({quantized[name]}-bit) in this checkpoint; "
                                      "adapters apply to float weights only: merge it at conversion instead "
                                      "(mlx-music convert --adapter ... -q) or use an unquantized base")


class AdapterSlot:
    """The adapter applied to one loaded model, switchable; keeps the touched modules' base arrays."""

    def __init__(self, model: MusicGen, config: dict):
        self.model, self.config = model, config
        self.base: dict[str, mx.array] = {}  # "<module>.weight" -> base array (checkpoint layout)
        self.adapter: Adapter | None = None

    def set(self, adapter: Adapter | str | os.PathLike | None) -> Adapter | None:
        """Apply `adapter` (an Adapter, a folder / repo id, or None for the base model)."""
        if adapter is not None and not isinstance(adapter, Adapter):
            adapter = load_adapter(adapter)
        if adapter is not None:
            if adapter.arrays is None:
                raise _bad(adapter.label, "has no weights loaded (use load_adapter)")
            check_adapter(adapter, self.config)
        if adapter is None and not self.base:
            self.adapter = None
            return None
        model = self.model
        was_fused = model.decoder.fused
        model.unfuse()
        try:
            params = dict(tree_flatten(model.parameters()))
            touched = set(adapter.modules) if adapter is not None else set()
            for name in touched:
                self.base.setdefault(f"{name}.weight", params[f"{name}.weight"])
            updates = []
            for key, base in self.base.items():
                name = key[: -len(".weight")]
                if name in touched:
                    w = (base.astype(mx.float32) + adapter.delta(name)).astype(base.dtype)
                else:
                    w = base
                updates.append((key, w))
            mx.eval([w for _, w in updates])
            model.update(tree_unflatten(updates))
        finally:
            if was_fused:
                model.fuse()
        self.adapter = adapter
        return adapter
