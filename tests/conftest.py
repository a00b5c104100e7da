"""Shared test setup: an isolated Airflow home for the whole session and a PPIO connection fixture."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# Airflow reads its configuration when first imported: point it at a throwaway home before that.
_AIRFLOW_HOME = tempfile.mkdtemp(prefix="ppio-airflow-home-")
atexit.register(shutil.rmtree, _AIRFLOW_HOME, ignore_errors=True)
os.environ["AIRFLOW_HOME"] = _AIRFLOW_HOME
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "True")
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{_AIRFLOW_HOME}/airflow.db")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", os.path.join(_AIRFLOW_HOME, "dags"))

#: A key distinctive enough that finding it anywhere it should not be is certain to be a leak.
API_KEY = "sk_test_DO_NOT_LEAK_7f3a9c"
BASE_URL = "https://api.ppio.test"


def connection_uri(
    *, password: str | None = API_KEY, host: str | None = BASE_URL, extra: dict[str, Any] | None = None
) -> str:
    """
    The JSON form of a ``ppio`` connection, as it goes into ``AIRFLOW_CONN_*``.

    :param password: The API key.
    :param host: The base URL.
    :param extra: Extras; ``backoff_initial`` defaults to 0.01 so retries are fast.
    """
    conn: dict[str, Any] = {"conn_type": "ppio", "extra": {"backoff_initial": 0.01, **(extra or {})}}
    if password is not None:
        conn["password"] = password
    if host is not None:
        conn["host"] = host
    return json.dumps(conn)


@pytest.fixture(autouse=True)
def _forget_logged_numbers() -> None:
    """Each test sees the once-per-value WARNING for an out-of-range number, whatever ran before it."""
    models = sys.modules.get("airflow_provider_ppio.models")
    if models is not None:
        models._WARNED_NUMBERS.clear()


@pytest.fixture
def api_key() -> str:
    """The API key of the ``ppio_conn`` connection."""
    return API_KEY


@pytest.fixture
def ppio_conn(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``ppio_default`` pointing at :data:`BASE_URL` with :data:`API_KEY`; yields the base URL."""
    monkeypatch.setenv("AIRFLOW_CONN_PPIO_DEFAULT", connection_uri())
    yield BASE_URL


@pytest.fixture
def set_conn(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Set ``AIRFLOW_CONN_<ID>`` from :func:`connection_uri` arguments: ``set_conn(conn_id="x", host=...)``."""

    def setter(conn_id: str = "ppio_default", **kwargs: Any) -> None:
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", connection_uri(**kwargs))

    return setter


@pytest.fixture
def make_task() -> Callable[..., dict[str, Any]]:
    """:func:`task_json`, for tests: ``make_task("pw-1", "failed", reason=["..."])``."""
    return task_json


def task_json(
    task_id: str = "pw-123",
    status: str = "running",
    *,
    error: str = "",
    message: str = "",
    reason: list[str] | str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """
    A prewarm task as the API returns it.

    :param task_id: The task id.
    :param status: ``status.status``.
    :param error: ``status.error``.
    :param message: ``status.message``.
    :param reason: Failure reasons.
    :param fields: Any other top-level fields (override the defaults).
    """
    body: dict[str, Any] = {
        "task_id": task_id,
        "name": "llama-prewarm",
        "image": "registry.example.com/team/llama:1.0",
        "region_id": "us-east-1",
        "product_ids": ["gpu-4090"],
        "image_size": 123456789,
        "created_at": 1767225600,
        "completed_at": 0,
        "registry_auth_id": "",
        "note": "",
        "status": {"status": status, "error": error, "message": message},
        "reason": [] if reason is None else reason,
    }
    body.update(fields)
    return body
