"""
The retry policy both transports share: waits have a floor (a ``Retry-After`` of zero, a negative one, a
past date or garbage is no hint, and never makes the wait shorter than the backoff), and a long outage
logs a WARNING per change of error plus a summary now and then, not one per attempt.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests_mock as rm
from aio_server import TASKS, ApiServer, api_server, reply_json, task_body, warnings_in

from airflow_provider_ppio.exceptions import PPIORateLimitError, PPIOServerError, PPIOUnreachableError
from airflow_provider_ppio.hooks import _retry, _shared
from airflow_provider_ppio.hooks._retry import MIN_WAIT, SUMMARY_EVERY
from airflow_provider_ppio.hooks._shared import _parse_retry_after
from airflow_provider_ppio.hooks.ppio import PPIOHook

# A hot loop regression must fail, not spin: the virtual clock does not move when nothing is slept.
pytestmark = pytest.mark.timeout(60)

PATHS = ["sync", "async"]
TASK_PATH = f"{TASKS}/pw-1"


class Clock:
    """A clock that moves on by what the retry loop "sleeps" (sync and async), so long outages take no time."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.sleeps: list[float] = []
        self._monotonic, self._time = time.monotonic, time.time

    def monotonic(self) -> float:
        return self._monotonic() + self.offset

    def time(self) -> float:
        return self._time() + self.offset

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(float(seconds))
        self.offset += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The retry loop's sleeps recorded, and its clock (and the patience deadlines') moved on by them."""
    virtual = Clock()
    monkeypatch.setattr(time, "sleep", virtual.sleep)  # tenacity.Retrying sleeps through time.sleep
    monkeypatch.setattr(_retry, "_asleep", virtual.asleep)  # tenacity.AsyncRetrying's sleep
    monkeypatch.setattr(_retry, "time", virtual)
    monkeypatch.setattr(_shared, "time", virtual)
    return virtual


@pytest.fixture
def server() -> Iterator[ApiServer]:
    with api_server() as running:
        yield running


def past_date() -> str:
    return email.utils.formatdate(time.time() - 3600, usegmt=True)


def read(path: str, *, patient: bool = False) -> Any:
    """Read task pw-1 through the sync or the async transport."""
    hook = PPIOHook()
    if path == "sync":
        return hook.get_prewarm_task("pw-1", patient=patient)
    return asyncio.run(hook.aget_prewarm_task("pw-1", patient=patient))


def ppio_warnings(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> list[str]:
    captured = capsys.readouterr()
    return [line for line in warnings_in(caplog.records, captured.out + captured.err) if "PPIO API" in line]


# -- Retry-After -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["0", "-5", "0.0", "nan", "inf", "-inf", "1e999", "abc", "", "  ", "Sun, 99 Foo 2026 xx", "past"]
)
def test_a_retry_after_that_is_no_wait_is_no_hint(value: str) -> None:
    assert _parse_retry_after(past_date() if value == "past" else value) is None


@pytest.mark.parametrize(("value", "expected"), [("7", 7.0), ("1.5", 1.5), ("86400", 86400.0)])
def test_a_positive_retry_after_is_a_hint(value: str, expected: float) -> None:
    assert _parse_retry_after(value) == expected


def test_a_future_retry_after_date_is_a_hint() -> None:
    seconds = _parse_retry_after(email.utils.formatdate(time.time() + 30, usegmt=True))
    assert seconds is not None and 28 <= seconds <= 30  # the date has one-second resolution


@pytest.mark.parametrize("value", ["0", "-5", "past", "abc"])
def test_a_useless_retry_after_in_a_patient_wait_backs_off_sync(
    set_conn: Callable[..., None], requests_mock: rm.Mocker, ppio_conn: str, value: str
) -> None:
    # Real time: a hot loop would send thousands of requests in this window; the backoff sends a handful.
    set_conn(extra={"backoff_initial": 0.05, "unreachable_timeout": 0.6})
    header = past_date() if value == "past" else value
    requests_mock.get(f"{ppio_conn}{TASK_PATH}", status_code=429, json={}, headers={"Retry-After": header})
    started = time.monotonic()
    with pytest.raises(PPIOUnreachableError, match="HTTP 429"):
        read("sync", patient=True)
    assert time.monotonic() - started >= 0.6
    assert 3 <= requests_mock.call_count <= 12


@pytest.mark.parametrize("value", ["0", "-5", "past", "abc"])
def test_a_useless_retry_after_in_a_patient_wait_backs_off_async(
    set_conn: Callable[..., None], server: ApiServer, value: str
) -> None:
    set_conn(host=server.base_url, extra={"backoff_initial": 0.05, "unreachable_timeout": 0.6})
    header = past_date() if value == "past" else value
    server.reply(reply_json(429, {}, {"Retry-After": header}))
    started = time.monotonic()
    with pytest.raises(PPIOUnreachableError, match="HTTP 429"):
        read("async", patient=True)
    assert time.monotonic() - started >= 0.6
    assert 3 <= len(server.requests_to(TASK_PATH)) <= 12


def serve(path: str, requests_mock: rm.Mocker, server: ApiServer, *answers: tuple[int, Any, dict[str, str]]) -> None:
    """Answer pw-1's reads with these (status, body, headers) in order, repeating the last one."""
    if path == "sync":
        requests_mock.get(
            f"{server.base_url}{TASK_PATH}",
            [{"status_code": status, "json": body, "headers": headers} for status, body, headers in answers],
        )
    else:
        server.reply(*(reply_json(status, body, headers) for status, body, headers in answers))


