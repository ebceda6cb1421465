"""Hugging Face MusicGen config.json → the MLX config.json the runtime reads, and the tensors that
config implies (the converter's "expected outputs"), read off the MLX model built for it."""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path
from typing import Any

from mlx_music.runtime.generation import MAX_DURATION
from mlx_music.runtime.magnet_generation import generation_config as magnet_generation_config
from mlx_music.runtime.sampling import DEFAULTS as SAMPLING_DEFAULTS

from .errors import ManifestError
from mlx_music.runtime.records import loads_json

SUPPORTED_MODEL_TYPES = ("musicgen", "musicgen_melody", "magnet")



def generation_config() -> dict[str, Any]:
    """config.json["generation"]: the runtime's sampling defaults plus the window length."""
    return {**SAMPLING_DEFAULTS, "max_duration": MAX_DURATION}


def read_json(path: Path, what: str) -> dict:
    try:
        data = loads_json(path.read_text())
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


def build_mlx_config(hf: dict, source: str, preprocessor: dict | None = None) -> dict:
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

    gen = generation_config()
    magnet = None
    if model_type == "magnet":  # audiocraft's MAGNeT: settings read from xp.cfg by converters/audiocraft.py
        m = hf.get("magnet") or {}
        segment = float(_get(m, "segment_duration", source, "magnet"))
        magnet = {"subcodes_context": int(_get(m, "subcodes_context", source, "magnet")),
                  "span_len": int(_get(m, "span_len", source, "magnet")),
                  "segment_frames": int(frame_rate * segment)}  # audiocraft: int(frame rate x duration)
        gen = magnet_generation_config(codebooks, segment)

    cfg = {
        "format": "mlx-music", "format_version": 1,
        "model_type": model_type, "variant": None,
        "sample_rate": sr, "frame_rate": frame_rate,
        "audio_channels": channels, "num_codebooks": codebooks,
        "text_encoder": text, "decoder": decoder, "audio_encoder": audio,
        "melody": None, "generation": gen, "dtype": "float32", "quantization": None,
    }
    if magnet:
        cfg["magnet"] = magnet
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


def _layout_rule(rule: dict, cfg: dict) -> dict:
    """A layout rule that names a module type (`module`, `parameter`) -> the same rule with a
    `pattern` matching exactly the checkpoint keys of that parameter in modules of that type in the
    MLX model for cfg (e.g. which EnCodec layers are ConvTranspose1d)."""
    if "module" not in rule:
        return rule
    suffix = "." + rule.get("parameter", "weight")
    keys = sorted(k for k, (_shape, module) in model_parameters(cfg).items()
                  if module == rule["module"] and k.endswith(suffix))
    pattern = "^(?:" + "|".join(re.escape(k) for k in keys) + ")$" if keys else r"(?!)"
    return {**{k: v for k, v in rule.items() if k not in ("module", "parameter")}, "pattern": pattern}


def with_config_rules(rules: dict, cfg: dict) -> dict:
    """The manifest's rules made concrete for cfg: layout rules that name an MLX module type get
    the keys of that type (see _layout_rule), and config_rules(cfg) is added (lists concatenate)."""
    out = dict(rules)
    out["layout"] = [_layout_rule(r, cfg) for r in rules.get("layout", [])]
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


def _tree_key(cfg: dict, quantized: bool) -> str:
    return json.dumps({**cfg, "quantization": cfg.get("quantization") if quantized else None}, sort_keys=True)


@functools.lru_cache(maxsize=8)
def _model_parameters(key: str) -> dict[str, tuple[tuple[int, ...], str]]:
    from mlx.utils import tree_flatten

    from mlx_music.runtime.loader import build_model

    model = build_model(json.loads(key))
    modules = {path: type(m).__name__ for path, m in model.named_modules()}
    # Parameters of a freshly built model are lazy: reading .shape allocates nothing.
    return {k: (tuple(v.shape), modules[k.rpartition(".")[0]])
            for k, v in tree_flatten(model.parameters())}


def model_parameters(cfg: dict, *, quantized: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor an MLX checkpoint of this config holds -> (shape, class name of the MLX module
    that holds it, e.g. "Linear", "ConvTranspose1d", "QuantizedLinear").

    Read off the MLX model itself (runtime.loader.build_model: the constructed, unloaded model,
    whose tree has the checkpoint's names), so the converter's expectations cannot drift from what
    the loader accepts. quantized=True applies cfg["quantization"] as the loader does (packed
    weights, scales, biases); the default describes the unquantized tensors.
    """
    return dict(_model_parameters(_tree_key(cfg, quantized)))


def expected_shapes(cfg: dict, *, quantized: bool = False) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape for this config (see model_parameters)."""
    return {k: shape for k, (shape, _module) in model_parameters(cfg, quantized=quantized).items()}
