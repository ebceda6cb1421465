"""The README's quickstart commands and Python examples run verbatim, offline, in a fresh folder."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str, after: str) -> list[str]:
    """Code blocks of `lang` in the README section whose heading starts with `after`."""
    section = README[README.index(after):]
    section = section[:section.find("\n## ", 3)] if "\n## " in section[3:] else section
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def test_quickstart_and_python_examples_run_verbatim(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "data").symlink_to(ROOT / "tests" / "data")
    commands = [line for line in _blocks("bash", "## Quickstart")[0].splitlines()
                if line.strip() and not line.startswith("#")]
    assert [c.split()[1] for c in commands] == ["convert", "generate", "parity"]
    for command in commands:
        argv = shlex.split(command.split("  #")[0])
        r = subprocess.run([sys.executable, "-m", "mlx_music.cli", *argv[1:]], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{command}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    data, sr = sf.read(tmp_path / "song.wav", always_2d=True)
    assert sr == 32000 and data.shape == (10 * 32000, 2)
    python = _blocks("python", "## Quickstart")
    assert len(python) >= 2
    code = "\n".join(python)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    data, sr = sf.read(tmp_path / "song-py.wav", always_2d=True)
    assert sr == 32000 and data.shape == (4 * 32000, 2)
    # The Seeds paragraph's read-back works on the CLI's file (the Python example writes its own).
    tag = json.loads(sf.SoundFile(tmp_path / "song.wav").comment)
    assert tag["prompt"] == "80s pop with synths" and tag["duration"] == 10 and isinstance(tag["seed"], int)
