"""The request gate: a pure ASGI middleware in front of the API routes.

For every API request (never for ``/_emulator/*``) it takes the first matching injected fault,
checks the API key, and logs the request, then either plays the fault (:mod:`.faults`) or lets
the route answer. It sits below FastAPI so that faults can break the HTTP exchange itself.
"""

from __future__ import annotations

import json
import secrets
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from airflow_provider_ppio.testing.config import CONTROL_PREFIX, MIB
from airflow_provider_ppio.testing.errors import error_response
from airflow_provider_ppio.testing.faults import Fault, play_fault
from airflow_provider_ppio.testing.state import EmulatorStore

__all__ = ["ApiGate"]


class ApiGate:
    """Applies injected faults, checks the API key and logs every non-control request.

    :param app: the wrapped ASGI app.
    :param store: the emulator store.
    """

    def __init__(self, app: ASGIApp, store: EmulatorStore) -> None:
        self.app = app
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI event.

        :param scope: ASGI scope.
        :param receive: ASGI receive.
        :param send: ASGI send.
        """
        path: str = scope.get("path", "")
        if scope["type"] != "http" or path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/"):
            await self.app(scope, receive, send)
            return
        raw_headers: dict[bytes, bytes] = {k.lower(): v for k, v in scope["headers"]}
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw_headers.items()}
        raw_auth = raw_headers.get(b"authorization")
        auth = headers.get("authorization")
        scheme, _, token = (raw_auth or b"").partition(b" ")
        auth_valid = scheme.lower() == b"bearer" and secrets.compare_digest(
            token, self.store.config.api_key.encode("utf-8")
        )
        body = bytearray()

        async def logging_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and len(body) < MIB:
                body.extend(message.get("body", b""))
            return message

        method: str = scope["method"]
        fault = self.store.take_fault(method, path)
        status: list[int] = []
        answer = bytearray()  # the body of an error answer, to log its reason
        logged = False

        def write_log() -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            query_string: bytes = scope.get("query_string", b"")
            self.store.log_request(
                {
                    "time": self.store.now(),
                    "method": method,
                    "path": path,
                    "query_string": query_string.decode("latin-1"),
                    "query": dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)),
                    "auth_present": auth is not None,
                    "auth_valid": auth_valid,
                    "content_type": headers.get("content-type"),
                    "user_agent": headers.get("user-agent"),
                    "json": _maybe_json(bytes(body)),
                    "status": status[0] if status else None,
                    "reason": _error_reason(bytes(answer)) if status and status[0] >= 400 else None,
                    "fault": fault.spec.kind if fault is not None else None,
                }
            )

        async def logging_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body":
                if status and status[0] >= 400 and len(answer) < _REASON_BODY_LIMIT:
                    answer.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    write_log()  # before the client can see the end of the response
            await send(message)

        try:
            await self._dispatch(fault, scope, logging_receive, logging_send, auth, auth_valid)
        finally:
            write_log()

    async def _dispatch(
        self,
        fault: Fault | None,
        scope: Scope,
        receive: Receive,
        send: Send,
        auth: str | None,
        auth_valid: bool,
    ) -> None:
        async def serve(scope: Scope, receive: Receive, send: Send) -> None:
            await self._serve(scope, receive, send, auth, auth_valid)

        if fault is None:
            await serve(scope, receive, send)
        else:
            await play_fault(fault, scope, receive, send, serve, self.store.closing)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, auth: str | None, auth_valid: bool) -> None:
        if not auth_valid:
            message = (
                "missing Authorization header: send 'Authorization: Bearer <API key>'"
                if auth is None
                else "invalid API key: send 'Authorization: Bearer <API key>'"
            )
            reason = "MISSING_API_KEY" if auth is None else "INVALID_API_KEY"
            response = error_response(401, reason, message, {"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


#: Error bodies longer than this are not read for their reason (the emulator's own are tiny).
_REASON_BODY_LIMIT = 64 * 1024


def _error_reason(raw: bytes) -> str | None:
    """The ``reason`` of an error body, e.g. ``IMAGE_PREWARM_NUM_LIMIT``; None if it has none."""
    data = _maybe_json(raw[:_REASON_BODY_LIMIT])
    reason = data.get("reason") if isinstance(data, dict) else None
    return reason if isinstance(reason, str) else None


def _maybe_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
