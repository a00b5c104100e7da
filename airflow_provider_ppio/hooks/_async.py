"""
The async transport: ``aiohttp``, one shared session per event loop and TLS/proxy setting (its connector bounds
the open connections of all triggers), and connection lookups shared by the hooks of one loop.
"""

from __future__ import annotations

import asyncio
import functools
import math
import ssl
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.http_exceptions import ContentEncodingError
from airflow.providers.common.compat.connection import get_async_connection, get_async_extra_dejson
from airflow.providers.common.compat.sdk import BaseHook, mask_secret

from airflow_provider_ppio.exceptions import PPIOError
from airflow_provider_ppio.hooks._shared import (
    MAX_BODY_BYTES,
    Answer,
    ClientSettings,
    ConnectionFields,
    TLSSettings,
    decode_answer,
    request_headers,
    timeout_error,
    too_large,
    transport_error,
    undecodable,
)

#: Most connections one shared session opens; more requests in flight wait in its queue.
MAX_CONNECTIONS = 50


async def send(
    session: aiohttp.ClientSession,
    settings: ClientSettings,
    method: str,
    path: str,
    *,
    params: Mapping[str, Any] | None,
    json: Any,
    allow_empty: bool,
    max_bytes: int = MAX_BODY_BYTES,
) -> Any:
    """
    One attempt on a session leased from :data:`SHARED_SESSIONS`, bounded as a whole by :func:`_timeouts`.

    :param max_bytes: The most body bytes read (decoded); a longer answer is a bad response.
    """
    outcome = await _exchange(session, settings, method, path, params=params, json=json, max_bytes=max_bytes)
    if isinstance(outcome, PPIOError):
        raise outcome  # raised here, outside any handler: the library's exception does not ride along
    decoded = decode_answer(outcome, method=method, path=path, secret=settings.secret, allow_empty=allow_empty)
    if isinstance(decoded, PPIOError):
        raise decoded
    return decoded


async def _exchange(
    session: aiohttp.ClientSession,
    settings: ClientSettings,
    method: str,
    path: str,
    *,
    params: Mapping[str, Any] | None,
    json: Any,
    max_bytes: int,
) -> Answer | PPIOError:
    """Send and read the whole answer; a failure is returned so the raised error carries no library exception."""
    where = f"{method} {path}"
    headers: Mapping[str, str] = {}
    try:
        # The request headers are built inside the call: no frame of this module holds the Authorization header.
        async with session.request(
            method,
            settings.base_url + path,
            params=params,
            json=json,
            headers=request_headers(settings, json_body=json is not None),
            allow_redirects=False,
            proxy=settings.proxy,
            timeout=_timeouts(settings.timeout, settings.connect_timeout),
        ) as response:
            headers = response.headers
            body = bytearray()
            async for chunk in response.content.iter_chunked(65536):
                body += chunk
                if len(body) > max_bytes:
                    return too_large(where, max_bytes)
            return Answer(response.status, headers, bytes(body))
    except aiohttp.ConnectionTimeoutError as err:  # connecting, or queueing for a connection: never sent
        return _transport_error(where, settings, err)
    except TimeoutError:
        return timeout_error(where, settings)
    except aiohttp.ClientPayloadError as err:
        if isinstance(err.__cause__, ContentEncodingError):  # not what its Content-Encoding says: not a network fault
            return undecodable(where, headers, err, settings.secret)
        return _transport_error(where, settings, err)
    except (aiohttp.ClientError, OSError, ValueError) as err:  # ValueError: aiohttp's parser on some bad answers
        return _transport_error(where, settings, err)


@functools.lru_cache(maxsize=16)
def _timeouts(timeout: float, connect_timeout: float) -> aiohttp.ClientTimeout:
    """
    ``total`` bounds the whole attempt, never rounded up; ``connect`` (queueing included) half of it, so that a
    request that queued too long fails as never sent instead of being sent only to be cut.
    """
    # aiohttp rounds deadlines from ``ceil_threshold`` up to whole seconds; an infinite one keeps them exact.
    return aiohttp.ClientTimeout(
        total=timeout, connect=timeout / 2, sock_connect=connect_timeout, ceil_threshold=math.inf
    )


def _transport_error(where: str, settings: ClientSettings, err: BaseException) -> PPIOError:
    never_connected = isinstance(err, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))
    return transport_error(err, where=where, settings=settings, sent=not never_connected)


@functools.lru_cache(maxsize=16)
def _ssl_context(tls: TLSSettings) -> ssl.SSLContext | bool:
    """The TLS context for a CA setting, built once (loading a CA bundle is costly)."""
    if not tls.verify:
        return False
    return ssl.create_default_context(cafile=tls.ca_file, capath=tls.ca_dir)


@dataclass
class _Entry:
    session: aiohttp.ClientSession
    users: int = 0


