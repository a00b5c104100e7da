"""
The lifecycle example (create >> deploy, cleanup) in a real Airflow 3 deployment: retries, ``airflow tasks
clear``, reuse and cleanup together, as a scheduler (LocalExecutor), a triggerer and the REST API run them.

The deployment defers by default (``[operators] default_deferrable = True``), so each create waits in the
triggerer. The emulator keeps every request, so "created once" is counted on the server side.
"""

from __future__ import annotations

import datetime
import itertools
from typing import Any

import pytest
from deployment_harness import Deployment

pytestmark = [pytest.mark.deployment, pytest.mark.af3]

DAG_ID = "example_ppio_lifecycle"
REUSE_DAG_ID = "example_ppio_lifecycle_reuse"
IMAGE = "registry.example.com/acme/llm-server:1.4"
PINNED = "registry.example.com/acme/llm-server@sha256:" + "4" * 64
TASKS = "/gpus/v2/prewarm-tasks"
RUN_TIMEOUT = 240.0
TERMINAL = {"success", "failed"}
_dates = itertools.count()


def _trigger(deployment: Deployment, dag_id: str) -> tuple[str, str]:
    def parsed() -> bool:
        found = deployment.api("GET", f"/dags/{dag_id}", expect=(200, 404))
        return isinstance(found, dict) and found.get("dag_id") == dag_id

    deployment.wait_for(parsed, 180, f"the dag-processor to parse {dag_id}")
    # A logical date of its own (after the DAG's start_date, before now), so `airflow tasks clear -s/-e` picks
    # exactly this run.
    logical = (datetime.datetime(2026, 2, 1, tzinfo=datetime.UTC) + datetime.timedelta(days=next(_dates))).isoformat()
    run = deployment.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": logical})
    return run["dag_run_id"], logical


def _wait_for_run(deployment: Deployment, dag_id: str, run_id: str) -> dict[str, str]:
    def finished() -> dict[str, Any] | None:
        run = deployment.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
        return run if run["state"] in TERMINAL else None

    deployment.wait_for(finished, RUN_TIMEOUT, f"run {run_id} of {dag_id} to finish")
    body = deployment.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
    return {ti["task_id"]: ti["state"] for ti in body["task_instances"]}


def _ti(deployment: Deployment, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
    ti: dict[str, Any] = deployment.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")
    return ti


def _xcom(deployment: Deployment, dag_id: str, run_id: str, task_id: str, key: str) -> Any:
    entry = deployment.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}")
    return entry["value"]


def _clear(deployment: Deployment, dag_id: str, logical: str) -> None:
    """``airflow tasks clear`` of the create and what follows it, for this run only (Airflow 3's ``-t`` matches
    a substring of the task id, 2.11's a regex: ``prewarm`` works on both)."""
    deployment._run(
        f"clear-{dag_id}-{logical[:10]}",
        ["tasks", "clear", dag_id, "-t", "prewarm", "--downstream", "-s", logical, "-e", logical, "-y"],
        timeout=120,
    )


def _creates(emulator: Any, image: str = IMAGE) -> list[dict[str, Any]]:
    return [t for t in emulator.control.tasks() if t["image"] == image]


def _posts(emulator: Any) -> int:
    return len([e for e in emulator.control.requests_log() if e["method"] == "POST" and e["path"] == TASKS])


def _deletes(emulator: Any) -> int:
    return len([e for e in emulator.control.requests_log() if e["method"] == "DELETE" and e["path"] == TASKS])


@pytest.fixture
def emulator(deployment_emulator: Any) -> Any:
    deployment_emulator.control.configure(pending_seconds=0.2, running_seconds=1.0)
    return deployment_emulator


def test_a_clear_prewarms_a_tag_again_and_each_cleanup_deletes_only_its_own(
    deployment: Deployment, emulator: Any
) -> None:
    posts = _posts(emulator)
    run_id, logical = _trigger(deployment, DAG_ID)
    states = _wait_for_run(deployment, DAG_ID, run_id)
    assert states == {"prewarm": "success", "deploy": "success", "cleanup": "success"}, states
    first = _xcom(deployment, DAG_ID, run_id, "prewarm", "prewarm_task_id")
    first_note = _xcom(deployment, DAG_ID, run_id, "prewarm", "prewarm_task")["note"]
    assert first and first not in {t["task_id"] for t in emulator.control.tasks()}  # the cleanup deleted it
    # A decoy that a retry would take for this task instance's prewarm: same marker, image and region.
    emulator.control.seed_task(task_id="pwt-decoy-retry", image=IMAGE, region_id="region-a", state="succeeded",
                               note=first_note)  # fmt: skip

    _clear(deployment, DAG_ID, logical)
    states = _wait_for_run(deployment, DAG_ID, run_id)

    assert states == {"prewarm": "success", "deploy": "success", "cleanup": "success"}, states
    second = _xcom(deployment, DAG_ID, run_id, "prewarm", "prewarm_task_id")
    assert second not in (first, "pwt-decoy-retry")  # the clear prewarmed the tag again
    assert _posts(emulator) == posts + 2
    assert _ti(deployment, DAG_ID, run_id, "prewarm")["try_number"] == 2
    remaining = {t["task_id"] for t in emulator.control.tasks()}
    assert "pwt-decoy-retry" in remaining and second not in remaining  # each cleanup deleted its own only
    emulator.control.reset()


