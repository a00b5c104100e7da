"""In-memory emulator of the PPIO / Novita GPU API v2 image prewarm family (``/gpus/v2/prewarm-tasks``).

An independent server-side implementation written from the published API description: it does
not import the provider's hook or models, so a mismatch between the two shows up in tests.

Pieces:

* :class:`EmulatorConfig` - lifecycle timings, quota, API key, clock.
* :class:`EmulatorStore` - the thread-safe store: tasks, injected faults, request log, clock offset.
* :func:`create_app` - the FastAPI application serving the API and the ``/_emulator/`` control endpoints.

Everything that was not documented by the vendor (error body, create response, quota status
code, page size, ...) is a guess; see ``docs/emulator.md``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import json
import math
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "API_PREFIX",
    "CONTROL_PREFIX",
    "DOCUMENTED_STATES",
    "TERMINAL_STATES",
    "ApiError",
    "ConfigPatch",
    "CreateTaskBody",
    "DeleteTasksBody",
    "EmulatorConfig",
    "EmulatorStore",
    "FakeClock",
    "Fault",
    "FaultSpec",
    "PhaseSpec",
    "SeedTaskBody",
    "SetStateBody",
    "create_app",
    "error_body",
    "image_short_name",
    "image_size_for",
]

#: Base path of the emulated API family.
API_PREFIX = "/gpus/v2/prewarm-tasks"
#: Prefix of the control endpoints (no API key, never faulted, never logged).
CONTROL_PREFIX = "/_emulator"
#: The four documented states, in lifecycle order.
DOCUMENTED_STATES = ("pending", "running", "succeeded", "failed")
#: States after which a task never changes again.
TERMINAL_STATES = frozenset({"succeeded", "failed"})
_ACTIVE_STATES = frozenset({"pending", "running"})
_GIB = 1024**3
_GB = 10**9
_MIB = 1024 * 1024
_ID_MAX = 255
FaultKind = Literal[
    "status",
    "rate_limit",
    "latency",
    "malformed_json",
    "html",
    "empty_body",
    "json_array",
    "huge_body",
    "body",
    "drop",
    "trickle",
]


# --------------------------------------------------------------------------------------------------
# Configuration and clock
# --------------------------------------------------------------------------------------------------


class FakeClock:
    """A manually advanced clock for deterministic lifecycle tests.

    Pass it as ``EmulatorConfig(clock=FakeClock())`` and call :meth:`advance`.

    :param start: initial Unix time in seconds.
    """

    def __init__(self, start: float = 1_767_225_600.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        """Return the current fake time.

        :return: Unix time in seconds.
        """
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock forward.

        :param seconds: how far to move (must be >= 0).
        :return: the new time.
        """
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, now: float) -> None:
        """Set the clock to an absolute time.

        :param now: Unix time in seconds.
        """
        with self._lock:
            self._now = float(now)


@dataclasses.dataclass
class EmulatorConfig:
    """Behaviour of one emulator instance.

    :param api_key: the only accepted API key (``Authorization: Bearer <api_key>``).
    :param pending_seconds: how long a created task stays ``pending``.
    :param running_seconds: base time a created task stays ``running``.
    :param seconds_per_gb: extra running time per GB (10^9 bytes) of ``image_size``.
    :param fail_pattern: regex searched in ``image``; a match makes the task end ``failed``.
        An empty string disables failures.
    :param quota: maximum concurrent pending/running tasks; ``None`` means unlimited.
    :param default_page_size: list page size when ``limit`` is absent or 0.
    :param max_page_size: larger ``limit`` values are clamped to this.
    :param max_note_length: longest accepted ``note`` (not documented by the vendor).
    :param control_token: if set, ``/_emulator/*`` (except ``health``) needs header
        ``X-Emulator-Token: <control_token>``.
    :param request_log_size: how many API requests the log keeps (oldest dropped first).
    :param clock: returns the current Unix time; inject a :class:`FakeClock` in tests.
    """

    api_key: str = "emulator-key"
    pending_seconds: float = 1.0
    running_seconds: float = 3.0
    seconds_per_gb: float = 0.0
    fail_pattern: str = "fail"
    quota: int | None = 5
    default_page_size: int = 20
    max_page_size: int = 100
    max_note_length: int = 4096
    control_token: str | None = None
    request_log_size: int = 1000
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        """Reject settings the emulator cannot honour."""
        for name in ("pending_seconds", "running_seconds", "seconds_per_gb"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.quota is not None and self.quota < 0:
            raise ValueError(f"quota must be >= 0 or None (unlimited), got {self.quota!r}")
        if self.default_page_size < 1 or self.max_page_size < self.default_page_size:
            raise ValueError("need 1 <= default_page_size <= max_page_size")
        if self.max_note_length < 0 or self.request_log_size < 1:
            raise ValueError("max_note_length must be >= 0 and request_log_size >= 1")
        try:
            re.compile(self.fail_pattern)
        except re.error as exc:
            raise ValueError(f"fail_pattern is not a valid regular expression: {exc}") from exc


#: Fields of :class:`EmulatorConfig` that ``PUT /_emulator/config`` may change at run time.
RUNTIME_FIELDS = ("pending_seconds", "running_seconds", "seconds_per_gb", "fail_pattern", "quota")


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def error_body(status: int, reason: str, message: str) -> dict[str, Any]:
    """Build the (inferred) error body used by every error response.

    :param status: HTTP status code, repeated as ``code``.
    :param reason: UPPER_SNAKE machine-readable reason.
    :param message: human-readable text.
    :return: ``{"code": status, "reason": reason, "message": message}``.
    """
    return {"code": status, "reason": reason, "message": message}


def _error_response(status: int, reason: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, reason, message), status_code=status, headers=headers)


