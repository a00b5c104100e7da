"""
Hostile input, as properties (hypothesis), over real sockets where the request or the answer is the point.

* Any ``prewarm_task_id`` string either fails with a clear ``PPIOInvalidInputError`` before any request,
  or makes exactly one request whose target is ``/gpus/v2/prewarm-tasks/<one segment>`` decoding back to the
  id; the same for the sync hook, the async hook and the trigger's constructor.
* Any JSON body (and any byte string) as a 200 answer parses to a usable ``PrewarmTask`` or raises
  ``PPIOBadResponseError``, never anything else; a parsed task always yields an outcome, a JSON XCom and a
  sensor decision.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import pytest
from faultserver import FaultServer, respond
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from matrix import API_KEY, TASK_ID, task_body
from pydantic import SecretStr

from airflow_provider_ppio.exceptions import PPIOBadResponseError, PPIOInvalidInputError
from airflow_provider_ppio.hooks._shared import interpret_response
from airflow_provider_ppio.models import Outcome, PrewarmTask

# These tests wait on real time (hypothesis sends many real requests): a regression must fail fast, not hang.
pytestmark = pytest.mark.timeout(120)

PREFIX = "/gpus/v2/prewarm-tasks/"
PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

# -- strategies --------------------------------------------------------------------------------------------------

_TRICKY_CHARS = "./\\%?#&=+;: \t\r\n\x00\x7f~@!$'()*,[]é中😀\u202e\ufeff"
TASK_IDS = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.sampled_from(_TRICKY_CHARS), max_size=12),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=250, max_size=260),
    st.sampled_from(
        [".", "..", "", "...", "./", "../x", "%2e%2e", "%2F", "a/b", "?x=1", "#frag", "x" * 255, "x" * 256, " "]
    ),
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_FIELDS = [*task_body(), "model_config", "model_fields", "__class__", "__dict__", "copy", "json", "schema", "id"]
_STATUS_FIELDS = ["status", "error", "message", "progress", "model_config"]


@st.composite
def task_like(draw: st.DrawFn) -> Any:
    """A real task with some fields (top level or in ``status``) removed, nulled or replaced by any JSON."""
    body: dict[str, Any] = task_body()
    status: dict[str, Any] = dict(body["status"])
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        in_status = draw(st.integers(min_value=0, max_value=3)) == 0
        target = status if in_status else body
        key = draw(st.sampled_from(_STATUS_FIELDS if in_status else _FIELDS))
        if draw(st.integers(min_value=0, max_value=3)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(st.one_of(JSON_SCALARS, JSON_VALUES))
    if isinstance(body.get("status"), dict):
        body["status"] = status
    return body


BODIES = st.one_of(task_like(), JSON_VALUES)


def _check_parsed(payload: Any) -> None:
    """The property for one decoded body: a usable task or the typed error, nothing else."""
    from airflow.providers.common.compat.sdk import AirflowFailException, PokeReturnValue

    from airflow_provider_ppio.sensors.prewarm import PrewarmTaskSensor

    try:
        task = PrewarmTask.from_api(payload)
    except PPIOBadResponseError as err:
        assert str(err)
        return
    assert isinstance(task, PrewarmTask)
    assert task.outcome in set(Outcome)
    json.dumps(task.to_xcom())  # XCom and trigger events must be plain JSON
    assert isinstance(task.failure_summary(), str)
    sensor = PrewarmTaskSensor(task_id="gate", prewarm_task_id="pwt-x")
    try:
        answer = sensor.judge(task)
    except AirflowFailException:
        assert task.outcome is Outcome.FAILED
    else:
        assert (answer is False) == (task.outcome is Outcome.WAITING)
        assert isinstance(answer, PokeReturnValue) or answer is False


# -- fixtures ----------------------------------------------------------------------------------------------------


class Answer:
    """What the raw server answers next (one body for every request until changed; None: the task asked for)."""

    body: bytes | None = None


def _answer(head: bytes) -> bytes:
    if Answer.body is not None:
        return Answer.body
    target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
    return json.dumps(task_body(task_id=unquote(target.removeprefix(PREFIX)))).encode()


@pytest.fixture(scope="module")
def server() -> Iterator[FaultServer]:
    """A raw HTTP server recording each request line and answering with :attr:`Answer.body`."""
    srv = FaultServer(lambda conn, head: respond(conn, 200, _answer(head)))
    with pytest.MonkeyPatch.context() as patch:
        conn = {"conn_type": "ppio", "host": srv.base_url, "password": API_KEY, "extra": {"max_attempts": 1}}
        patch.setenv("AIRFLOW_CONN_PPIO_DEFAULT", json.dumps(conn))
        yield srv
    srv.stop()


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for every async example (the shared client pool keeps one client per loop)."""
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


