"""
``PrewarmTaskSensor(mode="reschedule")``: one request per poke, the timeout from the first poke, outages across pokes.

On Airflow 2.11 these run Airflow's own path for real: a migrated SQLite metadata database, a real DAG run and
task instance, ``TaskReschedule`` rows as Airflow writes them, and the outage record in a real Variable. On
Airflow 3 the task instance's side is the Task SDK's supervisor, which only a running task has: here a stand-in
answers ``get_first_reschedule_date`` and ``task_state_store`` (tests/e2e/test_sensor_outage_e2e.py runs the
real 3.3 path with ``airflow dags test``).
"""

from __future__ import annotations

import datetime
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests_mock as rm
from airflow import __version__ as airflow_version
from airflow.exceptions import AirflowRescheduleException  # the same class as the Task SDK's on Airflow 3
from airflow.providers.common.compat.sdk import AirflowSensorTimeout, AirflowSkipException
from virtual_clock import install_virtual_clock

from airflow_provider_ppio.exceptions import PPIOUnreachableError
from airflow_provider_ppio.sensors import prewarm
from airflow_provider_ppio.sensors.prewarm import PrewarmTaskSensor

AF3 = int(airflow_version.split(".", 1)[0]) >= 3
TASKS = "/gpus/v2/prewarm-tasks"
UNREACHABLE = 30.0
MakeTask = Callable[..., dict[str, Any]]


@pytest.fixture
def task_url(ppio_conn: str) -> str:
    return f"{ppio_conn}{TASKS}/pw-1"


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    return install_virtual_clock(monkeypatch)


@pytest.fixture(scope="module")
def metadata_db() -> None:
    """Airflow 2.11: a real metadata database in the session's throwaway home (the task reads TaskReschedule)."""
    if not AF3:
        from airflow.utils import db

        db.initdb()


class StateStore:
    """The Task SDK's ``task_state_store`` as a running task sees it: get, set, delete by key."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def set(self, key: str, value: Any, *, retention: Any = None) -> None:
        self.values[key] = value

    def delete(self, key: str) -> None:
        self.values.pop(key, None)


class Run:
    """
    One task instance of a reschedule-mode sensor, and Airflow's side of its reschedules.

    :param sensor: The sensor, already in a DAG.
    :param run_id: The DAG run.
    """

    def __init__(self, sensor: PrewarmTaskSensor, run_id: str) -> None:
        self.sensor = sensor
        self.store = StateStore()
        if AF3:
            self.first: datetime.datetime | None = None
            ti: Any = types.SimpleNamespace(
                dag_id=sensor.dag_id,
                task_id=sensor.task_id,
                run_id=run_id,
                map_index=-1,
                max_tries=sensor.retries,
                try_number=1,
                get_first_reschedule_date=lambda context: self.first if context["task_reschedule_count"] else None,
            )
            self.context: dict[str, Any] = {"ti": ti, "task_reschedule_count": 0, "task_state_store": self.store}
        else:
            from airflow.utils.session import create_session
            from airflow.utils.state import DagRunState
            from airflow.utils.types import DagRunType

            now = datetime.datetime.now(datetime.UTC)
            dag = sensor.dag
            run = dag.create_dagrun(
                run_id=run_id,
                state=DagRunState.RUNNING,
                execution_date=now,
                run_type=DagRunType.MANUAL,
                data_interval=(now, now),
            )
            ti = run.get_task_instance(sensor.task_id)
            ti.task = sensor
            ti.try_number = 1
            with create_session() as session:
                session.merge(ti)
            self.context = {"ti": ti}

    def rescheduled(self, poke_started: datetime.datetime) -> None:
        """What Airflow records when a poke that started at ``poke_started`` ends in a reschedule."""
        if AF3:
            self.first = self.first or poke_started
            self.context["task_reschedule_count"] += 1
            return
        from airflow.models.taskreschedule import TaskReschedule
        from airflow.utils.session import create_session

        ti = self.context["ti"]
        now = datetime.datetime.now(datetime.UTC)
        with create_session() as session:
            session.add(TaskReschedule(ti.task_id, ti.dag_id, ti.run_id, ti.try_number, poke_started, now, now))

    def poke(self) -> BaseException | None:
        """Run one reschedule-mode poke as the worker does; a reschedule is recorded as Airflow records it."""
        started = datetime.datetime.now(datetime.UTC)
        try:
            self.sensor.execute(self.context)
        except AirflowRescheduleException as err:
            self.rescheduled(started)
            return err
        except BaseException as err:
            return err
        return None

    def outage_record(self) -> Any:
        """What the sensor keeps between pokes (None when nothing is kept)."""
        if AF3:
            return self.store.get(prewarm.OUTAGE_KEY)
        from airflow.models import Variable

        return Variable.get(prewarm._Outage(self.context, None)._variable, None, deserialize_json=True)


_runs = iter(range(1, 10_000))


@pytest.fixture
def make_run(metadata_db: None, ppio_conn: str) -> Iterator[Callable[..., Run]]:
    def make(**kwargs: Any) -> Run:
        from airflow.providers.common.compat.sdk import DAG

        number = next(_runs)
        with DAG(dag_id=f"gate_{number}", schedule=None, start_date=datetime.datetime(2026, 1, 1)):
            sensor = PrewarmTaskSensor(
                **{
                    "task_id": "wait",
                    "prewarm_task_id": "pw-1",
                    "mode": "reschedule",
                    "poke_interval": 60,
                    "unreachable_timeout": UNREACHABLE,
                    **kwargs,
                }
            )
        return Run(sensor, f"manual__{number}")

    yield make


def later(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The sensor's clock jumps ``seconds`` ahead (Airflow's own clock, for its timeout, does not)."""
    import time as real_time

    now = real_time.time() + seconds
    monkeypatch.setattr(prewarm, "time", types.SimpleNamespace(time=lambda: now))


