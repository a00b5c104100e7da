#!/usr/bin/env bash
# Create or refresh one of the project's virtualenvs from nothing but python3.
#
#   scripts/bootstrap.sh af3     # Airflow 3.3 + test deps + lint tools (ruff, mypy, schemathesis)
#   scripts/bootstrap.sh af2     # Airflow 2.11 + test deps
#   scripts/bootstrap.sh af2-urllib3   # the same with the oldest urllib3 the package allows (1.26)
#   scripts/bootstrap.sh af30 | af31 | af32   # Airflow 3.0 / 3.1 / 3.2 + test deps (make test-matrix)
#   scripts/bootstrap.sh af3-py312 | af3-py313   # Airflow 3.3 + test deps on Python 3.12 / 3.13
#   scripts/bootstrap.sh docs    # the docs site's tools (mkdocs-material, mkdocstrings, matplotlib); no Airflow
#   scripts/bootstrap.sh tools   # only the tools venv (uv), for scripts that build venvs of their own
#   scripts/bootstrap.sh af3-dist      # af3 + the Celery provider and a PostgreSQL driver (make test-distributed)
#
# The supported lines and Pythons are listed in docs/versions.md; the Airflow versions below are the ones tested.
# A "tools" venv holding uv is made first with python3 -m venv + pip; uv then builds the Airflow venvs.
# Each venv keeps a stamp (a hash of everything that decides its contents); when the stamp matches, nothing is
# installed and the script returns at once. Environment: VENVS (default .venvs), PYTHON (default python3); the
# -py3XX venvs ignore PYTHON and use PYTHON3XX (e.g. PYTHON313), else python3.XX on PATH, else pyenv's newest 3.XX.
# Portable to macOS: hashing and locking go through python3, not sha256sum and flock.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
VENVS=${VENVS:-$ROOT/.venvs}
UV_VERSION=0.13.9
AIRFLOW_2=2.11.2
AIRFLOW_30=3.0.6
AIRFLOW_31=3.1.8
AIRFLOW_32=3.2.2
AIRFLOW_3=3.3.2
URLLIB3_OLDEST=1.26.20
override=""
extra_constraints=()
wanted_python=""  # X.Y when the venv is for one Python version

name=${1:?usage: scripts/bootstrap.sh af2|af2-urllib3|af3|af30|af31|af32|af3-py312|af3-py313|af3-dist|docs|tools}
# newest: 3.<newest> is the first Python the venv refuses: what the line's Airflow installs on, capped at 3.13 (the
# newest Python the project tests).
# Airflow 2.11 and 3.0 exclude Python 3.13 in their own metadata (requires-python !=3.13).
case "$name" in
    af2) airflow="apache-airflow==$AIRFLOW_2"; constraints=requirements/constraints-airflow-2.11.txt
         reqs=(requirements/test.txt); newest=13 ;;
    # requests>=2.31 still allows urllib3 1.26, whose streaming API differs: the sync transport is tested on it.
    af2-urllib3) airflow="apache-airflow==$AIRFLOW_2"; constraints=requirements/constraints-airflow-2.11.txt
         reqs=(requirements/test.txt); override="urllib3==$URLLIB3_OLDEST"; newest=13 ;;
    af3) airflow="apache-airflow==$AIRFLOW_3"; constraints=requirements/constraints-airflow-3.3.txt
         reqs=(requirements/test.txt requirements/lint.txt); newest=14 ;;
    af30) airflow="apache-airflow==$AIRFLOW_30"; constraints=requirements/constraints-airflow-3.0.txt
         reqs=(requirements/test.txt); newest=13 ;;
    af31) airflow="apache-airflow==$AIRFLOW_31"; constraints=requirements/constraints-airflow-3.1.txt
         reqs=(requirements/test.txt); newest=14 ;;
    af32) airflow="apache-airflow==$AIRFLOW_32"; constraints=requirements/constraints-airflow-3.2.txt
         reqs=(requirements/test.txt); newest=14 ;;
    af3-py312 | af3-py313)
         airflow="apache-airflow==$AIRFLOW_3"; constraints=requirements/constraints-airflow-3.3.txt
         reqs=(requirements/test.txt); newest=14; wanted_python=3.${name#af3-py3} ;;
    # The distributed deployment test: CeleryExecutor (Redis broker) on PostgreSQL. Pins in their own file.
    af3-dist) airflow="apache-airflow==$AIRFLOW_3"; constraints=requirements/constraints-airflow-3.3.txt
         extra_constraints=(requirements/constraints-distributed.txt)
         reqs=(requirements/test.txt requirements/lint.txt requirements/distributed.txt); newest=14 ;;
    # The docs build reads the package's source statically (griffe): no Airflow, no project install.
    docs) airflow=""; constraints=requirements/docs.txt; reqs=(); newest=14 ;;
    tools) newest=14 ;;
    *) echo "bootstrap: unknown venv '$name' (expected af2, af2-urllib3, af3, af30, af31, af32, af3-py312, af3-py313," >&2
       echo "           af3-dist, docs or tools)" >&2
       exit 2 ;;
esac

