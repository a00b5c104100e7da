"""
Poke cost: CPU and wall time per poke of ``PrewarmTaskSensor`` vs ``HttpSensor`` vs a bare ``requests`` loop.

Every contender goes through real HTTP on loopback to the same server, in the same run, in
rotating order, many short rounds; the tables show the medians over rounds, and each ratio is the
median of the per-round ratios, so slow drifts of the machine's load cancel. The server runs in its
own process, so ``time.process_time`` counts only the client's CPU.

* ``ppio``: ``PrewarmTaskSensor.poke`` (hook and session kept between pokes, as in ``poke`` mode).
* ``ppio cold``: the same, with the cached hook dropped before each poke (connection lookup, new
  session, new TCP connection), as the first poke of every ``reschedule`` run.
* ``http``: ``HttpSensor.poke`` (apache-airflow-providers-http) with a ``response_check`` that
  parses the JSON and checks ``status.status``; it builds a new hook and session every poke.
* ``floor``: a bare ``requests.Session`` loop: GET, ``raise_for_status``, ``json()``, check.
* ``floor cold``: ``requests.get`` (a new session and connection per call).
* with ``--ablation``: the sensor as it was before the two fixes in docs/benchmarks.md (requests
  re-reading the environment on every call; a watchdog thread per request).

Usage::

    python benchmarks/poke_cost.py                      # both servers, 500 pokes x 20 rounds
    python benchmarks/poke_cost.py --ablation --profile 2000   # what docs/benchmarks.md shows
    python benchmarks/poke_cost.py --json poke.json         # + the figures as JSON, for benchmarks/plot.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    TASK_PATH,
    LoadSampler,
    Quiet,
    Server,
    machine,
    median,
    per_call,
    server_process,
    table,
)

TARGETS = {"http": 0.6, "floor": 1.25}


def _connections(server: Server) -> None:
    """Point ``ppio_bench`` and ``http_bench`` at the server (both carry the key, neither in the DAG)."""
    os.environ["AIRFLOW_CONN_PPIO_BENCH"] = json.dumps(
        {"conn_type": "ppio", "password": server.api_key, "host": server.base_url}
    )
    os.environ["AIRFLOW_CONN_HTTP_BENCH"] = json.dumps(
        {
            "conn_type": "http",
            "host": "127.0.0.1",
            "port": server.port,
            "schema": "http",
            "extra": {"Authorization": f"Bearer {server.api_key}"},
        }
    )


def contenders(server: Server, ablation: bool = False) -> dict[str, Callable[[], Any]]:
    """
    One zero-argument call per contender, each doing exactly one poke.

    :param server: The server to call.
    :param ablation: Add the sensor as it was before each of the two fixes in docs/benchmarks.md.
    """
    import requests
    from airflow.providers.common.compat.sdk import AirflowFailException
    from airflow.providers.http.sensors.http import HttpSensor

    from airflow_provider_ppio.sensors.prewarm import PrewarmTaskSensor

    _connections(server)
    ppio = PrewarmTaskSensor(task_id="ppio", prewarm_task_id=server.task_id, ppio_conn_id="ppio_bench")
    ppio_cold = PrewarmTaskSensor(task_id="ppio_cold", prewarm_task_id=server.task_id, ppio_conn_id="ppio_bench")

    def response_check(response: Any) -> bool:
        status = response.json()["status"]["status"]
        if status == "failed":
            raise AirflowFailException(f"prewarm task failed: {response.text}")
        return bool(status == "succeeded")

    http = HttpSensor(task_id="http", http_conn_id="http_bench", endpoint=TASK_PATH, response_check=response_check)
    url = server.base_url + TASK_PATH
    headers = {"Authorization": f"Bearer {server.api_key}"}
    session = requests.Session()
    session.headers.update(headers)

    def floor() -> bool:
        response = session.get(url, timeout=30)
        response.raise_for_status()
        return bool(response.json()["status"]["status"] == "succeeded")

    def floor_cold() -> bool:
        response = requests.get(url, headers=headers, timeout=30)
        response.raise_for_status()
        return bool(response.json()["status"]["status"] == "succeeded")

    def poke_cold() -> Any:
        ppio_cold.__dict__.pop("hook", None)  # drop the cached hook: lookup, session and connect again
        return ppio_cold.poke({})

    calls = {
        "ppio": lambda: ppio.poke({}),
        "ppio cold": poke_cold,
        "http": lambda: http.poke({}),
        "floor": floor,
        "floor cold": floor_cold,
    }
    if ablation:
        calls.update(_before_fixes(server))
    return calls


def _before_fixes(server: Server) -> dict[str, Callable[[], Any]]:
    """The sensor with requests re-reading the environment per call, and with a watchdog thread per call."""
    import threading
    import time

    from airflow_provider_ppio.hooks import _deadline
    from airflow_provider_ppio.sensors.prewarm import PrewarmTaskSensor

    env_per_call = PrewarmTaskSensor(task_id="env", prewarm_task_id=server.task_id, ppio_conn_id="ppio_bench")
    env_per_call.hook.session.trust_env = True
    thread_per_call = PrewarmTaskSensor(task_id="thread", prewarm_task_id=server.task_id, ppio_conn_id="ppio_bench")

    class TimerPerRequest:
        def arm(self, current: Any, sock: Any) -> threading.Timer:
            timer = threading.Timer(max(0.0, current.at - time.monotonic()), _deadline._cut, (current, sock))
            timer.daemon = True
            timer.start()
            return timer

        def disarm(self, timer: threading.Timer) -> None:
            timer.cancel()

    timers, shared = TimerPerRequest(), _deadline._WATCHDOG

    def poke_thread_per_call() -> Any:
        _deadline._WATCHDOG = timers  # type: ignore[assignment]
        try:
            return thread_per_call.poke({})
        finally:
            _deadline._WATCHDOG = shared

    return {"ppio, env read per call": lambda: env_per_call.poke({}), "ppio, thread per call": poke_thread_per_call}


def measure(
    server: Server, *, pokes: int, warmup: int, rounds: int, ablation: bool = False
) -> dict[str, dict[str, list[float]]]:
    """
    Per round, for each contender: CPU and wall seconds per poke, and TCP connections opened per poke.

    :param server: The server all contenders call.
    :param pokes: Timed pokes per contender per round.
    :param warmup: Untimed pokes per contender before each timed batch.
    :param rounds: Rounds; the contenders' order rotates each round.
    :param ablation: Also time the sensor as it was before each fix.
    """
    calls = contenders(server, ablation)
    samples: dict[str, dict[str, list[float]]] = {name: {"cpu": [], "wall": [], "connects": []} for name in calls}
    with Quiet():
        for name, call in calls.items():
            if call() is not False:  # a running task: every contender must say "keep waiting"
                raise AssertionError(f"{name} did not report a running task as not done")
            per_call(call, 200)
        names = list(calls)
        for round_no in range(rounds):
            order = names[round_no % len(names) :] + names[: round_no % len(names)]
            for name in order:
                per_call(calls[name], warmup)
                before = server.stats()
                cpu, wall = per_call(calls[name], pokes)
                after = server.stats()
                samples[name]["cpu"].append(cpu)
                samples[name]["wall"].append(wall)
                if before is not None and after is not None:
                    if after["gets"] - before["gets"] != pokes:  # each poke is exactly one real GET
                        raise AssertionError(f"{name}: {pokes} pokes, {after['gets'] - before['gets']} GETs")
                    # minus the connection of the stats call itself
                    samples[name]["connects"].append((after["connections"] - before["connections"] - 1) / pokes)
    return samples


def ratio(results: dict[str, dict[str, list[float]]], name: str, other: str, what: str) -> float:
    """Median over rounds of ``name``'s figure divided by ``other``'s in the same round (load drift cancels)."""
    return median([ours / theirs for ours, theirs in zip(results[name][what], results[other][what], strict=True)])


def summary(results: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """Per contender: median CPU and wall microseconds per poke, the ratios, TCP connects per poke (or None)."""
    return [
        {
            "contender": name,
            "cpu_us": median(entry["cpu"]) * 1e6,
            "wall_us": median(entry["wall"]) * 1e6,
            "cpu_per_http": ratio(results, name, "http", "cpu"),
            "cpu_per_floor": ratio(results, name, "floor", "cpu"),
            "wall_per_http": ratio(results, name, "http", "wall"),
            "wall_per_floor": ratio(results, name, "floor", "wall"),
            "connects_per_poke": median(entry["connects"]) if entry["connects"] else None,
        }
        for name, entry in results.items()
    ]


def report(kind: str, rows: list[dict[str, Any]], load: str) -> str:
    """A Markdown table of one server's medians, ratios and targets (``rows`` from :func:`summary`)."""
    cells = [
        [
            row["contender"],
            f"{row['cpu_us']:.0f}",
            f"{row['wall_us']:.0f}",
            f"{row['cpu_per_http']:.2f}",
            f"{row['cpu_per_floor']:.2f}",
            f"{row['wall_per_http']:.2f}",
            f"{row['wall_per_floor']:.2f}",
            "n/a" if row["connects_per_poke"] is None else f"{row['connects_per_poke']:.2f}",
        ]
        for row in rows
    ]
    ppio = next(row for row in rows if row["contender"] == "ppio")
    verdicts = []
    for other, limit in TARGETS.items():
        cpu_ratio, wall_ratio = ppio[f"cpu_per_{other}"], ppio[f"wall_per_{other}"]
        ok = "met" if max(cpu_ratio, wall_ratio) <= limit else "MISSED"
        verdicts.append(f"ppio/{other} <= {limit}: CPU {cpu_ratio:.2f}, wall {wall_ratio:.2f} ({ok})")
    headers = [
        "contender",
        "CPU us/poke",
        "wall us/poke",
        "CPU/http",
        "CPU/floor",
        "wall/http",
        "wall/floor",
        "TCP connects/poke",
    ]
    return (
        f"### Server: {kind} (load average during run: {load})\n\n"
        + table(headers, cells)
        + "\n\nTargets: "
        + "; ".join(verdicts)
        + "\n"
    )


