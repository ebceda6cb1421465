"""scripts/setup.sh (the README's first set-up command) and scripts/browser.py, run against stub
system commands (apt-get, id, uname, sudo and pip only log what they were asked), so every branch
runs here without installing anything; and .ci/run runs exactly the README's two commands."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "scripts" / "setup.sh"


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!{shutil.which('bash')}\n{body}\n")
    path.chmod(0o755)


@pytest.fixture
def sandbox(tmp_path):
    """A PATH of stubs: `run(os, uid, sudo=False, browser=False, apt_gives_browser=True)` runs
    setup.sh and returns (exit code, log of stub calls, stdout, stderr)."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in ("bash", "env", "dirname", "chmod", "cat"):
        (bin_ / tool).symlink_to(shutil.which(tool))
    log = tmp_path / "calls.log"
    _stub(bin_, "uname", 'echo "$FAKE_OS"')
    _stub(bin_, "id", 'echo "$FAKE_UID"')
    _stub(bin_, "apt-get", f'echo "apt-get $*" >> {log}\n'
                           f'if [ "$1" = install ] && [ -n "$APT_GIVES_BROWSER" ]; then\n'
                           f'  printf "#!/bin/sh\\n" > {bin_}/chromium; chmod +x {bin_}/chromium\nfi')
    _stub(bin_, "python", f'if [ "$1" = -m ] && [ "$2" = pip ]; then echo "pip $*" >> {log}; exit "${{PIP_RC:-0}}"; fi\n'
                          f'exec {sys.executable} "$@"')

    def run(system: str, uid: int, *, sudo: bool = False, browser: bool = False, apt_gives_browser: bool = True,
            pip_rc: int = 0):
        if sudo:
            _stub(bin_, "sudo", f'echo "sudo $*" >> {log}\nif [ "$1" = -n ]; then shift; fi\n"$@"')
        if browser:
            _stub(bin_, "google-chrome", "exit 0")
        log.unlink(missing_ok=True)
        env = {"PATH": str(bin_), "HOME": str(tmp_path), "FAKE_OS": system, "FAKE_UID": str(uid),
               "APT_GIVES_BROWSER": "1" if apt_gives_browser else "", "PIP_RC": str(pip_rc)}
        r = subprocess.run([str(bin_ / "bash"), str(SETUP)], env=env, capture_output=True, text=True, timeout=120,
                           cwd=tmp_path)
        calls = log.read_text().splitlines() if log.exists() else []
        return r.returncode, calls, r.stdout, r.stderr

    run.bin = bin_
    return run


def test_debian_root_installs_chromium_then_the_package(sandbox):
    rc, calls, out, err = sandbox("Linux", 0)
    assert rc == 0, err
    assert calls == ["apt-get update -q", "apt-get install -y -q chromium", "pip -m pip install -e .[dev]"]
    assert f"setup: browser for the page test: {sandbox.bin / 'chromium'}" in out


def test_passwordless_sudo_is_used_when_not_root(sandbox):
    rc, calls, out, err = sandbox("Linux", 1000, sudo=True)
    assert rc == 0, err
    assert calls == ["sudo -n true", "sudo -n apt-get update -q", "apt-get update -q",
                     "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium",
                     "apt-get install -y -q chromium", "pip -m pip install -e .[dev]"]


def test_cannot_install_says_how_in_one_line_and_still_installs_the_package(sandbox):
    rc, calls, out, err = sandbox("Linux", 1000)
    assert rc == 0 and calls == ["pip -m pip install -e .[dev]"]
    assert err == ("setup: cannot install chromium (not root, no passwordless sudo): run "
                   "`sudo apt-get install chromium`, then this script again\n")
    # apt-get ran but gave no usable browser (Ubuntu's snap): said, not hidden.
    rc, calls, out, err = sandbox("Linux", 0, apt_gives_browser=False)
    assert rc == 0 and calls[-1] == "pip -m pip install -e .[dev]"
    assert err.startswith("setup: apt-get ran, but still no Chrome/Chromium found") and err.count("\n") == 1


def test_macos_and_present_browser(sandbox):
    rc, calls, out, err = sandbox("Darwin", 501)
    assert rc == 0 and calls == ["pip -m pip install -e .[dev]"]
    assert err.count("\n") == 1 and "brew install --cask chromium" in err and "Google Chrome" in err
    rc, calls, out, err = sandbox("Linux", 0, browser=True)  # found: nothing installed
    assert rc == 0 and calls == ["pip -m pip install -e .[dev]"]
    assert f"setup: browser for the page test: {sandbox.bin / 'google-chrome'}" in out


def test_a_failing_pip_fails_the_script(sandbox):
    rc, calls, out, err = sandbox("Linux", 0, browser=True, pip_rc=3)
    assert rc == 3 and calls == ["pip -m pip install -e .[dev]"]


def test_browser_finder(tmp_path):
    finder = [sys.executable, str(ROOT / "scripts" / "browser.py")]
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}
    r = subprocess.run(finder + ["--system", "Linux"], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1
    assert "apt-get install chromium" in r.stderr and "MLX_MUSIC_BROWSER" in r.stderr
    chrome = tmp_path / "Applications" / "Google Chrome.app" / "Contents" / "MacOS" / "Google Chrome"
    chrome.parent.mkdir(parents=True)
    chrome.write_text("#!/bin/sh\n")
    chrome.chmod(0o755)
    r = subprocess.run(finder + ["--system", "Darwin"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == f"{chrome}\n"
    r = subprocess.run(finder, env={**env, "MLX_MUSIC_BROWSER": str(tmp_path / "nope")}, capture_output=True, text=True)
    assert r.returncode == 1 and "MLX_MUSIC_BROWSER" in r.stderr and "not an executable" in r.stderr


def test_ci_runs_exactly_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up\n.*?```bash\n(.*?)```", readme, flags=re.S).group(1)
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["scripts/setup.sh", "python -m pytest -q"]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == commands
    assert os.access(SETUP, os.X_OK) and os.access(ROOT / ".ci" / "run", os.X_OK)