def requests_seen(path: str, requests_mock: rm.Mocker, server: ApiServer) -> int:
    return requests_mock.call_count if path == "sync" else len(server.requests_to(TASK_PATH))


@pytest.mark.parametrize("path", PATHS)
def test_retry_after_zero_for_ten_minutes_is_a_backoff_not_a_hot_loop(
    path: str, set_conn: Callable[..., None], requests_mock: rm.Mocker, server: ApiServer, clock: Clock
) -> None:
    # The connection's defaults: backoff from 1 s, waits capped at 60 s, a wait bears 600 s of outage.
    set_conn(host=server.base_url, extra={"backoff_initial": 1})
    serve(path, requests_mock, server, (429, {}, {"Retry-After": "0"}))
    with pytest.raises(PPIOUnreachableError):
        read(path, patient=True)
    assert 10 <= requests_seen(path, requests_mock, server) <= 25
    assert min(clock.sleeps[:-1]) >= 0.5  # the backoff; only the last wait is cut short, to the limit
    assert 590 <= sum(clock.sleeps) <= 600.01  # the requests themselves take the rest, in real time


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("extra", [{"backoff_initial": 1e-9}, {"backoff_initial": 1e-9, "retry_wait_max": 1e-9}])
def test_no_wait_is_under_the_floor_whatever_the_settings(
    path: str,
    extra: dict[str, Any],
    set_conn: Callable[..., None],
    requests_mock: rm.Mocker,
    server: ApiServer,
    clock: Clock,
) -> None:
    set_conn(host=server.base_url, extra={**extra, "max_attempts": 8})
    serve(path, requests_mock, server, (503, {}, {}))
    with pytest.raises(PPIOServerError):
        read(path)
    assert len(clock.sleeps) == 7
    assert min(clock.sleeps) >= MIN_WAIT


@pytest.mark.parametrize("path", PATHS)
def test_a_sane_retry_after_is_honoured_and_capped(
    path: str, set_conn: Callable[..., None], requests_mock: rm.Mocker, server: ApiServer, clock: Clock
) -> None:
    set_conn(host=server.base_url, extra={"retry_wait_max": 20})
    serve(
        path,
        requests_mock,
        server,
        (429, {}, {"Retry-After": "7"}),
        (429, {}, {"Retry-After": "86400"}),
        (200, task_body("pw-1"), {}),
    )
    assert read(path).task_id == "pw-1"
    assert clock.sleeps == [7.0, 20.0]


@pytest.mark.parametrize("path", PATHS)
def test_a_retry_after_shorter_than_the_backoff_does_not_shorten_it(
    path: str, set_conn: Callable[..., None], requests_mock: rm.Mocker, server: ApiServer, clock: Clock
) -> None:
    set_conn(host=server.base_url, extra={"backoff_initial": 4})
    serve(path, requests_mock, server, (429, {}, {"Retry-After": "0.001"}), (200, task_body("pw-1"), {}))
    assert read(path).task_id == "pw-1"
    (wait,) = clock.sleeps
    assert 2 <= wait <= 4  # backoff_initial with its jitter


