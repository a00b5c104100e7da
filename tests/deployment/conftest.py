"""
A real Airflow 3 deployment on loopback, for the tests marked ``deployment``.

One deployment per test session (tests/deployment_harness.py): ``airflow db migrate``, then the scheduler
(LocalExecutor), triggerer, dag-processor and api-server on SQLite as separate process groups, plus the
PPIO emulator in this process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deployment_harness import (
    API_KEY,
    Deployment,
    checked,
    output_dir,
    pytest_runtest_makereport,  # noqa: F401 - a hook: importing it registers it here
    running,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip this directory's tests on Airflow 2 (no api-server, triggerer logs or REST API v2 there)."""
    import airflow

    if int(airflow.__version__.split(".")[0]) >= 3:
        return
    here = Path(__file__).parent
    skip = pytest.mark.skip(reason=f"the deployment tests need Airflow 3 (this is {airflow.__version__})")
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def deployment_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the deployment's logs and the tests' screenshots go (``$PPIO_DEPLOYMENT_OUT`` if set)."""
    return output_dir(tmp_path_factory, "deployment-out")


@pytest.fixture(scope="session")
def deployment_emulator() -> Iterator[Any]:
    """The PPIO emulator on loopback, accepting :data:`API_KEY`."""
    from airflow_provider_ppio.testing.emulator import EmulatorConfig
    from airflow_provider_ppio.testing.server import EmulatorServer

    with EmulatorServer(EmulatorConfig(api_key=API_KEY)) as server:
        yield server


@pytest.fixture(scope="session")
def _deployment(
    tmp_path_factory: pytest.TempPathFactory, deployment_out: Path, deployment_emulator: Any
) -> Iterator[Deployment]:
    home = tmp_path_factory.mktemp("airflow-home")
    with running(Deployment(home, deployment_out, deployment_emulator.base_url)) as deployment:
        deployment.add_ppio_connection({"backoff_initial": 0.01, "max_attempts": 3, "timeout": 10})
        yield deployment


@pytest.fixture
def deployment(_deployment: Deployment, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """The running deployment; prints the components' logs after a failed test."""
    yield from checked(_deployment, request.node)
