"""
docs/versions.md is the one list of supported versions: its table agrees with what the venvs install and with
the package's declared minimum, so the README, provider info and CI cannot drift from it unnoticed.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "versions.md").read_text()
BOOTSTRAP = (ROOT / "scripts" / "bootstrap.sh").read_text()
_ROW = re.compile(r"^\| (\d+\.\d+) +\| (\d+\.\d+\.\d+) +\| ([^|]+?) +\| `([^`]+)` +\| ([^|]+?) +\|", re.MULTILINE)
ROWS = _ROW.findall(DOC)


def test_the_table_lists_every_line() -> None:
    assert [row[0] for row in ROWS] == ["2.11", "3.0", "3.1", "3.2", "3.3"]


@pytest.mark.parametrize(("line", "version", "constraints"), [(r[0], r[1], r[3]) for r in ROWS], ids=lambda v: v)
def test_each_line_is_installed_at_its_tested_version(line: str, version: str, constraints: str) -> None:
    assert constraints == f"requirements/constraints-airflow-{line}.txt"
    assert f"apache-airflow=={version}\n" in (ROOT / constraints).read_text()
    assert re.search(rf"^AIRFLOW_\w+={re.escape(version)}$", BOOTSTRAP, re.MULTILINE), version
    for venv in re.findall(r"`([\w-]+)`", next(r[4] for r in ROWS if r[0] == line)):
        case_label = rf"^\s+(?:[\w-]+ \| )*{re.escape(venv)}(?: \| [\w-]+)*\)"  # a profile of bootstrap's case
        assert re.search(case_label, BOOTSTRAP, re.MULTILINE), venv


def test_the_minimum_airflow_is_the_one_the_package_declares() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (airflow,) = [dep for dep in project["dependencies"] if re.match(r"apache-airflow\s*>=", dep)]
    minimum = airflow.split(">=")[1].strip()
    assert f"**Minimum Airflow:** {minimum} (`apache-airflow>={minimum}`" in DOC
