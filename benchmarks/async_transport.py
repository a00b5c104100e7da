"""
Async transport: CPU per request of a sequential keep-alive GET + JSON parse, three ways, same server.

The evidence for the triggerer's HTTP client: one asyncio loop sends one request after another
(keep-alive, one connection) to the minimal server of ``_common`` (its own process, so
``time.process_time`` counts the client only), over http and over https, and parses the JSON:

* ``aiohttp``: a bare ``aiohttp.ClientSession``: ``get``, ``raise_for_status``, ``json.loads`` of
  the body, compare the status.
* ``httpx``: a bare ``httpx.AsyncClient``: the same.
* ``hook``: ``PPIOHook.aget_prewarm_task(patient=True, deadline=...)``, what one poll of
  ``PrewarmTaskTrigger`` calls, on the shared aiohttp session
  (``airflow_provider_ppio.hooks._async.SHARED_SESSIONS``) leased for the whole run as the trigger
  leases it for its wait: the retry policy, response checks and ``PrewarmTask`` parsing included.

Per contender: warm-up, then ``--rounds`` rounds of ``--requests`` timed requests, the order of the
contenders rotated every round; the table gives medians over rounds and the median of the
per-round ratios. The server counts the GETs and TCP connections: every call must be exactly one
GET and no contender may open a connection per request.

``--profile N`` adds a cProfile of N hook calls (self time by library and the top functions).
``--triggers N`` adds N ``PrewarmTaskTrigger`` waits polling every second in this process's loop
for ``--trigger-seconds``: CPU per poll (the whole process's CPU over the polls the server
answered), next to a floor of N bare coroutines polling the same way with one aiohttp session
(same 50-connection limit), then the trigger run again under cProfile (clock: process CPU time):
where a trigger's poll spends its CPU.

Usage::

    .venvs/af3/bin/python benchmarks/async_transport.py                        # http and https
    .venvs/af3/bin/python benchmarks/async_transport.py --profile 3000 --schemes https
    .venvs/af3/bin/python benchmarks/async_transport.py --rounds 0 --triggers 300 --schemes https
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    TASK_PATH,
    LoadSampler,
    Quiet,
    Server,
    machine,
    make_tls_files,
    median,
    server_process,
    table,
)

Call = Callable[[], Awaitable[bool]]
CONTENDERS = ("aiohttp", "httpx", "hook")


async def per_call(call: Call, n: int) -> tuple[float, float]:
    """Await ``call`` ``n`` times in a row; return (CPU seconds, wall seconds) per call."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        await call()
    return (time.process_time() - cpu0) / n, (time.perf_counter() - wall0) / n


class Contenders:
    """The three clients, opened in the running loop; each call reads the running task once."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.url = server.base_url + TASK_PATH
        self.headers = {"Authorization": f"Bearer {server.api_key}"}

    def connection(self) -> None:
        """Point the connection ``ppio_bench`` at the server (trusting its CA over https)."""
        extra = {"ca_bundle": self.server.ca_file} if self.server.ca_file else {}
        os.environ["AIRFLOW_CONN_PPIO_BENCH"] = json.dumps(
            {"conn_type": "ppio", "password": self.server.api_key, "host": self.server.base_url, "extra": extra}
        )

    async def __aenter__(self) -> dict[str, Call]:
        import ssl

        import aiohttp
        import httpx

        from airflow_provider_ppio.hooks._async import SHARED_SESSIONS
        from airflow_provider_ppio.hooks.ppio import PPIOHook

        self.connection()
        tls = ssl.create_default_context(cafile=self.server.ca_file) if self.server.ca_file else None
        self.aiohttp = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls or False), trust_env=False)
        self.httpx = httpx.AsyncClient(verify=tls or True, trust_env=False)
        hook = PPIOHook(ppio_conn_id="ppio_bench")
        self.lease = SHARED_SESSIONS.lease(await hook.aget_settings())
        await self.lease.__aenter__()
        url, headers, task_id = self.url, self.headers, self.server.task_id

        async def with_aiohttp() -> bool:
            async with self.aiohttp.get(url, headers=headers) as response:
                response.raise_for_status()
                return bool(json.loads(await response.read())["status"]["status"] == "succeeded")

        async def with_httpx() -> bool:
            response = await self.httpx.get(url, headers=headers)
            response.raise_for_status()
            return bool(response.json()["status"]["status"] == "succeeded")

        async def with_hook() -> bool:
            task = await hook.aget_prewarm_task(task_id, patient=True, deadline=time.time() + 3600)
            return task.status.status == "succeeded"

        return {"aiohttp": with_aiohttp, "httpx": with_httpx, "hook": with_hook}

    async def __aexit__(self, *exc: object) -> None:
        await self.aiohttp.close()
        await self.httpx.aclose()
        await self.lease.__aexit__(None, None, None)


async def measure(server: Server, *, requests: int, warmup: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per round and contender: CPU and wall seconds per request, and TCP connections per request."""
    samples: dict[str, dict[str, list[float]]] = {name: {"cpu": [], "wall": [], "connects": []} for name in CONTENDERS}
    async with Contenders(server) as calls:
        for name, call in calls.items():
            if await call() is not False:  # a running task: every contender must say "not done"
                raise AssertionError(f"{name} did not read a running task")
            await per_call(call, warmup * 5)
        for round_no in range(rounds):
            order = CONTENDERS[round_no % 3 :] + CONTENDERS[: round_no % 3]
            for name in order:
                await per_call(calls[name], warmup)
                before = await asyncio.to_thread(server.stats)
                cpu, wall = await per_call(calls[name], requests)
                after = await asyncio.to_thread(server.stats)
                assert before is not None and after is not None
                if after["gets"] - before["gets"] != requests:  # each call is exactly one real GET
                    raise AssertionError(f"{name}: {requests} calls, {after['gets'] - before['gets']} GETs")
                samples[name]["cpu"].append(cpu)
                samples[name]["wall"].append(wall)
                samples[name]["connects"].append((after["connections"] - before["connections"] - 1) / requests)
    return samples


