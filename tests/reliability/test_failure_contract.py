"""
The failure contract (``contract.py``), cell by cell, on a real API over real HTTP.

Every (row, mode, variant) of the table is one test case. The event is produced for real: the emulator's
fault injection, a closed port, a server that never answers, the HTTPS emulator without its CA, a patched
``socket.getaddrinfo``. Each mode is driven as Airflow drives it:

* poke: ``sensor.execute(context)`` with ``mode="poke"``;
* reschedule: ``mode="reschedule"``: ``execute`` raises ``AirflowRescheduleException`` while it waits; each
  poke makes one request, so a row that ends the wait (an outage past ``unreachable_timeout``...) is driven
  poke after poke, ``poke_interval`` apart, as Airflow reschedules it. Airflow's records of the reschedules
  (the first poke's start, the reschedule count, the task's durable state) come from :class:`FakeTI` and
  its context here, on both lines; tests/unit/test_sensor_reschedule.py (Airflow 2.11's database) and
  tests/e2e/test_sensor_outage_e2e.py (``dags test`` on both lines) run Airflow's own;
* deferrable: ``execute`` -> ``TaskDeferred`` -> the trigger rebuilt from ``serialize()`` (as the triggerer
  does) run to its first event -> ``resume_execution(next_method, {"event": event, **kwargs}, context)``;
* the create operator, waiting in the worker (``deferrable=False``) or deferrable, the same way.

In the sensor's poke and reschedule modes the event is there from the start. In the deferrable modes the
first poke sees a running prewarm and defers; the event starts then, so it is the trigger that meets it.
The create operator finds its prewarm (by its marker) and the event hits the wait, not the create call
(rows of the connection itself, which the first call already meets, excepted).

How the task ends is then read the way Airflow reads it: ``AirflowSkipException`` -> skip;
``AirflowFailException`` / ``AirflowSensorTimeout`` -> fail without retries; any other exception -> fail,
task retries apply; ``AirflowRescheduleException`` -> keeps waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import importlib
import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from airflow import __version__ as AIRFLOW_VERSION
from airflow.providers.common.compat.sdk import (
    AirflowFailException,
    AirflowSensorTimeout,
    AirflowSkipException,
    TaskDeferred,
)
from contract import CREATE_MODES, FAIL, ROW_BY_KEY, SKIP, WAIT, Cell, Row, cell, cells
from faultserver import FaultServer, RefusedPort, respond
from packaging.version import Version
from trigger_runs import first_event

try:
    from airflow.sdk.exceptions import AirflowRescheduleException
except ImportError:  # Airflow 2.11
    from airflow.exceptions import AirflowRescheduleException  # type: ignore[no-redef,attr-defined,unused-ignore]

AF3 = Version(AIRFLOW_VERSION).major >= 3
# Import what the trigger imports lazily (aiohttp, ...) now, so the first deferrable case does not time imports.
importlib.import_module("airflow_provider_ppio.hooks._async")
TASK_ID = "pwt-contract"
TASK_PATH = f"/gpus/v2/prewarm-tasks/{TASK_ID}"
IMAGE = "registry.example.com/acme/llm-server:1.4"
REGION = "us-east-1"
WRONG_KEY = "sk_contract_WRONG_KEY_0b7e"
UNKNOWN_HOST = "ppio-contract-no-such-host.invalid"
#: Connection extras of every case: fast, small, and a short bound on outages.
EXTRA: dict[str, Any] = {
    "timeout": 0.5,
    "max_attempts": 2,
    "backoff_initial": 0.01,
    "retry_wait_max": 0.2,
    "unreachable_timeout": 1.0,
}
#: The sensor's / operator's ``timeout`` in the rows that reach it; other rows never come near theirs.
SHORT_TIMEOUT = 2.5
LONG_TIMEOUT = 30.0
POKE_INTERVAL = 0.2


# -- the world a case runs in ----------------------------------------------------------------------------


class World:
    """
    The emulators, the connection ``ppio_default``, and any raw servers a case starts.

    :param emulator: The reset emulator.
    :param tls_emulator: The reset HTTPS emulator.
    :param monkeypatch: For the connection and the DNS patch.
    """

    def __init__(self, emulator: Any, tls_emulator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.emulator = emulator
        self.tls_emulator = tls_emulator
        self.monkeypatch = monkeypatch
        self.servers: list[FaultServer | RefusedPort] = []
        self.reads_before = 0
        for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
            monkeypatch.delenv(name, raising=False)
        self.connect(emulator.base_url)

    def connect(self, host: str, api_key: str | None = None) -> None:
        conn = {"conn_type": "ppio", "host": host, "password": api_key or self.emulator.api_key, "extra": EXTRA}
        self.monkeypatch.setenv("AIRFLOW_CONN_PPIO_DEFAULT", json.dumps(conn))

    def seed(self, state: str = "running", **fields: Any) -> None:
        self.emulator.control.seed_task(
            task_id=TASK_ID, state=state, image=IMAGE, region_id=REGION, note=MARKER, **fields
        )

    def fault(self, kind: str, count: int | None = None, **params: Any) -> None:
        self.emulator.control.inject_fault(kind, count=count, method="GET", path_prefix=TASK_PATH, **params)

    def reads(self) -> int:
        """Reads of the task the emulator has seen since the event started."""
        log = self.emulator.control.requests_log()
        return sum(1 for entry in log if entry["path"] == TASK_PATH) - self.reads_before

    def mark(self) -> None:
        """The event starts now: count reads from here."""
        self.reads_before = 0
        self.reads_before = self.reads()

    def raw(self, server: FaultServer | RefusedPort) -> str:
        self.servers.append(server)
        return server.base_url

    def listing(self) -> bytes:
        """The answer to the create operator's search for its prewarm: the seeded task."""
        tasks = [task for task in self.emulator.control.tasks() if task["task_id"] == TASK_ID]
        return json.dumps({"data": tasks, "next_cursor": "", "has_more": False}).encode()

    def front(self, then: str) -> str:
        """
        A raw server that answers the create operator's search with its prewarm, then ``then``: ``silent``
        (reads the request, never answers) or ``refuse`` (stops listening: connections are refused).
        """
        listing = self.listing()

        def behaviour(conn: socket.socket, head: bytes) -> None:
            if head.split(b" ", 2)[1].startswith(b"/gpus/v2/prewarm-tasks?"):
                respond(conn, 200, listing)
                if then == "refuse":
                    server.stop()
                return
            server.silent(conn, head)

        server = FaultServer(behaviour)
        return self.raw(server)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def _fake_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, bytes):
            host = host.decode()
        if host == UNKNOWN_HOST:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


