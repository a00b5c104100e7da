"""Domain state of the emulator: prewarm tasks, their lifecycle, and the store that holds them.

A task's state is never stored as such: it is worked out from the clock on every read, from the
timeline of phases fixed when the task was created (or seeded, or forced by the control API).
The store also holds what the other concerns need to share safely across threads: the queued
faults, the request log, the clock offset and the quota statistics (:meth:`EmulatorStore.stats`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import math
import re
import secrets
import threading
from collections import deque
from collections.abc import Iterable
from typing import Any

from airflow_provider_ppio.testing.config import (
    ACTIVE_STATES,
    GB,
    GIB,
    QUOTA_MESSAGE,
    QUOTA_REASON,
    RUNTIME_FIELDS,
    TERMINAL_STATES,
    EmulatorConfig,
)
from airflow_provider_ppio.testing.errors import ApiError, bad_request
from airflow_provider_ppio.testing.faults import Fault, FaultSpec
from airflow_provider_ppio.testing.schemas import ConfigPatch, CreateTaskBody, PhaseSpec, SeedTaskBody, SetStateBody

__all__ = ["EmulatorStore", "decode_cursor", "encode_cursor", "image_short_name", "image_size_for"]


@dataclasses.dataclass(frozen=True)
class _Phase:
    """One step of a task's timeline (``seconds`` None = forever)."""

    state: str
    seconds: float | None
    error: str | None = None
    message: str | None = None
    reason: tuple[str, ...] | None = None


@dataclasses.dataclass
class _Task:
    """A stored task; its state at a time is derived from ``anchor`` and ``phases``."""

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
    return GIB + digest % (19 * GIB)


def _node_count(image: str) -> int:
    return 2 + int(hashlib.sha256(image.encode("utf-8", "surrogatepass")).hexdigest()[:2], 16) % 5


def _active_spans(task: _Task, until: float) -> list[tuple[float, float]]:
    """The time spans, up to ``until``, in which a task's timeline holds it pending or running.

    The last phase lasts forever, whatever its ``seconds`` (as in :meth:`EmulatorStore._current`).
    """
    spans: list[tuple[float, float]] = []
    start = task.anchor
    last = len(task.phases) - 1
    for index, phase in enumerate(task.phases):
        if start >= until:
            break
        forever = phase.seconds is None or index == last
        end = math.inf if forever else start + (phase.seconds or 0.0)
        if phase.state in ACTIVE_STATES and end > start:
            spans.append((start, min(end, until)))
        if forever:
            break
        start = end
    return spans


def _peak(spans: Iterable[tuple[float, float]]) -> tuple[int, float | None]:
    """The most spans open at one instant (half-open spans: one ending as another starts do not overlap).

    :param spans: ``(start, end)`` pairs.
    :return: the peak and the first time it was reached (None when there are no spans).
    """
    events = sorted(
        [(start, 1) for start, end in spans if end > start] + [(end, -1) for start, end in spans if end > start]
    )
    peak, at, open_now = 0, None, 0
    for when, delta in events:  # at equal times -1 sorts before +1: ends are processed first
        open_now += delta
        if open_now > peak:
            peak, at = open_now, when
    return peak, at


