"""
Secret hygiene in-process, over real HTTP: the API key never shows up in an exception's text, a trigger event,
a log line, the hook's or the trigger's ``repr``, or ``serialize()`` output, even when the server echoes it back
in any kind of answer; and a redirect never takes it to another host.

The end-to-end half (real DAG runs, task logs, XComs, rendered fields, the metadata DB) is in
test_secret_hygiene_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import pickle
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from faultserver import FaultServer
from matrix import API_KEY, TASK_ID, TASK_PATH, task_body

from airflow_provider_ppio.exceptions import PPIOBadResponseError, PPIOError

# These tests wait on real time (real waits with short deadlines): a regression must fail fast, not hang.
pytestmark = pytest.mark.timeout(60)

#: Any piece of the key this long is a leak (a truncated message must not keep half of it).
PIECE = 8


def key_pieces(text: str) -> list[str]:
    """Every piece (>= :data:`PIECE` characters) of the key found in ``text``."""
    return sorted({API_KEY[i : i + PIECE] for i in range(len(API_KEY) - PIECE + 1) if API_KEY[i : i + PIECE] in text})


def error_texts(err: BaseException) -> str:
    """Everything an error shows: str, repr, args, the parsed API fields, and its pickled form."""
    parts = [str(err), repr(err), repr(err.args)]
    if isinstance(err, PPIOError):
        parts += [repr(err.api_message), repr(err.api_reason)]
    parts.append(pickle.dumps(err).decode("latin-1"))
    return "\n".join(parts)


@pytest.fixture
def connect(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Point ``ppio_default`` at a base URL with :data:`API_KEY` (2 attempts, waits give up after 1 s)."""

    def setter(base_url: str) -> None:
        extra = {
            "timeout": 2,
            "max_attempts": 2,
            "backoff_initial": 0.01,
            "retry_wait_max": 0.1,
            "unreachable_timeout": 1,
        }
        conn = {"conn_type": "ppio", "host": base_url, "password": API_KEY, "extra": extra}
        monkeypatch.setenv("AIRFLOW_CONN_PPIO_DEFAULT", json.dumps(conn))

    return setter


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> Callable[[], str]:
    """Everything logged so far: stdlib records and the console (Airflow 3's structlog writes there)."""
    caplog.set_level(logging.DEBUG)

    def text() -> str:
        captured = capsys.readouterr()
        return "\n".join([caplog.text, captured.out, captured.err])

    return text


def run_paths() -> dict[str, str]:
    """Read the task through the hook, the sensor's poke and the trigger; what each showed (errors, events)."""
    from airflow_provider_ppio.hooks.ppio import PPIOHook
    from airflow_provider_ppio.sensors.prewarm import PrewarmTaskSensor
    from airflow_provider_ppio.triggers.prewarm import PrewarmTaskTrigger

    shown: dict[str, str] = {}
    hook = PPIOHook()
    try:
        shown["hook"] = json.dumps(hook.get_prewarm_task(TASK_ID).to_xcom())
    except Exception as err:
        shown["hook"] = error_texts(err)
    shown["hook repr"] = repr(hook) + repr(hook.settings)
    sensor = PrewarmTaskSensor(task_id="gate", prewarm_task_id=TASK_ID)
    try:
        shown["sensor"] = repr(sensor.poke({}))
    except Exception as err:
        shown["sensor"] = error_texts(err)
    trigger = PrewarmTaskTrigger(prewarm_task_id=TASK_ID, poke_interval=0.05, deadline=time.time() + 1)

    async def first_event() -> Any:
        try:
            async for event in trigger.run():
                return event.payload
        finally:
            await trigger.cleanup()

    shown["trigger event"] = json.dumps(asyncio.run(asyncio.wait_for(first_event(), 30)))
    shown["trigger repr"] = repr(trigger) + repr(trigger.serialize())
    return shown


