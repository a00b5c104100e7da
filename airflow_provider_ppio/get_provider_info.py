"""Provider metadata read by Airflow's ``ProvidersManager`` (entry point ``apache_airflow_provider``)."""

from __future__ import annotations

from typing import Any

from airflow_provider_ppio import __version__

HOOK_CLASS_NAME = "airflow_provider_ppio.hooks.ppio.PPIOHook"
CONNECTION_TYPE = "ppio"
DEFAULT_CONN_ID = "ppio_default"
DEFAULT_BASE_URL = "https://api.ppio.com"

#: How the connection form looks; the hook's ``get_ui_field_behaviour`` returns the same dict (2.11).
UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden-fields": ["schema", "port", "login"],
    "relabeling": {"password": "API Key", "host": "Base URL"},
    "placeholders": {
        "password": "sk_... (your PPIO or Novita AI API key)",
        "host": f"{DEFAULT_BASE_URL} (Novita AI: https://api.novita.ai)",
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


def get_provider_info() -> dict[str, Any]:
    """Describe the provider, its modules and its connection type to Airflow."""
    return {
        "package-name": "airflow-provider-ppio",
        "name": "PPIO",
        "description": "PPIO / Novita AI GPU cloud: wait for and manage image prewarm tasks.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": _INTEGRATION,
                "external-doc-url": "https://ppio.com/docs/gpus/image/reference-v2-get-image-prewarm",
                "tags": ["service"],
            }
        ],
        "hooks": [{"integration-name": _INTEGRATION, "python-modules": ["airflow_provider_ppio.hooks.ppio"]}],
        "sensors": [{"integration-name": _INTEGRATION, "python-modules": ["airflow_provider_ppio.sensors.prewarm"]}],
        "operators": [
            {"integration-name": _INTEGRATION, "python-modules": ["airflow_provider_ppio.operators.prewarm"]}
        ],
        "triggers": [
            {
                "integration-name": _INTEGRATION,
                "python-modules": [
                    "airflow_provider_ppio.triggers.prewarm",
                    # Event-driven scheduling (AssetWatcher): Airflow 3 only; importable on 2.11.
                    "airflow_provider_ppio.triggers.prewarm_events",
                ],
            }
        ],
        # Asset (Airflow 3) / dataset (Airflow 2) URIs ppio://prewarm/<region_id>/<image>: see assets.py.
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
