"""``PPIOHook``: the PPIO API connection and one method per endpoint, sync (requests) and async (aiohttp)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from functools import cached_property, partial
from typing import Any

import requests
from airflow.providers.common.compat.sdk import BaseHook, mask_secret
from pydantic import SecretStr

from airflow_provider_ppio.exceptions import (
    PPIOAuthError,
    PPIOBadResponseError,
    PPIOError,
    PPIOInvalidInputError,
    PPIOTransportError,
)
from airflow_provider_ppio.get_provider_info import CONNECTION_TYPE, DEFAULT_CONN_ID, UI_FIELD_BEHAVIOUR
from airflow_provider_ppio.hooks import PPIOHookMixin as PPIOHookMixin  # its old home
from airflow_provider_ppio.hooks import _async, _sync
from airflow_provider_ppio.hooks._retry import RetryPolicy
from airflow_provider_ppio.hooks._shared import (
    PREWARM_TASKS_PATH,
    ClientSettings,
    Patience,
    check_api_path,
    is_loopback,
    prewarm_task_path,
    scrub,
    snippet,
)
from airflow_provider_ppio.models import (
    CreatePrewarmTaskRequest,
    ListPrewarmTasksQuery,
    PrewarmTask,
    PrewarmTaskPage,
    created_task_id,
)

#: Ids per DELETE request (the API documents no limit; this keeps each body small).
DELETE_BATCH_SIZE = 100


class PPIOHook(BaseHook):
    """
    Talks to the PPIO (or Novita AI) GPU API v2 with an API key kept in an Airflow connection.

    The connection's password is the API key, its host the base URL (default ``https://api.ppio.com``;
    Novita AI users set ``https://api.novita.ai``). Its extras may set ``timeout`` (seconds per
    request, default 30), ``max_attempts`` (tries per call, default 5), ``unreachable_timeout`` (how
    long a wait bears an API that gives no usable answer, default 600), ``ca_bundle`` (a CA file for
    TLS) and ``verify`` (false turns certificate checks off). Both transports read the same settings.

    :param ppio_conn_id: The Airflow connection id.
    :param timeout: Overrides the connection's request timeout, in seconds.
    :param max_attempts: Overrides the connection's tries per call; 1 disables retries.
    :param unreachable_timeout: Overrides the connection's bound on outages during a wait, in seconds.
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
        unreachable_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.ppio_conn_id = ppio_conn_id
        self._overrides: dict[str, Any] = {
            "timeout": timeout,
            "max_attempts": max_attempts,
            "unreachable_timeout": unreachable_timeout,
        }
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
        # Flask and WTForms exist only in 2.11's webserver: imported where that UI asks.
        from flask_appbuilder.fieldwidgets import BS3TextFieldWidget
        from flask_babel import lazy_gettext
        from wtforms import IntegerField, StringField
        from wtforms.validators import NumberRange, Optional

        return {
            "timeout": StringField(
                lazy_gettext("Request timeout (seconds)"), widget=BS3TextFieldWidget(), validators=[Optional()]
            ),
            "max_attempts": IntegerField(
                lazy_gettext("Max attempts"), widget=BS3TextFieldWidget(), validators=[Optional(), NumberRange(min=1)]
            ),
        }

    # -- settings ----------------------------------------------------------------------------------

    @cached_property
    def settings(self) -> ClientSettings:
        """Base URL, key, timeouts, retry and TLS settings, read from the connection once per hook."""
        conn = self.get_connection(self.ppio_conn_id)
        settings = self._build_settings(conn.host, conn.password, conn.extra_dejson)
        mask_secret(settings.api_key)
        return settings

    async def aget_settings(self) -> ClientSettings:
        """The same settings as :attr:`settings`, resolved without blocking the event loop."""
        if self._async_settings is None:
            host, password, extra = await _async.CONNECTION_LOOKUPS.read(self, self.ppio_conn_id)
            self._async_settings = self._build_settings(host, password, extra)
        return self._async_settings

    def _build_settings(self, host: str | None, password: str | None, extra: Mapping[str, Any]) -> ClientSettings:
        settings = ClientSettings.from_connection(
            self.ppio_conn_id, host=host, password=password, extra=extra, overrides=self._overrides
        )
        if not settings.base_url.startswith("https://") and not is_loopback(settings.base_url):
            self.log.warning(
                "Connection %r sends the API key over plain http to %s; use https", self.ppio_conn_id, settings.base_url
            )
        if not settings.tls.verify:
            self.log.warning(
                "Connection %r does not verify the API's TLS certificate (verify=false)", self.ppio_conn_id
            )
        return settings

    # -- API calls ---------------------------------------------------------------------------------

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """
        GET any API path and return its decoded JSON, for custom operators.

        :param path: API path starting with ``/``, e.g. ``/gpus/v2/prewarm-tasks``.
        :param params: Query parameters.
        """
        return self.request("GET", path, params=params)

    async def aget(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """Async :meth:`get`."""
        return await self.arequest("GET", path, params=params)

    def get_prewarm_task(self, task_id: str, *, patient: bool = False, deadline: float | None = None) -> PrewarmTask:
        """
        Read one prewarm task.

        :param task_id: The prewarm task id (1-255 characters).
        :param patient: For waits: retry transient errors until ``unreachable_timeout`` (then raise
            :class:`~airflow_provider_ppio.exceptions.PPIOUnreachableError`) instead of ``max_attempts`` times.
        :param deadline: With ``patient``, a Unix time at which to stop retrying and raise the last error.
        """
        path = prewarm_task_path(task_id)
        patience = Patience(self.settings.unreachable_timeout, deadline) if patient else None
        return _the_task_asked_for(task_id, self.request("GET", path, patience=patience), self.settings.secret)

    async def aget_prewarm_task(
        self, task_id: str, *, patient: bool = False, deadline: float | None = None
    ) -> PrewarmTask:
        """Async :meth:`get_prewarm_task`, for triggers."""
        path = prewarm_task_path(task_id)
        settings = await self.aget_settings()
        patience = Patience(settings.unreachable_timeout, deadline) if patient else None
        answer = await self.arequest("GET", path, patience=patience)
        # Read again: a 401 during the call may have switched to a rotated key, the one the answer could echo.
        return _the_task_asked_for(task_id, answer, (await self.aget_settings()).secret)

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

        A create is retried only when the API surely did not act on it: when no connection was
        made, or on a 429. After a timeout, a reset connection or a 5xx the request may have
        created a task, so the error is raised instead of sending a second create; look the task up
        with :meth:`list_prewarm_tasks` (the create operator does this for you).

        :param image: Full image reference, e.g. ``registry.example.com/team/image:tag``.
        :param region_id: Target region id.
        :param product_ids: GPU products to cover; none means all products of the region.
        :param registry_auth_id: Saved registry credential id, for private images.
        :param note: Free-text note.
        """
        body = CreatePrewarmTaskRequest.build(
            image=image, region_id=region_id, product_ids=product_ids, registry_auth_id=registry_auth_id, note=note
        )
        payload = body.model_dump(exclude_none=True)
        answer = self.request("POST", PREWARM_TASKS_PATH, json=payload, idempotent=False, allow_empty=True)
        return created_task_id(answer) or self._find_created_task(body)

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
        params: dict[str, Any] | None = query.model_dump(exclude_none=True)
        seen_cursors: set[str] = set()
        while params is not None:
            page = PrewarmTaskPage.from_api(self.get(PREWARM_TASKS_PATH, params=params))
            yield from page.data
            params = _next_page(page, params, seen_cursors)

    async def alist_prewarm_tasks(
        self,
        status: str | None = None,
        region_id: str | None = None,
        name: str | None = None,
        page_size: int = 50,
        *,
        patient: bool = False,
    ) -> AsyncIterator[PrewarmTask]:
        """
        Async :meth:`list_prewarm_tasks`, for triggers.

        :param patient: Retry each page's transient errors until ``unreachable_timeout`` (as waits do).
        """
        query = ListPrewarmTasksQuery.build(status=status, region_id=region_id, name=name, limit=page_size)
        params: dict[str, Any] | None = query.model_dump(exclude_none=True)
        patience = Patience((await self.aget_settings()).unreachable_timeout, None) if patient else None
        seen_cursors: set[str] = set()
        while params is not None:
            answer = await self.arequest("GET", PREWARM_TASKS_PATH, params=params, patience=patience)
            page = PrewarmTaskPage.from_api(answer)
            for task in page.data:
                yield task
            params = _next_page(page, params, seen_cursors)

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
            quick = dataclasses.replace(settings, timeout=min(settings.timeout, 10.0), max_attempts=1)
            self.request("GET", PREWARM_TASKS_PATH, params={"limit": 1}, settings=quick)
        except PPIOAuthError as err:
            return False, f"The API key was refused (HTTP {err.http_status}): {err.api_message or err}"
        except PPIOTransportError as err:
            return False, f"Could not reach the PPIO API: {err}"
        except PPIOError as err:
            return False, str(err)
        return True, f"Connected to the PPIO API at {settings.base_url}; the API key was accepted"

    # -- the generic call, sync and async: every method above goes through it ----------------------

    @cached_property
    def session(self) -> requests.Session:
        """One keep-alive ``requests.Session`` per hook (TLS and proxy from :attr:`settings`)."""
        return _sync.new_session(self.settings)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        idempotent: bool = True,
        allow_empty: bool = False,
        patience: Patience | None = None,
        settings: ClientSettings | None = None,
    ) -> Any:
        """
        Call the API with the shared retry policy and return the decoded JSON body.

        A 401 makes the hook read its connection again: a key rotated meanwhile is used at once.

        :param method: HTTP method.
        :param path: API path starting with ``/``, e.g. ``/gpus/v2/prewarm-tasks``.
        :param params: Query parameters.
        :param json: JSON body, if any.
        :param idempotent: False for calls that must not run twice (create): then only errors that prove the
            request was not acted on are retried.
        :param allow_empty: Accept an empty 2xx body (returned as ``{}``).
        :param patience: Retry transient errors by time (a wait) instead of ``max_attempts``.
        :param settings: Use these instead of the connection's (e.g. fewer attempts).
        """
        check_api_path(path)
        for rotation in (False, True):
            current = settings or self.settings
            policy = RetryPolicy(
                current, what=f"{method} {path}", log=self.log, idempotent=idempotent, patience=patience
            )
            attempt = partial(
                _sync.send, self.session, current, method, path, params=params, json=json, allow_empty=allow_empty
            )
            try:
                return policy.call(attempt)
            except PPIOAuthError as err:
                if rotation or settings is not None or err.http_status != 401 or not self._key_rotated():
                    raise
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    async def arequest(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        idempotent: bool = True,
        allow_empty: bool = False,
        patience: Patience | None = None,
    ) -> Any:
        """Async :meth:`request`, on the process-wide ``aiohttp`` session shared by all hooks of the event loop."""
        check_api_path(path)
        for rotation in (False, True):
            settings = await self.aget_settings()
            policy = RetryPolicy(
                settings, what=f"{method} {path}", log=self.log, idempotent=idempotent, patience=patience
            )
            try:
                async with _async.SHARED_SESSIONS.lease(settings) as session:
                    attempt = partial(
                        _async.send, session, settings, method, path, params=params, json=json, allow_empty=allow_empty
                    )
                    return await policy.acall(attempt)
            except PPIOAuthError as err:
                if rotation or err.http_status != 401 or not await self._akey_rotated():
                    raise
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    # -- key rotation ------------------------------------------------------------------------------

    def _key_rotated(self) -> bool:
        """After a 401: read the connection again; True (and new settings) if it now holds another key."""
        old = self.settings
        conn = self.get_connection(self.ppio_conn_id)
        new = self._build_settings(conn.host, conn.password, conn.extra_dejson)
        if new.api_key == old.api_key:
            return False
        mask_secret(new.api_key)
        self.__dict__["settings"] = new
        self.__dict__.pop("session", None)
        self.log.warning("The API key was refused; connection %r now holds another key: using it", self.ppio_conn_id)
        return True

    async def _akey_rotated(self) -> bool:
        """Async :meth:`_key_rotated`."""
        old = await self.aget_settings()
        self._async_settings = None
        new = await self.aget_settings()
        if new.api_key == old.api_key:
            return False
        self.log.warning("The API key was refused; connection %r now holds another key: using it", self.ppio_conn_id)
        return True


def _next_page(page: PrewarmTaskPage, params: dict[str, Any], seen_cursors: set[str]) -> dict[str, Any] | None:
    """
    The query for the page after ``page``, or None after the last one; a cursor the API already gave
    (a paging loop that would never end) is a bad response.
    """
    if not page.has_more or not page.next_cursor:
        return None
    if page.next_cursor in seen_cursors:
        raise PPIOBadResponseError(f"GET {PREWARM_TASKS_PATH}: the API returned cursor {page.next_cursor!r} twice")
    seen_cursors.add(page.next_cursor)
    return {**params, "cursor": page.next_cursor}


def _the_task_asked_for(task_id: str, answer: Any, secret: SecretStr) -> PrewarmTask:
    """
    Parse a read of one task, and check that it is the task asked for (a confused cache or proxy could answer
    with another one, and a gate must not open on someone else's prewarm).
    """
    task = PrewarmTask.from_api(answer)
    if task.task_id != task_id:
        returned = snippet(scrub(repr(task.task_id), secret) or "")
        raise PPIOBadResponseError(f"Asked for prewarm task {task_id!r}, the API answered with task {returned}")
    return task
