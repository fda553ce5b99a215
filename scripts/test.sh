#!/usr/bin/env bash
# The whole test suite: set up, then pytest (lab tests run for real as root).
# With no arguments the suite runs as four pytest processes side by side: the lab's tests in two halves,
# each on a lab of its own (HOSTMAINT_LAB_NET 0 and 2: own names, subnets and work directories), the
# flow tests (tests/flows), and the rest (tests/prefect, tests/unit). Lab tests spend most of their
# time waiting on guests, migrations and reboots, flow and Prefect tests on their servers, workers and
# simulated hosts: the suite takes about as long as its longest part instead of their sum.
# Arguments are passed to one pytest, as they are.
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
# the second lab half: about half the lab's time (their durations on an idle machine, 2026-12-07);
# a new lab module runs in the first
LAB_SECOND=(tests/lab/test_lab.py tests/lab/test_lab_reboot_faults.py tests/lab/test_lab_cancel.py
            tests/lab/test_lab_side_by_side.py tests/lab/test_lab_truth.py)
started=$(date +%s)
names=("tests/lab (first half, lab net 0)" "tests/lab (second half, lab net 2)" "tests/flows")
logs=()
pids=()
for i in 0 1 2; do
    logs+=("$(mktemp /tmp/hostmaint-tests-$i.XXXXXX.log)")
done
HOSTMAINT_LAB_NET=0 "${PYTEST[@]}" tests/lab "${LAB_SECOND[@]/#/--ignore=}" >"${logs[0]}" 2>&1 &
pids+=($!)
HOSTMAINT_LAB_NET=2 "${PYTEST[@]}" "${LAB_SECOND[@]}" >"${logs[1]}" 2>&1 &
pids+=($!)
"${PYTEST[@]}" tests/flows >"${logs[2]}" 2>&1 &
pids+=($!)
"${PYTEST[@]}" tests/prefect tests/unit
rcs=($?)
summary="tests/prefect and tests/unit: exit ${rcs[0]}"
for i in 0 1 2; do
    wait "${pids[$i]}"
    rc=$?
    rcs+=("$rc")
    echo "---- ${names[$i]} (run beside the rest) ----"
    cat "${logs[$i]}"
    rm -f "${logs[$i]}"
    summary+="; ${names[$i]}: exit $rc"
done
echo "$summary; $(($(date +%s) - started)) s in all"
for rc in "${rcs[@]}"; do
    [ "$rc" -eq 0 ] || exit 1
done
