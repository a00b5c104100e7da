"""Parsing prewarm tasks and deciding what a status means."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from airflow_provider_ppio.exceptions import PPIOBadResponseError, PPIOInvalidInputError
from airflow_provider_ppio.models import (
    CreatePrewarmTaskRequest,
    ListPrewarmTasksQuery,
    Outcome,
    PrewarmTask,
    PrewarmTaskPage,
    PrewarmTaskState,
    created_task_id,
    decide,
)


@pytest.mark.parametrize(
    ("status", "state", "outcome"),
    [
        ("pending", PrewarmTaskState.PENDING, Outcome.WAITING),
        ("running", PrewarmTaskState.RUNNING, Outcome.WAITING),
        ("succeeded", PrewarmTaskState.SUCCEEDED, Outcome.SUCCEEDED),
        ("failed", PrewarmTaskState.FAILED, Outcome.FAILED),
        ("SUCCEEDED", PrewarmTaskState.SUCCEEDED, Outcome.SUCCEEDED),
        ("Failed", PrewarmTaskState.FAILED, Outcome.FAILED),
        (" Running ", PrewarmTaskState.RUNNING, Outcome.WAITING),
        ("PENDING", PrewarmTaskState.PENDING, Outcome.WAITING),
        ("cancelled", None, Outcome.WAITING),
        ("success", None, Outcome.WAITING),
        ("", None, Outcome.WAITING),
    ],
)
def test_every_status_maps_to_state_and_outcome(
    status: str, state: PrewarmTaskState | None, outcome: Outcome, make_task: Callable[..., dict[str, Any]]
) -> None:
    task = PrewarmTask.from_api(make_task(status=status))
    assert task.state is state
    assert task.outcome is outcome
    assert decide(task) is outcome
    # The value the API sent is kept as it came (for logs), whatever it means.
    assert task.status.status == status


def test_unknown_status_is_kept_and_not_terminal(make_task: Callable[..., dict[str, Any]]) -> None:
    task = PrewarmTask.from_api(make_task(status="paused_by_operator"))
    assert task.state is None
    assert task.outcome is Outcome.WAITING
    assert task.to_xcom()["status"]["status"] == "paused_by_operator"


def test_extra_fields_are_kept_in_the_model_and_the_xcom(make_task: Callable[..., dict[str, Any]]) -> None:
    payload = make_task(gpu_nodes=3)
    payload["status"]["progress"] = 0.5
    task = PrewarmTask.from_api(payload)
    xcom = task.to_xcom()
    assert xcom["gpu_nodes"] == 3
    assert xcom["status"]["progress"] == 0.5


def test_nulls_become_defaults(make_task: Callable[..., dict[str, Any]]) -> None:
    payload = make_task(
        name=None,
        image=None,
        region_id=None,
        product_ids=None,
        image_size=None,
        created_at=None,
        completed_at=None,
        registry_auth_id=None,
        note=None,
        reason=None,
    )
    payload["status"] = {"status": "failed", "error": None, "message": None}
    task = PrewarmTask.from_api(payload)
    assert (task.name, task.image, task.region_id, task.note, task.registry_auth_id) == ("", "", "", "", "")
    assert task.product_ids == []
    assert task.reason == []
    assert (task.image_size, task.created_at, task.completed_at) == (0, 0, 0)
    assert (task.status.error, task.status.message) == ("", "")
    assert task.outcome is Outcome.FAILED


def test_only_task_id_and_status_are_required() -> None:
    task = PrewarmTask.from_api({"task_id": "pw-1", "status": {"status": "succeeded"}})
    assert task.task_id == "pw-1"
    assert task.outcome is Outcome.SUCCEEDED
    assert task.image == ""
    assert task.reasons == []


def test_reason_and_product_ids_given_as_one_string_become_lists(make_task: Callable[..., dict[str, Any]]) -> None:
    task = PrewarmTask.from_api(make_task(status="failed", reason="image not found", product_ids="gpu-4090"))
    assert task.reason == ["image not found"]
    assert task.product_ids == ["gpu-4090"]


def test_blank_reasons_are_dropped(make_task: Callable[..., dict[str, Any]]) -> None:
    task = PrewarmTask.from_api(make_task(status="failed", reason=["", "  ", "disk full"]))
    assert task.reasons == ["disk full"]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"status": {"status": "running"}}, "task_id"),
        ({"task_id": "pw-1"}, "status"),
        ({"task_id": "pw-1", "status": {}}, "status.status"),
        ({"task_id": "pw-1", "status": "running"}, "status"),
        ({"task_id": 123, "status": {"status": "running"}}, "task_id"),
        ({"task_id": "pw-1", "status": {"status": ["running"]}}, "status.status"),
        ({"task_id": "pw-1", "status": {"status": "running"}, "image_size": "huge"}, "image_size"),
        ({"task_id": "pw-1", "status": {"status": "running"}, "created_at": {"t": 1}}, "created_at"),
        ({"task_id": "pw-1", "status": {"status": "running"}, "reason": [1, 2]}, "reason"),
        ({"task_id": "pw-1", "status": {"status": "running"}, "image": ["a"]}, "image"),
    ],
)
def test_wrong_shapes_raise_bad_response_naming_the_field(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(PPIOBadResponseError) as info:
        PrewarmTask.from_api(payload)
    assert field in str(info.value)


@pytest.mark.parametrize("payload", [[{"task_id": "pw-1", "status": {"status": "running"}}], "running", None, 42])
def test_non_object_bodies_raise_bad_response(payload: Any) -> None:
    with pytest.raises(PPIOBadResponseError, match="JSON object"):
        PrewarmTask.from_api(payload)


def test_bad_response_message_does_not_echo_values() -> None:
    with pytest.raises(PPIOBadResponseError) as info:
        PrewarmTask.from_api({"task_id": "pw-1", "status": {"status": "ok"}, "image_size": "SECRET-LOOKING-VALUE"})
    assert "SECRET-LOOKING-VALUE" not in str(info.value)


def test_failure_summary_holds_id_error_message_and_reasons(make_task: Callable[..., dict[str, Any]]) -> None:
    task = PrewarmTask.from_api(
        make_task(
            "pw-9",
            "failed",
            error="IMAGE_PULL_FAILED",
            message="pull access denied",
            reason=["manifest unknown", "node gpu-7 offline"],
        )
    )
    summary = task.failure_summary()
    for part in ("pw-9", "IMAGE_PULL_FAILED", "pull access denied", "manifest unknown", "node gpu-7 offline"):
        assert part in summary


def test_failure_summary_without_details_still_names_the_task() -> None:
    summary = PrewarmTask.from_api({"task_id": "pw-bare", "status": {"status": "failed"}}).failure_summary()
    assert "pw-bare" in summary
    assert "error:" not in summary
    assert "reasons:" not in summary


def test_to_xcom_is_plain_json(make_task: Callable[..., dict[str, Any]]) -> None:
    task = PrewarmTask.from_api(make_task(status="succeeded", completed_at=1767229200, extra_field={"a": [1]}))
    xcom = task.to_xcom()
    assert json.loads(json.dumps(xcom)) == xcom
    assert xcom["task_id"] == "pw-123"
    assert xcom["image"] == "registry.example.com/team/llama:1.0"
    assert xcom["status"] == {"status": "succeeded", "error": "", "message": ""}
    assert xcom["extra_field"] == {"a": [1]}


def test_page_parses_tasks_and_cursor(make_task: Callable[..., dict[str, Any]]) -> None:
    page = PrewarmTaskPage.from_api({"data": [make_task("a"), make_task("b")], "next_cursor": "c2", "has_more": True})
    assert [task.task_id for task in page.data] == ["a", "b"]
    assert (page.next_cursor, page.has_more) == ("c2", True)
    assert PrewarmTaskPage.from_api({"data": None, "next_cursor": None}).data == []


def test_page_with_a_bad_task_names_the_field(make_task: Callable[..., dict[str, Any]]) -> None:
    with pytest.raises(PPIOBadResponseError, match=r"data\.0\.task_id"):
        PrewarmTaskPage.from_api({"data": [{"status": {"status": "running"}}]})
    with pytest.raises(PPIOBadResponseError):
        PrewarmTaskPage.from_api([make_task()])


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ({"task_id": "pw-new"}, "pw-new"),
        ({"id": "pw-new"}, "pw-new"),
        ({"task_id": "", "id": "pw-id"}, "pw-id"),
        ({}, None),
        ({"task_id": 5}, None),
        ([], None),
        (None, None),
    ],
)
def test_created_task_id(answer: Any, expected: str | None) -> None:
    assert created_task_id(answer) == expected


def test_create_request_checks_arguments() -> None:
    body = CreatePrewarmTaskRequest.build(image="img:1", region_id="r1", product_ids=("p1",))
    assert body.model_dump(exclude_none=True) == {"image": "img:1", "region_id": "r1", "product_ids": ["p1"]}
    with pytest.raises(PPIOInvalidInputError, match="image"):
        CreatePrewarmTaskRequest.build(image="", region_id="r1")
    with pytest.raises(PPIOInvalidInputError, match="region_id"):
        CreatePrewarmTaskRequest.build(image="img", region_id="r" * 256)
    with pytest.raises(PPIOInvalidInputError, match="product_ids"):
        CreatePrewarmTaskRequest.build(image="img", region_id="r1", product_ids="p1")


def test_list_query_checks_arguments() -> None:
    query = ListPrewarmTasksQuery.build(status="running", region_id=None, name=None, limit=10)
    assert query.model_dump(exclude_none=True) == {"status": "running", "limit": 10}
    with pytest.raises(PPIOInvalidInputError, match="status"):
        ListPrewarmTasksQuery.build(status="done", region_id=None, name=None, limit=10)
    with pytest.raises(PPIOInvalidInputError, match="limit"):
        ListPrewarmTasksQuery.build(status=None, region_id=None, name=None, limit=0)