# The key echoed back at the start of the text, and where the ~200-character snippet of a message cuts it.
_PADS = [0, 170]
_ECHOES: list[tuple[str, int, Callable[[str], dict[str, Any]]]] = [
    ("200-text", 200, lambda text: {"body": f"Authorization: Bearer {text}", "content_type": "text/plain"}),
    ("200-html", 200, lambda text: {"body": f"<html><body>{text}</body></html>", "content_type": "text/html"}),
    ("200-broken-json", 200, lambda text: {"body": '{"task_id": "' + text}),
    ("200-bad-task", 200, lambda text: {"body": {"task_id": TASK_ID, "status": {"status": 5}, "msg": text}}),
    ("400-json", 400, lambda text: {"body": {"message": text, "reason": "BAD " + text}}),
    ("401-nested", 401, lambda text: {"body": {"error": {"message": text, "code": text}}}),
    ("404-text", 404, lambda text: {"body": text, "content_type": "text/plain"}),
    ("429-detail", 429, lambda text: {"body": {"detail": text}, "headers": {"Retry-After": "0"}}),
    ("500-json", 500, lambda text: {"body": {"msg": text}}),
    ("503-html", 503, lambda text: {"body": f"<html>{text}</html>", "content_type": "text/html"}),
]


@pytest.mark.integration
@pytest.mark.parametrize("pad", _PADS)
@pytest.mark.parametrize(("name", "status", "answer"), _ECHOES, ids=[echo[0] for echo in _ECHOES])
def test_a_key_echoed_back_in_any_answer_reaches_no_error_event_repr_or_log(
    rel_emulator: Any,
    connect: Callable[..., None],
    logs: Callable[[], str],
    name: str,
    status: int,
    answer: Callable[[str], dict[str, Any]],
    pad: int,
) -> None:
    rel_emulator.control.seed_task(task_id=TASK_ID, state="running")
    connect(rel_emulator.base_url)
    kind = "body" if status == 200 else "status"
    rel_emulator.control.inject_fault(
        kind, count=None, path_prefix=TASK_PATH, status=status, **answer("x" * pad + API_KEY + " trailing")
    )

    shown = run_paths()

    assert "trigger event" in shown
    leaks = {where: key_pieces(text) for where, text in {**shown, "logs": logs()}.items()}
    assert {where: pieces for where, pieces in leaks.items() if pieces} == {}


@pytest.mark.integration
def test_repr_and_serialize_of_hook_settings_sensor_and_trigger_never_show_the_key(
    rel_emulator: Any, connect: Callable[..., None], logs: Callable[[], str]
) -> None:
    rel_emulator.control.seed_task(task_id=TASK_ID, state="succeeded")
    connect(rel_emulator.base_url)

    shown = run_paths()  # used, so every lazy attribute (settings, session, clients) exists

    assert json.loads(shown["hook"])["task_id"] == TASK_ID
    assert json.loads(shown["trigger event"])["status"] == "success"
    assert {where: key_pieces(text) for where, text in {**shown, "logs": logs()}.items() if key_pieces(text)} == {}


@pytest.fixture
def elsewhere() -> Iterator[FaultServer]:
    """Another host, answering a valid task to anyone who comes; records every request."""
    server = FaultServer(lambda conn, head: server.answer_json(conn, head), body=task_body())
    yield server
    server.stop()


@pytest.mark.integration
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_to_another_host_is_not_followed_so_the_key_stays_home(
    rel_emulator: Any, connect: Callable[..., None], elsewhere: FaultServer, status: int
) -> None:
    from airflow_provider_ppio.hooks.ppio import PPIOHook

    rel_emulator.control.seed_task(task_id=TASK_ID, state="succeeded")
    connect(rel_emulator.base_url)
    location = f"{elsewhere.base_url}{TASK_PATH}"
    rel_emulator.control.inject_fault(
        "status", count=None, path_prefix=TASK_PATH, status=status, headers={"Location": location}, body=""
    )

    hook = PPIOHook()
    with pytest.raises(PPIOBadResponseError, match="redirects are not followed") as sync_error:
        hook.get_prewarm_task(TASK_ID)
    with pytest.raises(PPIOBadResponseError, match="redirects are not followed") as async_error:
        asyncio.run(hook.aget_prewarm_task(TASK_ID))
    shown = run_paths()  # and through the sensor and the trigger

    assert elsewhere.heads == [], "the other host was contacted"
    assert "redirects are not followed" in shown["sensor"]
    assert json.loads(shown["trigger event"])["error_type"] == "PPIOBadResponseError"
    assert not key_pieces(error_texts(sync_error.value) + error_texts(async_error.value) + json.dumps(shown))
