"""How closely a quantized (or lower-precision) MLX checkpoint follows its fp32 reference.

Both checkpoints run the full decoder forward with teacher forcing over the same inputs: a fixed
set of text prompts x fixed random code sequences (seeded), laid out in MusicGen's delay pattern.
At every position the generator would sample, the next-token distributions are compared per
codebook:

    top-1 agreement   argmax(quant) == argmax(reference)         (greedy decoding would match)
    KL(ref || quant)  sum_v p_ref(v) * (log p_ref(v) - log p_quant(v)), in nats

The reference's mean entropy is reported too: top-1 agreement only means something when the
reference distributions are peaked (near-uniform logits make the argmax a coin toss).

The reference may also be a Hugging Face (transformers) checkpoint folder; it is then converted to
a temporary fp32 MLX checkpoint first. That path needs the converter's extras (torch), which are
imported lazily, so this module stays torch-free like the rest of runtime/.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_unflatten

from mlx_music._meta import pip_hint
from mlx_music.models.musicgen_decoder import float_weight
from mlx_music.runtime.delay_pattern import apply_pattern, build_pattern
from mlx_music.runtime.records import loads_json

# Fixed prompts: a spread of genres, and every word is in the tiny test tokenizer's vocabulary
# too, so the numbers measured on fixtures and on real checkpoints use the same text.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "80s pop with synths",
    "calm piano jazz",
    "loud rock guitar and drums",
    "ambient electronic strings",
)
CHROMA_FRAMES = 16  # melody models: length of the random one-hot chromagram (tiled by the model)


@dataclass
class CodebookFidelity:
    codebook: int
    top1: float  # fraction of compared positions where both argmaxes agree
    kl_mean: float  # mean KL(ref || quant), nats
    kl_max: float  # worst single position
    ref_entropy: float  # mean entropy of the reference distribution, nats (how peaked it is)
    positions: int  # positions compared for this codebook


@dataclass
class FidelityReport:
    model_path: str
    reference_path: str
    model_label: str  # "q4 g64", "mixed-4-8 g64", "float16", ...
    reference_label: str
    num_prompts: int
    num_sequences: int
    length: int
    seed: int
    guidance_scale: float | None
    dequantized: bool  # quantized layers ran as float matmuls on the dequantized weights
    codebooks: list[CodebookFidelity] = field(default_factory=list)

    # Codebooks all have the same number of compared positions, so plain means are position-weighted.
    @property
    def top1(self) -> float:
        return float(np.mean([c.top1 for c in self.codebooks]))

    @property
    def worst_top1(self) -> float:
        return float(min(c.top1 for c in self.codebooks))

    @property
    def kl_mean(self) -> float:
        return float(np.mean([c.kl_mean for c in self.codebooks]))

    @property
    def kl_max(self) -> float:
        return float(max(c.kl_max for c in self.codebooks))

    @property
    def ref_entropy(self) -> float:
        return float(np.mean([c.ref_entropy for c in self.codebooks]))

    def passes(self, min_top1: float, max_kl: float | None = None, per_codebook: bool = False) -> bool:
        """Overall top-1 ≥ min_top1 (every codebook's with per_codebook=True), and mean KL ≤ max_kl."""
        top1 = self.worst_top1 if per_codebook else self.top1
        if top1 < min_top1:
            return False
        return max_kl is None or self.kl_mean <= max_kl

    def to_dict(self) -> dict:
        d = asdict(self)
        d["overall"] = {"top1": self.top1, "worst_top1": self.worst_top1, "kl_mean": self.kl_mean,
                        "kl_max": self.kl_max, "ref_entropy": self.ref_entropy}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def format_table(self) -> str:
        cfg = f", guidance {self.guidance_scale:g}" if self.guidance_scale else ""
        cfg += ", dequantized weights" if self.dequantized else ""
        lines = [f"{self.model_label} vs {self.reference_label}: {self.num_prompts} prompts x "
                 f"{self.num_sequences} random code sequences x {self.length} frames, seed {self.seed}{cfg}",
                 f"  model     {self.model_path}", f"  reference {self.reference_path}",
                 f"  {'codebook':>8}  {'top-1':>7}  {'KL mean':>9}  {'KL max':>9}  {'ref H':>6}  {'positions':>9}"]
        for c in self.codebooks:
            lines.append(f"  {c.codebook:>8}  {c.top1:>7.4f}  {c.kl_mean:>9.2e}  {c.kl_max:>9.2e}  "
                         f"{c.ref_entropy:>6.2f}  {c.positions:>9}")
        total = sum(c.positions for c in self.codebooks)
        lines.append(f"  {'all':>8}  {self.top1:>7.4f}  {self.kl_mean:>9.2e}  {self.kl_max:>9.2e}  "
                     f"{self.ref_entropy:>6.2f}  {total:>9}")
        return "\n".join(lines)


def checkpoint_label(config: dict) -> str:
    """Short description of a checkpoint's numeric format, from its config.json."""
    q = config.get("quantization")
    if not q:
        return str(config.get("dtype", "float32"))
    name = q.get("recipe") or f"q{q['bits']}"
    return f"{name} g{q['group_size']}"


# ------------------------------------------------------------------------------------ loading
def _is_hf_folder(path: Path) -> bool:
    """A local folder whose config.json is not an mlx-music one (i.e. a transformers checkpoint)."""
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return False
    try:
        return loads_json(cfg.read_text()).get("format") != "mlx-music"
    except (OSError, ValueError, AttributeError):
        return False


def _convert_reference(source: str, tmp: Path) -> Path:
    """Convert a Hugging Face checkpoint (folder or repo id) to fp32 MLX under `tmp`."""
    try:
        from mlx_music.converters.convert import convert_checkpoint  # needs torch only for .bin sources
    except ImportError as e:  # pragma: no cover - converter extras missing
        raise ValueError(f"reference_path {source}: a transformers reference needs the converter "
                         f"extras ({pip_hint('convert')}): {e}") from None
    out = tmp / "reference-fp32"
    convert_checkpoint(source, out, dtype="float32", progress=False)
    return out


def _load(path: str | Path, tmp: Path | None = None):
    """runtime.load, converting a transformers reference first when `tmp` is given."""
    from mlx_music.runtime.hub import IncompleteCheckpointError
    from mlx_music.runtime.loader import load

    p = Path(path).expanduser()
    if tmp is not None and _is_hf_folder(p):
        return load(_convert_reference(str(p), tmp))
    try:
        return load(path)
    except IncompleteCheckpointError as e:
        # A hub repo id of an unconverted (PyTorch) repo: convert it, as for a local HF folder.
        if tmp is not None and not p.exists() and "not an MLX checkpoint" in str(e):
            return load(_convert_reference(str(path), tmp))
        raise


def dequantize_model(model: nn.Module) -> int:
    """Replace every quantized layer by a float one holding its dequantized weights; returns how many.

    The weights are the quantized model's exactly (scale * q + bias per group), only the float
    summation order differs from the quantized kernels, so fidelity numbers agree up to round-off.
    It exists for speed: MLX's CPU quantized matmul is an order of magnitude slower than its BLAS
    path, which makes full-size comparisons on CPU take many minutes.
    """
    swaps = []
    for path, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = float_weight(m)
            if isinstance(m, nn.QuantizedLinear):
                new = nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
                if "bias" in m:
                    new.bias = m.bias
            else:
                new = nn.Embedding(w.shape[0], w.shape[1])
            new.weight = w
            swaps.append((path, new))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
        mx.eval(model.parameters())
    return len(swaps)


# ------------------------------------------------------------------------------------ inputs
@dataclass
class _Inputs:
    prompts: list[str]
    seqs: np.ndarray  # (N, K, S) delayed code sequences with BOS/pad
    valid: np.ndarray  # (K, S-1) bool: positions whose next token the generator would sample
    chroma: np.ndarray | None  # (N, Tc, num_chroma) one-hot, melody models only


def _make_inputs(config: dict, prompts: Sequence[str], num_sequences: int, length: int, seed: int) -> _Inputs:
    k, channels = int(config["num_codebooks"]), int(config["audio_channels"])
    pad = int(config["decoder"]["pad_token_id"])
    vocab = int(config["decoder"]["vocab_size"])
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, vocab, size=(num_sequences, k, length), dtype=np.int32)
    seqs = apply_pattern(codes, channels, pad)
    # Logits at position s predict position s+1; compare exactly where generation samples (-1).
    valid = build_pattern(length, k, channels, pad)[0, :, 1:] == -1
    chroma = None
    if config["model_type"] == "musicgen_melody":
        nc = int((config.get("melody") or {}).get("num_chroma", 12))
        chroma = np.zeros((num_sequences, CHROMA_FRAMES, nc), np.float32)
        bins = rng.integers(0, nc, size=(num_sequences, CHROMA_FRAMES))
        np.put_along_axis(chroma, bins[..., None], 1.0, axis=-1)
    return _Inputs(list(prompts), seqs, valid, chroma)


