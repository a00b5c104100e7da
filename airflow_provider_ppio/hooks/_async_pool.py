"""
Async HTTP clients shared by every trigger in one triggerer process.

One client (one bounded set of connections) per event loop, base URL and API key,
leased by reference count: a trigger holds a lease for its whole wait, so its polls reuse
keep-alive connections, and the client closes when its last user lets go.

Each client spreads requests over up to ``max_connections`` single-connection "lanes", and requests
beyond that wait in a FIFO queue in front of them. httpcore's own pool is not used for this: it
re-checks every connection (a system call each) and every queued request whenever a request starts
or ends, so its cost per request grows with the pool and the queue (1,000 polls queued on a
50-connection pool took 44 s to drain; 3,000 never did). A lane's pool holds one connection, so
that bookkeeping costs the same however many waits share the client.

Nor is ``httpx.AsyncClient``: its layers (URL merging, cookie jar, auth flow, redirect loop, event
hooks, a log record per request) are a third of a poll's CPU and do nothing here (bearer auth, no
cookies, redirects refused, timeouts per request). :class:`SharedClient` builds each
``httpx.Request`` and hands it to the lanes, whose transports are httpx's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from airflow_provider_ppio.hooks._protocol import ClientSettings

if TYPE_CHECKING:
    import ssl

    import httpx

#: Most connections one shared client opens to the API; requests beyond it queue for a free one.
DEFAULT_MAX_CONNECTIONS = 50


class SharedClient:
    """
    What a lease hands out: sends requests straight to the lanes, with the client's timeouts.

    :param transport: The laned transport.
    :param timeout: Connect, read, write and pool timeouts of every request.
    """

    def __init__(self, transport: httpx.AsyncBaseTransport, timeout: httpx.Timeout) -> None:
        self._transport = transport
        self._extensions = {"timeout": timeout.as_dict()}
        self.timeout = timeout
        self.is_closed = False

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """
        Send one request and yield its response with the body unread; the body is closed on exit.

        :param method: HTTP method.
        :param url: Absolute URL.
        :param params: Query parameters.
        :param json: JSON body, if any.
        :param headers: Request headers.
        """
        import httpx

        if self.is_closed:
            raise RuntimeError("the shared client was closed; lease it again")
        request = httpx.Request(method, url, params=params, json=json, headers=headers, extensions=self._extensions)
        response = await self._transport.handle_async_request(request)
        response.request = request
        try:
            yield response
        finally:
            await response.aclose()

    async def get(self, url: str, *, headers: Mapping[str, str] | None = None) -> httpx.Response:
        """
        GET ``url`` and read the whole body (for tests and simple callers).

        :param url: Absolute URL.
        :param headers: Request headers.
        """
        async with self.stream("GET", url, headers=headers) as response:
            await response.aread()
        return response

    async def aclose(self) -> None:
        """Close every lane's connection."""
        if not self.is_closed:
            self.is_closed = True
            await self._transport.aclose()


@dataclass
class _Entry:
    client: SharedClient
    turns: asyncio.Semaphore
    users: int = 0


class AsyncClientPool:
    """
    Reference-counted :class:`SharedClient` objects, one per (event loop, base URL, API key).

    Each client has at most ``max_connections`` requests in flight (so it never opens more
    connections); the others wait their turn in arrival order.

    :param max_connections: Bound on open connections (and requests in flight) of each client.
    """

    def __init__(self, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Entry]] = (
            weakref.WeakKeyDictionary()
        )

    @staticmethod
    def _key(settings: ClientSettings) -> str:
        return _client_key(settings.base_url, settings.api_key)

    @contextlib.asynccontextmanager
    async def lease(self, settings: ClientSettings) -> AsyncIterator[SharedClient]:
        """
        Use the shared client for ``settings`` on the running loop, creating it if needed.

        :param settings: Base URL, key and timeouts of the client.
        """
        async with self._entry(settings) as entry:
            yield entry.client

    @contextlib.asynccontextmanager
    async def turn(self, settings: ClientSettings) -> AsyncIterator[None]:
        """
        Wait (in arrival order) for one of the ``max_connections`` turns at the shared client.

        For callers that are many, like thousands of triggers polling in one loop: waiting here
        holds nothing, while a call queued inside the client already holds its request, its retry
        state and its timeout. Take a turn around a whole call (retries included).

        :param settings: Base URL, key and timeouts of the client.
        """
        async with self._entry(settings) as entry, entry.turns:
            yield

    @contextlib.asynccontextmanager
    async def _entry(self, settings: ClientSettings) -> AsyncIterator[_Entry]:
        loop = asyncio.get_running_loop()
        key = self._key(settings)
        with self._lock:
            clients = self._by_loop.setdefault(loop, {})
            entry = clients.get(key)
            if entry is None:
                entry = clients[key] = _Entry(self._new_client(settings), asyncio.Semaphore(self.max_connections))
            entry.users += 1
        try:
            yield entry
        finally:
            with self._lock:
                entry.users -= 1
                last = entry.users == 0 and clients.get(key) is entry
                if last:
                    del clients[key]
            if last:
                await entry.client.aclose()

    def _new_client(self, settings: ClientSettings) -> SharedClient:
        import httpx

        one_connection = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        # The environment is read here, once per client: the proxy (HTTPS_PROXY, NO_PROXY...) and the
        # CA bundle (SSL_CERT_FILE...). ~/.netrc is never consulted: it would replace the API key.
        proxy = _environment_proxy(settings.base_url)
        tls = _tls_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))

        def new_lane() -> httpx.AsyncBaseTransport:
            return httpx.AsyncHTTPTransport(verify=tls, limits=one_connection, proxy=proxy, trust_env=False)

        return SharedClient(
            _laned_transport_class()(new_lane, self.max_connections),
            httpx.Timeout(settings.timeout, connect=settings.connect_timeout),
        )

    def open_clients(self) -> int:
        """How many shared clients are open, across loops (for tests and benchmarks)."""
        with self._lock:
            return sum(len(clients) for clients in self._by_loop.values())


