"""Describe a Hugging Face or MLX MusicGen checkpoint folder (what `mlx-music inspect` prints)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .errors import ConvertError, SourceError
from mlx_music.runtime.records import loads_json


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """key -> (dtype, shape, begin, end) of a safetensors file, validated, without reading data."""
    from .shard_reader import _SafetensorsFile

    return _SafetensorsFile(path).entries


def inspect_folder(path: str | Path) -> dict:
    folder = Path(path)
    if not folder.is_dir():
        raise ConvertError(f"{folder}: not a folder")
    cfg_path = folder / "config.json"
    if cfg_path.exists():
        try:
            cfg = loads_json(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise SourceError(f"{cfg_path}: not valid JSON ({e})") from None
        if cfg.get("format") == "mlx-music":
            return _inspect_mlx(folder, cfg)
    return _inspect_hf(folder)


def _inspect_mlx(folder: Path, cfg: dict) -> dict:
    from .mlx_config import expected_shapes

    index = loads_json((folder / "model.safetensors.index.json").read_text())
    tensors: dict[str, dict] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(read_safetensors_header(folder / shard))
    dtypes = Counter(t[0] for t in tensors.values())
    nbytes = sum(t[3] - t[2] for t in tensors.values())
    expected = expected_shapes(cfg, quantized=True)  # packed weights, scales and biases included
    wrong = [k for k in expected if k in tensors and tuple(tensors[k][1]) != tuple(expected[k])]
    params = sum(int(_prod(shape)) for shape in expected_shapes(cfg).values())
    info = {
        "path": str(folder), "format": "mlx", "variant": cfg.get("variant") or "custom",
        "model_type": cfg["model_type"], "audio_channels": cfg["audio_channels"],
        "num_codebooks": cfg["num_codebooks"], "tensors": len(tensors), "parameters": params,
        "dtypes": dict(dtypes), "bytes": nbytes, "quantization": cfg.get("quantization"),
        "shards": len(set(index["weight_map"].values())),
        "manifest_diff": {"missing": sorted(set(expected) - set(tensors)),
                          "unexpected": sorted(set(tensors) - set(expected)), "wrong_shape": sorted(wrong)},
    }
    if cfg.get("magnet"):  # MAGNeT: its masking settings and decoding defaults
        gen = cfg.get("generation", {})
        info["magnet"] = {**cfg["magnet"], "clip_seconds": gen.get("max_duration"),
                          **{k: gen.get(k) for k in ("decoding_steps", "span_arrangement", "temperature", "top_p",
                                                     "max_cfg_coef", "min_cfg_coef")}}
    return info


def _inspect_hf(folder: Path) -> dict:
    from .convert import load_source_config
    from .key_rules import build_plan, diff_against_expected
    from .manifest import detect_variant
    from .mlx_config import expected_shapes, with_config_rules
    from .shard_reader import CheckpointReader

    cfg, facts = load_source_config(folder)
    manifest = detect_variant(facts)
    reader = CheckpointReader(folder, prefer=tuple(manifest.files["weights_preference"]))
    infos = reader.tensors.values()
    plan = build_plan(reader.tensors, with_config_rules(manifest.rules, cfg), None, strict=False)
    return {
        "path": str(folder), "format": f"huggingface ({reader.layout})",
        "variant": manifest.name or "custom", "model_type": cfg["model_type"],
        "audio_channels": cfg["audio_channels"], "num_codebooks": cfg["num_codebooks"],
        "tensors": len(reader.tensors), "parameters": sum(int(_prod(i.shape)) for i in infos),
        "dtypes": dict(Counter(i.dtype for i in infos)), "bytes": sum(i.nbytes for i in infos),
        "shards": len(reader.shards), "dropped_by_rules": len(plan.dropped),
        "manifest_diff": diff_against_expected(plan, expected_shapes(cfg)),
    }


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def format_report(info: dict) -> str:
    lines = []
    for k, v in info.items():
        if k == "manifest_diff":
            problems = {kk: vv for kk, vv in v.items() if vv}
            if not problems:
                lines.append(f"{'manifest diff':<16} none (every tensor accounted for)")
            for kk, vv in problems.items():
                lines.append(f"{'manifest diff':<16} {kk}: {len(vv)}: {', '.join(vv[:6])}{' ...' if len(vv) > 6 else ''}")
        elif k == "quantization" and v:
            lines.append(f"{k:<16} {v['bits']}-bit, group {v['group_size']}, recipe {v.get('recipe') or 'uniform'}, "
                         f"{len(v.get('modules', {}))} modules, {len(v.get('skipped', []))} skipped")
        elif k == "magnet":
            lines.append(f"{k:<16} " + ", ".join(f"{kk} {vv}" for kk, vv in v.items()))
        elif k == "bytes":
            lines.append(f"{k:<16} {v:,} ({v / 1e6:.1f} MB)")
        elif k == "parameters":
            lines.append(f"{k:<16} {v:,}")
        else:
            lines.append(f"{k:<16} {v}")
    return "\n".join(lines)
