"""
The example deployment gate, run for real with ``airflow dags test`` against the emulator over HTTP.

What a user would see: the deploy task gets the prewarm details through XCom when the prewarm succeeded; a
failed prewarm fails the sensor with the API's message and the deploy never runs; the API key shows up in no
output, log, XCom or database row.
"""

from __future__ import annotations

import functools

from dagtest_runner import E2E_API_KEY, GATE_DAG, DagTestRunner, gets_of, on_first_read


def test_succeeded_prewarm_opens_the_gate_and_deploy_gets_the_details(dag_test: DagTestRunner) -> None:
    emulator = dag_test.emulator
    seeded = emulator.control.seed_task(
        task_id="pwt-e2e-ok",
        state="succeeded",
        image="registry.example.com/acme/llm-server:1.4",
        region_id="us-east-1",
        product_ids=["gpu-4090", "gpu-a100"],
    )

    result = dag_test.run(GATE_DAG, {"prewarm_task_id": "pwt-e2e-ok"})

    assert result.returncode == 0, result.describe()
    assert result.task_states == {
        "wait_for_prewarm": "success",
        "get_prewarm_details": "success",
        "deploy": "success",
    }, result.describe()
    details = result.xcom("get_prewarm_details")
    assert details["task_id"] == "pwt-e2e-ok"
    assert details["image"] == "registry.example.com/acme/llm-server:1.4"
    assert details["region_id"] == "us-east-1"
    assert details["product_ids"] == ["gpu-4090", "gpu-a100"]
    assert details["status"]["status"] == "succeeded"
    assert details["image_size"] == seeded["image_size"]
    assert result.xcom("wait_for_prewarm") == details
    assert result.xcom("deploy") == (
        "deploying registry.example.com/acme/llm-server:1.4 to region us-east-1 (prewarm pwt-e2e-ok)"
    )
    requests = gets_of(emulator, "pwt-e2e-ok")
    assert len(requests) >= 2, requests  # the sensor's poke and the operator's read
    assert all(entry["auth_valid"] and entry["status"] == 200 for entry in requests), requests
    assert result.secret_leaks(E2E_API_KEY) == []


def test_failed_prewarm_fails_the_sensor_with_the_api_message_and_skips_deploy(dag_test: DagTestRunner) -> None:
    emulator = dag_test.emulator
    emulator.control.seed_task(task_id="pwt-e2e-bad", image="registry.example.com/acme/llm-server:9.9", state="running")
    # Running at the first poke, failed from then on (the example DAG pokes every 5 s).
    fail = functools.partial(
        emulator.control.set_state,
        "pwt-e2e-bad",
        "failed",
        error="ImagePullFailed",
        message="manifest unknown: llm-server:9.9",
        reason=["tag 9.9 does not exist in registry.example.com/acme/llm-server"],
    )

    with on_first_read(emulator.control, "pwt-e2e-bad", fail):
        result = dag_test.run(GATE_DAG, {"prewarm_task_id": "pwt-e2e-bad"})

    assert result.returncode != 0, result.describe()
    assert result.task_states == {
        "wait_for_prewarm": "failed",
        "get_prewarm_details": "upstream_failed",
        "deploy": "upstream_failed",
    }, result.describe()
    assert "deploy" not in result.xcoms
    assert "wait_for_prewarm" not in result.xcoms
    sensor_log = result.task_log("wait_for_prewarm")
    assert "Prewarm task pwt-e2e-bad is running" in sensor_log, result.describe()
    assert "error: ImagePullFailed" in sensor_log, result.describe()
    assert "message: manifest unknown: llm-server:9.9" in sensor_log, result.describe()
    assert "tag 9.9 does not exist in registry.example.com/acme/llm-server" in sensor_log, result.describe()
    assert len(gets_of(emulator, "pwt-e2e-bad")) >= 2  # it waited through "running" before failing
    assert result.secret_leaks(E2E_API_KEY) == []


def test_rejected_api_key_fails_at_once_without_leaking_either_key(dag_test: DagTestRunner) -> None:
    wrong_key = "sk_e2e_WRONG_KEY_DO_NOT_LEAK_91c3"
    dag_test.emulator.control.seed_task(task_id="pwt-e2e-auth", state="succeeded")

    result = dag_test.run(GATE_DAG, {"prewarm_task_id": "pwt-e2e-auth"}, api_key=wrong_key)

    assert result.returncode != 0, result.describe()
    assert result.task_states == {
        "wait_for_prewarm": "failed",
        "get_prewarm_details": "upstream_failed",
        "deploy": "upstream_failed",
    }, result.describe()
    assert "PPIOAuthError" in result.task_log("wait_for_prewarm"), result.describe()
    requests = gets_of(dag_test.emulator, "pwt-e2e-auth")
    assert [entry["status"] for entry in requests] == [401], requests  # permanent: no retries, no re-pokes
    assert result.secret_leaks(wrong_key) == []
    assert result.secret_leaks(E2E_API_KEY) == []
