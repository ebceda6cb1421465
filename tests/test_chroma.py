"""runtime/chroma.py against transformers' MusicgenMelodyFeatureExtractor.

The reference runs on the real transformers code with a torch stand-in for the
two torchaudio functions it needs (tests/torchaudio_shim.py).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mlx_music.runtime.chroma import ChromaExtractor, chroma_filter_bank, sinc_resample  # noqa: E402
from tests.torchaudio_shim import install  # noqa: E402
from tests.torchaudio_shim import resample as shim_resample  # noqa: E402

SR = 32000
CHROMA_TOL = 1e-5
A_CLASS = 9  # C=0, C#=1, ..., A=9


@pytest.fixture(scope="module")
def reference():
    return install()()


@pytest.fixture(scope="module")
def ours():
    return ChromaExtractor()


def melody(seconds: float, sr: int = SR, seed: int = 0, root: float = 440.0) -> np.ndarray:
    """Major scale, two notes a second, with one harmonic and light noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    notes = root * 2 ** (np.array([0, 2, 4, 5, 7, 9, 11, 12]) / 12)
    freq = notes[(t * 2).astype(int) % len(notes)]
    phase = 2 * np.pi * np.cumsum(freq) / sr
    wav = 0.5 * np.sin(phase) + 0.2 * np.sin(2 * phase) + 0.01 * rng.standard_normal(t.size)
    return wav.astype(np.float32)


def sweep(seconds: float, sr: int = SR) -> np.ndarray:
    """Exponential sweep 110 Hz -> 1760 Hz plus a fixed fifth: exercises every pitch class."""
    t = np.arange(int(round(seconds * sr))) / sr
    f0, f1 = 110.0, 1760.0
    k = np.log(f1 / f0) / seconds
    phase = 2 * np.pi * f0 * (np.exp(k * t) - 1) / k
    return (0.4 * np.sin(phase) + 0.1 * np.sin(2 * np.pi * 659.25 * t)).astype(np.float32)


def run_reference(fe, audio, sr, monkeypatch):
    """One-hot from the extractor and the normalised chroma captured inside its
    own ``_torch_extract_fbank_features`` (the method zeroes that tensor in place
    before scattering the one-hot, so we keep a clone)."""
    captured = []
    real_normalize = torch.nn.functional.normalize

    def spy(*args, **kwargs):
        out = real_normalize(*args, **kwargs)
        captured.append(out.detach().clone())
        return out

    monkeypatch.setattr(torch.nn.functional, "normalize", spy)
    try:
        one_hot = fe(audio, sampling_rate=sr, return_tensors="np")["input_features"]
    finally:
        monkeypatch.setattr(torch.nn.functional, "normalize", real_normalize)
    assert len(captured) == 1
    chroma = captured[0].transpose(1, 2).numpy()  # (B, 12, T) -> (B, T, 12)
    return np.asarray(one_hot), chroma


def compare(fe, ours, ref_audio, our_audio, sr, monkeypatch):
    ref_one_hot, ref_chroma = run_reference(fe, ref_audio, sr, monkeypatch)
    one_hot, chroma = ours.chroma_features(our_audio, sr)
    assert one_hot.shape == ref_one_hot.shape, (one_hot.shape, ref_one_hot.shape)
    assert one_hot.dtype == np.float32 and chroma.dtype == np.float32
    np.testing.assert_array_equal(one_hot, ref_one_hot)
    diff = float(np.max(np.abs(chroma - ref_chroma)))
    assert diff <= CHROMA_TOL, diff
    # The one-hot really is one-hot and __call__ gives the same thing.
    assert np.all(one_hot.sum(-1) == 1)
    np.testing.assert_array_equal(ours(our_audio, sr), one_hot)
    return one_hot, diff


def test_filter_bank_matches_transformers():
    from transformers.audio_utils import chroma_filter_bank as hf_bank

    ref = hf_bank(num_frequency_bins=16384, num_chroma=12, sampling_rate=SR, tuning=0)
    ours = chroma_filter_bank(SR, 16384, 12)
    assert ours.shape == ref.shape == (12, 8193)
    assert np.max(np.abs(ours - ref)) < 1e-12


@pytest.mark.parametrize(
    "name, seconds",
    [
        ("shorter_than_n_fft", 0.2),  # 6400 samples < 16384: centred zero pad
        ("odd_short", 12345 / SR),  # odd pad split (extra sample on the right)
        ("five_seconds", 5.0),
        ("longer_than_30s", 31.5),  # truncated to 960000 samples -> 235 frames
    ],
)
def test_mono_matches_reference(reference, ours, monkeypatch, name, seconds):
    wav = melody(seconds) + sweep(seconds)
    one_hot, _ = compare(reference, ours, wav, wav, SR, monkeypatch)
    assert one_hot.shape[1] == ours.num_frames(wav.size)
    if seconds > 30:
        assert one_hot.shape == (1, 235, 12)


