"""Test-only stand-in for ``torchaudio`` so transformers' MusicGen-Melody feature
extractor can serve as the reference for ``runtime/chroma.py``.

torchaudio has no wheel for the torch build used here, and
``MusicgenMelodyFeatureExtractor`` only touches two of its functions:

* ``torchaudio.transforms.Spectrogram(n_fft, win_length, hop_length, power=2,
  center=True, pad=0, normalized=True)``
* ``torchaudio.functional.resample(wav, orig, new, rolloff=0.945,
  lowpass_filter_width=24)``

This module REIMPLEMENTS THOSE TWO FUNCTIONS IN PLAIN TORCH, following
torchaudio's documented semantics, and registers them as a fake ``torchaudio``
package in ``sys.modules``. It is not torchaudio: it is only a way to drive the
real transformers extractor (its padding/truncation, chroma filter bank, einsum,
normalisation and argmax) as an independent reference. The parts that are ours
on both sides (STFT and resampling conventions) are written against torch here
and numpy in the runtime, so a convention mistake would still have to be made
twice, in two different APIs, to go unnoticed.

Semantics reproduced:

* Spectrogram: ``torch.stft`` with the periodic Hann window
  (``torch.hann_window(win_length)``), ``center=True``, ``pad_mode="reflect"``,
  ``onesided=True``, ``normalized=False``; with ``normalized=True`` torchaudio
  then divides the complex STFT by ``sqrt(sum(window**2))`` ("window"
  normalisation), and ``power=2`` returns ``|X|**2``. Batch dims are packed and
  unpacked around the STFT, output ``(..., n_fft//2+1, frames)``.
* resample: Hann-windowed sinc interpolation ("sinc_interp_hann"): rates
  reduced by their gcd, cutoff ``rolloff * min(orig, new)``, filter half-width
  ``ceil(lowpass_filter_width * orig / cutoff)`` input samples, input zero
  padded by ``(width, width + orig)``, strided ``conv1d`` with one filter per
  output phase, output cut to ``ceil(new * len / orig)``. The kernel is built in
  the waveform's dtype, as torchaudio does.

Call :func:`install` before importing the extractor (it does the import itself
and returns the class).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import math
import sys
import types

import torch


class Spectrogram(torch.nn.Module):
    """Subset of ``torchaudio.transforms.Spectrogram`` (power / window-normalised)."""

    def __init__(
        self,
        n_fft: int = 400,
        win_length: int | None = None,
        hop_length: int | None = None,
        pad: int = 0,
        window_fn=torch.hann_window,
        power: float | None = 2.0,
        normalized: bool | str = False,
        wkwargs: dict | None = None,
        center: bool = True,
        pad_mode: str = "reflect",
        onesided: bool = True,
    ) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.win_length = win_length if win_length is not None else n_fft
        self.hop_length = hop_length if hop_length is not None else self.win_length // 2
        self.pad = pad
        self.power = power
        self.normalized = normalized
        self.center = center
        self.pad_mode = pad_mode
        self.onesided = onesided
        window = window_fn(self.win_length) if wkwargs is None else window_fn(self.win_length, **wkwargs)
        self.register_buffer("window", window)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if self.pad > 0:
            waveform = torch.nn.functional.pad(waveform, (self.pad, self.pad), "constant")
        frame_norm = self.normalized == "frame_length"
        window_norm = self.normalized is True or self.normalized == "window"
        shape = waveform.shape
        flat = waveform.reshape(-1, shape[-1])
        spec = torch.stft(
            flat,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=self.window,
            center=self.center,
            pad_mode=self.pad_mode,
            normalized=frame_norm,
            onesided=self.onesided,
            return_complex=True,
        )
        spec = spec.reshape(shape[:-1] + spec.shape[-2:])
        if window_norm:
            spec = spec / self.window.pow(2.0).sum().sqrt()
        if self.power is None:
            return spec
        if self.power == 1.0:
            return spec.abs()
        return spec.abs().pow(self.power)


def resample(
    waveform: torch.Tensor,
    orig_freq: int,
    new_freq: int,
    lowpass_filter_width: int = 6,
    rolloff: float = 0.99,
    resampling_method: str = "sinc_interp_hann",
    beta: float | None = None,
) -> torch.Tensor:
    """Hann-windowed sinc resampling along the last axis (torchaudio semantics)."""
    if resampling_method != "sinc_interp_hann":
        raise NotImplementedError("shim only implements sinc_interp_hann")
    if orig_freq <= 0 or new_freq <= 0:
        raise ValueError("frequencies must be positive")
    if orig_freq == new_freq:
        return waveform
    g = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // g, int(new_freq) // g
    dtype = waveform.dtype
    cutoff = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / cutoff)
    # Time (in input samples / orig) of each tap relative to each output phase.
    taps = torch.arange(-width, width + orig, dtype=dtype)[None, None] / orig
    phase = torch.arange(0, -new, -1, dtype=dtype)[:, None, None] / new
    t = ((phase + taps) * cutoff).clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * (cutoff / orig)

    shape = waveform.shape
    flat = waveform.reshape(-1, shape[-1])
    length = flat.shape[-1]
    flat = torch.nn.functional.pad(flat, (width, width + orig))
    out = torch.nn.functional.conv1d(flat[:, None], kernel, stride=orig)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    out = out[..., : math.ceil(new * length / orig)]
    return out.reshape(shape[:-1] + out.shape[-1:])


def install():
    """Register the fake ``torchaudio`` and return transformers' extractor class."""
    fake = types.ModuleType("torchaudio")
    fake.__doc__ = "test shim: torch reimplementation of two torchaudio functions"
    # transformers' availability probe calls importlib.util.find_spec, which
    # needs a spec on modules already in sys.modules.
    fake.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
    fake.__version__ = "0.0+shim"
    fake.transforms = types.ModuleType("torchaudio.transforms")
    fake.transforms.Spectrogram = Spectrogram
    fake.functional = types.ModuleType("torchaudio.functional")
    fake.functional.resample = resample
    sys.modules.setdefault("torchaudio", fake)
    sys.modules.setdefault("torchaudio.transforms", fake.transforms)
    sys.modules.setdefault("torchaudio.functional", fake.functional)

    from transformers.utils import import_utils

    # transformers may already have probed (and cached) "no torchaudio" if it
    # was imported earlier in this process; forget that answer.
    probe = getattr(import_utils.is_torchaudio_available, "cache_clear", None)
    if probe is not None:
        probe()
    # Import the submodule through the import system, not as an attribute of
    # the lazy package: attribute access can hand back a placeholder that raises
    # "requires the torchaudio library" when the cached probe said no.
    fe = importlib.import_module("transformers.models.musicgen_melody.feature_extraction_musicgen_melody")

    # With the spec above the availability probe now says yes, but it is
    # lru-cached: if transformers was imported earlier in this process it may
    # have cached "no" and skipped `import torchaudio` in the module. The class
    # only carries a @requires marker and resolves `torchaudio` as a module
    # global at call time, so setting the global covers both cases.
    fe.torchaudio = sys.modules["torchaudio"]
    if not hasattr(fe, "torch"):
        fe.torch = torch
    return fe.MusicgenMelodyFeatureExtractor
