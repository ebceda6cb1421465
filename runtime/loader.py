"""Load an MLX MusicGen checkpoint folder (or hub repo id) into a ready `MusicGenPipeline`."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_music.models.magnet import MagnetModel
from mlx_music.models.musicgen import MusicGen
from mlx_music.runtime.checkpoint import CheckpointError, RecordMissingError, verify_checkpoint
from mlx_music.runtime.hub import resolve_model_path

__all__ = ["CheckpointError", "build_model", "load", "load_model", "quantize_like_checkpoint"]


def quantize_like_checkpoint(model: nn.Module, quantization: dict | None) -> nn.Module:
    """Swap in the quantized layers config.json["quantization"] names (modules -> bits), in place.

    The one place that decides which modules a quantized checkpoint holds as QuantizedLinear:
    the loader uses it before loading weights, the converter to know the tensors to expect.
    """
    if quantization:
        modules, group_size = quantization.get("modules", {}), quantization["group_size"]
        nn.quantize(model, group_size=group_size, bits=quantization["bits"],
                    class_predicate=lambda path, m: ({"group_size": group_size, "bits": modules[path]}
                                                     if path in modules else False))
    return model


def build_model(config: dict) -> MusicGen:
    """The MLX model for an mlx-music config.json (its family: MusicGen, or MAGNeT for
    model_type "magnet"), quantized as the checkpoint is; parameters are lazy (nothing is
    allocated until they are evaluated or replaced by load_weights)."""
    cls = MagnetModel if config.get("model_type") == "magnet" else MusicGen
    return quantize_like_checkpoint(cls(config), config.get("quantization"))


def load_model(folder: Path, verify: bool = False) -> tuple[MusicGen, dict]:
    """Model and config of the checkpoint in `folder`. Always checks the "sizes" level of
    runtime.checkpoint.verify_checkpoint; verify=True checks the "sha256" level."""
    folder = Path(folder)
    try:
        ckpt = verify_checkpoint(folder, "sha256" if verify else "sizes")
    except RecordMissingError as e:
        raise CheckpointError(f"{e}; cannot verify=True without it") from None
    config = ckpt.config
    model = build_model(config)
    weights: dict[str, mx.array] = {}
    for shard in ckpt.shards:
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


def load(path_or_repo_id: str | Path, revision: str | None = None, verify: bool = False, adapter=None):
    """Load a checkpoint: a local MLX folder or a hub repo id (resolved through the HF cache).

    adapter: an MLX LoRA adapter folder / repo id (`mlx-music convert-adapter`) applied on top;
    switch it later with `pipe.set_adapter(...)`."""
    from mlx_music.runtime.pipeline import MusicGenPipeline
    from mlx_music.runtime.text import TextTokenizer

    folder = resolve_model_path(str(path_or_repo_id), revision=revision)
    if adapter is not None:
        from mlx_music.runtime.adapters import Adapter, load_adapter

        adapter = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)  # fail before the weights load
    model, config = load_model(Path(folder), verify=verify)
    tokenizer = TextTokenizer(Path(folder) / "tokenizer.json", config["text_encoder"].get("max_text_tokens", 512))
    pipe = MusicGenPipeline(model, config, tokenizer, Path(folder))
    if adapter is not None:
        pipe.set_adapter(adapter)
    return pipe