def test_stereo_matches_reference(reference, ours, monkeypatch):
    # Different content per channel so the channel mean matters.
    stereo = np.stack([melody(6.0, seed=1), sweep(6.0)])
    # transformers reads a 2-D array as a batch of mono clips; a stereo clip has
    # to be given as a batch of one [C, S] array. Ours takes [C, S] directly.
    compare(reference, ours, [stereo], stereo, SR, monkeypatch)
    # ...and [C, S] is the same as its channel mean.
    np.testing.assert_array_equal(ours(stereo, SR), ours(stereo.mean(0), SR))


def test_batch_matches_reference(reference, ours, monkeypatch):
    # Different lengths: right-padded with zeros to the longest (after truncation).
    clips = [melody(3.0, seed=2), sweep(7.5), melody(0.3, seed=3, root=392.0)]
    one_hot, _ = compare(reference, ours, clips, clips, SR, monkeypatch)
    assert one_hot.shape == (3, 1 + int(7.5 * SR) // 4096, 12)
    # Silent padded frames -> bin 0, as torch's argmax of an all-zero row.
    assert np.all(one_hot[2, -5:, 0] == 1)
    # Long + short batch: both truncated to 30 s first.
    clips = [melody(31.0, seed=4), sweep(2.0)]
    compare(reference, ours, clips, clips, SR, monkeypatch)


@pytest.mark.parametrize("sr", [16000, 44100, 48000])
def test_resampled_input_matches_reference(reference, ours, monkeypatch, sr):
    wav = melody(4.0, sr=sr, seed=5) + sweep(4.0, sr=sr)
    # The reference resamples only torch tensors (torchaudio API).
    one_hot, _ = compare(reference, ours, torch.from_numpy(wav), wav, sr, monkeypatch)
    assert one_hot.shape == (1, 1 + int(np.ceil(wav.size * SR / sr)) // 4096, 12)


@pytest.mark.parametrize("sr", [16000, 44100, 48000])
def test_resampling_preserves_length_and_frequency(sr):
    n = int(1.5 * sr)
    t = np.arange(n) / sr
    tone = np.sin(2 * np.pi * 1000.0 * t).astype(np.float32)
    out = sinc_resample(tone, sr, SR)
    assert out.shape == (int(np.ceil(n * SR / sr)),)
    # Dominant frequency within one FFT bin of 1 kHz, amplitude kept.
    spec = np.abs(np.fft.rfft(out * np.hanning(out.size)))
    peak_hz = np.argmax(spec) * SR / out.size
    assert abs(peak_hz - 1000.0) <= SR / out.size
    mid = out[out.size // 4 : 3 * out.size // 4]
    assert abs(np.max(np.abs(mid)) - 1.0) < 0.01
    # Same numbers as the torch formulation of torchaudio's algorithm.
    ref = shim_resample(torch.from_numpy(tone), sr, SR, rolloff=0.945, lowpass_filter_width=24).numpy()
    assert np.max(np.abs(out - ref)) < 1e-4
    # Channel axis is kept.
    assert sinc_resample(np.stack([tone, tone]), sr, SR).shape == (2, out.size)


@pytest.mark.parametrize("sr", [16000, 44100, 48000])
def test_pure_a_gives_pitch_class_a(ours, sr):
    t = np.arange(int(2.0 * sr)) / sr
    one_hot = ours(0.5 * np.sin(2 * np.pi * 440.0 * t), sr)
    assert np.all(np.argmax(one_hot[0], axis=-1) == A_CLASS)


def test_long_input_crop_is_exact():
    # Cropping before resampling a long song must not change the kept samples.
    wav = melody(3.0, sr=44100, seed=6)
    full = sinc_resample(wav, 44100, SR)
    cropped = sinc_resample(wav, 44100, SR, max_out=SR)
    assert cropped.shape == (SR,)
    # Identical maths; only BLAS blocking of the matmul may change the last bit.
    np.testing.assert_allclose(cropped, full[:SR], rtol=0, atol=1e-12)


def test_mlx_input_and_config():
    mx = pytest.importorskip("mlx.core")
    ex = ChromaExtractor.from_config(
        {"num_chroma": 12, "chroma_length": 235, "n_fft": 16384, "hop_length": 4096, "sampling_rate": 32000,
         "chunk_length": 30}
    )
    wav = melody(2.0)
    np.testing.assert_array_equal(ex(mx.array(wav), SR), ex(wav, SR))
    assert ex.num_frames(10**7) == 235
