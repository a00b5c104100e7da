"""Provider metadata read by Airflow's ``ProvidersManager`` (entry point ``apache_airflow_provider``)."""

from __future__ import annotations

from typing import Any

from airflow_provider_ppio import __version__

PACKAGE_NAME = "airflow-provider-ppio"
#: Every release, newest first (``versions`` in the provider info); CHANGELOG.md has a section for each.
VERSIONS: tuple[str, ...] = (__version__, "0.1.0")

HOOK_CLASS_NAME = "airflow_provider_ppio.hooks.ppio.PPIOHook"
CONNECTION_TYPE = "ppio"
DEFAULT_CONN_ID = "ppio_default"
DEFAULT_BASE_URL = "https://api.ppio.com"
#: Longest prewarm task id the hook sends (also checked by operators before any request).
TASK_ID_MAX_LENGTH = 255

#: How the connection form looks; the hook's ``get_ui_field_behaviour`` returns the same dict (2.11).
#: The port is shown because it is honoured (a port in the Base URL works too; the two must agree).
UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden-fields": ["schema", "login"],
    "relabeling": {"password": "API Key", "host": "Base URL", "port": "Port (optional)"},
    "placeholders": {
        "password": "sk_... (your PPIO or Novita AI API key)",
        "host": f"{DEFAULT_BASE_URL} (Novita AI: https://api.novita.ai)",
        "port": "443 for https, or the port written in the Base URL",
        "extra": '{"timeout": 30, "max_attempts": 5}',
    },
}

#: Extra fields of the form (Airflow 3 reads these; 2.11 uses ``PPIOHook.get_connection_form_widgets``).
CONN_FIELDS: dict[str, Any] = {
    "timeout": {
        "label": "Request timeout (seconds)",
        "description": "Longest time one HTTP request may take. Default 30.",
        "schema": {"type": ["number", "null"], "minimum": 1},
    },
    "max_attempts": {
        "label": "Max attempts",
        "description": "Tries per call on transient errors (429, 5xx, network). 1 disables retries. Default 5.",
        "schema": {"type": ["integer", "null"], "minimum": 1},
    },
}

_INTEGRATION = "PPIO"
#: How-to guides, relative to the repository root (the integration's ``how-to-guide``).
HOW_TO_GUIDES: tuple[str, ...] = ("README.md", "docs/lifecycle.md", "docs/deployment.md", "docs/emulator.md")


def _modules(*modules: str) -> list[dict[str, Any]]:
    return [{"integration-name": _INTEGRATION, "python-modules": list(modules)}]


def dependencies() -> list[str]:
    """The installed distribution's requirements without extras (pyproject.toml's); empty if never installed."""
    import importlib.metadata

    # Airflow 2.11 does not load packaging.requirements when a DAG is parsed, and it is costly: only when asked.
    from packaging.requirements import Requirement

    try:
        requires = [Requirement(req) for req in importlib.metadata.requires(PACKAGE_NAME) or []]
    except importlib.metadata.PackageNotFoundError:
        return []
    return [str(req) for req in requires if req.marker is None or "extra" not in str(req.marker)]


def get_provider_info() -> dict[str, Any]:
    """Describe the provider, its modules and its connection type to Airflow."""
    return {
        "package-name": PACKAGE_NAME,
        "name": "PPIO",
        "description": "PPIO / Novita AI GPU cloud: wait for and manage image prewarm tasks.",
        # Not in Airflow's runtime schema (which allows extra keys); official providers carried both from their
        # provider.yaml: releases newest first, and the install requirements (apache-airflow>=... among them).
        "versions": list(VERSIONS),
        "dependencies": dependencies(),
        "integrations": [
            {
                "integration-name": _INTEGRATION,
                "external-doc-url": "https://ppio.com/docs/gpus/image/reference-v2-get-image-prewarm",
                "how-to-guide": list(HOW_TO_GUIDES),
                "tags": ["service"],
            }
        ],
        "hooks": _modules("airflow_provider_ppio.hooks.ppio"),
        "sensors": _modules("airflow_provider_ppio.sensors.prewarm"),
        "operators": _modules("airflow_provider_ppio.operators.prewarm"),
        # Modules, as in every provider (Airflow's CLI shows them under "class"): the trigger class is
        # airflow_provider_ppio.triggers.prewarm.PrewarmTaskTrigger.
        "triggers": _modules(
            "airflow_provider_ppio.triggers.prewarm",
            # Event-driven scheduling (AssetWatcher): Airflow 3 only; importable on 2.11.
            "airflow_provider_ppio.triggers.prewarm_events",
        ),
        # Asset (Airflow 3) and dataset (Airflow 2) URIs ppio://prewarm/<region_id>/<image>: see assets.py.
        "asset-uris": [{"schemes": ["ppio"], "handler": "airflow_provider_ppio.assets.normalize_prewarm_asset_uri"}],
        "dataset-uris": [{"schemes": ["ppio"], "handler": "airflow_provider_ppio.assets.normalize_prewarm_asset_uri"}],
        "connection-types": [
            {
                "hook-class-name": HOOK_CLASS_NAME,
                "hook-name": "PPIO",
                "connection-type": CONNECTION_TYPE,
                "ui-field-behaviour": UI_FIELD_BEHAVIOUR,
                "conn-fields": CONN_FIELDS,
            }
        ],
    }
