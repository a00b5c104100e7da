"""
``PrewarmTaskEventTrigger`` (event-driven scheduling): bad input refused at parse time, one event per prewarm
task that finishes (over real HTTP against the emulator), nothing twice or missed across restarts with
Airflow 3.3's ``asset_state_store`` saved by the shared stream's ack mode once Airflow stored the events (at
most once without it), one list walk per interval shared by sibling watchers through Airflow's own
``SharedStreamManager``, outages and malformed walks survived and logged. On Airflow 2.11: a clear error.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from airflow_provider_ppio.exceptions import PPIOInvalidInputError
from airflow_provider_ppio.testing.server import EmulatorServer
from airflow_provider_ppio.triggers import prewarm_events
from airflow_provider_ppio.triggers.prewarm_events import PrewarmTaskEventTrigger

IMAGE = "registry.example.com/acme/llm-server:1.4"
REGION = "region-a"
AIRFLOW_3 = int(__import__("airflow").__version__.split(".", 1)[0]) >= 3
needs_af3 = pytest.mark.skipif(not AIRFLOW_3, reason="event-driven scheduling needs Airflow 3")
needs_shared_streams = pytest.mark.skipif(
    not AIRFLOW_3 or importlib.util.find_spec("airflow.triggers.shared_stream") is None,
    reason="shared streams (sibling watchers sharing one poll loop) arrived in Airflow 3.3",
)


@pytest.mark.skipif(AIRFLOW_3, reason="the Airflow 2 refusal")
def test_on_airflow_2_using_the_trigger_says_it_needs_airflow_3() -> None:
    import airflow

    with pytest.raises(PPIOInvalidInputError, match=r"needs Airflow 3") as info:
        PrewarmTaskEventTrigger(image=IMAGE, region_id=REGION)
    assert airflow.__version__ in str(info.value)
    assert "PrewarmTaskSensor" in str(info.value)


# -- parse-time checks ---------------------------------------------------------------------------------------


@needs_af3
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"no filter: give image, name or region_id, or set watch_all=True"),
        ({"image": ""}, r"image must be a non-empty string"),
        ({"region_id": "  "}, r"region_id must be a non-empty string"),
        ({"name": "x" * 256}, r"name is 256 characters long; at most 255"),
        ({"watch_all": True, "region_id": REGION}, r"watch_all=True watches every prewarm task"),
        ({"region_id": REGION, "statuses": "done"}, r"unknown status 'done'"),
        ({"region_id": REGION, "statuses": ["succeeded", "running"]}, r"unknown status 'running'"),
        ({"region_id": REGION, "statuses": []}, r"statuses must name 'succeeded', 'failed' or both"),
        ({"region_id": REGION, "poke_interval": 0}, r"poke_interval must be a positive number of seconds"),
        ({"region_id": REGION, "poke_interval": -5}, r"poke_interval must be a positive number"),
        ({"region_id": REGION, "catch_up_horizon": 0}, r"catch_up_horizon must be a positive number"),
    ],
)
def test_bad_input_is_refused_when_the_dag_is_parsed(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(PPIOInvalidInputError, match=message):
        PrewarmTaskEventTrigger(**kwargs)


@needs_af3
def test_watch_all_must_be_said_and_then_sends_no_filter() -> None:
    trigger = PrewarmTaskEventTrigger(watch_all=True)
    assert trigger.list_query() == {"region_id": None, "name": None}


@needs_af3
def test_serialize_rebuilds_the_same_trigger() -> None:
    trigger = PrewarmTaskEventTrigger(
        image=IMAGE, region_id=REGION, statuses=["failed", "succeeded"], poke_interval=30, unreachable_timeout=90
    )
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_provider_ppio.triggers.prewarm_events.PrewarmTaskEventTrigger"
    rebuilt = PrewarmTaskEventTrigger(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
    assert kwargs["statuses"] == ["failed", "succeeded"]
    assert all(isinstance(value, str | int | float | bool | list | type(None)) for value in kwargs.values())


@needs_af3
def test_the_api_filter_is_the_region_and_the_image_name() -> None:
    trigger = PrewarmTaskEventTrigger(image=IMAGE, region_id=REGION)
    assert trigger.list_query() == {"region_id": REGION, "name": "llm-server:1.4"}


# -- against the emulator ------------------------------------------------------------------------------------


class FakeStateStore:
    """Stands in for Airflow 3.3's per-asset ``asset_state_store`` accessor (``aget``/``aset``), one asset."""

    def __init__(self, values: dict[str, Any] | None = None) -> None:
        self.values: dict[str, Any] = dict(values or {})
        self.writes = 0

    async def aget(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    async def aset(self, key: str, value: Any) -> None:
        self.values[key] = value
        self.writes += 1

    def reported(self) -> set[str]:
        """The task ids the saved ledger names."""
        (ledger,) = self.values.values()
        return set(ledger["reported"])


class SeveralAssets(FakeStateStore):
    """``AssetStateStoreAccessors`` of a trigger that feeds two assets: the direct accessors refuse."""

    async def aget(self, key: str, default: Any = None) -> Any:
        raise ValueError("Task has 2 concrete inlets and outlets - use context['asset_state_store'][MY_ASSET]")

    async def aset(self, key: str, value: Any) -> None:
        raise ValueError("Task has 2 concrete inlets and outlets - use context['asset_state_store'][MY_ASSET]")


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> Callable[[], str]:
    """Everything logged so far: stdlib records and the console (where Airflow 3's structlog writes)."""
    caplog.set_level(logging.INFO)
    seen: list[str] = []

    def text() -> str:
        captured = capsys.readouterr()
        seen.append(captured.out + captured.err)
        return caplog.text + "".join(seen)

    return text


@pytest.fixture
def emulator(ppio_emulator: EmulatorServer, set_conn: Callable[..., None]) -> EmulatorServer:
    set_conn(host=ppio_emulator.base_url, password=ppio_emulator.api_key)
    return ppio_emulator


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Walks in milliseconds instead of seconds."""
    monkeypatch.setattr(prewarm_events, "MIN_DEFERRED_POKE_INTERVAL", 0.01)
    monkeypatch.setattr(prewarm_events, "BURST_TAIL_PAUSE", 0.0)


class Running:
    """A trigger run as the triggerer runs it: its events collected until it is cancelled."""

    def __init__(self, trigger: PrewarmTaskEventTrigger, events: AsyncIterator[Any] | None = None) -> None:
        self.trigger = trigger
        self.payloads: list[dict[str, Any]] = []
        self._task = asyncio.ensure_future(self._collect(events or trigger.run()))

    async def _collect(self, events: AsyncIterator[Any]) -> None:
        async for event in events:
            self.payloads.append(event.payload)

    def ids(self) -> list[str]:
        return [payload["prewarm_task_id"] for payload in self.payloads]

    async def until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self._task.done():
                self._task.result()
                raise AssertionError("the trigger ended; event triggers must keep watching")
            assert time.monotonic() < deadline, f"timed out; events so far: {self.ids()}"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task


class Triggerer:
    """
    Airflow 3.3's triggerer around watchers, as ``jobs/triggerer_job_runner.py`` runs them: Airflow's own
    ``SharedStreamManager`` (ack mode, since the trigger has a producer), each fired event bound to its walk
    and confirmed as stored the way the supervisor does, unless ``storing`` is paused. :meth:`crash` drops
    everything not confirmed, as a ``kill -9`` does.

    :param triggers: The watchers (trigger ids 0, 1, ...).
    """

    def __init__(self, *triggers: PrewarmTaskEventTrigger) -> None:
        from airflow.triggers.shared_stream import SharedStreamManager

        self.manager = SharedStreamManager()
        self.storing = True
        self.unconfirmed: list[int] = []
        self.keys = [trigger.shared_stream_key() for trigger in triggers]
        self.runs = [Running(trigger, self._events(n, trigger)) for n, trigger in enumerate(triggers)]
        self._supervisor = asyncio.ensure_future(self._confirm())

    async def _events(self, trigger_id: int, trigger: PrewarmTaskEventTrigger) -> AsyncIterator[Any]:
        key = self.keys[trigger_id]
        stream = self.manager.subscribe(trigger_id=trigger_id, trigger=trigger, key=key)
        async for event in trigger.filter_shared_stream(stream):
            seq = self.manager.bind_pending_event(trigger_id=trigger_id, key=key)
            assert seq is not None, "every event is bound to the walk it came from"
            self.unconfirmed.append(seq)
            yield event

    async def _confirm(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            if self.storing and self.unconfirmed:
                seqs, self.unconfirmed = self.unconfirmed, []
                self.manager.confirm_persisted(seqs)

    async def crash(self) -> None:
        """Stop with nothing more stored or saved."""
        self._supervisor.cancel()
        for run in self.runs:
            await run.stop()
        await self.manager.stop_all()

    async def stop(self) -> None:
        """Stop the way a triggerer shutting down does: every watcher unsubscribes."""
        for n, run in enumerate(self.runs):
            await run.stop()
            await self.manager.unsubscribe(n, self.keys[n])
        self._supervisor.cancel()
        await self.manager.stop_all()


def watcher(store: FakeStateStore | None, **kwargs: Any) -> PrewarmTaskEventTrigger:
    kwargs = {"image": IMAGE, "region_id": REGION, "poke_interval": 0.05, **kwargs}
    trigger = PrewarmTaskEventTrigger(**kwargs)
    trigger.asset_state_store = store  # what the triggerer injects (None before Airflow 3.3)
    return trigger


def list_walks(emulator: EmulatorServer) -> list[dict[str, Any]]:
    log = emulator.control.requests_log()
    assert all(entry["path"] == "/gpus/v2/prewarm-tasks" for entry in log), "a request other than the list walk"
    return log


async def walked_twice(emulator: EmulatorServer) -> None:
    """The first walk (the baseline) is done once a second one has started."""
    for _ in range(500):
        if len(emulator.control.requests_log()) >= 2:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the watcher never walked the list")


async def baseline_taken(store: FakeStateStore) -> None:
    for _ in range(500):
        if store.writes:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the watcher never took its baseline")


@needs_shared_streams
async def test_one_event_per_task_that_succeeds_with_its_details(emulator: EmulatorServer) -> None:
    control = emulator.control
    control.seed_task(task_id="old-ok", image=IMAGE, region_id=REGION, state="succeeded")
    for task_id, region, image in [
        ("mine", REGION, IMAGE),
        ("mine-fails", REGION, IMAGE),
        ("other-region", "region-b", IMAGE),
        ("other-image", REGION, "registry.example.com/acme/llm-server:1.5"),
        ("same-name-other-registry", REGION, "mirror.example.org/llm-server:1.4"),
    ]:
        control.seed_task(task_id=task_id, image=image, region_id=region, state="running")
    store = FakeStateStore()
    triggerer = Triggerer(watcher(store))
    (running,) = triggerer.runs
    await baseline_taken(store)
    for task_id in ["mine", "other-region", "other-image", "same-name-other-registry"]:
        control.set_state(task_id, "succeeded")
    control.set_state("mine-fails", "failed", message="manifest unknown")
    await running.until(lambda: len(running.payloads) >= 1)
    await asyncio.sleep(0.5)  # several more walks: nothing else may fire
    await triggerer.stop()

    assert running.ids() == ["mine"]  # not the task that had succeeded before the watch started
    (payload,) = running.payloads
    assert payload["status"] == "succeeded"
    assert (payload["image"], payload["region_id"]) == (IMAGE, REGION)
    assert payload["completed_at"] > 0
    assert payload["task"]["task_id"] == "mine"
    assert payload["task"]["status"]["status"] == "succeeded"
    walks = list_walks(emulator)  # one GET of the list per walk, with the API's filters; no per-task reads
    assert all(
        entry["query"].get("region_id") == REGION and entry["query"].get("name") == "llm-server:1.4" for entry in walks
    )


@needs_shared_streams
async def test_failed_tasks_are_reported_when_asked(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="a", image=IMAGE, region_id=REGION, state="running")
    store = FakeStateStore()
    triggerer = Triggerer(watcher(store, statuses=["succeeded", "failed"]))
    (running,) = triggerer.runs
    await baseline_taken(store)
    emulator.control.set_state("a", "failed", error="IMAGE_PULL_FAILED", message="manifest unknown")
    await running.until(lambda: len(running.payloads) >= 1)
    await triggerer.stop()
    (payload,) = running.payloads
    assert payload["status"] == "failed"
    assert payload["task"]["status"]["error"] == "IMAGE_PULL_FAILED"


@needs_shared_streams
async def test_restart_with_asset_state_store_reports_what_finished_meanwhile_and_nothing_twice(
    emulator: EmulatorServer,
) -> None:
    control = emulator.control
    for n in range(5):
        control.seed_task(task_id=f"t{n}", image=IMAGE, region_id=REGION, state="running")
    store = FakeStateStore()
    first = Triggerer(watcher(store))
    await baseline_taken(store)
    control.set_state("t0", "succeeded")
    control.set_state("t1", "succeeded")
    await first.runs[0].until(lambda: store.reported() >= {"t0", "t1"})  # stored, then saved by advance
    await first.crash()

    control.set_state("t2", "succeeded")  # while no triggerer runs the watcher
    control.set_state("t3", "succeeded")
    second = Triggerer(watcher(store))  # a new instance, as after a triggerer restart
    (running,) = second.runs
    await running.until(lambda: len(running.payloads) >= 2)
    control.set_state("t4", "succeeded")
    await running.until(lambda: len(running.payloads) >= 3)
    await asyncio.sleep(0.3)
    await second.stop()

    assert sorted(first.runs[0].ids()) == ["t0", "t1"]
    assert sorted(running.ids()) == ["t2", "t3", "t4"]


@needs_shared_streams
async def test_the_ledger_is_saved_only_once_airflow_has_stored_the_events(emulator: EmulatorServer) -> None:
    """Ack mode: until the supervisor confirms the event stored, nothing says it was reported; a crash refires it."""
    emulator.control.seed_task(task_id="t0", image=IMAGE, region_id=REGION, state="running")
    store = FakeStateStore()
    first = Triggerer(watcher(store))
    await baseline_taken(store)
    first.storing = False  # the event is fired but not (yet) stored
    emulator.control.set_state("t0", "succeeded")
    await first.runs[0].until(lambda: len(first.runs[0].payloads) == 1)
    await asyncio.sleep(0.5)  # many walks later: still not saved as reported
    assert "t0" not in store.reported()
    await first.crash()

    second = Triggerer(watcher(store))
    await second.runs[0].until(lambda: "t0" in store.reported())
    await asyncio.sleep(0.3)
    await second.crash()
    assert second.runs[0].ids() == ["t0"]  # fired again: not lost

    third = Triggerer(watcher(store))  # after the save, a crash repeats nothing
    await asyncio.sleep(0.5)
    await third.crash()
    assert third.runs[0].ids() == []


@needs_af3
async def test_without_asset_state_store_nothing_is_reported_twice_and_downtime_is_not_caught_up(
    emulator: EmulatorServer,
) -> None:
    """Airflow 3.0-3.2: no shared streams, no durable state; each start takes what finished as reported."""
    control = emulator.control
    for n in range(3):
        control.seed_task(task_id=f"t{n}", image=IMAGE, region_id=REGION, state="running")
    first = Running(watcher(None))
    await walked_twice(emulator)
    control.set_state("t0", "succeeded")
    await first.until(lambda: len(first.payloads) == 1)
    await first.stop()

    control.set_state("t1", "succeeded")  # finishes while the triggerer is down: missed on these lines
    logged = len(emulator.control.requests_log())
    second = Running(watcher(None))
    await second.until(lambda: len(emulator.control.requests_log()) >= logged + 2)
    control.set_state("t2", "succeeded")
    await second.until(lambda: len(second.payloads) == 1)
    await asyncio.sleep(0.3)
    await second.stop()
    assert first.ids() == ["t0"]
    assert second.ids() == ["t2"]


@needs_shared_streams
async def test_a_watcher_of_several_assets_says_it_keeps_its_ledger_in_memory(
    emulator: EmulatorServer, logged: Callable[[], str]
) -> None:
    emulator.control.seed_task(task_id="t0", image=IMAGE, region_id=REGION, state="running")
    triggerer = Triggerer(watcher(SeveralAssets()))
    await walked_twice(emulator)
    emulator.control.set_state("t0", "succeeded")
    await triggerer.runs[0].until(lambda: len(triggerer.runs[0].payloads) == 1)
    await asyncio.sleep(0.3)
    await triggerer.stop()
    assert triggerer.runs[0].ids() == ["t0"]
    text = logged()
    assert "feeds several assets" in text and "kept in memory only" in text


@needs_shared_streams
async def test_the_ledger_stays_bounded_by_the_horizon(emulator: EmulatorServer) -> None:
    now = int(time.time())
    control = emulator.control
    for n in range(4):
        control.seed_task(task_id=f"old{n}", image=IMAGE, region_id=REGION, state="succeeded", completed_at=now - 7200)
    control.seed_task(task_id="new", image=IMAGE, region_id=REGION, state="running")
    store = FakeStateStore()
    triggerer = Triggerer(watcher(store, catch_up_horizon=3600))
    await baseline_taken(store)
    control.set_state("new", "succeeded", completed_at=now)
    await triggerer.runs[0].until(lambda: "new" in store.reported())
    await triggerer.stop()
    (saved,) = store.values.values()
    assert saved["reported"] == {"new": now}  # the old ones are behind the watermark, not kept one by one
    assert saved["watermark"] == now - 3600
    assert triggerer.runs[0].ids() == ["new"]


@needs_shared_streams
async def test_fifty_tasks_finishing_in_one_walk_each_fire_once(emulator: EmulatorServer) -> None:
    control = emulator.control
    ids = [f"bulk{n:02d}" for n in range(50)]
    for task_id in ids:
        control.seed_task(task_id=task_id, image=IMAGE, region_id=REGION, state="running")
    store = FakeStateStore()
    triggerer = Triggerer(watcher(store))
    await baseline_taken(store)
    for task_id in ids:
        control.set_state(task_id, "succeeded")
    await triggerer.runs[0].until(lambda: set(ids) <= store.reported())
    await asyncio.sleep(0.3)
    await triggerer.stop()
    assert sorted(triggerer.runs[0].ids()) == ids


@needs_af3
@pytest.mark.timeout(60)
async def test_an_outage_backs_off_and_the_watch_goes_on(
    emulator: EmulatorServer, set_conn: Callable[..., None]
) -> None:
    set_conn(host=emulator.base_url, password=emulator.api_key, extra={"max_attempts": 2})
    emulator.control.seed_task(task_id="t0", image=IMAGE, region_id=REGION, state="running")
    running = Running(watcher(None, unreachable_timeout=0.2))
    await walked_twice(emulator)
    emulator.control.inject_fault("status", status=503, count=None, path_prefix="/gpus/v2/prewarm-tasks")
    emulator.control.set_state("t0", "succeeded")
    await asyncio.sleep(1.0)
    failing = len(emulator.control.requests_log())
    emulator.control.clear_faults()
    await running.until(lambda: len(running.payloads) == 1)
    await running.stop()
    assert running.ids() == ["t0"]
    assert failing > 1  # it kept trying


@needs_shared_streams
async def test_sibling_watchers_share_one_walk_through_airflow_shared_streams(emulator: EmulatorServer) -> None:
    control = emulator.control
    control.seed_task(task_id="ok", image=IMAGE, region_id=REGION, state="running")
    control.seed_task(task_id="bad", image=IMAGE, region_id=REGION, state="running")
    stores = [FakeStateStore(), FakeStateStore()]
    deploys = watcher(stores[0])
    alerts = watcher(stores[1], statuses="failed")
    assert deploys.shared_stream_key() is not None and deploys.shared_stream_key() == alerts.shared_stream_key()

    triggerer = Triggerer(deploys, alerts)
    for store in stores:
        await baseline_taken(store)
    control.set_state("ok", "succeeded")
    control.set_state("bad", "failed")
    await triggerer.runs[0].until(lambda: "ok" in stores[0].reported())
    await triggerer.runs[1].until(lambda: "bad" in stores[1].reported())
    await asyncio.sleep(0.3)
    times = [entry["time"] for entry in list_walks(emulator)]
    await triggerer.stop()

    assert triggerer.runs[0].ids() == ["ok"] and triggerer.runs[1].ids() == ["bad"]
    # One poll loop for both: consecutive walks are a (jittered) interval apart; two loops would interleave.
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert len(times) > 5 and min(gaps) >= 0.05 * 0.9 - 0.005, gaps


# -- malformed walks (issue 23): a scripted API -------------------------------------------------------------


def api_task(task_id: str, completed_at: Any, status: str = "succeeded") -> dict[str, Any]:
    return {
        "task_id": task_id,
        "status": {"status": status, "error": "", "message": ""},
        "image": IMAGE,
        "region_id": REGION,
        "completed_at": completed_at,
    }


class ListApi:
    """A list endpoint whose pages (by cursor) the test sets; ``bad`` answers instead while it is set."""

    def __init__(self) -> None:
        self.pages: dict[str | None, dict[str, Any]] = {None: {"data": [], "has_more": False}}
        self.bad: bytes | None = None

    async def __call__(self, request: Any) -> Any:
        from aiohttp import web

        if self.bad is not None:
            return web.Response(status=200, body=self.bad, content_type="application/json")
        return web.json_response(self.pages[request.query.get("cursor")])

    def show(self, *pages: list[dict[str, Any]]) -> None:
        """List these pages, chained by cursors."""
        self.pages = {}
        for n, data in enumerate(pages):
            last = n == len(pages) - 1
            self.pages[None if n == 0 else f"c{n}"] = {
                "data": data,
                "has_more": not last,
                "next_cursor": None if last else f"c{n + 1}",
            }


@pytest.fixture
def list_api(set_conn: Callable[..., None]) -> Iterator[tuple[ListApi, Any]]:
    from aio_server import api_server

    api = ListApi()
    with api_server(api) as server:
        set_conn(host=server.base_url, extra={"max_attempts": 1})
        yield api, server


async def walks_seen(server: Any, count: int) -> None:
    for _ in range(500):
        if len(server.seen) >= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the watcher stopped walking")


@needs_shared_streams
async def test_a_task_listed_twice_in_one_walk_fires_once(list_api: tuple[ListApi, Any]) -> None:
    api, _server = list_api
    store = FakeStateStore()
    triggerer = Triggerer(watcher(store))
    await baseline_taken(store)
    now = int(time.time())
    # The cursor pages shifted while the walk went on: "b" is on both pages.
    api.show([api_task("a", now), api_task("b", now)], [api_task("b", now), api_task("c", now)])
    await triggerer.runs[0].until(lambda: {"a", "b", "c"} <= store.reported())
    await asyncio.sleep(0.3)
    await triggerer.stop()
    assert sorted(triggerer.runs[0].ids()) == ["a", "b", "c"]


@needs_shared_streams
async def test_completed_at_that_is_not_unix_seconds_fires_once_and_never_moves_the_watermark(
    list_api: tuple[ListApi, Any], logged: Callable[[], str]
) -> None:
    api, _server = list_api
    store = FakeStateStore()
    triggerer = Triggerer(watcher(store))
    await baseline_taken(store)
    now = int(time.time())
    odd = {"millis": now * 1000, "huge": 10**19, "past-9999": 253402300800, "negative": -5, "tomorrow+": now + 10**6}
    api.show([api_task(task_id, value) for task_id, value in odd.items()])
    await triggerer.runs[0].until(lambda: set(odd) <= store.reported())
    (saved,) = store.values.values()
    assert 0 <= saved["watermark"] <= now
    api.show([*(api_task(task_id, value) for task_id, value in odd.items()), api_task("later", now + 1)])
    await triggerer.runs[0].until(lambda: "later" in store.reported())  # not hidden behind a watermark
    await asyncio.sleep(0.3)
    await triggerer.stop()

    payloads = {payload["prewarm_task_id"]: payload for payload in triggerer.runs[0].payloads}
    assert sorted(triggerer.runs[0].ids()) == sorted([*odd, "later"])  # each once
    assert all(payloads[task_id]["completed_at"] is None for task_id in odd)
    assert payloads["later"]["completed_at"] == now + 1
    text = logged()
    # The model already treats values past the year 9999 as not reported; the trigger catches the plausible-looking
    # ones (a day or more ahead of now). Both say so in a WARNING.
    assert f"completed_at={now * 1000}, outside 0..253402300799; treating it as not reported" in text
    assert "tomorrow+ has completed_at=" in text and "is not Unix seconds" in text
    # Said when the task is reported, not on every walk that lists it again.
    assert text.count("tomorrow+ has completed_at=") == 1, text


@needs_shared_streams
async def test_a_saved_watermark_in_the_future_is_repaired_on_load(
    list_api: tuple[ListApi, Any], logged: Callable[[], str]
) -> None:
    api, server = list_api
    now = int(time.time())
    key = watcher(None).state_key
    store = FakeStateStore({key: {"watermark": now * 1000, "reported": {"old": now * 1000}}})
    triggerer = Triggerer(watcher(store))
    await walks_seen(server, 2)
    api.show([api_task("new", now + 1)])
    await triggerer.runs[0].until(lambda: "new" in store.reported())
    await triggerer.stop()
    assert triggerer.runs[0].ids() == ["new"]
    assert store.values[key]["watermark"] <= now + 1
    assert "in the future: repaired" in logged()


@needs_shared_streams
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "Could not list prewarm tasks", id="json-100000-deep"),
        pytest.param(b'{"data": [{"task_id": 1}], "has_more": false}', "Could not list prewarm tasks", id="bad-task"),
        pytest.param(
            b'{"data": [], "has_more": true, "next_cursor": "again"}', "cursor 'again' twice", id="endless-cursor"
        ),
    ],
)
async def test_a_bad_walk_is_logged_before_backing_off_and_the_watch_goes_on(
    list_api: tuple[ListApi, Any], logged: Callable[[], str], bad: bytes, message: str
) -> None:
    api, server = list_api
    store = FakeStateStore()
    triggerer = Triggerer(watcher(store))
    await baseline_taken(store)
    api.bad = bad
    seen = len(server.seen)
    await walks_seen(server, seen + 2)
    text = logged()
    for _ in range(250):  # the server counts a request before the watcher has read (and logged) its answer
        if message in text and "trying again in" in text:
            break
        await asyncio.sleep(0.02)
        text = logged()
    assert message in text and "trying again in" in text
    api.bad = None
    api.show([api_task("after", int(time.time()))])
    await triggerer.runs[0].until(lambda: "after" in store.reported(), timeout=20)
    await triggerer.stop()
    assert triggerer.runs[0].ids() == ["after"]


# -- the hook's async list walk (both lines: the hook is not Airflow 3 only) ------------------------------------


async def test_alist_prewarm_tasks_follows_every_page_with_the_filters(emulator: EmulatorServer) -> None:
    from airflow_provider_ppio.hooks.ppio import PPIOHook

    for n in range(5):
        emulator.control.seed_task(task_id=f"t{n}", image=IMAGE, region_id=REGION, state="succeeded")
    emulator.control.seed_task(task_id="elsewhere", image=IMAGE, region_id="region-b", state="succeeded")
    hook = PPIOHook()
    tasks = [task async for task in hook.alist_prewarm_tasks(region_id=REGION, name="llm-server", page_size=2)]
    assert [task.task_id for task in tasks] == ["t0", "t1", "t2", "t3", "t4"]
    log = emulator.control.requests_log()
    assert len(log) == 3 and all(entry["query"]["limit"] == "2" for entry in log)
    assert "cursor" not in log[0]["query"] and all(entry["query"].get("cursor") for entry in log[1:])


async def test_alist_prewarm_tasks_refuses_a_cursor_that_loops(set_conn: Callable[..., None]) -> None:
    from aio_server import api_server, reply_json

    from airflow_provider_ppio.exceptions import PPIOBadResponseError
    from airflow_provider_ppio.hooks.ppio import PPIOHook

    page = {"data": [], "next_cursor": "again", "has_more": True}
    with api_server(reply_json(200, page)) as server:
        set_conn(host=server.base_url)
        with pytest.raises(PPIOBadResponseError, match="returned cursor 'again' twice"):
            [task async for task in PPIOHook().alist_prewarm_tasks(region_id=REGION)]
