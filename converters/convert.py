"""Hugging Face MusicGen checkpoint → MLX checkpoint folder.

hub files → CheckpointReader (lazy) → manifest rules (plan, checked both ways) → transforms →
streaming sharded writer, all into a temporary folder that is renamed into place at the end.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import CompletenessError, ConvertError, ManifestError, OutputError, SourceError
from .key_rules import Plan, Recipe, build_plan
from .manifest import Manifest, check_expectations, custom_manifest, detect_variant, load_manifest
from .mlx_config import build_mlx_config, config_facts, expected_shapes, read_json, with_config_rules
from .safetensors_writer import OutputTensor, ShardWriter, plan_shards, shard_names
from .shard_reader import CheckpointReader
from .transforms import apply_recipe, cast
from mlx_music._meta import __version__
from mlx_music.runtime.checksums import sha256_file as _sha256
from mlx_music.runtime.dtypes import DTYPE_NAMES, FLOAT_DTYPES
from mlx_music.runtime.hub import ModelNotFoundError, Source, resolve_source

DTYPES = DTYPE_NAMES
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class QuantizeOptions:
    bits: int = 4
    group_size: int = 64
    recipe: str | None = None  # e.g. "mixed-4-8"


@dataclass
class ConversionResult:
    path: Path
    variant: str | None
    num_tensors: int
    num_parameters: int
    total_bytes: int
    dropped: dict[str, str] = field(default_factory=dict)
    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '1.5G', 1024 → bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not m:
        raise ConvertError(f"max_shard_size {text!r}: expected a size like 5GB or 500MB")
    mult = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2)]
    if m.group(3) == "IB":
        mult = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2)]
    value = int(float(m.group(1)) * mult)
    if value <= 0:
        raise ConvertError(f"max_shard_size {text!r}: must be positive")
    return value


def load_source_config(folder: Path) -> tuple[dict, dict]:
    """(MLX config, facts) for an HF checkpoint folder."""
    hf = read_json(folder / "config.json", "config.json")
    pre_path = folder / "preprocessor_config.json"
    pre = read_json(pre_path, "preprocessor_config.json") if pre_path.exists() else None
    cfg = build_mlx_config(hf, str(folder / "config.json"), pre)
    return cfg, config_facts(cfg)


def pick_manifest(facts: dict, variant: str | None, source: str) -> Manifest:
    if variant:
        m = load_manifest(variant)
        check_expectations(m, facts, source)
        return m
    return detect_variant(facts)


def plan_for(tensors: dict, manifest: Manifest, cfg: dict, source: str) -> Plan:
    """The conversion plan: the manifest's rules plus the config's own (unused codec quantizer
    levels dropped), checked against the shapes the config implies."""
    try:
        return build_plan(tensors, with_config_rules(manifest.rules, cfg), expected_shapes(cfg))
    except CompletenessError as e:
        if cfg.get("source_defaults"):
            # transformers would fill the same defaults and then fail on the same shape mismatch.
            fields = ", ".join(f"{k} (transformers' default {v!r})" for k, v in cfg["source_defaults"].items())
            raise ManifestError(f"{source}: config.json leaves out {fields}, which does not match "
                                f"the weights: {e}") from None
        raise


def _match_any(patterns: list[str], key: str) -> bool:
    return any(re.search(p, key) for p in patterns)


def quantize_policy(manifest: Manifest, cfg: dict, opts: QuantizeOptions, plan: Plan) -> tuple[dict[str, int], list[str]]:
    """{module key (no .weight): bits} to quantize, and the candidates skipped (with why)."""
    q = manifest.quantize
    last = str(cfg["decoder"]["num_layers"] - 1)
    high: list[str] = []
    high_bits = opts.bits
    if opts.recipe:
        recipes = q.get("recipes", {})
        if opts.recipe not in recipes:
            raise ConvertError(f"quantize.recipe {opts.recipe!r}: unknown; expected one of {', '.join(recipes) or 'none'}")
        high = [p.replace("{last}", last) for p in recipes[opts.recipe]["high"]]
        high_bits = int(recipes[opts.recipe]["high_bits"])
    chosen: dict[str, int] = {}
    skipped: list[str] = []
    for key, r in plan.recipes.items():
        if not key.endswith(".weight") or len(r.shape) != 2:
            continue
        module = key[: -len(".weight")]
        if not _match_any(q["include"], module) or _match_any(q.get("exclude", []), module):
            continue
        if r.shape[1] % opts.group_size:
            skipped.append(f"{module} (input size {r.shape[1]} not divisible by group size {opts.group_size})")
            continue
        chosen[module] = high_bits if _match_any(high, module) else opts.bits
    return chosen, skipped


def _output_items(plan: Plan, manifest: Manifest, dtype: str, qbits: dict[str, int], group_size: int):
    """OutputTensor list in write order + per-item producer description."""
    keep32 = manifest.dtype.get("keep_float32", [])
    items: list[tuple[OutputTensor, Recipe, str]] = []
    for key, r in plan.recipes.items():
        target = "float32" if _match_any(keep32, key) else dtype
        st = FLOAT_DTYPES[target].safetensors
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if module in qbits:
            bits = qbits[module]
            out_dim, in_dim = r.shape
            items.append((OutputTensor(key, (out_dim, in_dim * bits // 32), "U32"), r, f"q:weight:{target}"))
            items.append((OutputTensor(module + ".scales", (out_dim, in_dim // group_size), st), r, f"q:scales:{target}"))
            items.append((OutputTensor(module + ".biases", (out_dim, in_dim // group_size), st), r, f"q:biases:{target}"))
        else:
            items.append((OutputTensor(key, r.shape, st), r, f"plain:{target}"))
    return items


def _quantize(w: np.ndarray, bits: int, group_size: int, dtype: str) -> dict[str, np.ndarray]:
    import mlx.core as mx

    wq, scales, biases = mx.quantize(mx.array(w).astype(FLOAT_DTYPES[dtype].mlx), group_size=group_size, bits=bits)
    out = {"weight": np.array(wq)}
    for name, a in (("scales", scales), ("biases", biases)):
        a = a.astype(mx.float32)
        out[name] = cast(np.array(a), dtype)[0]
    return out


def _pid_alive(name: str) -> bool:
    try:
        os.kill(int(name.rsplit("-", 1)[1]), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _stale_partials(out: Path) -> None:
    """Clean up after earlier runs that died: drop their temp folders, and put back a previous
    output that a killed `--force` had moved aside but not yet replaced."""
    for p in out.parent.glob(f".{out.name}.old-*"):
        if not _pid_alive(p.name):
            if not out.exists():
                os.replace(p, out)
            else:
                shutil.rmtree(p, ignore_errors=True)
    for p in out.parent.glob(f".{out.name}.partial-*"):
        if not _pid_alive(p.name):
            shutil.rmtree(p, ignore_errors=True)



def _resolve_source(hf_path: str, files: dict, revision: str | None) -> Source:
    """--hf-path through runtime.hub.resolve_source, fetching what the manifest's [files] names."""
    try:
        return resolve_source(hf_path, [*files["config"], *files["tokenizer"], *files.get("extra", [])],
                              {fmt: files["weights"][fmt] for fmt in files["weights_preference"]}, revision)
    except ModelNotFoundError as e:
        raise SourceError(str(e)) from None


