"""
The fault matrix: every scenario of ``matrix.SCENARIOS`` through the hook, the sensor's poke and the trigger,
over real HTTP (the emulator, or a raw socket server for faults it cannot produce).

Each case asserts the expected outcome written in the scenario (see docs/reliability.md for the table),
that the API key shows up in no message or event, and that nothing hangs (a hard limit per case).
"""

from __future__ import annotations

from typing import Any

import pytest
from matrix import PATHS, SCENARIOS, TASK_ID, Arena, Scenario, describe_expected, describe_measured, measure, mismatches


@pytest.mark.integration
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda scenario: scenario.name)
def test_fault_scenario(
    scenario: Scenario,
    path: str,
    rel_emulator: Any,
    monkeypatch: pytest.MonkeyPatch,
    matrix_results: list[dict[str, Any]],
) -> None:
    if scenario.state is not None:
        rel_emulator.control.seed_task(
            task_id=TASK_ID, state=scenario.state, image="registry.example.com/acme/llm-server:1.4"
        )
    arena = Arena(rel_emulator, lambda conn: monkeypatch.setenv("AIRFLOW_CONN_PPIO_DEFAULT", conn), scenario.extra)
    try:
        scenario.arrange(arena)
        measured = measure(scenario, path, arena)
    finally:
        arena.stop()

    expected = scenario.expect(path)
    problems = mismatches(expected, measured)
    matrix_results.append(
        {
            "index": SCENARIOS.index(scenario),
            "path_index": PATHS.index(path),
            "scenario": scenario.name,
            "title": scenario.title,
            "produced_by": scenario.produced_by,
            "path": path,
            "expected": describe_expected(expected),
            "measured": describe_measured(expected, measured),
            "ok": not problems,
            "hang": measured.outcome == "hang",
            "seconds": round(measured.seconds, 3),
        }
    )
    assert not problems, f"{scenario.name} via {path}: " + "; ".join(problems)
