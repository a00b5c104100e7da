#!/usr/bin/env bash
# Install what the browser check of tests/deployment needs: Debian's chromium and Playwright (PyPI).
#
# Usage: scripts/install_browser.sh [PYTHON]   (PYTHON defaults to .venvs/af3/bin/python)
#
# Playwright is only the driver here: the tests launch /usr/bin/chromium through executable_path, so
# `playwright install` (which downloads a browser build of its own) is never run.
# Needs root for apt-get (CI and the dev machines run as root). Idempotent: skips what is already there.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${1:-.venvs/af3/bin/python}"
UV="${UV:-.venvs/tools/bin/uv}"

if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" != "0" ]; then
        echo "install_browser: chromium is missing and this is not root; the browser check will be skipped" >&2
    else
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        # fonts-liberation: readable text in screenshots; chromium pulls the rest of its libraries itself.
        apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
    fi
fi

if ! "$PYTHON" -c "import playwright" >/dev/null 2>&1; then
    if [ -x "$UV" ]; then
        "$UV" pip install --quiet --python "$PYTHON" "playwright>=1.45"
    else
        "$PYTHON" -m pip install --quiet "playwright>=1.45"
    fi
fi

command -v chromium >/dev/null 2>&1 && chromium --version || true
"$PYTHON" -c "import importlib.metadata as m; print('playwright', m.version('playwright'))"
