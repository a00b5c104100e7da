"""PPIOHook over requests: connection settings, URLs, error mapping, retries, timeouts, secrecy."""

from __future__ import annotations

import asyncio
import email.utils
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, unquote

import pytest
import requests
import requests_mock as rm
from airflow.providers.common.compat.sdk import AirflowFailException
from virtual_clock import install_virtual_clock

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
from airflow_provider_ppio.hooks._shared import MAX_BODY_BYTES
from airflow_provider_ppio.hooks.ppio import PPIOHook
from airflow_provider_ppio.models import Outcome

TASKS = "/gpus/v2/prewarm-tasks"
MakeTask = Callable[..., dict[str, Any]]


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every wait between retries (tenacity sleeps through ``time.sleep``), without waiting."""
    return install_virtual_clock(monkeypatch)


@pytest.fixture
def hook(ppio_conn: str) -> PPIOHook:
    return PPIOHook()


@pytest.fixture
def task_url(ppio_conn: str) -> str:
    return f"{ppio_conn}{TASKS}/pw-1"


def unused_port() -> int:
    """A local port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def refused_connection_error() -> requests.ConnectionError:
    """The exact exception requests raises when the server refuses the connection."""
    from requests.adapters import HTTPAdapter

    request = requests.Request("GET", f"http://127.0.0.1:{unused_port()}/").prepare()
    try:
        HTTPAdapter().send(request, timeout=2)  # the adapter itself: requests-mock patches only sessions
    except requests.ConnectionError as err:
        return err
    raise AssertionError("the unused port accepted a connection")


def assert_no_key(key: str, *texts: str) -> None:
    for text in texts:
        assert key not in text


# -- connection settings ---------------------------------------------------------------------------


def test_missing_api_key_names_the_connection(set_conn: Callable[..., None]) -> None:
    set_conn("ppio_nokey", password=None)
    with pytest.raises(PPIOConnectionConfigError, match="ppio_nokey") as info:
        PPIOHook("ppio_nokey").get_prewarm_task("pw-1")
    assert "API key" in str(info.value)


def test_blank_api_key_is_missing(set_conn: Callable[..., None]) -> None:
    set_conn("ppio_blank", password="   ")
    with pytest.raises(PPIOConnectionConfigError, match="ppio_blank"):
        _ = PPIOHook("ppio_blank").settings


