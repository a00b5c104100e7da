"""What both transports share, with no network I/O: settings, URLs, headers, and answers or failures as typed errors."""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import math
import os
import re
import socket
import ssl
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple
from urllib.parse import quote, unquote, urlsplit

import certifi
from airflow import __version__ as airflow_version
from pydantic import SecretStr

from airflow_provider_ppio import __version__
from airflow_provider_ppio.exceptions import (
    PPIOAuthError,
    PPIOBadRequestError,
    PPIOBadResponseError,
    PPIOConnectionConfigError,
    PPIOError,
    PPIOInvalidInputError,
    PPIONotFoundError,
    PPIOQuotaExceededError,
    PPIORateLimitError,
    PPIOServerError,
    PPIOTransportError,
)
from airflow_provider_ppio.get_provider_info import CONNECTION_TYPE, DEFAULT_BASE_URL, TASK_ID_MAX_LENGTH

PREWARM_TASKS_PATH = "/gpus/v2/prewarm-tasks"
#: Largest answer read from any path (the generic ``get``/``request``); a larger body is refused, not read.
MAX_BODY_BYTES = 8 * 1024 * 1024
#: Largest answer about one task (read, create, delete); a real task is under 2 KB.
TASK_BODY_MAX_BYTES = 256 * 1024
#: Largest page of the task list: twice 1,000 tasks (the ``limit`` bound) of 2 KB.
LIST_PAGE_MAX_BYTES = 4 * 1024 * 1024
#: Deepest JSON nesting accepted in an answer. Real answers nest 4 deep (page, list, task, status).
MAX_JSON_DEPTH = 32
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


class ConnectionFields(NamedTuple):
    """The fields of an Airflow connection the hook reads, looked up sync or async."""

    conn_type: str | None
    host: str | None
    port: object
    schema: str | None
    password: str | None
    extra: Mapping[str, Any]

    @classmethod
    def of(cls, conn: Any, extra: Mapping[str, Any] | None = None) -> ConnectionFields:
        """
        The fields of an Airflow ``Connection``.

        :param conn: The connection.
        :param extra: Its extras, when already decoded (off the event loop).
        """
        extra = conn.extra_dejson if extra is None else extra
        return cls(conn.conn_type, conn.host, conn.port, conn.schema, conn.password, extra)


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
    #: The key as a ``SecretStr``, for every frame that can raise: a traceback printed with locals shows it masked.
    secret: SecretStr = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "secret", SecretStr(self.api_key))

    @classmethod
    def from_connection(
        cls, conn_id: str, fields: ConnectionFields, overrides: Mapping[str, Any] | None = None
    ) -> ClientSettings:
        """
        Settings from a connection's fields, all checked before the key goes anywhere (type, host, port, scheme).

        :param conn_id: The connection id, for error messages.
        :param fields: The connection's fields; extras may set the numbers above, ``ca_bundle``, ``verify`` and
            ``allow_insecure_http``.
        :param overrides: Values given to the hook directly; they win over the extras.
        """
        conn_type, host, port, schema, password, extra = fields
        check_connection_type(conn_id, conn_type)
        api_key = (password or "").strip()
        if not api_key:
            raise PPIOConnectionConfigError(
                f"Connection {conn_id!r} has no API key: put your PPIO API key in its password "
                '("API Key") field, e.g. AIRFLOW_CONN_PPIO_DEFAULT=\'{"conn_type": "ppio", "password": "sk_..."}\''
            )
        options = {**extra, **{k: v for k, v in (overrides or {}).items() if v is not None}}
        base_url = _base_url(conn_id, host, port, schema)
        insecure = urlsplit(base_url).scheme != "https" and not is_loopback(base_url)
        if insecure and not _flag(conn_id, options, "allow_insecure_http", False):
            raise _config_error(
                conn_id,
                f"Base URL {base_url} is plain http to a host that is not this machine: "
                "the API key would travel in clear. Use https, or set the connection extra "
                '"allow_insecure_http": true if this network is trusted',
            )

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
        raise _config_error(conn_id, f"extra {name!r} must be a positive {kind.__name__}, got {value!r}")
    return kind(number)