# -- one request per poke ---------------------------------------------------------------------------


def test_a_transient_error_costs_one_request_and_reschedules(
    requests_mock: rm.Mocker, task_url: str, sleeps: list[float], make_run: Callable[..., Run]
) -> None:
    requests_mock.get(task_url, status_code=503, json={"message": "busy"})
    run = make_run()

    ending = run.poke()

    assert isinstance(ending, AirflowRescheduleException), ending
    assert requests_mock.call_count == 1  # the connection's 5 attempts are for one-off calls, not for pokes
    assert sleeps == []  # nothing held in the worker slot
    assert run.outage_record()["since"] > 0


def test_a_running_prewarm_reschedules_and_a_succeeded_one_returns_the_xcom(
    requests_mock: rm.Mocker, task_url: str, make_task: MakeTask, make_run: Callable[..., Run]
) -> None:
    requests_mock.get(task_url, [{"json": make_task("pw-1", "running")}, {"json": make_task("pw-1", "succeeded")}])
    run = make_run()

    assert isinstance(run.poke(), AirflowRescheduleException)
    ending = run.poke()

    assert ending is None
    assert requests_mock.call_count == 2


def test_a_failed_prewarm_is_skipped_with_soft_fail(
    requests_mock: rm.Mocker, task_url: str, make_task: MakeTask, make_run: Callable[..., Run]
) -> None:
    requests_mock.get(task_url, json=make_task("pw-1", "failed"))
    assert isinstance(make_run(soft_fail=True).poke(), AirflowSkipException)


# -- an outage across pokes ---------------------------------------------------------------------------