@pytest.mark.parametrize(
    ("host", "base_url"),
    [
        (None, "https://api.ppio.com"),
        ("", "https://api.ppio.com"),
        ("api.ppio.com", "https://api.ppio.com"),
        ("https://api.ppio.com/", "https://api.ppio.com"),
        ("https://api.novita.ai", "https://api.novita.ai"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("https://gateway.example.com/ppio/", "https://gateway.example.com/ppio"),
        ("HTTPS://api.ppio.com:443", "https://api.ppio.com:443"),
        ("https://[2001:db8::1]:8443", "https://[2001:db8::1]:8443"),
        ("https://ä.example", "https://xn--4ca.example"),
    ],
)
def test_base_url_from_host(set_conn: Callable[..., None], host: str | None, base_url: str) -> None:
    set_conn(host=host)
    assert PPIOHook().settings.base_url == base_url


def test_novita_host_gets_the_requests(
    set_conn: Callable[..., None], requests_mock: rm.Mocker, make_task: MakeTask
) -> None:
    set_conn(host="https://api.novita.ai")
    requests_mock.get(f"https://api.novita.ai{TASKS}/pw-1", json=make_task("pw-1"))
    assert PPIOHook().get_prewarm_task("pw-1").task_id == "pw-1"


@pytest.mark.parametrize(
    "host",
    [
        "ftp://api.ppio.com",
        "https://user:pw@api.ppio.com",
        "https://sk_x@api.ppio.com",
        "https://api.ppio.com@evil.example",
        "https://api.ppio.com/?x=1",
        "https://api.ppio.com/#x",
        "https://",
        "https://api.ppio.com\n.evil.com",
        "https://api.ppio.com\r\n.evil.com",
        "https://api\t.ppio.com",
        "https://api.ppio.com\x00.evil.com",
        "https://api .ppio.com",
        "https://api.ppio.com:abc",
        "https://api.ppio.com:99999",
        "https://api.ppio.com:0",
        "https://api.ppio.com:",
        "https://api.ppio.com:-1",
        "https://api.ppio.com:8443:9",
        "https://api.ppio.com:\uff18\uff10",
        "https://[::1",
        "https://api.ppio.com\u2028.evil.com",
        "https://api%2eppio.com",
        "https://api.ppio.com\\@evil.example",
        "https://api.ppio.com/ppio/../admin",
    ],
)
def test_unusable_base_url_names_the_connection(
    set_conn: Callable[..., None], requests_mock: rm.Mocker, host: str
) -> None:
    set_conn("ppio_badhost", host=host)
    with pytest.raises(PPIOConnectionConfigError, match="ppio_badhost"):
        PPIOHook("ppio_badhost").get_prewarm_task("pw-1")
    assert requests_mock.call_count == 0


def test_plain_http_to_a_remote_host_is_refused_before_any_request(
    set_conn: Callable[..., None], requests_mock: rm.Mocker, api_key: str
) -> None:
    set_conn(host="http://api.ppio.com")
    with pytest.raises(PPIOConnectionConfigError, match="allow_insecure_http") as info:
        PPIOHook().get_prewarm_task("pw-1")
    assert requests_mock.call_count == 0
    assert api_key not in str(info.value)
    assert "in clear" in str(info.value)


@pytest.mark.parametrize("value", [True, "true", "1"])
def test_plain_http_to_a_remote_host_is_allowed_by_the_extra_with_a_warning(
    set_conn: Callable[..., None],
    requests_mock: rm.Mocker,
    make_task: MakeTask,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    value: object,
) -> None:
    set_conn(host="http://10.0.0.7:8080", extra={"allow_insecure_http": value})
    requests_mock.get(f"http://10.0.0.7:8080{TASKS}/pw-1", json=make_task("pw-1"))
    assert PPIOHook().get_prewarm_task("pw-1").task_id == "pw-1"
    logged = caplog.text + "".join(capsys.readouterr())
    assert "plain http" in logged


@pytest.mark.parametrize("value", ["maybe", 2, [True]])
def test_a_bad_allow_insecure_http_is_refused(set_conn: Callable[..., None], value: object) -> None:
    set_conn(host="http://10.0.0.7", extra={"allow_insecure_http": value})
    with pytest.raises(PPIOConnectionConfigError, match="allow_insecure_http"):
        _ = PPIOHook().settings


@pytest.mark.parametrize("host", ["http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:8080"])
def test_plain_http_to_this_machine_needs_no_extra(set_conn: Callable[..., None], host: str) -> None:
    set_conn(host=host)
    assert PPIOHook().settings.base_url == host


# -- the connection's port and type ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conn", "base_url"),
    [
        # The URI form docs/deployment.md gives secrets-backend users.
        ("ppio://:sk_uri_key@gw.example.com:8443", "https://gw.example.com:8443"),
        ("ppio://:sk_uri_key@https%3A%2F%2Fgw.example.com%2Fppio:8443", "https://gw.example.com:8443/ppio"),
        ('{"conn_type": "ppio", "password": "sk_uri_key", "host": "gw.example.com", "port": 8443}', None),
        ('{"conn_type": "ppio", "password": "sk_uri_key", "host": "https://gw.example.com", "port": "8443"}', None),
        ('{"conn_type": "ppio", "password": "sk_uri_key", "host": "https://gw.example.com:8443", "port": 8443}', None),
        ('{"conn_type": "ppio", "password": "sk_uri_key", "host": "https://gw.example.com:8443"}', None),
        ('{"conn_type": "PPIO", "password": "sk_uri_key", "host": "https://gw.example.com:8443"}', None),
        # A URI's path is the connection's schema: it is the base path.
        ("ppio://:sk_uri_key@gw.example.com:8443/ppio", "https://gw.example.com:8443/ppio"),
        # HTTP connections spell the scheme in the schema field.
        (
            '{"conn_type": "ppio", "password": "sk_uri_key", "host": "gw.example.com", "schema": "https", "port": 8443}',  # noqa: E501
            None,
        ),
    ],
)
def test_the_connection_port_is_where_requests_go(
    monkeypatch: pytest.MonkeyPatch, requests_mock: rm.Mocker, make_task: MakeTask, conn: str, base_url: str | None
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_PPIO_PORTED", conn)
    base_url = base_url or "https://gw.example.com:8443"
    requests_mock.get(f"{base_url}{TASKS}/pw-1", json=make_task("pw-1"))
    hook = PPIOHook("ppio_ported")
    assert hook.settings.base_url == base_url
    assert hook.get_prewarm_task("pw-1").task_id == "pw-1"
    assert requests_mock.last_request.port == 8443
    assert requests_mock.last_request.headers["Authorization"] == "Bearer sk_uri_key"


@pytest.mark.parametrize(
    ("conn", "expected"),
    [
        ('{"conn_type": "ppio", "password": "k_12345", "host": "https://gw.example.com:8443", "port": 9443}', "9443"),
        ('{"conn_type": "ppio", "password": "k_12345", "host": "gw.example.com", "port": 99999}', "99999"),
        ('{"conn_type": "ppio", "password": "k_12345", "host": "gw.example.com", "port": -1}', "-1"),
        ("ppio://:k_12345@gw.example.com:0", "0"),
        ('{"conn_type": "ppio", "password": "k_12345", "host": "https://gw.example.com/a", "schema": "b"}', "path"),
        ('{"conn_type": "ppio", "password": "k_12345", "host": "https://gw.example.com", "schema": "http"}', "scheme"),
        ("ppio://:k_12345@gw.example.com/a/%2e%2e/admin", "dot segments"),
    ],
)
def test_a_bad_or_conflicting_port_or_path_fails_at_once_with_no_request(
    monkeypatch: pytest.MonkeyPatch, requests_mock: rm.Mocker, sleeps: list[float], conn: str, expected: str
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_PPIO_BADPORT", conn)
    with pytest.raises(PPIOConnectionConfigError, match="ppio_badport") as info:
        PPIOHook("ppio_badport").get_prewarm_task("pw-1", patient=True)
    assert expected in str(info.value)
    assert isinstance(info.value, AirflowFailException)  # no task retries either
    assert requests_mock.call_count == 0
    assert sleeps == []


@pytest.mark.parametrize(
    ("conn", "named"),
    [
        ('{"conn_type": "postgres", "password": "pg_secret_pw", "host": "db.example.com"}', "'postgres'"),
        ('{"conn_type": "http", "password": "pg_secret_pw", "host": "https://api.ppio.com"}', "'http'"),
        ('{"password": "pg_secret_pw", "host": "https://api.ppio.com"}', "None"),
        ("postgres://user:pg_secret_pw@db.example.com:5432/app", "'postgres'"),
    ],
)
def test_a_connection_of_another_type_is_refused_before_any_request(
    monkeypatch: pytest.MonkeyPatch, requests_mock: rm.Mocker, conn: str, named: str
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_SOMEONE_ELSES", conn)
    hook = PPIOHook("someone_elses")
    with pytest.raises(PPIOConnectionConfigError, match="someone_elses") as info:
        hook.get_prewarm_task("pw-1")
    assert f"type {named}" in str(info.value)
    assert "pg_secret_pw" not in str(info.value)
    assert requests_mock.call_count == 0
    ok, message = hook.test_connection()
    assert not ok and f"type {named}" in message
    assert requests_mock.call_count == 0


@pytest.mark.parametrize(
    ("extra", "name"),
    [
        ({"timeout": "abc"}, "timeout"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -5}, "timeout"),
        ({"timeout": "inf"}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": "many"}, "max_attempts"),
        ({"max_attempts": [3]}, "max_attempts"),
        ({"backoff_initial": -1}, "backoff_initial"),
        ({"retry_wait_max": "nan"}, "retry_wait_max"),
    ],
)
def test_bad_extras_name_the_connection_and_the_extra(
    set_conn: Callable[..., None], extra: dict[str, Any], name: str
) -> None:
    set_conn("ppio_badextra", extra=extra)
    with pytest.raises(PPIOConnectionConfigError, match="ppio_badextra") as info:
        _ = PPIOHook("ppio_badextra").settings
    assert name in str(info.value)


def test_extras_are_read_and_strings_accepted(set_conn: Callable[..., None]) -> None:
    set_conn(extra={"timeout": "12.5", "max_attempts": "3", "retry_wait_max": 7})
    settings = PPIOHook().settings
    assert (settings.timeout, settings.max_attempts, settings.retry_wait_max) == (12.5, 3, 7.0)
    assert settings.connect_timeout == 10.0


def test_defaults_without_extras(set_conn: Callable[..., None]) -> None:
    set_conn(extra={"backoff_initial": None})
    settings = PPIOHook().settings
    assert (settings.timeout, settings.max_attempts, settings.backoff_initial) == (30.0, 5, 1.0)


def test_hook_arguments_override_extras(set_conn: Callable[..., None]) -> None:
    set_conn(extra={"timeout": 50, "max_attempts": 9})
    settings = PPIOHook(timeout=3, max_attempts=1).settings
    assert (settings.timeout, settings.max_attempts, settings.connect_timeout) == (3.0, 1, 3.0)
    assert PPIOHook(timeout=None).settings.timeout == 50.0


def test_bad_override_is_refused(ppio_conn: str) -> None:
    with pytest.raises(PPIOConnectionConfigError, match="max_attempts"):
        _ = PPIOHook(max_attempts=0).settings


def test_headers_carry_bearer_key_json_and_user_agent(
    hook: PPIOHook, requests_mock: rm.Mocker, task_url: str, api_key: str, make_task: MakeTask
) -> None:
    requests_mock.get(task_url, json=make_task("pw-1"))
    hook.get_prewarm_task("pw-1")
    headers = requests_mock.last_request.headers
    assert headers["Authorization"] == f"Bearer {api_key}"
    assert headers["Accept"] == "application/json"
    assert f"airflow-provider-ppio/{__version__}" in headers["User-Agent"]
    assert "apache-airflow/" in headers["User-Agent"]


def test_one_session_is_reused_across_calls(
    hook: PPIOHook, requests_mock: rm.Mocker, task_url: str, monkeypatch: pytest.MonkeyPatch, make_task: MakeTask
) -> None:
    created: list[requests.Session] = []
    original_init = requests.Session.__init__

    def counting_init(self: requests.Session) -> None:
        original_init(self)
        created.append(self)

    monkeypatch.setattr(requests.Session, "__init__", counting_init)
    requests_mock.get(task_url, json=make_task("pw-1"))
    requests_mock.get(task_url.rsplit("/", 1)[0], json={"data": []})
    hook.get_prewarm_task("pw-1")
    hook.get_prewarm_task("pw-1")
    hook.get(TASKS, params={"limit": 1})
    assert len(created) == 1
    assert hook.session is created[0]
    assert requests_mock.call_count == 3


def test_connection_is_read_once_per_hook(hook: PPIOHook, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    original = PPIOHook.get_connection

    def counting(conn_id: str) -> Any:
        calls.append(conn_id)
        return original(conn_id)

    monkeypatch.setattr(PPIOHook, "get_connection", staticmethod(counting))
    assert hook.settings is hook.settings
    assert calls == ["ppio_default"]


def test_constructing_the_hook_does_no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_PPIO_DEFAULT", raising=False)
    hook = PPIOHook("does_not_exist", timeout=5)
    assert hook.ppio_conn_id == "does_not_exist"


# -- task ids and URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task_id", "segment"),
    [
        ("pw-1", "pw-1"),
        ("..x", "..x"),
        ("a/b", "a%2Fb"),
        ("?", "%3F"),
        ("#", "%23"),
        ("%2F", "%252F"),
        ("a b", "a%20b"),
        ("预热-é", "%E9%A2%84%E7%83%AD-%C3%A9"),
        ("...", "..."),
        ("x" * 255, "x" * 255),
    ],
)
def test_task_id_is_sent_as_one_encoded_segment(
    hook: PPIOHook, requests_mock: rm.Mocker, ppio_conn: str, task_id: str, segment: str, make_task: MakeTask
) -> None:
    requests_mock.get(rm.ANY, json=make_task(task_id))
    assert hook.get_prewarm_task(task_id).task_id == task_id
    assert requests_mock.call_count == 1
    url = requests_mock.last_request.url
    assert url == f"{ppio_conn}{TASKS}/{segment}"
    path = url.removeprefix(ppio_conn)
    assert path.count("/") == 4  # /gpus/v2/prewarm-tasks/<one segment>
    assert unquote(path.rsplit("/", 1)[1]) == task_id
    assert quote(task_id, safe="") == segment


@pytest.mark.parametrize(
    "task_id", ["", ".", "..", "../x", "a/..", "%2e%2e", "..;x", "x" * 256, None, 123, ["pw-1"], b"pw-1"]
)
def test_invalid_task_ids_are_refused_before_any_request(
    hook: PPIOHook, requests_mock: rm.Mocker, task_id: Any
) -> None:
    with pytest.raises(PPIOInvalidInputError):
        hook.get_prewarm_task(task_id)
    assert requests_mock.call_count == 0


def test_invalid_task_id_is_a_value_error(hook: PPIOHook) -> None:
    with pytest.raises(ValueError, match="1-255"):
        hook.get_prewarm_task("")


DOT_SEGMENT_PATHS = [
    "/../../admin/%2e%2e/x",
    "/gpus/..",
    "/gpus/.",
    "/./gpus",
    "/gpus/%2e%2e/x",
    "/gpus/%2E%2E/x",
    "/gpus/%2E./x",
    "/gpus/.%2e/x",
    "/gpus/%2e/x",
    "/gpus/%252e%252e/x",
    "/gpus/..%2fadmin",
    "/gpus/%2e%2e%2Fadmin",
    "/gpus/..;/admin",
]


@pytest.mark.parametrize("path", ["gpus/v2", "//evil.example/x", "/a?b=1", "/a#b", "/a b", "/a\\b", *DOT_SEGMENT_PATHS])
def test_generic_get_refuses_paths_that_could_leave_the_api(
    hook: PPIOHook, requests_mock: rm.Mocker, path: str
) -> None:
    with pytest.raises(PPIOInvalidInputError):
        hook.get(path)
    with pytest.raises(PPIOInvalidInputError):
        hook.request("DELETE", path, json={"task_ids": ["x"]})
    assert requests_mock.call_count == 0


@pytest.mark.parametrize("path", DOT_SEGMENT_PATHS)
def test_dot_segments_never_leave_a_base_path(
    set_conn: Callable[..., None], requests_mock: rm.Mocker, path: str
) -> None:
    set_conn(host="https://gw.example.com/ppio")
    with pytest.raises(PPIOInvalidInputError, match=r"dot segments|single"):
        PPIOHook().get(path)
    with pytest.raises(PPIOInvalidInputError, match=r"dot segments|single"):
        asyncio.run(PPIOHook().aget(path))
    assert requests_mock.call_count == 0


@pytest.mark.parametrize("path", ["/gpus/v2/prewarm-tasks", "/gpus/v2/...", "/gpus/v2/a.b", "/gpus/v2/.well-known"])
def test_paths_with_dots_that_are_not_dot_segments_stay_under_the_base_path(
    set_conn: Callable[..., None], requests_mock: rm.Mocker, path: str
) -> None:
    set_conn(host="https://gw.example.com/ppio")
    requests_mock.get(rm.ANY, json={})
    PPIOHook().get(path)
    assert requests_mock.last_request.url == f"https://gw.example.com/ppio{path}"


def test_a_bad_path_is_refused_before_the_connection_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_DOES_NOT_EXIST", raising=False)
    hook = PPIOHook("does_not_exist")
    with pytest.raises(PPIOInvalidInputError, match="single '/'"):
        hook.get("gpus/v2")
    with pytest.raises(PPIOInvalidInputError, match="single '/'"):
        asyncio.run(hook.aget("gpus/v2"))


def test_generic_get_returns_json_and_sends_params(hook: PPIOHook, requests_mock: rm.Mocker, ppio_conn: str) -> None:
    requests_mock.get(f"{ppio_conn}{TASKS}", json={"data": [], "has_more": False})
    assert hook.get(TASKS, params={"limit": 1, "status": "running"}) == {"data": [], "has_more": False}
    assert requests_mock.last_request.qs == {"limit": ["1"], "status": ["running"]}


# -- statuses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        ("pending", Outcome.WAITING),
        ("running", Outcome.WAITING),
        ("succeeded", Outcome.SUCCEEDED),
        ("failed", Outcome.FAILED),
        ("Succeeded", Outcome.SUCCEEDED),
        ("FAILED", Outcome.FAILED),
        ("queued_for_gpu", Outcome.WAITING),
    ],
)
def test_get_prewarm_task_parses_every_status(
    hook: PPIOHook, requests_mock: rm.Mocker, task_url: str, status: str, outcome: Outcome, make_task: MakeTask
) -> None:
    requests_mock.get(task_url, json=make_task("pw-1", status))
    task = hook.get_prewarm_task("pw-1")
    assert task.outcome is outcome
    assert task.status.status == status


# -- error mapping ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "error", "attempts"),
    [
        (400, {"message": "image is required"}, PPIOBadRequestError, 1),
        (400, {"message": "prewarm task quota exceeded"}, PPIOQuotaExceededError, 1),
        (400, {"message": "limit 5", "reason": "QUOTA_EXCEEDED"}, PPIOQuotaExceededError, 1),
        (401, {"message": "invalid api key"}, PPIOAuthError, 1),
        (403, {"message": "forbidden"}, PPIOAuthError, 1),
        (404, {"message": "task not found"}, PPIONotFoundError, 1),
        (408, {"message": "request timeout"}, PPIOServerError, 5),
        (409, {"message": "conflict"}, PPIOBadRequestError, 1),
        (422, {"detail": "bad field"}, PPIOBadRequestError, 1),
        (429, {"message": "slow down"}, PPIORateLimitError, 5),
        (429, {"message": "request quota exceeded, slow down"}, PPIORateLimitError, 5),
        (403, {"message": "no quota permission for this key"}, PPIOAuthError, 1),
        (500, {"message": "internal"}, PPIOServerError, 5),
        (502, {"message": "bad gateway"}, PPIOServerError, 5),
        (503, {"message": "unavailable"}, PPIOServerError, 5),
        (504, {"message": "gateway timeout"}, PPIOServerError, 5),
    ],
)
def test_http_errors_map_to_typed_errors_and_retry_only_transient_ones(
    hook: PPIOHook,
    requests_mock: rm.Mocker,
    task_url: str,
    sleeps: list[float],
    status: int,
    body: dict[str, str],
    error: type[PPIOError],
    attempts: int,
) -> None:
    requests_mock.get(task_url, status_code=status, json=body)
    with pytest.raises(error) as info:
        hook.get_prewarm_task("pw-1")
    assert type(info.value) is error
    assert info.value.http_status == status
    assert str(status) in str(info.value)
    message = next(iter(body.values()))
    assert info.value.api_message == message
    assert message in str(info.value)
    assert requests_mock.call_count == attempts
    assert len(sleeps) == attempts - 1


