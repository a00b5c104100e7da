"""pytest plugin (entry point ``pytest11`` -> ``ppio_emulator``) with fixtures for the PPIO emulator.

Fixtures:

* ``ppio_emulator`` - an :class:`~airflow_provider_ppio.testing.server.EmulatorServer` with the
  default config, listening on a free 127.0.0.1 port; one server per session, reset (tasks,
  faults, request log, clock offset, runtime config) before every test.
* ``ppio_emulator_factory`` - ``factory(config=None, **overrides) -> EmulatorServer``: a fresh,
  started server with a custom :class:`~airflow_provider_ppio.testing.emulator.EmulatorConfig`
  (e.g. ``clock=FakeClock()``, ``quota=1``); stopped at the end of the test.
* ``ppio_emulator_session`` - the session-wide server behind ``ppio_emulator`` (not reset).

Importing this module needs only pytest; when FastAPI or uvicorn is missing the fixtures skip
the test with the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from airflow_provider_ppio.testing.emulator import EmulatorConfig
    from airflow_provider_ppio.testing.server import EmulatorServer

EmulatorFactory = Callable[..., "EmulatorServer"]


def _require_emulator_deps() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        pytest.skip(
            f"the PPIO emulator needs FastAPI and uvicorn ({exc}); "
            "install them with: pip install 'airflow-provider-ppio[emulator]'"
        )


@pytest.fixture(scope="session")
def ppio_emulator_session() -> Iterator[EmulatorServer]:
    """One emulator for the whole session (default config, free port).

    :return: the running server.
    """
    _require_emulator_deps()
    from airflow_provider_ppio.testing.server import EmulatorServer

    server = EmulatorServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ppio_emulator(ppio_emulator_session: EmulatorServer) -> EmulatorServer:
    """The session emulator, reset for this test.

    :param ppio_emulator_session: the session-wide server.
    :return: the running server (``base_url``, ``api_key``, ``auth_headers``, ``control``).
    """
    ppio_emulator_session.store.reset()
    return ppio_emulator_session


@pytest.fixture
def ppio_emulator_factory() -> Iterator[EmulatorFactory]:
    """Start emulators with a custom config; all are stopped after the test.

    :return: ``factory(config: EmulatorConfig | None = None, **overrides) -> EmulatorServer``.
    """
    _require_emulator_deps()
    from airflow_provider_ppio.testing.emulator import EmulatorConfig
    from airflow_provider_ppio.testing.server import EmulatorServer

    started: list[EmulatorServer] = []

    def factory(config: EmulatorConfig | None = None, **overrides: Any) -> EmulatorServer:
        cfg = dataclasses.replace(config, **overrides) if config is not None else EmulatorConfig(**overrides)
        server = EmulatorServer(cfg)
        started.append(server)
        return server.start()

    try:
        yield factory
    finally:
        for server in started:
            server.stop()
