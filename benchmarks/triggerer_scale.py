"""
Triggerer scale: N concurrent waits in one event loop, ``PrewarmTaskTrigger`` next to the http
provider's ``HttpSensorTrigger``, against the same local server in the same run.

For each trigger class and each N, a fresh worker process runs N triggers in one asyncio loop (as
a triggerer does); the driver measures it from outside, so measuring costs the worker nothing:

* peak RSS (the worker's ``ru_maxrss`` and the driver's samples, whichever is larger);
* CPU per poll: the worker's CPU time over a steady-state window divided by the polls the server
  answered for it in that window (start-up and the first round are left out);
* most open sockets (``/proc/<pid>/fd`` entries that are sockets, sampled every 0.25 s);
* events lost: waits that did not fire exactly one event saying "done" once the server says so.

Next to the two triggers, ``bare aiohttp`` is the floor: N coroutines that poll our task path the same way
with nothing but one aiohttp session (the same 50-connection limit) and ``json.loads``; what any aiohttp
poller pays in this loop, measured in the same run. ``bare aiohttp + Airflow`` is the same floor in a process
that imported ``airflow.triggers.base`` first, as every triggerer has: its peak RSS holds Airflow's own import,
so ours / it compares what the waits cost.

Outage runs (``--outage 503 hang``): ``--outage-waits`` ``PrewarmTaskTrigger`` waits, all due
``--outage-deadline`` seconds after they start, against the same server switched to answer every
prewarm-task request with a 503 at once (``503``) or to read it and never answer (``hang``; the
connection's ``timeout`` extra is ``--outage-timeout``). Reported: the events fired, how late each
fired relative to its deadline (the worker's clock), and the requests and TCP connections the
server received per second.

Server: a bare asyncio HTTP/1.1 keep-alive server in its own process (HTTPS with a server
certificate from ``airflow_provider_ppio.testing.tls`` whose throwaway CA both clients trust through
``SSL_CERT_FILE``, or plain HTTP), not the emulator, because the emulator (FastAPI on uvicorn, in
its own process) tops out near 1,200 requests a second on this 2-core machine, spending a whole core
on it, where this server answers the same JSON at about 4,900 a second (both measured with 100
concurrent aiohttp clients). On a 2-core box, a server busy at 500 polls a second would take the CPU
the measured worker needs. This server sends the JSON the emulator renders for a running prewarm
task (``_common.TASK_BODY``), and the succeeded one after ``/_release``; for ``HttpSensorTrigger``
(which fires on the first non-404 answer) it answers 404 until ``/_release`` and 200 after.

Both triggers poll every ``poke_interval`` (N / 500 seconds, at least 5: about 500 polls a second
in all), each (scheme, N, trigger) runs ``--repeats`` times in alternating order, and the table has
the medians.

Usage::

    .venvs/af3/bin/python benchmarks/triggerer_scale.py               # https and http, 1,000 and 10,000, 3 runs each
    .venvs/af3/bin/python benchmarks/triggerer_scale.py --counts 1000 --schemes https --repeats 1   # a quick look
    .venvs/af3/bin/python benchmarks/triggerer_scale.py --counts --outage 503 hang   # outage runs only
    .venvs/af3/bin/python benchmarks/triggerer_scale.py --write-docs  # also update docs/benchmarks.md
    .venvs/af3/bin/python benchmarks/triggerer_scale.py --json runs.json   # + every run as JSON, for plot.py
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import contextlib

from _common import TASK_BODY, LoadSampler, machine, make_tls_files, median, table

API_KEY = "sk_bench_triggerer_scale"
OURS = "PrewarmTaskTrigger"
THEIRS = "HttpSensorTrigger"
#: Not a trigger: N coroutines polling the same task path with one bare aiohttp session (same 50-connection
#: limit, keep-alive), a GET and ``json.loads`` per poll: what any aiohttp poller pays in this loop.
FLOOR = "bare aiohttp"
#: The same floor in a process that has imported ``airflow.triggers.base`` first, as every triggerer has: the
#: memory a triggerer pays before any trigger runs is in both figures, so the ratio compares the waits alone.
FLOOR_AIRFLOW = "bare aiohttp + Airflow"
FLOORS = (FLOOR, FLOOR_AIRFLOW)
#: Which of the server's request counters counts a kind's polls (the floors poll our path).
COUNTER = {OURS: OURS, THEIRS: THEIRS, FLOOR: OURS, FLOOR_AIRFLOW: OURS}
MARKER = "@@bench "
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
SECTION = "## Triggerer scale"
#: The issue's targets for 10,000 concurrent waits, and for CPU per poll at every size.
TARGET_RSS_MB = 300
TARGET_SOCKETS = 100
TARGET_CPU_US = 400
TARGET_CPU_RATIO = 0.35


# -- server (its own process) --------------------------------------------------------------------------


def serve(tls_dir: str | None) -> None:
    """
    A bare keep-alive HTTP/1.1 server; prints ``{"port": n}`` and serves until stdin closes.

    :param tls_dir: Serve HTTPS with ``cert.pem`` / ``key.pem`` from this directory; None for plain HTTP.
    """
    running = {**TASK_BODY, "task_id": "@@ID@@"}
    succeeded = {
        **running,
        "completed_at": int(time.time()),
        "status": {"status": "succeeded", "error": "", "message": "image prewarmed on 5 nodes"},
    }
    bodies = {
        False: json.dumps(running, separators=(",", ":")).encode().split(b"@@ID@@"),
        True: json.dumps(succeeded, separators=(",", ":")).encode().split(b"@@ID@@"),
    }
    auth = b"authorization: bearer " + API_KEY.lower().encode()
    state: dict[str, Any] = {"released": False, OURS: 0, THEIRS: 0, "mode": "ok"}
    # Per whole second of Unix time: prewarm-task requests received and TCP connections accepted.
    timeline: dict[str, dict[int, int]] = {"requests": {}, "connections": {}}
    unavailable = response_bytes(b"503 Service Unavailable", b'{"message":"service unavailable"}')

    response = response_bytes

    def count(kind: str) -> None:
        second = int(time.time())
        timeline[kind][second] = timeline[kind].get(second, 0) + 1

    def answer(head: bytes) -> bytes | None:
        line = head.split(b"\r\n", 1)[0]
        method, _, rest = line.partition(b" ")
        path = rest.rpartition(b" ")[0]
        if method == b"GET" and path.startswith(b"/gpus/v2/prewarm-tasks/"):
            state[OURS] += 1
            count("requests")
            if state["mode"] == "503":
                return unavailable
            if state["mode"] == "hang":
                return None  # accepted and read, never answered
            if auth not in head.lower():
                return response(b"401 Unauthorized", b'{"message":"bad key"}')
            before, after = bodies[state["released"]]
            return response(b"200 OK", before + path.rsplit(b"/", 1)[1] + after)
        if method == b"GET" and path.startswith(b"/http/"):
            state[THEIRS] += 1
            return response(b"200 OK", b"{}") if state["released"] else response(b"404 Not Found", b"{}")
        if path == b"/_stats":
            return response(b"200 OK", json.dumps(state).encode())
        if path == b"/_timeline":
            return response(b"200 OK", json.dumps(timeline).encode())
        if method == b"POST" and path.startswith(b"/_mode/"):
            state["mode"] = path.rsplit(b"/", 1)[1].decode()
            return response(b"200 OK", b"{}")
        if method == b"POST" and path == b"/_release":
            state["released"] = True
            return response(b"200 OK", b"{}")
        if method == b"POST" and path == b"/_reset":
            state.update({"released": False, OURS: 0, THEIRS: 0, "mode": "ok"})
            timeline.update({"requests": {}, "connections": {}})
            return response(b"200 OK", b"{}")
        return response(b"404 Not Found", b"{}")

    class Http(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.buffer = b""
            count("connections")

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while b"\r\n\r\n" in self.buffer:
                head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)  # no request bodies here
                reply = answer(head)
                if reply is not None:
                    self.transport.write(reply)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        tls = None
        if tls_dir:
            import ssl

            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(os.path.join(tls_dir, "cert.pem"), os.path.join(tls_dir, "key.pem"))
        server = await loop.create_server(Http, "127.0.0.1", 0, backlog=4096, ssl=tls)
        print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
        server.close()

    asyncio.run(main())


def response_bytes(status: bytes, body: bytes) -> bytes:
    """One HTTP/1.1 keep-alive response with a JSON body."""
    return b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        status,
        len(body),
        body,
    )


def trusting(tls_dir: str | None) -> dict[str, str] | None:
    """
    The environment of a worker that trusts the benchmark's throwaway CA (None: inherit, plain http).

    ``SSL_CERT_FILE`` is what aiohttp's default context (``HttpSensorTrigger``) reads; the provider
    reads ``REQUESTS_CA_BUNDLE`` first, so a machine that sets it to the system bundle must not win.
    """
    if not tls_dir:
        return None
    ca = os.path.join(tls_dir, "ca.pem")
    env = {key: value for key, value in os.environ.items() if key not in ("CURL_CA_BUNDLE", "SSL_CERT_DIR")}
    return {**env, "SSL_CERT_FILE": ca, "REQUESTS_CA_BUNDLE": ca}


def call(port: int, method: str, path: str, tls_dir: str | None) -> dict[str, Any]:
    """Call the benchmark server's control endpoints."""
    import ssl

    context = ssl.create_default_context(cafile=os.path.join(tls_dir, "ca.pem")) if tls_dir else None
    scheme = "https" if tls_dir else "http"
    request = urllib.request.Request(f"{scheme}://127.0.0.1:{port}{path}", method=method)
    with urllib.request.urlopen(request, timeout=30, context=context) as answer:
        result: dict[str, Any] = json.loads(answer.read())
        return result