def _license_from_readme(folder: Path) -> str | None:
    readme = folder / "README.md"
    if not readme.exists():
        return None
    m = re.search(r"^---\s*\n(.*?)\n---", readme.read_text(errors="replace"), re.S)
    if m:
        lic = re.search(r"^license:\s*(\S+)", m.group(1), re.M)
        if lic:
            return lic.group(1).strip("'\"")
    return None


def convert_checkpoint(
    hf_path: str | Path,
    mlx_path: str | Path,
    *,
    variant: str | None = None,
    dtype: str = "float32",
    quantize: QuantizeOptions | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    revision: str | None = None,
    allow_nonfinite: bool = False,
    workers: int = 4,
    progress: bool = True,
    adapter: str | Path | None = None,
    format: str | None = None,
    text_encoder: str | None = None,
    codec: str | None = None,
    _after_tensor: Callable[[int], None] | None = None,
) -> ConversionResult:
    """Convert one checkpoint. Raises ConvertError (one-line message) for any bad input.

    format: "transformers" or "audiocraft" (state_dict.bin + compression_state_dict.bin); by default
    detected, transformers preferred when a folder holds both. text_encoder / codec: the T5 and the
    EnCodec of an audiocraft checkpoint when not the ones it names (converters/audiocraft.py).

    adapter: a PEFT LoRA adapter (folder or hub repo id) merged into the weights as they are
    written (converters/adapters.py)."""
    if dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if quantize is not None:
        if quantize.bits not in (4, 8):
            raise ConvertError(f"quantize.bits {quantize.bits}: expected 4 or 8")
        if quantize.group_size not in (32, 64, 128):
            raise ConvertError(f"quantize.group_size {quantize.group_size}: expected 32, 64 or 128")
    max_bytes = parse_size(max_shard_size)
    out = Path(mlx_path).expanduser().absolute()
    if out.parent.is_dir():
        _stale_partials(out)  # first: a killed --force may have left the old output aside
    if out.exists() and not force:
        raise OutputError(f"mlx_path {out}: already exists; pass force=True to replace it")

    from . import audiocraft as ac

    base_manifest = load_manifest(variant) if variant else custom_manifest()
    files = base_manifest.files
    if format != "transformers":  # the audiocraft layout's files are fetched when that is all there is
        other, weights = ac.source_files(files, format)
        files = {**files, "config": other, "tokenizer": [], "extra": [], "weights": weights,
                 "weights_preference": list(weights)}
    source: Source = _resolve_source(str(hf_path), files, revision)
    fmt = ac.detect_format(source.folder, format)
    source_extra: dict = {}
    if fmt == "audiocraft":
        prep = ac.prepare(source.folder, variant=variant, text_encoder=text_encoder, codec=codec, workers=workers)
        cfg, manifest, reader, config_label = prep.cfg, prep.manifest, prep.reader, prep.label
        source_extra = prep.record
    else:
        for opt, val in (("text_encoder", text_encoder), ("codec", codec)):
            if val is not None:
                raise ConvertError(f"{opt}: only for audiocraft-format checkpoints; {source.folder} is in "
                                   "transformers layout (use format='audiocraft' if it holds both)")
        cfg, facts = load_source_config(source.folder)
        config_label = str(source.folder / "config.json")
        manifest = pick_manifest(facts, variant, config_label)
        reader = CheckpointReader(source.folder, prefer=tuple(manifest.files["weights_preference"]), workers=workers)
    cfg["variant"] = manifest.name
    cfg["dtype"] = dtype

    plan = plan_for(reader.tensors, manifest, cfg, config_label)
    merger = None
    if adapter is not None:
        from .adapters import AdapterMerger, read_peft_adapter

        merger = AdapterMerger(read_peft_adapter(adapter))
        merger.check({k: r.shape for k, r in plan.recipes.items()})
    qbits: dict[str, int] = {}
    skipped: list[str] = []
    if quantize is not None:
        qbits, skipped = quantize_policy(manifest, cfg, quantize, plan)
        cfg["quantization"] = {"bits": quantize.bits, "group_size": quantize.group_size,
                               "recipe": quantize.recipe, "mode": "affine",
                               "modules": {k: b for k, b in qbits.items()}, "skipped": skipped}
    group_size = quantize.group_size if quantize else 64
    tokenizer_src = _tokenizer_source(prep.tokenizer_folder if fmt == "audiocraft" else source.folder)

    # Order by source file so each shard is opened, drained and closed in turn (bounded memory).
    def src_order(item):
        r = item[1]
        return (reader.tensors[r.sources[0]].file,)
    items = sorted(_output_items(plan, manifest, dtype, qbits, group_size), key=src_order)
    shards = plan_shards([it for it, _, _ in items], max_bytes)
    names = shard_names(len(shards))
    by_key = {it.key: (r, how) for it, r, how in items}
    # Uses left per source file: a shard is closed (its mmap released) after its last tensor, so
    # resident memory stays near one shard's worth however large the checkpoint is.
    uses_left: dict[str, int] = {}
    for _it, r, _how in items:
        for src in r.sources:
            f = reader.tensors[src].file
            uses_left[f] = uses_left.get(f, 0) + 1

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"mlx_path {out}: cannot create parent folder ({e.strerror})") from None
    _stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    record_files: dict[str, dict] = {}
    total_bytes = sum(it.nbytes for it, _, _ in items)
    writer: ShardWriter | None = None
    try:
        from tqdm import tqdm

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="convert", disable=not progress)
        qcache: dict[str, dict[str, np.ndarray]] = {}

        def _merged(r: Recipe, arr: np.ndarray) -> np.ndarray:
            return merger.merge(r.out_key, arr) if merger is not None else arr

        def produce(key: str) -> np.ndarray:
            r, how = by_key[key]
            if how.startswith("q:"):
                _, part, target = how.split(":")
                module = r.out_key[: -len(".weight")]
                if module not in qcache:
                    w = _checked(r, _merged(r, apply_recipe(r.op, reader.read_many(r.sources), r.transpose)),
                                 allow_nonfinite)
                    qcache[module] = _quantize(w, qbits[module], group_size, target)
                res = qcache[module][part]
                if part == "biases":
                    qcache.pop(module)
                return res
            target = how.split(":")[1]
            arr = _checked(r, _merged(r, apply_recipe(r.op, reader.read_many(r.sources), r.transpose)),
                           allow_nonfinite)
            return cast(arr, target)[0]

        def emit(it: OutputTensor, result, done: int) -> int:
            """Write one finished tensor (result: array or future) in plan order."""
            writer.write(it.key, result.result() if hasattr(result, "result") else result)
            bar.update(it.nbytes)
            for src in by_key[it.key][0].sources:
                f = reader.tensors[src].file
                uses_left[f] -= 1
                if uses_left[f] == 0:
                    reader.shards[f].close()
            if _after_tensor:
                _after_tensor(done + 1)
            return done + 1

        done = 0
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for shard_items, name in zip(shards, names):
                writer = ShardWriter(tmp / name, shard_items)
                # Bounded look-ahead: a few tensors in flight, written strictly in order.
                pending: deque = deque()
                # Quantization runs MLX on this thread only (MLX evaluation is not used from
                # several threads), so a shard holding quantized tensors is produced in order.
                serial = any(by_key[it.key][1].startswith("q:") for it in shard_items)
                for it in shard_items:
                    if serial:
                        done = emit(it, produce(it.key), done)
                        continue
                    pending.append((it, pool.submit(produce, it.key)))
                    if len(pending) >= 2 * max(1, workers):
                        done = emit(*pending.popleft(), done)
                while pending:
                    done = emit(*pending.popleft(), done)
                record_files[name] = {"sha256": writer.close(), "size": writer.size}
                writer = None
        bar.close()
        reader.close()

        index = {"metadata": {"total_size": total_bytes, "format": "mlx"},
                 "weight_map": {it.key: name for shard_items, name in zip(shards, names) for it in shard_items}}
        _write_json(tmp / "model.safetensors.index.json", index)
        _write_json(tmp / "config.json", cfg)
        _write_tokenizer(tokenizer_src, tmp)
        record = {
            "converter": f"mlx-music {__version__}",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"path": str(source.folder), "repo_id": source.repo_id,
                       "revision": source.revision or _snapshot_revision(source.folder),
                       "layout": reader.layout, "files": reader.files, **source_extra},
            "manifest": manifest.name or "custom", "variant": manifest.name, "dtype": dtype,
            "base_model": source.repo_id or manifest.repo_id,
            "license": _license_from_readme(source.folder) or manifest.license,
            "quantization": cfg["quantization"],
            "num_tensors": len(index["weight_map"]),
            "dropped": plan.summary(),
            "dropped_keys": dict(sorted(plan.dropped.items())),
        }
        if merger is not None:
            record["adapter"] = merger.adapter.record()
        (tmp / "README.md").write_text(_model_card(cfg, record))
        for p in sorted(tmp.iterdir()):
            if p.name not in record_files and p.is_file():
                record_files[p.name] = {"sha256": _sha256(p), "size": p.stat().st_size}
        record["files"] = dict(sorted(record_files.items()))
        _write_json(tmp / "conversion.json", record)
        _install(tmp, out, force)
    except BaseException as e:
        if writer is not None:
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, ConvertError):
            raise OutputError(f"mlx_path {out}: write failed ({e.strerror or e}); nothing was written") from None
        raise
    nparams = sum(int(np.prod(r.shape)) for r in plan.recipes.values())
    return ConversionResult(out, manifest.name, len(index["weight_map"]), nparams, total_bytes,
                            dict(plan.dropped), sorted(qbits), skipped)


