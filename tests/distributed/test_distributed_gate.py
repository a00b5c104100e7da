"""
The gate on a distributed Airflow: CeleryExecutor workers, PostgreSQL, Redis, two triggerers, and processes
killed while the runs wait.

``RUNS`` runs of ``ppio_distributed_gate`` (tests/distributed/dags) are triggered through the REST API at once;
each defers a sensor and two mapped create operators to the triggerers, so ``3 * RUNS`` waits are held at once.
While they wait:

1. a Celery worker is killed (``kill -9`` of its process group) in the middle of a create operator, while the
   create's answer is still arriving (the emulator trickles it); the retry, on the other worker, must reconnect
   to the prewarm that create started;
2. the triggerer holding most of the waits is killed; the other one must adopt them;
3. the emulator is restarted (the API is unreachable for a few seconds).

The prewarms are finished in three batches by the test (before the triggerer kill, right after it, after the
emulator restart), which times each gate's opening. Then: every run ends in the right state, every deferred
wait ended exactly once (one trigger event each, no trigger left), no prewarm was created twice for one task
instance, no event was lost, and the API key is in no log file, no XCom and no database row (``pg_dump``).
The figures go to ``distributed-figures.json`` in the output directory and to the terminal.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import statistics
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from deployment_harness import Deployment, files_containing

from airflow_provider_ppio.operators.prewarm import MARKER_PREFIX, idempotency_marker

pytestmark = [pytest.mark.distributed, pytest.mark.af3, pytest.mark.timeout(900)]

DAG_ID = "ppio_distributed_gate"
SENSOR = "wait_for_prewarm"
CREATE = "prewarm"
REGIONS = ("region-a", "region-b")
RUNS = int(os.environ.get("PPIO_DISTRIBUTED_RUNS", "20"))
IMAGE = "registry.example.com/team/llm:1.0"
TASKS_PATH = "/gpus/v2/prewarm-tasks"
#: The emulator sends the trickled create answer one byte per this many seconds (the hook gives up after the
#: connection's 30-second timeout, so the worker is inside the create call for that long).
TRICKLE_INTERVAL = 1.0
EMULATOR_DOWN_SECONDS = 5.0
WAIT = 300.0


def _utc(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _key(ti: dict[str, Any]) -> tuple[str, str, int]:
    return ti["dag_run_id"], ti["task_id"], ti["map_index"]


class Gate:
    """The test's view of the deployment: REST API, emulator control, the waits and the timings."""

    def __init__(self, deployment: Deployment, emulator: Any) -> None:
        self.deployment = deployment
        self.emulator = emulator
        self.control = emulator.control
        #: run id -> the id of the prewarm its sensor waits for.
        self.gates: dict[str, str] = {}
        #: TI key -> Unix time its prewarm was finished.
        self.finished_at: dict[tuple[str, str, int], float] = {}

    def tis(self) -> list[dict[str, Any]]:
        body = self.deployment.api("GET", f"/dags/{DAG_ID}/dagRuns/~/taskInstances", params={"limit": 1000})
        tis: list[dict[str, Any]] = body["task_instances"]
        return tis

    def waits(self) -> list[dict[str, Any]]:
        return [ti for ti in self.tis() if ti["task_id"] in (SENSOR, CREATE)]

    def wait_for(self, condition: Any, what: str, timeout: float = WAIT) -> Any:
        return self.deployment.wait_for(condition, timeout, what, interval=0.5)

    def marker(self, run_id: str, map_index: int) -> str:
        # max_tries: the DAG's retries (2), as Airflow sets it for a task instance never cleared.
        ti = SimpleNamespace(dag_id=DAG_ID, task_id=CREATE, run_id=run_id, map_index=map_index, max_tries=2)
        return idempotency_marker({"ti": ti})  # type: ignore[typeddict-item]

    def created(self) -> dict[str, list[dict[str, Any]]]:
        """The emulator's prewarm tasks started by create operators, by marker."""
        found: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for task in self.control.tasks():
            for word in (task.get("note") or "").split():
                if word.startswith(MARKER_PREFIX):
                    found[word].append(task)
        return found

    def trigger_runs(self) -> None:
        for index in range(RUNS):
            gate_id = f"pwt-gate-{index:02d}-{uuid.uuid4().hex[:6]}"
            self.control.seed_task(task_id=gate_id, state="running", image=IMAGE, region_id="region-gate")
            run = self.deployment.api(
                "POST",
                f"/dags/{DAG_ID}/dagRuns",
                json={
                    "dag_run_id": f"dist-{index:02d}",
                    "logical_date": None,
                    "conf": {"prewarm_task_id": gate_id, "image": IMAGE},
                },
            )
            self.gates[run["dag_run_id"]] = gate_id

    def finish(self, run_ids: list[str], *, fail: tuple[str, ...] = ()) -> None:
        """Finish every prewarm the runs wait for (``failed`` for the gates of ``fail``), noting the time."""
        created = self.created()
        for run_id in run_ids:
            now = time.time()
            if run_id in fail:
                self.control.set_state(self.gates[run_id], "failed", error="IMAGE_PULL_FAILED", message="bad")
            else:
                self.control.set_state(self.gates[run_id], "succeeded")
                self.finished_at[(run_id, SENSOR, -1)] = now
            for index in range(len(REGIONS)):
                (task,) = created[self.marker(run_id, index)]
                self.control.set_state(task["task_id"], "succeeded")
                self.finished_at[(run_id, CREATE, index)] = time.time()

    def latencies(self, run_ids: list[str]) -> list[float]:
        """Seconds from each prewarm's finish to its waiting task's success (the gate opening)."""
        wanted = {key for key in self.finished_at if key[0] in run_ids}

        def opened() -> list[dict[str, Any]] | None:
            done = [ti for ti in self.waits() if _key(ti) in wanted and ti["state"] == "success"]
            return done if len(done) == len(wanted) else None

        done = self.wait_for(opened, f"the gates of {len(run_ids)} runs to open")
        return [_utc(ti["end_date"]) - self.finished_at[_key(ti)] for ti in done]


