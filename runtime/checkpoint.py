"""Is a folder a complete, intact MLX checkpoint? One check, at four levels, for every caller.

`verify_checkpoint(folder, level)` levels, each including the ones before it:

  "files"   Everything the runtime reads is there and parses: config.json with format
            "mlx-music", the weights (model.safetensors.index.json and every shard it lists, or a
            single model.safetensors) and tokenizer.json. No hashing, no conversion record needed.
            Used by the hub resolver (runtime/hub.py) on every folder and snapshot.
  "sizes"   + every weight shard has the size conversion.json records for it, when the folder has
            a record (a hand-made checkpoint without one passes). A stat() per shard catches
            truncated and half-copied shards; used on every load (runtime/loader.py).
  "sha256"  + conversion.json is required, lists every weight shard, and each shard's sha256
            matches it. `load(..., verify=True)` / `generate --verify`.
  "exact"   The folder is what the converter wrote: conversion.json lists every checkpoint file
            (METADATA_FILES present, every shard) and every file it lists exists with its recorded
            size and sha256; sizes of all files are compared before any hash, so a truncated copy
            fails fast. Used by `publish` (converters/publish.py) and `convert-all` to trust a
            finished output (converters/convert_all.py).

Failures raise CheckpointError with a one-line message naming the folder or file; a folder that
lacks files the runtime reads raises its subclass MissingFilesError, whose `problems` lists them all,
and a missing conversion.json (levels "sha256", "exact") raises RecordMissingError.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlx_music.runtime.checksums import sha256_file
from mlx_music.runtime.records import loads_json

LEVELS = ("files", "sizes", "sha256", "exact")
RECORD = "conversion.json"
INDEX = "model.safetensors.index.json"
# Files an MLX checkpoint folder holds besides its weight shards and RECORD (notes/SPEC.md).
METADATA_FILES = ("config.json", INDEX, "tokenizer.json", "tokenizer_config.json", "README.md")


class CheckpointError(ValueError):
    """The MLX checkpoint is incomplete, corrupt or inconsistent. Message names the file/key."""


class MissingFilesError(CheckpointError):
    """Files the runtime reads are missing or unreadable; `problems` names each (one line each)."""

    def __init__(self, folder: Path, problems: list[str]):
        self.folder, self.problems = folder, list(problems)
        super().__init__(f"{folder} is not a complete MLX checkpoint: {'; '.join(problems)}")


class RecordMissingError(CheckpointError):
    """Level "sha256" or "exact" was asked for, but the folder has no conversion.json."""


@dataclass
class Checkpoint:
    """What verify_checkpoint read on the way: the parsed config, the weight shards, the record."""

    folder: Path
    config: dict
    shards: list[str]
    record: dict | None


def _config_problems(folder: Path) -> tuple[list[str], dict | None]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return ["config.json missing"], None
    try:
        cfg = loads_json(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return [f"config.json unreadable ({e})"], None
    if not isinstance(cfg, dict) or cfg.get("format") != "mlx-music":
        fmt = cfg.get("format") if isinstance(cfg, dict) else None
        # The usual mistake: pointing at the original PyTorch repo instead of a conversion.
        return [f"config.json has format {fmt!r}, not 'mlx-music' "
                "(not an MLX checkpoint; convert it with `mlx-music convert`)"], None
    return [], cfg


def config_problems(folder: str | Path) -> list[str]:
    """Problems with config.json alone (the hub resolver checks it before downloading weights)."""
    return _config_problems(Path(folder))[0]


def _files(folder: Path) -> tuple[list[str], dict | None, list[str]]:
    """(problems, config, weight shards) for the "files" level."""
    problems, cfg = _config_problems(folder)
    shards: list[str] = []
    index_path = folder / INDEX
    if index_path.is_file():
        try:
            index = loads_json(index_path.read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            problems.append(f"{INDEX} unreadable ({e})")
        else:
            missing = [s for s in shards if not (folder / s).is_file()]
            if not shards:
                problems.append(f"{INDEX} lists no shards")
            if missing:
                more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
                problems.append(f"missing weight shard(s) {', '.join(missing[:3])}{more}")
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        problems.append(f"no weights ({INDEX} / model.safetensors)")
    if not (folder / "tokenizer.json").is_file():
        problems.append("tokenizer.json missing")
    return problems, cfg, shards


def checkpoint_problems(folder: str | Path) -> list[str]:
    """The "files" level as a list of human-readable problems (empty when complete)."""
    return _files(Path(folder))[0]


def _entry_ok(meta) -> bool:
    return isinstance(meta, dict) and isinstance(meta.get("size"), int) and isinstance(meta.get("sha256"), str)


def _read_record(folder: Path, required: bool) -> dict | None:
    path = folder / RECORD
    if not path.is_file():
        if required:
            raise RecordMissingError(f"{path} missing: sha256 checks need the conversion record that "
                                     "`mlx-music convert` writes")
        return None
    try:
        record = loads_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or (required and not files):
        raise CheckpointError(f"{path}: 'files' must map file names to size and sha256")
    for name in files:
        # The record is data from disk: never let it point outside the folder.
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts or name == RECORD:
            raise CheckpointError(f"{path}: lists an invalid file name {name!r}")
    return record


def _check_size(folder: Path, name: str, meta: dict) -> None:
    size = (folder / name).stat().st_size
    if size != meta["size"]:
        raise CheckpointError(f"{folder / name}: size {size} differs from {meta['size']} recorded in {RECORD}; "
                              "the file is truncated, replaced or modified after conversion")


def _check_sha256(folder: Path, name: str, meta: dict) -> None:
    if sha256_file(folder / name) != meta["sha256"].lower():
        raise CheckpointError(f"{folder / name}: sha256 differs from the conversion record ({RECORD}); "
                              "the file is corrupt or modified after conversion")


def verify_checkpoint(folder: str | Path, level: str = "sizes") -> Checkpoint:
    """Check `folder` at `level` (see the module docstring); raise CheckpointError or return what
    was read. The cheap checks of a level always run before the expensive ones."""
    if level not in LEVELS:
        raise ValueError(f"verify_checkpoint level {level!r}: expected one of {', '.join(LEVELS)}")
    folder = Path(folder)
    problems, cfg, shards = _files(folder)
    if problems:
        raise MissingFilesError(folder, problems)
    if level == "files":
        return Checkpoint(folder, cfg, shards, None)
    record = _read_record(folder, required=level in ("sha256", "exact"))
    files = (record or {}).get("files", {})
    if level == "exact":
        checked = sorted(files)
        present = {n for n in METADATA_FILES if (folder / n).is_file()}
        unrecorded = sorted((present | set(shards) | {p.name for p in folder.glob("*.safetensors")}) - files.keys())
        if unrecorded:
            raise CheckpointError(f"{folder}: {', '.join(unrecorded)} not listed in {RECORD} (cannot verify)")
    else:
        checked = [s for s in shards if s in files or level == "sha256"]
        unrecorded = [s for s in checked if s not in files]
        if unrecorded:
            raise CheckpointError(f"{folder}: {', '.join(unrecorded)} not listed in {RECORD} (cannot verify)")
    for name in checked:
        if not _entry_ok(files[name]):
            raise CheckpointError(f"{folder / RECORD}: entry for {name} is malformed (needs size and sha256)")
    missing = [n for n in checked if not (folder / n).is_file()]
    if missing:
        raise CheckpointError(f"{folder}: file(s) listed in {RECORD} missing: {', '.join(missing)}")
    for name in checked:
        _check_size(folder, name, files[name])
    if level in ("sha256", "exact"):
        for name in checked:
            _check_sha256(folder, name, files[name])
    return Checkpoint(folder, cfg, shards, record)
