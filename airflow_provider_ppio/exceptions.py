"""
The provider's errors: every failure the hook raises is a :class:`PPIOError`, one class per thing the user does.

Errors no retry can cure also subclass ``AirflowFailException``, so the task fails at once instead of spending
its ``retries``. The contract, row by row, is the table in docs/reliability.md.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException


class PPIOError(AirflowException):
    """
    Base class of every error raised by this provider.

    :param message: What went wrong, for a person reading the task log.
    :param status_code: The HTTP status of the response, when there was one (kept as ``http_status``).
    :param api_message: The message the API gave, parsed from its error body.
    :param api_reason: The API's machine-readable reason or error code, when it gave one.
    """

    #: Whether waiting and asking again may help (a sensor keeps waiting on these).
    transient: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        api_message: str | None = None,
        api_reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = status_code
        self.api_message = api_message
        self.api_reason = api_reason

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments would otherwise be lost when Airflow pickles the exception.
        return (_rebuild, (type(self), self.message, self.__dict__.copy()))


def _rebuild(cls: type[PPIOError], message: str, state: dict[str, object]) -> PPIOError:
    error = cls.__new__(cls)
    PPIOError.__init__(error, message)
    error.__dict__.update(state)
    return error


class PPIOInvalidInputError(PPIOError, AirflowFailException, ValueError):
    """An argument is not acceptable (fix the DAG); raised before any request is sent."""


class PPIOConnectionConfigError(PPIOError, AirflowFailException):
    """
    The Airflow connection (or the environment it reads) must be fixed: type, API key, base URL, port, extras,
    the CA bundle (a certificate that does not verify) or a host name that does not exist.
    """


class PPIOBadRequestError(PPIOError, AirflowFailException):
    """The API refused the request as invalid (400 and 4xx codes without a class of their own)."""


class PPIOQuotaExceededError(PPIOError):
    """
    The account's prewarm quota is used up (``IMAGE_PREWARM_NUM_LIMIT`` or a "quota" refusal, any status).

    Not a bad request: the same request succeeds once a slot is free, so task retries apply.
    """


class PPIOAuthError(PPIOError, AirflowFailException):
    """The API key is missing, wrong (401) or lacks permission (403)."""


class PPIONotFoundError(PPIOError, AirflowFailException):
    """The prewarm task (or path) does not exist (404)."""


class PPIORateLimitError(PPIOError):
    """
    The API is rate limiting this key (429).

    :param retry_after: Seconds the API asked us to wait, when it said so.
    """

    transient = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class PPIOServerError(PPIOError):
    """The API failed on its side (5xx), or gave up waiting for the request (408): transient, maybe acted on."""

    transient = True


class PPIOTransportError(PPIOError):
    """
    No usable answer arrived: connection refused or reset, DNS not answering, or a timeout.

    :param request_sent: False only when the request surely never reached the server.
    """

    transient = True

    def __init__(self, message: str, *, request_sent: bool = True) -> None:
        super().__init__(message)
        self.request_sent = request_sent


class PPIOUnreachableError(PPIOTransportError):
    """A wait gave up after ``unreachable_timeout`` without a usable answer; the message carries the last error."""

    transient = False


class PPIOPrewarmFailedError(PPIOError, AirflowFailException):
    """
    The prewarm task ended in ``failed``; the message carries the API's error, message and reasons.

    :param message: The failure summary.
    :param prewarm_task_id: The prewarm task that failed.
    """

    def __init__(self, message: str, *, prewarm_task_id: str = "", **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.prewarm_task_id = prewarm_task_id


class PPIOBadResponseError(PPIOError):
    """The API answered, but the answer is unusable (not JSON, wrong shape, too large, a redirect)."""


#: Old names, still importable (a stored trigger event may name one): old name -> the class that replaced it.
_DEPRECATED = {
    "PPIOAPIError": PPIOError,
    "PPIOTimeoutError": PPIOTransportError,
    "PPIOTLSError": PPIOConnectionConfigError,
    "PPIOUnknownHostError": PPIOConnectionConfigError,
}


def __getattr__(name: str) -> type[PPIOError]:
    if name in _DEPRECATED:
        new = _DEPRECATED[name]
        warnings.warn(f"{name} is deprecated: use {new.__name__}", DeprecationWarning, stacklevel=2)
        return new
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
