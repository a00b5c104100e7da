"""
The docs say each fact once and say it truly: snippets run, version numbers live only in docs/versions.md.

* Every ```python block of the README and docs/ parses, on every line. On Airflow 3 its imports resolve and it
  runs, against the emulator (``ppio_default`` pointing at it, a prewarm ``pwt-123`` seeded), unless the
  line before its fence is ``<!-- docs-test: compile -->`` (a fragment, or a snippet that would change this
  process: a conftest, an Airflow home).
* An Airflow or Python version number (``2.11.2``, ``3.3.2``, ``3.11``) anywhere in the README or docs/ except
  docs/versions.md fails: the one list is there (and the CHANGELOG, which is history). ``ALLOWED`` lists what
  must stay.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
VERSIONS_PAGE = ROOT / "docs" / "versions.md"
COMPILE_ONLY = "<!-- docs-test: compile -->"
_INCLUDE = re.compile(r'^--8<-- "(?P<path>[^"]+)"$', re.M)
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)

#: An Airflow patch version (2.0.0-2.11.x, 3.0.0-3.9.x) or a Python version (3.10-3.19, with or without a patch).
VERSION = re.compile(r"(?<![\w.])(?:(?:2\.(?:1[01]|[0-9])|3\.[0-9])\.\d+|3\.1[0-9](?:\.\d+)?)(?![\w.])")
#: Version numbers that must stay outside docs/versions.md, per page, with the reason.
ALLOWED: dict[str, set[str]] = {}


def snippets() -> Iterator[Any]:
    """Every Python block of the README and docs/, as a pytest param named by page and line."""
    for page in PAGES:
        text = page.read_text()
        for match in _FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
            indent = match["indent"]
            body = "\n".join(row[len(indent) :] if row.startswith(indent) else row for row in match["body"].split("\n"))
            body = _INCLUDE.sub(lambda m: (ROOT / m["path"]).read_text(), body)  # pymdownx.snippets, as mkdocs does
            yield pytest.param(body, before == COMPILE_ONLY, id=f"{page.relative_to(ROOT)}:{line}")


def _imports(tree: ast.Module) -> ast.Module:
    imports = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    return ast.Module(body=imports, type_ignores=[])


def _airflow_3() -> bool:
    from airflow import __version__

    return int(__version__.split(".")[0]) >= 3


@pytest.fixture
def docs_connection(ppio_emulator: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``ppio_default`` pointing at the emulator, with the prewarm task the snippets name."""
    ppio_emulator.control.seed_task(task_id="pwt-123", state="succeeded", image="registry.example.com/me/app:1.0")
    monkeypatch.setenv(
        "AIRFLOW_CONN_PPIO_DEFAULT",
        json.dumps({"conn_type": "ppio", "host": ppio_emulator.base_url, "password": ppio_emulator.api_key}),
    )
    return ppio_emulator


def test_the_docs_have_python_snippets() -> None:
    assert len(list(snippets())) >= 10


@pytest.mark.parametrize(("code", "compile_only"), list(snippets()))
def test_snippet_runs(code: str, compile_only: bool, request: pytest.FixtureRequest) -> None:
    tree = ast.parse(code)
    namespace: dict[str, Any] = {"__name__": "docs_snippet"}
    if not _airflow_3():
        return  # the snippets are written for Airflow 3 (some import airflow.sdk): on Airflow 2 they only parse
    if compile_only:
        exec(compile(_imports(tree), "<snippet imports>", "exec"), namespace)  # the names it imports exist
        return
    from airflow.sdk import DAG

    namespace["emu"] = request.getfixturevalue("docs_connection")
    with DAG(dag_id="docs_snippet", schedule=None):  # tasks a snippet builds outside a DAG of its own join this one
        exec(compile(tree, "<snippet>", "exec"), namespace)


def test_version_numbers_live_only_in_versions_md() -> None:
    found = []
    for page in PAGES:
        if page == VERSIONS_PAGE:
            continue
        allowed = ALLOWED.get(str(page.relative_to(ROOT)), set())
        text = page.read_text()
        for match in VERSION.finditer(text):
            if match.group(0) not in allowed:
                found.append(f"{page.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}: {match.group(0)}")
    assert not found, "version numbers outside docs/versions.md (link to it instead):\n" + "\n".join(found)


def test_the_version_rule_catches_what_it_should() -> None:
    text = "tested on 2.11.2 and 3.3.2, Python 3.11 or 3.12.4; fine: Airflow 3.3, 2.11, urllib3 1.26, v0.2.0"
    assert VERSION.findall(text) == ["2.11.2", "3.3.2", "3.11", "3.12.4"]
