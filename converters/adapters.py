"""PEFT LoRA adapters of transformers MusicGen fine-tunes: read, check, merge, convert.

A PEFT adapter folder (or hub repo) holds ``adapter_config.json`` and
``adapter_model.safetensors`` with, per adapted module M (a transformers module path):

    base_model.model.M.lora_A.weight      (r, in)     Linear
    base_model.model.M.lora_B.weight      (out, r)
    base_model.model.M.lora_embedding_A   (r, vocab)  Embedding
    base_model.model.M.lora_embedding_B   (dim, r)

and the merge is ``W += s * B @ A`` (Linear), ``E += s * (B @ A)^T`` (Embedding) with
``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``). Here every module is brought to one
form, ``W += scale * b @ a`` with ``W`` in the MLX checkpoint's layout (an embedding's ``a, b`` are
``B^T, A^T``), under its MLX module path (the manifest's rename rules applied to ``M.weight``).

Used by ``convert --adapter`` (`AdapterMerger`: merged into each weight as the converter writes it)
and ``convert-adapter`` (`convert_adapter`: a small MLX adapter folder that
`mlx_music.runtime.adapters` applies at load time). Anything but plain LoRA (DoRA, IA3, trained
biases, modules_to_save, ...) is refused with one line naming the field or module.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConvertError, OutputError, SourceError
from .manifest import custom_manifest
from .shard_reader import _SafetensorsFile
from mlx_music.runtime import adapters as rt
from mlx_music.runtime.checksums import sha256_file
from mlx_music.runtime.hub import ModelNotFoundError, resolve_source
from mlx_music.runtime.records import loads_json

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_SUFFIXES = {".lora_A.weight": ("linear", "A"), ".lora_B.weight": ("linear", "B"),
             ".lora_embedding_A": ("embedding", "A"), ".lora_embedding_B": ("embedding", "B")}
# adapter_config.json fields that change the maths (or the set of trained tensors) beyond plain
# LoRA: any truthy value is refused, with the reason.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters (a learned magnitude per output) are not supported",
    "use_qalora": "QA-LoRA adapters are not supported",
    "lora_bias": "LoRA biases (lora_bias) are not supported",
    "modules_to_save": "modules_to_save (fully trained module copies) is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "layer_replication": "layer_replication is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_bdlora": "BD-LoRA adapters are not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers) does not apply to MusicGen",
}


# The Linear and Embedding modules of the MLX MusicGen (notes/SPEC.md names, without ".weight"):
# the only places a LoRA delta can go, whatever the base's sizes.
_MLX_MODULES = re.compile(
    r"text_encoder\.(embed_tokens|relative_attention_bias|blocks\.\d+\.attn\.[qkvo]|blocks\.\d+\.ffn\.w[io])"
    r"|(audio_)?enc_to_dec_proj"
    r"|decoder\.(embed_tokens\.\d+|lm_heads\.\d+|layers\.\d+\.(fc1|fc2|(self_attn|encoder_attn)\.(q|k|v|out)_proj))")


@dataclass
class LoraModule:
    """One adapted module in the MLX form: delta = scale * b @ a, shaped like the MLX weight."""

    module: str  # MLX module path, e.g. decoder.layers.0.self_attn.q_proj
    source: str  # the transformers module path the adapter names
    kind: str  # "linear" | "embedding"
    a: np.ndarray  # (r, cols) float32
    b: np.ndarray  # (rows, r) float32
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.b.shape[0]), int(self.a.shape[1]))

    def delta(self) -> np.ndarray:
        return (self.b @ self.a).astype(np.float32) * np.float32(self.scale)


@dataclass
class PeftAdapter:
    """A checked PEFT LoRA adapter, its modules under MLX names."""

    folder: Path
    config: dict
    modules: dict[str, LoraModule]
    repo_id: str | None = None
    revision: str | None = None
    files: dict[str, dict] = field(default_factory=dict)  # name -> {sha256, size}

    def record(self) -> dict:
        c = self.config
        return {"source": self.repo_id or str(self.folder), "revision": self.revision,
                "peft_type": c.get("peft_type"), "peft_version": c.get("peft_version"),
                "base_model_name_or_path": c.get("base_model_name_or_path"), "r": c.get("r"),
                "lora_alpha": c.get("lora_alpha"), "use_rslora": bool(c.get("use_rslora")),
                "num_modules": len(self.modules), "files": self.files}


# ------------------------------------------------------------------------------ reading
def _resolve(adapter: str | os.PathLike, revision: str | None) -> tuple[Path, str | None, str | None]:
    raw = os.fspath(adapter)
    local = Path(os.path.expanduser(raw))
    if local.exists():
        if not local.is_dir():
            raise SourceError(f"adapter {raw}: is a file; expected a PEFT adapter folder "
                              f"({PEFT_CONFIG} + {PEFT_WEIGHTS})")
        return local.resolve(), None, None
    try:
        src = resolve_source(raw, [PEFT_CONFIG], {"safetensors": [PEFT_WEIGHTS]}, revision)
    except ModelNotFoundError as e:
        msg = str(e).replace("hf_path ", "")
        raise SourceError(f"adapter {msg}" if msg.startswith(raw) else f"adapter {raw}: {msg}") from None
    return src.folder, src.repo_id, src.revision


def _read_config(folder: Path) -> dict:
    path = folder / PEFT_CONFIG
    if not path.is_file():
        raise SourceError(f"{path}: missing (not a PEFT adapter folder)")
    try:
        cfg = loads_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(cfg, dict):
        raise SourceError(f"{path}: expected a JSON object")
    peft_type = cfg.get("peft_type")
    if peft_type != "LORA":
        raise SourceError(f"{path}: peft_type {peft_type!r} is not supported; only LORA adapters are")
    for key, why in _UNSUPPORTED.items():
        if cfg.get(key) and key != "use_dora":  # DoRA: refused with the module named (read_peft_adapter)
            raise SourceError(f"{path}: {key}={json.dumps(cfg[key])}: {why}")
    if cfg.get("bias", "none") != "none":
        raise SourceError(f"{path}: bias={cfg['bias']!r}: trained biases are not supported (expected 'none')")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise SourceError(f"{path}: {key} {v!r}: expected a positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        v = cfg.get(key) or {}
        if not isinstance(v, dict):
            raise SourceError(f"{path}: {key}: expected an object of module pattern -> number")
    return cfg


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module override: a pattern equal to the module path, or matching its tail."""
    for pat, value in patterns.items():
        if pat == module or re.fullmatch(rf"(.*\.)?(?:{pat})", module):
            return value
    return default


