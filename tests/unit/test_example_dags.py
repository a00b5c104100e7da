"""Every DAG in example_dags/ loads with no import errors, and the gate example is wired as documented."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

EXAMPLE_DAGS = Path(__file__).resolve().parents[2] / "example_dags"
#: Examples of Airflow 3 features (event-driven scheduling): on Airflow 2 they define no DAG.
AIRFLOW_3_ONLY = {"example_ppio_event_driven_deploy.py"}
_DEFINES_A_DAG = re.compile(r"\bDAG\(|@dag\b")


@pytest.fixture(scope="module")
def dagbag() -> Any:
    try:
        from airflow.dag_processing.dagbag import DagBag  # Airflow 3
    except ImportError:
        from airflow.models.dagbag import DagBag  # Airflow 2

    # Examples shipped with Airflow are off (AIRFLOW__CORE__LOAD_EXAMPLES=False in conftest).
    return DagBag(dag_folder=str(EXAMPLE_DAGS))


def _airflow_major() -> int:
    import airflow

    return int(airflow.__version__.split(".", 1)[0])


def dag_files() -> list[Path]:
    return sorted(
        path
        for path in EXAMPLE_DAGS.rglob("*.py")
        if _DEFINES_A_DAG.search(path.read_text()) and (_airflow_major() >= 3 or path.name not in AIRFLOW_3_ONLY)
    )


def test_example_dags_import_without_errors(dagbag: Any) -> None:
    assert dagbag.import_errors == {}


def test_every_dag_file_yields_a_dag(dagbag: Any) -> None:
    files = dag_files()
    assert files, f"no DAG files found in {EXAMPLE_DAGS}"
    loaded_from = {Path(dag.fileloc).resolve() for dag in dagbag.dags.values()}
    assert {path.resolve() for path in files} <= loaded_from


def test_no_example_dag_is_airflow_s_own(dagbag: Any) -> None:
    assert all(Path(dag.fileloc).resolve().is_relative_to(EXAMPLE_DAGS) for dag in dagbag.dags.values())


def test_prewarm_gate_example_is_wired_as_documented(dagbag: Any) -> None:
    dag = dagbag.dags["example_ppio_prewarm_gate"]
    assert {task.task_id for task in dag.tasks} == {"wait_for_prewarm", "get_prewarm_details", "deploy"}
    sensor = dag.get_task("wait_for_prewarm")
    assert sensor.downstream_task_ids == {"get_prewarm_details"}
    assert dag.get_task("get_prewarm_details").downstream_task_ids == {"deploy"}
    assert sensor.prewarm_task_id == "{{ params.prewarm_task_id }}"
    assert "prewarm_task_id" in dag.params


def test_prewarm_gate_example_renders_its_task_id_from_params(dagbag: Any) -> None:
    dag = dagbag.dags["example_ppio_prewarm_gate"]
    sensor = copy.deepcopy(dag.get_task("wait_for_prewarm"))  # keep the shared DagBag's task unrendered
    sensor.render_template_fields({"params": {"prewarm_task_id": "pw-from-trigger"}})
    assert sensor.prewarm_task_id == "pw-from-trigger"


def test_event_driven_example_is_wired_as_documented(dagbag: Any) -> None:
    if _airflow_major() < 3:
        assert not any(Path(dag.fileloc).name in AIRFLOW_3_ONLY for dag in dagbag.dags.values())
        return
    from airflow_provider_ppio.triggers.prewarm_events import PrewarmTaskEventTrigger

    dag = dagbag.dags["example_ppio_event_driven_deploy"]
    assert {task.task_id for task in dag.tasks} == {"prewarmed", "deploy"}
    (asset,) = dag.timetable.asset_condition.objects
    assert asset.uri == "ppio://prewarm/region-a/registry.example.com/acme/inference-api:2.3"
    (watcher,) = asset.watchers
    assert isinstance(watcher.trigger, PrewarmTaskEventTrigger)
    assert (watcher.trigger.image, watcher.trigger.region_id) == (
        "registry.example.com/acme/inference-api:2.3",
        "region-a",
    )
    assert watcher.trigger.statuses == ("succeeded",)
