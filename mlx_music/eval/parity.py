"""Numeric parity of a converted MLX checkpoint against the transformers reference.

`run_parity(hf_path, mlx_path)` loads the Hugging Face checkpoint with transformers (fp32, eval)
and the MLX checkpoint with `runtime.load`, feeds both the same inputs and returns a
`ParityReport` of rows (check, metric, value, tolerance, ok):

    tokenizer ids             the MLX tokenizer.json vs the HF tokenizer of the source folder
                              (every other row feeds both sides the MLX tokenizer's ids)
    T5 hidden states          padded batch of prompts, max abs
    text conditioning         enc_to_dec_proj(T5) * mask, max abs
    decoder logits            a fixed, varied code sequence (melody: behind a chroma prefix)
    greedy tokens             do_sample=False, guidance 3.0, `steps` new tokens: identical codes
    greedy audio / shape      the decoded output of that generation
    EnCodec encode codes      a test signal through the encoder + RVQ (stereo: per channel)
    EnCodec decode audio      random codes (stereo: even codebooks left, odd right)
    melody models: chroma one-hot / pre-argmax vs transformers' MusicgenMelodyFeatureExtractor,
                   the chroma the pipeline feeds the model, greedy tokens + shape with a melody
    audio_prompt given: greedy continuation tokens + audio vs transformers' continuation

A row the reference side cannot compute (transformers cannot load the tokenizer, has no chroma
extractor, raises while producing its values) says so in words and is informational: it is
shown as "n/a" and does not fail the report, which passes or fails on the model checks alone.

This module may import torch/transformers (it is a converter-side tool); the runtime never does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from mlx_music.converters.errors import ConvertError
from mlx_music.runtime.records import loads_json

__all__ = [
    "ModelMismatchError",
    "ParityError",
    "ParityReport",
    "ParityRow",
    "codec_test_signal",
    "melody_test_signal",
    "run_parity",
]

# Tolerances (fp32 on both sides; the references differ only in summation order).
TOL_HIDDEN = 1e-4
TOL_LOGITS = 1e-4
TOL_AUDIO = 1e-4
TOL_CHROMA = 1e-5
TOL_SELF_CHECK = 1e-5  # torch fp32 vs numpy fp64 on well-conditioned inputs (typically ~1e-7)
GUIDANCE = 3.0
# Two prompts of different lengths, so the batch is padded and the mask matters.
DEFAULT_PROMPTS = ("80s pop track with bassy drums and synth", "calm piano")
LOGIT_FRAMES = 10  # length of the fixed code sequence fed to the decoder


class ParityError(ConvertError):
    """Parity cannot run: a missing/unreadable folder or checkpoint. One-line message."""


class ModelMismatchError(ParityError):
    """The HF and MLX checkpoints are different models (codebooks, channels, sizes...)."""


# ----------------------------------------------------------------------------- report
@dataclass(frozen=True)
class ParityRow:
    name: str
    metric: str  # "max abs", "mismatches of N", "shape", "error"
    value: float | int | str | None
    tolerance: float | int | str | None
    ok: bool
    # The reference could not produce this row's values (see reference_unavailable_row): shown,
    # never counted as a pass or a failure.
    informational: bool = False

    def __post_init__(self) -> None:
        # A check without a stated tolerance is not a check: it can never pass.
        if self.tolerance is None and self.ok:
            object.__setattr__(self, "ok", False)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return str(v)
        return "0" if v == 0 else f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"
    return str(v)


def _json_value(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else str(v)  # strict JSON has no NaN/inf
    return v


@dataclass
class ParityReport:
    hf_path: str
    mlx_path: str
    model_type: str
    rows: list[ParityRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def checks(self) -> list[ParityRow]:
        """The rows that were computed on both sides (informational rows left out)."""
        return [r for r in self.rows if not r.informational]

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(r.ok and r.tolerance is not None for r in self.checks)

    @property
    def failed(self) -> list[ParityRow]:
        return [r for r in self.checks if not (r.ok and r.tolerance is not None)]

    def row(self, name: str) -> ParityRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no parity row named {name!r}; rows: {[r.name for r in self.rows]}")

    def to_json(self) -> str:
        rows = [{k: _json_value(v) for k, v in asdict(r).items()} for r in self.rows]
        for r, src in zip(rows, self.rows):
            r["ok"] = None if src.informational else bool(src.ok and src.tolerance is not None)
        return json.dumps({"ok": self.ok, "hf_path": self.hf_path, "mlx_path": self.mlx_path,
                           "model_type": self.model_type, "rows": rows, "notes": self.notes}, indent=2)

    def format_table(self) -> str:
        header = ("check", "metric", "value", "tolerance", "result")
        cells = [header] + [(r.name, r.metric, _fmt(r.value), _fmt(r.tolerance),
                             "n/a" if r.informational else "ok" if (r.ok and r.tolerance is not None) else "FAIL")
                            for r in self.rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(header))]

        def line(c: Sequence[str]) -> str:
            return " | ".join(s.ljust(w) for s, w in zip(c, widths)).rstrip()

        out = [line(header), "-+-".join("-" * w for w in widths)] + [line(c) for c in cells[1:]]
        n_bad, n_checks = len(self.failed), len(self.checks)
        n_info = len(self.rows) - n_checks
        info = f" ({n_info} not computable on the reference side)" if n_info else ""
        out.append(f"PASS: {n_checks} checks{info}" if self.ok else
                   f"FAIL: {n_bad} of {n_checks} checks failed{info}" if n_checks else "FAIL: no checks ran")
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


# ------------------------------------------------------------------------ row builders
def _max_abs(a: Any, b: Any) -> float:
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a64.size == 0:
        return 0.0
    d = np.abs(a64 - b64)
    return float("nan") if np.isnan(d).any() else float(d.max())


def close_row(name: str, got: Any, ref: Any, tol: float) -> ParityRow:
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        return ParityRow(name, "max abs", f"shape {list(got.shape)} vs reference {list(ref.shape)}", tol, False)
    d = _max_abs(got, ref)
    return ParityRow(name, "max abs", d, tol, math.isfinite(d) and d <= tol)


def equal_row(name: str, got: Any, ref: Any) -> ParityRow:
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        return ParityRow(name, "mismatches", f"shape {list(got.shape)} vs reference {list(ref.shape)}", 0, False)
    bad = int(np.count_nonzero(got != ref))
    return ParityRow(name, f"mismatches of {got.size}", bad, 0, bad == 0)


def shape_row(name: str, got: Sequence[int], expected: Sequence[int]) -> ParityRow:
    got, expected = list(map(int, got)), list(map(int, expected))
    return ParityRow(name, "shape", str(got), f"= {expected}", got == expected)


def _one_line(e: BaseException, limit: int = 200) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def reference_unavailable_row(name: str, what: str, e: BaseException) -> ParityRow:
    """Informational row: the reference (transformers) could not produce `what`, and why."""
    return ParityRow(name, "reference", f"transformers could not {what}: {_one_line(e)}", None, False,
                     informational=True)


_NO_VALUE = object()


class _Rows:
    """Collects rows; a check that raises becomes one failing row (the rest still run)."""

    def __init__(self) -> None:
        self.rows: list[ParityRow] = []

    def add(self, *rows: ParityRow) -> None:
        self.rows.extend(rows)

    def reference(self, names: str | Sequence[str], what: str, fn) -> Any:
        """fn() computed on the reference side; if it raises, one informational row per name
        (the reference's failure is not the MLX model's) and _NO_VALUE."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - reported as an informational row
            for name in [names] if isinstance(names, str) else names:
                self.rows.append(reference_unavailable_row(name, what, e))
            return _NO_VALUE

    @contextlib.contextmanager
    def guard(self, name: str, tol: float | int | str) -> Iterator[None]:
        try:
            yield
        except Exception as e:  # noqa: BLE001 - reported as a failing row, not swallowed
            msg = " ".join(str(e).split())[:240]
            self.rows.append(ParityRow(name, "error", f"{type(e).__name__}: {msg}", tol, False))


