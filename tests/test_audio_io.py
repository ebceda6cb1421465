"""runtime/audio_io.py: reading, writing, conversion, errors, progressive WAV."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mlx_music.runtime.audio_io import (
    AudioInputError,
    ProgressiveWavWriter,
    load_audio_input,
    read_audio,
    resample,
    save_audio,
    to_channels,
)

SR = 32000
PCM16_STEP = 1.0 / 32767


def tone(freq: float, seconds: float, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spec) * sr / x.size)


def assert_one_line_naming(err: pytest.ExceptionInfo, name: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    assert name in msg, msg
    assert isinstance(err.value, ValueError)


# ----------------------------------------------------------------- round trips


@pytest.mark.parametrize("ext, tol", [(".wav", PCM16_STEP), (".flac", PCM16_STEP)])
def test_round_trip_lossless(tmp_path, ext, tol):
    audio = np.stack([tone(440, 0.5), tone(660, 0.5, amp=0.3)])
    path = save_audio(tmp_path / f"x{ext}", audio, SR)
    info = sf.info(str(path))
    assert info.subtype == "PCM_16" and info.channels == 2 and info.samplerate == SR
    back, sr = read_audio(path)
    assert sr == SR and back.dtype == np.float32 and back.shape == audio.shape
    assert np.max(np.abs(back - audio)) <= tol


def test_round_trip_mono_1d_float_and_ogg(tmp_path):
    audio = tone(440, 0.5)
    back, _ = read_audio(save_audio(tmp_path / "m.wav", audio, SR, subtype="FLOAT"))
    assert back.shape == (1, audio.size)
    np.testing.assert_array_equal(back[0], audio)
    back, sr = read_audio(save_audio(tmp_path / "m.ogg", audio, SR))
    assert sr == SR and back.shape[0] == 1
    assert abs(peak_hz(back[0], sr) - 440) < 5  # lossy, so check content only


def test_save_clips_instead_of_wrapping(tmp_path):
    back, _ = read_audio(save_audio(tmp_path / "loud.wav", np.array([1.5, -1.5, 0.25], np.float32), SR))
    assert back[0, 0] > 0.99 and back[0, 1] < -0.99


def test_save_accepts_mlx(tmp_path):
    mx = pytest.importorskip("mlx.core")
    audio = tone(440, 0.1)
    back, _ = read_audio(save_audio(tmp_path / "mx.wav", mx.array(audio), SR, subtype="FLOAT"))
    np.testing.assert_array_equal(back[0], audio)


# ------------------------------------------------------------ channel / rate


def test_to_channels():
    mono = tone(440, 0.1)[None]
    stereo = np.stack([mono[0], -0.5 * mono[0]])
    assert to_channels(mono, 2).shape == (2, mono.shape[1])
    np.testing.assert_array_equal(to_channels(mono, 2)[1], mono[0])
    np.testing.assert_allclose(to_channels(stereo, 1)[0], 0.25 * mono[0], atol=1e-7)
    assert to_channels(stereo, 2) is stereo
    assert to_channels(mono[0], 1).shape == (1, mono.shape[1])  # 1-D is mono
    with pytest.raises(AudioInputError):
        to_channels(np.zeros((6, 10), np.float32), 2)


@pytest.mark.parametrize("sr_in", [16000, 44100, 48000])
def test_resample_shape_and_frequency(sr_in):
    x = np.stack([tone(1000, 1.0, sr_in), tone(1500, 1.0, sr_in)])
    y = resample(x, sr_in, SR)
    assert y.dtype == np.float32 and y.shape[0] == 2
    assert abs(y.shape[1] - SR) <= 1
    assert abs(peak_hz(y[0], SR) - 1000) <= 1.5
    assert abs(peak_hz(y[1], SR) - 1500) <= 1.5
    assert resample(x[0], sr_in, SR).shape == (y.shape[1],)


def test_load_audio_input_path_and_tuple(tmp_path):
    stereo = np.stack([tone(440, 0.5, 44100), tone(880, 0.5, 44100)])
    path = save_audio(tmp_path / "in.flac", stereo, 44100)
    from_file = load_audio_input(path, SR)
    assert from_file.shape == (2, SR // 2) and from_file.dtype == np.float32
    assert load_audio_input(str(path), SR, channels=1).shape == (1, SR // 2)
    # Tuple: 1-D, [C, S], float64, int16 PCM (scaled to [-1, 1]).
    assert load_audio_input((stereo[0], 44100), SR).shape == (1, SR // 2)
    assert load_audio_input((stereo.astype(np.float64), 44100), SR, channels=2).shape == (2, SR // 2)
    pcm = (stereo[0] * 32768).astype(np.int16)
    out = load_audio_input((pcm, 44100), 44100)
    np.testing.assert_allclose(out[0], stereo[0], atol=1.0 / 32768)
    mono_as_stereo = load_audio_input((stereo[0], SR), SR, channels=2)
    np.testing.assert_array_equal(mono_as_stereo[0], mono_as_stereo[1])


def test_load_audio_input_mlx():
    mx = pytest.importorskip("mlx.core")
    x = tone(440, 0.25)
    out = load_audio_input((mx.array(x), SR), SR)
    np.testing.assert_array_equal(out[0], x)


# ----------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    with pytest.raises(AudioInputError, match="not found") as err:
        read_audio(tmp_path / "nope.wav")
    assert_one_line_naming(err, "nope.wav")
    with pytest.raises(AudioInputError) as err:
        load_audio_input(tmp_path / "nope.flac", SR)
    assert_one_line_naming(err, "nope.flac")


def test_unreadable_and_unsupported(tmp_path):
    bad = tmp_path / "garbage.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(100))
    with pytest.raises(AudioInputError, match="cannot read") as err:
        read_audio(bad)
    assert_one_line_naming(err, "garbage.wav")
    text = tmp_path / "notes.txt"
    text.write_text("not audio\nat all\n")
    with pytest.raises(AudioInputError, match="cannot read") as err:
        load_audio_input(text, SR)
    assert_one_line_naming(err, "notes.txt")
    with pytest.raises(AudioInputError) as err:
        read_audio(tmp_path)
    assert_one_line_naming(err, str(tmp_path))


def test_empty_audio(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(str(path), np.zeros((0, 1), np.float32), SR, subtype="PCM_16")
    with pytest.raises(AudioInputError, match="empty") as err:
        read_audio(path)
    assert_one_line_naming(err, "empty.wav")
    with pytest.raises(AudioInputError, match="empty") as err:
        load_audio_input((np.zeros(0, np.float32), SR), SR)
    assert_one_line_naming(err, "<waveform>")


def test_silent_audio(tmp_path):
    path = save_audio(tmp_path / "quiet.wav", np.zeros(SR // 10, np.float32), SR)
    wav, _ = read_audio(path)  # allowed unless a signal is required
    assert wav.shape == (1, SR // 10)
    with pytest.raises(AudioInputError, match="silent") as err:
        load_audio_input(path, SR, require_signal=True)
    assert_one_line_naming(err, "quiet.wav")
    with pytest.raises(AudioInputError, match="silent"):
        load_audio_input((np.zeros(100, np.float32), SR), SR, require_signal=True)


def test_bad_waveform_tuples():
    with pytest.raises(AudioInputError, match="sample rate"):
        load_audio_input((np.zeros(10, np.float32), 0), SR)
    with pytest.raises(AudioInputError, match="transpose"):
        load_audio_input((np.zeros((1000, 2), np.float32), SR), SR)
    with pytest.raises(AudioInputError, match="NaN"):
        load_audio_input((np.array([0.0, np.nan], np.float32), SR), SR)
    with pytest.raises(AudioInputError):
        load_audio_input(12345, SR)  # type: ignore[arg-type]


def test_output_errors(tmp_path):
    audio = tone(440, 0.1)
    with pytest.raises(AudioInputError, match="unsupported output extension") as err:
        save_audio(tmp_path / "out.mp3", audio, SR)
    assert_one_line_naming(err, "out.mp3")
    with pytest.raises(AudioInputError, match="does not exist") as err:
        save_audio(tmp_path / "missing_dir" / "out.wav", audio, SR)
    assert_one_line_naming(err, "out.wav")
    with pytest.raises(AudioInputError, match="does not exist") as err:
        ProgressiveWavWriter(tmp_path / "missing_dir" / "s.wav", SR, 1)
    assert_one_line_naming(err, "s.wav")
    with pytest.raises(AudioInputError, match="unsupported output extension"):
        ProgressiveWavWriter(tmp_path / "s.flac", SR, 1)
    with pytest.raises(AudioInputError, match="NaN"):
        save_audio(tmp_path / "nan.wav", np.array([np.nan], np.float32), SR)


# -------------------------------------------------------- progressive writer


@pytest.mark.parametrize("subtype, tol", [("PCM_16", PCM16_STEP), ("FLOAT", 0.0)])
@pytest.mark.parametrize("channels", [1, 2])
def test_progressive_writer_valid_after_each_chunk(tmp_path, subtype, tol, channels):
    path = tmp_path / f"stream_{subtype}_{channels}.wav"
    full = np.stack([tone(440 * (c + 1), 1.0) for c in range(channels)])
    sizes = [3200, 1, 6400, 0, 22399]  # odd and empty chunks too
    written = 0
    with ProgressiveWavWriter(path, SR, channels, subtype=subtype) as writer:
        for size in sizes:
            chunk = full[:, written : written + size]
            writer.write(chunk[0] if channels == 1 and size % 2 else chunk)  # mono may be 1-D
            written += size
            # Another reader sees a complete, consistent file after every chunk.
            info = sf.info(str(path))
            assert info.frames == written and info.channels == channels and info.samplerate == SR
            assert info.subtype == subtype
            if written:
                back, sr = read_audio(path)
                assert back.shape == (channels, written)
                assert np.max(np.abs(back - full[:, :written])) <= tol
        assert writer.frames == written and writer.duration == written / SR
    assert path.stat().st_size == (44 if subtype == "PCM_16" else 58) + written * channels * (
        2 if subtype == "PCM_16" else 4
    )


def test_progressive_writer_rejects_bad_chunks(tmp_path):
    writer = ProgressiveWavWriter(tmp_path / "s.wav", SR, 2)
    with pytest.raises(AudioInputError, match="channel"):
        writer.write(np.zeros((1, 10), np.float32))
    writer.close()
    with pytest.raises(AudioInputError, match="closed"):
        writer.write(np.zeros((2, 10), np.float32))


def test_runtime_modules_do_not_import_torch():
    code = (
        "import sys, mlx_music.runtime.audio_io, mlx_music.runtime.chroma; "
        "bad = [m for m in ('torch', 'transformers', 'torchaudio') if m in sys.modules]; "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# ------------------------------------------------------- bounded reading (issue 21)
def test_read_audio_max_seconds_is_a_prefix(tmp_path):
    audio = np.stack([tone(440, 1.0), tone(660, 1.0)])
    path = save_audio(tmp_path / "s.flac", audio, SR)
    whole, _ = read_audio(path)
    first, sr = read_audio(path, max_seconds=0.25)
    assert sr == SR and first.shape == (2, SR // 4)
    np.testing.assert_array_equal(first, whole[:, :SR // 4])
    assert read_audio(path, max_seconds=5.0)[0].shape == whole.shape  # shorter file: all of it
    with pytest.raises(ValueError, match="max_seconds"):
        read_audio(path, max_seconds=0)


def test_inputs_outside_the_limits_are_refused(tmp_path):
    from mlx_music.runtime.audio_io import decode_audio_input

    path = tmp_path / "nine.wav"
    sf.write(path, np.zeros((100, 9), np.float32) + 0.1, SR)
    with pytest.raises(AudioInputError, match="9 channels") as err:
        read_audio(path)
    assert_one_line_naming(err, "nine.wav")
    for rate in (3999, 384001):
        with pytest.raises(AudioInputError, match=f"sample rate {rate} Hz is outside the supported 4000-384000 Hz"):
            load_audio_input((tone(440, 0.1), rate), SR)
    # An in-memory waveform is cut before any conversion.
    wav, sr, source = decode_audio_input((np.arange(8000, dtype=np.int16), 8000), max_seconds=0.5)
    assert (wav.shape, sr, source) == ((1, 4000), 8000, "<waveform>")
    np.testing.assert_array_equal(wav[0], np.arange(4000) / 32768.0)
