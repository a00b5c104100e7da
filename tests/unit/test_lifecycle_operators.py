"""
The create and delete operators and the prewarm assets, against a small stateful API on requests-mock.

Crash-then-retry tests run ``execute`` twice on one ``FakeTI``, the way Airflow runs a retried task instance:
a first try that dies mid-wait, then a second one (``FakeTI.retry``) that must not start a second prewarm;
``FakeTI.clear`` does what ``airflow tasks clear`` does to ``max_tries``.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from typing import Any

import pytest
import requests
import requests_mock as rm
from airflow import __version__ as AIRFLOW_VERSION
from airflow.providers.common.compat.sdk import AirflowFailException
from packaging.version import Version

from airflow_provider_ppio.assets import (
    attach_prewarm_asset_events,
    normalize_prewarm_asset_uri,
    parse_prewarm_asset_uri,
    prewarm_asset,
    prewarm_asset_extra,
    prewarm_asset_uri,
)
from airflow_provider_ppio.exceptions import (
    PPIOAuthError,
    PPIOInvalidInputError,
    PPIONotFoundError,
    PPIOQuotaExceededError,
)
from airflow_provider_ppio.operators import prewarm as prewarm_module
from airflow_provider_ppio.operators.prewarm import (
    MARKER_LENGTH,
    NO_PREWARM_TASK_ID,
    NOTE_MAX_LENGTH,
    XCOM_PREWARM_TASK,
    XCOM_PREWARM_TASK_ID,
    PPIOCreatePrewarmTaskOperator,
    PPIODeletePrewarmTasksOperator,
    collect_prewarm_task_ids,
    idempotency_marker,
)
from tests.conftest import task_json

TASKS = "https://api.ppio.test/gpus/v2/prewarm-tasks"
ONE_TASK = re.compile(re.escape(TASKS) + r"/(?P<id>[^/?]+)$")
IMAGE = "registry.example.com/team/llama:1.0"
REGION = "us-east-1"


# -- a stateful API, a task instance, a clock ----------------------------------------------------------


class FakeAPI:
    """
    Just enough of the prewarm API for the operators: each created task walks through ``script``.

    :param m: The requests-mock mocker to register on.
    """

    def __init__(self, m: rm.Mocker) -> None:
        self.tasks: dict[str, dict[str, Any]] = {}
        self.scripts: dict[str, list[str]] = {}
        self.script = ["pending", "running", "succeeded"]
        self.creates = 0
        self.lists = 0
        self.reads: list[str] = []
        self.deleted: list[str] = []
        self.fail_reads: list[int] = []  # HTTP statuses to answer the next reads with
        self.lose_create_answer = ""  # "timeout" or "502": the task is created, the answer lost
        self.on_read: Callable[[str], None] | None = None
        m.post(TASKS, json=self._create)
        m.get(TASKS, json=self._list)
        m.get(ONE_TASK, json=self._get)
        m.delete(TASKS, json=self._delete)

    def add(self, task_id: str, status: str, **fields: Any) -> dict[str, Any]:
        task = task_json(task_id, status, **{"image": IMAGE, "region_id": REGION, **fields})
        task["created_at"] = fields.get("created_at", 1_767_225_600 + len(self.tasks))
        self.tasks[task_id] = task
        self.scripts[task_id] = [status]
        return task

    def _create(self, request: Any, context: Any) -> dict[str, Any]:
        body = request.json()
        self.creates += 1
        task_id = f"pw-{self.creates}"
        self.add(task_id, self.script[0], **body)
        self.scripts[task_id] = list(self.script)
        if self.lose_create_answer == "timeout":
            self.lose_create_answer = ""
            raise requests.exceptions.ReadTimeout("the answer got lost")
        if self.lose_create_answer in ("502", "408", "409"):
            context.status_code = int(self.lose_create_answer)
            self.lose_create_answer = ""
            return {"message": "lost"}
        return {"task_id": task_id}

    def _list(self, request: Any, context: Any) -> dict[str, Any]:
        self.lists += 1
        name = request.qs.get("name", [""])[0].lower()
        region = request.qs.get("region_id", [""])[0].lower()
        status = request.qs.get("status", [""])[0].lower()
        data = [
            t
            for t in self.tasks.values()
            if (not region or t["region_id"].lower() == region)
            and (not status or t["status"]["status"] == status)
            and (not name or any(name in str(t[f]).lower() for f in ("name", "image", "note")))
        ]
        return {"data": data, "next_cursor": "", "has_more": False}

    def _get(self, request: Any, context: Any) -> dict[str, Any]:
        task_id = ONE_TASK.match(request.url).group("id")  # type: ignore[union-attr]
        self.reads.append(task_id)
        if self.on_read is not None:
            self.on_read(task_id)
        if self.fail_reads:
            context.status_code = self.fail_reads.pop(0)
            return {"message": "trouble"}
        if task_id not in self.tasks:
            context.status_code = 404
            return {"message": "not found"}
        script = self.scripts[task_id]
        status = script.pop(0) if len(script) > 1 else script[0]
        task = self.tasks[task_id]
        task["status"] = {"status": status, "error": "", "message": ""}
        if status == "failed":
            task["status"].update(error="ImagePullFailed", message="manifest unknown")
            task["reason"] = ["tag does not exist"]
        if status == "succeeded":
            task["completed_at"] = task["created_at"] + 60
        return task

    def _delete(self, request: Any, context: Any) -> dict[str, Any]:
        for task_id in request.json()["task_ids"]:
            if self.tasks.pop(task_id, None) is not None:
                self.deleted.append(task_id)
        return {}


class FakeTI:
    """The task instance attributes and XCom calls the operators use."""

    def __init__(
        self, run_id: str = "manual__1", map_index: int = -1, task_id: str = "prewarm", retries: int = 2
    ) -> None:
        self.dag_id = "lifecycle"
        self.task_id = task_id
        self.run_id = run_id
        self.map_index = map_index
        self.retries = retries
        self.try_number = 1
        self.max_tries = retries  # what Airflow sets when it creates the task instance
        self.stats_tags: dict[str, str] = {}
        self.xcoms: dict[str, Any] = {}

    def retry(self) -> FakeTI:
        """The next try: Airflow drops the try's XComs; max_tries stays."""
        self.try_number += 1
        self.xcoms = {}
        return self

    def clear(self) -> FakeTI:
        """``airflow tasks clear``: max_tries = try_number + retries (clear_task_instances), then a new try."""
        self.max_tries = self.try_number + self.retries
        return self.retry()

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value

    def xcom_pull(self, task_ids: str, key: str, map_indexes: int | None = None) -> Any:
        assert (task_ids, map_indexes) == (self.task_id, self.map_index), "only its own XComs"
        return self.xcoms.get(key)


