"""``PrewarmTaskTrigger`` against the emulator over real HTTP, and the shared async client pool it polls through."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from airflow_provider_ppio.hooks._async_pool import SHARED_ASYNC_CLIENTS, AsyncClientPool
from airflow_provider_ppio.hooks._shared import ClientSettings
from airflow_provider_ppio.models import PrewarmTask
from airflow_provider_ppio.testing.server import EmulatorServer
from airflow_provider_ppio.triggers.prewarm import PrewarmTaskTrigger

API_KEY = "sk_test_DO_NOT_LEAK_7f3a9c"
TASK_PATH = "/gpus/v2/prewarm-tasks/"


@pytest.fixture
def emulator(ppio_emulator: EmulatorServer, set_conn: Callable[..., None]) -> EmulatorServer:
    """The emulator, with ``ppio_default`` pointing at it (fast retries)."""
    set_conn(host=ppio_emulator.base_url, password=ppio_emulator.api_key)
    return ppio_emulator


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> Callable[[], list[str]]:
    """
    Everything logged so far, per sink: stdlib logging records, and the console output (Airflow 3's
    structlog writes only there; Airflow 2 writes to both).
    """
    caplog.set_level(logging.DEBUG)

    def texts() -> list[str]:
        captured = capsys.readouterr()
        return [caplog.text, captured.out + captured.err]

    return texts


def make_trigger(
    task_id: str = "pw-1", *, poke_interval: float = 0.02, timeout: float | None = 30.0
) -> PrewarmTaskTrigger:
    deadline = None if timeout is None else time.time() + timeout
    return PrewarmTaskTrigger(prewarm_task_id=task_id, poke_interval=poke_interval, deadline=deadline)


async def first_event(trigger: PrewarmTaskTrigger) -> dict[str, Any]:
    """Run the trigger as the triggerer does and return the payload of its first event."""
    try:
        async for event in trigger.run():
            payload: dict[str, Any] = event.payload
            return payload
        raise AssertionError("the trigger ended without an event")
    finally:
        await trigger.cleanup()


def polls(emulator: EmulatorServer, task_id: str) -> list[dict[str, Any]]:
    """The API requests the emulator saw for one task, oldest first."""
    return [entry for entry in emulator.control.requests_log() if entry["path"] == TASK_PATH + task_id]


async def wait_for_requests(emulator: EmulatorServer, count: int, task_id: str | None = None) -> None:
    """Wait (without blocking the loop the triggers run on) until the emulator has seen ``count`` requests."""
    while True:
        log = await asyncio.to_thread(emulator.control.requests_log)
        if len([entry for entry in log if task_id is None or entry["path"] == TASK_PATH + task_id]) >= count:
            return
        await asyncio.sleep(0.02)


def airflow_roundtrip(trigger: PrewarmTaskTrigger) -> PrewarmTaskTrigger:
    """Store and load the trigger the way Airflow does (Trigger row: serde + encryption), then rebuild it."""
    from airflow.models.trigger import Trigger

    row = Trigger.from_object(trigger)
    module, _, name = row.classpath.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    rebuilt: PrewarmTaskTrigger = cls(**row.kwargs)
    return rebuilt


# -- serialization -------------------------------------------------------------------------------------


def test_serialize_round_trips_through_airflow_serde_with_primitives_only() -> None:
    trigger = PrewarmTaskTrigger(prewarm_task_id="pw/1 é", ppio_conn_id="ppio_eu", poke_interval=30, deadline=1.8e9)
    classpath, kwargs = trigger.serialize()

    assert classpath == "airflow_provider_ppio.triggers.prewarm.PrewarmTaskTrigger"
    assert json.loads(json.dumps(kwargs)) == kwargs  # JSON primitives only
    rebuilt = airflow_roundtrip(trigger)
    assert rebuilt.serialize() == (classpath, kwargs)
    assert kwargs == {"prewarm_task_id": "pw/1 é", "ppio_conn_id": "ppio_eu", "poke_interval": 30.0, "deadline": 1.8e9}


def test_serialize_round_trips_through_base_serialization_without_deadline() -> None:
    from airflow.serialization.serialized_objects import BaseSerialization

    trigger = PrewarmTaskTrigger(prewarm_task_id="pw-1", poke_interval=5, deadline=None)
    classpath, kwargs = trigger.serialize()
    loaded = BaseSerialization.deserialize(json.loads(json.dumps(BaseSerialization.serialize(kwargs))))
    assert PrewarmTaskTrigger(**loaded).serialize() == (classpath, kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prewarm_task_id": ""},
        {"prewarm_task_id": ".."},
        {"prewarm_task_id": "x" * 256},
        {"prewarm_task_id": "pw-1", "poke_interval": 0},
        {"prewarm_task_id": "pw-1", "poke_interval": -1},
        {"prewarm_task_id": "pw-1", "poke_interval": float("nan")},
        {"prewarm_task_id": "pw-1", "deadline": float("inf")},
        {"prewarm_task_id": "pw-1", "deadline": "tomorrow"},
    ],
)
def test_bad_arguments_are_refused_when_the_trigger_is_built(kwargs: dict[str, Any]) -> None:
    from airflow_provider_ppio.exceptions import PPIOInvalidInputError

    with pytest.raises(PPIOInvalidInputError):
        PrewarmTaskTrigger(**kwargs)


def test_the_api_key_is_in_neither_the_serialized_trigger_nor_its_repr(emulator: EmulatorServer) -> None:
    trigger = make_trigger()
    assert emulator.api_key not in json.dumps(trigger.serialize()) + repr(trigger)


# -- events --------------------------------------------------------------------------------------------


async def test_success_event_carries_the_task_details(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", state="running")
    waiting = asyncio.create_task(first_event(make_trigger()))
    await wait_for_requests(emulator, 2, "pw-1")
    assert not waiting.done()  # still waiting through "running"

    await asyncio.to_thread(emulator.control.set_state, "pw-1", "succeeded")
    event = await waiting

    assert event["status"] == "success"
    assert event["prewarm_task_id"] == "pw-1"
    api_task = emulator.control.tasks()[0]
    assert event["task"] == PrewarmTask.from_api(api_task).to_xcom()
    assert event["task"]["status"]["status"] == "succeeded"


async def test_failed_event_carries_error_message_and_reasons(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(
        task_id="pw-1", state="failed", error="ImagePullFailed", message="manifest unknown", reason=["no such tag", " "]
    )

    event = await first_event(make_trigger())

    assert event["status"] == "failed"
    assert event["error"] == "ImagePullFailed"
    assert event["message"] == "manifest unknown"
    assert event["reason"] == ["no such tag"]
    assert event["task"]["status"] == {"status": "failed", "error": "ImagePullFailed", "message": "manifest unknown"}


async def test_timeout_event_when_the_deadline_passes_while_running(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", state="running")

    event = await first_event(make_trigger(poke_interval=0.05, timeout=0.3))

    assert event["status"] == "timeout"
    assert event["last_status"] == "running"
    assert "pw-1" in event["message"]


async def test_a_trigger_started_after_its_deadline_still_reports_a_finished_task(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", state="succeeded")

    event = await first_event(make_trigger(poke_interval=60, timeout=-10))

    assert event["status"] == "success"


@pytest.mark.parametrize(
    ("task_id", "api_key", "error_type", "http_status"),
    [
        ("pw-missing", None, "PPIONotFoundError", 404),
        ("pw-1", "sk_wrong_key", "PPIOAuthError", 401),
    ],
)
async def test_permanent_api_errors_end_the_wait_with_an_error_event(
    emulator: EmulatorServer,
    set_conn: Callable[..., None],
    task_id: str,
    api_key: str | None,
    error_type: str,
    http_status: int,
) -> None:
    emulator.control.seed_task(task_id="pw-1", state="running")
    if api_key:
        set_conn(host=emulator.base_url, password=api_key)

    event = await first_event(make_trigger(task_id))

    assert event["status"] == "error"
    assert event["error_type"] == error_type
    assert event["http_status"] == http_status
    assert len(polls(emulator, task_id)) == 1  # not retried, not polled again


async def test_missing_connection_is_an_error_event(emulator: EmulatorServer) -> None:
    trigger = PrewarmTaskTrigger(prewarm_task_id="pw-1", ppio_conn_id="ppio_nowhere", poke_interval=0.02)

    event = await first_event(trigger)

    assert event["status"] == "error"
    assert "ppio_nowhere" in event["message"]


async def test_unknown_status_keeps_waiting_and_is_logged_once(
    emulator: EmulatorServer, logged: Callable[[], list[str]]
) -> None:
    emulator.control.seed_task(task_id="pw-1", state="queued_for_gpu")

    waiting = asyncio.create_task(first_event(make_trigger()))
    await wait_for_requests(emulator, 3, "pw-1")
    assert not waiting.done()
    await asyncio.to_thread(emulator.control.set_state, "pw-1", "succeeded")
    event = await waiting

    assert event["status"] == "success"
    # Logged on change, not on every poll.
    assert max(text.count("does not know ('queued_for_gpu')") for text in logged()) == 1


async def test_transient_errors_are_retried_then_the_wait_succeeds(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", state="succeeded")
    emulator.control.inject_fault("status", status=503, count=2, path_prefix=TASK_PATH)
    emulator.control.inject_fault("rate_limit", count=1, path_prefix=TASK_PATH, retry_after=0)

    event = await first_event(make_trigger())

    assert event["status"] == "success"
    assert [entry["status"] for entry in polls(emulator, "pw-1")] == [503, 503, 429, 200]


async def test_transient_errors_beyond_the_retries_keep_waiting_without_a_hot_loop(
    emulator: EmulatorServer, set_conn: Callable[..., None]
) -> None:
    set_conn(host=emulator.base_url, password=emulator.api_key, extra={"max_attempts": 2})
    emulator.control.seed_task(task_id="pw-1", state="succeeded")
    emulator.control.inject_fault("status", status=502, count=6, path_prefix=TASK_PATH)

    event = await first_event(make_trigger(poke_interval=0.05))

    assert event["status"] == "success"  # 3 polls of 2 failed attempts each, then the answer
    assert [entry["status"] for entry in polls(emulator, "pw-1")] == [502] * 6 + [200]


async def test_an_api_that_keeps_failing_is_polled_at_poke_interval_until_the_deadline(
    emulator: EmulatorServer, set_conn: Callable[..., None]
) -> None:
    set_conn(host=emulator.base_url, password=emulator.api_key, extra={"max_attempts": 1})
    emulator.control.inject_fault("status", status=503, count=None, path_prefix=TASK_PATH)

    event = await first_event(make_trigger(poke_interval=0.1, timeout=0.5))

    assert event["status"] == "timeout"
    assert event["last_status"] is None
    # A hot loop would send thousands of requests in 0.5 s; pacing by poke_interval allows about 6.
    assert 1 <= len(polls(emulator, "pw-1")) <= 10


async def test_the_api_key_appears_in_no_event_or_log(
    ppio_emulator_factory: Callable[..., EmulatorServer],
    set_conn: Callable[..., None],
    logged: Callable[[], list[str]],
) -> None:
    emulator = ppio_emulator_factory(api_key=API_KEY)
    set_conn(host=emulator.base_url, password=API_KEY, extra={"max_attempts": 2})
    emulator.control.seed_task(task_id="pw-1", state="failed")
    emulator.control.inject_fault("status", status=500, count=3, path_prefix=TASK_PATH, body={"message": API_KEY})

    events = [await first_event(make_trigger()), await first_event(make_trigger("pw-missing"))]

    assert [event["status"] for event in events] == ["failed", "error"]
    assert API_KEY not in json.dumps(events)
    text = "\n".join(logged())
    assert "retrying" in text  # the retries were logged...
    assert API_KEY not in text  # ...without the key the server echoed back


# -- restart -------------------------------------------------------------------------------------------


async def test_a_trigger_rebuilt_from_serialize_mid_wait_continues(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", state="running")
    trigger = make_trigger(poke_interval=0.02, timeout=60)
    waiting = asyncio.create_task(first_event(trigger))
    await wait_for_requests(emulator, 2, "pw-1")

    waiting.cancel()  # what a triggerer shutdown does
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert SHARED_ASYNC_CLIENTS.open_clients() == 0  # its lease was released

    emulator.control.set_state("pw-1", "succeeded")
    rebuilt = airflow_roundtrip(trigger)
    assert rebuilt.deadline == trigger.deadline  # an absolute deadline: the restart does not extend the wait
    event = await first_event(rebuilt)

    assert event["status"] == "success"
    assert event["task"]["task_id"] == "pw-1"


# -- shared client -------------------------------------------------------------------------------------


async def test_concurrent_triggers_share_one_client_and_release_it(emulator: EmulatorServer) -> None:
    for n in range(40):
        emulator.control.seed_task(task_id=f"pw-{n}", state="running")
    triggers = [make_trigger(f"pw-{n}", poke_interval=0.05) for n in range(40)]
    waits = [asyncio.create_task(first_event(trigger)) for trigger in triggers]
    await wait_for_requests(emulator, 80)

    assert SHARED_ASYNC_CLIENTS.open_clients() == 1
    for n in range(40):
        emulator.control.set_state(f"pw-{n}", "succeeded")
    events = await asyncio.gather(*waits)

    assert sorted(event["prewarm_task_id"] for event in events) == sorted(f"pw-{n}" for n in range(40))
    assert {event["status"] for event in events} == {"success"}
    assert SHARED_ASYNC_CLIENTS.open_clients() == 0


def _settings(base_url: str, api_key: str = "sk_pool") -> ClientSettings:
    return ClientSettings(base_url=base_url, api_key=api_key, timeout=10)


def _sockets_to(port: int) -> set[int]:
    """The local ports of this process's TCP sockets connected to ``port``."""
    import psutil

    connections = psutil.Process().net_connections("tcp")
    return {conn.laddr.port for conn in connections if conn.raddr and conn.raddr.port == port}


