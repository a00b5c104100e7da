"""
``PrewarmTaskEventTrigger``: schedule DAGs when prewarm tasks finish (Airflow 3 event-driven scheduling).

The triggerer never ends an event trigger by its events, so this one never returns: errors back off, polling goes
on. On Airflow 3.3 the walks run as a shared stream in ack mode: the producer's ``advance`` for a walk comes once
every event derived from it is stored, and that is where each watcher saves its ledger in ``asset_state_store``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from airflow import __version__ as _AIRFLOW_VERSION
from airflow.triggers.base import TriggerEvent

from airflow_provider_ppio.exceptions import PPIOInvalidInputError
from airflow_provider_ppio.get_provider_info import DEFAULT_CONN_ID
from airflow_provider_ppio.hooks import check_seconds
from airflow_provider_ppio.models import PrewarmTask
from airflow_provider_ppio.status import TERMINAL_STATES, PrewarmTaskState, clip
from airflow_provider_ppio.triggers.prewarm import _JITTER, MIN_DEFERRED_POKE_INTERVAL

try:
    from airflow.triggers.base import BaseEventTrigger
except ImportError:  # Airflow 2: no event-driven scheduling; __init__ says so
    from airflow.triggers.base import BaseTrigger as BaseEventTrigger  # type: ignore[assignment]

if TYPE_CHECKING:
    from airflow.triggers.shared_stream import AdvanceItem, SharedStreamProducer

#: Statuses a watcher can report: the two a prewarm task ends in.
WATCHABLE_STATUSES: Final = tuple(sorted(state.value for state in TERMINAL_STATES))
#: After a restart, tasks that finished longer than this before the newest finish seen are not reported.
DEFAULT_CATCH_UP_HORIZON: Final = 86400.0
#: Seconds before the last event of a walk that has several: Airflow 3.3's scheduler leaves events stored while it
#: creates a run waiting for the asset's next event (apache/airflow#70970); a later last event queues a run for all.
BURST_TAIL_PAUSE: Final = 3.0
#: Longest pause between walks while the API keeps failing.
MAX_ERROR_BACKOFF: Final = 600.0
#: Tasks per list request.
PAGE_SIZE: Final = 100
#: A ``completed_at`` or saved watermark further than this ahead of this machine's clock is not trusted.
CLOCK_SKEW: Final = 86400
_STATE_KEY_PREFIX: Final = "ppio_prewarm_events"


def plausible_seconds(value: object, now: float | None = None) -> bool:
    """
    Whether ``value`` can be a ``completed_at`` in Unix seconds: a positive int not far ahead of ``now``.

    :param value: The value the API sent (or a saved ledger holds).
    :param now: The current time (Unix seconds); this machine's clock by default.
    """
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return False
    return value <= (time.time() if now is None else now) + CLOCK_SKEW


@dataclass
class Ledger:
    """
    What a watcher has reported, kept in ``asset_state_store`` as ``{"watermark", "reported"}``.

    :param horizon: Seconds kept behind the newest completion seen.
    :param watermark: Tasks with a ``completed_at`` before this are never reported.
    :param reported: Task id to ``completed_at`` (0 if not plausible) of every task reported or in the baseline.
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
        ledger = cls(horizon=horizon)
        for task in tasks:
            ledger.record(task)
        ledger.prune({task.task_id for task in tasks})
        return ledger

    @classmethod
    def from_json(cls, value: Any, horizon: float, now: float | None = None) -> Ledger | None:
        """
        The saved ledger, or None if there is none or it is unreadable; a watermark in the future is reset to ``now``.

        :param value: The stored JSON.
        :param horizon: Seconds kept behind the newest completion.
        :param now: The current time (Unix seconds); this machine's clock by default.
        """
        if not isinstance(value, dict) or not isinstance(value.get("reported"), dict):
            return None
        now = time.time() if now is None else now
        watermark = value.get("watermark")
        reported = {
            str(k): (v if plausible_seconds(v, now) else 0)
            for k, v in value["reported"].items()
            if isinstance(v, int) and not isinstance(v, bool)
        }
        ledger = cls(horizon=horizon, watermark=watermark if isinstance(watermark, int) else 0, reported=reported)
        if ledger.watermark < 0 or ledger.watermark > now + CLOCK_SKEW:
            ledger.watermark = int(now)
        return ledger

    def to_json(self) -> dict[str, Any]:
        """The JSON kept in ``asset_state_store``."""
        return {"watermark": self.watermark, "reported": dict(sorted(self.reported.items()))}

    def is_new(self, task: PrewarmTask) -> bool:
        """
        Whether ``task`` is still to be reported.

        :param task: A finished task.
        """
        if task.task_id in self.reported:
            return False
        return not plausible_seconds(task.completed_at) or task.completed_at >= self.watermark

    def record(self, task: PrewarmTask) -> None:
        """
        Mark ``task`` reported.

        :param task: The task an event was fired for.
        """
        self.reported[task.task_id] = task.completed_at if plausible_seconds(task.completed_at) else 0

    def prune(self, listed: set[str]) -> None:
        """
        Move the watermark to ``horizon`` behind the newest completion; forget what is behind it, and tasks
        without a plausible completion time that the API no longer lists.

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


@dataclass(eq=False)
class Walk:
    """
    One complete walk of the list: a raw event of the shared stream, and its broker payload in ack mode.

    :param tasks: The finished tasks listed, each task id once.
    :param commits: What the watchers save once every event derived from this walk is stored.
    """

    tasks: list[PrewarmTask]
    commits: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


class PrewarmTaskEventTrigger(BaseEventTrigger):
    """
    Watch the account's prewarm tasks; fire one event per task that reaches a watched status.

    Each poll is one paged walk of the list with the API's region and name filters, shared on Airflow 3.3 by
    watchers with the same connection, filters and interval. Errors are logged and retried later, backing off up
    to :data:`MAX_ERROR_BACKOFF`. Event payload: ``status``, ``prewarm_task_id``, ``image``, ``region_id``,
    ``completed_at`` (None if not plausible Unix seconds) and ``task`` (the whole task as plain JSON).

    On Airflow 3.3 what was reported is saved in the asset's ``asset_state_store`` once the events are stored, so
    none is lost across restarts (a restart just before the save reports a task again); tasks that finished while
    the triggerer was down are reported, within ``catch_up_horizon``. On Airflow 3.0-3.2, or for a watcher that
    feeds several assets, the ledger is in memory only: each start takes the finished tasks as reported (at most
    once), so tasks that finish while no triggerer runs the watcher are missed.

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
        if int(_AIRFLOW_VERSION.split(".", 1)[0]) < 3:
            raise PPIOInvalidInputError(
                f"PrewarmTaskEventTrigger needs Airflow 3 (event-driven scheduling with AssetWatcher); this is "
                f"Airflow {_AIRFLOW_VERSION}. On Airflow 2 gate a DAG on a prewarm task with PrewarmTaskSensor."
            )
        super().__init__()  # type: ignore[no-untyped-call]
        self.image = _filter_value("image", image, 4095)
        self.name = _filter_value("name", name, 255)
        self.region_id = _filter_value("region_id", region_id, 255)
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
        #: The ledger as last saved (None: nothing saved by this instance yet).
        self._saved: dict[str, Any] | None = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """The class path and the keyword arguments that rebuild this trigger (primitives only)."""
        names = ("image", "name", "region_id", "watch_all", "ppio_conn_id", "poke_interval", "catch_up_horizon")
        kwargs = {name: getattr(self, name) for name in (*names, "unreachable_timeout")}
        return f"{type(self).__module__}.{type(self).__qualname__}", {**kwargs, "statuses": list(self.statuses)}

    def list_query(self) -> dict[str, str | None]:
        """The API's filters; statuses and the exact image are checked here, so more watchers share a walk."""
        # The API's ``name`` is the image's short name (``image:tag``).
        short = self.image.rstrip("/").rsplit("/", 1)[-1] if self.image else None
        return {"region_id": self.region_id, "name": self.name or short}

    def shared_stream_key(self) -> Hashable | None:
        """Watchers that would send the same walk share it (Airflow 3.3)."""
        query = self.list_query()  # region_id, name
        return ("ppio-prewarm-tasks", self.ppio_conn_id, *query.values(), self.poke_interval, self.unreachable_timeout)

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> SharedStreamProducer:
        """
        The ack-mode producer of a group of watchers (Airflow 3.3): walks, and saves ledgers in ``advance``.

        :param kwargs: One watcher's kwargs; only the fields in :meth:`shared_stream_key` are used.
        """
        from airflow.triggers.shared_stream import SharedStreamProducer  # Airflow 3.3 on

        class WalkProducer(SharedStreamProducer):
            async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
                async for walk in cls(**kwargs).walks():
                    yield walk, walk

            async def advance(self, batch: Sequence[AdvanceItem]) -> None:
                # A walk some watcher did not finish saves nothing: a running watcher saves its whole ledger with
                # its next walk, and one that failed restarts from its last save.
                for item in batch:
                    if item.outcome.is_clean:
                        for commit in item.broker_payload.commits:
                            await commit()

        return WalkProducer()

    async def walks(self) -> AsyncIterator[Walk]:
        """Every ``poke_interval`` (with jitter) one complete walk; errors are logged and back off, nothing ends it."""
        # The hook stack (aiohttp, tenacity, pydantic) is only needed in the triggerer, not when a DAG is parsed.
        from airflow_provider_ppio.hooks.ppio import PPIOHook

        hook = PPIOHook(ppio_conn_id=self.ppio_conn_id, unreachable_timeout=self.unreachable_timeout)
        interval = max(self.poke_interval, MIN_DEFERRED_POKE_INTERVAL)
        query = self.list_query()
        failures = 0
        while True:
            try:
                tasks: dict[str, PrewarmTask] = {}
                async for task in hook.alist_prewarm_tasks(**query, page_size=PAGE_SIZE, patient=True):
                    # Cursor pages shift while tasks are created: the same task can be listed twice.
                    if task.state in TERMINAL_STATES:
                        tasks.setdefault(task.task_id, task)
            except Exception as err:  # any error (a RecursionError on deep JSON too) is a bad walk, not the end
                failures += 1
                pause = min(interval * 2**failures, max(MAX_ERROR_BACKOFF, interval))
                self.log.warning(
                    "Could not list prewarm tasks (%s: %s); trying again in %.0fs",
                    type(err).__name__,
                    clip(str(err)),
                    pause,
                )
                await asyncio.sleep(pause)
                continue
            if failures:
                self.log.info("Listing prewarm tasks works again after %d failed walks", failures)
            failures = 0
            yield Walk(list(tasks.values()))
            await asyncio.sleep(interval * random.uniform(*_JITTER))

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Without a shared stream (Airflow 3.0-3.2): walk alone; nothing is saved (no ``advance``)."""
        async for event in self.filter_shared_stream(self.walks()):
            yield event

    async def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        """
        Fire an event for each task of a walk that this watcher has not reported yet.

        :param shared_stream: The walks (see :meth:`walks`).
        """
        store, ledger = await self._load()
        async for walk in shared_stream:
            tasks = [task for task in walk.tasks if self._watches(task)]
            if ledger is None:
                ledger = Ledger.baseline(tasks, self.catch_up_horizon)
                self.log.info(
                    "Watching prewarm tasks (%s); %d already finished are not reported, later ones are",
                    self._describe(),
                    len(tasks),
                )
            else:
                fresh = sorted(
                    (task for task in tasks if ledger.is_new(task)), key=lambda t: (t.completed_at, t.task_id)
                )
                for n, task in enumerate(fresh):
                    if n and n == len(fresh) - 1:
                        await asyncio.sleep(BURST_TAIL_PAUSE)
                    self.log.info(
                        "Prewarm task %s %s (%s in %s): firing an event",
                        task.task_id,
                        task.status.status,
                        clip(task.image),
                        clip(task.region_id),
                    )
                    if task.completed_at and not plausible_seconds(task.completed_at):
                        self.log.warning(
                            "Prewarm task %s has completed_at=%s, which is not Unix seconds: it is reported once, and "
                            "that time is not used to decide which tasks are new",
                            task.task_id,
                            task.completed_at,
                        )
                    ledger.record(task)
                    yield TriggerEvent(self._payload(task))  # type: ignore[no-untyped-call]
                ledger.prune({task.task_id for task in tasks})
            state = ledger.to_json()
            if store is not None and state != self._saved:
                walk.commits.append(self._saver(store, state))

    def _watches(self, task: PrewarmTask) -> bool:
        if task.state is None or task.state.value not in self.statuses:
            return False
        return self.region_id in (None, task.region_id) and self.image in (None, task.image)

    @staticmethod
    def _payload(task: PrewarmTask) -> dict[str, Any]:
        completed_at = task.completed_at if plausible_seconds(task.completed_at) else None
        return {
            "status": task.state.value if task.state else task.status.status,
            "prewarm_task_id": task.task_id,
            "image": task.image,
            "region_id": task.region_id,
            "completed_at": completed_at,
            "task": {**task.to_xcom(), "completed_at": completed_at or 0},
        }

    def _describe(self) -> str:
        parts = [f"{key}={value!r}" for key, value in (("image", self.image), ("name", self.name)) if value]
        parts += [f"region_id={self.region_id!r}"] if self.region_id else []
        return ", ".join(parts or ["all tasks"]) + f", statuses={'/'.join(self.statuses)}"

    @property
    def state_key(self) -> str:
        """The ``asset_state_store`` key of this watcher: one per filter, so several watchers of an asset coexist."""
        what = json.dumps([self.image, self.name, self.region_id, list(self.statuses)], separators=(",", ":"))
        return f"{_STATE_KEY_PREFIX}_{hashlib.sha256(what.encode()).hexdigest()[:16]}"

    async def _load(self) -> tuple[Any | None, Ledger | None]:
        """The asset's state accessor (None if this watcher has no single durable place) and the saved ledger."""
        store = getattr(self, "asset_state_store", None)
        if store is None:
            self.log.warning(
                "No asset_state_store (Airflow %s; it arrived in 3.3): what this watcher reports is kept in "
                "memory only, so tasks that finish while the triggerer is down are not reported",
                _AIRFLOW_VERSION,
            )
            return None, None
        try:
            value = await store.aget(self.state_key)
        except ValueError as err:  # AssetStateStoreAccessors: one accessor per asset, and this trigger has several
            self.log.warning(
                "This watcher feeds several assets (%s), so it has no single asset_state_store to keep what it "
                "reported: it is kept in memory only, as on Airflow 3.0-3.2. Declare the watcher on one asset "
                "and schedule every DAG on that asset to keep it across restarts",
                clip(str(err)),
            )
            return None, None
        ledger = Ledger.from_json(value, self.catch_up_horizon)
        if ledger is None:
            return store, None
        saved_watermark = value.get("watermark")  # a dict: Ledger.from_json read it
        if isinstance(saved_watermark, int) and saved_watermark != ledger.watermark:
            self.log.warning(
                "The saved watermark of the prewarm watch (%s) was %s, in the future: repaired to now (%d); tasks "
                "finishing from now on are reported",
                self._describe(),
                clip(saved_watermark),
                ledger.watermark,
            )
        self._saved = ledger.to_json()
        self.log.info(
            "Resuming the prewarm watch (%s): %d tasks already reported", self._describe(), len(ledger.reported)
        )
        return store, ledger

    def _saver(self, store: Any, state: dict[str, Any]) -> Callable[[], Awaitable[None]]:
        """What ``advance`` calls to save ``state``; a failed save is logged and retried with the next walk."""

        async def save() -> None:
            try:
                await store.aset(self.state_key, state)
            except Exception as err:
                self.log.warning(
                    "Could not save what the prewarm watch reported (%s: %s); trying again after the next walk",
                    type(err).__name__,
                    clip(str(err)),
                )
                return
            self._saved = state

        return save


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
