"""
``PrewarmTaskEventTrigger`` (event-driven scheduling): bad input refused at parse time, one event per prewarm
task that finishes (over real HTTP against the emulator), nothing twice or missed across restarts with
Airflow 3.3's ``asset_state_store`` (at most once without it), one list walk per interval shared by sibling
watchers through Airflow's own ``SharedStreamManager``, outages survived. On Airflow 2.11: a clear error.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import time
from collections.abc import AsyncIterator, Callable
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

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.writes = 0

    async def aget(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    async def aset(self, key: str, value: Any) -> None:
        self.values[key] = value
        self.writes += 1


@pytest.fixture
def emulator(ppio_emulator: EmulatorServer, set_conn: Callable[..., None]) -> EmulatorServer:
    set_conn(host=ppio_emulator.base_url, password=ppio_emulator.api_key)
    return ppio_emulator


@pytest.fixture(autouse=True)
def _fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Walks and the settle time in milliseconds instead of seconds."""
    monkeypatch.setattr(prewarm_events, "MIN_DEFERRED_POKE_INTERVAL", 0.01)
    monkeypatch.setattr(prewarm_events, "SETTLE_SECONDS", 0.05)
    monkeypatch.setattr(prewarm_events, "EVENT_SPACING", 0.0)


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


@needs_af3
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
    running = Running(watcher(store))
    await baseline_taken(store)
    for task_id in ["mine", "other-region", "other-image", "same-name-other-registry"]:
        control.set_state(task_id, "succeeded")
    control.set_state("mine-fails", "failed", message="manifest unknown")
    await running.until(lambda: len(running.payloads) >= 1)
    await asyncio.sleep(0.5)  # several more walks: nothing else may fire
    await running.stop()

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


@needs_af3
async def test_failed_tasks_are_reported_when_asked(emulator: EmulatorServer) -> None:
    emulator.control.seed_task(task_id="a", image=IMAGE, region_id=REGION, state="running")
    store = FakeStateStore()
    running = Running(watcher(store, statuses=["succeeded", "failed"]))
    await baseline_taken(store)
    emulator.control.set_state("a", "failed", error="IMAGE_PULL_FAILED", message="manifest unknown")
    await running.until(lambda: len(running.payloads) >= 1)
    await running.stop()
    (payload,) = running.payloads
    assert payload["status"] == "failed"
    assert payload["task"]["status"]["error"] == "IMAGE_PULL_FAILED"


@needs_af3
async def test_restart_with_asset_state_store_reports_what_finished_meanwhile_and_nothing_twice(
    emulator: EmulatorServer,
) -> None:
    control = emulator.control
    for n in range(5):
        control.seed_task(task_id=f"t{n}", image=IMAGE, region_id=REGION, state="running")
    store = FakeStateStore()
    first = Running(watcher(store))
    await baseline_taken(store)
    control.set_state("t0", "succeeded")
    control.set_state("t1", "succeeded")
    await first.until(lambda: len(first.payloads) == 2)
    await asyncio.sleep(0.3)  # past the settle time: the two are saved as reported
    await first.stop()

    control.set_state("t2", "succeeded")  # while no triggerer runs the watcher
    control.set_state("t3", "succeeded")
    second = Running(watcher(store))  # a new instance, as after a triggerer restart
    await second.until(lambda: len(second.payloads) >= 2)
    control.set_state("t4", "succeeded")
    await second.until(lambda: len(second.payloads) >= 3)
    await asyncio.sleep(0.3)
    await second.stop()

    assert sorted(first.ids()) == ["t0", "t1"]
    assert sorted(second.ids()) == ["t2", "t3", "t4"]


