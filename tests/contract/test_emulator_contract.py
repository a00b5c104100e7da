"""The emulator against the project's OpenAPI description of the v2 prewarm family (schemathesis).

Runs in-process (ASGI): positive and negative cases for each operation, every built-in check
(status codes, content types, response schemas, auth enforcement, negative data rejected,
valid data accepted, 405 for undeclared methods).

Before each case the store is reset and seeded with one task per documented state, so list
responses carry real tasks and the create quota never trips. A generated ``cursor`` is opaque
garbage that the emulator rightly refuses (400 ``INVALID_CURSOR``), so positive cases get a
cursor the emulator really issued instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from schemathesis.config import SchemathesisConfig  # noqa: E402

from airflow_provider_ppio.testing.emulator import (  # noqa: E402
    EmulatorConfig,
    EmulatorStore,
    FakeClock,
    SeedTaskBody,
    create_app,
)

SPEC = Path(__file__).with_name("ppio-prewarm-v2.openapi.yaml")
API_KEY = "contract-key"
MAX_EXAMPLES = 40

STORE = EmulatorStore(EmulatorConfig(api_key=API_KEY, clock=FakeClock()))
APP = create_app(store=STORE)

CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": 20260101,
        "generation": {"mode": "all", "max-examples": MAX_EXAMPLES},
        "auth": {"openapi": {"bearerAuth": {"bearer": API_KEY}}},
    }
)
schema = schemathesis.openapi.from_path(SPEC, config=CONFIG)
schema.app = APP


def _seed_one_task_per_state() -> str:
    """Reset the emulator, seed tasks, and return a cursor it issued (after the first task)."""
    STORE.reset()
    for state in ("pending", "running", "succeeded", "failed"):
        STORE.seed_task(SeedTaskBody(state=state, image=f"registry.example.com/team/{state}:1", note=state))
    page = STORE.list_tasks(limit=1, after_seq=0, status="", region_id="", name="")
    cursor: str = page["next_cursor"]
    return cursor


@schema.parametrize()  # type: ignore[untyped-decorator]
def test_emulator_conforms_to_the_published_api(case: Any) -> None:
    issued_cursor = _seed_one_task_per_state()
    if (
        case.meta is not None
        and case.meta.generation.mode.is_positive
        and isinstance(case.query, dict)
        and case.query.get("cursor")
    ):
        case.query["cursor"] = issued_cursor
    case.call_and_validate()


def test_the_spec_describes_every_emulated_operation() -> None:
    operations = {(result.ok().method.upper(), result.ok().path) for result in schema.get_all_operations()}
    assert operations == {
        ("POST", "/gpus/v2/prewarm-tasks"),
        ("GET", "/gpus/v2/prewarm-tasks"),
        ("DELETE", "/gpus/v2/prewarm-tasks"),
        ("GET", "/gpus/v2/prewarm-tasks/{task_id}"),
    }


def test_lifecycle_responses_match_the_spec() -> None:
    """Walk created tasks through every state over real HTTP and validate each response."""
    import requests

    from airflow_provider_ppio.testing.server import EmulatorServer

    clock = FakeClock()
    get_one = schema["/gpus/v2/prewarm-tasks/{task_id}"]["GET"]
    list_all = schema["/gpus/v2/prewarm-tasks"]["GET"]
    create = schema["/gpus/v2/prewarm-tasks"]["POST"]
    with EmulatorServer(EmulatorConfig(api_key=API_KEY, clock=clock, fail_pattern="bad")) as emu:
        url = f"{emu.base_url}/gpus/v2/prewarm-tasks"
        with requests.Session() as http:
            http.headers["Authorization"] = f"Bearer {API_KEY}"
            ids = []
            for image in ("registry.example.com/team/ok:1", "registry.example.com/team/bad:1"):
                response = http.post(url, json={"image": image, "region_id": "r"}, timeout=10)
                create.validate_response(response)
                ids.append(response.json()["task_id"])
            seen = set()
            for _ in range(4):
                for task_id in ids:
                    response = http.get(f"{url}/{task_id}", timeout=10)
                    get_one.validate_response(response)
                    seen.add(response.json()["status"]["status"])
                list_all.validate_response(http.get(url, timeout=10))
                clock.advance(1.5)
            assert seen == {"pending", "running", "succeeded", "failed"}
            missing = http.get(f"{url}/nope", timeout=10)
            assert missing.status_code == 404
            get_one.validate_response(missing)
            bad_cursor = http.get(url, params={"cursor": "junk"}, timeout=10)
            assert bad_cursor.status_code == 400
            list_all.validate_response(bad_cursor)
        anonymous = requests.get(url, timeout=10)
        assert anonymous.status_code == 401
        list_all.validate_response(anonymous)


@pytest.mark.parametrize("status", [400, 403, 429])
@pytest.mark.parametrize("counts_finished", [False, True])
def test_a_quota_refusal_matches_the_spec_in_ppio_s_words(status: int, counts_finished: bool) -> None:
    """A create over the limit, at each configurable status and in both counting modes, as the spec describes."""
    import requests

    from airflow_provider_ppio.testing.server import EmulatorServer

    clock = FakeClock()
    create = schema["/gpus/v2/prewarm-tasks"]["POST"]
    config = EmulatorConfig(
        api_key=API_KEY, clock=clock, quota=1, quota_status=status, quota_counts_finished=counts_finished
    )
    with EmulatorServer(config) as emu, requests.Session() as http:
        http.headers["Authorization"] = f"Bearer {API_KEY}"
        url = f"{emu.base_url}/gpus/v2/prewarm-tasks"
        body = {"image": "registry.example.com/team/ok:1", "region_id": "r"}
        create.validate_response(http.post(url, json=body, timeout=10))
        clock.advance(60)  # the first task has finished
        refused = http.post(url, json=body, timeout=10)
        if not counts_finished:
            assert refused.status_code == 200
            refused = http.post(url, json=body, timeout=10)
        assert refused.status_code == status
        create.validate_response(refused)
        assert refused.json() == {
            "code": status,
            "reason": "IMAGE_PREWARM_NUM_LIMIT",
            "message": "Image prewarm number exceeds limit",
            "metadata": {},
        }
