"""
A distributed Airflow 3 deployment on this machine, for the tests marked ``distributed``.

PostgreSQL as the metadata database, Redis as the Celery broker (tests/distributed/servers.py), and Airflow
with the CeleryExecutor: api-server, scheduler, dag-processor, two Celery workers and two triggerers, each its
own process group (tests/deployment_harness.py), plus the PPIO emulator in this process. Everything listens on
127.0.0.1. Needs the af3-dist venv (the Celery provider, psycopg2) and Debian's postgresql and redis-server:
``make test-distributed`` sets up both. Without them the tests are skipped, except in CI, where that fails.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deployment_harness import (
    API_KEY,
    Component,
    Deployment,
    checked,
    output_dir,
    pytest_runtest_makereport,  # noqa: F401 - a hook: importing it registers it here
    running,
)

HERE = Path(__file__).resolve().parent
DAGS = HERE / "dags"
WORKERS = ("worker-1", "worker-2")
TRIGGERERS = ("triggerer-1", "triggerer-2")
#: Task slots per Celery worker.
WORKER_CONCURRENCY = 4
#: Failover settings, far below the defaults (5 s heartbeats, 30 s / 300 s thresholds) so that a killed
#: triggerer's waits are adopted, and a killed worker's tasks retried, within the test's 10-minute budget.
TRIGGERER_HEARTBEAT = 2
TRIGGERER_HEALTH_THRESHOLD = 10
TASK_HEARTBEAT_TIMEOUT = 20


def _wrong_venv() -> str | None:
    import airflow

    if int(airflow.__version__.split(".")[0]) < 3:
        return f"the distributed tests need Airflow 3 (this is {airflow.__version__})"
    for module in ("airflow.providers.celery", "psycopg2", "asyncpg"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed in this venv (make test-distributed uses .venvs/af3-dist)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """
    Skip the ``distributed`` tests in a venv without their packages; without PostgreSQL or Redis too, except in
    CI (where ``make test-distributed`` installs them, so missing servers are a set-up bug).
    """
    from servers import missing

    mine = [item for item in items if HERE in Path(item.path).parents]
    if not mine:
        return
    reason = _wrong_venv()
    if reason is None:
        reason = missing()
        if reason is not None and os.environ.get("CI"):
            raise pytest.UsageError(f"the distributed tests cannot run in CI: {reason}")
    if reason is None:
        return
    for item in mine:
        item.add_marker(pytest.mark.skip(reason=reason))


class DistributedDeployment(Deployment):
    """
    Airflow with the CeleryExecutor on PostgreSQL and Redis: two workers, two triggerers.

    :param home: The throwaway ``AIRFLOW_HOME``.
    :param out_dir: Where the process logs go.
    :param emulator_url: Base URL of the PPIO emulator.
    :param database_url: SQLAlchemy URL of the metadata database.
    :param broker_url: Celery broker URL.
    """

    def __init__(self, home: Path, out_dir: Path, emulator_url: str, database_url: str, broker_url: str) -> None:
        self.database_url = database_url
        self.broker_url = broker_url
        super().__init__(home, out_dir, emulator_url, dags_folder=DAGS)

    def _environment(self) -> dict[str, str]:
        env = super()._environment()
        backend = "db+" + self.database_url
        env.update(
            {
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CORE__PARALLELISM": "64",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database_url,
                "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
                "AIRFLOW__CELERY__RESULT_BACKEND": backend,
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(WORKER_CONCURRENCY),
                # Each process names itself after its component (see component_name.py).
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "component_name.hostname",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
                "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": str(TRIGGERER_HEARTBEAT),
                "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": str(TRIGGERER_HEALTH_THRESHOLD),
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(TASK_HEARTBEAT_TIMEOUT),
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
                # A task a killed worker had taken off the queue but not started stays queued until this.
                "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "90",
                "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "15",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            }
        )
        return env

    def components(self) -> dict[str, Component]:
        """The api-server, scheduler and dag-processor, two Celery workers and two triggerers."""
        named = {name: (args, {"PPIO_COMPONENT_NAME": name}) for name, (args, _) in super().components().items()}
        del named["triggerer"]
        for name in WORKERS:
            args = ["celery", "worker", "--skip-serve-logs", "--celery-hostname", f"{name}@localhost"]
            named[name] = ([*args, "--concurrency", str(WORKER_CONCURRENCY)], {"PPIO_COMPONENT_NAME": name})
        for name in TRIGGERERS:
            named[name] = (["triggerer", "--skip-serve-logs"], {"PPIO_COMPONENT_NAME": name})
        return named


@pytest.fixture(scope="session")
def distributed_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the deployment's logs, the database dump and the figures go (``$PPIO_DEPLOYMENT_OUT`` if set)."""
    return output_dir(tmp_path_factory, "distributed-out")


@pytest.fixture(scope="session")
def distributed_emulator() -> Iterator[Any]:
    """
    The PPIO emulator on loopback: no quota (every run's prewarms run at once), created prewarms stay running
    until the test finishes them, and the request log keeps every request of the run.
    """
    from airflow_provider_ppio.testing.emulator import EmulatorConfig
    from airflow_provider_ppio.testing.server import EmulatorServer

    config = EmulatorConfig(
        api_key=API_KEY, quota=None, pending_seconds=0, running_seconds=24 * 3600, request_log_size=1_000_000
    )
    with EmulatorServer(config) as server:
        yield server


def _serving(server: Any) -> Iterator[Any]:
    """Start a server for the session and stop it at the end, also if the session ends without teardown."""
    atexit.register(server.stop)  # stop() is idempotent
    try:
        server.start()
        yield server
    finally:
        server.stop()
        atexit.unregister(server.stop)


@pytest.fixture(scope="session")
def postgres(distributed_out: Path) -> Iterator[Any]:
    """A throwaway PostgreSQL cluster (see servers.py)."""
    from servers import PostgresCluster

    yield from _serving(PostgresCluster(distributed_out / "process-logs"))


@pytest.fixture(scope="session")
def redis(distributed_out: Path) -> Iterator[Any]:
    """A Redis server, the Celery broker (see servers.py)."""
    from servers import RedisServer

    yield from _serving(RedisServer(distributed_out / "process-logs"))


@pytest.fixture(scope="session")
def _distributed(
    tmp_path_factory: pytest.TempPathFactory,
    distributed_out: Path,
    distributed_emulator: Any,
    postgres: Any,
    redis: Any,
) -> Iterator[DistributedDeployment]:
    home = tmp_path_factory.mktemp("airflow-home")
    deployment = DistributedDeployment(home, distributed_out, distributed_emulator.base_url, postgres.url, redis.url)
    with running(deployment) as started:
        # A create whose answer does not come within 30 s is looked for by its marker (operators/prewarm.py).
        started.add_ppio_connection({"backoff_initial": 0.05, "max_attempts": 4, "timeout": 30})
        yield started


#: What the tests put in the ``figures`` fixture, printed at the end of the session.
_FIGURES: dict[str, Any] = {}


@pytest.fixture(scope="session")
def figures() -> dict[str, Any]:
    """A dict for the run's figures; the terminal summary prints it, pass or fail."""
    return _FIGURES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _FIGURES:
        terminalreporter.section("distributed deployment figures")
        terminalreporter.write_line(json.dumps(_FIGURES, indent=2))


@pytest.fixture
def distributed(_distributed: DistributedDeployment, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """The running distributed deployment; prints the components' logs after a failed test."""
    yield from checked(_distributed, request.node)
