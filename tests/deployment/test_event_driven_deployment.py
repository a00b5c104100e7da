"""
Event-driven deploys in a real Airflow 3 deployment: ``example_ppio_event_driven_deploy`` runs for prewarm
tasks started outside Airflow, exactly once each, across a triggerer restart.

Ten prewarm tasks are started through the emulator's API in two regions (the example watches
``region-a`` and its image). Half finish while the triggerer runs; then the triggerer is restarted the way
a rolling deploy does it (SIGTERM), and while it is down more tasks finish; one more finishes after it is
back. Expected: one deploy per task that succeeded in region-a (none for failures, none for region-b), no
duplicate asset event or deploy, none missed. The figures (including the time from a task succeeding to
the run that deploys it being queued) are printed and written to ``event-driven.json`` in the output dir.
"""

from __future__ import annotations

import collections
import json
import time
import uuid
from typing import Any

import pytest
from deployment_harness import Deployment

from airflow_provider_ppio.triggers.prewarm_events import SETTLE_SECONDS

pytestmark = [pytest.mark.deployment, pytest.mark.af3]

DAG_ID = "example_ppio_event_driven_deploy"
IMAGE = "registry.example.com/acme/inference-api:2.3"
WATCHED, OTHER = "region-a", "region-b"
TIMEOUT = 180.0
#: The example's poke_interval.
POKE_INTERVAL = 5.0


def _runs(deployment: Deployment) -> list[dict[str, Any]]:
    body = deployment.api("GET", f"/dags/{DAG_ID}/dagRuns", params={"limit": 100})
    runs: list[dict[str, Any]] = body["dag_runs"]
    return runs


def _deployed(deployment: Deployment, run: dict[str, Any]) -> list[dict[str, Any]]:
    """The prewarm details a finished run deployed (its ``prewarmed`` task's XCom), checked against its deploys."""
    run_id = run["dag_run_id"]
    xcom = deployment.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/prewarmed/xcomEntries/return_value")
    details: list[dict[str, Any]] = xcom["value"]
    tis = deployment.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")["task_instances"]
    deploys = [ti for ti in tis if ti["task_id"] == "deploy"]
    assert len(deploys) == len(details) and all(ti["state"] == "success" for ti in deploys), deploys
    return details


def _watcher_walks(emulator: Any) -> int:
    return sum(
        1
        for entry in emulator.control.requests_log()
        if entry["path"] == "/gpus/v2/prewarm-tasks" and entry["query"].get("region_id") == WATCHED
    )


def _trigger_events(deployment: Deployment, ids: set[str]) -> list[dict[str, Any]]:
    body = deployment.api("GET", "/assets/events", params={"limit": 100, "order_by": "-timestamp"})
    events = [
        event
        for event in body["asset_events"]
        if (event.get("extra") or {}).get("from_trigger")
        and (event["extra"].get("payload") or {}).get("prewarm_task_id") in ids
    ]
    return events


