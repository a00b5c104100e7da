"""``PPIOHook``: the PPIO API connection, sync (requests) and async (httpx) calls, typed results."""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseHook, mask_secret

from airflow_provider_ppio.exceptions import (
    PPIOAuthError,
    PPIOBadResponseError,
    PPIOConnectionConfigError,
    PPIOError,
    PPIOInvalidInputError,
    PPIOTimeoutError,
    PPIOTransportError,
)
from airflow_provider_ppio.get_provider_info import (
    CONNECTION_TYPE,
    DEFAULT_CONN_ID,
    UI_FIELD_BEHAVIOUR,
)
from airflow_provider_ppio.hooks._async_pool import SHARED_ASYNC_CLIENTS
from airflow_provider_ppio.hooks._protocol import (
    MAX_BODY_BYTES,
    PREWARM_TASKS_PATH,
    ClientSettings,
    api_url,
    interpret_response,
    is_loopback,
    prewarm_task_path,
    request_headers,
    scrub,
    snippet,
)
from airflow_provider_ppio.hooks._retry import retry_arguments
from airflow_provider_ppio.models import (
    CreatePrewarmTaskRequest,
    ListPrewarmTasksQuery,
    PrewarmTask,
    PrewarmTaskPage,
    created_task_id,
)

if TYPE_CHECKING:
    import requests

#: Ids per DELETE request (the API documents no limit; this keeps each body small).
DELETE_BATCH_SIZE = 100


