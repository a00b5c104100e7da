"""The sync transport: ``requests``, one keep-alive session per hook, each attempt bounded by :mod:`._deadline`."""

from __future__ import annotations

import http.client
import time
from collections.abc import Mapping
from typing import Any

import requests
import urllib3

from airflow_provider_ppio.exceptions import PPIOError
from airflow_provider_ppio.hooks._deadline import DeadlineAdapter, deadline
from airflow_provider_ppio.hooks._shared import (
    MAX_BODY_BYTES,
    Answer,
    ClientSettings,
    decode_answer,
    error_chain,
    request_headers,
    timeout_error,
    too_large,
    transport_error,
    undecodable,
)


def new_session(settings: ClientSettings) -> requests.Session:
    """A session with the settings' TLS and proxy that reads nothing from the environment (``~/.netrc``...)."""
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", DeadlineAdapter())
    session.mount("https://", DeadlineAdapter())
    tls = settings.tls
    session.verify = (tls.ca_file or tls.ca_dir or True) if tls.verify else False
    if settings.proxy:
        session.proxies = {"http": settings.proxy, "https": settings.proxy}
    return session


def send(
    session: requests.Session,
    settings: ClientSettings,
    method: str,
    path: str,
    *,
    params: Mapping[str, Any] | None,
    json: Any,
    allow_empty: bool,
    max_bytes: int = MAX_BODY_BYTES,
) -> Any:
    """
    One attempt: send, read the whole body within the timeout, decode it or raise.

    :param max_bytes: The most body bytes read (decoded); a longer answer is a bad response.
    """
    where = f"{method} {path}"
    with deadline(time.monotonic() + settings.timeout) as watchdog:
        outcome = _exchange(session, settings, method, path, params=params, json=json, max_bytes=max_bytes)
    if watchdog.fired:  # the cut connection may look like an error, or like a complete (short) answer
        raise timeout_error(where, settings)
    if isinstance(outcome, PPIOError):
        raise outcome  # raised here, outside any handler: the library's exception does not ride along
    decoded = decode_answer(outcome, method=method, path=path, secret=settings.secret, allow_empty=allow_empty)
    if isinstance(decoded, PPIOError):
        raise decoded
    return decoded


def _exchange(
    session: requests.Session,
    settings: ClientSettings,
    method: str,
    path: str,
    *,
    params: Mapping[str, Any] | None,
    json: Any,
    max_bytes: int,
) -> Answer | PPIOError:
    """Send and read the whole answer; a failure is returned so the raised error carries no library exception."""
    where = f"{method} {path}"
    try:
        # The headers are built inside the call: no frame of this module holds the Authorization header.
        response = session.request(
            method,
            settings.base_url + path,
            params=params,
            json=json,
            headers=request_headers(settings, json_body=json is not None),
            timeout=(settings.connect_timeout, settings.timeout),
            stream=True,
            allow_redirects=False,
        )
    except requests.RequestException as err:
        return _transport_error(where, settings, err)
    # The sent request stays reachable from the response (and so from any frame that holds it): drop the key.
    sent = response.request.copy()  # a copy: the request object itself may be recorded elsewhere (tests)
    sent.headers.pop("Authorization", None)
    response.request = sent
    with response:
        try:
            return Answer(response.status_code, response.headers, _read_body(response, where, max_bytes))
        except (requests.exceptions.ContentDecodingError, urllib3.exceptions.DecodeError) as err:
            return undecodable(where, response.headers, err, settings.secret)
        except PPIOError as err:  # too large: without _read_body's frame, whose locals hold the body
            return err.with_traceback(None)
        except (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as err:
            # Reading the raw stream raises urllib3's errors (a reset or cut-off body), not requests'.
            return _transport_error(where, settings, err)


def _read_body(response: requests.Response, where: str, max_bytes: int) -> bytes:
    """Read and decode the whole body, bounded in size (time is bounded by the deadline's watchdog)."""
    raw = response.raw
    # read1 returns what has arrived (urllib3 2, whose decoders bound what one read may inflate to); urllib3 1.26
    # has only read, and inflates whatever it read at once: small reads there keep a gzip bomb's first step small
    # (deflate inflates at most about 1,000 to 1).
    read1 = getattr(raw, "read1", None)
    read, amount = (read1, 65536) if read1 is not None else (raw.read, 1024)
    body = bytearray()
    while True:
        chunk = read(amount, decode_content=True)
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > max_bytes:
            raise too_large(where, max_bytes)


def _transport_error(where: str, settings: ClientSettings, err: Exception) -> PPIOError:
    never_connected = isinstance(err, requests.ConnectTimeout) or any(
        isinstance(e, urllib3.exceptions.NewConnectionError) for e in error_chain(err)
    )
    return transport_error(err, where=where, settings=settings, sent=not never_connected)
