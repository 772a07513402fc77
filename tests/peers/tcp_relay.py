"""A tiny recording TCP relay: sits between two real peers and keeps every byte they exchange."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

LOOPBACK = "127.0.0.1"


class TcpRelay:
    """Accepts connections on 127.0.0.1:<port>, forwards each to ``target``, and records the bytes
    of both directions (all connections appended together, in arrival order per direction).

    Bytes are recorded before they are forwarded, so once a peer has seen a reply the relay has
    it too.
    """

    def __init__(self, target_host: str, target_port: int, *, host: str = LOOPBACK) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.1)
        self.host = host
        self.port = self._listener.getsockname()[1]
        self.to_target = bytearray()  # what clients sent
        self.from_target = bytearray()  # what the target answered
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._accepter = threading.Thread(target=self._accept_loop, name=f"relay-{self.port}", daemon=True)
        self._accepter.start()

    def __enter__(self) -> TcpRelay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def snapshot(self) -> tuple[bytes, bytes]:
        with self._lock:
            return bytes(self.to_target), bytes(self.from_target)

    def wait_for(self, to_target: int = 0, from_target: int = 0, timeout: float = 5.0) -> tuple[bytes, bytes]:
        """Wait until at least that many bytes went each way; returns the snapshot either way."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sent, answered = self.snapshot()
            if len(sent) >= to_target and len(answered) >= from_target:
                break
            time.sleep(0.01)
        return self.snapshot()

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """Wait until every relayed connection has ended both ways (each side shut its writes);
        True if they all did within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        pumps = list(self._threads)
        for thread in pumps:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in pumps)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in [self._accepter, *self._threads]:
            thread.join(timeout=2.0)

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue  # look at _closed again: close() cannot wake a blocked accept()
            except OSError:
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(self.target, timeout=5.0)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst, record in ((client, upstream, self.to_target), (upstream, client, self.from_target)):
                thread = threading.Thread(target=self._pump, args=(src, dst, record), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    record += data
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
