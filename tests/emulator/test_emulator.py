"""The PPIO emulator over real HTTP: auth, validation, lifecycle, quota, pagination, control, faults."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
import requests

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from airflow_provider_ppio.testing.emulator import EmulatorConfig, FakeClock
from airflow_provider_ppio.testing.server import (
    EmulatorControl,
    EmulatorControlError,
    EmulatorServer,
)

pytestmark = pytest.mark.integration

PATH = "/gpus/v2/prewarm-tasks"
GIB = 1024**3
Factory = Callable[..., EmulatorServer]


def call(emu: EmulatorServer, method: str, path: str = "", *, auth: bool = True, **kwargs: Any) -> requests.Response:
    """Call the emulated API.

    :param emu: the server.
    :param method: HTTP method.
    :param path: appended to ``/gpus/v2/prewarm-tasks``.
    :param auth: send the right API key.
    :param kwargs: passed to ``requests.request``.
    """
    headers = dict(kwargs.pop("headers", {}))
    if auth:
        headers.setdefault("Authorization", f"Bearer {emu.api_key}")
    return requests.request(method, f"{emu.base_url}{PATH}{path}", headers=headers, timeout=10, **kwargs)


def create(emu: EmulatorServer, image: str = "registry.example.com/team/llama:1.0", **fields: Any) -> str:
    """Create a task and return its id."""
    response = call(emu, "POST", json={"image": image, "region_id": "region-a", **fields})
    assert response.status_code == 200, response.text
    task_id: str = response.json()["task_id"]
    return task_id


def get(emu: EmulatorServer, task_id: str) -> dict[str, Any]:
    """GET one task (must exist)."""
    response = call(emu, "GET", f"/{task_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_error(response: requests.Response, status: int, reason: str, *fragments: str) -> None:
    """The response is the JSON error body PPIO's backend sends, with this status and reason."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"code", "reason", "message", "metadata"}
    assert body["metadata"] == {}
    assert body["code"] == status
    assert body["reason"] == reason
    for fragment in fragments:
        assert fragment in body["message"]


@pytest.fixture
def fake(ppio_emulator_factory: Factory) -> tuple[EmulatorServer, FakeClock]:
    """An emulator on a fake clock (pending 1 s, running 3 s)."""
    clock = FakeClock()
    return ppio_emulator_factory(clock=clock), clock


# ------------------------------------------------------------------------------------------------
# Auth and error shape
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "MISSING_API_KEY"),
        ({"Authorization": "Bearer wrong-key"}, "INVALID_API_KEY"),
        ({"Authorization": "emulator-key"}, "INVALID_API_KEY"),
        ({"Authorization": "Basic emulator-key"}, "INVALID_API_KEY"),
        ({"Authorization": "Bearer  emulator-key"}, "INVALID_API_KEY"),
    ],
)
@pytest.mark.parametrize(("method", "path"), [("GET", ""), ("GET", "/pwt-x"), ("POST", ""), ("DELETE", "")])
def test_every_endpoint_needs_the_bearer_key(
    ppio_emulator: EmulatorServer, headers: dict[str, str], reason: str, method: str, path: str
) -> None:
    response = call(ppio_emulator, method, path, auth=False, headers=headers, json={"task_ids": []})
    assert_error(response, 401, reason, "Bearer")
    assert response.headers["www-authenticate"] == "Bearer"


def test_bearer_scheme_is_case_insensitive(ppio_emulator: EmulatorServer) -> None:
    response = call(ppio_emulator, "GET", auth=False, headers={"Authorization": "bearer emulator-key"})
    assert response.status_code == 200


def test_custom_api_key(ppio_emulator_factory: Factory) -> None:
    emu = ppio_emulator_factory(api_key="sk_custom")
    assert call(emu, "GET").status_code == 200
    assert call(emu, "GET", auth=False, headers={"Authorization": "Bearer emulator-key"}).status_code == 401


def test_unknown_path_and_method(ppio_emulator: EmulatorServer) -> None:
    assert_error(call(ppio_emulator, "GET", "/a/b"), 404, "NOT_FOUND")
    assert_error(call(ppio_emulator, "GET", "/"), 404, "NOT_FOUND")
    response = call(ppio_emulator, "PATCH")
    assert_error(response, 405, "METHOD_NOT_ALLOWED")
    assert response.headers["allow"] == "DELETE, GET, POST"
    assert_error(call(ppio_emulator, "PUT", "/pwt-x"), 405, "METHOD_NOT_ALLOWED")


# ------------------------------------------------------------------------------------------------
# Create, get, validation
# ------------------------------------------------------------------------------------------------


def test_create_then_get_returns_every_field(ppio_emulator: EmulatorServer) -> None:
    before = int(time.time())
    task_id = create(
        ppio_emulator,
        "registry.example.com/team/llama:1.0",
        registry_auth_id="auth-1",
        product_ids=["p-a", "p-b"],
        note="nightly",
    )
    assert re.fullmatch(r"pwt-[0-9a-f]{12}", task_id)
    task = get(ppio_emulator, task_id)
    assert task == {
        "task_id": task_id,
        "name": "llama:1.0",
        "image": "registry.example.com/team/llama:1.0",
        "region_id": "region-a",
        "product_ids": ["p-a", "p-b"],
        "image_size": task["image_size"],
        "created_at": task["created_at"],
        "completed_at": 0,
        "status": {"status": "pending", "error": "", "message": task["status"]["message"]},
        "registry_auth_id": "auth-1",
        "note": "nightly",
        "reason": [],
    }
    assert before <= task["created_at"] <= int(time.time())
    assert GIB <= task["image_size"] <= 20 * GIB
    # deterministic from the image reference
    assert get(ppio_emulator, create(ppio_emulator, task["image"]))["image_size"] == task["image_size"]


