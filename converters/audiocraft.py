"""audiocraft-format checkpoints (MusicGen, AudioGen, fine-tunes) → the converter's inputs.

audiocraft exports a model as two pickles:

* ``state_dict.bin`` = {best_state: LM state dict, xp.cfg: the training config as a YAML string,
  version, exported};
* ``compression_state_dict.bin`` = a full EnCodec package ({best_state, xp.cfg, ...}) or a stub
  ``{'pretrained': 'facebook/encodec_32khz'}`` naming a transformers EnCodec repo.

The T5 text encoder is not inside: xp.cfg names it (``t5-base``, AudioGen's ``t5-large``) and it
is resolved through runtime.hub like any source (``--text-encoder`` overrides). So is a codec stub
(``--codec`` overrides, or supplies a missing compression file).

`prepare` turns all of that into what convert.py needs for a transformers checkpoint: an mlx-music
config (built by mlx_config.build_mlx_config from a transformers-shaped config assembled here from
xp.cfg, the T5 config.json and the codec's config), the key rules of manifests/_audiocraft.toml, one
reader over every source tensor, and the tokenizer folder. Nothing is executed: pickles are read
with ``torch.load(weights_only=True)``, xp.cfg with ``yaml.safe_load`` plus our own ``${a.b}``
interpolation of the fields read.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ManifestError, SourceError, name_some
from .manifest import Manifest, _from_dict, _read_toml, check_expectations, detect_variant, load_manifest
from .mlx_config import build_mlx_config, config_facts, read_json
from .shard_reader import _TORCH_TO_ST, FLOAT_DTYPES, CheckpointReader, TensorInfo, _torch, load_pickled_dict
from mlx_music.manifests import MANIFEST_DIR
from mlx_music.runtime.hub import ModelNotFoundError, Source, resolve_source

# audiocraft's AudioGen.set_generation_params(extend_stride=2): a 10 s window advances 2 s (MusicGen's
# 18 s of 30 s is the runtime's default, generation.STRIDE_RATIO).
AUDIOGEN_EXTEND_STRIDE = 2.0
LM_FILE = "state_dict.bin"
_T5_IN_LM = "condition_provider.conditioners.description.t5."  # a fine-tuned T5's keys in best_state
CODEC_FILE = "compression_state_dict.bin"
FORMATS = ("audiocraft", "transformers")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
_EXPORT_HINT = ("export it first with audiocraft (audiocraft.utils.export.export_lm for the LM, "
                "export_encodec / export_pretrained_compression_model for the codec)")


# ------------------------------------------------------------------------------ format detection

def audiocraft_manifest() -> Manifest:
    return _from_dict(_read_toml(MANIFEST_DIR / "_audiocraft.toml"), MANIFEST_DIR / "_audiocraft.toml")


def source_files(base_files: dict, fmt: str | None) -> tuple[list[str], dict[str, list[str]]]:
    """Files to fetch for `--hf-path`: (config/tokenizer patterns, weights format -> patterns in order
    of preference). Default: transformers layout first, audiocraft's files when a repo has nothing
    else; `--format` restricts to one."""
    files = audiocraft_manifest().files
    other = [*files["config"], *files["tokenizer"], *files.get("extra", [])]
    prefs = {"audiocraft": ["audiocraft"], "transformers": ["safetensors", "bin"]}.get(fmt, files["weights_preference"])
    return other, {p: files["weights"][p] for p in prefs}


def detect_format(folder: Path, forced: str | None) -> str:
    """'transformers' or 'audiocraft' for a resolved source folder (`--format` forces one)."""
    if forced is not None and forced not in FORMATS:
        raise SourceError(f"format {forced!r}: expected one of {', '.join(FORMATS)}")
    has_hf = (folder / "config.json").exists() and any((folder / f).exists() for f in _HF_WEIGHTS) or any(
        folder.glob("model-*-of-*.safetensors")) or any(folder.glob("pytorch_model-*-of-*.bin"))
    has_ac = (folder / LM_FILE).exists()
    if forced == "audiocraft" and not has_ac:
        raise SourceError(f"format 'audiocraft': {folder} has no {LM_FILE}")
    if forced:
        return forced
    return "audiocraft" if has_ac and not has_hf else "transformers"


# ------------------------------------------------------------------------------ safe reading

def _load_pickle(path: Path, what: str) -> dict:
    """torch.load(weights_only=True) of an audiocraft package, with one-line errors."""

    def explain(text: str) -> str | None:
        if re.search(r"omegaconf|DictConfig|ListConfig|flashy|dora|hydra", text):
            return f"a raw audiocraft training checkpoint (it pickles config objects, refused unread); {_EXPORT_HINT}"
        glob = re.search(r"(?:[Uu]nsupported global:? GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
        what_ = f"it references {glob.group(1)}" if glob else "unsafe pickle"
        return f"refused to load: the pickle needs more than tensors and plain data ({what_}; nothing was executed)"

    return load_pickled_dict(path, what=what, expected="an audiocraft package (a dict)", explain=explain)


def _state(pkg: dict, path: Path) -> dict:
    """best_state of an exported package, checked to be a flat dict of float tensors."""
    torch = _torch()
    if "fsdp_best_state" in pkg or "optimizer" in pkg or isinstance(pkg.get("best_state"), dict) and \
            isinstance(pkg["best_state"].get("model"), dict):
        raise SourceError(f"{path}: a raw audiocraft training checkpoint, not an exported one; {_EXPORT_HINT}")
    sd = pkg.get("best_state")
    if not isinstance(sd, dict) or not sd:
        raise SourceError(f"{path}: no best_state (expected audiocraft's export layout: best_state, xp.cfg)")
    bad = [str(k) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise SourceError(f"{path}: best_state holds non-tensor entries: {name_some(bad)}")
    odd = [k for k, v in sd.items() if _TORCH_TO_ST.get(str(v.dtype)) not in FLOAT_DTYPES]
    if odd:
        raise SourceError(f"{path}: best_state holds non-float tensors: {name_some(odd)}")
    return sd


class _DictShard:
    """A state dict already in memory (one audiocraft pickle), read tensor by tensor."""

    def __init__(self, path: Path, sd: dict, prefix: str):
        self.path, self.sd, self.prefix = path, sd, prefix

    def read(self, key: str) -> np.ndarray:
        torch = _torch()
        return self.sd[key[len(self.prefix):]].to(torch.float32).contiguous().numpy().copy()

    def close(self) -> None:  # the tensors are owned by the package dict
        pass


class _FolderShard:
    def __init__(self, reader: CheckpointReader, name: str):
        self.reader, self.name = reader, name

    def close(self) -> None:
        self.reader.shards[self.name].close()


class CombinedReader:
    """One key space over the LM package, the codec (package or transformers folder) and the T5
    folder, with the CheckpointReader interface convert.py uses (tensors, read_many, shards)."""

    def __init__(self):
        self.tensors: dict[str, TensorInfo] = {}
        self.shards: dict[str, Any] = {}
        self._read: dict[str, Any] = {}  # label -> object with read(key)
        self.files: list[str] = []
        self.layout = "audiocraft"

    def add_dict(self, label: str, path: Path, sd: dict, prefix: str) -> None:
        shard = _DictShard(path, sd, prefix)
        self.shards[label] = shard
        self._read[label] = shard
        for k, v in sd.items():
            self._add(TensorInfo(prefix + k, tuple(v.shape), _TORCH_TO_ST[str(v.dtype)], label))
        self.files.append(label)

    def add_folder(self, label: str, reader: CheckpointReader, prefix: str) -> None:
        for name in reader.shards:
            self.shards[f"{label}:{name}"] = _FolderShard(reader, name)
        for k, info in reader.tensors.items():
            self._add(TensorInfo(prefix + k, info.shape, info.dtype, f"{label}:{info.file}"))
            self._read[f"{label}:{info.file}"] = (reader, len(prefix))
        self.files += [f"{label}:{f}" for f in reader.files]

    def _add(self, info: TensorInfo) -> None:
        if info.key in self.tensors:
            raise SourceError(f"tensor {info.key} found twice ({self.tensors[info.key].file} and {info.file})")
        self.tensors[info.key] = info

    def read(self, key: str) -> np.ndarray:
        info = self.tensors[key]
        src = self._read[info.file]
        if isinstance(src, tuple):
            reader, n = src
            return reader.read(key[n:])
        return src.read(key)

    def read_many(self, keys: list[str]) -> list[np.ndarray]:
        return [self.read(k) for k in keys]

    def close(self) -> None:
        for s in self.shards.values():
            s.close()


# ------------------------------------------------------------------------------ xp.cfg

_MISSING = object()
_INTERP = re.compile(r"\$\{([^${}]*)\}")


class XpConfig:
    """xp.cfg (omegaconf's YAML dump) read with yaml.safe_load; `${a.b}` references are resolved
    when a field is read. Resolvers (`${oc.env:...}`) are never run: a field that needs one is an
    error, the others are never looked at."""

    def __init__(self, text: Any, source: str):
        self.source = source
        if not isinstance(text, str):
            raise ManifestError(f"{source}: xp.cfg must be a YAML string, found {type(text).__name__}")
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ManifestError(f"{source}: xp.cfg is not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: xp.cfg must be a YAML mapping, found {type(data).__name__}")
        self.data = data

    def _raw(self, path: str) -> Any:
        node: Any = self.data
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return _MISSING
            node = node[part]
        return node

    def _resolve(self, value: Any, path: str, depth: int) -> Any:
        if depth > 20:
            raise ManifestError(f"{self.source}: xp.cfg {path}: interpolation loops")
        if isinstance(value, str) and "${" in value:
            full = _INTERP.fullmatch(value)
            if full:
                return self.get(full.group(1), depth=depth + 1, via=path)
            return _INTERP.sub(lambda m: str(self.get(m.group(1), depth=depth + 1, via=path)), value)
        if isinstance(value, list):
            return [self._resolve(v, f"{path}[{i}]", depth) for i, v in enumerate(value)]
        if isinstance(value, dict):
            return {k: self._resolve(v, f"{path}.{k}", depth) for k, v in value.items()}
        return value

    def get(self, path: str, default: Any = _MISSING, *, depth: int = 0, via: str | None = None) -> Any:
        if ":" in path or not re.fullmatch(r"[\w.\-]+", path):
            raise ManifestError(f"{self.source}: xp.cfg {via or path}: interpolation ${{{path}}} is not supported "
                                "(only references to other fields)")
        raw = self._raw(path)
        if raw is _MISSING:
            if default is not _MISSING:
                return default
            ref = f" (referenced by {via})" if via else ""
            raise ManifestError(f"{self.source}: xp.cfg has no field {path}{ref}")
        return self._resolve(raw, path, depth)

    def typed(self, path: str, kind, default: Any = _MISSING) -> Any:
        value = self.get(path, default)
        if value is default and default is not _MISSING:
            return value
        ok = isinstance(value, kind) and not (kind in (int, (int, float)) and isinstance(value, bool))
        if not ok:
            name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise ManifestError(f"{self.source}: xp.cfg {path} = {value!r}: expected {name}")
        return value

    def expect(self, path: str, want: Any, why: str, default: Any = _MISSING) -> None:
        """Refuse ``path`` unless it equals ``want``. A missing field is refused by name, unless
        ``default`` is given: then it is audiocraft's own default for that field (what audiocraft
        builds when the field is absent), never simply the value we hope for."""
        got = self.get(path, default)
        if got != want:
            raise ManifestError(f"{self.source}: xp.cfg {path} = {got!r} is not supported ({why}; expected {want!r})")


@dataclass
class LmSettings:
    melody: bool
    t5_name: str
    hf_decoder: dict
    channels: int
    sample_rate: int
    segment_duration: float
    chroma: dict | None = None
    fields: dict = field(default_factory=dict)
    magnet: dict | None = None  # MAGNeT's settings (read_magnet_settings); None for MusicGen/AudioGen


def read_lm_settings(xp: XpConfig) -> LmSettings:
    """Everything the MLX runtime reproduces, checked field by field; anything it does not
    implement is refused naming the xp.cfg field."""
    lm_model = xp.get("lm_model")  # audiocraft's get_lm_model reads it: no default
    if lm_model not in ("transformer_lm", "transformer_lm_magnet"):
        raise ManifestError(f"{xp.source}: xp.cfg lm_model = {lm_model!r} is not supported (expected "
                            "'transformer_lm' (MusicGen, AudioGen) or 'transformer_lm_magnet' (MAGNeT))")
    magnet = lm_model == "transformer_lm_magnet"
    t = "transformer_lm"
    dim = xp.typed(f"{t}.dim", int)
    heads = xp.typed(f"{t}.num_heads", int)
    layers = xp.typed(f"{t}.num_layers", int)
    n_q = xp.typed(f"{t}.n_q", int)
    card = xp.typed(f"{t}.card", int)
    hidden_scale = xp.typed(f"{t}.hidden_scale", (int, float), 4)
    optional = {"positional_scale", "xpos", "qk_layer_norm_cross", "kv_repeat", "past_context", "layer_scale"}
    for key, want, why in (
            ("norm_first", True, "the MLX decoder is pre-norm"), ("norm", "layer_norm", "LayerNorm only"),
            ("activation", "gelu", "the MLX decoder uses GELU"), ("bias_ff", False, "feed-forward without bias"),
            ("bias_attn", False, "attention without bias"), ("bias_proj", False, "output heads without bias"),
            ("positional_embedding", "sin", "sinusoidal positions only"), ("xpos", False, "no xpos"),
            ("layer_scale", None, "no layer scale"), ("qk_layer_norm", False, "no q/k norm"),
            ("qk_layer_norm_cross", False, "no q/k norm"), ("kv_repeat", 1, "no grouped k/v"),
            ("past_context", None, "full causal context"),
            ("causal", not magnet, "MAGNeT is non-causal" if magnet else "causal LM"),
            ("positional_scale", 1.0, "unscaled positions")):
        if key in optional:
            xp.expect(f"{t}.{key}", want, why, default=want)
        else:
            xp.typed(f"{t}.{key}", object)  # present
            xp.expect(f"{t}.{key}", want, why)
    channels = xp.typed("channels", int, 1)
    if channels not in (1, 2):
        raise ManifestError(f"{xp.source}: xp.cfg channels = {channels}: expected 1 or 2")
    if channels == 2:
        xp.expect("interleave_stereo_codebooks.use", True, "stereo needs interleaved codebooks")
        xp.expect("interleave_stereo_codebooks.per_timestep", False, "codebooks interleave per level [L0,R0,L1,...]",
                  default=False)
    if n_q % channels:
        raise ManifestError(f"{xp.source}: xp.cfg transformer_lm.n_q = {n_q}: not a multiple of channels {channels}")
    magnet_settings = read_magnet_settings(xp, n_q, channels) if magnet else None
    if not magnet:
        xp.expect("codebooks_pattern.modeling", "delay", "MusicGen's delay pattern only")
        delays = xp.get("codebooks_pattern.delay.delays", _MISSING)
        want = [q // channels for q in range(n_q)]
        if delays != want:
            raise ManifestError(f"{xp.source}: xp.cfg codebooks_pattern.delay.delays = {delays!r}: expected {want} "
                                f"for {n_q} codebooks and {channels} channel(s)")
        xp.expect("codebooks_pattern.delay.flatten_first", 0, "no flattened codebooks", default=0)
        xp.expect("codebooks_pattern.delay.empty_initial", 0, "no empty initial steps", default=0)

    # audiocraft's get_condition_fuser reads all four lists: none has a default
    cross, prepend = xp.get("fuser.cross"), xp.get("fuser.prepend")
    for key in ("sum", "input_interpolate"):
        xp.expect(f"fuser.{key}", [], "only cross-attention (text) and prepend (melody) fusing")
    xp.expect("fuser.cross_attention_pos_emb", False, "cross-attention without positions", default=False)
    if cross == ["description"] and prepend == []:
        melody = False
    elif cross == [] and prepend == ["self_wav", "description"]:
        melody = True
    else:
        raise ManifestError(f"{xp.source}: xp.cfg fuser cross = {cross!r}, prepend = {prepend!r} is not supported "
                            "(expected cross [description] for text models, or prepend [self_wav, description] "
                            "for melody models)")
    if melody and magnet:
        raise ManifestError(f"{xp.source}: xp.cfg fuser prepend = {prepend!r} is not supported for MAGNeT "
                            "(text by cross-attention only: cross [description], prepend [])")
    conds = xp.get("conditioners", {}) or {}
    expected_conds = {"description", "self_wav"} if melody else {"description"}
    if set(conds) != expected_conds:
        raise ManifestError(f"{xp.source}: xp.cfg conditioners = {sorted(conds)}: expected {sorted(expected_conds)}")
    xp.expect("conditioners.description.model", "t5", "T5 text conditioning only")
    t5_name = xp.typed("conditioners.description.t5.name", str)
    xp.expect("conditioners.description.t5.normalize_text", False, "prompts are used as given", default=False)
    sample_rate = xp.typed("sample_rate", int)
    segment = float(xp.typed("dataset.segment_duration", (int, float)))
    chroma = None
    if melody:
        c = "conditioners.self_wav"
        xp.expect(f"{c}.model", "chroma_stem", "chroma melody conditioning only")
        n_fft = 2 ** xp.typed(f"{c}.chroma_stem.radix2_exp", int)
        # audiocraft's ChromaExtractor defaults to argmax=False (soft chroma), which is not ported
        xp.expect(f"{c}.chroma_stem.argmax", True, "one-hot chroma", default=False)
        for k in ("winlen", "winhop"):
            if xp.get(f"{c}.chroma_stem.{k}", None) not in (None, n_fft if k == "winlen" else n_fft // 4):
                raise ManifestError(f"{xp.source}: xp.cfg {c}.chroma_stem.{k} is not supported")
        chroma_sr = xp.typed(f"{c}.chroma_stem.sample_rate", int)
        n_chroma = xp.typed(f"{c}.chroma_stem.n_chroma", int)
        hop = n_fft // 4
        chroma = {"num_chroma": n_chroma, "chroma_length": 1 + int(chroma_sr * segment) // hop,
                  "preprocessor": {"n_fft": n_fft, "hop_length": hop, "sampling_rate": chroma_sr,
                                   "chunk_length": segment}}
    decoder = _hf_decoder(card, dim, layers, heads, hidden_scale, n_q, channels)
    fields = {"dim": dim, "num_heads": heads, "num_layers": layers, "n_q": n_q, "card": card,
              "fuser": "prepend" if melody else "cross", "t5": t5_name, "channels": channels,
              "segment_duration": segment}
    if magnet_settings:
        fields.update(lm_model=lm_model, **magnet_settings)
        magnet_settings = {**magnet_settings, "segment_duration": segment}
    return LmSettings(melody, t5_name, decoder, channels, sample_rate, segment, chroma, fields, magnet_settings)


def _hf_decoder(card: int, dim: int, layers: int, heads: int, hidden_scale: float, n_q: int, channels: int) -> dict:
    """The transformers-shaped decoder config of an audiocraft LM (id ``card`` = pad/BOS/mask)."""
    return {"vocab_size": card, "hidden_size": dim, "num_hidden_layers": layers, "num_attention_heads": heads,
            "ffn_dim": int(hidden_scale * dim), "num_codebooks": n_q, "audio_channels": channels,
            "pad_token_id": card, "bos_token_id": card, "activation_function": "gelu",
            "max_position_embeddings": 2048}


def read_magnet_settings(xp: XpConfig, n_q: int, channels: int) -> dict:
    """MAGNeT's own xp.cfg fields (audiocraft ``models/loaders.py:load_lm_model_magnet`` and
    ``lm_magnet.py``), checked; anything the MLX port does not implement is refused by name."""
    if channels != 1:
        raise ManifestError(f"{xp.source}: xp.cfg channels = {channels} is not supported for MAGNeT (mono only)")
    xp.expect("codebooks_pattern.modeling", "parallel", "MAGNeT decodes codebooks in parallel")
    context = xp.typed("transformer_lm.subcodes_context", int, 5)
    if context < -1:
        raise ManifestError(f"{xp.source}: xp.cfg transformer_lm.subcodes_context = {context}: expected -1 "
                            "(unrestricted) or >= 0")
    span = xp.typed("masking.span_len", int)
    if span < 1:
        raise ManifestError(f"{xp.source}: xp.cfg masking.span_len = {span}: expected >= 1")
    return {"subcodes_context": context, "span_len": span}


def codec_config_from_package(xp: XpConfig) -> dict:
    """An audiocraft EnCodec package's xp.cfg → transformers EncodecConfig fields."""
    xp.expect("compression_model", "encodec", "EnCodec only")
    xp.expect("encodec.autoencoder", "seanet", "SEANet EnCodec only")
    xp.expect("encodec.quantizer", "rvq", "residual vector quantizer only")
    xp.expect("encodec.renormalize", False, "no loudness renormalisation", default=False)
    s = "seanet"
    xp.expect(f"{s}.norm", "weight_norm", "weight-normed convolutions")
    xp.expect(f"{s}.activation", "ELU", "ELU activations", default="ELU")
    if (xp.get(f"{s}.activation_params", {"alpha": 1.0}) or {}).get("alpha", 1.0) != 1.0:
        raise ManifestError(f"{xp.source}: xp.cfg {s}.activation_params.alpha must be 1.0")
    xp.expect(f"{s}.disable_norm_outer_blocks", 0, "every block normed", default=0)
    dec = xp.get(f"{s}.decoder", {}) or {}
    enc = xp.get(f"{s}.encoder", {}) or {}
    extra = sorted((set(dec) - {"trim_right_ratio", "final_activation", "final_activation_params"}) | set(enc))
    if extra:
        raise ManifestError(f"{xp.source}: xp.cfg {s}.encoder/decoder overrides {', '.join(extra)} are not supported")
    if dec.get("final_activation") is not None:
        raise ManifestError(f"{xp.source}: xp.cfg {s}.decoder.final_activation is not supported")
    sr = xp.typed("encodec.sample_rate", int)
    ratios = xp.get(f"{s}.ratios")
    if not isinstance(ratios, list) or not all(isinstance(r, int) and r > 0 for r in ratios):
        raise ManifestError(f"{xp.source}: xp.cfg {s}.ratios = {ratios!r}: expected a list of positive integers")
    bins = xp.typed("rvq.bins", int)
    n_q = xp.typed("rvq.n_q", int)
    frame_rate = math.ceil(sr / math.prod(ratios))
    dimension = xp.typed(f"{s}.dimension", int)
    return {
        "model_type": "encodec", "sampling_rate": sr, "audio_channels": xp.typed("encodec.channels", int),
        "num_filters": xp.typed(f"{s}.n_filters", int), "hidden_size": dimension,
        "kernel_size": xp.typed(f"{s}.kernel_size", int, 7), "last_kernel_size": xp.typed(f"{s}.last_kernel_size", int, 7),
        "residual_kernel_size": xp.typed(f"{s}.residual_kernel_size", int, 3),
        "dilation_growth_rate": xp.typed(f"{s}.dilation_base", int, 2),
        "num_residual_layers": xp.typed(f"{s}.n_residual_layers", int, 3),  # SEANet's default
        "num_lstm_layers": xp.typed(f"{s}.lstm", int, 0), "upsampling_ratios": ratios,
        "compress": xp.typed(f"{s}.compress", int, 2), "use_conv_shortcut": not xp.get(f"{s}.true_skip", True),
        "codebook_size": bins, "codebook_dim": dimension,
        # transformers derives the quantizer count from the bandwidth: n_q x frame rate x bits/code
        "target_bandwidths": [n_q * frame_rate * math.ceil(math.log2(bins)) / 1000],
        "pad_mode": xp.get(f"{s}.pad_mode", "reflect"), "use_causal_conv": bool(xp.get(f"{s}.causal", False)),
        "normalize": False, "trim_right_ratio": float(dec.get("trim_right_ratio", 1.0)), "norm_type": "weight_norm",
    }


