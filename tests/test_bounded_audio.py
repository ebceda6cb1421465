"""User audio (melody, audio prompt) costs memory and time by its seconds, never by its header.

Issue 21 item 1: a 2 KB WAV whose header said 1009 Hz took 1.7 GB to resample (a polyphase kernel
of 32000 x 1061 float64 taps); 1 Hz asked for 238 GiB. Every input here is such a file: rates
outside 4-384 kHz are refused with a ValueError naming the API parameter (one line, exit 2 on the
CLI); odd rates inside are resampled block by block, with a bounded peak (tracemalloc: numpy's
allocations) and the reference resampler's numbers.
"""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mlx_music.runtime.audio_io import AudioInputError, read_audio, wav_header
from mlx_music.runtime.chroma import ChromaExtractor, sinc_resample
from mlx_music.runtime.conditioning import melody_waveform
from mlx_music.runtime.generation import Request
from tests.generation_helpers import cached_pipe, melody_tones
from tests.test_reliability_convert import assert_api_error, assert_cli_error, run_cli

REFUSED = (1, 1009, 3001, 2**31 - 1)
ACCEPTED = (8001, 22051, 48001)
SR = 32000
CHROMA_TOL = 1e-5  # tests/test_chroma.py's tolerance against transformers' extractor
PEAK_BYTES = 48 << 20  # the old resampler needed 2 GB (8001 Hz) to 12 GB (48001 Hz) here


def small_wav(folder: Path, rate: int, samples: int = 1000) -> Path:
    """A 2 KB mono 16-bit WAV of a varying tone whose header says ``rate`` Hz (written by hand:
    libsndfile will not write most of these rates)."""
    n = np.arange(samples)
    pcm = (0.4 * np.sin(0.07 * n + 0.00004 * n**2) * 32767).astype("<i2")
    path = folder / f"odd-{rate}.wav"
    path.write_bytes(wav_header(rate, 1, samples) + pcm.tobytes())
    return path


def torchaudio_resample(x: np.ndarray, sr_in: int, sr_out: int, outputs: np.ndarray,
                        rolloff: float = 0.945, lowpass_width: int = 24) -> np.ndarray:
    """Outputs ``outputs`` of torchaudio's sinc resampling, each with its whole kernel row
    (``2 * width + orig`` taps): an independent statement of the reference for any rates."""
    g = math.gcd(sr_in, sr_out)
    orig, new = sr_in // g, sr_out // g
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_width * orig / base)
    padded = np.pad(x.astype(np.float64), (width, width + orig))
    taps = np.arange(-width, width + orig, dtype=np.float64) / orig
    out = np.empty(len(outputs))
    for i, m in enumerate(outputs):
        k, p = divmod(m, new)
        t = np.clip((taps - p / new) * base, -lowpass_width, lowpass_width)
        window = np.cos(t * math.pi / lowpass_width / 2) ** 2
        sinc = np.sinc(t)  # sin(pi t) / (pi t)
        out[i] = padded[k * orig:k * orig + taps.size] @ (sinc * window * base / orig)
    return out


@pytest.fixture(scope="module")
def pipe(mlx_folder):
    return cached_pipe(mlx_folder("melody"))


def peak_of(fn, *args):
    tracemalloc.start()
    try:
        out = fn(*args)
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("rate", REFUSED)
def test_rates_outside_the_range_are_refused_naming_the_parameter(pipe, tmp_path, rate):
    path = small_wav(tmp_path, rate)
    assert path.stat().st_size < 2100
    for param in ("melody", "audio_prompt"):
        with pytest.raises(ValueError) as err:
            pipe.resolve(Request("rock", 1.0, seed=0, **{param: str(path)}))
        assert_api_error(err.value, ValueError, [f"{param} {path}", f"sample rate {rate} Hz",
                                                 "4000-384000 Hz"])
        assert str(err.value).startswith(f"{param} ")
    # In-memory waveforms obey the same range.
    with pytest.raises(ValueError, match=f"^melody <waveform>: sample rate {rate} Hz"):
        pipe.resolve(Request("rock", 1.0, seed=0, melody=(np.ones(1000, np.float32) * 0.1, rate)))
    with pytest.raises(AudioInputError, match="sample rate"):
        read_audio(path)


