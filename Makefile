# Everything starts from python3 alone: each target builds (or reuses) the venvs it needs under .venvs/.
#
#   make demo      gated deployment DAG, run end to end against the offline PPIO emulator (Airflow 3.3)
#   make test      lint + mypy, the whole test suite on Airflow 2.11 and on Airflow 3.3, the sync transport on urllib3 1.26
#   make test-distributed   the gate on a distributed Airflow 3.3 (Celery, PostgreSQL, Redis, two triggerers) with
#                  a worker, a triggerer and the API killed mid-wait (installs postgresql and redis-server if missing)
#   make test-matrix   the rest of the supported range: unit + gate e2e tests on Airflow 3.0, 3.1, 3.2, unit tests on
#                  Python 3.12 and 3.13 (docs/versions.md)
#
# Smaller pieces: make venvs | venvs-matrix | lint | format | test-af2 | test-af3 | e2e | docs | plots | test-wheel | clean.
# Extra pytest arguments: make test-af3 PYTEST_ARGS="-m 'not e2e' -x".

SHELL := /bin/bash
PYTHON ?= python3
VENVS ?= $(CURDIR)/.venvs
PYTEST_ARGS ?=
export PYTHON VENVS PYTEST_ARGS

AF2 := $(VENVS)/af2/bin
AF3 := $(VENVS)/af3/bin

MATRIX_VENVS := af30 af31 af32 af3-py312 af3-py313

.PHONY: help demo test test-distributed test-matrix test-wheel venvs venvs-matrix venv-af2 venv-af3 venv-af2-urllib3 \
	venv-af3-dist venv-docs $(addprefix venv-,$(MATRIX_VENVS)) lint format test-af2 test-af3 e2e docs plots clean

help:
	@sed -n '1,12p' Makefile | sed 's/^# \{0,1\}//'

venv-af2:
	@scripts/bootstrap.sh af2

venv-af3:
	@scripts/bootstrap.sh af3

venv-af2-urllib3:
	@scripts/bootstrap.sh af2-urllib3

venv-docs:
	@scripts/bootstrap.sh docs

# Only for make test-distributed: af3 plus the Celery provider and the PostgreSQL drivers.
venv-af3-dist:
	@scripts/bootstrap.sh af3-dist

venvs: venv-af2 venv-af3 venv-af2-urllib3

$(addprefix venv-,$(MATRIX_VENVS)): venv-%:
	@scripts/bootstrap.sh $*

venvs-matrix: $(addprefix venv-,$(MATRIX_VENVS))

demo: venv-af3
	@$(AF3)/python scripts/demo.py

test: venvs
	@scripts/test.sh all

test-matrix: venvs-matrix
	@scripts/test.sh matrix

lint: venv-af3
	@scripts/test.sh lint

format: venv-af3
	$(AF3)/ruff format .
	$(AF3)/ruff check --fix .

test-af2: venv-af2
	@scripts/test.sh af2

test-af3: venv-af3
	@scripts/test.sh af3

test-wheel:
	@scripts/test_wheel.sh

test-distributed: venv-af3-dist
	@scripts/install_distributed.sh
	@PYTEST_ARGS="-m distributed $(PYTEST_ARGS)" PYTEST_TIMEOUT=900 scripts/test.sh distributed

e2e: venv-af2 venv-af3
	@PYTEST_ARGS="-m e2e $(PYTEST_ARGS)" scripts/test.sh af2 af3

# The docs site into site/, every warning an error; plot.py must still draw from the recorded results.
docs: venv-docs
	@$(VENVS)/docs/bin/python benchmarks/plot.py --out-dir site/plot-check >/dev/null  # mkdocs then cleans site/
	NO_MKDOCS_2_WARNING=1 $(VENVS)/docs/bin/mkdocs build --strict

# Redraw docs/img/*.png from benchmarks/results/*.json (no benchmark runs).
plots: venv-docs
	$(VENVS)/docs/bin/python benchmarks/plot.py

clean:
	rm -rf $(VENVS) site dist .pytest_cache .mypy_cache .ruff_cache .hypothesis
