"""
``PrewarmTaskTrigger`` over real HTTP (the emulator, or a scripted server on 127.0.0.1): its events, its
patience with an API that gives no usable answer, its restart, and the shared session its polls go through.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aio_server import TASKS, ApiServer, api_server, hang, reply_json, task_body, warnings_in
from aiohttp import web
from trigger_runs import first_event

from airflow_provider_ppio.hooks._async import SHARED_SESSIONS
from airflow_provider_ppio.models import PrewarmTask
from airflow_provider_ppio.testing.server import EmulatorServer
from airflow_provider_ppio.triggers.prewarm import PrewarmTaskTrigger

API_KEY = "sk_test_DO_NOT_LEAK_7f3a9c"
TASK_PATH = TASKS + "/"


@pytest.fixture
def emulator(ppio_emulator: EmulatorServer, set_conn: Callable[..., None]) -> EmulatorServer:
    """The emulator, with ``ppio_default`` pointing at it (fast retries)."""
    set_conn(host=ppio_emulator.base_url, password=ppio_emulator.api_key)
    return ppio_emulator


@pytest.fixture
def server() -> Iterator[ApiServer]:
    """This test's own scripted API server."""
    with api_server() as running:
        yield running


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
    task_id: str = "pw-1", *, poke_interval: float = 0.02, timeout: float | None = 30.0, **kwargs: Any
) -> PrewarmTaskTrigger:
    deadline = None if timeout is None else time.time() + timeout
    return PrewarmTaskTrigger(prewarm_task_id=task_id, poke_interval=poke_interval, deadline=deadline, **kwargs)


async def timed_event(trigger: PrewarmTaskTrigger) -> tuple[dict[str, Any], float]:
    """The trigger's first event and the Unix time it came."""
    event = await first_event(trigger)
    return event, time.time()


async def watch_the_loop(stalls: list[float]) -> None:
    """Record how late each 50 ms tick of the event loop comes (a busy machine stalls it)."""
    while True:
        started = time.monotonic()
        await asyncio.sleep(0.05)
        stalls.append(time.monotonic() - started - 0.05)


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
    trigger = PrewarmTaskTrigger(
        prewarm_task_id="pw/1 é", ppio_conn_id="ppio_eu", poke_interval=30, deadline=1.8e9, unreachable_timeout=120
    )
    classpath, kwargs = trigger.serialize()

    assert classpath == "airflow_provider_ppio.triggers.prewarm.PrewarmTaskTrigger"
    assert json.loads(json.dumps(kwargs)) == kwargs  # JSON primitives only
    rebuilt = airflow_roundtrip(trigger)
    assert rebuilt.serialize() == (classpath, kwargs)
    assert kwargs == {
        "prewarm_task_id": "pw/1 é",
        "ppio_conn_id": "ppio_eu",
        "poke_interval": 30.0,
        "deadline": 1.8e9,
        "unreachable_timeout": 120.0,
    }


def test_serialize_round_trips_through_base_serialization_without_deadline() -> None:
    from airflow.serialization.serialized_objects import BaseSerialization

    trigger = PrewarmTaskTrigger(prewarm_task_id="pw-1", poke_interval=5, deadline=None)
    classpath, kwargs = trigger.serialize()
    loaded = BaseSerialization.deserialize(json.loads(json.dumps(BaseSerialization.serialize(kwargs))))
    assert PrewarmTaskTrigger(**loaded).serialize() == (classpath, kwargs)
    assert kwargs["unreachable_timeout"] is None  # the connection's setting applies


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
        {"prewarm_task_id": "pw-1", "unreachable_timeout": 0},
        {"prewarm_task_id": "pw-1", "unreachable_timeout": float("nan")},
        {"prewarm_task_id": "pw-1", "unreachable_timeout": True},
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


@pytest.mark.timeout(30)
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


@pytest.mark.timeout(30)
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


