#!/usr/bin/env bash
# Run the project's checks; `make test` calls `scripts/test.sh all`.
#
#   scripts/test.sh all        lint, then pytest on Airflow 3.3 and on Airflow 2.11
#   scripts/test.sh lint       ruff check, ruff format --check, mypy --strict (Airflow 3.3 venv)
#   scripts/test.sh af2 af3    pytest on the named lines only
#   scripts/test.sh urllib3    the sync transport's tests on the oldest urllib3 allowed (venv af2-urllib3)
#   scripts/test.sh distributed   tests/distributed on the af3-dist venv (make test-distributed passes -m distributed)
#   scripts/test.sh matrix     the rest of the supported range (docs/versions.md): the unit tests and the gate e2e
#                              tests on Airflow 3.0, 3.1 and 3.2, the unit tests on Python 3.12 and 3.13 (Airflow 3.3);
#                              steps af30 af31 af32 af3-py312 af3-py313 run one of these each (make venvs-matrix)
#
# Every step runs even when an earlier one failed; a summary closes the output and the exit code is non-zero
# when any step failed. pytest's "no tests ran" (exit code 5) counts as a failure. Extra pytest arguments
# come from PYTEST_ARGS, split as the shell splits words, so quotes group: PYTEST_ARGS="-m 'not e2e' -x".
# The venvs must exist (make venvs). Runs on Linux and macOS (bash 3.2 or newer); the whole-line time limit
# needs GNU timeout (`timeout`, or `gtimeout` from Homebrew's coreutils) and is left out without it.
set -uo pipefail

cd "$(dirname "$0")/.."
VENVS=${VENVS:-$PWD/.venvs}
PYTEST_ARGS=${PYTEST_ARGS:-}
# A hung test fails after PYTEST_TIMEOUT seconds, a whole Airflow line after PYTEST_LINE_TIMEOUT, so that a hang
# cannot eat CI's 90 minutes and the summary still gets printed.
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-300}
PYTEST_LINE_TIMEOUT=${PYTEST_LINE_TIMEOUT:-2700}
# shellcheck disable=SC2294 # eval on purpose: the quotes in PYTEST_ARGS group words, as on a command line
eval "pytest_args=($PYTEST_ARGS)" || { echo "test.sh: cannot split PYTEST_ARGS: $PYTEST_ARGS" >&2; exit 2; }
line_timeout=()
for candidate in timeout gtimeout; do
    if "$candidate" --version 2>/dev/null | grep -q GNU; then
        line_timeout=("$candidate" --foreground --kill-after=30 "$PYTEST_LINE_TIMEOUT")
        break
    fi
done
# The e2e tests the matrix runs on the other Airflow lines: the example gate DAG, and the key hygiene of a run.
MATRIX_E2E=(tests/e2e/test_prewarm_gate_e2e.py tests/reliability/test_secret_hygiene_e2e.py)
[ $# -gt 0 ] || set -- all
steps=()
for step in "$@"; do
    case $step in
        all) steps+=(lint af3 af2 urllib3) ;;
        matrix) steps+=(af30 af31 af32 af3-py312 af3-py313) ;;
        *) steps+=("$step") ;;
    esac
done
set -- "${steps[@]}"

logs=$(mktemp -d "${TMPDIR:-/tmp}/ppio-test.XXXXXX")
trap 'rm -rf "$logs"' EXIT
summary=()
failed=0
total_passed=0
total_failed=0
total_skipped=0
ran_pytest=0
started=$SECONDS

record() {  # record <ok|FAIL> <what> <detail>
    summary+=("$(printf '%-4s  %-44s %s' "$1" "$2" "$3")")
    [ "$1" = ok ] || failed=1
}

check() {  # check <label> <command...>: one lint step
    local label=$1 step_start=$SECONDS
    shift
    echo "==> $label"
    if "$@"; then
        record ok "$label" "($((SECONDS - step_start))s)"
    else
        record FAIL "$label" "($((SECONDS - step_start))s)"
    fi
}