# -- worker (its own process): N triggers in one event loop ---------------------------------------------


class BarePoller:
    """The floor, shaped like a trigger: poll with one shared bare aiohttp session until the task succeeded."""

    session: Any = None

    def __init__(self, url: str, interval: float) -> None:
        self.url, self.interval = url, interval

    async def run(self) -> Any:
        import random

        import aiohttp

        if BarePoller.session is None:
            tls = None
            if self.url.startswith("https"):
                import ssl

                tls = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
            connector = aiohttp.TCPConnector(limit=50, ssl=tls if tls is not None else False)
            BarePoller.session = aiohttp.ClientSession(connector=connector, trust_env=False)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        while True:
            await asyncio.sleep(self.interval * random.uniform(0.9, 1.1))
            async with BarePoller.session.get(self.url, headers=headers) as response:
                response.raise_for_status()
                if json.loads(await response.read())["status"]["status"] == "succeeded":
                    break
        yield SimpleNamespace(payload=True)  # what the worker reads of a TriggerEvent

    async def cleanup(self) -> None:
        pass


def worker(kind: str, count: int, port: int, interval: float, limit: float, scheme: str) -> None:
    """Run ``count`` triggers of ``kind`` in one loop until each fired or ``limit`` seconds passed."""
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="bench-airflow-"))
    os.environ["AIRFLOW_CONN_PPIO_DEFAULT"] = json.dumps(
        {"conn_type": "ppio", "host": f"{scheme}://127.0.0.1:{port}", "password": API_KEY}
    )
    os.environ["AIRFLOW_CONN_HTTP_DEFAULT"] = json.dumps(
        {"conn_type": "http", "host": "127.0.0.1", "schema": scheme, "port": port}
    )
    import resource

    if kind == OURS:
        from airflow_provider_ppio.triggers.prewarm import PrewarmTaskTrigger

        deadline = time.time() + 3600
        triggers: list[Any] = [
            PrewarmTaskTrigger(prewarm_task_id=f"pw-{n}", poke_interval=interval, deadline=deadline)
            for n in range(count)
        ]

        def done(payload: Any) -> bool:
            return isinstance(payload, dict) and payload.get("status") == "success"
    elif kind in FLOORS:
        if kind == FLOOR_AIRFLOW:
            import airflow.triggers.base  # noqa: F401  (what a triggerer process has loaded)
        triggers = [
            BarePoller(f"{scheme}://127.0.0.1:{port}/gpus/v2/prewarm-tasks/pw-{n}", interval) for n in range(count)
        ]

        def done(payload: Any) -> bool:
            return payload is True
    else:
        from airflow.providers.http.triggers.http import HttpSensorTrigger

        triggers = [HttpSensorTrigger(endpoint=f"http/{n}", method="GET", poke_interval=interval) for n in range(count)]

        def done(payload: Any) -> bool:
            return payload is True

    events: list[int] = [0] * count
    good: list[bool] = [False] * count

    async def wait(n: int, trigger: Any) -> None:
        try:
            async for event in trigger.run():  # like the triggerer: keep reading until the trigger ends
                events[n] += 1
                good[n] = done(event.payload)
        finally:
            await trigger.cleanup()

    async def main() -> None:
        tasks = [asyncio.create_task(wait(n, trigger)) for n, trigger in enumerate(triggers)]
        emit({"phase": "started"})
        finished, pending = await asyncio.wait(tasks, timeout=limit)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        errors = [repr(task.exception())[:200] for task in finished if task.exception() is not None]
        emit(
            {
                "phase": "done",
                "fired_once": sum(1 for n in range(count) if events[n] == 1 and good[n]),
                "unfinished": len(pending),
                "errors": errors[:3],
                "error_count": len(errors),
                "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )

    asyncio.run(main())


def worker_outage(count: int, port: int, interval: float, deadline_in: float, timeout: float, scheme: str) -> None:
    """
    ``count`` ``PrewarmTaskTrigger`` waits against an API in an outage, all due ``deadline_in`` seconds from now.

    Reports when each wait fired relative to its deadline, and what it fired.
    """
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="bench-airflow-"))
    os.environ["AIRFLOW_CONN_PPIO_DEFAULT"] = json.dumps(
        {
            "conn_type": "ppio",
            "host": f"{scheme}://127.0.0.1:{port}",
            "password": API_KEY,
            "extra": {"timeout": timeout},
        }
    )
    import logging
    import resource

    from airflow_provider_ppio.triggers.prewarm import PrewarmTaskTrigger

    logging.disable(logging.WARNING)  # one retry warning per failed attempt: formatted, not the point here
    started = time.time()
    deadline = started + deadline_in
    triggers = [
        PrewarmTaskTrigger(prewarm_task_id=f"pw-{n}", poke_interval=interval, deadline=deadline) for n in range(count)
    ]
    fired: list[list[tuple[float, str]]] = [[] for _ in range(count)]

    async def wait(n: int, trigger: Any) -> None:
        try:
            async for event in trigger.run():
                fired[n].append((time.time(), str(event.payload.get("status"))))
        finally:
            await trigger.cleanup()

    async def main() -> None:
        tasks = [asyncio.create_task(wait(n, trigger)) for n, trigger in enumerate(triggers)]
        emit({"phase": "started", "started": started, "deadline": deadline})
        finished, pending = await asyncio.wait(tasks, timeout=deadline_in + 120)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        late = sorted(events[0][0] - deadline for events in fired if len(events) == 1)
        statuses: dict[str, int] = {}
        for events in fired:
            for _, status in events:
                statuses[status] = statuses.get(status, 0) + 1
        errors = [repr(task.exception())[:200] for task in finished if task.exception() is not None]
        emit(
            {
                "phase": "done",
                "fired_once": sum(1 for events in fired if len(events) == 1),
                "statuses": statuses,
                "late_first": late[0] if late else None,
                "late_median": median(late) if late else None,
                "late_last": late[-1] if late else None,
                "last_event": max((events[-1][0] for events in fired if events), default=None),
                "errors": errors[:3],
                "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )

    asyncio.run(main())


def emit(message: dict[str, Any]) -> None:
    print(MARKER + json.dumps(message), flush=True)


# -- driver --------------------------------------------------------------------------------------------


@dataclass
class Result:
    """One worker run."""

    kind: str
    scheme: str
    count: int
    interval: float
    peak_rss_mb: float
    cpu_per_poll_us: float
    polls_in_window: int
    most_sockets: int
    lost: int
    errors: list[str]


class Sampler:
    """Samples a process's RSS and open sockets from outside it."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        self.pid, self.every = pid, every
        self.rss_mb = 0.0
        self.sockets = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        process = psutil.Process(self.pid)
        fd_dir = f"/proc/{self.pid}/fd"
        while not self._stop.is_set():
            try:
                self.rss_mb = max(self.rss_mb, process.memory_info().rss / 2**20)
                sockets = 0
                for name in os.listdir(fd_dir):
                    with contextlib.suppress(OSError):
                        sockets += os.readlink(f"{fd_dir}/{name}").startswith("socket:")
                self.sockets = max(self.sockets, sockets)
            except (OSError, psutil.Error):
                return
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def run_one(kind: str, count: int, port: int, interval: float, rounds: int, tls_dir: str | None) -> Result:
    """Start a worker with ``count`` triggers of ``kind`` and measure it."""
    call(port, "POST", "/_reset", tls_dir)
    limit = 3 * interval + rounds * interval + 90  # hard bound on the worker's life
    scheme = "https" if tls_dir else "http"
    env = trusting(tls_dir)
    proc = subprocess.Popen(
        [sys.executable, __file__, "worker", kind, str(count), str(port), str(interval), str(limit), scheme],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    messages: dict[str, dict[str, Any]] = {}
    arrived = threading.Condition()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # drain everything (trigger logs too) so the worker never blocks
            if line.startswith(MARKER):
                message = json.loads(line[len(MARKER) :])
                with arrived:
                    messages[message["phase"]] = message
                    arrived.notify_all()

    def expect(phase: str, timeout: float) -> dict[str, Any]:
        with arrived:
            if not arrived.wait_for(lambda: phase in messages or proc.poll() is not None, timeout):
                raise TimeoutError(f"{kind} x{count}: no {phase!r} from the worker within {timeout:.0f}s")
        if phase not in messages:
            raise RuntimeError(f"{kind} x{count}: the worker exited with {proc.poll()} before {phase!r}")
        return messages[phase]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    sampler = Sampler(proc.pid)
    try:
        expect("started", 120)
        time.sleep(1.5 * interval)  # start-up and the first round of polls are not steady state
        cpu0, polls0 = cpu_seconds(proc.pid), call(port, "GET", "/_stats", tls_dir)[COUNTER[kind]]
        time.sleep(rounds * interval)
        cpu1, polls1 = cpu_seconds(proc.pid), call(port, "GET", "/_stats", tls_dir)[COUNTER[kind]]
        call(port, "POST", "/_release", tls_dir)
        done = expect("done", limit)
    finally:
        sampler.stop()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        reader.join(5)
    polls = polls1 - polls0
    return Result(
        kind=kind,
        scheme=scheme,
        count=count,
        interval=interval,
        peak_rss_mb=max(sampler.rss_mb, done["maxrss_mb"]),
        cpu_per_poll_us=(cpu1 - cpu0) / polls * 1e6 if polls else float("inf"),
        polls_in_window=polls,
        most_sockets=sampler.sockets,
        lost=count - done["fired_once"],
        errors=done["errors"],
    )


@dataclass
class Outage:
    """One outage run: ``count`` waits against an API answering 503 to everything, or never answering."""

    mode: str
    scheme: str
    count: int
    interval: float
    deadline_in: float
    timeout: float
    fired_once: int
    statuses: dict[str, int]
    late_first: float | None
    late_median: float | None
    late_last: float | None
    requests_per_second: list[int]
    connections_per_second: list[int]
    most_sockets: int
    peak_rss_mb: float
    errors: list[str]


def run_outage(
    mode: str, count: int, port: int, interval: float, deadline_in: float, timeout: float, tls_dir: str | None
) -> Outage:
    """Put the server into ``mode`` (``503`` or ``hang``) and run ``count`` waits through the outage."""
    call(port, "POST", "/_reset", tls_dir)
    call(port, "POST", f"/_mode/{mode}", tls_dir)
    scheme = "https" if tls_dir else "http"
    env = trusting(tls_dir)
    args = [str(count), str(port), str(interval), str(deadline_in), str(timeout), scheme]
    proc = subprocess.Popen(
        [sys.executable, __file__, "outage-worker", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    sampler = Sampler(proc.pid)
    messages: dict[str, dict[str, Any]] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the worker bounds its own life (deadline + 120 s)
            if line.startswith(MARKER):
                message = json.loads(line[len(MARKER) :])
                messages[message["phase"]] = message
        proc.wait(30)
    finally:
        sampler.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if "done" not in messages:
        raise RuntimeError(f"outage {mode}: the worker exited with {proc.returncode} without reporting")
    started, done = messages["started"], messages["done"]
    timeline = call(port, "GET", "/_timeline", tls_dir)
    first = int(started["started"])
    last = int(done["last_event"] or started["deadline"])

    def buckets(kind: str) -> list[int]:
        counts = {int(second): n for second, n in timeline[kind].items()}
        return [counts.get(second, 0) for second in range(first, last + 1)]

    return Outage(
        mode=mode,
        scheme=scheme,
        count=count,
        interval=interval,
        deadline_in=deadline_in,
        timeout=timeout,
        fired_once=done["fired_once"],
        statuses=done["statuses"],
        late_first=done["late_first"],
        late_median=done["late_median"],
        late_last=done["late_last"],
        requests_per_second=buckets("requests"),
        connections_per_second=buckets("connections"),
        most_sockets=sampler.sockets,
        peak_rss_mb=max(sampler.rss_mb, done["maxrss_mb"]),
        errors=done["errors"],
    )


OUTAGE_SECTION = "## Triggerer outage"
OUTAGE_MODES = {
    "503": "every request answered `503 Service Unavailable` at once",
    "hang": "every request accepted and read, never answered (each attempt ends at the `timeout` extra)",
}


def render_outage(outages: list[Outage], command: str, context: str) -> str:
    """The docs section for the outage runs: lateness of the timeout events and the request rate."""

    def late(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.2f}"

    rows = [
        [
            o.scheme,
            o.mode,
            f"{o.count:,}",
            f"{o.interval:g} / {o.deadline_in:g} / {o.timeout:g}",
            ", ".join(f"{status} {n:,}" for status, n in sorted(o.statuses.items())),
            f"{o.count - o.fired_once}",
            late(o.late_median),
            f"**{late(o.late_last)}**",
            f"{o.interval + o.timeout:g}",
            f"{sum(o.requests_per_second):,}",
            f"{sum(o.requests_per_second) / o.count:.1f}",
            f"{max(o.requests_per_second, default=0):,}",
            f"{sum(o.connections_per_second):,}",
            f"{o.most_sockets}",
            f"{o.peak_rss_mb:.0f}",
        ]
        for o in outages
    ]
    headers = [
        "scheme",
        "outage",
        "waits",
        "poke_interval / deadline in / timeout (s)",
        "events",
        "lost",
        "median s late",
        "LAST s late",
        "bound: interval + timeout (s)",
        "API requests",
        "requests per wait",
        "peak requests/s",
        "TCP connects",
        "most open sockets",
        "peak RSS (MB)",
    ]
    timelines = [
        f"- {o.scheme}, {o.mode}: requests per second, from second 0: "
        + " ".join(str(n) for n in o.requests_per_second)
        + "; new TCP connections per second: "
        + " ".join(str(n) for n in o.connections_per_second)
        for o in outages
    ]
    return "\n".join(
        [
            OUTAGE_SECTION,
            "",
            "N `PrewarmTaskTrigger` waits in one event loop, all due at the same deadline, against an API in an "
            "outage: " + "; ".join(f"`{mode}`: {what}" for mode, what in OUTAGE_MODES.items()) + ". "
            "Each wait must end with a `timeout` event close to its deadline (at most one poke interval plus one "
            "request timeout late, plus noise) and the triggerer must back off rather than hammer the API. "
            '"s late" is when a wait\'s event fired minus its deadline; the request counts are what the server '
            "received, per second of Unix time (second 0 is the one in which the waits started; the last bucket "
            "is the one in which the last event fired).",
            "",
            table(headers, rows),
            "",
            *timelines,
            "",
            f"Command: `{command}`",
            "",
            context,
            "",
        ]
    )


def summarize(results: list[Result]) -> list[list[Any]]:
    """Median of each figure per (scheme, N, trigger), and our CPU per poll as a fraction of theirs."""
    rows = []
    for scheme, count, interval in sorted({(r.scheme, r.count, r.interval) for r in results}, reverse=True):
        cpu: dict[str, list[float]] = {}
        rss: dict[str, list[float]] = {}
        for kind in (OURS, THEIRS, *FLOORS):
            runs = [r for r in results if (r.scheme, r.count, r.kind) == (scheme, count, kind)]
            if not runs:
                continue
            cpu[kind] = [r.cpu_per_poll_us for r in runs]  # in run order: the i-th of each kind ran side by side
            rss[kind] = [r.peak_rss_mb for r in runs]
            rows.append(
                [
                    scheme,
                    f"{count:,}",
                    f"{interval:g}",
                    f"`{kind}`",
                    f"{median(rss[kind]):.0f}",
                    f"{median(cpu[kind]):.0f}",
                    f"{median([r.most_sockets for r in runs]):.0f}",
                    f"{median([r.lost for r in runs]):.0f}",
                    f"{median([r.polls_in_window for r in runs]):,.0f}",
                    len(runs),
                ]
            )
        labels = ((THEIRS, "**ratio ours / theirs**"), (FLOOR, "ratio ours / bare aiohttp"))
        for other, label in (*labels, (FLOOR_AIRFLOW, "ratio ours / bare aiohttp + Airflow")):
            if OURS in cpu and other in cpu:
                cpu_ratio = _ratio(cpu[OURS], cpu[other], bold=other == THEIRS)
                rows.append([scheme, f"{count:,}", "", label, _ratio(rss[OURS], rss[other]), cpu_ratio, "", "", "", ""])
    return rows


def _ratio(ours: list[float], other: list[float], *, bold: bool = False) -> str:
    """
    The median over the runs of ours / the other kind measured in the same run, then each run's ratio: the machine's
    speed drifts between runs, so each ratio compares figures taken side by side.
    """
    # No ratio when a figure is missing (no poll answered) or below the CPU clock's resolution.
    ratios = [a / b for a, b in zip(ours, other, strict=False) if 0 < a < float("inf") and 0 < b < float("inf")]
    if not ratios:
        return "n/a"
    text = f"{median(ratios):.2f}"
    text = f"**{text}**" if bold else text
    return text if len(ratios) == 1 else f"{text} ({', '.join(f'{ratio:.2f}' for ratio in ratios)})"


HEADERS = [
    "scheme",
    "N waits",
    "poke_interval (s)",
    "trigger",
    "peak RSS (MB)",
    "CPU per poll (µs)",
    "most open sockets",
    "events lost",
    "polls measured",
    "runs",
]


def render(rows: list[list[Any]], command: str, context: str) -> str:
    """The docs section: what was measured, the table, how to read it, the command and the conditions."""
    return "\n".join(
        [
            SECTION,
            "",
            "N concurrent waits in one asyncio event loop (what one triggerer process runs): "
            "`PrewarmTaskTrigger` next to the http provider's `HttpSensorTrigger`, against the same local "
            "server in the same run, each (scheme, N, trigger) in a fresh process; figures are medians over "
            "the runs. `https` is what the PPIO API speaks (a self-signed certificate on 127.0.0.1 here); "
            "`http` is the same without TLS. Script: `benchmarks/triggerer_scale.py`; its docstring says how "
            "each figure is measured and why the server is not the emulator.",
            "",
            f"Targets: for 10,000 waits at most {TARGET_RSS_MB} MB RSS and {TARGET_SOCKETS} open sockets, no "
            f"event lost; CPU per poll at most {TARGET_CPU_US} µs and at most {TARGET_CPU_RATIO}x "
            "`HttpSensorTrigger`'s, over http and https.",
            "",
            table(HEADERS, rows),
            "",
            "How to read it:",
            "",
            "- *Sockets and memory.* All `PrewarmTaskTrigger`s of a process share one `aiohttp.ClientSession` per "
            "event loop (and TLS and proxy setting) whose connector opens at most 50 connections and keeps them "
            "alive; a poll beyond that waits for a turn holding nothing but its coroutine. `HttpSensorTrigger` "
            "opens a new aiohttp session and connection for every poll, and its waits poll in lockstep, so N "
            "waits hold N sockets at once, and over TLS N handshakes' worth of memory.",
            "- *`HttpSensorTrigger` at 10,000.* It may not keep up: each round it opens 10,000 connections at "
            "once, more than the server's accept queue (4,096) holds, so it can answer fewer polls than its "
            "interval asks for (compare the polls measured: three intervals of 10,000 waits are 30,000 polls). "
            "Its CPU per poll is then CPU per *answered* poll.",
            "- *CPU per poll* is the triggerer process's CPU over the window divided by the polls the server "
            "answered: everything the process did for a poll (timer, retry policy, request, JSON, parsing, "
            "logging, the event loop). Both triggers use aiohttp; ours reuses a keep-alive connection, "
            "`HttpSensorTrigger` builds a session and a connection (over https a TLS handshake) per poll.",
            "",
            f"Command: `{command}`",
            "",
            context,
            "",
        ]
    )


def write_docs(section: str, title: str = SECTION) -> None:
    """Replace (or add) the ``title`` section of docs/benchmarks.md, leaving the rest alone."""
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if title in text:
        start = text.index(title)
        end = text.find("\n## ", start + len(title))
        text = text[:start] + section.rstrip("\n") + "\n" + (text[end:] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)


def auto_interval(count: int) -> float:
    """A poke_interval giving about 500 polls a second in all: a steady load this 2-core box can serve."""
    return max(5.0, count / 500)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="*", default=[1000, 10000], help="concurrent waits per run")
    parser.add_argument("--schemes", nargs="+", default=["https", "http"], choices=["https", "http"])
    parser.add_argument("--repeats", type=int, default=3, help="runs per (scheme, N, trigger); figures are medians")
    parser.add_argument("--interval", type=float, help="poke_interval of every trigger (default: N / 500, >= 5 s)")
    parser.add_argument("--rounds", type=int, default=3, help="poke intervals in the measured window")
    parser.add_argument(
        "--kinds", nargs="+", default=[OURS, THEIRS, *FLOORS], choices=[OURS, THEIRS, *FLOORS], help="what to run"
    )
    parser.add_argument("--outage", nargs="*", default=[], choices=sorted(OUTAGE_MODES), help="outage scenarios")
    parser.add_argument("--outage-waits", type=int, default=1000, help="concurrent waits in an outage run")
    parser.add_argument("--outage-interval", type=float, default=1.0, help="poke_interval in an outage run")
    parser.add_argument("--outage-deadline", type=float, default=6.0, help="seconds from start to every deadline")
    parser.add_argument("--outage-timeout", type=float, default=2.0, help="the connection's timeout extra")
    parser.add_argument("--write-docs", action="store_true", help=f"update the {SECTION!r} section of {DOCS}")
    parser.add_argument("--json", metavar="PATH", help="also write every run as JSON (benchmarks/plot.py draws it)")
    args = parser.parse_args()

    import airflow
    from airflow.providers.http import __version__ as http_version

    results: list[Result] = []
    outages: list[Outage] = []
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as cert_dir, LoadSampler() as load:
        make_tls_files(cert_dir)
        for scheme in args.schemes:
            tls_dir = cert_dir if scheme == "https" else None
            server = subprocess.Popen(
                [sys.executable, __file__, "serve", *([tls_dir] if tls_dir else [])],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert server.stdout is not None
                port = json.loads(server.stdout.readline())["port"]
                for repeat in range(args.repeats if args.counts else 0):
                    for count in args.counts:
                        interval = args.interval or auto_interval(count)
                        kinds = [kind for kind in (OURS, THEIRS, *FLOORS) if kind in args.kinds]
                        for kind in kinds if repeat % 2 == 0 else kinds[::-1]:
                            result = run_one(kind, count, port, interval, args.rounds, tls_dir)
                            results.append(result)
                            print(json.dumps(asdict(result)), flush=True)
                for mode in args.outage:
                    outage = run_outage(
                        mode,
                        args.outage_waits,
                        port,
                        args.outage_interval,
                        args.outage_deadline,
                        args.outage_timeout,
                        tls_dir,
                    )
                    outages.append(outage)
                    print(json.dumps(asdict(outage)), flush=True)
            finally:
                assert server.stdin is not None
                server.stdin.close()
                server.wait(10)

    command = "python benchmarks/triggerer_scale.py " + " ".join(sys.argv[1:])
    context = (
        f"Measured {datetime.date.today().isoformat()} on {machine()}; Airflow {airflow.__version__}, "
        f"apache-airflow-providers-http {http_version}; 1-minute load average during the run {load.summary()} "
        "(the machine was shared with other work, so absolute CPU figures carry noise; both triggers ran in the "
        "same conditions)."
    )
    if args.json:
        run = {
            "benchmark": "triggerer_scale",
            "label": f"Airflow {airflow.__version__}, {datetime.date.today().isoformat()}",
            "source": f"{command.strip()}; {context}",
            "results": [asdict(result) for result in results],
            "outages": [asdict(outage) for outage in outages],
        }
        Path(args.json).write_text(json.dumps(run, indent=2) + "\n")
    if results:
        section = render(
            summarize(results),
            command.strip(),
            context + f" Measured window: {args.rounds} poke intervals after 1.5 of warm-up.",
        )
        print()
        print(section)
        if args.write_docs:
            write_docs(section)
    if outages:
        section = render_outage(outages, command.strip(), context)
        print()
        print(section)
        if args.write_docs:
            write_docs(section, OUTAGE_SECTION)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2] if len(sys.argv) > 2 else None)
    elif sys.argv[1:2] == ["outage-worker"]:
        worker_outage(
            int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), sys.argv[7]
        )
    elif sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), sys.argv[7])
    else:
        main()
