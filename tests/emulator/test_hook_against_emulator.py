"""The hook against the emulator: quota refusals in PPIO's words, and connections written by hand (URI, port)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from airflow_provider_ppio.exceptions import (
    PPIOAuthError,
    PPIOConnectionConfigError,
    PPIOQuotaExceededError,
    PPIORateLimitError,
)
from airflow_provider_ppio.hooks.ppio import PPIOHook
from airflow_provider_ppio.testing.emulator import FakeClock
from airflow_provider_ppio.testing.server import EmulatorServer

TASKS = "/gpus/v2/prewarm-tasks"
IMAGE = "registry.example.com/team/app:1"
Factory = Callable[..., EmulatorServer]


def use(monkeypatch: pytest.MonkeyPatch, conn: str, conn_id: str = "ppio_default") -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", conn)


def json_conn(emu: EmulatorServer, **fields: Any) -> str:
    conn = {"conn_type": "ppio", "host": emu.base_url, "password": emu.api_key, "extra": {"backoff_initial": 0.01}}
    return json.dumps({**conn, **fields})


def create_async(hook: PPIOHook) -> Any:
    body = {"image": IMAGE, "region_id": "r"}
    return asyncio.run(hook.arequest("POST", TASKS, json=body, idempotent=False, allow_empty=True))


def creates(emu: EmulatorServer) -> list[dict[str, Any]]:
    return [entry for entry in emu.control.requests_log() if entry["method"] == "POST"]


# -- quota in PPIO's words ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 403, 429])
@pytest.mark.parametrize("transport", ["sync", "async"])
def test_a_quota_refusal_in_ppio_s_words_is_a_quota_error_at_any_status(
    ppio_emulator_factory: Factory, monkeypatch: pytest.MonkeyPatch, status: int, transport: str
) -> None:
    emu = ppio_emulator_factory(quota=0, quota_status=status)
    use(monkeypatch, json_conn(emu))
    with pytest.raises(PPIOQuotaExceededError) as info:
        if transport == "sync":
            PPIOHook().create_prewarm_task(IMAGE, "r")
        else:
            create_async(PPIOHook())
    error = info.value
    assert not isinstance(error, (PPIOAuthError, PPIORateLimitError))
    assert (error.http_status, error.api_reason) == (status, "IMAGE_PREWARM_NUM_LIMIT")
    assert error.api_message == "Image prewarm number exceeds limit"
    assert [entry["reason"] for entry in creates(emu)] == ["IMAGE_PREWARM_NUM_LIMIT"]  # refused once, not retried


def test_when_finished_tasks_count_the_error_says_to_delete_them(
    ppio_emulator_factory: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    emu = ppio_emulator_factory(clock=clock, quota=1, quota_counts_finished=True)
    use(monkeypatch, json_conn(emu))
    hook = PPIOHook()
    first = hook.create_prewarm_task(IMAGE, "r")
    clock.advance(60)
    assert hook.get_prewarm_task(first).status.status == "succeeded"
    with pytest.raises(PPIOQuotaExceededError) as info:
        hook.create_prewarm_task(IMAGE, "r")
    assert "until they are deleted" in str(info.value)
    assert "PPIODeletePrewarmTasksOperator" in str(info.value)
    hook.delete_prewarm_tasks([first])
    assert hook.create_prewarm_task(IMAGE, "r")


# -- connections written by hand ------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["sync", "async"])
@pytest.mark.parametrize("form", ["uri", "uri with the scheme in the host", "json port field"])
def test_a_connection_with_a_port_reaches_the_emulator_on_its_port(
    ppio_emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch, transport: str, form: str
) -> None:
    ppio_emulator.control.seed_task(task_id="pw-1", state="succeeded")
    port = int(ppio_emulator.base_url.rsplit(":", 1)[1])
    key = quote(ppio_emulator.api_key, safe="")
    if form == "uri":
        # No scheme means https; plain http is allowed to this machine, so the URI names it (as %-encoded host).
        conn = f"ppio://:{key}@{quote('http://127.0.0.1', safe='')}:{port}"
    elif form == "uri with the scheme in the host":
        conn = f"ppio://:{key}@{quote('http://localhost', safe='')}:{port}/?timeout=5"
    else:
        conn = json_conn(ppio_emulator, host="http://127.0.0.1", port=port)
    use(monkeypatch, conn)
    hook = PPIOHook()
    task = hook.get_prewarm_task("pw-1") if transport == "sync" else asyncio.run(hook.aget_prewarm_task("pw-1"))
    assert task.status.status == "succeeded"
    assert [entry["auth_valid"] for entry in ppio_emulator.control.requests_log()] == [True]


@pytest.mark.parametrize("transport", ["sync", "async"])
def test_a_postgres_connection_named_by_mistake_sends_nothing(
    ppio_emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch, transport: str
) -> None:
    port = int(ppio_emulator.base_url.rsplit(":", 1)[1])
    use(monkeypatch, f"postgres://app:pg_password_123@127.0.0.1:{port}/app", "warehouse")
    hook = PPIOHook("warehouse")
    with pytest.raises(PPIOConnectionConfigError, match="'postgres'"):
        hook.get_prewarm_task("pw-1") if transport == "sync" else asyncio.run(hook.aget_prewarm_task("pw-1"))
    assert ppio_emulator.control.requests_log() == []