class PPIOHook(BaseHook):
    """
    Talks to the PPIO (or Novita AI) GPU API v2 with an API key kept in an Airflow connection.

    The connection's password is the API key, its host the base URL (default
    ``https://api.ppio.com``; Novita AI users set ``https://api.novita.ai``), and its extras may set
    ``timeout`` (seconds per request, default 30) and ``max_attempts`` (default 5).

    :param ppio_conn_id: The Airflow connection id.
    :param timeout: Overrides the connection's request timeout, in seconds.
    :param max_attempts: Overrides the connection's tries per call; 1 disables retries.
    """

    conn_name_attr = "ppio_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = CONNECTION_TYPE
    hook_name = "PPIO"

    def __init__(
        self,
        ppio_conn_id: str = DEFAULT_CONN_ID,
        *,
        timeout: float | None = None,
        max_attempts: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.ppio_conn_id = ppio_conn_id
        self._overrides: dict[str, Any] = {"timeout": timeout, "max_attempts": max_attempts}
        self._async_settings: ClientSettings | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ppio_conn_id={self.ppio_conn_id!r})"

    # -- connection form ---------------------------------------------------------------------------

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Relabel and hide connection-form fields (Airflow 2.11; Airflow 3 reads provider info)."""
        # Provider info spells the keys kebab-case ("hidden-fields"); this method's contract is snake_case.
        return {key.replace("-", "_"): value.copy() for key, value in UI_FIELD_BEHAVIOUR.items()}

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """Extra fields of the connection form (Airflow 2.11's Flask UI)."""
        from flask_appbuilder.fieldwidgets import BS3TextFieldWidget
        from flask_babel import lazy_gettext
        from wtforms import IntegerField, StringField
        from wtforms.validators import NumberRange, Optional

        return {
            "timeout": StringField(
                lazy_gettext("Request timeout (seconds)"),
                widget=BS3TextFieldWidget(),
                validators=[Optional()],
            ),
            "max_attempts": IntegerField(
                lazy_gettext("Max attempts"),
                widget=BS3TextFieldWidget(),
                validators=[Optional(), NumberRange(min=1)],
            ),
        }

    # -- settings ----------------------------------------------------------------------------------

    @cached_property
    def settings(self) -> ClientSettings:
        """Base URL, key, timeout and retry settings, read from the connection once per hook."""
        conn = self.get_connection(self.ppio_conn_id)
        settings = self._build_settings(conn.host, conn.password, conn.extra_dejson)
        mask_secret(settings.api_key)
        return settings

    async def aget_settings(self) -> ClientSettings:
        """The same settings as :attr:`settings`, resolved without blocking the event loop."""
        if self._async_settings is None:
            host, password, extra = await _CONNECTION_LOOKUPS.read(self)
            self._async_settings = self._build_settings(host, password, extra)
        return self._async_settings

    def _build_settings(self, host: str | None, password: str | None, extra: Mapping[str, Any]) -> ClientSettings:
        settings = ClientSettings.from_connection(
            self.ppio_conn_id, host=host, password=password, extra=extra, overrides=self._overrides
        )
        if not settings.base_url.startswith("https://") and not is_loopback(settings.base_url):
            self.log.warning(
                "Connection %r sends the API key over plain http to %s; use https",
                self.ppio_conn_id,
                settings.base_url,
            )
        return settings

    # -- sync transport ----------------------------------------------------------------------------

    @cached_property
    def session(self) -> requests.Session:
        """One keep-alive ``requests.Session`` per hook, with auth and user agent headers."""
        import requests

        from airflow_provider_ppio.hooks._deadline import DeadlineAdapter

        session = requests.Session()
        session.headers.update(request_headers(self.settings, json_body=False))
        # Per-read timeouts cannot stop a server that trickles its headers; this adapter can.
        session.mount("http://", DeadlineAdapter())
        session.mount("https://", DeadlineAdapter())
        # requests re-reads the proxy and CA-bundle variables (HTTPS_PROXY, NO_PROXY,
        # REQUESTS_CA_BUNDLE...) from the environment on every call, a tenth of a poke's CPU: read
        # them once per hook instead. ~/.netrc is not consulted: it would replace the API key.
        environment = session.merge_environment_settings(self.settings.base_url, {}, None, None, None)
        session.proxies.update(environment["proxies"])
        session.verify = environment["verify"]
        session.trust_env = False
        return session

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        idempotent: bool = True,
        allow_empty: bool = False,
        settings: ClientSettings | None = None,
    ) -> Any:
        """
        Call the API with the shared retry policy and return the decoded JSON body.

        :param method: HTTP method.
        :param path: API path starting with ``/``, e.g. ``/gpus/v2/prewarm-tasks``.
        :param params: Query parameters.
        :param json: JSON body, if any.
        :param idempotent: False for calls that must not run twice; see ``is_retryable``.
        :param allow_empty: Accept an empty 2xx body (returned as ``{}``).
        :param settings: Use these instead of the connection's (e.g. fewer attempts).
        """
        from tenacity import Retrying

        settings = settings or self.settings
        url = api_url(settings, path)
        what = f"{method} {path}"
        for attempt in Retrying(**retry_arguments(settings, what=what, log=self.log, idempotent=idempotent)):
            with attempt:
                return self._request_once(settings, method, url, path, params, json, allow_empty)
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    def _request_once(
        self,
        settings: ClientSettings,
        method: str,
        url: str,
        path: str,
        params: Mapping[str, Any] | None,
        json: Any,
        allow_empty: bool,
    ) -> Any:
        import requests
        import urllib3

        from airflow_provider_ppio.hooks._deadline import deadline as headers_deadline

        deadline = time.monotonic() + settings.timeout
        headers = {"Content-Type": "application/json"} if json is not None else None
        try:
            with headers_deadline(deadline) as watchdog:
                response = self.session.request(
                    method,
                    url,
                    params=params,
                    json=json,
                    headers=headers,
                    timeout=(settings.connect_timeout, settings.timeout),
                    stream=True,
                    allow_redirects=False,
                )
        except requests.RequestException as err:
            if watchdog.fired:
                raise _headers_timeout(method, path, settings) from None
            raise _transport_error(method, path, settings, err) from None
        if watchdog.fired:  # the cut connection may look like a complete (empty) answer
            response.close()
            raise _headers_timeout(method, path, settings)
        with response:
            try:
                body = _read_body(response, deadline, method, path)
            except (requests.exceptions.ContentDecodingError, urllib3.exceptions.DecodeError) as err:
                raise _undecodable(method, path, response.headers, err) from None
            except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
                # Reading the raw stream raises urllib3's errors (a reset or cut-off body), not requests'.
                raise _transport_error(method, path, settings, err) from None
            return interpret_response(
                method=method,
                path=path,
                status=response.status_code,
                headers=response.headers,
                body=body,
                secret=settings.api_key,
                allow_empty=allow_empty,
            )

    # -- async transport ---------------------------------------------------------------------------

    async def arequest(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        idempotent: bool = True,
        allow_empty: bool = False,
    ) -> Any:
        """
        The async twin of :meth:`request`: same URL rules, retry policy and error mapping.

        Uses the process-wide shared async client (httpx transports) for this base URL and key.

        :param method: HTTP method.
        :param path: API path starting with ``/``.
        :param params: Query parameters.
        :param json: JSON body, if any.
        :param idempotent: False for calls that must not run twice.
        :param allow_empty: Accept an empty 2xx body (returned as ``{}``).
        """
        from tenacity import AsyncRetrying

        settings = await self.aget_settings()
        url = api_url(settings, path)
        what = f"{method} {path}"
        retrying = AsyncRetrying(**retry_arguments(settings, what=what, log=self.log, idempotent=idempotent))
        async for attempt in retrying:
            with attempt:
                return await self._arequest_once(settings, method, url, path, params, json, allow_empty)
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    async def _arequest_once(
        self,
        settings: ClientSettings,
        method: str,
        url: str,
        path: str,
        params: Mapping[str, Any] | None,
        json: Any,
        allow_empty: bool,
    ) -> Any:
        import httpx

        headers = request_headers(settings, json_body=json is not None)
        async with SHARED_ASYNC_CLIENTS.lease(settings) as client:
            try:
                async with asyncio.timeout(settings.timeout):
                    async with client.stream(method, url, params=params, json=json, headers=headers) as response:
                        body = bytearray()
                        async for chunk in response.aiter_bytes():
                            body += chunk
                            if len(body) > MAX_BODY_BYTES:
                                raise _too_large(method, path)
            except TimeoutError:
                raise PPIOTimeoutError(
                    f"{method} {path}: no complete answer from {settings.base_url} within {settings.timeout:g}s"
                ) from None
            except httpx.TransportError as err:
                raise _transport_error(method, path, settings, err) from None
            except httpx.DecodingError as err:
                raise _undecodable(method, path, response.headers, err) from None
        return interpret_response(
            method=method,
            path=path,
            status=response.status_code,
            headers=response.headers,
            body=bytes(body),
            secret=settings.api_key,
            allow_empty=allow_empty,
        )

    # -- API calls ---------------------------------------------------------------------------------

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """
        GET any API path and return its decoded JSON, for custom operators.

        :param path: API path starting with ``/``, e.g. ``/gpus/v2/prewarm-tasks``.
        :param params: Query parameters.
        """
        return self.request("GET", path, params=params)

    async def aget(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """
        Async :meth:`get`.

        :param path: API path starting with ``/``.
        :param params: Query parameters.
        """
        return await self.arequest("GET", path, params=params)

    def get_prewarm_task(self, task_id: str) -> PrewarmTask:
        """
        Read one prewarm task.

        :param task_id: The prewarm task id (1-255 characters).
        """
        return _the_task_asked_for(task_id, self.get(prewarm_task_path(task_id)), self.settings.api_key)

    async def aget_prewarm_task(self, task_id: str) -> PrewarmTask:
        """
        Async :meth:`get_prewarm_task`, for triggers.

        :param task_id: The prewarm task id (1-255 characters).
        """
        answer = await self.aget(prewarm_task_path(task_id))
        return _the_task_asked_for(task_id, answer, (await self.aget_settings()).api_key)

    def create_prewarm_task(
        self,
        image: str,
        region_id: str,
        product_ids: Sequence[str] | None = None,
        registry_auth_id: str | None = None,
        note: str | None = None,
    ) -> str:
        """
        Start prewarming ``image`` in ``region_id`` and return the new task's id.

        A create is retried only when the API surely did not act on it: when the connection was
        refused, or on a 429. After a timeout, a reset connection or a 5xx the request may have
        created a task, so the error is raised instead of sending a second create; look the task up
        with :meth:`list_prewarm_tasks` (the create operator does this for you).

        :param image: Full image reference, e.g. ``registry.example.com/team/image:tag``.
        :param region_id: Target region id.
        :param product_ids: GPU products to cover; none means all products of the region.
        :param registry_auth_id: Saved registry credential id, for private images.
        :param note: Free-text note.
        """
        body = CreatePrewarmTaskRequest.build(
            image=image,
            region_id=region_id,
            product_ids=product_ids,
            registry_auth_id=registry_auth_id,
            note=note,
        )
        payload = body.model_dump(exclude_none=True)
        answer = self.request("POST", PREWARM_TASKS_PATH, json=payload, idempotent=False, allow_empty=True)
        task_id = created_task_id(answer)
        if task_id is None:
            task_id = self._find_created_task(body)
        return task_id

    def _find_created_task(self, body: CreatePrewarmTaskRequest) -> str:
        """The create answer named no id: find the newest matching task, as the docs advise."""
        candidates = [
            task
            for task in self.list_prewarm_tasks(region_id=body.region_id, name=body.note[:255] if body.note else None)
            if task.image == body.image and (body.note is None or task.note == body.note)
        ]
        if not candidates:
            raise PPIOBadResponseError(
                "POST /gpus/v2/prewarm-tasks: the answer carried no task id (task_id or id) and no task "
                f"for image {body.image!r} in region {body.region_id!r} could be found"
            )
        return max(candidates, key=lambda task: task.created_at).task_id

    def list_prewarm_tasks(
        self,
        status: str | None = None,
        region_id: str | None = None,
        name: str | None = None,
        page_size: int = 50,
    ) -> Iterator[PrewarmTask]:
        """
        Iterate over prewarm tasks, following ``next_cursor`` page by page.

        :param status: Only tasks in this state (pending, running, succeeded, failed).
        :param region_id: Only tasks in this region.
        :param name: Fuzzy match on the image name or note.
        :param page_size: Tasks per request (``limit``).
        """
        query = ListPrewarmTasksQuery.build(status=status, region_id=region_id, name=name, limit=page_size)
        params = query.model_dump(exclude_none=True)
        seen_cursors: set[str] = set()
        while True:
            page = PrewarmTaskPage.from_api(self.get(PREWARM_TASKS_PATH, params=params))
            yield from page.data
            if not page.has_more or not page.next_cursor:
                return
            if page.next_cursor in seen_cursors:
                raise PPIOBadResponseError(
                    f"GET {PREWARM_TASKS_PATH}: the API returned cursor {page.next_cursor!r} twice"
                )
            seen_cursors.add(page.next_cursor)
            params = {**params, "cursor": page.next_cursor}

    def delete_prewarm_tasks(self, task_ids: Sequence[str]) -> None:
        """
        Delete prewarm tasks (``DELETE /gpus/v2/prewarm-tasks`` with a JSON body).

        :param task_ids: The ids to delete; an empty list sends nothing.
        """
        if isinstance(task_ids, str):
            raise PPIOInvalidInputError("task_ids must be a list of ids, not one string")
        ids = list(task_ids)
        for task_id in ids:
            prewarm_task_path(task_id)  # same rules as everywhere else
        for start in range(0, len(ids), DELETE_BATCH_SIZE):
            batch = ids[start : start + DELETE_BATCH_SIZE]
            self.request("DELETE", PREWARM_TASKS_PATH, json={"task_ids": batch}, allow_empty=True)

    def test_connection(self) -> tuple[bool, str]:
        """
        One cheap call (list, one item, no retries, at most 10 s) that tells a bad key from a bad host.

        Used by the "Test" button of the connection form.
        """
        try:
            settings = self.settings
            quick = ClientSettings(
                base_url=settings.base_url,
                api_key=settings.api_key,
                timeout=min(settings.timeout, 10.0),
                max_attempts=1,
            )
            self.request("GET", PREWARM_TASKS_PATH, params={"limit": 1}, settings=quick)
        except PPIOAuthError as err:
            return False, f"The API key was refused (HTTP {err.http_status}): {err.api_message or err}"
        except PPIOTransportError as err:
            return False, f"Could not reach the PPIO API: {err}"
        except (PPIOConnectionConfigError, PPIOError) as err:
            return False, str(err)
        return True, f"Connected to the PPIO API at {settings.base_url}; the API key was accepted"


_ConnectionFields = tuple[str | None, str | None, dict[str, Any]]


class _SharedConnectionLookups:
    """
    Concurrent async lookups of one connection on one event loop share a single lookup.

    A triggerer that restarts resumes all its triggers at once, and each one's hook would look the
    connection up (a round trip to the supervisor or the database, and on older Airflow a turn on one
    shared worker thread: ~7 s for 10,000 waits). Only lookups in flight are shared, nothing is kept
    after: a rotated key is seen by the next lookup.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[tuple[type[PPIOHook], str], asyncio.Task[_ConnectionFields]]
        ] = weakref.WeakKeyDictionary()

    async def read(self, hook: PPIOHook) -> _ConnectionFields:
        """
        The host, password and extras of ``hook``'s connection, from the lookup in flight if there is one.

        :param hook: Its class and connection id identify the lookup (a subclass may read connections its way).
        """
        loop = asyncio.get_running_loop()
        key = (type(hook), hook.ppio_conn_id)
        with self._lock:
            lookups = self._by_loop.setdefault(loop, {})
            lookup = lookups.get(key)
            if lookup is None:
                lookup = lookups[key] = loop.create_task(self._lookup(hook))
                lookup.add_done_callback(lambda done: lookups.pop(key, None) if lookups.get(key) is done else None)
        # One waiter's cancellation (its trigger ended) must not cancel the others' lookup.
        return await asyncio.shield(lookup)

    @staticmethod
    async def _lookup(hook: PPIOHook) -> _ConnectionFields:
        from airflow.providers.common.compat.connection import get_async_connection, get_async_extra_dejson

        conn = await get_async_connection(hook.ppio_conn_id, hook)
        extra = await get_async_extra_dejson(conn)
        if conn.password and conn.password.strip():
            # The key as the hook sends it (stripped). Masking may talk to the supervisor synchronously:
            # keep it off the event loop.
            await asyncio.to_thread(mask_secret, conn.password.strip())
        return conn.host, conn.password, extra


_CONNECTION_LOOKUPS = _SharedConnectionLookups()


def _read_body(response: requests.Response, deadline: float, method: str, path: str) -> bytes:
    """Read the whole body, bounded in size and in total time (a trickling server cannot stall us)."""
    raw = response.raw
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise PPIOTimeoutError(f"{method} {path}: the answer did not arrive within the request timeout")
        chunk = raw.read1(65536, decode_content=True) if hasattr(raw, "read1") else raw.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large(method, path)
        chunks.append(chunk)


def _headers_timeout(method: str, path: str, settings: ClientSettings) -> PPIOTimeoutError:
    return PPIOTimeoutError(
        f"{method} {path}: no complete answer from {settings.base_url} within {settings.timeout:g}s"
    )


def _too_large(method: str, path: str) -> PPIOBadResponseError:
    return PPIOBadResponseError(f"{method} {path}: the answer is larger than {MAX_BODY_BYTES // 2**20} MiB")


def _undecodable(method: str, path: str, headers: Mapping[str, str], err: Exception) -> PPIOBadResponseError:
    """The body does not decode as its ``Content-Encoding`` says (a broken proxy or server, not a network fault)."""
    encoding = snippet(headers.get("Content-Encoding", "") or "none")
    return PPIOBadResponseError(
        f"{method} {path}: the answer's body could not be decoded (Content-Encoding: {encoding}): {_root_cause(err)}"
    )


def _the_task_asked_for(task_id: str, answer: Any, secret: str) -> PrewarmTask:
    """
    Parse a read of one task, and check that it is the task asked for (a confused cache or proxy could answer
    with another one, and a gate must not open on someone else's prewarm).
    """
    task = PrewarmTask.from_api(answer)
    if task.task_id != task_id:
        returned = snippet(scrub(repr(task.task_id), secret) or "")
        raise PPIOBadResponseError(f"Asked for prewarm task {task_id!r}, the API answered with task {returned}")
    return task


def _transport_error(method: str, path: str, settings: ClientSettings, err: Exception) -> PPIOTransportError:
    """Map a requests or httpx exception to the typed error, noting whether the request may have left."""
    import httpx
    import requests
    import urllib3

    sent = True
    cls: type[PPIOTransportError] = PPIOTransportError
    if isinstance(err, (requests.Timeout, httpx.TimeoutException, urllib3.exceptions.TimeoutError)):
        cls = PPIOTimeoutError
    if isinstance(err, (requests.ConnectTimeout, httpx.ConnectError, httpx.ConnectTimeout)) or (
        isinstance(err, requests.ConnectionError) and _never_connected(err)
    ):
        sent = False
    detail = _root_cause(err)
    message = f"{method} {path}: could not get an answer from {settings.base_url}: {detail}"
    if cls is PPIOTimeoutError:
        message = f"{method} {path}: {settings.base_url} did not answer within {settings.timeout:g}s ({detail})"
    return cls(message, request_sent=sent)


def _never_connected(err: BaseException) -> bool:
    from urllib3.exceptions import NewConnectionError

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, NewConnectionError):
            return True
        reason = getattr(seen, "reason", None)
        if isinstance(reason, BaseException) and reason is not seen:
            seen = reason
            continue
        args = getattr(seen, "args", ())
        seen = args[0] if args and isinstance(args[0], BaseException) else seen.__context__
    return False


def _root_cause(err: BaseException) -> str:
    """The innermost error's class and text, short (no headers, no key)."""
    seen = err
    while True:
        inner = getattr(seen, "reason", None)
        if not isinstance(inner, BaseException):
            args = getattr(seen, "args", ())
            inner = args[0] if args and isinstance(args[0], BaseException) else None
        if inner is None or inner is seen:
            break
        seen = inner
    text = " ".join(str(seen).split())
    return f"{type(seen).__name__}: {text[:200]}" if text else type(seen).__name__
