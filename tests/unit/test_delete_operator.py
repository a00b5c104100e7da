"""
The delete operator's input rules and report (issue 11): a rendered list is read as a list, anything that is not
an id is refused before any request, and the result says what was deleted and what the API did not know.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import requests_mock as rm
from airflow import __version__ as AIRFLOW_VERSION
from packaging.version import Version

from airflow_provider_ppio.exceptions import PPIOInvalidInputError, PPIONotFoundError
from airflow_provider_ppio.operators.prewarm import PPIODeletePrewarmTasksOperator, collect_prewarm_task_ids
from tests.conftest import task_json

TASKS = "https://api.ppio.test/gpus/v2/prewarm-tasks"
ONE_TASK = re.compile(re.escape(TASKS) + r"/(?P<id>[^/?]+)$")

# Nothing here waits on real time: a hang is a bug, fail fast.
pytestmark = pytest.mark.timeout(60)


class DeleteAPI:
    """
    The delete endpoint and the read of one task, over a set of known ids.

    :param m: The requests-mock mocker to register on.
    :param known: The ids that exist.
    :param unknown_batch: What a batch delete holding an unknown id does: ``"404"`` or ``"ignore"``.
    """

    def __init__(self, m: rm.Mocker, known: set[str], unknown_batch: str = "404") -> None:
        self.m = m
        self.known = set(known)
        self.unknown_batch = unknown_batch
        m.delete(TASKS, json=self._delete)
        m.get(ONE_TASK, json=self._get)

    def _delete(self, request: Any, context: Any) -> dict[str, Any]:
        ids = request.json()["task_ids"]
        if set(ids) - self.known and self.unknown_batch == "404":
            context.status_code = 404
            return {"message": "prewarm task not found"}
        self.known -= set(ids)
        return {}

    def _get(self, request: Any, context: Any) -> dict[str, Any]:
        task_id = ONE_TASK.match(request.url).group("id")  # type: ignore[union-attr]
        if task_id not in self.known:
            context.status_code = 404
            return {"message": "not found"}
        return task_json(task_id, "succeeded")

    def delete_bodies(self) -> list[Any]:
        return [r.json() for r in self.m.request_history if r.method == "DELETE"]


@pytest.fixture
def api(ppio_conn: str, requests_mock: rm.Mocker) -> DeleteAPI:
    return DeleteAPI(requests_mock, {"pw-a", "pw-b", "pw-c"})


def delete_op(ids: Any, **kwargs: Any) -> PPIODeletePrewarmTasksOperator:
    return PPIODeletePrewarmTasksOperator(task_id="cleanup", prewarm_task_ids=ids, **kwargs)


def run(ids: Any, **kwargs: Any) -> Any:
    return delete_op(ids, **kwargs).execute({})


DETAILS = [task_json("pw-a", "succeeded"), task_json("pw-b", "running")]


@contextlib.contextmanager
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[list[tuple[str, str]]]:
    """
    ``(levelname, message)`` of what is logged inside the block, at INFO and above.

    Airflow 2 logs through the standard library (``caplog``); Airflow 3 through structlog, whose events
    ``structlog.testing.capture_logs`` collects with their level.
    """
    entries: list[tuple[str, str]] = []
    caplog.set_level(logging.INFO)
    with contextlib.ExitStack() as stack:
        events: list[Any] = []
        if Version(AIRFLOW_VERSION).major >= 3:
            import structlog.testing

            events = stack.enter_context(structlog.testing.capture_logs())
        yield entries
    entries.extend((r.levelname, r.getMessage()) for r in caplog.records)
    entries.extend((str(e["log_level"]).upper(), str(e["event"])) for e in events)
    # Airflow 3 warns that execute() runs outside its task runner, as every unit test of an operator does.
    entries[:] = [(level, message) for level, message in entries if "outside of the Task Runner" not in message]


# -- a rendered list is read as the list ------------------------------------------------------------------


@pytest.mark.parametrize(
    "rendered",
    [
        json.dumps(["pw-a", "pw-b"]),
        str(["pw-a", "pw-b"]),  # what Jinja renders for a list without render_template_as_native_obj
        json.dumps(DETAILS),
        str(DETAILS),  # a rendered xcom_pull of the details dicts: Python literals True/None inside
        str(("pw-a", "pw-b")),
        "  ['pw-a', None, 'pw-a', '', 'pw-b']\n",  # surrounding whitespace, empties and duplicates
        [str(["pw-a"]), "pw-b"],  # Airflow renders each element of a templated list on its own
    ],
    ids=["json-ids", "python-ids", "json-details", "python-details", "tuple", "messy", "list-of-rendered"],
)
def test_a_rendered_list_deletes_its_ids(api: DeleteAPI, rendered: Any) -> None:
    result = run(rendered)

    assert result == {"deleted": ["pw-a", "pw-b"], "not_found": []}
    assert api.delete_bodies() == [{"task_ids": ["pw-a", "pw-b"]}]


@pytest.mark.parametrize("rendered", [json.dumps(DETAILS[0]), str(DETAILS[0])], ids=["json", "python"])
def test_a_rendered_details_dict_deletes_its_task(api: DeleteAPI, rendered: str) -> None:
    assert run(rendered) == {"deleted": ["pw-a"], "not_found": []}
    assert api.delete_bodies() == [{"task_ids": ["pw-a"]}]


def test_the_template_field_renders_through_airflow_to_a_string_that_deletes_the_list(api: DeleteAPI) -> None:
    from airflow.providers.common.compat.sdk import DAG

    class TI:
        def xcom_pull(self, task_ids: Any = None, key: str = "return_value", **kwargs: Any) -> Any:
            return ["pw-a", "pw-b"] if key == "prewarm_task_id" else DETAILS

    with DAG(dag_id="cleanup_rendered", schedule=None, start_date=datetime.datetime(2026, 1, 1)):
        by_id = delete_op("{{ ti.xcom_pull(task_ids='prewarm', key='prewarm_task_id') }}")
        by_details = PPIODeletePrewarmTasksOperator(
            task_id="cleanup_details", prewarm_task_ids="{{ ti.xcom_pull(task_ids='prewarm') }}"
        )

    for op in (by_id, by_details):
        op.render_template_fields({"ti": TI()})  # type: ignore[arg-type]
        assert isinstance(op.prewarm_task_ids, str)  # no native rendering: the list's string form
        api.known = {"pw-a", "pw-b"}
        assert op.execute({}) == {"deleted": ["pw-a", "pw-b"], "not_found": []}
    assert api.delete_bodies() == [{"task_ids": ["pw-a", "pw-b"]}] * 2


@pytest.mark.parametrize("empty", [[], None, "", "   ", "[]", "()", [None, ""]])
def test_nothing_to_delete_sends_nothing(api: DeleteAPI, requests_mock: rm.Mocker, empty: Any) -> None:
    assert run(empty) == {"deleted": [], "not_found": []}
    assert requests_mock.call_count == 0


# -- anything else is refused before any request --------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "['pw-a', 'pw-b'",  # a list cut short
        "[pw-a, pw-b]",  # unquoted: neither JSON nor a Python literal
        "{not a dict}",
        "(1)",  # a literal, but a number
        "[1, 2]",
        "{'status': 'succeeded'}",  # a dict without task_id
        "pw-a,pw-b",
        "pw-a pw-b",
        "pw-a\npw-b",
        "'pw-a'",
        "None",  # what '{{ ti.xcom_pull(...) }}' renders when the XCom does not exist
        "null",
        ".",
        "..",
        "x" * 256,
        "pw-\x00a",
        42,
        4.2,
        True,
        b"pw-a",
        object(),
        {"status": "succeeded"},
        {"task_id": None},
        {"task_id": ""},
        [{"task_id": "[pw-a]"}],
        ["pw-a", "pw b"],  # one bad id: the good one is not sent either
    ],
)
@pytest.mark.parametrize("fail_on_missing", [False, True], ids=["default", "fail_on_missing"])
def test_what_is_not_an_id_is_refused_before_any_request(
    api: DeleteAPI, requests_mock: rm.Mocker, value: Any, fail_on_missing: bool
) -> None:
    with pytest.raises(PPIOInvalidInputError, match=r"prewarm_task_ids: .*render_template_as_native_obj=True") as err:
        run(value, fail_on_missing=fail_on_missing)

    assert "output" in str(err.value)  # names the XComArg way too
    assert requests_mock.call_count == 0


def test_the_refusal_says_what_is_wrong() -> None:
    with pytest.raises(PPIOInvalidInputError, match="neither valid JSON nor a Python literal"):
        collect_prewarm_task_ids("['pw-a'")
    with pytest.raises(PPIOInvalidInputError, match="whitespace, a comma or a quote"):
        collect_prewarm_task_ids("pw-a,pw-b")
    with pytest.raises(PPIOInvalidInputError, match="XCom it pulls does not exist"):
        collect_prewarm_task_ids("None")
    with pytest.raises(PPIOInvalidInputError, match="type int"):
        collect_prewarm_task_ids(["pw-a", 42])
    with pytest.raises(PPIOInvalidInputError, match="without a task_id"):
        collect_prewarm_task_ids([{"image": "x"}])
    with pytest.raises(PPIOInvalidInputError, match="at most 255"):
        collect_prewarm_task_ids("x" * 256)


def test_the_refusal_does_not_repeat_a_huge_value() -> None:
    with pytest.raises(PPIOInvalidInputError) as err:
        collect_prewarm_task_ids("[" + "'pw-a', " * 10_000)
    assert len(str(err.value)) < 500


def test_an_id_of_255_characters_is_accepted() -> None:
    assert collect_prewarm_task_ids(["x" * 255, " pw-a "]) == ["x" * 255, "pw-a"]


# -- the result: deleted and not found ------------------------------------------------------------------


def test_the_result_lists_deleted_and_not_found_after_the_fallback(
    api: DeleteAPI, caplog: pytest.LogCaptureFixture
) -> None:
    with logged(caplog) as logs:
        result = run("['pw-a', 'pw-gone', 'pw-c']")

    assert result == {"deleted": ["pw-a", "pw-c"], "not_found": ["pw-gone"]}
    json.dumps(result)  # plain JSON for XCom
    assert api.delete_bodies() == [
        {"task_ids": ["pw-a", "pw-gone", "pw-c"]},  # the batch, refused over pw-gone
        {"task_ids": ["pw-a"]},
        {"task_ids": ["pw-gone"]},
        {"task_ids": ["pw-c"]},
    ]
    assert api.known == {"pw-b"}
    assert ("INFO", "Deleted 2 prewarm task(s): pw-a, pw-c") in logs
    assert any(level == "INFO" and "pw-gone" in message for level, message in logs)
    assert [entry for entry in logs if entry[0] not in ("DEBUG", "INFO")] == []


def test_nothing_deleted_is_a_warning(api: DeleteAPI, caplog: pytest.LogCaptureFixture) -> None:
    with logged(caplog) as logs:
        result = run(["pw-gone", "pw-lost"])

    assert result == {"deleted": [], "not_found": ["pw-gone", "pw-lost"]}
    warnings = [message for level, message in logs if level == "WARNING"]
    assert len(warnings) == 1
    assert "Nothing deleted" in warnings[0]
    assert "pw-gone, pw-lost" in warnings[0]
    assert not any("Deleted" in message for _, message in logs)


def test_an_api_that_ignores_unknown_ids_reports_them_as_deleted(ppio_conn: str, requests_mock: rm.Mocker) -> None:
    api = DeleteAPI(requests_mock, {"pw-a"}, unknown_batch="ignore")

    assert run(["pw-a", "pw-x"]) == {"deleted": ["pw-a", "pw-x"], "not_found": []}
    assert api.delete_bodies() == [{"task_ids": ["pw-a", "pw-x"]}]


def test_fail_on_missing_reads_every_id_then_deletes_them(api: DeleteAPI, requests_mock: rm.Mocker) -> None:
    assert run(str(["pw-a", "pw-b"]), fail_on_missing=True) == {"deleted": ["pw-a", "pw-b"], "not_found": []}
    assert [r.method for r in requests_mock.request_history] == ["GET", "GET", "DELETE"]


def test_fail_on_missing_deletes_nothing_when_an_id_is_unknown(api: DeleteAPI) -> None:
    with pytest.raises(PPIONotFoundError, match="pw-gone"):
        run(json.dumps(["pw-a", "pw-gone"]), fail_on_missing=True)
    assert api.delete_bodies() == []
