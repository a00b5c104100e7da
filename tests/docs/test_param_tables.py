"""The parameter tables in docs/ say what the code does (``python tests/docs/param_tables.py`` rewrites them)."""

from __future__ import annotations

import difflib

from param_tables import checked_here, pages, render


def test_every_documented_class_has_exactly_one_table() -> None:
    documented = [wanted.split(":")[0].split()[-1] for blocks in pages().values() for _, wanted in blocks]
    assert sorted(documented) == sorted(checked_here())


def test_the_tables_match_the_code() -> None:
    diffs = [
        "".join(difflib.unified_diff(now.splitlines(True), wanted.splitlines(True), str(page), "the code"))
        for page, blocks in pages().items()
        for now, wanted in blocks
        if now != wanted
    ]
    assert not diffs, "stale parameter tables (run python tests/docs/param_tables.py):\n" + "\n".join(diffs)


def test_the_sensor_table_shows_the_inherited_defaults() -> None:
    table = render("airflow_provider_ppio.sensors.prewarm.PrewarmTaskSensor")

    assert "| `poke_interval` (inherited) | `60` s (1 min) |" in table
    assert "| `timeout` (inherited) | `604800` s (7 days) (from `[sensors] default_timeout`) |" in table
    assert "| `mode` (inherited) | `'poke'` |" in table
