"""Black holes: servers that accept connections and never answer.

What a client meets when a load balancer or firewall completes the TCP handshake in front of a
dead backend, or a server hangs: the connection opens, then nothing comes back. Not a mock:
a real listening socket on 127.0.0.1, and the code under test uses its real sockets and
timeouts against it.

- ``BlackHole()``: accepts and holds every connection, never reads or writes; a TLS client
  (IMAPS, HTTPS) waits for the server's handshake forever;
- ``BlackHole(tls=context)``: completes the TLS handshake, reads whatever the client sends
  (a request, an IMAP client waiting for the greeting sends nothing), never answers.

``connections`` counts accepted connections; ``url(path)`` is an https URL at it.
"""

from __future__ import annotations

import socket
import ssl
import threading


class BlackHole:
    host = "127.0.0.1"

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._tls = tls
        self._lock = threading.Lock()
        self._held: list[socket.socket] = []
        self._closed = threading.Event()
        self.connections = 0
        self._listener = socket.create_server((self.host, 0), backlog=64)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, name="black-hole", daemon=True).start()

    def url(self, path: str = "") -> str:
        return f"https://{self.host}:{self.port}{path}"

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            held, self._held = self._held, []
        for sock in held:
            try:
                sock.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._held.append(conn)
            if self._tls is not None:
                threading.Thread(target=self._swallow, args=(conn,), name="black-hole-tls", daemon=True).start()

    def _swallow(self, conn: socket.socket) -> None:
        """TLS up, then read and drop until the client gives up: the answer never comes."""
        try:
            tls = self._tls.wrap_socket(conn, server_side=True)
            with self._lock:
                self._held.append(tls)
            while not self._closed.is_set() and tls.recv(65536):
                pass
        except (OSError, ValueError):
            pass
