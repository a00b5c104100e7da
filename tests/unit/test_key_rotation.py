"""
An API key rotated during a long wait: the API starts refusing the old key, the connection is changed, and
every kind of wait (sync hook and sensor poke, async hook and trigger) carries on with the new key after one
401. A connection that still holds the refused key fails the wait after one re-read: no retry loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aio_server import RotatingKeyAPI, api_server
from aiohttp import web
from trigger_runs import first_event

from airflow_provider_ppio.exceptions import PPIOAuthError
from airflow_provider_ppio.hooks import _async as async_transport_module
from airflow_provider_ppio.hooks.ppio import PPIOHook
from airflow_provider_ppio.sensors.prewarm import PrewarmTaskSensor
from airflow_provider_ppio.triggers.prewarm import PrewarmTaskTrigger

OLD_KEY = "sk_old_key_1111"
NEW_KEY = "sk_new_key_2222"


@pytest.fixture
def api(set_conn: Callable[..., None]) -> Iterator[RotatingKeyAPI]:
    """A prewarm API accepting :data:`OLD_KEY`, with ``pw-1`` running; ``ppio_default`` holds the old key."""
    with api_server() as server:
        rotating = RotatingKeyAPI(server, accepted=OLD_KEY)
        rotating.status["pw-1"] = "running"
        set_conn(host=server.base_url, password=OLD_KEY)
        yield rotating


@pytest.fixture
def connection_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """
    Every time a hook reads its connection (the real lookups, counted): ``sync <id>`` or ``async <id>``
    (on Airflow 2 an async lookup runs the sync one in a thread: that one is not counted twice).
    """
    reads: list[str] = []
    in_async = contextvars.ContextVar("in_async", default=False)
    real_sync = PPIOHook.get_connection.__func__  # type: ignore[attr-defined]
    real_async = async_transport_module.get_async_connection

    def get_connection(cls: type[PPIOHook], conn_id: str) -> Any:
        if not in_async.get():
            reads.append(f"sync {conn_id}")
        return real_sync(cls, conn_id)

    async def get_async_connection(conn_id: str, hook: Any = None) -> Any:
        reads.append(f"async {conn_id}")
        token = in_async.set(True)
        try:
            return await real_async(conn_id, hook)
        finally:
            in_async.reset(token)

    monkeypatch.setattr(PPIOHook, "get_connection", classmethod(get_connection))
    monkeypatch.setattr(async_transport_module, "get_async_connection", get_async_connection)
    return reads


def rotate(api: RotatingKeyAPI, set_conn: Callable[..., None], *, update_connection: bool) -> None:
    """The key is rotated: the connection gets the new key (if asked), then the API refuses the old one."""
    if update_connection:
        set_conn(host=api.server.base_url, password=NEW_KEY)
    api.rotate(NEW_KEY)


def assert_one_401_then_new_key(log: list[tuple[str, int]]) -> None:
    """Old key accepted, exactly one 401 for it, then only the new key."""
    refused = log.index((OLD_KEY, 401))
    assert log[:refused] and all(entry == (OLD_KEY, 200) for entry in log[:refused])
    assert log[refused + 1 :] and all(entry == (NEW_KEY, 200) for entry in log[refused + 1 :])


async def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


# -- sync: the hook and the sensor in poke mode ---------------------------------------------------------------


@pytest.mark.timeout(30)
def test_the_sync_hook_continues_with_the_new_key_after_one_401(
    api: RotatingKeyAPI, set_conn: Callable[..., None], connection_reads: list[str]
) -> None:
    hook = PPIOHook()
    assert hook.get_prewarm_task("pw-1", patient=True).status.status == "running"

    rotate(api, set_conn, update_connection=True)
    api.status["pw-1"] = "succeeded"

    assert hook.get_prewarm_task("pw-1", patient=True).status.status == "succeeded"
    assert hook.get_prewarm_task("pw-1").status.status == "succeeded"  # and keeps the new key
    assert api.log == [(OLD_KEY, 200), (OLD_KEY, 401), (NEW_KEY, 200), (NEW_KEY, 200)]
    assert connection_reads == ["sync ppio_default"] * 2  # read once, re-read once after the 401


@pytest.mark.timeout(30)
def test_a_sensor_poking_through_the_rotation_opens_the_gate(
    api: RotatingKeyAPI, set_conn: Callable[..., None]
) -> None:
    def mid_wait(api: RotatingKeyAPI) -> None:  # on the server's thread, while the sensor pokes
        if len(api.log) == 2 and api.accepted == OLD_KEY:  # two pokes answered with the old key
            rotate(api, set_conn, update_connection=True)
        if (NEW_KEY, 200) in api.log:  # one poke answered with the new key: the prewarm finishes
            api.status["pw-1"] = "succeeded"

    api.before_each = mid_wait
    result = PrewarmTaskSensor(task_id="wait", prewarm_task_id="pw-1", poke_interval=0.05, timeout=30).execute({})

    assert result["task_id"] == "pw-1"
    assert result["status"]["status"] == "succeeded"
    assert api.log == [(OLD_KEY, 200), (OLD_KEY, 200), (OLD_KEY, 401), (NEW_KEY, 200), (NEW_KEY, 200)]


@pytest.mark.timeout(30)
def test_the_sync_hook_fails_when_the_connection_still_holds_the_refused_key(
    api: RotatingKeyAPI, set_conn: Callable[..., None], connection_reads: list[str]
) -> None:
    hook = PPIOHook()
    assert hook.get_prewarm_task("pw-1", patient=True).status.status == "running"
    rotate(api, set_conn, update_connection=False)

    with pytest.raises(PPIOAuthError) as info:
        hook.get_prewarm_task("pw-1", patient=True)

    assert info.value.http_status == 401
    assert api.log == [(OLD_KEY, 200), (OLD_KEY, 401)]  # no retry loop
    assert connection_reads == ["sync ppio_default"] * 2  # exactly one re-read


@pytest.mark.timeout(30)
def test_a_sensor_fails_when_the_connection_still_holds_the_refused_key(
    api: RotatingKeyAPI, set_conn: Callable[..., None], connection_reads: list[str]
) -> None:
    def mid_wait(api: RotatingKeyAPI) -> None:
        if len(api.log) == 2:
            rotate(api, set_conn, update_connection=False)

    api.before_each = mid_wait
    with pytest.raises(PPIOAuthError) as info:
        PrewarmTaskSensor(task_id="wait", prewarm_task_id="pw-1", poke_interval=0.05, timeout=30).execute({})

    assert info.value.http_status == 401
    assert api.log == [(OLD_KEY, 200), (OLD_KEY, 200), (OLD_KEY, 401)]  # failed at the first refusal: no retry loop
    assert connection_reads == ["sync ppio_default"] * 2  # after exactly one re-read


# -- async: the hook and the trigger --------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_the_async_hook_continues_with_the_new_key_after_one_401(
    api: RotatingKeyAPI, set_conn: Callable[..., None], connection_reads: list[str]
) -> None:
    hook = PPIOHook()
    assert (await hook.aget_prewarm_task("pw-1", patient=True)).status.status == "running"

    rotate(api, set_conn, update_connection=True)
    api.status["pw-1"] = "succeeded"

    assert (await hook.aget_prewarm_task("pw-1", patient=True)).status.status == "succeeded"
    assert (await hook.aget_prewarm_task("pw-1")).status.status == "succeeded"
    assert api.log == [(OLD_KEY, 200), (OLD_KEY, 401), (NEW_KEY, 200), (NEW_KEY, 200)]
    assert connection_reads == ["async ppio_default"] * 2


@pytest.mark.timeout(30)
async def test_a_trigger_waiting_through_the_rotation_succeeds(
    api: RotatingKeyAPI, set_conn: Callable[..., None]
) -> None:
    trigger = PrewarmTaskTrigger(prewarm_task_id="pw-1", poke_interval=0.05, deadline=time.time() + 30)
    waiting = asyncio.create_task(first_event(trigger))
    await wait_until(lambda: len(api.log) >= 2)

    rotate(api, set_conn, update_connection=True)
    await wait_until(lambda: (NEW_KEY, 200) in api.log)
    assert not waiting.done()
    api.status["pw-1"] = "succeeded"
    event = await asyncio.wait_for(waiting, 20)

    assert event["status"] == "success"
    assert event["task"]["task_id"] == "pw-1"
    assert_one_401_then_new_key(api.log)


@pytest.mark.timeout(30)
async def test_many_waits_sharing_a_connection_all_carry_on_through_the_rotation(
    api: RotatingKeyAPI, set_conn: Callable[..., None], connection_reads: list[str]
) -> None:
    # The waits of one connection share its key: each one that meets a 401 after another has switched to the
    # new key goes on with it, instead of failing because its own re-read finds the key it already holds.
    ids = [f"pw-{n}" for n in range(30)]
    api.status.update(dict.fromkeys(ids, "running"))
    triggers = [PrewarmTaskTrigger(prewarm_task_id=i, poke_interval=0.05, deadline=time.time() + 30) for i in ids]
    waiting = asyncio.gather(*(first_event(trigger) for trigger in triggers))
    await wait_until(lambda: len(api.log) >= 60)
    assert connection_reads == ["async ppio_default"]  # read once for all the waits

    answer = api.server.behaviour

    async def refuse_slowly(request: web.Request) -> web.StreamResponse:
        if api.accepted == NEW_KEY and OLD_KEY in request.headers.get("Authorization", ""):
            await asyncio.sleep(0.3)  # every wait's refusal arrives while another wait is switching keys
        return await answer(request)

    api.server.behaviour = refuse_slowly
    rotate(api, set_conn, update_connection=True)
    await wait_until(lambda: api.log[-30:].count((NEW_KEY, 200)) == 30)
    api.status.update(dict.fromkeys(ids, "succeeded"))
    events = await asyncio.wait_for(waiting, 20)

    assert [event["status"] for event in events] == ["success"] * 30
    assert 2 <= api.log.count((OLD_KEY, 401)) <= 30  # refusals met after another wait switched; one per wait
    assert len(connection_reads) <= 1 + api.log.count((OLD_KEY, 401))


@pytest.mark.timeout(30)
async def test_a_wait_that_starts_after_the_others_ended_reads_the_connection_again(
    api: RotatingKeyAPI, set_conn: Callable[..., None], connection_reads: list[str]
) -> None:
    api.status["pw-1"] = "succeeded"
    first = await first_event(PrewarmTaskTrigger(prewarm_task_id="pw-1", poke_interval=0.05))
    rotate(api, set_conn, update_connection=True)  # e.g. edited while no wait ran

    second = await first_event(PrewarmTaskTrigger(prewarm_task_id="pw-1", poke_interval=0.05))

    assert (first["status"], second["status"]) == ("success", "success")
    assert api.log == [(OLD_KEY, 200), (NEW_KEY, 200)]  # no 401: the new wait read the new key
    assert connection_reads == ["async ppio_default"] * 2


@pytest.mark.timeout(30)
async def test_a_trigger_ends_with_an_auth_error_when_the_connection_still_holds_the_refused_key(
    api: RotatingKeyAPI, set_conn: Callable[..., None], connection_reads: list[str]
) -> None:
    trigger = PrewarmTaskTrigger(prewarm_task_id="pw-1", poke_interval=0.05, deadline=time.time() + 30)
    waiting = asyncio.create_task(first_event(trigger))
    await wait_until(lambda: len(api.log) >= 2)

    rotate(api, set_conn, update_connection=False)
    event = await asyncio.wait_for(waiting, 20)

    assert event["status"] == "error"
    assert (event["error_type"], event["http_status"]) == ("PPIOAuthError", 401)
    assert api.log[-1] == (OLD_KEY, 401)
    assert api.log.count((OLD_KEY, 401)) == 1  # no retry loop
    assert connection_reads == ["async ppio_default"] * 2  # exactly one re-read
    assert OLD_KEY not in event["message"]
