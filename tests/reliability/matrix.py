"""
The fault matrix as data: every scenario, how its fault is produced, and the outcome expected on each path.

A *path* is one way the provider reads a prewarm task: ``hook`` (``PPIOHook.get_prewarm_task``, sync,
requests), ``sensor`` (one ``PrewarmTaskSensor.poke``) and ``trigger`` (``PrewarmTaskTrigger.run`` until its
first event, async, aiohttp). Each path runs on its own thread with a hard limit, so a hang is reported as an
outcome instead of stalling the suite.

What is observable, per path:

* hook: it returns the task (with its status) or raises a typed error;
* sensor: the poke opens the gate (``PokeReturnValue``), keeps waiting (``False``) or raises, which fails the
  task. A poke is patient: transient faults are retried with backoff for up to ``unreachable_timeout`` (1 s
  here), so a fault that clears in time opens the gate and one that never clears fails with
  ``PPIOUnreachableError``;
* trigger: its first event: ``success``, ``failed``, ``error`` (with ``error_type``) or ``timeout``. It is
  patient the same way. "Keeps waiting" (an unknown status) means: given a short deadline, it polls again and
  ends with the ``timeout`` event at the deadline (at least two polls).

Request counts come from the server side: the emulator's request log or the raw server's accept log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from faultserver import FaultServer, RefusedPort
from trigger_runs import first_event

TASK_ID = "pwt-reliability"
TASK_PATH = f"/gpus/v2/prewarm-tasks/{TASK_ID}"
#: The key of every connection here: finding it in any message or event is a leak.
API_KEY = "sk_rel_DO_NOT_LEAK_5e1f0c2b9a"
WRONG_KEY = "sk_rel_WRONG_DO_NOT_LEAK_77d1e4"
#: A host name DNS says does not exist (``socket.getaddrinfo`` is patched; nothing is ever resolved for real).
UNKNOWN_HOST = "ppio-reliability-no-such-host.invalid"
#: Connection extras of every scenario unless it says otherwise: 3 attempts, fast backoff, waits capped at 0.5 s,
#: and a wait (sensor, trigger) gives up on an API that gives no usable answer after 1 s.
BASE_EXTRA: dict[str, Any] = {
    "timeout": 2,
    "max_attempts": 3,
    "backoff_initial": 0.01,
    "retry_wait_max": 0.5,
    "unreachable_timeout": 1.0,
}
#: For faults that eat the whole timeout: half a second per attempt, two attempts.
SLOW_EXTRA: dict[str, Any] = {"timeout": 0.5, "max_attempts": 2}
#: The trigger's deadline (seconds from its start) when the scenario should end it by itself.
LONG_DEADLINE = 10.0
#: The trigger's deadline when it is expected to keep waiting: long enough for several fast polls.
SHORT_DEADLINE = 0.6
#: A path still running after this many seconds is reported as a hang.
HARD_LIMIT = 20.0
PATHS = ("hook", "sensor", "trigger")


@dataclasses.dataclass(frozen=True)
class Expect:
    """
    The outcome a path must show.

    :param outcome: hook: ``task`` | ``raises``; sensor: ``done`` | ``waiting`` | ``fails``; trigger: ``success`` |
        ``failed`` | ``error`` | ``timeout``.
    :param error: Exception class name (hook, sensor) or the event's ``error_type`` (trigger).
    :param message: Text the error message (or the event's message) must contain.
    :param requests: Requests the server must see: exactly N, or ``(min, max)`` with max None for no upper bound.
    :param status: For ``task``: the status value the hook returns.
    :param waited: Least seconds between the first and second request (a honoured ``Retry-After``).
    :param waited_max: Most seconds between them (a capped ``Retry-After``).
    :param polls: Least polls of the trigger.
    """

    outcome: str
    error: str | None = None
    message: str | None = None
    requests: int | tuple[int, int | None] | None = None
    status: str | None = None
    waited: float | None = None
    waited_max: float | None = None
    polls: int | None = None


@dataclasses.dataclass
class Measured:
    """What a path did; fields as in :class:`Expect`, plus the wall time and the leak check."""

    outcome: str
    error: str | None = None
    message: str = ""
    requests: int | None = None
    status: str | None = None
    waited: float | None = None
    polls: int | None = None
    seconds: float = 0.0
    leaked: bool = False
    other_host_contacted: bool = False


@dataclasses.dataclass(frozen=True)
class Scenario:
    """
    One row of the matrix.

    :param name: Short id (test id and doc anchor).
    :param title: What goes wrong, for the doc.
    :param produced_by: How the fault is produced, for the doc.
    :param arrange: Sets the fault up: ``arrange(arena)``.
    :param hook: Expected outcome of the hook.
    :param sensor: Expected outcome of the sensor's poke.
    :param trigger: Expected outcome of the trigger.
    :param extra: Connection extras on top of :data:`BASE_EXTRA`.
    :param state: The task's state in the emulator (None: no such task).
    :param trigger_deadline: The trigger's deadline in seconds from its start.
    """

    name: str
    title: str
    produced_by: str
    arrange: Callable[[Arena], None]
    hook: Expect
    sensor: Expect
    trigger: Expect
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    state: str | None = "succeeded"
    trigger_deadline: float | None = None

    def expect(self, path: str) -> Expect:
        """The expectation for one path."""
        expected: Expect = getattr(self, path)
        return expected

    def deadline(self) -> float:
        """The trigger's deadline: short when it is expected to keep waiting, long otherwise."""
        if self.trigger_deadline is not None:
            return self.trigger_deadline
        return SHORT_DEADLINE if self.trigger.outcome == "timeout" else LONG_DEADLINE


class Arena:
    """
    Where one scenario runs on one path: the emulator, any raw servers, and the connection pointing at one.

    :param emulator: The reset emulator, holding the task.
    :param set_connection: ``set_connection(json)`` sets ``AIRFLOW_CONN_PPIO_DEFAULT``.
    :param extra: The scenario's connection extras.
    """

    def __init__(self, emulator: Any, set_connection: Callable[[str], None], extra: dict[str, Any]) -> None:
        self.emulator = emulator
        self._set_connection = set_connection
        self.extra = {**BASE_EXTRA, **extra}
        self.target: Any = emulator
        self.servers: list[Any] = []
        self.other_host: FaultServer | None = None
        self.uncountable = False
        self._undo: list[Callable[[], None]] = []
        self.connect(emulator.base_url)

    def connect(self, base_url: str, api_key: str = API_KEY) -> None:
        """Point ``ppio_default`` at ``base_url`` with ``api_key`` and the scenario's extras."""
        conn = {"conn_type": "ppio", "host": base_url, "password": api_key, "extra": self.extra}
        self._set_connection(json.dumps(conn))

    def fault(self, kind: str, count: int | None = None, **params: Any) -> None:
        """Inject an emulator fault on reads of the task (``count`` None: until the end of the test)."""
        self.emulator.control.inject_fault(kind, count=count, method="GET", path_prefix=TASK_PATH, **params)

    def raw(self, behaviour: str, faulty: int | None = None) -> FaultServer:
        """Start a raw server whose first ``faulty`` connections get ``behaviour``; the rest get the task."""
        server = FaultServer(lambda conn, head: getattr(server, behaviour)(conn, head), faulty=faulty, body=task_body())
        server.echo = API_KEY
        self.servers.append(server)
        self.target = server
        self.connect(server.base_url)
        return server

    def refuse(self) -> None:
        """Point the connection at a port that refuses connections."""
        port = RefusedPort()
        self.servers.append(port)
        self.target = port
        self.connect(port.base_url)

    def tls_unverified(self) -> None:
        """Point the connection at an HTTPS emulator whose CA (a fresh one) is trusted nowhere."""
        from airflow_provider_ppio.testing.emulator import EmulatorConfig
        from airflow_provider_ppio.testing.server import EmulatorServer

        server = EmulatorServer(EmulatorConfig(api_key=API_KEY), tls=True).start()
        self.servers.append(server)
        self.uncountable = True  # the handshake fails before any request
        self.connect(server.base_url)

    def unknown_host(self) -> None:
        """Point the connection at :data:`UNKNOWN_HOST`, for which ``socket.getaddrinfo`` answers EAI_NONAME."""
        real = socket.getaddrinfo

        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            if (host.decode() if isinstance(host, bytes) else host) == UNKNOWN_HOST:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return real(host, *args, **kwargs)

        socket.getaddrinfo = getaddrinfo
        self._undo.append(lambda: setattr(socket, "getaddrinfo", real))
        self.uncountable = True
        self.connect(f"https://{UNKNOWN_HOST}:8080")  # plain http to a remote host is refused before DNS

    def redirect_elsewhere(self) -> None:
        """Answer reads with a 302 to another host (a raw server that records whether anyone came)."""
        other = FaultServer(lambda conn, head: other.answer_json(conn, head), body=task_body())
        self.other_host = other
        self.servers.append(other)
        self.fault("status", status=302, headers={"Location": f"{self.other_host.base_url}{TASK_PATH}"}, body="")

    def requests(self, at_least: int = 1) -> tuple[int | None, float | None]:
        """
        Requests for the task seen by the server in use, and the seconds between the first two.

        :param at_least: The emulator logs a request when its answer ends, so a cut-off slow answer is logged a
            moment after the client gave up: wait (up to 3 s) until this many are logged, then read once more.
            Waiting cannot lower the count, so a path that sent fewer requests still shows fewer.
        """
        if isinstance(self.target, RefusedPort) or self.uncountable:
            return None, None
        if isinstance(self.target, FaultServer):
            return len(self.target.heads), None
        limit = time.monotonic() + 3
        while True:
            entries = self._log()
            if len(entries) >= at_least or time.monotonic() > limit:
                break
            time.sleep(0.05)
        time.sleep(0.05)
        entries = self._log()
        gap = entries[1]["time"] - entries[0]["time"] if len(entries) >= 2 else None
        return len(entries), gap

    def _log(self) -> list[dict[str, Any]]:
        return [entry for entry in self.emulator.control.requests_log() if entry["path"] == TASK_PATH]

    def stop(self) -> None:
        """Stop the raw servers and undo any patch."""
        for server in self.servers:
            server.stop()
        for undo in self._undo:
            undo()


def task_body(**changes: Any) -> dict[str, Any]:
    """
    A complete succeeded task as the API returns it, with top-level ``changes`` (None values kept as null).

    :param changes: Fields to replace or add.
    """
    body: dict[str, Any] = {
        "task_id": TASK_ID,
        "name": "llm-server:1.4",
        "image": "registry.example.com/acme/llm-server:1.4",
        "region_id": "us-east-1",
        "product_ids": ["gpu-4090"],
        "image_size": 7_340_032_000,
        "created_at": 1_767_225_600,
        "completed_at": 1_767_226_000,
        "status": {"status": "succeeded", "error": "", "message": "image prewarmed on 4 nodes"},
        "registry_auth_id": "",
        "note": "",
        "reason": ["image pulled successfully"],
    }
    body.update(changes)
    return body


# -- expectation shorthands ------------------------------------------------------------------------------------


def recovers(requests: int, **extra: Any) -> dict[str, Expect]:
    """Retried within one call, then succeeded: every path sees the task."""
    return {
        "hook": Expect("task", status="succeeded", requests=requests, **extra),
        "sensor": Expect("done", requests=requests, **extra),
        "trigger": Expect("success", requests=requests, **extra),
    }


def outlasts_retries(error: str, message: str, requests: int, wait_requests: int) -> dict[str, Expect]:
    """
    A burst longer than one call's retries that clears within ``unreachable_timeout``: the hook raises, the
    patient waits (sensor poke, trigger) retry through it and succeed.
    """
    return {
        "hook": Expect("raises", error, message, requests),
        "sensor": Expect("done", requests=wait_requests),
        "trigger": Expect("success", requests=wait_requests),
    }


def persists(
    error: str, message: str, requests: int | None, wait_requests: int | tuple[int, int | None] | None = None
) -> dict[str, Expect]:
    """
    A transient fault that never clears: the hook raises it after its attempts; the waits retry with backoff
    until ``unreachable_timeout`` and then fail with ``PPIOUnreachableError`` naming the last error.

    :param wait_requests: Requests of a wait; default: more than one call's ``requests``.
    """
    if wait_requests is None and requests is not None:
        wait_requests = (requests + 1, None)
    gave_up = message or "(unreachable_timeout)"  # the error names the last fault it gave up on
    return {
        "hook": Expect("raises", error, message, requests),
        "sensor": Expect("fails", "PPIOUnreachableError", gave_up, wait_requests),
        "trigger": Expect("error", "PPIOUnreachableError", gave_up, wait_requests),
    }


def permanent(error: str, message: str, requests: int | None = 1) -> dict[str, Expect]:
    """A permanent error: raised at once by the hook, fails the task, ends the trigger with an error event."""
    return {
        "hook": Expect("raises", error, message, requests),
        "sensor": Expect("fails", error, message, requests),
        "trigger": Expect("error", error, message, requests),
    }


def opens(status: str = "succeeded") -> dict[str, Expect]:
    """A usable answer: the hook returns it, the gate opens."""
    return {
        "hook": Expect("task", status=status, requests=1),
        "sensor": Expect("done", requests=1),
        "trigger": Expect("success", requests=1),
    }


def scenario(name: str, title: str, produced_by: str, arrange: Callable[[Arena], None], **kwargs: Any) -> Scenario:
    """Build a :class:`Scenario`; ``expect=`` takes one of the shorthands' dicts."""
    expected = kwargs.pop("expect", {})
    return Scenario(name, title, produced_by, arrange, **expected, **kwargs)


def _burst(status: int, count: int) -> Callable[[Arena], None]:
    return lambda arena: arena.fault("status", count=count, status=status)


def _body(body: Any) -> Callable[[Arena], None]:
    return lambda arena: arena.fault("body", body=body)


def _raw(behaviour: str, faulty: int | None = None) -> Callable[[Arena], None]:
    def arrange(arena: Arena) -> None:
        arena.raw(behaviour, faulty)

    return arrange


def _nothing(arena: Arena) -> None:
    return None


SCENARIOS: list[Scenario] = []
for _code in (500, 502, 503, 504):
    SCENARIOS.append(
        scenario(
            f"http{_code}-short",
            f"{_code} burst shorter than the retry budget",
            f"emulator `status` fault, status={_code}, count=2",
            _burst(_code, 2),
            expect=recovers(3),
        )
    )
    SCENARIOS.append(
        scenario(
            f"http{_code}-long",
            f"{_code} burst longer than the retry budget",
            f"emulator `status` fault, status={_code}, count=4 (3 attempts per call)",
            _burst(_code, 4),
            expect=outlasts_retries("PPIOServerError", f"HTTP {_code} (PPIO API error)", 3, 5),
        )
    )
SCENARIOS += [
    scenario(
        "http502-html",
        "502 with a proxy's HTML page, twice",
        "emulator `html` fault, status=502, count=2",
        lambda arena: arena.fault("html", count=2, status=502),
        expect=recovers(3),
    ),
    scenario(
        "http429-seconds",
        "429 with `Retry-After: 0.3` (seconds)",
        'emulator `rate_limit` fault, retry_after="0.3", count=1',
        lambda arena: arena.fault("rate_limit", count=1, retry_after="0.3"),
        expect=recovers(2, waited=0.3),
    ),
    scenario(
        "http429-date",
        "429 with `Retry-After` as an HTTP date 2 s ahead",
        "emulator `rate_limit` fault, retry_after=2, retry_after_format=http-date, count=1; retry_wait_max=3",
        lambda arena: arena.fault("rate_limit", count=1, retry_after=2, retry_after_format="http-date"),
        expect=recovers(2, waited=0.9),
        extra={"retry_wait_max": 3},
    ),
    scenario(
        "http429-absent",
        "429 without `Retry-After`",
        "emulator `rate_limit` fault, no retry_after, count=1",
        lambda arena: arena.fault("rate_limit", count=1),
        expect=recovers(2),
    ),
    scenario(
        "http429-absurd",
        "429 with `Retry-After: 86400` (capped by retry_wait_max=0.5)",
        "emulator `rate_limit` fault, retry_after=86400, count=1",
        lambda arena: arena.fault("rate_limit", count=1, retry_after=86400),
        expect=recovers(2, waited=0.45, waited_max=5.0),
    ),
    scenario(
        "http429-persistent",
        "429 on every request",
        "emulator `rate_limit` fault, no retry_after, count=unlimited",
        lambda arena: arena.fault("rate_limit"),
        expect=persists("PPIORateLimitError", "HTTP 429 (rate limited)", 3),
    ),
    scenario(
        "refused",
        "connection refused",
        "a port bound but not listening",
        lambda arena: arena.refuse(),
        expect=persists("PPIOTransportError", "could not get an answer", None),
    ),
    scenario(
        "drop-before-response",
        "connection closed before any byte of the answer, once",
        "emulator `drop` fault, count=1",
        lambda arena: arena.fault("drop", count=1),
        expect=recovers(2),
    ),
    scenario(
        "drop-mid-body",
        "connection closed mid-body (Content-Length promised, half sent), once",
        "emulator `drop` fault, when=mid_body, count=1",
        lambda arena: arena.fault("drop", count=1, when="mid_body"),
        expect=recovers(2),
    ),
    scenario(
        "reset-mid-body",
        "TCP reset mid-body on every request",
        "raw socket: 100 of 2000 promised bytes, then RST",
        _raw("reset_mid_body"),
        expect=persists("PPIOTransportError", "could not get an answer", 3),
    ),
    scenario(
        "read-timeout-once",
        "no answer within the timeout, once",
        "raw socket: first connection silent; timeout=0.5, 2 attempts",
        _raw("silent", faulty=1),
        expect=recovers(2),
        extra=SLOW_EXTRA,
    ),
    scenario(
        "read-timeout",
        "no answer within the timeout, ever",
        "raw socket: reads the request, never answers; timeout=0.5, 2 attempts",
        _raw("silent"),
        expect=persists("PPIOTransportError", "0.5s", 2, (2, None)),
        extra=SLOW_EXTRA,
    ),
    scenario(
        "trickle-headers",
        "headers trickled one byte per 20 ms, forever",
        "raw socket: status line, then one header byte every 20 ms; timeout=0.5, 2 attempts",
        _raw("trickle_headers"),
        expect=persists("PPIOTransportError", "0.5s", 2, (2, None)),
        extra=SLOW_EXTRA,
    ),
    scenario(
        "trickle-body",
        "body trickled one byte per 20 ms, forever",
        "raw socket: chunked body, a 1-byte chunk every 20 ms; timeout=0.5, 2 attempts",
        _raw("trickle_body"),
        expect=persists(
            "PPIOTransportError", "", 2, (2, None)
        ),  # the sync and async texts differ; the class is the point
        extra=SLOW_EXTRA,
    ),
    scenario(
        "trickle-emulator",
        "the whole answer trickled one byte per 50 ms (~20 s)",
        "emulator `trickle` fault, interval=0.05; timeout=0.5, 2 attempts",
        lambda arena: arena.fault("trickle", interval=0.05),
        expect=persists(
            "PPIOTransportError", "", 2, (2, None)
        ),  # the sync and async texts differ; the class is the point
        extra=SLOW_EXTRA,
    ),
    scenario(
        "invalid-json",
        "200 with invalid JSON",
        "emulator `malformed_json` fault",
        lambda arena: arena.fault("malformed_json"),
        expect=permanent("PPIOBadResponseError", "HTTP 200 with a body that is not JSON"),
    ),
    scenario(
        "html",
        "200 with an HTML page",
        "emulator `html` fault",
        lambda arena: arena.fault("html"),
        expect=permanent("PPIOBadResponseError", "not JSON (text/html"),
    ),
    scenario(
        "empty-body",
        "200 with an empty body",
        "emulator `empty_body` fault",
        lambda arena: arena.fault("empty_body"),
        expect=permanent("PPIOBadResponseError", "HTTP 200 with an empty body"),
    ),
    scenario(
        "json-array",
        "200 with a JSON array",
        "emulator `json_array` fault, body=[task]",
        lambda arena: arena.fault("json_array", body=[task_body()]),
        expect=permanent("PPIOBadResponseError", "Expected a prewarm task JSON object, got list"),
    ),
    scenario(
        "huge-body",
        "200 with a 20 MB body",
        "emulator `huge_body` fault, megabytes=20",
        lambda arena: arena.fault("huge_body", megabytes=20),
        expect=permanent("PPIOBadResponseError", "larger than 256 KiB"),
    ),
    scenario(
        "undecodable-body",
        "200 whose body is not the `Content-Encoding` it claims (gzip)",
        "raw socket: `Content-Encoding: gzip`, plain JSON body",
        _raw("gzip_garbage"),
        expect=permanent("PPIOBadResponseError", "could not be decoded (Content-Encoding: gzip)"),
    ),
    scenario(
        "another-task",
        "200 with another task than the one asked for",
        "emulator `body` fault, task_id=someone-elses-task",
        _body(task_body(task_id="someone-elses-task")),
        expect=permanent("PPIOBadResponseError", "the API answered with task 'someone-elses-task'"),
    ),
    scenario(
        "fields-missing",
        "optional fields missing (only task_id and status)",
        "emulator `body` fault",
        _body({"task_id": TASK_ID, "status": {"status": "succeeded"}}),
        expect=opens(),
    ),
    scenario(
        "fields-null",
        "optional fields null",
        "emulator `body` fault",
        _body(
            task_body(
                name=None,
                image=None,
                region_id=None,
                product_ids=None,
                image_size=None,
                created_at=None,
                completed_at=None,
                registry_auth_id=None,
                note=None,
                reason=None,
                status={"status": "succeeded", "error": None, "message": None},
            )
        ),
        expect=opens(),
    ),
    scenario(
        "field-wrong-type",
        'a field of the wrong type (`image_size: "huge"`)',
        "emulator `body` fault",
        _body(task_body(image_size="huge")),
        expect=permanent("PPIOBadResponseError", "image_size"),
    ),
    scenario(
        "status-wrong-type",
        '`status` of the wrong type (`"succeeded"`, not an object)',
        "emulator `body` fault",
        _body(task_body(status="succeeded")),
        expect=permanent("PPIOBadResponseError", "status"),
    ),
    scenario(
        "task-id-missing",
        "`task_id` missing",
        "emulator `body` fault",
        _body({key: value for key, value in task_body().items() if key != "task_id"}),
        expect=permanent("PPIOBadResponseError", "task_id: Field required"),
    ),
    scenario(
        "extra-fields",
        "extra fields, top level and in `status`",
        "emulator `body` fault",
        _body(task_body(gpu_nodes=4, labels={"a": "b"}, status={"status": "succeeded", "progress": 100})),
        expect=opens(),
    ),
    scenario(
        "unknown-status",
        'an unknown status value (`"queued"`)',
        'emulator task seeded in state "queued"',
        _nothing,
        state="queued",
        hook=Expect("task", status="queued", requests=1),
        sensor=Expect("waiting", requests=1),
        trigger=Expect("timeout", requests=(2, None), polls=2),
    ),
    scenario(
        "status-missing",
        "`status` missing",
        "emulator `body` fault",
        _body({key: value for key, value in task_body().items() if key != "status"}),
        expect=permanent("PPIOBadResponseError", "status: Field required"),
    ),
    scenario(
        "status-value-missing",
        "`status.status` missing (`status: {}`)",
        "emulator `body` fault",
        _body(task_body(status={"error": "", "message": ""})),
        expect=permanent("PPIOBadResponseError", "status.status: Field required"),
    ),
    scenario(
        "prewarm-failed",
        "the prewarm itself failed (not a fault: the baseline for a failed task)",
        'emulator task seeded in state "failed"',
        _nothing,
        state="failed",
        hook=Expect("task", status="failed", requests=1),
        sensor=Expect("fails", "PPIOPrewarmFailedError", "error: ImagePullFailed | message: failed to pull image", 1),
        trigger=Expect("failed", None, "failed to pull image", 1),
    ),
    scenario(
        "http400",
        "400 Bad Request",
        "emulator `status` fault, status=400",
        lambda arena: arena.fault("status", status=400),
        expect=permanent("PPIOBadRequestError", "HTTP 400"),
    ),
    scenario(
        "http401",
        "401: the key is wrong, and still the same after re-reading the connection",
        "a connection with another key (real emulator answer)",
        lambda arena: arena.connect(arena.emulator.base_url, api_key=WRONG_KEY),
        expect=permanent("PPIOAuthError", "HTTP 401 (check the API key"),
    ),
    scenario(
        "http403",
        "403 Forbidden",
        "emulator `status` fault, status=403",
        lambda arena: arena.fault("status", status=403),
        expect=permanent("PPIOAuthError", "HTTP 403 (check the API key"),
    ),
    scenario(
        "http404",
        "404: no such task",
        "no task seeded (real emulator answer)",
        _nothing,
        state=None,
        expect=permanent("PPIONotFoundError", "HTTP 404 (no such prewarm task)"),
    ),
    scenario(
        "redirect",
        "302 to another host (must not be followed: the key stays home)",
        "emulator `status` fault, status=302, Location: a raw server on another port",
        lambda arena: arena.redirect_elsewhere(),
        expect=permanent("PPIOBadResponseError", "redirects are not followed"),
    ),
    scenario(
        "tls-unverified",
        "TLS verification fails (a certificate no trusted CA signed)",
        "the HTTPS emulator with a fresh CA, not in `ca_bundle` nor the environment",
        lambda arena: arena.tls_unverified(),
        expect=permanent("PPIOConnectionConfigError", "the TLS handshake with", None),
    ),
    scenario(
        "unknown-host",
        "the host name does not exist (DNS)",
        "a made-up host; `socket.getaddrinfo` patched to answer `EAI_NONAME`",
        lambda arena: arena.unknown_host(),
        expect=permanent("PPIOConnectionConfigError", "does not exist", None),
    ),
    # -- a hostile network (issue 23) ---------------------------------------------------------------------------
    scenario(
        "key-in-content-type",
        "the API key echoed in a 200's `Content-Type` (not JSON)",
        "raw socket: `Content-Type: text/html; echo=Bearer <key>`",
        _raw("echo_key_content_type"),
        expect=permanent("PPIOBadResponseError", "echo=Bearer ***"),
    ),
    scenario(
        "key-in-status-line",
        "the API key echoed as the status line's code",
        "raw socket: `HTTP/1.1 <key> OK`",
        _raw("echo_key_status_line"),
        expect=persists("PPIOTransportError", "could not get an answer", 3),
    ),
    scenario(
        "key-in-chunk-size",
        "the API key echoed as a chunk size",
        "raw socket: chunked 200 whose first chunk-size line is the key",
        _raw("echo_key_chunk_size"),
        expect=persists("PPIOTransportError", "could not get an answer", 3),
    ),
    scenario(
        "key-in-500-escaped",
        "the API key echoed in a 500's message, JSON-escaped (`\\u0073k...`) and split by a newline",
        'raw socket: 500, `{"message": "bad key \\u0073\\u006b...\\n..."}`',
        _raw("echo_key_500_escaped"),
        expect=persists("PPIOServerError", "bad key ***", 3),
    ),
    scenario(
        "trickle-gzip-comment",
        "a gzip header whose comment field trickles one byte per 20 ms, forever",
        "raw socket: `Content-Encoding: gzip`, header with FLG.FCOMMENT, then 1 byte / 20 ms; timeout=0.5, 2 attempts",
        _raw("trickle_gzip_comment"),
        expect=persists("PPIOTransportError", "0.5s", 2, (2, None)),
        extra=SLOW_EXTRA,
    ),
    scenario(
        "trickle-trailers",
        "chunked trailers that trickle one byte per 20 ms, forever",
        "raw socket: complete chunked body, then `X-Trailer: ` 1 byte / 20 ms; timeout=0.5, 2 attempts",
        _raw("trickle_trailers"),
        expect=persists("PPIOTransportError", "0.5s", 2, (2, None)),
        extra=SLOW_EXTRA,
    ),
    scenario(
        "trickle-chunk-extension",
        "a chunk extension that trickles one byte per 20 ms, forever",
        "raw socket: `2;ext=` then 1 byte / 20 ms; timeout=0.5, 2 attempts",
        _raw("trickle_chunk_extension"),
        expect=persists("PPIOTransportError", "0.5s", 2, (2, None)),
        extra=SLOW_EXTRA,
    ),
    scenario(
        "deep-json-200",
        "a 200 whose JSON nests 100,000 deep",
        'raw socket: `{"status": [[[...]]]}`, 100,000 arrays',
        _raw("deep_json_200"),
        expect=permanent("PPIOBadResponseError", "nested deeper than 32 levels"),
    ),
    scenario(
        "deep-json-500",
        "a 500 whose JSON nests 100,000 deep (still a transient server error)",
        'raw socket: 500, `{"message": [[[...]]]}`, 100,000 arrays',
        _raw("deep_json_500"),
        expect=persists("PPIOServerError", "HTTP 500 (PPIO API error)", 3),
    ),
    scenario(
        "completed-at-huge",
        "`completed_at` = 10^19 in a succeeded task (counts as not reported; the success stands)",
        "emulator `body` fault",
        _body(task_body(completed_at=10**19)),
        expect=opens(),
    ),
    scenario(
        "completed-at-milliseconds",
        "`completed_at` in milliseconds (counts as not reported; the success stands)",
        "emulator `body` fault",
        _body(task_body(completed_at=1_767_226_000_000)),
        expect=opens(),
    ),
    scenario(
        "task-over-cap",
        "a 1 MB answer to a task read (the task cap is 256 KiB)",
        "emulator `body` fault: a task whose note is 1 MB",
        _body(task_body(note="x" * 1_000_000)),
        expect=permanent("PPIOBadResponseError", "larger than 256 KiB"),
    ),
    scenario(
        "unreachable",
        "503 on every request, for longer than `unreachable_timeout` (1 s)",
        "emulator `status` fault, status=503, count=unlimited",
        lambda arena: arena.fault("status", status=503),
        expect=persists("PPIOServerError", "HTTP 503 (PPIO API error)", 3),
    ),
]


# -- running one path --------------------------------------------------------------------------------------------


def bounded(run: Callable[[], Measured], limit: float = HARD_LIMIT) -> Measured:
    """
    Run ``run`` on a daemon thread; a run still going after ``limit`` seconds is reported as a hang.

    :param run: Returns what it measured.
    :param limit: Seconds before it counts as a hang.
    """
    box: list[Measured | BaseException] = []

    def target() -> None:
        try:
            box.append(run())
        except BaseException as err:  # reported as the outcome
            box.append(err)

    started = time.monotonic()
    thread = threading.Thread(target=target, name="matrix-path", daemon=True)
    thread.start()
    thread.join(limit)
    seconds = time.monotonic() - started
    if thread.is_alive():
        return Measured("hang", message=f"still running after {limit:g}s", seconds=seconds)
    result = box[0]
    measured = Measured("raises", type(result).__name__, str(result)) if isinstance(result, BaseException) else result
    measured.seconds = seconds
    return measured


def run_hook() -> Measured:
    """Read the task once through ``PPIOHook`` (sync)."""
    from airflow_provider_ppio.hooks.ppio import PPIOHook

    try:
        task = PPIOHook().get_prewarm_task(TASK_ID)
    except Exception as err:
        return Measured("raises", type(err).__name__, str(err))
    return Measured("task", status=task.status.status, message=json.dumps(task.to_xcom()))


def run_sensor() -> Measured:
    """One poke of ``PrewarmTaskSensor``, as a worker (or a reschedule) does it."""
    from airflow.providers.common.compat.sdk import PokeReturnValue

    from airflow_provider_ppio.sensors.prewarm import PrewarmTaskSensor

    sensor = PrewarmTaskSensor(task_id="gate", prewarm_task_id=TASK_ID)
    try:
        answer = sensor.poke({})
    except Exception as err:
        return Measured("fails", type(err).__name__, str(err))
    if answer is False:
        return Measured("waiting")
    if isinstance(answer, PokeReturnValue) and answer.is_done and (answer.xcom_value or {}).get("task_id") == TASK_ID:
        return Measured("done", message=json.dumps(answer.xcom_value))
    return Measured("unexpected", message=repr(answer))


def run_trigger(deadline: float) -> Measured:
    """Run ``PrewarmTaskTrigger`` on a fresh event loop until its first event, counting its polls."""
    from airflow_provider_ppio.hooks.ppio import PPIOHook
    from airflow_provider_ppio.triggers.prewarm import PrewarmTaskTrigger

    trigger = PrewarmTaskTrigger(prewarm_task_id=TASK_ID, poke_interval=0.05, deadline=time.time() + deadline)
    polls = 0
    original = PPIOHook.aget_prewarm_task

    async def counted(hook: PPIOHook, task_id: str, **kwargs: Any) -> Any:
        nonlocal polls
        polls += 1
        return await original(hook, task_id, **kwargs)

    PPIOHook.aget_prewarm_task = counted  # type: ignore[method-assign,assignment]
    try:
        payload = asyncio.run(asyncio.wait_for(first_event(trigger), HARD_LIMIT))
    finally:
        PPIOHook.aget_prewarm_task = original  # type: ignore[method-assign]
    status = str(payload.get("status"))
    return Measured(
        status,
        payload.get("error_type"),
        json.dumps(payload) if status in ("success",) else str(payload.get("message", "")),
        polls=polls,
    )


def measure(scenario: Scenario, path: str, arena: Arena) -> Measured:
    """
    Run one path of one scenario (already arranged) and fill in the server-side facts.

    :param scenario: The scenario.
    :param path: ``hook``, ``sensor`` or ``trigger``.
    :param arena: The arranged arena.
    """
    runs: dict[str, Callable[[], Measured]] = {
        "hook": run_hook,
        "sensor": run_sensor,
        "trigger": lambda: run_trigger(scenario.deadline()),
    }
    measured = bounded(runs[path])
    expected = scenario.expect(path).requests
    low = expected if isinstance(expected, int) else expected[0] if expected else 1
    measured.requests, measured.waited = arena.requests(at_least=low)
    measured.leaked = API_KEY in measured.message or WRONG_KEY in measured.message
    if arena.other_host is not None:
        measured.other_host_contacted = bool(arena.other_host.heads)
    return measured


# -- comparing and describing ------------------------------------------------------------------------------------


def mismatches(expected: Expect, measured: Measured) -> list[str]:
    """
    Every way ``measured`` differs from ``expected`` (empty: as expected).

    :param expected: The expectation.
    :param measured: What happened.
    """
    problems = []
    if measured.outcome != expected.outcome:
        problems.append(f"outcome {measured.outcome!r}, expected {expected.outcome!r}")
    if expected.error is not None and measured.error != expected.error:
        problems.append(f"error {measured.error!r}, expected {expected.error!r}")
    if expected.message is not None and expected.message not in measured.message:
        problems.append(f"message {measured.message[:300]!r} lacks {expected.message!r}")
    if expected.status is not None and measured.status != expected.status:
        problems.append(f"status {measured.status!r}, expected {expected.status!r}")
    if expected.requests is not None:
        low, high = (expected.requests, expected.requests) if isinstance(expected.requests, int) else expected.requests
        seen = measured.requests
        if seen is None or seen < low or (high is not None and seen > high):
            problems.append(f"{seen} requests, expected {describe_requests(expected.requests)}")
    if expected.waited is not None and (measured.waited is None or measured.waited < expected.waited):
        problems.append(f"waited {measured.waited}, expected >= {expected.waited}")
    if expected.waited_max is not None and (measured.waited is None or measured.waited > expected.waited_max):
        problems.append(f"waited {measured.waited}, expected <= {expected.waited_max}")
    if expected.polls is not None and (measured.polls is None or measured.polls < expected.polls):
        problems.append(f"{measured.polls} polls, expected >= {expected.polls}")
    if measured.leaked:
        problems.append("the API key appears in the message or event")
    if measured.other_host_contacted:
        problems.append("the other host was contacted")
    return problems


_OUTCOMES = {
    "task": "returns the task",
    "raises": "raises",
    "done": "gate opens (XCom)",
    "waiting": "keeps waiting (poke → False)",
    "fails": "fails the task:",
    "success": "`success` event",
    "failed": "`failed` event",
    "error": "`error` event:",
    "timeout": "keeps waiting to the deadline (`timeout` event)",
    "hang": "HANG",
}


def describe_requests(requests: int | tuple[int, int | None]) -> str:
    """``3`` / ``≥ 4`` / ``2-5``."""
    if isinstance(requests, int):
        return str(requests)
    low, high = requests
    return f"≥ {low}" if high is None else f"{low}-{high}"


def _head(outcome: str, error: str | None, status: str | None) -> str:
    text = _OUTCOMES.get(outcome, outcome)
    if status is not None:
        text += f" (`{status}`)"
    if error:
        text += f" `{error}`"
    return text


def describe_expected(expected: Expect) -> str:
    """One cell of the doc's table: what must happen."""
    parts = [_head(expected.outcome, expected.error, expected.status)]
    if expected.requests is not None:
        parts.append(f"{describe_requests(expected.requests)} req")
    if expected.polls is not None:
        parts.append(f"≥ {expected.polls} polls")
    if expected.waited is not None:
        parts.append(
            f"waits ≥ {expected.waited:g} s" + (f", ≤ {expected.waited_max:g} s" if expected.waited_max else "")
        )
    if expected.message:
        parts.append(f"“{expected.message}”")
    return " · ".join(parts)


def describe_measured(expected: Expect, measured: Measured) -> str:
    """One cell of the doc's table: what happened, in the same words."""
    parts = [_head(measured.outcome, measured.error if expected.error or measured.error else None, measured.status)]
    if measured.requests is not None:
        parts.append(f"{measured.requests} req")
    if expected.polls is not None and measured.polls is not None:
        parts.append(f"{measured.polls} polls")
    if expected.waited is not None and measured.waited is not None:
        parts.append(f"waited {measured.waited:.2f} s")
    if expected.message:
        parts.append(f"“{excerpt(measured.message, expected.message)}”")
    return " · ".join(parts)


def excerpt(message: str, around: str, width: int = 110) -> str:
    """
    The measured message, short: without the ``GET <path>:`` prefix, and cut to show ``around`` if it is there.

    :param message: The whole message.
    :param around: The text the expectation looks for.
    :param width: Longest excerpt.
    """
    text = " ".join(message.removeprefix(f"GET {TASK_PATH}: ").split())
    if len(text) <= width:
        return text
    start = max(0, min(text.find(around) - 20, len(text) - width)) if around in text else 0
    cut = text[start : start + width]
    return ("…" if start else "") + cut + ("…" if start + width < len(text) else "")
