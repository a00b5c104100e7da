#!/usr/bin/env bash
# Build the release files and test the wheel as a user gets it (`make test-wheel`; .ci/run calls it).
#
#   1. .venvs/release gets build and twine (requirements/release.txt); `python -m build` writes the sdist and,
#      built from that sdist, the wheel into dist/; `twine check --strict` checks both.
#   2. The wheel holds the package with py.typed and the licence files, and nothing else: no tests/, no
#      example_dags/ (the example DAGs ship in the sdist only), no scripts/.
#   3. A fresh venv, .venvs/wheel-test (deleted first), gets Airflow and the wheel with [emulator] (not editable),
#      under requirements/constraints-airflow-3.3.txt: no test or lint dependencies.
#   4. From a directory outside the checkout: `airflow providers list` and `airflow providers triggers` show the
#      provider, every module its provider info names imports, the example DAGs parse with no import errors
#      (scripts/check_installed_wheel.py); then scripts/demo.py runs on that venv.
#
# Environment: VENVS (default .venvs), PYTHON (default python3).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
VENVS=${VENVS:-$ROOT/.venvs}
CONSTRAINTS=$ROOT/requirements/constraints-airflow-3.3.txt
export UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never UV_NO_PROGRESS=1

say() { printf '[test-wheel] %s\n' "$*"; }
started=$SECONDS

scripts/bootstrap.sh tools
uv=$VENVS/tools/bin/uv
python=$("${PYTHON:-python3}" -c 'import sys; print(sys.executable)')
version=$(sed -nE 's/^__version__ = "([^"]+)"/\1/p' airflow_provider_ppio/__init__.py)

release=$VENVS/release
if ! cmp -s requirements/release.txt "$release/requirements.txt" 2>/dev/null; then
    say "creating $release (build, twine)"
    "$uv" venv --quiet --python "$python" "$release"
    "$uv" pip install --quiet --python "$release/bin/python" -r requirements/release.txt
    cp requirements/release.txt "$release/requirements.txt"
fi

say "python -m build (version $version)"
rm -f dist/airflow_provider_ppio-*
# --installer uv: the isolated build environment (hatchling) is made by uv, from its cache.
PATH=$VENVS/tools/bin:$PATH "$release/bin/python" -m build --installer uv --outdir dist . >/dev/null
wheel=dist/airflow_provider_ppio-$version-py3-none-any.whl
sdist=dist/airflow_provider_ppio-$version.tar.gz
ls -l "$wheel" "$sdist"
"$release/bin/twine" check --strict "$sdist" "$wheel"

say "wheel contents"
"$release/bin/python" - "$wheel" <<'EOF'
import sys
import zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
dist_info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
wanted = ["airflow_provider_ppio/py.typed", f"{dist_info}/licenses/LICENSE", f"{dist_info}/licenses/NOTICE"]
problems = [f"missing {name}" for name in wanted if name not in names]
problems += [f"unexpected {name}" for name in names if name.split("/")[0] not in {"airflow_provider_ppio", dist_info}]
print(f"{len(names)} files, top level: {sorted({name.split('/')[0] for name in names})}")
sys.exit("\n".join(problems) or None)
EOF

venv=$VENVS/wheel-test
say "fresh venv $venv: Airflow and the wheel [emulator] under $(basename "$CONSTRAINTS")"
rm -rf "$venv"
"$uv" venv --quiet --python "$python" "$venv"
install_start=$SECONDS
"$uv" pip install --quiet --python "$venv/bin/python" --constraint "$CONSTRAINTS" \
    apache-airflow "airflow-provider-ppio[emulator] @ file://$ROOT/$wheel"
say "installed in $((SECONDS - install_start))s"

work=$(mktemp -d "${TMPDIR:-/tmp}/ppio-wheel-test.XXXXXX")
trap 'rm -rf "$work"' EXIT
# Outside the checkout, with no PYTHONPATH: the package can only come from the venv.
(
    cd "$work"
    unset PYTHONPATH
    export AIRFLOW_HOME=$work/airflow-home AIRFLOW__CORE__LOAD_EXAMPLES=False
    "$venv/bin/python" "$ROOT/scripts/check_installed_wheel.py" "$version" "$ROOT/example_dags"
)

say "scripts/demo.py on the installed wheel"
(unset PYTHONPATH; "$venv/bin/python" scripts/demo.py)
say "OK in $((SECONDS - started))s: $wheel ($(du -k "$wheel" | cut -f1) KiB)"