def test_an_outage_across_reschedules_fails_with_the_last_error_after_unreachable_timeout(
    requests_mock: rm.Mocker, task_url: str, make_run: Callable[..., Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    requests_mock.get(task_url, status_code=503, json={"message": "busy"})
    run = make_run()

    assert isinstance(run.poke(), AirflowRescheduleException)
    later(monkeypatch, UNREACHABLE / 2)
    assert isinstance(run.poke(), AirflowRescheduleException)  # still within unreachable_timeout
    later(monkeypatch, UNREACHABLE + 1)
    ending = run.poke()

    assert isinstance(ending, PPIOUnreachableError), ending
    assert "no usable answer for 30s (unreachable_timeout); last error" in str(ending)
    assert "503" in str(ending)
    assert requests_mock.call_count == 3
    assert run.outage_record() is None  # the record ends with the task


def test_an_answer_between_failures_starts_a_new_outage(
    requests_mock: rm.Mocker,
    task_url: str,
    make_task: MakeTask,
    make_run: Callable[..., Run],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    busy = {"status_code": 503, "json": {"message": "busy"}}
    requests_mock.get(task_url, [busy, {"json": make_task("pw-1", "running")}, busy])
    run = make_run()

    assert isinstance(run.poke(), AirflowRescheduleException)
    assert isinstance(run.poke(), AirflowRescheduleException)  # the API answered: that outage is over
    later(monkeypatch, UNREACHABLE + 1)
    assert isinstance(run.poke(), AirflowRescheduleException)  # a new outage, just begun


def test_never_fail_skips_an_outage_longer_than_unreachable_timeout(
    requests_mock: rm.Mocker, task_url: str, make_run: Callable[..., Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    requests_mock.get(task_url, status_code=503, json={"message": "busy"})
    run = make_run(never_fail=True)

    assert isinstance(run.poke(), AirflowRescheduleException)
    later(monkeypatch, UNREACHABLE + 1)
    assert isinstance(run.poke(), AirflowSkipException)


def test_soft_fail_does_not_skip_an_outage_longer_than_unreachable_timeout(
    requests_mock: rm.Mocker, task_url: str, make_run: Callable[..., Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    requests_mock.get(task_url, status_code=503, json={"message": "busy"})
    run = make_run(soft_fail=True)

    assert isinstance(run.poke(), AirflowRescheduleException)
    later(monkeypatch, UNREACHABLE + 1)
    assert isinstance(run.poke(), PPIOUnreachableError)


# -- the timeout counts from the first poke ------------------------------------------------------------


@pytest.mark.parametrize("answer", ["running", "outage"])
@pytest.mark.parametrize("soft_fail", [False, True])
def test_the_timeout_counts_from_the_first_poke(
    requests_mock: rm.Mocker,
    task_url: str,
    make_task: MakeTask,
    make_run: Callable[..., Run],
    answer: str,
    soft_fail: bool,
) -> None:
    # The first poke ran 100 s ago; the timeout is 60 s and unreachable_timeout 30 s. An outage that began
    # at this poke has not lasted 30 s, but the sensor's own timeout has passed: the timeout ends the wait.
    requests_mock.get(task_url, json=make_task("pw-1", "running"))
    run = make_run(timeout=60, soft_fail=soft_fail)
    run.rescheduled(datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=100))
    if answer == "outage":
        requests_mock.get(task_url, status_code=503, json={"message": "busy"})

    ending = run.poke()

    assert isinstance(ending, AirflowSkipException if soft_fail else AirflowSensorTimeout), ending
    assert requests_mock.call_count == 1


def test_the_timeout_ends_an_outage_when_it_comes_first(
    requests_mock: rm.Mocker, task_url: str, make_run: Callable[..., Run], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first poke ran 15 s ago (timeout 20 s). The outage begins now; at the next poke, 31 s later, both the
    # timeout (5 s from now) and unreachable_timeout (30 s) have passed, the timeout first: the sensor leaves
    # the ending to Airflow's timeout instead of raising PPIOUnreachableError. (Only the sensor's clock moves
    # here, so Airflow reschedules; in a real run its clock has moved too and it raises AirflowSensorTimeout,
    # as tests/e2e/test_sensor_outage_e2e.py shows.) This needs the first poke as Airflow recorded it.
    requests_mock.get(task_url, status_code=503, json={"message": "busy"})
    run = make_run(timeout=20)
    run.rescheduled(datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=15))
    assert isinstance(run.poke(), AirflowRescheduleException)
    later(monkeypatch, UNREACHABLE + 1)

    ending = run.poke()

    assert isinstance(ending, AirflowRescheduleException), ending
    assert requests_mock.call_count == 2
