"""
The prewarm lifecycle over real HTTP against the emulator: hook calls, create/delete operators, retries.

The emulator keeps every task it was asked to create, so "one prewarm per image and region after a retried
task" is checked on the server side, not inferred from the client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from airflow_provider_ppio.exceptions import PPIONotFoundError, PPIOQuotaExceededError
from airflow_provider_ppio.hooks.ppio import PPIOHook
from airflow_provider_ppio.operators import prewarm as prewarm_module
from airflow_provider_ppio.operators.prewarm import (
    NO_PREWARM_TASK_ID,
    XCOM_PREWARM_TASK_ID,
    PPIOCreatePrewarmTaskOperator,
    PPIODeletePrewarmTasksOperator,
)
from airflow_provider_ppio.testing.server import EmulatorServer
from tests.unit.test_lifecycle_operators import Crash, FakeTI, make_context

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

IMAGE = "registry.example.com/acme/llm-server:1.4"
TASKS = "/gpus/v2/prewarm-tasks"


@pytest.fixture
def emulator(ppio_emulator: EmulatorServer, set_conn: Callable[..., None]) -> EmulatorServer:
    """The emulator with quick lifecycles, and ``ppio_default`` pointing at it."""
    set_conn(host=ppio_emulator.base_url, password=ppio_emulator.api_key)
    ppio_emulator.control.configure(pending_seconds=0.1, running_seconds=0.3)
    return ppio_emulator


class CrashingTime:
    """The operator module's ``time``, real except that the first wait kills the worker."""

    def __init__(self) -> None:
        self.crash_next_sleep = True

    @staticmethod
    def time() -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if self.crash_next_sleep:
            self.crash_next_sleep = False
            raise Crash
        time.sleep(seconds)


@pytest.fixture
def crash_at_first_wait(monkeypatch: pytest.MonkeyPatch) -> CrashingTime:
    fake = CrashingTime()
    monkeypatch.setattr(prewarm_module, "time", fake)
    return fake


def create_op(**kwargs: Any) -> PPIOCreatePrewarmTaskOperator:
    defaults: dict[str, Any] = {
        "task_id": "prewarm",
        "image": IMAGE,
        "region_id": "region-a",
        "poke_interval": 0.1,
        "timeout": 30,
        "deferrable": False,
    }
    return PPIOCreatePrewarmTaskOperator(**{**defaults, **kwargs})


def creates(emulator: EmulatorServer) -> list[dict[str, Any]]:
    return [e for e in emulator.control.requests_log() if e["method"] == "POST" and e["path"] == TASKS]


def tasks_for(emulator: EmulatorServer, region: str, image: str = IMAGE) -> list[dict[str, Any]]:
    return [t for t in emulator.control.tasks() if t["region_id"] == region and t["image"] == image]


# -- hook ------------------------------------------------------------------------------------------------


def test_hook_create_get_list_delete_round_trip(emulator: EmulatorServer) -> None:
    emulator.control.configure(pending_seconds=60)
    hook = PPIOHook()
    ids = [hook.create_prewarm_task(IMAGE, region, note=f"n-{region}") for region in ("r1", "r2", "r1")]
    emulator.control.seed_task(
        task_id="pwt-other", state="succeeded", image="registry.example.com/other:1", region_id="r1"
    )

    assert hook.get_prewarm_task(ids[0]).region_id == "r1"
    assert [t.task_id for t in hook.list_prewarm_tasks(page_size=2)] == [*ids, "pwt-other"]
    assert [t.task_id for t in hook.list_prewarm_tasks(region_id="r1", page_size=1)] == [ids[0], ids[2], "pwt-other"]
    assert [t.task_id for t in hook.list_prewarm_tasks(name="n-r2")] == [ids[1]]
    assert [t.task_id for t in hook.list_prewarm_tasks(status="pending")] == ids

    hook.delete_prewarm_tasks([ids[0], "pwt-never-existed"])

    with pytest.raises(PPIONotFoundError):
        hook.get_prewarm_task(ids[0])
    assert {t["task_id"] for t in emulator.control.tasks()} == {ids[1], ids[2], "pwt-other"}
    deletes = [e for e in emulator.control.requests_log() if e["method"] == "DELETE"]
    assert deletes[0]["json"] == {"task_ids": [ids[0], "pwt-never-existed"]}


def test_hook_quota_error_is_typed(emulator: EmulatorServer) -> None:
    emulator.control.configure(quota=1, running_seconds=60)
    hook = PPIOHook()
    hook.create_prewarm_task(IMAGE, "r1")

    with pytest.raises(PPIOQuotaExceededError, match="wait for running ones to finish"):
        hook.create_prewarm_task(IMAGE, "r2")
    assert len(creates(emulator)) == 2  # refused once, not retried


# -- create operator ---------------------------------------------------------------------------------------