def ratio(results: dict[str, dict[str, list[float]]], name: str, other: str, what: str) -> float:
    """Median over rounds of ``name``'s figure divided by ``other``'s in the same round."""
    return median([a / b for a, b in zip(results[name][what], results[other][what], strict=True)])


def report(scheme: str, results: dict[str, dict[str, list[float]]], load: str) -> str:
    """A Markdown table for one scheme."""
    rows = [
        [
            name,
            f"{median(entry['cpu']) * 1e6:.0f}",
            f"{median(entry['wall']) * 1e6:.0f}",
            f"{ratio(results, name, 'aiohttp', 'cpu'):.2f}",
            f"{ratio(results, name, 'httpx', 'cpu'):.2f}",
            f"{median(entry['connects']):.3f}",
        ]
        for name, entry in results.items()
    ]
    headers = ["contender", "CPU µs/request", "wall µs/request", "CPU / aiohttp", "CPU / httpx", "TCP connects/request"]
    return f"### {scheme} (load average during run: {load})\n\n" + table(headers, rows) + "\n"


_CATEGORIES = (
    ("airflow_provider_ppio", "provider (ours)"),
    ("/tenacity/", "tenacity (retry policy)"),
    ("/pydantic", "pydantic (validation)"),
    ("/logging/", "logging"),
    ("structlog", "logging"),
    ("/airflow/", "airflow"),
    ("/aiohttp/", "aiohttp"),
    ("/multidict/", "aiohttp"),
    ("/yarl/", "aiohttp (yarl URLs)"),
    ("/asyncio/", "asyncio event loop"),
    ("ssl", "TLS (ssl)"),
    ("socket", "socket I/O"),
    ("select", "socket I/O"),
    ("json", "json"),
)


def profile(server: Server, calls: int) -> str:
    """cProfile of ``calls`` warm hook calls (one trigger poll each): self time by library, top functions."""
    import cProfile
    import pstats

    profiler = cProfile.Profile(time.process_time)  # CPU time: idle waits in epoll do not count

    async def run() -> None:
        async with Contenders(server) as contenders:
            await per_call(contenders["hook"], 200)
            profiler.enable()
            await per_call(contenders["hook"], calls)
            profiler.disable()

    asyncio.run(run())
    scheme = "https" if server.ca_file else "http"
    title = (
        f"### Profile: {calls} warm hook calls (`aget_prewarm_task`, one trigger poll each), {scheme}; "
        "cProfile inflates call-heavy code, read shares"
    )
    return profile_tables(title, pstats.Stats(profiler), calls, "call")


def profile_tables(title: str, stats: Any, calls: int, per: str) -> str:
    """Self time by library and the top functions of a profile, per ``per`` (``calls`` of them)."""
    raw: dict[Any, Any] = stats.stats
    total = sum(entry[2] for entry in raw.values())
    by_category: dict[str, float] = {}
    rows = []
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in raw.items():
        where = func if filename == "~" else f"{filename}:{func}"
        category = next((name for marker, name in _CATEGORIES if marker in where), "other (stdlib, typing, ...)")
        by_category[category] = by_category.get(category, 0.0) + tottime
        rows.append((tottime, ncalls, cumtime, f"{os.path.basename(filename)}:{line}({func})"))
    share = [
        [name, f"{seconds / calls * 1e6:.0f}", f"{seconds / total:.0%}"]
        for name, seconds in sorted(by_category.items(), key=lambda item: -item[1])
    ]
    top = [
        [where, f"{ncalls / calls:g}", f"{tottime / calls * 1e6:.1f}", f"{cumtime / calls * 1e6:.1f}"]
        for tottime, ncalls, cumtime, where in sorted(rows, reverse=True)[:20]
    ]
    return (
        f"{title}\n\n"
        + table(["where (self time)", f"µs/{per}", "share"], share)
        + "\n\n"
        + table(["function", f"calls/{per}", f"self µs/{per}", f"cumulative µs/{per}"], top)
        + "\n"
    )


