"""Provider metadata: valid for Airflow's schema, discovered by ProvidersManager, form matches the hook."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
import tomllib
import warnings
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import airflow
import jsonschema
import pytest
from packaging.version import Version

from airflow_provider_ppio import __version__
from airflow_provider_ppio.get_provider_info import get_provider_info
from airflow_provider_ppio.hooks.ppio import PPIOHook

ROOT = Path(__file__).resolve().parents[2]
MODULE_KINDS = ("hooks", "sensors", "operators", "triggers")
_AIRFLOW = Version(Version(airflow.__version__).base_version)
#: Airflow 3.0 and 3.1 build the form from the hook's WTForms widgets (2.11's path), which need the FAB provider;
#: provider info's ``conn-fields`` / ``ui-field-behaviour`` are read from 3.2 on.
FORM_NEEDS_FAB = Version("3.0") <= _AIRFLOW < Version("3.2") and find_spec("wtforms") is None


@pytest.fixture(scope="module")
def providers_manager() -> Any:
    from airflow.providers_manager import ProvidersManager

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manager = ProvidersManager()
        manager.initialize_providers_hooks()
    return manager


def listed_modules(kind: str) -> list[str]:
    return [module for entry in get_provider_info()[kind] for module in entry["python-modules"]]


def test_provider_info_is_valid_for_the_schema_shipped_with_airflow() -> None:
    schema = json.loads((Path(airflow.__file__).parent / "provider_info.schema.json").read_text())
    jsonschema.validate(get_provider_info(), schema)


def test_provider_info_names_the_package_version_and_connection_type() -> None:
    info = get_provider_info()
    assert info["package-name"] == "airflow-provider-ppio"
    assert info["versions"][0] == __version__
    (conn_type,) = info["connection-types"]
    assert conn_type["connection-type"] == "ppio"
    assert conn_type["hook-name"] == "PPIO"
    assert conn_type["hook-class-name"] == f"{PPIOHook.__module__}.{PPIOHook.__qualname__}"
    assert set(conn_type["conn-fields"]) == {"timeout", "max_attempts"}


def test_the_connection_type_the_hook_checks_is_the_declared_one() -> None:
    from airflow_provider_ppio.exceptions import PPIOConnectionConfigError
    from airflow_provider_ppio.hooks._shared import check_connection_type

    (conn_type,) = get_provider_info()["connection-types"]
    check_connection_type("c", conn_type["connection-type"])
    assert PPIOHook.conn_type == conn_type["connection-type"]
    with pytest.raises(PPIOConnectionConfigError, match="'http'"):
        check_connection_type("c", "http")


def test_every_listed_module_imports() -> None:
    for kind in MODULE_KINDS:
        for module in listed_modules(kind):
            importlib.import_module(module)


def test_every_module_entry_belongs_to_a_declared_integration() -> None:
    info = get_provider_info()
    integrations = {integration["integration-name"] for integration in info["integrations"]}
    for kind in MODULE_KINDS:
        assert {entry["integration-name"] for entry in info[kind]} <= integrations, kind


@pytest.mark.parametrize("kind", MODULE_KINDS)
def test_every_public_module_of_a_kind_is_listed(kind: str) -> None:
    # A new trigger (or sensor, ...) module that is not listed would be missing from `airflow providers triggers`.
    package = importlib.import_module(f"airflow_provider_ppio.{kind}")
    public = {
        module.name
        for module in pkgutil.iter_modules(package.__path__, f"{package.__name__}.")
        if not module.name.rsplit(".", 1)[1].startswith("_")
    }
    assert public, f"no modules in {package.__name__}"
    assert set(listed_modules(kind)) == public


def test_trigger_modules_define_the_triggers() -> None:
    from airflow.triggers.base import BaseTrigger

    from airflow_provider_ppio.triggers.prewarm import PrewarmTaskTrigger

    defined = {
        f"{cls.__module__}.{cls.__qualname__}"
        for module in listed_modules("triggers")
        for _, cls in inspect.getmembers(importlib.import_module(module), inspect.isclass)
        if issubclass(cls, BaseTrigger) and cls.__module__ == module
    }
    assert f"{PrewarmTaskTrigger.__module__}.{PrewarmTaskTrigger.__qualname__}" in defined


def test_providers_manager_lists_the_trigger(providers_manager: Any) -> None:
    # What `airflow providers triggers` prints (its "class" column is the module, as for every provider).
    ours = {
        (info.trigger_class_name, info.integration_name)
        for info in providers_manager.trigger
        if info.package_name == "airflow-provider-ppio"
    }
    assert ours == {
        ("airflow_provider_ppio.triggers.prewarm", "PPIO"),
        ("airflow_provider_ppio.triggers.prewarm_events", "PPIO"),
    }


def test_versions_are_the_changelog_releases_newest_first() -> None:
    released = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", (ROOT / "CHANGELOG.md").read_text(), flags=re.MULTILINE)
    versions = get_provider_info()["versions"]
    assert versions[0] == __version__
    assert versions == released


def test_dependencies_are_pyproject_s_so_the_minimum_airflow_is_declared_once() -> None:
    from packaging.requirements import Requirement

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    dependencies = get_provider_info()["dependencies"]
    # From the installed metadata: a stale (editable) install after a pyproject change fails here.
    assert sorted(dependencies) == sorted(str(Requirement(req)) for req in declared)
    (airflow_req,) = (Requirement(req) for req in dependencies if Requirement(req).name == "apache-airflow")
    assert airflow_req.specifier.contains(airflow.__version__)


def test_how_to_guides_exist() -> None:
    (integration,) = get_provider_info()["integrations"]
    assert integration["how-to-guide"]
    for guide in integration["how-to-guide"]:
        assert (ROOT / guide).is_file(), guide


def test_provider_info_is_built_afresh_on_each_call() -> None:
    get_provider_info()["versions"].append("9.9.9")
    get_provider_info()["integrations"][0]["how-to-guide"].clear()
    assert "9.9.9" not in get_provider_info()["versions"]
    assert get_provider_info()["integrations"][0]["how-to-guide"]


def test_providers_manager_lists_the_provider(providers_manager: Any) -> None:
    provider = providers_manager.providers["airflow-provider-ppio"]
    assert provider.version == __version__


def test_providers_manager_knows_the_connection_type(providers_manager: Any) -> None:
    try:  # Airflow 3 resolves hooks in the Task SDK's manager
        from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

        hooks = ProvidersManagerTaskRuntime().hooks
    except ImportError:
        hooks = providers_manager.hooks
    hook_info = hooks["ppio"]
    assert hook_info is not None
    assert hook_info.hook_name == "PPIO"
    assert hook_info.hook_class_name == "airflow_provider_ppio.hooks.ppio.PPIOHook"
    assert hook_info.connection_id_attribute_name == "ppio_conn_id"
    assert hook_info.connection_testable is True


@pytest.mark.skipif(
    FORM_NEEDS_FAB,
    reason=f"Airflow {airflow.__version__} reads the connection form from WTForms widgets; WTForms/FAB not installed",
)
def test_providers_manager_loads_the_connection_form(providers_manager: Any) -> None:
    behaviour = providers_manager.field_behaviours["ppio"]
    assert behaviour["hidden_fields"] == ["schema", "login"]  # the port is honoured, so it is shown
    assert behaviour["relabeling"] == {"password": "API Key", "host": "Base URL", "port": "Port (optional)"}
    widgets = providers_manager.connection_form_widgets
    assert {"extra__ppio__timeout", "extra__ppio__max_attempts"} <= set(widgets)


def test_ui_field_behaviour_of_the_hook_matches_provider_info() -> None:
    (conn_type,) = get_provider_info()["connection-types"]
    declared = conn_type["ui-field-behaviour"]
    # Provider info is kebab-case; the hook method's contract (read by Airflow 2.11) is snake_case.
    assert PPIOHook.get_ui_field_behaviour() == {key.replace("-", "_"): value for key, value in declared.items()}


def test_ui_field_behaviour_is_a_copy() -> None:
    PPIOHook.get_ui_field_behaviour()["hidden_fields"].append("host")
    assert "host" not in PPIOHook.get_ui_field_behaviour()["hidden_fields"]
