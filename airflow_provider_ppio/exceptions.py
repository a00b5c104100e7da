"""
The provider's error tree: every failure the hook raises is a :class:`PPIOError`.

Errors that no retry of the Airflow task can cure (a wrong key, an unknown task, a bad request, a
certificate that does not verify, broken connection settings, a failed prewarm) also subclass
``AirflowFailException``, so the task fails at once instead of spending its ``retries``.
The contract, row by row, is the table in docs/reliability.md.
"""

from __future__ import annotations

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
    """An argument is not acceptable; raised before any request is sent."""


class PPIOConnectionConfigError(PPIOError, AirflowFailException):
    """
    The Airflow connection is unusable: not of type ``ppio``, no API key, a bad base URL or port, plain http to
    another machine without ``allow_insecure_http``, bad extras or CA bundle. Raised before any request.
    """


class PPIOAPIError(PPIOError):
    """The API answered with an HTTP error status."""


class PPIOBadRequestError(PPIOAPIError, AirflowFailException):
    """The API refused the request as invalid (400 and 4xx codes without a class of their own)."""


class PPIOQuotaExceededError(PPIOAPIError):
    """
    The account's prewarm quota (5 tasks by default) is used up: PPIO's ``IMAGE_PREWARM_NUM_LIMIT`` ("Image
    prewarm number exceeds limit") or a "quota" refusal, whatever the HTTP status (400, 403 or 429).

    Not a :class:`PPIOBadRequestError`: the same request succeeds once a slot is free, so task
    retries apply.
    """


class PPIOAuthError(PPIOAPIError, AirflowFailException):
    """The API key is missing, wrong (401) or lacks permission (403)."""


class PPIONotFoundError(PPIOAPIError, AirflowFailException):
    """The prewarm task (or path) does not exist (404)."""


class PPIORateLimitError(PPIOAPIError):
    """
    The API is rate limiting this key (429).

    :param retry_after: Seconds the API asked us to wait, when it said so.
    """

    transient = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class PPIOServerError(PPIOAPIError):
    """The API failed on its side (5xx), or gave up waiting for the request (408): transient, maybe acted on."""

    transient = True


class PPIOTransportError(PPIOError):
    """
    No usable answer arrived: connection refused or reset, DNS failure, or a timeout.

    :param request_sent: False only when the request surely never reached the server.
    """

    transient = True

    def __init__(self, message: str, *, request_sent: bool = True) -> None:
        super().__init__(message)
        self.request_sent = request_sent


class PPIOTimeoutError(PPIOTransportError):
    """The API did not answer within the request timeout."""


class PPIOUnreachableError(PPIOTransportError):
    """
    A wait gave up: the API gave no usable answer for longer than ``unreachable_timeout``.

    The message carries the last error. Task retries apply: the outage may be over by then.
    """

    transient = False


class PPIOTLSError(PPIOTransportError, AirflowFailException):
    """
    The TLS handshake failed (a certificate that does not verify, a server that does not speak TLS).

    Permanent: asking again gets the same certificate. The message names the CA bundle used.
    """

    transient = False


class PPIOUnknownHostError(PPIOTransportError, AirflowFailException):
    """The base URL's host name does not exist (DNS answered that there is no such name)."""

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