@functools.lru_cache(maxsize=8)
def _tls_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    """
    The TLS context of every client and lane, built once per CA setting: loading the CA bundle costs ~35 ms of
    CPU, which a hook used outside a trigger (a new client per call) would otherwise pay on every call.

    :param cert_file: ``SSL_CERT_FILE`` (httpx reads it), part of the cache key only.
    :param cert_dir: ``SSL_CERT_DIR``, likewise.
    """
    import httpx

    return httpx.create_ssl_context()


@functools.lru_cache(maxsize=64)
def _client_key(base_url: str, api_key: str) -> str:
    """The pool's key for a client: the base URL and a fingerprint of the key (hashed once, not per request)."""
    return f"{base_url}#{hashlib.sha256(api_key.encode()).hexdigest()[:16]}"


def _environment_proxy(base_url: str) -> str | None:
    """The proxy the environment (``HTTPS_PROXY``, ``NO_PROXY``...) asks for ``base_url``, as requests reads it."""
    import urllib.request
    from urllib.parse import urlsplit

    proxies = urllib.request.getproxies()
    parts = urlsplit(base_url)
    if not proxies or urllib.request.proxy_bypass(parts.netloc):
        return None
    return proxies.get(parts.scheme) or proxies.get("all")


@functools.cache
def _laned_transport_class() -> Callable[[Callable[[], httpx.AsyncBaseTransport], int], httpx.AsyncBaseTransport]:
    """Build the transport class on first use, so importing this module does not import httpx."""
    import httpx

    class ReleasingStream(httpx.AsyncByteStream):
        """A response body that hands its lane back when closed."""

        def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
            self._stream = stream
            self._release: Callable[[], None] | None = release

        async def __aiter__(self) -> AsyncIterator[bytes]:
            async for chunk in self._stream:
                yield chunk

        async def aclose(self) -> None:
            try:
                await self._stream.aclose()
            finally:
                release, self._release = self._release, None
                if release is not None:
                    release()

    class LanedTransport(httpx.AsyncBaseTransport):
        """
        Up to ``lanes`` single-connection transports; each request takes a free lane or waits (FIFO).

        The most recently freed lane is reused first, so its connection is still warm and idle
        lanes' connections expire; a request holds its lane until its body is closed.

        :param new_lane: Makes a transport with one connection.
        :param lanes: Most lanes, hence most open connections and requests in flight.
        """

        def __init__(self, new_lane: Callable[[], httpx.AsyncBaseTransport], lanes: int) -> None:
            self._new_lane = new_lane
            self._slots = asyncio.Semaphore(lanes)
            self._idle: list[httpx.AsyncBaseTransport] = []
            self._lanes: list[httpx.AsyncBaseTransport] = []

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            await self._slots.acquire()
            if self._idle:
                lane = self._idle.pop()
            else:  # fewer lanes than slots exist: open one more
                lane = self._new_lane()
                self._lanes.append(lane)

            def release() -> None:
                self._idle.append(lane)
                self._slots.release()

            try:
                response = await lane.handle_async_request(request)
            except BaseException:
                release()
                raise
            response.stream = ReleasingStream(cast("httpx.AsyncByteStream", response.stream), release)
            return response

        async def aclose(self) -> None:
            lanes, self._lanes, self._idle = self._lanes, [], []
            for lane in lanes:
                await lane.aclose()

    return LanedTransport


#: The process-wide pool every :class:`~airflow_provider_ppio.hooks.ppio.PPIOHook` uses.
SHARED_ASYNC_CLIENTS = AsyncClientPool()
