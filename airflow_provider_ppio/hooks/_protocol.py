"""
What the sync and async transports share: settings, URLs, headers, and reading responses.

Nothing here does I/O, so both transports (and the tests) use exactly the same rules.
"""

from __future__ import annotations

import ipaddress
import json
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit

from airflow_provider_ppio import __version__
from airflow_provider_ppio.exceptions import (
    PPIOAPIError,
    PPIOAuthError,
    PPIOBadRequestError,
    PPIOBadResponseError,
    PPIOConnectionConfigError,
    PPIOInvalidInputError,
    PPIONotFoundError,
    PPIOQuotaExceededError,
    PPIORateLimitError,
    PPIOServerError,
)
from airflow_provider_ppio.get_provider_info import DEFAULT_BASE_URL

PREWARM_TASKS_PATH = "/gpus/v2/prewarm-tasks"
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_ATTEMPTS = 5
#: Longest wait between two attempts, whatever ``Retry-After`` asks for.
DEFAULT_RETRY_WAIT_MAX = 60.0
DEFAULT_BACKOFF_INITIAL = 1.0
#: No prewarm answer comes near this; a larger body is refused rather than read into memory.
MAX_BODY_BYTES = 8 * 1024 * 1024
TASK_ID_MAX_LENGTH = 255
_SNIPPET_CHARS = 200


@dataclass(frozen=True)
class ClientSettings:
    """
    Everything a transport needs to call the API, read once from the Airflow connection.

    :param base_url: Scheme and host (and port) of the API, no trailing slash.
    :param api_key: The bearer token; never shown by ``repr``.
    :param timeout: Longest time in seconds one attempt may take, body included.
    :param max_attempts: Tries per call on transient errors; 1 disables retries.
    :param backoff_initial: First backoff wait in seconds (doubles each attempt, with jitter).
    :param retry_wait_max: Cap in seconds on any wait, ``Retry-After`` included.
    """

    base_url: str
    api_key: str = field(repr=False)
    timeout: float = DEFAULT_TIMEOUT
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_initial: float = DEFAULT_BACKOFF_INITIAL
    retry_wait_max: float = DEFAULT_RETRY_WAIT_MAX

    @classmethod
    def from_connection(
        cls,
        conn_id: str,
        *,
        host: str | None,
        password: str | None,
        extra: Mapping[str, Any],
        overrides: Mapping[str, Any] | None = None,
    ) -> ClientSettings:
        """
        Build settings from an Airflow connection's fields, with clear errors naming the connection.

        :param conn_id: The connection id, for error messages.
        :param host: The connection's host: the base URL (scheme optional, https assumed).
        :param password: The API key.
        :param extra: The connection's extras (``timeout``, ``max_attempts``, ``backoff_initial``,
            ``retry_wait_max``).
        :param overrides: Values given to the hook directly; they win over the extras.
        """
        api_key = (password or "").strip()
        if not api_key:
            raise PPIOConnectionConfigError(
                f"Connection {conn_id!r} has no API key: put your PPIO API key in its password "
                '("API Key") field, e.g. AIRFLOW_CONN_PPIO_DEFAULT=\'{"conn_type": "ppio", "password": "sk_..."}\''
            )
        options = {**extra, **{k: v for k, v in (overrides or {}).items() if v is not None}}
        return cls(
            base_url=normalize_base_url(conn_id, host),
            api_key=api_key,
            timeout=_positive(conn_id, options, "timeout", DEFAULT_TIMEOUT, float),
            max_attempts=int(_positive(conn_id, options, "max_attempts", DEFAULT_MAX_ATTEMPTS, int)),
            backoff_initial=_positive(conn_id, options, "backoff_initial", DEFAULT_BACKOFF_INITIAL, float),
            retry_wait_max=_positive(conn_id, options, "retry_wait_max", DEFAULT_RETRY_WAIT_MAX, float),
        )

    @property
    def connect_timeout(self) -> float:
        """Connecting gets at most 10 s of the attempt's budget."""
        return min(10.0, self.timeout)


def _positive(conn_id: str, options: Mapping[str, Any], name: str, default: float, kind: type) -> float:
    value = options.get(name)
    if value is None or value == "":
        return default
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (number > 0) or math.isinf(number):
        raise PPIOConnectionConfigError(
            f"Connection {conn_id!r}: extra {name!r} must be a positive {kind.__name__}, got {value!r}"
        )
    return float(number)


