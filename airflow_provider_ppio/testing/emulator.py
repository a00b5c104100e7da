"""In-memory emulator of the PPIO / Novita GPU API v2 image prewarm family (``/gpus/v2/prewarm-tasks``).

An independent server-side implementation written from the published API description: it does
not import the provider's hook or models, so a mismatch between the two shows up in tests.

This module assembles the application (:func:`create_app`) and re-exports the emulator's public
names; each concern lives in its own module:

* :mod:`.config` - :class:`EmulatorConfig` (timings, quota, API key, clock), :class:`FakeClock`, constants.
* :mod:`.state` - :class:`EmulatorStore`: tasks and their lifecycle, queued faults, request log, clock offset.
* :mod:`.schemas` - the request bodies and how a request is read.
* :mod:`.errors` - the JSON error body and :class:`ApiError`.
* :mod:`.routes` - the four API operations.
* :mod:`.gate` - the ASGI middleware that checks the API key, logs requests and triggers faults.
* :mod:`.faults` - :class:`FaultSpec`, :class:`Fault` and how each fault kind is played.
* :mod:`.control` - the ``/_emulator/`` control endpoints.

Everything that was not documented by the vendor (error body, create response, quota status
code, page size, ...) is a guess; see ``docs/emulator.md``.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from airflow_provider_ppio.testing.config import (
    API_PREFIX,
    CONTROL_PREFIX,
    DOCUMENTED_STATES,
    RUNTIME_FIELDS,
    TERMINAL_STATES,
    EmulatorConfig,
    FakeClock,
)
from airflow_provider_ppio.testing.control import add_control_routes
from airflow_provider_ppio.testing.errors import ApiError, error_body, error_response, status_reason
from airflow_provider_ppio.testing.faults import Fault, FaultKind, FaultSpec
from airflow_provider_ppio.testing.gate import ApiGate
from airflow_provider_ppio.testing.routes import add_api_routes
from airflow_provider_ppio.testing.schemas import (
    ClockBody,
    ConfigPatch,
    CreateTaskBody,
    DeleteTasksBody,
    PhaseSpec,
    SeedTaskBody,
    SetStateBody,
)
from airflow_provider_ppio.testing.state import EmulatorStore, image_short_name, image_size_for

__all__ = [
    "API_PREFIX",
    "CONTROL_PREFIX",
    "DOCUMENTED_STATES",
    "RUNTIME_FIELDS",
    "TERMINAL_STATES",
    "ApiError",
    "ClockBody",
    "ConfigPatch",
    "CreateTaskBody",
    "DeleteTasksBody",
    "EmulatorConfig",
    "EmulatorStore",
    "FakeClock",
    "Fault",
    "FaultKind",
    "FaultSpec",
    "PhaseSpec",
    "SeedTaskBody",
    "SetStateBody",
    "create_app",
    "error_body",
    "image_short_name",
    "image_size_for",
]


def _allowed_methods(request: Request) -> str:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        route_methods = getattr(route, "methods", None)
        if match != Match.NONE and route_methods:
            methods.update(route_methods)
    return ", ".join(sorted(methods))


def _add_error_handlers(app: FastAPI) -> None:
    """Answer every error, including FastAPI's own and emulator bugs, with the emulator's error body."""

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            return error_response(404, "NOT_FOUND", f"no such endpoint: {request.method} {request.url.path}")
        if exc.status_code == 405:
            return error_response(
                405,
                "METHOD_NOT_ALLOWED",
                f"method {request.method} is not allowed on {request.url.path}",
                {"Allow": _allowed_methods(request)},
            )
        return error_response(exc.status_code, status_reason(exc.status_code), str(exc.detail), exc.headers)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        return error_response(400, "INVALID_ARGUMENT", f"invalid request: {exc}")

    async def on_crash(request: Request, exc: Exception) -> Response:
        return error_response(500, "INTERNAL_ERROR", f"emulator bug: {type(exc).__name__}: {exc}")

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_crash)


def create_app(config: EmulatorConfig | None = None, store: EmulatorStore | None = None) -> FastAPI:
    """Build the emulator application.

    :param config: emulator settings (defaults if omitted); ignored when ``store`` is given.
    :param store: an existing store to serve (lets a caller keep a handle on the state).
    :return: the FastAPI app; its store is ``app.state.store``.
    """
    store = store or EmulatorStore(config or EmulatorConfig())
    app = FastAPI(
        title="PPIO GPU API v2 prewarm emulator",
        redirect_slashes=False,
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.store = store
    app.add_middleware(ApiGate, store=store)
    _add_error_handlers(app)
    add_api_routes(app, store)
    add_control_routes(app, store)
    return app