async def test_the_pool_bounds_open_connections_and_reuses_them(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", state="running")
    emulator.control.close()  # its keep-alive connection would be counted too
    pool = AsyncClientPool(max_connections=3)
    settings = _settings(emulator.base_url, emulator.api_key)
    port = int(emulator.base_url.rsplit(":", 1)[1])
    # The emulator serves the whole session: sockets other tests left open (and not yet collected) are not ours.
    before = _sockets_to(port)
    ours: set[int] = set()
    most = 0

    async def get(client: Any) -> int:
        nonlocal most
        response = await client.get(emulator.base_url + TASK_PATH + "pw-1", headers=emulator.auth_headers)
        now = _sockets_to(port) - before
        ours.update(now)
        most = max(most, len(now))
        return int(response.status_code)

    async with pool.lease(settings) as client:
        for _ in range(3):
            assert await asyncio.gather(*(get(client) for _ in range(30))) == [200] * 30

    assert 1 <= most <= 3
    assert len(ours) <= 3  # 90 requests over 3 kept-alive connections, none reopened
    assert pool.open_clients() == 0
    await asyncio.sleep(0.05)
    assert not ours & _sockets_to(port)  # closed with the client


async def test_a_request_cancelled_while_queued_or_failed_frees_its_turn(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", state="running")
    emulator.control.inject_fault("latency", seconds=0.3, count=1, path_prefix=TASK_PATH)
    pool = AsyncClientPool(max_connections=1)
    url = emulator.base_url + TASK_PATH + "pw-1"

    async with pool.lease(_settings(emulator.base_url, emulator.api_key)) as client:
        slow = asyncio.create_task(client.get(url, headers=emulator.auth_headers))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(client.get(url, headers=emulator.auth_headers))
        await asyncio.sleep(0.05)
        queued.cancel()
        assert (await slow).status_code == 200
        with pytest.raises(asyncio.CancelledError):
            await queued
        after = await asyncio.wait_for(client.get(url, headers=emulator.auth_headers), 5)
        assert after.status_code == 200

    async with pool.lease(_settings("http://127.0.0.1:1")) as refused:
        for _ in range(2):  # the first failure must not keep the only turn
            with pytest.raises(httpx.ConnectError):
                await asyncio.wait_for(refused.get("http://127.0.0.1:1/"), 5)


async def test_the_shared_client_goes_through_the_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[bytes] = []
    body = json.dumps({"task_id": "pw-1", "status": {"status": "succeeded"}}).encode()

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append((await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[0])
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", "bypassed.ppio.test")
    pool = AsyncClientPool()
    try:
        async with pool.lease(_settings("http://api.ppio.test")) as client:
            response = await client.get("http://api.ppio.test/gpus/v2/prewarm-tasks/pw-1")
        async with pool.lease(_settings("http://bypassed.ppio.test")) as client:
            with pytest.raises((httpx.ConnectError, httpx.ConnectTimeout)):  # tried directly: no such host
                await client.get("http://bypassed.ppio.test/gpus/v2/prewarm-tasks/pw-1")
    finally:
        server.close()

    assert response.json()["task_id"] == "pw-1"
    assert seen == [b"GET http://api.ppio.test/gpus/v2/prewarm-tasks/pw-1 HTTP/1.1"]


async def test_leases_share_a_client_per_base_url_and_key() -> None:
    pool = AsyncClientPool()
    async with pool.lease(_settings("http://127.0.0.1:1")) as first:
        async with (
            pool.lease(_settings("http://127.0.0.1:1")) as again,
            pool.lease(_settings("http://127.0.0.1:1", "sk_other")) as other_key,
            pool.lease(_settings("http://127.0.0.1:2")) as other_host,
        ):
            assert again is first
            assert len({id(first), id(other_key), id(other_host)}) == 3
            assert pool.open_clients() == 3
        assert pool.open_clients() == 1
        assert not first.is_closed
    assert first.is_closed
    assert pool.open_clients() == 0


async def test_a_cancelled_lease_closes_its_client() -> None:
    pool = AsyncClientPool()
    entered = asyncio.Event()
    clients: list[Any] = []

    async def hold() -> None:
        async with pool.lease(_settings("http://127.0.0.1:1")) as client:
            clients.append(client)
            entered.set()
            await asyncio.sleep(3600)

    holder = asyncio.create_task(hold())
    await entered.wait()
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    assert clients[0].is_closed
    assert pool.open_clients() == 0


def test_each_event_loop_gets_its_own_client(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", state="running")
    pool = AsyncClientPool()
    settings = _settings(emulator.base_url, emulator.api_key)
    seen: dict[str, Any] = {}
    both_inside = threading.Barrier(2, timeout=10)

    async def use(name: str) -> None:
        async with pool.lease(settings) as client:
            response = await client.get(emulator.base_url + TASK_PATH + "pw-1", headers=emulator.auth_headers)
            seen[name] = (client, response.status_code)
            await asyncio.to_thread(both_inside.wait)  # both loops hold a lease at once
            seen[name + "_open"] = pool.open_clients()
            await asyncio.to_thread(both_inside.wait)

    threads = [threading.Thread(target=asyncio.run, args=(use(name),)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)

    assert seen["a"][0] is not seen["b"][0]
    assert seen["a"][1] == seen["b"][1] == 200
    assert seen["a_open"] == seen["b_open"] == 2
    assert pool.open_clients() == 0
