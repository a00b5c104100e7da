"""
End-to-end fixtures: real DAG runs with ``airflow dags test`` against the PPIO emulator.

* ``e2e_emulator`` - an emulator (real HTTP on 127.0.0.1) that accepts only :data:`E2E_API_KEY`, with short
  pending/running phases.
* ``dag_test`` - a :class:`DagTestRunner`: ``dag_test.run(dag_id, conf={...})`` runs the DAG in its own
  throwaway AIRFLOW_HOME (SQLite) with ``ppio_default`` pointing at ``e2e_emulator``, and returns a
  :class:`~dagtest_runner.DagRunResult` (task states, XComs from the metadata database, logs).

``airflow db migrate`` runs once per session; each run gets a copy of that database. Every test in this
directory is marked ``e2e``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# The runner is shared with scripts/demo.py; make it importable whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dagtest_runner import E2E_API_KEY, DagTestRunner, migrate_db

if TYPE_CHECKING:
    from airflow_provider_ppio.testing.server import EmulatorServer

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e as ``e2e``."""
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def airflow_home_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An AIRFLOW_HOME whose SQLite database is migrated once per session (copied for each run)."""
    home = tmp_path_factory.mktemp("airflow-home-template")
    migrate_db(home)
    return home


@pytest.fixture
def e2e_emulator(ppio_emulator_factory: Any) -> EmulatorServer:
    """A fresh emulator for this test that accepts only :data:`E2E_API_KEY`; created tasks finish in ~1.5 s."""
    server: EmulatorServer = ppio_emulator_factory(api_key=E2E_API_KEY, pending_seconds=0.5, running_seconds=1.0)
    return server


@pytest.fixture
def dag_test(tmp_path: Path, airflow_home_template: Path, e2e_emulator: EmulatorServer) -> DagTestRunner:
    """A :class:`DagTestRunner` wired to ``e2e_emulator``."""
    return DagTestRunner(tmp_path, airflow_home_template, e2e_emulator)
