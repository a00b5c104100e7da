"""
A scriptable HTTP server on 127.0.0.1 for the transport tests (sync and async alike).

It runs ``aiohttp.web`` on its own event loop in a background thread, so a blocking ``requests`` call and
an async test's own loop can both talk to it, and it is one server per test: every connection it sees was
opened by that test. It records every request (method, raw path, headers, the client's port) and answers
with a *behaviour*: an ``async (request) -> response`` function. The behaviours below cover what the
emulator cannot do: a connection reset, a body that is not its ``Content-Encoding``, headers or a body
trickled forever, an answer that never comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

Behaviour = Callable[[web.Request], Awaitable[web.StreamResponse]]
TASKS = "/gpus/v2/prewarm-tasks"


@dataclass(frozen=True)
class Seen:
    """One request as the server received it."""

    method: str
    raw_path: str
    headers: dict[str, str]
    client_port: int
    #: Unix time the request arrived.
    at: float

    @property
    def path(self) -> str:
        """The raw path without its query."""
        return self.raw_path.split("?", 1)[0]

    @property
    def bearer(self) -> str:
        """The key in the ``Authorization`` header ("" if none)."""
        return self.headers.get("Authorization", "").removeprefix("Bearer ")


class ApiServer:
    """
    An HTTP server on a free 127.0.0.1 port; ``reply``/``behave`` say how it answers.

    :param behaviour: How to answer each request (default: HTTP 500).
    """

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour: Behaviour = behaviour or reply_json(500, {"message": "not scripted"})
        self.seen: list[Seen] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._stopping: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="api-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the test API server did not start")

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        with self._lock:
            self.seen.append(
                Seen(request.method, request.raw_path, dict(request.headers), peer[1] if peer else 0, time.time())
            )
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await self.behaviour(request)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def stopped(self, seconds: float = 3600) -> None:
        """Sleep until the server stops (or ``seconds`` pass): what a hanging behaviour awaits."""
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopping is not None and self._stopping.is_set()

    def reply(self, *behaviours: Behaviour) -> None:
        """Answer with these in order, repeating the last one."""
        queue = list(behaviours)

        async def next_answer(request: web.Request) -> web.StreamResponse:
            with self._lock:
                behaviour = queue.pop(0) if len(queue) > 1 else queue[0]
            return await behaviour(request)

        self.behaviour = next_answer

    def requests_to(self, path: str) -> list[Seen]:
        """The requests for one path, oldest first."""
        with self._lock:
            return [seen for seen in self.seen if seen.path == path]

    def open_connections(self) -> int:
        """Connections the server has open right now."""

        async def count() -> int:
            assert self._runner is not None and self._runner.server is not None
            return len(self._runner.server.connections)

        return asyncio.run_coroutine_threadsafe(count(), self._loop).result(5)

    def stop(self) -> None:
        """Stop serving; hanging and trickling behaviours end."""

        async def shutdown() -> None:
            assert self._stopping is not None and self._runner is not None
            self._stopping.set()
            await self._runner.cleanup()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@contextlib.contextmanager
def api_server(behaviour: Behaviour | None = None) -> Iterator[ApiServer]:
    """An :class:`ApiServer`, stopped at the end."""
    server = ApiServer(behaviour)
    try:
        yield server
    finally:
        server.stop()


# -- behaviours ---------------------------------------------------------------------------------------------


def reply_json(status: int, body: Any, headers: dict[str, str] | None = None) -> Behaviour:
    """A complete answer with a JSON body."""
    return reply_bytes(status, json.dumps(body).encode(), headers)


def reply_bytes(status: int, body: bytes, headers: dict[str, str] | None = None) -> Behaviour:
    """A complete answer with these exact bytes as its body (nothing is encoded for you)."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, headers={"Content-Type": "application/json", **(headers or {})})

    return behaviour


def reply_gzip(body: Any) -> Behaviour:
    """A 200 whose JSON body is gzip-compressed, as ``Content-Encoding: gzip`` says."""
    return reply_bytes(200, gzip.compress(json.dumps(body).encode()), {"Content-Encoding": "gzip"})


def reply_after(seconds: float, behaviour: Behaviour) -> Behaviour:
    """``behaviour``, after a pause."""

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return await behaviour(request)

    return slow


