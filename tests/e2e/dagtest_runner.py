"""
Run a DAG with ``airflow dags test`` in a throwaway ``AIRFLOW_HOME`` and read back what happened.

Used by the end-to-end tests (through the fixtures in ``conftest.py``) and by ``scripts/demo.py``. It needs
only the standard library, so the demo can use it without pytest. Works on Airflow 2.11 and 3.x: the task
states and XComs are read straight from the SQLite metadata database, and the task logs are taken from the
command's output (where ``dags test`` prints them on both lines) plus any files under ``$AIRFLOW_HOME/logs``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_DAGS = REPO / "example_dags"
DB_NAME = "airflow.db"
#: The example deployment gate DAG, and the path of one prewarm task (id appended).
GATE_DAG = "example_ppio_prewarm_gate"
TASK_PATH = "/gpus/v2/prewarm-tasks/"
#: The key the e2e emulator accepts: distinctive, so finding it in any output, log or database is a leak.
E2E_API_KEY = "sk_e2e_DO_NOT_LEAK_4b1d9e2a"
#: A line Airflow 3.0.x itself prints under ``dags test``: its in-process supervisor logs each request of the task
#: at debug level, including the ``MaskSecret`` requests that register a connection's password with the masker,
#: value in clear (``InProcessSupervisorComms.send``). Not the provider's doing, so the leak checks set these
#: whole lines aside; any other line holding a secret is still a leak.
AIRFLOW_MASK_SECRET_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d[ T][\d:.,+Z]+ \[debug\s*\] Sending request\s+"
    r"msg=MaskSecret\(value=.*, name=(?:None|'[^']*'), type='MaskSecret'\)\s*$",
    re.MULTILINE,
)


def without_airflow_mask_secret_lines(text: str) -> str:
    """
    ``text`` with Airflow's own ``MaskSecret`` debug lines (:data:`AIRFLOW_MASK_SECRET_LINE`) removed.

    :param text: Command output or a log file.
    """
    return AIRFLOW_MASK_SECRET_LINE.sub("", text)


def airflow_env(
    home: Path, *, dags_folder: Path = EXAMPLE_DAGS, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """
    The environment for an Airflow CLI call confined to ``home``.

    Every ``AIRFLOW*`` variable of the calling process is dropped first, so nothing from the caller (another
    home, a connection, unit-test mode) leaks into the run.

    :param home: The AIRFLOW_HOME; its ``airflow.db`` is the metadata database.
    :param dags_folder: Where the DAG files are.
    :param extra: Variables to add last, e.g. ``AIRFLOW_CONN_PPIO_DEFAULT``.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(dags_folder),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / DB_NAME}",
        # Without a TTY some libraries colour or page their output; keep it plain for assertions.
        NO_COLOR="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


def airflow_command(*args: str, python: str = sys.executable) -> list[str]:
    """
    ``python -m airflow ARGS``: the Airflow of the given interpreter, whatever PATH says.

    :param args: CLI arguments.
    :param python: The interpreter whose Airflow to use.
    """
    return [python, "-m", "airflow", *args]


def migrate_db(home: Path, *, python: str = sys.executable, timeout: float = 300) -> None:
    """
    Create the metadata database in ``home`` with ``airflow db migrate``.

    :param home: The AIRFLOW_HOME to create it in.
    :param python: The interpreter whose Airflow to use.
    :param timeout: Seconds before giving up.
    """
    home.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        airflow_command("db", "migrate", python=python),
        env=airflow_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def new_home(path: Path, template: Path | None = None) -> Path:
    """
    Prepare an AIRFLOW_HOME at ``path``: a copy of ``template``'s migrated database, or a fresh migration.

    :param path: The directory to use (created if needed).
    :param template: A home already migrated by :func:`migrate_db`, to copy instead of migrating again.
    """
    path.mkdir(parents=True, exist_ok=True)
    if template is not None:
        shutil.copyfile(template / DB_NAME, path / DB_NAME)
    else:
        migrate_db(path)
    return path


