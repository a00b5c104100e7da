"""The lifecycle calls of ``PPIOHook``: create, list, delete (requests-mock, no network)."""

from __future__ import annotations

from typing import Any

import pytest
import requests
import requests_mock as rm

from airflow_provider_ppio.exceptions import (
    PPIOBadResponseError,
    PPIOInvalidInputError,
    PPIOQuotaExceededError,
    PPIORateLimitError,
    PPIOServerError,
    PPIOTransportError,
)
from airflow_provider_ppio.hooks.ppio import DELETE_BATCH_SIZE, PPIOHook
from tests.conftest import API_KEY, task_json

TASKS = "https://api.ppio.test/gpus/v2/prewarm-tasks"
IMAGE = "registry.example.com/team/llama:1.0"


@pytest.fixture
def hook(ppio_conn: str) -> PPIOHook:
    return PPIOHook()


def page(tasks: list[dict[str, Any]], next_cursor: str = "", has_more: bool = False) -> dict[str, Any]:
    return {"data": tasks, "next_cursor": next_cursor, "has_more": has_more}


def posts(m: rm.Mocker) -> list[Any]:
    return [r for r in m.request_history if r.method == "POST"]


# -- create ----------------------------------------------------------------------------------------


def test_create_sends_json_body_and_returns_task_id(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    requests_mock.post(TASKS, json={"task_id": "pw-new"})

    task_id = hook.create_prewarm_task(
        IMAGE, "us-east-1", product_ids=["gpu-4090"], registry_auth_id="auth-1", note="for llama"
    )

    assert task_id == "pw-new"
    sent = requests_mock.last_request
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["Authorization"] == f"Bearer {API_KEY}"
    assert sent.json() == {
        "image": IMAGE,
        "region_id": "us-east-1",
        "product_ids": ["gpu-4090"],
        "registry_auth_id": "auth-1",
        "note": "for llama",
    }


def test_create_leaves_out_unset_optional_fields(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    requests_mock.post(TASKS, json={"task_id": "pw-new"})

    hook.create_prewarm_task(IMAGE, "us-east-1")

    assert requests_mock.last_request.json() == {"image": IMAGE, "region_id": "us-east-1"}


def test_create_accepts_id_instead_of_task_id(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    requests_mock.post(TASKS, json={"id": "pw-v1-style"})

    assert hook.create_prewarm_task(IMAGE, "us-east-1") == "pw-v1-style"


@pytest.mark.parametrize("answer", [{}, {"ok": True}, {"task_id": ""}], ids=["empty", "other-keys", "blank-id"])
def test_create_without_id_in_answer_finds_the_task_by_lookup(
    hook: PPIOHook, requests_mock: rm.Mocker, answer: dict[str, Any]
) -> None:
    requests_mock.post(TASKS, json=answer)
    requests_mock.get(
        TASKS,
        json=page(
            [
                task_json("pw-other-image", image="registry.example.com/other:1", note="mine", created_at=300),
                task_json("pw-old", image=IMAGE, note="mine", created_at=100),
                task_json("pw-newest", image=IMAGE, note="mine", created_at=200),
                task_json("pw-other-note", image=IMAGE, note="someone else's", created_at=400),
            ]
        ),
    )

    assert hook.create_prewarm_task(IMAGE, "us-east-1", note="mine") == "pw-newest"
    lookup = requests_mock.last_request
    assert lookup.method == "GET"
    assert lookup.qs["region_id"] == ["us-east-1"]
    assert lookup.qs["name"] == ["mine"]


def test_create_lookup_with_a_note_longer_than_the_name_filter(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    note = "n" * 300
    requests_mock.post(TASKS, json={})
    requests_mock.get(TASKS, json=page([task_json("pw-long", image=IMAGE, note=note)]))

    assert hook.create_prewarm_task(IMAGE, "us-east-1", note=note) == "pw-long"
    assert len(requests_mock.last_request.qs["name"][0]) == 255


def test_create_without_id_and_no_match_is_a_bad_response(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    requests_mock.post(TASKS, json={})
    requests_mock.get(TASKS, json=page([]))

    with pytest.raises(PPIOBadResponseError, match="no task id"):
        hook.create_prewarm_task(IMAGE, "us-east-1")


def test_create_is_not_resent_after_a_server_error(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    requests_mock.post(TASKS, [{"status_code": 502, "json": {"message": "bad gateway"}}, {"json": {"task_id": "x"}}])

    with pytest.raises(PPIOServerError):
        hook.create_prewarm_task(IMAGE, "us-east-1")
    assert len(posts(requests_mock)) == 1


def test_create_is_not_resent_after_a_read_timeout(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    requests_mock.post(TASKS, [{"exc": requests.exceptions.ReadTimeout}, {"json": {"task_id": "x"}}])

    with pytest.raises(PPIOTransportError) as caught:
        hook.create_prewarm_task(IMAGE, "us-east-1")
    assert caught.value.request_sent is True
    assert len(posts(requests_mock)) == 1


def test_create_is_retried_when_the_request_never_left(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    requests_mock.post(TASKS, [{"exc": requests.exceptions.ConnectTimeout}, {"json": {"task_id": "pw-2nd"}}])

    assert hook.create_prewarm_task(IMAGE, "us-east-1") == "pw-2nd"
    assert len(posts(requests_mock)) == 2


def test_create_is_retried_after_a_rate_limit(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    requests_mock.post(
        TASKS,
        [{"status_code": 429, "headers": {"Retry-After": "0"}, "json": {}}, {"json": {"task_id": "pw-ok"}}],
    )

    assert hook.create_prewarm_task(IMAGE, "us-east-1") == "pw-ok"
    assert len(posts(requests_mock)) == 2


def test_create_gives_up_on_a_lasting_rate_limit(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    requests_mock.post(TASKS, status_code=429, headers={"Retry-After": "0"}, json={"message": "slow down"})

    with pytest.raises(PPIORateLimitError):
        hook.create_prewarm_task(IMAGE, "us-east-1")
    assert len(posts(requests_mock)) == 5  # the default max_attempts


def test_quota_error_is_typed_and_says_what_to_do(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    requests_mock.post(
        TASKS,
        status_code=400,
        json={"code": 400, "reason": "PREWARM_TASK_QUOTA_EXCEEDED", "message": "prewarm task quota exceeded"},
    )

    with pytest.raises(PPIOQuotaExceededError) as caught:
        hook.create_prewarm_task(IMAGE, "us-east-1")
    text = str(caught.value)
    assert "5 by default" in text
    assert "delete finished ones" in text
    assert caught.value.api_reason == "PREWARM_TASK_QUOTA_EXCEEDED"
    assert len(posts(requests_mock)) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image": "", "region_id": "us-east-1"},
        {"image": IMAGE, "region_id": ""},
        {"image": IMAGE, "region_id": "r" * 256},
        {"image": IMAGE, "region_id": "us-east-1", "product_ids": "gpu-4090"},
    ],
    ids=["empty-image", "empty-region", "long-region", "products-as-string"],
)
def test_create_rejects_bad_arguments_before_any_request(
    hook: PPIOHook, requests_mock: rm.Mocker, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(PPIOInvalidInputError):
        hook.create_prewarm_task(**kwargs)
    assert requests_mock.call_count == 0


# -- list ------------------------------------------------------------------------------------------


def test_list_follows_the_cursor_across_pages(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    requests_mock.get(
        TASKS,
        [
            {"json": page([task_json("pw-1"), task_json("pw-2")], next_cursor="c1", has_more=True)},
            {"json": page([task_json("pw-3")], next_cursor="c2", has_more=True)},
            {"json": page([task_json("pw-4")])},
        ],
    )

    ids = [task.task_id for task in hook.list_prewarm_tasks(status="running", region_id="us-east-1", page_size=2)]

    assert ids == ["pw-1", "pw-2", "pw-3", "pw-4"]
    queries = [r.qs for r in requests_mock.request_history]
    assert queries[0] == {"status": ["running"], "region_id": ["us-east-1"], "limit": ["2"]}
    assert queries[1]["cursor"] == ["c1"]
    assert queries[2]["cursor"] == ["c2"]
    assert all(q["status"] == ["running"] and q["limit"] == ["2"] for q in queries)


def test_list_is_lazy(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    requests_mock.get(TASKS, json=page([task_json("pw-1")], next_cursor="c1", has_more=True))

    first = next(iter(hook.list_prewarm_tasks()))

    assert first.task_id == "pw-1"
    assert requests_mock.call_count == 1


def test_list_stops_on_an_empty_cursor_even_if_has_more(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    requests_mock.get(TASKS, json=page([task_json("pw-1")], next_cursor="", has_more=True))

    assert [t.task_id for t in hook.list_prewarm_tasks()] == ["pw-1"]
    assert requests_mock.call_count == 1


def test_list_refuses_a_cursor_loop(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    requests_mock.get(TASKS, json=page([task_json("pw-1")], next_cursor="same", has_more=True))

    with pytest.raises(PPIOBadResponseError, match="twice"):
        list(hook.list_prewarm_tasks())


def test_list_passes_the_name_filter(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    requests_mock.get(TASKS, json=page([]))

    assert list(hook.list_prewarm_tasks(name="llama")) == []
    assert requests_mock.last_request.qs["name"] == ["llama"]


@pytest.mark.parametrize(
    "kwargs",
    [{"status": "done"}, {"page_size": 0}, {"page_size": 1001}, {"name": "x" * 256}],
    ids=["unknown-status", "zero-page", "huge-page", "long-name"],
)
def test_list_rejects_bad_filters_before_any_request(
    hook: PPIOHook, requests_mock: rm.Mocker, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(PPIOInvalidInputError):
        list(hook.list_prewarm_tasks(**kwargs))
    assert requests_mock.call_count == 0


# -- delete ----------------------------------------------------------------------------------------


def test_delete_sends_the_ids_as_a_json_body(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    requests_mock.delete(TASKS, json={})

    hook.delete_prewarm_tasks(["pw-1", "pw-2"])

    sent = requests_mock.last_request
    assert sent.method == "DELETE"
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.json() == {"task_ids": ["pw-1", "pw-2"]}


def test_delete_accepts_an_empty_answer(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    requests_mock.delete(TASKS, text="")

    hook.delete_prewarm_tasks(["pw-1"])
    assert requests_mock.call_count == 1


def test_delete_splits_large_lists_into_batches(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    requests_mock.delete(TASKS, json={})
    ids = [f"pw-{n}" for n in range(DELETE_BATCH_SIZE + 5)]

    hook.delete_prewarm_tasks(ids)

    batches = [r.json()["task_ids"] for r in requests_mock.request_history]
    assert [len(b) for b in batches] == [DELETE_BATCH_SIZE, 5]
    assert [i for b in batches for i in b] == ids


def test_delete_of_nothing_sends_nothing(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    hook.delete_prewarm_tasks([])
    assert requests_mock.call_count == 0


@pytest.mark.parametrize("ids", ["pw-1", ["pw-1", ""], ["..", "pw-2"], ["x" * 256]])
def test_delete_rejects_bad_ids_before_any_request(hook: PPIOHook, requests_mock: rm.Mocker, ids: Any) -> None:
    with pytest.raises(PPIOInvalidInputError):
        hook.delete_prewarm_tasks(ids)
    assert requests_mock.call_count == 0


def test_delete_is_retried_after_a_server_error(hook: PPIOHook, requests_mock: rm.Mocker) -> None:
    requests_mock.delete(TASKS, [{"status_code": 503, "json": {}}, {"json": {}}])

    hook.delete_prewarm_tasks(["pw-1"])
    assert requests_mock.call_count == 2
