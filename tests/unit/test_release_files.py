"""The release and CI files agree with each other: licence, changelog, pre-commit pins, the workflow and .ci/run."""

from __future__ import annotations

import hashlib
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import yaml
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
#: sha256 of https://www.apache.org/licenses/LICENSE-2.0.txt (also Debian's /usr/share/common-licenses/Apache-2.0).
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
#: The Python package each pinned pre-commit hook repository runs.
HOOK_REPO_PACKAGES = {"https://github.com/astral-sh/ruff-pre-commit": "ruff"}


def constraint_pins() -> dict[str, str]:
    text = (ROOT / "requirements" / "constraints-airflow-3.3.txt").read_text()
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", text, flags=re.MULTILINE))


def test_license_is_the_apache_2_text_pyproject_declares() -> None:
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"
    assert hashlib.sha256((ROOT / "LICENSE").read_bytes()).hexdigest() == APACHE_2_SHA256
    assert "airflow-provider-ppio" in (ROOT / "NOTICE").read_text()


def test_changelog_releases_are_dated_and_newest_first() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.count("## [Unreleased]") == 1
    headings = re.findall(r"^## \[([^\]]+)\](.*)$", text, flags=re.MULTILINE)
    assert headings[0][0] == "Unreleased"
    releases = headings[1:]
    assert releases
    for version, rest in releases:
        assert re.fullmatch(r" - \d{4}-\d{2}-\d{2}", rest), f"{version}: no ' - YYYY-MM-DD' date"
    versions = [Version(version) for version, _ in releases]
    assert versions == sorted(versions, reverse=True)


def test_pre_commit_hooks_pin_the_lint_tools_constraints() -> None:
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    pins = constraint_pins()
    lint_tools = (ROOT / "requirements" / "lint.txt").read_text().split()
    remote = [repo for repo in config["repos"] if repo["repo"] not in ("local", "meta")]
    assert remote
    for repo in remote:
        package = HOOK_REPO_PACKAGES[repo["repo"]]
        assert package in lint_tools
        assert repo["rev"] == f"v{pins[package]}", f"{repo['repo']} is at {repo['rev']}, constraints pin {package}"
    (mypy,) = (hook for repo in config["repos"] if repo["repo"] == "local" for hook in repo["hooks"])
    # mypy from the Airflow 3.3 venv: the constraints' version, pyproject's settings, Airflow's types.
    assert mypy["entry"] == ".venvs/af3/bin/mypy"
    assert "mypy" in lint_tools and "mypy" in pins


def ci_run_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    skip = ("#", "set ", "cd ")
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith(skip)]


def make_rule(target: str) -> tuple[list[str], list[str]]:
    """The prerequisites and recipe lines of ``target`` in the Makefile."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith(f"{target}:"):
            recipe = []
            for following in lines[number + 1 :]:
                if not following.startswith("\t"):
                    break
                recipe.append(following.strip().lstrip("@"))
            return line.split(":", 1)[1].split(), recipe
    raise AssertionError(f"no rule for {target} in the Makefile")


def all_test_steps() -> list[str]:
    match = re.search(r"^\s*all\) steps\+=\((.+)\) ;;$", (ROOT / "scripts" / "test.sh").read_text(), re.MULTILINE)
    assert match, "scripts/test.sh no longer says what 'all' runs"
    return match.group(1).split()


def counterparts(command: str) -> list[str]:
    """
    What the workflow must run for one command of .ci/run: the command itself, or what it stands for.

    ``make venvs`` stands for its prerequisites, ``make test`` (``scripts/test.sh all``) for the steps of ``all``.
    """
    words = shlex.split(command)
    if words[0] != "make":
        return [command]
    prerequisites, recipe = make_rule(words[1])
    if recipe == ["scripts/test.sh all"]:
        return [f"scripts/test.sh {step}" for step in all_test_steps()]
    if not recipe:
        return [f"make {prerequisite}" for prerequisite in prerequisites]
    return [command]


def workflow_commands() -> set[str]:
    workflow: dict[str, Any] = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    return {
        line.strip()
        for job in workflow["jobs"].values()
        for step in job["steps"]
        if "run" in step
        for line in step["run"].splitlines()
    }


def test_the_workflow_runs_every_step_of_ci_run() -> None:
    commands = ci_run_commands()
    assert "make test" in commands and "make test-wheel" in commands
    in_workflow = workflow_commands()
    missing = {command: need for command in commands for need in counterparts(command) if need not in in_workflow}
    assert not missing, f"commands of .ci/run with no counterpart in .github/workflows/ci.yml: {missing}"


def test_the_workflow_runs_nothing_ci_run_does_not() -> None:
    wanted = {need for command in ci_run_commands() for need in counterparts(command)}
    # Each job builds the one venv it needs; .ci/run builds them all first (make venvs).
    venvs = {f"make {prerequisite}" for prerequisite in make_rule("venvs")[0]}
    assert workflow_commands() - wanted - venvs == set()