def _status_reason(status: int) -> str:
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
        return _error_response(self.status, self.reason, self.message, self.headers)


def _bad_request(message: str, reason: str = "INVALID_ARGUMENT") -> ApiError:
    return ApiError(400, reason, message)


def _validation_message(exc: ValidationError, what: str) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "(body)"
        parts.append(f"field '{loc}': {err['msg']}")
    return f"invalid {what}: " + "; ".join(parts)


# --------------------------------------------------------------------------------------------------
# Request models
# --------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class CreateTaskBody(_Strict):
    """Body of ``POST /gpus/v2/prewarm-tasks`` (published limits; unknown fields ignored)."""

    image: Annotated[str, Field(min_length=1, max_length=4095)]
    region_id: Annotated[str, Field(min_length=1, max_length=255)]
    registry_auth_id: Annotated[str, Field(max_length=255)] = ""
    product_ids: list[str] = Field(default_factory=list)
    note: str = ""


class DeleteTasksBody(_Strict):
    """Body of ``DELETE /gpus/v2/prewarm-tasks``."""

    task_ids: list[str]


class _Control(BaseModel):
    model_config = ConfigDict(strict=False, extra="forbid")


class PhaseSpec(_Control):
    """One step of a seeded task's timeline.

    :param state: any string; the four documented ones get default error/message/reason.
    :param seconds: how long the step lasts; ``None`` (only sensible last) means forever.
    """

    state: Annotated[str, Field(max_length=255)]
    seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    error: str | None = None
    message: str | None = None
    reason: list[str] | None = None


class SeedTaskBody(_Control):
    """Body of ``POST /_emulator/tasks``: a task in a chosen state (or following ``timeline``)."""

    task_id: Annotated[str, Field(min_length=1, max_length=_ID_MAX, pattern=r"^[^/]+$")] | None = None
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


class SetStateBody(_Control):
    """Body of ``PUT /_emulator/tasks/{task_id}/state``."""

    state: Annotated[str, Field(max_length=255)]
    error: str | None = None
    message: str | None = None
    reason: list[str] | None = None
    completed_at: int | None = None
    timeline: list[PhaseSpec] | None = None


class FaultSpec(_Control):
    """Body of ``POST /_emulator/faults``; which fields matter depends on ``kind`` (see docs)."""

    kind: FaultKind
    count: Annotated[int, Field(ge=1)] | None = 1
    method: str | None = None
    path_prefix: str = ""
    status: Annotated[int, Field(ge=200, le=599)] | None = None
    body: Any = None
    content_type: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    retry_after: float | str | None = None
    retry_after_format: Literal["seconds", "http-date"] = "seconds"
    seconds: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = 0.0
    megabytes: Annotated[float, Field(gt=0, le=1024, allow_inf_nan=False)] = 10.0
    interval: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] = 1.0
    when: Literal["before_response", "mid_body"] = "before_response"


class ConfigPatch(_Control):
    """Body of ``PUT /_emulator/config`` (lifecycle settings only)."""

    pending_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    running_seconds: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    seconds_per_gb: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    fail_pattern: str | None = None
    #: ``null`` means unlimited; omit the field to leave the quota unchanged.
    quota: Annotated[int, Field(ge=0)] | None = None


class ClockBody(_Control):
    """Body of ``POST /_emulator/clock``."""

    advance: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0


