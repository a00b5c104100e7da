"""
What the sync and async transports share, with no network I/O: settings (timeouts, TLS, proxy), URLs and
headers, and how an answer or a transport failure becomes a typed error. The retry policy is in :mod:`._retry`.
"""

from __future__ import annotations

import enum
import ipaddress
import json
import math
import os
import re
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit

import certifi
from airflow import __version__ as airflow_version
from pydantic import SecretStr

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
    PPIOTimeoutError,
    PPIOTLSError,
    PPIOTransportError,
    PPIOUnknownHostError,
)
from airflow_provider_ppio.get_provider_info import DEFAULT_BASE_URL
from airflow_provider_ppio.hooks import TASK_ID_MAX_LENGTH

PREWARM_TASKS_PATH = "/gpus/v2/prewarm-tasks"
#: No prewarm answer comes near this; a larger body is refused rather than read into memory.
MAX_BODY_BYTES = 8 * 1024 * 1024
#: Environment variables that name a CA bundle, in the order they win (requests' order, then OpenSSL's).
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")

# -- settings --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSSettings:
    """
    How both transports verify the server's certificate.

    :param verify: False turns verification off (the connection extra ``verify: false``).
    :param ca_file: A CA bundle file, or None for certifi's bundle (what requests uses by default).
    :param ca_dir: A directory of hashed CA certificates (``SSL_CERT_DIR``), used when no file is given.
    :param source: Where the setting came from, for error messages.
    """

    verify: bool = True
    ca_file: str | None = None
    ca_dir: str | None = None
    source: str = "certifi's CA bundle (the default)"

    def describe(self) -> str:
        """The CA setting in words, for an error message that says what to change."""
        if not self.verify:
            return "verification is off (connection extra verify=false)"
        where = self.ca_file or self.ca_dir
        return f"{self.source}: {where}" if where else self.source


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
    :param unreachable_timeout: How long a wait may go without a usable answer before it fails.
    :param tls: How the server's certificate is verified.
    :param proxy: The HTTP(S) proxy for the base URL, or None.
    """

    base_url: str
    api_key: str = field(repr=False)
    timeout: float = 30.0
    max_attempts: int = 5
    backoff_initial: float = 1.0
    retry_wait_max: float = 60.0
    unreachable_timeout: float = 600.0
    tls: TLSSettings = field(default_factory=lambda: _tls_settings("", {}))
    proxy: str | None = None
    #: The key as a ``SecretStr``, for every frame that can raise: a traceback printed with its frames' locals
    #: (Airflow 3.0's console does) shows it masked.
    secret: SecretStr = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "secret", SecretStr(self.api_key))

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
        :param host: The base URL (scheme optional, https assumed).
        :param password: The API key.
        :param extra: The connection's extras: the fields above that are numbers, ``ca_bundle`` and ``verify``.
        :param overrides: Values given to the hook directly; they win over the extras.
        """
        api_key = (password or "").strip()
        if not api_key:
            raise PPIOConnectionConfigError(
                f"Connection {conn_id!r} has no API key: put your PPIO API key in its password "
                '("API Key") field, e.g. AIRFLOW_CONN_PPIO_DEFAULT=\'{"conn_type": "ppio", "password": "sk_..."}\''
            )
        options = {**extra, **{k: v for k, v in (overrides or {}).items() if v is not None}}
        base_url = _base_url(conn_id, host)

        def number(name: str, kind: type = float) -> Any:
            return _positive(conn_id, options, name, getattr(cls, name), kind)  # default: the field's

        return cls(
            base_url=base_url,
            api_key=api_key,
            timeout=number("timeout"),
            max_attempts=number("max_attempts", int),
            backoff_initial=number("backoff_initial"),
            retry_wait_max=number("retry_wait_max"),
            unreachable_timeout=number("unreachable_timeout"),
            tls=_tls_settings(conn_id, options),
            proxy=_environment_proxy(base_url),
        )

    @property
    def connect_timeout(self) -> float:
        """Connecting gets at most 10 s of the attempt's budget."""
        return min(10.0, self.timeout)


def _positive(conn_id: str, options: Mapping[str, Any], name: str, default: float, kind: type) -> Any:
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
    return kind(number)


def _base_url(conn_id: str, host: str | None) -> str:
    """The connection's host as ``scheme://host[:port][/path]`` (https when no scheme is given)."""
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