@needs_af3
async def test_an_event_not_yet_saved_when_the_triggerer_stops_is_reported_again(emulator: EmulatorServer) -> None:
    """Stopped within the settle time, the event may not be stored by Airflow: it is fired again, not lost."""
    emulator.control.seed_task(task_id="t0", image=IMAGE, region_id=REGION, state="running")
    store = FakeStateStore()
    first = Running(watcher(store))
    await baseline_taken(store)
    prewarm_events.SETTLE_SECONDS = 30.0  # type: ignore[misc]  # restored by monkeypatch
    emulator.control.set_state("t0", "succeeded")
    await first.until(lambda: len(first.payloads) == 1)
    await first.stop()
    second = Running(watcher(store))
    await second.until(lambda: len(second.payloads) == 1)
    await second.stop()
    assert second.ids() == ["t0"]


@needs_af3
async def test_without_asset_state_store_nothing_is_reported_twice_and_downtime_is_not_caught_up(
    emulator: EmulatorServer,
) -> None:
    """Airflow 3.0-3.2: no durable state; each start takes what already finished as reported (at most once)."""
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


@needs_af3
async def test_the_ledger_stays_bounded_by_the_horizon(emulator: EmulatorServer) -> None:
    now = int(time.time())
    control = emulator.control
    for n in range(4):
        control.seed_task(task_id=f"old{n}", image=IMAGE, region_id=REGION, state="succeeded", completed_at=now - 7200)
    control.seed_task(task_id="new", image=IMAGE, region_id=REGION, state="running")
    store = FakeStateStore()
    running = Running(watcher(store, catch_up_horizon=3600))
    await baseline_taken(store)
    control.set_state("new", "succeeded", completed_at=now)
    await running.until(lambda: len(running.payloads) == 1)
    await asyncio.sleep(0.3)
    await running.stop()
    (saved,) = store.values.values()
    assert saved["reported"] == {"new": now}  # the old ones are behind the watermark, not kept one by one
    assert saved["watermark"] == now - 3600
    assert running.ids() == ["new"]


@needs_af3
@pytest.mark.timeout(60)
async def test_an_outage_backs_off_and_the_watch_goes_on(
    emulator: EmulatorServer, set_conn: Callable[..., None]
) -> None:
    set_conn(host=emulator.base_url, password=emulator.api_key, extra={"max_attempts": 2})
    emulator.control.seed_task(task_id="t0", image=IMAGE, region_id=REGION, state="running")
    store = FakeStateStore()
    running = Running(watcher(store, unreachable_timeout=0.2))
    await baseline_taken(store)
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
    from airflow.triggers.shared_stream import SharedStreamManager

    control = emulator.control
    control.seed_task(task_id="ok", image=IMAGE, region_id=REGION, state="running")
    control.seed_task(task_id="bad", image=IMAGE, region_id=REGION, state="running")
    stores = [FakeStateStore(), FakeStateStore()]
    deploys = watcher(stores[0])
    alerts = watcher(stores[1], statuses="failed")
    key = deploys.shared_stream_key()
    assert key is not None and key == alerts.shared_stream_key()

    manager = SharedStreamManager()
    streams = [
        Running(trigger, trigger.filter_shared_stream(manager.subscribe(trigger_id=n, trigger=trigger, key=key)))
        for n, trigger in enumerate([deploys, alerts])
    ]
    for store in stores:
        await baseline_taken(store)
    control.set_state("ok", "succeeded")
    control.set_state("bad", "failed")
    for stream in streams:
        await stream.until(lambda stream=stream: len(stream.payloads) == 1)  # type: ignore[misc]
    await asyncio.sleep(0.3)
    times = [entry["time"] for entry in list_walks(emulator)]
    for n, stream in enumerate(streams):
        await stream.stop()
        await manager.unsubscribe(n, key)
    await manager.stop_all()

    assert streams[0].ids() == ["ok"] and streams[1].ids() == ["bad"]
    # One poll loop for both: consecutive walks are a (jittered) interval apart; two loops would interleave.
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert len(times) > 5 and min(gaps) >= 0.05 * 0.9 - 0.005, gaps


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
