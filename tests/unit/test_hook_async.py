"""
PPIOHook over aiohttp (the trigger's path), against a real server on 127.0.0.1: same URLs, headers, errors,
retries and secrecy as the sync path, and the shared session every trigger of a loop polls through.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aio_server import (
    TASKS,
    ApiServer,
    api_server,
    cut_body,
    hang,
    huge_body,
    reply_after,
    reply_bytes,
    reply_json,
    reset,
    task_body,
    trickle,
)

from airflow_provider_ppio import __version__
from airflow_provider_ppio.exceptions import (
    PPIOAuthError,
    PPIOBadRequestError,
    PPIOBadResponseError,
    PPIOConnectionConfigError,
    PPIOError,
    PPIOInvalidInputError,
    PPIONotFoundError,
    PPIOQuotaExceededError,
    PPIORateLimitError,
    PPIOServerError,
    PPIOTransportError,
)
from airflow_provider_ppio.hooks import _async
from airflow_provider_ppio.hooks import _async as async_transport_module
from airflow_provider_ppio.hooks._async import SHARED_SESSIONS, SharedSessions
from airflow_provider_ppio.hooks._shared import MAX_BODY_BYTES, ClientSettings, TLSSettings
from airflow_provider_ppio.hooks.ppio import PPIOHook
from airflow_provider_ppio.models import Outcome


@pytest.fixture
def server() -> Iterator[ApiServer]:
    """This test's own API server (every connection it sees is this test's)."""
    with api_server() as running:
        yield running


@pytest.fixture
def hook(server: ApiServer, set_conn: Callable[..., None]) -> PPIOHook:
    """A hook whose ``ppio_default`` connection points at :func:`server` (fast retries)."""
    set_conn(host=server.base_url)
    return PPIOHook()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every wait between async retries (the retry loop's ``asyncio.sleep``), recorded instead of waited."""
    waited: list[float] = []
    real_sleep = asyncio.sleep

    def fake_sleep(seconds: float, *args: Any, **kwargs: Any) -> Any:
        if sys._getframe(1).f_globals.get("__name__") != "airflow_provider_ppio.hooks._retry":
            return real_sleep(seconds, *args, **kwargs)  # not a retry wait (e.g. the server's own loop)
        waited.append(seconds)
        return real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    return waited


