"""PPIOGetPrewarmTaskOperator: returns the task as a JSON dict."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from typing import Any

import pytest
import requests_mock as rm
from airflow.providers.common.compat.sdk import DAG

from airflow_provider_ppio.exceptions import PPIONotFoundError
from airflow_provider_ppio.operators.prewarm import PPIOGetPrewarmTaskOperator

TASKS = "/gpus/v2/prewarm-tasks"
MakeTask = Callable[..., dict[str, Any]]


@pytest.mark.parametrize("status", ["pending", "running", "succeeded", "failed", "brand_new_state"])
def test_execute_returns_the_task_as_plain_json(
    ppio_conn: str, requests_mock: rm.Mocker, make_task: MakeTask, status: str
) -> None:
    requests_mock.get(f"{ppio_conn}{TASKS}/pw-7", json=make_task("pw-7", status, extra_field=[1, 2]))
    result = PPIOGetPrewarmTaskOperator(task_id="get", prewarm_task_id="pw-7").execute({})
    assert isinstance(result, dict)
    assert json.loads(json.dumps(result)) == result
    assert result["task_id"] == "pw-7"
    assert result["status"]["status"] == status
    assert result["image"] == "registry.example.com/team/llama:1.0"
    assert result["extra_field"] == [1, 2]


def test_execute_fills_defaults_for_missing_fields(ppio_conn: str, requests_mock: rm.Mocker) -> None:
    requests_mock.get(f"{ppio_conn}{TASKS}/pw-7", json={"task_id": "pw-7", "status": {"status": "running"}})
    result = PPIOGetPrewarmTaskOperator(task_id="get", prewarm_task_id="pw-7").execute({})
    assert result["image"] == ""
    assert result["reason"] == []
    assert result["status"] == {"status": "running", "error": "", "message": ""}


def test_execute_raises_typed_errors(ppio_conn: str, requests_mock: rm.Mocker) -> None:
    requests_mock.get(f"{ppio_conn}{TASKS}/nope", status_code=404, json={"message": "task not found"})
    with pytest.raises(PPIONotFoundError, match="task not found"):
        PPIOGetPrewarmTaskOperator(task_id="get", prewarm_task_id="nope").execute({})


def test_operator_uses_its_connection(
    set_conn: Callable[..., None], requests_mock: rm.Mocker, make_task: MakeTask
) -> None:
    set_conn("ppio_novita", host="https://api.novita.ai")
    requests_mock.get(f"https://api.novita.ai{TASKS}/pw-7", json=make_task("pw-7"))
    operator = PPIOGetPrewarmTaskOperator(task_id="get", prewarm_task_id="pw-7", ppio_conn_id="ppio_novita")
    assert operator.execute({})["task_id"] == "pw-7"


def test_template_fields_render_from_params() -> None:
    with DAG(
        dag_id="operator_templates",
        schedule=None,
        start_date=datetime.datetime(2026, 1, 1),
        params={"prewarm_task_id": "pw-param", "conn": "ppio_other"},
    ) as dag:
        operator = PPIOGetPrewarmTaskOperator(
            task_id="get", prewarm_task_id="{{ params.prewarm_task_id }}", ppio_conn_id="{{ params.conn }}"
        )
    assert set(PPIOGetPrewarmTaskOperator.template_fields) == {"prewarm_task_id", "ppio_conn_id"}
    operator.render_template_fields({"params": dag.params})
    assert (operator.prewarm_task_id, operator.ppio_conn_id) == ("pw-param", "ppio_other")
