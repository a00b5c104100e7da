"""
Async HTTP clients shared by every trigger in one triggerer process.

One ``httpx.AsyncClient`` (one connection pool, bounded) per event loop, base URL and API key,
leased by reference count: a trigger holds a lease for its whole wait, so its polls reuse
keep-alive connections, and the client closes when its last user lets go.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from airflow_provider_ppio.hooks._protocol import ClientSettings

if TYPE_CHECKING:
    import httpx

#: Most connections one shared client opens to the API; waits beyond it queue for a free one.
DEFAULT_MAX_CONNECTIONS = 50


@dataclass
class _Entry:
    client: httpx.AsyncClient
    users: int = 0


class AsyncClientPool:
    """
    Reference-counted ``httpx.AsyncClient`` objects, one per (event loop, base URL, API key).

    :param max_connections: Bound on open connections of each client.
    """

    def __init__(self, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Entry]] = (
            weakref.WeakKeyDictionary()
        )

    @staticmethod
    def _key(settings: ClientSettings) -> str:
        fingerprint = hashlib.sha256(settings.api_key.encode()).hexdigest()[:16]
        return f"{settings.base_url}#{fingerprint}"

    @contextlib.asynccontextmanager
    async def lease(self, settings: ClientSettings) -> AsyncIterator[httpx.AsyncClient]:
        """
        Use the shared client for ``settings`` on the running loop, creating it if needed.

        :param settings: Base URL, key and timeouts of the client.
        """
        loop = asyncio.get_running_loop()
        key = self._key(settings)
        with self._lock:
            clients = self._by_loop.setdefault(loop, {})
            entry = clients.get(key)
            if entry is None:
                entry = clients[key] = _Entry(self._new_client(settings))
            entry.users += 1
        try:
            yield entry.client
        finally:
            with self._lock:
                entry.users -= 1
                last = entry.users == 0 and clients.get(key) is entry
                if last:
                    del clients[key]
            if last:
                await entry.client.aclose()

    def _new_client(self, settings: ClientSettings) -> httpx.AsyncClient:
        import httpx

        return httpx.AsyncClient(
            timeout=httpx.Timeout(settings.timeout, connect=settings.connect_timeout),
            limits=httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections),
            follow_redirects=False,
        )

    def open_clients(self) -> int:
        """How many shared clients are open, across loops (for tests and benchmarks)."""
        with self._lock:
            return sum(len(clients) for clients in self._by_loop.values())


#: The process-wide pool every :class:`~airflow_provider_ppio.hooks.ppio.PPIOHook` uses.
SHARED_ASYNC_CLIENTS = AsyncClientPool()
