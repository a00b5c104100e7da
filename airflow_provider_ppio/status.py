"""
The one place that says what a prewarm task's status means for a waiting gate.

Standard library only, so that operators and sensors can import it when a DAG file is parsed (the
pydantic models in :mod:`.models` load when a task runs).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_provider_ppio.models import PrewarmTask


class PrewarmTaskState(enum.StrEnum):
    """The documented values of ``status.status``."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Outcome(enum.StrEnum):
    """What a waiting gate should do about a prewarm task."""

    WAITING = "waiting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


TERMINAL_STATES = frozenset({PrewarmTaskState.SUCCEEDED, PrewarmTaskState.FAILED})

#: Most characters of one server-provided value quoted in a log line or a message.
QUOTE_LIMIT = 200


def clip(value: object, limit: int = QUOTE_LIMIT) -> str:
    """
    ``value`` as text cut to ``limit`` characters, for quoting what the server sent in a log line or a message
    (a status value of megabytes must not write megabytes of log on every poll).

    :param value: A server-provided value (usually a string).
    :param limit: Longest result, in characters.
    """
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def outcome_of(status: str) -> Outcome:
    """
    The only place that maps a status to what a gate does: ``succeeded`` ends the wait, ``failed``
    fails it, and every other value (``pending``, ``running``, or one the API adds later) keeps it waiting.

    :param status: The raw ``status.status`` value.
    """
    try:
        state = PrewarmTaskState(status.strip().lower())
    except ValueError:
        return Outcome.WAITING
    if state is PrewarmTaskState.SUCCEEDED:
        return Outcome.SUCCEEDED
    if state is PrewarmTaskState.FAILED:
        return Outcome.FAILED
    return Outcome.WAITING


def log_waiting(log: Any, task: PrewarmTask, detail: str = "") -> None:
    """
    Log that ``task`` is not finished: info for a known status, a warning for one this provider does not know.

    :param log: The caller's logger (a sensor's, an operator's or a trigger's ``log``).
    :param task: A task whose outcome is :attr:`Outcome.WAITING`.
    :param detail: Text appended to the line (how long it has run, how often it is polled).
    """
    if task.state is None:
        log.warning(
            "Prewarm task %s has a status this provider does not know (%r); still waiting%s",
            clip(task.task_id),
            clip(task.status.status),
            detail,
        )
    else:
        log.info("Prewarm task %s is %s%s", clip(task.task_id), task.status.status.strip(), detail)
