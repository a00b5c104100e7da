"""
Restart safety, with real process boundaries: nothing survives a restart but what Airflow stores (the
trigger's ``serialize()`` output, the DAG file) and the prewarm task's state in the API.

* A triggerer process is killed (SIGKILL, no clean-up) in the middle of a wait; a new process rebuilds the
  trigger from the ``serialize()`` output of the original and finishes the wait.
* A reschedule-mode sensor pokes in one worker (this process), and the next poke runs in another process
  that loads the sensor from the DAG file and knows nothing else: the wait continues to the right outcome.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from matrix import API_KEY
from restart_worker import MARK, poke_once

from airflow_provider_ppio.triggers.prewarm import PrewarmTaskTrigger

# These tests wait on real time (restarts real processes): a regression must fail fast, not hang.
pytestmark = pytest.mark.timeout(90)

HERE = Path(__file__).resolve().parent
WORKER = HERE / "restart_worker.py"
DAG_FILE = HERE / "dags" / "reliability_reschedule_gate.py"
TASK_PATH = "/gpus/v2/prewarm-tasks/"
WAIT = 120  # seconds; a process that takes longer than this is a hang


@pytest.fixture
def worker_env(rel_emulator: Any, tmp_path: Path) -> dict[str, str]:
    """The environment of a worker process: its own AIRFLOW_HOME, ``ppio_default`` pointing at the emulator."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    conn = {
        "conn_type": "ppio",
        "host": rel_emulator.base_url,
        "password": API_KEY,
        "extra": {"timeout": 2, "max_attempts": 2, "backoff_initial": 0.01, "retry_wait_max": 0.2},
    }
    env.update(
        AIRFLOW_HOME=str(tmp_path / "airflow-home"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__UNIT_TEST_MODE="True",
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{tmp_path / 'airflow.db'}",
        AIRFLOW_CONN_PPIO_DEFAULT=json.dumps(conn),
        PYTHONUNBUFFERED="1",
    )
    return env


def gets(emulator: Any, task_id: str) -> list[dict[str, Any]]:
    return [e for e in emulator.control.requests_log() if e["method"] == "GET" and e["path"] == TASK_PATH + task_id]


def wait_until(condition: Any, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Worker:
    """
    A fresh worker process (see restart_worker.py), started ahead and told when to act.

    Its output goes to a file (a pipe nobody reads could fill up and stall it).

    :param env: Its environment.
    :param log: Where its stdout and stderr go.
    :param args: Its arguments: ``trigger CLASSPATH KWARGS`` or ``poke DAG_FILE TASK_ID``.
    """

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(WORKER), *args],
                env=env,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )

    def results(self) -> list[dict[str, Any]]:
        """Every result line printed so far."""
        text = self.log.read_text(errors="replace")
        return [json.loads(line[len(MARK) :]) for line in text.splitlines() if line.startswith(MARK)]

    def output(self) -> str:
        """Everything it printed."""
        return self.log.read_text(errors="replace")

    def go(self) -> None:
        """Wait until it is ready, then let it act."""
        wait_until(lambda: bool(self.results()) or self.process.poll() is not None, "the worker to start")
        assert self.results() and self.results()[0] == {"ready": True}, self.output()[-3000:]
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def finish(self) -> list[dict[str, Any]]:
        """Wait for it to end; its results after ``ready``."""
        self.process.wait(WAIT)
        return self.results()[1:]

    def kill(self) -> list[dict[str, Any]]:
        """SIGKILL: a crash, no cancellation, no clean-up; returns its results so far."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        return self.results()[1:]


@pytest.fixture
def worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Any]:
    """``worker(*args)`` starts a :class:`Worker`; any still running at the end are killed."""
    started: list[Worker] = []

    def start(*args: str) -> Worker:
        started.append(Worker(worker_env, tmp_path / f"worker-{len(started) + 1}.log", *args))
        return started[-1]

    yield start
    for each in started:
        if each.process.poll() is None:
            each.process.kill()
            each.process.wait(10)


@pytest.mark.integration
def test_a_trigger_killed_mid_wait_is_rebuilt_from_serialize_in_a_new_process_and_completes(
    rel_emulator: Any, worker: Any
) -> None:
    task_id = "pwt-restart-trigger"
    rel_emulator.control.seed_task(task_id=task_id, state="running")
    original = PrewarmTaskTrigger(prewarm_task_id=task_id, poke_interval=0.1, deadline=time.time() + WAIT)
    classpath, kwargs = original.serialize()
    stored = json.dumps(kwargs)  # what the triggerer keeps: primitives only
    first = worker("trigger", classpath, stored)
    second = worker("trigger", classpath, stored)  # the next triggerer, warming up (it shares nothing)

    first.go()
    wait_until(lambda: len(gets(rel_emulator, task_id)) >= 2, "the first triggerer to poll a running task")
    # The API starts failing; the first triggerer keeps waiting through it, then crashes mid-wait.
    rel_emulator.control.inject_fault("status", status=503, count=None, path_prefix=TASK_PATH + task_id)
    wait_until(lambda: any(e["status"] == 503 for e in gets(rel_emulator, task_id)), "a poll during the outage")
    first_results = first.kill()
    assert first_results == [{"serialized": [classpath, kwargs]}], "it must not have finished before the kill"

    rel_emulator.control.clear_faults()
    rel_emulator.control.set_state(task_id, "succeeded")
    second.go()
    results = second.finish()

    assert results[0]["serialized"] == [classpath, kwargs], second.output()[-3000:]  # same trigger and deadline
    event = results[-1]["event"]
    assert event["status"] == "success", event
    assert event["prewarm_task_id"] == task_id
    assert event["task"]["status"]["status"] == "succeeded"
    assert API_KEY not in first.output() + second.output()


@pytest.mark.integration
def test_a_reschedule_mode_sensor_survives_a_worker_restart_between_pokes(
    rel_emulator: Any, worker: Any, worker_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id = "pwt-restart-sensor"  # the DAG file's prewarm_task_id
    rel_emulator.control.seed_task(task_id=task_id, state="running")
    second = worker("poke", str(DAG_FILE), "wait_for_prewarm")  # the next worker, warming up

    # Worker 1 (this process): the prewarm is running, so the sensor gives its slot back.
    monkeypatch.setenv("AIRFLOW_CONN_PPIO_DEFAULT", worker_env["AIRFLOW_CONN_PPIO_DEFAULT"])
    assert poke_once(str(DAG_FILE), "wait_for_prewarm") == {"poke": False, "mode": "reschedule"}

    rel_emulator.control.set_state(task_id, "succeeded")
    second.go()  # worker 2, another process that knows only the DAG file: the gate opens
    results = second.finish()

    poke = results[-1]["poke"]
    assert poke["task_id"] == task_id, second.output()[-3000:]
    assert poke["status"]["status"] == "succeeded"
    assert results[-1]["mode"] == "reschedule"
    assert [entry["status"] for entry in gets(rel_emulator, task_id)] == [200, 200]  # one read per worker
    assert API_KEY not in second.output()
