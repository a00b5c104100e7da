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

Server: a bare asyncio HTTP/1.1 keep-alive server in its own process (HTTPS with a self-signed
certificate for 127.0.0.1 that both clients trust through ``SSL_CERT_FILE``, or plain HTTP), not the
emulator, for two reasons: the real PPIO API is HTTPS-only and the emulator serves plain HTTP only,
and the emulator (FastAPI on uvicorn, in its own process) tops out near 1,200 requests a second on
this 2-core machine, spending a whole core on it, where this server answers the same JSON at about
4,900 a second (both measured with 100 concurrent aiohttp clients). On a 2-core box, a server
busy at 500 polls a second would take the CPU the measured worker needs. This server sends the
JSON the emulator renders for a running prewarm task (``_common.TASK_BODY``), and the succeeded one
after ``/_release``; for ``HttpSensorTrigger`` (which fires on the first non-404 answer) it answers
404 until ``/_release`` and 200 after.

Both triggers poll every ``poke_interval`` (N / 500 seconds, at least 5: about 500 polls a second
in all), each (scheme, N, trigger) runs ``--repeats`` times in alternating order, and the table has
the medians.

Usage::

    .venvs/af3/bin/python benchmarks/triggerer_scale.py               # https and http, 1,000 and 10,000, 3 runs each
    .venvs/af3/bin/python benchmarks/triggerer_scale.py --counts 1000 --schemes https --repeats 1   # a quick look
    .venvs/af3/bin/python benchmarks/triggerer_scale.py --write-docs  # also update docs/benchmarks.md
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
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import contextlib

from _common import TASK_BODY, LoadSampler, machine, median, table

API_KEY = "sk_bench_triggerer_scale"
OURS = "PrewarmTaskTrigger"
THEIRS = "HttpSensorTrigger"
MARKER = "@@bench "
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
SECTION = "## Triggerer scale"
#: The issue's targets for 10,000 concurrent waits.
TARGET_RSS_MB = 300
TARGET_SOCKETS = 100


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
    state: dict[str, Any] = {"released": False, OURS: 0, THEIRS: 0}

    def response(status: bytes, body: bytes) -> bytes:
        return b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
            status,
            len(body),
            body,
        )

    def answer(head: bytes) -> bytes:
        line = head.split(b"\r\n", 1)[0]
        method, _, rest = line.partition(b" ")
        path = rest.rpartition(b" ")[0]
        if method == b"GET" and path.startswith(b"/gpus/v2/prewarm-tasks/"):
            state[OURS] += 1
            if auth not in head.lower():
                return response(b"401 Unauthorized", b'{"message":"bad key"}')
            before, after = bodies[state["released"]]
            return response(b"200 OK", before + path.rsplit(b"/", 1)[1] + after)
        if method == b"GET" and path.startswith(b"/http/"):
            state[THEIRS] += 1
            return response(b"200 OK", b"{}") if state["released"] else response(b"404 Not Found", b"{}")
        if path == b"/_stats":
            return response(b"200 OK", json.dumps(state).encode())
        if method == b"POST" and path == b"/_release":
            state["released"] = True
            return response(b"200 OK", b"{}")
        if method == b"POST" and path == b"/_reset":
            state.update({"released": False, OURS: 0, THEIRS: 0})
            return response(b"200 OK", b"{}")
        return response(b"404 Not Found", b"{}")

    class Http(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while b"\r\n\r\n" in self.buffer:
                head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)  # no request bodies here
                self.transport.write(answer(head))

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


def make_certificate(directory: str) -> None:
    """A self-signed certificate for 127.0.0.1 (``cert.pem``, ``key.pem``) that clients trust via SSL_CERT_FILE."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    Path(directory, "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(directory, "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def call(port: int, method: str, path: str, tls_dir: str | None) -> dict[str, Any]:
    """Call the benchmark server's control endpoints."""
    import ssl

    context = ssl.create_default_context(cafile=os.path.join(tls_dir, "cert.pem")) if tls_dir else None
    scheme = "https" if tls_dir else "http"
    request = urllib.request.Request(f"{scheme}://127.0.0.1:{port}{path}", method=method)
    with urllib.request.urlopen(request, timeout=30, context=context) as answer:
        result: dict[str, Any] = json.loads(answer.read())
        return result


# -- worker (its own process): N triggers in one event loop ---------------------------------------------


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
    env = {**os.environ, "SSL_CERT_FILE": os.path.join(tls_dir, "cert.pem")} if tls_dir else None
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
        cpu0, polls0 = cpu_seconds(proc.pid), call(port, "GET", "/_stats", tls_dir)[kind]
        time.sleep(rounds * interval)
        cpu1, polls1 = cpu_seconds(proc.pid), call(port, "GET", "/_stats", tls_dir)[kind]
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


