"""
``PrewarmTaskEventTrigger``: schedule DAGs when prewarm tasks finish (Airflow 3 event-driven scheduling).

Put it in an ``AssetWatcher`` of an asset (e.g. ``prewarm_asset(region, image)``); DAGs scheduled on the
asset run once per prewarm task that reaches ``succeeded`` (and ``failed``, if asked), with the task's
details in the asset event's ``extra["payload"]``. See docs/event-driven.md.

How the triggerer treats it (``jobs/triggerer_job_runner.py`` as of Airflow 3.3.2): an event trigger is never
ended by its events; every event becomes an asset event and the trigger keeps going, so this trigger never
returns: API errors back off and polling goes on. A restart of the triggerer starts a fresh instance; what
it reported before survives only in ``asset_state_store`` (Airflow 3.3).

On Airflow 3.3 the walks run as a shared stream in ack mode (``airflow/triggers/shared_stream.py``): each
walk is one raw event, and the producer's ``advance`` is called for it only once every trigger event the
watchers derived from it is stored in the metadata database. That is where each watcher's ledger (what it
reported) is saved, so a saved ledger never names an event that a crash could still lose.
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
from airflow_provider_ppio.status import TERMINAL_STATES, PrewarmTaskState
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
#: Seconds before the last event of a walk that has several. Airflow 3.3's scheduler
#: (``SchedulerJobRunner._create_dag_runs_asset_triggered``) gives a run the asset events up to the moment
#: the asset's queue row was created, then deletes the row; events of the same asset stored between those two
#: moments have no row left and wait for the next event of the asset (apache/airflow#70970, fixed upstream by
#: apache/airflow#70972). A last event stored after that row is gone queues a run that takes all of them.
BURST_TAIL_PAUSE: Final = 3.0
#: Longest pause between walks while the API keeps failing.
MAX_ERROR_BACKOFF: Final = 600.0
#: Tasks per list request.
PAGE_SIZE: Final = 100
#: Latest plausible ``completed_at`` (Unix seconds): the end of year 9999. Larger values are milliseconds or junk.
MAX_UNIX_SECONDS: Final = 253402300799
#: A ``completed_at`` or saved watermark further than this ahead of this machine's clock is not trusted.
CLOCK_SKEW: Final = 86400
#: Characters of a server-provided value or error quoted in a log line.
_QUOTE_CHARS: Final = 300
_STATE_KEY_PREFIX: Final = "ppio_prewarm_events"
_MAX_FILTER_LENGTH: Final = 255


def _airflow_major() -> int:
    return int(_AIRFLOW_VERSION.split(".", 1)[0])


def plausible_seconds(value: object, now: float | None = None) -> bool:
    """
    Whether ``value`` can be a ``completed_at`` in Unix seconds: positive, not past year 9999, not far ahead.

    :param value: The value the API sent.
    :param now: The current time (Unix seconds); this machine's clock by default.
    """
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_UNIX_SECONDS:
        return False
    return value <= (time.time() if now is None else now) + CLOCK_SKEW


def _quote(value: object) -> str:
    text = str(value)
    return text if len(text) <= _QUOTE_CHARS else f"{text[:_QUOTE_CHARS]}... ({len(text)} characters)"


@dataclass
class Ledger:
    """
    What a watcher has reported, as kept in ``asset_state_store``: JSON ``{"watermark", "reported"}``.

    ``reported`` maps task ids to their ``completed_at`` (0 when the API gave none, or one that is not
    plausible Unix seconds); tasks that finished before ``watermark`` are ignored, which keeps the ledger
    bounded. Only plausible completion times move the watermark.

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
        ledger = cls(horizon=horizon)
        for task in tasks:
            ledger.record(task)
        ledger.prune({task.task_id for task in tasks})
        return ledger

    @classmethod
    def from_json(cls, value: Any, horizon: float, now: float | None = None) -> Ledger | None:
        """
        The ledger a previous instance saved, or None when there is none (or it is unreadable).

        A watermark in the future (a clock or a completion time that was wrong when it was saved) is
        repaired to ``now``: tasks finishing from then on are reported.

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
        Move the watermark to ``horizon`` behind the newest completion and forget what is behind it,
        and tasks without a (plausible) completion time that the API no longer lists.

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

    :param tasks: The finished tasks listed, as plain JSON, each task id once.
    :param commits: What the watchers save once every event derived from this walk is stored.
    """

    tasks: list[dict[str, Any]]
    commits: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


