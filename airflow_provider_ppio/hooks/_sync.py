"""
The sync transport: ``requests`` with one keep-alive session per hook.

Every attempt is bounded as a whole (headers by :mod:`._deadline`'s watchdog, the body by a clock
check while reading), redirects are never followed, and every library exception becomes a typed
:class:`~airflow_provider_ppio.exceptions.PPIOError`.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Mapping
from typing import Any

import requests
import urllib3

from airflow_provider_ppio.exceptions import PPIOTransportError
from airflow_provider_ppio.hooks._deadline import DeadlineAdapter, deadline
from airflow_provider_ppio.hooks._shared import (
    MAX_BODY_BYTES,
    ClientSettings,
    Failure,
    error_chain,
    interpret_response,
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
) -> Any:
    """One attempt on the hook's session: send, read the whole body within the timeout, decode it or raise."""
    where = f"{method} {path}"
    at = time.monotonic() + settings.timeout
    try:
        with deadline(at) as watchdog:
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
        if watchdog.fired:
            raise timeout_error(where, settings) from None
        raise _transport_error(where, settings, err) from None
    if watchdog.fired:  # the cut connection may look like a complete (empty) answer
        response.close()
        raise timeout_error(where, settings)
    with response:
        try:
            body = _read_body(response, at, where, settings)
        except (requests.exceptions.ContentDecodingError, urllib3.exceptions.DecodeError) as err:
            raise undecodable(where, response.headers, err) from None
        except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
            # Reading the raw stream raises urllib3's errors (a reset or cut-off body), not requests'.
            raise _transport_error(where, settings, err) from None
        return interpret_response(
            method=method,
            path=path,
            status=response.status_code,
            headers=response.headers,
            body=body,
            secret=settings.secret,
            allow_empty=allow_empty,
        )


def _read_body(response: requests.Response, at: float, where: str, settings: ClientSettings) -> bytes:
    """Read and decode the whole body, bounded in size and in total time (a trickling server cannot stall us)."""
    raw = response.raw
    # read1 returns what has arrived (urllib3 2); urllib3 1.26 has only read. Both decode when asked.
    read = getattr(raw, "read1", raw.read)
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > at:
            raise timeout_error(where, settings)
        chunk = read(65536, decode_content=True)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large(where)
        chunks.append(chunk)


def _transport_error(where: str, settings: ClientSettings, err: Exception) -> PPIOTransportError:
    return transport_error(_classify(err), where=where, settings=settings, err=err)


def _classify(err: BaseException) -> Failure:
    """Read requests' and urllib3's exception chain for what happened."""
    chain = error_chain(err)
    if any(isinstance(e, (requests.exceptions.SSLError, ssl.SSLError, urllib3.exceptions.SSLError)) for e in chain):
        return Failure.TLS
    if any(isinstance(e, socket.gaierror) and e.errno == socket.EAI_NONAME for e in chain):
        return Failure.UNKNOWN_HOST
    if isinstance(err, requests.ConnectTimeout):
        return Failure.CONNECT_TIMEOUT
    if any(isinstance(e, urllib3.exceptions.NewConnectionError) for e in chain):
        return Failure.NOT_CONNECTED
    if any(isinstance(e, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)) for e in chain):
        return Failure.TIMEOUT
    return Failure.BROKEN