@pytest.mark.parametrize("path", PATHS)
def test_the_last_wait_of_a_patient_read_ends_at_the_limit(
    path: str, set_conn: Callable[..., None], requests_mock: rm.Mocker, server: ApiServer, clock: Clock
) -> None:
    set_conn(host=server.base_url, extra={"backoff_initial": 1, "unreachable_timeout": 10})
    serve(path, requests_mock, server, (503, {}, {}))
    with pytest.raises(PPIOUnreachableError):
        read(path, patient=True)
    assert 9 <= sum(clock.sleeps) <= 10.01  # the requests themselves take the rest, in real time
    assert min(clock.sleeps) > 0
    assert len(clock.sleeps) <= 5  # 1, 2, 4, 8 s (less their jitter), cut to what is left: no run of short waits


# -- WARNING lines -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_a_thirty_attempt_outage_logs_a_few_warnings(
    path: str,
    set_conn: Callable[..., None],
    requests_mock: rm.Mocker,
    server: ApiServer,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO)
    set_conn(host=server.base_url, extra={"backoff_initial": 1, "max_attempts": 30})
    serve(path, requests_mock, server, (503, {"message": "down for maintenance"}, {}))
    with pytest.raises(PPIOServerError):
        read(path)

    assert requests_seen(path, requests_mock, server) == 30
    lines = ppio_warnings(caplog, capsys)
    summaries = [line for line in lines if "still failing" in line]
    # One line when the outage began, then one summary per SUMMARY_EVERY of outage: not 29 lines.
    assert len(lines) == 1 + len(summaries)
    assert 1 <= len(summaries) <= sum(clock.sleeps) // SUMMARY_EVERY + 1
    assert len(lines) <= 6
    assert "HTTP 503" in lines[0] and "retrying in" in lines[0]
    assert "down for maintenance" in summaries[-1]  # the summary names the last error
    assert "failed attempts in" in summaries[-1]


@pytest.mark.parametrize("path", PATHS)
def test_a_change_of_error_and_the_recovery_are_each_told_once(
    path: str,
    set_conn: Callable[..., None],
    requests_mock: rm.Mocker,
    server: ApiServer,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO)
    set_conn(host=server.base_url, extra={"max_attempts": 30, "retry_wait_max": 1})
    answers = [(503, {}, {})] * 8 + [(429, {}, {})] * 8 + [(503, {}, {})] * 8 + [(200, task_body("pw-1"), {})]
    serve(path, requests_mock, server, *answers)

    assert read(path).task_id == "pw-1"

    captured = capsys.readouterr()
    lines = [line for line in warnings_in(caplog.records, captured.out + captured.err) if "PPIO API" in line]
    assert ["HTTP 503" in line for line in lines] == [True, False, True]
    assert "HTTP 429" in lines[1]
    assert "answered after 24 failed attempt(s)" in caplog.text + captured.out + captured.err


@pytest.mark.parametrize("path", PATHS)
def test_the_retry_warnings_never_carry_the_key(
    path: str,
    set_conn: Callable[..., None],
    requests_mock: rm.Mocker,
    server: ApiServer,
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    api_key: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    set_conn(host=server.base_url, extra={"max_attempts": 4})
    serve(path, requests_mock, server, (503, {"message": f"bad gateway for Bearer {api_key}"}, {}))
    with pytest.raises(PPIOServerError):
        read(path)
    captured = capsys.readouterr()
    text = caplog.text + captured.out + captured.err
    assert "retrying in" in text
    assert api_key not in text


def test_a_429_with_retry_after_zero_carries_no_hint(
    set_conn: Callable[..., None], requests_mock: rm.Mocker, ppio_conn: str, clock: Clock
) -> None:
    set_conn(extra={"max_attempts": 1})
    requests_mock.get(f"{ppio_conn}{TASK_PATH}", status_code=429, json={}, headers={"Retry-After": "0"})
    with pytest.raises(PPIORateLimitError) as info:
        read("sync")
    assert info.value.retry_after is None