def _mlx_module(hf_module: str, rules: dict) -> str | None:
    """The MLX module path of a transformers module, by the manifest's alias + rename rules."""
    key = hf_module + ".weight"
    for rule in rules.get("alias", []):
        if key in rule["alternatives"]:
            key = rule["key"]
    for r in rules.get("rename", []):
        m = re.match(r["pattern"], key)
        if m:
            out = m.expand(r["to"])
            return out[: -len(".weight")] if out.endswith(".weight") else None
    return None


def read_peft_adapter(adapter: str | os.PathLike, revision: str | None = None) -> PeftAdapter:
    """Read and check a PEFT LoRA adapter (folder or hub repo id). Raises SourceError (one line)."""
    folder, repo_id, rev = _resolve(adapter, revision)
    cfg = _read_config(folder)
    wpath = folder / PEFT_WEIGHTS
    if not wpath.is_file():
        other = [p.name for p in folder.glob("adapter_model*") if p.name != PEFT_WEIGHTS]
        extra = f" (found {', '.join(other)}: only safetensors adapters are read)" if other else ""
        raise SourceError(f"{wpath}: missing{extra}")
    st = _SafetensorsFile(wpath)  # header fully validated here
    parts: dict[str, dict[str, tuple[str, str]]] = {}
    for key in st.entries:
        if not key.startswith(_PREFIX):
            raise SourceError(f"{wpath}: tensor {key}: expected names starting with {_PREFIX!r} (PEFT layout)")
        if key.endswith((".lora_magnitude_vector", ".lora_magnitude_vector.weight")):
            mod = key[len(_PREFIX):].split(".lora_magnitude_vector")[0]
            flag = " (use_dora=true)" if cfg.get("use_dora") else ""
            raise SourceError(f"{wpath}: module {mod}: DoRA magnitude vector{flag}; {_UNSUPPORTED['use_dora']}")
        for suffix, (kind, role) in _SUFFIXES.items():
            if key.endswith(suffix):
                mod = key[len(_PREFIX):-len(suffix)]
                if role in parts.setdefault(mod, {}):  # pragma: no cover - keys are unique in a file
                    raise SourceError(f"{wpath}: module {mod}: two lora_{role} tensors")
                parts[mod][role] = (kind, key)
                break
        else:
            raise SourceError(f"{wpath}: tensor {key}: not a LoRA A/B tensor (only plain LoRA adapters "
                              "are supported)")
    if cfg.get("use_dora"):
        raise SourceError(f"{folder / PEFT_CONFIG}: use_dora=true: {_UNSUPPORTED['use_dora']}")
    if not parts:
        raise SourceError(f"{wpath}: holds no LoRA tensors")
    rules = custom_manifest().rules
    modules: dict[str, LoraModule] = {}
    for hf_mod, roles in sorted(parts.items()):
        if set(roles) != {"A", "B"}:
            missing = ({"A", "B"} - set(roles)).pop()
            raise SourceError(f"{wpath}: module {hf_mod}: lora_{missing} missing")
        kinds = {roles["A"][0], roles["B"][0]}
        if len(kinds) != 1:
            raise SourceError(f"{wpath}: module {hf_mod}: mixes Linear and Embedding LoRA tensors")
        kind = kinds.pop()
        mlx_mod = _mlx_module(hf_mod, rules)
        if mlx_mod is None or not _MLX_MODULES.fullmatch(mlx_mod):
            raise SourceError(f"{wpath}: module {hf_mod}: not a Linear or Embedding of a MusicGen model "
                              "(target module not in the model)")
        A, B = st.read(roles["A"][1]), st.read(roles["B"][1])
        if A.dtype != np.float32 or B.dtype != np.float32 or A.ndim != 2 or B.ndim != 2:
            raise SourceError(f"{wpath}: module {hf_mod}: lora_A/lora_B must be 2-D float tensors")
        if A.shape[0] != B.shape[1]:
            raise SourceError(f"{wpath}: module {hf_mod}: lora_A {list(A.shape)} and lora_B {list(B.shape)} "
                              "disagree on the rank")
        rank = A.shape[0]
        want_r = _pattern_value(cfg.get("rank_pattern") or {}, hf_mod, cfg["r"])
        if rank != want_r:
            raise SourceError(f"{wpath}: module {hf_mod}: rank {rank} but {PEFT_CONFIG} says r={want_r}")
        if not (np.isfinite(A).all() and np.isfinite(B).all()):
            raise SourceError(f"{wpath}: module {hf_mod}: NaN/Inf values")
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, hf_mod, cfg["lora_alpha"]))
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        if kind == "embedding":  # E (vocab, dim) += s * (B @ A)^T = s * A^T @ B^T
            a, b = np.ascontiguousarray(B.T), np.ascontiguousarray(A.T)
        else:
            a, b = A, B
        if mlx_mod in modules:
            raise SourceError(f"{wpath}: modules {modules[mlx_mod].source} and {hf_mod} are the same MLX "
                              f"module {mlx_mod}")
        modules[mlx_mod] = LoraModule(mlx_mod, hf_mod, kind, a, b, scale)
    files = {n: {"sha256": sha256_file(folder / n), "size": (folder / n).stat().st_size}
             for n in (PEFT_CONFIG, PEFT_WEIGHTS)}
    return PeftAdapter(folder, cfg, modules, repo_id, rev, files)