def check_connection_type(conn_id: str, conn_type: str | None) -> None:
    """
    Refuse a connection of another type: its password belongs to another service.

    :param conn_id: The connection id, for the message.
    :param conn_type: The connection's type.
    """
    if (conn_type or "").strip().lower() != CONNECTION_TYPE:
        raise PPIOConnectionConfigError(
            f"Connection {conn_id!r} is of type {conn_type!r}, not {CONNECTION_TYPE!r}: it was not made for the PPIO "
            "API, so nothing is sent with it. Name a ppio connection, or give this one "
            f'"conn_type": "{CONNECTION_TYPE}" (URI form: {CONNECTION_TYPE}://:<url-encoded key>@api.ppio.com)'
        )


def _flag(conn_id: str, options: Mapping[str, Any], name: str, default: bool) -> bool:
    """A true/false extra (JSON booleans, or the strings true/false, 1/0, yes/no, on/off; empty is the default)."""
    value = options.get(name)
    word = value.strip().lower() if isinstance(value, str) else value
    if word is None or word == "":
        return default
    if isinstance(word, bool) or word in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return word in (True, "true", "1", "yes", "on")
    raise _config_error(conn_id, f"extra {name!r} must be true or false, got {value!r}")


#: Control characters and whitespace: a URL parser may drop them (``api.ppio.com\n.evil.com`` becomes
#: ``api.ppio.com.evil.com``) or a server may split on them.
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f-\x9f]")
_DIGITS = re.compile(r"[0-9]+")


def _config_error(conn_id: str, problem: str) -> PPIOConnectionConfigError:
    return PPIOConnectionConfigError(f"Connection {conn_id!r}: {problem}")


def _port(conn_id: str, value: object, where: str) -> int:
    """A TCP port, 1-65535, from the connection's port field or the host's ``:port``."""
    text = str(value).strip()
    if isinstance(value, bool) or not _DIGITS.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise _config_error(conn_id, f"{where} {value!r} is not a TCP port (a whole number from 1 to 65535)")
    return int(text)


def _base_url(conn_id: str, host: str | None, port: object = None, schema: str | None = None) -> str:
    """
    The connection's host (and port) as ``scheme://host[:port][/path]``, https when no scheme is given.

    :param conn_id: The connection id, for messages.
    :param host: The Base URL field.
    :param port: The port field; a port in the host too must be the same one.
    :param schema: A URI's path (the base path), or ``http``/``https``.
    """
    raw = (host or "").strip() or DEFAULT_BASE_URL
    base_path = (schema or "").strip()
    if _CONTROL_OR_SPACE.search(raw) or _CONTROL_OR_SPACE.search(base_path):
        raise _config_error(
            conn_id, f"Base URL {raw!r} (schema {base_path!r}) contains whitespace or control characters"
        )
    scheme = base_path.lower() if base_path.lower() in ("http", "https") else None
    if scheme is not None:
        base_path = ""
    if "://" not in raw:
        raw = f"{scheme or 'https'}://{raw}"
    elif scheme is not None and not raw.lower().startswith(scheme + "://"):
        raise _config_error(conn_id, f"the Base URL {raw!r} and the schema field {scheme!r} name different schemes")
    try:
        parts = urlsplit(raw)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        parts = urlsplit("")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _config_error(conn_id, f"Base URL {raw!r} is not an http(s) URL such as {DEFAULT_BASE_URL}")
    if "@" in parts.netloc or parts.query or parts.fragment or "?" in raw or "#" in raw:
        raise _config_error(
            conn_id,
            "Base URL must not carry credentials (user@), a query or a fragment; "
            "the API key goes in the password field",
        )
    if "\\" in raw or "%" in parts.netloc:
        raise _config_error(conn_id, f"Base URL {raw!r} has a malformed host")
    hostname, sep, host_port = (
        parts.netloc.rpartition(":") if not parts.netloc.endswith("]") else (parts.netloc, "", "")
    )
    if not sep:
        hostname, host_port = parts.netloc, ""
    elif not _DIGITS.fullmatch(host_port):
        raise _config_error(conn_id, f"Base URL {raw!r} has a malformed port")
    try:
        hostname = hostname if hostname.isascii() else hostname.encode("idna").decode("ascii")
    except UnicodeError:
        hostname = ""
    if not re.fullmatch(r"[A-Za-z0-9.\-_]+|\[[0-9A-Fa-f:.]+\]", hostname):
        raise _config_error(conn_id, f"Base URL {raw!r} has a malformed host name")
    number = _port(conn_id, host_port, "the port in the Base URL") if host_port else None
    if port is not None and port != "":
        field_port = _port(conn_id, port, "the port")
        if number is not None and number != field_port:
            raise _config_error(
                conn_id,
                f"the Base URL names port {number} but the port field says {field_port}; give the port in one place",
            )
        number = field_port
    netloc = hostname if number is None else f"{hostname}:{number}"
    path = parts.path.rstrip("/")
    if base_path.strip("/"):
        if path:
            raise _config_error(
                conn_id,
                f"the Base URL has the path {path!r} and the schema field adds "
                f"{base_path!r}; give the path in one place",
            )
        if _UNSAFE_PATH_CHARACTERS.search(base_path):
            raise _config_error(conn_id, f"the base path {base_path!r} is malformed")
        path = "/" + base_path.strip("/")
    if _has_dot_segment(path):
        raise _config_error(conn_id, f"Base URL path {parts.path!r} has dot segments")
    return f"{parts.scheme}://{netloc}{path}"