def test_optional_fields_default_to_empty(ppio_emulator: EmulatorServer) -> None:
    task = get(ppio_emulator, create(ppio_emulator, "nginx"))
    assert (task["name"], task["registry_auth_id"], task["note"], task["product_ids"]) == ("nginx", "", "", [])


def test_get_unknown_and_too_long_ids(ppio_emulator: EmulatorServer) -> None:
    assert_error(call(ppio_emulator, "GET", "/pwt-000000000000"), 404, "PREWARM_TASK_NOT_FOUND", "pwt-000000000000")
    assert call(ppio_emulator, "GET", "/" + "a" * 255).status_code == 404
    assert_error(call(ppio_emulator, "GET", "/" + "a" * 256), 400, "INVALID_ARGUMENT", "task_id")


VALID = {"image": "img:1", "region_id": "region-a"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"region_id": "r"}, "image"),
        ({"image": "img"}, "region_id"),
        ({**VALID, "image": ""}, "image"),
        ({**VALID, "image": "x" * 4096}, "image"),
        ({**VALID, "region_id": ""}, "region_id"),
        ({**VALID, "region_id": "r" * 256}, "region_id"),
        ({**VALID, "registry_auth_id": "a" * 256}, "registry_auth_id"),
        ({**VALID, "image": 5}, "image"),
        ({**VALID, "product_ids": "p-a"}, "product_ids"),
        ({**VALID, "product_ids": [1]}, "product_ids.0"),
        ({**VALID, "note": None}, "note"),
        ({**VALID, "note": "n" * 4097}, "note"),
    ],
)
def test_create_rejects_invalid_fields_naming_them(
    ppio_emulator: EmulatorServer, body: dict[str, Any], field: str
) -> None:
    assert_error(call(ppio_emulator, "POST", json=body), 400, "INVALID_ARGUMENT", f"'{field}'")
    assert call(ppio_emulator, "GET").json()["data"] == []


def test_create_accepts_the_limits_and_ignores_unknown_fields(ppio_emulator: EmulatorServer) -> None:
    body = {"image": "x" * 4095, "region_id": "r" * 255, "note": "n" * 4096, "registry_auth_id": "a" * 255}
    assert call(ppio_emulator, "POST", json={**body, "surprise": True}).status_code == 200


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"data": json.dumps(VALID)}, "INVALID_CONTENT_TYPE"),
        ({"data": json.dumps(VALID), "headers": {"Content-Type": "text/plain"}}, "INVALID_CONTENT_TYPE"),
        ({"data": "{not json", "headers": {"Content-Type": "application/json"}}, "INVALID_JSON"),
        ({"data": "", "headers": {"Content-Type": "application/json"}}, "INVALID_JSON"),
        ({"json": [VALID]}, "INVALID_ARGUMENT"),
    ],
)
def test_create_needs_a_json_object(ppio_emulator: EmulatorServer, kwargs: dict[str, Any], reason: str) -> None:
    assert_error(call(ppio_emulator, "POST", **kwargs), 400, reason)


def test_content_type_with_charset_is_fine(ppio_emulator: EmulatorServer) -> None:
    headers = {"Content-Type": "application/json; charset=utf-8"}
    assert call(ppio_emulator, "POST", data=json.dumps(VALID), headers=headers).status_code == 200


# ------------------------------------------------------------------------------------------------
# Lifecycle
# ------------------------------------------------------------------------------------------------


def test_lifecycle_pending_running_succeeded(fake: tuple[EmulatorServer, FakeClock]) -> None:
    emu, clock = fake
    task_id = create(emu)
    created = get(emu, task_id)
    assert created["status"]["status"] == "pending"
    assert created["created_at"] == int(clock())
    clock.advance(0.99)
    assert get(emu, task_id)["status"]["status"] == "pending"
    clock.advance(0.02)
    running = get(emu, task_id)
    assert running["status"]["status"] == "running"
    assert running["completed_at"] == 0
    clock.advance(2.98)
    assert get(emu, task_id)["status"]["status"] == "running"
    clock.advance(0.02)
    done = get(emu, task_id)
    assert done["status"] == {
        "status": "succeeded",
        "error": "",
        "message": done["status"]["message"],
    }
    assert re.fullmatch(r"image prewarmed on \d+ nodes", done["status"]["message"])
    assert done["reason"] == ["image pulled successfully"]
    assert done["completed_at"] == created["created_at"] + 4
    clock.advance(1000)
    assert get(emu, task_id) == done


def test_image_matching_fail_pattern_fails_at_end_of_running(fake: tuple[EmulatorServer, FakeClock]) -> None:
    emu, clock = fake
    image = "registry.example.com/team/will-fail:1"
    task_id = create(emu, image)
    clock.advance(3.9)
    assert get(emu, task_id)["status"]["status"] == "running"
    clock.advance(0.2)
    task = get(emu, task_id)
    assert task["status"]["status"] == "failed"
    assert task["status"]["error"] == "ImagePullFailed"
    assert task["status"]["message"] == f"failed to pull image {image}: manifest unknown"
    assert task["reason"] and all(isinstance(r, str) and r for r in task["reason"])
    assert task["completed_at"] == task["created_at"] + 4