def _check_compatible(cfg: dict, ref: dict) -> None:
    for key in ("model_type", "num_codebooks", "audio_channels"):
        if cfg.get(key) != ref.get(key):
            raise ValueError(f"model and reference differ in {key}: {cfg.get(key)!r} vs {ref.get(key)!r}")
    if cfg["decoder"]["vocab_size"] != ref["decoder"]["vocab_size"]:
        raise ValueError("model and reference differ in decoder.vocab_size")


def _log_probs(pipe, inputs: _Inputs, prompt: str, guidance_scale: float | None) -> mx.array:
    """Teacher-forced next-token log-probabilities (N, K, S-1, vocab), float32."""
    model = pipe.model
    n = inputs.seqs.shape[0]
    ids, mask = pipe.tokenizer([prompt])
    states, m = model.encode_text(mx.array(ids), mx.array(mask))
    states, m = mx.repeat(states, n, axis=0), mx.repeat(m, n, axis=0)
    codes = mx.array(inputs.seqs[:, :, :-1])
    chroma = mx.array(inputs.chroma) if inputs.chroma is not None else None
    if guidance_scale:
        # Same null conditioning as generation (runtime.pipeline.condition): zero text states and
        # mask; for melody models a chroma with bin 0 on.
        states = mx.concatenate([states, mx.zeros_like(states)], axis=0)
        m = mx.concatenate([m, mx.zeros_like(m)], axis=0)
        codes = mx.concatenate([codes, codes], axis=0)
        if chroma is not None:
            null = mx.zeros_like(chroma)
            null = mx.concatenate([mx.ones_like(null[..., :1]), null[..., 1:]], axis=-1)
            chroma = mx.concatenate([chroma, null], axis=0)
    logits = model(codes, states, m, chroma).astype(mx.float32)
    if guidance_scale:
        cond, uncond = logits[:n], logits[n:]
        logits = uncond + guidance_scale * (cond - uncond)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


