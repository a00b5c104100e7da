#!/usr/bin/env bash
# Write requirements/constraints-airflow-<line>.txt for an Airflow line by resolving as of the day after its
# release (uv's --exclude-newer): Airflow, the test dependencies and the project's own, as they were then. This is
# how the 3.0, 3.1 and 3.2 constraints were made; those of 2.11 and 3.3 are freezes of working venvs.
#
#   scripts/resolve_constraints.sh 3.0 3.0.6 2025-08-30
#
# Exempt from the date: packages the project needs newer than some lines (common-compat >= 1.23) and the test
# tools (the suite uses their current features). Needs the tools venv (any scripts/bootstrap.sh run makes it).
set -euo pipefail

cd "$(dirname "$0")/.."
line=${1:?usage: scripts/resolve_constraints.sh LINE VERSION DATE}
version=${2:?usage: scripts/resolve_constraints.sh LINE VERSION DATE}
date=${3:?usage: scripts/resolve_constraints.sh LINE VERSION DATE}
VENVS=${VENVS:-$PWD/.venvs}
PYTHON=${PYTHON:-python3}
out=requirements/constraints-airflow-$line.txt
today=$(date -u +%F)

exempt=()
for package in apache-airflow-providers-common-compat pytest pytest-asyncio pytest-timeout hypothesis requests-mock; do
    exempt+=(--exclude-newer-package "$package=$today")
done
resolved=$(mktemp)
trap 'rm -f "$resolved"' EXIT
"$VENVS/tools/bin/uv" pip compile --quiet --no-header --no-annotate --python "$PYTHON" \
    --exclude-newer "$date" "${exempt[@]}" --extra emulator \
    <(echo "apache-airflow==$version") requirements/test.txt pyproject.toml -o "$resolved"
{
    echo "# Versions known to work together on Airflow $line (resolved as of $date, the day after Airflow $version" \
        "came out, by scripts/resolve_constraints.sh; constraints only)."
    grep -E '^[A-Za-z0-9]' "$resolved"
} >"$out"
echo "wrote $out ($(grep -c '==' "$out") pins)"