# -- task ids ----------------------------------------------------------------------------------------------------


def _check_request(server: FaultServer, before: int, task_id: str, error: BaseException | None) -> None:
    lines = server.request_lines[before:]
    if error is not None:
        assert isinstance(error, PPIOInvalidInputError), repr(error)
        assert "prewarm task id" in str(error)
        assert lines == [], "a refused id must not send anything"
        return
    assert len(lines) == 1, lines
    method, target, _ = lines[0].split(" ")
    assert method == "GET"
    assert target.startswith(PREFIX)
    segment = target[len(PREFIX) :]
    assert segment and not any(char in segment for char in "/?#\\"), target
    assert segment not in (".", ".."), target
    assert unquote(segment, errors="strict") == task_id


@PROPERTY_SETTINGS
@given(task_id=TASK_IDS)
def test_any_task_id_is_refused_before_sending_or_sent_as_one_encoded_segment(
    server: FaultServer, loop: asyncio.AbstractEventLoop, task_id: str
) -> None:
    from airflow_provider_ppio.hooks.ppio import PPIOHook
    from airflow_provider_ppio.triggers.prewarm import PrewarmTaskTrigger

    Answer.body = None  # the task asked for, so an id sent intact reads back as that task
    hook = PPIOHook()
    for call in (
        lambda: hook.get_prewarm_task(task_id),
        lambda: loop.run_until_complete(hook.aget_prewarm_task(task_id)),
    ):
        before = len(server.heads)
        error: BaseException | None = None
        try:
            call()
        except Exception as err:
            error = err
        _check_request(server, before, task_id, error)

    try:
        trigger = PrewarmTaskTrigger(prewarm_task_id=task_id)
    except PPIOInvalidInputError:
        assert error is not None  # the trigger refuses exactly the ids the hook refuses
    else:
        assert error is None
        assert trigger.serialize()[1]["prewarm_task_id"] == task_id


# -- bodies ------------------------------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(payload=BODIES)
def test_any_json_body_parses_to_a_usable_task_or_raises_the_typed_error(payload: Any) -> None:
    _check_parsed(payload)


@PROPERTY_SETTINGS
@given(body=st.one_of(st.binary(max_size=200), BODIES.map(lambda value: json.dumps(value).encode())))
def test_any_200_body_decodes_or_raises_the_typed_error(body: bytes) -> None:
    try:
        payload = interpret_response(
            method="GET", path=PREFIX + "x", status=200, headers={}, body=body, secret=SecretStr(API_KEY)
        )
    except PPIOBadResponseError:
        return
    _check_parsed(payload)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(payload=BODIES)
def test_any_json_body_over_http_gives_a_task_or_the_typed_error_on_both_transports(
    server: FaultServer, loop: asyncio.AbstractEventLoop, payload: Any
) -> None:
    from airflow_provider_ppio.hooks.ppio import PPIOHook

    Answer.body = json.dumps(payload).encode()
    hook = PPIOHook()
    results = []
    for call in (
        lambda: hook.get_prewarm_task(TASK_ID),
        lambda: loop.run_until_complete(hook.aget_prewarm_task(TASK_ID)),
    ):
        try:
            results.append(call().to_xcom())
        except PPIOBadResponseError:
            results.append("bad response")
    assert results[0] == results[1]  # both transports agree
