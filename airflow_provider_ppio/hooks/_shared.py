"""
What the sync and async transports share: settings (timeouts, TLS, proxy), URLs, headers, reading
responses and the typed errors. The retry policy both use is in :mod:`._retry`.

Nothing here does network I/O, so both transports (and the tests) use exactly the same rules.
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

PREWARM_TASKS_PATH = "/gpus/v2/prewarm-tasks"
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_ATTEMPTS = 5
#: Longest wait between two attempts, whatever ``Retry-After`` asks for.
DEFAULT_RETRY_WAIT_MAX = 60.0
DEFAULT_BACKOFF_INITIAL = 1.0
#: How long a wait (sensor, trigger, create operator) keeps asking an API that gives no usable answer.
DEFAULT_UNREACHABLE_TIMEOUT = 600.0
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
    :param unreachable_timeout: How long a wait may go without a usable answer before it fails.
    :param tls: Which certificates the server's must verify against (both transports use it).
    :param proxy: The HTTP(S) proxy for the base URL, or None.
    """

    base_url: str
    api_key: str = field(repr=False)
    timeout: float = DEFAULT_TIMEOUT
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_initial: float = DEFAULT_BACKOFF_INITIAL
    retry_wait_max: float = DEFAULT_RETRY_WAIT_MAX
    unreachable_timeout: float = DEFAULT_UNREACHABLE_TIMEOUT
    tls: TLSSettings = field(default_factory=lambda: tls_settings("", {}))
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
        :param host: The connection's host: the base URL (scheme optional, https assumed).
        :param password: The API key.
        :param extra: The connection's extras (``timeout``, ``max_attempts``, ``backoff_initial``,
            ``retry_wait_max``, ``unreachable_timeout``, ``ca_bundle``, ``verify``).
        :param overrides: Values given to the hook directly; they win over the extras.
        """
        api_key = (password or "").strip()
        if not api_key:
            raise PPIOConnectionConfigError(
                f"Connection {conn_id!r} has no API key: put your PPIO API key in its password "
                '("API Key") field, e.g. AIRFLOW_CONN_PPIO_DEFAULT=\'{"conn_type": "ppio", "password": "sk_..."}\''
            )
        options = {**extra, **{k: v for k, v in (overrides or {}).items() if v is not None}}
        base_url = normalize_base_url(conn_id, host)
        return cls(
            base_url=base_url,
            api_key=api_key,
            timeout=_positive(conn_id, options, "timeout", DEFAULT_TIMEOUT, float),
            max_attempts=int(_positive(conn_id, options, "max_attempts", DEFAULT_MAX_ATTEMPTS, int)),
            backoff_initial=_positive(conn_id, options, "backoff_initial", DEFAULT_BACKOFF_INITIAL, float),
            retry_wait_max=_positive(conn_id, options, "retry_wait_max", DEFAULT_RETRY_WAIT_MAX, float),
            unreachable_timeout=_positive(conn_id, options, "unreachable_timeout", DEFAULT_UNREACHABLE_TIMEOUT, float),
            tls=tls_settings(conn_id, options),
            proxy=environment_proxy(base_url),
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


#: Environment variables that name a CA bundle, in the order they win (requests' order, then OpenSSL's).
CA_BUNDLE_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE")


def tls_settings(conn_id: str, options: Mapping[str, Any]) -> TLSSettings:
    """
    One TLS configuration for both transports: the connection extras ``verify`` and ``ca_bundle``
    first, then ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``, ``SSL_CERT_FILE`` and ``SSL_CERT_DIR``.

    :param conn_id: The connection id, for error messages.
    :param options: The connection's extras (and hook overrides).
    """
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
    return TLSSettings(ca_file=_certifi_bundle())


def _certifi_bundle() -> str | None:
    try:
        import certifi
    except ImportError:  # pragma: no cover - requests depends on certifi
        return None
    return str(certifi.where())


def environment_proxy(base_url: str) -> str | None:
    """
    The proxy the environment (``HTTPS_PROXY``, ``NO_PROXY``...) asks for ``base_url``, read as requests reads it.

    :param base_url: The API's base URL.
    """
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


#: What an API path may not contain: a query, a fragment, a backslash, whitespace or control characters.
_UNSAFE_PATH_CHARACTERS = re.compile(r"[?#\\\x00-\x20]")


def api_url(settings: ClientSettings, path: str) -> str:
    """
    Join the base URL and an API path; refuses anything that could leave the API's host.

    :param settings: The client settings.
    :param path: An absolute path such as ``/gpus/v2/prewarm-tasks``.
    """
    if not isinstance(path, str) or not path.startswith("/") or path.startswith("//"):
        raise PPIOInvalidInputError(f"API path must start with a single '/', got {path!r}")
    if _UNSAFE_PATH_CHARACTERS.search(path):
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
    :param secret: The API key, scrubbed from anything the server echoes back. A ``SecretStr`` in every frame
        that can raise, so a traceback printed with its frames' locals (Airflow 3.0's console does) hides it.
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


def decode_json(
    body: bytes, headers: Mapping[str, str], *, where: str, status: int, secret: SecretStr | None = None
) -> Any:
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


def error_for_status(
    status: int, headers: Mapping[str, str], body: bytes, *, where: str, secret: SecretStr
) -> PPIOAPIError:
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


def parse_error_body(body: bytes, secret: SecretStr | None = None) -> tuple[str | None, str | None]:
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


def _first_text(*candidates: Any, secret: SecretStr | None = None) -> str | None:
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


# -- transport failures -----------------------------------------------------------------------------


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


def transport_error(failure: Failure, *, where: str, settings: ClientSettings, detail: str) -> PPIOTransportError:
    """
    The typed error for a failure below HTTP, with a message that says what to fix when it is permanent.

    :param failure: What the transport saw.
    :param where: ``METHOD path``, for the message.
    :param settings: The client settings (base URL, timeout, TLS).
    :param detail: The library's own short description of the root cause.
    """
    host = settings.base_url
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


def root_cause(err: BaseException) -> str:
    """The innermost error's class and text, short (no headers, no key)."""
    chain = error_chain(err)
    seen = chain[-1] if chain else err
    text = " ".join(str(seen).split())
    return f"{type(seen).__name__}: {text[:200]}" if text else type(seen).__name__


#: Libraries whose errors wrap the one below them; another exception being handled when they were raised
#: (``__context__``) is followed only into these and into OS errors, never into the caller's own.
_NETWORK_MODULES = frozenset({"urllib3", "requests", "aiohttp", "ssl", "socket", "http"})


def error_chain(err: BaseException) -> list[BaseException]:
    """
    ``err`` and what it wraps, outermost first, along ``reason``, the first argument, ``__cause__`` and a
    network library's ``__context__``; not into an unrelated exception the caller was handling at the time.

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
        f"{where}: the answer's body could not be decoded (Content-Encoding: {encoding}): {root_cause(err)}"
    )


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