# -- producing each event ----------------------------------------------------------------------------------
#
# ``produce(world, stage)``; stage is ``start`` (sensor poke/reschedule: the event is there from the first
# read), ``create`` (the create operator: the event hits its wait; the seeded prewarm is found by its marker)
# or ``deferred`` (the deferrable modes: after the first poke deferred on a running prewarm).


def produce(row: Row, world: World, stage: str) -> None:
    """Make ``row``'s event happen (see the comment above)."""
    key = row.key
    if stage != "deferred" and key not in ("http404", "unknown-status", "prewarm-failed", "quota", "quota-wait"):
        world.seed("running")
    if key == "tls":
        world.connect(world.tls_emulator.base_url)  # no ca_bundle: its CA is trusted nowhere
    elif key == "bad-url":
        world.connect("ftp://127.0.0.1:9")
    elif key == "dns":
        _fake_dns(world.monkeypatch)
        world.connect(f"https://{UNKNOWN_HOST}:8080")  # plain http to a remote host is refused before DNS
    elif key == "refused":
        world.connect(world.front("refuse") if stage == "create" else world.raw(RefusedPort()))
    elif key == "timeout":
        if stage == "create":
            world.connect(world.front("silent"))
        else:
            silent = FaultServer(lambda conn, head: silent.silent(conn, head))
            world.connect(world.raw(silent))
    elif key == "http5xx":
        world.fault("status", status=503)
    elif key == "http429":
        world.fault("rate_limit", retry_after="0.05")
    elif key == "http401":
        world.connect(world.emulator.base_url, api_key=WRONG_KEY)
    elif key == "http403":
        world.fault("status", status=403)
    elif key == "http404":
        if stage == "start":
            return  # no such task: the emulator's own 404
        if stage == "create":
            world.seed("running")
        world.fault(
            "status",
            status=404,
            body={"code": 404, "reason": "PREWARM_TASK_NOT_FOUND", "message": f"prewarm task {TASK_ID!r} not found"},
        )
    elif key == "http400":
        world.fault("status", status=400)
    elif key in ("quota", "quota-wait"):
        world.emulator.control.configure(quota=0)
    elif key == "bad-body":
        world.fault("malformed_json")
    elif key == "unknown-status":
        if stage == "deferred":
            world.emulator.control.set_state(TASK_ID, "queued")
        else:
            world.seed("queued")
    elif key == "prewarm-failed":
        failed = {"error": "ImagePullFailed", "message": "failed to pull image", "reason": ["manifest unknown"]}
        if stage == "deferred":
            world.emulator.control.set_state(TASK_ID, "failed", **failed)
        elif stage == "create":  # found while running, then it fails
            world.seed(timeline=[{"state": "running", "seconds": 0.3}, {"state": "failed", "seconds": None, **failed}])
        else:
            world.seed("failed", **failed)
    elif key == "deadline":
        pass  # the seeded prewarm simply keeps running
    elif key == "outage":
        world.fault("status", count=1, status=503)
        world.fault("rate_limit", count=1, retry_after="0.05")
        world.fault("drop")
    else:  # pragma: no cover - a new row needs a way to produce it
        raise AssertionError(f"no way to produce row {key!r}")


