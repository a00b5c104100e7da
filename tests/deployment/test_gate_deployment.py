"""
The example gate DAG in a real Airflow 3 deployment, driven only through the REST API.

The deployment (see conftest) sets ``[operators] default_deferrable = True``, so the sensor pokes once in
a LocalExecutor worker, hands its wait to the triggerer process, and is resumed in a worker again.
Each prewarm task is held ``running`` in the emulator until the sensor is seen ``deferred``, so the
deferral is certain rather than a race with the first poke.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from deployment_harness import Deployment, files_containing

pytestmark = [pytest.mark.deployment, pytest.mark.af3]

GATE_DAG_ID = "example_ppio_prewarm_gate"
RUN_TIMEOUT = 240.0
SENSOR = "wait_for_prewarm"
TERMINAL = {"success", "failed"}


def _wait_for_dag(deployment: Deployment) -> None:
    def parsed() -> bool:
        found = deployment.api("GET", f"/dags/{GATE_DAG_ID}", expect=(200, 404))
        return isinstance(found, dict) and found.get("dag_id") == GATE_DAG_ID

    deployment.wait_for(parsed, 180, f"the dag-processor to parse {GATE_DAG_ID}")


def _trigger(deployment: Deployment, prewarm_task_id: str) -> str:
    _wait_for_dag(deployment)
    run = deployment.api(
        "POST",
        f"/dags/{GATE_DAG_ID}/dagRuns",
        json={
            "dag_run_id": f"deployment-{prewarm_task_id}",
            "logical_date": None,
            "conf": {"prewarm_task_id": prewarm_task_id},
        },
    )
    run_id: str = run["dag_run_id"]
    return run_id


def _sensor(deployment: Deployment, run_id: str) -> dict[str, Any]:
    ti: dict[str, Any] = deployment.api("GET", f"/dags/{GATE_DAG_ID}/dagRuns/{run_id}/taskInstances/{SENSOR}")
    return ti


def _wait_until_deferred(deployment: Deployment, run_id: str) -> dict[str, Any]:
    """Poll the sensor's task instance until the REST API shows it deferred to the triggerer."""

    def deferred() -> dict[str, Any] | None:
        ti = _sensor(deployment, run_id)
        if ti.get("state") in TERMINAL | {"up_for_retry", "upstream_failed"}:
            raise AssertionError(f"{SENSOR} ended {ti['state']} before it deferred: {ti}")
        # Deferred, and a triggerer process has claimed the trigger.
        return ti if ti.get("state") == "deferred" and ti.get("triggerer_job") else None

    ti: dict[str, Any] = deployment.wait_for(deferred, RUN_TIMEOUT, f"{SENSOR} to be deferred to a triggerer")
    return ti


def _wait_for_run(deployment: Deployment, run_id: str) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        run = deployment.api("GET", f"/dags/{GATE_DAG_ID}/dagRuns/{run_id}")
        return run if run["state"] in TERMINAL else None

    run: dict[str, Any] = deployment.wait_for(finished, RUN_TIMEOUT, f"run {run_id} to finish")
    return run


def _states(deployment: Deployment, run_id: str) -> dict[str, str]:
    body = deployment.api("GET", f"/dags/{GATE_DAG_ID}/dagRuns/{run_id}/taskInstances")
    return {ti["task_id"]: ti["state"] for ti in body["task_instances"]}


def _assert_key_written_nowhere(deployment: Deployment) -> None:
    """The API key went in through the REST API; it must not come out in any file the deployment wrote
    (metadata DB: connection is Fernet-encrypted, XCom, trigger kwargs, rendered fields; task and
    component logs)."""
    leaks = files_containing(deployment.api_key.encode(), [deployment.home, deployment.log_dir])
    assert not leaks, f"the API key was written to {leaks}"


def test_deferred_gate_succeeds_and_pushes_prewarm_details(deployment: Deployment, deployment_emulator: Any) -> None:
    prewarm_id = f"pwt-ok-{uuid.uuid4().hex[:8]}"
    deployment_emulator.control.seed_task(
        task_id=prewarm_id, state="running", image="registry.example.com/team/llama:3.1", region_id="us-east-1"
    )
    run_id = _trigger(deployment, prewarm_id)

    ti = _wait_until_deferred(deployment, run_id)
    assert ti["trigger"]["classpath"] == "airflow_provider_ppio.triggers.prewarm.PrewarmTaskTrigger"
    assert ti["triggerer_job"]["job_type"] == "TriggererJob"

    deployment_emulator.control.set_state(prewarm_id, "succeeded")
    run = _wait_for_run(deployment, run_id)

    states = _states(deployment, run_id)
    assert run["state"] == "success", f"run ended {run['state']}; tasks: {states}"
    assert states == {SENSOR: "success", "get_prewarm_details": "success", "deploy": "success"}

    xcom = deployment.api(
        "GET", f"/dags/{GATE_DAG_ID}/dagRuns/{run_id}/taskInstances/{SENSOR}/xcomEntries/return_value"
    )
    details = xcom["value"]
    assert details["task_id"] == prewarm_id
    assert details["image"] == "registry.example.com/team/llama:3.1"
    assert details["region_id"] == "us-east-1"
    assert details["status"]["status"] == "succeeded"

    log = deployment.task_log(GATE_DAG_ID, run_id, SENSOR)
    events = [str(entry.get("event", "")) for entry in log]
    assert any("deferred" in event.lower() for event in events), f"no deferral in the sensor's log: {events}"
    # The triggerer process wrote its part of the wait into the same task log.
    assert any(entry.get("filename") == "triggerer_job_runner.py" for entry in log), events
    deploy_xcom = deployment.api(
        "GET", f"/dags/{GATE_DAG_ID}/dagRuns/{run_id}/taskInstances/deploy/xcomEntries/return_value"
    )
    assert (
        deploy_xcom["value"]
        == f"deploying registry.example.com/team/llama:3.1 to region us-east-1 (prewarm {prewarm_id})"
    )

    _assert_key_written_nowhere(deployment)


def test_failed_prewarm_fails_the_run_with_the_api_message(deployment: Deployment, deployment_emulator: Any) -> None:
    prewarm_id = f"pwt-bad-{uuid.uuid4().hex[:8]}"
    deployment_emulator.control.seed_task(task_id=prewarm_id, state="running")
    run_id = _trigger(deployment, prewarm_id)
    _wait_until_deferred(deployment, run_id)

    api_message = f"image pull failed: manifest unknown ({prewarm_id})"
    deployment_emulator.control.set_state(
        prewarm_id, "failed", error="IMAGE_PULL_FAILED", message=api_message, reason=["node-7: manifest unknown"]
    )
    run = _wait_for_run(deployment, run_id)

    states = _states(deployment, run_id)
    assert run["state"] == "failed", f"run ended {run['state']}; tasks: {states}"
    assert states[SENSOR] == "failed"
    assert states["get_prewarm_details"] == "upstream_failed"
    assert states["deploy"] == "upstream_failed"

    # The worker's failure (not just the trigger's event line) carries the API's error and message.
    log = deployment.task_log(GATE_DAG_ID, run_id, SENSOR)
    errors = [detail for entry in log for detail in entry.get("error_detail") or []]
    assert errors, f"no exception in the sensor's log: {[entry.get('event') for entry in log]}"
    assert errors[0]["exc_type"] == "PPIOPrewarmFailedError"  # an AirflowFailException: no task retries
    assert api_message in errors[0]["exc_value"]
    assert "IMAGE_PULL_FAILED" in errors[0]["exc_value"]

    _assert_key_written_nowhere(deployment)