def test_create_operator_waits_until_succeeded(emulator: EmulatorServer) -> None:
    ti = FakeTI()

    result = create_op(note="demo").execute(make_context(ti))

    assert result["status"]["status"] == "succeeded"
    assert result["region_id"] == "region-a"
    assert ti.xcoms[XCOM_PREWARM_TASK_ID] == result["task_id"]
    [task] = emulator.control.tasks()
    assert task["note"].startswith("demo af-")


def test_failed_prewarm_fails_the_operator_with_the_api_message(emulator: EmulatorServer) -> None:
    from airflow.providers.common.compat.sdk import AirflowFailException

    with pytest.raises(AirflowFailException, match="failed"):
        create_op(image="registry.example.com/acme/will-fail:1").execute(make_context())


def test_retry_after_crash_reuses_by_marker(emulator: EmulatorServer, crash_at_first_wait: CrashingTime) -> None:
    ti = FakeTI()
    with pytest.raises(Crash):
        create_op().execute(make_context(ti))

    result = create_op().execute(make_context(ti.retry()))

    assert result["status"]["status"] == "succeeded"
    assert len(tasks_for(emulator, "region-a")) == 1
    assert len(creates(emulator)) == 1


def test_mapped_regions_retried_after_crashes_make_one_prewarm_each(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    regions = ["region-a", "region-b", "region-c"]
    for index, region in enumerate(regions):
        monkeypatch.setattr(prewarm_module, "time", CrashingTime())
        ti = FakeTI(map_index=index)
        with pytest.raises(Crash):
            create_op(region_id=region).execute(make_context(ti))
        assert create_op(region_id=region).execute(make_context(ti.retry()))["region_id"] == region

    for region in regions:
        assert len(tasks_for(emulator, region)) == 1, region


def test_lost_create_answer_is_found_instead_of_created_twice(
    emulator: EmulatorServer, set_conn: Callable[..., None]
) -> None:
    set_conn(host=emulator.base_url, password=emulator.api_key, extra={"timeout": 0.5})
    emulator.control.inject_fault("trickle", method="POST", path_prefix=TASKS, interval=0.4)

    result = create_op().execute(make_context())

    assert result["status"]["status"] == "succeeded"
    assert [t["task_id"] for t in emulator.control.tasks()] == [result["task_id"]]
    # The emulator logs the trickled POST only when it gives up on it; wait, so the next test starts clean.
    deadline = time.monotonic() + 10
    while not creates(emulator) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(creates(emulator)) == 1


def test_without_wait_for_quota_a_quota_error_fails_the_operator_without_creating(emulator: EmulatorServer) -> None:
    emulator.control.configure(quota=1, running_seconds=60)
    emulator.control.seed_task(task_id="pwt-busy", state="running")

    with pytest.raises(PPIOQuotaExceededError, match="5 by default"):
        create_op(wait_for_quota=False).execute(make_context())
    assert [t["task_id"] for t in emulator.control.tasks()] == ["pwt-busy"]


def test_a_create_waits_for_a_free_quota_slot_and_creates_once_one_frees(emulator: EmulatorServer) -> None:
    emulator.control.configure(quota=1, pending_seconds=0, running_seconds=1)
    busy = [{"state": "running", "seconds": 1}, {"state": "succeeded", "seconds": None}]
    emulator.control.seed_task(task_id="pwt-busy", timeline=busy)  # holds the only slot for about 1 s

    result = create_op().execute(make_context())

    assert result["status"]["status"] == "succeeded"
    log = [entry for entry in emulator.control.requests_log() if entry["method"] == "POST"]
    assert any(entry["status"] == 400 for entry in log) and log[-1]["status"] != 400
    assert len([t for t in emulator.control.tasks() if t["task_id"] != "pwt-busy"]) == 1


def test_deferrable_create_completes_through_the_trigger(emulator: EmulatorServer) -> None:
    from airflow.providers.common.compat.sdk import TaskDeferred

    ti = FakeTI()
    op = create_op(deferrable=True)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(make_context(ti))

    async def first_event() -> dict[str, Any]:
        async for event in deferred.value.trigger.run():
            payload: dict[str, Any] = event.payload
            return payload
        raise AssertionError("no event")

    event = asyncio.run(first_event())
    result = op.execute_complete(make_context(ti), event, **(deferred.value.kwargs or {}))

    assert result["status"]["status"] == "succeeded"
    assert result["task_id"] == ti.xcoms[XCOM_PREWARM_TASK_ID]
    assert len(creates(emulator)) == 1


# -- delete operator ---------------------------------------------------------------------------------------


def test_delete_operator_cleans_up_and_tolerates_unknown_ids(emulator: EmulatorServer) -> None:
    for task_id in ("pwt-a", "pwt-b"):
        emulator.control.seed_task(task_id=task_id, state="succeeded")
    op = PPIODeletePrewarmTasksOperator(task_id="cleanup", prewarm_task_ids=["pwt-a", {"task_id": "pwt-b"}, "pwt-x"])

    # The emulator, like the batch endpoint as far as its docs say, accepts unknown ids in a batch silently.
    assert op.execute(make_context()) == {"deleted": ["pwt-a", "pwt-b", "pwt-x"], "not_found": []}
    assert emulator.control.tasks() == []


def test_delete_operator_fail_on_missing(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pwt-a", state="succeeded")
    op = PPIODeletePrewarmTasksOperator(task_id="cleanup", prewarm_task_ids=["pwt-a", "pwt-x"], fail_on_missing=True)

    with pytest.raises(PPIONotFoundError, match="pwt-x"):
        op.execute(make_context())
    assert [t["task_id"] for t in emulator.control.tasks()] == ["pwt-a"]


# -- clear, kill, 409, quota words ------------------------------------------------------------------------


def test_a_clear_prewarms_again_and_each_teardown_deletes_only_its_own(emulator: EmulatorServer) -> None:
    ti = FakeTI()
    first = create_op().execute(make_context(ti))
    first_id = ti.xcoms[XCOM_PREWARM_TASK_ID]

    second = create_op().execute(make_context(ti.clear()))
    teardown = PPIODeletePrewarmTasksOperator(task_id="cleanup", prewarm_task_ids=ti.xcoms[XCOM_PREWARM_TASK_ID])
    teardown.execute(make_context())

    assert first["task_id"] == first_id != second["task_id"]
    assert len(creates(emulator)) == 2
    assert [t["task_id"] for t in emulator.control.tasks()] == [first_id]


def test_a_409_with_no_task_to_find_fails_with_the_409(emulator: EmulatorServer) -> None:
    from airflow_provider_ppio.exceptions import PPIOError

    emulator.control.inject_fault("status", method="POST", path_prefix=TASKS, status=409)

    with pytest.raises(PPIOError) as info:
        create_op().execute(make_context())
    assert info.value.http_status == 409
    assert emulator.control.tasks() == []


def test_on_kill_deletes_the_prewarm_this_try_started(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator.control.configure(running_seconds=60)
    op = create_op()
    killed = CrashingTime()
    monkeypatch.setattr(prewarm_module, "time", killed)
    ti = FakeTI()
    with pytest.raises(Crash):  # SIGTERM arrives mid-wait; Airflow then calls on_kill on the same operator
        op.execute(make_context(ti))

    op.on_kill()

    assert ti.xcoms[XCOM_PREWARM_TASK_ID] not in {t["task_id"] for t in emulator.control.tasks()}
    assert emulator.control.tasks() == []


def test_on_kill_keeps_the_prewarm_when_the_user_opts_out(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator.control.configure(running_seconds=60)
    op = create_op(delete_on_kill=False)
    monkeypatch.setattr(prewarm_module, "time", CrashingTime())
    with pytest.raises(Crash):
        op.execute(make_context())

    op.on_kill()

    assert len(emulator.control.tasks()) == 1


def test_on_kill_never_deletes_a_reused_prewarm(emulator: EmulatorServer) -> None:
    digest = "registry.example.com/acme/llm-server@sha256:" + "d" * 64
    emulator.control.seed_task(task_id="pwt-other-run", image=digest, region_id="region-a", state="succeeded")
    op = create_op(image=digest, reuse_prewarmed=True)
    ti = FakeTI()
    assert op.execute(make_context(ti))["reused"] is True

    op.on_kill()

    assert ti.xcoms[XCOM_PREWARM_TASK_ID] == NO_PREWARM_TASK_ID
    assert [t["task_id"] for t in emulator.control.tasks()] == ["pwt-other-run"]


def kill(trigger: Any) -> None:
    """What Airflow 3.3's triggerer does to a trigger whose task is killed, or that moves to another triggerer."""
    on_kill = getattr(trigger, "on_kill", None)  # Airflow 2's triggers have none
    if on_kill is not None:
        asyncio.run(on_kill())


def test_the_deferred_creates_trigger_leaves_its_prewarm_on_kill(emulator: EmulatorServer) -> None:
    from airflow.providers.common.compat.sdk import TaskDeferred

    emulator.control.configure(running_seconds=60)
    with pytest.raises(TaskDeferred) as deferred:
        create_op(deferrable=True).execute(make_context())
    kill(deferred.value.trigger)  # Airflow 3.3.2 does it on a triggerer hand-over too

    assert len(emulator.control.tasks()) == 1


def test_the_sensors_trigger_never_deletes_on_kill(emulator: EmulatorServer) -> None:
    from airflow_provider_ppio.triggers.prewarm import PrewarmTaskTrigger

    emulator.control.seed_task(task_id="pwt-watched", state="running")
    kill(PrewarmTaskTrigger(prewarm_task_id="pwt-watched", poke_interval=1))  # as the sensor builds it

    assert [t["task_id"] for t in emulator.control.tasks()] == ["pwt-watched"]
