"""Variant manifests: TOML data (key rules, dtype and quantize policy, expected config values).

A variant file names a base with `extends`; tables merge key by key, rule lists concatenate.
Every field is read by the converter; a field not in FIELDS is an error, so the files cannot
accumulate settings nothing reads:

  [variant]   name, repo_id (hub source), license (model card fallback)
  [expect]    config facts (mlx_config.config_facts) the checkpoint must have
  [files]     config, tokenizer, extra, weights_preference, weights.<format>: hub files to fetch
  [rules]     alias, drop, weight_norm, sum, split, rename, layout: key_rules.build_plan
  [dtype]     keep_float32: output keys kept float32 under --dtype
  [quantize]  include, exclude, recipes.<name>.{high_bits, high}: which modules --quantize touches

Generation defaults are not manifest data: they come from runtime.sampling (see mlx_config).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_music.manifests import MANIFEST_DIR

from .errors import ManifestError


# table -> allowed keys (None: any key, e.g. [expect]); rule kind -> allowed keys of one rule.
FIELDS: dict[str, set[str] | None] = {
    "variant": {"name", "repo_id", "license"},
    "expect": None,
    "files": {"config", "tokenizer", "extra", "weights_preference", "weights"},
    "rules": {"alias", "drop", "weight_norm", "sum", "split", "rename", "layout"},
    "dtype": {"keep_float32"},
    "quantize": {"include", "exclude", "recipes"},
}
RULE_FIELDS = {
    "alias": {"name", "key", "alternatives"},
    "drop": {"name", "pattern"},
    "weight_norm": {"name", "g", "v", "out"},
    "sum": {"name", "pattern", "out", "count"},
    "split": {"name", "pattern", "out"},
    "rename": {"pattern", "to"},
    "layout": {"name", "module", "parameter", "pattern", "transpose"},
}
RECIPE_FIELDS = {"high_bits", "high"}


@dataclass
class Manifest:
    name: str | None  # None for a checkpoint that matches no known variant ("custom")
    repo_id: str | None
    license: str | None
    expect: dict[str, Any]
    files: dict[str, Any]
    rules: dict[str, list[dict[str, Any]]]
    dtype: dict[str, Any]
    quantize: dict[str, Any]
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


def _check_fields(data: dict, path: Path | None) -> None:
    """Refuse fields nothing reads (a typo, or a setting that was dropped)."""
    def unknown(where: str, got, allowed) -> None:
        extra = sorted(set(got) - set(allowed))
        if extra:
            raise ManifestError(f"{path}: unknown field(s) {', '.join(extra)} in {where}; "
                                f"expected some of {', '.join(sorted(allowed))}")

    unknown("the top level", data, FIELDS)
    for table, allowed in FIELDS.items():
        if allowed is not None and isinstance(data.get(table), dict):
            unknown(f"[{table}]", data[table], allowed)
    for kind, rules in data.get("rules", {}).items():
        for rule in rules:
            unknown(f"[[rules.{kind}]]", rule, RULE_FIELDS[kind])
    for name, recipe in data.get("quantize", {}).get("recipes", {}).items():
        unknown(f"[quantize.recipes.{name}]", recipe, RECIPE_FIELDS)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        elif isinstance(v, list) and isinstance(out.get(k), list) and k != "keep_float32":
            out[k] = out[k] + v
        else:
            out[k] = v
    return out


def _read_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path in seen:
        raise ManifestError(f"{path}: 'extends' forms a cycle")
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"{path}: invalid TOML ({e})") from None
    parent = data.pop("extends", None)
    if parent:
        data = _merge(_read_toml(path.parent / parent, seen + (path,)), data)
    return data


def _from_dict(data: dict, path: Path | None) -> Manifest:
    variant = data.get("variant", {})
    for table in ("files", "rules", "dtype", "quantize"):
        if table not in data:
            raise ManifestError(f"{path}: missing table [{table}]")
    _check_fields(data, path)
    return Manifest(
        name=variant.get("name"), repo_id=variant.get("repo_id"),
        license=variant.get("license"), expect=dict(data.get("expect", {})),
        files=data["files"], rules=data["rules"], dtype=data["dtype"], quantize=data["quantize"],
        path=path, raw=data)


def variant_names(manifest_dir: Path = MANIFEST_DIR) -> list[str]:
    return sorted(p.stem for p in manifest_dir.glob("*.toml") if not p.stem.startswith("_"))


def load_manifest(name_or_path: str | Path, manifest_dir: Path = MANIFEST_DIR) -> Manifest:
    """Load a variant manifest by name (`musicgen-small`, `facebook/musicgen-small`) or path."""
    p = Path(name_or_path)
    if p.suffix != ".toml":
        name = str(name_or_path).split("/")[-1]
        p = manifest_dir / f"{name}.toml"
        if not p.exists():
            raise ManifestError(f"variant {name_or_path!r}: unknown variant; expected one of "
                                f"{', '.join(variant_names(manifest_dir))}")
    return _from_dict(_read_toml(p), p)


def custom_manifest(manifest_dir: Path = MANIFEST_DIR) -> Manifest:
    """The shared rules alone, for a checkpoint that is MusicGen-shaped but no known variant."""
    data = _read_toml(manifest_dir / "_base.toml")
    data["variant"] = {"name": None}
    return _from_dict(data, manifest_dir / "_base.toml")


def check_expectations(manifest: Manifest, facts: dict[str, Any], source: str) -> None:
    """Raise naming the first config field that contradicts the manifest."""
    # Structural fields first, so a stereo manifest on a mono file says "audio_channels".
    first = ("model_type", "audio_channels", "num_codebooks")
    ordered = sorted(manifest.expect.items(), key=lambda kv: (kv[0] not in first, first.index(kv[0]) if kv[0] in first else 0))
    for key, want in ordered:
        if key not in facts:
            continue
        got = facts[key]
        if got != want:
            raise ManifestError(
                f"{source}: config field {key} = {got!r} but manifest {manifest.name} expects "
                f"{want!r}; pick the right variant=NAME or omit it to auto-detect")


def detect_variant(facts: dict[str, Any], manifest_dir: Path = MANIFEST_DIR) -> Manifest:
    """The known variant whose expectations all hold, else a custom manifest of that family."""
    matches = []
    for name in variant_names(manifest_dir):
        m = load_manifest(name, manifest_dir)
        if all(facts.get(k) == v for k, v in m.expect.items() if k in facts):
            matches.append(m)
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:  # pragma: no cover - manifests are mutually exclusive by design
        raise ManifestError(f"config matches several variants: {[m.name for m in matches]}")
    return custom_manifest(manifest_dir)