class _Accumulator:
    """Per-codebook sums over the compared positions."""

    def __init__(self, k: int):
        self.agree = np.zeros(k)
        self.kl = np.zeros(k)
        self.kl_max = np.zeros(k)
        self.entropy = np.zeros(k)
        self.count = np.zeros(k, dtype=np.int64)

    def add(self, ref_lp: mx.array, q_lp: mx.array, valid: np.ndarray) -> None:
        p = mx.exp(ref_lp)
        kl = mx.sum(p * (ref_lp - q_lp), axis=-1)  # (N, K, T)
        ent = -mx.sum(p * ref_lp, axis=-1)
        agree = mx.argmax(ref_lp, axis=-1) == mx.argmax(q_lp, axis=-1)
        kl, ent, agree = np.array(kl), np.array(ent), np.array(agree)
        for c in range(valid.shape[0]):
            sel = valid[c]
            # Tiny negative KLs are float round-off of equal distributions.
            kc = np.maximum(kl[:, c, sel], 0.0)
            self.agree[c] += agree[:, c, sel].sum()
            self.kl[c] += kc.sum()
            self.kl_max[c] = max(self.kl_max[c], float(kc.max()) if kc.size else 0.0)
            self.entropy[c] += ent[:, c, sel].sum()
            self.count[c] += kc.size

    def rows(self) -> list[CodebookFidelity]:
        n = np.maximum(self.count, 1)
        return [CodebookFidelity(c, float(self.agree[c] / n[c]), float(self.kl[c] / n[c]),
                                 float(self.kl_max[c]), float(self.entropy[c] / n[c]), int(self.count[c]))
                for c in range(len(self.count))]


