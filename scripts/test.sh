#!/usr/bin/env bash
# The whole test suite: set up, then pytest (lab tests run for real as root).
# With no arguments the lab tests and the rest run side by side (two pytest processes): the lab's
# tests spend most of their time waiting on guests, migrations and reboots, so the suite takes about
# as long as its longer half instead of their sum. Arguments are passed to one pytest, as they are.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
export PREFECT_SERVER_ANALYTICS_ENABLED=false
.venv/bin/ruff check . || exit 1
.venv/bin/mypy hostmaint flows tasks || exit 1
PYTEST=(.venv/bin/python -m pytest -q -p no:cacheprovider -o console_output_style=classic)
if [ $# -gt 0 ]; then
    "${PYTEST[@]}" "$@"
    exit $?  # pytest's 5 ("no tests ran") is a failure of the suite, not a pass
fi
lab_log=$(mktemp /tmp/hostmaint-labtests.XXXXXX.log)
"${PYTEST[@]}" tests/lab >"$lab_log" 2>&1 &
lab_pid=$!
"${PYTEST[@]}" --ignore=tests/lab tests
rest_rc=$?
wait "$lab_pid"
lab_rc=$?
echo "---- tests/lab (run beside the rest) ----"
cat "$lab_log"
rm -f "$lab_log"
echo "tests/lab: exit $lab_rc; the rest: exit $rest_rc"
[ "$rest_rc" -eq 0 ] && [ "$lab_rc" -eq 0 ]