def test_quota_error_explains_the_limit_and_lets_task_retries_apply(
    hook: PPIOHook, requests_mock: rm.Mocker, task_url: str
) -> None:
    requests_mock.get(task_url, status_code=400, json={"error": {"message": "Quota exceeded", "code": "QUOTA"}})
    with pytest.raises(PPIOQuotaExceededError) as info:
        hook.get_prewarm_task("pw-1")
    # A slot frees up when a running prewarm ends: unlike other 400s, a task retry can succeed.
    assert not isinstance(info.value, (PPIOBadRequestError, AirflowFailException))
    assert info.value.api_reason == "QUOTA"
    assert "5 by default" in str(info.value)


#: Quota refusals as PPIO's console backend words them (ppio-api/README.md section 2.5).
PPIO_QUOTA_BODIES = [
    {"code": 400, "reason": "IMAGE_PREWARM_NUM_LIMIT", "message": "Image prewarm number exceeds limit", "metadata": {}},
    {"code": 403, "reason": "IMAGE_PREWARM_NUM_LIMIT", "message": "", "metadata": {}},
    {"reason": "FORBIDDEN", "message": "prewarm number exceeds limit"},
    {"message": "Image prewarm number exceeds limit (5)"},
    {"reason": "PREWARM_TASK_QUOTA_EXCEEDED", "message": "at most 5 concurrent prewarm tasks"},
]