def normalize_base_url(conn_id: str, host: str | None) -> str:
    """
    Turn the connection's host into ``scheme://host[:port]`` (https when no scheme is given).

    :param conn_id: The connection id, for error messages.
    :param host: What the user typed as Base URL; empty means the PPIO default.
    """
    raw = (host or "").strip() or DEFAULT_BASE_URL
    if "://" not in raw:
        raw = "https://" + raw
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PPIOConnectionConfigError(
            f"Connection {conn_id!r}: Base URL {raw!r} is not an http(s) URL such as {DEFAULT_BASE_URL}"
        )
    if parts.query or parts.fragment or parts.username or parts.password:
        raise PPIOConnectionConfigError(
            f"Connection {conn_id!r}: Base URL must not carry credentials, a query or a fragment"
        )
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def is_loopback(base_url: str) -> bool:
    """Whether the base URL points at this machine (plain http is fine there)."""
    hostname = urlsplit(base_url).hostname or ""
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def prewarm_task_path(task_id: object) -> str:
    """
    The path of one prewarm task, with the id sent as exactly one percent-encoded segment.

    :param task_id: The prewarm task id: a string of 1-255 characters.
    """
    if not isinstance(task_id, str):
        raise PPIOInvalidInputError(f"prewarm task id must be a string, got {type(task_id).__name__}")
    if not 1 <= len(task_id) <= TASK_ID_MAX_LENGTH:
        raise PPIOInvalidInputError(
            f"prewarm task id must be 1-{TASK_ID_MAX_LENGTH} characters long, got {len(task_id)}"
        )
    if task_id in (".", ".."):
        # Percent-encoding does not protect dot segments: clients and servers may resolve them.
        raise PPIOInvalidInputError(f"prewarm task id {task_id!r} is not a valid id")
    return f"{PREWARM_TASKS_PATH}/{quote(task_id, safe='')}"


def api_url(settings: ClientSettings, path: str) -> str:
    """
    Join the base URL and an API path; refuses anything that could leave the API's host.

    :param settings: The client settings.
    :param path: An absolute path such as ``/gpus/v2/prewarm-tasks``.
    """
    if not isinstance(path, str) or not path.startswith("/") or path.startswith("//"):
        raise PPIOInvalidInputError(f"API path must start with a single '/', got {path!r}")
    if any(char in path for char in "?#\\") or any(ord(char) < 0x21 for char in path):
        raise PPIOInvalidInputError(f"API path must not contain '?', '#', '\\\\' or whitespace: {path!r}")
    return settings.base_url + path


def request_headers(settings: ClientSettings, *, json_body: bool) -> dict[str, str]:
    """
    Headers for one request.

    :param settings: The client settings (the key goes into ``Authorization`` only).
    :param json_body: Whether the request carries a JSON body.
    """
    headers = {
        "Authorization": f"Bearer {settings.api_key}",
        "Accept": "application/json",
        "User-Agent": USER_AGENT,
    }
    if json_body:
        headers["Content-Type"] = "application/json"
    return headers


def _user_agent() -> str:
    try:
        from airflow import __version__ as airflow_version
    except ImportError:  # pragma: no cover - Airflow is a hard dependency
        airflow_version = "unknown"
    python = ".".join(map(str, sys.version_info[:3]))
    return f"airflow-provider-ppio/{__version__} (apache-airflow/{airflow_version}; python/{python})"


USER_AGENT = _user_agent()


def interpret_response(
    *,
    method: str,
    path: str,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    secret: str,
    allow_empty: bool = False,
) -> Any:
    """
    Turn a complete HTTP response into decoded JSON, or raise the typed error it stands for.

    :param method: The request's method, for messages.
    :param path: The request's path, for messages.
    :param status: HTTP status code.
    :param headers: Response headers (case-insensitive mapping).
    :param body: The whole response body.
    :param secret: The API key, scrubbed from anything the server echoes back.
    :param allow_empty: Accept an empty 2xx body (returned as ``{}``).
    """
    where = f"{method} {path}"
    if 200 <= status < 300:
        if not body.strip() and allow_empty:
            return {}
        return decode_json(body, headers, where=where, status=status, secret=secret)
    if 300 <= status < 400:
        raise PPIOBadResponseError(
            f"{where}: the API answered HTTP {status} (a redirect); redirects are not followed "
            "so the API key never goes to another host. Check the connection's Base URL.",
            status_code=status,
        )
    raise error_for_status(status, headers, body, where=where, secret=secret)


