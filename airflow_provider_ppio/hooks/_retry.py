"""
The one retry policy of both transports: :class:`RetryPolicy` gives ``tenacity.Retrying`` (sync) and
``tenacity.AsyncRetrying`` (async) the same stop, wait, retry and before_sleep callables.

Kept apart from :mod:`._shared`, which the trigger module imports at DAG parse time, so that parsing a
DAG does not import tenacity.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from tenacity import AsyncRetrying, RetryCallState, Retrying

from airflow_provider_ppio.exceptions import PPIOError, PPIORateLimitError, PPIOTransportError, PPIOUnreachableError
from airflow_provider_ppio.hooks._shared import ClientSettings, Patience, scrub

T = TypeVar("T")

#: The shortest wait between two attempts: a tiny ``backoff_initial`` or ``retry_wait_max`` cannot spin.
MIN_WAIT = 0.01
#: While the same error repeats, its WARNING line comes back at most this often (seconds), as a summary.
SUMMARY_EVERY = 300.0


class RetryLogger(Protocol):
    """Anything with stdlib-style ``debug``, ``info`` and ``warning`` (stdlib and Airflow 3 task loggers)."""

    def debug(self, msg: str, /, *args: Any, **kwargs: Any) -> Any: ...

    def info(self, msg: str, /, *args: Any, **kwargs: Any) -> Any: ...

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
    ``retry_wait_max``, then a random half of it dropped, and never under :data:`MIN_WAIT`. The jitter grows
    with the wait, so waits that failed together (thousands of triggers in one outage) spread out instead of
    coming back in waves.

    :param settings: ``backoff_initial`` and ``retry_wait_max``.
    :param attempt: The attempt that just failed.
    """
    base = min(settings.retry_wait_max, max(settings.backoff_initial, MIN_WAIT) * 2 ** min(attempt - 1, 64))
    return max(MIN_WAIT, float(base * random.uniform(0.5, 1.0)))


