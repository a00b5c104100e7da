"""
The one retry policy of both transports, on ``tenacity.Retrying``.

Kept apart from :mod:`._shared`, which the trigger module imports at DAG parse time, so that parsing a
DAG does not import tenacity.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from tenacity import DoAttempt, DoSleep, RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from airflow_provider_ppio.exceptions import PPIOError, PPIORateLimitError, PPIOTransportError, PPIOUnreachableError
from airflow_provider_ppio.hooks._shared import ClientSettings, Patience

T = TypeVar("T")


class WarningLogger(Protocol):
    """Anything with a stdlib-style ``warning`` (stdlib and Airflow 3 task loggers)."""

    def warning(self, msg: str, /, *args: Any, **kwargs: Any) -> Any: ...


def is_retryable(error: BaseException, *, idempotent: bool = True) -> bool:
    """
    Whether a failed attempt should be tried again.

    :param error: What the attempt raised.
    :param idempotent: False for requests that must not run twice (create): then only errors that
        prove the server did not act are retried: a connection never made and a 429.
    """
    if not isinstance(error, PPIOError) or not error.transient:
        return False
    if idempotent or isinstance(error, PPIORateLimitError):
        return True
    return isinstance(error, PPIOTransportError) and not error.request_sent


def backoff(settings: ClientSettings, attempt: int) -> float:
    """
    The wait after failed attempt ``attempt`` (1, 2, ...): ``backoff_initial`` doubled per attempt, capped at
    ``retry_wait_max``, then a random half of it dropped. The jitter grows with the wait, so waits that failed
    together (thousands of triggers in one outage) spread out instead of coming back in waves.

    :param settings: ``backoff_initial`` and ``retry_wait_max``.
    :param attempt: The attempt that just failed.
    """
    base = min(settings.retry_wait_max, settings.backoff_initial * 2 ** min(attempt - 1, 64))
    return float(base * random.uniform(0.5, 1.0))


def retry_arguments(
    settings: ClientSettings,
    *,
    what: str,
    log: WarningLogger,
    idempotent: bool = True,
    patience: Patience | None = None,
) -> dict[str, Any]:
    """
    Keyword arguments for ``tenacity.Retrying``: the one policy of both transports.

    Transient errors (network, timeouts, 429, 5xx) are retried after :func:`backoff`, or after what a 429's
    ``Retry-After`` asks (capped at ``retry_wait_max``). A call stops after ``max_attempts``; a wait
    (``patience``) goes on until ``unreachable_timeout`` or its deadline, with a last attempt at the limit.

    :param settings: Attempts and waits come from here.
    :param what: ``METHOD path``, for the log line before each wait.
    :param log: Where to say that a retry is coming.
    :param idempotent: See :func:`is_retryable`.
    :param patience: Retry by time instead of by attempts.
    """
    started = time.monotonic()

    def wait(retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        if isinstance(error, PPIORateLimitError) and error.retry_after is not None:
            seconds = min(error.retry_after, settings.retry_wait_max)
        else:
            seconds = backoff(settings, retry_state.attempt_number)
        if patience is not None:
            seconds = min(seconds, max(0.0, patience.remaining(started)))
        return seconds

    def stop(retry_state: RetryCallState) -> bool:
        if patience is None:
            return bool(stop_after_attempt(settings.max_attempts)(retry_state))
        return patience.remaining(started) <= 0

    def before_sleep(retry_state: RetryCallState) -> None:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        seconds = retry_state.next_action.sleep if retry_state.next_action else 0.0
        if patience is None:
            log.warning(
                "PPIO API %s failed (%s); retrying in %.1fs (attempt %d of %d)",
                what,
                error,
                seconds,
                retry_state.attempt_number + 1,
                settings.max_attempts,
            )
        else:
            log.warning(
                "PPIO API %s failed (%s); no usable answer for %.0fs, retrying in %.1fs (giving up after %gs)",
                what,
                error,
                time.monotonic() - started,
                seconds,
                patience.unreachable_timeout,
            )

    return {
        "stop": stop,
        "wait": wait,
        "retry": retry_if_exception(lambda error: is_retryable(error, idempotent=idempotent)),
        "before_sleep": before_sleep,
        "reraise": True,
    }


async def retry_async(policy: dict[str, Any], attempt: Callable[[], Awaitable[T]]) -> T:
    """
    Run ``attempt`` under ``policy`` in the event loop: ``tenacity.Retrying``'s own decisions, with the waits
    awaited. The first try runs before any retry state is built, since every trigger poll is one call and
    almost all of them succeed at once; ``AsyncRetrying`` would also inspect every callback again per call.

    :param policy: What :func:`retry_arguments` returns.
    :param attempt: One try (a new coroutine per call).
    """
    try:
        return await attempt()
    except BaseException:  # the policy decides; what it does not retry, iter() raises
        first_failure = sys.exc_info()
    retrying = Retrying(**policy)
    retrying.begin()
    state = RetryCallState(retrying, fn=None, args=(), kwargs={})
    state.set_exception(first_failure)  # type: ignore[arg-type]
    while True:
        action = retrying.iter(retry_state=state)
        if isinstance(action, DoAttempt):
            try:
                state.set_result(await attempt())
            except BaseException:
                state.set_exception(sys.exc_info())  # type: ignore[arg-type]
        elif isinstance(action, DoSleep):
            state.prepare_for_next_attempt()
            await asyncio.sleep(action)
        else:
            return action  # type: ignore[no-any-return]


def gave_up(error: PPIOError, patience: Patience, where: str) -> PPIOError:
    """
    What a wait raises when its retries stop: the last error, or :class:`PPIOUnreachableError` naming it
    when ``unreachable_timeout`` ran out (the deadline's own timeout is the caller's to report).

    :param error: The last attempt's error.
    :param patience: The wait's limits.
    :param where: ``METHOD path``, for the message.
    """
    if not error.transient or (patience.deadline is not None and time.time() >= patience.deadline):
        return error
    return PPIOUnreachableError(
        f"{where}: the PPIO API gave no usable answer for {patience.unreachable_timeout:g}s "
        f"(unreachable_timeout); last error: {error}",
        request_sent=True,
    )
