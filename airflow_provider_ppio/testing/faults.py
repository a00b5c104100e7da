"""Fault injection: what a fault is, and how a request hit by one is answered.

A fault is queued through ``POST /_emulator/faults`` (see :mod:`.control`), taken atomically by
the request gate (:mod:`.gate`) for the next matching API request, and played here at the ASGI
level, below FastAPI, so it can send broken bodies, stall, or drop the connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import threading
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
from starlette.types import Message, Receive, Scope, Send

from airflow_provider_ppio.testing.config import MIB
from airflow_provider_ppio.testing.errors import error_body, status_reason
from airflow_provider_ppio.testing.schemas import ControlModel

__all__ = ["Fault", "FaultKind", "FaultSpec", "Serve", "pause", "play_fault", "response_headers"]

FaultKind = Literal[
    "status",
    "rate_limit",
    "latency",
    "malformed_json",
    "html",
    "empty_body",
    "json_array",
    "huge_body",
    "body",
    "drop",
    "trickle",
    "barrier",
]

#: Answers a request normally (auth check included); a fault may call it before or around its mischief.
Serve = Callable[[Scope, Receive, Send], Awaitable[None]]


class FaultSpec(ControlModel):
    """Body of ``POST /_emulator/faults``; which fields matter depends on ``kind`` (see docs)."""

    kind: FaultKind
    count: Annotated[int, Field(ge=1)] | None = 1
    method: str | None = None
    path_prefix: str = ""
    status: Annotated[int, Field(ge=200, le=599)] | None = None
    body: Any = None
    content_type: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    retry_after: float | str | None = None
    retry_after_format: Literal["seconds", "http-date"] = "seconds"
    seconds: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = 0.0
    megabytes: Annotated[float, Field(gt=0, le=1024, allow_inf_nan=False)] = 10.0
    interval: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] = 1.0
    when: Literal["before_response", "mid_body"] = "before_response"

    @model_validator(mode="after")
    def _barrier_needs_parties(self) -> FaultSpec:
        if self.kind == "barrier" and (self.count is None or self.count < 2):
            raise ValueError("a barrier needs count >= 2: the number of requests to hold until all have arrived")
        return self


@dataclasses.dataclass
class Fault:
    """An injected fault waiting for matching requests.

    :param fault_id: id shown in ``GET /_emulator/faults``.
    :param spec: what to do.
    :param remaining: matching requests still to hit (``None`` = unlimited).
    """

    fault_id: int
    spec: FaultSpec
    remaining: int | None
    #: ``barrier``: matching requests taken so far (see :meth:`arrive`).
    arrived: int = 0

    def arrive(self) -> None:
        """Count one request taken by this fault (called under the store's lock)."""
        self.arrived += 1

    def matches(self, method: str, path: str) -> bool:
        """Whether a request is affected.

        :param method: HTTP method.
        :param path: request path.
        :return: True if the fault applies.
        """
        if self.spec.method and self.spec.method.upper() != method.upper():
            return False
        return path.startswith(self.spec.path_prefix)

    def to_json(self) -> dict[str, Any]:
        """Describe the fault.

        :return: JSON-ready dict.
        """
        data = self.spec.model_dump(mode="json", exclude_defaults=True)
        data.update(id=self.fault_id, kind=self.spec.kind, remaining=self.remaining)
        if self.spec.kind == "barrier":
            data["arrived"] = self.arrived
        return data


# ---- playing a fault --------------------------------------------------------------------------

_HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n"
    b"<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>\n"
)
_MALFORMED_JSON = b'{"task_id": "pwt-000000000000", "status": {"status": "runn'


async def play_fault(
    fault: Fault, scope: Scope, receive: Receive, send: Send, serve: Serve, closing: threading.Event
) -> None:
    """Answer a request hit by a fault.

    :param fault: the fault (``barrier`` reads how many requests it has taken).
    :param scope: ASGI scope.
    :param receive: ASGI receive.
    :param send: ASGI send.
    :param serve: answers the request normally (``latency``, ``trickle`` and ``barrier`` use it).
    :param closing: set while the server shuts down; slow faults stop early.
    """
    spec = fault.spec
    if spec.kind == "barrier":
        await _barrier(fault, closing)
        await serve(scope, receive, send)
    elif spec.kind == "latency":
        await pause(spec.seconds, closing)
        await serve(scope, receive, send)
    elif spec.kind == "trickle":
        await _trickle(spec.interval, scope, receive, send, serve, closing)
    else:
        await _respond(spec, send, closing)


async def pause(seconds: float, closing: threading.Event, interrupt: asyncio.Event | None = None) -> None:
    """Sleep, returning early when the server shuts down or ``interrupt`` is set.

    :param seconds: how long.
    :param closing: set while the server shuts down.
    :param interrupt: an extra event that ends the sleep (e.g. the client went away).
    """
    deadline = time.monotonic() + seconds
    while not closing.is_set() and not (interrupt is not None and interrupt.is_set()):
        left = deadline - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(left, 0.05))


async def _barrier(fault: Fault, closing: threading.Event) -> None:
    """Hold a request until the barrier's ``count`` requests have all arrived (or ``seconds`` passed, if > 0)."""
    parties = fault.spec.count or 0
    deadline = time.monotonic() + fault.spec.seconds if fault.spec.seconds > 0 else math.inf
    while fault.arrived < parties and not closing.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


