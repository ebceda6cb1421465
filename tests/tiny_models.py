"""Tiny random-init MusicGen checkpoints in every Hugging Face hub layout (test-only; uses torch).

`build_model(arch)` makes a transformers model for one of the four architectures
(mono, stereo, melody, stereo-melody); `write_hub_folder(model, folder, layout=...)` saves it the
way hub repos ship it. Weights are re-drawn so fixtures discriminate: EnCodec codebooks are random
(transformers leaves them at zero), decoder weights are large enough that greedy tokens change from
step to step, and the left/right codebooks of stereo models differ.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

ARCHS = ("mono", "stereo", "melody", "stereo-melody")
LAYOUTS = ("single", "sharded", "bin", "bin-sharded")

# The smallest shapes that keep the real structure: EnCodec keeps upsampling ratios [8,5,4,4]
# (hop 640, so layer indices match the real checkpoints), the decoder keeps vocab 2048 + pad.
T5_KW = dict(vocab_size=99, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
             relative_attention_num_buckets=8, relative_attention_max_distance=16,
             feed_forward_proj="relu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
ENCODEC_KW = dict(sampling_rate=32000, audio_channels=1, num_filters=2, hidden_size=16,
                  codebook_size=2048, codebook_dim=16, upsampling_ratios=[8, 5, 4, 4],
                  target_bandwidths=[2.2], num_lstm_layers=2, compress=2, use_causal_conv=False,
                  normalize=False, pad_mode="reflect", norm_type="weight_norm",
                  use_conv_shortcut=False, num_residual_layers=1)
DECODER_KW = dict(vocab_size=2048, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  ffn_dim=128, max_position_embeddings=256, pad_token_id=2048, bos_token_id=2048)
CHROMA_LENGTH = 20  # the real models use 235 (30 s at hop 4096)


def _configs(arch: str, **decoder_overrides):
    from transformers import EncodecConfig, T5Config

    stereo = arch.startswith("stereo")
    t5 = T5Config(**T5_KW)
    enc = EncodecConfig(**ENCODEC_KW)
    dec_kw = dict(DECODER_KW, num_codebooks=8 if stereo else 4, audio_channels=2 if stereo else 1)
    dec_kw.update(decoder_overrides)
    return stereo, t5, enc, dec_kw


def build_model(arch: str, seed: int = 0, **decoder_overrides):
    """Return a random-init transformers model for `arch` (see ARCHS), in eval mode."""
    import transformers

    transformers.logging.set_verbosity_error()
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    stereo, t5, enc, dec_kw = _configs(arch, **decoder_overrides)
    torch.manual_seed(seed)
    if arch.endswith("melody"):
        from transformers import (MusicgenMelodyConfig, MusicgenMelodyDecoderConfig,
                                  MusicgenMelodyForConditionalGeneration)

        cfg = MusicgenMelodyConfig(text_encoder=t5.to_dict(), audio_encoder=enc.to_dict(),
                                   decoder=MusicgenMelodyDecoderConfig(**dec_kw).to_dict(),
                                   num_chroma=12, chroma_length=CHROMA_LENGTH)
        model = MusicgenMelodyForConditionalGeneration(cfg)
    else:
        from transformers import (MusicgenConfig, MusicgenDecoderConfig,
                                  MusicgenForConditionalGeneration)

        cfg = MusicgenConfig(text_encoder=t5.to_dict(), audio_encoder=enc.to_dict(),
                             decoder=MusicgenDecoderConfig(**dec_kw).to_dict())
        model = MusicgenForConditionalGeneration(cfg)
    _discriminate(model, seed)
    model.generation_config.guidance_scale = 3.0
    model.generation_config.top_k = 250
    model.generation_config.do_sample = True
    model.generation_config.max_length = 1500
    return model.eval()


@torch.no_grad()
def _discriminate(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.startswith("decoder.") and (".embed_tokens." in name or "lm_heads" in name):
            p.copy_(torch.randn(p.shape, generator=g))  # std 1: tokens change every step
        elif name.startswith("decoder.") and name.endswith(".weight") and p.ndim == 2:
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
        elif name.endswith("bias") or "layer_norm" in name:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    random_codebooks(model, g, averages=True)


def random_codebooks(model, generator=None, averages: bool = False) -> None:
    """Give an EnCodec's codebooks random std-1 vectors and mark them initialised (a fresh model's
    are zeros until k-means runs on data). transformers' and audiocraft's codecs both name them
    ``...codebook.embed`` / ``...codebook.inited``; ``averages`` also fills the EMA buffers
    (``embed_avg`` random, ``cluster_size`` 1). Draws from ``generator`` (torch's global RNG if None)
    in buffer order."""
    for name, b in model.named_buffers():
        if name.endswith("codebook.embed") or (averages and name.endswith("codebook.embed_avg")):
            b.copy_(torch.randn(b.shape, generator=generator))
        elif (averages and name.endswith("codebook.cluster_size")) or name.endswith("codebook.inited"):
            b.fill_(1.0)


def hub_state_dict(model, weight_norm: str = "new", tied_copy: bool = True) -> dict:
    """State dict as hub files hold it: persistent tensors, chosen weight-norm spelling."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if not tied_copy:
        sd.pop("text_encoder.encoder.embed_tokens.weight", None)
    if weight_norm == "legacy":
        for k in list(sd):
            if k.endswith("parametrizations.weight.original0"):
                sd[k.replace("parametrizations.weight.original0", "weight_g")] = sd.pop(k)
            elif k.endswith("parametrizations.weight.original1"):
                sd[k.replace("parametrizations.weight.original1", "weight_v")] = sd.pop(k)
    elif weight_norm != "new":
        raise ValueError(weight_norm)
    return sd


def _split(keys: list[str], n: int) -> list[list[str]]:
    per = -(-len(keys) // n)
    return [keys[i:i + per] for i in range(0, len(keys), per)]


def write_state_dict(sd: dict, folder: Path, layout: str, num_shards: int = 3) -> list[str]:
    """Write `sd` in a hub layout; returns the weight file names."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    if layout == "single":
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    if layout == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
        return ["pytorch_model.bin"]
    groups = _split(keys, num_shards)
    n = len(groups)
    weight_map, names = {}, []
    for i, group in enumerate(groups, 1):
        if layout == "sharded":
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file({k: sd[k] for k in group}, str(folder / name), metadata={"format": "pt"})
        elif layout == "bin-sharded":
            name = f"pytorch_model-{i:05d}-of-{n:05d}.bin"
            torch.save({k: sd[k] for k in group}, folder / name)
        else:
            raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
        names.append(name)
        weight_map.update({k: name for k in group})
    index = "model.safetensors.index.json" if layout == "sharded" else "pytorch_model.bin.index.json"
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (folder / index).write_text(json.dumps({"metadata": {"total_size": total},
                                            "weight_map": weight_map}, indent=2))
    return names


def write_tokenizer(folder: Path) -> None:
    """A tiny T5-like tokenizer.json (Unigram + Metaspace, '</s>' appended, pad id 0)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    words = ("80s pop with synths calm piano jazz drums bass guitar rock happy sad ambient loud "
             "soft fast slow electronic orchestral strings a the and of in upbeat lofi beat").split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -2.0 - i * 0.01) for i, w in enumerate(words)]
    pieces += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces += [("\u2581", -5.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "pad_token": "<pad>",
         "eos_token": "</s>", "unk_token": "<unk>"}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}))


