"""Issue 22 item 6, smaller faults: the progress bars count integer frames (no clamping warning,
no negative ETA for `generate --duration 2` or 3), and a multi-channel audio prompt that cannot be
mixed for the model is refused naming the parameter (API) or the option (CLI)."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import soundfile as sf

from mlx_music.runtime.audio_io import AudioInputError
from generation_helpers import run_cli as cli


@pytest.mark.parametrize("duration", ["2", "3"])
def test_generate_progress_bar_ends_exactly_at_its_total(tmp_path, model, duration):
    r = cli("generate", "--model", str(model), "--prompt", "x", "--duration", duration, "--seed", "1",
            "--out", str(tmp_path / "a.wav"))
    assert r.exit_code == 0, r.stderr
    assert "clamping" not in r.stderr and "warning" not in r.stderr, r.stderr
    assert not re.search(r"<-|-\d+:\d+", r.stderr), r.stderr  # no negative time left
    last = r.stderr.replace("\r", "\n").strip().splitlines()
    bar = [line for line in last if "s of audio" in line][-1]
    assert f"{float(duration):.2f}/{float(duration):.2f} s of audio" in bar and "100%" in bar, bar


def test_batch_progress_bar_ends_exactly_at_its_total(tmp_path, pipe, model, capsys):
    """Durations whose float sum is not exact (0.1 + 0.2 + 0.34 + 0.02 s) still end at 100%."""
    import json

    from mlx_music.runtime.batch_job import run_batch

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": "x", "duration": d, "seed": i}) + "\n"
                               for i, d in enumerate((0.1, 0.2, 0.34, 0.02))))
    s = run_batch(prompts, pipe, tmp_path / "out", batch_size=3, progress=True, model_name=str(model))
    assert s.ok == 4
    err = capsys.readouterr().err
    assert "clamping" not in err and not re.search(r"<-|-\d+:\d+", err), err
    bar = [line for line in err.replace("\r", "\n").splitlines() if "s of audio" in line][-1]
    assert "0.66/0.66 s of audio" in bar and "100%" in bar, bar


def test_a_six_channel_prompt_for_a_stereo_model_names_the_parameter(tmp_path, pipe, model):
    six = (0.1 * np.random.default_rng(0).standard_normal((6, 16000))).astype(np.float32)
    with pytest.raises(AudioInputError, match=r"^audio_prompt <waveform>: cannot convert 6 channels to 2"):
        pipe.generate("x", 1.0, audio_prompt=(six, 32000))
    sf.write(tmp_path / "six.wav", six.T, 32000)
    with pytest.raises(AudioInputError, match=r"^audio_prompt .*six\.wav: cannot convert 6 channels to 2"):
        pipe.generate("x", 1.0, audio_prompt=str(tmp_path / "six.wav"))
    r = cli("generate", "--model", str(model), "--prompt", "x", "--duration", "1", "--seed", "1", "--quiet",
            "--continue-from", str(tmp_path / "six.wav"), "--out", str(tmp_path / "a.wav"))
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [
        f"error: --continue-from {tmp_path / 'six.wav'}: cannot convert 6 channels to 2 (give mono or 2-channel "
        "audio; no downmix of more channels is defined)"], r.stderr


# ------------------------------------------------------------- the same kind: training metadata
def test_training_metadata_keeps_line_separators_inside_captions(tmp_path):
    """An audiofolder's metadata.jsonl / metadata.csv: a caption holding U+2028 / U+0085 (or a
    quoted line break, in CSV) is one row, as in batch prompts files (runtime/records.py)."""
    from mlx_music.train.data import _read_rows

    caption = "rain\u2028on a roof\u0085at night\x1c"
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.wav", "text": caption}, ensure_ascii=False) + "\r\n\n"
        + json.dumps({"file_name": "b.wav", "text": "two"}) + "\n", encoding="utf-8")
    _, rows = _read_rows(tmp_path / "j")
    assert rows == [{"file_name": "a.wav", "text": caption}, {"file_name": "b.wav", "text": "two"}]
    (tmp_path / "c").mkdir()
    with open(tmp_path / "c" / "metadata.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerows([["file_name", "text"], ["a.wav", caption], ["b.wav", "two\nlines\r\nhere"]])
    _, rows = _read_rows(tmp_path / "c")
    assert rows == [{"file_name": "a.wav", "text": caption}, {"file_name": "b.wav", "text": "two\nlines\r\nhere"}]


def test_training_metrics_with_a_torn_last_line_still_resume(tmp_path):
    """The same kind as a batch manifest left torn by a kill: metrics.jsonl's last line cut
    mid-write must not stop `train --resume` (it rewrites the metrics up to the checkpoint)."""
    from mlx_music.train.run import _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n{"step": 3, "loss": 2.0}\n{"step": 4, "lo')
    _truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n'


def test_a_six_channel_training_file_names_the_file(tmp_path):
    """The same kind as the audio prompt: a training file that cannot be mixed to the model's
    channels is named in the error (not ``<waveform>``)."""
    from types import SimpleNamespace

    from mlx_music.train.data import DataError, DataSettings, _encode_file

    six = (0.1 * np.random.default_rng(1).standard_normal((32000, 6))).astype(np.float32)
    sf.write(tmp_path / "six.wav", six, 32000)
    with pytest.raises(DataError) as info:
        _encode_file(tmp_path / "six.wav", SimpleNamespace(sample_rate=32000, audio_channels=2), DataSettings())
    assert str(info.value) == (f"{tmp_path / 'six.wav'}: cannot convert 6 channels to 2 (give mono or 2-channel "
                               "audio; no downmix of more channels is defined)")


def test_convert_all_redoes_an_output_whose_local_source_changed(tmp_path, hf_folder):
    """The same kind as batch resume comparing paths: `convert-all --hf-root` skipped an output
    whenever the recorded source *path* matched, even after the source's weights were replaced."""
    import os
    import shutil

    import mlx.core as mx
    from safetensors.numpy import load_file, save_file

    from mlx_music.converters import convert_all as ca

    root = tmp_path / "hf"
    src = root / "musicgen-small"
    shutil.copytree(hf_folder("mono"), src)
    out = tmp_path / "out"
    first = ca.convert_all(out, ["musicgen-small"], hf_root=root, check_variant=False)
    assert [r.status for r in first] == ["converted"]
    again = ca.convert_all(out, ["musicgen-small"], hf_root=root, check_variant=False)
    assert [r.status for r in again] == ["skipped"]
    weights = load_file(str(src / "model.safetensors"))
    key = next(k for k in weights if k.endswith("lm_heads.0.weight"))
    weights[key] = weights[key] * 2  # a new fine-tune at the same path
    save_file(weights, str(src / "model.safetensors"))
    later = os.stat(out / "musicgen-small" / "conversion.json").st_mtime + 5
    os.utime(src / "model.safetensors", (later, later))  # written after the conversion
    redo = ca.convert_all(out, ["musicgen-small"], hf_root=root, check_variant=False)
    assert [r.status for r in redo] == ["converted"], redo[0].message
    got = {k: v for f in (out / "musicgen-small").glob("*.safetensors") for k, v in mx.load(str(f)).items()}
    head = next(k for k in got if k.endswith("lm_heads.0.weight"))
    np.testing.assert_allclose(np.array(got[head]), weights[key], rtol=1e-6)
