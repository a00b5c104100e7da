"""
``make demo``: a GPU deployment gated on a PPIO image prewarm, run end to end, offline.

Starts the PPIO emulator (the ``ppio-emulator`` console script) on a free loopback port, points the
``ppio_default`` connection at it through ``AIRFLOW_CONN_PPIO_DEFAULT``, and runs the example DAG
``example_ppio_prewarm_gate`` with ``airflow dags test`` on a throwaway SQLite metadata database, twice:

1. the prewarm succeeds: the sensor opens the gate and ``deploy`` receives the prewarm details via XCom;
2. the prewarm fails: the sensor fails with the API's error message and ``deploy`` never runs.

Exits 0 only when both runs behave exactly so and the API key appears in no output, log, XCom or database
row. Needs no network beyond 127.0.0.1. Run it with the Airflow venv's Python (``make demo`` does).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import requests

from airflow_provider_ppio.testing.server import EmulatorControl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
from dagtest_runner import (  # noqa: E402
    GATE_DAG,
    DagRunResult,
    migrate_db,
    new_home,
    on_first_read,
    ppio_connection,
    run_dag_test,
)

GOOD_IMAGE = "registry.example.com/acme/llm-server:1.4"
BAD_IMAGE = "registry.example.com/acme/llm-server:missing-tag"
REGION = "us-east-1"
PRODUCTS = ["gpu-rtx-4090-24g", "gpu-a100-80g"]
# Emulated lifecycle: a new task is running after 1 s and would take an hour to finish. Once the sensor has seen
# it running, the demo fast-forwards the emulator's clock, so the sensor's next poke (5 s later) sees the end.
PENDING_SECONDS = 1
RUNNING_SECONDS = 3600
STARTUP_TIMEOUT = 30.0

T0 = time.monotonic()


def say(message: str = "") -> None:
    """Print one line of the demo's story at once."""
    print(message, flush=True)


def stamp() -> str:
    """Seconds since the demo started, as ``[ 12.3s]``."""
    return f"[{time.monotonic() - T0:5.1f}s]"


class DemoFailure(Exception):
    """Something did not behave as the demo expects."""


@contextlib.contextmanager
def emulator(api_key: str) -> Iterator[str]:
    """
    Run ``ppio-emulator`` on a free loopback port until the block ends, whatever way it ends.

    :param api_key: The only key the emulator accepts.
    :return: Its base URL.
    """
    script = Path(sys.executable).with_name("ppio-emulator")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "airflow_provider_ppio.testing.cli"]
    command += [
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--api-key",
        api_key,
        "--pending-seconds",
        str(PENDING_SECONDS),
        "--running-seconds",
        str(RUNNING_SECONDS),
        "--fail-pattern",
        "missing-tag",
    ]
    # Own session: Ctrl-C reaches only the demo, which then stops the emulator itself, in order.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        yield _wait_for_url(proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=0.2):
                if proc.poll() is not None:
                    break
                continue
            line = proc.stdout.readline()
            if not line:
                break
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                return match.group(1)
    proc.kill()
    _, err = proc.communicate()
    raise DemoFailure(f"the emulator did not start within {STARTUP_TIMEOUT:g}s:\n{err}")


def create_prewarm_task(base_url: str, api_key: str, image: str) -> str:
    """
    ``POST /gpus/v2/prewarm-tasks``, as a CI pipeline would before triggering the DAG.

    :param base_url: The API root.
    :param api_key: The key.
    :param image: The image to prewarm.
    :return: The new task's id.
    """
    response = requests.post(
        f"{base_url}/gpus/v2/prewarm-tasks",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"image": image, "region_id": REGION, "product_ids": PRODUCTS, "note": "make demo"},
        timeout=10,
    )
    response.raise_for_status()
    answer = response.json()
    task_id = answer.get("task_id") or answer.get("id")
    if not isinstance(task_id, str):
        raise DemoFailure(f"the create answer has no task id: {answer}")
    return task_id


