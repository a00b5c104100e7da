# Everything starts from python3 alone: each target builds (or reuses) the venvs it needs under .venvs/.
#
#   make demo      gated deployment DAG, run end to end against the offline PPIO emulator (Airflow 3.3)
#   make test      lint + mypy, the whole test suite on Airflow 2.11 and on Airflow 3.3, the sync transport on urllib3 1.26
#   make test-matrix   the rest of the supported range: unit + gate e2e tests on Airflow 3.0, 3.1, 3.2, unit tests on
#                  Python 3.12 and 3.13 (docs/versions.md)
#
# Smaller pieces: make venvs | venvs-matrix | lint | format | test-af2 | test-af3 | e2e | clean.
# Extra pytest arguments: make test-af3 PYTEST_ARGS="-k sensor -x".

SHELL := /bin/bash
PYTHON ?= python3
VENVS ?= $(CURDIR)/.venvs
PYTEST_ARGS ?=
export PYTHON VENVS PYTEST_ARGS

AF2 := $(VENVS)/af2/bin
AF3 := $(VENVS)/af3/bin

MATRIX_VENVS := af30 af31 af32 af3-py312 af3-py313

.PHONY: help demo test test-matrix venvs venvs-matrix venv-af2 venv-af3 venv-af2-urllib3 $(addprefix venv-,$(MATRIX_VENVS)) \
	lint format test-af2 test-af3 e2e clean

help:
	@sed -n '1,10p' Makefile | sed 's/^# \{0,1\}//'

venv-af2:
	@scripts/bootstrap.sh af2

venv-af3:
	@scripts/bootstrap.sh af3

venv-af2-urllib3:
	@scripts/bootstrap.sh af2-urllib3

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

e2e: venv-af2 venv-af3
	@PYTEST_ARGS="-m e2e $(PYTEST_ARGS)" scripts/test.sh af2 af3

clean:
	rm -rf $(VENVS) .pytest_cache .mypy_cache .ruff_cache .hypothesis