def test_fail_pattern_is_a_regex_and_can_be_disabled(ppio_emulator_factory: Factory) -> None:
    clock = FakeClock()
    emu = ppio_emulator_factory(clock=clock, fail_pattern=r":broken$", pending_seconds=0, running_seconds=0)
    ok, bad = create(emu, "team/fail:1"), create(emu, "team/x:broken")
    assert get(emu, ok)["status"]["status"] == "succeeded"
    assert get(emu, bad)["status"]["status"] == "failed"
    never = ppio_emulator_factory(clock=clock, fail_pattern="", pending_seconds=0, running_seconds=0)
    assert get(never, create(never, "fail"))["status"]["status"] == "succeeded"


def test_seconds_per_gb_extends_running(ppio_emulator_factory: Factory) -> None:
    clock = FakeClock()
    emu = ppio_emulator_factory(clock=clock, pending_seconds=0, running_seconds=1, seconds_per_gb=2)
    task_id = create(emu)
    size_gb = get(emu, task_id)["image_size"] / 1e9
    clock.advance(1 + 2 * size_gb - 0.01)
    assert get(emu, task_id)["status"]["status"] == "running"
    clock.advance(0.02)
    assert get(emu, task_id)["status"]["status"] == "succeeded"


def test_advance_clock_drives_the_real_clock_emulator(ppio_emulator: EmulatorServer) -> None:
    task_id = create(ppio_emulator)
    assert get(ppio_emulator, task_id)["status"]["status"] == "pending"
    ppio_emulator.control.advance_clock(2)
    assert get(ppio_emulator, task_id)["status"]["status"] == "running"
    ppio_emulator.control.advance_clock(10)
    assert get(ppio_emulator, task_id)["status"]["status"] == "succeeded"


def test_configure_changes_timings_until_reset(ppio_emulator: EmulatorServer) -> None:
    settings = ppio_emulator.control.configure(pending_seconds=0, running_seconds=0)
    assert settings["pending_seconds"] == 0
    assert get(ppio_emulator, create(ppio_emulator))["status"]["status"] == "succeeded"
    ppio_emulator.control.reset()
    assert ppio_emulator.control.get_config()["pending_seconds"] == 1.0
    assert get(ppio_emulator, create(ppio_emulator))["status"]["status"] == "pending"
    with pytest.raises(EmulatorControlError) as excinfo:
        ppio_emulator.control.configure(fail_pattern="(")
    assert excinfo.value.status == 400


# ------------------------------------------------------------------------------------------------
# Quota and delete
# ------------------------------------------------------------------------------------------------


def test_quota_of_five_concurrent_tasks(fake: tuple[EmulatorServer, FakeClock]) -> None:
    emu, clock = fake
    ids = [create(emu, f"img:{i}") for i in range(5)]
    response = call(emu, "POST", json=VALID)
    # In the words of PPIO's console backend (ppio-api/README.md section 2.5).
    assert_error(response, 400, "IMAGE_PREWARM_NUM_LIMIT")
    assert response.json()["message"] == "Image prewarm number exceeds limit"
    # deleting one frees a slot
    assert call(emu, "DELETE", json={"task_ids": [ids[0]]}).json() == {}
    sixth = create(emu)
    assert call(emu, "POST", json=VALID).status_code == 400
    # finished tasks do not count
    clock.advance(10)
    assert get(emu, sixth)["status"]["status"] == "succeeded"
    for i in range(5):
        create(emu, f"more:{i}")
    assert call(emu, "POST", json=VALID).status_code == 400


@pytest.mark.parametrize("status", [400, 403, 429])
def test_the_quota_status_is_configurable(ppio_emulator_factory: Factory, status: int) -> None:
    emu = ppio_emulator_factory(quota=0, quota_status=status)
    assert_error(call(emu, "POST", json=VALID), status, "IMAGE_PREWARM_NUM_LIMIT", "Image prewarm number exceeds limit")
    emu.control.configure(quota_status=400 if status != 400 else 429)
    assert call(emu, "POST", json=VALID).status_code == (400 if status != 400 else 429)
    with pytest.raises(EmulatorControlError) as excinfo:
        emu.control.configure(quota_status=418)
    assert excinfo.value.status == 400


def test_finished_tasks_count_until_deleted_when_asked(fake: tuple[EmulatorServer, FakeClock]) -> None:
    emu, clock = fake
    emu.control.configure(quota=2, quota_counts_finished=True)
    first, second = create(emu, "img:1"), create(emu, "img:2")
    clock.advance(10)
    assert {get(emu, task_id)["status"]["status"] for task_id in (first, second)} == {"succeeded"}
    # Nothing is pending or running, yet the create is refused: finished tasks hold their slots.
    assert_error(call(emu, "POST", json=VALID), 400, "IMAGE_PREWARM_NUM_LIMIT")
    stats = emu.control.stats()
    assert (stats["active"], stats["counted"], stats["quota_counts_finished"]) == (0, 2, True)
    # Deleting a finished task frees its slot.
    assert call(emu, "DELETE", json={"task_ids": [first]}).json() == {}
    create(emu, "img:3")
    assert call(emu, "POST", json=VALID).status_code == 400
    # Without the mode (the default), finished tasks do not count.
    emu.control.configure(quota_counts_finished=False)
    clock.advance(10)
    create(emu, "img:4")


def test_the_mode_and_status_come_from_the_command_line() -> None:
    from airflow_provider_ppio.testing.cli import build_parser

    args = build_parser().parse_args(["--quota", "2", "--quota-counts-finished", "--quota-status", "429"])
    assert (args.quota, args.quota_counts_finished, args.quota_status) == (2, True, 429)
    defaults = build_parser().parse_args([])
    assert (defaults.quota_counts_finished, defaults.quota_status) == (False, 400)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--quota-status", "500"])


