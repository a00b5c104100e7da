"""The emulator's error body and the exception that carries it out of a route or the store."""

from __future__ import annotations

import re
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

__all__ = ["ApiError", "bad_request", "error_body", "error_response", "status_reason", "validation_message"]


def error_body(status: int, reason: str, message: str) -> dict[str, Any]:
    """Build the error body used by every error response, shaped as PPIO's console backend answers.

    :param status: HTTP status code, repeated as ``code``.
    :param reason: UPPER_SNAKE machine-readable reason.
    :param message: human-readable text.
    :return: ``{"code": status, "reason": reason, "message": message, "metadata": {}}``
        (ppio-api/README.md section 2.5).
    """
    return {"code": status, "reason": reason, "message": message, "metadata": {}}


def error_response(status: int, reason: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """Render :func:`error_body` as a response.

    :param status: HTTP status code.
    :param reason: UPPER_SNAKE reason.
    :param message: human-readable text.
    :param headers: extra response headers.
    :return: the JSON response.
    """
    return JSONResponse(error_body(status, reason, message), status_code=status, headers=headers)


def status_reason(status: int) -> str:
    """UPPER_SNAKE reason for a bare HTTP status, e.g. ``SERVICE_UNAVAILABLE`` for 503.

    :param status: HTTP status code.
    :return: the reason (``HTTP_<status>`` for codes without a standard phrase).
    """
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP_{status}"
    return re.sub(r"[^A-Z0-9]+", "_", phrase.upper()).strip("_")


class ApiError(Exception):
    """An error answered with the emulator's JSON error body.

    :param status: HTTP status code.
    :param reason: UPPER_SNAKE reason.
    :param message: human-readable text.
    :param headers: extra response headers.
    """

    def __init__(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.headers = headers

    def response(self) -> JSONResponse:
        """Render the error.

        :return: the JSON response.
        """
        return error_response(self.status, self.reason, self.message, self.headers)


def bad_request(message: str, reason: str = "INVALID_ARGUMENT") -> ApiError:
    """A 400 error.

    :param message: human-readable text.
    :param reason: UPPER_SNAKE reason.
    :return: the error, to raise.
    """
    return ApiError(400, reason, message)


def validation_message(exc: ValidationError, what: str) -> str:
    """Summarise a pydantic validation error (first three problems), naming each field.

    :param exc: the validation error.
    :param what: what was validated, e.g. ``request body``.
    :return: e.g. ``invalid request body: field 'region_id': ...``.
    """
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "(body)"
        parts.append(f"field '{loc}': {err['msg']}")
    return f"invalid {what}: " + "; ".join(parts)