# ------------------------------------------------------------------------------ merging
class AdapterMerger:
    """Merges an adapter into the converter's tensors, one output tensor at a time."""

    def __init__(self, adapter: PeftAdapter):
        self.adapter = adapter
        self.by_key = {m.module + ".weight": m for m in adapter.modules.values()}

    def check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every module must be a 2-D weight of the base with the adapter's shape."""
        where = self.adapter.folder / PEFT_WEIGHTS
        for key, m in self.by_key.items():
            if key not in shapes:
                raise SourceError(f"{where}: module {m.source}: the base checkpoint has no {key} "
                                  "(target module not in the model)")
            if tuple(shapes[key]) != m.shape:
                raise SourceError(f"{where}: module {m.source}: adapter shape {list(m.shape)} does not match "
                                  f"the base's {key} {list(shapes[key])} (an adapter for a different base?)")

    def merge(self, out_key: str, arr: np.ndarray) -> np.ndarray:
        m = self.by_key.get(out_key)
        if m is None:
            return arr
        return arr.astype(np.float32) + m.delta()


# ---------------------------------------------------------------------------- converting
def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def convert_adapter(adapter: str | os.PathLike | PeftAdapter, mlx_path: str | os.PathLike, *, force: bool = False,
                    revision: str | None = None, base: str | os.PathLike | None = None) -> Path:
    """A PEFT LoRA adapter (folder, hub repo id, or one already read) → an MLX adapter folder
    (runtime.adapters format), written atomically.

    ``base``: an MLX checkpoint folder to check the adapter against now (otherwise it is checked
    when it is applied)."""
    from safetensors.numpy import save_file

    from .convert import _install, _stale_partials, __version__

    out = Path(mlx_path).expanduser().absolute()
    if out.parent.is_dir():
        _stale_partials(out)
    if out.exists() and not force:
        raise OutputError(f"mlx_path {out}: already exists; pass force=True to replace it")
    pa = adapter if isinstance(adapter, PeftAdapter) else read_peft_adapter(adapter, revision)
    config = {
        "format": rt.ADAPTER_FORMAT, "format_version": rt.FORMAT_VERSION, "peft_type": "LORA",
        "base_model": pa.config.get("base_model_name_or_path"),
        "r": pa.config["r"], "lora_alpha": pa.config["lora_alpha"], "use_rslora": bool(pa.config.get("use_rslora")),
        "modules": {name: {"kind": m.kind, "rank": m.rank, "scale": m.scale, "shape": list(m.shape),
                           "source": m.source} for name, m in sorted(pa.modules.items())},
    }
    if base is not None:
        from mlx_music.runtime.checkpoint import verify_checkpoint

        try:
            rt.check_adapter(rt.adapter_from_config(config), verify_checkpoint(Path(base), "files").config)
        except ValueError as e:
            raise SourceError(f"base {base}: {e}") from None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"mlx_path {out}: cannot create parent folder ({e.strerror})") from None
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        tensors = {}
        for name, m in sorted(pa.modules.items()):
            tensors[f"{name}.lora_a"] = np.ascontiguousarray(m.a, dtype=np.float32)
            tensors[f"{name}.lora_b"] = np.ascontiguousarray(m.b, dtype=np.float32)
        save_file(tensors, str(tmp / rt.WEIGHTS), metadata={"format": "mlx"})
        _write_json(tmp / rt.CONFIG, config)
        record = {"converter": f"mlx-music {__version__}",
                  "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "source": pa.record(),
                  "files": {n: {"sha256": sha256_file(tmp / n), "size": (tmp / n).stat().st_size}
                            for n in (rt.CONFIG, rt.WEIGHTS)}}
        _write_json(tmp / rt.RECORD, record)
        _install(tmp, out, force)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, ConvertError):
            raise OutputError(f"mlx_path {out}: write failed ({e.strerror or e}); nothing was written") from None
        raise
    return out


__all__ = ["AdapterMerger", "LoraModule", "PeftAdapter", "convert_adapter", "read_peft_adapter"]
