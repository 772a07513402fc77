"""The TCP side of the test peers' servers: accept connections and serve each on its own thread."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from collections.abc import Callable

LOOPBACK = "127.0.0.1"


class ConnectionServer:
    """Listens on host:port (port 0 picks a free one) as soon as it is made; ``start()`` begins
    serving every accepted connection with ``serve(sock)`` on a thread of its own (the socket is
    closed when ``serve`` returns). ``stop()`` closes the listener and shuts down the open
    connections, which ends the blocked reads of their ``serve`` calls, and waits for them."""

    def __init__(self, serve: Callable[[socket.socket], None], host: str = LOOPBACK, port: int = 0, *, name: str = "peer") -> None:
        self._serve = serve
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}  # open ones, with their threads
        self._stopped = False
        self._server = _ThreadingServer((host, port), self._handler_class())
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"{name}-accept", daemon=True)

    @property
    def stopped(self) -> bool:
        return self._stopped

    def start(self) -> ConnectionServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            connections = dict(self._connections)
        # shutdown() waits for serve_forever() to return: it would wait forever were it never started.
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        # shutdown() wakes a thread blocked in recv(); close() alone does not on Linux.
        for sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in connections.values():
            thread.join(timeout=5.0)

    def _handle(self, sock: socket.socket) -> None:
        with self._lock:
            if self._stopped:
                return  # accepted while stop() ran: it would not see this connection
            self._connections[sock] = threading.current_thread()
        try:
            self._serve(sock)
        finally:
            with self._lock:
                del self._connections[sock]

    def _handler_class(self) -> type[socketserver.BaseRequestHandler]:
        server = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                server._handle(self.request)

        return Handler


class _ThreadingServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    # ConnectionServer.stop() joins the connection threads itself, with a timeout.
    daemon_threads = True
    block_on_close = False
