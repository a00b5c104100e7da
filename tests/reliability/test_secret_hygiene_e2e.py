"""
Secret hygiene end to end: a real ``airflow dags test`` run (on whichever Airflow line runs the suite) of a DAG
with the gate in poke and deferrable mode, each on a prewarm that succeeds and one that fails, while the API
echoes the key back in error answers. The key (or any 8-character piece of it) must appear in no task log,
command output, XCom, rendered template field or other row of the metadata database.

Uses the e2e runner of tests/e2e (``dagtest_runner``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from matrix import API_KEY
from test_secret_hygiene import key_pieces

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "e2e"))
dagtest_runner = pytest.importorskip("dagtest_runner", reason="the e2e runner (tests/e2e/dagtest_runner.py) is missing")

DAG_ID = "reliability_secret_hygiene"
TASK_PATH = "/gpus/v2/prewarm-tasks/"
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def migrated_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An AIRFLOW_HOME with a migrated database, copied for each run."""
    home = tmp_path_factory.mktemp("hygiene-airflow-home")
    dagtest_runner.migrate_db(home)
    return home


def test_the_key_appears_nowhere_after_poke_and_deferred_runs_that_succeed_and_fail(
    tmp_path: Path, migrated_home: Path, ppio_emulator_factory: Callable[..., Any]
) -> None:
    emulator = ppio_emulator_factory(api_key=API_KEY)
    control = emulator.control
    ids = {
        f"{mode}_{ending}": f"pwt-{mode}-{ending}" for mode in ("poke", "deferred") for ending in ("success", "failure")
    }
    control.seed_task(task_id=ids["poke_success"], state="succeeded")
    control.seed_task(task_id=ids["poke_failure"], state="failed", message="pull failed: manifest unknown")
    for name in ("deferred_success", "deferred_failure"):
        control.seed_task(task_id=ids[name], state="running")  # running at the first poke: the sensor defers
    for task_id in ids.values():  # the first read of each fails with the key echoed back: a retry is logged
        control.inject_fault(
            "status", count=1, path_prefix=TASK_PATH + task_id, status=500, body={"message": f"bad key {API_KEY}"}
        )

    runner = dagtest_runner.DagTestRunner(tmp_path, migrated_home, emulator)
    with ExitStack() as stack:  # once the deferred gates have seen "running", their prewarms end
        for name, ending in (("deferred_success", "succeeded"), ("deferred_failure", "failed")):
            stack.enter_context(
                dagtest_runner.on_first_read(control, ids[name], lambda i=ids[name], e=ending: control.set_state(i, e))
            )
        result = runner.run(DAG_ID, dict(ids), dags_folder=HERE / "dags", conn_extra={"max_attempts": 3})

    assert result.task_states == {
        "poke_success": "success",
        "poke_details": "success",
        "poke_failure": "failed",
        "deferred_success": "success",
        "deferred_details": "success",
        "deferred_failure": "failed",
    }, result.describe()
    for name in ("poke_details", "deferred_details"):
        assert result.xcom(name)["status"]["status"] == "succeeded"
    for name in ("deferred_success", "deferred_failure"):  # they waited in the trigger for the change
        reads = [e for e in control.requests_log() if e["path"] == TASK_PATH + ids[name]]
        assert len(reads) >= 3, (name, reads)
    assert "retrying" in result.logs, result.describe()  # the echoed key was in an answer that got logged
    assert "pull failed: manifest unknown" in result.logs, result.describe()  # the failure reached the log

    # Airflow 3.0's own MaskSecret debug lines hold the key in clear; not this provider's (see dagtest_runner).
    leaking_lines = [line[:400] for line in result.checked_logs.splitlines() if key_pieces(line)]
    assert result.secret_leaks(API_KEY) == [], leaking_lines
    database = (result.home / dagtest_runner.DB_NAME).read_bytes().decode("latin-1")
    assert key_pieces(result.checked_logs) == []
    assert key_pieces(repr(result.xcoms)) == []
    assert key_pieces(database) == []
