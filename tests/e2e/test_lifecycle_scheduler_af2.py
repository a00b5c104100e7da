"""
The lifecycle example under a real Airflow 2.11 scheduler: a run, then ``airflow tasks clear`` of the create.

Airflow 2.11 on SQLite allows only the SequentialExecutor, so that is what runs here (one task at a time, no
triggerer: the creates wait in the worker). Airflow 3.3 runs the same scenarios with LocalExecutor, a
triggerer and the REST API in tests/deployment/test_lifecycle_deployment.py.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow import __version__ as AIRFLOW_VERSION
from dagtest_runner import DB_NAME, airflow_command, airflow_env, decode_xcom, new_home, ppio_connection
from packaging.version import Version

pytestmark = [
    pytest.mark.skipif(Version(AIRFLOW_VERSION).major >= 3, reason="Airflow 3 runs this in tests/deployment"),
    pytest.mark.timeout(600),  # a scheduler, and each task a new `airflow tasks run` process
]

DAG_ID = "example_ppio_lifecycle"
IMAGE = "registry.example.com/acme/llm-server:1.4"
LOGICAL_DATE = "2026-02-01T00:00:00+00:00"
TASKS = "/gpus/v2/prewarm-tasks"
WAIT = 240.0


def _query(home: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{home / DB_NAME}?mode=ro", uri=True, timeout=30)) as conn:
        return conn.execute(sql, args).fetchall()


def _states(home: Path) -> dict[str, str]:
    rows = _query(home, "SELECT task_id, state FROM task_instance WHERE dag_id = ?", DAG_ID)
    return {task_id: state or "none" for task_id, state in rows}


def _xcom(home: Path, task_id: str, key: str) -> Any:
    rows = _query(home, "SELECT value FROM xcom WHERE dag_id = ? AND task_id = ? AND key = ?", DAG_ID, task_id, key)
    return decode_xcom(rows[0][0]) if rows else None


def _wait_for_run(home: Path) -> dict[str, str]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        rows = _query(home, "SELECT state FROM dag_run WHERE dag_id = ?", DAG_ID)
        if rows and rows[0][0] in ("success", "failed"):
            return _states(home)
        time.sleep(1)
    log = (home / "scheduler.log").read_text(errors="replace")[-3000:]
    raise AssertionError(f"the run did not finish in {WAIT:.0f}s: {_states(home)}\nscheduler log:\n{log}")


@pytest.fixture
def scheduler(tmp_path: Path, airflow_home_template: Path, e2e_emulator: Any) -> Iterator[tuple[Path, dict[str, str]]]:
    """A migrated home with the example DAG unpaused and a run queued, and ``airflow scheduler`` running."""
    home = new_home(tmp_path / "home", template=airflow_home_template)
    env = airflow_env(
        home,
        extra={
            **ppio_connection(e2e_emulator.base_url, e2e_emulator.api_key, timeout=5, max_attempts=3),
            # The executor starts `airflow tasks run` from PATH: this interpreter's Airflow.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "AIRFLOW__CORE__EXECUTOR": "SequentialExecutor",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
        },
    )

    def cli(*args: str) -> None:
        subprocess.run(airflow_command(*args), env=env, check=True, capture_output=True, timeout=180)

    cli("dags", "reserialize")
    cli("dags", "unpause", DAG_ID)
    cli("dags", "trigger", DAG_ID, "-e", LOGICAL_DATE)
    with (home / "scheduler.log").open("wb") as log:
        proc = subprocess.Popen(airflow_command("scheduler"), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield home, env
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_a_clear_prewarms_again_and_a_retry_after_a_lost_answer_creates_once(
    scheduler: tuple[Path, dict[str, str]], e2e_emulator: Any
) -> None:
    home, env = scheduler
    control = e2e_emulator.control
    states = _wait_for_run(home)
    assert states == {"prewarm": "success", "deploy": "success", "cleanup": "success"}, states
    first = _xcom(home, "prewarm", "prewarm_task_id")
    first_note = _xcom(home, "prewarm", "prewarm_task")["note"]
    assert first and control.tasks() == []  # the cleanup deleted it
    # A decoy a retry would take for this task instance's prewarm (same marker): a clear must not.
    control.seed_task(task_id="pwt-decoy", image=IMAGE, region_id="region-a", state="succeeded", note=first_note)
    # The cleared create's answer is lost (trickles past the 5 s timeout) and so is the lookup after it.
    control.inject_fault("trickle", method="POST", path_prefix=TASKS, interval=30)
    posts = len([e for e in control.requests_log() if e["method"] == "POST" and e["path"] == TASKS])

    subprocess.run(
        airflow_command("tasks", "clear", DAG_ID, "-t", "prewarm", "--downstream", "-s", LOGICAL_DATE, "-y"),
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    deadline = time.monotonic() + WAIT
    while not [t for t in control.tasks() if t["task_id"] != "pwt-decoy"] and time.monotonic() < deadline:
        time.sleep(0.2)
    control.inject_fault("status", count=3, method="GET", path_prefix=TASKS, status=503)
    states = _wait_for_run(home)

    assert states == {"prewarm": "success", "deploy": "success", "cleanup": "success"}, states
    second = _xcom(home, "prewarm", "prewarm_task_id")
    assert second not in (first, "pwt-decoy")  # the clear prewarmed the tag again
    (try_number,) = _query(home, "SELECT try_number FROM task_instance WHERE dag_id = ? AND task_id = 'prewarm'",
                           DAG_ID)[0]  # fmt: skip
    assert try_number == 3  # the first run, the cleared try that lost its answer, its retry
    assert len([e for e in control.requests_log() if e["method"] == "POST" and e["path"] == TASKS]) == posts + 1
    assert [t["task_id"] for t in control.tasks()] == ["pwt-decoy"]  # the cleanup deleted only its own