def test_each_prewarm_that_succeeds_in_the_watched_region_is_deployed_once(
    deployment: Deployment, deployment_emulator: Any
) -> None:
    control = deployment_emulator.control
    started = time.monotonic()

    def parsed() -> bool:
        found = deployment.api("GET", f"/dags/{DAG_ID}", expect=(200, 404))
        return isinstance(found, dict) and found.get("dag_id") == DAG_ID

    deployment.wait_for(parsed, TIMEOUT, f"the dag-processor to parse {DAG_ID}")
    # The watcher's first walk is its baseline (what already finished is not reported); wait for a second one.
    walks_before = _watcher_walks(deployment_emulator)
    deployment.wait_for(
        lambda: _watcher_walks(deployment_emulator) >= walks_before + 2, TIMEOUT, "the watcher to walk the list"
    )

    tag = uuid.uuid4().hex[:6]
    plan = {  # task id -> (region, outcome, when it finishes)
        f"a1-{tag}": (WATCHED, "succeeded", "up"),
        f"a2-{tag}": (WATCHED, "succeeded", "up"),
        f"a3-{tag}": (WATCHED, "failed", "up"),
        f"b1-{tag}": (OTHER, "succeeded", "up"),
        f"b2-{tag}": (OTHER, "failed", "up"),
        f"a4-{tag}": (WATCHED, "succeeded", "down"),
        f"a5-{tag}": (WATCHED, "failed", "down"),
        f"b3-{tag}": (OTHER, "succeeded", "down"),
        f"a6-{tag}": (WATCHED, "succeeded", "after"),
        f"b4-{tag}": (OTHER, "succeeded", "after"),
    }
    for task_id, (region, _, _) in plan.items():
        control.seed_task(task_id=task_id, image=IMAGE, region_id=region, state="running")
    expected = {
        task_id for task_id, (region, outcome, _) in plan.items() if region == WATCHED and outcome == "succeeded"
    }
    finished_at: dict[str, float] = {}

    def finish(phase: str) -> None:
        for task_id, (_, outcome, when) in plan.items():
            if when == phase:
                control.set_state(task_id, outcome, message="" if outcome == "succeeded" else "manifest unknown")
                finished_at[task_id] = time.time()

    def deployed_ids() -> list[str]:
        ids = []
        for run in _runs(deployment):
            if run["state"] in {"success", "failed"}:
                ids += [details["prewarm_task_id"] for details in _deployed(deployment, run)]
        return [task_id for task_id in ids if task_id in plan]

    def deployed(wanted: set[str]) -> bool:
        return wanted <= set(deployed_ids())

    finish("up")
    deployment.wait_for(lambda: deployed({f"a1-{tag}", f"a2-{tag}"}), TIMEOUT, "the first deploys")
    # A rolling restart after the watcher has saved what it reported (it does so SETTLE_SECONDS after firing).
    time.sleep(SETTLE_SECONDS + 1)
    restart_at: dict[str, float] = {}

    def while_down() -> None:
        finish("down")
        time.sleep(POKE_INTERVAL)  # a walk's worth of downtime
        restart_at["up"] = time.time()

    deployment.restart("triggerer", down=while_down)
    deployment.wait_for(lambda: deployed({f"a4-{tag}"}), TIMEOUT, "the deploy of the task that finished while down")
    finish("after")
    deployment.wait_for(lambda: deployed(expected), TIMEOUT, "every deploy")
    time.sleep(2 * POKE_INTERVAL + SETTLE_SECONDS)  # room for a duplicate to show up, if there were one

    runs = [run for run in _runs(deployment) if run["state"] in {"success", "failed"}]
    deploy_count = collections.Counter(deployed_ids())
    events = _trigger_events(deployment, set(plan))
    event_count = collections.Counter(event["extra"]["payload"]["prewarm_task_id"] for event in events)
    assert all(run["state"] == "success" for run in runs), runs
    assert set(deploy_count) == expected, f"deployed {dict(deploy_count)}, expected {sorted(expected)}"
    assert set(event_count) == expected, f"asset events {dict(event_count)}"
    duplicates = {task_id: n for task_id, n in {**deploy_count, **event_count}.items() if n > 1}
    assert not duplicates, f"reported more than once: {duplicates}"

    # Each deploy carries its task's details; when its run was queued, relative to the task's success.
    latency: dict[str, float] = {}
    for run in runs:
        for details in _deployed(deployment, run):
            task_id = details["prewarm_task_id"]
            if task_id not in plan:
                continue
            assert (details["image"], details["region_id"], details["status"]) == (IMAGE, WATCHED, "succeeded")
            assert details["task"]["task_id"] == task_id
            queued = _timestamp(run["queued_at"])
            since = max(finished_at[task_id], restart_at["up"]) if plan[task_id][2] == "down" else finished_at[task_id]
            latency[task_id] = round(queued - since, 2)
    live = sorted(value for task_id, value in latency.items() if plan[task_id][2] != "down")
    figures = {
        "tasks": len(plan),
        "succeeded_in_watched_region": len(expected),
        "deploys": sum(deploy_count.values()),
        "asset_events": sum(event_count.values()),
        "runs": len(runs),
        "duplicates": 0,
        "missed": len(expected - set(deploy_count)),
        "latency_s_success_to_run_queued": {
            "while_up": live,
            "finished_while_down_from_triggerer_restart_command": [
                value for task_id, value in latency.items() if plan[task_id][2] == "down"
            ],
        },
        "poke_interval_s": POKE_INTERVAL,
        "test_seconds": round(time.monotonic() - started, 1),
    }
    (deployment.out_dir / "event-driven.json").write_text(json.dumps(figures, indent=2))
    print("event-driven deploys:", json.dumps(figures))


def _timestamp(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
