"""PrewarmTaskSensor: poke answers, failures, soft_fail and templating (reschedule mode: test_sensor_reschedule.py)."""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
import requests_mock as rm
from airflow.providers.common.compat.sdk import (
    DAG,
    AirflowFailException,
    AirflowSkipException,
    Param,
    PokeReturnValue,
)
from virtual_clock import install_virtual_clock

from airflow_provider_ppio.exceptions import (
    PPIOAuthError,
    PPIOBadResponseError,
    PPIOInvalidInputError,
    PPIONotFoundError,
    PPIOUnreachableError,
)
from airflow_provider_ppio.sensors.prewarm import PrewarmTaskSensor

TASKS = "/gpus/v2/prewarm-tasks"
MakeTask = Callable[..., dict[str, Any]]


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Waits between retries and between pokes, recorded instead of slept."""
    return install_virtual_clock(monkeypatch)


@pytest.fixture
def task_url(ppio_conn: str) -> str:
    return f"{ppio_conn}{TASKS}/pw-1"


def sensor(**kwargs: Any) -> PrewarmTaskSensor:
    return PrewarmTaskSensor(**{"task_id": "wait", "prewarm_task_id": "pw-1", "poke_interval": 1, **kwargs})


# -- poke ---------------------------------------------------------------------------------------------


def test_succeeded_returns_a_done_poke_with_json_xcom(
    requests_mock: rm.Mocker, task_url: str, make_task: MakeTask
) -> None:
    requests_mock.get(task_url, json=make_task("pw-1", "succeeded", completed_at=1767229200, gpu_nodes=4))
    result = sensor().poke({})
    assert isinstance(result, PokeReturnValue)
    assert result.is_done is True
    xcom = result.xcom_value
    assert json.loads(json.dumps(xcom)) == xcom
    assert xcom["task_id"] == "pw-1"
    assert xcom["image"] == "registry.example.com/team/llama:1.0"
    assert xcom["region_id"] == "us-east-1"
    assert xcom["status"]["status"] == "succeeded"
    assert xcom["gpu_nodes"] == 4


@pytest.mark.parametrize("status", ["succeeded", "SUCCEEDED", "Succeeded"])
def test_succeeded_in_any_case_opens_the_gate(
    requests_mock: rm.Mocker, task_url: str, make_task: MakeTask, status: str
) -> None:
    requests_mock.get(task_url, json=make_task("pw-1", status))
    result = sensor().poke({})
    assert isinstance(result, PokeReturnValue)
    assert result.is_done


@pytest.mark.parametrize("status", ["pending", "running", "RUNNING", "Pending", "queued", "", "image_pulling"])
def test_not_finished_keeps_waiting(requests_mock: rm.Mocker, task_url: str, make_task: MakeTask, status: str) -> None:
    requests_mock.get(task_url, json=make_task("pw-1", status))
    assert sensor().poke({}) is False


def test_unknown_status_is_logged(
    requests_mock: rm.Mocker,
    task_url: str,
    make_task: MakeTask,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    requests_mock.get(task_url, json=make_task("pw-1", "image_pulling"))
    assert sensor().poke({}) is False
    assert "image_pulling" in caplog.text + "".join(capsys.readouterr())


@pytest.mark.parametrize("status", ["failed", "FAILED", "Failed"])
def test_failed_raises_fail_exception_with_the_details(
    requests_mock: rm.Mocker, task_url: str, make_task: MakeTask, status: str
) -> None:
    requests_mock.get(
        task_url,
        json=make_task(
            "pw-1",
            status,
            error="IMAGE_PULL_FAILED",
            message="manifest unknown",
            reason=["registry returned 404", "node gpu-3 out of disk"],
        ),
    )
    with pytest.raises(AirflowFailException) as info:
        sensor().poke({})
    text = str(info.value)
    for part in ("pw-1", "IMAGE_PULL_FAILED", "manifest unknown", "registry returned 404", "node gpu-3 out of disk"):
        assert part in text


@pytest.mark.parametrize(
    "response",
    [
        {"status_code": 503, "json": {"message": "busy"}},
        {"status_code": 429, "json": {}, "headers": {"Retry-After": "1"}},
        {"exc": requests.ConnectionError("reset")},
        {"exc": requests.exceptions.ReadTimeout("slow")},
    ],
)
def test_transient_errors_are_retried_until_unreachable_timeout_then_fail(
    requests_mock: rm.Mocker, task_url: str, sleeps: list[float], response: dict[str, Any]
) -> None:
    requests_mock.get(task_url, **response)
    started = time.monotonic()  # the virtual clock adds real time: a loaded machine makes the sleeps shorter
    with pytest.raises(PPIOUnreachableError, match=r"no usable answer for 120s") as info:
        sensor(unreachable_timeout=120).poke({})
    real = time.monotonic() - started
    # Not a quiet "keep waiting" until the sensor's 7-day timeout: the task fails, and task retries apply.
    assert not isinstance(info.value, AirflowFailException)
    assert 119 - real <= sum(sleeps) <= 120.5  # backed off (capped at retry_wait_max) for the whole bound, no longer
    assert requests_mock.call_count > 5  # more than one call's max_attempts
    assert max(sleeps) <= 60


def test_a_transient_fault_that_clears_within_the_bound_opens_the_gate(
    requests_mock: rm.Mocker, task_url: str, sleeps: list[float], make_task: MakeTask
) -> None:
    failures = [{"status_code": 503, "json": {}}] * 8
    requests_mock.get(task_url, [*failures, {"json": make_task("pw-1", "succeeded")}])
    answer = sensor(unreachable_timeout=600).poke({})
    assert isinstance(answer, PokeReturnValue) and answer.is_done
    assert requests_mock.call_count == 9


@pytest.mark.parametrize(
    ("response", "error"),
    [
        ({"status_code": 401, "json": {"message": "bad key"}}, PPIOAuthError),
        ({"status_code": 403, "json": {"message": "forbidden"}}, PPIOAuthError),
        ({"status_code": 404, "json": {"message": "no such task"}}, PPIONotFoundError),
        ({"status_code": 200, "text": "<html>login</html>"}, PPIOBadResponseError),
        ({"status_code": 200, "json": {"status": {"status": "running"}}}, PPIOBadResponseError),
    ],
)
def test_permanent_errors_fail_at_once(
    requests_mock: rm.Mocker, task_url: str, sleeps: list[float], response: dict[str, Any], error: type[Exception]
) -> None:
    requests_mock.get(task_url, **response)
    with pytest.raises(error):
        sensor().poke({})
    assert requests_mock.call_count == 1


def test_invalid_task_id_fails_without_a_request(ppio_conn: str, requests_mock: rm.Mocker) -> None:
    with pytest.raises(ValueError, match="prewarm task id"):
        sensor(prewarm_task_id="..").poke({})
    assert requests_mock.call_count == 0


def test_sensor_uses_its_connection(
    set_conn: Callable[..., None], requests_mock: rm.Mocker, make_task: MakeTask
) -> None:
    set_conn("ppio_novita", host="https://api.novita.ai")
    requests_mock.get(f"https://api.novita.ai{TASKS}/pw-1", json=make_task("pw-1", "running"))
    assert sensor(ppio_conn_id="ppio_novita").poke({}) is False
    assert requests_mock.call_count == 1


def test_key_not_logged_or_raised_by_the_sensor(
    requests_mock: rm.Mocker,
    task_url: str,
    api_key: str,
    sleeps: list[float],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    requests_mock.get(task_url, status_code=503, text=f"proxy error for Bearer {api_key}")
    with pytest.raises(PPIOUnreachableError) as unreachable:
        sensor(unreachable_timeout=5).poke({})
    assert api_key not in str(unreachable.value)
    requests_mock.get(task_url, status_code=401, json={"message": f"key {api_key} revoked"})
    with pytest.raises(PPIOAuthError) as info:
        sensor().poke({})
    logged = caplog.text + "".join(capsys.readouterr())
    assert "retrying in" in logged
    assert api_key not in logged
    assert api_key not in str(info.value)


# -- execute: poke mode, soft_fail, reschedule ---------------------------------------------------------


def test_execute_waits_until_succeeded_and_returns_the_xcom(
    requests_mock: rm.Mocker, task_url: str, sleeps: list[float], make_task: MakeTask
) -> None:
    requests_mock.get(
        task_url,
        [
            {"json": make_task("pw-1", "pending")},
            {"json": make_task("pw-1", "running")},
            {"json": make_task("pw-1", "succeeded")},
        ],
    )
    result = sensor(poke_interval=7).execute({})
    assert result["status"]["status"] == "succeeded"
    assert json.loads(json.dumps(result)) == result
    assert requests_mock.call_count == 3
    assert len(sleeps) == 2  # slept between pokes (not for real: time.sleep is recorded)


def test_execute_fails_on_a_failed_prewarm(requests_mock: rm.Mocker, task_url: str, make_task: MakeTask) -> None:
    requests_mock.get(task_url, json=make_task("pw-1", "failed", message="no space left"))
    with pytest.raises(AirflowFailException, match="no space left"):
        sensor().execute({})


def test_soft_fail_turns_a_failed_prewarm_into_a_skip(
    requests_mock: rm.Mocker, task_url: str, make_task: MakeTask
) -> None:
    requests_mock.get(task_url, json=make_task("pw-1", "failed", message="no space left"))
    with pytest.raises(AirflowSkipException) as info:
        sensor(soft_fail=True).execute({})
    assert "no space left" in str(info.value.__cause__)


def test_soft_fail_does_not_hide_a_bad_api_key(requests_mock: rm.Mocker, task_url: str) -> None:
    requests_mock.get(task_url, status_code=401, json={"message": "bad key"})
    with pytest.raises(PPIOAuthError):
        sensor(soft_fail=True).execute({})


# -- templating ---------------------------------------------------------------------------------------


def test_template_fields_render_from_params() -> None:
    with DAG(
        dag_id="sensor_templates",
        schedule=None,
        start_date=datetime.datetime(2026, 1, 1),
        params={"prewarm_task_id": Param("pw-from-params", type="string"), "conn": "ppio_other"},
    ) as dag:
        waiting = PrewarmTaskSensor(
            task_id="wait", prewarm_task_id="{{ params.prewarm_task_id }}", ppio_conn_id="{{ params.conn }}"
        )
    assert set(PrewarmTaskSensor.template_fields) == {"prewarm_task_id", "ppio_conn_id"}
    waiting.render_template_fields({"params": dag.params})
    assert waiting.prewarm_task_id == "pw-from-params"
    assert waiting.ppio_conn_id == "ppio_other"
    assert waiting.hook.ppio_conn_id == "ppio_other"


def test_building_the_sensor_does_no_io(monkeypatch: pytest.MonkeyPatch, requests_mock: rm.Mocker) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_PPIO_DEFAULT", raising=False)
    built = sensor(ppio_conn_id="not_defined_anywhere")
    assert built.prewarm_task_id == "pw-1"
    assert requests_mock.call_count == 0


def _outlet_events() -> Any:
    from airflow import __version__ as airflow_version

    if int(airflow_version.split(".")[0]) >= 3:
        from airflow.sdk.execution_time.context import OutletEventAccessors
    else:
        from airflow.utils.context import OutletEventAccessors
    return OutletEventAccessors()


def test_success_puts_the_details_on_the_outlet_asset_event(
    requests_mock: rm.Mocker, task_url: str, make_task: MakeTask
) -> None:
    from airflow_provider_ppio.assets import prewarm_asset

    requests_mock.get(task_url, json=make_task("pw-1", "succeeded", completed_at=1767229200))
    asset = prewarm_asset("us-east-1", "registry.example.com/team/llama:1.0")
    context: dict[str, Any] = {"outlet_events": _outlet_events()}

    result = sensor(outlets=[asset]).poke(context)

    assert isinstance(result, PokeReturnValue) and result.is_done
    extra = context["outlet_events"][asset].extra
    assert extra["task_id"] == "pw-1"
    assert extra["completed_at"] == 1767229200


def test_waiting_attaches_no_asset_event(requests_mock: rm.Mocker, task_url: str, make_task: MakeTask) -> None:
    from airflow_provider_ppio.assets import prewarm_asset

    requests_mock.get(task_url, json=make_task("pw-1", "running"))
    asset = prewarm_asset("us-east-1", "registry.example.com/team/llama:1.0")
    context: dict[str, Any] = {"outlet_events": _outlet_events()}

    assert sensor(outlets=[asset]).poke(context) is False
    assert "task_id" not in context["outlet_events"][asset].extra


@pytest.mark.parametrize("value", [0, -1, float("inf"), "10", True])
def test_a_bad_unreachable_timeout_is_refused_when_the_dag_is_parsed(value: Any) -> None:
    with pytest.raises(PPIOInvalidInputError, match="unreachable_timeout must be a positive number of seconds"):
        sensor(unreachable_timeout=value)