def test_quota_holds_under_concurrent_creates(ppio_emulator: EmulatorServer) -> None:
    statuses: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        status = call(ppio_emulator, "POST", json=VALID).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [200] * 5 + [400] * 15


def test_each_refused_create_is_logged_with_its_reason_and_counted(fake: tuple[EmulatorServer, FakeClock]) -> None:
    emu, clock = fake
    for i in range(5):
        create(emu, f"img:{i}")
    for _ in range(3):
        assert call(emu, "POST", json=VALID).status_code == 400
    call(emu, "POST", json={"image": "", "region_id": "region-a"})  # a 400 for another reason
    clock.advance(10)  # all five finished: the next create is accepted
    create(emu, "img:late")

    posts = [(e["status"], e["reason"]) for e in emu.control.requests_log() if e["method"] == "POST"]
    assert posts == [(200, None)] * 5 + [(400, "IMAGE_PREWARM_NUM_LIMIT")] * 3 + [
        (400, "INVALID_ARGUMENT"),
        (200, None),
    ]
    stats = emu.control.stats()
    assert (stats["creates"], stats["refused_creates"], stats["quota"]) == (6, 3, 5)
    assert (stats["active"], stats["peak_active"]) == (1, 5)


def test_peak_active_is_exact_from_the_timelines(fake: tuple[EmulatorServer, FakeClock]) -> None:
    emu, clock = fake  # pending 1 s + running 3 s: a task is active for 4 s
    start = emu.control.stats()["now"]
    assert emu.control.stats()["peak_active"] == 0
    first = [create(emu, f"a:{i}") for i in range(3)]
    clock.advance(2)
    create(emu, "b:0")  # 4 active now
    clock.advance(2)  # the first three end exactly now; ends come before starts at the same instant
    create(emu, "c:0")
    create(emu, "c:1")
    clock.advance(100)  # nobody read any task meanwhile: the peak comes from the timelines
    stats = emu.control.stats()
    assert (stats["peak_active"], stats["peak_at"], stats["active"]) == (4, start + 2, 0)

    # deleted tasks keep counting for the time they were active; re-timed tasks too
    emu.control.reset()
    tasks = [create(emu, f"d:{i}") for i in range(3)]
    clock.advance(1)
    emu.control.seed_task(state="running")  # seeded tasks count as active
    clock.advance(0.5)
    assert call(emu, "DELETE", json={"task_ids": tasks}).status_code == 200
    emu.control.set_state(emu.control.tasks()[0]["task_id"], "succeeded")
    clock.advance(1)
    emu.control.seed_task(timeline=[{"state": "succeeded", "seconds": 1}, {"state": "running"}])
    clock.advance(5)  # becomes active 1 s after seeding, although nothing read it
    stats = emu.control.stats()
    assert (stats["peak_active"], stats["active"], stats["creates"]) == (4, 1, 3)
    assert first  # the first round's ids are gone after the reset
    emu.control.reset()
    assert emu.control.stats()["peak_active"] == 0


