"""What a request to the emulator may contain, and how a request body or query is read.

API bodies are strict (no type coercion, unknown fields ignored), as the vendor describes them.
Control bodies are lenient about types but refuse unknown fields, so a typo in a test fails loudly.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from airflow_provider_ppio.testing.config import ID_MAX, EmulatorConfig
from airflow_provider_ppio.testing.errors import bad_request, validation_message

__all__ = [
    "ClockBody",
    "ConfigPatch",
    "ControlModel",
    "CreateTaskBody",
    "DeleteTasksBody",
    "PhaseSpec",
    "SeedTaskBody",
    "SetStateBody",
    "StrictModel",
    "json_object",
    "parse_limit",
    "query_str",
    "validate",
]


class StrictModel(BaseModel):
    """Base of the API request bodies: strict types, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class ControlModel(BaseModel):
    """Base of the control request bodies: lenient types, unknown fields refused."""

    model_config = ConfigDict(strict=False, extra="forbid")


# ---- API bodies -------------------------------------------------------------------------------


class CreateTaskBody(StrictModel):
    """Body of ``POST /gpus/v2/prewarm-tasks`` (published limits; unknown fields ignored)."""

    image: Annotated[str, Field(min_length=1, max_length=4095)]
    region_id: Annotated[str, Field(min_length=1, max_length=255)]
    registry_auth_id: Annotated[str, Field(max_length=255)] = ""
    product_ids: list[str] = Field(default_factory=list)
    note: str = ""


class DeleteTasksBody(StrictModel):
    """Body of ``DELETE /gpus/v2/prewarm-tasks``."""

    task_ids: list[str]


# ---- control bodies ---------------------------------------------------------------------------


class PhaseSpec(ControlModel):
    """One step of a seeded task's timeline.

    :param state: any string; the four documented ones get default error/message/reason.
    :param seconds: how long the step lasts; ``None`` (only sensible last) means forever.
    """

    state: Annotated[str, Field(max_length=255)]
    seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    error: str | None = None
    message: str | None = None
    reason: list[str] | None = None


class SeedTaskBody(ControlModel):
    """Body of ``POST /_emulator/tasks``: a task in a chosen state (or following ``timeline``)."""

    task_id: Annotated[str, Field(min_length=1, max_length=ID_MAX, pattern=r"^[^/]+$")] | None = None
    image: str = "registry.example.com/team/image:tag"
    region_id: str = "region-a"
    product_ids: list[str] = Field(default_factory=list)
    registry_auth_id: str = ""
    note: str = ""
    name: str | None = None
    image_size: Annotated[int, Field(ge=0)] | None = None
    created_at: int | None = None
    completed_at: int | None = None
    state: Annotated[str, Field(max_length=255)] = "pending"
    error: str | None = None
    message: str | None = None
    reason: list[str] | None = None
    timeline: list[PhaseSpec] | None = None


class SetStateBody(ControlModel):
    """Body of ``PUT /_emulator/tasks/{task_id}/state``."""

    state: Annotated[str, Field(max_length=255)]
    error: str | None = None
    message: str | None = None
    reason: list[str] | None = None
    completed_at: int | None = None
    timeline: list[PhaseSpec] | None = None


class ConfigPatch(ControlModel):
    """Body of ``PUT /_emulator/config`` (lifecycle settings only)."""

    pending_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    running_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    seconds_per_gb: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    fail_pattern: str | None = None
    #: ``null`` means unlimited; omit the field to leave the quota unchanged.
    quota: Annotated[int, Field(ge=0)] | None = None
    #: 400, 403 or 429: the status of a create refused over the quota.
    quota_status: int | None = None
    #: Count finished tasks toward the quota until they are deleted.
    quota_counts_finished: bool | None = None


class ClockBody(ControlModel):
    """Body of ``POST /_emulator/clock``."""

    advance: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0


# ---- reading a request ------------------------------------------------------------------------


def _require_json(request: Request) -> None:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise bad_request(
            "Content-Type must be application/json" + (f", got {media_type!r}" if media_type else " (header missing)"),
            "INVALID_CONTENT_TYPE",
        )


async def json_object(request: Request) -> dict[str, Any]:
    """Read a request body that must be a JSON object sent as ``application/json``.

    :param request: the request.
    :return: the decoded object.
    :raises ApiError: 400 ``INVALID_CONTENT_TYPE``, ``INVALID_JSON`` or ``INVALID_ARGUMENT``.
    """
    _require_json(request)
    raw = await request.body()
    if not raw.strip():
        raise bad_request("request body is required", "INVALID_JSON")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", "INVALID_JSON") from exc
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object")
    return data


_M = TypeVar("_M", bound=BaseModel)


def validate(model: type[_M], data: Any, what: str) -> _M:
    """Validate data against a body model, turning a failure into a 400.

    :param model: the body model.
    :param data: decoded JSON.
    :param what: what is validated, for the message.
    :return: the model instance.
    :raises ApiError: 400 ``INVALID_ARGUMENT`` naming the bad fields.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise bad_request(validation_message(exc, what)) from exc


def query_str(request: Request, name: str, max_length: int) -> str:
    """A query parameter, ``""`` when absent.

    :param request: the request.
    :param name: parameter name.
    :param max_length: longest accepted value.
    :return: the value.
    :raises ApiError: 400 when the value is too long.
    """
    value = request.query_params.get(name, "")
    if len(value) > max_length:
        raise bad_request(f"query parameter '{name}' is too long: at most {max_length} characters")
    return value


def parse_limit(request: Request, cfg: EmulatorConfig) -> int:
    """The list page size: ``limit`` defaulted (absent or 0) and clamped.

    :param request: the request.
    :param cfg: the emulator settings holding the default and maximum page sizes.
    :return: the page size.
    :raises ApiError: 400 when ``limit`` is not a non-negative integer.
    """
    raw = request.query_params.get("limit", "").strip()
    if raw == "":
        return cfg.default_page_size
    if not re.fullmatch(r"\+?[0-9]+", raw):
        raise bad_request(f"query parameter 'limit' must be an integer >= 0, got {raw[:40]!r}")
    value = int(raw)
    if value == 0:
        return cfg.default_page_size
    return min(value, cfg.max_page_size)
