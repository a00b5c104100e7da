"""
The one retry policy for every PPIO call, sync (``tenacity.Retrying``) and async (``AsyncRetrying``).

Retried: network errors and timeouts, 429 (waiting what ``Retry-After`` asks, capped) and 5xx,
with exponential backoff and jitter. Everything else fails on the first answer.
"""

from __future__ import annotations

from typing import Any, Protocol

from tenacity import (
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)
from tenacity.wait import wait_base

from airflow_provider_ppio.exceptions import PPIOError, PPIORateLimitError, PPIOTransportError
from airflow_provider_ppio.hooks._protocol import ClientSettings


class WarningLogger(Protocol):
    """Anything with a stdlib-style ``warning`` (stdlib and Airflow 3 task loggers)."""

    def warning(self, msg: str, /, *args: Any, **kwargs: Any) -> Any: ...


class WaitRetryAfterOrBackoff(wait_base):
    """
    Wait what a 429's ``Retry-After`` asks (capped), else exponential backoff with jitter.

    :param initial: First backoff in seconds.
    :param cap: Longest wait in seconds.
    """

    def __init__(self, initial: float, cap: float) -> None:
        self.cap = cap
        self.backoff = wait_exponential_jitter(multiplier=initial, max=cap, jitter=initial)

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, PPIORateLimitError) and error.retry_after is not None:
            return min(error.retry_after, self.cap)
        return float(self.backoff(retry_state))


def is_retryable(error: BaseException, *, idempotent: bool = True) -> bool:
    """
    Whether a failed attempt should be tried again.

    :param error: What the attempt raised.
    :param idempotent: False for requests that must not run twice (create): then only errors that
        prove the server did not act are retried: a refused connection and a 429.
    """
    if not isinstance(error, PPIOError) or not error.transient:
        return False
    if idempotent:
        return True
    if isinstance(error, PPIORateLimitError):
        return True
    return isinstance(error, PPIOTransportError) and not error.request_sent


def retry_arguments(
    settings: ClientSettings, *, what: str, log: WarningLogger, idempotent: bool = True
) -> dict[str, Any]:
    """
    Keyword arguments for ``tenacity.Retrying`` / ``AsyncRetrying``: the shared policy.

    :param settings: Attempts and waits come from here.
    :param what: ``METHOD path``, for the log line before each wait.
    :param log: Where to say that a retry is coming.
    :param idempotent: See :func:`is_retryable`.
    """

    def before_sleep(retry_state: RetryCallState) -> None:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        wait = retry_state.next_action.sleep if retry_state.next_action else 0.0
        log.warning(
            "PPIO API %s failed (%s); retrying in %.1fs (attempt %d of %d)",
            what,
            error,
            wait,
            retry_state.attempt_number + 1,
            settings.max_attempts,
        )

    return {
        "stop": stop_after_attempt(settings.max_attempts),
        "wait": WaitRetryAfterOrBackoff(settings.backoff_initial, settings.retry_wait_max),
        "retry": retry_if_exception(lambda error: is_retryable(error, idempotent=idempotent)),
        "before_sleep": before_sleep,
        "reraise": True,
    }