lint() {
    local bin=$VENVS/af3/bin
    check "ruff check" "$bin/ruff" check .
    check "ruff format --check" "$bin/ruff" format --check .
    check "mypy --strict (package)" "$bin/mypy"
}

count() {  # count <word> <pytest closing line>: the number before "<word>", 0 if absent
    local n
    n=$(grep -oE "[0-9]+ $1" <<<"$2" | head -1 | cut -d' ' -f1)
    echo "${n:-0}"
}

pytest_line() {  # pytest_line <venv name> [test paths...]
    local name=$1 bin=$VENVS/$1/bin version python home log rc closing step_start=$SECONDS
    shift
    local paths=("$@")
    read -r version python < <("$bin/python" -c 'import importlib.metadata as m, platform
print(m.version("apache-airflow"), platform.python_version())' 2>/dev/null) && [ -n "$version" ] || {
        record FAIL "pytest on $name" "(no usable venv at $VENVS/$name; run make venvs or make venvs-matrix)"
        return
    }
    # A throwaway AIRFLOW_HOME so nothing lands in ~/airflow; tests that need their own make their own.
    home=$(mktemp -d "$logs/airflow-home-$name.XXXXXX")
    log=$logs/pytest-$name.log
    ran_pytest=1
    echo "==> pytest on Airflow $version, Python $python ($name)"
    [ ${#line_timeout[@]} -gt 0 ] || echo "(no GNU timeout found: PYTEST_LINE_TIMEOUT does not apply)"
    # ${a[@]+"${a[@]}"}: an empty array under set -u on bash 3.2 (macOS)
    AIRFLOW_HOME=$home AIRFLOW__CORE__LOAD_EXAMPLES=False \
        ${line_timeout[@]+"${line_timeout[@]}"} \
        "$bin/python" -m pytest -ra -p no:cacheprovider --durations=25 --timeout="$PYTEST_TIMEOUT" \
        ${pytest_args[@]+"${pytest_args[@]}"} ${paths[@]+"${paths[@]}"} 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    closing=$(grep -E '^=+ .* in [0-9.]+s' "$log" | tail -1 | sed -E 's/^=+ //; s/ =+$//')
    total_passed=$((total_passed + $(count passed "$closing")))
    total_failed=$((total_failed + $(count failed "$closing") + $(count error "$closing")))
    total_skipped=$((total_skipped + $(count skipped "$closing")))
    local label="Airflow $version, Python $python ($name)" wall="($((SECONDS - step_start))s wall)"
    case $rc in
        0) record ok "$label" "$closing $wall" ;;
        5) record FAIL "$label" "no tests ran (pytest exit code 5): ${closing:-nothing collected} $wall" ;;
        124 | 137) record FAIL "$label" "stopped after ${PYTEST_LINE_TIMEOUT}s (PYTEST_LINE_TIMEOUT): ${closing:-no summary} $wall" ;;
        *) record FAIL "$label" "exit code $rc: ${closing:-no summary line} $wall" ;;
    esac
}

for step in "$@"; do
    case $step in
        lint) lint ;;
        af2 | af3) pytest_line "$step" ;;
        urllib3) pytest_line af2-urllib3 tests/unit/test_hook.py tests/unit/test_sensor.py tests/unit/test_transport_config.py ;;
        distributed) pytest_line af3-dist tests/distributed ;;
        af30 | af31 | af32) pytest_line "$step" tests/unit "${MATRIX_E2E[@]}" ;;
        af3-py312 | af3-py313) pytest_line "$step" tests/unit ;;
        *) echo "test.sh: unknown step '$step' (expected all, lint, af2, af3, urllib3, distributed, matrix, af30, af31," \
               "af32, af3-py312 or af3-py313)" >&2; exit 2 ;;
    esac
done

echo
echo "==================== summary ($((SECONDS - started))s) ===================="
printf '%s\n' "${summary[@]}"
# One plain closing line over the Airflow lines that ran.
if [ $ran_pytest -eq 1 ]; then
    echo "total: $total_passed passed, $total_failed failed, $total_skipped skipped"
fi
if [ $failed -ne 0 ]; then
    echo "RESULT: FAILED"
    exit 1
fi
echo "RESULT: OK"
