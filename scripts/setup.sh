#!/usr/bin/env bash
# Set up a checkout: system packages (as root, Debian), a venv in .venv, hostmaint installed editable.
# Idempotent and quick the second time. Sourced or run by run-main.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    bash scripts/install-system.sh
else
    echo "setup: not root (or no apt): skipping system packages; the lab and its tests need root" >&2
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.hostmaint-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev,ui,postgres]'
    touch "$stamp"
fi

# The UI test's browser comes after the venv: its installer uses the venv's pip (a clean clone has none before).
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null \
    && [ "${HOSTMAINT_UI_TESTS:-1}" = "1" ] && [ -f deployments/install-ui-test.sh ]; then
    bash deployments/install-ui-test.sh
fi