def _figures(values: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(values), 2), "worst_s": round(max(values), 2), "n": len(values)}


def test_gate_survives_worker_triggerer_and_api_failures(
    distributed: Deployment,
    distributed_emulator: Any,
    postgres: Any,
    redis: Any,
    distributed_out: Path,
    figures: dict[str, Any],
) -> None:
    started = time.monotonic()
    gate = Gate(distributed, distributed_emulator)
    control = gate.control
    gate.wait_for(
        lambda: (distributed.api("GET", f"/dags/{DAG_ID}", expect=(200, 404)) or {}).get("dag_id") == DAG_ID,
        f"the dag-processor to parse {DAG_ID}",
    )

    # -- load, and the worker kill in the middle of the first create ------------------------------------------
    trickle = control.inject_fault("trickle", method="POST", path_prefix=TASKS_PATH, interval=TRICKLE_INTERVAL)
    gate.trigger_runs()
    gate.wait_for(lambda: not any(f["id"] == trickle["id"] for f in control.faults()), "the first create")
    taken_at = time.monotonic()
    victim_marker = gate.wait_for(lambda: next(iter(gate.created()), None), "the trickled create's prewarm")
    victim_run, victim_index = next(
        (run_id, index)
        for run_id in gate.gates
        for index in range(len(REGIONS))
        if gate.marker(run_id, index) == victim_marker
    )

    def victim_running() -> dict[str, Any] | None:
        ti: dict[str, Any] = distributed.api(
            "GET", f"/dags/{DAG_ID}/dagRuns/{victim_run}/taskInstances/{CREATE}/{victim_index}"
        )
        return ti if ti["state"] == "running" and ti.get("hostname", "").startswith("worker-") else None

    victim_ti = gate.wait_for(victim_running, "the trickled create's task instance to show its worker", 20)
    killed_worker = victim_ti["hostname"]
    distributed.kill(killed_worker)
    kill_delay = time.monotonic() - taken_at
    # The hook waits 30 s (the connection's timeout) for the answer: the create call was still going on.
    assert kill_delay < 25, f"the worker was killed {kill_delay:.1f}s after the create began: too late"

    # -- every wait deferred and held by a triggerer ------------------------------------------------------------
    expected_waits = RUNS * (1 + len(REGIONS))

    def all_deferred() -> list[dict[str, Any]] | None:
        waits = [ti for ti in gate.waits() if ti["state"] == "deferred" and ti.get("triggerer_job")]
        return waits if len(waits) == expected_waits else None

    gate.wait_for(all_deferred, f"all {expected_waits} waits to be deferred to a triggerer", 420)
    load_seconds = time.monotonic() - started
    # Every part of the deployment (Airflow, PostgreSQL, Redis) listens on loopback only.
    listening = distributed.listening((postgres.pid, redis.pid))
    assert listening, "found no listening socket at all"
    assert all(address.startswith("127.0.0.1:") for address in listening), listening
    run_ids = sorted(gate.gates)
    third = len(run_ids) // 3
    before, after, last = run_ids[:third], run_ids[third : 2 * third], run_ids[2 * third :]
    failing = (last[-1],)

    # -- batch 1: gates opening with both triggerers up ---------------------------------------------------------
    gate.finish(before)
    latency_before = gate.latencies(before)

    # -- the triggerer kill; the next batch finishes while its waits are orphaned -------------------------------
    on_triggerer = {
        _key(ti): ti["triggerer_job"] for ti in gate.waits() if ti["state"] == "deferred" and ti["triggerer_job"]
    }
    holders = collections.Counter(job["hostname"] for job in on_triggerer.values())
    killed_triggerer, held_count = holders.most_common(1)[0]
    killed_job = next(job["id"] for job in on_triggerer.values() if job["hostname"] == killed_triggerer)
    held = {key for key, job in on_triggerer.items() if job["id"] == killed_job}
    distributed.kill(killed_triggerer)
    killed_at = time.monotonic()
    gate.finish(after)

    def adopted() -> bool:
        jobs = {_key(ti): (ti.get("triggerer_job") or {}).get("id") for ti in gate.waits() if ti["state"] == "deferred"}
        return all(jobs[key] not in (None, killed_job) for key in held if key in jobs)

    gate.wait_for(adopted, "the surviving triggerer to adopt the killed one's waits")
    failover_seconds = time.monotonic() - killed_at
    latency_after = gate.latencies(after)

    # -- the emulator restart -----------------------------------------------------------------------------------
    distributed_emulator.stop()
    time.sleep(EMULATOR_DOWN_SECONDS)
    distributed_emulator.start()
    gate.finish(last, fail=failing)

    def all_done() -> list[dict[str, Any]] | None:
        runs = distributed.api("GET", f"/dags/{DAG_ID}/dagRuns", params={"limit": 1000})["dag_runs"]
        return runs if all(run["state"] in ("success", "failed") for run in runs) else None

    runs = gate.wait_for(all_done, "every run to finish")

    # -- what must hold (the figures are written first, so a failing run still reports them) -------------------
    states = {run["dag_run_id"]: run["state"] for run in runs}
    tis = {_key(ti): ti for ti in gate.tis()}
    created = gate.created()
    markers = {gate.marker(run_id, index) for run_id in run_ids for index in range(len(REGIONS))}
    doubled = {marker: [t["task_id"] for t in tasks] for marker, tasks in created.items() if len(tasks) > 1}
    posts = collections.Counter(
        word
        for entry in control.requests_log()
        if entry["method"] == "POST" and entry["path"] == TASKS_PATH
        for word in ((entry.get("json") or {}).get("note") or "").split()
        if word.startswith(MARKER_PREFIX)
    )
    fired, fired_by = _fired_events(distributed)
    # Every wait the killed triggerer held fired on the other one.
    adopted_keys = {key for key in held if fired_by.get(key) not in (None, killed_job)}
    expected_events = {key: 1 for key in tis if key[1] in (SENSOR, CREATE)}
    lost = [key for key in gate.finished_at if tis[key]["state"] != "success"]
    victim_final = tis[(victim_run, CREATE, victim_index)]
    dump = distributed_out / "pg_dump.sql"
    dump.write_bytes(postgres.client("pg_dump", "-d", postgres.database).stdout)
    leaks = files_containing(distributed.api_key.encode(), [distributed.home, distributed.log_dir, dump])
    figures.update(
        runs=RUNS,
        run_states=dict(collections.Counter(states.values())),
        waits=expected_waits,
        all_deferred_after_s=round(load_seconds, 1),
        killed_worker=killed_worker,
        worker_killed_s_into_create=round(kill_delay, 1),
        create_retried=f"{victim_run}/{CREATE}[{victim_index}] ended on try {victim_final['try_number']}",
        killed_triggerer=killed_triggerer,
        waits_on_killed_triggerer=held_count,
        waits_adopted=len(adopted_keys),
        all_adopted_within_s=round(failover_seconds, 1),
        api_requests=len(control.requests_log()),
        duplicate_prewarms=len(doubled),
        duplicate_creates_sent=sum(count - 1 for count in posts.values()),
        waits_not_ending_exactly_once=sum(1 for key in expected_events if fired.get(key) != 1),
        lost_events=len(lost),
        gate_latency_before_kill=_figures(latency_before),
        gate_latency_after_kill=_figures(latency_after),
        deployment_startup_s=round(distributed.startup_seconds, 1),
        test_wall_s=round(time.monotonic() - started, 1),
    )
    (distributed_out / "distributed-figures.json").write_text(json.dumps(figures, indent=2) + "\n")

    # Every run ended in the right state: the one with a failed prewarm failed, the others succeeded.
    assert states == {run_id: ("failed" if run_id in failing else "success") for run_id in run_ids}
    for run_id in run_ids:
        for index in range(len(REGIONS)):
            assert tis[(run_id, CREATE, index)]["state"] == "success", tis[(run_id, CREATE, index)]
        assert tis[(run_id, SENSOR, -1)]["state"] == ("failed" if run_id in failing else "success")
        assert tis[(run_id, "deploy", -1)]["state"] == ("upstream_failed" if run_id in failing else "success")
    # One prewarm per create task instance, created once; the killed create's retry reconnected to its prewarm.
    assert set(created) == markers
    assert not doubled, f"prewarms created twice: {doubled}"
    assert posts == dict.fromkeys(markers, 1), f"creates sent more than once: {posts - collections.Counter(markers)}"
    assert victim_final["try_number"] >= 2, victim_final
    victim_xcom = distributed.api(
        "GET",
        f"/dags/{DAG_ID}/dagRuns/{victim_run}/taskInstances/{CREATE}/xcomEntries/prewarm_task_id",
        params={"map_index": victim_index},
    )
    assert victim_xcom["value"] == created[victim_marker][0]["task_id"]
    # Every wait ended exactly once: one "Trigger fired event" each, no trigger left behind.
    assert fired == expected_events, _diff(fired, expected_events)
    assert postgres.query("select count(*) from trigger") == [["0"]]
    # No event lost: every wait whose prewarm finished saw it, none timed out or failed for want of an answer.
    assert not lost, f"waits that missed their prewarm's end: {lost}"
    assert adopted_keys == held, f"waits of the killed triggerer that did not end on the other: {held - adopted_keys}"
    # The API key: in no log file, XCom or database row.
    assert dump.stat().st_size > 100_000
    assert not leaks, f"the API key was written to {leaks}"


