"""Import shims that let audiocraft 1.3.0 run on CPU next to torch 2.13 (test and parity use only).

* xformers: audiocraft imports it at module level and checks two names; its torch attention
  backend is what runs for MusicGen (``unbind`` = torch.unbind, an empty ``LowerTriangularMask``).
  MAGNeT's loader switches to the xformers backend, so ``memory_efficient_attention`` computes
  softmax(q k^T / sqrt(d) + bias) v (the stage masks are that bias).
* torchaudio: tests/torchaudio_shim.py (the Spectrogram and resample the chroma path uses); every
  other name is a stub that raises if it is ever constructed (losses, metrics: unused here).
* spacy: imported by the conditioners module, used only by text normalisation (off in MusicGen).
* demucs: the melody conditioner separates stems with a downloaded htdemucs; this identity stand-in
  keeps the whole signal in one stem, which is what mlx-music's chroma extractor sees (it runs no
  source separation, like transformers' MusicGen-Melody feature extractor).

`install_shims()` only fills in modules that are not importable for real.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch


def install_shims() -> None:
    """Register the stand-ins in sys.modules for what is not installed."""
    have = {m: importlib.util.find_spec(m) is not None for m in ("xformers", "torchaudio", "spacy", "demucs")}
    if not have["xformers"]:
        _xformers()
    if not have["spacy"]:
        sys.modules["spacy"] = types.ModuleType("spacy")
    if not have["torchaudio"]:
        _torchaudio()
    if not have["demucs"]:
        _demucs()


def _xformers() -> None:
    xf = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    ops.unbind = torch.unbind

    class LowerTriangularMask:  # the causal bias MusicGen passes under the xformers backend
        pass

    ops.LowerTriangularMask = LowerTriangularMask

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        """softmax(q k^T / sqrt(d) + bias) v on [B, T, H, D] inputs. MAGNeT's loader switches
        audiocraft to this backend: with torch's own, its stage masks silently become causal."""
        assert p == 0.0, "xformers shim: no attention dropout"
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
        scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if isinstance(attn_bias, LowerTriangularMask):
            t, s = scores.shape[-2:]
            scores = scores.masked_fill(~torch.ones(t, s, dtype=torch.bool).tril(s - t), float("-inf"))
        elif attn_bias is not None:
            scores = scores + attn_bias
        return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)

    ops.memory_efficient_attention = memory_efficient_attention
    xf.ops = ops
    sys.modules["xformers"], sys.modules["xformers.ops"] = xf, ops


def _torchaudio() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torchaudio_shim

    torchaudio_shim.install()

    def stub(name):
        def __getattr__(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)

            class Missing:
                def __init__(self, *a, **k):
                    raise RuntimeError(f"torchaudio shim: {name}.{attr} is not available")
            return Missing
        return __getattr__

    for m in ("torchaudio", "torchaudio.transforms", "torchaudio.functional"):
        sys.modules[m].__getattr__ = stub(m)


def _demucs() -> None:
    """Identity demucs: one "other" stem holding the whole signal."""
    demucs = types.ModuleType("demucs")
    pretrained, apply, audio = (types.ModuleType(f"demucs.{n}") for n in ("pretrained", "apply", "audio"))

    class Identity:
        sources = ["drums", "bass", "other", "vocals"]
        samplerate = 32000
        audio_channels = 1

        def to(self, *a, **k):
            return self

    def apply_model(model, wav, device=None):
        stems = torch.zeros(wav.shape[0], 4, *wav.shape[1:])
        stems[:, 2] = wav
        return stems

    def convert_audio(wav, from_sr, to_sr, channels):
        assert from_sr == to_sr, "the identity demucs does not resample"
        return wav.mean(-2, keepdim=True) if channels == 1 else wav

    pretrained.get_model = lambda name: Identity()
    apply.apply_model = apply_model
    audio.convert_audio = convert_audio
    for m, mod in (("demucs", demucs), ("demucs.pretrained", pretrained), ("demucs.apply", apply),
                   ("demucs.audio", audio)):
        sys.modules[m] = mod
