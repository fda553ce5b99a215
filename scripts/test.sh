#!/usr/bin/env bash
# The whole test suite: set up, then pytest (lab tests run for real as root).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
export PREFECT_SERVER_ANALYTICS_ENABLED=false
.venv/bin/ruff check . || exit 1
.venv/bin/mypy hostmaint flows tasks || exit 1
.venv/bin/python -m pytest -q -p no:cacheprovider -o console_output_style=classic "$@"
rc=$?
# pytest's 5 means "no tests ran": that is a failure of the suite, not a pass.
exit $rc