# -- driving each mode -------------------------------------------------------------------------------------


class FakeTI:
    """The task-instance attributes and XCom calls the sensor and the create operator use."""

    def __init__(self, first_try: datetime.datetime | None = None) -> None:
        self.dag_id = "contract"
        self.task_id = "gate"
        self.run_id = "manual__1"
        self.map_index = -1
        self.max_tries = 0
        self.try_number = 1
        self.stats_tags: dict[str, str] = {}
        self.xcoms: dict[str, Any] = {}
        self._first_try = first_try

    def get_first_reschedule_date(self, context: Any) -> datetime.datetime | None:
        return self._first_try

    def rescheduled(self, context: dict[str, Any], poke_started: datetime.datetime) -> None:
        """What Airflow records when a reschedule-mode poke ends in a reschedule."""
        self._first_try = self._first_try or poke_started
        context["task_reschedule_count"] += 1

    def xcom_push(self, key: str, value: Any, **kwargs: Any) -> None:
        self.xcoms[key] = value

    def xcom_pull(self, task_ids: Any = None, key: str = "return_value", **kwargs: Any) -> Any:
        return self.xcoms.get(key)


class StateStore:
    """A task's durable state (``task_state_store``), kept across the reschedules of one case."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def set(self, key: str, value: Any, *, retention: Any = None) -> None:
        self.values[key] = value

    def delete(self, key: str) -> None:
        self.values.pop(key, None)


def _marker() -> str:
    from airflow_provider_ppio.operators.prewarm import idempotency_marker

    context: Any = {"ti": FakeTI()}
    return idempotency_marker(context)


MARKER = _marker()


@dataclasses.dataclass
class Observed:
    """How the case ended, read as Airflow reads it."""

    outcome: str
    error: str | None
    retries: bool
    message: str = ""
    seconds: float = 0.0
    total_seconds: float = 0.0
    reads: int = 0

    def cell(self) -> Cell:
        return Cell(self.outcome, self.error, self.retries)


def read_ending(err: BaseException | None) -> Observed:
    """How Airflow ends a task that raised ``err`` (None: it returned)."""
    if err is None:
        return Observed("success", None, False)
    if isinstance(err, AirflowRescheduleException):
        return Observed(WAIT, None, False, str(err))
    if isinstance(err, AirflowSkipException):
        return Observed(SKIP, "AirflowSkipException", False, str(err))
    if isinstance(err, (AirflowFailException, AirflowSensorTimeout)):
        return Observed(FAIL, type(err).__name__, False, str(err))
    return Observed(FAIL, type(err).__name__, True, str(err))


def run_trigger(trigger: Any) -> dict[str, Any]:
    """Rebuild the trigger from its ``serialize()`` output, as the triggerer does, and run it to its first event."""
    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
    return asyncio.run(asyncio.wait_for(first_event(rebuilt), 30))


def _timeout_for(row: Row) -> float:
    return SHORT_TIMEOUT if row.key in ("deadline", "unknown-status", "quota", "quota-wait") else LONG_TIMEOUT


def make_task(row: Row, mode: str, variant: str) -> Any:
    if mode in CREATE_MODES:
        from airflow_provider_ppio.operators.prewarm import PPIOCreatePrewarmTaskOperator

        return PPIOCreatePrewarmTaskOperator(
            task_id="gate",
            image=IMAGE,
            region_id=REGION,
            poke_interval=POKE_INTERVAL,
            timeout=_timeout_for(row),
            deferrable=mode == "create_deferrable",
            reuse_existing=row.key not in ("quota", "quota-wait"),
            wait_for_quota=row.key != "quota",
        )
    from airflow_provider_ppio.sensors.prewarm import PrewarmTaskSensor

    return PrewarmTaskSensor(
        task_id="gate",
        prewarm_task_id=TASK_ID,
        mode="reschedule" if mode == "reschedule" else "poke",
        deferrable=mode == "deferrable",
        poke_interval=POKE_INTERVAL,
        timeout=_timeout_for(row),
        soft_fail=variant == "soft_fail",
        never_fail=variant == "never_fail",
    )


def _first_try(row: Row, mode: str, monkeypatch: pytest.MonkeyPatch) -> datetime.datetime | None:
    """Reschedule mode at the deadline: the first try started longer ago than the sensor's timeout."""
    started = None
    if mode == "reschedule" and row.key == "deadline":
        started = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=SHORT_TIMEOUT + 1)
    try:
        import airflow.sensors.base as af2_sensor_base  # Airflow 2 looks the first try's start up in the DB
    except ImportError:
        af2_sensor_base = None  # type: ignore[assignment,unused-ignore]
    if af2_sensor_base is not None and hasattr(af2_sensor_base, "_orig_start_date"):
        monkeypatch.setattr(af2_sensor_base, "_orig_start_date", lambda **kwargs: started)
        # The sensor then asks the task instance, as on Airflow 3: FakeTI answers for Airflow on both lines.
        from airflow_provider_ppio.sensors import prewarm

        monkeypatch.setattr(prewarm, "AIRFLOW_3", True)
    return started