class RetryPolicy:
    """
    How one call retries, for ``tenacity.Retrying`` and ``tenacity.AsyncRetrying`` alike.

    Transient errors (network, timeouts, 429, 5xx) are retried after :func:`backoff`. A 429's ``Retry-After``
    can make that wait longer, never shorter, and is capped at ``retry_wait_max``. A call stops after
    ``max_attempts``; a wait (``patience``) goes on until ``unreachable_timeout`` or its deadline, with a last
    attempt at the limit. The WARNING before a wait is logged when the error changes, then at most every
    :data:`SUMMARY_EVERY` seconds as a summary; the lines in between go to DEBUG.

    :param settings: Attempts and waits come from here.
    :param what: ``METHOD path``, for log lines and messages.
    :param log: Where to say that a retry is coming.
    :param idempotent: See :func:`is_retryable`.
    :param patience: Retry by time instead of by attempts.
    """

    def __init__(
        self,
        settings: ClientSettings,
        *,
        what: str,
        log: RetryLogger,
        idempotent: bool = True,
        patience: Patience | None = None,
    ) -> None:
        self.settings, self.what, self.log = settings, what, log
        self.idempotent, self.patience = idempotent, patience
        self.started = time.monotonic()  # built just before the call's first try
        self._failures = 0
        self._logged_kind: tuple[object, ...] | None = None
        self._logged_at = 0.0

    # -- tenacity's callables ----------------------------------------------------------------------

    def retry(self, retry_state: RetryCallState) -> bool:
        """Whether the attempt that just failed should be tried again."""
        error = _error(retry_state)
        return error is not None and is_retryable(error, idempotent=self.idempotent)

    def stop(self, retry_state: RetryCallState) -> bool:
        """Whether to give up: ``max_attempts`` reached, or the wait's time used up."""
        if self.patience is None:
            return retry_state.attempt_number >= self.settings.max_attempts
        return self.patience.remaining(self.started) <= 0

    def wait(self, retry_state: RetryCallState) -> float:
        """Seconds before the next attempt."""
        error = _error(retry_state)
        seconds = backoff(self.settings, retry_state.attempt_number)
        if isinstance(error, PPIORateLimitError) and error.retry_after is not None:
            seconds = max(seconds, min(error.retry_after, self.settings.retry_wait_max))
        if self.patience is not None:
            seconds = min(seconds, max(0.0, self.patience.remaining(self.started)))
        return seconds

    def before_sleep(self, retry_state: RetryCallState) -> None:
        """Say that a retry is coming: in full when the error changed, else a summary now and then."""
        error = _error(retry_state)
        self._failures += 1
        now = time.monotonic()
        kind = (type(error), getattr(error, "http_status", None), getattr(error, "request_sent", None))
        text = scrub(str(error), self.settings.secret)
        seconds = retry_state.upcoming_sleep
        if self.patience is None:
            then = (
                f"retrying in {seconds:.3g}s (attempt {retry_state.attempt_number + 1} of {self.settings.max_attempts})"
            )
        else:
            then = f"retrying in {seconds:.3g}s (giving up after {self.patience.unreachable_timeout:g}s)"
        if kind != self._logged_kind:
            self._logged_kind, self._logged_at = kind, now
            self.log.warning("PPIO API %s failed (%s); %s", self.what, text, then)
        elif now - self._logged_at >= SUMMARY_EVERY:
            self._logged_at = now
            elapsed = now - self.started
            line = "PPIO API %s still failing: %d failed attempts in %.0fs, last error: %s; %s"
            self.log.warning(line, self.what, self._failures, elapsed, text, then)
        else:
            self.log.debug("PPIO API %s failed again (%s); %s", self.what, text, then)

    # -- running a call ----------------------------------------------------------------------------

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments for ``tenacity.Retrying`` and ``tenacity.AsyncRetrying``."""
        return {
            "stop": self.stop,
            "wait": self.wait,
            "retry": self.retry,
            "before_sleep": self.before_sleep,
            "reraise": True,
        }

    def call(self, attempt: Callable[[], T]) -> T:
        """
        Run ``attempt`` until it succeeds or the policy gives up, and raise what it gave up on.

        :param attempt: One try.
        """
        # Nearly every poll succeeds at once: the first try builds no retry state. If it fails, tenacity
        # gets its error as its own first attempt and decides from there.
        try:
            return attempt()
        except PPIOError as error:
            first = error
        try:
            result = Retrying(**self.arguments())(_replay(first, attempt))
        except PPIOError as error:
            raise self._gave_up(error) from None
        self._recovered()
        return result

    async def acall(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """
        Async :meth:`call`, on ``tenacity.AsyncRetrying``.

        :param attempt: One try (a new coroutine per call).
        """
        try:
            return await attempt()
        except PPIOError as error:
            first = error
        try:
            result: T = await AsyncRetrying(sleep=_asleep, **self.arguments())(_areplay(first, attempt))
        except PPIOError as error:
            raise self._gave_up(error) from None
        self._recovered()
        return result

    def _recovered(self) -> None:
        elapsed = time.monotonic() - self.started
        self.log.info("PPIO API %s answered after %d failed attempt(s) in %.0fs", self.what, self._failures, elapsed)

    def _gave_up(self, error: PPIOError) -> PPIOError:
        """The last error, or for a wait out of ``unreachable_timeout``, :class:`PPIOUnreachableError` naming it."""
        return error if self.patience is None else gave_up(error, self.patience, self.what)


def gave_up(error: PPIOError, patience: Patience, what: str) -> PPIOError:
    """
    What a wait raises when its retries stop: the last error, or :class:`PPIOUnreachableError` naming it when
    ``unreachable_timeout`` ran out (the deadline's own timeout is the caller's to report).

    :param error: The last attempt's error.
    :param patience: The wait's limits.
    :param what: ``METHOD path``, for the message.
    """
    if not error.transient or (patience.deadline is not None and time.time() >= patience.deadline):
        return error
    return PPIOUnreachableError(
        f"{what}: the PPIO API gave no usable answer for {patience.unreachable_timeout:g}s "
        f"(unreachable_timeout); last error: {error}",
        request_sent=True,
    )


def _error(retry_state: RetryCallState) -> BaseException | None:
    outcome = retry_state.outcome
    return outcome.exception() if outcome is not None else None


def _replay(first: PPIOError, attempt: Callable[[], T]) -> Callable[[], T]:
    """``attempt``, whose first call raises ``first`` (the try made before tenacity) instead of trying again."""
    pending = [first]

    def again() -> T:
        if pending:
            raise pending.pop()
        return attempt()

    return again


def _areplay(first: PPIOError, attempt: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
    """Async :func:`_replay`."""
    pending = [first]

    async def again() -> T:
        if pending:
            raise pending.pop()
        return await attempt()

    return again


async def _asleep(seconds: float) -> None:
    await asyncio.sleep(seconds)