def encode_cursor(task: _Task) -> str:
    """The ``next_cursor`` pointing after a task: base64url JSON of its id and sequence number.

    :param task: the last task of a page.
    :return: the opaque cursor.
    """
    raw = json.dumps({"id": task.task_id, "seq": task.seq}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """Read a cursor issued by :func:`encode_cursor`.

    :param cursor: the cursor from the request.
    :return: the sequence number to list after.
    :raises ApiError: 400 ``INVALID_CURSOR`` for anything the emulator did not issue.
    """
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        raise bad_request("invalid cursor: pass the next_cursor of a previous page", "INVALID_CURSOR") from exc
    seq = data.get("seq") if isinstance(data, dict) else None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise bad_request("invalid cursor: pass the next_cursor of a previous page", "INVALID_CURSOR")
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
        # Quota statistics since the last reset (see stats()).
        self._since = self.now()
        self._closed_spans: list[tuple[float, float]] = []
        self._creates = 0
        self._refused_creates = 0
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

    def _counted(self, now: float) -> int:
        """Tasks that count toward the quota now: pending and running ones, or every stored one."""
        if self.config.quota_counts_finished:
            return len(self._tasks)
        return sum(1 for t in self._tasks.values() if self._state(t, now) in ACTIVE_STATES)

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
        replaced = self._tasks.pop(task.task_id, None)
        if replaced is not None:
            self._close_spans(replaced, task.anchor)
        self._tasks[task.task_id] = task

    def _close_spans(self, task: _Task, now: float) -> None:
        """Keep, for :meth:`stats`, when a task that is deleted or re-timed now was active so far."""
        self._closed_spans.extend(_active_spans(task, now))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # ---- API operations -----------------------------------------------------------------------

    def create_task(self, body: CreateTaskBody) -> dict[str, Any]:
        """Create a task following the configured lifecycle.

        :param body: validated create body.
        :return: ``{"task_id": ...}``.
        :raises ApiError: ``quota_status`` (400 by default) ``IMAGE_PREWARM_NUM_LIMIT`` when the quota is
            used up: pending and running tasks count, and finished ones too with ``quota_counts_finished``.
        """
        with self._lock:
            cfg = self.config
            now = self.now()
            quota = cfg.quota
            if quota is not None and self._counted(now) >= quota:
                self._refused_creates += 1
                raise ApiError(cfg.quota_status, QUOTA_REASON, QUOTA_MESSAGE)
            size = image_size_for(body.image)
            fails = bool(cfg.fail_pattern) and re.search(cfg.fail_pattern, body.image) is not None
            running = cfg.running_seconds + cfg.seconds_per_gb * size / GB
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
            self._creates += 1
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
                "next_cursor": encode_cursor(page[-1]) if has_more else "",
                "has_more": has_more,
            }

    def delete_tasks(self, task_ids: Iterable[str]) -> list[str]:
        """Delete tasks; unknown ids are ignored.

        :param task_ids: ids to delete.
        :return: the ids that existed and were deleted.
        """
        with self._lock:
            now = self.now()
            deleted = []
            for tid in task_ids:
                task = self._tasks.pop(tid, None)
                if task is not None:
                    self._close_spans(task, now)
                    deleted.append(tid)
            return deleted

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
            self._close_spans(task, now)
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
                    fault.arrive()
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
            self._since = self.now()
            self._closed_spans.clear()
            self._creates = 0
            self._refused_creates = 0

    def stats(self) -> dict[str, Any]:
        """Quota statistics since the start or the last :meth:`reset`.

        ``peak_active`` is the most tasks that were pending or running at one instant, worked out
        from every task's timeline (deleted and re-timed tasks included, up to when they changed),
        so it is exact however rarely the tasks were read. Tasks seeded through the control API
        count as active too; only API creates count in ``creates`` and ``refused_creates``.

        :return: ``{"active", "peak_active", "peak_at", "creates", "refused_creates", "quota",
            "quota_counts_finished", "counted" (tasks counting toward the quota now), "since", "now"}``.
        """
        with self._lock:
            now = self.now()
            current = [span for task in self._tasks.values() for span in _active_spans(task, now)]
            peak, peak_at = _peak(self._closed_spans + current)
            return {
                "active": sum(1 for t in self._tasks.values() if self._state(t, now) in ACTIVE_STATES),
                "peak_active": peak,
                "peak_at": peak_at,
                "creates": self._creates,
                "refused_creates": self._refused_creates,
                "quota": self.config.quota,
                "quota_counts_finished": self.config.quota_counts_finished,
                "counted": self._counted(now),
                "since": self._since,
                "now": now,
            }

    def task_count(self) -> int:
        """Number of stored tasks.

        :return: the count.
        """
        with self._lock:
            return len(self._tasks)