def drive(row: Row, mode: str, variant: str, world: World) -> Observed:
    """Run one cell and read how the task ended."""
    task = make_task(row, mode, variant)
    ti = FakeTI(_first_try(row, mode, world.monkeypatch))
    context: dict[str, Any] = {"ti": ti, "task_reschedule_count": 0, "task_state_store": StateStore()}
    deferrable = mode in ("deferrable", "create_deferrable")
    if deferrable and row.key not in ("quota", "quota-wait"):
        world.seed("running")
    else:
        produce(row, world, "create" if mode in CREATE_MODES else "start")
    world.mark()
    started = first = time.monotonic()
    deferred: TaskDeferred | None = None
    ending: BaseException | None = None
    # Reschedule mode: poke after poke until the wait ends, unless the row is one that keeps waiting.
    pokes_until_the_end = mode == "reschedule" and cell(row, mode, variant).outcome != WAIT
    while True:
        poke_started = datetime.datetime.now(datetime.UTC)
        try:
            task.execute(context)
        except TaskDeferred as err:
            deferred = err
        except BaseException as err:
            ending = err
        else:
            ending = None
        if not (pokes_until_the_end and isinstance(ending, AirflowRescheduleException)):
            break
        if time.monotonic() - first > 30:
            break
        ti.rescheduled(context, poke_started)
        time.sleep(POKE_INTERVAL)
    first_deferral = True
    while deferred is not None:  # outside the except block: the triggerer has no TaskDeferred in its context
        if first_deferral and row.key not in ("quota", "quota-wait"):
            produce(row, world, "deferred")
            world.mark()
            started = time.monotonic()
            # The trigger sleeps 0.9-1.1 poke_interval before its first poll: not part of the event's handling.
            started += getattr(deferred.trigger, "poke_interval", 0.0) * 0.9
        first_deferral = False
        event = run_trigger(deferred.trigger)
        method, next_kwargs = deferred.method_name, {"event": event, **(deferred.kwargs or {})}
        deferred = None
        try:
            task.resume_execution(method, next_kwargs, context)
        except TaskDeferred as err:  # deferred again (a wait for a free quota slot goes on)
            deferred = err
        except BaseException as err:
            ending = err
        else:
            ending = None
    observed = read_ending(ending)
    observed.seconds = time.monotonic() - started
    observed.total_seconds = time.monotonic() - first
    observed.reads = world.reads()
    return observed


# -- the log level of the unknown-status line ----------------------------------------------------------------


