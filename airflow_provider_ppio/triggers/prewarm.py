"""``PrewarmTaskTrigger``: wait for a PPIO image prewarm task in the triggerer, and read its events."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Final

from airflow.providers.common.compat.sdk import AirflowException
from airflow.triggers.base import BaseTrigger, TriggerEvent
from pydantic import SecretStr

from airflow_provider_ppio import exceptions
from airflow_provider_ppio.exceptions import PPIOError, PPIOInvalidInputError
from airflow_provider_ppio.get_provider_info import DEFAULT_CONN_ID
from airflow_provider_ppio.hooks import check_seconds
from airflow_provider_ppio.hooks._shared import prewarm_task_path, scrub
from airflow_provider_ppio.models import Outcome, PrewarmTask

if TYPE_CHECKING:
    from airflow_provider_ppio.hooks.ppio import PPIOHook

#: The prewarm task succeeded; the event carries its details (``task``) as plain JSON.
EVENT_SUCCESS: Final = "success"
#: The prewarm task failed; the event carries ``error``, ``message``, ``reason`` and ``task``.
EVENT_FAILED: Final = "failed"
#: The sensor's timeout passed while the task was still running (or the API was not answering).
EVENT_TIMEOUT: Final = "timeout"
#: An error ended the wait (bad key, unknown task, unusable answer, bad connection, ``unreachable_timeout``).
EVENT_ERROR: Final = "error"
#: Every event this trigger can fire; anything else is refused by the sensor.
EVENT_STATUSES: Final = frozenset({EVENT_SUCCESS, EVENT_FAILED, EVENT_TIMEOUT, EVENT_ERROR})

#: Deferred polls are at least this far apart, whatever ``poke_interval`` says (no hot loop in the triggerer).
MIN_DEFERRED_POKE_INTERVAL: Final = 1.0
#: Seconds after the wait's deadline at which Airflow itself ends a deferral the trigger did not end.
DEFERRAL_TIMEOUT_GRACE: Final = 60.0

#: Each wait lasts ``poke_interval`` times a factor drawn from this range, so triggers deferred at
#: the same moment spread their polls out instead of hitting the API in lockstep.
_JITTER: Final = (0.9, 1.1)


class PrewarmTaskTrigger(BaseTrigger):
    """
    Poll a prewarm task until it succeeds, fails, or the deadline passes; fire one event.

    Events (``event["status"]``): ``success`` (with ``task``), ``failed`` (with ``error``,
    ``message``, ``reason`` and ``task``), ``timeout`` and ``error`` (with ``message``,
    ``error_type`` and ``http_status``). Transient API errors (network, 429, 5xx) are retried with
    backoff for up to ``unreachable_timeout``, never past the deadline. Unknown statuses keep it
    waiting. Thousands of waits share a triggerer: those of one connection share one hook (the
    connection is read when the first starts, and again after a 401), and none keeps a poll's answer.

    :param prewarm_task_id: Id of the prewarm task to wait for.
    :param ppio_conn_id: The PPIO connection id.
    :param poke_interval: Seconds between two polls.
    :param deadline: Unix time after which the wait ends with a ``timeout`` event; None waits forever.
    :param unreachable_timeout: Overrides the connection's bound on outages, in seconds.
    """

    def __init__(
        self,
        *,
        prewarm_task_id: str,
        ppio_conn_id: str = DEFAULT_CONN_ID,
        poke_interval: float = 60.0,
        deadline: float | None = None,
        unreachable_timeout: float | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        prewarm_task_path(prewarm_task_id)  # refuse a bad id here, not in the triggerer
        check_seconds("poke_interval", poke_interval)
        check_seconds("unreachable_timeout", unreachable_timeout, allow_none=True)
        if deadline is not None and (
            isinstance(deadline, bool) or not isinstance(deadline, int | float) or not math.isfinite(deadline)
        ):
            raise PPIOInvalidInputError(f"deadline must be a Unix time in seconds or None, got {deadline!r}")
        self.prewarm_task_id = prewarm_task_id
        self.ppio_conn_id = ppio_conn_id
        self.poke_interval = float(poke_interval)
        self.deadline = None if deadline is None else float(deadline)
        self.unreachable_timeout = None if unreachable_timeout is None else float(unreachable_timeout)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """The class path and the keyword arguments that rebuild this trigger (primitives only)."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "prewarm_task_id": self.prewarm_task_id,
                "ppio_conn_id": self.ppio_conn_id,
                "poke_interval": self.poke_interval,
                "deadline": self.deadline,
                "unreachable_timeout": self.unreachable_timeout,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Poll until the wait ends, then fire exactly one event."""
        # The hook stack (aiohttp) is only needed in the triggerer, not when a DAG is parsed.
        from airflow_provider_ppio.hooks._async import SHARED_SESSIONS

        key = (self.ppio_conn_id, self.unreachable_timeout)
        hook = _acquire_hook(key)
        try:
            try:
                settings = await hook.aget_settings()
            except AirflowException as err:  # missing connection, no key, bad base URL: waiting will not help
                payload = self._error_event(err)
            else:
                # Leased for the whole wait, so polls reuse its connections; released before the event fires.
                async with SHARED_SESSIONS.lease(settings):
                    result: dict[str, Any] | str | None = None
                    while not isinstance(result, dict):
                        await asyncio.sleep(self._next_wait())
                        result = await self._poll(hook, result)
                # Airflow 3 stores events in the database: the key, as this wait started and as a 401 may have
                # rotated it, is scrubbed from every string (a server may echo it in a message or a task field).
                payload = _scrubbed(result, settings.secret)
                with contextlib.suppress(AirflowException):  # the connection went away after a 401
                    payload = _scrubbed(payload, (await hook.aget_settings()).secret)
        finally:
            _release_hook(key)
        yield TriggerEvent(payload)  # type: ignore[no-untyped-call]

    async def _poll(self, hook: PPIOHook, last_status: str | None) -> dict[str, Any] | str:
        """One poll: the payload of the event that ends the wait, or the task's status to keep waiting."""
        try:
            task = await hook.aget_prewarm_task(self.prewarm_task_id, patient=True, deadline=self.deadline)
        except AirflowException as err:  # a PPIOError, or the connection gone when a 401 made the hook re-read it
            if isinstance(err, PPIOError) and err.transient and self._past_deadline():
                return self._timeout_event(last_status, err)
            return self._error_event(err)
        outcome = task.outcome
        if outcome is Outcome.SUCCEEDED:
            return self._event(EVENT_SUCCESS, f"PPIO prewarm task {task.task_id!r} succeeded", task=task)
        if outcome is Outcome.FAILED:
            error, reasons, summary = task.status.error, task.reasons, task.failure_summary()
            return self._event(
                EVENT_FAILED, task.status.message, task=task, error=error, reason=reasons, summary=summary
            )
        if task.status.status != last_status:  # one line per change, not per poll: waits share a log
            # The class's logger: Airflow 3 would build one per wait (its log routing is per asyncio task).
            task.log_progress(self.logger(), f"; polling every {self.poke_interval:g}s")
        if self._past_deadline():
            return self._timeout_event(task.status.status)
        return task.status.status

    def _past_deadline(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    def _next_wait(self) -> float:
        wait = self.poke_interval * random.uniform(*_JITTER)
        if self.deadline is not None:
            # A last poll right at the deadline: a task that finished just in time is not a timeout.
            wait = min(wait, max(0.0, self.deadline - time.time()))
        return wait

    def _timeout_event(self, last_status: str | None, error: PPIOError | None = None) -> dict[str, Any]:
        message = (
            f"PPIO prewarm task {self.prewarm_task_id!r} did not finish before the sensor's timeout "
            f"(last status: {last_status or 'unknown'})"
        )
        if error is not None:
            message += f"; the API was not answering at the deadline: {error}"
        return self._event(EVENT_TIMEOUT, message, last_status=last_status)

    def _error_event(self, err: AirflowException) -> dict[str, Any]:
        http_status = err.http_status if isinstance(err, PPIOError) else None
        return self._event(EVENT_ERROR, str(err), error_type=type(err).__name__, http_status=http_status)

    def _event(self, status: str, message: str, *, task: PrewarmTask | None = None, **fields: Any) -> dict[str, Any]:
        payload: dict[str, Any] = {"status": status, "prewarm_task_id": self.prewarm_task_id, "message": message}
        if task is not None:
            payload["task"] = task.to_xcom()
        return payload | fields


#: The hook of each (connection id, ``unreachable_timeout``) some wait of this process uses, and how many use it.
_HOOKS: dict[tuple[str, float | None], tuple[PPIOHook, int]] = {}
_HOOKS_LOCK = threading.Lock()


def _acquire_hook(key: tuple[str, float | None]) -> PPIOHook:
    """The hook the waits of ``key`` share, built if none holds it; pair with :func:`_release_hook`."""
    from airflow_provider_ppio.hooks.ppio import PPIOHook

    with _HOOKS_LOCK:
        hook, users = _HOOKS.get(key) or (PPIOHook(ppio_conn_id=key[0], unreachable_timeout=key[1]), 0)
        _HOOKS[key] = (hook, users + 1)
    return hook


def _release_hook(key: tuple[str, float | None]) -> None:
    """One wait is done with the hook; the last one drops it, so the next wait reads the connection anew."""
    with _HOOKS_LOCK:
        hook, users = _HOOKS.pop(key)
        if users > 1:
            _HOOKS[key] = (hook, users - 1)


def _scrubbed(value: Any, secret: SecretStr) -> Any:
    """``value`` (JSON data, nested a few levels) with the key scrubbed from every string in it."""
    if isinstance(value, str):
        return scrub(value, secret)
    if isinstance(value, dict):
        return {key: _scrubbed(item, secret) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrubbed(item, secret) for item in value]
    return value


def error_from_event(event: dict[str, Any], message: str) -> PPIOError:
    """
    The error an ``error`` event stands for: the class poke mode raises, when it is one of ours.

    :param event: The trigger's ``error`` event.
    :param message: The event's message.
    """
    cls = getattr(exceptions, str(event.get("error_type")), None)
    if not (isinstance(cls, type) and issubclass(cls, exceptions.PPIOError)):
        cls = exceptions.PPIOError
    error = cls(message or f"Could not wait for prewarm task {event.get('prewarm_task_id')!r}")
    http_status = event.get("http_status")
    error.http_status = http_status if isinstance(http_status, int) else None
    return error


def task_from_event(
    event: Any, *, expected_task_id: str, reader: str, timeout_error: Callable[[str], BaseException]
) -> PrewarmTask:
    """
    The succeeded or failed prewarm task a trigger event reports, checked: what every ``execute_complete`` does first.

    An unknown event, or one that contradicts itself, fails closed; ``timeout`` raises ``timeout_error(message)``;
    ``error`` raises the error class poke mode would raise.

    :param event: The payload of the trigger's event.
    :param expected_task_id: The prewarm task the trigger was started for.
    :param reader: Who reads the event (``"sensor"``, ``"operator"``), for the message.
    :param timeout_error: Builds the exception a ``timeout`` event raises, from the event's message.
    """
    status = event.get("status") if isinstance(event, dict) else None
    if not isinstance(event, dict) or status not in EVENT_STATUSES or event.get("prewarm_task_id") != expected_task_id:
        raise AirflowException(
            f"Prewarm task {expected_task_id!r}: the trigger sent an event this {reader} does not understand "
            f"(status {status!r}); failing instead of guessing"
        )
    message = str(event.get("message") or "")
    if status == EVENT_TIMEOUT:
        raise timeout_error(message)
    if status == EVENT_ERROR:
        raise error_from_event(event, message)
    task = PrewarmTask.from_api(event.get("task"))
    if task.task_id == expected_task_id and (
        task.outcome is Outcome.FAILED or (status == EVENT_SUCCESS and task.outcome is Outcome.SUCCEEDED)
    ):
        return task
    raise AirflowException(
        f"Prewarm task {expected_task_id!r}: the trigger reported {status!r} for task {task.task_id!r} with "
        f"status {task.status.status!r}; failing instead of guessing"
    )
