"""
One TLS, proxy, DNS and decoding behaviour for both transports: the sync path (requests: poke mode, operators)
and the async path (aiohttp: the hook's async methods and the trigger), each against a real server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import certifi
import pytest
from aio_server import (
    TASKS,
    ApiServer,
    api_server,
    reply_bytes,
    reply_gzip,
    reply_json,
    task_body,
    warnings_in,
)
from trigger_runs import first_event

from airflow_provider_ppio.exceptions import (
    PPIOBadResponseError,
    PPIOConnectionConfigError,
    PPIOError,
    PPIOTransportError,
)
from airflow_provider_ppio.hooks import _async, _sync
from airflow_provider_ppio.hooks._shared import CA_BUNDLE_VARIABLES
from airflow_provider_ppio.hooks.ppio import PPIOHook
from airflow_provider_ppio.models import PrewarmTask
from airflow_provider_ppio.testing.server import EmulatorServer
from airflow_provider_ppio.triggers.prewarm import PrewarmTaskTrigger

#: The three ways a wait reads a task: the sync hook (poke mode), the async hook, and a trigger's run.
PATHS = ["sync", "async", "trigger"]


@pytest.fixture(autouse=True)
def no_ambient_tls_or_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test says which CA and proxy variables exist (the machine running the tests may set some)."""
    for name in (*CA_BUNDLE_VARIABLES, "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def server() -> Iterator[ApiServer]:
    """This test's own scripted API server."""
    with api_server() as running:
        yield running


@pytest.fixture
def tls_emulator(ppio_emulator_tls: EmulatorServer) -> EmulatorServer:
    """The https emulator (its own throwaway CA), with task ``pw-1`` succeeded."""
    ppio_emulator_tls.control.seed_task(task_id="pw-1", state="succeeded")
    return ppio_emulator_tls


def read(path: str, task_id: str = "pw-1", **hook_kwargs: Any) -> PrewarmTask:
    """
    Read a task through ``path`` and return it, or raise the error that path ends with (a trigger's
    ``error`` event becomes the error class it names, as the sensor rebuilds it).
    """
    if path == "sync":
        return PPIOHook(**hook_kwargs).get_prewarm_task(task_id, patient=True, deadline=time.time() + 30)
    if path == "async":
        return asyncio.run(PPIOHook(**hook_kwargs).aget_prewarm_task(task_id, patient=True, deadline=time.time() + 30))
    from airflow_provider_ppio.triggers.prewarm import error_from_event

    trigger = PrewarmTaskTrigger(prewarm_task_id=task_id, poke_interval=0.01, deadline=time.time() + 30)
    event = asyncio.run(first_event(trigger))
    if event["status"] == "error":
        raise error_from_event(event, event["message"])
    assert event["status"] == "success", event
    return PrewarmTask.from_api(event["task"])


def assert_raises_at_once(path: str, error: type[PPIOError], match: str | None = None, **hook_kwargs: Any) -> PPIOError:
    """``read(path)`` raises ``error`` quickly: a retry would first wait the connection's backoff (2 s or more)."""
    started = time.monotonic()
    with pytest.raises(error, match=match) as info:
        read(path, **hook_kwargs)
    assert time.monotonic() - started < 1.9
    return info.value


def logged(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> list[str]:
    captured = capsys.readouterr()
    return warnings_in(caplog.records, captured.out + captured.err)


# -- TLS ----------------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("source", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "extra ca_bundle"])
def test_the_ca_works_wherever_it_is_given_on_every_path(
    tls_emulator: EmulatorServer,
    set_conn: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
    source: str,
    path: str,
) -> None:
    extra: dict[str, Any] = {}
    if source == "extra ca_bundle":
        extra["ca_bundle"] = tls_emulator.ca_bundle
    else:
        monkeypatch.setenv(source, str(tls_emulator.ca_bundle))
    set_conn(host=tls_emulator.base_url, password=tls_emulator.api_key, extra=extra)

    task = read(path)

    assert task.task_id == "pw-1"
    assert task.status.status == "succeeded"
    assert tls_emulator.control.requests_log()[-1]["status"] == 200


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("source", "named"),
    [
        (None, "certifi's CA bundle"),
        ("REQUESTS_CA_BUNDLE", "REQUESTS_CA_BUNDLE"),
        ("SSL_CERT_FILE", "SSL_CERT_FILE"),
        ("extra ca_bundle", "connection extra 'ca_bundle'"),
    ],
)
def test_without_the_ca_every_path_fails_at_once_naming_the_ca_setting_used(
    tls_emulator: EmulatorServer,
    set_conn: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
    source: str | None,
    named: str,
    path: str,
) -> None:
    # A CA that did not sign the emulator's certificate (the public roots): what a TLS-intercepting proxy
    # looks like to a client that was not given the proxy's CA.
    extra: dict[str, Any] = {"backoff_initial": 2}
    if source == "extra ca_bundle":
        extra["ca_bundle"] = certifi.where()
    elif source is not None:
        monkeypatch.setenv(source, certifi.where())
    set_conn(host=tls_emulator.base_url, password=tls_emulator.api_key, extra=extra)

    error = assert_raises_at_once(path, PPIOConnectionConfigError)

    message = str(error)
    assert named in message
    assert "ca_bundle" in message  # says how to give another CA
    assert tls_emulator.control.requests_log() == []  # no request was ever sent
    assert not error.transient


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # urllib3's own, as expected
@pytest.mark.parametrize("path", PATHS)
def test_verify_false_works_on_every_path_with_a_warning(
    tls_emulator: EmulatorServer,
    set_conn: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    path: str,
) -> None:
    caplog.set_level(logging.INFO)
    set_conn(host=tls_emulator.base_url, password=tls_emulator.api_key, extra={"verify": False})

    assert read(path).status.status == "succeeded"

    assert any("does not verify the API's TLS certificate" in line for line in logged(caplog, capsys))


@pytest.mark.parametrize("path", PATHS)
def test_a_ca_bundle_that_does_not_exist_is_a_config_error_before_any_request(
    ppio_emulator: EmulatorServer, set_conn: Callable[..., None], path: str
) -> None:
    set_conn(host=ppio_emulator.base_url, password=ppio_emulator.api_key, extra={"ca_bundle": "/nowhere/ca.pem"})

    with pytest.raises(PPIOConnectionConfigError, match=r"/nowhere/ca\.pem.*connection extra 'ca_bundle'"):
        read(path)

    assert ppio_emulator.control.requests_log() == []


@pytest.mark.parametrize("path", ["sync", "async"])
def test_a_ca_variable_that_names_no_file_is_a_config_error(
    ppio_emulator: EmulatorServer, set_conn: Callable[..., None], monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/nowhere/bundle.crt")
    set_conn(host=ppio_emulator.base_url, password=ppio_emulator.api_key)
    with pytest.raises(PPIOConnectionConfigError, match="REQUESTS_CA_BUNDLE"):
        read(path)
    assert ppio_emulator.control.requests_log() == []


# -- DNS and refused connections ----------------------------------------------------------------------------


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names looked up in DNS; ``*.nowhere.test`` does not exist (EAI_NONAME). Nothing real is resolved."""
    seen: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        seen.append(name)
        if name.endswith(".nowhere.test"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if name not in ("127.0.0.1", "localhost"):
            raise AssertionError(f"the test tried to resolve {name!r}")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return seen


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scheme", ["https", "http"])
def test_a_host_that_does_not_exist_fails_at_once(
    set_conn: Callable[..., None], lookups: list[str], path: str, scheme: str
) -> None:
    set_conn(host=f"{scheme}://api.nowhere.test", extra={"backoff_initial": 2, "allow_insecure_http": True})

    error = assert_raises_at_once(path, PPIOConnectionConfigError, match="does not exist")

    assert "api.nowhere.test" in str(error)
    assert lookups == ["api.nowhere.test"]  # looked up once: not retried
    assert not error.transient


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", ["sync", "async"])
def test_a_refused_connection_is_transient_and_retried(
    set_conn: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    caplog.set_level(logging.INFO)
    transport = _sync if path == "sync" else _async
    sends: list[object] = []
    real_send = transport.send
    monkeypatch.setattr(transport, "send", lambda *args, **kwargs: sends.append(args) or real_send(*args, **kwargs))
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))  # bound, not listening: refused, and no other process can take the port
    try:
        set_conn(host=f"http://127.0.0.1:{holder.getsockname()[1]}", extra={"max_attempts": 3})
        hook = PPIOHook()
        with pytest.raises(PPIOTransportError) as info:
            if path == "sync":
                hook.get_prewarm_task("pw-1")
            else:
                asyncio.run(hook.aget_prewarm_task("pw-1"))
    finally:
        holder.close()

    assert type(info.value) is PPIOTransportError
    assert info.value.transient
    assert info.value.request_sent is False
    assert len(sends) == 3  # max_attempts
    retries = [line for line in logged(caplog, capsys) if "retrying" in line]
    assert len(retries) == 1  # one kind of error: one WARNING; its repeat goes to DEBUG
    assert "(attempt 2 of 3)" in retries[0]


# -- Content-Encoding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_a_gzip_encoded_answer_is_decoded(server: ApiServer, set_conn: Callable[..., None], path: str) -> None:
    set_conn(host=server.base_url)
    server.reply(reply_gzip(task_body("pw-1", "succeeded")))

    assert read(path).status.status == "succeeded"

    assert "gzip" in server.seen[0].headers.get("Accept-Encoding", "")


@pytest.mark.parametrize("path", PATHS)
def test_a_body_that_claims_gzip_but_is_not_is_a_bad_response(
    server: ApiServer, set_conn: Callable[..., None], path: str
) -> None:
    set_conn(host=server.base_url)
    server.reply(reply_bytes(200, b'{"task_id": "pw-1"}', {"Content-Encoding": "gzip"}))

    with pytest.raises(PPIOBadResponseError, match=r"could not be decoded \(Content-Encoding: gzip\)"):
        read(path)

    assert len(server.seen) == 1  # the server is broken, not the network: not retried


# -- proxy --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", PATHS)
def test_both_transports_use_the_proxy_the_environment_names(
    server: ApiServer,
    set_conn: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
    lookups: list[str],
    path: str,
) -> None:
    proxy = server  # answers whatever it is asked to forward
    proxy.reply(reply_json(200, task_body("pw-1", "succeeded")))
    monkeypatch.setenv("HTTP_PROXY", proxy.base_url)
    monkeypatch.setenv("NO_PROXY", "bypassed.nowhere.test")

    set_conn(host="http://api.ppio.test", extra={"allow_insecure_http": True})
    assert read(path).status.status == "succeeded"
    assert [seen.raw_path for seen in proxy.seen] == [f"http://api.ppio.test{TASKS}/pw-1"]  # a proxy request
    assert "api.ppio.test" not in lookups  # the proxy resolves the API's name, not us

    set_conn(host="http://bypassed.nowhere.test", extra={"allow_insecure_http": True})
    with pytest.raises(PPIOConnectionConfigError):  # tried directly, as NO_PROXY says
        read(path)
    assert len(proxy.seen) == 1


# -- the connection: its port and its type, on every path ---------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", PATHS)
def test_a_uri_connection_with_a_port_reaches_the_emulator_on_that_port(
    tls_emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    # The URI form docs/deployment.md gives secrets-backend users: no scheme (https), the port after the host.
    port = int(tls_emulator.base_url.rsplit(":", 1)[1])
    key, ca = quote(tls_emulator.api_key, safe=""), quote(str(tls_emulator.ca_bundle), safe="")
    monkeypatch.setenv("AIRFLOW_CONN_PPIO_DEFAULT", f"ppio://:{key}@127.0.0.1:{port}?ca_bundle={ca}")
    assert read(path).status.status == "succeeded"
    assert [entry["path"] for entry in tls_emulator.control.requests_log()] == [f"{TASKS}/pw-1"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", PATHS)
def test_a_json_connection_with_a_port_field_reaches_the_emulator_on_that_port(
    ppio_emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    ppio_emulator.control.seed_task(task_id="pw-1", state="succeeded")
    port = int(ppio_emulator.base_url.rsplit(":", 1)[1])
    conn = {"conn_type": "ppio", "host": "http://127.0.0.1", "port": port, "password": ppio_emulator.api_key}
    monkeypatch.setenv("AIRFLOW_CONN_PPIO_DEFAULT", json.dumps(conn))
    assert read(path).status.status == "succeeded"
    assert len(ppio_emulator.control.requests_log()) == 1


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("conn_type", ["postgres", "http", None])
def test_a_connection_of_another_type_is_refused_on_every_path_before_any_request(
    server: ApiServer, monkeypatch: pytest.MonkeyPatch, path: str, conn_type: str | None
) -> None:
    server.reply(reply_json(200, task_body("pw-1", "succeeded")))
    conn = {"conn_type": conn_type, "host": server.base_url, "password": "pg_secret_password"}
    monkeypatch.setenv("AIRFLOW_CONN_PPIO_DEFAULT", json.dumps(conn))
    error = assert_raises_at_once(path, PPIOConnectionConfigError, match=f"type {conn_type!r}")
    assert "pg_secret_password" not in str(error)
    assert server.seen == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "conn",
    [
        {"host": "http://127.0.0.1", "port": 99999},
        {"host": "http://127.0.0.1:99999"},
        {"host": "http://127.0.0.1:abc"},
        {"host": "http://127.0.0.1:8080", "port": 8081},
        {"host": "https://api.ppio.com\n.evil.com"},
        {"host": "https://user@api.ppio.com"},
        {"host": "http://api.ppio.com"},
    ],
)
def test_a_bad_host_or_port_is_a_configuration_error_at_once_on_every_path(
    monkeypatch: pytest.MonkeyPatch, lookups: list[str], path: str, conn: dict[str, Any]
) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_PPIO_DEFAULT",
        json.dumps({"conn_type": "ppio", "password": "k_12345", "extra": {"backoff_initial": 2}, **conn}),
    )
    assert_raises_at_once(path, PPIOConnectionConfigError, match="ppio_default")
    assert lookups == []  # nothing was even looked up, let alone sent