def states_seen(result: DagRunResult, task_id: str) -> list[str]:
    """The prewarm states the sensor logged, in order, without repeats."""
    seen: list[str] = []
    for state in re.findall(
        rf"Prewarm task {re.escape(task_id)} (?:is (\w+)|(succeeded):)", result.task_log("wait_for_prewarm")
    ):
        name = state[0] or state[1]
        if not seen or seen[-1] != name:
            seen.append(name)
    return seen


def api_error_line(result: DagRunResult) -> str:
    """The sensor's failure message (``PPIO prewarm task '...' failed | error: ... | message: ...``)."""
    match = re.search(r"PPIO prewarm task '[^']*' failed[^\n]*", result.task_log("wait_for_prewarm"))
    return match.group(0) if match else ""


def show_states(result: DagRunResult, note: dict[str, str]) -> None:
    """Print each task's final state."""
    for task_id in ("wait_for_prewarm", "get_prewarm_details", "deploy"):
        state = result.task_states.get(task_id, "(no task instance)")
        extra = note.get(task_id, "")
        say(f"    {task_id:<21} {state:<16}{extra}".rstrip())


def show_details(details: dict[str, Any]) -> None:
    """Print the prewarm details the deploy task received."""
    completed = details.get("completed_at") or 0
    when = (
        datetime.datetime.fromtimestamp(completed, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        if completed
        else "-"
    )
    rows = [
        ("task_id", details.get("task_id")),
        ("image", details.get("image")),
        ("region_id", details.get("region_id")),
        ("product_ids", ", ".join(details.get("product_ids") or []) or "-"),
        ("image_size", f"{(details.get('image_size') or 0) / 1e9:.2f} GB"),
        ("status", f"{details['status']['status']} ({details['status'].get('message') or '-'})"),
        ("completed_at", when),
    ]
    for name, value in rows:
        say(f"        {name:<13} {value}")


def check(condition: bool, problems: list[str], message: str) -> None:
    """Record ``message`` as a problem unless ``condition`` holds."""
    if not condition:
        problems.append(message)


def scenario(
    number: int, title: str, workdir: Path, template: Path, base_url: str, api_key: str, image: str
) -> tuple[DagRunResult, str]:
    """
    Create a prewarm task of ``image`` and run the gate DAG on it in a fresh AIRFLOW_HOME.

    :return: The run's result and the prewarm task id.
    """
    say()
    say(f"Scenario {number}: {title}")
    prewarm_id = create_prewarm_task(base_url, api_key, image)
    say(f"  {stamp()} created prewarm task {prewarm_id}: {image} in {REGION}")
    conf = json.dumps({"prewarm_task_id": prewarm_id})
    say(f"  {stamp()} airflow dags test {GATE_DAG} --conf '{conf}'")
    home = new_home(workdir / f"scenario-{number}", template=template)
    control = EmulatorControl(base_url)

    def fast_forward() -> None:
        control.advance_clock(RUNNING_SECONDS)
        say(f"  {stamp()} the sensor saw the prewarm running; fast-forwarding the emulator's clock by an hour")

    with on_first_read(control, prewarm_id, fast_forward):
        result = run_dag_test(
            home, GATE_DAG, conf={"prewarm_task_id": prewarm_id}, env=ppio_connection(base_url, api_key)
        )
    control.close()
    (workdir / f"scenario-{number}.log").write_text(result.output)
    say(f"  {stamp()} run finished in {result.seconds:.1f}s (exit code {result.returncode})")
    return result, prewarm_id


def run_demo(workdir: Path) -> list[str]:
    """
    Both scenarios; returns what did not behave as expected (empty when all did).

    :param workdir: Where the AIRFLOW_HOMEs and logs go.
    """
    problems: list[str] = []
    api_key = "sk_demo_" + secrets.token_hex(12)
    with emulator(api_key) as base_url:
        say(f"{stamp()} PPIO emulator listening on {base_url} (ppio-emulator; a random API key for this run)")
        say(f"{stamp()} AIRFLOW_CONN_PPIO_DEFAULT -> {base_url}; throwaway AIRFLOW_HOMEs (SQLite) in {workdir}")
        template = workdir / "template"
        migrate_db(template)
        say(f"{stamp()} airflow db migrate done")

        ok, ok_id = scenario(
            1, "the prewarm succeeds, so the deployment goes ahead", workdir, template, base_url, api_key, GOOD_IMAGE
        )
        seen = states_seen(ok, ok_id)
        show_states(ok, {"wait_for_prewarm": f"(saw {' -> '.join(seen)})" if seen else ""})
        details = ok.xcoms.get("get_prewarm_details", {}).get("return_value")
        if isinstance(details, dict) and isinstance(details.get("status"), dict):
            say("    deploy received through XCom:")
            show_details(details)
        said = ok.xcoms.get("deploy", {}).get("return_value")
        if said:
            say(f"    deploy said: {said}")
        expected = {"wait_for_prewarm": "success", "get_prewarm_details": "success", "deploy": "success"}
        check(ok.returncode == 0, problems, f"scenario 1: dags test exited {ok.returncode}")
        check(ok.task_states == expected, problems, f"scenario 1: task states {ok.task_states}")
        check(
            isinstance(details, dict) and details.get("task_id") == ok_id and details.get("image") == GOOD_IMAGE,
            problems,
            f"scenario 1: deploy did not receive the prewarm details of {ok_id} ({details!r})",
        )
        check(
            said == f"deploying {GOOD_IMAGE} to region {REGION} (prewarm {ok_id})",
            problems,
            f"scenario 1: deploy returned {said!r}",
        )

        bad, bad_id = scenario(
            2, "the prewarm fails, so the deployment is stopped", workdir, template, base_url, api_key, BAD_IMAGE
        )
        seen = states_seen(bad, bad_id) + (["failed"] if bad.task_states.get("wait_for_prewarm") == "failed" else [])
        show_states(bad, {"wait_for_prewarm": f"(saw {' -> '.join(seen)})", "deploy": "(never ran)"})
        error = api_error_line(bad)
        say("    the sensor failed with the API's error:")
        say(f"        {error or '(not found in the task log)'}")
        expected = {
            "wait_for_prewarm": "failed",
            "get_prewarm_details": "upstream_failed",
            "deploy": "upstream_failed",
        }
        check(bad.returncode != 0, problems, "scenario 2: dags test exited 0 although the run failed")
        check(bad.task_states == expected, problems, f"scenario 2: task states {bad.task_states}")
        check("deploy" not in bad.xcoms, problems, "scenario 2: deploy pushed an XCom, so it ran")
        check(
            "ImagePullFailed" in error and "manifest unknown" in error,
            problems,
            "scenario 2: the API's error message is not in the sensor's log",
        )

    for number, result in ((1, ok), (2, bad)):
        leaks = result.secret_leaks(api_key)
        check(not leaks, problems, f"scenario {number}: the API key appears in: {', '.join(leaks)}")
    say()
    if not any("API key" in problem for problem in problems):
        say("API key: found in no output, log, XCom or database row of either run")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Run the demo; exit code 0 only when both scenarios behaved as expected."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--keep", action="store_true", help="keep the AIRFLOW_HOMEs and logs even on success")
    args = parser.parse_args(argv)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the emulator

    signal.signal(signal.SIGTERM, on_sigterm)
    airflow = importlib.metadata.version("apache-airflow")
    say(f"PPIO provider demo: a GPU deployment gated on an image prewarm (Airflow {airflow}, offline emulator)")
    workdir = Path(tempfile.mkdtemp(prefix="ppio-demo-"))
    problems = ["interrupted"]
    try:
        problems = run_demo(workdir)
    except (DemoFailure, RuntimeError, OSError, requests.RequestException) as err:
        problems = [f"{type(err).__name__}: {err}"]
    except KeyboardInterrupt:
        say("\ninterrupted; emulator stopped")
        return 130
    finally:
        elapsed = time.monotonic() - T0
        if problems or args.keep:
            say(f"AIRFLOW_HOMEs and full dags test output kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if problems:
        say(f"DEMO FAILED after {elapsed:.1f}s:")
        for problem in problems:
            say(f"  - {problem}")
        return 1
    say(f"Demo passed in {elapsed:.1f}s: the gate let the deployment through only after a successful prewarm.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
