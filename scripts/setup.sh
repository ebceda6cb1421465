#!/usr/bin/env bash
# Set up a clone for development and the test suite (README "Set up"; .ci/run runs it too):
#   1. a Chrome/Chromium for the page test (tests/test_server_browser.py): found by
#      scripts/browser.py; on Debian/Ubuntu installed with apt-get when running as root (or with
#      passwordless sudo); elsewhere one line says how to get one;
#   2. the package with every extra: python -m pip install -e ".[dev]".
# PYTHON picks the interpreter (default: python, else python3). Safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3 || true)}"
if [ -z "$PYTHON" ]; then
    echo "setup: no python found; install Python >= 3.11 first" >&2
    exit 1
fi

system="$(uname -s)"
find_browser() { "$PYTHON" scripts/browser.py --system "$system" 2>/dev/null; }
hint() { "$PYTHON" scripts/browser.py --system "$system" 2>&1 >/dev/null; }

if browser="$(find_browser)"; then
    echo "setup: browser for the page test: $browser"
elif [ "$system" = "Linux" ] && command -v apt-get >/dev/null 2>&1; then
    can_root=""
    if [ "$(id -u)" = "0" ]; then
        can_root="yes"; SUDO=""
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        can_root="yes"; SUDO="sudo -n"
    fi
    if [ -n "$can_root" ]; then
        echo "setup: installing chromium with apt-get (for the page test)"
        $SUDO apt-get update -q
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
        if browser="$(find_browser)"; then
            echo "setup: browser for the page test: $browser"
        else  # e.g. Ubuntu's chromium package is a snap, which containers cannot run
            echo "setup: apt-get ran, but still $(hint)" >&2
        fi
    else
        echo "setup: cannot install chromium (not root, no passwordless sudo): run \`sudo apt-get install chromium\`, then this script again" >&2
    fi
else
    echo "setup: $(hint)" >&2
fi

"$PYTHON" -m pip install -e ".[dev]"
