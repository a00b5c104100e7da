"""
A hostile HTTP server on 127.0.0.1, raw sockets: each connection gets a *behaviour* that writes whatever bytes
it likes (an echoed key in a header or status line, a bad chunk size, a trickle, a gzip header whose comment
never ends, deep JSON, huge numbers, endless cursors). One thread per connection; behaviours that trickle
forever stop when the server stops.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable
from typing import Any

#: ``behaviour(server, conn, head)``: the request head (request line and headers) is already read.
Behaviour = Callable[["HostileServer", socket.socket, bytes], None]


class HostileServer:
    """
    Accept connections on 127.0.0.1 and hand each to ``behaviour``.

    :param behaviour: What to do with every connection.
    """

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.heads: list[bytes] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name=f"hostile-{self.port}", daemon=True).start()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> int:
        """Requests received so far."""
        with self._lock:
            return len(self.heads)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            while not self.stopping.is_set():  # keep-alive: one request after another on the connection
                head = _read_head(conn)
                if head is None:
                    return
                with self._lock:
                    self.heads.append(head)
                self.behaviour(self, conn, head)
                if b"connection: close" not in head.lower() and getattr(self.behaviour, "keep_alive", False):
                    continue
                return

    def trickle(self, conn: socket.socket, piece: bytes, every: float) -> None:
        """Send ``piece`` every ``every`` seconds until the server stops or the client goes away."""
        while not self.stopping.wait(every):
            conn.sendall(piece)

    def stop(self) -> None:
        """Stop accepting and cut every open connection (ends the behaviours that trickle forever)."""
        self.stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def _read_head(conn: socket.socket, limit: int = 65536) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data and len(data) < limit:
        chunk = conn.recv(4096)
        if not chunk:
            return None
        data += chunk
    return data.split(b"\r\n\r\n", 1)[0]


def request_target(head: bytes) -> str:
    """The request target of a head, e.g. ``/gpus/v2/prewarm-tasks?limit=50``."""
    return head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")


def response(
    status: int | str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    content_type: str = "application/json",
    keep_alive: bool = False,
) -> bytes:
    """
    The bytes of a complete response with a Content-Length.

    :param status: The status code, or a whole status line's text after ``HTTP/1.1``.
    :param body: The body.
    :param headers: More headers (sent as given, latin-1).
    :param content_type: The Content-Type header.
    :param keep_alive: Leave the connection open for the next request.
    """
    status_text = f"{status} X" if isinstance(status, int) else status
    lines = [
        f"HTTP/1.1 {status_text}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive" if keep_alive else "Connection: close",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def json_body(value: Any) -> bytes:
    """``value`` as JSON bytes."""
    return json.dumps(value).encode()