@dataclasses.dataclass
class DagRunResult:
    """
    What one ``airflow dags test`` run left behind.

    :param dag_id: The DAG.
    :param run_id: The run's id, or "" when no run was created.
    :param returncode: Exit code of the command (non-zero when the run failed).
    :param output: stdout and stderr of the command (task logs are printed there).
    :param task_states: task_id -> final state of each task instance (unmapped).
    :param xcoms: task_id -> key -> decoded value of each XCom of the run (unmapped).
    :param log_files: The text of every file under ``$AIRFLOW_HOME/logs``, by path.
    :param home: The AIRFLOW_HOME used.
    :param seconds: Wall time of the command.
    """

    dag_id: str
    run_id: str
    returncode: int
    output: str
    task_states: dict[str, str]
    xcoms: dict[str, dict[str, Any]]
    log_files: dict[str, str]
    home: Path
    seconds: float

    @property
    def logs(self) -> str:
        """Everything the run logged: the command output and the log files."""
        return "\n".join([self.output, *self.log_files.values()])

    @property
    def checked_logs(self) -> str:
        """What the leak checks read: :attr:`logs` without Airflow 3.0's own ``MaskSecret`` debug lines."""
        return without_airflow_mask_secret_lines(self.logs)

    @property
    def airflow_mask_secret_lines(self) -> list[str]:
        """Airflow's own ``MaskSecret`` debug lines in :attr:`logs`, which the leak checks set aside."""
        return [match.group(0) for match in AIRFLOW_MASK_SECRET_LINE.finditer(self.logs)]

    def xcom(self, task_id: str, key: str = "return_value") -> Any:
        """
        One XCom value; ``KeyError`` naming what exists when it is missing.

        :param task_id: The task that pushed it.
        :param key: The XCom key.
        """
        try:
            return self.xcoms[task_id][key]
        except KeyError:
            raise KeyError(f"no XCom {key!r} from {task_id!r}; the run has {self.xcoms}") from None

    def task_log(self, task_id: str) -> str:
        """
        The part of the output logged while ``task_id`` ran ("" if it never started).

        ``dags test`` runs tasks one after another and marks each start with ``[DAG TEST] starting task_id=``
        on Airflow 2.11 and 3.x alike.

        :param task_id: The task.
        """
        marker = "[DAG TEST] starting task_id="
        start = self.output.find(f"{marker}{task_id} ")
        if start < 0:
            return ""
        end = self.output.find(marker, start + len(marker))
        return self.output[start : end if end >= 0 else None]

    def secret_leaks(self, secret: str) -> list[str]:
        """
        Where ``secret`` appears: the output, a log file, an XCom value or anywhere in the metadata database.

        Airflow 3.0's own ``MaskSecret`` debug lines (:data:`AIRFLOW_MASK_SECRET_LINE`) are not counted.

        :param secret: The string that must not appear (an API key).
        """
        places = []
        if secret in without_airflow_mask_secret_lines(self.output):
            places.append("dags test output")
        places.extend(
            f"log file {path}"
            for path, text in self.log_files.items()
            if secret in without_airflow_mask_secret_lines(text)
        )
        if secret in json.dumps(self.xcoms):
            places.append("XCom")
        db = self.home / DB_NAME
        if db.exists() and secret.encode() in db.read_bytes():
            places.append(f"metadata database {db}")
        return places

    def describe(self) -> str:
        """A summary for assertion messages, with the tail of the output."""
        tail = "\n".join(self.output.splitlines()[-40:])
        return (
            f"dags test {self.dag_id} exited {self.returncode} after {self.seconds:.1f}s; "
            f"states={self.task_states}\n--- last lines of the output ---\n{tail}"
        )


def decode_xcom(raw: Any) -> Any:
    """
    Decode an XCom value as stored by Airflow's default backend.

    Airflow 2.11 stores the JSON as bytes (a BLOB), Airflow 3 as text in a JSON column; both decode to the
    same value.

    :param raw: The ``xcom.value`` column.
    """
    if raw is None:
        return None
    if isinstance(raw, bytes | bytearray | memoryview):
        raw = bytes(raw).decode()
    return json.loads(raw)


def read_run(db: Path, dag_id: str) -> tuple[str, dict[str, str], dict[str, dict[str, Any]]]:
    """
    The latest run of ``dag_id``: its run id, task states and XComs.

    :param db: The SQLite metadata database.
    :param dag_id: The DAG.
    """
    if not db.exists():
        return "", {}, {}
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        row = conn.execute("SELECT run_id FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", (dag_id,)).fetchone()
        if row is None:
            return "", {}, {}
        run_id = row[0]
        states = {
            task_id: state or "none"
            for task_id, state in conn.execute(
                "SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ? AND map_index < 0",
                (dag_id, run_id),
            )
        }
        xcoms: dict[str, dict[str, Any]] = {}
        for task_id, key, value in conn.execute(
            "SELECT task_id, key, value FROM xcom WHERE dag_id = ? AND run_id = ? AND map_index < 0",
            (dag_id, run_id),
        ):
            xcoms.setdefault(task_id, {})[key] = decode_xcom(value)
    return run_id, states, xcoms


def read_log_files(home: Path) -> dict[str, str]:
    """
    The text of every file under ``home/logs``.

    :param home: The AIRFLOW_HOME.
    """
    root = home / "logs"
    if not root.is_dir():
        return {}
    return {str(path): path.read_text(errors="replace") for path in sorted(root.rglob("*")) if path.is_file()}


