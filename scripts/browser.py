#!/usr/bin/env python3
"""Find the Chrome / Chromium that tests/test_server_browser.py drives (through Playwright, never
`playwright install`), for scripts/setup.sh and tests/conftest.py. Standard library only: it runs
before the package is installed.

Order: $MLX_MUSIC_BROWSER (must be an executable), then chromium / chrome on PATH, then the macOS
application bundles. `python3 scripts/browser.py [--system "$(uname -s)"]` prints the path and
exits 0, or prints how to install a browser (one line, on stderr) and exits 1.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path

ENV = "MLX_MUSIC_BROWSER"
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
MAC_APPS = ("Google Chrome.app/Contents/MacOS/Google Chrome", "Chromium.app/Contents/MacOS/Chromium")


def _executable(path: str | Path) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_browser(system: str | None = None) -> str | None:
    """The browser's executable path, or None when there is none. system: `uname -s` (default:
    this one's)."""
    given = os.environ.get(ENV)
    if given:
        return given if _executable(given) else None
    for name in NAMES:
        found = shutil.which(name)
        if found:
            return found
    if (system or platform.system()) == "Darwin":
        for root in (Path("/Applications"), Path.home() / "Applications"):
            for app in MAC_APPS:
                if _executable(root / app):
                    return str(root / app)
    return None


def install_hint(system: str | None = None) -> str:
    """One line: how to get a browser on `system` (`uname -s`; default: this one)."""
    if os.environ.get(ENV):
        return f"{ENV}={os.environ[ENV]} is not an executable file; point it at Chrome or Chromium"
    if (system or platform.system()) == "Darwin":
        how = "install Google Chrome (https://www.google.com/chrome/) or `brew install --cask chromium`"
    else:
        how = "install chromium (Debian/Ubuntu: `sudo apt-get install chromium`, or run scripts/setup.sh as root)"
    return f"no Chrome/Chromium found for the browser test: {how}, or set {ENV}=/path/to/chrome"


if __name__ == "__main__":
    system = sys.argv[sys.argv.index("--system") + 1] if "--system" in sys.argv else None
    path = find_browser(system)
    if path is None:
        print(install_hint(system), file=sys.stderr)
        sys.exit(1)
    print(path)
