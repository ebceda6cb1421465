"""Make the audiocraft-format test fixtures in tests/data/audiocraft/ with audiocraft itself.

Run once, in an environment that has audiocraft 1.3.0 (it is not a dependency of this project and
does not install next to torch 2.13 with its own pins, so CI cannot run it):

    python -m venv --system-site-packages /tmp/acvenv
    /tmp/acvenv/bin/pip install --no-deps audiocraft==1.3.0
    /tmp/acvenv/bin/pip install omegaconf einops julius flashy num2words av librosa torchmetrics
    /tmp/acvenv/bin/python tests/make_audiocraft_fixtures.py

What it writes (everything random-weight and tiny; < 1 MB in all):

* ``hf-cache/``: a Hugging Face hub cache holding what audiocraft resolves *by name*: a tiny T5
  under ``t5-base`` and ``t5-large`` (encoder + decoder, as the real repos ship them) and a tiny
  transformers EnCodec under ``facebook/encodec_32khz`` (the name compression stubs point to).
* one folder per model in audiocraft's export layout (``state_dict.bin`` = {best_state, xp.cfg,
  version, exported}; ``compression_state_dict.bin`` = a stub or a full EnCodec package), built
  with ``audiocraft.models.builders`` from an xp.cfg shaped like the released ones:
  ``mono`` (text, cross-attention), ``stereo`` (8 interleaved codebooks), ``melody`` (prepend
  fuser, chroma), ``audiogen`` (16 kHz EnCodec with a full compression package, t5-large name).
* ``training-checkpoint/state_dict.bin``: a raw (not exported) training checkpoint, for the refusal.
* ``<model>/refs.npz``: audiocraft's outputs, loaded back through audiocraft's own loaders:
  greedy tokens of ``generate`` (CFG 3) and their audio, and ``lm.compute_predictions`` logits.

audiocraft needs three import shims on CPU here: xformers (``unbind`` and an empty
``LowerTriangularMask``), torchaudio (tests/torchaudio_shim.py: the two transforms used, everything
else a stub that raises), spacy (imported, unused by these models); and an identity ``demucs``
for the melody conditioner (its stem separation needs downloaded weights; the identity keeps the
whole signal, which is what mlx-music's chroma extractor sees too).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from tiny_models import random_codebooks  # tests/ is on sys.path when run as a script

HERE = Path(__file__).resolve().parent
OUT = HERE / "data" / "audiocraft"
CACHE = OUT / "hf-cache"
PROMPT = "80s pop with synths and drums"
DURATION = 1.2  # 60 frames at 50 Hz: 60 greedy steps
SEGMENT = {"audiogen": 10.0}  # training window (xp.cfg dataset.segment_duration); MusicGen: 30
CARD = 64
SEEDS = {"mono": 10, "stereo": 11, "melody": 12, "audiogen": 21}


# --------------------------------------------------------------------------- the test HF cache

def cache_snapshot(repo: str, commit: str) -> Path:
    root = CACHE / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def write_t5(repo: str, d_model: int, commit: str, with_decoder: bool) -> None:
    """audiocraft's T5Conditioner hardcodes the width of each name (t5-base 768, t5-large 1024), so
    only depth, heads and vocabulary are tiny."""
    from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

    from tiny_models import write_tokenizer

    torch.manual_seed(len(repo))
    cfg = T5Config(vocab_size=99, d_model=d_model, d_kv=4, d_ff=8, num_layers=1,
                   num_decoder_layers=1, num_heads=2, relative_attention_num_buckets=8,
                   relative_attention_max_distance=16, feed_forward_proj="relu", pad_token_id=0,
                   eos_token_id=1, decoder_start_token_id=0)
    model = (T5ForConditionalGeneration if with_decoder else T5EncoderModel)(cfg).eval()
    snap = cache_snapshot(repo, commit)
    model.save_pretrained(snap)
    write_tokenizer(snap)


def write_hf_encodec(repo: str, commit: str) -> None:
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(7)
    cfg = EncodecConfig(sampling_rate=32000, audio_channels=1, num_filters=2, hidden_size=16,
                        codebook_size=CARD, codebook_dim=16, upsampling_ratios=[8, 5, 4, 4],
                        target_bandwidths=[1.2], num_lstm_layers=2, compress=2,
                        use_causal_conv=False, normalize=False, pad_mode="reflect",
                        norm_type="weight_norm", use_conv_shortcut=False, num_residual_layers=1)
    model = EncodecModel(cfg).eval()
    with torch.no_grad():
        random_codebooks(model)
    model.save_pretrained(cache_snapshot(repo, commit))


# --------------------------------------------------------------------------- xp.cfg

def lm_cfg(kind: str) -> dict:
    stereo, melody, audiogen = kind == "stereo", kind == "melody", kind == "audiogen"
    n_q = 8 if stereo else 4
    delays = [q // 2 for q in range(8)] if stereo else list(range(4))
    t5 = {"model": "t5", "t5": {"name": "t5-large" if audiogen else "t5-base", "finetune": False,
                                 "word_dropout": 0.3, "normalize_text": False}}
    conditioners = {"description": t5}
    if melody:
        conditioners = {"self_wav": {"model": "chroma_stem", "chroma_stem": {
            "sample_rate": "${sample_rate}", "n_chroma": 12, "radix2_exp": 14, "argmax": True,
            "match_len_on_eval": False, "eval_wavs": None, "n_eval_wavs": 100, "cache_path": None}},
            "description": t5}
    cfg = {
        "device": "cpu", "dtype": "float32", "autocast": False, "seed": 2036,
        "sample_rate": 16000 if audiogen else 32000, "channels": 2 if stereo else 1,
        "solver": "audiogen" if audiogen else "musicgen",
        "compression_model_checkpoint": "//pretrained/facebook/encodec_32khz" if not audiogen
        else "//sig/your_encodec_16khz",
        "dora": {"dir": "/checkpoint/${oc.env:USER}/experiments/audiocraft/outputs", "exclude": []},
        "dataset": {"segment_duration": SEGMENT.get(kind, 30.0), "batch_size": 4, "num_workers": 0},
        "lm_model": "transformer_lm",
        "codebooks_pattern": {"modeling": "delay", "delay": {"delays": delays, "flatten_first": 0,
                                                             "empty_initial": 0}},
        "transformer_lm": {
            "dim": 32, "num_heads": 4, "num_layers": 2, "hidden_scale": 4, "n_q": n_q, "card": CARD,
            "dropout": 0.0, "emb_lr": None, "activation": "gelu", "norm_first": True,
            "bias_ff": False, "bias_attn": False, "bias_proj": False, "past_context": None,
            "causal": True, "custom": False, "memory_efficient": True, "attention_as_float32": False,
            "layer_scale": None, "positional_embedding": "sin", "xpos": False,
            "checkpointing": "none", "weight_init": "gaussian", "depthwise_init": "current",
            "zero_bias_init": True, "norm": "layer_norm", "cross_attention": False,
            "qk_layer_norm": False, "qk_layer_norm_cross": False, "attention_dropout": None,
            "kv_repeat": 1, "two_step_cfg": False},
        "classifier_free_guidance": {"training_dropout": 0.2, "inference_coef": 3.0},
        "attribute_dropout": {},
        "fuser": {"cross_attention_pos_emb": False, "cross_attention_pos_emb_scale": 1, "sum": [],
                  "prepend": ["self_wav", "description"] if melody else [],
                  "cross": [] if melody else ["description"], "input_interpolate": []},
        "conditioners": conditioners,
        "generate": {"lm": {"use_sampling": True, "temp": 1.0, "top_k": 250, "top_p": 0.0}},
    }
    if stereo:
        cfg["interleave_stereo_codebooks"] = {"use": True, "per_timestep": False}
    return cfg


def encodec_cfg() -> dict:
    """An audiocraft EnCodec solver config (16 kHz, hop 320, 4 x 64 codes): what export_encodec
    stores next to the weights."""
    return {
        "device": "cpu", "dtype": "float32", "sample_rate": 16000, "channels": 1,
        "solver": "compression", "compression_model": "encodec",
        "encodec": {"autoencoder": "seanet", "quantizer": "rvq", "sample_rate": "${sample_rate}",
                    "channels": "${channels}", "causal": False, "renormalize": False},
        "seanet": {"dimension": 16, "channels": "${channels}", "causal": "${encodec.causal}",
                   "n_filters": 2, "n_residual_layers": 1, "ratios": [8, 5, 4, 2],
                   "activation": "ELU", "activation_params": {"alpha": 1.0}, "norm": "weight_norm",
                   "norm_params": {}, "kernel_size": 7, "residual_kernel_size": 3,
                   "last_kernel_size": 7, "dilation_base": 2, "pad_mode": "constant",
                   "true_skip": True, "compress": 2, "lstm": 2, "disable_norm_outer_blocks": 0,
                   "encoder": {}, "decoder": {"trim_right_ratio": 1.0, "final_activation": None,
                                              "final_activation_params": None}},
        "rvq": {"n_q": 4, "q_dropout": False, "bins": CARD, "decay": 0.99, "kmeans_init": True,
                "kmeans_iters": 50, "threshold_ema_dead_code": 2, "orthogonal_reg_weight": 0.0,
                "orthogonal_reg_active_codes_only": False},
        "dataset": {"segment_duration": 1.0},
    }


# --------------------------------------------------------------------------- models

@torch.no_grad()
def discriminate(lm, seed: int) -> None:
    """Weights large enough that greedy tokens change every step (audiocraft's init is tiny)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in lm.named_parameters():
        if name.startswith("emb.") or name.startswith("linears."):
            p.copy_(torch.randn(p.shape, generator=g))
        elif p.ndim == 2:
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
        else:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def export(kind: str, seed: int) -> None:
    from omegaconf import OmegaConf

    from audiocraft import __version__
    from audiocraft.models import builders

    folder = OUT / kind
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    cfg = OmegaConf.create(lm_cfg(kind))
    torch.manual_seed(seed)
    lm = builders.get_lm_model(cfg)
    discriminate(lm, seed)
    torch.save({"best_state": lm.state_dict(), "xp.cfg": OmegaConf.to_yaml(cfg),
                "version": __version__, "exported": True}, folder / "state_dict.bin")
    if kind == "audiogen":
        ccfg = OmegaConf.create(encodec_cfg())
        torch.manual_seed(seed + 100)
        codec = builders.get_compression_model(ccfg)
        with torch.no_grad():
            random_codebooks(codec)
            for name, p in codec.named_parameters():
                if name.endswith("bias"):
                    p.add_(torch.randn(p.shape) * 0.05)
        torch.save({"best_state": codec.state_dict(), "xp.cfg": OmegaConf.to_yaml(ccfg),
                    "version": __version__, "exported": True}, folder / "compression_state_dict.bin")
    else:
        from audiocraft.utils.export import export_pretrained_compression_model

        export_pretrained_compression_model("facebook/encodec_32khz", folder / "compression_state_dict.bin")
    if kind == "mono":  # the same weights as an unexported training checkpoint
        train = OUT / "training-checkpoint"
        shutil.rmtree(train, ignore_errors=True)
        train.mkdir()
        some = dict(list(lm.state_dict().items())[:3])  # a few tensors keep the file small
        torch.save({"best_state": {"model": some}, "fsdp_best_state": {}, "xp.cfg": cfg,
                    "epoch": 3}, train / "state_dict.bin")


def melody_wave(sr: int, seconds: float = 30.0) -> np.ndarray:
    """The melody prompt (not stored: tests rebuild it with this formula)."""
    t = np.arange(int(seconds * sr)) / sr
    f = np.where(t < seconds / 2, 440.0, 523.25)
    return (0.5 * np.sin(2 * np.pi * f * t) + 0.2 * np.sin(2 * np.pi * 3 * f * t)).astype(np.float32)


@torch.no_grad()
def references(kind: str) -> dict:
    from audiocraft.models import AudioGen, MusicGen
    from audiocraft.models.loaders import load_compression_model, load_lm_model
    from audiocraft.modules.conditioners import ConditioningAttributes

    folder = OUT / kind
    lm = load_lm_model(folder, device="cpu")
    codec = load_compression_model(folder, device="cpu")
    cls = AudioGen if kind == "audiogen" else MusicGen
    model = cls(kind, codec, lm)
    if "self_wav" in lm.condition_provider.conditioners:  # as MusicGen.get_pretrained does
        lm.condition_provider.conditioners["self_wav"].match_len_on_eval = True
        lm.condition_provider.conditioners["self_wav"]._use_masking = False
    model.set_generation_params(use_sampling=False, duration=DURATION, cfg_coef=3.0)
    out: dict = {"prompt": np.array(PROMPT), "duration": np.array(DURATION),
                 "sample_rate": np.array(model.sample_rate)}
    if kind == "melody":
        wav = melody_wave(32000)
        out["melody_sr"] = np.array(32000)
        audio, tokens = model.generate_with_chroma([PROMPT], torch.from_numpy(wav)[None, None], 32000,
                                                   return_tokens=True)
        attributes, _ = model._prepare_tokens_and_attributes([PROMPT], None,
                                                             melody_wavs=[torch.from_numpy(wav)[None]])
    else:
        audio, tokens = model.generate([PROMPT], return_tokens=True)
        attributes = [ConditioningAttributes(text={"description": PROMPT})]
    out["tokens"] = tokens.numpy().astype(np.int32)
    out["audio"] = audio.numpy().astype(np.float32)
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, CARD, (1, lm.num_codebooks, 24), generator=g)
    pred = lm.compute_predictions(codes, attributes)
    out["logits_codes"] = codes.numpy().astype(np.int32)
    out["logits"] = pred.logits.numpy().astype(np.float32)
    out["logits_mask"] = pred.mask.numpy()
    np.savez_compressed(folder / "refs.npz", **out)
    steps = tokens.shape[-1]
    changes = int((np.diff(out["tokens"][0, 0]) != 0).sum())
    print(f"{kind}: tokens {tuple(tokens.shape)} ({steps} greedy steps, {changes} changes in codebook 0), "
          f"audio {tuple(audio.shape)} @ {model.sample_rate} Hz, logits {tuple(pred.logits.shape)}")
    return out


def main() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_CACHE"] = str(CACHE)
    os.environ["HF_HOME"] = str(OUT / ".hf-home-unused")
    sys.path.insert(0, str(HERE))
    from audiocraft_shims import install_shims

    install_shims()
    shutil.rmtree(CACHE, ignore_errors=True)
    write_t5("t5-base", 768, "1" * 40, with_decoder=True)  # as the hub repo: encoder + decoder
    write_t5("t5-large", 1024, "2" * 40, with_decoder=False)
    write_hf_encodec("facebook/encodec_32khz", "3" * 40)
    kinds = sys.argv[1:] or list(SEEDS)
    for kind in kinds:
        export(kind, seed=SEEDS[kind])
        references(kind)
    shutil.rmtree(OUT / ".hf-home-unused", ignore_errors=True)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"total {total / 1e6:.2f} MB under {OUT}")
    (OUT / "README.md").write_text(
        "Tiny random-weight audiocraft-format checkpoints and audiocraft 1.3.0's outputs on them.\n"
        "Made by tests/make_audiocraft_fixtures.py (see its docstring); used by tests/test_audiocraft.py.\n")


if __name__ == "__main__":
    main()