@contextlib.contextmanager
def warnings_logged() -> Iterator[list[str]]:
    """Messages logged at WARNING or above by the provider (stdlib logging on 2.11, structlog on 3.x)."""
    found: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                found.append(record.getMessage())

    handler = Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    loggers = [logging.getLogger(name) for name in ("airflow.task", "airflow_provider_ppio", "airflow.triggers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        if AF3:
            import structlog

            with structlog.testing.capture_logs() as events:
                yield found
            found.extend(
                str(event.get("event", ""))
                for event in events
                if event.get("log_level") in ("warning", "error", "critical")
            )
        else:
            yield found
    finally:
        root.removeHandler(handler)
        for logger in loggers:
            logger.removeHandler(handler)


# -- the test ----------------------------------------------------------------------------------------------


def _cell_id(case: tuple[Row, str, str]) -> str:
    row, mode, variant = case
    return f"{row.number}-{row.key}-{mode}-{variant}"


@pytest.mark.integration
@pytest.mark.timeout(45)
@pytest.mark.parametrize("case", cells(), ids=_cell_id)
def test_contract_cell(
    case: tuple[Row, str, str],
    ppio_emulator: Any,
    ppio_emulator_tls: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    row, mode, variant = case
    expected = cell(row, mode, variant)
    world = World(ppio_emulator, ppio_emulator_tls, monkeypatch)
    try:
        with warnings_logged() as warned:
            observed = drive(row, mode, variant, world)
    finally:
        world.stop()
    where = f"row {row.number} ({row.title}) / {mode} / {variant}: {observed}"

    if expected.outcome == WAIT:
        # Still waiting after the first read: reschedule mode reschedules; every other mode goes on polling
        # until its own timeout ends the wait, and then ends exactly as row 15 says.
        if mode == "reschedule":
            assert observed.cell() == Cell(WAIT, None, False), where
        else:
            ending = cell(ROW_BY_KEY["deadline"], mode, variant)
            assert observed.cell() == Cell(ending.outcome, ending.error, ending.retries), where
            assert observed.total_seconds >= SHORT_TIMEOUT * 0.9, where
            assert observed.reads >= 2, where
        if row.key == "unknown-status":
            assert any("does not know" in line and "queued" in line for line in warned), (where, warned)
        return

    assert observed.cell() == Cell(expected.outcome, expected.error, expected.retries), where
    unreachable = float(EXTRA["unreachable_timeout"])
    if cell(row, mode).patient:
        # Kept waiting through the fault (retried past one call's attempts) until unreachable_timeout ran out;
        # a never_fail skip comes only then too.
        assert observed.seconds >= unreachable * 0.95, where
        if row.key in ("http5xx", "http429", "outage"):
            assert observed.reads > EXTRA["max_attempts"], where
    elif row.key not in ("deadline", "quota-wait"):
        # At once: no retry, no waiting (a create operator's prewarm is read while running, then failed).
        assert observed.seconds < unreachable, where
        if not (row.key == "prewarm-failed" and mode == "create_wait"):
            assert observed.reads <= 1, where
    if row.key == "deadline" and mode in CREATE_MODES:
        assert "did not finish" in observed.message, where
    if row.key == "quota-wait":
        # It waited (not a refusal at once), and gave up within its timeout rather than sleep past it.
        assert "No free prewarm slot" in observed.message, where
        assert 1.0 <= observed.total_seconds <= SHORT_TIMEOUT + 1.0, where
    if row.key == "prewarm-failed" and expected.outcome == FAIL:
        assert "failed to pull image" in observed.message, where


def test_the_docs_table_is_the_contract() -> None:
    """docs/reliability.md shows exactly this contract (``python tests/reliability/contract_report.py`` rewrites it)."""
    from contract_report import current_block, render

    assert current_block() == render(), "docs/reliability.md is stale: run python tests/reliability/contract_report.py"


def test_each_row_ends_alike_in_every_mode() -> None:
    """The point of the contract: a row's cell differs between modes only where the row says so explicitly."""
    from contract import MODES, ROWS, SENSOR_MODES, applies

    for row in ROWS:
        for variant in ("default", "soft_fail", "never_fail"):
            sensor_cells = {cell(row, mode, variant) for mode in SENSOR_MODES if applies(row, mode, variant)}
            assert len(sensor_cells) <= 1, row
        create_cells = {cell(row, mode) for mode in CREATE_MODES if applies(row, mode)}
        assert len(create_cells) <= 1, row
        if row.create is None and not row.create_only:
            assert {cell(row, mode) for mode in MODES} == {row.default}, row
