"""Make the MAGNeT test fixtures in tests/data/audiocraft/magnet*/ with audiocraft 1.3.0 itself.

Run in the audiocraft venv of tests/make_audiocraft_fixtures.py (after that script, whose test HF
cache, ``hf-cache/``, these fixtures resolve t5-base, t5-large and facebook/encodec_32khz from):

    /tmp/acvenv/bin/python tests/make_magnet_fixtures.py

What it writes (random weights, tiny; about 0.6 MB in all):

* ``magnet/``: a mono 32 kHz MAGNeT (t5-base name, the compression *stub* naming
  facebook/encodec_32khz), restricted context ``subcodes_context = 2``, spans of 3, 1 s segment;
* ``magnet-audio/``: an audio-MAGNeT-shaped one (16 kHz EnCodec as a full compression package,
  t5-large name, ``subcodes_context = 1``).

Both are built with ``audiocraft.models.builders`` from an xp.cfg shaped like the released ones
(``lm_model: transformer_lm_magnet``, ``causal: false``, ``codebooks_pattern: parallel``,
``masking.span_len``) and exported in audiocraft's layout (``state_dict.bin`` = {best_state, xp.cfg,
version, exported}; float16 weights keep the files small and load into float32 models exactly).
``refs.npz`` holds audiocraft's outputs, loaded back through its own MAGNeT loader
(``load_lm_model_magnet``, which switches attention to the xformers backend: the shim in
tests/audiocraft_shims.py computes softmax(q k^T / sqrt(d) + bias) v there):

* ``mask_stage{s}``: ``lm.attn_mask_per_stage[s]`` ([1, heads, T8, T8] float, aligned to 8; absent
  for stage 0, whose mask is None);
* ``logits_stage{s}``: ``lm.compute_predictions(codes_stage{s}, [prompt], stage=s)`` logits
  [1, K, T, card] for a masked token grid as MAGNeT's decoding builds it (codebooks below s decided,
  codebook s partly masked, those above all masked);
* ``tokens`` / ``audio``: ``MAGNeT.generate(prompts)`` with ``use_sampling=False`` and the API's
  other defaults for a batch of two prompts (equal token counts: audiocraft's cross-attention
  attends to padding, mlx-music's does not); ``tokens_stride1``: the same with
  ``span_arrangement='stride1'`` (music fixture only).
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_audiocraft_fixtures import CACHE, CARD, OUT, lm_cfg  # noqa: E402

PROMPTS = ["80s pop with synths", "calm piano and drums"]  # 4 words + </s> each
DURATION = 0.64  # 32 frames at 50 Hz, trimmed to 30 (whole spans of 3), as 10 s gives 498
LOGIT_FRAMES = 15
KINDS = {  # kind: (base xp.cfg of make_audiocraft_fixtures, seed, subcodes_context)
    "magnet": ("mono", 31, 2),
    "magnet-audio": ("audiogen", 32, 1),
}


def magnet_cfg(kind: str) -> dict:
    """xp.cfg of a MAGNeT LM: lm_magnet's fields as in config/solver/magnet/*.yaml (the loader fills
    segment_duration, span_len and the frame rate in; the exported file holds the yaml's values)."""
    base, _, context = KINDS[kind]
    cfg = lm_cfg(base)
    cfg["lm_model"] = "transformer_lm_magnet"
    cfg["solver"] = "magnet" if kind == "magnet" else "audio_magnet"
    cfg["dataset"]["segment_duration"] = 1
    cfg["codebooks_pattern"] = {"modeling": "parallel", "parallel": {"empty_initial": -1},
                                "delay": {"delays": [0, 1, 2, 3], "flatten_first": 0, "empty_initial": 0}}
    cfg["masking"] = {"span_len": 3}
    cfg["classifier_free_guidance"]["training_dropout"] = 0.3 if kind == "magnet" else 0.1
    t = cfg["transformer_lm"]
    t.update(dim=16, num_heads=2, causal=False, subcodes_context=context, compression_model_framerate=50,
             segment_duration=0, span_len=-1)
    return cfg


@torch.no_grad()
def moderate(lm, seed: int) -> None:
    """Random weights that make tokens vary but keep logits moderate: greedy MAGNeT re-masks by
    probability, and saturated probabilities (exactly 1.0) tie, which torch.topk orders arbitrarily."""
    g = torch.Generator().manual_seed(seed)
    for name, p in lm.named_parameters():
        if name.startswith("emb."):
            p.copy_(torch.randn(p.shape, generator=g))
        elif name.startswith("linears."):
            p.copy_(torch.randn(p.shape, generator=g) * 0.35)
        elif p.ndim == 2:
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
        else:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        p.copy_(p.half().float())  # exactly what the float16 export holds