def run_dag_test(
    home: Path,
    dag_id: str,
    *,
    conf: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    dags_folder: Path = EXAMPLE_DAGS,
    python: str = sys.executable,
    timeout: float = 600,
) -> DagRunResult:
    """
    Run ``airflow dags test DAG_ID --conf CONF`` in ``home`` (already migrated) and collect the results.

    :param home: A migrated AIRFLOW_HOME (see :func:`new_home`); one run per home keeps results apart.
    :param dag_id: The DAG to run.
    :param conf: The run's conf (params).
    :param env: Extra environment, e.g. ``AIRFLOW_CONN_PPIO_DEFAULT``.
    :param dags_folder: Where the DAG files are.
    :param python: The interpreter whose Airflow to use.
    :param timeout: Seconds before the command is killed (the test then fails with the output so far).
    """
    args = ["dags", "test", dag_id]
    if conf is not None:
        args += ["--conf", json.dumps(dict(conf))]
    started = time.monotonic()
    try:
        done = subprocess.run(
            airflow_command(*args, python=python),
            env=airflow_env(home, dags_folder=dags_folder, extra=env),
            cwd=home,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
        returncode, output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as err:
        partial = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else err.stdout or ""
        returncode, output = -9, partial + f"\n[killed after {timeout}s]"
    seconds = time.monotonic() - started
    run_id, states, xcoms = read_run(home / DB_NAME, dag_id)
    return DagRunResult(
        dag_id=dag_id,
        run_id=run_id,
        returncode=returncode,
        output=output,
        task_states=states,
        xcoms=xcoms,
        log_files=read_log_files(home),
        home=home,
        seconds=seconds,
    )


class DagTestRunner:
    """
    Runs DAGs with ``airflow dags test``, each run in a new AIRFLOW_HOME, connected to an emulator.

    :param workdir: Where the homes are created.
    :param template: A migrated home to copy the database from.
    :param emulator: The emulator ``ppio_default`` points at.
    """

    def __init__(self, workdir: Path, template: Path, emulator: Any) -> None:
        self.workdir = workdir
        self.template = template
        self.emulator = emulator
        self._count = itertools.count(1)

    def run(
        self,
        dag_id: str,
        conf: Mapping[str, Any] | None = None,
        *,
        api_key: str | None = None,
        conn_extra: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        dags_folder: Path = EXAMPLE_DAGS,
        timeout: float = 300,
    ) -> DagRunResult:
        """
        Run ``dag_id`` once and return what it left behind.

        :param dag_id: The DAG.
        :param conf: The run's conf.
        :param api_key: The key in the connection; the emulator's own key by default.
        :param conn_extra: Connection extras (``backoff_initial`` is 0.01 unless given).
        :param env: More environment variables for the run (e.g. ``AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE``).
        :param dags_folder: Where the DAG files are.
        :param timeout: Seconds before the run is killed.
        """
        home = new_home(self.workdir / f"airflow-home-{next(self._count)}", template=self.template)
        run_env = ppio_connection(
            self.emulator.base_url, self.emulator.api_key if api_key is None else api_key, **(conn_extra or {})
        )
        run_env.update(env or {})
        return run_dag_test(home, dag_id, conf=conf, env=run_env, dags_folder=dags_folder, timeout=timeout)


@contextlib.contextmanager
def on_first_read(
    control: Any, prewarm_task_id: str, action: Callable[[], Any], timeout: float = 300
) -> Iterator[None]:
    """
    Call ``action`` (e.g. a state change) as soon as the emulator has answered a read of one prewarm task.

    A DAG run takes seconds to start, so an emulator timeline started at seed time would race with it;
    this instead lets the sensor see the task's first state, then moves it on. Runs in a thread while the
    ``with`` block runs; errors in ``action`` are re-raised at the end of the block.

    :param control: The emulator's control client (``EmulatorControl``, e.g. ``server.control``).
    :param prewarm_task_id: The task whose first ``GET`` triggers the action.
    :param action: What to do then.
    :param timeout: Seconds to wait for the first read before giving up quietly.
    """
    done = threading.Event()
    errors: list[BaseException] = []
    path = f"{TASK_PATH}{prewarm_task_id}"

    def watch() -> None:
        deadline = time.monotonic() + timeout
        try:
            while not done.is_set() and time.monotonic() < deadline:
                if any(
                    entry["method"] == "GET" and entry["path"] == path and entry["status"] == 200
                    for entry in control.requests_log()
                ):
                    action()
                    return
                done.wait(0.2)
        except BaseException as err:  # reported to the test below
            errors.append(err)

    watcher = threading.Thread(target=watch, name=f"on-first-read-{prewarm_task_id}", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join(10)
    if errors:
        raise errors[0]


def gets_of(emulator: Any, task_id: str) -> list[dict[str, Any]]:
    """
    The emulator's log of GET requests for one prewarm task.

    :param emulator: The emulator server (its ``control`` client reads the log).
    :param task_id: The prewarm task.
    """
    return [
        entry
        for entry in emulator.control.requests_log()
        if entry["method"] == "GET" and entry["path"] == f"{TASK_PATH}{task_id}"
    ]


def ppio_connection(base_url: str, api_key: str, **extra: Any) -> dict[str, str]:
    """
    ``AIRFLOW_CONN_PPIO_DEFAULT`` for an emulator (or any PPIO endpoint), as an env mapping.

    :param base_url: The API root, e.g. ``http://127.0.0.1:PORT``.
    :param api_key: The key, sent as the connection password.
    :param extra: Connection extras; ``backoff_initial`` defaults to 0.01 s so retries stay quick.
    """
    conn = {"conn_type": "ppio", "host": base_url, "password": api_key, "extra": {"backoff_initial": 0.01, **extra}}
    return {"AIRFLOW_CONN_PPIO_DEFAULT": json.dumps(conn)}
