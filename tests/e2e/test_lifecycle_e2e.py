"""
The multi-region lifecycle example, run for real with ``airflow dags test`` against the emulator over HTTP.

What a user would see: one prewarm per region, a deploy with every region's details, asset events carrying
the prewarm details, a teardown that deletes the prewarm tasks; and a task that fails mid-wait and is
retried by Airflow does not start a second prewarm (it finds its prewarm by the marker in the note).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from airflow import __version__ as AIRFLOW_VERSION
from dagtest_runner import (
    DB_NAME,
    E2E_API_KEY,
    EXAMPLE_DAGS,
    DagRunResult,
    DagTestRunner,
    airflow_command,
    airflow_env,
    new_home,
    ppio_connection,
    run_dag_test,
)
from packaging.version import Version

from airflow_provider_ppio.assets import prewarm_asset_uri

DAG_ID = "example_ppio_multi_region"
IMAGE = "registry.example.com/acme/llm-server:1.4"
#: The example's regions: eight, more than the emulator's quota of 5 (``dags test`` runs them one by one here;
#: tests/e2e/test_quota_fanout_e2e.py runs them at once).
REGIONS = [f"region-{letter}" for letter in "abcdefgh"]
TASKS = "/gpus/v2/prewarm-tasks"
AF3 = Version(AIRFLOW_VERSION).major >= 3


def query(result: DagRunResult, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{result.home / DB_NAME}?mode=ro", uri=True)) as conn:
        return conn.execute(sql, args).fetchall()


def mapped_states(result: DagRunResult, task_id: str) -> dict[int, str]:
    rows = query(
        result,
        "SELECT map_index, state FROM task_instance WHERE dag_id = ? AND run_id = ? AND task_id = ?",
        result.dag_id,
        result.run_id,
        task_id,
    )
    return {index: state for index, state in rows}


def asset_events(result: DagRunResult) -> dict[str, dict[str, Any]]:
    """URI -> extra of the asset (dataset) events the run recorded."""
    if AF3:
        sql = "SELECT a.uri, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id"
    else:
        sql = "SELECT d.uri, e.extra FROM dataset_event e JOIN dataset d ON d.id = e.dataset_id"
    events: dict[str, dict[str, Any]] = {}
    for uri, extra in query(result, sql):
        raw = bytes(extra).decode() if isinstance(extra, bytes | memoryview) else extra
        events[uri] = json.loads(raw) if isinstance(raw, str) else dict(raw or {})
    return events


def run_synced(
    dag_test: DagTestRunner,
    workdir: Path,
    dag_id: str,
    conf: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> DagRunResult:
    """
    ``dag_test.run``, but with the DAGs written to the database first on Airflow 2.

    Airflow 2.11's ``dags test`` does not sync DAGs, so the dataset alias of the example is unknown and no
    dataset event is recorded; a deployment's DAG processor does sync them, as ``dags reserialize`` does here.
    """
    if AF3:
        return dag_test.run(dag_id, conf, env=env)
    home = new_home(workdir / "airflow-home-synced", template=dag_test.template)
    run_env = ppio_connection(dag_test.emulator.base_url, dag_test.emulator.api_key)
    run_env.update(env or {})
    done = subprocess.run(
        airflow_command("dags", "reserialize"),
        env=airflow_env(home, dags_folder=EXAMPLE_DAGS, extra=run_env),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return run_dag_test(home, dag_id, conf=conf, env=run_env)


def requests_of(emulator: Any, method: str, path: str = TASKS) -> list[dict[str, Any]]:
    return [e for e in emulator.control.requests_log() if e["method"] == method and e["path"] == path]


@pytest.mark.parametrize("deferrable", [False, True], ids=["worker", "deferrable"])
def test_multi_region_example_prewarms_deploys_emits_assets_and_cleans_up(
    dag_test: DagTestRunner, tmp_path: Path, deferrable: bool
) -> None:
    emulator = dag_test.emulator
    env = {"AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": str(deferrable)}

    result = run_synced(dag_test, tmp_path, DAG_ID, {"image": IMAGE}, env=env)

    assert result.returncode == 0, result.describe()
    assert mapped_states(result, "prewarm") == dict.fromkeys(range(len(REGIONS)), "success"), result.describe()
    assert result.task_states["deploy"] == "success", result.describe()
    assert result.task_states["cleanup"] == "success", result.describe()

    created = requests_of(emulator, "POST")
    assert sorted(entry["json"]["region_id"] for entry in created) == REGIONS
    assert all(entry["json"]["image"] == IMAGE for entry in created)

    messages = result.xcom("deploy")
    assert len(messages) == len(REGIONS)
    assert {m.split(" to ")[1].split(" ")[0] for m in messages} == set(REGIONS)

    deleted = requests_of(emulator, "DELETE")
    assert len(deleted) == 1
    assert len(deleted[0]["json"]["task_ids"]) == len(REGIONS)
    assert emulator.control.tasks() == []  # the teardown removed every prewarm task
    assert sorted(result.xcom("cleanup")["deleted"]) == sorted(deleted[0]["json"]["task_ids"])

    events = asset_events(result)
    for region in REGIONS:
        extra = events[prewarm_asset_uri(region, IMAGE)]
        assert extra["region_id"] == region
        assert extra["image"] == IMAGE
        assert extra["task_id"] in deleted[0]["json"]["task_ids"]
        assert extra["completed_at"] > 0
        assert extra["image_size"] > 0
    assert result.secret_leaks(E2E_API_KEY) == []


@pytest.mark.skipif(AF3, reason="Airflow 3's dags test syncs the DAG itself")
def test_multi_region_example_runs_under_plain_dags_test_on_airflow_2(dag_test: DagTestRunner) -> None:
    result = dag_test.run(DAG_ID, {"image": IMAGE})

    assert result.returncode == 0, result.describe()
    assert mapped_states(result, "prewarm") == dict.fromkeys(range(len(REGIONS)), "success"), result.describe()
    assert "is not in the metadata database" in result.logs
    assert dag_test.emulator.control.tasks() == []


RETRY_DAG = """
import datetime

