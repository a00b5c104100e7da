"""
The one place that says what a prewarm task's status means for a waiting gate.

Standard library only, so that operators and sensors can import it when a DAG file is parsed (the
pydantic models in :mod:`.models` load when a task runs).
"""

from __future__ import annotations

import enum


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
