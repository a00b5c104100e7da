"""
DAG-parse cost: marginal import time of the sensor module and of a one-sensor DAG file, vs the http provider,
and of the modules the package keeps out of a DAG parse (the models, the hook), to show whether each split pays.

Each figure is the median over fresh interpreters: each process first imports what a DAG parser
always has loaded (``airflow.sdk`` on Airflow 3, ``airflow`` and ``airflow.models.dag`` on 2.x),
then times one target with ``perf_counter``. Targets run interleaved, one per process.
``-X importtime`` of one more process per module shows what the import pulls in.

Usage::

    python benchmarks/parse_cost.py                                   # this interpreter, 15 processes
    python benchmarks/parse_cost.py --python .venvs/af2/bin/python --processes 9
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import LoadSampler, machine, median, run_python, table

OURS = "airflow_provider_ppio.sensors.prewarm"
HTTP = "airflow.providers.http.sensors.http"
TARGET_MS = 25.0
TARGET_RATIO = 0.2

_DAG_HEAD = """\
import datetime
try:
    from airflow.sdk import DAG
except ImportError:  # Airflow 2.x
    from airflow import DAG
"""
_DAG_WITH = (
    _DAG_HEAD
    + """{import_line}
with DAG(dag_id="{dag_id}", schedule=None, start_date=datetime.datetime(2026, 1, 1), catchup=False) as dag:
{task}
"""
)
DAG_FILES = {
    "dag_ppio.py": _DAG_WITH.format(
        dag_id="bench_ppio",
        import_line="from airflow_provider_ppio.sensors.prewarm import PrewarmTaskSensor",
        task='    PrewarmTaskSensor(task_id="wait", prewarm_task_id="{{ params.task }}", poke_interval=5)',
    ),
    "dag_http.py": _DAG_WITH.format(
        dag_id="bench_http",
        import_line="from airflow.providers.http.sensors.http import HttpSensor",
        task=(
            '    HttpSensor(task_id="wait", http_conn_id="ppio_http", poke_interval=5,\n'
            '               endpoint="/gpus/v2/prewarm-tasks/{{ params.task }}",\n'
            '               response_check=lambda r: r.json()["status"]["status"] == "succeeded")'
        ),
    ),
    # What every DAG file pays before any provider: Airflow's first DAG and first operator.
    "dag_reference.py": _DAG_WITH.format(
        dag_id="bench_reference",
        import_line=(
            "try:\n    from airflow.providers.standard.operators.empty import EmptyOperator\n"
            "except ImportError:  # Airflow 2.x\n    from airflow.operators.empty import EmptyOperator"
        ),
        task='    EmptyOperator(task_id="start")',
    ),
}
TARGETS = (
    ("sensor module: ppio", "module", OURS),
    ("sensor module: http", "module", HTTP),
    ("DAG file: ppio sensor", "dag", "dag_ppio.py"),
    ("DAG file: HttpSensor", "dag", "dag_http.py"),
    ("DAG file: one EmptyOperator (reference)", "dag", "dag_reference.py"),
    ("DAG file after the reference: ppio sensor", "dag-warm", "dag_ppio.py"),
    ("DAG file after the reference: HttpSensor", "dag-warm", "dag_http.py"),
    # What the package's module splits keep out of a DAG parse (they load when a task runs).
    ("split off: the pydantic models", "module", "airflow_provider_ppio.models"),
    ("split off: the hook and its transports", "module", "airflow_provider_ppio.hooks.ppio"),
)

_CHILD = """
import json, sys, time

def load(name, path):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)

t0 = time.perf_counter()
try:
    import airflow.sdk
except ImportError:
    import airflow, airflow.models.dag
kind, target, first_dag = {kind!r}, {target!r}, {first_dag!r}
if kind == "dag-warm":
    load("bench_first_dag", first_dag)  # Airflow's own first-DAG and first-operator imports, not counted
t1 = time.perf_counter()
before = set(sys.modules)
sys.stderr.write("@@target\\n"); sys.stderr.flush()
if kind == "module":
    __import__(target)  # the C import path, which -X importtime reports (importlib.import_module is not)
else:
    load("bench_dag_file", target)