# --------------------------------------------------------------------------------------------------
# Store
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Phase:
    state: str
    seconds: float | None
    error: str | None = None
    message: str | None = None
    reason: tuple[str, ...] | None = None


@dataclasses.dataclass
class _Task:
    seq: int
    task_id: str
    image: str
    region_id: str
    product_ids: list[str]
    registry_auth_id: str
    note: str
    name: str
    image_size: int
    created_at: int
    anchor: float
    phases: list[_Phase]
    completed_at: int | None = None


@dataclasses.dataclass
class Fault:
    """An injected fault waiting for matching requests.

    :param fault_id: id shown in ``GET /_emulator/faults``.
    :param spec: what to do.
    :param remaining: matching requests still to hit (``None`` = unlimited).
    """

    fault_id: int
    spec: FaultSpec
    remaining: int | None

    def matches(self, method: str, path: str) -> bool:
        """Whether a request is affected.

        :param method: HTTP method.
        :param path: request path.
        :return: True if the fault applies.
        """
        if self.spec.method and self.spec.method.upper() != method.upper():
            return False
        return path.startswith(self.spec.path_prefix)

    def to_json(self) -> dict[str, Any]:
        """Describe the fault.

        :return: JSON-ready dict.
        """
        data = self.spec.model_dump(mode="json", exclude_defaults=True)
        data.update(id=self.fault_id, kind=self.spec.kind, remaining=self.remaining)
        return data


def image_short_name(image: str) -> str:
    """Derive the task ``name`` from an image reference: its last path segment, tag included.

    :param image: full image reference, e.g. ``registry.example.com/team/image:tag``.
    :return: e.g. ``image:tag``.
    """
    return image.rstrip("/").rsplit("/", 1)[-1] or image