@pytest.mark.timeout(30)
def test_barrier_holds_requests_until_all_have_arrived(ppio_emulator_factory: Factory) -> None:
    emu = ppio_emulator_factory()  # own server: held requests must not leak into another test
    emu.control.inject_fault("barrier", count=3, method="GET", path_prefix=PATH)
    answered: list[float] = []
    lock = threading.Lock()

    def reader() -> None:
        assert call(emu, "GET").status_code == 200
        with lock:
            answered.append(time.monotonic())

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while emu.control.faults()[0]["arrived"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert emu.control.faults()[0]["arrived"] == 2  # a test can see who has arrived
    time.sleep(0.3)
    assert answered == []  # two arrived, both held
    assert call(emu, "POST", json=VALID).status_code == 200  # other requests pass
    third = time.monotonic()
    reader()  # the third releases all three
    for thread in threads:
        thread.join(5)
    assert len(answered) == 3 and min(answered) >= third
    assert emu.control.faults() == []
    assert call(emu, "GET").status_code == 200  # used up: later requests are not held

    # with seconds, held requests go on when the time is up even if the others never come
    emu.control.inject_fault("barrier", count=2, seconds=0.3)
    started = time.monotonic()
    assert call(emu, "GET").status_code == 200
    assert 0.3 <= time.monotonic() - started < 5
    response = requests.post(f"{emu.base_url}/_emulator/faults", json={"kind": "barrier", "count": 1}, timeout=5)
    assert_error(response, 400, "INVALID_ARGUMENT", "count >= 2")


def test_unlimited_quota(ppio_emulator_factory: Factory) -> None:
    emu = ppio_emulator_factory(quota=None)
    for i in range(8):
        create(emu, f"img:{i}")


def test_delete(ppio_emulator: EmulatorServer) -> None:
    keep, drop = create(ppio_emulator), create(ppio_emulator)
    response = call(ppio_emulator, "DELETE", json={"task_ids": [drop, "pwt-unknown"]})
    assert (response.status_code, response.json()) == (200, {})
    assert call(ppio_emulator, "GET", f"/{drop}").status_code == 404
    assert get(ppio_emulator, keep)["task_id"] == keep
    assert call(ppio_emulator, "DELETE", json={"task_ids": []}).status_code == 200


@pytest.mark.parametrize(
    ("kwargs", "reason", "fragment"),
    [
        ({"json": {}}, "INVALID_ARGUMENT", "'task_ids'"),
        ({"json": {"task_ids": "pwt-1"}}, "INVALID_ARGUMENT", "'task_ids'"),
        ({"json": {"task_ids": [1]}}, "INVALID_ARGUMENT", "'task_ids.0'"),
        ({"data": '{"task_ids": []}'}, "INVALID_CONTENT_TYPE", "application/json"),
    ],
)
def test_delete_validation(ppio_emulator: EmulatorServer, kwargs: dict[str, Any], reason: str, fragment: str) -> None:
    assert_error(call(ppio_emulator, "DELETE", **kwargs), 400, reason, fragment)


# ------------------------------------------------------------------------------------------------
# List, pagination, filters
# ------------------------------------------------------------------------------------------------


def list_all(emu: EmulatorServer, **params: Any) -> tuple[list[str], list[int]]:
    """Follow next_cursor to the end; returns ids and page sizes."""
    ids: list[str] = []
    sizes: list[int] = []
    cursor = ""
    while True:
        response = call(emu, "GET", params={**params, "cursor": cursor})
        assert response.status_code == 200, response.text
        page = response.json()
        assert set(page) == {"data", "next_cursor", "has_more"}
        ids += [t["task_id"] for t in page["data"]]
        sizes.append(len(page["data"]))
        assert page["has_more"] == (page["next_cursor"] != "")
        if not page["has_more"]:
            return ids, sizes
        cursor = page["next_cursor"]


def test_pagination_walks_every_task_once_in_creation_order(ppio_emulator: EmulatorServer) -> None:
    seeded = [ppio_emulator.control.seed_task(state="succeeded")["task_id"] for _ in range(7)]
    ids, sizes = list_all(ppio_emulator, limit=3)
    assert ids == seeded
    assert sizes == [3, 3, 1]
    assert list_all(ppio_emulator, limit=7) == (seeded, [7])


def test_pagination_survives_deletes_between_pages(ppio_emulator: EmulatorServer) -> None:
    seeded = [ppio_emulator.control.seed_task(state="running")["task_id"] for _ in range(6)]
    first = call(ppio_emulator, "GET", params={"limit": 3}).json()
    call(ppio_emulator, "DELETE", json={"task_ids": [seeded[2], seeded[3]]})
    rest = call(ppio_emulator, "GET", params={"limit": 3, "cursor": first["next_cursor"]}).json()
    assert [t["task_id"] for t in rest["data"]] == seeded[4:]
    assert rest == {**rest, "has_more": False, "next_cursor": ""}


def test_default_page_size_and_cap(ppio_emulator: EmulatorServer) -> None:
    for _ in range(105):
        ppio_emulator.control.seed_task(state="succeeded")
    for params in ({}, {"limit": 0}, {"limit": ""}):
        page = call(ppio_emulator, "GET", params=params).json()
        assert (len(page["data"]), page["has_more"]) == (20, True)
    page = call(ppio_emulator, "GET", params={"limit": 10**12}).json()
    assert (len(page["data"]), page["has_more"]) == (100, True)
    assert list_all(ppio_emulator, limit=1000)[1] == [100, 5]


def test_filters(ppio_emulator: EmulatorServer) -> None:
    seed = ppio_emulator.control.seed_task
    a = seed(state="running", image="reg.io/team/Llama:1", region_id="us-1")["task_id"]
    b = seed(state="succeeded", image="reg.io/team/qwen:2", region_id="us-1", note="LLAMA weights")["task_id"]
    c = seed(state="failed", image="reg.io/team/sdxl:3", region_id="eu-1")["task_id"]
    d = seed(state="paused", image="reg.io/team/other:4", region_id="eu-1")["task_id"]
    assert list_all(ppio_emulator)[0] == [a, b, c, d]
    assert list_all(ppio_emulator, status="running")[0] == [a]
    assert list_all(ppio_emulator, status="failed")[0] == [c]
    assert list_all(ppio_emulator, status="")[0] == [a, b, c, d]
    assert list_all(ppio_emulator, region_id="eu-1")[0] == [c, d]
    assert list_all(ppio_emulator, region_id="eu")[0] == []
    assert list_all(ppio_emulator, name="llama")[0] == [a, b]
    assert list_all(ppio_emulator, name="SDXL")[0] == [c]
    assert list_all(ppio_emulator, name="llama", status="succeeded", region_id="us-1")[0] == [b]


def test_filtered_pagination(ppio_emulator: EmulatorServer) -> None:
    seed = ppio_emulator.control.seed_task
    wanted = [seed(state="running" if i % 2 else "succeeded")["task_id"] for i in range(10)][1::2]
    assert list_all(ppio_emulator, status="running", limit=2) == (wanted, [2, 2, 1])


@pytest.mark.parametrize(
    ("params", "reason", "fragment"),
    [
        ({"limit": -1}, "INVALID_ARGUMENT", "'limit'"),
        ({"limit": "ten"}, "INVALID_ARGUMENT", "'limit'"),
        ({"limit": "1.5"}, "INVALID_ARGUMENT", "'limit'"),
        ({"status": "Running"}, "INVALID_ARGUMENT", "'status'"),
        ({"status": "done"}, "INVALID_ARGUMENT", "'status'"),
        ({"cursor": "not-a-cursor"}, "INVALID_CURSOR", "cursor"),
        ({"cursor": base64.urlsafe_b64encode(b'{"seq": -1}').decode()}, "INVALID_CURSOR", "cursor"),
        ({"cursor": "a" * 1025}, "INVALID_ARGUMENT", "'cursor'"),
        ({"region_id": "r" * 256}, "INVALID_ARGUMENT", "'region_id'"),
        ({"name": "n" * 256}, "INVALID_ARGUMENT", "'name'"),
    ],
)
def test_list_rejects_bad_query_parameters(
    ppio_emulator: EmulatorServer, params: dict[str, Any], reason: str, fragment: str
) -> None:
    assert_error(call(ppio_emulator, "GET", params=params), 400, reason, fragment)


# ------------------------------------------------------------------------------------------------
# Control endpoints
# ------------------------------------------------------------------------------------------------


def test_seeded_unknown_state_is_served_as_is(ppio_emulator: EmulatorServer) -> None:
    seeded = ppio_emulator.control.seed_task(task_id="pwt-odd", state="paused", message="held by operator")
    task = get(ppio_emulator, "pwt-odd")
    assert task == seeded
    assert task["status"] == {"status": "paused", "error": "", "message": "held by operator"}
    assert task["completed_at"] == 0
    ppio_emulator.control.advance_clock(3600)
    assert get(ppio_emulator, "pwt-odd")["status"]["status"] == "paused"


def test_seed_every_field(ppio_emulator: EmulatorServer) -> None:
    task = ppio_emulator.control.seed_task(
        task_id="pwt-full",
        state="failed",
        image="r.io/a/b:c",
        region_id="eu-2",
        product_ids=["x"],
        registry_auth_id="ra",
        note="n",
        name="custom",
        image_size=42,
        created_at=1700000000,
        completed_at=1700000100,
        error="Boom",
        message="it broke",
        reason=["r1", "r2"],
    )
    assert task == {
        "task_id": "pwt-full",
        "name": "custom",
        "image": "r.io/a/b:c",
        "region_id": "eu-2",
        "product_ids": ["x"],
        "image_size": 42,
        "created_at": 1700000000,
        "completed_at": 1700000100,
        "status": {"status": "failed", "error": "Boom", "message": "it broke"},
        "registry_auth_id": "ra",
        "note": "n",
        "reason": ["r1", "r2"],
    }
    assert get(ppio_emulator, "pwt-full") == task


def test_seed_with_timeline(fake: tuple[EmulatorServer, FakeClock]) -> None:
    emu, clock = fake
    emu.control.seed_task(
        task_id="pwt-tl",
        timeline=[
            {"state": "pending", "seconds": 5},
            {"state": "mystery", "seconds": 5, "message": "?"},
            {"state": "failed", "error": "Quota", "reason": ["image larger than 100 GB"]},
        ],
    )
    states = []
    for _ in range(4):
        task = get(emu, "pwt-tl")
        states.append((task["status"]["status"], task["status"]["message"], task["reason"]))
        clock.advance(4)
    assert [s[0] for s in states] == ["pending", "pending", "mystery", "failed"]
    assert states[2][1] == "?"
    assert states[3][2] == ["image larger than 100 GB"]
    assert get(emu, "pwt-tl")["status"]["error"] == "Quota"


def test_set_state(ppio_emulator: EmulatorServer) -> None:
    task_id = create(ppio_emulator)
    task = ppio_emulator.control.set_state(task_id, "failed", error="E", message="m", reason=["why"])
    assert task["status"] == {"status": "failed", "error": "E", "message": "m"}
    assert task["reason"] == ["why"]
    assert task["completed_at"] > 0
    assert get(ppio_emulator, task_id) == task
    with pytest.raises(EmulatorControlError) as excinfo:
        ppio_emulator.control.set_state("pwt-nope", "running")
    assert excinfo.value.status == 404


def test_seed_validation_uses_the_error_body(ppio_emulator: EmulatorServer) -> None:
    response = requests.post(f"{ppio_emulator.base_url}/_emulator/tasks", json={"state": 5}, timeout=5)
    assert_error(response, 400, "INVALID_ARGUMENT", "'state'")
    response = requests.post(f"{ppio_emulator.base_url}/_emulator/faults", json={"kind": "nope"}, timeout=5)
    assert_error(response, 400, "INVALID_ARGUMENT", "'kind'")


def test_request_log_never_holds_the_key(ppio_emulator: EmulatorServer) -> None:
    create(ppio_emulator, note="hello")
    call(ppio_emulator, "GET", params={"status": "running", "limit": 2})
    call(ppio_emulator, "GET", auth=False)
    call(ppio_emulator, "GET", auth=False, headers={"Authorization": "Bearer nope"})
    ppio_emulator.control.seed_task()  # control calls are not logged
    log = ppio_emulator.control.requests_log()
    assert [(e["method"], e["path"], e["status"], e["auth_present"], e["auth_valid"]) for e in log] == [
        ("POST", PATH, 200, True, True),
        ("GET", PATH, 200, True, True),
        ("GET", PATH, 401, False, False),
        ("GET", PATH, 401, True, False),
    ]
    assert log[0]["json"] == {"image": "registry.example.com/team/llama:1.0", "region_id": "region-a", "note": "hello"}
    assert log[1]["query"] == {"status": "running", "limit": "2"}
    assert "emulator-key" not in json.dumps(log)
    ppio_emulator.control.reset()
    assert ppio_emulator.control.requests_log() == []


def test_reset_clears_tasks_and_faults(ppio_emulator: EmulatorServer) -> None:
    create(ppio_emulator)
    ppio_emulator.control.inject_fault("status", status=500)
    ppio_emulator.control.reset()
    assert ppio_emulator.control.faults() == []
    assert call(ppio_emulator, "GET").json() == {"data": [], "next_cursor": "", "has_more": False}
    assert ppio_emulator.control.health()["tasks"] == 0


def test_control_token(ppio_emulator_factory: Factory) -> None:
    emu = ppio_emulator_factory(control_token="s3cret")
    assert emu.control.health()["status"] == "ok"
    assert emu.control.seed_task()["task_id"]
    anonymous = EmulatorControl(emu.base_url)
    assert anonymous.health()["status"] == "ok"
    with pytest.raises(EmulatorControlError) as excinfo:
        anonymous.reset()
    assert excinfo.value.status == 401
    anonymous.close()


# ------------------------------------------------------------------------------------------------
# Faults
# ------------------------------------------------------------------------------------------------


def test_status_fault_counts_down_then_recovers(ppio_emulator: EmulatorServer) -> None:
    fault = ppio_emulator.control.inject_fault("status", status=503, count=2)
    assert fault["remaining"] == 2
    assert_error(call(ppio_emulator, "GET"), 503, "SERVICE_UNAVAILABLE")
    assert ppio_emulator.control.faults()[0]["remaining"] == 1
    assert call(ppio_emulator, "GET").status_code == 503
    assert ppio_emulator.control.faults() == []
    assert call(ppio_emulator, "GET").status_code == 200
    assert [e["fault"] for e in ppio_emulator.control.requests_log()] == ["status", "status", None]


def test_fault_filters_by_method_and_path(ppio_emulator: EmulatorServer) -> None:
    task_id = create(ppio_emulator)
    ppio_emulator.control.inject_fault("status", status=500, method="get", path_prefix=f"{PATH}/{task_id}")
    assert call(ppio_emulator, "GET").status_code == 200
    assert call(ppio_emulator, "POST", json=VALID).status_code == 200
    assert requests.get(f"{ppio_emulator.base_url}/_emulator/health", timeout=5).status_code == 200
    assert call(ppio_emulator, "GET", f"/{task_id}").status_code == 500
    assert call(ppio_emulator, "GET", f"/{task_id}").status_code == 200


def test_fault_applies_before_auth_and_unlimited_until_cleared(ppio_emulator: EmulatorServer) -> None:
    ppio_emulator.control.inject_fault("status", status=502, count=None, body="upstream down")
    for _ in range(3):
        response = call(ppio_emulator, "GET", auth=False)
        assert (response.status_code, response.text) == (502, "upstream down")
        assert response.headers["content-type"].startswith("text/plain")
    ppio_emulator.control.clear_faults()
    assert call(ppio_emulator, "GET").status_code == 200


def test_status_fault_with_json_body_and_headers(ppio_emulator: EmulatorServer) -> None:
    ppio_emulator.control.inject_fault("status", status=403, body={"msg": "no"}, headers={"X-Trace": "t1"})
    response = call(ppio_emulator, "GET")
    assert (response.status_code, response.json(), response.headers["x-trace"]) == (403, {"msg": "no"}, "t1")


def test_rate_limit_retry_after_forms(ppio_emulator: EmulatorServer) -> None:
    control = ppio_emulator.control
    control.inject_fault("rate_limit", retry_after=2.5)
    control.inject_fault("rate_limit", retry_after=30, retry_after_format="http-date")
    control.inject_fault("rate_limit")
    control.inject_fault("rate_limit", retry_after="soon")
    first = call(ppio_emulator, "GET")
    assert_error(first, 429, "RATE_LIMIT_EXCEEDED")
    assert first.headers["retry-after"] == "3"
    second = call(ppio_emulator, "GET")
    delay = parsedate_to_datetime(second.headers["retry-after"]).timestamp() - time.time()
    assert 25 < delay <= 31
    assert "retry-after" not in call(ppio_emulator, "GET").headers
    assert call(ppio_emulator, "GET").headers["retry-after"] == "soon"
    assert call(ppio_emulator, "GET").status_code == 200


def test_latency(ppio_emulator_factory: Factory) -> None:
    # own server: the request left hanging below must not log into another test
    emu = ppio_emulator_factory()
    emu.control.inject_fault("latency", seconds=0.4)
    start = time.monotonic()
    assert call(emu, "GET").status_code == 200
    assert time.monotonic() - start >= 0.4
    emu.control.inject_fault("latency", seconds=5)
    with pytest.raises(requests.Timeout):
        requests.get(f"{emu.base_url}{PATH}", headers=emu.auth_headers, timeout=0.3)


@pytest.mark.parametrize(
    ("params", "status", "content_type", "check"),
    [
        ({"kind": "malformed_json"}, 200, "application/json", "invalid-json"),
        ({"kind": "html"}, 200, "text/html", "<html>"),
        ({"kind": "html", "status": 502}, 502, "text/html", "502 Bad Gateway"),
        ({"kind": "empty_body"}, 200, "application/json", ""),
        ({"kind": "json_array"}, 200, "application/json", "[]"),
        ({"kind": "json_array", "body": [{"task_id": "x"}]}, 200, "application/json", '[{"task_id": "x"}]'),
        ({"kind": "body", "body": {"task_id": "pwt-1", "status": None}}, 200, "application/json", "null"),
        ({"kind": "body", "body": "plain", "content_type": "text/csv", "status": 201}, 201, "text/csv", "plain"),
    ],
)
def test_body_faults(
    ppio_emulator: EmulatorServer, params: dict[str, Any], status: int, content_type: str, check: str
) -> None:
    ppio_emulator.control.inject_fault(**params)
    response = call(ppio_emulator, "GET", "/pwt-any")
    assert response.status_code == status
    assert response.headers["content-type"].startswith(content_type)
    if check == "invalid-json":
        with pytest.raises(ValueError):
            response.json()
    elif check == "":
        assert response.content == b""
    else:
        assert check in response.text


def test_body_fault_serves_a_task_with_missing_and_wrong_fields(ppio_emulator: EmulatorServer) -> None:
    broken = {"task_id": "pwt-1", "status": "running", "image_size": "big", "reason": None}
    ppio_emulator.control.inject_fault("body", body=broken)
    assert call(ppio_emulator, "GET", "/pwt-1").json() == broken


def test_huge_body(ppio_emulator: EmulatorServer) -> None:
    ppio_emulator.control.inject_fault("huge_body", megabytes=3)
    response = call(ppio_emulator, "GET")
    assert len(response.content) == 3 * 1024 * 1024
    assert int(response.headers["content-length"]) == 3 * 1024 * 1024
    assert set(response.json()) == {"padding"}


def test_drop_before_response(ppio_emulator: EmulatorServer) -> None:
    ppio_emulator.control.inject_fault("drop")
    with pytest.raises(requests.ConnectionError):
        call(ppio_emulator, "GET")
    assert call(ppio_emulator, "GET").status_code == 200
    assert ppio_emulator.control.requests_log()[0]["status"] is None


def test_drop_mid_body(ppio_emulator: EmulatorServer) -> None:
    ppio_emulator.control.inject_fault("drop", when="mid_body")
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        call(ppio_emulator, "GET")
    assert call(ppio_emulator, "GET").status_code == 200


def test_trickle_sends_the_real_response_slowly(ppio_emulator_factory: Factory) -> None:
    ppio_emulator = ppio_emulator_factory()  # own server: the abandoned slow response stays here
    task_id = create(ppio_emulator)
    expected = get(ppio_emulator, task_id)
    ppio_emulator.control.inject_fault("trickle", interval=0.001)
    start = time.monotonic()
    response = call(ppio_emulator, "GET", f"/{task_id}")
    assert response.json() == expected
    assert time.monotonic() - start >= len(response.content) * 0.001
    # a slow trickle outlasts a read timeout far longer than one byte's delay
    ppio_emulator.control.inject_fault("trickle", interval=0.05)
    start = time.monotonic()
    with requests.get(
        f"{ppio_emulator.base_url}{PATH}/{task_id}", headers=ppio_emulator.auth_headers, timeout=1, stream=True
    ) as slow:
        first = next(slow.iter_content(1))
    assert first == b"{"
    assert time.monotonic() - start < 1


# ------------------------------------------------------------------------------------------------
# Server, CLI, plugin
# ------------------------------------------------------------------------------------------------


def test_server_lifecycle() -> None:
    server = EmulatorServer()
    with pytest.raises(RuntimeError):
        _ = server.base_url
    start = time.monotonic()
    with server:
        assert server.port > 0
        assert server.control.health()["status"] == "ok"
        url = server.base_url
    assert time.monotonic() - start < 5
    assert not server.running
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/_emulator/health", timeout=1)
    server.stop()  # idempotent


def test_stop_is_quick_with_a_slow_request_in_flight(ppio_emulator_factory: Factory) -> None:
    emu = ppio_emulator_factory()
    emu.control.inject_fault("latency", seconds=60)
    outcome: list[object] = []

    def slow_call() -> None:
        try:
            outcome.append(call(emu, "GET").status_code)
        except requests.RequestException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=slow_call, daemon=True)
    thread.start()
    time.sleep(0.2)
    start = time.monotonic()
    emu.stop()
    assert time.monotonic() - start < 3
    thread.join(5)
    assert outcome  # the client got an answer (the delay is cut short) or an error, and did not hang