@pytest.mark.parametrize("status", [400, 403, 429])
@pytest.mark.parametrize("body", PPIO_QUOTA_BODIES)
def test_a_quota_refusal_in_ppio_s_words_is_a_quota_error_whatever_the_status(
    hook: PPIOHook, requests_mock: rm.Mocker, ppio_conn: str, sleeps: list[float], status: int, body: dict[str, Any]
) -> None:
    requests_mock.post(f"{ppio_conn}{TASKS}", status_code=status, json=body)
    with pytest.raises(PPIOQuotaExceededError) as info:
        hook.create_prewarm_task("img:1", "us-east-1")
    error = info.value
    assert error.http_status == status
    assert not isinstance(error, (PPIOAuthError, PPIORateLimitError, AirflowFailException))
    assert requests_mock.call_count == 1  # not retried as a rate limit: waiting for a slot is the operator's
    assert (body.get("reason") or "") == (error.api_reason or "")
    # What to do, including the finished tasks that may count until deleted.
    assert "finished" in str(error) and "until they are deleted" in str(error)
    assert "PPIODeletePrewarmTasksOperator" in str(error)


def test_a_409_stays_a_conflict_with_its_status(hook: PPIOHook, requests_mock: rm.Mocker, ppio_conn: str) -> None:
    # The create operator looks its task up by marker on a 409: it needs the status, not a quota error.
    requests_mock.post(f"{ppio_conn}{TASKS}", status_code=409, json={"reason": "CONFLICT", "message": "exists"})
    with pytest.raises(PPIOBadRequestError) as info:
        hook.create_prewarm_task("img:1", "us-east-1")
    assert info.value.http_status == 409


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"error": {"message": "nested msg", "code": "E42"}}', "nested msg"),
        (b'{"msg": "short msg"}', "short msg"),
        (b'{"error": "plain error"}', "plain error"),
        (b"<html><body>Bad Request</body></html>", "Bad Request"),
        (b'["odd", "array"]', "odd"),
    ],
)
def test_error_bodies_of_any_shape_give_a_message(
    hook: PPIOHook, requests_mock: rm.Mocker, task_url: str, body: bytes, expected: str
) -> None:
    requests_mock.get(task_url, status_code=400, content=body)
    with pytest.raises(PPIOBadRequestError) as info:
        hook.get_prewarm_task("pw-1")
    assert expected in str(info.value)


