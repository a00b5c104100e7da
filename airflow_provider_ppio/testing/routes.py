"""HTTP routes of the emulated v2 prewarm API (``/gpus/v2/prewarm-tasks``).

The routes only read the request and hand it to the store; the API key, faults and the request
log are handled before they run, by the gate (:mod:`.gate`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

from airflow_provider_ppio.testing.config import API_PREFIX, DOCUMENTED_STATES, ID_MAX
from airflow_provider_ppio.testing.errors import bad_request
from airflow_provider_ppio.testing.schemas import (
    CreateTaskBody,
    DeleteTasksBody,
    json_object,
    parse_limit,
    query_str,
    validate,
)
from airflow_provider_ppio.testing.state import EmulatorStore, decode_cursor

__all__ = ["add_api_routes"]


def add_api_routes(app: FastAPI, store: EmulatorStore) -> None:
    """Register the four API operations.

    :param app: the application.
    :param store: the state they serve.
    """

    @app.post(API_PREFIX)
    async def create_prewarm_task(request: Request) -> dict[str, Any]:
        body = validate(CreateTaskBody, await json_object(request), "request body")
        limit = store.config.max_note_length
        if len(body.note) > limit:
            raise bad_request(f"invalid request body: field 'note': at most {limit} characters")
        return store.create_task(body)

    @app.get(API_PREFIX)
    async def list_prewarm_tasks(request: Request) -> dict[str, Any]:
        limit = parse_limit(request, store.config)
        cursor = query_str(request, "cursor", 1024)
        status = query_str(request, "status", 255)
        if status and status not in DOCUMENTED_STATES:
            raise bad_request(
                f"query parameter 'status' must be one of pending, running, succeeded, failed or empty, "
                f"got {status[:40]!r}"
            )
        region_id = query_str(request, "region_id", 255)
        name = query_str(request, "name", 255)
        after = decode_cursor(cursor) if cursor else 0
        return store.list_tasks(limit=limit, after_seq=after, status=status, region_id=region_id, name=name)

    @app.delete(API_PREFIX)
    async def delete_prewarm_tasks(request: Request) -> dict[str, Any]:
        body = validate(DeleteTasksBody, await json_object(request), "request body")
        store.delete_tasks(body.task_ids)
        return {}

    @app.get(API_PREFIX + "/{task_id}")
    async def get_prewarm_task(task_id: str) -> dict[str, Any]:
        if len(task_id) > ID_MAX:
            raise bad_request(f"path parameter 'task_id' is too long: at most {ID_MAX} characters")
        return store.get_task(task_id)