def _tls_settings(conn_id: str, options: Mapping[str, Any]) -> TLSSettings:
    """The extras ``verify`` and ``ca_bundle`` first, then the CA variables of the environment, then certifi."""
    if not _flag(conn_id, options, "verify", True):
        return TLSSettings(verify=False, source="verification off")
    sources = [("connection extra 'ca_bundle'", options.get("ca_bundle"))]
    sources += [(name, os.environ.get(name)) for name in CA_BUNDLE_VARIABLES]
    for source, path in sources:
        if isinstance(path, str) and path.strip():
            path = os.path.expanduser(path.strip())
            if not os.path.exists(path):
                raise _config_error(conn_id, f"the CA bundle {path!r} from {source} does not exist")
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
    How long a *wait* keeps asking (a one-off call stops after ``max_attempts``).

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
    if _has_dot_segment(task_id):
        # Percent-encoding does not protect dot segments: clients, proxies and servers may decode and resolve them.
        raise PPIOInvalidInputError(f"prewarm task id {task_id!r} is not a valid id")
    return f"{PREWARM_TASKS_PATH}/{quote(task_id, safe='')}"


def check_api_path(path: str) -> None:
    """
    Refuse an API path that could leave the API's host or base path (dot segments in any spelling).

    :param path: An absolute path such as ``/gpus/v2/prewarm-tasks``.
    """
    if not isinstance(path, str) or not path.startswith("/") or path.startswith("//"):
        raise PPIOInvalidInputError(f"API path must start with a single '/', got {path!r}")
    if _UNSAFE_PATH_CHARACTERS.search(path):
        raise PPIOInvalidInputError(f"API path must not contain '?', '#', '\\\\' or whitespace: {path!r}")
    if _has_dot_segment(path):
        raise PPIOInvalidInputError(f"API path must not contain dot segments ('..', '.', '%2e%2e'...): {path!r}")


def _has_dot_segment(path: str) -> bool:
    """
    Whether ``path`` has a ``.`` or ``..`` segment as any server might read it: fully percent-decoded, split on
    / and \\, each segment cut at ;.
    """
    decoded = path
    for _ in range(5):
        again = unquote(decoded)
        if again == decoded:
            break
        decoded = again
    if "." not in decoded:  # nearly every path: no segment can be a dot segment
        return False
    return any(segment.split(";", 1)[0] in (".", "..") for segment in re.split(r"[/\\]", decoded))


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


class Answer:
    """
    A complete HTTP answer; its ``repr`` shows neither headers nor body (a traceback with locals must not).

    :param status: HTTP status code.
    :param headers: Response headers (case-insensitive mapping).
    :param body: The whole (decoded) body.
    """

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def __repr__(self) -> str:
        return f"<Answer HTTP {self.status}, {len(self.body)} bytes>"