class SharedSessions:
    """Reference-counted ``aiohttp.ClientSession`` objects, one per (event loop, TLS setting, proxy)."""

    def __init__(self, max_connections: int = MAX_CONNECTIONS) -> None:
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, _Entry]] = (
            weakref.WeakKeyDictionary()
        )

    def lease(self, settings: ClientSettings) -> _Lease:
        """
        Use the shared session for ``settings`` on the running loop, creating it if needed
        (``async with SHARED_SESSIONS.lease(settings) as session``).

        :param settings: Its TLS setting and proxy choose the session (the key travels per request).
        """
        return _Lease(self, (settings.tls, settings.proxy), settings)

    def _acquire(self, key: Any, settings: ClientSettings) -> _Entry:
        loop = asyncio.get_running_loop()
        with self._lock:
            sessions = self._by_loop.get(loop)
            if sessions is None:
                sessions = self._by_loop[loop] = {}
            entry = sessions.get(key)
            if entry is None or entry.session.closed:
                entry = sessions[key] = _Entry(self._new_session(settings))
            entry.users += 1
        return entry

    async def _release(self, key: Any, entry: _Entry) -> None:
        with self._lock:
            entry.users -= 1
            sessions = self._by_loop.get(asyncio.get_running_loop(), {})
            last = entry.users == 0 and sessions.get(key) is entry
            if last:
                del sessions[key]
        if last:
            await entry.session.close()

    def _new_session(self, settings: ClientSettings) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self.max_connections, ssl=_ssl_context(settings.tls))
        return aiohttp.ClientSession(
            connector=connector,
            # Cookies and the environment (proxy variables, ~/.netrc) are not used: settings decide.
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    def open_sessions(self) -> int:
        """How many shared sessions are open, across loops (for tests and benchmarks)."""
        with self._lock:
            return sum(len(sessions) for sessions in self._by_loop.values())


class _Lease:
    """One use of a shared session; a plain class, as every API call takes one (cheaper than a generator)."""

    __slots__ = ("_entry", "_key", "_pool", "_settings")

    def __init__(self, pool: SharedSessions, key: Any, settings: ClientSettings) -> None:
        self._pool, self._key, self._settings = pool, key, settings
        self._entry: _Entry | None = None

    async def __aenter__(self) -> aiohttp.ClientSession:
        self._entry = self._pool._acquire(self._key, self._settings)
        return self._entry.session

    async def __aexit__(self, *exc_info: object) -> None:
        if self._entry is not None:
            entry, self._entry = self._entry, None
            await self._pool._release(self._key, entry)


#: The process-wide sessions every :class:`~airflow_provider_ppio.hooks.ppio.PPIOHook` uses.
SHARED_SESSIONS = SharedSessions()


class SharedConnectionLookups:
    """
    Concurrent async lookups of one connection on one event loop share a single lookup.

    A triggerer that restarts resumes all its triggers at once, and each one's hook would look the
    connection up (a round trip to the supervisor or the database, and on older Airflow a turn on one
    shared worker thread). Only lookups in flight are shared, nothing is kept after: a rotated key is
    seen by the next lookup.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[tuple[type[BaseHook], str], asyncio.Task[ConnectionFields]]
        ] = weakref.WeakKeyDictionary()

    async def read(self, hook: BaseHook, conn_id: str) -> ConnectionFields:
        """
        The type, host, port, password and extras of connection ``conn_id``, from the lookup in flight if any.

        :param hook: The hook asking; its class and ``conn_id`` identify the lookup (a subclass may read
            connections its way).
        :param conn_id: The connection id.
        """
        loop = asyncio.get_running_loop()
        key = (type(hook), conn_id)
        with self._lock:
            lookups = self._by_loop.setdefault(loop, {})
            lookup = lookups.get(key)
            if lookup is None:
                lookup = lookups[key] = loop.create_task(self._lookup(hook, conn_id))
                lookup.add_done_callback(lambda done: lookups.pop(key, None) if lookups.get(key) is done else None)
        # One waiter's cancellation (its trigger ended) must not cancel the others' lookup.
        return await asyncio.shield(lookup)

    @staticmethod
    async def _lookup(hook: BaseHook, conn_id: str) -> ConnectionFields:
        conn = await get_async_connection(conn_id, hook)
        extra = await get_async_extra_dejson(conn)
        if conn.password and conn.password.strip():
            # The key as the hook sends it (stripped). Masking may talk to the supervisor synchronously:
            # keep it off the event loop.
            await asyncio.to_thread(mask_secret, conn.password.strip())
        return ConnectionFields.of(conn, extra)


#: The lookups every :class:`~airflow_provider_ppio.hooks.ppio.PPIOHook` shares.
CONNECTION_LOOKUPS = SharedConnectionLookups()