def triggers(server: Server, waits: int, seconds: float) -> str:
    """
    ``waits`` ``PrewarmTaskTrigger`` waits polling every second in this loop: CPU per poll, then a profile.

    The server answers "running" to every poll, so no wait ends; the loop is stopped after ``seconds``.
    """
    import cProfile
    import pstats
    import ssl

    from airflow_provider_ppio.triggers.prewarm import PrewarmTaskTrigger

    Contenders(server).connection()

    async def run(profiler: cProfile.Profile | None, bare: bool = False) -> tuple[float, int]:
        import random

        import aiohttp

        waiting = [
            PrewarmTaskTrigger(
                prewarm_task_id=server.task_id, ppio_conn_id="ppio_bench", poke_interval=1, deadline=time.time() + 3600
            )
            for _ in range(waits)
        ]

        async def wait(trigger: PrewarmTaskTrigger) -> None:
            async for _event in trigger.run():
                raise AssertionError("a wait ended while the task was running")

        tls = ssl.create_default_context(cafile=server.ca_file) if server.ca_file else False
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50, ssl=tls), trust_env=False)
        url, headers = server.base_url + TASK_PATH, {"Authorization": f"Bearer {server.api_key}"}

        async def bare_wait() -> None:  # the floor: the same polling with nothing but aiohttp and json
            while True:
                await asyncio.sleep(random.uniform(0.9, 1.1))
                async with session.get(url, headers=headers) as response:
                    response.raise_for_status()
                    if json.loads(await response.read())["status"]["status"] == "succeeded":
                        return

        if bare:
            tasks = [asyncio.create_task(bare_wait()) for _ in range(waits)]
        else:
            tasks = [asyncio.create_task(wait(trigger)) for trigger in waiting]
        await asyncio.sleep(2)  # first polls, connections and the connection lookup are not steady state
        before = await asyncio.to_thread(server.stats)
        cpu0 = time.process_time()
        if profiler:
            profiler.enable()
        await asyncio.sleep(seconds)
        if profiler:
            profiler.disable()
        cpu = time.process_time() - cpu0
        after = await asyncio.to_thread(server.stats)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
        assert before is not None and after is not None
        return cpu, after["gets"] - before["gets"]

    with Quiet():  # the triggers log each wait's first status
        floor_cpu, floor_polls = asyncio.run(run(None, bare=True))
        cpu, polls = asyncio.run(run(None))
        profiler = cProfile.Profile(time.process_time)  # CPU time: idle waits in epoll do not count
        _, profiled_polls = asyncio.run(run(profiler))
    scheme = "https" if server.ca_file else "http"
    return (
        f"### {waits} `PrewarmTaskTrigger` waits in one loop, poke_interval 1 s, {scheme}\n\n"
        + table(
            ["in one loop, polling every ~1 s", "CPU µs per poll", "polls measured"],
            [
                ["`PrewarmTaskTrigger`", f"{cpu / polls * 1e6:.0f}", f"{polls:,}"],
                [
                    "floor: bare coroutines, one aiohttp session (limit 50), GET + json",
                    f"{floor_cpu / floor_polls * 1e6:.0f}",
                    f"{floor_polls:,}",
                ],
            ],
        )
        + f"\n\nMeasured over {seconds:g} s after 2 s of warm-up; the whole process's CPU over the polls the "
        "server answered.\n\n"
        + profile_tables(
            f"#### Profile of the same run ({profiled_polls:,} polls); cProfile inflates call-heavy code, read shares",
            pstats.Stats(profiler),
            profiled_polls,
            "poll",
        )
    )


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and print Markdown tables."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--schemes", nargs="+", default=["http", "https"], choices=["http", "https"])
    parser.add_argument("--requests", type=int, default=500, help="timed requests per contender per round")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests before each timed batch")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="also profile N hook calls")
    parser.add_argument("--triggers", type=int, default=0, metavar="N", help="also run N triggers in one loop")
    parser.add_argument("--trigger-seconds", type=float, default=10, help="measured seconds of the trigger run")
    args = parser.parse_args(argv)
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="ppio-bench-home-"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    import aiohttp
    import airflow
    import httpx

    print(
        f"## Async transport\n\nMachine: {machine()}; Airflow {airflow.__version__}, aiohttp {aiohttp.__version__}, "
        f"httpx {httpx.__version__}"
    )
    print(f"Command: python benchmarks/async_transport.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(
        f"{args.requests} requests x {args.rounds} rounds per contender, each batch after {args.warmup} warm-up "
        "requests; medians over rounds; ratios are medians of the per-round ratios.\n"
    )
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tls_dir:
        make_tls_files(tls_dir)
        for scheme in args.schemes if args.rounds else ():
            with server_process("minimal", tls_dir if scheme == "https" else None) as server, LoadSampler() as load:
                results = asyncio.run(measure(server, requests=args.requests, warmup=args.warmup, rounds=args.rounds))
            print(report(scheme, results, load.summary()), flush=True)
        if args.profile:
            for scheme in args.schemes:
                with server_process("minimal", tls_dir if scheme == "https" else None) as server:
                    print(profile(server, args.profile), flush=True)
        if args.triggers:
            for scheme in args.schemes:
                with server_process("minimal", tls_dir if scheme == "https" else None) as server:
                    print(triggers(server, args.triggers, args.trigger_seconds), flush=True)


if __name__ == "__main__":
    main()