def _tls_settings(conn_id: str, options: Mapping[str, Any]) -> TLSSettings:
    """The extras ``verify`` and ``ca_bundle`` first, then the CA variables of the environment, then certifi."""
    verify = options.get("verify", True)
    if isinstance(verify, str) and verify.strip().lower() in ("false", "0", "no", "off"):
        verify = False
    elif isinstance(verify, str) and verify.strip().lower() in ("true", "1", "yes", "on", ""):
        verify = True
    if not isinstance(verify, bool):
        raise PPIOConnectionConfigError(f"Connection {conn_id!r}: extra 'verify' must be true or false, got {verify!r}")
    if not verify:
        return TLSSettings(verify=False, source="verification off")
    sources = [("connection extra 'ca_bundle'", options.get("ca_bundle"))]
    sources += [(name, os.environ.get(name)) for name in CA_BUNDLE_VARIABLES]
    for source, path in sources:
        if isinstance(path, str) and path.strip():
            path = os.path.expanduser(path.strip())
            if not os.path.exists(path):
                raise PPIOConnectionConfigError(
                    f"Connection {conn_id!r}: the CA bundle {path!r} from {source} does not exist"
                )
            if os.path.isdir(path):
                return TLSSettings(ca_dir=path, source=source)
            return TLSSettings(ca_file=path, source=source)
    ca_dir = os.environ.get("SSL_CERT_DIR", "").strip()
    if ca_dir and os.path.isdir(ca_dir):
        return TLSSettings(ca_dir=ca_dir, source="SSL_CERT_DIR")
    return TLSSettings(ca_file=certifi.where())


def _environment_proxy(base_url: str) -> str | None:
    """The proxy the environment (``HTTPS_PROXY``, ``NO_PROXY``...) names for ``base_url``, read as requests does."""
    proxies = urllib.request.getproxies()
    parts = urlsplit(base_url)
    if not proxies or urllib.request.proxy_bypass(parts.netloc):
        return None
    return proxies.get(parts.scheme) or proxies.get("all")


def is_loopback(base_url: str) -> bool:
    """Whether the base URL points at this machine (plain http is fine there)."""
    hostname = urlsplit(base_url).hostname or ""
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Patience:
    """
    How long a *wait* keeps asking, as opposed to a one-off call's ``max_attempts``.

    :param unreachable_timeout: Seconds without a usable answer after which the wait fails.
    :param deadline: Unix time at which the wait ends anyway (the caller then reports a timeout); None for none.
    """

    unreachable_timeout: float
    deadline: float | None = None

    def remaining(self, started: float) -> float:
        """Seconds left before either limit, from a ``time.monotonic()`` start."""
        left = self.unreachable_timeout - (time.monotonic() - started)
        if self.deadline is not None:
            left = min(left, self.deadline - time.time())
        return left


# -- requests --------------------------------------------------------------------------------------

#: What an API path may not contain: a query, a fragment, a backslash, whitespace or control characters.
_UNSAFE_PATH_CHARACTERS = re.compile(r"[?#\\\x00-\x20]")


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


def check_api_path(path: str) -> None:
    """
    Refuse an API path that could leave the API's host or change the request's meaning.

    :param path: An absolute path such as ``/gpus/v2/prewarm-tasks``.
    """
    if not isinstance(path, str) or not path.startswith("/") or path.startswith("//"):
        raise PPIOInvalidInputError(f"API path must start with a single '/', got {path!r}")
    if _UNSAFE_PATH_CHARACTERS.search(path):
        raise PPIOInvalidInputError(f"API path must not contain '?', '#', '\\\\' or whitespace: {path!r}")


_PYTHON = ".".join(map(str, sys.version_info[:3]))
USER_AGENT = f"airflow-provider-ppio/{__version__} (apache-airflow/{airflow_version}; python/{_PYTHON})"


def request_headers(settings: ClientSettings, *, json_body: bool) -> dict[str, str]:
    """
    Headers for one request; the key goes into ``Authorization`` only.

    :param settings: The client settings.
    :param json_body: Whether the request carries a JSON body.
    """
    headers = {"Authorization": f"Bearer {settings.api_key}", "Accept": "application/json", "User-Agent": USER_AGENT}
    if json_body:
        headers["Content-Type"] = "application/json"
    return headers


# -- answers ---------------------------------------------------------------------------------------