def decode_answer(answer: Answer, *, method: str, path: str, secret: SecretStr, allow_empty: bool) -> Any:
    """:func:`interpret_response` for an :class:`Answer`; its error is returned without frames (they hold it)."""
    try:
        return interpret_response(
            method=method,
            path=path,
            status=answer.status,
            headers=answer.headers,
            body=answer.body,
            secret=secret,
            allow_empty=allow_empty,
        )
    except PPIOError as err:
        return err.with_traceback(None)


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
    failure: PPIOBadResponseError | None = None
    try:
        return decode_json(body)
    except (UnicodeDecodeError, ValueError):
        content_type = server_text(headers.get("Content-Type", ""), secret, 100) or "no Content-Type"
        failure = PPIOBadResponseError(
            f"{where}: HTTP {status} with a body that is not JSON ({content_type}): {server_text(body, secret)!r}",
            status_code=status,
        )
    except RecursionError:
        failure = PPIOBadResponseError(
            f"{where}: HTTP {status} with JSON nested deeper than {MAX_JSON_DEPTH} levels", status_code=status
        )
    raise failure  # outside the handler: no library exception (and its text) rides along as __context__


#: A JSON string (with its escapes), whose brackets do not nest anything.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(rb"[\[\]{}]")


def decode_json(body: bytes | str) -> Any:
    """
    ``json.loads`` that raises ``RecursionError`` on nesting deeper than :data:`MAX_JSON_DEPTH`, before the parser
    recurses into it (a bracket scan outside strings; bodies with fewer brackets than the limit skip it).

    :param body: The raw JSON text.
    """
    raw = body.encode() if isinstance(body, str) else body
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:
        depth = 0
        for bracket in _JSON_BRACKET.finditer(_JSON_STRING.sub(b"", raw)):
            depth += 1 if bracket.group() in (b"[", b"{") else -1
            if depth > MAX_JSON_DEPTH:
                raise RecursionError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return json.loads(body)


_ERROR_CLASSES: dict[int, type[PPIOError]] = {
    401: PPIOAuthError,
    403: PPIOAuthError,
    404: PPIONotFoundError,
    # The server gave up waiting for the request: transient like a 5xx, and it may have acted on it.
    408: PPIOServerError,
    429: PPIORateLimitError,
}
_HINTS: dict[type[PPIOError], str] = {
    PPIOAuthError: "(check the API key in the connection's password field)",
    PPIONotFoundError: "(no such prewarm task)",
    PPIORateLimitError: "(rate limited)",
    PPIOServerError: "(PPIO API error)",
}
_STATUS_HINTS: dict[int, str] = {408: "(the API timed out waiting for the request)"}
_QUOTA_HINT = (
    " (the account allows a limited number of prewarm tasks, 5 by default. Pending and running tasks count,"
    " and finished ones (succeeded or failed) may count too until they are deleted: wait for running ones to"
    " finish, delete finished ones (PPIODeletePrewarmTasksOperator or PPIOHook.delete_prewarm_tasks), or ask"
    " PPIO support for a higher quota)"
)
#: PPIO's own words for the prewarm limit (its console's ``IMAGE_PREWARM_NUM_LIMIT``, "Image prewarm number
#: exceeds limit"), the emulator's and a plain "prewarm ... quota": they name *this* limit, whatever the status.
_PREWARM_LIMIT = re.compile(
    r"IMAGE_PREWARM_NUM_LIMIT|PREWARM_TASK_QUOTA_EXCEEDED|prewarm\w*\W+(?:task\W+)?(?:num|number|count|quota)\b"
    r"|prewarm.{0,40}\b(?:exceeds?|exceeded|reached)\W+(?:the\W+)?(?:limit|quota)",
    re.IGNORECASE,
)
#: Statuses a prewarm-limit refusal may come with (PPIO documents none): a 429 or a 403 that names the prewarm
#: limit is the quota, not a rate limit or a permission problem. A 401 or 404 is what it says, and a 409 stays a
#: conflict (the create operator looks its task up by marker).
_QUOTA_STATUSES = frozenset({400, 403, 422, 429})


def is_quota_refusal(status: int, api_message: str | None, api_reason: str | None) -> bool:
    """
    Whether an error answer refuses a create because the prewarm limit is reached: PPIO's words for it on 400,
    403, 422 and 429, or a bare "quota" on 400 and 422.

    :param status: The HTTP status.
    :param api_message: The answer's message.
    :param api_reason: The answer's reason or code.
    """
    if status not in _QUOTA_STATUSES:
        return False
    texts = [text for text in (api_reason, api_message) if text]
    if any(_PREWARM_LIMIT.search(text) for text in texts):
        return True
    return status not in (403, 429) and any("quota" in text.lower() for text in texts)


