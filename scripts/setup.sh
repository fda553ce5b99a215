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
# Our own modules' bytecode, as a non-editable pip install writes it: a shell that sets
# PYTHONDONTWRITEBYTECODE (this machine's does) otherwise compiles every module again on each
# `hostmaint` command (~40 ms of `plan drain`'s start). Up-to-date files are skipped.
.venv/bin/python -m compileall -q hostmaint flows tasks >/dev/null

# The UI test's browser comes after the venv: its installer uses the venv's pip (a clean clone has none before).
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null \
    && [ "${HOSTMAINT_UI_TESTS:-1}" = "1" ] && [ -f deployments/install-ui-test.sh ]; then
    bash deployments/install-ui-test.sh
fi