def export(kind: str) -> None:
    from omegaconf import OmegaConf

    from audiocraft import __version__
    from audiocraft.models import builders

    _, seed, _ = KINDS[kind]
    folder = OUT / kind
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    raw = magnet_cfg(kind)
    build = copy.deepcopy(raw)  # what load_lm_model_magnet sets before building
    build["transformer_lm"].update(segment_duration=build["dataset"]["segment_duration"],
                                   span_len=build["masking"]["span_len"])
    torch.manual_seed(seed)
    lm = builders.get_lm_model(OmegaConf.create(build))
    moderate(lm, seed)
    state = {k: v.half() for k, v in lm.state_dict().items()}
    torch.save({"best_state": state, "xp.cfg": OmegaConf.to_yaml(OmegaConf.create(raw)),
                "version": __version__, "exported": True}, folder / "state_dict.bin")
    if kind == "magnet-audio":  # the 16 kHz EnCodec package of the AudioGen fixture, as float16
        pkg = torch.load(OUT / "audiogen" / "compression_state_dict.bin", weights_only=True)
        pkg["best_state"] = {k: v.half() if v.is_floating_point() else v for k, v in pkg["best_state"].items()}
        torch.save(pkg, folder / "compression_state_dict.bin")
    else:
        from audiocraft.utils.export import export_pretrained_compression_model

        export_pretrained_compression_model("facebook/encodec_32khz", folder / "compression_state_dict.bin")


def masked_grid(stage: int, k: int, t: int, g: torch.Generator) -> torch.Tensor:
    """[1, K, T] codes as MAGNeT's stage ``stage`` sees them: below decided, ``stage`` with random
    spans of 3 masked, above all masked (id CARD)."""
    codes = torch.randint(0, CARD, (1, k, t), generator=g)
    spans = torch.rand(t // 3, generator=g) < 0.5
    spans[0], spans[-1] = True, False  # partly masked, whatever the draw
    codes[0, stage, spans.repeat_interleave(3)] = CARD
    codes[0, stage + 1:] = CARD
    return codes


@torch.no_grad()
def references(kind: str) -> None:
    from audiocraft.models import MAGNeT
    from audiocraft.models.loaders import load_compression_model, load_lm_model_magnet
    from audiocraft.modules.conditioners import ConditioningAttributes

    folder = OUT / kind
    codec = load_compression_model(folder, device="cpu")
    lm = load_lm_model_magnet(folder, compression_model_frame_rate=int(codec.frame_rate), device="cpu")
    model = MAGNeT(name=kind, compression_model=codec, lm=lm)
    out: dict = {"prompts": np.array(PROMPTS), "duration": np.array(DURATION),
                 "sample_rate": np.array(model.sample_rate)}
    for s, m in enumerate(lm.attn_mask_per_stage):
        if m is not None:
            out[f"mask_stage{s}"] = m.numpy().astype(np.float32)
    g = torch.Generator().manual_seed(5)
    attributes = [ConditioningAttributes(text={"description": PROMPTS[0]})]
    for s in range(lm.num_codebooks):
        codes = masked_grid(s, lm.num_codebooks, LOGIT_FRAMES, g)
        pred = lm.compute_predictions(codes, attributes, stage=s)
        assert bool(pred.mask.all())
        out[f"codes_stage{s}"] = codes.numpy().astype(np.int32)
        out[f"logits_stage{s}"] = pred.logits.numpy().astype(np.float32)
    model.duration = DURATION
    model.set_generation_params(use_sampling=False)
    audio, tokens = model.generate(PROMPTS, return_tokens=True)
    out["tokens"] = tokens.numpy().astype(np.int32)
    out["audio"] = audio.numpy().astype(np.float32)
    if kind == "magnet":
        model.set_generation_params(use_sampling=False, span_arrangement="stride1")
        out["tokens_stride1"] = model.generate(PROMPTS, return_tokens=True)[1].numpy().astype(np.int32)
    np.savez_compressed(folder / "refs.npz", **out)
    changes = [int((np.diff(out["tokens"][0, q]) != 0).sum()) for q in range(lm.num_codebooks)]
    print(f"{kind}: tokens {tuple(tokens.shape)} (changes per codebook {changes}), audio {tuple(audio.shape)} "
          f"@ {model.sample_rate} Hz, masks {[m is not None for m in lm.attn_mask_per_stage]}")


def main() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_CACHE"] = str(CACHE)
    os.environ["HF_HOME"] = str(OUT / ".hf-home-unused")
    from audiocraft_shims import install_shims

    install_shims()
    for kind in sys.argv[1:] or list(KINDS):
        export(kind)
        references(kind)
    shutil.rmtree(OUT / ".hf-home-unused", ignore_errors=True)
    total = sum(p.stat().st_size for k in KINDS for p in (OUT / k).rglob("*") if p.is_file())
    print(f"total {total / 1e6:.2f} MB in {', '.join(KINDS)}")


if __name__ == "__main__":
    main()
