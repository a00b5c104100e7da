"""
The example deployment gate in deferrable mode, run for real with ``airflow dags test`` against the emulator.

``[operators] default_deferrable = True`` makes the example's sensor defer. ``dags test`` then runs the
trigger inline: on Airflow 3 it rebuilds the trigger from the serde-encoded kwargs of the defer message, as
a triggerer does. What a user would see: the same outcome, XCom and errors as in poke mode, with the wait
done by the trigger; the sensor's timeout ending the wait as a timeout (a skip with ``soft_fail``); the API
key nowhere, the stored trigger included.
"""

from __future__ import annotations

import functools
import textwrap
from pathlib import Path

from dagtest_runner import E2E_API_KEY, GATE_DAG, DagRunResult, DagTestRunner, gets_of, on_first_read

DEFERRABLE = {"AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "True"}


def assert_deferred(result: DagRunResult) -> None:
    """The sensor handed its wait to a trigger, which ran to an event."""
    log = result.task_log("wait_for_prewarm")
    assert "[DAG TEST] Trigger completed" in log, result.describe()


def test_deferred_gate_opens_when_the_prewarm_succeeds(dag_test: DagTestRunner) -> None:
    emulator = dag_test.emulator
    emulator.control.seed_task(
        task_id="pwt-e2e-defer",
        state="running",
        image="registry.example.com/acme/llm-server:2.0",
        region_id="eu-west-1",
    )
    succeed = functools.partial(emulator.control.set_state, "pwt-e2e-defer", "succeeded")

    with on_first_read(emulator.control, "pwt-e2e-defer", succeed):  # running at the poke, done for the trigger
        result = dag_test.run(GATE_DAG, {"prewarm_task_id": "pwt-e2e-defer"}, env=DEFERRABLE)

    assert result.returncode == 0, result.describe()
    assert result.task_states == {
        "wait_for_prewarm": "success",
        "get_prewarm_details": "success",
        "deploy": "success",
    }, result.describe()
    assert_deferred(result)
    details = result.xcom("get_prewarm_details")
    assert details["status"]["status"] == "succeeded"
    assert result.xcom("wait_for_prewarm") == details  # the same XCom as poke mode pushes
    assert result.xcom("deploy") == (
        "deploying registry.example.com/acme/llm-server:2.0 to region eu-west-1 (prewarm pwt-e2e-defer)"
    )
    reads = gets_of(emulator, "pwt-e2e-defer")
    assert len(reads) >= 3, reads  # the poke, the trigger's poll, the operator's read
    assert all(entry["auth_valid"] and entry["status"] == 200 for entry in reads), reads
    assert result.secret_leaks(E2E_API_KEY) == []


def test_deferred_gate_fails_with_the_api_message_when_the_prewarm_fails(dag_test: DagTestRunner) -> None:
    emulator = dag_test.emulator
    emulator.control.seed_task(task_id="pwt-e2e-defer-bad", state="pending")
    fail = functools.partial(
        emulator.control.set_state,
        "pwt-e2e-defer-bad",
        "failed",
        error="ImagePullFailed",
        message="manifest unknown: llm-server:9.9",
        reason=["tag 9.9 does not exist"],
    )

    with on_first_read(emulator.control, "pwt-e2e-defer-bad", fail):
        result = dag_test.run(GATE_DAG, {"prewarm_task_id": "pwt-e2e-defer-bad"}, env=DEFERRABLE)

    assert result.returncode != 0, result.describe()
    assert result.task_states == {
        "wait_for_prewarm": "failed",
        "get_prewarm_details": "upstream_failed",
        "deploy": "upstream_failed",
    }, result.describe()
    assert_deferred(result)
    log = result.task_log("wait_for_prewarm")
    assert "error: ImagePullFailed" in log, result.describe()
    assert "message: manifest unknown: llm-server:9.9" in log, result.describe()
    assert "tag 9.9 does not exist" in log, result.describe()
    assert "wait_for_prewarm" not in result.xcoms
    assert result.secret_leaks(E2E_API_KEY) == []


TIMEOUT_DAG = """
import datetime

from airflow.providers.common.compat.sdk import DAG

from airflow_provider_ppio.sensors.prewarm import PrewarmTaskSensor

with DAG(
    dag_id="ppio_deferred_timeout",
    schedule=None,
    start_date=datetime.datetime(2026, 1, 1),
    params={"prewarm_task_id": "pwt-e2e-slow"},
):
    PrewarmTaskSensor(
        task_id="strict",
        prewarm_task_id="{{ params.prewarm_task_id }}",
        deferrable=True,
        poke_interval=1,
        timeout=4,
    )
    PrewarmTaskSensor(
        task_id="lenient",
        prewarm_task_id="{{ params.prewarm_task_id }}",
        deferrable=True,
        poke_interval=1,
        timeout=4,
        soft_fail=True,
    )
"""


def test_the_sensor_timeout_ends_a_deferred_wait_and_soft_fail_skips(dag_test: DagTestRunner, tmp_path: Path) -> None:
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "ppio_deferred_timeout.py").write_text(textwrap.dedent(TIMEOUT_DAG))
    dag_test.emulator.control.seed_task(task_id="pwt-e2e-slow", state="running")

    result = dag_test.run("ppio_deferred_timeout", {"prewarm_task_id": "pwt-e2e-slow"}, dags_folder=dags)

    assert result.task_states == {"strict": "failed", "lenient": "skipped"}, result.describe()
    assert "AirflowSensorTimeout" in result.task_log("strict"), result.describe()
    assert "did not finish before the sensor's timeout" in result.task_log("strict"), result.describe()
    # The trigger polled at poke_interval until the deadline: a few reads, not a hot loop.
    assert 4 <= len(gets_of(dag_test.emulator, "pwt-e2e-slow")) <= 20
    assert result.secret_leaks(E2E_API_KEY) == []
