"""Hugging Face MusicGen config.json → the MLX config.json the runtime reads, and the tensor
shapes that config implies (the converter's "expected outputs")."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import ManifestError

SUPPORTED_MODEL_TYPES = ("musicgen", "musicgen_melody")


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: {what} must be a JSON object")
    return data


# transformers' own defaults (T5Config, EncodecConfig, MusicgenDecoderConfig in 5.x) for fields a
# config.json may leave out: transformers loads such a file with these values, so the converter does
# too instead of refusing it. When a default contradicts the weights, transformers fails on the shape
# mismatch and so does the converter (convert.py names the defaulted field).
TRANSFORMERS_DEFAULTS: dict[str, dict[str, Any]] = {
    "text_encoder": {"vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6,
                     "num_heads": 8},
    "audio_encoder": {"sampling_rate": 24000, "upsampling_ratios": [8, 5, 4, 2],
                      "target_bandwidths": [1.5, 3.0, 6.0, 12.0, 24.0], "codebook_size": 1024,
                      "num_filters": 32, "hidden_size": 128},
    "decoder": {"vocab_size": 2048, "hidden_size": 1024, "num_hidden_layers": 24,
                "num_attention_heads": 16, "ffn_dim": 4096, "num_codebooks": 4},
}


def _get(cfg: dict, key: str, source: str, section: str, default: Any = ...,
         defaulted: dict | None = None) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is not ...:
        return default
    hf_default = TRANSFORMERS_DEFAULTS.get(section, {}).get(key, ...)
    if hf_default is not ...:
        if defaulted is not None:
            defaulted[f"{section}.{key}"] = hf_default
        return hf_default
    raise ManifestError(f"{source}: config.json is missing required field {section}.{key}")


def build_mlx_config(hf: dict, source: str, generation: dict | None = None,
                     preprocessor: dict | None = None) -> dict:
    """Everything the runtime needs, so it never parses a Hugging Face config."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ManifestError(f"{source}: config.json model_type {model_type!r} is not supported; "
                            f"expected one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    for section in ("text_encoder", "audio_encoder", "decoder"):
        if not isinstance(hf.get(section), dict):
            raise ManifestError(f"{source}: config.json is missing required section {section!r}")
    t5, enc, dec = hf["text_encoder"], hf["audio_encoder"], hf["decoder"]
    defaulted: dict[str, Any] = {}  # "section.field" -> transformers' default used for it
    g = lambda c, k, s, d=...: _get(c, k, source, s, d, defaulted)  # noqa: E731

    d_model = g(t5, "d_model", "text_encoder")
    num_heads = g(t5, "num_heads", "text_encoder")
    text = {
        "vocab_size": g(t5, "vocab_size", "text_encoder"),
        "d_model": d_model,
        "d_kv": g(t5, "d_kv", "text_encoder"),  # T5Config's default is 64, not d_model // num_heads
        "d_ff": g(t5, "d_ff", "text_encoder"),
        "num_layers": g(t5, "num_layers", "text_encoder"),
        "num_heads": num_heads,
        "relative_attention_num_buckets": g(t5, "relative_attention_num_buckets", "text_encoder", 32),
        "relative_attention_max_distance": g(t5, "relative_attention_max_distance", "text_encoder", 128),
        "layer_norm_epsilon": g(t5, "layer_norm_epsilon", "text_encoder", 1e-6),
        "max_text_tokens": 512,
    }
    ff = str(t5.get("feed_forward_proj", "relu"))
    if ff != "relu":
        raise ManifestError(f"{source}: text_encoder.feed_forward_proj {ff!r} unsupported; "
                            "expected 'relu' (t5-base)")

    sr = g(enc, "sampling_rate", "audio_encoder")
    ratios = list(g(enc, "upsampling_ratios", "audio_encoder"))
    hop = math.prod(ratios)
    frame_rate = math.ceil(sr / hop)
    bandwidths = g(enc, "target_bandwidths", "audio_encoder")
    codebook_size = g(enc, "codebook_size", "audio_encoder")
    # transformers' EncodecConfig.num_quantizers: bandwidth / (frame rate x bits per code)
    codec_quantizers = int(1000 * bandwidths[-1] // (frame_rate * math.ceil(math.log2(codebook_size))))
    audio = {
        "sampling_rate": sr,
        "audio_channels": g(enc, "audio_channels", "audio_encoder", 1),
        "num_filters": g(enc, "num_filters", "audio_encoder"),
        "hidden_size": g(enc, "hidden_size", "audio_encoder"),
        "kernel_size": g(enc, "kernel_size", "audio_encoder", 7),
        "last_kernel_size": g(enc, "last_kernel_size", "audio_encoder", 7),
        "residual_kernel_size": g(enc, "residual_kernel_size", "audio_encoder", 3),
        "dilation_growth_rate": g(enc, "dilation_growth_rate", "audio_encoder", 2),
        "num_residual_layers": g(enc, "num_residual_layers", "audio_encoder", 1),
        "num_lstm_layers": g(enc, "num_lstm_layers", "audio_encoder", 2),
        "upsampling_ratios": ratios,
        "compress": g(enc, "compress", "audio_encoder", 2),
        "use_conv_shortcut": bool(g(enc, "use_conv_shortcut", "audio_encoder", True)),
        "codebook_size": codebook_size,
        "codebook_dim": g(enc, "codebook_dim", "audio_encoder", None) or g(enc, "hidden_size", "audio_encoder"),
        "num_quantizers": codec_quantizers,  # set below to the levels the decoder uses
        "codec_num_quantizers": codec_quantizers,  # informational: what the source codec holds
        "pad_mode": g(enc, "pad_mode", "audio_encoder", "reflect"),
        "use_causal_conv": bool(g(enc, "use_causal_conv", "audio_encoder", True)),
        "normalize": bool(g(enc, "normalize", "audio_encoder", False)),
        "trim_right_ratio": g(enc, "trim_right_ratio", "audio_encoder", 1.0),
        "frame_rate": frame_rate,
    }
    if enc.get("norm_type", "weight_norm") != "weight_norm":
        raise ManifestError(f"{source}: audio_encoder.norm_type {enc.get('norm_type')!r} "
                            "unsupported; expected 'weight_norm'")
    if audio["audio_channels"] != 1:
        raise ManifestError(f"{source}: audio_encoder.audio_channels must be 1 (MusicGen's EnCodec "
                            f"is mono), got {audio['audio_channels']}")

    channels = g(dec, "audio_channels", "decoder", 1)
    codebooks = g(dec, "num_codebooks", "decoder")
    if channels not in (1, 2):
        raise ManifestError(f"{source}: decoder.audio_channels must be 1 or 2, got {channels}")
    # transformers encodes and decodes with the first num_codebooks / audio_channels quantizers of
    # the codec (a codec may hold more, e.g. codebook_size 64 gives 7 at 2.2 kbps). It fails only
    # when the decoder needs more levels than the codec has, or when stereo codebooks don't split
    # evenly between the channels.
    if codebooks < 1 or codebooks % channels or codebooks // channels > codec_quantizers:
        raise ManifestError(f"{source}: decoder.num_codebooks = {codebooks} but audio_channels "
                            f"{channels} x {codec_quantizers} codec quantizers needs "
                            f"{channels * codec_quantizers} or fewer, a multiple of {channels}")
    audio["num_quantizers"] = codebooks // channels
    vocab = g(dec, "vocab_size", "decoder")
    if vocab > codebook_size:
        # Fewer decoder tokens than codewords is fine (the codec just never sees the others); more
        # would make transformers index past the codebook when decoding.
        raise ManifestError(f"{source}: decoder.vocab_size {vocab} > audio_encoder.codebook_size "
                            f"{codebook_size}: the codec cannot decode tokens >= {codebook_size}")
    act = dec.get("activation_function", "gelu")
    if act != "gelu":
        # transformers would run another activation; the MLX decoder implements GELU only.
        raise ManifestError(f"{source}: decoder.activation_function {act!r} unsupported; expected 'gelu'")
    melody = model_type == "musicgen_melody"
    decoder = {
        "vocab_size": vocab,
        "hidden_size": g(dec, "hidden_size", "decoder"),
        "num_layers": g(dec, "num_hidden_layers", "decoder"),
        "num_heads": g(dec, "num_attention_heads", "decoder"),
        "ffn_dim": g(dec, "ffn_dim", "decoder"),
        "num_codebooks": codebooks,
        "audio_channels": channels,
        "max_position_embeddings": g(dec, "max_position_embeddings", "decoder", 2048),
        "pad_token_id": g(dec, "pad_token_id", "decoder", vocab),
        "bos_token_id": g(dec, "bos_token_id", "decoder", vocab),
        "layer_norm_eps": 1e-5,
        "cross_attention": not melody,
        # transformers' Musicgen(Melody) decoder computes embed_scale from scale_embedding but never
        # applies it, so the flag changes nothing there and nothing here.
        "scale_embedding": False,
    }

    gen = {"guidance_scale": 3.0, "top_k": 250, "top_p": 0.0, "temperature": 1.0,
           "do_sample": True, "max_duration": 30.0}
    for k in ("guidance_scale", "top_k", "top_p", "temperature", "do_sample"):
        if generation and generation.get(k) is not None:
            gen[k] = generation[k]

    cfg = {
        "format": "mlx-music", "format_version": 1,
        "model_type": model_type, "variant": None,
        "sample_rate": sr, "frame_rate": frame_rate,
        "audio_channels": channels, "num_codebooks": codebooks,
        "text_encoder": text, "decoder": decoder, "audio_encoder": audio,
        "melody": None, "generation": gen, "dtype": "float32", "quantization": None,
    }
    if defaulted:
        cfg["source_defaults"] = defaulted  # fields config.json left out: transformers' defaults
    if melody:
        pre = preprocessor or {}
        cfg["melody"] = {
            "num_chroma": g(hf, "num_chroma", "", 12),
            "chroma_length": g(hf, "chroma_length", "", 235),
            "n_fft": pre.get("n_fft", 16384), "hop_length": pre.get("hop_length", 4096),
            "sampling_rate": pre.get("sampling_rate", 32000), "chunk_length": pre.get("chunk_length", 30),
        }
    return cfg


def config_rules(cfg: dict) -> dict[str, list[dict[str, Any]]]:
    """Key rules this config adds to the manifest's: drop the codec's quantizer levels beyond
    the ones the decoder uses (transformers never touches them)."""
    used = cfg["audio_encoder"]["num_quantizers"]
    keep = "|".join(str(q) for q in range(used))
    return {"drop": [{"name": "codec-quantizers-unused-by-decoder",
                      "pattern": rf"^audio_encoder\.quantizer\.layers\.(?!(?:{keep})\.)\d+\."}]}


def with_config_rules(rules: dict, cfg: dict) -> dict:
    """The manifest's rules plus config_rules(cfg) (lists concatenate)."""
    out = dict(rules)
    for kind, extra in config_rules(cfg).items():
        out[kind] = list(out.get(kind, [])) + extra
    return out


def config_facts(cfg: dict) -> dict[str, Any]:
    """The values manifests state expectations about (see [expect] in manifests/*.toml)."""
    dec, t5, audio = cfg["decoder"], cfg["text_encoder"], cfg["audio_encoder"]
    facts = {
        "model_type": cfg["model_type"], "hidden_size": dec["hidden_size"],
        "num_layers": dec["num_layers"], "num_heads": dec["num_heads"], "ffn_dim": dec["ffn_dim"],
        "num_codebooks": dec["num_codebooks"], "audio_channels": dec["audio_channels"],
        "vocab_size": dec["vocab_size"], "text_encoder_width": t5["d_model"],
        "text_encoder_layers": t5["num_layers"], "audio_sampling_rate": audio["sampling_rate"],
        "audio_hop_length": math.prod(audio["upsampling_ratios"]),
        "num_quantizers": audio["num_quantizers"],
    }
    if cfg.get("melody"):
        facts["num_chroma"] = cfg["melody"]["num_chroma"]
        facts["chroma_length"] = cfg["melody"]["chroma_length"]
    return facts


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor an MLX checkpoint of this config holds, with its shape (unquantized).

    Written out from the architecture so the converter can check completeness before reading a
    byte; tests check it against the MLX model's own parameter tree.
    """
    out: dict[str, tuple[int, ...]] = {}
    t5, dec, audio = cfg["text_encoder"], cfg["decoder"], cfg["audio_encoder"]
    d, inner = t5["d_model"], t5["num_heads"] * t5["d_kv"]
    out["text_encoder.embed_tokens.weight"] = (t5["vocab_size"], d)
    out["text_encoder.relative_attention_bias.weight"] = (t5["relative_attention_num_buckets"], t5["num_heads"])
    for i in range(t5["num_layers"]):
        p = f"text_encoder.blocks.{i}."
        out[p + "attn_norm.weight"] = (d,)
        for n in "qkv":
            out[p + f"attn.{n}.weight"] = (inner, d)
        out[p + "attn.o.weight"] = (d, inner)
        out[p + "ffn_norm.weight"] = (d,)
        out[p + "ffn.wi.weight"] = (t5["d_ff"], d)
        out[p + "ffn.wo.weight"] = (d, t5["d_ff"])
    out["text_encoder.final_norm.weight"] = (d,)

    h = dec["hidden_size"]
    out["enc_to_dec_proj.weight"] = (h, d)
    out["enc_to_dec_proj.bias"] = (h,)
    if cfg.get("melody"):
        out["audio_enc_to_dec_proj.weight"] = (h, cfg["melody"]["num_chroma"])
        out["audio_enc_to_dec_proj.bias"] = (h,)
    for k in range(dec["num_codebooks"]):
        out[f"decoder.embed_tokens.{k}.weight"] = (dec["vocab_size"] + 1, h)
        out[f"decoder.lm_heads.{k}.weight"] = (dec["vocab_size"], h)
    attns = ["self_attn"] + (["encoder_attn"] if dec["cross_attention"] else [])
    for i in range(dec["num_layers"]):
        p = f"decoder.layers.{i}."
        for a in attns:
            for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
                out[p + f"{a}.{n}.weight"] = (h, h)
            out[p + f"{a}_layer_norm.weight"] = (h,)
            out[p + f"{a}_layer_norm.bias"] = (h,)
        out[p + "fc1.weight"] = (dec["ffn_dim"], h)
        out[p + "fc2.weight"] = (h, dec["ffn_dim"])
        out[p + "final_layer_norm.weight"] = (h,)
        out[p + "final_layer_norm.bias"] = (h,)
    out["decoder.layer_norm.weight"] = (h,)
    out["decoder.layer_norm.bias"] = (h,)
    out.update(_encodec_shapes(audio))
    return out


def _encodec_shapes(a: dict) -> dict[str, tuple[int, ...]]:
    """SEANet encoder/decoder + RVQ, mirroring the HF module indices (MLX conv layout)."""
    out: dict[str, tuple[int, ...]] = {}
    nf, hid, k, lk, rk = a["num_filters"], a["hidden_size"], a["kernel_size"], a["last_kernel_size"], a["residual_kernel_size"]

    def conv(prefix: str, cin: int, cout: int, ksize: int) -> None:
        out[prefix + ".conv.weight"] = (cout, ksize, cin)
        out[prefix + ".conv.bias"] = (cout,)

    def resblock(prefix: str, dim: int) -> None:
        hidden = dim // a["compress"]
        conv(f"{prefix}.block.1", dim, hidden, rk)
        conv(f"{prefix}.block.3", hidden, dim, 1)
        if a["use_conv_shortcut"]:
            conv(f"{prefix}.shortcut", dim, dim, 1)

    def lstm(prefix: str, dim: int) -> None:
        for i in range(a["num_lstm_layers"]):
            out[f"{prefix}.lstm.layers.{i}.Wx"] = (4 * dim, dim)
            out[f"{prefix}.lstm.layers.{i}.Wh"] = (4 * dim, dim)
            out[f"{prefix}.lstm.layers.{i}.bias"] = (4 * dim,)

    # Encoder: conv, then per ratio (reversed): residual blocks, ELU, strided conv; LSTM; ELU; conv.
    e = "audio_encoder.encoder.layers"
    idx, mult = 0, 1
    conv(f"{e}.{idx}", a["audio_channels"], mult * nf, k)
    idx += 1
    for ratio in reversed(a["upsampling_ratios"]):
        for _ in range(a["num_residual_layers"]):
            resblock(f"{e}.{idx}", mult * nf)
            idx += 1
        idx += 1  # ELU
        conv(f"{e}.{idx}", mult * nf, mult * nf * 2, ratio * 2)
        idx += 1
        mult *= 2
    lstm(f"{e}.{idx}", mult * nf)
    idx += 2  # LSTM, ELU
    conv(f"{e}.{idx}", mult * nf, hid, lk)

    # Decoder: conv, LSTM, then per ratio: ELU, transposed conv, residual blocks; ELU; conv.
    dd = "audio_encoder.decoder.layers"
    mult = 2 ** len(a["upsampling_ratios"])
    idx = 0
    conv(f"{dd}.{idx}", hid, mult * nf, k)
    idx += 1
    lstm(f"{dd}.{idx}", mult * nf)
    idx += 1
    for ratio in a["upsampling_ratios"]:
        idx += 1  # ELU
        conv(f"{dd}.{idx}", mult * nf, mult * nf // 2, ratio * 2)
        idx += 1
        for _ in range(a["num_residual_layers"]):
            resblock(f"{dd}.{idx}", mult * nf // 2)
            idx += 1
        mult //= 2
    idx += 1  # ELU
    conv(f"{dd}.{idx}", nf, a["audio_channels"], lk)
    for q in range(a["num_quantizers"]):
        out[f"audio_encoder.quantizer.layers.{q}.codebook.embed"] = (a["codebook_size"], a["codebook_dim"])
    return out