def test_html_5xx_is_a_server_error_with_a_short_snippet(
    hook: PPIOHook, requests_mock: rm.Mocker, task_url: str, sleeps: list[float]
) -> None:
    page = "<html><head><title>502 Bad Gateway</title></head><body>" + "x" * 5000 + "</body></html>"
    requests_mock.get(task_url, status_code=502, text=page, headers={"Content-Type": "text/html"})
    with pytest.raises(PPIOServerError) as info:
        hook.get_prewarm_task("pw-1")
    assert "502 Bad Gateway" in str(info.value)
    assert len(str(info.value)) < 600


@pytest.mark.parametrize(
    ("body", "content_type", "match"),
    [
        (b"not json at all", "text/plain", "not JSON"),
        (b"<html>oops</html>", "text/html", "text/html"),
        (b"", "application/json", "empty body"),
        (b"   \n", "application/json", "empty body"),
        (b'[{"task_id": "pw-1"}]', "application/json", "got list"),
        (b'"running"', "application/json", "got str"),
        (b"\xff\xfe\x00garbage", "application/json", "not JSON"),
        (b'{"task_id": "pw-1"}', "application/json", "status"),
    ],
)
def test_unusable_2xx_bodies_raise_bad_response_without_retry(
    hook: PPIOHook,
    requests_mock: rm.Mocker,
    task_url: str,
    body: bytes,
    content_type: str,
    match: str,
) -> None:
    requests_mock.get(task_url, status_code=200, content=body, headers={"Content-Type": content_type})
    with pytest.raises(PPIOBadResponseError, match=match):
        hook.get_prewarm_task("pw-1")
    assert requests_mock.call_count == 1


def test_an_answer_about_another_task_is_refused(
    hook: PPIOHook, requests_mock: rm.Mocker, task_url: str, api_key: str, make_task: MakeTask
) -> None:
    requests_mock.get(task_url, json=make_task("pw-2", "succeeded"))
    with pytest.raises(PPIOBadResponseError, match="Asked for prewarm task 'pw-1', the API answered with task 'pw-2'"):
        hook.get_prewarm_task("pw-1")
    assert requests_mock.call_count == 1  # not retried: the gate must not open on it either way

    requests_mock.get(task_url, json=make_task(f"echo-{api_key}", "succeeded"))
    with pytest.raises(PPIOBadResponseError) as raised:
        hook.get_prewarm_task("pw-1")
    assert_no_key(api_key, str(raised.value))


def test_a_body_that_is_not_its_content_encoding_is_a_bad_response(
    hook: PPIOHook, requests_mock: rm.Mocker, task_url: str, api_key: str, make_task: MakeTask, sleeps: list[float]
) -> None:
    requests_mock.get(task_url, content=b'{"task_id": "pw-1"}', headers={"Content-Encoding": "gzip"})
    with pytest.raises(PPIOBadResponseError, match=r"could not be decoded \(Content-Encoding: gzip\)"):
        hook.get_prewarm_task("pw-1")
    assert requests_mock.call_count == 1


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_not_followed_and_the_key_stays_home(
    hook: PPIOHook, requests_mock: rm.Mocker, task_url: str, status: int, make_task: MakeTask
) -> None:
    requests_mock.get(task_url, status_code=status, headers={"Location": "https://evil.example/steal"})
    evil = requests_mock.get("https://evil.example/steal", json=make_task("pw-1", "succeeded"))
    with pytest.raises(PPIOBadResponseError, match="redirect") as info:
        hook.get_prewarm_task("pw-1")
    assert info.value.http_status == status
    assert evil.call_count == 0
    assert requests_mock.call_count == 1


def test_oversized_body_is_refused(hook: PPIOHook, requests_mock: rm.Mocker, task_url: str) -> None:
    requests_mock.get(task_url, content=b"[" + b" " * MAX_BODY_BYTES + b"]")
    with pytest.raises(PPIOBadResponseError, match="larger than"):
        hook.get_prewarm_task("pw-1")
    assert requests_mock.call_count == 1


def test_errors_survive_pickling(hook: PPIOHook, requests_mock: rm.Mocker, task_url: str, sleeps: list[float]) -> None:
    import pickle

    requests_mock.get(task_url, status_code=429, json={"message": "slow"}, headers={"Retry-After": "3"})
    with pytest.raises(PPIORateLimitError) as info:
        PPIOHook(max_attempts=1).get_prewarm_task("pw-1")
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is PPIORateLimitError
    assert (copy.http_status, copy.retry_after, copy.api_message, str(copy)) == (
        429,
        3.0,
        "slow",
        str(info.value),
    )


# -- retries ----------------------------------------------------------------------------------------


def test_transient_errors_are_retried_until_success(
    hook: PPIOHook, requests_mock: rm.Mocker, task_url: str, sleeps: list[float], make_task: MakeTask
) -> None:
    requests_mock.get(
        task_url,
        [
            {"status_code": 503, "json": {"message": "busy"}},
            {"exc": requests.ConnectionError("connection reset by peer")},
            {"status_code": 502, "text": "<html>bad gateway</html>"},
            {"status_code": 200, "json": make_task("pw-1", "succeeded")},
        ],
    )
    assert hook.get_prewarm_task("pw-1").outcome is Outcome.SUCCEEDED
    assert requests_mock.call_count == 4
    assert len(sleeps) == 3
    assert all(0 < wait < 1 for wait in sleeps)  # backoff_initial=0.01 in the test connection


def test_retries_stop_at_max_attempts_and_raise_the_last_error(
    set_conn: Callable[..., None], requests_mock: rm.Mocker, ppio_conn: str, sleeps: list[float]
) -> None:
    set_conn(extra={"max_attempts": 3})
    requests_mock.get(f"{ppio_conn}{TASKS}/pw-1", status_code=503, json={"message": "still down"})
    with pytest.raises(PPIOServerError, match="still down"):
        PPIOHook().get_prewarm_task("pw-1")
    assert requests_mock.call_count == 3
    assert len(sleeps) == 2