def write_hub_folder(model, folder: Path | str, layout: str = "single", weight_norm: str = "new",
                     tied_copy: bool = True, num_shards: int = 3) -> Path:
    """Save `model` as a hub repo folder: config, generation config, tokenizer, weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    write_tokenizer(folder)
    if model.config.model_type == "musicgen_melody":
        # Written by hand: transformers' MusicgenMelodyFeatureExtractor needs torchaudio.
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "feature_extractor_type": "MusicgenMelodyFeatureExtractor", "feature_size": 12,
            "sampling_rate": 32000, "hop_length": 4096, "chunk_length": 30, "n_fft": 16384,
            "num_chroma": 12, "padding_value": 0.0, "return_attention_mask": False,
            "stem_indices": [3, 2]}, indent=2))
    else:
        from transformers import EncodecFeatureExtractor

        EncodecFeatureExtractor(sampling_rate=32000).to_json_file(
            str(folder / "preprocessor_config.json"))
    (folder / "README.md").write_text("---\nlicense: cc-by-nc-4.0\ntags:\n- musicgen\n---\n# tiny\n")
    sd = hub_state_dict(model, weight_norm=weight_norm, tied_copy=tied_copy)
    write_state_dict(sd, folder, layout, num_shards=num_shards)
    return folder


def main() -> None:  # pragma: no cover - manual helper
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("arch", choices=ARCHS)
    ap.add_argument("out")
    ap.add_argument("--layout", choices=LAYOUTS, default="single")
    ap.add_argument("--weight-norm", choices=("new", "legacy"), default="new")
    a = ap.parse_args()
    write_hub_folder(build_model(a.arch), a.out, a.layout, a.weight_norm)
    print(os.path.abspath(a.out))


if __name__ == "__main__":  # pragma: no cover
    main()