class Crash(BaseException):
    """The worker dying: not an Exception, so nothing in the operator can swallow it."""


class Clock:
    """Replaces the operator module's ``time``: sleeping advances the clock, and may crash the worker."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.sleeps: list[float] = []
        self.crash_on_sleep: int | None = None
        self.on_sleep: Callable[[], None] | None = None

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.on_sleep is not None:
            self.on_sleep()
        if self.crash_on_sleep is not None and len(self.sleeps) >= self.crash_on_sleep:
            self.crash_on_sleep = None
            raise Crash
        self.now += seconds


@pytest.fixture
def api(ppio_conn: str, requests_mock: rm.Mocker) -> FakeAPI:
    return FakeAPI(requests_mock)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(prewarm_module, "time", fake)
    return fake


def outlet_events() -> Any:
    if Version(AIRFLOW_VERSION).major >= 3:
        from airflow.sdk.execution_time.context import OutletEventAccessors
    else:
        from airflow.utils.context import OutletEventAccessors
    return OutletEventAccessors()


def make_context(ti: FakeTI | None = None) -> dict[str, Any]:
    return {"ti": ti or FakeTI(), "outlet_events": outlet_events()}


def create_op(**kwargs: Any) -> PPIOCreatePrewarmTaskOperator:
    defaults: dict[str, Any] = {
        "task_id": "prewarm",
        "image": IMAGE,
        "region_id": REGION,
        "poke_interval": 10,
        "deferrable": False,
    }
    return PPIOCreatePrewarmTaskOperator(**{**defaults, **kwargs})


def run_to_crash(op: PPIOCreatePrewarmTaskOperator, context: dict[str, Any], clock: Clock) -> None:
    """The first try: dies at its first wait."""
    clock.crash_on_sleep = 1
    with pytest.raises(Crash):
        op.execute(context)


# -- create: the happy paths ---------------------------------------------------------------------------


def test_create_waits_and_returns_the_succeeded_task(api: FakeAPI, clock: Clock) -> None:
    ti = FakeTI()
    op = create_op(product_ids=["gpu-4090"], registry_auth_id="auth-1", note="for llama")

    result = op.execute(make_context(ti))

    assert api.creates == 1
    created = api.tasks["pw-1"]
    assert created["product_ids"] == ["gpu-4090"]
    assert created["registry_auth_id"] == "auth-1"
    assert created["note"] == f"for llama {idempotency_marker({'ti': ti})}"
    assert result["task_id"] == "pw-1"
    assert result["status"]["status"] == "succeeded"
    assert result["completed_at"] > 0
    assert clock.sleeps == [10, 10]  # pending, running, then succeeded
    assert ti.xcoms[XCOM_PREWARM_TASK_ID] == "pw-1"


def test_create_pushes_id_and_details_before_waiting(api: FakeAPI, clock: Clock) -> None:
    ti = FakeTI()
    seen_at_first_wait: dict[str, Any] = {}
    clock.on_sleep = lambda: seen_at_first_wait.update(ti.xcoms) if not seen_at_first_wait else None

    create_op().execute(make_context(ti))

    assert seen_at_first_wait[XCOM_PREWARM_TASK_ID] == "pw-1"
    assert seen_at_first_wait[XCOM_PREWARM_TASK]["task_id"] == "pw-1"
    assert seen_at_first_wait[XCOM_PREWARM_TASK]["status"]["status"] == "pending"


def test_create_without_waiting_returns_the_new_task(api: FakeAPI, clock: Clock) -> None:
    ti = FakeTI()

    result = create_op(wait_for_completion=False).execute(make_context(ti))

    assert result["task_id"] == "pw-1"
    assert result["status"]["status"] == "pending"
    assert clock.sleeps == []
    assert ti.xcoms[XCOM_PREWARM_TASK_ID] == "pw-1"
    assert ti.xcoms[XCOM_PREWARM_TASK] == result


def test_failed_prewarm_fails_the_task_with_the_api_reasons(api: FakeAPI, clock: Clock) -> None:
    from airflow.providers.common.compat.sdk import AirflowFailException

    api.script = ["running", "failed"]

    with pytest.raises(AirflowFailException, match=r"ImagePullFailed.*manifest unknown.*tag does not exist"):
        create_op().execute(make_context())


def test_transient_read_errors_keep_the_wait_going(api: FakeAPI, clock: Clock) -> None:
    api.script = ["running", "succeeded"]
    api.fail_reads = [503] * 5  # outlasts the hook's 5 attempts once

    result = create_op().execute(make_context())

    assert result["status"]["status"] == "succeeded"
    assert api.creates == 1


def test_permanent_read_errors_fail_the_task(api: FakeAPI, clock: Clock) -> None:
    api.fail_reads = [401]

    with pytest.raises(PPIOAuthError):
        create_op().execute(make_context())


def test_unknown_status_keeps_waiting(api: FakeAPI, clock: Clock) -> None:
    api.script = ["queued-for-node", "succeeded"]

    result = create_op().execute(make_context())

    assert result["status"]["status"] == "succeeded"
    assert len(clock.sleeps) == 1


def test_timeout_fails_the_task_and_leaves_the_prewarm(api: FakeAPI, clock: Clock) -> None:
    from airflow.providers.common.compat.sdk import AirflowFailException

    api.script = ["running"]

    with pytest.raises(AirflowFailException, match=r"did not finish within 25s.*running"):
        create_op(timeout=datetime.timedelta(seconds=25)).execute(make_context())
    assert sum(clock.sleeps) == pytest.approx(25)
    assert api.deleted == []
    assert "pw-1" in api.tasks


def test_without_wait_for_quota_the_quota_error_reaches_the_user_at_once(
    requests_mock: rm.Mocker, ppio_conn: str, clock: Clock
) -> None:
    requests_mock.get(TASKS, json={"data": [], "next_cursor": "", "has_more": False})
    requests_mock.post(TASKS, status_code=400, json={"message": "prewarm task quota exceeded"})

    with pytest.raises(PPIOQuotaExceededError, match="5 by default"):
        create_op(wait_for_quota=False).execute(make_context())
    assert clock.sleeps == []


@pytest.mark.parametrize(
    "kwargs",
    [{"poke_interval": 0}, {"poke_interval": -1}, {"timeout": 0}, {"timeout": datetime.timedelta(0)}],
)
def test_create_rejects_non_positive_intervals(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="positive"):
        create_op(**kwargs)


def test_outlets_need_wait_for_completion() -> None:
    with pytest.raises(ValueError, match="wait_for_completion"):
        create_op(wait_for_completion=False, outlets=[prewarm_asset(REGION, IMAGE)])


# -- create: idempotency across task retries ------------------------------------------------------------


def test_retry_after_crash_finds_the_task_by_marker(api: FakeAPI, clock: Clock) -> None:
    ti = FakeTI()
    run_to_crash(create_op(), make_context(ti), clock)

    result = create_op().execute(make_context(ti.retry()))

    assert api.creates == 1
    assert result["task_id"] == "pw-1"
    assert result["status"]["status"] == "succeeded"
    assert ti.xcoms[XCOM_PREWARM_TASK_ID] == "pw-1"


def test_retry_after_success_returns_the_same_task_at_once(api: FakeAPI, clock: Clock) -> None:
    ti = FakeTI()
    create_op().execute(make_context(ti))
    sleeps = len(clock.sleeps)

    result = create_op().execute(make_context(ti.retry()))

    assert api.creates == 1
    assert result["task_id"] == "pw-1"
    assert len(clock.sleeps) == sleeps
    assert ti.xcoms[XCOM_PREWARM_TASK_ID] == "pw-1"


def test_a_clear_prewarms_a_tag_again(api: FakeAPI, clock: Clock) -> None:
    ti = FakeTI()
    first = create_op().execute(make_context(ti))

    second = create_op().execute(make_context(ti.clear()))

    assert api.creates == 2
    assert (first["task_id"], second["task_id"]) == ("pw-1", "pw-2")
    assert ti.xcoms[XCOM_PREWARM_TASK_ID] == "pw-2"
    assert api.tasks["pw-2"]["note"] != api.tasks["pw-1"]["note"]


def test_a_retry_after_a_clear_keeps_the_cleared_runs_prewarm(api: FakeAPI, clock: Clock) -> None:
    ti = FakeTI()
    create_op().execute(make_context(ti))
    run_to_crash(create_op(), make_context(ti.clear()), clock)

    result = create_op().execute(make_context(ti.retry()))

    assert api.creates == 2
    assert result["task_id"] == "pw-2"


def test_a_cleared_digest_reuses_its_earlier_prewarm_and_the_teardown_leaves_it(api: FakeAPI, clock: Clock) -> None:
    image = "registry.example.com/team/llama@sha256:" + "a" * 64
    ti = FakeTI()
    create_op(image=image, reuse_prewarmed=True).execute(make_context(ti))
    assert ti.xcoms[XCOM_PREWARM_TASK_ID] == "pw-1"

    result = create_op(image=image, reuse_prewarmed=True).execute(make_context(ti.clear()))

    assert api.creates == 1
    assert result["reused"] is True
    assert ti.xcoms[XCOM_PREWARM_TASK_ID] == NO_PREWARM_TASK_ID
    assert delete_op(ti.xcoms[XCOM_PREWARM_TASK_ID]).execute({}) == {"deleted": [], "not_found": []}
    assert api.deleted == []


def test_a_reused_prewarm_stays_reused_on_every_retry_and_clear(api: FakeAPI, clock: Clock) -> None:
    # The reproduction: a reuse must never turn into a pushed prewarm_task_id on a later try.
    image = "registry.example.com/team/llama@sha256:" + "b" * 64
    api.add("pw-shared", "succeeded", image=image, completed_at=1_767_225_700)
    ti = FakeTI()
    for step in (lambda: ti, ti.retry, ti.clear, ti.retry):
        result = create_op(image=image, reuse_prewarmed=True).execute(make_context(step()))
        assert result["task_id"] == "pw-shared" and result["reused"] is True
        assert ti.xcoms[XCOM_PREWARM_TASK_ID] == NO_PREWARM_TASK_ID
        delete_op(ti.xcoms[XCOM_PREWARM_TASK_ID]).execute({})
    assert api.creates == 0
    assert api.deleted == []


def test_a_retry_prefers_its_own_prewarm_to_a_warm_one(api: FakeAPI, clock: Clock) -> None:
    # Its own (by marker) comes first, so the teardown deletes what this task instance started.
    image = "registry.example.com/team/llama@sha256:" + "c" * 64
    ti = FakeTI()
    run_to_crash(create_op(image=image, reuse_prewarmed=True), make_context(ti), clock)
    api.add("pw-elsewhere", "succeeded", image=image, completed_at=1_767_225_700)

    result = create_op(image=image, reuse_prewarmed=True).execute(make_context(ti.retry()))

    assert result["task_id"] == "pw-1" and "reused" not in result
    assert ti.xcoms[XCOM_PREWARM_TASK_ID] == "pw-1"


def test_a_try_that_fails_before_creating_leaves_an_empty_id_for_the_teardown(
    requests_mock: rm.Mocker, ppio_conn: str, clock: Clock
) -> None:
    ti = FakeTI()
    ti.xcoms[XCOM_PREWARM_TASK_ID] = "pw-from-an-earlier-try"  # a stale value must not survive the try's start
    requests_mock.get(TASKS, json={"data": [], "next_cursor": "", "has_more": False})
    requests_mock.post(TASKS, status_code=400, json={"message": "prewarm task quota exceeded"})

    with pytest.raises(PPIOQuotaExceededError):
        create_op(wait_for_quota=False).execute(make_context(ti))

    assert ti.xcoms[XCOM_PREWARM_TASK_ID] == NO_PREWARM_TASK_ID
    assert delete_op(ti.xcoms[XCOM_PREWARM_TASK_ID]).execute({}) == {"deleted": [], "not_found": []}


def test_a_failed_earlier_prewarm_is_not_reused(api: FakeAPI, clock: Clock) -> None:
    ti = FakeTI()
    api.add("pw-failed", "failed", note=idempotency_marker({"ti": ti}))

    result = create_op().execute(make_context(ti))

    assert api.creates == 1
    assert result["task_id"] == "pw-1"


def test_a_prewarm_of_another_image_or_task_instance_is_not_reused(api: FakeAPI, clock: Clock) -> None:
    ti = FakeTI()
    marker = idempotency_marker({"ti": ti})
    api.add("pw-other-image", "running", note=marker, image="registry.example.com/other:2")
    api.add("pw-other-run", "running", note=idempotency_marker({"ti": FakeTI(run_id="manual__2")}))

    result = create_op().execute(make_context(ti))

    assert api.creates == 1
    assert result["task_id"] == "pw-1"


def test_reuse_can_be_turned_off(api: FakeAPI, clock: Clock) -> None:
    ti = FakeTI()
    api.add("pw-mine", "running", note=idempotency_marker({"ti": ti}))

    create_op(reuse_existing=False).execute(make_context(ti))

    assert api.creates == 1
    assert api.lists == 0


@pytest.mark.parametrize("how", ["timeout", "502", "408", "409"])
def test_a_lost_create_answer_is_recovered_without_a_second_create(api: FakeAPI, clock: Clock, how: str) -> None:
    api.lose_create_answer = how

    result = create_op().execute(make_context())

    assert api.creates == 1
    assert result["task_id"] == "pw-1"


def test_a_lost_create_answer_without_a_task_raises_the_create_error(
    requests_mock: rm.Mocker, ppio_conn: str, clock: Clock
) -> None:
    from airflow_provider_ppio.exceptions import PPIOServerError

    requests_mock.get(TASKS, json={"data": [], "next_cursor": "", "has_more": False})
    requests_mock.post(TASKS, status_code=503, json={"message": "unavailable"})

    with pytest.raises(PPIOServerError, match="503"):
        create_op().execute(make_context())
    assert len([r for r in requests_mock.request_history if r.method == "POST"]) == 1


def test_markers_differ_per_map_index_run_and_clear_but_not_per_try() -> None:
    first = idempotency_marker({"ti": FakeTI()})
    ti = FakeTI()

    assert idempotency_marker({"ti": ti.retry().retry()}) == first
    cleared = idempotency_marker({"ti": ti.clear()})
    assert cleared != first
    assert idempotency_marker({"ti": ti.retry()}) == cleared
    assert idempotency_marker({"ti": ti.clear()}) not in (first, cleared)
    assert idempotency_marker({"ti": FakeTI(map_index=0)}) != first
    assert idempotency_marker({"ti": FakeTI(map_index=0)}) != idempotency_marker({"ti": FakeTI(map_index=1)})
    assert idempotency_marker({"ti": FakeTI(run_id="manual__2")}) != first
    assert idempotency_marker({"ti": FakeTI(task_id="other")}) != first
    assert re.fullmatch(r"af-[0-9a-f]{16}", first)
    assert len(first) == MARKER_LENGTH


def test_mapped_regions_each_get_their_own_prewarm_across_retries(api: FakeAPI, clock: Clock) -> None:
    regions = ["region-a", "region-b", "region-c"]
    for index, region in enumerate(regions):
        ti = FakeTI(map_index=index)
        run_to_crash(create_op(region_id=region), make_context(ti), clock)
        create_op(region_id=region).execute(make_context(ti.retry()))

    assert api.creates == 3
    assert sorted(t["region_id"] for t in api.tasks.values()) == regions


# -- create: deferrable ----------------------------------------------------------------------------------


def test_deferrable_create_defers_to_the_trigger_after_pushing_the_id(api: FakeAPI, clock: Clock) -> None:
    from airflow.providers.common.compat.sdk import TaskDeferred

    from airflow_provider_ppio.triggers.prewarm import PrewarmTaskTrigger

    ti = FakeTI()
    with pytest.raises(TaskDeferred) as deferred:
        create_op(deferrable=True, poke_interval=15, timeout=600).execute(make_context(ti))

    trigger = deferred.value.trigger
    assert isinstance(trigger, PrewarmTaskTrigger)
    assert trigger.prewarm_task_id == "pw-1"
    assert trigger.poke_interval == 15
    assert trigger.deadline == pytest.approx(clock.now + 600)
    assert deferred.value.method_name == "execute_complete"
    assert deferred.value.kwargs == {"prewarm_task_id": "pw-1"}
    assert ti.xcoms[XCOM_PREWARM_TASK_ID] == "pw-1"
    assert clock.sleeps == []


def test_deferrable_create_does_not_defer_when_already_done(api: FakeAPI, clock: Clock) -> None:
    api.script = ["succeeded"]

    result = create_op(deferrable=True).execute(make_context())

    assert result["status"]["status"] == "succeeded"


def test_deferrable_create_defers_on_transient_trouble(api: FakeAPI, clock: Clock) -> None:
    from airflow.providers.common.compat.sdk import TaskDeferred

    api.fail_reads = [503] * 5

    with pytest.raises(TaskDeferred):
        create_op(deferrable=True).execute(make_context())
    assert clock.sleeps == []


def success_event(task_id: str = "pw-1", **fields: Any) -> dict[str, Any]:
    task = task_json(task_id, "succeeded", image=IMAGE, region_id=REGION, completed_at=1_767_225_700, **fields)
    return {"status": "success", "prewarm_task_id": task_id, "message": "ok", "task": task}


def test_execute_complete_returns_the_task_and_emits_asset_events() -> None:
    from airflow.providers.common.compat.sdk import AssetAlias

    alias = AssetAlias(name="ppio-prewarm")
    asset = prewarm_asset(REGION, IMAGE)
    op = create_op(deferrable=True, outlets=[asset, alias])
    context = make_context()

    result = op.execute_complete(context, success_event(), prewarm_task_id="pw-1")

    assert result["task_id"] == "pw-1"
    assert context["outlet_events"][asset].extra["task_id"] == "pw-1"
    alias_events = _alias_events(context["outlet_events"][alias])
    assert len(alias_events) == 1
    assert _alias_extra(alias_events[0])["completed_at"] == 1_767_225_700


def test_execute_complete_without_defer_kwargs_checks_the_id_pushed_before_deferring() -> None:
    from airflow.providers.common.compat.sdk import AirflowException

    ti = FakeTI()
    ti.xcoms[XCOM_PREWARM_TASK_ID] = "pw-1"
    op = create_op(deferrable=True)

    assert op.execute_complete(make_context(ti), success_event())["task_id"] == "pw-1"
    with pytest.raises(AirflowException, match="does not understand"):
        op.execute_complete(make_context(ti), success_event("pw-2"))


def failed_event() -> dict[str, Any]:
    task = task_json("pw-1", "failed", error="ImagePullFailed", message="manifest unknown", reason=["no such tag"])
    return {"status": "failed", "prewarm_task_id": "pw-1", "message": "manifest unknown", "task": task}


@pytest.mark.parametrize(
    ("event", "error", "match"),
    [
        (failed_event(), "fail", "ImagePullFailed.*no such tag"),
        ({"status": "timeout", "prewarm_task_id": "pw-1", "message": "did not finish"}, "fail", "left as it is"),
        (
            {"status": "error", "prewarm_task_id": "pw-1", "message": "HTTP 401", "error_type": "PPIOAuthError"},
            "auth",
            "401",
        ),
        ({"status": "weird", "prewarm_task_id": "pw-1"}, "airflow", "does not understand"),
        (None, "airflow", "does not understand"),
        ({**success_event(), "prewarm_task_id": "pw-other"}, "airflow", "does not understand"),
        (success_event("pw-other") | {"prewarm_task_id": "pw-1"}, "airflow", "'pw-other'"),
        ({**success_event(), "task": task_json("pw-1", "running")}, "airflow", "'running'"),
        ({**success_event(), "task": {"no": "id"}}, "bad", "task_id"),
    ],
    ids=["failed", "timeout", "error", "unknown", "none", "other-id", "other-task", "not-done", "bad-task"],
)
def test_execute_complete_fails_closed(event: Any, error: str, match: str) -> None:
    from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException

    from airflow_provider_ppio.exceptions import PPIOBadResponseError

    expected = {
        "fail": AirflowFailException,
        "auth": PPIOAuthError,
        "airflow": AirflowException,
        "bad": PPIOBadResponseError,
    }[error]
    op = create_op(deferrable=True)
    with pytest.raises(expected, match=match):
        op.execute_complete(make_context(), event, prewarm_task_id="pw-1")


# -- delete ----------------------------------------------------------------------------------------------


def delete_op(ids: Any, **kwargs: Any) -> PPIODeletePrewarmTasksOperator:
    return PPIODeletePrewarmTasksOperator(task_id="cleanup", prewarm_task_ids=ids, **kwargs)


def test_delete_takes_ids_and_details_in_any_mix(api: FakeAPI, requests_mock: rm.Mocker) -> None:
    for task_id in ("pw-a", "pw-b", "pw-c"):
        api.add(task_id, "succeeded")

    result = delete_op(["pw-a", {"task_id": "pw-b"}, None, "", ["pw-c", "pw-a"]]).execute(make_context())

    assert result == {"deleted": ["pw-a", "pw-b", "pw-c"], "not_found": []}
    assert api.deleted == ["pw-a", "pw-b", "pw-c"]
    deletes = [r for r in requests_mock.request_history if r.method == "DELETE"]
    assert [r.json() for r in deletes] == [{"task_ids": ["pw-a", "pw-b", "pw-c"]}]


def test_delete_of_nothing_calls_nothing(api: FakeAPI, requests_mock: rm.Mocker) -> None:
    assert delete_op([]).execute(make_context()) == {"deleted": [], "not_found": []}
    assert delete_op(None).execute(make_context()) == {"deleted": [], "not_found": []}
    assert requests_mock.call_count == 0


def test_unknown_ids_the_api_refuses_are_skipped(ppio_conn: str, requests_mock: rm.Mocker) -> None:
    known = {"pw-a", "pw-c"}

    def answer(request: Any, context: Any) -> dict[str, Any]:
        if set(request.json()["task_ids"]) - known:
            context.status_code = 404
            return {"message": "prewarm task not found"}
        return {}

    requests_mock.delete(TASKS, json=answer)

    assert delete_op(["pw-a", "pw-gone", "pw-c"]).execute(make_context()) == {
        "deleted": ["pw-a", "pw-c"],
        "not_found": ["pw-gone"],
    }


def test_fail_on_missing_deletes_nothing_when_an_id_is_unknown(api: FakeAPI) -> None:
    api.add("pw-a", "succeeded")

    with pytest.raises(PPIONotFoundError, match="pw-gone"):
        delete_op(["pw-a", "pw-gone"], fail_on_missing=True).execute(make_context())
    assert api.deleted == []


def test_fail_on_missing_deletes_when_all_exist(api: FakeAPI) -> None:
    api.add("pw-a", "running")

    assert delete_op("pw-a", fail_on_missing=True).execute(make_context()) == {"deleted": ["pw-a"], "not_found": []}
    assert api.deleted == ["pw-a"]


def test_delete_rejects_values_that_are_not_ids() -> None:
    with pytest.raises(PPIOInvalidInputError, match="int"):
        collect_prewarm_task_ids(["pw-a", 42])


def test_delete_works_as_a_teardown() -> None:
    op = delete_op(["pw-a"]).as_teardown()
    assert op.is_teardown


# -- assets ----------------------------------------------------------------------------------------------


def test_asset_uri_convention() -> None:
    assert prewarm_asset_uri("region-a", IMAGE) == f"ppio://prewarm/region-a/{IMAGE}"
    digest = "registry.example.com/team/llama@sha256:" + "a" * 64
    assert prewarm_asset_uri("region-a", digest) == f"ppio://prewarm/region-a/{digest}"
    assert prewarm_asset_uri("eu/west 1", IMAGE) == f"ppio://prewarm/eu%2Fwest%201/{IMAGE}"
    assert parse_prewarm_asset_uri(prewarm_asset_uri("eu/west 1", digest)) == ("eu/west 1", digest)
    assert parse_prewarm_asset_uri("s3://bucket/key") is None
    assert parse_prewarm_asset_uri("ppio://prewarm/region-only") is None


@pytest.mark.parametrize(("region", "image"), [("", IMAGE), ("region-a", ""), ("region-a", "x" * 1500)])
def test_asset_uri_rejects_missing_parts(region: str, image: str) -> None:
    with pytest.raises(PPIOInvalidInputError):
        prewarm_asset_uri(region, image)


def test_prewarm_asset_is_an_airflow_asset_with_the_uri() -> None:
    asset = prewarm_asset("region-a", IMAGE)
    assert asset.uri == f"ppio://prewarm/region-a/{IMAGE}"


def test_the_registered_uri_handler_normalizes_and_validates() -> None:
    from urllib.parse import urlsplit

    assert normalize_prewarm_asset_uri(urlsplit(f"ppio://PREWARM/region-a/{IMAGE}")).geturl() == (
        f"ppio://prewarm/region-a/{IMAGE}"
    )
    with pytest.raises(ValueError, match="not a PPIO prewarm asset URI"):
        normalize_prewarm_asset_uri(urlsplit("ppio://instances/region-a"))


def test_provider_info_registers_the_scheme_for_assets_and_datasets() -> None:
    from airflow_provider_ppio.get_provider_info import get_provider_info

    info = get_provider_info()
    handler = "airflow_provider_ppio.assets.normalize_prewarm_asset_uri"
    assert info["asset-uris"] == [{"schemes": ["ppio"], "handler": handler}]
    assert info["dataset-uris"] == info["asset-uris"]


def test_asset_extra_carries_the_prewarm_details() -> None:
    details = task_json("pw-1", "succeeded", image=IMAGE, region_id=REGION, completed_at=1_767_225_700)

    extra = prewarm_asset_extra(details)

    assert extra == {
        "task_id": "pw-1",
        "image": IMAGE,
        "region_id": REGION,
        "image_size": 123456789,
        "completed_at": 1_767_225_700,
        "completed_at_iso": "2026-01-01T00:01:40+00:00",
    }
    # Airflow 2.11 hashes the extra of dataset alias events: every value must be hashable.
    hash(frozenset(extra.items()))  # TypeError on a list or dict value


def test_attach_puts_details_on_own_assets_and_aliases_only() -> None:
    from airflow.providers.common.compat.sdk import Asset, AssetAlias

    own = prewarm_asset(REGION, IMAGE)
    other_region = prewarm_asset("eu-west-1", IMAGE)
    plain = Asset(uri="s3://models/llama-ready")
    alias = AssetAlias(name="ppio-prewarm")
    context = make_context()
    details = task_json("pw-1", "succeeded", image=IMAGE, region_id=REGION, completed_at=1_767_225_700)

    attached = attach_prewarm_asset_events(context, [own, other_region, plain, alias, "not-an-asset"], details)

    events = context["outlet_events"]
    assert events[own].extra["task_id"] == "pw-1"
    assert events[plain].extra["region_id"] == REGION
    assert events[other_region].extra == {}
    alias_events = _alias_events(events[alias])
    assert len(alias_events) == 1
    assert _alias_target_uri(alias_events[0]) == own.uri
    assert _alias_extra(alias_events[0])["image"] == IMAGE
    assert len(attached) == 3


def test_attach_without_outlets_does_nothing() -> None:
    context = make_context()
    assert attach_prewarm_asset_events(context, [], task_json()) == []
    assert attach_prewarm_asset_events({}, [prewarm_asset(REGION, IMAGE)], task_json()) == []


def test_create_attaches_asset_events_only_on_success(api: FakeAPI, clock: Clock) -> None:
    from airflow.providers.common.compat.sdk import AirflowFailException, AssetAlias

    alias = AssetAlias(name="ppio-prewarm")
    context = make_context()
    create_op(outlets=[alias]).execute(context)
    assert len(_alias_events(context["outlet_events"][alias])) == 1

    api.script = ["failed"]
    failed_context = make_context(FakeTI(run_id="manual__2"))
    with pytest.raises(AirflowFailException):
        create_op(outlets=[alias]).execute(failed_context)
    assert _alias_events(failed_context["outlet_events"][alias]) == []


def _alias_events(accessor: Any) -> list[Any]:
    events = accessor.asset_alias_events if hasattr(accessor, "asset_alias_events") else accessor.dataset_alias_events
    return list(events)


def _alias_target_uri(event: Any) -> str:
    # Airflow 3: an attrs object with dest_asset_key; Airflow 2: a TypedDict with dest_dataset_uri.
    return str(event["dest_dataset_uri"] if isinstance(event, dict) else event.dest_asset_key.uri)


def _alias_extra(event: Any) -> dict[str, Any]:
    return dict(event["extra"] if isinstance(event, dict) else event.extra)


def test_poll_interval_is_the_deprecated_name_of_poke_interval() -> None:
    with pytest.warns(DeprecationWarning, match="use poke_interval"):
        op = PPIOCreatePrewarmTaskOperator(task_id="create", image="img:1", region_id="r", poll_interval=7)
    assert op.poke_interval == 7


# -- waiting for a free quota slot ---------------------------------------------------------------------------


QUOTA_REFUSAL = {"status_code": 400, "json": {"message": "prewarm task quota exceeded", "reason": "QUOTA"}}


def refuse_creates(api: FakeAPI, requests_mock: rm.Mocker, refusals: int) -> list[str]:
    """The next ``refusals`` creates are refused for the quota; the ones after succeed. Returns the bodies seen."""
    seen: list[str] = []

    def create(request: Any, context: Any) -> dict[str, Any]:
        seen.append(request.json()["note"])
        if len(seen) <= refusals:
            context.status_code = 400
            return QUOTA_REFUSAL["json"]
        return api._create(request, context)

    requests_mock.post(TASKS, json=create)
    return seen


def test_a_create_refused_for_the_quota_waits_for_a_free_slot_and_creates_then(
    api: FakeAPI, requests_mock: rm.Mocker, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    seen = refuse_creates(api, requests_mock, refusals=3)

    result = create_op(poke_interval=10).execute(make_context())

    assert result["status"]["status"] == "succeeded"
    assert len(seen) == 4 and api.creates == 1  # three refusals, then one prewarm
    quota_waits = clock.sleeps[:3]
    # Backoff from poke_interval, doubling, capped at 4x, with +-20% jitter: 10, 20, 40.
    for wait, base in zip(quota_waits, (10, 20, 40), strict=True):
        assert 0.8 * base <= wait <= 1.2 * base
    assert api.lists >= 4  # this task instance's prewarm was looked for before every create


def test_quota_waits_are_capped_and_end_with_the_timeout(api: FakeAPI, requests_mock: rm.Mocker, clock: Clock) -> None:
    seen = refuse_creates(api, requests_mock, refusals=10_000)

    with pytest.raises(AirflowFailException, match=r"No free prewarm slot .* within the timeout") as info:
        create_op(poke_interval=10, timeout=600).execute(make_context())

    assert not isinstance(info.value, PPIOQuotaExceededError)
    assert max(clock.sleeps) <= 40 * 1.2  # capped at 4x poke_interval: the API is never hammered, never starved
    assert sum(clock.sleeps) == pytest.approx(600)  # the last create was tried right at the deadline
    assert len(seen) == len(clock.sleeps) + 1
    assert api.creates == 0


def test_a_lost_create_answer_after_a_quota_wait_is_found_not_sent_twice(
    api: FakeAPI, requests_mock: rm.Mocker, clock: Clock
) -> None:
    refusals = 1

    def create(request: Any, context: Any) -> dict[str, Any]:
        nonlocal refusals
        if refusals:
            refusals -= 1
            context.status_code = 400
            return QUOTA_REFUSAL["json"]
        api.lose_create_answer = "timeout"
        return api._create(request, context)

    requests_mock.post(TASKS, json=create)

    result = create_op().execute(make_context())

    assert api.creates == 1
    assert result["task_id"] == "pw-1"


def test_deferrable_quota_waits_free_the_worker_and_carry_the_deadline(
    api: FakeAPI, requests_mock: rm.Mocker, clock: Clock
) -> None:
    from airflow.providers.common.compat.sdk import TaskDeferred

    refuse_creates(api, requests_mock, refusals=2)
    op = create_op(deferrable=True, poke_interval=10, timeout=3600)
    context = make_context()

    with pytest.raises(TaskDeferred) as first:
        op.execute(context)
    assert first.value.method_name == "resume_after_quota_wait"
    assert type(first.value.trigger).__name__ == "DateTimeTrigger"
    assert first.value.kwargs["deadline"] == pytest.approx(clock.now + 3600)
    assert clock.sleeps == []  # not held in the worker
    with pytest.raises(TaskDeferred) as second:
        op.resume_after_quota_wait(context, **first.value.kwargs)
    assert second.value.kwargs["quota_attempt"] == 2
    assert second.value.kwargs["deadline"] == first.value.kwargs["deadline"]
    # The third create is accepted: the operator goes on to wait for the prewarm in the triggerer.
    with pytest.raises(TaskDeferred) as waiting:
        op.resume_after_quota_wait(context, **second.value.kwargs)
    assert waiting.value.method_name == "execute_complete"
    assert waiting.value.trigger.deadline == pytest.approx(first.value.kwargs["deadline"])
    assert api.creates == 1


# -- reusing what is already warm ----------------------------------------------------------------------------

DIGEST_IMAGE = "registry.example.com/team/llama@sha256:" + "ab" * 32


def test_a_digest_pinned_image_already_prewarmed_is_reused_whatever_its_age(api: FakeAPI, clock: Clock) -> None:
    api.add("pw-old", "succeeded", image=DIGEST_IMAGE, completed_at=1_000)

    ti = FakeTI()
    result = create_op(image=DIGEST_IMAGE, reuse_prewarmed=True).execute(make_context(ti))

    assert result["task_id"] == "pw-old"
    assert result["reused"] is True
    assert api.creates == 0
    assert ti.xcoms[XCOM_PREWARM_TASK_ID] == NO_PREWARM_TASK_ID  # a teardown deletes nothing of another run's


def test_a_warm_image_found_during_a_quota_wait_is_reused_instead_of_created(
    api: FakeAPI, requests_mock: rm.Mocker, clock: Clock
) -> None:
    refuse_creates(api, requests_mock, refusals=100)
    # While this task waits for a slot, another run finishes prewarming the same image.
    clock.on_sleep = lambda: api.add("pw-other-run", "succeeded", image=DIGEST_IMAGE, completed_at=int(clock.now))

    result = create_op(image=DIGEST_IMAGE, reuse_prewarmed=True).execute(make_context())

    assert result["task_id"] == "pw-other-run" and result["reused"] is True
    assert api.creates == 0 and len(clock.sleeps) == 1


@pytest.mark.parametrize(("age", "reused"), [(60, True), (7200, False)])
def test_a_tag_is_reused_only_within_max_age(api: FakeAPI, clock: Clock, age: int, reused: bool) -> None:
    api.add("pw-old", "succeeded", completed_at=int(clock.now) - age)

    result = create_op(reuse_prewarmed=True, max_age=datetime.timedelta(hours=1)).execute(make_context())

    assert (result["task_id"] == "pw-old") is reused
    assert result.get("reused", False) is reused
    assert api.creates == (0 if reused else 1)


def test_a_tag_without_max_age_is_never_reused(api: FakeAPI, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    api.add("pw-old", "succeeded", completed_at=int(clock.now) - 1)

    result = create_op(reuse_prewarmed=True).execute(make_context())

    assert result["task_id"] == "pw-1" and "reused" not in result
    assert api.creates == 1


def test_another_image_or_region_is_not_reused(api: FakeAPI, clock: Clock) -> None:
    api.add("pw-other-tag", "succeeded", image=DIGEST_IMAGE.replace("ab", "cd"), completed_at=int(clock.now))
    api.add("pw-other-region", "succeeded", image=DIGEST_IMAGE, region_id="eu-west-1", completed_at=int(clock.now))
    api.add("pw-failed", "failed", image=DIGEST_IMAGE, completed_at=int(clock.now))

    result = create_op(image=DIGEST_IMAGE, reuse_prewarmed=True).execute(make_context())

    assert result["task_id"] == "pw-1" and api.creates == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_age": 3600}, "max_age only applies with reuse_prewarmed"),
        ({"reuse_prewarmed": True, "image": "not an image!"}, "needs an image reference"),
        ({"reuse_prewarmed": True, "image": "team/llama@sha256:short"}, "needs an image reference"),
        ({"reuse_prewarmed": True, "max_age": 0}, "max_age must be a positive number"),
    ],
)
def test_bad_reuse_input_is_refused_when_the_dag_is_parsed(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(PPIOInvalidInputError, match=message):
        create_op(**kwargs)


def test_a_templated_bad_image_is_refused_before_any_request(
    requests_mock: rm.Mocker, ppio_conn: str, clock: Clock
) -> None:
    op = create_op(reuse_prewarmed=True, image="{{ params.image }}")
    op.image = "Not A Reference"  # what the template rendered to

    with pytest.raises(PPIOInvalidInputError, match="needs an image reference"):
        op.execute(make_context())
    assert requests_mock.call_count == 0


# -- note length ---------------------------------------------------------------------------------------------


def test_a_note_that_fits_with_the_marker_is_sent_whole(api: FakeAPI, clock: Clock) -> None:
    room = NOTE_MAX_LENGTH - MARKER_LENGTH - 1
    create_op(note="n" * room).execute(make_context())

    assert len(api.tasks["pw-1"]["note"]) == NOTE_MAX_LENGTH


def test_a_note_too_long_with_the_marker_is_refused_when_the_dag_is_parsed() -> None:
    room = NOTE_MAX_LENGTH - MARKER_LENGTH - 1
    with pytest.raises(PPIOInvalidInputError, match=rf"note is {room + 1} characters long; at most {room} fit"):
        create_op(note="n" * (room + 1))


def test_a_templated_note_too_long_is_refused_before_any_request(
    api: FakeAPI, clock: Clock, requests_mock: rm.Mocker
) -> None:
    op = create_op(note="{{ params.note }}")
    op.note = "n" * NOTE_MAX_LENGTH  # what the template rendered to
    ti = FakeTI()

    with pytest.raises(PPIOInvalidInputError, match="at most 100 characters"):
        op.execute(make_context(ti))
    assert requests_mock.request_history == []


# -- on_kill ---------------------------------------------------------------------------------------------------


def test_on_kill_deletes_the_running_prewarm_this_try_started(api: FakeAPI, clock: Clock) -> None:
    api.script = ["running"]
    op, ti = create_op(), FakeTI()
    run_to_crash(op, make_context(ti), clock)

    op.on_kill()

    assert api.deleted == ["pw-1"]


def test_on_kill_after_a_retry_deletes_the_prewarm_the_retry_took_over(api: FakeAPI, clock: Clock) -> None:
    # The retry pushed the earlier try's prewarm as its own prewarm_task_id (same marker): it is this try's to stop.
    api.script = ["running"]
    ti = FakeTI()
    run_to_crash(create_op(), make_context(ti), clock)
    op = create_op()
    run_to_crash(op, make_context(ti.retry()), clock)

    op.on_kill()

    assert api.creates == 1
    assert api.deleted == ["pw-1"]


def test_on_kill_leaves_a_finished_or_reused_prewarm_and_honours_the_opt_out(api: FakeAPI, clock: Clock) -> None:
    image = "registry.example.com/team/llama@sha256:" + "e" * 64
    api.add("pw-warm", "succeeded", image=image, completed_at=1_767_225_700)
    reused = create_op(image=image, reuse_prewarmed=True)
    reused.execute(make_context())
    reused.on_kill()

    done = create_op()
    done.execute(make_context())
    done.on_kill()  # killed after the prewarm succeeded: nothing left to stop

    api.script = ["running"]
    kept = create_op(delete_on_kill=False)
    run_to_crash(kept, make_context(FakeTI(run_id="manual__2")), clock)
    kept.on_kill()

    never_started = create_op()
    never_started.on_kill()

    assert api.deleted == []
    assert set(api.tasks) == {"pw-warm", "pw-1", "pw-2"}


def test_the_read_before_deferring_is_one_attempt(api: FakeAPI, clock: Clock) -> None:
    from airflow.providers.common.compat.sdk import TaskDeferred

    api.fail_reads = [503] * 50  # an outage: waiting it out is the triggerer's job

    with pytest.raises(TaskDeferred) as deferred:
        create_op(deferrable=True).execute(make_context())

    assert len(api.reads) == 5  # the hook's normal attempts, not unreachable_timeout of patience
    assert deferred.value.trigger.prewarm_task_id == "pw-1"


# -- quota wait messages ---------------------------------------------------------------------------------------


def logged_text(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> str:
    """What was logged: stdlib logging (Airflow 2, which also echoes to the console), else the console (Airflow 3)."""
    captured = capsys.readouterr()
    return caplog.text if "quota is used up" in caplog.text else captured.out + captured.err


def test_a_quota_wait_that_times_out_says_finished_tasks_may_count_and_how_to_delete_them(
    api: FakeAPI, requests_mock: rm.Mocker, clock: Clock
) -> None:
    refuse_creates(api, requests_mock, refusals=10_000)

    with pytest.raises(AirflowFailException) as info:
        create_op(poke_interval=10, timeout=120).execute(make_context())

    assert "finished (succeeded or failed) prewarm tasks toward the limit until they are deleted" in str(info.value)
    assert "PPIODeletePrewarmTasksOperator" in str(info.value)


def test_the_quota_wait_warns_once_per_state_and_says_when_waiting_cannot_help(
    api: FakeAPI,
    requests_mock: rm.Mocker,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import logging

    caplog.set_level(logging.INFO)
    refuse_creates(api, requests_mock, refusals=10_000)
    api.add("pw-busy", "running", region_id="another-region")  # any region of the account counts
    api.add("pw-finished", "succeeded")

    def finish_the_busy_one() -> None:
        if len(clock.sleeps) == 3:
            api.tasks["pw-busy"]["status"]["status"] = "succeeded"
            api.scripts["pw-busy"] = ["succeeded"]

    clock.on_sleep = finish_the_busy_one
    with pytest.raises(AirflowFailException):
        create_op(poke_interval=10, timeout=300).execute(make_context())

    text = logged_text(caplog, capsys)
    busy = text.count("for a free slot, next create in")
    idle = text.count("none of its prewarm tasks is pending or running, so waiting may not help")
    assert len(clock.sleeps) > 6
    assert "WARNING" in text.upper()
    # One WARNING per state (busy, then idle); the other attempts log at INFO.
    warnings = [line for line in text.splitlines() if "quota is used up" in line and "warn" in line.lower()]
    assert len(warnings) == 2, warnings
    assert busy >= 3 and idle >= 1


def test_the_quota_wait_repeats_its_warning_as_a_periodic_summary(
    api: FakeAPI,
    requests_mock: rm.Mocker,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import logging

    caplog.set_level(logging.INFO)
    refuse_creates(api, requests_mock, refusals=10_000)
    api.add("pw-busy", "running")

    with pytest.raises(AirflowFailException):
        create_op(poke_interval=60, timeout=prewarm_module.QUOTA_SUMMARY_INTERVAL * 2.5).execute(make_context())

    warnings = [
        line
        for line in logged_text(caplog, capsys).splitlines()
        if "quota is used up" in line and "warn" in line.lower()
    ]
    assert 2 <= len(warnings) <= 4, warnings  # the first, then one per QUOTA_SUMMARY_INTERVAL