_CATEGORIES = (
    ("airflow_provider_ppio", "provider (ours)"),
    ("/tenacity/", "tenacity (retry wrapper)"),
    ("/pydantic", "pydantic (validation)"),
    ("structlog", "logging"),
    ("/logging/", "logging"),
    ("airflow", "airflow (logging, context)"),
    ("/requests/", "requests"),
    ("/urllib3/", "urllib3"),
    ("http/client", "http.client"),
    ("email/", "http.client"),
    ("socket", "socket I/O"),
    ("json", "json"),
)


def profile(server: Server, pokes: int) -> str:
    """cProfile of warm ``PrewarmTaskSensor.poke`` calls: self time by library, then the top functions."""
    import cProfile
    import pstats

    call = contenders(server)["ppio"]
    profiler = cProfile.Profile()
    with Quiet():
        per_call(call, 200)
        profiler.enable()
        per_call(call, pokes)
        profiler.disable()
    stats = pstats.Stats(profiler)
    by_category: dict[str, float] = {}
    rows = []
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in raw.values())
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in raw.items():
        where = f"{filename}:{func}"
        if filename == "~":
            where = func
        category = next((name for marker, name in _CATEGORIES if marker in where), "other")
        by_category[category] = by_category.get(category, 0.0) + tottime
        rows.append((tottime, ncalls, cumtime, f"{os.path.basename(filename)}:{line}({func})"))
    share = [
        [name, f"{seconds / pokes * 1e6:.0f}", f"{seconds / total:.0%}"]
        for name, seconds in sorted(by_category.items(), key=lambda item: -item[1])
    ]
    top = [
        [where, f"{ncalls / pokes:g}", f"{tottime / pokes * 1e6:.1f}", f"{cumtime / pokes * 1e6:.1f}"]
        for tottime, ncalls, cumtime, where in sorted(rows, reverse=True)[:15]
    ]
    return (
        f"### Profile: {pokes} warm ppio pokes, cProfile (inflates call-heavy code), server {server.kind}\n\n"
        + table(["where (self time)", "us/poke", "share"], share)
        + "\n\n"
        + table(["function", "calls/poke", "self us/poke", "cumulative us/poke"], top)
        + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and print Markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="minimal,emulator", help="comma-separated: minimal, emulator")
    parser.add_argument("--pokes", type=int, default=500, help="timed pokes per contender per round")
    parser.add_argument("--warmup", type=int, default=20, help="untimed pokes before each timed batch")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="also profile N pokes (minimal)")
    parser.add_argument("--ablation", action="store_true", help="also time the sensor as it was before each fix")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON (benchmarks/plot.py draws it)")
    args = parser.parse_args(argv)
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="ppio-bench-home-"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    import airflow

    command = f"python benchmarks/poke_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}".strip()
    print(f"## Poke cost\n\nMachine: {machine()}; Airflow {airflow.__version__}")
    print(f"Command: {command}")
    print(
        f"{args.pokes} pokes x {args.rounds} rounds per contender, each batch after {args.warmup} warm-up pokes;"
        " medians over rounds; ratios are medians of the per-round ratios.\n"
    )
    servers = []
    for kind in args.servers.split(","):
        with server_process(kind) as server, LoadSampler() as load:
            results = measure(server, pokes=args.pokes, warmup=args.warmup, rounds=args.rounds, ablation=args.ablation)
        rows = summary(results)
        servers.append({"server": kind, "load": load.summary(), "contenders": rows})
        print(report(kind, rows, load.summary()), flush=True)
    if args.json:
        run = {
            "benchmark": "poke_cost",
            "label": f"Airflow {airflow.__version__}, {datetime.date.today().isoformat()}",
            "source": f"{command}; {machine()}",
            "airflow": airflow.__version__,
            "servers": servers,
        }
        Path(args.json).write_text(json.dumps(run, indent=2) + "\n")
    if args.profile:
        with server_process("minimal") as server:
            print(profile(server, args.profile), flush=True)


if __name__ == "__main__":
    main()