def image_size_for(image: str) -> int:
    """Deterministic fake image size between 1 and 20 GiB.

    :param image: image reference.
    :return: size in bytes.
    """
    digest = int.from_bytes(hashlib.sha256(image.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return _GIB + digest % (19 * _GIB)


def _node_count(image: str) -> int:
    return 2 + int(hashlib.sha256(image.encode("utf-8", "surrogatepass")).hexdigest()[:2], 16) % 5


def _encode_cursor(task: _Task) -> str:
    raw = json.dumps({"id": task.task_id, "seq": task.seq}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise _bad_request("invalid cursor: pass the next_cursor of a previous page", "INVALID_CURSOR") from exc
    seq = data.get("seq") if isinstance(data, dict) else None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise _bad_request("invalid cursor: pass the next_cursor of a previous page", "INVALID_CURSOR")
    return seq


class EmulatorStore:
    """Thread-safe in-memory state of one emulator: tasks, faults, request log and clock offset.

    Task states are computed lazily from the clock on every read.

    :param config: the emulator configuration (the store keeps a copy to restore on reset).
    """

    def __init__(self, config: EmulatorConfig) -> None:
        self._initial = dataclasses.replace(config)
        self.config = dataclasses.replace(config)
        self._lock = threading.RLock()
        self._tasks: dict[str, _Task] = {}
        self._faults: list[Fault] = []
        self._log: deque[dict[str, Any]] = deque(maxlen=config.request_log_size)
        self._seq = 0
        self._fault_seq = 0
        self._log_seq = 0
        self._offset = 0.0
        #: Set while the server shuts down; long faults (latency, trickle) stop early.
        self.closing = threading.Event()

    # ---- clock --------------------------------------------------------------------------------

    def now(self) -> float:
        """Current emulator time (config clock plus the offset from ``advance_clock``).

        :return: Unix time in seconds.
        """
        with self._lock:
            return self.config.clock() + self._offset

    def advance_clock(self, seconds: float) -> float:
        """Shift emulator time forward (works with the real clock too).

        :param seconds: how far (>= 0).
        :return: the new emulator time.
        """
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError("seconds must be a finite number >= 0")
        with self._lock:
            self._offset += seconds
            return self.now()

    # ---- lifecycle ----------------------------------------------------------------------------

    def _current(self, task: _Task, now: float) -> tuple[_Phase, float]:
        start = task.anchor
        for phase in task.phases:
            if phase.seconds is None or now < start + phase.seconds:
                return phase, start
            start += phase.seconds
        return task.phases[-1], start - (task.phases[-1].seconds or 0.0)

    def _state(self, task: _Task, now: float) -> str:
        return self._current(task, now)[0].state

    def _render(self, task: _Task, now: float) -> dict[str, Any]:
        phase, started = self._current(task, now)
        state = phase.state
        nodes = _node_count(task.image)
        defaults: dict[str, tuple[str, str, list[str]]] = {
            "pending": ("", "waiting for cache nodes to be scheduled", []),
            "running": ("", f"pulling image on {nodes} nodes", []),
            "succeeded": ("", f"image prewarmed on {nodes} nodes", ["image pulled successfully"]),
            "failed": (
                "ImagePullFailed",
                f"failed to pull image {task.image}: manifest unknown",
                [
                    f"failed to pull image {task.image}: manifest unknown",
                    "check that the image exists and that registry_auth_id grants access to it",
                ],
            ),
        }
        error, message, reason = defaults.get(state, ("", "", []))
        completed_at = 0
        if state in TERMINAL_STATES:
            completed_at = task.completed_at if task.completed_at is not None else int(started)
        return {
            "task_id": task.task_id,
            "name": task.name,
            "image": task.image,
            "region_id": task.region_id,
            "product_ids": list(task.product_ids),
            "image_size": task.image_size,
            "created_at": task.created_at,
            "completed_at": completed_at,
            "status": {
                "status": state,
                "error": phase.error if phase.error is not None else error,
                "message": phase.message if phase.message is not None else message,
            },
            "registry_auth_id": task.registry_auth_id,
            "note": task.note,
            "reason": list(phase.reason) if phase.reason is not None else reason,
        }

    def _new_id(self) -> str:
        while True:
            task_id = f"pwt-{secrets.token_hex(6)}"
            if task_id not in self._tasks:
                return task_id

    def _insert(self, task: _Task) -> None:
        self._tasks.pop(task.task_id, None)
        self._tasks[task.task_id] = task

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # ---- API operations -----------------------------------------------------------------------

    def create_task(self, body: CreateTaskBody) -> dict[str, Any]:
        """Create a task following the configured lifecycle.

        :param body: validated create body.
        :return: ``{"task_id": ...}``.
        :raises ApiError: 400 ``PREWARM_TASK_QUOTA_EXCEEDED`` when the quota is used up.
        """
        with self._lock:
            cfg = self.config
            now = self.now()
            quota = cfg.quota
            if quota is not None:
                active = sum(1 for t in self._tasks.values() if self._state(t, now) in _ACTIVE_STATES)
                if active >= quota:
                    raise _bad_request(
                        f"prewarm task quota exceeded: at most {quota} concurrent (pending or running) "
                        "prewarm tasks per account; wait for one to finish or delete one",
                        "PREWARM_TASK_QUOTA_EXCEEDED",
                    )
            size = image_size_for(body.image)
            fails = bool(cfg.fail_pattern) and re.search(cfg.fail_pattern, body.image) is not None
            running = cfg.running_seconds + cfg.seconds_per_gb * size / _GB
            task = _Task(
                seq=self._next_seq(),
                task_id=self._new_id(),
                image=body.image,
                region_id=body.region_id,
                product_ids=list(body.product_ids),
                registry_auth_id=body.registry_auth_id,
                note=body.note,
                name=image_short_name(body.image),
                image_size=size,
                created_at=int(now),
                anchor=now,
                phases=[
                    _Phase("pending", cfg.pending_seconds),
                    _Phase("running", running),
                    _Phase("failed" if fails else "succeeded", None),
                ],
            )
            self._insert(task)
            return {"task_id": task.task_id}

    def get_task(self, task_id: str) -> dict[str, Any]:
        """Render one task.

        :param task_id: the task id.
        :return: the PrewarmTask JSON.
        :raises ApiError: 404 ``PREWARM_TASK_NOT_FOUND``.
        """
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                raise ApiError(404, "PREWARM_TASK_NOT_FOUND", f"prewarm task {task_id!r} not found")
            return self._render(task, self.now())

    def list_tasks(self, *, limit: int, after_seq: int, status: str, region_id: str, name: str) -> dict[str, Any]:
        """One page of tasks in creation order.

        :param limit: page size (already defaulted and clamped).
        :param after_seq: return tasks created after this sequence number (0 = from the start).
        :param status: state filter, "" for none.
        :param region_id: exact region filter, "" for none.
        :param name: case-insensitive substring of name, image or note, "" for none.
        :return: ``{"data": [...], "next_cursor": str, "has_more": bool}``.
        """
        needle = name.casefold()
        with self._lock:
            now = self.now()
            page: list[_Task] = []
            has_more = False
            for task in self._tasks.values():  # insertion order == creation (seq) order
                if task.seq <= after_seq:
                    continue
                if status and self._state(task, now) != status:
                    continue
                if region_id and task.region_id != region_id:
                    continue
                if needle and not any(needle in s.casefold() for s in (task.name, task.image, task.note)):
                    continue
                if len(page) == limit:
                    has_more = True
                    break
                page.append(task)
            return {
                "data": [self._render(t, now) for t in page],
                "next_cursor": _encode_cursor(page[-1]) if has_more else "",
                "has_more": has_more,
            }

    def delete_tasks(self, task_ids: Iterable[str]) -> list[str]:
        """Delete tasks; unknown ids are ignored.

        :param task_ids: ids to delete.
        :return: the ids that existed and were deleted.
        """
        with self._lock:
            return [tid for tid in task_ids if self._tasks.pop(tid, None) is not None]

    # ---- control operations -------------------------------------------------------------------

    @staticmethod
    def _phases(
        state: str,
        error: str | None,
        message: str | None,
        reason: list[str] | None,
        timeline: list[PhaseSpec] | None,
    ) -> list[_Phase]:
        if timeline:
            return [
                _Phase(p.state, p.seconds, p.error, p.message, tuple(p.reason) if p.reason is not None else None)
                for p in timeline
            ]
        return [_Phase(state, None, error, message, tuple(reason) if reason is not None else None)]

    def seed_task(self, body: SeedTaskBody) -> dict[str, Any]:
        """Insert (or replace) a task in a fixed state or following a timeline from now.

        :param body: the seed description.
        :return: the PrewarmTask JSON.
        """
        with self._lock:
            now = self.now()
            task = _Task(
                seq=self._next_seq(),
                task_id=body.task_id or self._new_id(),
                image=body.image,
                region_id=body.region_id,
                product_ids=list(body.product_ids),
                registry_auth_id=body.registry_auth_id,
                note=body.note,
                name=body.name if body.name is not None else image_short_name(body.image),
                image_size=body.image_size if body.image_size is not None else image_size_for(body.image),
                created_at=body.created_at if body.created_at is not None else int(now),
                anchor=now,
                phases=self._phases(body.state, body.error, body.message, body.reason, body.timeline),
                completed_at=body.completed_at,
            )
            self._insert(task)
            return self._render(task, now)

    def set_state(self, task_id: str, body: SetStateBody) -> dict[str, Any]:
        """Force a task into a state (or a new timeline starting now).

        :param task_id: the task id.
        :param body: the new state.
        :return: the PrewarmTask JSON.
        :raises ApiError: 404 if the task does not exist.
        """
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                raise ApiError(404, "PREWARM_TASK_NOT_FOUND", f"prewarm task {task_id!r} not found")
            now = self.now()
            task.anchor = now
            task.phases = self._phases(body.state, body.error, body.message, body.reason, body.timeline)
            task.completed_at = body.completed_at
            return self._render(task, now)

    def all_tasks(self) -> list[dict[str, Any]]:
        """Render every task, creation order.

        :return: list of PrewarmTask JSON.
        """
        with self._lock:
            now = self.now()
            return [self._render(t, now) for t in self._tasks.values()]

    def add_fault(self, spec: FaultSpec) -> Fault:
        """Queue a fault for the next matching API requests.

        :param spec: the fault.
        :return: the queued fault.
        """
        with self._lock:
            self._fault_seq += 1
            fault = Fault(self._fault_seq, spec, spec.count)
            self._faults.append(fault)
            return fault

    def take_fault(self, method: str, path: str) -> Fault | None:
        """Consume one use of the first fault matching a request (atomic).

        :param method: HTTP method.
        :param path: request path.
        :return: the fault to apply, or None.
        """
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    return fault
            return None

    def faults(self) -> list[dict[str, Any]]:
        """Describe the pending faults.

        :return: list of fault dicts.
        """
        with self._lock:
            return [f.to_json() for f in self._faults]

    def clear_faults(self) -> None:
        """Drop every pending fault."""
        with self._lock:
            self._faults.clear()

    def log_request(self, entry: dict[str, Any]) -> None:
        """Append one API request to the log.

        :param entry: the log entry (never contains the API key).
        """
        with self._lock:
            self._log_seq += 1
            entry["seq"] = self._log_seq
            self._log.append(entry)

    def requests(self) -> list[dict[str, Any]]:
        """The logged API requests, oldest first.

        :return: list of log entries.
        """
        with self._lock:
            return [dict(e) for e in self._log]

    def configure(self, patch: ConfigPatch) -> dict[str, Any]:
        """Change lifecycle settings at run time (affects tasks created afterwards).

        :param patch: fields to change.
        :return: the runtime settings now in effect.
        """
        changes = {
            key: value
            for key, value in patch.model_dump(exclude_unset=True).items()
            if value is not None or key == "quota"
        }
        with self._lock:
            self.config = dataclasses.replace(self.config, **changes)
            return self.runtime_config()

    def runtime_config(self) -> dict[str, Any]:
        """The settings ``PUT /_emulator/config`` can change, plus the clock offset.

        :return: JSON-ready dict (never includes the API key).
        """
        with self._lock:
            data = {name: getattr(self.config, name) for name in RUNTIME_FIELDS}
            data["clock_offset"] = self._offset
            data["now"] = self.now()
            return data

    def reset(self) -> None:
        """Forget tasks, faults, the request log and the clock offset; restore the initial config."""
        with self._lock:
            self._tasks.clear()
            self._faults.clear()
            self._log.clear()
            self._offset = 0.0
            self.config = dataclasses.replace(self._initial)

    def task_count(self) -> int:
        """Number of stored tasks.

        :return: the count.
        """
        with self._lock:
            return len(self._tasks)


# --------------------------------------------------------------------------------------------------
# Request parsing helpers
# --------------------------------------------------------------------------------------------------


def _require_json(request: Request) -> None:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise _bad_request(
            "Content-Type must be application/json" + (f", got {media_type!r}" if media_type else " (header missing)"),
            "INVALID_CONTENT_TYPE",
        )


async def _json_object(request: Request) -> dict[str, Any]:
    _require_json(request)
    raw = await request.body()
    if not raw.strip():
        raise _bad_request("request body is required", "INVALID_JSON")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad_request(f"request body is not valid JSON: {exc}", "INVALID_JSON") from exc
    if not isinstance(data, dict):
        raise _bad_request("request body must be a JSON object")
    return data


_M = TypeVar("_M", bound=BaseModel)


def _validate(model: type[_M], data: Any, what: str) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _bad_request(_validation_message(exc, what)) from exc


def _query_str(request: Request, name: str, max_length: int) -> str:
    value = request.query_params.get(name, "")
    if len(value) > max_length:
        raise _bad_request(f"query parameter '{name}' is too long: at most {max_length} characters")
    return value


def _parse_limit(request: Request, cfg: EmulatorConfig) -> int:
    raw = request.query_params.get("limit", "").strip()
    if raw == "":
        return cfg.default_page_size
    if not re.fullmatch(r"\+?[0-9]+", raw):
        raise _bad_request(f"query parameter 'limit' must be an integer >= 0, got {raw[:40]!r}")
    value = int(raw)
    if value == 0:
        return cfg.default_page_size
    return min(value, cfg.max_page_size)


# --------------------------------------------------------------------------------------------------
# Faults, auth and request log: a pure ASGI middleware in front of the API routes
# --------------------------------------------------------------------------------------------------


def _current_transport() -> asyncio.BaseTransport | None:
    """Find the socket transport of the current uvicorn request, if any.

    ASGI has no way to drop a connection, so this looks at the uvicorn task running the request
    (``RequestResponseCycle.run_asgi``, which holds ``self.transport``). Returns None elsewhere
    (e.g. under an in-process test client).
    """
    task = asyncio.current_task()
    frame = getattr(task.get_coro(), "cr_frame", None) if task is not None else None
    owner = frame.f_locals.get("self") if frame is not None else None
    transport = getattr(owner, "transport", None)
    return transport if isinstance(transport, asyncio.BaseTransport) else None


async def _close_transport(transport: asyncio.BaseTransport) -> None:
    transport.close()
    for _ in range(3):  # let uvicorn see connection_lost before the app returns
        await asyncio.sleep(0)


def _headers(content_type: str, length: int | None, extra: dict[str, str] | None = None) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", content_type.encode("latin-1"))]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    for key, value in (extra or {}).items():
        headers.append((key.lower().encode("latin-1"), value.encode("latin-1")))
    return headers


def _body_bytes(value: Any) -> tuple[bytes, str]:
    """Encode a fault body: a str is sent as text, anything else as JSON."""
    if isinstance(value, str):
        return value.encode("utf-8"), "text/plain; charset=utf-8"
    return json.dumps(value).encode("utf-8"), "application/json"


_HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head>\n"
    b"<body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>\n"
)
_MALFORMED_JSON = b'{"task_id": "pwt-000000000000", "status": {"status": "runn'


class _ApiGate:
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
            if message["type"] == "http.request" and len(body) < _MIB:
                body.extend(message.get("body", b""))
            return message

        method: str = scope["method"]
        fault = self.store.take_fault(method, path)
        status: list[int] = []
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
                    "fault": fault.spec.kind if fault is not None else None,
                }
            )

        async def logging_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
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
        if fault is not None:
            spec = fault.spec
            if spec.kind == "latency":
                await self._sleep(spec.seconds)
            elif spec.kind == "trickle":
                await self._trickle(spec.interval, scope, receive, send, auth, auth_valid)
                return
            else:
                await self._fault_response(spec, send)
                return
        await self._serve(scope, receive, send, auth, auth_valid)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, auth: str | None, auth_valid: bool) -> None:
        if not auth_valid:
            message = (
                "missing Authorization header: send 'Authorization: Bearer <API key>'"
                if auth is None
                else "invalid API key: send 'Authorization: Bearer <API key>'"
            )
            reason = "MISSING_API_KEY" if auth is None else "INVALID_API_KEY"
            response = _error_response(401, reason, message, {"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _sleep(self, seconds: float, interrupt: asyncio.Event | None = None) -> None:
        """Sleep, returning early when the server shuts down or ``interrupt`` is set."""
        deadline = time.monotonic() + seconds
        while not self.store.closing.is_set() and not (interrupt is not None and interrupt.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.05))

    async def _fault_response(self, spec: FaultSpec, send: Send) -> None:
        kind = spec.kind
        headers = dict(spec.headers)
        if kind == "drop":
            await self._drop(spec, send)
            return
        if kind == "huge_body":
            await self._huge(spec, send)
            return
        content_type = spec.content_type
        status = spec.status
        if kind == "status":
            status = status or 500
            if "body" in spec.model_fields_set:
                data, guessed = _body_bytes(spec.body)
            else:
                data, guessed = _body_bytes(
                    error_body(status, _status_reason(status), f"injected fault: HTTP {status}")
                )
        elif kind == "rate_limit":
            status = status or 429
            data, guessed = _body_bytes(error_body(status, "RATE_LIMIT_EXCEEDED", "rate limit exceeded, retry later"))
            if spec.retry_after is not None:
                headers.setdefault("Retry-After", self._retry_after(spec))
        elif kind == "malformed_json":
            status, data, guessed = status or 200, _MALFORMED_JSON, "application/json"
        elif kind == "html":
            status, data, guessed = status or 200, _HTML_PAGE, "text/html; charset=utf-8"
        elif kind == "empty_body":
            status, data, guessed = status or 200, b"", "application/json"
        elif kind == "json_array":
            value = spec.body if "body" in spec.model_fields_set else []
            status, data, guessed = status or 200, json.dumps(value).encode(), "application/json"
        else:  # "body": a str is sent verbatim, anything else as JSON
            status, guessed = status or 200, "application/json"
            if isinstance(spec.body, str):
                data = spec.body.encode("utf-8")
            elif "body" in spec.model_fields_set:
                data = json.dumps(spec.body).encode("utf-8")
            else:
                data = b""
        no_body = status in (204, 304)
        if no_body:
            data = b""
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": _headers(content_type or guessed, None if no_body else len(data), headers),
            }
        )
        await send({"type": "http.response.body", "body": data})

    def _retry_after(self, spec: FaultSpec) -> str:
        value = spec.retry_after
        if isinstance(value, str):
            return value
        assert value is not None
        if spec.retry_after_format == "http-date":
            return formatdate(time.time() + value, usegmt=True)
        return str(math.ceil(value))

    async def _drop(self, spec: FaultSpec, send: Send) -> None:
        transport = _current_transport()
        if spec.when == "mid_body":
            payload = json.dumps({"task_id": "pwt-000000000000", "padding": "x" * 1024}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": spec.status or 200,
                    "headers": _headers("application/json", len(payload)),
                }
            )
            await send({"type": "http.response.body", "body": payload[: len(payload) // 2], "more_body": True})
        if transport is None:
            raise ConnectionAbortedError("drop fault: no socket transport to close (not running under uvicorn)")
        await _close_transport(transport)

    async def _huge(self, spec: FaultSpec, send: Send) -> None:
        total = max(int(spec.megabytes * _MIB), 16)
        head, tail = b'{"padding":"', b'"}'
        pad = total - len(head) - len(tail)
        await send(
            {
                "type": "http.response.start",
                "status": spec.status or 200,
                "headers": _headers(spec.content_type or "application/json", total, spec.headers),
            }
        )
        await send({"type": "http.response.body", "body": head, "more_body": True})
        chunk = b"x" * (256 * 1024)
        while pad > 0:
            if self.store.closing.is_set():
                return  # shutting down: leave the response incomplete, uvicorn closes the connection
            piece = chunk[: min(pad, len(chunk))]
            pad -= len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": tail})

    async def _trickle(
        self, interval: float, scope: Scope, receive: Receive, send: Send, auth: str | None, auth_valid: bool
    ) -> None:
        messages: list[Message] = []

        async def capture(message: Message) -> None:
            messages.append(message)

        await self._serve(scope, receive, capture, auth, auth_valid)
        start = next(m for m in messages if m["type"] == "http.response.start")
        data = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
        disconnected = asyncio.Event()

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected.set()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await send(start)
            for i in range(len(data)):
                if self.store.closing.is_set() or disconnected.is_set():
                    return
                await send({"type": "http.response.body", "body": data[i : i + 1], "more_body": True})
                await self._sleep(interval, disconnected)
            await send({"type": "http.response.body", "body": b""})
        finally:
            watcher.cancel()


def _maybe_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


# --------------------------------------------------------------------------------------------------
# The application
# --------------------------------------------------------------------------------------------------


def _allowed_methods(request: Request) -> str:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        route_methods = getattr(route, "methods", None)
        if match != Match.NONE and route_methods:
            methods.update(route_methods)
    return ", ".join(sorted(methods))


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
    app.add_middleware(_ApiGate, store=store)

    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            return _error_response(404, "NOT_FOUND", f"no such endpoint: {request.method} {request.url.path}")
        if exc.status_code == 405:
            return _error_response(
                405,
                "METHOD_NOT_ALLOWED",
                f"method {request.method} is not allowed on {request.url.path}",
                {"Allow": _allowed_methods(request)},
            )
        return _error_response(exc.status_code, _status_reason(exc.status_code), str(exc.detail), exc.headers)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        return _error_response(400, "INVALID_ARGUMENT", f"invalid request: {exc}")

    async def on_crash(request: Request, exc: Exception) -> Response:
        return _error_response(500, "INTERNAL_ERROR", f"emulator bug: {type(exc).__name__}: {exc}")

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_crash)

    # ---- the API ------------------------------------------------------------------------------

    @app.post(API_PREFIX)
    async def create_prewarm_task(request: Request) -> dict[str, Any]:
        body = _validate(CreateTaskBody, await _json_object(request), "request body")
        limit = store.config.max_note_length
        if len(body.note) > limit:
            raise _bad_request(f"invalid request body: field 'note': at most {limit} characters")
        return store.create_task(body)

    @app.get(API_PREFIX)
    async def list_prewarm_tasks(request: Request) -> dict[str, Any]:
        limit = _parse_limit(request, store.config)
        cursor = _query_str(request, "cursor", 1024)
        status = _query_str(request, "status", 255)
        if status and status not in DOCUMENTED_STATES:
            raise _bad_request(
                f"query parameter 'status' must be one of pending, running, succeeded, failed or empty, "
                f"got {status[:40]!r}"
            )
        region_id = _query_str(request, "region_id", 255)
        name = _query_str(request, "name", 255)
        after = _decode_cursor(cursor) if cursor else 0
        return store.list_tasks(limit=limit, after_seq=after, status=status, region_id=region_id, name=name)

    @app.delete(API_PREFIX)
    async def delete_prewarm_tasks(request: Request) -> dict[str, Any]:
        body = _validate(DeleteTasksBody, await _json_object(request), "request body")
        store.delete_tasks(body.task_ids)
        return {}

    @app.get(API_PREFIX + "/{task_id}")
    async def get_prewarm_task(task_id: str) -> dict[str, Any]:
        if len(task_id) > _ID_MAX:
            raise _bad_request(f"path parameter 'task_id' is too long: at most {_ID_MAX} characters")
        return store.get_task(task_id)

    # ---- control endpoints --------------------------------------------------------------------

    def control(request: Request) -> None:
        token = store.config.control_token
        if token is not None and not secrets.compare_digest(
            request.headers.get("x-emulator-token", "").encode(), token.encode()
        ):
            raise ApiError(401, "INVALID_CONTROL_TOKEN", "send the control token in header X-Emulator-Token")

    async def control_body(request: Request, model: type[_M]) -> _M:
        control(request)
        return _validate(model, await _json_object(request), "control request")

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
            raise _bad_request(str(exc)) from exc

    @app.post(CONTROL_PREFIX + "/clock")
    async def clock(request: Request) -> dict[str, Any]:
        body = await control_body(request, ClockBody)
        store.advance_clock(body.advance)
        return store.runtime_config()

    return app