def summarize(results: list[Result]) -> list[list[Any]]:
    """Median of each figure per (scheme, N, trigger), and our CPU per poll as a fraction of theirs."""
    rows = []
    for scheme, count, interval in sorted({(r.scheme, r.count, r.interval) for r in results}, reverse=True):
        cpu: dict[str, float] = {}
        for kind in (OURS, THEIRS):
            runs = [r for r in results if (r.scheme, r.count, r.kind) == (scheme, count, kind)]
            if not runs:
                continue
            cpu[kind] = median([r.cpu_per_poll_us for r in runs])
            rows.append(
                [
                    scheme,
                    f"{count:,}",
                    f"{interval:g}",
                    f"`{kind}`",
                    f"{median([r.peak_rss_mb for r in runs]):.0f}",
                    f"{cpu[kind]:.0f}",
                    f"{median([r.most_sockets for r in runs]):.0f}",
                    f"{median([r.lost for r in runs]):.0f}",
                    f"{median([r.polls_in_window for r in runs]):,.0f}",
                    len(runs),
                ]
            )
        if len(cpu) == 2:
            # No ratio when a figure is missing (no poll answered) or below the CPU clock's resolution.
            usable = all(0 < value < float("inf") for value in cpu.values())
            ratio = f"**{cpu[OURS] / cpu[THEIRS]:.2f}**" if usable else "n/a"
            rows.append([scheme, f"{count:,}", "", "**ratio ours / theirs**", "", ratio, "", "", "", ""])
    return rows


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
            f"Targets for 10,000 waits: at most {TARGET_RSS_MB} MB RSS and {TARGET_SOCKETS} open sockets, no "
            "event lost, CPU per poll at most half of `HttpSensorTrigger`'s (ratio <= 0.50).",
            "",
            table(HEADERS, rows),
            "",
            "How to read it:",
            "",
            "- *Sockets and memory.* All `PrewarmTaskTrigger`s of a process share one HTTP client per "
            "(base URL, API key) with at most 50 connections; a poll beyond that waits for a turn holding "
            "nothing but its coroutine. `HttpSensorTrigger` opens a new aiohttp session and connection for "
            "every poll, and its waits poll in lockstep, so N waits hold N sockets at once, and over TLS N "
            "handshakes' worth of memory.",
            "- *`HttpSensorTrigger` at 10,000.* It does not keep up: each round it opens 10,000 connections "
            "at once, more than the server's accept queue (4,096) holds, so it answers fewer polls than its "
            "interval asks for (compare the polls measured: three intervals of 10,000 waits are 30,000 polls). "
            "Its CPU per poll there is CPU per *answered* poll (a run that answered none has no figure); lost "
            "events, if any, are waits that had not fired when the worker gave up, about two minutes after "
            "the server said done. Its socket and memory counts hold however fast the server accepts.",
            "- *CPU per poll.* Ours goes through httpx's transports (pure Python: h11 on anyio), handed each "
            "request by a small client of ours: `httpx.AsyncClient`'s own layers were a third of a poll and "
            "are skipped. aiohttp's C parser makes `HttpSensorTrigger`'s request plus a new connection cost "
            "about what our keep-alive request costs without TLS; a TLS handshake per poll is what makes it "
            "dearer over https, which is what the PPIO API speaks. Where the ratio is above 0.50, the target "
            "is not met.",
            "",
            f"Command: `{command}`",
            "",
            context,
            "",
        ]
    )


def write_docs(section: str) -> None:
    """Replace (or add) the ``## Triggerer scale`` section of docs/benchmarks.md, leaving the rest alone."""
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if SECTION in text:
        start = text.index(SECTION)
        end = text.find("\n## ", start + len(SECTION))
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
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000], help="concurrent waits per run")
    parser.add_argument("--schemes", nargs="+", default=["https", "http"], choices=["https", "http"])
    parser.add_argument("--repeats", type=int, default=3, help="runs per (scheme, N, trigger); figures are medians")
    parser.add_argument("--interval", type=float, help="poke_interval of every trigger (default: N / 500, >= 5 s)")
    parser.add_argument("--rounds", type=int, default=3, help="poke intervals in the measured window")
    parser.add_argument("--write-docs", action="store_true", help=f"update the {SECTION!r} section of {DOCS}")
    args = parser.parse_args()

    import airflow
    from airflow.providers.http import __version__ as http_version

    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as cert_dir, LoadSampler() as load:
        make_certificate(cert_dir)
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
                for repeat in range(args.repeats):
                    for count in args.counts:
                        interval = args.interval or auto_interval(count)
                        for kind in (OURS, THEIRS) if repeat % 2 == 0 else (THEIRS, OURS):
                            result = run_one(kind, count, port, interval, args.rounds, tls_dir)
                            results.append(result)
                            print(json.dumps(asdict(result)), flush=True)
            finally:
                assert server.stdin is not None
                server.stdin.close()
                server.wait(10)

    command = "python benchmarks/triggerer_scale.py " + " ".join(sys.argv[1:])
    context = (
        f"Measured {datetime.date.today().isoformat()} on {machine()}; Airflow {airflow.__version__}, "
        f"apache-airflow-providers-http {http_version}; measured window {args.rounds} poke intervals after "
        f"1.5 of warm-up; 1-minute load average during the run {load.summary()} (the machine was shared "
        "with other work, so absolute CPU figures carry noise; both triggers ran in the same conditions)."
    )
    section = render(summarize(results), command.strip(), context)
    print()
    print(section)
    if args.write_docs:
        write_docs(section)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2] if len(sys.argv) > 2 else None)
    elif sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), sys.argv[7])
    else:
        main()