def test_cli_prints_url_serves_and_stops_on_sigterm() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "airflow_provider_ppio.testing.cli", "--port", "0", "--api-key", "k1", "--quota", "-1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.fullmatch(r"PPIO emulator listening on (http://127\.0\.0\.1:(\d+))\n", line)
        assert match, line
        assert int(match.group(2)) > 0
        response = requests.get(f"{match.group(1)}{PATH}", headers={"Authorization": "Bearer k1"}, timeout=5)
        assert response.status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_cli_rejects_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    from airflow_provider_ppio.testing.cli import main

    assert main(["--port", "0", "--fail-pattern", "("]) == 2
    assert "fail_pattern" in capsys.readouterr().err


def test_imports_stay_cheap_without_fastapi() -> None:
    code = (
        "import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
        "import airflow_provider_ppio.testing as t, airflow_provider_ppio.testing.pytest_plugin\n"
        "import airflow_provider_ppio.testing.cli\n"
        "assert 'airflow_provider_ppio.testing.emulator' not in sys.modules\n"
        "try:\n    t.EmulatorConfig\nexcept ImportError:\n    print('lazy-ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert result.stdout.strip() == "lazy-ok", result.stderr


def test_lazy_package_exports() -> None:
    import airflow_provider_ppio.testing as testing

    assert testing.EmulatorServer is EmulatorServer
    assert testing.EmulatorConfig is EmulatorConfig
    with pytest.raises(AttributeError):
        _ = testing.Nope


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        EmulatorConfig(pending_seconds=-1)
    with pytest.raises(ValueError):
        EmulatorConfig(quota=-2)
    with pytest.raises(ValueError):
        EmulatorConfig(fail_pattern="[")
