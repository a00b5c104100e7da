"""
``PrewarmTaskEventTrigger``: schedule DAGs when prewarm tasks finish (Airflow 3 event-driven scheduling).

Put it in an ``AssetWatcher`` of an asset (e.g. ``prewarm_asset(region, image)``); DAGs scheduled on the
asset run once per prewarm task that reaches ``succeeded`` (and ``failed``, if asked), with the task's
details in the asset event's ``extra["payload"]``. See docs/event-driven.md.

How the triggerer treats it (``jobs/triggerer_job_runner.py`` as of Airflow 3.3.2): an event trigger is never
ended by its events; every event becomes an asset event and ``run()`` keeps going. If ``run()`` returned,
the trigger would count as finished and the triggerer would start a fresh instance from the same kwargs on
its next loop, so this trigger never returns: API errors back off and polling goes on. A restart of the
triggerer is also a fresh instance; what it reported before survives only in ``asset_state_store``
(Airflow 3.3). The triggerer hands fired events to its supervisor about once a second and the supervisor
stores them after that, so what was reported is saved :data:`SETTLE_SECONDS` after the events fired.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections.abc import AsyncIterator, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from airflow import __version__ as _AIRFLOW_VERSION
from airflow.providers.common.compat.sdk import AirflowException
from airflow.triggers.base import TriggerEvent

from airflow_provider_ppio.exceptions import PPIOError, PPIOInvalidInputError
from airflow_provider_ppio.get_provider_info import DEFAULT_CONN_ID
from airflow_provider_ppio.hooks import check_seconds
from airflow_provider_ppio.models import PrewarmTask
from airflow_provider_ppio.status import TERMINAL_STATES, PrewarmTaskState
from airflow_provider_ppio.triggers.prewarm import _JITTER, MIN_DEFERRED_POKE_INTERVAL

try:
    from airflow.triggers.base import BaseEventTrigger
except ImportError:  # Airflow 2: no event-driven scheduling; __init__ says so
    from airflow.triggers.base import BaseTrigger as BaseEventTrigger  # type: ignore[assignment]

#: Statuses a watcher can report: the two a prewarm task ends in.
WATCHABLE_STATUSES: Final = tuple(sorted(state.value for state in TERMINAL_STATES))
#: After a restart, tasks that finished longer than this before the newest finish seen are not reported.
DEFAULT_CATCH_UP_HORIZON: Final = 86400.0
#: Seconds between firing events and saving them as reported: the triggerer stores fired events within
#: about two of its one-second loops; saving earlier could record an event a crash then loses.
SETTLE_SECONDS: Final = 5.0
#: Seconds between two events of one watcher. Airflow 3.3 closes a run's event window at the moment the
#: first queued event arrived, and an event of the same asset that arrives while that run is being created
#: waits for the next event (apache/airflow#56050; 3.4 queues each event). Spacing them lets the scheduler
#: create a run per event in the usual case; the example DAG deploys per event either way.
EVENT_SPACING: Final = 3.0
#: Longest pause between walks while the API keeps failing.
MAX_ERROR_BACKOFF: Final = 600.0
#: Tasks per list request.
PAGE_SIZE: Final = 100
_STATE_KEY_PREFIX: Final = "ppio_prewarm_events"
_MAX_FILTER_LENGTH: Final = 255


def _airflow_major() -> int:
    return int(_AIRFLOW_VERSION.split(".", 1)[0])


@dataclass
class Ledger:
    """
    What a watcher has reported, as kept in ``asset_state_store``: JSON ``{"watermark", "reported"}``.

    ``reported`` maps task ids to their ``completed_at``; tasks that finished before ``watermark`` (API
    time, Unix seconds) are ignored, which keeps the ledger bounded.

    :param horizon: Seconds kept behind the newest completion seen.
    :param watermark: Tasks with a ``completed_at`` before this are never reported.
    :param reported: Task id to ``completed_at`` of every task already reported (or in the baseline).
    """

    horizon: float
    watermark: int = 0
    reported: dict[str, int] = field(default_factory=dict)

    @classmethod
    def baseline(cls, tasks: Sequence[PrewarmTask], horizon: float) -> Ledger:
        """
        A first start: the tasks already finished are taken as reported; only later ones fire.

        :param tasks: The finished tasks the watcher sees now.
        :param horizon: Seconds kept behind the newest completion.
        """
        ledger = cls(horizon=horizon, reported={task.task_id: task.completed_at for task in tasks})
        ledger.prune({task.task_id for task in tasks})
        return ledger

    @classmethod
    def from_json(cls, value: Any, horizon: float) -> Ledger | None:
        """
        The ledger a previous instance saved, or None when there is none (or it is unreadable).

        :param value: The stored JSON.
        :param horizon: Seconds kept behind the newest completion.
        """
        if not isinstance(value, dict) or not isinstance(value.get("reported"), dict):
            return None
        watermark = value.get("watermark")
        reported = {str(k): v for k, v in value["reported"].items() if isinstance(v, int)}
        return cls(horizon=horizon, watermark=watermark if isinstance(watermark, int) else 0, reported=reported)

    def to_json(self) -> dict[str, Any]:
        """The JSON kept in ``asset_state_store``."""
        return {"watermark": self.watermark, "reported": dict(sorted(self.reported.items()))}

    def merge(self, other: Ledger) -> None:
        """
        Take in what another copy recorded (an asset watched twice keeps a copy per asset).

        :param other: The other copy.
        """
        self.watermark = max(self.watermark, other.watermark)
        self.reported.update(other.reported)

    def is_new(self, task: PrewarmTask) -> bool:
        """
        Whether ``task`` is still to be reported.

        :param task: A finished task.
        """
        return task.task_id not in self.reported and (task.completed_at <= 0 or task.completed_at >= self.watermark)

    def record(self, task: PrewarmTask) -> None:
        """
        Mark ``task`` reported.

        :param task: The task an event was fired for.
        """
        self.reported[task.task_id] = task.completed_at

    def prune(self, listed: set[str]) -> None:
        """
        Move the watermark to ``horizon`` behind the newest completion and forget what is behind it,
        and tasks without a completion time that the API no longer lists.

        :param listed: The ids of the finished tasks the last complete walk saw.
        """
        newest = max(self.reported.values(), default=0)
        if newest > 0:
            self.watermark = max(self.watermark, int(newest - self.horizon))
        self.reported = {
            task_id: done
            for task_id, done in self.reported.items()
            if (done >= self.watermark if done > 0 else task_id in listed)
        }


class PrewarmTaskEventTrigger(BaseEventTrigger):
    """
    Watch the account's prewarm tasks; fire one event per task that reaches a watched status.

    Each poll is one paged walk of ``GET /gpus/v2/prewarm-tasks`` with the API's region and name
    filters. Watchers with the same connection, region, name (or image name) and interval share that
    walk on Airflow 3.3 (shared streams). Transient errors are retried with the
    connection's backoff for up to ``unreachable_timeout``; after that, or on any other error, the
    watcher logs it and tries again later, backing off up to :data:`MAX_ERROR_BACKOFF`.

    Event payload: ``status`` (``succeeded`` or ``failed``), ``prewarm_task_id``, ``image``,
    ``region_id``, ``completed_at`` and ``task`` (the whole task as plain JSON).

    Exactly once across restarts on Airflow 3.3: what was reported is kept in the asset's
    ``asset_state_store``; tasks that finished while the triggerer was down are reported when it is
    back, unless they finished more than ``catch_up_horizon`` before the newest finish seen. On Airflow
    3.0-3.2 there is no durable state: each (re)start takes the tasks already finished as reported, so
    nothing is reported twice and tasks that finish while no triggerer runs the watcher are missed.
    The first start on any line reports only tasks that finish from then on.

    :param image: Only tasks of this exact image reference.
    :param name: Only tasks whose image name or note contains this (the API's fuzzy ``name`` filter).
    :param region_id: Only tasks in this region.
    :param statuses: What to report: ``"succeeded"`` (default), ``"failed"``, or both.
    :param watch_all: Set True to watch every prewarm task of the account (no image, name or region).
    :param ppio_conn_id: The PPIO connection id.
    :param poke_interval: Seconds between two walks (at least 1).
    :param catch_up_horizon: Seconds behind the newest completion within which a restart catches up.
    :param unreachable_timeout: Overrides the connection's bound on outages, in seconds.
    """

    def __init__(
        self,
        *,
        image: str | None = None,
        name: str | None = None,
        region_id: str | None = None,
        statuses: str | Sequence[str] = (PrewarmTaskState.SUCCEEDED.value,),
        watch_all: bool = False,
        ppio_conn_id: str = DEFAULT_CONN_ID,
        poke_interval: float = 60.0,
        catch_up_horizon: float = DEFAULT_CATCH_UP_HORIZON,
        unreachable_timeout: float | None = None,
    ) -> None:
        if _airflow_major() < 3:
            raise PPIOInvalidInputError(
                f"PrewarmTaskEventTrigger needs Airflow 3 (event-driven scheduling with AssetWatcher); this is "
                f"Airflow {_AIRFLOW_VERSION}. On Airflow 2 gate a DAG on a prewarm task with PrewarmTaskSensor."
            )
        super().__init__()  # type: ignore[no-untyped-call]
        self.image = _filter_value("image", image, 4095)
        self.name = _filter_value("name", name, _MAX_FILTER_LENGTH)
        self.region_id = _filter_value("region_id", region_id, _MAX_FILTER_LENGTH)
        if not isinstance(watch_all, bool):
            raise PPIOInvalidInputError(f"watch_all must be True or False, got {watch_all!r}")
        if watch_all and (self.image or self.name or self.region_id):
            raise PPIOInvalidInputError("watch_all=True watches every prewarm task: give no image, name or region_id")
        if not watch_all and not (self.image or self.name or self.region_id):
            raise PPIOInvalidInputError(
                "PrewarmTaskEventTrigger has no filter: give image, name or region_id, or set watch_all=True to "
                "watch every prewarm task of the account"
            )
        self.watch_all = watch_all
        self.statuses = _statuses(statuses)
        self.ppio_conn_id = ppio_conn_id
        self.poke_interval = check_seconds("poke_interval", poke_interval)
        self.catch_up_horizon = check_seconds("catch_up_horizon", catch_up_horizon)
        self.unreachable_timeout = check_seconds("unreachable_timeout", unreachable_timeout, allow_none=True)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """The class path and the keyword arguments that rebuild this trigger (primitives only)."""
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "image": self.image,
                "name": self.name,
                "region_id": self.region_id,
                "statuses": list(self.statuses),
                "watch_all": self.watch_all,
                "ppio_conn_id": self.ppio_conn_id,
                "poke_interval": self.poke_interval,
                "catch_up_horizon": self.catch_up_horizon,
                "unreachable_timeout": self.unreachable_timeout,
            },
        )

    # -- the walk, shared between siblings -----------------------------------------------------------------

    def list_query(self) -> dict[str, str | None]:
        """
        The filters sent to the API: region and name. Statuses are checked here: at most a few tasks are
        pending or running at once, and watchers of ``succeeded`` and of ``failed`` can share the walk.
        """
        return {
            "region_id": self.region_id,
            # The API's ``name`` is the image's short name (``image:tag``); the exact image is checked here.
            "name": self.name or (_short_name(self.image) if self.image else None),
        }

    def shared_stream_key(self) -> Hashable | None:
        """Watchers that would send the same walk share it (Airflow 3.3)."""
        query = self.list_query()
        return (
            "ppio-prewarm-tasks",
            self.ppio_conn_id,
            query["region_id"],
            query["name"],
            self.poke_interval,
            self.unreachable_timeout,
        )

    @classmethod
    async def open_shared_stream(cls, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        """
        Walk the list every ``poke_interval`` and yield each complete walk: ``{"tasks": [...]}`` (finished tasks).

        :param kwargs: One watcher's kwargs; only the fields in :meth:`shared_stream_key` are used.
        """
        watcher = cls(**kwargs)
        async for snapshot in watcher._walks():
            yield snapshot

    async def _walks(self) -> AsyncIterator[dict[str, Any]]:
        """Every ``poke_interval`` (with jitter) one complete walk; errors back off, nothing ends it."""
        # The hook stack (aiohttp, tenacity, pydantic) is only needed in the triggerer, not when a DAG is parsed.
        from airflow_provider_ppio.hooks.ppio import PPIOHook

        hook = PPIOHook(ppio_conn_id=self.ppio_conn_id, unreachable_timeout=self.unreachable_timeout)
        interval = max(self.poke_interval, MIN_DEFERRED_POKE_INTERVAL)
        query = self.list_query()
        failures = 0
        while True:
            try:
                tasks = [
                    task
                    async for task in hook.alist_prewarm_tasks(**query, page_size=PAGE_SIZE, patient=True)
                    if task.state in TERMINAL_STATES
                ]
            except (PPIOError, AirflowException) as err:  # outage past unreachable_timeout, bad key, no connection
                failures += 1
                pause = min(interval * 2**failures, max(MAX_ERROR_BACKOFF, interval))
                self.log.warning(
                    "Could not list prewarm tasks (%s: %s); trying again in %.0fs", type(err).__name__, err, pause
                )
                await asyncio.sleep(pause)
                continue
            if failures:
                self.log.info("Listing prewarm tasks works again after %d failed walks", failures)
            failures = 0
            yield {"tasks": [task.to_xcom() for task in tasks]}
            await asyncio.sleep(interval * random.uniform(*_JITTER))

    # -- one watcher's events ----------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Without a shared stream (Airflow 3.0-3.2, or when the triggerer does not share): walk alone."""
        async for event in self.filter_shared_stream(self._walks()):
            yield event

    async def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        """
        Fire an event for each task of a walk that this watcher has not reported yet.

        :param shared_stream: The walks (see :meth:`open_shared_stream`).
        """
        ledger = await self._load_ledger()
        async for snapshot in shared_stream:
            tasks = [task for task in map(PrewarmTask.from_api, snapshot["tasks"]) if self._watches(task)]
            if ledger is None:
                ledger = Ledger.baseline(tasks, self.catch_up_horizon)
                await self._save_ledger(ledger)
                self.log.info(
                    "Watching prewarm tasks (%s); %d already finished are not reported, later ones are",
                    self._describe(),
                    len(tasks),
                )
                continue
            before = ledger.to_json()
            fresh = sorted((task for task in tasks if ledger.is_new(task)), key=lambda t: (t.completed_at, t.task_id))
            for n, task in enumerate(fresh):
                if n:
                    await asyncio.sleep(EVENT_SPACING)
                self.log.info(
                    "Prewarm task %s %s (%s in %s): firing an event",
                    task.task_id,
                    task.status.status,
                    task.image,
                    task.region_id,
                )
                ledger.record(task)
                yield TriggerEvent(self._payload(task))  # type: ignore[no-untyped-call]
            ledger.prune({task.task_id for task in tasks})
            if fresh:
                await asyncio.sleep(SETTLE_SECONDS)  # let the triggerer store the events before saving them
            if ledger.to_json() != before:
                await self._save_ledger(ledger)

    def _watches(self, task: PrewarmTask) -> bool:
        if task.state is None or task.state.value not in self.statuses:
            return False
        if self.region_id is not None and task.region_id != self.region_id:
            return False
        return self.image is None or task.image == self.image

    @staticmethod
    def _payload(task: PrewarmTask) -> dict[str, Any]:
        return {
            "status": task.state.value if task.state else task.status.status,
            "prewarm_task_id": task.task_id,
            "image": task.image,
            "region_id": task.region_id,
            "completed_at": task.completed_at,
            "task": task.to_xcom(),
        }

    def _describe(self) -> str:
        parts = [f"{key}={value!r}" for key, value in (("image", self.image), ("name", self.name)) if value]
        parts += [f"region_id={self.region_id!r}"] if self.region_id else []
        return ", ".join(parts or ["all tasks"]) + f", statuses={'/'.join(self.statuses)}"

    # -- durable state (Airflow 3.3 asset_state_store) ---------------------------------------------------

    @property
    def state_key(self) -> str:
        """The ``asset_state_store`` key of this watcher: one per filter, so several watchers of an asset coexist."""
        what = json.dumps([self.image, self.name, self.region_id, list(self.statuses)], separators=(",", ":"))
        return f"{_STATE_KEY_PREFIX}_{hashlib.sha256(what.encode()).hexdigest()[:16]}"

    def _accessors(self) -> list[Any]:
        """One state accessor per watched asset; none before Airflow 3.3 (or outside a triggerer)."""
        store = getattr(self, "asset_state_store", None)
        if store is None:
            return []
        # An asset's watchers with the same kwargs are one trigger for all those assets: keep a copy in each.
        per_asset = [*getattr(store, "_by_name", {}).values(), *getattr(store, "_by_uri", {}).values()]
        return per_asset or [store]

    async def _load_ledger(self) -> Ledger | None:
        accessors = self._accessors()
        if not accessors:
            self.log.warning(
                "No asset_state_store (Airflow %s; it arrived in 3.3): what this watcher reports is kept in "
                "memory only, so tasks that finish while the triggerer is down are not reported",
                _AIRFLOW_VERSION,
            )
            return None
        ledger: Ledger | None = None
        for accessor in accessors:
            stored = Ledger.from_json(await accessor.aget(self.state_key), self.catch_up_horizon)
            if stored is not None:
                if ledger is None:
                    ledger = stored
                else:
                    ledger.merge(stored)
        if ledger is not None:
            self.log.info(
                "Resuming the prewarm watch (%s): %d tasks already reported", self._describe(), len(ledger.reported)
            )
        return ledger

    async def _save_ledger(self, ledger: Ledger) -> None:
        for accessor in self._accessors():
            await accessor.aset(self.state_key, ledger.to_json())


def _filter_value(name: str, value: object, max_length: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise PPIOInvalidInputError(f"{name} must be a non-empty string or None, got {value!r}")
    if len(value) > max_length:
        raise PPIOInvalidInputError(f"{name} is {len(value)} characters long; at most {max_length}")
    return value


def _statuses(value: object) -> tuple[str, ...]:
    given = [value] if isinstance(value, str) else value
    if not isinstance(given, list | tuple | set | frozenset) or not given:
        raise PPIOInvalidInputError(f"statuses must name 'succeeded', 'failed' or both, got {value!r}")
    unknown = [status for status in given if status not in WATCHABLE_STATUSES]
    if unknown:
        raise PPIOInvalidInputError(
            f"statuses: unknown status {unknown[0]!r}; a watcher reports {' or '.join(WATCHABLE_STATUSES)}"
        )
    return tuple(sorted(set(given)))


def _short_name(image: str) -> str:
    """The API's ``name`` of a task for ``image``: its last path segment, tag included."""
    return image.rstrip("/").rsplit("/", 1)[-1]
