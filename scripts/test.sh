#!/usr/bin/env bash
# The whole test suite: set up, then pytest (lab tests run for real as root).
# With no arguments the tests run in three pytest processes side by side (below), so the suite takes
# about as long as its longest part instead of their sum. Arguments are passed to one pytest, as they are.
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
# Three pytest processes side by side: the lab's tests, which spend most of their time waiting on
# guests, migrations and reboots; the tests that start Prefect servers, workers and a browser in
# processes of their own (tests/prefect and the cancellation tests), which mostly wait on those; and
# everything else, which runs on the test process's own Prefect server and is busy. One process for
# both of the last two left a third of the machine idle and took ~28 minutes alone.
SERVED=(tests/prefect tests/flows/test_cancel_runs.py)
IGNORED=(--ignore=tests/lab)
for path in "${SERVED[@]}"; do IGNORED+=("--ignore=$path"); done
lab_log=$(mktemp /tmp/hostmaint-labtests.XXXXXX.log)
served_log=$(mktemp /tmp/hostmaint-servedtests.XXXXXX.log)
"${PYTEST[@]}" tests/lab >"$lab_log" 2>&1 &
lab_pid=$!
"${PYTEST[@]}" "${SERVED[@]}" >"$served_log" 2>&1 &
served_pid=$!
"${PYTEST[@]}" "${IGNORED[@]}" tests
rest_rc=$?
wait "$served_pid"
served_rc=$?
wait "$lab_pid"
lab_rc=$?
echo "---- ${SERVED[*]} (run beside the rest) ----"
cat "$served_log"
echo "---- tests/lab (run beside the rest) ----"
cat "$lab_log"
rm -f "$lab_log" "$served_log"
echo "tests/lab: exit $lab_rc; ${SERVED[*]}: exit $served_rc; the rest: exit $rest_rc"
[ "$rest_rc" -eq 0 ] && [ "$served_rc" -eq 0 ] && [ "$lab_rc" -eq 0 ]