@pytest.mark.parametrize("rate", ACCEPTED)
def test_odd_rates_are_bounded_and_match_the_reference(pipe, tmp_path, rate):
    path = small_wav(tmp_path, rate)
    row, peak = peak_of(pipe.resolve, Request("rock", 1.0, seed=0, melody=str(path)))
    assert peak < PEAK_BYTES, f"{rate} Hz: peak {peak / 2**20:.1f} MiB"
    wav, sr = read_audio(path)
    n = math.ceil(1000 * SR / rate)
    assert row.melody.shape == (n,)
    # Every 8th output, the first and the last ones (the whole reference costs seconds per rate).
    picked = np.unique(np.concatenate([np.arange(0, n, 8), np.arange(12), np.arange(n - 12, n)]))
    ref = torchaudio_resample(wav[0].astype(np.float64), rate, SR, picked)
    np.testing.assert_allclose(row.melody[picked], ref, rtol=0, atol=1e-12)
    assert np.max(np.abs(ref)) > 0.3  # a real signal, not silence
    # The chroma the model is conditioned on equals the one of the reference resampling
    # (reference samples where computed, ours between them).
    mixed = row.melody.copy()
    mixed[picked] = ref
    ex = ChromaExtractor()
    ours, ours_norm = ex.chroma_features(row.melody, SR)
    theirs, theirs_norm = ex.chroma_features(mixed, SR)
    np.testing.assert_array_equal(ours, theirs)
    assert float(np.max(np.abs(ours_norm - theirs_norm))) <= CHROMA_TOL
    # An audio prompt at the same rate (soxr) is bounded too and encodes to its frames.
    codes, peak = peak_of(pipe.encode_audio, str(path), 2.0)
    assert peak < PEAK_BYTES, f"{rate} Hz prompt: peak {peak / 2**20:.1f} MiB"
    assert codes.shape == (pipe.num_codebooks, math.ceil(1000 / rate * pipe.sample_rate / pipe.codec.hop))


def test_blockwise_and_polyphase_resampling_agree():
    # Rates with a small polyphase kernel keep it; coprime rates go block by block with the same
    # filter values: forcing the blockwise path on a common rate gives the same samples.
    import mlx_music.runtime.chroma as chroma

    x = np.random.default_rng(0).standard_normal(22050)
    poly = sinc_resample(x, 44100, SR)
    budget = chroma._KERNEL_BUDGET
    chroma._KERNEL_BUDGET = 0
    try:
        block = sinc_resample(x, 44100, SR)
        cropped = sinc_resample(x, 44100, SR, max_out=5000)
    finally:
        chroma._KERNEL_BUDGET = budget
    np.testing.assert_allclose(block, poly, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cropped, poly[:5000], rtol=0, atol=1e-12)
    assert np.max(np.abs(poly)) > 1.0  # the check is not on silence