def _error_for_status(
    status: int, headers: Mapping[str, str], body: bytes, *, where: str, secret: SecretStr
) -> PPIOError:
    """The typed error for an HTTP error response, with the API's message and reason (key scrubbed)."""
    api_message, api_reason = _parse_error_body(body, secret)
    api_message, api_reason = scrub(api_message, secret), scrub(api_reason, secret)  # again: snippet() joins whitespace
    cls = _ERROR_CLASSES.get(status) or (PPIOServerError if status >= 500 else PPIOBadRequestError)
    if is_quota_refusal(status, api_message, api_reason):
        cls = PPIOQuotaExceededError
    text = f"{where}: HTTP {status} {_STATUS_HINTS.get(status) or _HINTS.get(cls, '')}".rstrip()
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
    """The message and reason of an undocumented error body (first of several known fields), else a snippet."""
    text = scrub(body.decode("utf-8", "replace").strip(), secret) or ""  # before any cut, which could keep a part
    if not text:
        return None, None
    try:
        payload = decode_json(text)
    except (ValueError, RecursionError):  # too deep: still the error its status says (a 5xx stays transient)
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
            return server_text(candidate, secret)  # JSON escapes may have hidden the key from the first scrub
        if isinstance(candidate, int) and not isinstance(candidate, bool):
            return str(candidate)
    return None


def _parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (seconds or an HTTP date); None unless finite and in the future."""
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


def snippet(text: str, limit: int = 200) -> str:
    """
    Server text on one line, cut to a length fit for an error message (scrub the key first).

    :param text: The text.
    :param limit: Longest result, in characters.
    """
    flat = " ".join(text[: 4 * limit].split())  # never split a huge text: only its start can be shown
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


#: What may sit between two characters of an echoed key without hiding it from a reader: whitespace (also
#: JSON-, URL- and HTML-escaped) and the ``+`` of a form-encoded space.
_KEY_GAP = (
    r"(?:\s|\\[nrtfb]|\\u00(?:0[9aAbBcCdD]|20)|%(?:0[9aAbBcCdD]|20)"
    r"|&#(?:x0*[9aAbBcCdD]|x0*20|0*(?:9|1[0-3]|32));?|\+)*"
)


#: base64 to base64url.
_URLSAFE = str.maketrans("+/", "-_")


@functools.lru_cache(maxsize=8)
def _key_patterns(key: str) -> tuple[re.Pattern[str], ...]:
    """
    ``key`` in any case, each character plain, JSON-, URL- (once or twice) or HTML-escaped, with whitespace
    between; and, for a key long enough to be told apart, inside base64 or base64url text at any alignment.
    """
    forms = []
    for char in key:
        code = ord(char)
        alternatives = [re.escape(char), rf"\\u{code:04x}", rf"&#0*{code};?", rf"&#x0*{code:x};?"]
        if code < 0x80:
            alternatives += [f"%{code:02x}", f"%25{code:02x}"]
        forms.append("(?:" + "|".join(alternatives) + ")")
    patterns = [re.compile(_KEY_GAP.join(forms), re.IGNORECASE)]
    raw = key.encode("utf-8", "surrogatepass")
    if len(raw) >= 12:
        # The base64 characters made of key bytes alone are the same whatever surrounds the key (e.g. a gateway
        # echoing "Authorization: Bearer <key>" base64-encoded); one such core per alignment of the key's start.
        cores = set()
        for offset in range(3):
            encoded = base64.b64encode(bytes(offset) + raw).decode()
            core = encoded[4 * -(-offset // 3) : 4 * ((offset + len(raw)) // 3)]
            cores |= {core, core.translate(_URLSAFE)}
        patterns.append(re.compile("|".join(re.escape(core) for core in sorted(cores))))
    return tuple(patterns)


def scrub(text: str | None, secret: SecretStr | str | None) -> str | None:
    """
    Replace the API key in text the server (or a library quoting the server) produced, in any of its forms.

    :param text: Text from the server, or an error message that may quote it.
    :param secret: The API key.
    """
    key = secret.get_secret_value() if isinstance(secret, SecretStr) else (secret or "")
    if not text or not key:
        return text
    if len(key) < 4:  # too short to search for without erasing ordinary text; such a key is refused by the API
        return text.replace(key, "***")
    for pattern in _key_patterns(key):
        text = pattern.sub("***", text)
    return text


def server_text(text: str | bytes | None, secret: SecretStr | str | None, limit: int = 200) -> str:
    """
    Server-provided text fit for a message: decoded, scrubbed of the key, on one line, cut to ``limit``.

    :param text: Text or bytes from the server.
    :param secret: The API key.
    :param limit: Longest result, in characters.
    """
    if text is None:
        return ""
    # Scrubbed before the cut: a key across the cut must not leave its first part behind.
    raw = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return snippet(scrub(raw, secret) or "", limit)


# -- transport failures ----------------------------------------------------------------------------


def transport_error(err: BaseException, *, where: str, settings: ClientSettings, sent: bool) -> PPIOError:
    """
    The typed error for a failure below HTTP; a TLS failure or an unknown host is the connection's to fix.

    :param err: What the library raised; its chain is read for the ``ssl`` or ``socket`` error below it.
    :param where: ``METHOD path``, for the message.
    :param settings: The client settings (base URL, timeout, TLS).
    :param sent: False when the transport knows no connection was made (the request never left).
    """
    host, detail, chain = settings.base_url, _root_cause(err, settings.secret), error_chain(err)
    if any(isinstance(e, ssl.SSLError) for e in chain):
        return PPIOConnectionConfigError(
            f"{where}: the TLS handshake with {host} failed ({detail}). The CA setting used: "
            f"{settings.tls.describe()}. If the API is reached through a proxy or gateway with its own CA, give "
            "that CA's PEM file as the connection extra 'ca_bundle' (or REQUESTS_CA_BUNDLE / SSL_CERT_FILE, which "
            "both the sync and the deferrable path read)"
        )
    if any(isinstance(e, socket.gaierror) and e.errno == socket.EAI_NONAME for e in chain):
        return PPIOConnectionConfigError(
            f"{where}: the host of {host} does not exist ({detail}); check the connection's Base URL"
        )
    # requests', urllib3's and aiohttp's timeout classes all say so in their names; a socket's is a TimeoutError.
    if any(isinstance(e, TimeoutError) or "Timeout" in type(e).__name__ for e in chain):
        message = f"{where}: {host} did not answer within {settings.timeout:g}s ({detail})"
        return PPIOTransportError(message, request_sent=sent)
    return PPIOTransportError(f"{where}: could not get an answer from {host}: {detail}", request_sent=sent)


def _root_cause(err: BaseException, secret: SecretStr) -> str:
    """The innermost error's class and text, short and scrubbed (parser errors quote what the server sent)."""
    seen = error_chain(err)[-1]
    try:
        text = str(seen)
    except Exception:  # a library error whose __str__ fails on what the server sent
        text = ""
    text = server_text(text, secret)
    return f"{type(seen).__name__}: {text}" if text else type(seen).__name__


