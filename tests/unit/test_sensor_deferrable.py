"""``PrewarmTaskSensor(deferrable=True)``: poke once, defer only when not done, finish from the trigger's event."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from airflow.providers.common.compat.sdk import (
    AirflowException,
    AirflowFailException,
    AirflowSensorTimeout,
    AirflowSkipException,
    TaskDeferred,
)

from airflow_provider_ppio import exceptions
from airflow_provider_ppio.exceptions import PPIOAuthError, PPIOBadResponseError, PPIOError, PPIONotFoundError
from airflow_provider_ppio.sensors.prewarm import PrewarmTaskSensor
from airflow_provider_ppio.testing.server import EmulatorServer
from airflow_provider_ppio.triggers.prewarm import DEFERRAL_TIMEOUT_GRACE, PrewarmTaskTrigger

# These tests wait on real time (real triggers and pokes with short deadlines): a regression must fail fast, not hang.
pytestmark = pytest.mark.timeout(60)

TASK_PATH = "/gpus/v2/prewarm-tasks/"


@pytest.fixture
def emulator(ppio_emulator: EmulatorServer, set_conn: Callable[..., None]) -> EmulatorServer:
    """The emulator, with ``ppio_default`` pointing at it (fast retries)."""
    set_conn(host=ppio_emulator.base_url, password=ppio_emulator.api_key)
    return ppio_emulator


def make_sensor(task_id: str = "pw-1", **kwargs: Any) -> PrewarmTaskSensor:
    kwargs.setdefault("deferrable", True)
    kwargs.setdefault("poke_interval", 30)
    kwargs.setdefault("timeout", 3600)
    return PrewarmTaskSensor(task_id="wait_for_prewarm", prewarm_task_id=task_id, **kwargs)


def task_payload(emulator: EmulatorServer, task_id: str = "pw-1") -> dict[str, Any]:
    """The task as the API shows it, in the event's ``task`` form."""
    from airflow_provider_ppio.models import PrewarmTask

    answer = emulator.control.tasks()
    return PrewarmTask.from_api(next(task for task in answer if task["task_id"] == task_id)).to_xcom()


def api_reads(emulator: EmulatorServer) -> int:
    return sum(1 for entry in emulator.control.requests_log() if entry["path"].startswith(TASK_PATH))


# -- the deferrable flag -------------------------------------------------------------------------------


def test_deferrable_defaults_to_false_without_configuration() -> None:
    assert PrewarmTaskSensor(task_id="t", prewarm_task_id="pw-1").deferrable is False