t2 = time.perf_counter()
result = {{"baseline_ms": (t1 - t0) * 1e3, "ms": (t2 - t1) * 1e3, "modules": len(set(sys.modules) - before)}}
print("@@result", json.dumps(result))
"""


def child_code(kind: str, target: str, dag_dir: str) -> str:
    """The program one fresh process runs for one target."""
    path = os.path.join(dag_dir, target) if kind.startswith("dag") else target
    return _CHILD.format(kind=kind, target=path, first_dag=os.path.join(dag_dir, "dag_reference.py"))


def child_env() -> dict[str, str]:
    """A quiet, throwaway Airflow home for the children."""
    env = dict(os.environ)
    env.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="ppio-bench-home-"))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def importtime(python: str, module: str, env: dict[str, str], top: int = 6) -> list[list[str]]:
    """The module's own row and its heaviest direct imports, from ``-X importtime`` (after the baseline)."""
    code = child_code("module", module, "")
    done = subprocess.run([python, "-X", "importtime", "-c", code], capture_output=True, text=True, env=env)
    lines = done.stderr.split("@@target\n", 1)[-1].splitlines()
    entries = []
    for line in lines:
        if not line.startswith("import time:") or "|" not in line or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|")
        depth = (len(name) - len(name.lstrip())) // 2
        entries.append((depth, int(cumulative), name.strip()))
    index = next((n for n, entry in enumerate(entries) if entry[2] == module), None)
    if index is None:
        return []
    own = entries[index]
    first = index  # a module's imports are printed just before it, one level deeper
    while first > 0 and entries[first - 1][0] > own[0]:
        first -= 1
    children = sorted((entry for entry in entries[first:index] if entry[0] == own[0] + 1), key=lambda entry: -entry[1])
    return [[module, f"{own[1] / 1e3:.1f}"]] + [[f"  {name}", f"{us / 1e3:.1f}"] for _, us, name in children[:top]]


def measure(python: str, processes: int, dag_dir: str, env: dict[str, str], kinds: set[str]) -> dict[str, Any]:
    """Median marginal import time and new-module count per target, over ``processes`` fresh processes."""
    targets = [entry for entry in TARGETS if entry[1].split("-")[0] in kinds]
    samples: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in targets}
    for _ in range(processes):
        for label, kind, target in targets:
            output = run_python(child_code(kind, target, dag_dir), python, env)
            samples[label].append(json.loads(output.rsplit("@@result ", 1)[1]))
    return {
        label: {
            "ms": median([run["ms"] for run in runs]),
            "min": min(run["ms"] for run in runs),
            "max": max(run["ms"] for run in runs),
            "modules": median([run["modules"] for run in runs]),
            "baseline_ms": median([run["baseline_ms"] for run in runs]),
        }
        for label, runs in samples.items()
    }


def report(
    python: str, results: dict[str, Any], processes: int, load: str, env: dict[str, str], breakdown: bool
) -> str:
    """Markdown: the medians, the ratios against the targets, and the import-time breakdown."""
    version = run_python("import airflow; print(airflow.__version__)", python, env).strip()
    baseline = median([entry["baseline_ms"] for entry in results.values()])
    rows = [
        [label, f"{entry['ms']:.1f}", f"{entry['min']:.1f}-{entry['max']:.1f}", f"{entry['modules']:.0f}"]
        for label, entry in results.items()
    ]
    verdicts = []
    for what, ours, theirs in (
        ("sensor module", "sensor module: ppio", "sensor module: http"),
        ("DAG file", "DAG file: ppio sensor", "DAG file: HttpSensor"),
        (
            "DAG file after the reference",
            "DAG file after the reference: ppio sensor",
            "DAG file after the reference: HttpSensor",
        ),
    ):
        if ours not in results:
            continue
        ms, ratio = results[ours]["ms"], results[ours]["ms"] / results[theirs]["ms"]
        ok = "met" if ms <= TARGET_MS and ratio <= TARGET_RATIO else "MISSED"
        verdicts.append(f"{what}: {ms:.1f} ms, {ratio:.2f}x http ({ok})")
    text = (
        "\n\n`-X importtime` (one process, cumulative ms; indented rows are the heaviest direct imports):\n\n"
        + table(["module", "cumulative ms"], importtime(python, OURS, env) + importtime(python, HTTP, env))
        if breakdown
        else ""
    )
    return (
        f"### Airflow {version} ({python})\n\n"
        f"Median of {processes} fresh processes per row; baseline import took {baseline:.0f} ms (not counted); "
        f"load average during run: {load}.\n\n"
        + table(["marginal import", "median ms", "min-max ms", "new modules"], rows)
        + f"\n\nTargets (<= {TARGET_MS:g} ms and <= {TARGET_RATIO}x http): "
        + "; ".join(verdicts)
        + text
        + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    """Run the comparison for each interpreter and print Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", help="interpreter(s) to measure (default: this one)")
    parser.add_argument("--processes", type=int, default=15, help="fresh processes per target")
    parser.add_argument("--kinds", default="module,dag", help="comma-separated target kinds: module, dag")
    parser.add_argument("--importtime", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    env = child_env()
    print(f"## DAG-parse cost\n\nMachine: {machine()}")
    print(f"Command: python benchmarks/parse_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    with tempfile.TemporaryDirectory(prefix="ppio-bench-dags-") as dag_dir:
        for name, source in DAG_FILES.items():
            with open(os.path.join(dag_dir, name), "w") as handle:
                handle.write(source)
        for python in args.python or [sys.executable]:
            with LoadSampler() as load:
                results = measure(python, args.processes, dag_dir, env, set(args.kinds.split(",")))
            print(report(python, results, args.processes, load.summary(), env, args.importtime), flush=True)


if __name__ == "__main__":
    main()
