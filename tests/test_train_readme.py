"""The README's Fine-tuning commands run verbatim, offline, in a fresh folder, on the shipped tiny model."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import soundfile as sf

from test_readme import ROOT, _blocks


def test_fine_tuning_commands_run_verbatim(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "data").symlink_to(ROOT / "tests" / "data")
    (tmp_path / "tests" / "make_tone_dataset.py").symlink_to(ROOT / "tests" / "make_tone_dataset.py")
    commands = [line for line in _blocks("bash", "## Fine-tuning")[0].splitlines()
                if line.strip() and not line.startswith("#")]
    assert [c.split()[1] for c in commands] == ["convert", "tests/make_tone_dataset.py", "train", "generate", "convert"]
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "mlx-music":
            argv = [sys.executable, "-m", "mlx_music.cli", *argv[1:]]
        else:
            argv = [sys.executable, *argv[1:]]
        r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{command}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    rows = [json.loads(x) for x in (tmp_path / "out/tones-lora/metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert (tmp_path / "out/tones-lora/peft/adapter_model.safetensors").is_file()
    data, sr = sf.read(tmp_path / "tone.wav", always_2d=True)
    assert sr == 32000 and data.shape == (2 * 32000, 2)
    assert (tmp_path / "out/tiny-stereo-tones/conversion.json").is_file()