if [ -n "$wanted_python" ]; then
    # PYTHON3XX, else python3.XX from PATH if it runs (a pyenv shim may not), else the newest pyenv build of it.
    override_var=PYTHON${wanted_python/./}
    PYTHON=""
    for candidate in ${!override_var:-} "python$wanted_python" \
        $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}/versions/$wanted_python".*/bin/python 2>/dev/null | sort -rV); do
        if "$candidate" -V >/dev/null 2>&1; then
            PYTHON=$candidate
            break
        fi
    done
    if [ -z "$PYTHON" ]; then
        echo "bootstrap: $name needs Python $wanted_python: none on PATH or under pyenv (set $override_var=/path/to/python$wanted_python)" >&2
        exit 1
    fi
fi
PYTHON=${PYTHON:-python3}
say() { printf '[bootstrap %s] %s\n' "$name" "$*"; }

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "bootstrap: '$PYTHON' not found; install Python 3.11 or 3.12 (or set PYTHON=/path/to/python3)" >&2
    exit 1
fi
if ! "$PYTHON" -c "import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, $newest)))"; then
    echo "bootstrap: $("$PYTHON" -V 2>&1) is not supported for ${airflow:-the $name venv}: it needs Python 3.11 to 3.$((newest - 1))" \
        "(Airflow 2.11 and 3.0 do not install on Python 3.13; see docs/versions.md)" >&2
    exit 1
fi
if [ -n "$wanted_python" ] && ! "$PYTHON" -c "import sys; sys.exit(f'{sys.version_info[0]}.{sys.version_info[1]}' != '$wanted_python')"; then
    echo "bootstrap: $name is the Python $wanted_python venv, but $PYTHON is $("$PYTHON" -V 2>&1)" >&2
    exit 1
fi
interpreter=$("$PYTHON" -c 'import sys; print(sys.executable)')

export UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never UV_NO_PROGRESS=1

# The tools venv: only uv. Several bootstraps may run at once (make -j), so it is built under a lock.
tools=$VENVS/tools
mkdir -p "$VENVS"
(
    "$PYTHON" -c 'import fcntl; fcntl.flock(9, fcntl.LOCK_EX)'  # held by this subshell's fd 9 until it ends
    if ! "$tools/bin/uv" --version 2>/dev/null | grep -q " $UV_VERSION"; then
        say "creating $tools with uv $UV_VERSION"
        if [ ! -x "$tools/bin/pip" ] && ! "$PYTHON" -m venv "$tools"; then
            echo "bootstrap: '$PYTHON -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
            exit 1
        fi
        # Some machines point pip at extra local indexes; their "is ignored" warnings are noise here.
        "$tools/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" \
            2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    fi
) 9>"$VENVS/.tools.lock"
uv=$tools/bin/uv
[ "$name" != tools ] || exit 0

venv=$VENVS/$name
stamp_file=$venv/.bootstrap-stamp
stamp=$(
    {
        echo "$interpreter $("$PYTHON" -V 2>&1) $airflow uv=$UV_VERSION $override"
        # The package version (installed metadata) is read from __init__.py: a bump must reinstall.
        cat scripts/bootstrap.sh pyproject.toml airflow_provider_ppio/__init__.py "$constraints" \
            ${extra_constraints[@]+"${extra_constraints[@]}"} ${reqs[@]+"${reqs[@]}"}
    } | "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())'
)
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ]; then
    say "up to date ($venv)"
    exit 0
fi

start=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv"
    "$uv" venv --quiet --python "$interpreter" "$venv"
fi
if [ "$name" = docs ]; then
    say "installing the docs tools ($constraints)"
    "$uv" pip install --quiet --python "$venv/bin/python" -r "$constraints"
    echo "$stamp" >"$stamp_file"
    say "ready in $((SECONDS - start))s ($venv)"
    exit 0
fi
say "installing $airflow, test dependencies and the project (editable, [emulator])"
req_args=()
for req in ${reqs[@]+"${reqs[@]}"}; do req_args+=(-r "$req"); done
for extra in ${extra_constraints[@]+"${extra_constraints[@]}"}; do req_args+=(--constraint "$extra"); done
if [ -n "$override" ]; then
    # The constraints pin the overridden package too: drop that pin, then force the override.
    package=${override%%==*}
    grep -v "^$package==" "$constraints" >"$venv/constraints.txt"
    echo "$override" >"$venv/override.txt"
    constraints=$venv/constraints.txt
    req_args+=(--override "$venv/override.txt")
fi
"$uv" pip install --quiet --python "$venv/bin/python" --constraint "$constraints" \
    "$airflow" "${req_args[@]}" -e ".[emulator]"

# Fail here, not in the middle of a test run, if the venv cannot import what the tests need.
# Its output is shown only on failure: some lines log at info level on import.
if ! check_output=$(PYTHONWARNINGS=ignore "$venv/bin/python" - "$airflow" 2>&1 <<'EOF'
import sys

import airflow
import airflow_provider_ppio.testing.emulator  # noqa: F401 - needs the [emulator] extra
from airflow.providers.common.compat.sdk import BaseSensorOperator  # noqa: F401

wanted = sys.argv[1].split("==")[1]
if airflow.__version__ != wanted:
    sys.exit(f"bootstrap: expected Airflow {wanted}, the venv has {airflow.__version__}")
EOF
); then
    echo "$check_output" >&2
    exit 1
fi
echo "$stamp" >"$stamp_file"
say "ready in $((SECONDS - start))s ($venv)"