def _checked(r: Recipe, arr: np.ndarray, allow_nonfinite: bool) -> np.ndarray:
    if not allow_nonfinite and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise SourceError(f"tensor {r.sources[0]}: {bad} NaN/Inf values; refusing "
                          "(pass allow_nonfinite=True to convert anyway)")
    return arr


def _model_card(cfg: dict, record: dict) -> str:
    try:
        from .model_card import render_model_card
    except ImportError:  # pragma: no cover - model_card lands separately
        return f"---\nlibrary_name: mlx\n---\n# {cfg.get('variant') or 'MusicGen'} (MLX)\n"
    return render_model_card(cfg, record)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _snapshot_revision(folder: Path) -> str | None:
    # Inside a hub cache the folder name is the commit hash: .../snapshots/<sha>
    if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", folder.name):
        return folder.name
    return None


def _tokenizer_source(folder: Path) -> tuple[str, Path]:
    if (folder / "tokenizer.json").exists():
        return ("json", folder)
    if (folder / "spiece.model").exists():
        return ("spiece", folder)
    raise SourceError(f"{folder}: no tokenizer found; expected tokenizer.json or spiece.model")


def _write_tokenizer(src: tuple[str, Path], dst: Path) -> None:
    kind, folder = src
    if kind == "json":
        for name in TOKENIZER_FILES:
            if (folder / name).exists():
                shutil.copyfile(folder / name, dst / name)
        return
    from .tokenizer_export import load_spiece_proto, spiece_to_tokenizer_json, t5_tokenizer_config

    spiece_to_tokenizer_json(folder / "spiece.model", dst / "tokenizer.json")
    for name in TOKENIZER_FILES[1:]:
        if (folder / name).exists():
            shutil.copyfile(folder / name, dst / name)
    if not (dst / "tokenizer_config.json").exists():
        proto = load_spiece_proto(folder / "spiece.model")
        _write_json(dst / "tokenizer_config.json", t5_tokenizer_config(proto, model_max_length=512, extra_ids=100))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _install(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished folder into place; with --force the old one survives until then."""
    if out.exists():
        if not force:
            raise OutputError(f"mlx_path {out}: already exists; pass force=True to replace it")
        if _exchange(tmp, out):  # one atomic step: a kill at any moment leaves a complete folder
            shutil.rmtree(tmp, ignore_errors=True)
            return
        backup = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, backup)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(backup, out)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(tmp, out)
