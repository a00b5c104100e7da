"""The provider's error tree: every failure the hook raises is a :class:`PPIOError`."""

from __future__ import annotations

from typing import ClassVar

from airflow.providers.common.compat.sdk import AirflowException


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


class PPIOInvalidInputError(PPIOError, ValueError):
    """An argument is not acceptable; raised before any request is sent."""


class PPIOConnectionConfigError(PPIOError):
    """The Airflow connection is missing or incomplete (no API key, bad base URL, bad extras)."""


class PPIOAPIError(PPIOError):
    """The API answered with an HTTP error status."""


class PPIOBadRequestError(PPIOAPIError):
    """The API refused the request as invalid (400 and 4xx codes without a class of their own)."""


class PPIOQuotaExceededError(PPIOBadRequestError):
    """The account's prewarm quota (5 concurrent tasks by default) is used up."""


class PPIOAuthError(PPIOAPIError):
    """The API key is missing, wrong (401) or lacks permission (403)."""


class PPIONotFoundError(PPIOAPIError):
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
    """The API failed on its side (5xx)."""

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


class PPIOBadResponseError(PPIOError):
    """The API answered, but the answer is unusable (not JSON, wrong shape, too large, a redirect)."""