def test_a_retry_after_a_lost_create_answer_does_not_create_twice(deployment: Deployment, emulator: Any) -> None:
    posts = _posts(emulator)
    # The create is served but its answer trickles out slower than the connection's timeout (10 s): lost.
    emulator.control.inject_fault("trickle", method="POST", path_prefix=TASKS, interval=30)
    run_id, _ = _trigger(deployment, DAG_ID)

    # Once the task exists, the lookup that follows the lost answer fails too, so the try fails. (Every list
    # fails meanwhile: the event-driven example's watcher polls the same endpoint, patiently.)
    deployment.wait_for(lambda: _creates(emulator), 120, "the create to reach the emulator")
    emulator.control.inject_fault("status", count=None, method="GET", path_prefix=TASKS, status=503)
    retried = deployment.wait_for(
        lambda: _ti(deployment, DAG_ID, run_id, "prewarm")["state"] in ("up_for_retry", "failed", "success"),
        120,
        "the first try to fail",
    )
    emulator.control.clear_faults()
    assert retried
    states = _wait_for_run(deployment, DAG_ID, run_id)

    assert states == {"prewarm": "success", "deploy": "success", "cleanup": "success"}, states
    assert _ti(deployment, DAG_ID, run_id, "prewarm")["try_number"] == 2  # Airflow retried the create
    assert _posts(emulator) == posts + 1  # and the retry found the prewarm instead of creating another
    assert emulator.control.tasks() == []  # which the cleanup deleted
    emulator.control.reset()


def test_a_reuse_runs_cleanup_deletes_nothing_of_the_other_run_after_a_clear(
    deployment: Deployment, emulator: Any
) -> None:
    emulator.control.seed_task(task_id="pwt-other-run", image=PINNED, region_id="region-a", state="succeeded")
    posts, deletes = _posts(emulator), _deletes(emulator)
    run_id, logical = _trigger(deployment, REUSE_DAG_ID)
    states = _wait_for_run(deployment, REUSE_DAG_ID, run_id)
    assert states == {"prewarm": "success", "deploy": "success", "cleanup": "success"}, states

    _clear(deployment, REUSE_DAG_ID, logical)
    states = _wait_for_run(deployment, REUSE_DAG_ID, run_id)

    assert states == {"prewarm": "success", "deploy": "success", "cleanup": "success"}, states
    result = _xcom(deployment, REUSE_DAG_ID, run_id, "prewarm", "return_value")
    assert result["task_id"] == "pwt-other-run" and result["reused"] is True
    assert _xcom(deployment, REUSE_DAG_ID, run_id, "prewarm", "prewarm_task_id") == ""
    assert [t["task_id"] for t in emulator.control.tasks()] == ["pwt-other-run"]
    assert (_posts(emulator), _deletes(emulator)) == (posts, deletes)  # nothing created, nothing deleted
    emulator.control.reset()


def test_the_cleanup_succeeds_when_the_create_failed_before_creating(deployment: Deployment, emulator: Any) -> None:
    # A permanent refusal (400): the create fails at once, without retries, before any prewarm exists.
    emulator.control.inject_fault("status", count=None, method="POST", path_prefix=TASKS, status=400)
    run_id, _ = _trigger(deployment, DAG_ID)
    states = _wait_for_run(deployment, DAG_ID, run_id)

    assert states == {"prewarm": "failed", "deploy": "upstream_failed", "cleanup": "success"}, states
    assert _xcom(deployment, DAG_ID, run_id, "cleanup", "return_value") == {"deleted": [], "not_found": []}
    emulator.control.reset()


def test_marking_the_deferred_create_failed_leaves_its_prewarm_to_the_cleanup(
    deployment: Deployment, emulator: Any
) -> None:
    emulator.control.configure(pending_seconds=0.2, running_seconds=600)
    run_id, _ = _trigger(deployment, DAG_ID)

    def deferred() -> dict[str, Any] | None:
        ti = _ti(deployment, DAG_ID, run_id, "prewarm")
        if ti.get("state") in TERMINAL:
            raise AssertionError(f"the create ended {ti['state']} before it deferred")
        return ti if ti.get("state") == "deferred" and ti.get("triggerer_job") else None

    deployment.wait_for(deferred, RUN_TIMEOUT, "the create to be deferred to a triggerer")
    prewarm_id = _xcom(deployment, DAG_ID, run_id, "prewarm", "prewarm_task_id")
    assert [t["task_id"] for t in emulator.control.tasks()] == [prewarm_id]

    # What a user does in the UI: mark the deferred task failed. The trigger's on_kill deletes nothing (Airflow
    # 3.3.2 calls it on a triggerer hand-over too); the all_done cleanup deletes the prewarm once.
    deletes = _deletes(emulator)
    deployment.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/prewarm", json={"new_state": "failed"})
    states = _wait_for_run(deployment, DAG_ID, run_id)

    assert states == {"prewarm": "failed", "deploy": "upstream_failed", "cleanup": "success"}, states
    assert emulator.control.tasks() == []
    assert _deletes(emulator) == deletes + 1
    emulator.control.reset()