def logged_text(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> str:
    return caplog.text + "".join(capsys.readouterr())


def refused_url() -> tuple[str, socket.socket]:
    """A local URL whose port is bound but not listening: connections are refused at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return f"http://127.0.0.1:{sock.getsockname()[1]}", sock


# -- requests -----------------------------------------------------------------------------------------------


async def test_aget_prewarm_task_parses_and_sends_auth(hook: PPIOHook, server: ApiServer, api_key: str) -> None:
    server.reply(reply_json(200, task_body("pw-1", "succeeded", gpu_nodes=2)))
    task = await hook.aget_prewarm_task("pw-1")
    assert task.outcome is Outcome.SUCCEEDED
    assert task.to_xcom()["gpu_nodes"] == 2
    (request,) = server.seen
    assert (request.method, request.raw_path) == ("GET", f"{TASKS}/pw-1")
    assert request.headers["Authorization"] == f"Bearer {api_key}"
    assert request.headers["Accept"] == "application/json"
    assert f"airflow-provider-ppio/{__version__}" in request.headers["User-Agent"]
    assert "Cookie" not in request.headers


@pytest.mark.parametrize("status", ["pending", "running", "succeeded", "failed", "RUNNING", "mystery"])
async def test_aget_parses_every_status_like_the_sync_path(hook: PPIOHook, server: ApiServer, status: str) -> None:
    server.reply(reply_json(200, task_body("pw-1", status)))
    task = await hook.aget_prewarm_task("pw-1")
    assert task.status.status == status
    expected = {"succeeded": Outcome.SUCCEEDED, "failed": Outcome.FAILED}.get(status.lower(), Outcome.WAITING)
    assert task.outcome is expected


@pytest.mark.parametrize(
    ("task_id", "segment"),
    [
        ("..x", "..x"),
        ("a/b", "a%2Fb"),
        ("?", "%3F"),
        ("#", "%23"),
        ("%2F", "%252F"),
        ("a b", "a%20b"),
        ("é", "%C3%A9"),
    ],
)
async def test_aget_sends_the_id_as_one_encoded_segment(
    hook: PPIOHook, server: ApiServer, task_id: str, segment: str
) -> None:
    server.reply(reply_json(200, task_body(task_id)))
    assert (await hook.aget_prewarm_task(task_id)).task_id == task_id
    assert [request.raw_path for request in server.seen] == [f"{TASKS}/{segment}"]


@pytest.mark.parametrize("task_id", ["", ".", "..", "x" * 256, None, 7])
async def test_aget_refuses_invalid_ids_before_any_request(hook: PPIOHook, server: ApiServer, task_id: Any) -> None:
    with pytest.raises(PPIOInvalidInputError):
        await hook.aget_prewarm_task(task_id)
    assert server.seen == []


async def test_aget_generic_path_and_params(hook: PPIOHook, server: ApiServer) -> None:
    server.reply(reply_json(200, {"data": []}))
    assert await hook.aget(TASKS, params={"limit": 1}) == {"data": []}
    assert [request.raw_path for request in server.seen] == [f"{TASKS}?limit=1"]
    with pytest.raises(PPIOInvalidInputError):
        await hook.aget("//evil.example/x")
    assert len(server.seen) == 1


# -- errors and retries -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "error", "attempts"),
    [
        (400, {"message": "bad image"}, PPIOBadRequestError, 1),
        (400, {"message": "quota exceeded"}, PPIOQuotaExceededError, 1),
        (401, {"message": "invalid key"}, PPIOAuthError, 1),
        (403, {"message": "forbidden"}, PPIOAuthError, 1),
        (404, {"message": "no such task"}, PPIONotFoundError, 1),
        (408, {"message": "request timeout"}, PPIOServerError, 5),
        (429, {"message": "slow down"}, PPIORateLimitError, 5),
        (400, {"message": "Image prewarm number exceeds limit"}, PPIOQuotaExceededError, 1),
        (
            403,
            {"reason": "IMAGE_PREWARM_NUM_LIMIT", "message": "Image prewarm number exceeds limit"},
            PPIOQuotaExceededError,
            1,
        ),
        (
            429,
            {"reason": "IMAGE_PREWARM_NUM_LIMIT", "message": "prewarm number exceeds limit"},
            PPIOQuotaExceededError,
            1,
        ),
        (500, {"message": "internal"}, PPIOServerError, 5),
        (502, {"message": "bad gateway"}, PPIOServerError, 5),
        (503, {"message": "unavailable"}, PPIOServerError, 5),
        (504, {"message": "gateway timeout"}, PPIOServerError, 5),
    ],
)
async def test_http_errors_map_and_retry_like_the_sync_path(
    hook: PPIOHook,
    server: ApiServer,
    sleeps: list[float],
    status: int,
    body: dict[str, str],
    error: type[PPIOError],
    attempts: int,
) -> None:
    server.reply(reply_json(status, body))
    with pytest.raises(error) as info:
        await hook.aget_prewarm_task("pw-1")
    assert type(info.value) is error
    assert info.value.http_status == status
    assert body["message"] in str(info.value)
    assert len(server.seen) == attempts
    assert len(sleeps) == attempts - 1


async def test_transient_errors_are_retried_until_success(
    hook: PPIOHook, server: ApiServer, sleeps: list[float]
) -> None:
    server.reply(cut_body, reply_json(503, {"message": "busy"}), reply_json(200, task_body("pw-1", "running")))
    assert (await hook.aget_prewarm_task("pw-1")).outcome is Outcome.WAITING
    assert len(server.seen) == 3
    assert len(sleeps) == 2
    assert all(0 < wait < 1 for wait in sleeps)


async def test_retry_after_is_honoured_and_capped(
    server: ApiServer, set_conn: Callable[..., None], sleeps: list[float]
) -> None:
    set_conn(host=server.base_url, extra={"retry_wait_max": 20})
    server.reply(
        reply_json(429, {}, {"Retry-After": "4"}),
        reply_json(429, {}, {"Retry-After": "999999"}),
        reply_json(200, task_body("pw-1")),
    )
    await PPIOHook().aget_prewarm_task("pw-1")
    assert sleeps == [4.0, 20.0]


async def test_max_attempts_1_disables_retries(hook: PPIOHook, server: ApiServer, sleeps: list[float]) -> None:
    server.reply(reply_json(503, {}))
    with pytest.raises(PPIOServerError):
        await PPIOHook(max_attempts=1).aget_prewarm_task("pw-1")
    assert len(server.seen) == 1
    assert sleeps == []


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"<html>maintenance</html>", "not JSON"),
        (b"", "empty body"),
        (b'[{"task_id": "pw-1"}]', "got list"),
        (b'{"task_id": "pw-1", "status": "running"}', "status"),
    ],
)
async def test_unusable_bodies_raise_bad_response_once(
    hook: PPIOHook, server: ApiServer, body: bytes, match: str
) -> None:
    server.reply(reply_bytes(200, body))
    with pytest.raises(PPIOBadResponseError, match=match):
        await hook.aget_prewarm_task("pw-1")
    assert len(server.seen) == 1


async def test_an_answer_about_another_task_is_refused(hook: PPIOHook, server: ApiServer, api_key: str) -> None:
    server.reply(reply_json(200, task_body(f"pw-2-{api_key}", "succeeded")))
    with pytest.raises(PPIOBadResponseError, match="Asked for prewarm task 'pw-1', the API answered with task") as info:
        await hook.aget_prewarm_task("pw-1")
    assert api_key not in str(info.value)
    assert len(server.seen) == 1


async def test_a_body_that_is_not_its_content_encoding_is_a_bad_response(hook: PPIOHook, server: ApiServer) -> None:
    server.reply(reply_bytes(200, b'{"task_id": "pw-1"}', {"Content-Encoding": "gzip"}))
    with pytest.raises(PPIOBadResponseError, match=r"could not be decoded \(Content-Encoding: gzip\)"):
        await hook.aget_prewarm_task("pw-1")
    assert len(server.seen) == 1  # a broken server, not a network fault: not retried


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_redirects_are_not_followed(hook: PPIOHook, server: ApiServer, status: int) -> None:
    server.reply(reply_json(status, {}, {"Location": f"{server.base_url}/steal"}), reply_json(200, task_body()))
    with pytest.raises(PPIOBadResponseError, match="redirect"):
        await hook.aget_prewarm_task("pw-1")
    assert [request.path for request in server.seen] == [f"{TASKS}/pw-1"]  # the key never went to /steal


async def test_oversized_body_is_refused(hook: PPIOHook, server: ApiServer) -> None:
    server.reply(huge_body(MAX_BODY_BYTES + 2 * 65536))
    with pytest.raises(PPIOBadResponseError, match="larger than"):
        await hook.aget_prewarm_task("pw-1")
    assert len(server.seen) == 1


async def test_a_refused_connection_is_a_transport_error_never_sent_and_retried(
    set_conn: Callable[..., None], sleeps: list[float]
) -> None:
    url, port_holder = refused_url()
    try:
        set_conn(host=url)
        with pytest.raises(PPIOTransportError) as info:
            await PPIOHook().aget_prewarm_task("pw-1")
    finally:
        port_holder.close()
    assert type(info.value) is PPIOTransportError
    assert info.value.request_sent is False
    assert len(sleeps) == 4  # transient: the call's 5 attempts


@pytest.mark.parametrize("behaviour", [reset, cut_body], ids=["reset before the answer", "cut mid-body"])
async def test_a_broken_connection_is_a_transport_error_after_sending(
    hook: PPIOHook, server: ApiServer, sleeps: list[float], behaviour: Any
) -> None:
    server.reply(behaviour)
    with pytest.raises(PPIOTransportError) as info:
        await hook.aget_prewarm_task("pw-1")
    assert type(info.value) is PPIOTransportError
    assert info.value.request_sent is True
    assert len(sleeps) == 4  # transient: the call's 5 attempts
    # aiohttp itself sends an idempotent request once more when the connection breaks before the answer's
    # headers (RFC 9112 9.3.1), so a reset attempt may reach the server twice.
    assert 5 <= len(server.seen) <= 10


@pytest.mark.timeout(20)
@pytest.mark.parametrize("behaviour", ["silent", "trickled headers", "trickled body"])
async def test_no_answer_cannot_outlast_the_timeout(
    server: ApiServer, set_conn: Callable[..., None], behaviour: str
) -> None:
    # A client bounding only each read (not the whole answer) would wait for the trickle forever. The budget is
    # a whole second (half of it to connect) so a garbage-collector pause in a big test process cannot use it up.
    set_conn(host=server.base_url, extra={"timeout": 1.0, "max_attempts": 1})
    server.reply(
        {
            "silent": hang(server),
            "trickled headers": trickle(server, headers_too=True),
            "trickled body": trickle(server, headers_too=False),
        }[behaviour]
    )
    started = time.monotonic()
    with pytest.raises(PPIOTransportError, match=r"within 1s") as info:
        await PPIOHook().aget_prewarm_task("pw-1")
    assert time.monotonic() - started < 3
    assert info.value.transient and info.value.request_sent
    # The server's thread records the request when it gets to it, which on a loaded machine can be after the
    # client gave up: give it a moment, then check the request was sent once and not retried.
    for _ in range(200):
        if server.seen:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert len(server.seen) == 1


async def test_async_missing_key_names_the_connection(server: ApiServer, set_conn: Callable[..., None]) -> None:
    set_conn("ppio_async_nokey", host=server.base_url, password=None)
    with pytest.raises(PPIOConnectionConfigError, match="ppio_async_nokey"):
        await PPIOHook("ppio_async_nokey").aget_prewarm_task("pw-1")
    assert server.seen == []


# -- secrecy ------------------------------------------------------------------------------------------------


async def test_key_echoed_in_async_errors_and_logs_is_scrubbed(
    hook: PPIOHook,
    server: ApiServer,
    api_key: str,
    sleeps: list[float],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server.reply(
        reply_bytes(503, f"upstream saw Bearer {api_key}".encode(), {"Content-Type": "text/plain"}),
        reply_json(401, {"message": f"bad key {api_key}"}),
    )
    with pytest.raises(PPIOAuthError) as info:
        await hook.aget_prewarm_task("pw-1")
    logged = logged_text(caplog, capsys)
    assert "retrying" in logged
    for text in (str(info.value), repr(info.value), "".join(traceback.format_exception(info.value)), logged):
        assert api_key not in text


async def test_key_not_in_async_transport_errors(
    set_conn: Callable[..., None], api_key: str, sleeps: list[float]
) -> None:
    url, port_holder = refused_url()
    try:
        set_conn(host=url)
        with pytest.raises(PPIOTransportError) as info:
            await PPIOHook().aget_prewarm_task("pw-1")
    finally:
        port_holder.close()
    assert api_key not in "".join(traceback.format_exception(info.value))


# -- connection lookups -------------------------------------------------------------------------------------


async def test_async_settings_come_from_the_connection(set_conn: Callable[..., None]) -> None:
    set_conn("ppio_async", host="api.novita.ai", extra={"max_attempts": 2})
    hook = PPIOHook("ppio_async")
    settings = await hook.aget_settings()
    assert (settings.base_url, settings.max_attempts) == ("https://api.novita.ai", 2)
    assert await hook.aget_settings() is settings


async def test_concurrent_lookups_of_a_connection_are_shared_but_not_kept(
    set_conn: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a triggerer restart does: every resumed trigger's hook looks the same connection up at once.
    set_conn("ppio_shared", extra={"max_attempts": 2})
    real = async_transport_module.get_async_connection
    lookups: list[str] = []

    async def counted(conn_id: str, hook: Any = None) -> Any:
        lookups.append(conn_id)
        await asyncio.sleep(0.05)
        return await real(conn_id, hook)

    monkeypatch.setattr(async_transport_module, "get_async_connection", counted)
    hooks = [PPIOHook("ppio_shared", max_attempts=n) for n in range(1, 201)]
    impatient = asyncio.create_task(hooks[0].aget_settings())
    await asyncio.sleep(0)

    impatient.cancel()  # one waiter giving up does not cancel the lookup the others wait for
    results = await asyncio.gather(*(hook.aget_settings() for hook in hooks[1:]))

    assert lookups == ["ppio_shared"]
    assert [settings.max_attempts for settings in results] == list(range(2, 201))  # each hook's own overrides
    set_conn("ppio_shared", password="sk_rotated_key")
    rotated = await PPIOHook("ppio_shared").aget_settings()
    assert rotated.api_key == "sk_rotated_key"  # a later lookup reads the connection again
    assert lookups == ["ppio_shared", "ppio_shared"]


async def test_a_failed_shared_lookup_reaches_every_waiter(set_conn: Callable[..., None]) -> None:
    from airflow.providers.common.compat.sdk import AirflowNotFoundException

    results = await asyncio.gather(
        *(PPIOHook("ppio_nowhere").aget_settings() for _ in range(3)), return_exceptions=True
    )
    assert [type(result) for result in results] == [AirflowNotFoundException] * 3


# -- the shared session -------------------------------------------------------------------------------------


def settings_for(base_url: str, api_key: str = "sk_pool", **kwargs: Any) -> ClientSettings:
    return ClientSettings(base_url=base_url, api_key=api_key, timeout=10, **kwargs)


async def get(session: Any, settings: ClientSettings, task_id: str = "pw-1") -> Any:
    """One attempt through ``session`` (no retries), as the hook sends it."""
    return await _async.send(session, settings, "GET", f"{TASKS}/{task_id}", params=None, json=None, allow_empty=False)


async def test_concurrent_calls_share_one_session_which_closes_after(hook: PPIOHook, server: ApiServer) -> None:
    server.reply(reply_after(0.3, reply_json(200, task_body("pw-1"))))
    calls = [asyncio.ensure_future(hook.aget_prewarm_task("pw-1")) for _ in range(3)]
    while len(server.seen) < 3:
        await asyncio.sleep(0.01)
    assert SHARED_SESSIONS.open_sessions() == 1
    await asyncio.gather(*calls)
    assert SHARED_SESSIONS.open_sessions() == 0  # the last user closed it
    for _ in range(50):  # the server sees the connections go shortly after
        if server.open_connections() == 0:
            break
        await asyncio.sleep(0.02)
    assert server.open_connections() == 0


async def test_calls_outside_a_trigger_build_the_tls_context_once(
    hook: PPIOHook, server: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without a trigger's lease each call gets a new session; loading the CA bundle for each (tens of ms
    # of CPU) would make a sequential async call many times dearer than a sync one.
    _async._ssl_context.cache_clear()
    built: list[object] = []
    real = ssl.create_default_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counted)
    server.reply(reply_json(200, task_body("pw-1")))

    for _ in range(3):
        await hook.aget_prewarm_task("pw-1")

    assert SHARED_SESSIONS.open_sessions() == 0  # nothing holds a session open between the calls
    assert len(built) == 1


async def test_leases_share_a_session_per_tls_setting_and_proxy_and_count_their_users() -> None:
    pool = SharedSessions()
    async with pool.lease(settings_for("http://127.0.0.1:1")) as first:
        async with (
            pool.lease(settings_for("http://127.0.0.1:2", "sk_other")) as other_key,
            pool.lease(settings_for("http://127.0.0.1:1", tls=TLSSettings(verify=False))) as other_tls,
            pool.lease(settings_for("http://127.0.0.1:1", proxy="http://127.0.0.1:3")) as other_proxy,
        ):
            assert other_key is first  # the key and host travel per request
            assert len({id(first), id(other_tls), id(other_proxy)}) == 3
            assert pool.open_sessions() == 3
        assert pool.open_sessions() == 1
        assert other_tls.closed and other_proxy.closed
        assert not first.closed
    assert first.closed
    assert pool.open_sessions() == 0


async def test_a_cancelled_lease_closes_its_session() -> None:
    pool = SharedSessions()
    entered = asyncio.Event()
    sessions: list[Any] = []

    async def hold() -> None:
        async with pool.lease(settings_for("http://127.0.0.1:1")) as session:
            sessions.append(session)
            entered.set()
            await asyncio.sleep(3600)

    holder = asyncio.create_task(hold())
    await entered.wait()
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    assert sessions[0].closed
    assert pool.open_sessions() == 0


@pytest.mark.timeout(30)
def test_each_event_loop_gets_its_own_session(server: ApiServer) -> None:
    server.reply(reply_json(200, task_body("pw-1")))
    pool = SharedSessions()
    settings = settings_for(server.base_url)
    seen: dict[str, Any] = {}
    both_inside = threading.Barrier(2, timeout=10)

    async def use(name: str) -> None:
        async with pool.lease(settings) as session:
            seen[name] = (session, (await get(session, settings))["task_id"])
            await asyncio.to_thread(both_inside.wait)  # both loops hold a lease at once
            seen[name + "_open"] = pool.open_sessions()
            await asyncio.to_thread(both_inside.wait)

    threads = [threading.Thread(target=asyncio.run, args=(use(name),)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)

    assert seen["a"][0] is not seen["b"][0]
    assert seen["a"][1] == seen["b"][1] == "pw-1"
    assert seen["a_open"] == seen["b_open"] == 2
    assert pool.open_sessions() == 0


@pytest.mark.timeout(30)
async def test_the_pool_bounds_open_connections_and_reuses_them(server: ApiServer) -> None:
    # This test's own server: every connection it sees was opened here (a session-wide server would also
    # count what other tests left open).
    server.reply(reply_after(0.02, reply_json(200, task_body("pw-1"))))
    pool = SharedSessions(max_connections=3)
    settings = settings_for(server.base_url)

    async with pool.lease(settings) as session:
        for _ in range(3):
            answers = await asyncio.gather(*(get(session, settings) for _ in range(30)))
            assert [answer["task_id"] for answer in answers] == ["pw-1"] * 30

    assert len(server.seen) == 90
    assert server.most_in_flight == 3  # never more than the bound at once, and the bound is used
    assert len({request.client_port for request in server.seen}) == 3  # kept alive: 90 requests, 3 connections
    for _ in range(50):
        if server.open_connections() == 0:
            break
        await asyncio.sleep(0.02)
    assert server.open_connections() == 0  # closed with the session


@pytest.mark.timeout(30)
async def test_a_request_cancelled_while_queued_or_refused_frees_its_place(server: ApiServer) -> None:
    server.reply(reply_after(0.3, reply_json(200, task_body("pw-1"))), reply_json(200, task_body("pw-1")))
    pool = SharedSessions(max_connections=1)
    settings = settings_for(server.base_url)

    async with pool.lease(settings) as session:
        slow = asyncio.create_task(get(session, settings))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(get(session, settings))
        await asyncio.sleep(0.05)
        queued.cancel()
        assert (await slow)["task_id"] == "pw-1"
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert (await asyncio.wait_for(get(session, settings), 5))["task_id"] == "pw-1"
    assert len(server.seen) == 2  # the cancelled request never went out

    url, port_holder = refused_url()
    try:
        refused = settings_for(url)
        async with pool.lease(refused) as session:
            for _ in range(2):  # the first failure must not keep the only place
                with pytest.raises(PPIOTransportError):
                    await asyncio.wait_for(get(session, refused), 5)
    finally:
        port_holder.close()


@pytest.mark.timeout(30)
async def test_waiting_for_a_pooled_connection_counts_in_the_timeout(server: ApiServer) -> None:
    server.reply(hang(server))
    pool = SharedSessions(max_connections=1)
    hanging = settings_for(server.base_url)
    quick = ClientSettings(base_url=server.base_url, api_key="sk_pool", timeout=0.3)

    async with pool.lease(hanging) as session:
        stuck = asyncio.create_task(get(session, hanging))
        while not server.seen:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(PPIOTransportError, match=r"within 0\.3s") as info:
            await get(session, quick)  # queued behind the stuck request: bounded all the same
        assert time.monotonic() - started < 2
        assert info.value.request_sent is False  # it never left the queue: even a create may be retried
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
    assert len(server.seen) == 1


async def test_an_error_the_caller_was_handling_is_not_named_as_the_cause_async(
    set_conn: Callable[..., None],
) -> None:
    url, port_holder = refused_url()
    set_conn(host=url, extra={"max_attempts": 1})
    try:
        raise KeyError("the caller's own trouble")
    except KeyError:
        with pytest.raises(PPIOTransportError) as info:
            await PPIOHook().aget_prewarm_task("pw-1")
    finally:
        port_holder.close()
    assert "KeyError" not in str(info.value)
