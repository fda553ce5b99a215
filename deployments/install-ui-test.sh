#!/bin/sh
# What the headless-browser UI test (tests/prefect/test_prefect_server.py) needs, and nothing else:
# Debian's chromium (the system browser) and the Python playwright package that drives it.
# Never `playwright install`: it would download a browser from outside; we use /usr/bin/chromium.
# Root for apt; re-running is cheap.
set -eu
VENV="${VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv}"
if ! command -v chromium >/dev/null 2>&1; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "install-ui-test: no venv at $VENV; run scripts/setup.sh (it creates the venv first)" >&2
    exit 1
fi
"$VENV/bin/python" -m pip install --quiet 'playwright>=1.45'
chromium --version
"$VENV/bin/python" -c "import playwright; print('playwright', __import__('importlib.metadata').metadata.version('playwright'))"