def interpret_response(
    *,
    method: str,
    path: str,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    secret: SecretStr,
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
    if 300 <= status < 400:
        raise PPIOBadResponseError(
            f"{where}: the API answered HTTP {status} (a redirect); redirects are not followed "
            "so the API key never goes to another host. Check the connection's Base URL.",
            status_code=status,
        )
    if status >= 400 or status < 200:
        raise _error_for_status(status, headers, body, where=where, secret=secret)
    if not body.strip():
        if allow_empty:
            return {}
        raise PPIOBadResponseError(f"{where}: HTTP {status} with an empty body", status_code=status)
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError):
        content_type = headers.get("Content-Type", "") or "no Content-Type"
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
_HINTS: dict[type[PPIOAPIError], str] = {
    PPIOAuthError: "(check the API key in the connection's password field)",
    PPIONotFoundError: "(no such prewarm task)",
    PPIORateLimitError: "(rate limited)",
    PPIOServerError: "(PPIO API error)",
}
_QUOTA_HINT = (
    " (the account allows a limited number of concurrent prewarm tasks, 5 by default: wait for"
    " running ones to finish, delete finished ones, or ask PPIO support for a higher quota)"
)


def _error_for_status(
    status: int, headers: Mapping[str, str], body: bytes, *, where: str, secret: SecretStr
) -> PPIOAPIError:
    """The typed error for an HTTP error response, with the API's message and reason (key scrubbed)."""
    api_message, api_reason = _parse_error_body(body, secret)
    api_message, api_reason = scrub(api_message, secret), scrub(api_reason, secret)  # again: snippet() joins whitespace
    cls = _ERROR_CLASSES.get(status) or (PPIOServerError if status >= 500 else PPIOBadRequestError)
    if cls is PPIOBadRequestError and any(text and "quota" in text.lower() for text in (api_message, api_reason)):
        cls = PPIOQuotaExceededError
    text = f"{where}: HTTP {status} {_HINTS.get(cls, '')}".rstrip()
    if api_reason:
        text += f" [{api_reason}]"
    if api_message:
        text += f": {api_message}"
    if cls is PPIOQuotaExceededError:
        text += _QUOTA_HINT
    kwargs: dict[str, Any] = {"status_code": status, "api_message": api_message, "api_reason": api_reason}
    if cls is PPIORateLimitError:
        return PPIORateLimitError(text, retry_after=_parse_retry_after(headers.get("Retry-After")), **kwargs)
    return cls(text, **kwargs)


def _parse_error_body(body: bytes, secret: SecretStr) -> tuple[str | None, str | None]:
    """
    The message and reason of an error body whose shape is not documented: the first present of ``message``,
    ``error.message``, ``msg``, ``error`` (a string) and ``detail``, else a snippet of the raw text.
    """
    text = scrub(body.decode("utf-8", "replace").strip(), secret) or ""  # before any cut, which could keep a part
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
        secret, payload.get("message"), nested.get("message"), payload.get("msg"), error, payload.get("detail")
    )
    reason = _first_text(secret, payload.get("reason"), nested.get("code"), payload.get("code"), nested.get("type"))
    return (message or snippet(text)), reason


def _first_text(secret: SecretStr, *candidates: Any) -> str | None:
    for candidate in candidates:
        if isinstance(candidate, str) and candidate.strip():
            return snippet(scrub(candidate, secret) or "")  # JSON escapes may have hidden the key from the first scrub
        if isinstance(candidate, int) and not isinstance(candidate, bool):
            return str(candidate)
    return None


def _parse_retry_after(value: str | None) -> float | None:
    """
    Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date). None when there is no usable
    hint: absent, garbage, NaN or infinite, zero, negative, or a date that is not in the future.
    """
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - time.time()
    return seconds if 0 < seconds < math.inf else None


def snippet(text: str) -> str:
    """Server text on one line, cut to a length fit for an error message (scrub the key first)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= 200 else flat[:197] + "..."


def scrub(text: str | None, secret: SecretStr | None) -> str | None:
    """
    Replace the API key in text the server sent back.

    :param text: Text from the server.
    :param secret: The API key.
    """
    key = secret.get_secret_value() if secret is not None else ""
    if text and key and key in text:
        return text.replace(key, "***")
    return text


# -- transport failures ----------------------------------------------------------------------------


class Failure(enum.Enum):
    """What went wrong below HTTP, as each transport classifies its library's exceptions."""

    #: The certificate did not verify, or the server does not speak TLS: permanent.
    TLS = "tls"
    #: DNS says the host name does not exist: permanent.
    UNKNOWN_HOST = "unknown host"
    #: No connection was made (refused, unreachable, DNS not answering): the request never left.
    NOT_CONNECTED = "not connected"
    #: Connecting took longer than the connect timeout: the request never left.
    CONNECT_TIMEOUT = "connect timeout"
    #: The answer did not come within the timeout: the request may have been acted on.
    TIMEOUT = "timeout"
    #: The connection broke after the request was sent (reset, cut-off body).
    BROKEN = "broken"