def test_headers_claiming_more_samples_than_the_file_holds(tmp_path):
    # A data chunk that claims 4 GB: memory follows the 1000 samples really there.
    path = tmp_path / "liar.wav"
    pcm = (np.sin(np.arange(1000) * 0.1) * 2e4).astype("<i2")
    path.write_bytes(wav_header(8000, 1, 0x7FFFFFF0) + pcm.tobytes())
    (wav, sr), peak = peak_of(read_audio, path)
    assert sr == 8000 and wav.shape == (1, 1000)
    np.testing.assert_array_equal(wav[0], pcm / 32768.0)
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_long_files_are_decoded_only_as_far_as_used(pipe, tmp_path):
    # 200 s of 8 kHz audio; a 1 s request reads its 30 s of melody (plus a few), not 200 s.
    path = tmp_path / "long.wav"
    t = np.arange(200 * 8000) / 8000
    sf.write(path, (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 8000, subtype="PCM_16")
    (wav, _), peak = peak_of(read_audio, path, False, 2.0)
    assert wav.shape == (1, 16000) and peak < 1 << 20
    assert pipe.input_seconds(1.0)["melody"] == 30.0
    row, peak = peak_of(pipe.resolve, Request("rock", 1.0, seed=0, melody=str(path)))
    assert row.melody.shape == (30 * SR,)
    assert peak < 96 << 20, f"peak {peak / 2**20:.1f} MiB"  # the whole file would be 200 s at 32 kHz
    # An audio prompt longer than the request is refused after reading a few seconds of it.
    with pytest.raises(ValueError) as err:
        pipe.resolve(Request("rock", 1.0, seed=0, audio_prompt=str(path)))
    assert_api_error(err.value, ValueError, [f"audio_prompt {path}", "longer than 2 s"])


@pytest.mark.parametrize("rate", [44100, 48001])
def test_cropping_the_melody_changes_no_window(mlx_folder, rate):
    # Several windows (1 s each), a melody longer than the request: every window's chroma from the
    # cropped melody equals the one from the whole melody.
    pipe = cached_pipe(mlx_folder("melody"), 1.0)
    tones, sr = melody_tones(9.0)
    wav = sinc_resample(tones.astype(np.float64), sr, rate).astype(np.float32)
    limit = pipe.input_seconds(2.6)["melody"]
    assert limit < 9.0
    cropped = melody_waveform((wav, rate), SR, limit)
    whole = melody_waveform((wav, rate), SR)
    assert cropped.shape == (math.ceil(limit * SR),)
    np.testing.assert_allclose(cropped, whole[:cropped.size], rtol=0, atol=1e-12)
    gen = pipe.frames([Request("rock", 2.6, seed=0)])
    assert len(gen.plan) > 2
    text = pipe.conditioner.text(["rock"], False)
    for w in gen.plan:
        a = pipe.conditioner.window(text, [cropped], False, w.start, gen.window, False)
        b = pipe.conditioner.window(text, [whole], False, w.start, gen.window, False)
        np.testing.assert_array_equal(np.array(a.chroma), np.array(b.chroma))


def test_cli_refuses_an_odd_rate_in_one_line(mlx_folder, tmp_path):
    path = small_wav(tmp_path, 1009)
    run = run_cli(["generate", "--model", str(mlx_folder("melody")), "--prompt", "rock", "--duration", "0.1",
                   "--melody", str(path), "--out", str(tmp_path / "out.wav"), "--quiet"])
    assert_cli_error(run, "generate", ["--melody", str(path), "sample rate 1009 Hz", "4000-384000 Hz"])
    assert not (tmp_path / "out.wav").exists()


def test_chroma_extractor_refuses_rates_outside_the_range():
    ex = ChromaExtractor()
    for rate in (1, 2**31 - 1):
        with pytest.raises(ValueError, match=f"sample rate {rate} Hz"):
            ex(np.ones(1000) * 0.1, rate)


def test_batch_job_fails_only_the_row_with_an_odd_rate(pipe, tmp_path):
    import json

    from mlx_music.runtime.batch_job import run_batch

    small_wav(tmp_path, 1)
    small_wav(tmp_path, 22051)
    rows = [{"id": "bad", "prompt": "rock", "duration": 0.2, "melody": "odd-1.wav"},
            {"id": "good", "prompt": "rock", "duration": 0.2, "melody": "odd-22051.wav"},
            {"id": "plain", "prompt": "jazz", "duration": 0.2}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = run_batch(prompts, pipe, tmp_path / "out", batch_size=4, progress=False, model_name="melody")
    assert (s.ok, s.failed) == (2, 1)
    entries = {e["id"]: e for e in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())}
    assert entries["bad"]["status"] == "failed" and entries["good"]["status"] == "ok"
    assert entries["bad"]["reason"].startswith("melody ") and "sample rate 1 Hz" in entries["bad"]["reason"]
