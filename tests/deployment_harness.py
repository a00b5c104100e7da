"""
A real Airflow 3 deployment on loopback, shared by the ``deployment`` tests (tests/deployment) and the
``distributed`` ones (tests/distributed).

:class:`Deployment` starts, from a throwaway ``AIRFLOW_HOME``, ``airflow db migrate`` and then each
component as its own process group: by default the scheduler (LocalExecutor), triggerer, dag-processor and
api-server on SQLite (Airflow 3 no longer refuses it with the LocalExecutor, and workers reach the database
only through the api-server's execution API, so there is a single writer per component and no server to
install). Subclasses change the environment and the component list (tests/distributed: CeleryExecutor on
PostgreSQL, two workers, two triggerers).

Every wait is bounded; every process (with its children: workers, task supervisors) is stopped on every
exit path, including Ctrl-C and SIGTERM (:func:`running`). On a failed test the tails of the process logs
are printed; all logs stay in the output directory (``$PPIO_DEPLOYMENT_OUT``, else a pytest tmp dir).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_DAGS = REPO / "example_dags"
GATE_DAG_ID = "example_ppio_prewarm_gate"
CONN_ID = "ppio_default"
ADMIN_USER = "admin"
#: Same key as the unit tests: distinctive, so finding it in any file of the deployment is a leak.
API_KEY = "sk_test_DO_NOT_LEAK_7f3a9c"

STARTUP_TIMEOUT = float(os.environ.get("PPIO_DEPLOYMENT_STARTUP_TIMEOUT", "300"))
MIGRATE_TIMEOUT = 300.0
STOP_TIMEOUT = 15.0

#: A component: the ``airflow`` sub-command's arguments and environment variables of its own.
Component = tuple[list[str], dict[str, str]]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"<cannot read {path}: {err}>"
    return "\n".join(text.splitlines()[-lines:])


class DeploymentError(RuntimeError):
    """The deployment did not come up or a component died."""


class Deployment:
    """
    An Airflow 3 deployment started as separate processes, driven through its REST API.

    :param home: The throwaway ``AIRFLOW_HOME``.
    :param out_dir: Where process logs (and the tests' screenshots) go.
    :param emulator_url: Base URL of the PPIO emulator the connection points at.
    :param dags_folder: The DAG files the deployment runs.
    """

    #: The parts ``/api/v2/monitor/health`` must report healthy before :meth:`start` returns.
    health_parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")

    def __init__(self, home: Path, out_dir: Path, emulator_url: str, dags_folder: Path = EXAMPLE_DAGS) -> None:
        self.home = home
        self.dags_folder = dags_folder
        self.out_dir = out_dir
        self.log_dir = out_dir / "process-logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.emulator_url = emulator_url
        self.api_key = API_KEY
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.password = secrets.token_urlsafe(12)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        #: Components this test killed on purpose: their death is not a failure.
        self.killed: set[str] = set()
        #: Seconds :meth:`start` took (migration included).
        self.startup_seconds = 0.0
        self._session = requests.Session()
        self._stopped = False
        self.env = self._environment()

    def _environment(self) -> dict[str, str]:
        from cryptography.fernet import Fernet

        # Nothing of the pytest process's Airflow settings (unit test mode, its own home) may leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        passwords = self.home / "simple_auth_manager_passwords.json"
        passwords.write_text(json.dumps({ADMIN_USER: self.password}))
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONUNBUFFERED": "1",
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": "2",
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.home}/airflow.db",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__BASE_URL": self.url,
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
                # The deployment-wide switch users flip: every PrewarmTaskSensor defers to the triggerer.
                "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "True",
            }
        )
        return env

    # -- processes ---------------------------------------------------------------------------------

    def _run(self, name: str, args: list[str], timeout: float) -> None:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "airflow", *args],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            self.processes[name] = proc
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                raise DeploymentError(f"`airflow {' '.join(args)}` took over {timeout:.0f}s") from None
            finally:
                self._stop_one(name)
        if code != 0:
            raise DeploymentError(f"`airflow {' '.join(args)}` exited {code}:\n{_tail(log)}")

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        out = (self.log_dir / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", "airflow", *args],
            env={**self.env, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()

    def components(self) -> dict[str, Component]:
        """The long-running processes, by name (also their log file's name)."""
        # The api-server reads task and trigger logs from this machine's disk; the log servers (which
        # would listen on every interface) are not needed.
        return {
            "api-server": (["api-server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"], {}),
            "scheduler": (["scheduler", "--skip-serve-logs"], {}),
            "triggerer": (["triggerer", "--skip-serve-logs"], {}),
            "dag-processor": (["dag-processor"], {}),
        }

    def start(self) -> None:
        """Migrate the database, start the components and wait until all report healthy."""
        begin = time.monotonic()
        self._run("db-migrate", ["db", "migrate"], MIGRATE_TIMEOUT)
        for name, (args, env) in self.components().items():
            self._spawn(name, args, env)
        self.wait_for(self._healthy, STARTUP_TIMEOUT, "all components healthy")
        self.login()
        self.startup_seconds = time.monotonic() - begin

    def _healthy(self) -> bool:
        try:
            health = self._session.get(f"{self.url}/api/v2/monitor/health", timeout=5).json()
        except (requests.RequestException, ValueError):
            return False
        return all((health.get(part) or {}).get("status") == "healthy" for part in self.health_parts)

    def kill(self, name: str) -> None:
        """
        ``kill -9`` a component's whole process group (its children too), as a machine failure would.

        :param name: The component.
        """
        self.killed.add(name)
        self._stop_one(name)

    def restart(self, name: str, down: Callable[[], None] | None = None) -> None:
        """
        Stop one component the way a rolling restart does (SIGTERM to its process group, SIGKILL after
        :data:`STOP_TIMEOUT`), call ``down`` while it is stopped, and start it again. The old log is kept
        as ``<name>.<n>.log``.

        :param name: The component, e.g. ``"triggerer"``.
        :param down: What to do while it is down.
        """
        proc = self.processes[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._stop_one(name)
        generation = len(list(self.log_dir.glob(f"{name}.*.log"))) + 1
        (self.log_dir / f"{name}.log").rename(self.log_dir / f"{name}.{generation}.log")
        if down is not None:
            down()
        args, env = self.components()[name]
        self._spawn(name, args, env)

    def check_alive(self) -> None:
        """Raise if a long-running component has exited (other than one :meth:`kill` ended)."""
        for name in self.components():
            proc = self.processes.get(name)
            if name not in self.killed and proc is not None and proc.poll() is not None:
                raise DeploymentError(f"{name} exited with {proc.returncode}:\n{_tail(self.log_dir / f'{name}.log')}")

    def wait_for(self, condition: Callable[[], Any], timeout: float, what: str, interval: float = 1.0) -> Any:
        """
        Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds.

        :param condition: The check; its truthy result is returned.
        :param timeout: Seconds before giving up.
        :param what: What is awaited, for the error message.
        :param interval: Seconds between checks.
        """
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            result = condition()
            if result:
                return result
            if time.monotonic() > deadline:
                raise DeploymentError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(interval)

    def _family(self) -> list[Any]:
        """Every live process of this deployment: the started ones, their descendants, and any
        stray whose environment names this ``AIRFLOW_HOME`` (a daemonised task supervisor)."""
        import psutil

        found: dict[int, psutil.Process] = {}
        for proc in self.processes.values():
            try:
                root = psutil.Process(proc.pid)
                found[root.pid] = root
                for child in root.children(recursive=True):
                    found[child.pid] = child
            except psutil.NoSuchProcess:
                continue
        marker = f"AIRFLOW_HOME={self.home}"
        for candidate in psutil.process_iter():
            if candidate.pid in found or candidate.pid == os.getpid():
                continue
            with contextlib.suppress(psutil.Error):
                if candidate.environ().get("AIRFLOW_HOME") == str(self.home) or marker in candidate.cmdline():
                    found[candidate.pid] = candidate
        return list(found.values())

    def listening(self, extra_pids: tuple[int, ...] = ()) -> set[str]:
        """
        The addresses this deployment's processes (and ``extra_pids``, with their children) listen on.

        :param extra_pids: Further processes to look at (servers the deployment uses).
        """
        import psutil

        procs = self._family()
        for pid in extra_pids:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(pid)
                procs += [root, *root.children(recursive=True)]
        found = set()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                for conn in proc.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        found.add(f"{conn.laddr.ip}:{conn.laddr.port}")
        return found

    def _stop_one(self, name: str) -> None:
        proc = self.processes.get(name)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        """Stop every process of the deployment: SIGTERM, then SIGKILL whatever is left."""
        import psutil

        if self._stopped:
            return
        family = self._family()
        for proc in family:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(family, timeout=STOP_TIMEOUT)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=STOP_TIMEOUT)
        for popen in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(1)
        self._session.close()
        self._stopped = True

    def dump_logs(self, lines: int = 80) -> str:
        """The tails of every component's log."""
        parts = []
        for log in sorted(self.log_dir.glob("*.log")):
            parts.append(f"===== {log.name} (last {lines} lines) =====\n{_tail(log, lines)}")
        return "\n".join(parts)

    # -- REST API ----------------------------------------------------------------------------------

    def login(self) -> None:
        """Get a JWT from ``/auth/token`` as the admin user and use it for every later call."""
        response = self._session.post(
            f"{self.url}/auth/token", json={"username": ADMIN_USER, "password": self.password}, timeout=30
        )
        response.raise_for_status()
        self._session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def api(self, method: str, path: str, *, expect: int | tuple[int, ...] = (200,), **kwargs: Any) -> Any:
        """
        Call ``/api/v2`` and return the decoded JSON; fail on an unexpected status.

        :param method: HTTP method.
        :param path: Path below ``/api/v2``.
        :param expect: Acceptable status code(s).
        :param kwargs: Passed to ``requests``.
        """
        kwargs.setdefault("timeout", 30)
        response = self._session.request(method, f"{self.url}/api/v2{path}", **kwargs)
        codes = (expect,) if isinstance(expect, int) else expect
        if response.status_code not in codes:
            raise AssertionError(f"{method} {path} -> HTTP {response.status_code}: {response.text[:2000]}")
        if not response.content:
            return None
        return response.json() if "json" in response.headers.get("content-type", "") else response.text

    def add_ppio_connection(self, extra: dict[str, Any]) -> None:
        """
        Put the PPIO connection in the way an operator would: through the REST API, pointing at the emulator.

        :param extra: The connection's extras (timeouts, retries).
        """
        self.api(
            "POST",
            "/connections",
            expect=201,
            json={
                "connection_id": CONN_ID,
                "conn_type": "ppio",
                "host": self.emulator_url,
                "password": self.api_key,
                "extra": json.dumps(extra),
            },
        )

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> list[dict[str, Any]]:
        """
        A task's whole log through the REST API: Airflow 3's structured entries (``event``, ``level``,
        ``error_detail``...), the worker's and the triggerer's lines together.

        :param dag_id: The DAG.
        :param run_id: The run.
        :param task_id: The task.
        :param try_number: The try.
        """
        body = self.api(
            "GET",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
            params={"full_content": "true"},
            headers={"Accept": "application/json"},
        )
        content = body.get("content") if isinstance(body, dict) else None
        assert isinstance(content, list), f"unexpected log response: {str(body)[:2000]}"
        return [entry if isinstance(entry, dict) else {"event": str(entry)} for entry in content]


def files_containing(needle: bytes, roots: list[Path]) -> list[str]:
    """
    Every file below ``roots`` whose bytes contain ``needle`` (for the API-key leak scans).

    :param needle: What must not be written.
    :param roots: Directories (or files) to read.
    """
    found = []
    for root in roots:
        paths = [root] if root.is_file() else root.rglob("*")
        for path in paths:
            with contextlib.suppress(OSError):
                if path.is_file() and needle in path.read_bytes():
                    found.append(str(path))
    return found


def output_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """
    Where a deployment's logs go: ``$PPIO_DEPLOYMENT_OUT`` if set, else a pytest tmp dir.

    :param tmp_path_factory: pytest's factory.
    :param name: The tmp dir's name.
    """
    configured = os.environ.get("PPIO_DEPLOYMENT_OUT")
    if configured:
        out = Path(configured).resolve()
        out.mkdir(parents=True, exist_ok=True)
        return out
    return tmp_path_factory.mktemp(name)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into an exception so a fixture's teardown (stopping the deployment) still runs."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def running(deployment: Deployment) -> Iterator[Deployment]:
    """
    Start ``deployment``; on every way out (Ctrl-C and SIGTERM included) stop it, and print its logs' tails if
    something failed.

    :param deployment: The deployment.
    """
    # Last resort if the interpreter exits without running fixture teardown; stop() is idempotent.
    atexit.register(deployment.stop)
    with stop_on_sigterm():
        failed = False
        try:
            deployment.start()
            yield deployment
        except BaseException:
            failed = True
            raise
        finally:
            # Stop first: a second Ctrl-C while the logs are printed must not leave processes behind.
            deployment.stop()
            atexit.unregister(deployment.stop)
            if failed:
                sys.stderr.write(deployment.dump_logs() + "\n")
            sys.stderr.write(f"deployment logs: {deployment.log_dir}\n")


_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """
    Remember whether a test's call phase failed (for :func:`failed`). A conftest that uses :func:`checked`
    imports this hook by its name, which is how pytest finds it there.

    :param item: The test.
    :param call: Its phase.
    """
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


def failed(node: pytest.Item) -> bool:
    """
    Whether the test's call phase failed.

    :param node: The test (``request.node``).
    """
    return node.stash.get(_FAILED, False)


def checked(deployment: Deployment, node: pytest.Item) -> Iterator[Deployment]:
    """
    The body of a per-test fixture: the deployment, checked alive first; its components' logs printed
    after a failed test.

    :param deployment: The session's deployment.
    :param node: The test (``request.node``).
    """
    deployment.check_alive()
    yield deployment
    if failed(node):
        sys.stderr.write(deployment.dump_logs() + "\n")