def transport_error(
    failure: Failure, *, where: str, settings: ClientSettings, err: BaseException
) -> PPIOTransportError:
    """
    The typed error for a failure below HTTP, with a message that says what to fix when it is permanent.

    :param failure: What the transport saw.
    :param where: ``METHOD path``, for the message.
    :param settings: The client settings (base URL, timeout, TLS).
    :param err: What the library raised; its root cause is named.
    """
    host, detail = settings.base_url, _root_cause(err)
    if failure is Failure.TLS:
        return PPIOTLSError(
            f"{where}: the TLS handshake with {host} failed ({detail}). The CA setting used: "
            f"{settings.tls.describe()}. If the API is reached through a proxy or gateway with its own CA, give "
            "that CA's PEM file as the connection extra 'ca_bundle' (or REQUESTS_CA_BUNDLE / SSL_CERT_FILE, which "
            "both the sync and the deferrable path read)",
            request_sent=False,
        )
    if failure is Failure.UNKNOWN_HOST:
        return PPIOUnknownHostError(
            f"{where}: the host of {host} does not exist ({detail}); check the connection's Base URL",
            request_sent=False,
        )
    if failure in (Failure.TIMEOUT, Failure.CONNECT_TIMEOUT):
        return PPIOTimeoutError(
            f"{where}: {host} did not answer within {settings.timeout:g}s ({detail})",
            request_sent=failure is Failure.TIMEOUT,
        )
    return PPIOTransportError(
        f"{where}: could not get an answer from {host}: {detail}", request_sent=failure is Failure.BROKEN
    )


def _root_cause(err: BaseException) -> str:
    """The innermost error's class and text, short (no headers, no key)."""
    seen = error_chain(err)[-1]
    text = " ".join(str(seen).split())
    return f"{type(seen).__name__}: {text[:200]}" if text else type(seen).__name__


#: Libraries whose errors wrap the one below them; another exception being handled when they were raised
#: (``__context__``) is followed only into these and into OS errors, never into the caller's own.
_NETWORK_MODULES = frozenset({"urllib3", "requests", "aiohttp", "ssl", "socket", "http"})


def error_chain(err: BaseException) -> list[BaseException]:
    """
    ``err`` and what it wraps, outermost first, along ``reason``, the first argument, ``__cause__`` and a
    network library's ``__context__``.

    :param err: What the transport raised.
    """
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and len(chain) < 20 and not any(current is known for known in chain):
        chain.append(current)
        args = getattr(current, "args", ())
        inner = next(
            (
                candidate
                for candidate in (getattr(current, "reason", None), args[0] if args else None, current.__cause__)
                if isinstance(candidate, BaseException)
            ),
            None,
        )
        context = current.__context__
        if inner is None and context is not None and _from_network_code(context):
            inner = context
        current = inner
    return chain


def _from_network_code(err: BaseException) -> bool:
    return isinstance(err, OSError) or type(err).__module__.split(".")[0] in _NETWORK_MODULES


def timeout_error(where: str, settings: ClientSettings) -> PPIOTimeoutError:
    """The request (headers and body) did not complete within the timeout."""
    return PPIOTimeoutError(f"{where}: no complete answer from {settings.base_url} within {settings.timeout:g}s")


def too_large(where: str) -> PPIOBadResponseError:
    """The body is over :data:`MAX_BODY_BYTES`."""
    return PPIOBadResponseError(f"{where}: the answer is larger than {MAX_BODY_BYTES // 2**20} MiB")


def undecodable(where: str, headers: Mapping[str, str], err: BaseException) -> PPIOBadResponseError:
    """The body does not decode as its ``Content-Encoding`` says (a broken proxy or server, not a network fault)."""
    encoding = snippet(headers.get("Content-Encoding", "") or "none")
    return PPIOBadResponseError(
        f"{where}: the answer's body could not be decoded (Content-Encoding: {encoding}): {_root_cause(err)}"
    )