def _have(ref_value: Any) -> bool:
    """The reference produced a value (a missing one is already an informational row)."""
    return ref_value is not _NO_VALUE and ref_value is not None


# ----------------------------------------------------------------------- test signals
def melody_test_signal(sr: int = 44100, seconds: float = 2.0, channels: int = 1) -> np.ndarray:
    """A few sine notes (C4 E4 G4 C5 ... with a harmonic), float32 [S] or [C, S].

    Notes change every 0.25 s so the chroma argmax moves between frames (hop 4096 at 32 kHz is
    0.128 s). A second channel plays the same notes a fifth up, so the channel mean matters.
    """
    t = np.arange(int(round(seconds * sr))) / sr
    semis = np.array([0, 4, 7, 12, 9, 5, 2, 11])
    out = []
    for c in range(channels):
        f = 261.63 * 2 ** ((semis[(t * 4).astype(int) % len(semis)] + 7 * c) / 12)
        phase = 2 * np.pi * np.cumsum(f) / sr
        out.append(0.5 * np.sin(phase) + 0.15 * np.sin(2 * phase))
    wav = np.stack(out).astype(np.float32)
    return wav[0] if channels == 1 else wav


def codec_test_signal(sr: int = 32000, seconds: float = 0.5, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Chirp + noise, float32 [C, S]; channels differ (another chirp and noise draw)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    out = []
    for c in range(channels):
        f0, f1 = 110.0 * (c + 1), 3000.0 / (c + 1)
        phase = 2 * np.pi * (f0 * t + 0.5 * (f1 - f0) / seconds * t ** 2)
        out.append(0.4 * np.sin(phase) + 0.05 * rng.standard_normal(t.size))
    return np.stack(out).astype(np.float32)


# ----------------------------------------------------------------------------- loading
def _looks_like_repo_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def _check_hf_path(hf_path: str) -> str:
    p = Path(hf_path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ParityError(f"hf_path {hf_path}: not a folder")
        if not (p / "config.json").exists():
            raise ParityError(f"hf_path {hf_path}: no config.json (not a Hugging Face MusicGen folder)")
        return str(p)
    if not _looks_like_repo_id(hf_path):
        raise ParityError(f"hf_path {hf_path}: no such folder, and not a hub repo id (org/name)")
    return hf_path


def _mlx_folder(mlx_path: str) -> Path:
    from mlx_music.runtime.hub import resolve_model_path

    p = Path(mlx_path).expanduser()
    if not p.exists() and not _looks_like_repo_id(str(mlx_path)):
        raise ParityError(f"mlx_path {mlx_path}: no such folder, and not a hub repo id (org/name)")
    try:
        folder = Path(resolve_model_path(str(mlx_path)))
    except (OSError, ValueError) as e:  # ModelNotFoundError is a FileNotFoundError
        raise ParityError(f"mlx_path {mlx_path}: {' '.join(str(e).split())}") from None
    if not (folder / "config.json").exists():
        raise ParityError(f"mlx_path {mlx_path}: no config.json (not an mlx-music checkpoint)")
    return folder


def _hf_config(hf_path: str):
    import transformers
    from transformers import AutoConfig

    transformers.logging.set_verbosity_error()  # config warnings about pad id 2048 are expected

    try:
        cfg = AutoConfig.from_pretrained(hf_path)
    except (OSError, ValueError) as e:
        raise ParityError(f"hf_path {hf_path}: cannot read the config ({' '.join(str(e).split())[:200]})") from None
    if cfg.model_type not in ("musicgen", "musicgen_melody"):
        raise ParityError(f"hf_path {hf_path}: model_type {cfg.model_type!r} is not a MusicGen model")
    return cfg


def check_same_model(hf_cfg: Any, mlx_cfg: dict, hf_path: str, mlx_path: str) -> None:
    """ModelMismatchError naming every field where the two configs disagree."""
    d = mlx_cfg.get("decoder", {})
    pairs = {
        "model_type": (hf_cfg.model_type, mlx_cfg.get("model_type")),
        "num_codebooks": (hf_cfg.decoder.num_codebooks, mlx_cfg.get("num_codebooks")),
        "audio_channels": (getattr(hf_cfg.decoder, "audio_channels", 1), mlx_cfg.get("audio_channels")),
        "decoder hidden_size": (hf_cfg.decoder.hidden_size, d.get("hidden_size")),
        "decoder num_layers": (hf_cfg.decoder.num_hidden_layers, d.get("num_layers")),
        "decoder num_heads": (hf_cfg.decoder.num_attention_heads, d.get("num_heads")),
        "text d_model": (hf_cfg.text_encoder.d_model, mlx_cfg.get("text_encoder", {}).get("d_model")),
    }
    bad = [f"{k} {a} vs {b}" for k, (a, b) in pairs.items() if a != b]
    if bad:
        raise ModelMismatchError(f"{hf_path} and {mlx_path} are different models: " + "; ".join(bad)
                                 + " (HF vs MLX)")


def _load_reference(hf_path: str, is_melody: bool):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    with contextlib.suppress(Exception):
        transformers.utils.logging.disable_progress_bar()
    if is_melody:
        from transformers import MusicgenMelodyForConditionalGeneration as cls
    else:
        from transformers import MusicgenForConditionalGeneration as cls
    try:
        # from_pretrained reads every hub layout (safetensors / .bin, single / sharded) and
        # renames legacy weight_g/weight_v; loading info tells us if anything was left random.
        model, info = cls.from_pretrained(hf_path, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ParityError(f"hf_path {hf_path}: transformers cannot load it ({' '.join(str(e).split())[:200]})") from None
    # The T5 input embedding is tied to `shared` (files often omit it); anything else missing
    # would leave the reference randomly initialised and every row meaningless.
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("encoder.embed_tokens.weight")]
    if missing:
        raise ParityError(f"hf_path {hf_path}: {len(missing)} weights missing from the checkpoint "
                          f"(e.g. {sorted(missing)[0]}); transformers would use random values")
    return model.float().eval()


def _load_reference_tokenizer(hf_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_path)


def _reference_chroma_extractor(hf_path: str) -> tuple[Any, Any, bool]:
    """(extractor instance, its torchaudio module, uses_shim).

    transformers' MusicgenMelodyFeatureExtractor needs torchaudio for its STFT and resampler. When
    torchaudio is not installed, the repo's test shim (tests/torchaudio_shim.py: a torch
    re-implementation of exactly those two functions) stands in, and the row names say so.
    """
    shim = False
    try:
        import torchaudio  # noqa: F401

        shim = str(getattr(torchaudio, "__version__", "")).endswith("+shim")
    except ImportError:
        shim = True
    if shim:
        path = Path(__file__).resolve().parents[2] / "tests" / "torchaudio_shim.py"  # mlx_music/eval/ -> repo
        if not path.exists():
            raise ParityError("melody parity needs torchaudio (or tests/torchaudio_shim.py from the repo)")
        spec = importlib.util.spec_from_file_location("mlx_music_torchaudio_shim", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cls = mod.install()
    else:
        from transformers import MusicgenMelodyFeatureExtractor as cls
    try:
        fe = cls.from_pretrained(hf_path)
    except (OSError, ValueError):
        fe = cls()  # no preprocessor_config.json: the class defaults are MusicGen's
    return fe, sys.modules["torchaudio"], shim


# -------------------------------------------------------------------- reference helpers
@contextlib.contextmanager
def _capture_decode(hf) -> Iterator[list]:
    """Record the codes transformers passes to EnCodec decode (stereo: left call, right call)."""
    captured: list = []
    enc = hf.audio_encoder
    original = enc.decode
    was_patched = "decode" in vars(enc)  # someone else's wrapper: put it back as found

    def spy(codes, *a, **k):
        captured.append(codes.detach().clone())
        return original(codes, *a, **k)

    enc.decode = spy
    try:
        yield captured
    finally:
        if was_patched:
            enc.decode = original
        else:
            del enc.decode  # back to the class method


def _hf_generate(hf, channels: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Greedy transformers generation → (codes (B, K, F), audio (B, C, S))."""
    import torch

    with _capture_decode(hf) as captured, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        audio = hf.generate(do_sample=False, guidance_scale=GUIDANCE, **kwargs)
    if channels == 1:
        codes = captured[0][0].numpy()
    else:  # captured left (even codebooks) then right (odd codebooks)
        left, right = captured[0][0].numpy(), captured[1][0].numpy()
        codes = np.empty((left.shape[0], 2 * left.shape[1], left.shape[2]), left.dtype)
        codes[:, 0::2], codes[:, 1::2] = left, right
    return codes, audio.detach().float().numpy()


def _hf_generate_rows(hf, channels: int, melody: bool, n_cb: int, input_ids, attention_mask,
                      **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """`_hf_generate` of a batch; for melody models each prompt alone (its own unpadded tokens).

    A melody model's text sits in the decoder prefix, where the reference would attend to a
    batch's padding and shift a shorter prompt's positions; mlx-music gives every row what it
    gets alone (`runtime.conditioning.Conditioner.text`), so each row's reference is the prompt
    run alone. ``input_features`` (B, T, 12) and ``decoder_input_ids`` (B * K, P) are split by row.
    """
    if not melody:
        return _hf_generate(hf, channels, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    codes, audio = [], []
    for i in range(input_ids.shape[0]):
        n = int(attention_mask[i].sum())
        kw = dict(kwargs)
        if "input_features" in kw:
            kw["input_features"] = kw["input_features"][i:i + 1]
        if "decoder_input_ids" in kw:
            kw["decoder_input_ids"] = kw["decoder_input_ids"][i * n_cb:(i + 1) * n_cb]
        c, a = _hf_generate(hf, channels, input_ids=input_ids[i:i + 1, :n],
                            attention_mask=attention_mask[i:i + 1, :n], **kw)
        codes.append(c)
        audio.append(a)
    return np.concatenate(codes), np.concatenate(audio)


def _hf_encode(hf, wav: np.ndarray) -> np.ndarray:
    """[C, S] at 32 kHz → (1, K, F) codes; stereo channels encoded separately, interleaved."""
    import torch

    with torch.no_grad():
        out = hf.audio_encoder.encode(torch.from_numpy(wav[:, None, :]).float())
    codes = out.audio_codes[0].numpy()  # (C, nq, F): one mono clip per channel
    if codes.shape[0] == 1:
        return codes
    inter = np.empty((1, 2 * codes.shape[1], codes.shape[2]), codes.dtype)
    inter[0, 0::2], inter[0, 1::2] = codes[0], codes[1]
    return inter


def _hf_decode(hf, codes: np.ndarray, channels: int) -> np.ndarray:
    """(B, K, F) → (B, C, S) through the mono codec (stereo: even left, odd right)."""
    import torch

    def dec(c: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return hf.audio_encoder.decode(torch.from_numpy(c[None]).long(), [None]).audio_values.numpy()

    if channels == 1:
        return dec(codes)
    return np.concatenate([dec(codes[:, 0::2]), dec(codes[:, 1::2])], axis=1)


def _reference_chroma(fe, torchaudio_mod, wav: np.ndarray, sr: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' one-hot chroma (1, T, 12) and the normalised chroma its argmax reads."""
    import torch
    import torch.nn.functional as F

    target = fe.sampling_rate
    if wav.ndim == 1:
        # The extractor resamples torch tensors itself (with torchaudio's sinc resampler).
        audio: Any = torch.from_numpy(wav).float() if sr != target else wav
        in_sr = sr
    else:
        # It reads a 2-D array as a batch of mono clips; a stereo clip is a batch of one [C, S]
        # tensor, resampled beforehand with the same torchaudio function it would use.
        x = torch.from_numpy(wav).float()
        if sr != target:
            x = torchaudio_mod.functional.resample(x, sr, target, rolloff=0.945, lowpass_filter_width=24)
        audio, in_sr = [x], target
    seen: list = []
    original = F.normalize

    def spy(*a, **k):  # the per-frame max normalisation right before the argmax
        out = original(*a, **k)
        seen.append(out.detach().clone())
        return out

    F.normalize = spy
    try:
        one_hot = fe(audio, sampling_rate=in_sr, return_tensors="np")["input_features"]
    finally:
        F.normalize = original
    pre = seen[-1].transpose(1, 2).numpy() if seen else np.full_like(one_hot, np.nan)
    return np.asarray(one_hot, dtype=np.float32), pre


def _as_waveform(x: Any, what: str) -> tuple[np.ndarray, int]:
    """A path or (waveform, sr) → (float32 [S] or [C, S], sr) without resampling."""
    from mlx_music.runtime.audio_io import load_audio_input, read_audio

    if isinstance(x, (str, os.PathLike)):
        wav, sr = read_audio(x)
    elif isinstance(x, tuple) and len(x) == 2:
        sr = int(x[1])
        wav = load_audio_input(x, sr)  # validates and gives [C, S] float32 at the same rate
    else:
        raise ParityError(f"{what}: expected a file path or a (waveform, sample_rate) tuple")
    wav = np.asarray(wav, dtype=np.float32)
    return (wav[0] if wav.ndim == 2 and wav.shape[0] == 1 else wav), int(sr)


def backend_self_check(seed: int = 1234) -> float:
    """Worst relative error of torch and MLX fp32 matmul, and torch's STFT, vs numpy fp64.

    Why: when Intel MKL is loaded globally (runtime/blas.py preloads it on `import runtime`) and
    torch is imported afterwards, two OpenMP runtimes end up in one process and multi-threaded
    GEMMs in both torch and MLX return wrong numbers. Every parity row would then compare garbage,
    so the backends are measured first.
    """
    import mlx.core as mx
    import torch

    rng = np.random.default_rng(seed)
    a = rng.standard_normal((256, 640)).astype(np.float32)
    b = rng.standard_normal((640, 384)).astype(np.float32)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(ref).max()
    with torch.no_grad():
        t = (torch.from_numpy(a) @ torch.from_numpy(b)).double().numpy()
    m = np.array(mx.array(a) @ mx.array(b)).astype(np.float64)
    errs = [np.abs(t - ref).max() / scale, np.abs(m - ref).max() / scale]
    n_fft, hop = 16384, 4096  # the melody chroma reference's STFT
    x = rng.standard_normal(8 * n_fft).astype(np.float32)
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    padded = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]
    ref_spec = np.abs(np.fft.rfft(frames * win, axis=-1)).T
    with torch.no_grad():
        spec = torch.stft(torch.from_numpy(x), n_fft, hop, window=torch.from_numpy(win).float(),
                          center=True, pad_mode="reflect", return_complex=True).abs().double().numpy()
    errs.append(np.abs(spec - ref_spec).max() / ref_spec.max() if spec.shape == ref_spec.shape else np.inf)
    return float(max(errs))


def _set_mkl_threads(n: int) -> int | None:
    """Set MKL's thread count if runtime/blas.py preloaded MKL; returns the previous count."""
    try:
        from mlx_music import blas
    except ImportError:
        return None
    lib = getattr(blas, "_mkl_handle", None)
    if lib is None:
        return None
    prev = int(lib.MKL_Get_Max_Threads())
    lib.MKL_Set_Num_Threads(int(n))
    return prev


# -------------------------------------------------------------------------------- main
def _generate(pipe, prompts, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Our side of a generation row: audio (B, C, S) and codes (B, K, F) as stacked arrays."""
    res = pipe.generate(prompts, **kwargs)
    return np.stack(res.audio), np.stack(res.codes)


def run_parity(hf_path: str | os.PathLike, mlx_path: str | os.PathLike, *, prompts: Sequence[str] | None = None,
               steps: int = 12, melody: Any = None, audio_prompt: Any = None, seed: int = 0,
               adapter: str | os.PathLike | None = None) -> ParityReport:
    """Compare an MLX checkpoint with its transformers source; see the module docstring.

    prompts: text prompts (default: two of different lengths). steps: greedy tokens to generate
    (≥ 2 × codebook delay so transformers applies its delay pattern). melody: path or
    (waveform, sr) for melody models (default: `melody_test_signal()` at 44.1 kHz).
    audio_prompt: path or (waveform, sr); adds the continuation rows.
    adapter: a PEFT LoRA adapter; the reference is ``PeftModel(hf, adapter).merge_and_unload()``.
    An MLX checkpoint converted with that adapter merged (its conversion.json records it) is
    compared as is; any other is taken as the base and gets the adapter at run time
    (converted to an MLX adapter in a temporary folder, applied with ``set_adapter``).
    """
    import torch

    # Measured before anything else (see backend_self_check). The known cause, MKL threads
    # fighting torch's OpenMP, goes away with MKL single-threaded; restored afterwards so the
    # caller's process is left as found.
    err = backend_self_check()
    mkl_prev = torch_prev = None
    note = None
    if not err <= TOL_SELF_CHECK:
        mkl_prev = _set_mkl_threads(1)
        fixed = backend_self_check()
        if not fixed <= TOL_SELF_CHECK:
            torch_prev = torch.get_num_threads()
            torch.set_num_threads(1)
            fixed = backend_self_check()
        note = (f"fp32 matmul/STFT were wrong in this process (rel err {err:.2g}; Intel MKL loaded globally "
                f"before torch?); parity ran with MKL{'' if torch_prev is None else ' and torch'} single-threaded")
        err = fixed
    try:
        report = _run_parity(hf_path, mlx_path, prompts=prompts, steps=steps, melody=melody,
                             audio_prompt=audio_prompt, seed=seed, adapter=adapter)
    finally:
        if mkl_prev is not None:
            _set_mkl_threads(mkl_prev)
        if torch_prev is not None:
            torch.set_num_threads(torch_prev)
    if note:
        report.notes.append(note)
    report.rows.insert(0, ParityRow("backend self-check (fp32 matmul, STFT vs numpy fp64)", "max rel err",
                                    err, TOL_SELF_CHECK, err <= TOL_SELF_CHECK))
    return report


def _run_parity(hf_path: str | os.PathLike, mlx_path: str | os.PathLike, *, prompts: Sequence[str] | None,
                steps: int, melody: Any, audio_prompt: Any, seed: int,
                adapter: str | os.PathLike | None = None) -> ParityReport:
    import torch

    hf_path, mlx_path = os.fspath(hf_path), os.fspath(mlx_path)
    hf_ref = _check_hf_path(hf_path)
    folder = _mlx_folder(mlx_path)
    try:
        mlx_cfg = loads_json((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ParityError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
    if mlx_cfg.get("format") != "mlx-music":
        raise ParityError(f"mlx_path {mlx_path}: not an mlx-music checkpoint (config.json format)")
    hf_cfg = _hf_config(hf_ref)
    check_same_model(hf_cfg, mlx_cfg, hf_path, mlx_path)
    if mlx_cfg.get("quantization"):
        raise ParityError(f"mlx_path {mlx_path}: quantized checkpoints are compared against their fp32 "
                          "MLX checkpoint (reference_path=MLX_PATH), not against transformers")

    channels = int(mlx_cfg["audio_channels"])
    n_cb = int(mlx_cfg["num_codebooks"])
    delay_rows = n_cb // channels  # codebook levels; level q is delayed by q steps
    if steps < 2 * delay_rows - 2:
        raise ParityError(f"steps {steps}: need at least {2 * delay_rows - 2} steps for {delay_rows} "
                          "delayed codebook levels")
    prompts = list(prompts) if prompts is not None else list(DEFAULT_PROMPTS)
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise ParityError("prompts: give at least one non-empty prompt")
    is_melody = mlx_cfg["model_type"] == "musicgen_melody"

    from mlx_music.runtime import load

    hf = _load_reference(hf_ref, is_melody)
    pipe = load(str(folder))
    adapter_note = None
    if adapter is not None:
        hf, adapter_note = _apply_adapter(hf, pipe, folder, os.fspath(adapter))
    model = pipe.model
    report = ParityReport(hf_path, mlx_path, mlx_cfg["model_type"])
    if adapter_note:
        report.notes.append(adapter_note)
    rows = _Rows()
    rng = np.random.default_rng(seed)
    fr, sr32 = pipe.frame_rate, pipe.sample_rate
    hop = sr32 // fr
    b = len(prompts)
    import mlx.core as mx

    ids, mask = pipe.tokenizer(prompts)
    t_ids, t_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    # The reference may not load a tokenizer that the MLX side reads fine (e.g. a tokenizer.json
    # without a tokenizer_config.json AutoTokenizer understands): that row is informational and
    # every other row still runs on the MLX tokenizer's ids, fed to both sides.
    tok = rows.reference("tokenizer ids", "load the tokenizer", lambda: _load_reference_tokenizer(hf_ref))
    if tok is not _NO_VALUE:
        enc = rows.reference("tokenizer ids", "tokenize the prompts",
                             lambda: tok(prompts, padding=True, return_tensors="np"))
        if enc is not _NO_VALUE:
            with rows.guard("tokenizer ids", 0):
                ref_ids = np.asarray(enc["input_ids"]) * np.asarray(enc["attention_mask"])
                rows.add(equal_row("tokenizer ids", ids * mask, ref_ids))

    # -- T5 and the text conditioning -------------------------------------------------------
    def ref_text():
        with torch.no_grad():
            h = hf.text_encoder(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
            return h, hf.enc_to_dec_proj(h) * t_mask[..., None]

    ref_text_out = rows.reference(("T5 hidden states", "text conditioning"), "run its text encoder", ref_text)
    got_states = got_mask = None
    with rows.guard("T5 hidden states", TOL_HIDDEN):
        got_h = model.text_encoder(mx.array(ids), mx.array(mask))
        got_states, got_mask = model.encode_text(mx.array(ids), mx.array(mask))
        if ref_text_out is not _NO_VALUE:
            ref_h, ref_states = ref_text_out
            rows.add(close_row("T5 hidden states", np.array(got_h), ref_h.numpy(), TOL_HIDDEN))
            rows.add(close_row("text conditioning", np.array(got_states), ref_states.numpy(), TOL_HIDDEN))

    # -- decoder logits on a fixed, varied code sequence --------------------------------------
    name = "decoder logits (chroma prefix)" if is_melody else "decoder logits"
    codes = rng.integers(0, 2048, size=(b, n_cb, LOGIT_FRAMES))
    codes[:, :, 0] = pipe.pad_id  # BOS, as every generation starts
    codes[:, -1, -2:] = pipe.pad_id  # and a pad, as the delay pattern has
    kw, chroma = {}, None
    if is_melody:
        bins = rng.integers(0, 12, size=(b, 7))
        chroma = np.eye(12, dtype=np.float32)[bins]
        kw["input_features"] = torch.from_numpy(chroma)

    def ref_logits():
        with torch.no_grad():
            out = hf(input_ids=t_ids, attention_mask=t_mask,
                     decoder_input_ids=torch.from_numpy(codes.reshape(b * n_cb, -1)), **kw)
        # melody logits cover the prefix too: keep the code positions
        return out.logits.reshape(b, n_cb, -1, out.logits.shape[-1])[:, :, -LOGIT_FRAMES:].numpy()

    ref = rows.reference(name, "compute its decoder logits", ref_logits)
    if ref is not _NO_VALUE:
        with rows.guard(name, TOL_LOGITS):
            got = model(mx.array(codes.astype(np.int32)), got_states, got_mask,
                        None if chroma is None else mx.array(chroma))
            rows.add(close_row(name, np.array(got), ref, TOL_LOGITS))

    # -- greedy generation ----------------------------------------------------------------
    frames = 1 + steps - delay_rows
    gen_name = "greedy tokens (no melody)" if is_melody else "greedy tokens"
    ref_gen = rows.reference((gen_name, "greedy audio", "output shape"), "generate",
                             lambda: _hf_generate_rows(hf, channels, is_melody, n_cb, t_ids, t_mask,
                                                       max_new_tokens=steps))
    if _have(ref_gen):
        with rows.guard(gen_name, 0):
            ref_codes, ref_audio = ref_gen
            audio, got_codes = _generate(pipe, prompts, duration=frames / fr, greedy=True,
                                                guidance_scale=GUIDANCE)
            rows.add(equal_row(gen_name, got_codes, ref_codes),
                     close_row("greedy audio", audio, ref_audio, TOL_AUDIO),
                     shape_row("output shape", audio.shape, (b, channels, ref_codes.shape[-1] * hop)))

    # -- EnCodec --------------------------------------------------------------------------
    wav = codec_test_signal(sr32, 0.5, channels, seed)
    ref_enc = rows.reference("EnCodec encode codes", "encode the test signal", lambda: _hf_encode(hf, wav))
    if _have(ref_enc):
        with rows.guard("EnCodec encode codes", 0):
            rows.add(equal_row("EnCodec encode codes", pipe.encode_audio((wav, sr32))[None], ref_enc))
    codes = rng.integers(0, 2048, size=(2, n_cb, 20))
    name = "EnCodec decode audio" + (" (L/R = even/odd codebooks)" if channels == 2 else "")
    ref_dec = rows.reference(name, "decode the codes", lambda: _hf_decode(hf, codes, channels))
    if _have(ref_dec):
        with rows.guard(name, TOL_AUDIO):
            rows.add(close_row(name, pipe.decode_codes(codes), ref_dec, TOL_AUDIO))

    # -- melody conditioning --------------------------------------------------------------
    if is_melody:
        _melody_rows(rows, report, hf, hf_ref, pipe, prompts, t_ids, t_mask, melody, steps, frames,
                     channels, hop)

    # -- audio prompt continuation -------------------------------------------------------
    if audio_prompt is not None:
        from mlx_music.runtime.audio_io import load_audio_input

        wav = None
        with rows.guard("continuation tokens", 0):
            # One waveform at 32 kHz for both sides: this checks the model, not resamplers
            # (transformers takes audio prompts only at the codec rate).
            wav = load_audio_input(audio_prompt, sr32, channels=channels)

        def ref_continuation():
            p_codes = _hf_encode(hf, wav)
            if is_melody:
                # MusicgenMelody.generate has no input_values: prompt codes go in as
                # decoder_input_ids (B * K, P) and it prepends BOS itself.
                p_codes_b = np.repeat(p_codes, b, axis=0)
                kw = {"decoder_input_ids": torch.from_numpy(p_codes_b.reshape(b * n_cb, -1)).long()}
            else:
                kw = {"input_values": torch.from_numpy(np.repeat(wav[None], b, axis=0)).float()}
            return p_codes.shape[-1], _hf_generate_rows(hf, channels, is_melody, n_cb, t_ids, t_mask,
                                                        max_new_tokens=steps, **kw)

        ref_cont = (rows.reference(("continuation tokens", "continuation audio"), "continue the audio prompt",
                                   ref_continuation) if wav is not None else _NO_VALUE)
        if _have(ref_cont):
            with rows.guard("continuation tokens", 0):
                prompt_frames, (ref_codes, ref_audio) = ref_cont
                total = 1 + prompt_frames + steps - delay_rows
                audio, got_codes = _generate(pipe, prompts, duration=total / fr, greedy=True,
                                                    guidance_scale=GUIDANCE, audio_prompt=(wav, sr32))
                rows.add(equal_row("continuation tokens", got_codes, ref_codes),
                         close_row("continuation audio", audio, ref_audio, TOL_AUDIO))
                report.notes.append(f"continuation: {prompt_frames} prompt frames + {total - prompt_frames} new")

    report.rows = rows.rows
    report.notes.insert(0, f"{b} prompts, {steps} greedy steps ({frames} frames), guidance {GUIDANCE}")
    return report


def _apply_adapter(hf, pipe, folder: Path, adapter: str):
    """The reference merged with the PEFT adapter (peft's merge_and_unload); the MLX side as
    converted when its record names a merged adapter, else the adapter applied at run time."""
    import tempfile

    from mlx_music.converters.adapters import convert_adapter, read_peft_adapter

    peft_adapter = read_peft_adapter(adapter)  # our checks first: one-line errors, not peft's
    try:
        from peft import PeftModel
    except ImportError:
        raise ParityError("adapter: parity with an adapter needs peft (pip install peft)") from None
    try:
        # peft reads transformers' deprecated `is_gradient_checkpointing` (FutureWarning since
        # transformers 5): their matter, not a stray "warning:" line in the user's parity run.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            merged = PeftModel.from_pretrained(hf, str(peft_adapter.folder)).merge_and_unload()
    except Exception as e:  # noqa: BLE001 - peft's own refusal, as one line
        raise ParityError(f"adapter {adapter}: peft cannot apply it ({_one_line(e)})") from None
    try:
        record = loads_json((folder / "conversion.json").read_text())
    except (OSError, ValueError):
        record = {}
    if isinstance(record, dict) and record.get("adapter"):
        merged_with = record["adapter"]
        if isinstance(merged_with, dict) and merged_with.get("files") != peft_adapter.files:
            raise ParityError(f"adapter {adapter}: the checkpoint {folder} was merged with another adapter "
                              f"({merged_with.get('source')}, per its conversion.json)")
        return merged.eval(), f"adapter: {adapter} merged at conversion (conversion.json) vs peft merge_and_unload"
    with tempfile.TemporaryDirectory() as tmp:
        pipe.set_adapter(convert_adapter(peft_adapter, Path(tmp) / "adapter"))
    return merged.eval(), f"adapter: {adapter} applied at run time (set_adapter) vs peft merge_and_unload"


def _melody_rows(rows: _Rows, report: ParityReport, hf, hf_ref: str, pipe, prompts: list[str], t_ids, t_mask,
                 melody: Any, steps: int, frames: int, channels: int, hop: int) -> None:
    import torch

    from mlx_music.runtime.chroma import ChromaExtractor

    b = len(prompts)
    if melody is None:
        wav, sr = melody_test_signal(44100, 2.0), 44100
        report.notes.append("melody: built-in test signal (sine notes, 2 s at 44.1 kHz)")
    else:
        wav, sr = _as_waveform(melody, "melody")
    onehot_name = "melody chroma one-hot"
    # No reference extractor (no torchaudio, no shim): the chroma rows are informational, and the
    # melody generation row below still runs on our own chroma, fed to both sides.
    extractor = rows.reference(onehot_name, "build its melody feature extractor",
                               lambda: _reference_chroma_extractor(hf_ref))
    ref_one_hot = None
    suffix = ""
    if extractor is not _NO_VALUE:
        fe, ta, shim = extractor
        suffix = " [reference via torchaudio shim]" if shim else ""
        ref_chroma = rows.reference((onehot_name + suffix, "melody chroma pre-argmax" + suffix),
                                    "compute the melody chroma", lambda: _reference_chroma(fe, ta, wav, sr))
        if ref_chroma is not _NO_VALUE:
            ref_one_hot, ref_pre = ref_chroma
    if _have(ref_one_hot):
        with rows.guard(onehot_name + suffix, 0):
            ours = ChromaExtractor.from_config(pipe.config["melody"])
            one_hot, pre = ours.chroma_features(wav, sr)
            rows.add(equal_row(onehot_name + suffix, one_hot, ref_one_hot),
                     close_row("melody chroma pre-argmax" + suffix, pre, ref_pre, TOL_CHROMA))
    if ref_one_hot is not None:
        _pipeline_chroma_rows(rows, pipe, wav, sr, ref_one_hot, ref_pre)
    else:
        with rows.guard("greedy tokens (melody)", 0):
            ref_one_hot = ChromaExtractor.from_config(pipe.config["melody"]).chroma_features(wav, sr)[0]
        if ref_one_hot is None:
            return
        report.notes.append("melody: the reference has no chroma extractor; greedy tokens (melody) fed both "
                            "sides the MLX chroma")
    gen_rows = ("greedy tokens (melody)", "greedy audio (melody)", "output shape (melody)")
    ref_gen = rows.reference(gen_rows, "generate with the melody",
                             lambda: _hf_generate_rows(hf, channels, True, pipe.num_codebooks, t_ids, t_mask,
                                                       input_features=torch.from_numpy(np.repeat(ref_one_hot, b, axis=0)),
                                                       max_new_tokens=steps))
    if _have(ref_gen):
        with rows.guard("greedy tokens (melody)", 0):
            ref_codes, ref_audio = ref_gen
            audio, got_codes = _generate(pipe, prompts, duration=frames / pipe.frame_rate, greedy=True,
                                                guidance_scale=GUIDANCE, melody=(wav, sr))
            rows.add(equal_row("greedy tokens (melody)", got_codes, ref_codes),
                     close_row("greedy audio (melody)", audio, ref_audio, TOL_AUDIO),
                     shape_row("output shape (melody)", audio.shape, (b, channels, ref_codes.shape[-1] * hop)))


def _pipeline_chroma_rows(rows: _Rows, pipe, wav: np.ndarray, sr: int, ref_one_hot, ref_pre) -> None:
    from mlx_music.runtime.conditioning import melody_waveform

    with rows.guard("melody chroma fed by the pipeline", 0):
        # What generate(melody=...) actually conditions on: the pipeline loads (and resamples)
        # the input itself before the extractor sees it.
        msr = pipe.config["melody"]["sampling_rate"]
        fed, fed_pre = pipe.conditioner.extractor.chroma_features([melody_waveform((wav, sr), msr)], msr)
        rows.add(equal_row("melody chroma fed by the pipeline", fed, ref_one_hot),
                 close_row("melody chroma fed by the pipeline, pre-argmax", fed_pre, ref_pre, TOL_CHROMA))