def test_deferrable_defaults_to_operators_default_deferrable() -> None:
    code = (
        "from airflow_provider_ppio.sensors.prewarm import PrewarmTaskSensor;"
        "print(PrewarmTaskSensor(task_id='t', prewarm_task_id='pw-1').deferrable,"
        " PrewarmTaskSensor(task_id='u', prewarm_task_id='pw-1', deferrable=False).deferrable)"
    )
    env = {**os.environ, "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "true"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["True", "False"]


# -- execute: poke once, defer only when not done --------------------------------------------------------


def test_a_running_prewarm_defers_to_the_trigger_after_one_poke(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", state="running")
    sensor = make_sensor(ppio_conn_id="ppio_default", poke_interval=45, timeout=600)

    before = time.time()
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    after = time.time()

    assert api_reads(emulator) == 1
    trigger = deferred.value.trigger
    assert isinstance(trigger, PrewarmTaskTrigger)
    assert (trigger.prewarm_task_id, trigger.ppio_conn_id, trigger.poke_interval) == ("pw-1", "ppio_default", 45.0)
    assert trigger.deadline is not None
    assert before + 600 <= trigger.deadline <= after + 600
    assert deferred.value.method_name == "execute_complete"
    # Airflow's own deferral timeout is only a backstop behind the trigger's deadline.
    assert deferred.value.timeout is not None
    assert 600 + DEFERRAL_TIMEOUT_GRACE - (after - before) - 1 <= deferred.value.timeout.total_seconds()
    assert deferred.value.timeout.total_seconds() <= 600 + DEFERRAL_TIMEOUT_GRACE


def test_a_transient_error_on_the_first_poke_defers_after_one_request(emulator: EmulatorServer) -> None:
    # The connection allows 5 attempts per call and 600 s of outage: the poke before deferring uses neither,
    # since the worker slot is what deferring frees; the trigger is the one that waits the outage out.
    emulator.control.seed_task(task_id="pw-1", state="running")
    emulator.control.inject_fault("status", status=503, count=None, path_prefix=TASK_PATH)
    started = time.monotonic()

    with pytest.raises(TaskDeferred) as deferred:
        make_sensor().execute({})

    assert api_reads(emulator) == 1
    assert time.monotonic() - started < 5
    assert isinstance(deferred.value.trigger, PrewarmTaskTrigger)


def test_a_zero_poke_interval_does_not_make_the_trigger_hot_loop(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", state="pending")

    with pytest.raises(TaskDeferred) as deferred:
        make_sensor(poke_interval=0).execute({})

    assert deferred.value.trigger.poke_interval >= 1


def test_a_finished_prewarm_returns_the_poke_xcom_without_deferring(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", state="succeeded")

    result = make_sensor().execute({})

    poke_mode = make_sensor(deferrable=False).execute({})
    assert result == poke_mode == task_payload(emulator)
    assert result["status"]["status"] == "succeeded"


def test_a_failed_prewarm_fails_without_deferring(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", state="failed", error="ImagePullFailed", reason=["no such tag"])

    with pytest.raises(AirflowFailException, match=r"ImagePullFailed.*no such tag"):
        make_sensor().execute({})


def test_a_failed_prewarm_is_skipped_with_soft_fail(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", state="failed", error="ImagePullFailed")

    with pytest.raises(AirflowSkipException):
        make_sensor(soft_fail=True).execute({})


def test_a_permanent_error_on_the_first_poke_fails_without_deferring(emulator: EmulatorServer) -> None:
    with pytest.raises(PPIONotFoundError):
        make_sensor("pw-missing").execute({})


def test_without_deferrable_the_sensor_pokes_in_its_worker_slot(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", timeline=[{"state": "running", "seconds": 0.2}, {"state": "succeeded"}])

    result = make_sensor(deferrable=False, poke_interval=0.05).execute({})

    assert result["status"]["status"] == "succeeded"
    assert api_reads(emulator) >= 2


# -- execute_complete ----------------------------------------------------------------------------------


def test_success_event_returns_the_same_xcom_as_poke_mode(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", state="succeeded")
    details = task_payload(emulator)

    result = make_sensor().execute_complete({}, {"status": "success", "prewarm_task_id": "pw-1", "task": details})

    assert result == make_sensor(deferrable=False).execute({}) == details


def test_failed_event_raises_the_poke_mode_failure(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", state="failed", error="ImagePullFailed", reason=["no such tag"])
    details = task_payload(emulator)
    event = {"status": "failed", "prewarm_task_id": "pw-1", "task": details, "error": "ImagePullFailed"}

    with pytest.raises(AirflowFailException) as deferred_error:
        make_sensor().execute_complete({}, event)
    with pytest.raises(AirflowFailException) as poke_error:
        make_sensor(deferrable=False).execute({})

    assert str(deferred_error.value) == str(poke_error.value)
    assert "ImagePullFailed" in str(deferred_error.value)


def test_timeout_event_raises_sensor_timeout() -> None:
    event = {"status": "timeout", "prewarm_task_id": "pw-1", "message": "still running", "last_status": "running"}

    with pytest.raises(AirflowSensorTimeout, match="still running"):
        make_sensor().execute_complete({}, event)


@pytest.mark.parametrize(
    ("error_type", "http_status", "expected"),
    [
        ("PPIONotFoundError", 404, PPIONotFoundError),
        ("PPIOAuthError", 401, PPIOAuthError),
        ("AirflowNotFoundException", None, PPIOError),
        ("os.system", None, PPIOError),
    ],
)
def test_error_event_raises_the_error_poke_mode_would(
    error_type: str, http_status: int | None, expected: type[PPIOError]
) -> None:
    event = {
        "status": "error",
        "prewarm_task_id": "pw-1",
        "message": "GET /gpus/v2/prewarm-tasks/pw-1: HTTP 404",
        "error_type": error_type,
        "http_status": http_status,
    }

    with pytest.raises(PPIOError, match="HTTP 404") as raised:
        make_sensor().execute_complete({}, event)

    assert type(raised.value) is expected
    assert raised.value.http_status == http_status


@pytest.mark.parametrize(
    "event",
    [
        None,
        {},
        "success",
        {"status": "succeeded", "prewarm_task_id": "pw-1"},
        {"status": "cancelled", "prewarm_task_id": "pw-1"},
        {"status": None},
        {"status": "timeout", "prewarm_task_id": "pw-other"},
        {"status": "timeout"},
    ],
)
def test_unexpected_events_fail_closed(event: Any) -> None:
    with pytest.raises(AirflowException, match="does not understand") as raised:
        make_sensor().execute_complete({}, event)

    assert not isinstance(raised.value, AirflowSkipException)


@pytest.mark.parametrize(("status", "task_status"), [("success", "running"), ("failed", "succeeded")])
def test_an_event_contradicted_by_its_task_fails_closed(status: str, task_status: str, make_task: Any) -> None:
    event = {"status": status, "prewarm_task_id": "pw-1", "task": make_task("pw-1", task_status)}

    with pytest.raises(AirflowException, match="failing instead of guessing"):
        make_sensor().execute_complete({}, event)


def test_a_success_event_carrying_another_task_fails_closed(make_task: Any) -> None:
    event = {"status": "success", "prewarm_task_id": "pw-1", "task": make_task("pw-2", "succeeded")}

    with pytest.raises(AirflowException, match="for task 'pw-2'") as raised:
        make_sensor().execute_complete({}, event)

    assert not isinstance(raised.value, AirflowFailException)  # a retry may see the right task


def test_a_success_event_without_a_usable_task_fails(make_task: Any) -> None:
    with pytest.raises(PPIOBadResponseError):
        make_sensor().execute_complete({}, {"status": "success", "prewarm_task_id": "pw-1", "task": None})


# -- soft_fail through Airflow's resume path -----------------------------------------------------------


def test_soft_fail_turns_a_deferred_timeout_into_a_skip() -> None:
    event = {"status": "timeout", "prewarm_task_id": "pw-1", "message": "still running"}

    with pytest.raises(AirflowSkipException):
        make_sensor(soft_fail=True).resume_execution("execute_complete", {"event": event}, {})


@pytest.mark.parametrize(
    ("error_type", "http_status"),
    [("PPIONotFoundError", 404), ("PPIOAuthError", 401), ("PPIOUnreachableError", None)],
)
def test_soft_fail_does_not_hide_an_error_after_a_deferral(error_type: str, http_status: int | None) -> None:
    # Airflow's own resume_execution skips on any error under soft_fail; poke mode fails on these, so must this.
    event = {"status": "error", "prewarm_task_id": "pw-1", "message": "boom", "error_type": error_type}
    event["http_status"] = http_status

    with pytest.raises(getattr(exceptions, error_type)):
        make_sensor(soft_fail=True).resume_execution("execute_complete", {"event": event}, {})


@pytest.mark.parametrize("soft_fail", [True, False])
def test_never_fail_skips_any_error_after_a_deferral(soft_fail: bool) -> None:
    event = {"status": "error", "prewarm_task_id": "pw-1", "message": "HTTP 401", "error_type": "PPIOAuthError"}
    kwargs = {"never_fail": True} if not soft_fail else {"never_fail": True, "soft_fail": False}

    with pytest.raises(AirflowSkipException):
        make_sensor(**kwargs).resume_execution("execute_complete", {"event": event}, {})


def test_without_soft_fail_a_deferred_timeout_fails_as_a_sensor_timeout() -> None:
    event = {"status": "timeout", "prewarm_task_id": "pw-1", "message": "still running"}

    with pytest.raises(AirflowSensorTimeout):
        make_sensor().resume_execution("execute_complete", {"event": event}, {})


# -- the whole deferred path ---------------------------------------------------------------------------


def test_the_trigger_event_completes_the_sensor_like_poke_mode(emulator: EmulatorServer) -> None:
    import asyncio

    emulator.control.seed_task(task_id="pw-1", state="running")
    sensor = make_sensor(poke_interval=30)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    emulator.control.set_state("pw-1", "succeeded")
    # The trigger the sensor built, as the triggerer would load it (only faster).
    trigger = PrewarmTaskTrigger(**{**deferred.value.trigger.serialize()[1], "poke_interval": 0.02})

    async def first_event() -> dict[str, Any]:
        async for event in trigger.run():
            payload: dict[str, Any] = event.payload
            return payload
        raise AssertionError("no event")

    result = sensor.execute_complete({}, asyncio.run(first_event()))

    assert result == task_payload(emulator)
    assert result["status"]["status"] == "succeeded"
