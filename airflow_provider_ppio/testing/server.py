"""Run the PPIO emulator in a background thread, and a small client for its control endpoints.

Example::

    from airflow_provider_ppio.testing.server import EmulatorServer

    with EmulatorServer() as emu:
        emu.control.seed_task(task_id="pwt-demo", state="running")
        requests.get(f"{emu.base_url}/gpus/v2/prewarm-tasks/pwt-demo", headers=emu.auth_headers)

    with EmulatorServer(tls=True) as emu:  # https, with a throwaway CA
        requests.get(f"{emu.base_url}/_emulator/health", verify=emu.ca_bundle)
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import requests

if TYPE_CHECKING:
    from fastapi import FastAPI

    from airflow_provider_ppio.testing.emulator import EmulatorConfig, EmulatorStore
    from airflow_provider_ppio.testing.tls import EmulatorTLS

__all__ = ["EmulatorControl", "EmulatorControlError", "EmulatorServer"]


class EmulatorControlError(RuntimeError):
    """A control endpoint answered with an error.

    :param status: HTTP status code.
    :param body: response text.
    """

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"emulator control call failed with HTTP {status}: {body}")
        self.status = status
        self.body = body


class EmulatorControl:
    """Synchronous client for the ``/_emulator/`` control endpoints of a running emulator.

    Works against an in-process :class:`EmulatorServer` or a ``ppio-emulator`` process.

    :param base_url: emulator root URL, e.g. ``http://127.0.0.1:8080``.
    :param token: control token, if the emulator was started with one.
    :param timeout: seconds per call.
    :param verify: for an https emulator, the CA bundle to trust (``True``: the usual
        requests defaults, including ``REQUESTS_CA_BUNDLE``).
    """

    def __init__(
        self, base_url: str, *, token: str | None = None, timeout: float = 10.0, verify: bool | str = True
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._session = requests.Session()
        self.verify = verify
        if token is not None:
            self._session.headers["X-Emulator-Token"] = token

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        # verify per request: requests lets REQUESTS_CA_BUNDLE override a session's verify, not a request's.
        response = self._session.request(
            method, f"{self.base_url}/_emulator{path}", json=body, timeout=self.timeout, verify=self.verify
        )
        if response.status_code >= 400:
            raise EmulatorControlError(response.status_code, response.text)
        return response.json()

    def health(self) -> dict[str, Any]:
        """Check the emulator is up.

        :return: ``{"status": "ok", "tasks": n, "now": t}``.
        """
        result: dict[str, Any] = self._call("GET", "/health")
        return result

    def reset(self) -> None:
        """Clear tasks, faults, the request log and the clock offset; restore the start-up config."""
        self._call("POST", "/reset")

    def seed_task(
        self,
        *,
        state: str = "pending",
        task_id: str | None = None,
        image: str | None = None,
        region_id: str | None = None,
        product_ids: list[str] | None = None,
        registry_auth_id: str | None = None,
        note: str | None = None,
        name: str | None = None,
        image_size: int | None = None,
        created_at: int | None = None,
        completed_at: int | None = None,
        error: str | None = None,
        message: str | None = None,
        reason: list[str] | None = None,
        timeline: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Insert (or replace) a task that stays in ``state`` (or follows ``timeline`` from now).

        :param state: any string; pending/running/succeeded/failed get realistic defaults.
        :param task_id: id to use (a ``pwt-<12 hex>`` id is generated if omitted).
        :param image: image reference (default ``registry.example.com/team/image:tag``).
        :param region_id: region (default ``region-a``).
        :param product_ids: product ids (default empty).
        :param registry_auth_id: registry credential id (default "").
        :param note: note (default "").
        :param name: overrides the name derived from the image.
        :param image_size: bytes; derived from the image if omitted.
        :param created_at: Unix seconds; now if omitted.
        :param completed_at: Unix seconds reported once terminal; the time it became terminal if omitted.
        :param error: overrides ``status.error``.
        :param message: overrides ``status.message``.
        :param reason: overrides ``reason``.
        :param timeline: steps ``{"state", "seconds", "error"?, "message"?, "reason"?}``; the
            last step (or one with ``seconds`` null) lasts forever. Overrides ``state``.
        :return: the task as the API renders it.
        """
        fields = {
            "state": state,
            "task_id": task_id,
            "image": image,
            "region_id": region_id,
            "product_ids": product_ids,
            "registry_auth_id": registry_auth_id,
            "note": note,
            "name": name,
            "image_size": image_size,
            "created_at": created_at,
            "completed_at": completed_at,
            "error": error,
            "message": message,
            "reason": reason,
            "timeline": timeline,
        }
        result: dict[str, Any] = self._call("POST", "/tasks", {k: v for k, v in fields.items() if v is not None})
        return result

    def set_state(
        self,
        task_id: str,
        state: str,
        *,
        error: str | None = None,
        message: str | None = None,
        reason: list[str] | None = None,
        completed_at: int | None = None,
        timeline: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Force an existing task into ``state`` from now on (or onto a new ``timeline``).

        :param task_id: the task.
        :param state: new state (any string).
        :param error: overrides ``status.error``.
        :param message: overrides ``status.message``.
        :param reason: overrides ``reason``.
        :param completed_at: reported completion time once terminal.
        :param timeline: as in :meth:`seed_task`.
        :return: the task as the API renders it.
        """
        fields = {
            "state": state,
            "error": error,
            "message": message,
            "reason": reason,
            "completed_at": completed_at,
            "timeline": timeline,
        }
        result: dict[str, Any] = self._call(
            "PUT", f"/tasks/{task_id}/state", {k: v for k, v in fields.items() if v is not None}
        )
        return result

    def tasks(self) -> list[dict[str, Any]]:
        """Every stored task, creation order, without auth or paging.

        :return: list of tasks as the API renders them.
        """
        result: list[dict[str, Any]] = self._call("GET", "/tasks")["data"]
        return result

    def inject_fault(
        self, kind: str, *, count: int | None = 1, method: str | None = None, path_prefix: str = "", **params: Any
    ) -> dict[str, Any]:
        """Make the next ``count`` matching API requests misbehave.

        :param kind: status, rate_limit, latency, malformed_json, html, empty_body, json_array,
            huge_body, body, drop, trickle or barrier.
        :param count: how many matching requests to affect; ``None`` = until cleared or reset.
        :param method: only requests with this HTTP method.
        :param path_prefix: only requests whose path starts with this.
        :param params: kind-specific fields: ``status``, ``body``, ``content_type``, ``headers``,
            ``retry_after``, ``retry_after_format``, ``seconds``, ``megabytes``, ``interval``, ``when``.
        :return: the queued fault (with its ``id`` and ``remaining``).
        """
        body: dict[str, Any] = {"kind": kind, "count": count, "path_prefix": path_prefix, **params}
        if method is not None:
            body["method"] = method
        result: dict[str, Any] = self._call("POST", "/faults", body)
        return result

    def faults(self) -> list[dict[str, Any]]:
        """Faults still waiting for requests.

        :return: list of faults with ``remaining`` counts.
        """
        result: list[dict[str, Any]] = self._call("GET", "/faults")["data"]
        return result

    def clear_faults(self) -> None:
        """Drop all pending faults."""
        self._call("DELETE", "/faults")

    def requests_log(self) -> list[dict[str, Any]]:
        """The API requests received so far (never the API key).

        :return: entries with ``method``, ``path``, ``query``, ``auth_present``, ``auth_valid``,
            ``status``, ``reason`` (of an error answer, e.g. ``IMAGE_PREWARM_NUM_LIMIT``; None
            for a success), ``fault``, ``json``, ``content_type``, ``user_agent``, ``time``, ``seq``.
        """
        result: list[dict[str, Any]] = self._call("GET", "/requests")["data"]
        return result

    def stats(self) -> dict[str, Any]:
        """Quota statistics since the emulator started or was last reset.

        :return: ``active`` (pending or running now), ``peak_active`` (the most pending or running
            at one instant, exact, worked out from the task timelines), ``peak_at`` (emulator time
            it was first reached, None if never), ``creates`` (accepted API creates),
            ``refused_creates`` (creates refused with ``IMAGE_PREWARM_NUM_LIMIT``), ``quota``,
            ``quota_counts_finished``, ``counted`` (tasks counting toward the quota now),
            ``since`` and ``now`` (emulator times).
        """
        result: dict[str, Any] = self._call("GET", "/stats")
        return result

    def advance_clock(self, seconds: float) -> float:
        """Move emulator time forward, driving task lifecycles without waiting.

        :param seconds: how far (>= 0).
        :return: the new emulator time.
        """
        result: float = self._call("POST", "/clock", {"advance": seconds})["now"]
        return result

    def configure(self, **fields: Any) -> dict[str, Any]:
        """Change lifecycle settings for tasks created afterwards (undone by :meth:`reset`).

        :param fields: any of ``pending_seconds``, ``running_seconds``, ``seconds_per_gb``,
            ``fail_pattern``, ``quota`` (``None`` = unlimited), ``quota_status`` (400, 403 or 429),
            ``quota_counts_finished`` (finished tasks count toward the quota until deleted).
        :return: the settings now in effect.
        """
        result: dict[str, Any] = self._call("PUT", "/config", fields)
        return result

    def get_config(self) -> dict[str, Any]:
        """The lifecycle settings in effect, the clock offset and the emulator time.

        :return: settings dict.
        """
        result: dict[str, Any] = self._call("GET", "/config")
        return result

    def close(self) -> None:
        """Close the underlying HTTP session."""
        self._session.close()


class EmulatorServer:
    """The emulator served by uvicorn on a background thread.

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``port=0`` (default) picks a
    free port; the real one is in :attr:`port` / :attr:`base_url` once started.

    With ``tls=True`` the same API is served over https: each :meth:`start` creates a fresh CA
    and a server certificate for ``localhost``, ``127.0.0.1``, ``::1`` and ``host``, signed by
    it (:func:`~airflow_provider_ppio.testing.tls.create_tls_files`). :attr:`base_url` is then
    ``https://...`` and :attr:`ca_bundle` the CA file a client must trust.

    :param config: emulator settings (defaults if omitted).
    :param host: interface to listen on.
    :param port: TCP port, 0 for any free port.
    :param startup_timeout: seconds to wait for the server to answer.
    :param log_level: uvicorn log level.
    :param tls: serve https with a throwaway self-signed CA.
    :param tls_dir: with ``tls``, write the PEM files here (kept after :meth:`stop`); by default
        they go to a temporary directory removed by :meth:`stop`.
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 10.0,
        log_level: str = "warning",
        tls: bool = False,
        tls_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        from airflow_provider_ppio.testing.emulator import EmulatorConfig, EmulatorStore, create_app

        if tls_dir is not None and not tls:
            raise ValueError("tls_dir needs tls=True")
        self.config = config or EmulatorConfig()
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.log_level = log_level
        self.tls = tls
        self.tls_dir = tls_dir
        self._tls_files: EmulatorTLS | None = None
        self._tls_tmp: str | None = None
        self.store: EmulatorStore = EmulatorStore(self.config)
        self.app: FastAPI = create_app(store=self.store)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._control: EmulatorControl | None = None

    @property
    def api_key(self) -> str:
        """The API key the emulator accepts."""
        return self.config.api_key

    @property
    def auth_headers(self) -> dict[str, str]:
        """``{"Authorization": "Bearer <api_key>"}``."""
        return {"Authorization": f"Bearer {self.api_key}"}

    @property
    def scheme(self) -> str:
        """``https`` when serving TLS, else ``http``."""
        return "https" if self.tls else "http"

    @property
    def base_url(self) -> str:
        """Root URL of the running server, e.g. ``http://127.0.0.1:54321`` (``https://`` with TLS)."""
        if self._thread is None:
            raise RuntimeError("the emulator is not running; call start() first")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def ca_bundle(self) -> str | None:
        """Path of the CA certificate (PEM) to trust for this https server; None for plain http."""
        return None if self.tls_files is None else str(self.tls_files.ca_bundle)

    @property
    def tls_files(self) -> EmulatorTLS | None:
        """The CA, certificate and key files of this https server; None for plain http."""
        if not self.tls:
            return None
        if self._tls_files is None:
            raise RuntimeError("the emulator is not running; call start() first")
        return self._tls_files

    @property
    def control(self) -> EmulatorControl:
        """Client for the control endpoints of this server."""
        if self._control is None:
            self._control = EmulatorControl(self.base_url, token=self.config.control_token, verify=self._verify)
        return self._control

    @property
    def _verify(self) -> bool | str:
        return self.ca_bundle or True

    @property
    def running(self) -> bool:
        """Whether the server thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Self:
        """Bind the port, start uvicorn in a daemon thread and wait until it answers.

        :return: self.
        """
        if self._thread is not None:
            return self
        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on such sockets, and without it
        # every keep-alive request stalls on Nagle's algorithm meeting the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        sock.set_inheritable(True)
        self.port = sock.getsockname()[1]
        self._socket = sock
        self.store.closing.clear()
        certfile = keyfile = None
        if self.tls:
            try:
                files = self._make_tls_files()
            except BaseException:
                self.stop()
                raise
            certfile, keyfile = str(files.certfile), str(files.keyfile)
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_level=self.log_level,
            access_log=False,
            http="h11",
            ws="none",
            loop="asyncio",
            timeout_graceful_shutdown=1,
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name=f"ppio-emulator-{self.port}", daemon=True
        )
        self._thread.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _make_tls_files(self) -> EmulatorTLS:
        from airflow_provider_ppio.testing.tls import create_tls_files  # cryptography: only when serving https

        if self.tls_dir is not None:
            directory = os.fspath(self.tls_dir)
            os.makedirs(directory, exist_ok=True)
        else:
            directory = self._tls_tmp = tempfile.mkdtemp(prefix="ppio-emulator-tls-")
        self._tls_files = create_tls_files(directory, [self.host])
        return self._tls_files

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._thread is None or not self._thread.is_alive():
                raise RuntimeError("the emulator server thread exited during start-up")
            if getattr(self._server, "started", False):
                try:
                    response = requests.get(f"{self.base_url}/_emulator/health", timeout=2, verify=self._verify)
                    if response.status_code == 200:
                        return
                except requests.RequestException as exc:
                    last_error = exc
            time.sleep(0.01)
        raise TimeoutError(f"the emulator did not answer within {self.startup_timeout}s: {last_error}")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the server and wait for its thread (in-flight slow faults are cut short).

        :param timeout: seconds to wait before forcing the exit.
        """
        self.store.closing.set()
        if self._control is not None:
            self._control.close()
            self._control = None
        server, thread = self._server, self._thread
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None
        if self._tls_tmp is not None:
            shutil.rmtree(self._tls_tmp, ignore_errors=True)
            self._tls_tmp = None
        self._tls_files = None

    def __enter__(self) -> Self:
        """Start the server.

        :return: self.
        """
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server.

        :param exc_type: exception type, if any.
        :param exc: exception, if any.
        :param tb: traceback, if any.
        """
        self.stop()

    def __repr__(self) -> str:
        """Describe the server."""
        where = self.base_url if self._thread is not None else "stopped"
        return f"EmulatorServer({where})"
