"""
Check an installed (not editable) airflow-provider-ppio the way Airflow sees it; ``scripts/test_wheel.sh`` runs it.

Run it with the Python of the venv the wheel went into, from a directory outside the checkout, so that nothing
is imported from the source tree. Exits non-zero with one line per problem.

Usage: ``python check_installed_wheel.py <version> <example_dags folder>``
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Any

PACKAGE = "airflow-provider-ppio"
KINDS = ("hooks", "sensors", "operators", "triggers")


def airflow_cli_json(*args: str) -> Any:
    """
    Run ``airflow <args> -o json`` with this interpreter and parse its output.

    :param args: The subcommand, e.g. ``providers list``.
    """
    done = subprocess.run(
        [sys.executable, "-m", "airflow", *args, "-o", "json"], capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        raise RuntimeError(f"airflow {' '.join(args)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    # Airflow may print warnings before the JSON document.
    return json.loads(done.stdout[done.stdout.index("[") :])


def check(version: str, example_dags: Path) -> list[str]:
    """
    Every check; returns the problems found.

    :param version: The version the wheel was built as.
    :param example_dags: The folder of example DAGs to parse.
    """
    problems: list[str] = []
    import airflow_provider_ppio
    from airflow_provider_ppio.get_provider_info import get_provider_info

    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    where = Path(airflow_provider_ppio.__file__).resolve()
    print(f"airflow_provider_ppio {airflow_provider_ppio.__version__} imported from {where}")
    if not where.is_relative_to(site_packages):
        problems.append(f"the package was imported from {where}, not from {site_packages}")
    if airflow_provider_ppio.__version__ != version:
        problems.append(f"installed version {airflow_provider_ppio.__version__}, expected {version}")

    providers = {row["package_name"]: row["version"] for row in airflow_cli_json("providers", "list")}
    print(f"airflow providers list: {PACKAGE} {providers.get(PACKAGE, '(missing)')}")
    if providers.get(PACKAGE) != version:
        problems.append(f"airflow providers list shows {PACKAGE} as {providers.get(PACKAGE)!r}, expected {version}")

    info = get_provider_info()
    triggers = {row["class"] for row in airflow_cli_json("providers", "triggers") if row["package_name"] == PACKAGE}
    listed = {module for entry in info["triggers"] for module in entry["python-modules"]}
    print(f"airflow providers triggers: {sorted(triggers)}")
    if triggers != listed:
        problems.append(f"airflow providers triggers shows {sorted(triggers)}, the provider info {sorted(listed)}")

    # Every module of the package imports with only its declared dependencies (and [emulator]) installed, the
    # lazily imported ones too (the async transport is imported only when a trigger runs). The pytest plugin
    # is loaded by pytest, which brings pytest along.
    modules = [
        module.name
        for module in pkgutil.walk_packages(airflow_provider_ppio.__path__, "airflow_provider_ppio.")
        if module.name != "airflow_provider_ppio.testing.pytest_plugin"
    ]
    named = {module for kind in KINDS for entry in info[kind] for module in entry["python-modules"]}
    problems += [f"the provider info names {module}, which the wheel lacks" for module in named - set(modules)]
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            problems.append(f"{module} does not import: {err}")
    print(f"imported all {len(modules)} modules of the package")

    try:
        from airflow.dag_processing.dagbag import DagBag  # Airflow 3
    except ImportError:
        from airflow.models.dagbag import DagBag  # type: ignore[no-redef]  # Airflow 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bag = DagBag(dag_folder=str(example_dags))  # AIRFLOW__CORE__LOAD_EXAMPLES=False: none of Airflow's own
    print(f"DagBag({example_dags}): {sorted(bag.dag_ids)}, {len(bag.import_errors)} import errors")
    for path, error in bag.import_errors.items():
        problems.append(f"import error in {path}: {error}")
    if not bag.dag_ids:
        problems.append(f"no DAG loaded from {example_dags}")
    return problems


def main() -> int:
    """Run the checks; exit code 1 when any failed."""
    version, example_dags = sys.argv[1], Path(sys.argv[2])
    problems = check(version, example_dags)
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
