"""``PPIOHook``: the PPIO API connection and one method per endpoint, sync (requests) and async (aiohttp)."""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
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
from airflow_provider_ppio.hooks import _async, _sync
from airflow_provider_ppio.hooks._retry import RetryPolicy
from airflow_provider_ppio.hooks._shared import (
    LIST_PAGE_MAX_BYTES,
    MAX_BODY_BYTES,
    PREWARM_TASKS_PATH,
    TASK_BODY_MAX_BYTES,
    ClientSettings,
    ConnectionFields,
    Patience,
    check_api_path,
    is_loopback,
    prewarm_task_path,
    server_text,
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
#: Most pages one list walk reads before it stops with a ``PPIOBadResponseError`` (a cursor given forever).
MAX_PAGES_PER_WALK = 1000
#: Longest ``next_cursor`` accepted: it goes back into the next request's query string.
MAX_CURSOR_LENGTH = 2048


class PPIOHook(BaseHook):
    """
    Talks to the PPIO (or Novita AI) GPU API v2 with the API key of a ``ppio`` connection (docs/connection.md).

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
        return {key.replace("-", "_"): value.copy() for key, value in UI_FIELD_BEHAVIOUR.items()}

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """Extra fields of the connection form (Airflow 2.11's Flask UI, whose imports exist only there)."""
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
        settings = self._build_settings(ConnectionFields.of(self.get_connection(self.ppio_conn_id)))
        mask_secret(settings.api_key)
        return settings

    async def aget_settings(self) -> ClientSettings:
        """The same settings as :attr:`settings`, resolved without blocking the event loop."""
        if self._async_settings is None:
            fields = await _async.CONNECTION_LOOKUPS.read(self, self.ppio_conn_id)
            if self._async_settings is None:  # else another wait sharing this hook built them meanwhile
                self._async_settings = self._build_settings(fields)
        return self._async_settings

    def _build_settings(self, fields: ConnectionFields) -> ClientSettings:
        """Settings from the connection's fields, with a warning for plain http or verify=false."""
        settings = ClientSettings.from_connection(self.ppio_conn_id, fields, self._overrides)
        if not settings.base_url.startswith("https://") and not is_loopback(settings.base_url):
            self.log.warning(
                "Connection %r sends the API key over plain http to %s (allow_insecure_http is set); use https",
                self.ppio_conn_id,
                settings.base_url,
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
        # The answer is never a local here: a traceback printed with locals must not show what the server sent.
        return _the_task_asked_for(
            task_id, self.request("GET", path, patience=patience, max_bytes=TASK_BODY_MAX_BYTES), self.settings.secret
        )

    async def aget_prewarm_task(
        self, task_id: str, *, patient: bool = False, deadline: float | None = None
    ) -> PrewarmTask:
        """Async :meth:`get_prewarm_task`, for triggers."""
        path = prewarm_task_path(task_id)
        settings = await self.aget_settings()
        patience = Patience(settings.unreachable_timeout, deadline) if patient else None
        # Not a local: see get_prewarm_task. The settings are read again after the call: a 401 during it may
        # have switched to a rotated key, the one the answer could echo.
        return await _the_async_task_asked_for(
            task_id, await self.arequest("GET", path, patience=patience, max_bytes=TASK_BODY_MAX_BYTES), self
        )

    def create_prewarm_task(
        self,
        image: str,
        region_id: str,
        product_ids: Sequence[str] | None = None,
        registry_auth_id: str | None = None,
        note: str | None = None,
    ) -> str:
        """
        Start prewarming ``image`` in ``region_id`` and return the new task's id; retried only when the API surely
        did not act (no connection made, a 429), else the error is raised (look the task up with a list).

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
        answer = self.request(
            "POST", PREWARM_TASKS_PATH, json=payload, idempotent=False, allow_empty=True, max_bytes=TASK_BODY_MAX_BYTES
        )
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
        Iterate over prewarm tasks page by page, each task id once per walk; a walk past
        :data:`MAX_PAGES_PER_WALK` pages, a repeated or overlong cursor is a ``PPIOBadResponseError``.

        :param status: Only tasks in this state (pending, running, succeeded, failed).
        :param region_id: Only tasks in this region.
        :param name: Fuzzy match on the image name or note.
        :param page_size: Tasks per request (``limit``).
        """
        query = ListPrewarmTasksQuery.build(status=status, region_id=region_id, name=name, limit=page_size)
        params: dict[str, Any] | None = query.model_dump(exclude_none=True)
        walk = _Walk(self.settings.secret)
        while params is not None:
            answer = self.request("GET", PREWARM_TASKS_PATH, params=params, max_bytes=LIST_PAGE_MAX_BYTES)
            page = PrewarmTaskPage.from_api(answer)
            yield from walk.new_tasks(page)
            params = walk.next_page(page, params)

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
        walk = _Walk((await self.aget_settings()).secret)
        while params is not None:
            answer = await self.arequest(
                "GET", PREWARM_TASKS_PATH, params=params, patience=patience, max_bytes=LIST_PAGE_MAX_BYTES
            )
            page = PrewarmTaskPage.from_api(answer)
            for task in walk.new_tasks(page):
                yield task
            params = walk.next_page(page, params)

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
            self.request(
                "DELETE", PREWARM_TASKS_PATH, json={"task_ids": batch}, allow_empty=True, max_bytes=TASK_BODY_MAX_BYTES
            )

    def test_connection(self) -> tuple[bool, str]:
        """One cheap call (list one item, no retries, at most 10 s) for the connection form's "Test" button."""
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
        max_bytes: int = MAX_BODY_BYTES,
    ) -> Any:
        """
        Call the API with the retry policy and return the decoded JSON; after a 401 a rotated key is used at once.

        :param method: HTTP method.
        :param path: API path starting with ``/``, e.g. ``/gpus/v2/prewarm-tasks``.
        :param params: Query parameters.
        :param json: JSON body, if any.
        :param idempotent: False for calls that must not run twice (create): then only errors that prove the
            request was not acted on are retried.
        :param allow_empty: Accept an empty 2xx body (returned as ``{}``).
        :param patience: Retry transient errors by time (a wait) instead of ``max_attempts``.
        :param settings: Use these instead of the connection's (e.g. fewer attempts).
        :param max_bytes: The longest answer read (the endpoint's cap); a longer one is a bad response.
        """
        check_api_path(path)
        for rotation in (False, True):
            current = settings or self.settings
            policy = RetryPolicy(
                current, what=f"{method} {path}", log=self.log, idempotent=idempotent, patience=patience
            )
            attempt = partial(
                _sync.send,
                self.session,
                current,
                method,
                path,
                params=params,
                json=json,
                allow_empty=allow_empty,
                max_bytes=max_bytes,
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
        max_bytes: int = MAX_BODY_BYTES,
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
                        _async.send,
                        session,
                        settings,
                        method,
                        path,
                        params=params,
                        json=json,
                        allow_empty=allow_empty,
                        max_bytes=max_bytes,
                    )
                    return await policy.acall(attempt)
            except PPIOAuthError as err:
                if rotation or err.http_status != 401 or not await self._akey_rotated(settings):
                    raise
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    # -- key rotation ------------------------------------------------------------------------------

    def _key_rotated(self) -> bool:
        """After a 401: read the connection again; True (and new settings) if it now holds another key."""
        old = self.settings
        new = self._build_settings(ConnectionFields.of(self.get_connection(self.ppio_conn_id)))
        if new.api_key == old.api_key:
            return False
        mask_secret(new.api_key)
        self.__dict__["settings"] = new
        self.__dict__.pop("session", None)
        self.log.warning("The API key was refused; connection %r now holds another key: using it", self.ppio_conn_id)
        return True

    async def _akey_rotated(self, refused: ClientSettings) -> bool:
        """Async :meth:`_key_rotated`; at once True if another wait sharing this hook has rotated the key."""
        if (await self.aget_settings()).api_key != refused.api_key:
            return True
        self._async_settings = None
        new = await self.aget_settings()
        if new.api_key == refused.api_key:
            return False
        self.log.warning("The API key was refused; connection %r now holds another key: using it", self.ppio_conn_id)
        return True


class _Walk:
    """What one list walk has seen: pages read, cursors given (as digests) and task ids yielded."""

    def __init__(self, secret: SecretStr) -> None:
        self.secret = secret
        self.pages = 0
        self.cursors: set[bytes] = set()
        self.task_ids: set[str] = set()

    def new_tasks(self, page: PrewarmTaskPage) -> list[PrewarmTask]:
        """The tasks of ``page`` not yielded before in this walk (pages shift while tasks are created)."""
        self.pages += 1
        fresh = []
        for task in page.data:
            if task.task_id not in self.task_ids:
                self.task_ids.add(task.task_id)
                fresh.append(task)
        return fresh

    def next_page(self, page: PrewarmTaskPage, params: dict[str, Any]) -> dict[str, Any] | None:
        """The query for the page after ``page``, or None after the last one."""
        if not page.has_more or not page.next_cursor:
            return None
        where = f"GET {PREWARM_TASKS_PATH}"
        cursor = page.next_cursor
        if len(cursor) > MAX_CURSOR_LENGTH:
            raise PPIOBadResponseError(
                f"{where}: the API returned a cursor of {len(cursor)} characters (at most {MAX_CURSOR_LENGTH})"
            )
        digest = hashlib.blake2b(cursor.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        if digest in self.cursors:
            raise PPIOBadResponseError(
                f"{where}: the API returned cursor {server_text(cursor, self.secret, 100)!r} twice"
            )
        if self.pages >= MAX_PAGES_PER_WALK:
            raise PPIOBadResponseError(
                f"{where}: the list went on past {MAX_PAGES_PER_WALK} pages ({len(self.task_ids)} tasks) with a new "
                "cursor on every page; stopped (at most MAX_PAGES_PER_WALK pages are read in one walk)"
            )
        self.cursors.add(digest)
        return {**params, "cursor": cursor}


async def _the_async_task_asked_for(task_id: str, answer: Any, hook: PPIOHook) -> PrewarmTask:
    secret = (await hook.aget_settings()).secret
    try:
        return _the_task_asked_for(task_id, answer, secret)
    except PPIOBadResponseError as err:
        del answer
        raise err.with_traceback(None) from None


def _the_task_asked_for(task_id: str, answer: Any, secret: SecretStr) -> PrewarmTask:
    """Parse a read of one task, checked to be the task asked for (a confused proxy could answer another)."""
    task = PrewarmTask.from_api(answer)
    if task.task_id != task_id:
        returned = server_text(repr(task.task_id), secret)
        del answer, task  # a traceback printed with locals must not show what the server sent
        raise PPIOBadResponseError(f"Asked for prewarm task {task_id!r}, the API answered with task {returned}")
    return task


def __getattr__(name: str) -> Any:
    """``PPIOHookMixin``'s old home, kept as a deprecated alias (imported lazily: no import circle)."""
    if name != "PPIOHookMixin":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        "import PPIOHookMixin from airflow_provider_ppio.hooks, not airflow_provider_ppio.hooks.ppio",
        DeprecationWarning,
        stacklevel=2,
    )
    from airflow_provider_ppio.hooks import PPIOHookMixin

    return PPIOHookMixin
