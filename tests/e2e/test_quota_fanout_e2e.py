"""
The multi-region example fans out to 8 regions against an emulator with the default quota of 5 prewarms at once.

What a user would see: every mapped ``prewarm`` task succeeds, none fails or is retried for the quota, the account
never runs more than 5 prewarms at once, each region gets exactly one prewarm, and the whole fan-out takes about
two prewarm durations (ceil(8 / 5) rounds), not one per region. The figures (tasks, peak active prewarms, refused
creates, wall time) are printed; run with ``-s`` to see them.

**Why not plain ``airflow dags test``.** ``dags test`` runs the task instances it finds schedulable one after
another in one process, on Airflow 2.11 and 3.3 alike (``DAG.test`` loops over them and calls ``_run_task`` for
each), and a create task in worker mode waits for its prewarm before the next one starts. Mapped tasks under
``dags test`` therefore never have more than one prewarm running, never meet the quota, and would make this
test meaningless (tests/e2e/test_lifecycle_e2e.py runs the same example that way, within the quota). The
concurrency here is real instead, the way a deployment produces it:

* **Worker mode, both lines**: the DAG run is created with ``airflow dags trigger``, then the 8 mapped task
  instances run at once, each in its own ``airflow tasks test DAG prewarm RUN --map-index N`` process, as 8
  executor slots would run them. Airflow takes seconds to start a process, so on a small machine the 8 would
  reach the API seconds apart; an emulator ``barrier`` fault holds each one's first request (the marker
  lookup that precedes every create) until all 8 have arrived, as when a scheduler queues them together.
* **Deferrable mode, Airflow 2.11**: ``airflow dags test`` with a real ``airflow triggerer`` running on the same
  metadata database. 2.11's ``dags test`` then hands every deferral to that triggerer instead of running it
  inline, so each task's worker part (the create) runs in turn within a second while all the waits, those for
  a quota slot (``DateTimeTrigger``) and those for the prewarm, run concurrently in the triggerer. (2.11's
  ``tasks test`` cannot serve here: it runs only one deferral per task, and a refused create defers twice.)
* **Deferrable mode, Airflow 3.3**: 3.3's ``dags test`` always runs triggers inline, one task at a time, so the
  8 ``tasks test`` processes are used as in worker mode; each runs its deferrals (quota wait, then the prewarm
  wait) inline, concurrently with the other 7.

Timings: the emulator takes 3.5 s per prewarm (pending 0.5 s, running 3 s) and the example reads every 5 s
(``poke_interval``), so one prewarm is seen done 5 s after its create: that is one prewarm duration here. The
first wait for a quota slot is 0.8-1.2 poke intervals, after the first round has ended.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from airflow import __version__ as AIRFLOW_VERSION
from dagtest_runner import (
    DB_NAME,
    E2E_API_KEY,
    TASK_PATH,
    airflow_command,
    airflow_env,
    new_home,
    ppio_connection,
    run_dag_test,
)
from packaging.version import Version

DAG_ID = "example_ppio_multi_region"
IMAGE = "registry.example.com/acme/llm-server:1.4"
REGIONS = [f"region-{letter}" for letter in "abcdefgh"]
QUOTA = 5
TASKS = "/gpus/v2/prewarm-tasks"
#: The example's poke_interval; a prewarm (3.5 s in the emulator) is seen done one poke interval after its create.
PREWARM_SECONDS = 5.0
#: Room for Airflow's own scheduling within the prewarm phase (dags test's 1 s loop, triggerer pick-up, SQLite).
OVERHEAD_SECONDS = 10.0
#: How long the barrier holds the first requests when a process never arrives (the test then fails).
BARRIER_SECONDS = 240.0
QUOTA_WAIT_LOG = "prewarm quota is used up"
AF3 = Version(AIRFLOW_VERSION).major >= 3


@pytest.fixture
def fanout_emulator(ppio_emulator_factory: Any) -> Any:
    """An emulator with the default quota of 5 concurrent prewarms; each prewarm takes 3.5 s."""
    return ppio_emulator_factory(api_key=E2E_API_KEY, pending_seconds=0.5, running_seconds=3.0, quota=QUOTA)


def _cli(home: Path, env: Mapping[str, str], *args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        airflow_command(*args),
        env=airflow_env(home, extra=env),
        cwd=home,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"airflow {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _query(home: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{home / DB_NAME}?mode=ro", uri=True)) as conn:
        return conn.execute(sql, args).fetchall()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process this test started (its own process group), politely first."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)


def _arrived(emulator: Any) -> int:
    """How many requests the barrier holds (0 once it has let them all through)."""
    return sum(fault.get("arrived", 0) for fault in emulator.control.faults() if fault["kind"] == "barrier")


def run_mapped_in_parallel(
    home: Path, env: Mapping[str, str], run_id: str, emulator: Any, count: int, timeout: float = 420
) -> list[tuple[int, str]]:
    """
    Run map indexes ``0..count-1`` of ``prewarm`` together, one ``airflow tasks test`` process each.

    A process is started once the previous one is held at the emulator's barrier, i.e. is inside the
    operator: starting a task writes to the SQLite metadata database, which takes one writer at a time, and
    eight processes starting at once on a small machine time out on its lock. The barrier then lets all of
    them through at once.

    :return: (exit code, output) per map index.
    """
    outputs = [home / f"prewarm-{index}.log" for index in range(count)]
    procs: list[subprocess.Popen[bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        for index, path in enumerate(outputs):
            with path.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        airflow_command("tasks", "test", DAG_ID, "prewarm", run_id, "--map-index", str(index)),
                        env=airflow_env(home, extra=env),
                        cwd=home,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
            while index < count - 1 and _arrived(emulator) <= index:
                assert procs[-1].poll() is None, f"map index {index} exited early:\n{path.read_text()[-5000:]}"
                assert time.monotonic() < deadline, f"map index {index} never reached the API"
                time.sleep(0.2)
        for proc in procs:
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for proc in procs:
            _stop(proc)
    return [(proc.returncode, path.read_text(errors="replace")) for proc, path in zip(procs, outputs, strict=True)]


@contextlib.contextmanager
def triggerer(home: Path, env: Mapping[str, str], startup_timeout: float = 120) -> Iterator[None]:
    """An ``airflow triggerer`` on ``home``'s database, heartbeating before the block runs, stopped after it."""
    log = (home / "triggerer.log").open("wb")
    proc = subprocess.Popen(
        airflow_command("triggerer", "--skip-serve-logs"),
        env=airflow_env(home, extra=env),
        cwd=home,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    try:
        deadline = time.monotonic() + startup_timeout
        while not _query(home, "SELECT id FROM job WHERE job_type = 'TriggererJob' AND state = 'running'"):
            assert proc.poll() is None, (home / "triggerer.log").read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the triggerer did not start"
            time.sleep(0.5)
        yield
    finally:
        _stop(proc)


def prewarm_phase(emulator: Any) -> dict[str, Any]:
    """What the emulator saw: creates, refusals, peak, and the wall time from the first create to the last read."""
    log = emulator.control.requests_log()
    posts = [entry for entry in log if entry["method"] == "POST" and entry["path"] == TASKS]
    accepted = [entry for entry in posts if entry["status"] == 200]
    refused = [entry for entry in posts if entry["reason"] == "IMAGE_PREWARM_NUM_LIMIT"]
    task_ids = {task["task_id"] for task in emulator.control.tasks()}
    task_ids |= {entry["path"][len(TASK_PATH) :] for entry in log if entry["path"].startswith(TASK_PATH)}
    last_reads = [
        max(entry["time"] for entry in log if entry["method"] == "GET" and entry["path"] == TASK_PATH + task_id)
        for task_id in task_ids
    ]
    return {
        "posts": posts,
        "accepted": accepted,
        "refused": refused,
        "stats": emulator.control.stats(),
        "seconds": max(last_reads) - min(entry["time"] for entry in posts) if posts and last_reads else math.inf,
    }


def report(mode: str, phase: dict[str, Any], tasks: int, command_seconds: float) -> None:
    print(
        f"\n[quota fan-out, Airflow {AIRFLOW_VERSION}, {mode}] tasks={tasks} "
        f"peak_active={phase['stats']['peak_active']} (quota {QUOTA}) "
        f"refused_creates={len(phase['refused'])} accepted_creates={len(phase['accepted'])} "
        f"prewarm_phase_wall={phase['seconds']:.1f}s (one prewarm = {PREWARM_SECONDS:.0f}s, "
        f"bound {3 * PREWARM_SECONDS + OVERHEAD_SECONDS:.0f}s) command_wall={command_seconds:.1f}s"
    )


def assert_fanout_within_quota(phase: dict[str, Any], logs: str) -> None:
    stats = phase["stats"]
    # The fan-out really met the quota, and the emulator logged each refusal with its reason.
    assert phase["refused"], f"no create was refused: the fan-out never reached the quota ({stats})"
    assert len(phase["refused"]) == stats["refused_creates"]
    assert [entry["status"] for entry in phase["refused"]] == [400] * len(phase["refused"])
    assert len(phase["posts"]) == len(phase["accepted"]) + len(phase["refused"]), phase["posts"]
    # Never more than the quota at once; and the quota was used, not avoided.
    assert stats["peak_active"] == QUOTA, stats
    # One prewarm per region, none twice.
    created = collections.Counter((e["json"]["region_id"], e["json"]["image"]) for e in phase["accepted"])
    assert created == collections.Counter((region, IMAGE) for region in REGIONS), created
    # Each refused create was waited out and logged by the operator, none reached Airflow as a failure.
    assert logs.count(QUOTA_WAIT_LOG) >= len(phase["refused"]), logs[-5000:]
    for failure in ("No free prewarm slot", "PPIOQuotaExceededError", "Traceback"):
        assert failure not in logs, logs[logs.find(failure) - 2000 : logs.find(failure) + 2000]
    # About ceil(8 / 5) = 2 prewarm durations, well under 3 plus Airflow's own overhead.
    assert math.ceil(len(REGIONS) / QUOTA) == 2
    assert phase["seconds"] < 3 * PREWARM_SECONDS + OVERHEAD_SECONDS, phase["seconds"]


def _distinct_quota_waits(output: str) -> int:
    """Quota-wait warnings in one process's output (a line may be printed by two handlers)."""
    return len({line.split(QUOTA_WAIT_LOG)[1] for line in output.splitlines() if QUOTA_WAIT_LOG in line})


@pytest.mark.timeout(600)
@pytest.mark.parametrize("deferrable", [False, True], ids=["worker", "deferrable"])
def test_fan_out_to_more_regions_than_the_quota_completes_within_it(
    fanout_emulator: Any, airflow_home_template: Path, tmp_path: Path, deferrable: bool
) -> None:
    emulator = fanout_emulator
    home = new_home(tmp_path / "airflow-home", template=airflow_home_template)
    # The barrier below holds the first request of each process for up to a minute or two: a shorter request
    # timeout would make the hook send it again, and the barrier would count the same task twice.
    env = ppio_connection(emulator.base_url, emulator.api_key, timeout=BARRIER_SECONDS + 60)
    env["AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE"] = str(deferrable)
    mode = "deferrable" if deferrable else "worker"

    if deferrable and not AF3:
        with triggerer(home, env):
            result = run_dag_test(home, DAG_ID, conf={"image": IMAGE}, env=env, timeout=420)
        phase = prewarm_phase(emulator)
        report(f"{mode}: dags test + triggerer", phase, len(REGIONS), result.seconds)
        assert result.returncode == 0, result.describe()
        rows = _query(
            home,
            "SELECT map_index, state, try_number FROM task_instance WHERE dag_id = ? AND run_id = ? AND task_id = ?",
            DAG_ID,
            result.run_id,
            "prewarm",
        )
        assert sorted((index, state) for index, state, _ in rows) == [(i, "success") for i in range(len(REGIONS))]
        assert {tries for _, _, tries in rows} == {1}, rows  # no task was retried
        assert result.task_states["deploy"] == "success", result.describe()
        assert_fanout_within_quota(phase, result.logs)
        return

    # The DAG must be in the database for `dags trigger` and (on Airflow 3) for `tasks test`.
    _cli(home, env, "dags", "reserialize")
    run_id = f"fanout_{mode}"
    _cli(home, env, "dags", "trigger", DAG_ID, "--run-id", run_id, "--conf", json.dumps({"image": IMAGE}))
    emulator.control.inject_fault(
        "barrier", count=len(REGIONS), method="GET", path_prefix=TASKS, seconds=BARRIER_SECONDS
    )

    started = time.monotonic()
    outcomes = run_mapped_in_parallel(home, env, run_id, emulator, len(REGIONS))
    seconds = time.monotonic() - started
    phase = prewarm_phase(emulator)
    report(f"{mode}: {len(REGIONS)} parallel tasks test", phase, len(REGIONS), seconds)

    for index, (code, output) in enumerate(outcomes):
        assert code == 0, f"map index {index} exited {code}:\n{output[-5000:]}"
    if AF3:
        rows = _query(
            home,
            "SELECT map_index, state, try_number FROM task_instance WHERE dag_id = ? AND run_id = ? AND task_id = ?",
            DAG_ID,
            run_id,
            "prewarm",
        )
        assert sorted((index, state) for index, state, _ in rows) == [(i, "success") for i in range(len(REGIONS))]
        assert {tries for _, _, tries in rows} <= {0, 1}, rows  # `tasks test` does not count tries; none retried
    else:  # Airflow 2.11's `tasks test` does not store the state, it logs it
        for index, (_, output) in enumerate(outcomes):
            assert "Marking task as SUCCESS" in output and f"map_index={index}" in output, output[-3000:]
    assert sum(_distinct_quota_waits(output) for _, output in outcomes) == len(phase["refused"])
    assert_fanout_within_quota(phase, "\n".join(output for _, output in outcomes))
