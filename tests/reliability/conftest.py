"""
Fixtures of the reliability suite: an emulator that accepts only the suite's distinctive key, and the
recorder behind docs/reliability.md.

Set ``PPIO_RELIABILITY_REPORT=1`` to write each case's expected and measured outcome to
``tests/reliability/results/airflow-<version>.json`` at the end of the run and regenerate the matrix in
docs/reliability.md from every results file there (``python tests/reliability/matrix_report.py`` does only
the second step).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# Helper modules of this directory (faultserver, matrix, ...) import each other by plain name.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from matrix import API_KEY

if TYPE_CHECKING:
    from airflow_provider_ppio.testing.server import EmulatorServer

RESULTS = Path(__file__).resolve().parent / "results"


@pytest.fixture(scope="session")
def rel_emulator_session() -> Iterator[EmulatorServer]:
    """One emulator for the suite, accepting only :data:`matrix.API_KEY`."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    # Import what the paths use up front, so the first case's time measures the call, not the imports.
    import airflow_provider_ppio.hooks.ppio
    import airflow_provider_ppio.sensors.prewarm
    import airflow_provider_ppio.triggers.prewarm  # noqa: F401
    from airflow_provider_ppio.testing.emulator import EmulatorConfig
    from airflow_provider_ppio.testing.server import EmulatorServer

    server = EmulatorServer(EmulatorConfig(api_key=API_KEY)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def rel_emulator(rel_emulator_session: EmulatorServer) -> EmulatorServer:
    """The suite's emulator, reset (tasks, faults, request log) for this test."""
    rel_emulator_session.store.reset()
    return rel_emulator_session


@pytest.fixture(scope="session")
def matrix_results() -> Iterator[list[dict[str, Any]]]:
    """Each matrix case appends its row here; written out at the end when ``PPIO_RELIABILITY_REPORT`` is set."""
    rows: list[dict[str, Any]] = []
    yield rows
    if not rows or os.environ.get("PPIO_RELIABILITY_REPORT", "") in ("", "0"):
        return
    from airflow import __version__ as airflow_version
    from matrix_report import update_doc

    RESULTS.mkdir(exist_ok=True)
    report = {
        "airflow": airflow_version,
        "python": ".".join(map(str, sys.version_info[:3])),
        "rows": sorted(rows, key=lambda row: (row["index"], row["path_index"])),
    }
    (RESULTS / f"airflow-{airflow_version}.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    update_doc()
