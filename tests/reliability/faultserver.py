"""
A raw TCP server on 127.0.0.1 for the faults the emulator cannot produce: a TCP reset in the middle of a
body, headers or a body trickled forever, a server that never answers, a port that refuses connections.

Each accepted connection is handled on its own thread by a *behaviour*: ``behaviour(conn, head)`` gets the
socket and the request head (request line and headers) already read. Behaviours that wait forever stop when
the server stops.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

Behaviour = Callable[[socket.socket, bytes], None]


class FaultServer:
    """
    Accept connections and hand each to a behaviour; the first ``faulty`` get ``behaviour``, later ones ``then``.

    :param behaviour: What to do with a connection.
    :param faulty: How many connections get ``behaviour`` (None: all of them).
    :param then: What later connections get (default: a 200 with :attr:`body`).
    :param body: The JSON answer of the default ``then``.
    """

    def __init__(
        self,
        behaviour: Behaviour,
        *,
        faulty: int | None = None,
        then: Behaviour | None = None,
        body: Any = None,
    ) -> None:
        self.behaviour = behaviour
        self.faulty = faulty
        self.body = body
        self.then = then or self.answer_json
        self.heads: list[bytes] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name=f"fault-server-{self.port}", daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def request_lines(self) -> list[str]:
        """The request line of each request received, e.g. ``GET /gpus/v2/prewarm-tasks/x HTTP/1.1``."""
        with self._lock:
            return [head.split(b"\r\n", 1)[0].decode("latin-1") for head in self.heads]

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
            head = read_head(conn)
            if head is None:
                return
            with self._lock:
                self.heads.append(head)
                index = len(self.heads)
            behaviour = self.behaviour if self.faulty is None or index <= self.faulty else self.then
            behaviour(conn, head)

    def stop(self) -> None:
        """Stop accepting and cut every open connection (ends the behaviours that wait forever)."""
        self.stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(2)

    # -- behaviours ------------------------------------------------------------------------------------------

    def answer_json(self, conn: socket.socket, head: bytes) -> None:
        """A complete 200 with :attr:`body` as JSON, then close."""
        respond(conn, 200, json.dumps(self.body).encode())

    def reset_mid_body(self, conn: socket.socket, head: bytes) -> None:
        """Promise 2000 bytes, send 100 of them, then reset the connection (TCP RST)."""
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2000\r\n\r\n")
        conn.sendall(b'{"task_id": "' + b"x" * 86 + b'", ')
        self.stopping.wait(0.05)
        reset(conn)

    def gzip_garbage(self, conn: socket.socket, head: bytes) -> None:
        """A complete 200 that says ``Content-Encoding: gzip`` but whose body is plain JSON, then close."""
        respond(conn, 200, json.dumps(self.body).encode(), {"Content-Encoding": "gzip"})

    def silent(self, conn: socket.socket, head: bytes) -> None:
        """Read the request and never answer."""
        self.stopping.wait()

    def trickle_headers(self, conn: socket.socket, head: bytes) -> None:
        """Send a status line, then one header byte every 20 ms, forever."""
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Trickle: ")
        while not self.stopping.wait(0.02):
            conn.sendall(b"a")

    # -- hostile answers (issue 23): the key echoed back, trickles past the headers, deep JSON -----------------

    #: The key a hostile behaviour echoes back (set by the scenario).
    echo = ""

    def echo_key_content_type(self, conn: socket.socket, head: bytes) -> None:
        """A 200 that is not JSON, with the key in its ``Content-Type``."""
        body = b"<html>gateway</html>"
        head = f"HTTP/1.1 200 OK\r\nContent-Type: text/html; echo=Bearer {self.echo}\r\nContent-Length: {len(body)}\r\n"
        conn.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)

    def echo_key_status_line(self, conn: socket.socket, head: bytes) -> None:
        """A status line that is not HTTP: the key where the code should be."""
        conn.sendall(f"HTTP/1.1 {self.echo} OK\r\nContent-Length: 0\r\n\r\n".encode())

    def echo_key_chunk_size(self, conn: socket.socket, head: bytes) -> None:
        """A chunked 200 whose first chunk size is the key."""
        conn.sendall(f"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{self.echo}\r\nxx\r\n0\r\n\r\n".encode())

    def echo_key_500_escaped(self, conn: socket.socket, head: bytes) -> None:
        """A 500 whose JSON message holds the key JSON-escaped, split by a newline."""
        escaped = "".join(f"\\u{ord(char):04x}" for char in self.echo)
        half = 6 * (len(self.echo) // 2)  # between two escapes
        respond(conn, 500, ('{"message": "bad key ' + escaped[:half] + "\\n" + escaped[half:] + '"}').encode())

    def trickle_gzip_comment(self, conn: socket.socket, head: bytes) -> None:
        """A gzip 200 whose header announces a comment, then the comment one byte every 20 ms, forever."""
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 100000\r\n\r\n")
        conn.sendall(b"\x1f\x8b\x08\x10\x00\x00\x00\x00\x00\xff")
        while not self.stopping.wait(0.02):
            conn.sendall(b"a")

    def trickle_trailers(self, conn: socket.socket, head: bytes) -> None:
        """A complete chunked body, then a trailer one byte every 20 ms, forever."""
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Trailer: ")
        while not self.stopping.wait(0.02):
            conn.sendall(b"a")

    def trickle_chunk_extension(self, conn: socket.socket, head: bytes) -> None:
        """A chunk size followed by an extension one byte every 20 ms, forever."""
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;ext=")
        while not self.stopping.wait(0.02):
            conn.sendall(b"a")

    def deep_json_200(self, conn: socket.socket, head: bytes) -> None:
        """A 200 whose JSON nests 100,000 arrays deep."""
        respond(conn, 200, b'{"status": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")

    def deep_json_500(self, conn: socket.socket, head: bytes) -> None:
        """A 500 whose JSON nests 100,000 arrays deep."""
        respond(conn, 500, b'{"message": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")

    def trickle_body(self, conn: socket.socket, head: bytes) -> None:
        """Send complete headers (chunked), then a one-byte chunk every 20 ms, forever."""
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.sendall(b"1\r\n{\r\n")
        while not self.stopping.wait(0.02):
            conn.sendall(b"1\r\n \r\n")


def read_head(conn: socket.socket, limit: int = 65536) -> bytes | None:
    """
    Read up to the end of the request head; None if the client went away first.

    :param conn: The accepted connection.
    :param limit: Give up after this many bytes.
    """
    data = b""
    while b"\r\n\r\n" not in data and len(data) < limit:
        chunk = conn.recv(4096)
        if not chunk:
            return None
        data += chunk
    return data.split(b"\r\n\r\n", 1)[0]


def respond(conn: socket.socket, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    """
    Send a complete response with ``Connection: close``.

    :param conn: The connection.
    :param status: HTTP status.
    :param body: The body.
    :param headers: More headers.
    """
    lines = [
        f"HTTP/1.1 {status} X",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


def reset(conn: socket.socket) -> None:
    """
    Close with a TCP RST instead of a FIN.

    :param conn: The connection.
    """
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class RefusedPort:
    """A port bound but not listening: every connection to it is refused, and no other process can take it."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Release the port."""
        self._sock.close()
