"""Write trained LoRA factors as an MLX adapter and as a PEFT adapter, atomically.

MLX adapter (the `mlx_music.runtime.adapters` format that ``generate --adapter``, ``load(...,
adapter=)`` and ``set_adapter`` take): ``adapter_config.json`` + ``adapters.safetensors`` +
``conversion.json`` in the output folder itself, with a model card ``README.md`` (base model, data
size, steps, losses).

PEFT adapter (``<out>/peft``): ``adapter_config.json`` + ``adapter_model.safetensors`` with the key
names peft 0.21 writes for transformers' ``MusicgenForConditionalGeneration``
(``base_model.model.<module>.lora_A.weight`` (r, in), ``.lora_B.weight`` (out, r); embeddings
``.lora_embedding_A`` (r, vocab), ``.lora_embedding_B`` (dims, r)), loadable with
``PeftModel.from_pretrained`` and mergeable with ``mlx-music convert --adapter``. ``target_modules``
lists the exact transformers module paths trained, so peft matches nothing else.

Every file is written to a temp name in its folder, then renamed over the old one, so a kill
leaves the previous adapter or the new one, never half a file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_music.converters.adapters import _mlx_module
from mlx_music.converters.manifest import custom_manifest
from mlx_music.converters.model_card import render_adapter_card
from mlx_music.runtime import adapters as rt
from mlx_music.runtime.checkpoint import RECORD
from mlx_music.runtime.checksums import sha256_file

PEFT_DIR = "peft"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def hf_module(mlx_module: str) -> str:
    """MLX checkpoint module path -> transformers' MusicGen module path (the inverse of the
    manifest's rename rules, which is checked: converters.adapters reads the name back)."""
    if mlx_module.startswith(("decoder.layers.", "decoder.embed_tokens.")):
        name = "decoder.model." + mlx_module
    else:
        name = mlx_module  # decoder.lm_heads.k, enc_to_dec_proj, audio_enc_to_dec_proj
    if _mlx_module(name, custom_manifest().rules) != mlx_module:
        raise ValueError(f"--targets: module {mlx_module} has no transformers name (cannot export to PEFT)")
    return name


def _kind(mlx_module: str) -> str:
    return "embedding" if ".embed_tokens." in mlx_module else "linear"


def _atomic_write(path: Path, write) -> None:
    tmp = path.parent / f".partial-{os.getpid()}-{path.name}"  # keeps the suffix (mx.save_* add one)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))


def _write_tensors(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str]) -> None:
    _atomic_write(path, lambda p: mx.save_safetensors(str(p), arrays, metadata=metadata))


def save_adapters(out: Path, factors: dict[str, tuple[mx.array, mx.array]], *, rank: int, alpha: float,
                  rslora: bool, scale: float, base_model: str | None, melody: bool = False,
                  info: dict | None = None) -> None:
    """Write the MLX adapter into `out` and the PEFT adapter into ``out/peft``.

    factors: MLX checkpoint module path -> (a (rank, in), b (rows, rank)) float32."""
    out = Path(out)
    (out / PEFT_DIR).mkdir(parents=True, exist_ok=True)
    names = sorted(factors)
    hf = {n: hf_module(n) for n in names}
    mx.eval([factors[n] for n in names])
    tensors = {}
    for n in names:
        a, b = factors[n]
        tensors[f"{n}.lora_a"] = a.astype(mx.float32)
        tensors[f"{n}.lora_b"] = b.astype(mx.float32)
    config = {"format": rt.ADAPTER_FORMAT, "format_version": rt.FORMAT_VERSION, "peft_type": "LORA",
              "base_model": base_model, "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
              "modules": {n: {"kind": _kind(n), "rank": rank, "scale": scale,
                              "shape": [int(factors[n][1].shape[0]), int(factors[n][0].shape[1])],
                              "source": hf[n]} for n in names}}
    if info:
        config["training"] = info
    _write_tensors(out / rt.WEIGHTS, tensors, {"format": "mlx"})
    _write_json(out / rt.CONFIG, config)
    record = {"converter": "mlx-music train",
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "files": {f: {"sha256": sha256_file(out / f), "size": (out / f).stat().st_size}
                        for f in (rt.CONFIG, rt.WEIGHTS)}}
    _write_json(out / RECORD, record)

    peft_tensors = {}
    for n in names:
        a, b = factors[n]
        if _kind(n) == "embedding":  # peft: lora_embedding_A (r, vocab) = b^T, lora_embedding_B (dims, r) = a^T
            peft_tensors[f"base_model.model.{hf[n]}.lora_embedding_A"] = mx.contiguous(b.T.astype(mx.float32))
            peft_tensors[f"base_model.model.{hf[n]}.lora_embedding_B"] = mx.contiguous(a.T.astype(mx.float32))
        else:
            peft_tensors[f"base_model.model.{hf[n]}.lora_A.weight"] = a.astype(mx.float32)
            peft_tensors[f"base_model.model.{hf[n]}.lora_B.weight"] = b.astype(mx.float32)
    peft_config = {
        "peft_type": "LORA", "task_type": None, "inference_mode": True, "r": rank, "lora_alpha": alpha,
        "lora_dropout": 0.0, "target_modules": [hf[n] for n in names], "bias": "none", "use_rslora": rslora,
        "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": base_model, "revision": None,
        "auto_mapping": ({"base_model_class": "MusicgenMelodyForConditionalGeneration",
                          "parent_library": "transformers.models.musicgen_melody.modeling_musicgen_melody"}
                         if melody else
                         {"base_model_class": "MusicgenForConditionalGeneration",
                          "parent_library": "transformers.models.musicgen.modeling_musicgen"}),
    }
    _write_tensors(out / PEFT_DIR / PEFT_WEIGHTS, peft_tensors, {"format": "pt"})
    _write_json(out / PEFT_DIR / PEFT_CONFIG, peft_config)
    if info is not None:
        write_model_card(out, base_model=base_model, info=info, modules=names, rank=rank, alpha=alpha)


def write_model_card(out: Path, *, base_model: str | None, info: dict, modules: list[str], rank: int,
                     alpha: float) -> None:
    """out/README.md: what the adapter is (base model, data size, steps, losses) and how to use it."""
    text = render_adapter_card(base_model=base_model, info=info, modules=modules, rank=rank, alpha=alpha)
    _atomic_write(out / "README.md", lambda p: p.write_text(text, encoding="utf-8"))


def as_numpy(factors: dict[str, tuple[mx.array, mx.array]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {n: (np.array(a), np.array(b)) for n, (a, b) in factors.items()}


__all__ = ["PEFT_CONFIG", "PEFT_DIR", "PEFT_WEIGHTS", "hf_module", "save_adapters"]
