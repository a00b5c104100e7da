"""
Memory per in-flight answer: the peak the hook allocates to read one answer at its endpoint's cap, and to refuse
one over it, sync and async (tracemalloc peak and RSS growth), against a raw server on 127.0.0.1.

    PYTHONPATH=. python benchmarks/answer_memory.py

The target (issue 23) is a peak of at most 20 times the cap per answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import resource
import socket
import sys
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "hostile"))
from hostile_server import HostileServer, response

KEY = "sk_memory_benchmark_key_0123456789"


def task(index: int, note: str = "n" * 100) -> dict[str, Any]:
    """A realistic task (about 450 bytes of JSON) with a 100-character note."""
    return {
        "task_id": f"pwt-{index:08d}",
        "name": "llm-server:1.4",
        "image": "registry.example.com/acme/llm-server:1.4",
        "region_id": "us-east-1",
        "product_ids": ["gpu-4090", "gpu-a100"],
        "image_size": 7_340_032_000,
        "created_at": 1_767_225_600,
        "completed_at": 1_767_226_000,
        "status": {"status": "succeeded", "error": "", "message": "image prewarmed on 4 nodes"},
        "registry_auth_id": "",
        "note": note,
        "reason": ["image pulled successfully"],
    }


def page_near(size: int) -> bytes:
    """A list page of realistic tasks just under ``size`` bytes."""
    one = len(json.dumps(task(0))) + 2
    data = [task(index) for index in range(size // one - 1)]
    return json.dumps({"data": data, "has_more": False, "next_cursor": ""}).encode()


def task_near(size: int) -> bytes:
    """One task whose note makes it just under ``size`` bytes."""
    return json.dumps(task(0, note="n" * (size - 600))).encode()


def measure(label: str, cap: int, body: bytes, call: Callable[[], Any]) -> None:
    answer = response(200, body)
    server = HostileServer(lambda srv, conn, head: conn.sendall(answer))
    os.environ["AIRFLOW_CONN_PPIO_DEFAULT"] = json.dumps(
        {"conn_type": "ppio", "host": server.base_url, "password": KEY, "extra": {"max_attempts": 1}}
    )
    try:
        with contextlib.suppress(Exception):  # the refused answers
            call()  # warm up: imports, connection lookups
        gc.collect()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        try:
            outcome = call()
        except Exception as err:
            outcome = f"{type(err).__name__}: {str(err)[:60]}"
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    finally:
        server.stop()
    shown = outcome if isinstance(outcome, str) else f"{type(outcome).__name__}"
    print(
        f"{label:42s} body {len(body) / 2**20:6.2f} MiB  cap {cap / 2**20:5.2f} MiB  "
        f"peak {peak / 2**20:7.1f} MiB = {peak / cap:5.1f}x cap  max-RSS +{(rss_after - rss_before) / 1024:6.1f} MiB"
        f"  -> {shown}"
    )


def main() -> None:
    from airflow_provider_ppio.hooks._shared import LIST_PAGE_MAX_BYTES, TASK_BODY_MAX_BYTES
    from airflow_provider_ppio.hooks.ppio import PPIOHook

    def sync_task() -> Any:
        return PPIOHook().get_prewarm_task("pwt-00000000")

    def async_task() -> Any:
        return asyncio.run(PPIOHook().aget_prewarm_task("pwt-00000000"))

    def sync_list() -> Any:
        return list(PPIOHook().list_prewarm_tasks())

    def async_list() -> Any:
        async def walk() -> list[Any]:
            return [found async for found in PPIOHook().alist_prewarm_tasks()]

        return asyncio.run(walk())

    at_task_cap = task_near(TASK_BODY_MAX_BYTES)
    at_list_cap = page_near(LIST_PAGE_MAX_BYTES)
    eight_mib = task_near(8 * 2**20)
    for mode, get, walk in (("sync", sync_task, sync_list), ("async", async_task, async_list)):
        measure(f"{mode} task at the task cap", TASK_BODY_MAX_BYTES, at_task_cap, get)
        measure(f"{mode} task answer of 8 MiB (refused)", TASK_BODY_MAX_BYTES, eight_mib, get)
        measure(f"{mode} list page at the list cap", LIST_PAGE_MAX_BYTES, at_list_cap, walk)
        measure(f"{mode} list page of 8 MiB (refused)", LIST_PAGE_MAX_BYTES, page_near(8 * 2**20), walk)


if __name__ == "__main__":
    socket.setdefaulttimeout(30)
    threading.stack_size(0)
    main()