def test_retry_backoff_grows(
    set_conn: Callable[..., None], requests_mock: rm.Mocker, ppio_conn: str, sleeps: list[float]
) -> None:
    set_conn(extra={"backoff_initial": 1, "max_attempts": 4})
    requests_mock.get(f"{ppio_conn}{TASKS}/pw-1", status_code=500, json={})
    with pytest.raises(PPIOServerError):
        PPIOHook().get_prewarm_task("pw-1")
    assert len(sleeps) == 3
    # 1, 2, 4 seconds, each with a random half taken off (jitter that grows with the wait).
    for wait, base in zip(sleeps, (1, 2, 4), strict=True):
        assert base / 2 <= wait <= base


@pytest.mark.parametrize("how", ["extra", "argument"])
def test_max_attempts_1_disables_retries(
    set_conn: Callable[..., None], requests_mock: rm.Mocker, ppio_conn: str, sleeps: list[float], how: str
) -> None:
    set_conn(extra={"max_attempts": 1} if how == "extra" else {})
    hook = PPIOHook() if how == "extra" else PPIOHook(max_attempts=1)
    requests_mock.get(f"{ppio_conn}{TASKS}/pw-1", status_code=503, json={})
    with pytest.raises(PPIOServerError):
        hook.get_prewarm_task("pw-1")
    assert requests_mock.call_count == 1
    assert sleeps == []


def test_retry_after_seconds_is_honoured(
    hook: PPIOHook, requests_mock: rm.Mocker, task_url: str, sleeps: list[float], make_task: MakeTask
) -> None:
    requests_mock.get(
        task_url,
        [
            {"status_code": 429, "json": {"message": "slow down"}, "headers": {"Retry-After": "7"}},
            {"status_code": 429, "json": {}, "headers": {"Retry-After": "1.5"}},
            {"status_code": 200, "json": make_task("pw-1")},
        ],
    )
    hook.get_prewarm_task("pw-1")
    assert sleeps == [7.0, 1.5]


def test_retry_after_http_date_is_honoured(
    hook: PPIOHook, requests_mock: rm.Mocker, task_url: str, sleeps: list[float], make_task: MakeTask
) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    requests_mock.get(
        task_url,
        [
            {"status_code": 429, "json": {}, "headers": {"Retry-After": when}},
            {"status_code": 200, "json": make_task("pw-1")},
        ],
    )
    hook.get_prewarm_task("pw-1")
    assert len(sleeps) == 1
    assert 25 <= sleeps[0] <= 30  # the date has one-second resolution


def test_retry_after_in_the_past_means_backoff(
    hook: PPIOHook, requests_mock: rm.Mocker, task_url: str, sleeps: list[float], make_task: MakeTask
) -> None:
    when = email.utils.formatdate(time.time() - 3600, usegmt=True)
    requests_mock.get(
        task_url,
        [
            {"status_code": 429, "json": {}, "headers": {"Retry-After": when}},
            {"status_code": 200, "json": make_task("pw-1")},
        ],
    )
    hook.get_prewarm_task("pw-1")
    assert len(sleeps) == 1
    assert 0 < sleeps[0] < 1  # no hint: the backoff (backoff_initial=0.01 in the test connection)


@pytest.mark.parametrize(("extra", "cap"), [({}, 60.0), ({"retry_wait_max": 5}, 5.0)])
def test_absurd_retry_after_is_capped(
    set_conn: Callable[..., None],
    requests_mock: rm.Mocker,
    ppio_conn: str,
    sleeps: list[float],
    extra: dict[str, Any],
    cap: float,
    make_task: MakeTask,
) -> None:
    set_conn(extra=extra)
    requests_mock.get(
        f"{ppio_conn}{TASKS}/pw-1",
        [
            {"status_code": 429, "json": {}, "headers": {"Retry-After": "86400"}},
            {"status_code": 200, "json": make_task("pw-1")},
        ],
    )
    PPIOHook().get_prewarm_task("pw-1")
    assert sleeps == [cap]


@pytest.mark.parametrize("value", ["soon", "-5", "nan", ""])
def test_unusable_retry_after_falls_back_to_backoff(
    hook: PPIOHook, requests_mock: rm.Mocker, task_url: str, sleeps: list[float], value: str, make_task: MakeTask
) -> None:
    requests_mock.get(
        task_url,
        [
            {"status_code": 429, "json": {}, "headers": {"Retry-After": value}},
            {"status_code": 200, "json": make_task("pw-1")},
        ],
    )
    hook.get_prewarm_task("pw-1")
    assert len(sleeps) == 1
    assert 0 <= sleeps[0] < 1


def test_retry_warning_is_logged(
    hook: PPIOHook,
    requests_mock: rm.Mocker,
    task_url: str,
    sleeps: list[float],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    make_task: MakeTask,
) -> None:
    requests_mock.get(
        task_url, [{"status_code": 503, "json": {"message": "busy"}}, {"status_code": 200, "json": make_task("pw-1")}]
    )
    hook.get_prewarm_task("pw-1")
    logged = caplog.text + "".join(capsys.readouterr())
    assert "retrying" in logged
    assert "attempt 2 of 5" in logged


# -- create is not repeated when it may have worked -----------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        {"status_code": 500, "json": {"message": "oops"}},
        {"status_code": 503, "json": {}},
        {"status_code": 408, "json": {"message": "request timeout"}},
        {"exc": requests.exceptions.ReadTimeout("read timed out")},
        {"exc": requests.ConnectionError("connection reset by peer")},
    ],
)
def test_create_is_not_retried_when_the_server_may_have_acted(
    hook: PPIOHook, requests_mock: rm.Mocker, ppio_conn: str, sleeps: list[float], response: dict[str, Any]
) -> None:
    requests_mock.post(f"{ppio_conn}{TASKS}", [response, {"status_code": 200, "json": {"task_id": "pw-2"}}])
    with pytest.raises((PPIOServerError, PPIOTransportError)):
        hook.create_prewarm_task("img:1", "us-east-1")
    assert requests_mock.call_count == 1
    assert sleeps == []


@pytest.mark.parametrize(
    "first",
    [
        {"status_code": 429, "json": {"message": "slow"}, "headers": {"Retry-After": "2"}},
        {"exc": requests.exceptions.ConnectTimeout("connect timed out")},
        "refused",
    ],
)
def test_create_is_retried_when_the_server_surely_did_not_act(
    hook: PPIOHook, requests_mock: rm.Mocker, ppio_conn: str, sleeps: list[float], first: Any
) -> None:
    if first == "refused":
        first = {"exc": refused_connection_error()}
    requests_mock.post(f"{ppio_conn}{TASKS}", [first, {"status_code": 200, "json": {"task_id": "pw-2"}}])
    assert hook.create_prewarm_task("img:1", "us-east-1") == "pw-2"
    assert requests_mock.call_count == 2
    assert len(sleeps) == 1


