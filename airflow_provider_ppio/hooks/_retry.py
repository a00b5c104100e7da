"""The one retry policy of both transports, on tenacity: which errors are retried, how long to wait, when to give up."""

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
    :param idempotent: False for requests that must not run twice (create): then only errors that prove the
        server did not act are retried (a connection never made, a 429).
    """
    if not isinstance(error, PPIOError) or not error.transient:
        return False
    if idempotent or isinstance(error, PPIORateLimitError):
        return True
    return isinstance(error, PPIOTransportError) and not error.request_sent


def backoff(settings: ClientSettings, attempt: int) -> float:
    """
    The wait after failed attempt ``attempt`` (1, 2, ...): ``backoff_initial`` doubled per attempt, capped at
    ``retry_wait_max``, less a random half at most (so that waits that failed together spread out).

    :param settings: ``backoff_initial`` and ``retry_wait_max``.
    :param attempt: The attempt that just failed.
    """
    base = min(settings.retry_wait_max, max(settings.backoff_initial, MIN_WAIT) * 2 ** min(attempt - 1, 64))
    return max(MIN_WAIT, float(base * random.uniform(0.5, 1.0)))


class RetryPolicy:
    """
    How one call retries, as tenacity's ``stop``, ``wait``, ``retry`` and ``before_sleep`` for ``Retrying`` and
    ``AsyncRetrying`` alike: transient errors after :func:`backoff` (a 429's ``Retry-After`` may lengthen the
    wait, up to ``retry_wait_max``), until ``max_attempts`` or, for a wait (``patience``), its time is up. A
    WARNING is logged when the error changes, then at most every :data:`SUMMARY_EVERY` seconds; the rest goes
    to DEBUG.

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
        self._logged_kind: tuple[object, ...] | None = None
        self._logged_at = 0.0

    def retry(self, state: RetryCallState) -> bool:
        """Whether the attempt that just failed should be tried again."""
        error = _error(state)
        return error is not None and is_retryable(error, idempotent=self.idempotent)

    def stop(self, state: RetryCallState) -> bool:
        """Whether to give up: ``max_attempts`` reached, or the wait's time used up."""
        if self.patience is None:
            return state.attempt_number >= self.settings.max_attempts
        return self.patience.remaining(self.started) <= 0

    def wait(self, state: RetryCallState) -> float:
        """Seconds before the next attempt."""
        error = _error(state)
        seconds = backoff(self.settings, state.attempt_number)
        if isinstance(error, PPIORateLimitError) and error.retry_after is not None:
            seconds = max(seconds, min(error.retry_after, self.settings.retry_wait_max))
        if self.patience is not None:
            seconds = min(seconds, max(0.0, self.patience.remaining(self.started)))
        return seconds

    def before_sleep(self, state: RetryCallState) -> None:
        """Say that a retry is coming: in full when the error changed, else a summary now and then."""
        error, number, seconds = _error(state), state.attempt_number, state.upcoming_sleep
        if self.patience is None:
            then = f"retrying in {seconds:.3g}s (attempt {number + 1} of {self.settings.max_attempts})"
        else:
            then = f"retrying in {seconds:.3g}s (giving up after {self.patience.unreachable_timeout:g}s)"
        now = time.monotonic()
        kind = (type(error), getattr(error, "http_status", None), getattr(error, "request_sent", None))
        text = scrub(str(error), self.settings.secret)
        if kind != self._logged_kind:
            self._logged_kind, self._logged_at = kind, now
            self.log.warning("PPIO API %s failed (%s); %s", self.what, text, then)
        elif now - self._logged_at >= SUMMARY_EVERY:
            self._logged_at = now
            line = "PPIO API %s still failing: %d failed attempts in %.0fs, last error: %s; %s"
            self.log.warning(line, self.what, number, now - self.started, text, then)
        else:
            self.log.debug("PPIO API %s failed again (%s); %s", self.what, text, then)

    def _arguments(self) -> dict[str, Any]:
        return {"stop": self.stop, "wait": self.wait, "retry": self.retry, "before_sleep": self.before_sleep}

    def call(self, attempt: Callable[[], T]) -> T:
        """
        Run ``attempt`` until it succeeds or the policy gives up, and raise what it gave up on.

        :param attempt: One try.
        """
        # Nearly every poll succeeds at once, so the first try runs outside tenacity and builds no retry
        # state; its error becomes tenacity's first attempt.
        try:
            return attempt()
        except PPIOError as error:
            first = error
        retrying = Retrying(reraise=True, **self._arguments())
        try:
            number = 0
            for try_ in retrying:
                number += 1
                with try_:
                    if number == 1:
                        raise first
                    result = attempt()
        except PPIOError as error:
            raise self._gave_up(error) from None
        return self._succeeded(result, number)

    async def acall(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """
        Async :meth:`call`, on ``tenacity.AsyncRetrying``.

        :param attempt: One try (a new coroutine per call).
        """
        try:
            return await attempt()
        except PPIOError as error:
            first = error
        retrying = AsyncRetrying(reraise=True, sleep=_asleep, **self._arguments())
        try:
            number = 0
            async for try_ in retrying:
                number += 1
                with try_:
                    if number == 1:
                        raise first
                    result = await attempt()
        except PPIOError as error:
            raise self._gave_up(error) from None
        return self._succeeded(result, number)

    def _succeeded(self, result: T, number: int) -> T:
        elapsed = time.monotonic() - self.started
        self.log.info("PPIO API %s answered after %d failed attempt(s) in %.0fs", self.what, number - 1, elapsed)
        return result

    def _gave_up(self, error: PPIOError) -> PPIOError:
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


def _error(state: RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome is not None else None


async def _asleep(seconds: float) -> None:
    await asyncio.sleep(seconds)