def _walk_producer(kwargs: dict[str, Any]) -> SharedStreamProducer:
    """
    The ack-mode producer of a group of watchers; defined here because ``SharedStreamProducer`` exists from 3.3.

    :param kwargs: One watcher's kwargs.
    """
    from airflow.triggers.shared_stream import SharedStreamProducer

    class WalkProducer(SharedStreamProducer):
        """Walks the list for a group of watchers; saves their ledgers when a walk's events are stored."""

        def __init__(self, kwargs: dict[str, Any]) -> None:
            self.kwargs = kwargs

        async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
            async for walk in PrewarmTaskEventTrigger(**self.kwargs).walks():
                yield walk, walk

        async def advance(self, batch: Sequence[AdvanceItem]) -> None:
            # A walk some watcher did not finish (ack timeout, overflow) saves nothing: a watcher that is still
            # running saves its whole ledger with its next walk, and one that failed restarts from its last save.
            for item in batch:
                if item.outcome.is_clean:
                    for commit in item.broker_payload.commits:
                        await commit()

    return WalkProducer(kwargs)


class PrewarmTaskEventTrigger(BaseEventTrigger):
    """
    Watch the account's prewarm tasks; fire one event per task that reaches a watched status.

    Each poll is one paged walk of ``GET /gpus/v2/prewarm-tasks`` with the API's region and name
    filters. Watchers with the same connection, region, name (or image name) and interval share that
    walk on Airflow 3.3 (shared streams). Transient errors are retried with the
    connection's backoff for up to ``unreachable_timeout``; after that, or on any other error (a bad
    answer, a walk past the hook's page cap), the watcher logs it and tries again later, backing off up
    to :data:`MAX_ERROR_BACKOFF`. A task listed twice in one walk fires once; a task that cannot be read
    is logged and skipped.

    Event payload: ``status`` (``succeeded`` or ``failed``), ``prewarm_task_id``, ``image``,
    ``region_id``, ``completed_at`` (None when the API's value is not plausible Unix seconds) and
    ``task`` (the whole task as plain JSON).

    Across restarts on Airflow 3.3: what was reported is kept in the asset's ``asset_state_store`` and
    saved by the shared stream's ack mode only once the events are stored, so a task's event is never
    lost; tasks that finished while the triggerer was down are reported when it is back, unless they
    finished more than ``catch_up_horizon`` before the newest finish seen. A restart within one
    triggerer sync round (about a second or two) after an event was stored, before the save, reports that
    task again: the redelivery Airflow's ack mode documents. A trigger that feeds several assets (the same
    watcher declared on several assets is one trigger) has no single place to keep its ledger and keeps it
    in memory, as below.

    On Airflow 3.0-3.2 there is no durable state: each (re)start takes the tasks already finished as
    reported, so nothing is reported twice (at most once) and tasks that finish while no triggerer runs
    the watcher are missed. The first start on any line reports only tasks that finish from then on.

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
        #: The ledger as last saved (None: nothing saved by this instance yet).
        self._saved: dict[str, Any] | None = None

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
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> SharedStreamProducer:
        """
        The ack-mode producer of a group of watchers (Airflow 3.3): walks every ``poke_interval``.

        :param kwargs: One watcher's kwargs; only the fields in :meth:`shared_stream_key` are used.
        """
        return _walk_producer(kwargs)

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
                tasks: dict[str, dict[str, Any]] = {}
                async for task in hook.alist_prewarm_tasks(**query, page_size=PAGE_SIZE, patient=True):
                    # Cursor pages shift while tasks are created: the same task can be listed twice.
                    if task.state in TERMINAL_STATES:
                        tasks.setdefault(task.task_id, task.to_xcom())
            # Anything a walk raises (an outage past unreachable_timeout, a bad key, no connection, a bad answer,
            # the hook's page cap, a RecursionError on deep JSON) is a bad walk, never the end of the watcher.
            except Exception as err:
                failures += 1
                pause = min(interval * 2**failures, max(MAX_ERROR_BACKOFF, interval))
                self.log.warning(
                    "Could not list prewarm tasks (%s: %s); trying again in %.0fs",
                    type(err).__name__,
                    _quote(err),
                    pause,
                )
                await asyncio.sleep(pause)
                continue
            if failures:
                self.log.info("Listing prewarm tasks works again after %d failed walks", failures)
            failures = 0
            yield Walk(list(tasks.values()))
            await asyncio.sleep(interval * random.uniform(*_JITTER))

    # -- one watcher's events ----------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Without a shared stream (Airflow 3.0-3.2): walk alone; nothing is saved (no ``advance``)."""
        async for event in self.filter_shared_stream(self.walks()):
            yield event

    async def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        """
        Fire an event for each task of a walk that this watcher has not reported yet.

        :param shared_stream: The walks (see :meth:`walks`).
        """
        store = await self._durable_store()
        ledger = await self._load_ledger(store)
        async for walk in shared_stream:
            tasks = self._tasks(walk)
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
                        _quote(task.image),
                        _quote(task.region_id),
                    )
                    ledger.record(task)
                    yield TriggerEvent(self._payload(task))  # type: ignore[no-untyped-call]
                ledger.prune({task.task_id for task in tasks})
            state = ledger.to_json()
            if store is not None and state != self._saved:
                walk.commits.append(self._saver(store, state))

    def _tasks(self, walk: Walk) -> list[PrewarmTask]:
        """The watched tasks of ``walk``; a task that cannot be read is logged and skipped."""
        tasks: list[PrewarmTask] = []
        for raw in walk.tasks:
            try:
                task = PrewarmTask.from_api(raw)
            except Exception as err:
                self.log.warning("Skipping a prewarm task the API listed that cannot be read: %s", _quote(err))
                continue
            if self._watches(task):
                if task.completed_at and not plausible_seconds(task.completed_at):
                    self.log.warning(
                        "Prewarm task %s has completed_at=%s, which is not Unix seconds: it is reported once, and "
                        "that time is not used to decide which tasks are new",
                        task.task_id,
                        _quote(task.completed_at),
                    )
                tasks.append(task)
        return tasks

    def _watches(self, task: PrewarmTask) -> bool:
        if task.state is None or task.state.value not in self.statuses:
            return False
        if self.region_id is not None and task.region_id != self.region_id:
            return False
        return self.image is None or task.image == self.image

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

    # -- durable state (Airflow 3.3 asset_state_store) ---------------------------------------------------

    @property
    def state_key(self) -> str:
        """The ``asset_state_store`` key of this watcher: one per filter, so several watchers of an asset coexist."""
        what = json.dumps([self.image, self.name, self.region_id, list(self.statuses)], separators=(",", ":"))
        return f"{_STATE_KEY_PREFIX}_{hashlib.sha256(what.encode()).hexdigest()[:16]}"

    async def _durable_store(self) -> Any | None:
        """The asset's state accessor, or None when this watcher has no single durable place for its ledger."""
        store = getattr(self, "asset_state_store", None)
        if store is None:
            self.log.warning(
                "No asset_state_store (Airflow %s; it arrived in 3.3): what this watcher reports is kept in "
                "memory only, so tasks that finish while the triggerer is down are not reported",
                _AIRFLOW_VERSION,
            )
            return None
        try:
            await store.aget(self.state_key)
        except ValueError as err:  # AssetStateStoreAccessors: one accessor per asset, and this trigger has several
            self.log.warning(
                "This watcher feeds several assets (%s), so it has no single asset_state_store to keep what it "
                "reported: it is kept in memory only, as on Airflow 3.0-3.2. Declare the watcher on one asset "
                "and schedule every DAG on that asset to keep it across restarts",
                _quote(err),
            )
            return None
        return store

    async def _load_ledger(self, store: Any | None) -> Ledger | None:
        if store is None:
            return None
        value = await store.aget(self.state_key)
        ledger = Ledger.from_json(value, self.catch_up_horizon)
        if ledger is None:
            return None
        saved_watermark = value.get("watermark") if isinstance(value, dict) else None
        if isinstance(saved_watermark, int) and saved_watermark != ledger.watermark:
            self.log.warning(
                "The saved watermark of the prewarm watch (%s) was %s, in the future: repaired to now (%d); tasks "
                "finishing from now on are reported",
                self._describe(),
                _quote(saved_watermark),
                ledger.watermark,
            )
        self._saved = ledger.to_json()
        self.log.info(
            "Resuming the prewarm watch (%s): %d tasks already reported", self._describe(), len(ledger.reported)
        )
        return ledger

    def _saver(self, store: Any, state: dict[str, Any]) -> Callable[[], Awaitable[None]]:
        """What ``advance`` calls to save ``state``; a failed save is logged and retried with the next walk."""

        async def save() -> None:
            try:
                await store.aset(self.state_key, state)
            except Exception as err:
                self.log.warning(
                    "Could not save what the prewarm watch reported (%s: %s); trying again after the next walk",
                    type(err).__name__,
                    _quote(err),
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


def _short_name(image: str) -> str:
    """The API's ``name`` of a task for ``image``: its last path segment, tag included."""
    return image.rstrip("/").rsplit("/", 1)[-1]
