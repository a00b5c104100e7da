"""
A total deadline for one sync request, headers to the end of the body: ``requests`` only bounds each read, so a
server trickling one byte a second would never time out. A watchdog thread shuts the socket down at the deadline.
"""

from __future__ import annotations

import contextlib
import contextvars
import heapq
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import PoolManager, ProxyManager


class Deadline:
    """The ``time.monotonic()`` value ``at`` which one attempt must have its whole answer."""

    def __init__(self, at: float) -> None:
        self.at = at
        self.fired = False
        self.keys: list[int] = []


_CURRENT: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar("ppio_deadline", default=None)


@contextlib.contextmanager
def deadline(at: float) -> Iterator[Deadline]:
    """Apply a deadline (``time.monotonic()`` value ``at``) to the requests made inside the block."""
    current = Deadline(at)
    token = _CURRENT.set(current)
    try:
        yield current
    finally:
        _CURRENT.reset(token)
        for key in current.keys:
            _WATCHDOG.disarm(key)


def _cut(current: Deadline, sock: socket.socket) -> None:
    current.fired = True
    with contextlib.suppress(OSError):
        # The plain socket's shutdown, also for TLS sockets: it wakes the reader without touching SSL state.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Watchdog:
    """One daemon thread that cuts sockets whose deadlines pass (under the lock: one disarmed in time is never cut)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._armed: dict[int, tuple[Deadline, socket.socket]] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, current: Deadline, sock: socket.socket) -> int:
        """Cut ``sock`` at ``current.at`` unless disarmed first; returns the key for :meth:`disarm`."""
        with self._lock:
            key = next(self._ids)
            self._armed[key] = (current, sock)
            heapq.heappush(self._heap, (current.at, key))
            if len(self._heap) > 2 * len(self._armed) + 64:  # drop disarmed entries now and then
                self._heap = [entry for entry in self._heap if entry[1] in self._armed]
                heapq.heapify(self._heap)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="ppio-deadline-watchdog", daemon=True)
                self._thread.start()
            elif self._heap[0][1] == key:  # earlier than anything the thread waits for
                self._lock.notify()
            return key

    def disarm(self, key: int) -> None:
        """Forget a deadline (the answer was read, or the request failed)."""
        with self._lock:
            self._armed.pop(key, None)

    def _run(self) -> None:
        with self._lock:
            while True:
                while self._heap and self._heap[0][1] not in self._armed:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._lock.wait()
                    continue
                at, key = self._heap[0]
                remaining = at - time.monotonic()
                if remaining > 0:
                    self._lock.wait(remaining)
                    continue
                heapq.heappop(self._heap)
                _cut(*self._armed.pop(key))


class _NoServerHeaders(logging.Filter):
    """urllib3 logs header text it could not parse (maybe the echoed key): for our requests, keep only the URL."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _CURRENT.get() is not None and str(record.msg).startswith("Failed to parse headers"):
            url = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "Failed to parse headers (url=%s): the server sent malformed headers (not quoted)"
            record.args = (url,)
            record.exc_info = record.exc_text = None
        return True


# urllib3 2 logs it from ``urllib3.connection``, 1.26 from ``urllib3.connectionpool``.
for _name in ("urllib3.connection", "urllib3.connectionpool"):
    logging.getLogger(_name).addFilter(_NoServerHeaders())

_WATCHDOG = _Watchdog()
# A forked child (task runners are forked) has no watchdog thread and maybe a lock held by it: start afresh.
os.register_at_fork(after_in_child=_WATCHDOG.reset)


class _DeadlineMixin:
    sock: socket.socket | None

    def getresponse(self) -> Any:
        current = _CURRENT.get()
        sock = self.sock
        if current is None or sock is None:
            return super().getresponse()  # type: ignore[misc]
        # Armed until the deadline's block ends, so the body is read under it too.
        current.keys.append(_WATCHDOG.arm(current, sock))
        return super().getresponse()  # type: ignore[misc]


class _HTTPConnection(_DeadlineMixin, HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineMixin, HTTPSConnection):
    pass


class _HTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOL_CLASSES: dict[str, type[HTTPConnectionPool]] = {"http": _HTTPConnectionPool, "https": _HTTPSConnectionPool}


class DeadlineAdapter(HTTPAdapter):
    """An ``HTTPAdapter`` whose connections honour :func:`deadline` from the headers to the end of the body."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOL_CLASSES

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> PoolManager:
        """The same for connections through an HTTP(S) proxy (SOCKS proxies keep their own pools)."""
        manager: PoolManager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if type(manager) is ProxyManager:
            manager.pool_classes_by_scheme = _POOL_CLASSES
        return manager