def test_create_sends_the_documented_body(hook: PPIOHook, requests_mock: rm.Mocker, ppio_conn: str) -> None:
    requests_mock.post(f"{ppio_conn}{TASKS}", json={"id": "pw-3"})
    task_id = hook.create_prewarm_task("img:1", "us-east-1", product_ids=["gpu-a"], note="n")
    assert task_id == "pw-3"
    assert requests_mock.last_request.json() == {
        "image": "img:1",
        "region_id": "us-east-1",
        "product_ids": ["gpu-a"],
        "note": "n",
    }
    assert requests_mock.last_request.headers["Content-Type"] == "application/json"


def test_create_without_an_id_in_the_answer_finds_the_newest_match(
    hook: PPIOHook, requests_mock: rm.Mocker, ppio_conn: str, make_task: MakeTask
) -> None:
    requests_mock.post(f"{ppio_conn}{TASKS}", status_code=200, content=b"")
    requests_mock.get(
        f"{ppio_conn}{TASKS}",
        json={
            "data": [
                make_task("old", image="img:1", note="n", created_at=100),
                make_task("new", image="img:1", note="n", created_at=200),
                make_task("other", image="img:2", note="n", created_at=300),
            ]
        },
    )
    assert hook.create_prewarm_task("img:1", "us-east-1", note="n") == "new"


def test_invalid_create_arguments_send_nothing(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    with pytest.raises(PPIOInvalidInputError):
        hook.create_prewarm_task("", "us-east-1")
    assert requests_mock.call_count == 0


# -- list and delete --------------------------------------------------------------------------------


def test_list_follows_cursors(hook: PPIOHook, requests_mock: rm.Mocker, ppio_conn: str, make_task: MakeTask) -> None:
    requests_mock.get(
        f"{ppio_conn}{TASKS}",
        [
            {"json": {"data": [make_task("a"), make_task("b")], "next_cursor": "c1", "has_more": True}},
            {"json": {"data": [make_task("c")], "next_cursor": "", "has_more": False}},
        ],
    )
    assert [task.task_id for task in hook.list_prewarm_tasks(status="running", page_size=2)] == ["a", "b", "c"]
    first, second = requests_mock.request_history
    assert first.qs == {"status": ["running"], "limit": ["2"]}
    assert second.qs == {"status": ["running"], "limit": ["2"], "cursor": ["c1"]}


def test_list_stops_on_a_repeated_cursor(hook: PPIOHook, requests_mock: rm.Mocker, ppio_conn: str) -> None:
    requests_mock.get(f"{ppio_conn}{TASKS}", json={"data": [], "next_cursor": "same", "has_more": True})
    with pytest.raises(PPIOBadResponseError, match="twice"):
        list(hook.list_prewarm_tasks())
    assert requests_mock.call_count == 2


def test_delete_sends_ids_in_batches(hook: PPIOHook, requests_mock: rm.Mocker, ppio_conn: str) -> None:
    requests_mock.delete(f"{ppio_conn}{TASKS}", status_code=200, content=b"")
    ids = [f"pw-{n}" for n in range(150)]
    hook.delete_prewarm_tasks(ids)
    bodies = [request.json()["task_ids"] for request in requests_mock.request_history]
    assert bodies == [ids[:100], ids[100:]]
    hook.delete_prewarm_tasks([])
    assert requests_mock.call_count == 2


@pytest.mark.parametrize("ids", ["pw-1", ["pw-1", ".."], ["pw-1", ""]])
def test_delete_refuses_bad_ids_before_sending(hook: PPIOHook, requests_mock: rm.Mocker, ids: Any) -> None:
    with pytest.raises(PPIOInvalidInputError):
        hook.delete_prewarm_tasks(ids)
    assert requests_mock.call_count == 0


# -- timeouts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "sent"),
    [(requests.exceptions.ConnectTimeout, False), (requests.exceptions.ReadTimeout, True)],
)
def test_requests_timeouts_become_ppio_timeout_errors(
    hook: PPIOHook, requests_mock: rm.Mocker, task_url: str, sleeps: list[float], exc: type[Exception], sent: bool
) -> None:
    requests_mock.get(task_url, exc=exc("timed out"))
    with pytest.raises(PPIOTransportError, match="did not answer") as info:
        hook.get_prewarm_task("pw-1")
    assert info.value.request_sent is sent
    assert info.value.transient
    assert requests_mock.call_count == 5


def test_requests_get_the_configured_timeouts(
    set_conn: Callable[..., None], requests_mock: rm.Mocker, ppio_conn: str, make_task: MakeTask
) -> None:
    set_conn(extra={"timeout": 42})
    requests_mock.get(f"{ppio_conn}{TASKS}/pw-1", json=make_task("pw-1"))
    PPIOHook().get_prewarm_task("pw-1")
    assert requests_mock.last_request.timeout == (10.0, 42.0)