@pytest.mark.timeout(30)
async def test_timeout_event_when_the_deadline_passes_while_running(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", state="running")

    event = await first_event(make_trigger(poke_interval=0.05, timeout=0.3))

    assert event["status"] == "timeout"
    assert event["last_status"] == "running"
    assert "pw-1" in event["message"]


@pytest.mark.timeout(30)
async def test_a_trigger_started_after_its_deadline_still_reports_a_finished_task(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", state="succeeded")

    event = await first_event(make_trigger(poke_interval=60, timeout=-10))

    assert event["status"] == "success"


@pytest.mark.timeout(30)
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


@pytest.mark.timeout(30)
async def test_missing_connection_is_an_error_event(emulator: EmulatorServer) -> None:
    trigger = PrewarmTaskTrigger(prewarm_task_id="pw-1", ppio_conn_id="ppio_nowhere", poke_interval=0.02)

    event = await first_event(trigger)

    assert event["status"] == "error"
    assert "ppio_nowhere" in event["message"]


@pytest.mark.timeout(30)
async def test_unknown_status_keeps_waiting_with_one_warning(
    emulator: EmulatorServer, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    emulator.control.seed_task(task_id="pw-1", state="queued_for_gpu")

    waiting = asyncio.create_task(first_event(make_trigger()))
    await wait_for_requests(emulator, 3, "pw-1")
    assert not waiting.done()
    await asyncio.to_thread(emulator.control.set_state, "pw-1", "succeeded")
    event = await waiting

    assert event["status"] == "success"
    captured = capsys.readouterr()
    unknown = [text for text in warnings_in(caplog.records, captured.out + captured.err) if "'queued_for_gpu'" in text]
    # At WARNING level (a status this provider does not know), once: on change, not on every poll.
    assert len(unknown) == 1
    assert "does not know" in unknown[0]


@pytest.mark.timeout(30)
async def test_transient_errors_are_retried_then_the_wait_succeeds(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", state="succeeded")
    emulator.control.inject_fault("status", status=503, count=2, path_prefix=TASK_PATH)
    emulator.control.inject_fault("rate_limit", count=1, path_prefix=TASK_PATH, retry_after=0)

    event = await first_event(make_trigger())

    assert event["status"] == "success"
    assert [entry["status"] for entry in polls(emulator, "pw-1")] == [503, 503, 429, 200]


@pytest.mark.timeout(30)
async def test_transient_errors_beyond_max_attempts_do_not_end_the_wait(
    emulator: EmulatorServer, set_conn: Callable[..., None]
) -> None:
    set_conn(host=emulator.base_url, password=emulator.api_key, extra={"max_attempts": 2})
    emulator.control.seed_task(task_id="pw-1", state="succeeded")
    emulator.control.inject_fault("status", status=502, count=6, path_prefix=TASK_PATH)

    event = await first_event(make_trigger(poke_interval=0.05))

    assert event["status"] == "success"  # a wait is bounded by unreachable_timeout, not by a call's attempts
    assert [entry["status"] for entry in polls(emulator, "pw-1")] == [502] * 6 + [200]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("given_as", ["trigger argument", "connection extra"])
async def test_an_api_failing_past_unreachable_timeout_ends_the_wait_with_an_error_event(
    emulator: EmulatorServer, set_conn: Callable[..., None], given_as: str
) -> None:
    emulator.control.seed_task(task_id="pw-1", state="running")
    emulator.control.inject_fault("status", status=503, count=None, path_prefix=TASK_PATH)
    if given_as == "trigger argument":
        trigger = make_trigger(poke_interval=0.05, timeout=30, unreachable_timeout=1.0)
    else:
        set_conn(host=emulator.base_url, password=emulator.api_key, extra={"unreachable_timeout": 1.0})
        trigger = make_trigger(poke_interval=0.05, timeout=30)

    started = time.monotonic()
    event = await first_event(trigger)

    assert time.monotonic() - started < 5  # long before the 30 s deadline
    assert event["status"] == "error"
    assert event["error_type"] == "PPIOUnreachableError"
    assert "no usable answer for 1s" in event["message"]
    assert "HTTP 503" in event["message"]  # the last error, so the user sees why
    assert len(polls(emulator, "pw-1")) > 2  # retried with backoff meanwhile, not given up at once


@pytest.mark.timeout(30)
async def test_a_deadline_before_unreachable_timeout_gives_a_timeout_event_without_a_hot_loop(
    emulator: EmulatorServer,
) -> None:
    emulator.control.inject_fault("status", status=503, count=None, path_prefix=TASK_PATH)

    started = time.monotonic()
    event = await first_event(make_trigger(poke_interval=0.1, timeout=1.0, unreachable_timeout=60))

    assert 0.9 <= time.monotonic() - started < 4
    assert event["status"] == "timeout"
    assert event["last_status"] is None
    assert "HTTP 503" in event["message"]  # what the API was doing at the deadline
    # Backoff between attempts: a hot loop would send thousands of requests in a second.
    assert 2 <= len(polls(emulator, "pw-1")) <= 20


@pytest.mark.timeout(30)
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


# -- no head-of-line blocking ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["every answer is 503", "every request hangs"])
async def test_many_waits_on_a_failing_api_each_end_on_time(
    server: ApiServer, set_conn: Callable[..., None], api: str
) -> None:
    # 100 deferred waits on an API that gives no usable answer: each one ends with its own timeout event,
    # no later than its deadline + one poke_interval + one request timeout. A shared client that made
    # requests queue behind each other's retries (or hanging requests) would push them far past it.
    request_timeout, poke_interval = 0.5, 1.0
    set_conn(
        host=server.base_url,
        extra={"timeout": request_timeout, "backoff_initial": 0.5, "unreachable_timeout": 600},
    )
    server.reply(reply_json(503, {"message": "unavailable"}) if api == "every answer is 503" else hang(server))
    deadline = time.time() + 3
    triggers = [
        PrewarmTaskTrigger(prewarm_task_id=f"pw-{n}", poke_interval=poke_interval, deadline=deadline)
        for n in range(100)
    ]

    stalls: list[float] = []
    watch = asyncio.create_task(watch_the_loop(stalls))
    results = await asyncio.gather(*(timed_event(trigger) for trigger in triggers))
    watch.cancel()

    assert [event["status"] for event, _ in results] == ["timeout"] * 100
    assert {event["prewarm_task_id"] for event, _ in results} == {f"pw-{n}" for n in range(100)}
    ended = [at for _, at in results]
    assert min(ended) >= deadline - 0.1  # none gave up early
    # A client with head-of-line blocking ends 15 s or more late. The slack: 1 s, plus however long the loop
    # itself was frozen (on a machine busy with other work that delays every wait alike, blocking or not).
    late, frozen = max(ended) - deadline, sum(stall for stall in stalls if stall > 0.1)
    assert late <= poke_interval + request_timeout + 1.0 + frozen, f"{late:.1f}s late, the loop frozen {frozen:.1f}s"
    seen = {request.path for request in server.seen}
    if api == "every answer is 503":
        assert seen == {f"{TASK_PATH}pw-{n}" for n in range(100)}  # every wait asked
    else:
        # At most 50 requests are in flight; one that waited half its timeout for a connection is not sent at
        # all (it fails as "never sent" and is retried), so the hanging API sees at least a pool's worth.
        assert len(seen) >= 50


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("slow_poll", "slow_waits"),
    [
        ("hangs for the whole request timeout", 20),
        ("is retried after 503s with a long backoff", 60),  # more waits than the session's connections
    ],
)
async def test_a_slow_poll_does_not_delay_another_waits_poll(
    server: ApiServer, set_conn: Callable[..., None], slow_poll: str, slow_waits: int
) -> None:
    # Many waits whose polls are slow, and one whose task has succeeded: its poll is answered at once.
    # Nothing is held while a request hangs on another connection or while a retry sleeps.
    set_conn(host=server.base_url, extra={"timeout": 20, "backoff_initial": 10})

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/pw-fast"):
            return web.json_response(task_body("pw-fast", "succeeded"))
        if slow_poll.startswith("hangs"):
            await server.stopped()
        return web.json_response({"message": "unavailable"}, status=503)

    server.reply(answer)
    slow = [
        asyncio.create_task(first_event(make_trigger(f"pw-slow-{n}", poke_interval=0.1))) for n in range(slow_waits)
    ]
    while len(server.seen) < slow_waits:
        await asyncio.sleep(0.01)

    started = time.monotonic()
    event = await first_event(make_trigger("pw-fast", poke_interval=0.1))

    assert event["status"] == "success"
    assert time.monotonic() - started < 2  # not behind the slow polls (each takes 10 s or more)
    assert not any(wait.done() for wait in slow)
    for wait in slow:
        wait.cancel()
    await asyncio.gather(*slow, return_exceptions=True)
    assert SHARED_SESSIONS.open_sessions() == 0


# -- restart -------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_a_trigger_rebuilt_from_serialize_mid_wait_continues(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="pw-1", state="running")
    trigger = make_trigger(poke_interval=0.02, timeout=60, unreachable_timeout=300)
    waiting = asyncio.create_task(first_event(trigger))
    await wait_for_requests(emulator, 2, "pw-1")

    waiting.cancel()  # what a triggerer shutdown does
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert SHARED_SESSIONS.open_sessions() == 0  # its lease was released

    emulator.control.set_state("pw-1", "succeeded")
    rebuilt = airflow_roundtrip(trigger)
    assert rebuilt.deadline == trigger.deadline  # an absolute deadline: the restart does not extend the wait
    assert rebuilt.unreachable_timeout == 300
    event = await first_event(rebuilt)

    assert event["status"] == "success"
    assert event["task"]["task_id"] == "pw-1"


# -- shared session ------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
async def test_concurrent_triggers_share_one_session_and_release_it(emulator: EmulatorServer) -> None:
    for n in range(40):
        emulator.control.seed_task(task_id=f"pw-{n}", state="running")
    triggers = [make_trigger(f"pw-{n}", poke_interval=0.05) for n in range(40)]
    waits = [asyncio.create_task(first_event(trigger)) for trigger in triggers]
    await wait_for_requests(emulator, 80)

    assert SHARED_SESSIONS.open_sessions() == 1
    for n in range(40):
        await asyncio.to_thread(emulator.control.set_state, f"pw-{n}", "succeeded")
    events = await asyncio.gather(*waits)

    assert sorted(event["prewarm_task_id"] for event in events) == sorted(f"pw-{n}" for n in range(40))
    assert {event["status"] for event in events} == {"success"}
    assert SHARED_SESSIONS.open_sessions() == 0


# -- memory ----------------------------------------------------------------------------------------------


def alive(cls: type) -> int:
    """How many objects of ``cls`` are alive."""
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) is cls)  # not isinstance: lazy proxies import on it


@pytest.mark.timeout(60)
async def test_waits_between_polls_share_one_hook_and_hold_no_answer(emulator: EmulatorServer) -> None:
    # A triggerer runs thousands of waits: between two polls a wait holds no hook, settings or answer of its own.
    from airflow_provider_ppio.hooks._shared import ClientSettings
    from airflow_provider_ppio.hooks.ppio import PPIOHook

    waits = 50
    for n in range(waits):
        emulator.control.seed_task(task_id=f"pw-{n}", state="running")
    hooks, settings = alive(PPIOHook), alive(ClientSettings)
    tasks = [asyncio.create_task(first_event(make_trigger(f"pw-{n}", poke_interval=1.0))) for n in range(waits)]
    await wait_for_requests(emulator, waits)  # every wait polled once...
    started = time.monotonic()
    while alive(PrewarmTask) and time.monotonic() - started < 0.7:  # ...and read its answer; the next polls are
        await asyncio.sleep(0.02)  # 0.9 s after the first ones at least

    assert alive(PrewarmTask) == 0
    assert (alive(PPIOHook) - hooks, alive(ClientSettings) - settings) == (1, 1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