from airflow.providers.common.compat.sdk import DAG

from airflow_provider_ppio.operators.prewarm import PPIOCreatePrewarmTaskOperator

with DAG(dag_id="lifecycle_retry", schedule=None, start_date=datetime.datetime(2026, 1, 1), catchup=False):
    PPIOCreatePrewarmTaskOperator.partial(
        task_id="prewarm",
        image="{image}",
        poke_interval=1,
        retries=3,
        retry_delay=datetime.timedelta(seconds=1),
    ).expand(region_id={regions!r})
"""


def test_a_task_retried_after_failing_mid_wait_starts_no_second_prewarm(
    dag_test: DagTestRunner, tmp_path: Path
) -> None:
    emulator = dag_test.emulator
    regions = REGIONS[:2]
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "lifecycle_retry.py").write_text(textwrap.dedent(RETRY_DAG.format(image=IMAGE, regions=regions)))
    # The first read of each new prewarm task is unusable (an error a task retry may cure): each mapped task
    # fails after creating its prewarm, and Airflow retries it.
    emulator.control.inject_fault("malformed_json", count=len(regions), method="GET", path_prefix=TASKS + "/")

    result = dag_test.run("lifecycle_retry", dags_folder=dags)

    assert result.returncode == 0, result.describe()
    assert mapped_states(result, "prewarm") == dict.fromkeys(range(len(regions)), "success"), result.describe()
    tries = query(result, "SELECT map_index, try_number FROM task_instance WHERE dag_id = 'lifecycle_retry'")
    assert all(try_number >= 2 for _, try_number in tries), tries  # every region was retried
    for region in regions:
        assert len([t for t in emulator.control.tasks() if t["region_id"] == region]) == 1, region
    assert len(requests_of(emulator, "POST")) == len(regions)
    assert "started by an earlier try of this task" in result.logs, result.describe()


PINNED = "registry.example.com/acme/llm-server@sha256:" + "4" * 64


def test_the_cleanup_of_a_reusing_create_resolves_an_empty_id_and_deletes_nothing(
    dag_test: DagTestRunner, tmp_path: Path
) -> None:
    # Airflow resolves create.output["prewarm_task_id"] itself (an XComArg): "" on every line, never XComNotFound.
    emulator = dag_test.emulator
    emulator.control.seed_task(task_id="pwt-other-run", image=PINNED, region_id="region-a", state="succeeded")

    result = run_synced(dag_test, tmp_path, "example_ppio_lifecycle_reuse", None)

    assert result.task_states == {"prewarm": "success", "deploy": "success", "cleanup": "success"}, result.describe()
    assert result.xcom("prewarm", "prewarm_task_id") == ""
    assert result.xcom("prewarm")["reused"] is True
    assert result.xcom("cleanup") == {"deleted": [], "not_found": []}
    assert [t["task_id"] for t in emulator.control.tasks()] == ["pwt-other-run"]
    assert requests_of(emulator, "DELETE") == [] and requests_of(emulator, "POST") == []


def test_the_cleanup_succeeds_when_the_create_failed_before_creating(dag_test: DagTestRunner, tmp_path: Path) -> None:
    emulator = dag_test.emulator
    emulator.control.inject_fault("status", count=None, method="POST", path_prefix=TASKS, status=400)

    result = run_synced(dag_test, tmp_path, "example_ppio_lifecycle", None)

    assert result.task_states["prewarm"] == "failed", result.describe()
    assert result.task_states["cleanup"] == "success", result.describe()
    assert result.xcom("cleanup") == {"deleted": [], "not_found": []}