class _TricklingServer:
    """Answers every request with headers at once, then one body byte every 20 ms, never completing the body."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.05)
        self.port = int(self.sock.getsockname()[1])
        self.stop = threading.Event()
        self.requests = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            self.requests += 1
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
                # Give up after ~3 s (a cut-short body), so a client without a deadline fails instead of hanging.
                for _ in range(150):
                    if self.stop.wait(0.02):
                        break
                    try:
                        conn.sendall(b" ")
                    except OSError:
                        break

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def trickling_server() -> Iterator[_TricklingServer]:
    server = _TricklingServer()
    yield server
    server.close()


def test_a_trickling_body_cannot_outlast_the_timeout(
    set_conn: Callable[..., None], trickling_server: _TricklingServer
) -> None:
    # Each byte arrives well within the read timeout; only the per-attempt deadline can stop this.
    set_conn(host=f"http://127.0.0.1:{trickling_server.port}", extra={"timeout": 0.3, "max_attempts": 1})
    with pytest.raises(PPIOTransportError, match=r"no complete answer .* within"):
        PPIOHook().get_prewarm_task("pw-1")
    assert trickling_server.requests == 1


def test_refused_connection_is_a_transport_error_never_sent(set_conn: Callable[..., None], sleeps: list[float]) -> None:
    set_conn(host=f"http://127.0.0.1:{unused_port()}", extra={"max_attempts": 2})
    with pytest.raises(PPIOTransportError) as info:
        PPIOHook().get_prewarm_task("pw-1")
    assert type(info.value) is PPIOTransportError
    assert info.value.request_sent is False
    assert "127.0.0.1" in str(info.value)
    assert len(sleeps) == 1


# -- test_connection --------------------------------------------------------------------------------


def test_test_connection_ok(hook: PPIOHook, requests_mock: rm.Mocker, ppio_conn: str) -> None:
    requests_mock.get(f"{ppio_conn}{TASKS}", json={"data": [], "has_more": False})
    ok, message = hook.test_connection()
    assert ok is True
    assert "accepted" in message
    assert requests_mock.last_request.qs == {"limit": ["1"]}


def test_test_connection_wrong_key(
    hook: PPIOHook, requests_mock: rm.Mocker, ppio_conn: str, sleeps: list[float], api_key: str
) -> None:
    requests_mock.get(f"{ppio_conn}{TASKS}", status_code=401, json={"message": f"bad key {api_key}"})
    ok, message = hook.test_connection()
    assert ok is False
    assert "API key was refused" in message
    assert "401" in message
    assert api_key not in message
    assert requests_mock.call_count == 1


def test_test_connection_unreachable_host(set_conn: Callable[..., None], sleeps: list[float]) -> None:
    set_conn(host=f"http://127.0.0.1:{unused_port()}", extra={"max_attempts": 5})
    ok, message = PPIOHook().test_connection()
    assert ok is False
    assert "Could not reach" in message
    assert "API key" not in message
    assert sleeps == []  # one attempt only: the Test button answers at once


def test_test_connection_server_error_does_not_retry(
    hook: PPIOHook, requests_mock: rm.Mocker, ppio_conn: str, sleeps: list[float]
) -> None:
    requests_mock.get(f"{ppio_conn}{TASKS}", status_code=503, json={"message": "maintenance"})
    ok, message = hook.test_connection()
    assert ok is False
    assert "maintenance" in message
    assert requests_mock.call_count == 1


def test_test_connection_without_key(set_conn: Callable[..., None], requests_mock: rm.Mocker) -> None:
    set_conn(password=None)
    ok, message = PPIOHook().test_connection()
    assert ok is False
    assert "no API key" in message
    assert requests_mock.call_count == 0


# -- the key never leaks ----------------------------------------------------------------------------


def test_key_not_in_repr_of_hook_or_settings(hook: PPIOHook, api_key: str) -> None:
    settings = hook.settings
    assert settings.api_key == api_key
    assert_no_key(api_key, repr(hook), str(hook), repr(settings), str(settings))
    assert "ppio_default" in repr(hook)


@pytest.mark.parametrize(
    ("status", "answer"),
    [
        (401, {"json": {"message": "invalid API key"}}),
        (200, {"text": "<html>maintenance</html>"}),
        (200, {"json": {"task_id": "pw-someone-else", "status": {"status": "running"}}}),
    ],
    ids=["rejected-key", "not-json", "another-task"],
)
def test_key_not_in_the_locals_of_an_error_traceback(
    hook: PPIOHook, requests_mock: rm.Mocker, task_url: str, api_key: str, status: int, answer: dict[str, Any]
) -> None:
    # Airflow 3.0's console (airflow dags test, tasks test) prints every frame's locals with a failed task's error.
    requests_mock.get(task_url, status_code=status, **answer)
    with pytest.raises(PPIOError) as info:
        hook.get_prewarm_task("pw-1")
    err = info.value
    # From the hook's frames on (this test's own frame holds the key in `api_key`).
    frames = traceback.TracebackException(type(err), err, info.tb.tb_next, capture_locals=True)
    printed = "".join(frames.format())
    # A frame that holds the key (as settings or as the secret) is there; interpret_response's frames, which held
    # the answer, are not: the transport raises the error without them.
    assert "settings = ClientSettings(" in printed or "secret = SecretStr('**********')" in printed
    assert "interpret_response" not in printed
    assert_no_key(api_key, printed)


def test_key_echoed_by_a_401_is_scrubbed(
    hook: PPIOHook,
    requests_mock: rm.Mocker,
    task_url: str,
    api_key: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    requests_mock.get(
        task_url,
        status_code=401,
        json={"message": f"Invalid token 'Bearer {api_key}'", "reason": f"BAD_KEY:{api_key}"},
    )
    with pytest.raises(PPIOAuthError) as info:
        hook.get_prewarm_task("pw-1")
    err = info.value
    assert "Invalid token" in str(err)
    assert_no_key(
        api_key,
        str(err),
        repr(err),
        str(err.api_message),
        str(err.api_reason),
        "".join(traceback.format_exception(err)),
        caplog.text,
        "".join(capsys.readouterr()),
    )


def test_key_echoed_by_retried_5xx_is_not_logged(
    hook: PPIOHook,
    requests_mock: rm.Mocker,
    task_url: str,
    api_key: str,
    sleeps: list[float],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    requests_mock.get(task_url, status_code=503, text=f"upstream rejected Authorization: Bearer {api_key}")
    with pytest.raises(PPIOServerError) as info:
        hook.get_prewarm_task("pw-1")
    logged = caplog.text + "".join(capsys.readouterr())
    assert "retrying" in logged  # the warnings were captured, so their absence of the key means something
    assert_no_key(api_key, logged, str(info.value), "".join(traceback.format_exception(info.value)))


@pytest.mark.parametrize("kind", ["refused", "read_timeout", "trickle"])
def test_key_not_in_transport_errors(
    set_conn: Callable[..., None],
    trickling_server: _TricklingServer,
    api_key: str,
    sleeps: list[float],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    kind: str,
) -> None:
    hosts = {
        "refused": f"http://127.0.0.1:{unused_port()}",
        "trickle": f"http://127.0.0.1:{trickling_server.port}",
        "read_timeout": "https://api.ppio.test",
    }
    set_conn(host=hosts[kind], extra={"max_attempts": 2, "timeout": 0.2})
    with rm.Mocker(real_http=True) as mocker, pytest.raises(PPIOTransportError) as info:
        mocker.get("https://api.ppio.test/gpus/v2/prewarm-tasks/pw-1", exc=requests.exceptions.ReadTimeout("slow"))
        PPIOHook().get_prewarm_task("pw-1")
    assert_no_key(
        api_key,
        str(info.value),
        repr(info.value),
        "".join(traceback.format_exception(info.value)),
        caplog.text,
        "".join(capsys.readouterr()),
    )


def test_an_error_the_caller_was_handling_is_not_named_as_the_cause(
    set_conn: Callable[..., None], sleeps: list[float]
) -> None:
    set_conn(host=f"http://127.0.0.1:{unused_port()}", extra={"max_attempts": 1})
    try:
        raise KeyError("the caller's own trouble")
    except KeyError:
        with pytest.raises(PPIOTransportError) as info:
            PPIOHook().get_prewarm_task("pw-1")
    assert "KeyError" not in str(info.value)
    assert "refused" in str(info.value).lower()
