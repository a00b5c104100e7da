"""The hook's session reads proxy and CA settings from the environment once, and never uses ~/.netrc."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests_mock as rm

from airflow_provider_ppio.hooks.ppio import PPIOHook

TASK_URL = "https://api.ppio.test/gpus/v2/prewarm-tasks/pw-1"
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy")


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in (*_PROXY_VARIABLES, "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def read_task(requests_mock: rm.Mocker, make_task: Callable[..., dict[str, Any]]) -> Any:
    requests_mock.get(TASK_URL, json=make_task("pw-1"))
    PPIOHook().get_prewarm_task("pw-1")
    return requests_mock.last_request


def test_https_proxy_from_the_environment_is_used(
    ppio_conn: str, clean_environment: pytest.MonkeyPatch, requests_mock: rm.Mocker, make_task: Any
) -> None:
    clean_environment.setenv("HTTPS_PROXY", "http://proxy.example:3128")

    assert read_task(requests_mock, make_task).proxies.get("https") == "http://proxy.example:3128"


def test_no_proxy_exempts_the_api_host(
    ppio_conn: str, clean_environment: pytest.MonkeyPatch, requests_mock: rm.Mocker, make_task: Any
) -> None:
    clean_environment.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    clean_environment.setenv("NO_PROXY", "api.ppio.test")

    assert "https" not in read_task(requests_mock, make_task).proxies


def test_requests_ca_bundle_from_the_environment_is_used(
    ppio_conn: str, clean_environment: pytest.MonkeyPatch, requests_mock: rm.Mocker, make_task: Any, tmp_path: Path
) -> None:
    bundle = tmp_path / "corp-ca.pem"
    bundle.write_text("not read by the mock\n")
    clean_environment.setenv("REQUESTS_CA_BUNDLE", str(bundle))

    assert read_task(requests_mock, make_task).verify == str(bundle)


def test_a_netrc_entry_for_the_api_host_does_not_replace_the_api_key(
    ppio_conn: str,
    clean_environment: pytest.MonkeyPatch,
    requests_mock: rm.Mocker,
    make_task: Any,
    api_key: str,
    tmp_path: Path,
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.ppio.test login someone password other-secret\n")
    netrc.chmod(0o600)
    clean_environment.setenv("NETRC", str(netrc))

    assert read_task(requests_mock, make_task).headers["Authorization"] == f"Bearer {api_key}"