def decode_json(body: bytes, headers: Mapping[str, str], *, where: str, status: int, secret: str = "") -> Any:
    """
    Decode a JSON body or raise :class:`PPIOBadResponseError` saying what arrived instead.

    :param body: The response body.
    :param headers: Response headers.
    :param where: ``METHOD path``, for messages.
    :param status: HTTP status code, for messages.
    :param secret: The API key, scrubbed from the snippet of the body.
    """
    content_type = headers.get("Content-Type", "") or "no Content-Type"
    if not body.strip():
        raise PPIOBadResponseError(f"{where}: HTTP {status} with an empty body", status_code=status)
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise PPIOBadResponseError(
            f"{where}: HTTP {status} with a body that is not JSON ({content_type}): "
            f"{snippet(scrub(body.decode('utf-8', 'replace'), secret) or '')!r}",
            status_code=status,
        ) from None


_ERROR_CLASSES: dict[int, type[PPIOAPIError]] = {
    401: PPIOAuthError,
    403: PPIOAuthError,
    404: PPIONotFoundError,
    429: PPIORateLimitError,
}


def error_for_status(status: int, headers: Mapping[str, str], body: bytes, *, where: str, secret: str) -> PPIOAPIError:
    """
    Build the typed error for an HTTP error response, with the API's message parsed defensively.

    :param status: HTTP status code (>= 400).
    :param headers: Response headers.
    :param body: The response body (its shape is not documented).
    :param where: ``METHOD path``, for messages.
    :param secret: The API key, scrubbed from the API's message.
    """
    api_message, api_reason = parse_error_body(body, secret)
    api_message = scrub(api_message, secret)
    api_reason = scrub(api_reason, secret)
    cls = _ERROR_CLASSES.get(status) or (PPIOServerError if status >= 500 else PPIOBadRequestError)
    if cls is PPIOBadRequestError and _mentions_quota(api_message, api_reason):
        cls = PPIOQuotaExceededError
    text = f"{where}: HTTP {status} {_HINTS.get(cls, '')}".rstrip()
    if api_reason:
        text += f" [{api_reason}]"
    if api_message:
        text += f": {api_message}"
    if cls is PPIOQuotaExceededError:
        text += (
            " (the account allows a limited number of concurrent prewarm tasks, 5 by default: wait for"
            " running ones to finish, delete finished ones, or ask PPIO support for a higher quota)"
        )
    kwargs: dict[str, Any] = {"status_code": status, "api_message": api_message, "api_reason": api_reason}
    if cls is PPIORateLimitError:
        return PPIORateLimitError(text, retry_after=parse_retry_after(headers.get("Retry-After")), **kwargs)
    return cls(text, **kwargs)


_HINTS: dict[type[PPIOAPIError], str] = {
    PPIOAuthError: "(check the API key in the connection's password field)",
    PPIONotFoundError: "(no such prewarm task)",
    PPIORateLimitError: "(rate limited)",
    PPIOServerError: "(PPIO API error)",
}


def _mentions_quota(*texts: str | None) -> bool:
    return any(text and "quota" in text.lower() for text in texts)


def parse_error_body(body: bytes, secret: str = "") -> tuple[str | None, str | None]:
    """
    Find the message and reason in an error body of unknown shape.

    Takes the first present of ``message``, ``error.message``, ``msg``, ``error`` (a string),
    ``detail``, else a snippet of the raw text.

    :param body: The response body.
    :param secret: The API key, scrubbed before anything is cut short (a cut must not keep part of it).
    """
    text = scrub(body.decode("utf-8", "replace").strip(), secret) or ""
    if not text:
        return None, None
    try:
        payload = json.loads(text)
    except ValueError:
        return snippet(text), None
    if not isinstance(payload, dict):
        return snippet(text), None
    error = payload.get("error")
    nested = error if isinstance(error, dict) else {}
    message = _first_text(
        payload.get("message"), nested.get("message"), payload.get("msg"), error, payload.get("detail"), secret=secret
    )
    reason = _first_text(
        payload.get("reason"), nested.get("code"), payload.get("code"), nested.get("type"), secret=secret
    )
    return (message or snippet(text)), reason


def _first_text(*candidates: Any, secret: str = "") -> str | None:
    for candidate in candidates:
        if isinstance(candidate, str) and candidate.strip():
            return snippet(scrub(candidate, secret) or "")
        if isinstance(candidate, int) and not isinstance(candidate, bool):
            return str(candidate)
    return None


def snippet(text: str) -> str:
    """Server text on one line, cut to a length fit for an error message (scrub the key first)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= _SNIPPET_CHARS else flat[: _SNIPPET_CHARS - 3] + "..."


def scrub(text: str | None, secret: str) -> str | None:
    """
    Replace the API key in text the server sent back.

    :param text: Text from the server.
    :param secret: The API key.
    """
    if text and secret and secret in text:
        return text.replace(secret, "***")
    return text


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """
    Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date; None if absent or bad.

    :param value: The header value.
    :param now: The current Unix time (for tests).
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return None
    return max(0.0, seconds)
