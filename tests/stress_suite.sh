#!/usr/bin/env bash
# Proof that the test suite does not depend on timing: runs the whole suite RUNS times in a row,
# each in a different random order (pytest-randomly seed), while BURNERS CPU-burning processes
# compete for the cores.
#
#   bash tests/stress_suite.sh [RUNS] [BURNERS]      (defaults: 5 runs, 2 burners)
#
# Uses the python on PATH (an activated virtualenv), else .venv/bin/python. Each run's output is
# kept in a temporary folder (named at the end). The last line is "N runs: X passed, Y failed";
# the exit code is non-zero if any run failed. Extra pytest arguments: PYTEST_ARGS="...".
set -uo pipefail

RUNS=${1:-5}
BURNERS=${2:-2}
case "$RUNS$BURNERS" in *[!0-9]*|"") echo "usage: bash tests/stress_suite.sh [RUNS] [BURNERS]" >&2; exit 2;; esac

cd "$(dirname "$0")/.."
if command -v python >/dev/null 2>&1; then
    PY=python
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    echo "stress_suite: no python on PATH and no .venv/bin/python" >&2
    exit 2
fi

LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/stress_suite.XXXXXX")
BURNER_PIDS=()

stop_burners() {
    for pid in "${BURNER_PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${BURNER_PIDS[@]}"; do
        wait "$pid" 2>/dev/null
    done
    BURNER_PIDS=()
}
trap stop_burners EXIT
trap 'stop_burners; exit 130' INT TERM HUP

for _ in $(seq 1 "$BURNERS"); do
    "$PY" -c 'while True: pass' &
    BURNER_PIDS+=($!)
done

echo "stress_suite: $RUNS run(s) of the suite with $BURNERS CPU burner(s) (pids ${BURNER_PIDS[*]:-none});" \
     "$("$PY" --version 2>&1); logs in $LOG_DIR"

passed=0
failed=0
started=$SECONDS
for run in $(seq 1 "$RUNS"); do
    seed=$(( (RANDOM << 15 | RANDOM) + run ))
    log="$LOG_DIR/run$run-seed$seed.log"
    run_started=$SECONDS
    # shellcheck disable=SC2086 # PYTEST_ARGS is split on purpose
    "$PY" -m pytest -q -p randomly --randomly-seed="$seed" ${PYTEST_ARGS:-} >"$log" 2>&1
    code=$?
    summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error)' "$log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
    if [ "$code" -eq 0 ]; then
        passed=$((passed + 1))
        echo "run $run (seed $seed): PASSED in $((SECONDS - run_started)) s — $summary"
    else
        failed=$((failed + 1))
        echo "run $run (seed $seed): FAILED (exit $code) in $((SECONDS - run_started)) s — $summary"
        grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/    /'
        echo "    repeat this order: $PY -m pytest -q -p randomly --randomly-seed=$seed ${PYTEST_ARGS:-}  (log: $log)"
    fi
done
stop_burners

echo "total time $((SECONDS - started)) s; logs in $LOG_DIR"
echo "$RUNS runs: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
