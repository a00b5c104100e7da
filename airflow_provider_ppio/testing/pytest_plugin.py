"""pytest plugin (entry point ``pytest11`` -> ``ppio_emulator``) with fixtures for the PPIO emulator.

Fixtures:

* ``ppio_emulator`` - an :class:`~airflow_provider_ppio.testing.server.EmulatorServer` with the
  default config, listening on a free 127.0.0.1 port; one server per session, reset (tasks,
  faults, request log, clock offset, runtime config) before every test.
* ``ppio_emulator_tls`` - the same over https: ``base_url`` is ``https://127.0.0.1:<port>`` and
  ``ca_bundle`` the path of the throwaway CA certificate (PEM) that signed the server's; one
  server per session, reset before every test.
* ``ppio_emulator_factory`` - ``factory(config=None, *, tls=False, **overrides) -> EmulatorServer``:
  a fresh, started server with a custom
  :class:`~airflow_provider_ppio.testing.emulator.EmulatorConfig` (e.g. ``clock=FakeClock()``,
  ``quota=1``, ``quota_status=429``, ``quota_counts_finished=True``), over https with its own CA if
  ``tls=True``; stopped at the end of the test. The session emulators take the same quota options at run
  time: ``ppio_emulator.control.configure(quota=1, quota_counts_finished=True)``.
* ``ppio_emulator_session`` / ``ppio_emulator_tls_session`` - the session-wide servers behind
  ``ppio_emulator`` / ``ppio_emulator_tls`` (not reset).

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


@pytest.fixture(scope="session")
def ppio_emulator_tls_session() -> Iterator[EmulatorServer]:
    """One https emulator for the whole session (default config, free port, its own CA).

    :return: the running server.
    """
    _require_emulator_deps()
    from airflow_provider_ppio.testing.server import EmulatorServer

    server = EmulatorServer(tls=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ppio_emulator_tls(ppio_emulator_tls_session: EmulatorServer) -> EmulatorServer:
    """The session https emulator, reset for this test.

    :param ppio_emulator_tls_session: the session-wide https server.
    :return: the running server (``base_url`` is https; ``ca_bundle`` is the CA file to trust).
    """
    ppio_emulator_tls_session.store.reset()
    return ppio_emulator_tls_session


@pytest.fixture
def ppio_emulator_factory() -> Iterator[EmulatorFactory]:
    """Start emulators with a custom config; all are stopped after the test.

    :return: ``factory(config: EmulatorConfig | None = None, *, tls: bool = False, **overrides)
        -> EmulatorServer``.
    """
    _require_emulator_deps()
    from airflow_provider_ppio.testing.emulator import EmulatorConfig
    from airflow_provider_ppio.testing.server import EmulatorServer

    started: list[EmulatorServer] = []

    def factory(config: EmulatorConfig | None = None, *, tls: bool = False, **overrides: Any) -> EmulatorServer:
        cfg = dataclasses.replace(config, **overrides) if config is not None else EmulatorConfig(**overrides)
        server = EmulatorServer(cfg, tls=tls)
        started.append(server)
        return server.start()

    try:
        yield factory
    finally:
        for server in started:
            server.stop()
