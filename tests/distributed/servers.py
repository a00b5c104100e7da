"""
The distributed deployment's servers: a throwaway PostgreSQL cluster and a Redis broker, on loopback.

Both come from Debian's packages (``scripts/install_distributed.sh``) and are started by the test on free
ports, with their data in a temporary directory removed at the end. PostgreSQL refuses to run as root, so
as root its commands run as ``nobody`` (``runuser``); the data directory is handed to that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from deployment_harness import free_port

START_TIMEOUT = 60.0
UNPRIVILEGED_USER = "nobody"


def postgres_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb``, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def missing() -> str | None:
    """Why the servers cannot start here (what to install), or None."""
    if postgres_bin() is None:
        return "PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb); run scripts/install_distributed.sh"
    if shutil.which("redis-server") is None:
        return "redis-server is not installed; run scripts/install_distributed.sh"
    return None


class PostgresCluster:
    """
    ``initdb`` + ``pg_ctl start`` in a temporary directory, listening on 127.0.0.1 only.

    :param log_dir: Where its server log is copied at :meth:`stop`.
    """

    user = "airflow"
    database = "airflow"

    def __init__(self, log_dir: Path) -> None:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise RuntimeError(missing())
        self.bin = bin_dir
        self.log_dir = log_dir
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.root = Path(tempfile.mkdtemp(prefix="ppio-postgres-"))
        self.data = self.root / "data"
        self._started = False

    @property
    def url(self) -> str:
        """The SQLAlchemy URL Airflow uses."""
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def _as_owner(self, args: list[str]) -> list[str]:
        return ["runuser", "-u", UNPRIVILEGED_USER, "--", *args] if os.geteuid() == 0 else args

    def client_env(self) -> dict[str, str]:
        """Environment for the client tools (psql, pg_dump): the password, no user-level settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGPASSWORD"] = self.password
        return env

    def start(self) -> None:
        """Create the cluster and its database, start the server, wait until it accepts connections."""
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.root, UNPRIVILEGED_USER)
            shutil.chown(pwfile, UNPRIVILEGED_USER)
        pwfile.chmod(0o600)
        subprocess.run(
            self._as_owner(
                [
                    *(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "--pwfile", str(pwfile)),
                    *("--auth=scram-sha-256", "--encoding=UTF8", "--locale=C"),
                ]
            ),
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT,
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} "
            # A throwaway cluster: no crash safety needed, and more connections than the default 100 for
            # seven Airflow processes with their connection pools.
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        subprocess.run(
            self._as_owner(
                [
                    *(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log")),
                    *("-o", options, "-w", "-t", str(int(START_TIMEOUT)), "start"),
                ]
            ),
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT + 10,
        )
        self._started = True
        self.client("createdb", self.database)

    @property
    def pid(self) -> int:
        """The postmaster's process id."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def client(self, tool: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[bytes]:
        """
        Run a client tool (``psql``, ``pg_dump``, ``createdb``) against the cluster as :attr:`user`.

        :param tool: The tool's name in the PostgreSQL bin directory.
        :param args: Its further arguments.
        :param timeout: Seconds before it is stopped.
        """
        return subprocess.run(
            [str(self.bin / tool), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, *args],
            env=self.client_env(),
            check=True,
            capture_output=True,
            timeout=timeout,
        )

    def query(self, sql: str) -> list[list[str]]:
        """
        Rows of a query, as text.

        :param sql: One SQL statement.
        """
        out = self.client("psql", "-d", self.database, "-At", "-F", "\t", "-c", sql).stdout.decode()
        return [line.split("\t") for line in out.splitlines() if line]

    def stop(self) -> None:
        """Stop the server (fast shutdown, then immediate) and remove its data."""
        if self._started:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(
                    self._as_owner([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]),
                    capture_output=True,
                    timeout=30,
                )
            self._started = False
        with contextlib.suppress(OSError):
            self.log_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.root / "server.log", self.log_dir / "postgres.log")
        shutil.rmtree(self.root, ignore_errors=True)


class RedisServer:
    """
    ``redis-server`` on 127.0.0.1, no persistence, its own process group.

    :param log_dir: Where its log goes.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="ppio-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The Celery broker URL."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start it and wait until it answers PING."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [
                *("redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"),
                *("--dir", str(self.root), "--logfile", str(self.log_dir / "redis.log")),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (see {self.log_dir / 'redis.log'})")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self._proc is not None, "not started"
        return self._proc.pid

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL) and remove its directory."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)