# ------------------------------------------------------------------------------ resolution

def _resolve_named(name: str, option: str, what: str, origin: str) -> Path:
    """A T5 / EnCodec repo named by the checkpoint (or given by option), as a local folder."""
    files = audiocraft_manifest().files  # the transformers layout's files, as for any --hf-path
    try:
        src: Source = resolve_source(name, ["config.json", *files["tokenizer"]],
                                     {fmt: files["weights"][fmt] for fmt in ("safetensors", "bin")})
    except ModelNotFoundError as e:
        why = str(e).replace("hf_path folder", "folder")
        raise SourceError(f"{what} {name!r} ({origin}) is not available: {why}; pass {option}=PATH_OR_REPO") from None
    if not (src.folder / "config.json").exists():
        raise SourceError(f"{what} {name!r} ({origin}): {src.folder} has no config.json; pass {option}=PATH_OR_REPO")
    return src.folder


@dataclass
class Prepared:
    cfg: dict
    manifest: Manifest
    reader: CombinedReader
    tokenizer_folder: Path
    label: str
    record: dict


def prepare(folder: Path, *, variant: str | None = None, text_encoder: str | None = None,
            codec: str | None = None, workers: int = 4) -> Prepared:
    """Read an audiocraft-format folder (and what it names) into convert.py's inputs."""
    lm_path = folder / LM_FILE
    label = str(lm_path)
    pkg = _load_pickle(lm_path, LM_FILE)
    if "pretrained" in pkg and "best_state" not in pkg:
        raise SourceError(f"{lm_path}: a compression stub, not an LM package (expected best_state and xp.cfg)")
    sd = _state(pkg, lm_path)
    if "xp.cfg" not in pkg:
        raise SourceError(f"{lm_path}: no xp.cfg (expected audiocraft's export layout: best_state, xp.cfg)")
    xp = XpConfig(pkg["xp.cfg"], label)
    lm = read_lm_settings(xp)
    # A T5 fine-tuned with the LM (t5.finetune: true) is a registered module of audiocraft's
    # T5Conditioner, so its weights sit in best_state: converted from there, not from the hub.
    tuned_t5 = {k[len(_T5_IN_LM):]: v for k, v in sd.items() if k.startswith(_T5_IN_LM)}
    finetune = xp.typed("conditioners.description.t5.finetune", bool)  # no default in audiocraft
    if finetune != bool(tuned_t5):
        raise SourceError(f"{lm_path}: xp.cfg conditioners.description.t5.finetune = {finetune} but best_state "
                          f"{'has no' if finetune else 'holds'} T5 weights ({_T5_IN_LM}*)")
    reader = CombinedReader()
    reader.add_dict(LM_FILE, lm_path, {k: v for k, v in sd.items() if not k.startswith(_T5_IN_LM)}, "")

    # Text encoder: by the name xp.cfg gives, or --text-encoder.
    t5_folder = _resolve_named(text_encoder or lm.t5_name, "text_encoder", "text encoder",
                               "given as text_encoder" if text_encoder else "xp.cfg conditioners.description.t5.name")
    t5_cfg = read_json(t5_folder / "config.json", "text encoder config.json")
    proj = sd.get("condition_provider.conditioners.description.output_proj.weight")
    if proj is not None and t5_cfg.get("d_model") != proj.shape[1]:
        raise SourceError(f"text encoder {t5_folder}: d_model {t5_cfg.get('d_model')} does not match the "
                          f"checkpoint's text projection (input width {proj.shape[1]}); pass text_encoder=PATH_OR_REPO "
                          f"with the T5 it was trained with ({lm.t5_name})")
    if tuned_t5:  # the folder still gives the T5 config and tokenizer
        reader.add_dict(f"{LM_FILE}:t5", lm_path, tuned_t5, "text_encoder.")
    else:
        reader.add_folder("t5", CheckpointReader(t5_folder, workers=workers), "text_encoder.")

    # Codec: --codec, else the compression file (a full package, or a stub naming a repo).
    codec_path = folder / CODEC_FILE
    codec_record: dict[str, Any]
    drop_unused: list[dict] = []
    if codec is None and not codec_path.exists():
        raise SourceError(f"{folder}: no {CODEC_FILE} (the audio codec); pass codec=PATH_OR_REPO "
                          "(e.g. facebook/encodec_32khz)")
    cpkg = _load_pickle(codec_path, CODEC_FILE) if codec is None else None
    if cpkg is not None and "best_state" in cpkg:
        csd = _state(cpkg, codec_path)
        if "xp.cfg" not in cpkg:
            raise SourceError(f"{codec_path}: no xp.cfg next to the codec weights")
        codec_cfg = codec_config_from_package(XpConfig(cpkg["xp.cfg"], str(codec_path)))
        reader.add_dict(CODEC_FILE, codec_path, csd, "compression.")
        codec_record = {"codec": "package", "file": CODEC_FILE}
        drop_unused = [{"name": "codec-quantizers-unused-by-decoder",
                        "pattern": r"^compression\.quantizer\.vq\.layers\.(?!(?:"
                                   + "|".join(str(q) for q in range(lm.hf_decoder["num_codebooks"] // lm.channels))
                                   + r")\.)\d+\."}]
    else:
        if cpkg is not None:
            name = cpkg.get("pretrained")
            if not isinstance(name, str) or not name:
                raise SourceError(f"{codec_path}: neither a codec package (best_state, xp.cfg) nor a stub "
                                  "{'pretrained': NAME}; pass codec=PATH_OR_REPO")
            origin = f"named by {CODEC_FILE}"
        else:
            name, origin = codec, "given as codec"
        codec_folder = _resolve_named(name, "codec", "codec", origin)
        codec_cfg = read_json(codec_folder / "config.json", "codec config.json")
        if codec_cfg.get("model_type") != "encodec":
            raise SourceError(f"codec {name!r} ({origin}): model_type {codec_cfg.get('model_type')!r} is not "
                              "supported; expected a transformers EnCodec ('encodec'); pass codec=PATH_OR_REPO")
        reader.add_folder("codec", CheckpointReader(codec_folder, workers=workers), "audio_encoder.")
        codec_record = {"codec": name, "codec_folder": str(codec_folder)}

    if codec_cfg.get("sampling_rate") != lm.sample_rate:
        raise SourceError(f"codec sample rate {codec_cfg.get('sampling_rate')} Hz does not match the LM's "
                          f"(xp.cfg sample_rate = {lm.sample_rate}); pass codec=PATH_OR_REPO with the codec it was trained with")
    hf = {"model_type": "musicgen_melody" if lm.melody else "magnet" if lm.magnet else "musicgen",
          "text_encoder": t5_cfg, "audio_encoder": codec_cfg, "decoder": lm.hf_decoder}
    if lm.magnet:
        hf["magnet"] = lm.magnet
    pre = None
    if lm.melody:
        hf.update(num_chroma=lm.chroma["num_chroma"], chroma_length=lm.chroma["chroma_length"])
        pre = lm.chroma["preprocessor"]
    cfg = build_mlx_config(hf, label, pre)
    cfg.pop("source_defaults", None)
    cfg["generation"]["max_duration"] = lm.segment_duration  # the training window (AudioGen, MAGNeT: 10 s)
    if xp.get("solver", None) == "audiogen":  # the family's stride for audio longer than a window
        cfg["generation"]["extend_stride"] = AUDIOGEN_EXTEND_STRIDE

    # Identity (name, license) of a known variant whose expectations hold; the rules stay ours.
    facts = config_facts(cfg)
    if variant:
        known = load_manifest(variant)
        check_expectations(known, facts, label)
    else:
        known = detect_variant(facts)
    base = audiocraft_manifest()
    rules = dict(base.rules)
    rules["drop"] = list(rules.get("drop", [])) + drop_unused
    manifest = dataclasses.replace(base, name=known.name, repo_id=known.repo_id, license=known.license,
                                   rules=rules)
    record = {"format": "audiocraft", "text_encoder": str(t5_folder), **codec_record,
              "xp_cfg": lm.fields, "audiocraft_version": str(pkg.get("version", ""))}
    return Prepared(cfg, manifest, reader, t5_folder, label, record)
