"""PPIOHook over httpx (the trigger's path): same URLs, errors, retries and secrecy as the sync path."""

from __future__ import annotations

import asyncio
import threading
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

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
    PPIOTimeoutError,
    PPIOTransportError,
)
from airflow_provider_ppio.hooks._async_pool import SHARED_ASYNC_CLIENTS
from airflow_provider_ppio.hooks._shared import MAX_BODY_BYTES
from airflow_provider_ppio.hooks.ppio import PPIOHook
from airflow_provider_ppio.models import Outcome

TASKS = "/gpus/v2/prewarm-tasks"
MakeTask = Callable[..., dict[str, Any]]
Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


class FakeAPI:
    """
    Stands in for the network under the pool's real clients and lanes, recording every request.

    :param handler: Answers one request; set per test.
    """

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.lanes: list[Any] = []
        self.handler: Handler = lambda request: httpx.Response(500)

    def reply(self, *responses: httpx.Response | Exception) -> None:
        """Answer with these in order, repeating the last one."""
        queue = list(responses)

        def handler(request: httpx.Request) -> httpx.Response:
            item = queue.pop(0) if len(queue) > 1 else queue[0]
            if isinstance(item, Exception):
                raise item
            return item

        self.handler = handler

    async def _dispatch(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.handler(request)
        if isinstance(answer, Awaitable):
            answer = await answer
        return answer


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> FakeAPI:
    """
    Routes the shared pool's connections to a :class:`FakeAPI`: each lane (one connection, built by the real
    client with the real settings) becomes a mock transport.
    """
    fake = FakeAPI()

    class RoutedLane(httpx.MockTransport):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(fake._dispatch)
            self.closed = False
            fake.lanes.append(self)

        async def aclose(self) -> None:
            self.closed = True

    monkeypatch.setattr(httpx, "AsyncHTTPTransport", RoutedLane)
    return fake


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every wait between async retries, without waiting."""
    waited: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds: float, *args: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            # Not ours: e.g. the session emulator's server loop, running in its own thread.
            await real_sleep(seconds, *args)
            return
        waited.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    return waited


@pytest.fixture
def hook(ppio_conn: str) -> PPIOHook:
    return PPIOHook()


def logged_text(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> str:
    return caplog.text + "".join(capsys.readouterr())


async def test_aget_prewarm_task_parses_and_sends_auth(
    hook: PPIOHook, api: FakeAPI, ppio_conn: str, api_key: str, make_task: MakeTask
) -> None:
    api.reply(httpx.Response(200, json=make_task("pw-1", "succeeded", gpu_nodes=2)))
    task = await hook.aget_prewarm_task("pw-1")
    assert task.outcome is Outcome.SUCCEEDED
    assert task.to_xcom()["gpu_nodes"] == 2
    (request,) = api.requests
    assert str(request.url) == f"{ppio_conn}{TASKS}/pw-1"
    assert request.method == "GET"
    assert request.headers["Authorization"] == f"Bearer {api_key}"
    assert request.headers["Accept"] == "application/json"
    assert f"airflow-provider-ppio/{__version__}" in request.headers["User-Agent"]


@pytest.mark.parametrize("status", ["pending", "running", "succeeded", "failed", "RUNNING", "mystery"])
async def test_aget_parses_every_status_like_the_sync_path(
    hook: PPIOHook, api: FakeAPI, status: str, make_task: MakeTask
) -> None:
    api.reply(httpx.Response(200, json=make_task("pw-1", status)))
    task = await hook.aget_prewarm_task("pw-1")
    assert task.status.status == status
    expected = {"succeeded": Outcome.SUCCEEDED, "failed": Outcome.FAILED}.get(status.lower(), Outcome.WAITING)
    assert task.outcome is expected


@pytest.mark.parametrize(
    ("task_id", "segment"),
    [
        ("../x", "..%2Fx"),
        ("a/b", "a%2Fb"),
        ("?", "%3F"),
        ("#", "%23"),
        ("%2F", "%252F"),
        ("a b", "a%20b"),
        ("é", "%C3%A9"),
    ],
)
async def test_aget_sends_the_id_as_one_encoded_segment(
    hook: PPIOHook, api: FakeAPI, task_id: str, segment: str, make_task: MakeTask
) -> None:
    api.reply(httpx.Response(200, json=make_task(task_id)))
    assert (await hook.aget_prewarm_task(task_id)).task_id == task_id
    assert api.requests[0].url.raw_path == f"{TASKS}/{segment}".encode()


@pytest.mark.parametrize("task_id", ["", ".", "..", "x" * 256, None, 7])
async def test_aget_refuses_invalid_ids_before_any_request(hook: PPIOHook, api: FakeAPI, task_id: Any) -> None:
    with pytest.raises(PPIOInvalidInputError):
        await hook.aget_prewarm_task(task_id)
    assert api.requests == []


async def test_aget_generic_path_and_params(hook: PPIOHook, api: FakeAPI) -> None:
    api.reply(httpx.Response(200, json={"data": []}))
    assert await hook.aget(TASKS, params={"limit": 1}) == {"data": []}
    assert dict(api.requests[0].url.params) == {"limit": "1"}
    with pytest.raises(PPIOInvalidInputError):
        await hook.aget("//evil.example/x")
    assert len(api.requests) == 1


@pytest.mark.parametrize(
    ("status", "body", "error", "attempts"),
    [
        (400, {"message": "bad image"}, PPIOBadRequestError, 1),
        (400, {"message": "quota exceeded"}, PPIOQuotaExceededError, 1),
        (401, {"message": "invalid key"}, PPIOAuthError, 1),
        (403, {"message": "forbidden"}, PPIOAuthError, 1),
        (404, {"message": "no such task"}, PPIONotFoundError, 1),
        (429, {"message": "slow down"}, PPIORateLimitError, 5),
        (500, {"message": "internal"}, PPIOServerError, 5),
        (502, {"message": "bad gateway"}, PPIOServerError, 5),
        (503, {"message": "unavailable"}, PPIOServerError, 5),
        (504, {"message": "gateway timeout"}, PPIOServerError, 5),
    ],
)
async def test_http_errors_map_and_retry_like_the_sync_path(
    hook: PPIOHook,
    api: FakeAPI,
    sleeps: list[float],
    status: int,
    body: dict[str, str],
    error: type[PPIOError],
    attempts: int,
) -> None:
    api.reply(httpx.Response(status, json=body))
    with pytest.raises(error) as info:
        await hook.aget_prewarm_task("pw-1")
    assert type(info.value) is error
    assert info.value.http_status == status
    assert body["message"] in str(info.value)
    assert len(api.requests) == attempts
    assert len(sleeps) == attempts - 1


async def test_transient_errors_are_retried_until_success(
    hook: PPIOHook, api: FakeAPI, sleeps: list[float], make_task: MakeTask
) -> None:
    api.reply(
        httpx.Response(503, json={"message": "busy"}),
        httpx.ReadError("connection reset"),
        httpx.Response(200, json=make_task("pw-1", "running")),
    )
    assert (await hook.aget_prewarm_task("pw-1")).outcome is Outcome.WAITING
    assert len(api.requests) == 3
    assert len(sleeps) == 2
    assert all(0 < wait < 1 for wait in sleeps)


async def test_retry_after_is_honoured_and_capped(
    set_conn: Callable[..., None], api: FakeAPI, sleeps: list[float], make_task: MakeTask
) -> None:
    set_conn(extra={"retry_wait_max": 20})
    api.reply(
        httpx.Response(429, json={}, headers={"Retry-After": "4"}),
        httpx.Response(429, json={}, headers={"Retry-After": "999999"}),
        httpx.Response(200, json=make_task("pw-1")),
    )
    await PPIOHook().aget_prewarm_task("pw-1")
    assert sleeps == [4.0, 20.0]


async def test_max_attempts_1_disables_retries(ppio_conn: str, api: FakeAPI, sleeps: list[float]) -> None:
    api.reply(httpx.Response(503, json={}))
    with pytest.raises(PPIOServerError):
        await PPIOHook(max_attempts=1).aget_prewarm_task("pw-1")
    assert len(api.requests) == 1
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
async def test_unusable_bodies_raise_bad_response_once(hook: PPIOHook, api: FakeAPI, body: bytes, match: str) -> None:
    api.reply(httpx.Response(200, content=body))
    with pytest.raises(PPIOBadResponseError, match=match):
        await hook.aget_prewarm_task("pw-1")
    assert len(api.requests) == 1


async def test_an_answer_about_another_task_is_refused(
    hook: PPIOHook, api: FakeAPI, api_key: str, make_task: MakeTask
) -> None:
    api.reply(httpx.Response(200, json=make_task(f"pw-2-{api_key}", "succeeded")))
    with pytest.raises(
        PPIOBadResponseError, match="Asked for prewarm task 'pw-1', the API answered with task"
    ) as raised:
        await hook.aget_prewarm_task("pw-1")
    assert api_key not in str(raised.value)
    assert len(api.requests) == 1


async def test_a_body_that_is_not_its_content_encoding_is_a_bad_response(hook: PPIOHook, api: FakeAPI) -> None:
    raw = httpx.ByteStream(b'{"task_id": "pw-1"}')  # a stream: given as content, httpx would decode it here
    api.reply(httpx.Response(200, stream=raw, headers={"Content-Encoding": "gzip"}))
    with pytest.raises(PPIOBadResponseError, match=r"could not be decoded \(Content-Encoding: gzip\)"):
        await hook.aget_prewarm_task("pw-1")
    assert len(api.requests) == 1


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_redirects_are_not_followed(hook: PPIOHook, api: FakeAPI, status: int, make_task: MakeTask) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "api.ppio.test":
            return httpx.Response(status, headers={"Location": "https://evil.example/steal"})
        return httpx.Response(200, json=make_task("pw-1", "succeeded"))

    api.handler = handler
    with pytest.raises(PPIOBadResponseError, match="redirect"):
        await hook.aget_prewarm_task("pw-1")
    assert [request.url.host for request in api.requests] == ["api.ppio.test"]


async def test_oversized_body_is_refused(hook: PPIOHook, api: FakeAPI) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b" " * 65536

    api.reply(httpx.Response(200, content=chunks()))
    with pytest.raises(PPIOBadResponseError, match="larger than"):
        await hook.aget_prewarm_task("pw-1")
    assert len(api.requests) == 1


@pytest.mark.parametrize(
    ("exc", "error", "sent"),
    [
        (httpx.ConnectError("refused"), PPIOTransportError, False),
        (httpx.ConnectTimeout("connect timed out"), PPIOTimeoutError, False),
        (httpx.ReadTimeout("read timed out"), PPIOTimeoutError, True),
        (httpx.RemoteProtocolError("peer closed"), PPIOTransportError, True),
    ],
)
async def test_transport_errors_are_typed(
    hook: PPIOHook, api: FakeAPI, sleeps: list[float], exc: Exception, error: type[PPIOError], sent: bool
) -> None:
    api.reply(exc)
    with pytest.raises(error) as info:
        await hook.aget_prewarm_task("pw-1")
    assert type(info.value) is error
    assert info.value.request_sent is sent
    assert len(api.requests) == 5


async def test_a_trickling_body_cannot_outlast_the_timeout(ppio_conn: str, api: FakeAPI) -> None:
    async def trickle() -> AsyncIterator[bytes]:
        yield b"{"
        for _ in range(150):  # ~3 s: a client without a deadline fails on the cut body instead of hanging
            await asyncio.sleep(0.02)
            yield b" "

    api.handler = lambda request: httpx.Response(200, content=trickle())
    with pytest.raises(PPIOTimeoutError, match=r"within 0\.2s"):
        await PPIOHook(timeout=0.2, max_attempts=1).aget_prewarm_task("pw-1")
    assert len(api.requests) == 1


async def test_requests_carry_the_configured_timeouts(
    set_conn: Callable[..., None], api: FakeAPI, make_task: MakeTask
) -> None:
    set_conn(extra={"timeout": 42})
    api.reply(httpx.Response(200, json=make_task("pw-1")))
    await PPIOHook().aget_prewarm_task("pw-1")
    (request,) = api.requests
    assert request.extensions["timeout"] == {"connect": 10.0, "read": 42.0, "write": 42.0, "pool": 42.0}


async def test_calls_outside_a_trigger_build_the_tls_context_once(
    hook: PPIOHook, api: FakeAPI, make_task: MakeTask, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without a trigger's lease, each call gets a new client; loading the CA bundle for each (~35 ms of
    # CPU) made a sequential async call ~30x dearer than a sync one.
    from airflow_provider_ppio.hooks import _async_pool

    _async_pool._tls_context.cache_clear()
    built: list[object] = []
    real = httpx.create_ssl_context
    monkeypatch.setattr(httpx, "create_ssl_context", lambda *a, **k: built.append(1) or real(*a, **k))
    api.reply(httpx.Response(200, json=make_task("pw-1")))

    for _ in range(3):
        await hook.aget_prewarm_task("pw-1")

    assert len(api.lanes) == 3  # a client (with its lane) per call: nothing holds one open between them
    assert len(built) == 1


async def test_concurrent_calls_share_one_client_which_closes_after(
    hook: PPIOHook, api: FakeAPI, make_task: MakeTask
) -> None:
    release = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        await release.wait()
        return httpx.Response(200, json=make_task("pw-1"))

    api.handler = slow
    calls = [asyncio.ensure_future(hook.aget_prewarm_task("pw-1")) for _ in range(3)]
    while len(api.requests) < 3:
        await asyncio.sleep(0.001)
    assert SHARED_ASYNC_CLIENTS.open_clients() == 1
    release.set()
    await asyncio.gather(*calls)
    assert len(api.lanes) == 3  # one client, a lane (connection) per request in flight
    assert SHARED_ASYNC_CLIENTS.open_clients() == 0
    assert all(lane.closed for lane in api.lanes)


async def test_async_settings_come_from_the_connection(set_conn: Callable[..., None], api: FakeAPI) -> None:
    set_conn("ppio_async", host="api.novita.ai", extra={"max_attempts": 2})
    hook = PPIOHook("ppio_async")
    settings = await hook.aget_settings()
    assert (settings.base_url, settings.max_attempts) == ("https://api.novita.ai", 2)
    assert await hook.aget_settings() is settings


async def test_concurrent_lookups_of_a_connection_are_shared_but_not_kept(
    set_conn: Callable[..., None], monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a triggerer restart does: every resumed trigger's hook looks the same connection up at once.
    from airflow.providers.common.compat import connection

    set_conn("ppio_shared", extra={"max_attempts": 2})
    real = connection.get_async_connection
    lookups: list[str] = []

    async def counted(conn_id: str, hook: Any = None) -> Any:
        lookups.append(conn_id)
        await asyncio.sleep(0.05)
        return await real(conn_id, hook)

    monkeypatch.setattr(connection, "get_async_connection", counted)
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


async def test_async_missing_key_names_the_connection(set_conn: Callable[..., None], api: FakeAPI) -> None:
    set_conn("ppio_async_nokey", password=None)
    with pytest.raises(PPIOConnectionConfigError, match="ppio_async_nokey"):
        await PPIOHook("ppio_async_nokey").aget_prewarm_task("pw-1")
    assert api.requests == []


async def test_key_echoed_in_async_errors_and_logs_is_scrubbed(
    hook: PPIOHook,
    api: FakeAPI,
    api_key: str,
    sleeps: list[float],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    api.reply(
        httpx.Response(503, text=f"upstream saw Bearer {api_key}"),
        httpx.Response(401, json={"message": f"bad key {api_key}"}),
    )
    with pytest.raises(PPIOAuthError) as info:
        await hook.aget_prewarm_task("pw-1")
    logged = logged_text(caplog, capsys)
    assert "retrying" in logged
    for text in (str(info.value), repr(info.value), "".join(traceback.format_exception(info.value)), logged):
        assert api_key not in text


async def test_key_not_in_async_transport_errors(
    hook: PPIOHook, api: FakeAPI, api_key: str, sleeps: list[float]
) -> None:
    api.reply(httpx.ConnectError("All connection attempts failed"))
    with pytest.raises(PPIOTransportError) as info:
        await hook.aget_prewarm_task("pw-1")
    assert api_key not in "".join(traceback.format_exception(info.value))
