"""
Smoke runs of the benchmark scripts in tiny configurations: they run end to end and print their tables.

No timing is asserted (the figures live in docs/benchmarks.md); only what the scripts prove about
behaviour, such as the sensor reusing its connection between pokes.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def run_script(name: str, *args: str, timeout: float = 300) -> str:
    """Run ``benchmarks/<name>`` with this interpreter and return its stdout (fails on a non-zero exit)."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_row(output: str, first_cell: str) -> list[str]:
    """The cells of the Markdown table row whose first cell is ``first_cell`` (the first such row)."""
    match = re.search(rf"^\| {re.escape(first_cell)} \|(.*)\|$", output, re.MULTILINE)
    assert match, f"no row {first_cell!r} in:\n{output}"
    return [cell.strip() for cell in match.group(1).split("|")]


def benchmark_module(name: str) -> Any:
    """
    The module ``benchmarks/<name>.py``, imported from its file (the folder is not a package).

    :param name: The script's name without ``.py``.
    """
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass in it looks its module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def plot_module() -> Any:
    """``benchmarks/plot.py``: its readers need only the standard library (drawing needs matplotlib)."""
    return benchmark_module("plot")


@pytest.mark.timeout(240)
def test_poke_cost_compares_the_three_contenders_over_real_http(tmp_path: Path) -> None:
    output = run_script(
        *("poke_cost.py", "--servers", "minimal,emulator", "--pokes", "3", "--warmup", "1", "--rounds", "1"),
        *("--ablation", "--json", str(tmp_path / "poke.json")),
    )

    assert "### Server: minimal" in output and "### Server: emulator" in output
    for contender in ("ppio", "ppio cold", "http", "floor", "floor cold", "ppio, thread per call"):
        cpu_us, wall_us = table_row(output, contender)[:2]
        assert float(cpu_us) > 0 and float(wall_us) > 0
    # Counted by the server: the sensor keeps its connection between pokes, HttpSensor connects every time.
    assert table_row(output, "ppio")[-1] == "0.00"
    assert table_row(output, "ppio cold")[-1] == "1.00"
    assert table_row(output, "http")[-1] == "1.00"
    assert "Targets: ppio/http <= 0.6" in output
    # The JSON holds the table's figures, in the shape benchmarks/plot.py draws.
    plot = plot_module()
    series = plot.poke_series(plot.load(tmp_path / "poke.json", "poke_cost"))
    assert list(series) == ["minimal", "emulator"]
    ppio = next(row for row in series["minimal"] if row[0] == "ppio")
    assert f"{ppio[1]:.0f}" == table_row(output, "ppio")[0]


@pytest.mark.timeout(240)
def test_parse_cost_measures_both_sensor_modules_in_fresh_processes() -> None:
    output = run_script("parse_cost.py", "--processes", "1", "--kinds", "module", "--no-importtime")

    ours = table_row(output, "sensor module: ppio")
    http = table_row(output, "sensor module: http")
    assert float(ours[0]) > 0 and float(http[0]) > 0
    # The sensor module must not drag requests, httpx or pydantic models into a DAG parse.
    assert int(ours[2]) < int(http[2])
    # The splits are measured too: the hook (requests, aiohttp) costs more than the models, both more than 0.
    models, hook = (
        table_row(output, "split off: the pydantic models"),
        table_row(output, "split off: the hook and its transports"),
    )
    assert 0 < float(models[0]) < float(hook[0]), output


def rows_with(output: str, cell: str) -> list[list[str]]:
    """The cells of every Markdown table row that has a cell equal to ``cell``."""
    rows = [
        [part.strip() for part in line.strip().strip("|").split("|")]
        for line in output.splitlines()
        if line.startswith("| ")
    ]
    return [row for row in rows if cell in row]


@pytest.mark.timeout(240)
def test_async_transport_compares_three_clients_on_one_keep_alive_connection() -> None:
    output = run_script(
        "async_transport.py", "--requests", "3", "--rounds", "1", "--warmup", "1", "--profile", "5", timeout=120
    )

    assert "### http" in output and "### https" in output
    comparison, _, profile = output.partition("### Profile")
    for contender in ("aiohttp", "httpx", "hook"):
        rows = rows_with(comparison, contender)
        assert len(rows) == 2, output  # one row per scheme
        for row in rows:
            assert float(row[1]) > 0
            # Counted by the server: every client, the hook's shared session too, keeps its connection.
            assert row[-1] == "0.000", row
    assert profile.startswith(": 5 warm hook calls") and "provider (ours)" in profile


@pytest.mark.timeout(240)
def test_triggerer_scale_runs_both_triggers_and_the_floor_and_every_wait_fires(tmp_path: Path) -> None:
    output = run_script(
        *("triggerer_scale.py", "--counts", "5", "--repeats", "1", "--interval", "0.2", "--rounds", "1"),
        *("--json", str(tmp_path / "runs.json")),
    )

    ours, theirs = rows_with(output, "`PrewarmTaskTrigger`"), rows_with(output, "`HttpSensorTrigger`")
    floor, floor_airflow = rows_with(output, "`bare aiohttp`"), rows_with(output, "`bare aiohttp + Airflow`")
    for rows in (ours, theirs, floor, floor_airflow):
        assert [row[0] for row in rows] == ["https", "http"], output
    for row in ours + theirs + floor + floor_airflow:
        assert row[7] == "0", row  # events lost
    for label in ("ratio ours / bare aiohttp", "ratio ours / bare aiohttp + Airflow"):
        ratios = rows_with(output, label)
        assert len(ratios) == 2, output
        assert all(float(row[4]) > 0 for row in ratios), ratios  # the peak RSS ratio
    # Every run is in the JSON, in the shape benchmarks/plot.py draws (N, RSS, CPU per poll, lost).
    plot = plot_module()
    series = plot.growth_series(plot.load(tmp_path / "runs.json", "triggerer_scale"))
    kinds = ("HttpSensorTrigger", "PrewarmTaskTrigger", "bare aiohttp", "bare aiohttp + Airflow")
    assert sorted(series) == [(s, k) for s in ("http", "https") for k in kinds]
    for points in series.values():
        ((count, rss, cpu, lost),) = points
        # CPU per poll may round to 0 in this tiny window (the worker's CPU clock ticks in 10 ms steps).
        assert count == 5 and rss > 0 and cpu >= 0 and lost == 0


def test_a_triggerer_ratio_compares_the_runs_taken_side_by_side() -> None:
    scale = benchmark_module("triggerer_scale")
    # The machine slowed down between runs: each run's ratio is ours over the floor measured next to it.
    assert scale._ratio([500.0, 650.0, 640.0], [450.0, 540.0, 600.0]) == "1.11 (1.11, 1.20, 1.07)"
    assert scale._ratio([500.0], [400.0], bold=True) == "**1.25**"
    assert scale._ratio([500.0], [float("inf")]) == "n/a"


@pytest.mark.timeout(240)
def test_triggerer_outage_ends_every_wait_with_a_timeout_event() -> None:
    output = run_script(
        "triggerer_scale.py",
        *("--counts", "--schemes", "http", "--outage", "503", "hang"),
        *("--outage-waits", "5", "--outage-interval", "0.5", "--outage-deadline", "2", "--outage-timeout", "0.5"),
        timeout=120,
    )

    for mode in ("503", "hang"):
        (row,) = rows_with(output, mode)
        assert row[4] == "timeout 5", row  # every wait fired exactly one event, a timeout
        assert row[5] == "0", row  # none lost
        assert int(row[9].replace(",", "")) >= 5, row  # the server saw the polls
    assert "requests per second, from second 0:" in output