#: Libraries whose errors wrap the one below them; another exception being handled when they were raised
#: (``__context__``) is followed only into these and into OS errors, never into the caller's own.
_NETWORK_MODULES = frozenset({"urllib3", "requests", "aiohttp", "ssl", "socket", "http"})


def error_chain(err: BaseException) -> list[BaseException]:
    """``err`` and what it wraps, outermost first (``reason``, ``args[0]``, ``__cause__``, a library's context)."""
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


def timeout_error(where: str, settings: ClientSettings) -> PPIOTransportError:
    """The request (headers and body) did not complete within the timeout."""
    return PPIOTransportError(f"{where}: no complete answer from {settings.base_url} within {settings.timeout:g}s")


def too_large(where: str, limit: int = MAX_BODY_BYTES) -> PPIOBadResponseError:
    """The body is over the cap of its endpoint (``limit`` bytes)."""
    size = f"{limit // 2**20} MiB" if limit >= 2**20 else f"{limit // 2**10} KiB"
    return PPIOBadResponseError(f"{where}: the answer is larger than {size}, the most this call reads")


def undecodable(where: str, headers: Mapping[str, str], err: BaseException, secret: SecretStr) -> PPIOBadResponseError:
    """The body does not decode as its ``Content-Encoding`` says (a broken server, not a network fault)."""
    encoding = server_text(headers.get("Content-Encoding", ""), secret, 100) or "none"
    return PPIOBadResponseError(
        f"{where}: the answer's body could not be decoded (Content-Encoding: {encoding}): {_root_cause(err, secret)}"
    )
