"""The control API (``/_emulator/*``): what a test uses to seed tasks, inject faults and move time.

No API key, never faulted, never in the request log. With a control token configured, every
endpoint except ``health`` needs header ``X-Emulator-Token``. The client for these endpoints is
:class:`~airflow_provider_ppio.testing.server.EmulatorControl`.
"""

from __future__ import annotations

import secrets
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from pydantic import BaseModel

from airflow_provider_ppio.testing.config import CONTROL_PREFIX
from airflow_provider_ppio.testing.errors import ApiError, bad_request
from airflow_provider_ppio.testing.faults import FaultSpec
from airflow_provider_ppio.testing.schemas import (
    ClockBody,
    ConfigPatch,
    SeedTaskBody,
    SetStateBody,
    json_object,
    validate,
)
from airflow_provider_ppio.testing.state import EmulatorStore

__all__ = ["add_control_routes"]

_M = TypeVar("_M", bound=BaseModel)


def add_control_routes(app: FastAPI, store: EmulatorStore) -> None:
    """Register the control endpoints.

    :param app: the application.
    :param store: the state they drive.
    """

    def control(request: Request) -> None:
        token = store.config.control_token
        if token is not None and not secrets.compare_digest(
            request.headers.get("x-emulator-token", "").encode(), token.encode()
        ):
            raise ApiError(401, "INVALID_CONTROL_TOKEN", "send the control token in header X-Emulator-Token")

    async def control_body(request: Request, model: type[_M]) -> _M:
        control(request)
        return validate(model, await json_object(request), "control request")

    @app.get(CONTROL_PREFIX + "/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "tasks": store.task_count(), "now": store.now()}

    @app.post(CONTROL_PREFIX + "/reset")
    async def reset(request: Request) -> dict[str, Any]:
        control(request)
        store.reset()
        return {}

    @app.get(CONTROL_PREFIX + "/requests")
    async def request_log(request: Request) -> dict[str, Any]:
        control(request)
        return {"data": store.requests()}

    @app.get(CONTROL_PREFIX + "/stats")
    async def stats(request: Request) -> dict[str, Any]:
        control(request)
        return store.stats()

    @app.get(CONTROL_PREFIX + "/tasks")
    async def all_tasks(request: Request) -> dict[str, Any]:
        control(request)
        return {"data": store.all_tasks()}

    @app.post(CONTROL_PREFIX + "/tasks")
    async def seed_task(request: Request) -> dict[str, Any]:
        return store.seed_task(await control_body(request, SeedTaskBody))

    @app.put(CONTROL_PREFIX + "/tasks/{task_id}/state")
    async def set_state(task_id: str, request: Request) -> dict[str, Any]:
        return store.set_state(task_id, await control_body(request, SetStateBody))

    @app.get(CONTROL_PREFIX + "/faults")
    async def list_faults(request: Request) -> dict[str, Any]:
        control(request)
        return {"data": store.faults()}

    @app.post(CONTROL_PREFIX + "/faults")
    async def inject_fault(request: Request) -> dict[str, Any]:
        return store.add_fault(await control_body(request, FaultSpec)).to_json()

    @app.delete(CONTROL_PREFIX + "/faults")
    async def clear_faults(request: Request) -> dict[str, Any]:
        control(request)
        store.clear_faults()
        return {}

    @app.get(CONTROL_PREFIX + "/config")
    async def get_config(request: Request) -> dict[str, Any]:
        control(request)
        return store.runtime_config()

    @app.put(CONTROL_PREFIX + "/config")
    async def put_config(request: Request) -> dict[str, Any]:
        patch = await control_body(request, ConfigPatch)
        try:
            return store.configure(patch)
        except ValueError as exc:
            raise bad_request(str(exc)) from exc

    @app.post(CONTROL_PREFIX + "/clock")
    async def clock(request: Request) -> dict[str, Any]:
        body = await control_body(request, ClockBody)
        store.advance_clock(body.advance)
        return store.runtime_config()
