"""
The sensor in every mode against an API in trouble, run for real with ``airflow dags test`` (Airflow 2.11 and 3.3).

One DAG (``dags_outage/ppio_sensor_outage_modes.py``) holds a sensor per case and mode; each reads its own
prewarm task, whose faults and reads the emulator keeps apart. Reschedule mode is driven by Airflow itself
(``dags test`` runs the rescheduled task again at its reschedule date), so the first poke's start comes from
Airflow's reschedule records and the outage's start from the task's durable state, as in production.

What a user sees, per mode:

* an outage longer than ``unreachable_timeout`` fails the task with ``PPIOUnreachableError`` naming the last
  error; poke mode waited it out inside one poke, reschedule mode across pokes of one request each;
* an outage longer than the sensor's ``timeout`` ends in ``AirflowSensorTimeout`` (``soft_fail``: skipped);
* one transient error before a deferral or a reschedule costs one request, not a wait in the worker slot;
* the ``timeout`` counts from the first poke, also when an outage starts later.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dagtest_runner import E2E_API_KEY, TASK_PATH, DagRunResult, DagTestRunner, gets_of, on_first_read

DAGS = Path(__file__).resolve().parent / "dags_outage"
DAG_ID = "ppio_sensor_outage_modes"
MODES = ("poke", "reschedule", "deferrable")
CASES = ("down", "slow", "slow_soft", "blip", "late")


def _fail_every_read(emulator: Any, prewarm_task_id: str) -> None:
    emulator.control.inject_fault("status", count=None, status=503, path_prefix=f"{TASK_PATH}{prewarm_task_id}")


def _outage_records(result: DagRunResult) -> list[Any]:
    """What the sensor left in Airflow's durable state: Variables (2.11) and task state (3.3) of the outage."""
    found: list[Any] = []
    with contextlib.closing(sqlite3.connect(f"file:{result.home / 'airflow.db'}?mode=ro", uri=True)) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        found += [row[0] for row in conn.execute("SELECT key FROM variable WHERE key LIKE 'ppio_sensor_outage%'")]
        for table in sorted(tables):
            if "state_store" in table or table == "task_state":
                columns = [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
                if "key" in columns:
                    found += list(conn.execute(f"SELECT * FROM {table} WHERE key LIKE 'ppio_sensor_outage%'"))
    return found


@pytest.fixture(scope="module")
def outage_emulator() -> Iterator[Any]:
    """An emulator for this module's one run (the plugin's factory is per test)."""
    from airflow_provider_ppio.testing.emulator import EmulatorConfig
    from airflow_provider_ppio.testing.server import EmulatorServer

    server = EmulatorServer(EmulatorConfig(api_key=E2E_API_KEY, pending_seconds=0.5, running_seconds=1.0)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def outage_run(
    tmp_path_factory: pytest.TempPathFactory, airflow_home_template: Path, outage_emulator: Any
) -> tuple[DagRunResult, Any]:
    """One ``dags test`` run of the whole matrix; the emulator and the result are shared by the tests below."""
    emulator = outage_emulator
    runner = DagTestRunner(tmp_path_factory.mktemp("outage"), airflow_home_template, emulator)
    for mode in MODES:
        for case in ("down", "slow", "slow_soft"):
            emulator.control.seed_task(task_id=f"pw-{case}-{mode}", state="running")
            _fail_every_read(emulator, f"pw-{case}-{mode}")
        emulator.control.seed_task(task_id=f"pw-blip-{mode}", state="succeeded")
        emulator.control.inject_fault("status", count=1, status=503, path_prefix=f"{TASK_PATH}pw-blip-{mode}")
        emulator.control.seed_task(task_id=f"pw-late-{mode}", state="running")
    with contextlib.ExitStack() as stack:
        for mode in MODES:
            later = functools.partial(_fail_every_read, emulator, f"pw-late-{mode}")
            stack.enter_context(on_first_read(emulator.control, f"pw-late-{mode}", later))
        result = runner.run(DAG_ID, dags_folder=DAGS, timeout=400)
    return result, emulator


def _log(result: DagRunResult, task_id: str) -> str:
    """Everything logged while ``task_id`` ran, over all its runs (each reschedule poke is a run of its own)."""
    marker = "[DAG TEST] starting task_id="
    parts = result.output.split(marker)
    return "".join(marker + part for part in parts[1:] if part.startswith(f"{task_id} "))


def _reads(emulator: Any, case: str, mode: str) -> list[int]:
    return [entry["status"] for entry in gets_of(emulator, f"pw-{case}-{mode}")]


@pytest.mark.parametrize("mode", MODES)
def test_an_outage_longer_than_unreachable_timeout_fails_with_the_last_error(outage_run: Any, mode: str) -> None:
    result, emulator = outage_run
    task = f"down_{mode}"
    assert result.task_states[task] == "failed", result.describe()
    log = _log(result, task)
    assert "PPIOUnreachableError" in log, log
    assert "no usable answer for 3s (unreachable_timeout); last error" in log, log
    reads = _reads(emulator, "down", mode)
    assert set(reads) == {503}, reads
    if mode == "reschedule":
        # One request per poke, so a poke could give up only with the outage's start carried from an
        # earlier poke (the first poke of an outage always reschedules).
        assert len(reads) >= 2, reads
        assert "poking again at the next reschedule" in log, log
    else:
        # Waited out inside one poke (poke mode) or by the trigger: more reads than one call's attempts.
        assert len(reads) >= 3, reads


@pytest.mark.parametrize("mode", MODES)
def test_an_outage_longer_than_the_timeout_ends_in_the_sensor_timeout_and_soft_fail_skips(
    outage_run: Any, mode: str
) -> None:
    result, emulator = outage_run
    assert result.task_states[f"slow_{mode}"] == "failed", result.describe()
    assert result.task_states[f"slow_soft_{mode}"] == "skipped", result.describe()
    log = _log(result, f"slow_{mode}")
    assert "AirflowSensorTimeout" in log, log
    assert "PPIOUnreachableError" not in log, log
    assert set(_reads(emulator, "slow", mode)) == {503}


@pytest.mark.parametrize("mode", MODES)
def test_one_transient_error_costs_one_request_before_a_deferral_or_a_reschedule(outage_run: Any, mode: str) -> None:
    result, emulator = outage_run
    task = f"blip_{mode}"
    assert result.task_states[task] == "success", result.describe()
    assert result.xcom(task)["task_id"] == f"pw-blip-{mode}"
    # One 503, then the answer: in poke mode the same poke retried; in the other modes the 503 was the
    # poke's only request, and the answer came to the trigger or to the next reschedule's poke.
    assert _reads(emulator, "blip", mode) == [503, 200]
    log = _log(result, task)
    if mode == "deferrable":
        assert "the trigger waits for it" in log, log
        assert "[DAG TEST] Trigger completed" in log, log
    if mode == "reschedule":
        assert "poking again at the next reschedule" in log, log


@pytest.mark.parametrize("mode", MODES)
def test_the_timeout_counts_from_the_first_poke_when_an_outage_starts_later(outage_run: Any, mode: str) -> None:
    result, emulator = outage_run
    task = f"late_{mode}"
    assert result.task_states[task] == "failed", result.describe()
    log = _log(result, task)
    assert "AirflowSensorTimeout" in log, log
    assert "PPIOUnreachableError" not in log, log
    reads = _reads(emulator, "late", mode)
    assert reads[0] == 200 and 503 in reads, reads


def test_nothing_is_left_behind(outage_run: Any) -> None:
    result, _ = outage_run
    assert _outage_records(result) == []
    assert result.secret_leaks(E2E_API_KEY) == []
