"""Offline emulator of the PPIO GPU API v2 image prewarm family, for demos and tests.

Importing this package is cheap: FastAPI and uvicorn are imported only when one of the names
below is first used (they come with the ``emulator`` extra, and with Airflow 3).

* :class:`EmulatorServer` - the emulator on a background thread (``with EmulatorServer() as emu``).
* :class:`EmulatorControl` - client for the ``/_emulator/`` control endpoints.
* :class:`EmulatorConfig` - timings, quota, API key, clock; :class:`FakeClock` for tests.
* :func:`create_app` - the bare FastAPI application.
* :func:`create_tls_files` / :class:`EmulatorTLS` - the throwaway CA and certificate behind
  ``EmulatorServer(tls=True)`` (needs ``cryptography``, which Airflow ships).
* pytest fixtures ``ppio_emulator``, ``ppio_emulator_tls`` and ``ppio_emulator_factory``
  (plugin ``ppio_emulator``).
* the ``ppio-emulator`` console script (:mod:`airflow_provider_ppio.testing.cli`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_provider_ppio.testing.emulator import EmulatorConfig, EmulatorStore, FakeClock, create_app
    from airflow_provider_ppio.testing.server import EmulatorControl, EmulatorControlError, EmulatorServer
    from airflow_provider_ppio.testing.tls import EmulatorTLS, create_tls_files

__all__ = [
    "EmulatorConfig",
    "EmulatorControl",
    "EmulatorControlError",
    "EmulatorServer",
    "EmulatorStore",
    "EmulatorTLS",
    "FakeClock",
    "create_app",
    "create_tls_files",
]

_LOCATIONS = {
    "EmulatorConfig": "emulator",
    "EmulatorStore": "emulator",
    "FakeClock": "emulator",
    "create_app": "emulator",
    "EmulatorControl": "server",
    "EmulatorControlError": "server",
    "EmulatorServer": "server",
    "EmulatorTLS": "tls",
    "create_tls_files": "tls",
}


def __getattr__(name: str) -> Any:
    """Import the public names on first use.

    :param name: attribute name.
    :return: the attribute.
    """
    module = _LOCATIONS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
