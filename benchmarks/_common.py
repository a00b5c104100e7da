"""
Shared helpers for the benchmark scripts: an API server in its own process, timing, and tables.

The server always runs in a separate process so that ``time.process_time`` in the benchmark
process counts the client's CPU only. Two servers speak the same endpoint and JSON body:

* ``minimal``: a bare asyncio keep-alive HTTP/1.1 server answering a canned prewarm task; the
  least server-side noise, used for the floor and low-noise poke timing.
* ``emulator``: the project's PPIO emulator (FastAPI + uvicorn), the realistic stand-in.

The minimal server also speaks HTTPS (``tls_dir``: a directory from :func:`make_tls_files`, whose
``ca.pem`` the client trusts). Run ``python benchmarks/_common.py serve minimal|emulator [TLS_DIR]``
to start one by hand; it prints one JSON line (``base_url``, ``api_key``, ``task_id``) and serves
until its stdin closes.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

TASK_ID = "pwt-bench"
TASK_PATH = f"/gpus/v2/prewarm-tasks/{TASK_ID}"
API_KEY = "sk_bench_key"
#: The body the emulator renders for a running task: the minimal server answers these exact bytes.
TASK_BODY = {
    "task_id": TASK_ID,
    "name": "image:tag",
    "image": "registry.example.com/team/image:tag",
    "region_id": "region-a",
    "product_ids": [],
    "image_size": 2002837312,
    "created_at": int(time.time()),
    "completed_at": 0,
    "status": {"status": "running", "error": "", "message": "pulling image on 5 nodes"},
    "registry_auth_id": "",
    "note": "",
    "reason": [],
}


@dataclass(frozen=True)
class Server:
    """A running API server: where it is and the key it accepts."""

    kind: str
    base_url: str
    api_key: str
    task_id: str
    #: The CA file to trust for an HTTPS server; None for plain HTTP.
    ca_file: str | None = None

    @property
    def port(self) -> int:
        """The TCP port."""
        return int(self.base_url.rsplit(":", 1)[1])

    def stats(self) -> dict[str, int] | None:
        """Prewarm-task GETs answered and TCP connections accepted so far (minimal server only)."""
        if self.kind != "minimal":
            return None
        import ssl
        import urllib.request

        context = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None
        with urllib.request.urlopen(f"{self.base_url}/_stats", timeout=5, context=context) as response:
            return {key: int(value) for key, value in json.loads(response.read()).items()}


def make_tls_files(directory: str) -> str:
    """
    Write a throwaway CA (``ca.pem``) and a server certificate for 127.0.0.1 (``cert.pem``, ``key.pem``).

    Uses the emulator's generator (``airflow_provider_ppio.testing.tls``). Returns the CA file to trust.

    :param directory: An existing directory.
    """
    from airflow_provider_ppio.testing.tls import create_tls_files

    return str(create_tls_files(directory).ca_bundle)


@contextmanager
def server_process(kind: str, tls_dir: str | None = None) -> Iterator[Server]:
    """
    Start a server of ``kind`` in a child process (same interpreter) and stop it afterwards.

    :param kind: ``minimal`` or ``emulator``.
    :param tls_dir: Serve HTTPS with the files :func:`make_tls_files` wrote there (minimal only).
    """
    if tls_dir and kind != "minimal":
        raise ValueError("only the minimal server speaks HTTPS here")
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "serve", kind, *([tls_dir] if tls_dir else [])],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {kind} server did not start (exit code {proc.wait()})")
        info = json.loads(line)
        yield Server(
            kind=kind,
            base_url=info["base_url"],
            api_key=info["api_key"],
            task_id=info["task_id"],
            ca_file=os.path.join(tls_dir, "ca.pem") if tls_dir else None,
        )
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve_minimal(tls_dir: str | None = None) -> None:
    import asyncio
    import ssl

    body = json.dumps(TASK_BODY, separators=(",", ":")).encode()
    ok = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)) + body
    not_found = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    unauthorized = b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    auth = b"authorization: bearer " + API_KEY.lower().encode()
    target = b"GET " + TASK_PATH.encode() + b" "
    stats = {"gets": 0, "connections": 0}

    class Http(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.buffer = b""
            stats["connections"] += 1

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while b"\r\n\r\n" in self.buffer:
                head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)  # GETs only: no request bodies
                if head.startswith(target):
                    stats["gets"] += 1
                    self.transport.write(ok if auth in head.lower() else unauthorized)
                elif head.startswith(b"GET /_stats "):
                    payload = json.dumps(stats).encode()
                    self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(payload), payload))
                else:
                    self.transport.write(not_found)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        tls = None
        if tls_dir:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(os.path.join(tls_dir, "cert.pem"), os.path.join(tls_dir, "key.pem"))
        server = await loop.create_server(Http, "127.0.0.1", 0, backlog=1024, ssl=tls)
        port = server.sockets[0].getsockname()[1]
        scheme = "https" if tls else "http"
        print(json.dumps({"base_url": f"{scheme}://127.0.0.1:{port}", "api_key": API_KEY, "task_id": TASK_ID}))
        sys.stdout.flush()
        await loop.run_in_executor(None, sys.stdin.read)
        server.close()

    asyncio.run(main())


def _serve_emulator() -> None:
    from airflow_provider_ppio.testing.emulator import EmulatorConfig
    from airflow_provider_ppio.testing.server import EmulatorServer

    with EmulatorServer(EmulatorConfig(api_key=API_KEY)) as emulator:
        emulator.control.seed_task(task_id=TASK_ID, state="running", message="pulling image on 5 nodes")
        print(json.dumps({"base_url": emulator.base_url, "api_key": API_KEY, "task_id": TASK_ID}))
        sys.stdout.flush()
        sys.stdin.read()


# -- measurement -------------------------------------------------------------------------------------


def per_call(fn: Callable[[], Any], n: int) -> tuple[float, float]:
    """
    Run ``fn`` ``n`` times; return (CPU seconds, wall seconds) per call.

    :param fn: The call to time.
    :param n: How many calls.
    """
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        fn()
    return (time.process_time() - cpu0) / n, (time.perf_counter() - wall0) / n


def median(values: Sequence[float]) -> float:
    """The median."""
    return statistics.median(values)


def run_python(code: str, python: str = sys.executable, env: dict[str, str] | None = None) -> str:
    """
    Run ``code`` in a fresh interpreter and return its stdout (raises with stderr on failure).

    :param code: Python source.
    :param python: The interpreter.
    :param env: Environment (default: inherited).
    """
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if done.returncode:
        raise RuntimeError(f"{python} failed:\n{done.stderr[-3000:]}")
    return done.stdout


class LoadSampler:
    """Samples the 1-minute load average in the background, to say how busy the machine was."""

    def __init__(self, every: float = 2.0) -> None:
        self.every = every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.every)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        """``min-max`` of the 1-minute load average while sampling."""
        if not self.samples:
            return "n/a"
        return f"{min(self.samples):.2f}-{max(self.samples):.2f}"


def machine() -> str:
    """One line about the machine and interpreter."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """
    A Markdown table.

    :param headers: Column titles.
    :param rows: Cells (already formatted).
    """
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


class Quiet:
    """Send fds 1 and 2 to /dev/null while measuring (task and trigger logs are formatted and written, not shown)."""

    def __enter__(self) -> Quiet:
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = (os.dup(1), os.dup(2))
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        os.close(self.saved[0])
        os.close(self.saved[1])


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "serve" and sys.argv[2] in ("minimal", "emulator"):
        _serve_minimal(*sys.argv[3:]) if sys.argv[2] == "minimal" else _serve_emulator()
    else:
        sys.exit("usage: python benchmarks/_common.py serve minimal|emulator [TLS_DIR]")
