"""Load an MLX MusicGen checkpoint folder (or hub repo id) into a ready `MusicGenPipeline`."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_music.models.musicgen import MusicGen
from mlx_music.runtime.hub import resolve_model_path
from mlx_music.runtime.checksums import sha256_file as _sha256


class CheckpointError(ValueError):
    """The MLX checkpoint is incomplete, corrupt or inconsistent. Message names the file/key."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None



def check_files(folder: Path, shards: list[str], verify: bool) -> None:
    """Sizes always (cheap), sha256 with verify=True, against conversion.json."""
    record_path = folder / "conversion.json"
    if not record_path.exists():
        if verify:
            raise CheckpointError(f"{record_path}: missing; cannot --verify without the conversion record")
        return
    files = _read_json(record_path).get("files", {})
    if not isinstance(files, dict):
        raise CheckpointError(f"{record_path}: 'files' must map file names to size and sha256")
    for name in shards:
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"{path}: shard listed in model.safetensors.index.json is missing")
        meta = files.get(name)
        if meta is None:
            continue
        if not (isinstance(meta, dict) and isinstance(meta.get("size"), int) and isinstance(meta.get("sha256"), str)):
            raise CheckpointError(f"{record_path}: entry for {name} is malformed (needs size and sha256)")
        if path.stat().st_size != meta["size"]:
            raise CheckpointError(f"{path}: size {path.stat().st_size} differs from the conversion record "
                                  f"({meta['size']}); the file is truncated or replaced")
        if verify and _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"{path}: sha256 differs from the conversion record; the file is corrupt")


def load_model(folder: Path, verify: bool = False) -> tuple[MusicGen, dict]:
    config = _read_json(folder / "config.json")
    if config.get("format") != "mlx-music":
        raise CheckpointError(f"{folder / 'config.json'}: not an mlx-music checkpoint "
                              "(convert Hugging Face checkpoints with `mlx-music convert`)")
    index = _read_json(folder / "model.safetensors.index.json")
    shards = sorted(set(index.get("weight_map", {}).values()))
    check_files(folder, shards, verify)
    model = MusicGen.from_config(config)
    q = config.get("quantization")
    if q:
        modules = q.get("modules", {})
        nn.quantize(model, group_size=q["group_size"], bits=q["bits"],
                    class_predicate=lambda path, m: ({"group_size": q["group_size"], "bits": modules[path]}
                                                     if path in modules else False))
    weights: dict[str, mx.array] = {}
    for shard in shards:
        try:
            weights.update(mx.load(str(folder / shard)))
        except Exception as e:  # MLX raises RuntimeError/ValueError on corrupt files
            raise CheckpointError(f"{folder / shard}: cannot read ({str(e).splitlines()[0][:200]})") from None
    try:
        model.load_weights(weights, strict=True)
    except ValueError as e:
        raise CheckpointError(f"{folder}: weights do not match config.json ({e})") from None
    mx.eval(model.parameters())
    return model, config


def load(path_or_repo_id: str | Path, revision: str | None = None, verify: bool = False):
    """Load a checkpoint: a local MLX folder or a hub repo id (resolved through the HF cache)."""
    from mlx_music.runtime.pipeline import MusicGenPipeline
    from mlx_music.runtime.text import TextTokenizer

    folder = resolve_model_path(str(path_or_repo_id), revision=revision)
    model, config = load_model(Path(folder), verify=verify)
    tokenizer = TextTokenizer(Path(folder) / "tokenizer.json", config["text_encoder"].get("max_text_tokens", 512))
    return MusicGenPipeline(model, config, tokenizer, Path(folder))