def hang(server: ApiServer) -> Behaviour:
    """Read the request and never answer (until the server stops)."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        await server.stopped()
        return web.Response(status=503)

    return behaviour


async def reset(request: web.Request) -> web.StreamResponse:
    """Cut the connection with a TCP reset instead of answering."""
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    raise asyncio.CancelledError  # nothing more to send on this connection


async def cut_body(request: web.Request) -> web.StreamResponse:
    """Promise 2000 bytes of body, send 100 of them, then reset the connection."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json", "Content-Length": "2000"})
    await response.prepare(request)
    await response.write(b'{"task_id": "' + b"x" * 86 + b'", ')
    await asyncio.sleep(0.05)
    await reset(request)
    return response  # pragma: no cover - reset raises


def huge_body(size: int) -> Behaviour:
    """A 200 whose body (spaces, chunked) is ``size`` bytes long."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        chunk = b" " * 65536
        sent = 0
        with contextlib.suppress(ConnectionError):
            while sent < size:
                await response.write(chunk)
                sent += len(chunk)
            await response.write_eof()
        return response

    return behaviour


def trickle(server: ApiServer, *, headers_too: bool) -> Behaviour:
    """
    Send a status line and then one byte every 20 ms forever: inside the headers (``headers_too``) or, after
    complete headers, inside a chunked body.
    """

    async def behaviour(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None
        if headers_too:
            transport.write(b"HTTP/1.1 200 OK\r\nX-Trickle: ")
            piece = b"a"
        else:
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            transport.write(b"1\r\n{\r\n")
            piece = b"1\r\n \r\n"
        deadline = time.monotonic() + 60
        while not server.stopping and not transport.is_closing() and time.monotonic() < deadline:
            transport.write(piece)
            await asyncio.sleep(0.02)
        transport.abort()
        raise asyncio.CancelledError

    return behaviour


def warnings_in(records: list[logging.LogRecord], console: str) -> list[str]:
    """
    The messages logged at WARNING level: stdlib records (Airflow 2), and the console lines structlog
    renders as ``[warning  ] ...`` (Airflow 3 writes the task and trigger loggers only there).

    :param records: ``caplog.records``.
    :param console: What was written to stdout and stderr.
    """
    lines = [record.getMessage() for record in records if record.levelno == logging.WARNING]
    return lines + [line for line in console.splitlines() if re.search(r"\[warning\s*\]", line)]


def task_body(task_id: str = "pw-1", status: str = "running", **fields: Any) -> dict[str, Any]:
    """A prewarm task as the API renders it (the fields the provider reads)."""
    body: dict[str, Any] = {
        "task_id": task_id,
        "image": "registry.example.com/team/llama:1.0",
        "region_id": "us-east-1",
        "product_ids": [],
        "created_at": 1767225600,
        "status": {"status": status, "error": "", "message": ""},
        "reason": [],
    }
    body.update(fields)
    return body


class RotatingKeyAPI:
    """
    A prewarm API that accepts one key at a time (``accepted``) and serves tasks whose status the test sets.

    :param server: Where it answers.
    :param accepted: The key it accepts at first.
    """

    def __init__(self, server: ApiServer, accepted: str) -> None:
        self.server = server
        self.accepted = accepted
        self.status: dict[str, str] = {}
        #: ``(key sent, HTTP status answered)`` for each request, oldest first.
        self.log: list[tuple[str, int]] = []
        #: Run (on the server's thread) before each request is answered: how a test acts mid-wait
        #: while its own thread is blocked in a sensor's ``execute``.
        self.before_each: Callable[[RotatingKeyAPI], None] = lambda api: None
        server.behaviour = self._answer

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.before_each(self)
        key = request.headers.get("Authorization", "").removeprefix("Bearer ")
        task_id = request.path.rsplit("/", 1)[-1]
        if key != self.accepted:
            status, body = 401, {"message": "invalid API key"}
        elif not request.path.startswith(TASKS + "/") or task_id not in self.status:
            status, body = 404, {"message": "no such task"}
        else:
            status, body = 200, task_body(task_id, self.status[task_id])
        self.log.append((key, status))
        return web.json_response(body, status=status)

    def rotate(self, new_key: str) -> None:
        """From now on only ``new_key`` is accepted."""
        self.accepted = new_key
