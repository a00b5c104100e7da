"""Provider metadata: valid for Airflow's schema, discovered by ProvidersManager, form matches the hook."""

from __future__ import annotations

import json
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


def test_every_listed_module_imports() -> None:
    import importlib

    info = get_provider_info()
    for kind in ("hooks", "sensors", "operators"):
        for entry in info[kind]:
            for module in entry["python-modules"]:
                importlib.import_module(module)


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
    assert behaviour["hidden_fields"] == ["schema", "port", "login"]
    assert behaviour["relabeling"] == {"password": "API Key", "host": "Base URL"}
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