def _fired_events(deployment: Deployment) -> tuple[dict[tuple[str, str, int], int], dict[tuple[str, str, int], int]]:
    """
    How many ``Trigger fired event`` entries each task instance's logs hold, and which triggerer job fired.

    The triggerer writes each trigger's part of a task's log to ``attempt=<n>.log.trigger.<triggerer job>.log``
    next to the task's own log, as JSON lines; a wait adopted by another triggerer continues in a second file.
    """
    fired: dict[tuple[str, str, int], int] = collections.Counter()
    fired_by: dict[tuple[str, str, int], int] = {}
    for path in (deployment.home / "logs").rglob("*.log.trigger.*.log"):
        job = int(path.name.rsplit(".", 2)[-2])
        for line in path.read_text(errors="replace").splitlines():
            if '"Trigger fired event"' not in line:
                continue
            entry = json.loads(line)
            key = (entry["run_id"], entry["task_id"], entry["map_index"])
            fired[key] += 1
            fired_by[key] = job
    return dict(fired), fired_by


def _diff(got: dict[Any, int], want: dict[Any, int]) -> str:
    wrong = {k: (got.get(k, 0), want.get(k, 0)) for k in set(got) | set(want) if got.get(k, 0) != want.get(k, 0)}
    return f"(key: (events, expected)) {dict(list(wrong.items())[:20])}"
