"""Melody chroma features for MusicGen-Melody, in plain numpy.

This reproduces transformers' ``MusicgenMelodyFeatureExtractor`` (which needs
torch + torchaudio) step by step, so a melody prompt conditions the MLX model
exactly as it conditions the PyTorch one:

1. resample each waveform to 32 kHz with torchaudio's Hann-windowed sinc
   interpolation (``rolloff=0.945``, ``lowpass_filter_width=24``, the values HF
   passes) -- re-derived here in numpy, not soxr, because a different resampler
   shifts energy between neighbouring FFT bins and can flip the argmax;
2. average the channels to mono;
3. truncate to ``chunk_length`` seconds (960 000 samples). A single clip is
   *not* padded up to 30 s (HF pads to the longest clip of the batch, which for
   one clip is the clip itself); in a batch, shorter clips are zero-padded on
   the right to the longest (truncated) clip;
4. clips shorter than ``n_fft`` are zero-padded on both sides to ``n_fft``
   (the odd sample goes to the right) -- this happens before the STFT;
5. power STFT: periodic Hann window of ``n_fft`` samples, hop ``hop_length``,
   centred with reflect padding of ``n_fft // 2``, every bin divided by
   ``sqrt(sum(window**2))`` before squaring (torchaudio ``normalized=True``);
   ``1 + length // hop_length`` frames;
6. chroma = filter bank (librosa-style, tuning 0, C first) @ power spectrum;
7. each frame divided by its maximum over the chroma bins (floored at 1e-6);
8. argmax over the chroma bins -> one-hot (ties -> lowest index, as torch).

The runtime must never import torch/transformers, hence this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mlx_music.runtime.audio_io import check_sample_rate

__all__ = [
    "ChromaExtractor",
    "chroma_filter_bank",
    "sinc_input_length",
    "sinc_resample",
]

# torchaudio.functional.resample arguments used by MusicgenMelodyFeatureExtractor.
_HF_ROLLOFF = 0.945
_HF_LOWPASS_WIDTH = 24
# torch.nn.functional.normalize(p=inf, eps=1e-6) floor on the per-frame maximum.
_NORM_EPS = 1e-6
# Largest polyphase kernel built whole, in float64 elements (32 MB). Rates whose reduced ratio
# needs more (coprime rates such as 48001 -> 32000 Hz: 32000 x 48079 taps) are resampled
# output block by output block instead, with the same filter values.
_KERNEL_BUDGET = 1 << 22
# float64 elements per array in one block of the blockwise resampler (2 MB).
_BLOCK_ELEMENTS = 1 << 18


def chroma_filter_bank(
    sampling_rate: int, n_fft: int, num_chroma: int = 12, tuning: float = 0.0
) -> np.ndarray:
    """Chroma projection matrix, shape ``(num_chroma, n_fft // 2 + 1)``, float64.

    Same construction as ``transformers.audio_utils.chroma_filter_bank`` with the
    arguments HF uses (power 2 column normalisation, octave weighting centred on
    octave 5 with half-width 2, rows rotated so row 0 is C).
    """
    # FFT bin frequencies without DC, converted to fractional chroma bins
    # relative to A440/16 (A0 is 27.5 Hz; using /16 keeps all octaves positive).
    freqs = np.linspace(0.0, sampling_rate, n_fft, endpoint=False)[1:]
    reference = 440.0 * 2.0 ** (tuning / num_chroma) / 16.0
    bins = num_chroma * np.log2(freqs / reference)
    # DC has no pitch: give it a made-up position 1.5 octaves below bin 1 so it
    # lands half-way round the chroma circle with a broad bump.
    bins = np.concatenate(([bins[0] - 1.5 * num_chroma], bins))
    widths = np.concatenate((np.maximum(np.diff(bins), 1.0), [1.0]))

    # Distance of every FFT bin to every chroma class, wrapped to +-num_chroma/2.
    half = np.round(num_chroma / 2.0)
    dist = bins[None, :] - np.arange(num_chroma, dtype=np.float64)[:, None]
    dist = np.remainder(dist + half + 10 * num_chroma, num_chroma) - half

    filters = np.exp(-0.5 * (2.0 * dist / widths[None, :]) ** 2)
    filters = filters / np.sqrt(np.sum(filters**2, axis=0, keepdims=True))
    # Emphasise the middle octaves (centre octave 5, half-width 2 octaves).
    filters = filters * np.exp(-0.5 * ((bins / num_chroma - 5.0) / 2.0) ** 2)[None, :]
    # Row 0 is A before the roll; MusicGen wants C first.
    filters = np.roll(filters, -3 * (num_chroma // 12), axis=0)
    return np.ascontiguousarray(filters[:, : n_fft // 2 + 1])


def _kernel_width(orig: int, new: int, lowpass_width: int, rolloff: float) -> int:
    """Half-width of the filter in input samples (torchaudio's ``width``)."""
    return math.ceil(lowpass_width * orig / (min(orig, new) * rolloff))


def _sinc_weights(j: np.ndarray, p: np.ndarray, orig: int, new: int, lowpass_width: int,
                  rolloff: float) -> np.ndarray:
    """Filter value of tap ``j`` (input sample ``k * orig + j``) for output phase ``p`` (output
    sample ``k * new + p``), elementwise over broadcast float64 ``j`` and ``p``.

    A Hann-windowed sinc with cutoff ``rolloff * min(orig, new)``, truncated to
    ``lowpass_width`` zero crossings: torchaudio's ``_get_sinc_resample_kernel``, term by term.
    """
    base = min(orig, new) * rolloff
    t = j / orig - p / new
    t = np.clip(t * base, -lowpass_width, lowpass_width)
    window = np.cos(t * math.pi / lowpass_width / 2.0) ** 2
    x = t * math.pi
    safe = np.where(x == 0.0, 1.0, x)
    sinc = np.where(x == 0.0, 1.0, np.sin(safe) / safe)
    return sinc * window * (base / orig)


def _sinc_kernel(orig: int, new: int, lowpass_width: int, rolloff: float) -> tuple[np.ndarray, int]:
    """Polyphase kernel ``(new, 2 * width + orig)`` and half-width ``width``.

    ``orig``/``new`` are the rates already divided by their gcd. Output sample
    ``p`` of block ``k`` sits at input time ``k + p / new`` (in units of ``orig``
    input samples). Memory is ``new * (2 * width + orig)`` float64: only for small ratios.
    """
    width = _kernel_width(orig, new, lowpass_width, rolloff)
    taps = np.arange(-width, width + orig, dtype=np.float64)[None, :]
    phases = np.arange(new, dtype=np.float64)[:, None]
    return _sinc_weights(taps, phases, orig, new, lowpass_width, rolloff), width


def _blockwise_resample(padded: np.ndarray, orig: int, new: int, width: int, target: int,
                        lowpass_width: int, rolloff: float) -> np.ndarray:
    """``target`` outputs per row of ``padded`` (the input with ``width`` zeros in front), each
    from the ``2 * width + 2`` taps around its own time, a block of outputs at a time.

    The taps and their filter values are those of `_sinc_kernel` (same formula, same float64
    operations); the kernel's other taps are past ``lowpass_width`` zero crossings, where the
    window is cos(pi/2)**2 (~4e-33), so leaving them out changes nothing above rounding.
    Memory: O(taps x block) whatever the rates; time: O(taps) per output.
    """
    d = np.arange(-width, width + 2, dtype=np.int64)
    per_block = max(1, _BLOCK_ELEMENTS // d.size)
    out = np.empty((padded.shape[0], target), dtype=np.float64)
    for start in range(0, target, per_block):
        m = np.arange(start, min(target, start + per_block), dtype=np.int64)
        k, p = np.divmod(m, new)
        j = (p * orig // new)[:, None] + d[None, :]  # taps relative to the block's first input
        w = _sinc_weights(j.astype(np.float64), p[:, None].astype(np.float64), orig, new,
                          lowpass_width, rolloff)
        w[j >= width + orig] = 0.0  # outside the reference kernel's taps
        idx = (k * orig)[:, None] + j + width  # index into padded
        for row in range(padded.shape[0]):
            out[row, m[0]:m[-1] + 1] = np.sum(padded[row][idx] * w, axis=-1)
    return out


def sinc_input_length(max_out: int, sr_in: int, sr_out: int, lowpass_width: int = _HF_LOWPASS_WIDTH,
                      rolloff: float = _HF_ROLLOFF) -> int:
    """Input samples that decide the first ``max_out`` outputs of `sinc_resample`: cropping the
    input to this many leaves those outputs unchanged."""
    g = math.gcd(int(sr_in), int(sr_out))
    orig, new = int(sr_in) // g, int(sr_out) // g
    if orig == new:
        return max_out
    # Block k reads input samples [k*orig - width, k*orig + width + orig); keep everything the
    # first ceil(max_out/new) blocks read.
    return -(-max_out // new) * orig + _kernel_width(orig, new, lowpass_width, rolloff) + orig


def sinc_resample(
    wav: np.ndarray,
    sr_in: int,
    sr_out: int,
    lowpass_width: int = _HF_LOWPASS_WIDTH,
    rolloff: float = _HF_ROLLOFF,
    max_out: int | None = None,
) -> np.ndarray:
    """Resample along the last axis like ``torchaudio.functional.resample``.

    Output length is ``ceil(len * sr_out / sr_in)`` (or ``max_out`` if smaller:
    the input is then cropped first (`sinc_input_length`) so long songs don't cost a
    full-length resample -- the kept outputs are the same). Memory is bounded by the
    samples, whatever the rates: ratios whose polyphase kernel would pass 32 MB (coprime
    rates) are computed output block by output block (`_blockwise_resample`).
    """
    if int(sr_in) != sr_in or int(sr_out) != sr_out or sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be positive integers, got {sr_in} -> {sr_out}")
    sr_in, sr_out = int(sr_in), int(sr_out)
    wav = np.asarray(wav, dtype=np.float64)
    if sr_in == sr_out:
        return wav if max_out is None else wav[..., :max_out]
    g = math.gcd(sr_in, sr_out)
    orig, new = sr_in // g, sr_out // g
    width = _kernel_width(orig, new, lowpass_width, rolloff)

    length = wav.shape[-1]
    target = math.ceil(new * length / orig)
    if max_out is not None and max_out < target:
        wav = wav[..., : sinc_input_length(max_out, sr_in, sr_out, lowpass_width, rolloff)]
        target = max_out

    lead = wav.shape[:-1]
    flat = wav.reshape(-1, wav.shape[-1])
    if new * (2 * width + orig) > _KERNEL_BUDGET:
        # Outputs read at most `width` + 1 samples past the input's end (never a block of `orig`).
        padded = np.pad(flat, ((0, 0), (width, width + 2)))
        out = _blockwise_resample(padded, orig, new, width, target, lowpass_width, rolloff)
        return out.reshape(*lead, -1) if lead else out[0]
    padded = np.pad(flat, ((0, 0), (width, width + orig)))
    kernel, _ = _sinc_kernel(orig, new, lowpass_width, rolloff)
    taps = kernel.shape[1]
    n_blocks = (padded.shape[1] - taps) // orig + 1
    out = np.empty((flat.shape[0], n_blocks * new), dtype=np.float64)
    # Strided view of every block's input window; matmul in slices so the
    # copied windows stay small (16 kHz input: 53 taps per output pair).
    windows = np.lib.stride_tricks.sliding_window_view(padded, taps, axis=1)[:, ::orig]
    step = max(1, (1 << 22) // taps)
    for row in range(flat.shape[0]):
        for start in range(0, n_blocks, step):
            stop = min(n_blocks, start + step)
            out[row, start * new : stop * new] = (windows[row, start:stop] @ kernel.T).reshape(-1)
    return out[:, :target].reshape(*lead, -1) if lead else out[0, :target]


def _as_float_array(x: Any) -> np.ndarray:
    """numpy view of a numpy/MLX/list waveform (MLX arrays export a buffer)."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"waveform must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


class ChromaExtractor:
    """numpy twin of ``MusicgenMelodyFeatureExtractor`` (see module docstring)."""

    def __init__(
        self,
        sampling_rate: int = 32000,
        n_fft: int = 16384,
        hop_length: int = 4096,
        chunk_length: int = 30,
        num_chroma: int = 12,
    ) -> None:
        self.sampling_rate = int(sampling_rate)
        self.n_fft = int(n_fft)
        self.hop_length = int(hop_length)
        self.chunk_length = chunk_length
        self.num_chroma = int(num_chroma)
        self.n_samples = int(chunk_length * self.sampling_rate)
        self.filters = chroma_filter_bank(self.sampling_rate, self.n_fft, self.num_chroma)
        # Periodic Hann (torch.hann_window default): the DFT-even window.
        n = np.arange(self.n_fft, dtype=np.float64)
        self.window = 0.5 - 0.5 * np.cos(2.0 * math.pi * n / self.n_fft)
        self._window_energy = float(np.sum(self.window**2))

    @classmethod
    def from_config(cls, melody: dict[str, Any]) -> "ChromaExtractor":
        """Build from the ``config.json["melody"]`` block of an MLX checkpoint."""
        return cls(
            sampling_rate=melody.get("sampling_rate", 32000),
            n_fft=melody.get("n_fft", 16384),
            hop_length=melody.get("hop_length", 4096),
            chunk_length=melody.get("chunk_length", 30),
            num_chroma=melody.get("num_chroma", 12),
        )

    def num_frames(self, num_samples_32k: int) -> int:
        """Chroma frames produced for a mono clip of this many samples at 32 kHz."""
        length = max(min(num_samples_32k, self.n_samples), self.n_fft)
        return 1 + length // self.hop_length

    # ---- steps -------------------------------------------------------------------

    def prepare(self, wav: Any, sr: int) -> np.ndarray:
        """Steps 1-3 for one clip: 1-D float64 mono at ``sampling_rate``, <= 30 s.

        ``sr`` must be within `audio_io.MIN_SAMPLE_RATE`-`MAX_SAMPLE_RATE` (else `AudioInputError`,
        a ValueError): the resampler's filter grows with the rate ratio."""
        sr = check_sample_rate(sr, "<waveform>")
        arr = _as_float_array(wav)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise ValueError(f"waveform must be [samples] or [channels, samples], got shape {arr.shape}")
        if arr.shape[-1] == 0:
            raise ValueError("waveform is empty")
        # Resample and channel-mean are both linear, so their order only changes
        # rounding; HF resamples first, and so do we.
        arr = sinc_resample(arr, sr, self.sampling_rate, max_out=self.n_samples)
        mono = arr.mean(axis=0)
        return mono[: self.n_samples]

    def _spectrogram(self, mono: np.ndarray) -> np.ndarray:
        """Step 4-5: power spectrogram ``(frames, n_fft // 2 + 1)``."""
        if mono.shape[-1] < self.n_fft:
            pad = self.n_fft - mono.shape[-1]
            mono = np.pad(mono, (pad // 2, pad - pad // 2))
        half = self.n_fft // 2
        padded = np.pad(mono, (half, half), mode="reflect")
        frames = np.lib.stride_tricks.sliding_window_view(padded, self.n_fft)[:: self.hop_length]
        spec = np.fft.rfft(frames * self.window, axis=-1)
        return (spec.real**2 + spec.imag**2) / self._window_energy

    def _normalised_chroma(self, mono: np.ndarray) -> np.ndarray:
        """Steps 4-7: ``(frames, num_chroma)`` float64, each frame's max is 1."""
        raw = self._spectrogram(mono) @ self.filters.T
        peak = np.maximum(np.max(np.abs(raw), axis=-1, keepdims=True), _NORM_EPS)
        return raw / peak

    # ---- public ------------------------------------------------------------------

    def chroma_features(
        self, audio: Any | Sequence[Any], sr: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """One-hot chroma and the normalised chroma it was taken from.

        ``audio``: one waveform (``[S]`` or ``[C, S]``; numpy, MLX or list) or a
        list/tuple of such waveforms (a batch; clips may differ in length and
        channel count). Returns two float32 arrays of shape ``(B, T, num_chroma)``.
        """
        is_batch = isinstance(audio, (list, tuple)) and len(audio) > 0 and not np.isscalar(audio[0])
        clips = list(audio) if is_batch else [audio]
        monos = [self.prepare(clip, sr) for clip in clips]
        # Batch: right-pad to the longest truncated clip, as SequenceFeatureExtractor.pad.
        longest = max(m.shape[-1] for m in monos)
        chroma = np.stack(
            [self._normalised_chroma(np.pad(m, (0, longest - m.shape[-1]))) for m in monos]
        )
        one_hot = np.zeros_like(chroma, dtype=np.float32)
        np.put_along_axis(one_hot, np.argmax(chroma, axis=-1)[..., None], 1.0, axis=-1)
        return one_hot, chroma.astype(np.float32)

    def __call__(self, audio: Any | Sequence[Any], sr: int) -> np.ndarray:
        """One-hot chroma ``(B, T, num_chroma)`` float32 (B = 1 for a single clip)."""
        return self.chroma_features(audio, sr)[0]