# ------------------------------------------------------------------------------------ API
def fidelity_reports(model_paths: Sequence[str | Path], reference_path: str | Path, *,
                     prompts: Sequence[str] | None = None, num_sequences: int = 4, length: int = 50,
                     seed: int = 0, guidance_scale: float | None = None,
                     dequantize: bool = False) -> list[FidelityReport]:
    """One report per model against one reference; the reference forward runs only once.

    dequantize=True runs quantized layers as float matmuls on their dequantized weights (see
    `dequantize_model`): same numbers up to round-off, much faster on CPU; the default runs the
    real quantized kernels, i.e. exactly what generation runs."""
    prompts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts: give at least one string")
    if num_sequences < 1 or length < 1:
        raise ValueError("num_sequences and length must be ≥ 1")
    with tempfile.TemporaryDirectory(prefix="mlx-music-fidelity-") as tmp:
        ref = _load(reference_path, Path(tmp))
        inputs = _make_inputs(ref.config, prompts, num_sequences, length, seed)
        ref_lps = [_log_probs(ref, inputs, p, guidance_scale) for p in prompts]
        mx.eval(ref_lps)
        ref_config = ref.config
        del ref  # keep at most two models in memory
    reports = []
    for path in model_paths:
        pipe = _load(path)
        if dequantize:
            dequantize_model(pipe.model)
        _check_compatible(pipe.config, ref_config)
        acc = _Accumulator(int(ref_config["num_codebooks"]))
        for prompt, ref_lp in zip(prompts, ref_lps):
            acc.add(ref_lp, _log_probs(pipe, inputs, prompt, guidance_scale), inputs.valid)
        reports.append(FidelityReport(
            model_path=str(path), reference_path=str(reference_path), model_label=checkpoint_label(pipe.config),
            reference_label=checkpoint_label(ref_config), num_prompts=len(prompts), num_sequences=num_sequences,
            length=length, seed=seed, guidance_scale=guidance_scale, dequantized=dequantize,
            codebooks=acc.rows()))
        del pipe
    return reports


def fidelity_report(model_path: str | Path, reference_path: str | Path, *, prompts: Sequence[str] | None = None,
                    num_sequences: int = 4, length: int = 50, seed: int = 0,
                    guidance_scale: float | None = None, dequantize: bool = False) -> FidelityReport:
    """Compare `model_path` (e.g. a quantized checkpoint) against `reference_path` (fp32 MLX folder or
    hub id, or a transformers checkpoint, converted to fp32 first). guidance_scale=None compares the
    conditional logits; a value compares the classifier-free-guided logits generation samples from.
    dequantize: see `fidelity_reports`."""
    return fidelity_reports([model_path], reference_path, prompts=prompts, num_sequences=num_sequences,
                            length=length, seed=seed, guidance_scale=guidance_scale, dequantize=dequantize)[0]