def response_headers(
    content_type: str, length: int | None, extra: dict[str, str] | None = None
) -> list[tuple[bytes, bytes]]:
    """ASGI response headers.

    :param content_type: the ``Content-Type``.
    :param length: the ``Content-Length``, or None to send none.
    :param extra: more headers.
    :return: the raw header list.
    """
    headers = [(b"content-type", content_type.encode("latin-1"))]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    for key, value in (extra or {}).items():
        headers.append((key.lower().encode("latin-1"), value.encode("latin-1")))
    return headers


def _body_bytes(value: Any) -> tuple[bytes, str]:
    """Encode a fault body: a str is sent as text, anything else as JSON."""
    if isinstance(value, str):
        return value.encode("utf-8"), "text/plain; charset=utf-8"
    return json.dumps(value).encode("utf-8"), "application/json"


async def _respond(spec: FaultSpec, send: Send, closing: threading.Event) -> None:
    kind = spec.kind
    headers = dict(spec.headers)
    if kind == "drop":
        await _drop(spec, send)
        return
    if kind == "huge_body":
        await _huge(spec, send, closing)
        return
    content_type = spec.content_type
    status = spec.status
    if kind == "status":
        status = status or 500
        if "body" in spec.model_fields_set:
            data, guessed = _body_bytes(spec.body)
        else:
            data, guessed = _body_bytes(error_body(status, status_reason(status), f"injected fault: HTTP {status}"))
    elif kind == "rate_limit":
        status = status or 429
        data, guessed = _body_bytes(error_body(status, "RATE_LIMIT_EXCEEDED", "rate limit exceeded, retry later"))
        if spec.retry_after is not None:
            headers.setdefault("Retry-After", _retry_after(spec))
    elif kind == "malformed_json":
        status, data, guessed = status or 200, _MALFORMED_JSON, "application/json"
    elif kind == "html":
        status, data, guessed = status or 200, _HTML_PAGE, "text/html; charset=utf-8"
    elif kind == "empty_body":
        status, data, guessed = status or 200, b"", "application/json"
    elif kind == "json_array":
        value = spec.body if "body" in spec.model_fields_set else []
        status, data, guessed = status or 200, json.dumps(value).encode(), "application/json"
    else:  # "body": a str is sent verbatim, anything else as JSON
        status, guessed = status or 200, "application/json"
        if isinstance(spec.body, str):
            data = spec.body.encode("utf-8")
        elif "body" in spec.model_fields_set:
            data = json.dumps(spec.body).encode("utf-8")
        else:
            data = b""
    no_body = status in (204, 304)
    if no_body:
        data = b""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": response_headers(content_type or guessed, None if no_body else len(data), headers),
        }
    )
    await send({"type": "http.response.body", "body": data})


def _retry_after(spec: FaultSpec) -> str:
    value = spec.retry_after
    if isinstance(value, str):
        return value
    assert value is not None
    if spec.retry_after_format == "http-date":
        return formatdate(time.time() + value, usegmt=True)
    return str(math.ceil(value))


def _current_transport() -> asyncio.BaseTransport | None:
    """Find the socket transport of the current uvicorn request, if any.

    ASGI has no way to drop a connection, so this looks at the uvicorn task running the request
    (``RequestResponseCycle.run_asgi``, which holds ``self.transport``). Returns None elsewhere
    (e.g. under an in-process test client).
    """
    task = asyncio.current_task()
    frame = getattr(task.get_coro(), "cr_frame", None) if task is not None else None
    owner = frame.f_locals.get("self") if frame is not None else None
    transport = getattr(owner, "transport", None)
    return transport if isinstance(transport, asyncio.BaseTransport) else None


async def _close_transport(transport: asyncio.BaseTransport) -> None:
    transport.close()
    for _ in range(3):  # let uvicorn see connection_lost before the app returns
        await asyncio.sleep(0)


async def _drop(spec: FaultSpec, send: Send) -> None:
    transport = _current_transport()
    if spec.when == "mid_body":
        payload = json.dumps({"task_id": "pwt-000000000000", "padding": "x" * 1024}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": spec.status or 200,
                "headers": response_headers("application/json", len(payload)),
            }
        )
        await send({"type": "http.response.body", "body": payload[: len(payload) // 2], "more_body": True})
    if transport is None:
        raise ConnectionAbortedError("drop fault: no socket transport to close (not running under uvicorn)")
    await _close_transport(transport)


async def _huge(spec: FaultSpec, send: Send, closing: threading.Event) -> None:
    total = max(int(spec.megabytes * MIB), 16)
    head, tail = b'{"padding":"', b'"}'
    pad = total - len(head) - len(tail)
    await send(
        {
            "type": "http.response.start",
            "status": spec.status or 200,
            "headers": response_headers(spec.content_type or "application/json", total, spec.headers),
        }
    )
    await send({"type": "http.response.body", "body": head, "more_body": True})
    chunk = b"x" * (256 * 1024)
    while pad > 0:
        if closing.is_set():
            return  # shutting down: leave the response incomplete, uvicorn closes the connection
        piece = chunk[: min(pad, len(chunk))]
        pad -= len(piece)
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": tail})


async def _trickle(
    interval: float, scope: Scope, receive: Receive, send: Send, serve: Serve, closing: threading.Event
) -> None:
    messages: list[Message] = []

    async def capture(message: Message) -> None:
        messages.append(message)

    await serve(scope, receive, capture)
    start = next(m for m in messages if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    disconnected = asyncio.Event()

    async def watch() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected.set()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await send(start)
        for i in range(len(data)):
            if closing.is_set() or disconnected.is_set():
                return
            await send({"type": "http.response.body", "body": data[i : i + 1], "more_body": True})
            await pause(interval, closing, disconnected)
        await send({"type": "http.response.body", "body": b""})
    finally:
        watcher.cancel()
