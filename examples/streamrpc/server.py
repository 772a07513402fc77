"""A streamrpc backend for demos and tests: one thread per connection.

    python -m examples.streamrpc.server --port 10301 --name v1 [--host 127.0.0.1]

It logs one line once listening (with the real port, so ``--port 0`` works) and exits with status
0 on SIGTERM or SIGINT. In-process: ``with serve(host, 0, "v1") as server: ... server.port``.

Methods (bodies are ASCII decimal integers where numbers are involved):

    sum     client streaming: adds the DATA bodies; when the client half-closes, answers one DATA
            with the total, then CLOSE.
    count   server streaming: INIT's body is N; sends DATA 0 .. N-1, then CLOSE.
    echo    bidirectional: sends every DATA back; when the client half-closes, half-closes too.
    whoami  unary: the RESPONSE body is the server's name.

Every frame the server sends carries the header ``server=<name>``, so a client can tell which
backend served a stream or call; a whoami RESPONSE also carries the request's headers as the
server saw them. ``server.seen`` lists every INIT and REQUEST frame received (for tests of header
mutations). An unknown method, a bad body or DATA for an unknown stream get an error frame
(CLOSE or RESPONSE with the ERROR flag, header ``code``). A client CLOSE cancels its stream.
Bytes that are not streamrpc close the connection.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import socketserver
import threading

from examples.streamrpc.protocol import FLAG_ERROR, Frame, FrameType, ProtocolError, encode_frame, take_frame

log = logging.getLogger("streamrpc.server")


class _Connection:
    def __init__(self, server: StreamRpcServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.send_lock = threading.Lock()
        self.streams: dict[int, dict] = {}  # open streams: id -> {"method", "total", "cancel"}

    def run(self) -> None:
        buffer = bytearray()
        try:
            while data := self.sock.recv(65536):
                buffer += data
                while (frame := take_frame(buffer)) is not None:
                    self.handle(frame)
        except ProtocolError as exc:
            log.warning("closing a connection: %s", exc)
        except OSError:
            pass  # reset, or stop() shut the socket down
        finally:
            for stream in list(self.streams.values()):
                stream["cancel"].set()

    def send(self, type_: FrameType, id_: int, body: bytes = b"", headers: dict | None = None, flags: int = 0) -> None:
        frame = encode_frame(type_, id_, body, {**(headers or {}), "server": self.server.name}, flags)
        with self.send_lock:
            self.sock.sendall(frame)

    def fail(self, frame: Frame, code: str, message: str) -> None:
        self.streams.pop(frame.id, None)
        kind = FrameType.CLOSE if frame.is_stream else FrameType.RESPONSE
        self.send(kind, frame.id, message.encode(), {"code": code}, FLAG_ERROR)

    def handle(self, frame: Frame) -> None:
        if frame.type in (FrameType.INIT, FrameType.REQUEST):
            self.server.seen.append(frame)
        method = frame.headers.get("method", "")
        if frame.type is FrameType.REQUEST:
            if method == "whoami":
                self.send(FrameType.RESPONSE, frame.id, self.server.name.encode(), frame.headers)
            else:
                self.fail(frame, "unknown_method", f"no unary method {method!r}")
        elif frame.type is FrameType.INIT:
            if method not in ("sum", "count", "echo"):
                self.fail(frame, "unknown_method", f"no streaming method {method!r}")
                return
            stream = self.streams[frame.id] = {"method": method, "total": 0, "cancel": threading.Event()}
            if method == "count":
                if not frame.body.isdigit():
                    self.fail(frame, "bad_request", f"count wants an integer body, got {frame.body[:32]!r}")
                    return
                threading.Thread(target=self.count, args=(frame.id, int(frame.body), stream["cancel"]), daemon=True).start()
        elif frame.type in (FrameType.DATA, FrameType.HALF_CLOSE, FrameType.CLOSE):
            self.on_stream_frame(frame)
        # A RESPONSE from a client means nothing to a server: ignored.

    def on_stream_frame(self, frame: Frame) -> None:
        stream = self.streams.get(frame.id)
        if stream is None:
            if frame.type is FrameType.DATA:
                self.fail(frame, "unknown_stream", f"no open stream {frame.id}")
            return  # a close for a stream already over (e.g. count finished first)
        if frame.type is FrameType.CLOSE:  # the client gives up: cancel, no answer
            stream["cancel"].set()
            self.streams.pop(frame.id, None)
        elif stream["method"] == "sum":
            if frame.type is FrameType.DATA:
                try:
                    stream["total"] += int(frame.body)
                except ValueError:
                    self.fail(frame, "bad_request", f"sum wants integer bodies, got {frame.body[:32]!r}")
            else:
                self.streams.pop(frame.id, None)
                self.send(FrameType.DATA, frame.id, str(stream["total"]).encode())
                self.send(FrameType.CLOSE, frame.id)
        elif stream["method"] == "echo":
            if frame.type is FrameType.DATA:
                self.send(FrameType.DATA, frame.id, frame.body)
            else:
                self.streams.pop(frame.id, None)
                self.send(FrameType.HALF_CLOSE, frame.id)
        # count: the client's DATA and HALF_CLOSE change nothing.

    def count(self, stream_id: int, n: int, cancel: threading.Event) -> None:
        try:
            for i in range(n):
                if cancel.is_set():
                    return
                self.send(FrameType.DATA, stream_id, str(i).encode())
            self.streams.pop(stream_id, None)
            self.send(FrameType.CLOSE, stream_id)
        except OSError:
            pass  # the connection is gone; the reading thread ends it


class StreamRpcServer:
    """Listens as soon as it is made (port 0 picks a free one); ``start()`` serves, ``stop()``
    closes the listener and every open connection. Also a context manager (starts and stops)."""

    def __init__(self, host: str, port: int, name: str) -> None:
        self.name = name
        self.seen: list[Frame] = []
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with outer._lock:
                    outer._sockets.add(self.request)
                try:
                    _Connection(outer, self.request).run()
                finally:
                    with outer._lock:
                        outer._sockets.discard(self.request)

        self._tcp = socketserver.ThreadingTCPServer((host, port), Handler, bind_and_activate=False)
        self._tcp.allow_reuse_address = True
        self._tcp.daemon_threads = True
        self._tcp.server_bind()
        self._tcp.server_activate()
        self.host, self.port = self._tcp.server_address[:2]
        self._thread = threading.Thread(target=self._tcp.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def start(self) -> StreamRpcServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._tcp.shutdown()
        self._tcp.server_close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:  # wakes the connection threads blocked in recv()
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> StreamRpcServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(host: str, port: int, name: str) -> StreamRpcServer:
    """A started backend called ``name`` on host:port (0 = any free port)."""
    return StreamRpcServer(host, port, name).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.streamrpc.server", description="A streamrpc example backend.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="port to listen on; 0 picks a free one")
    parser.add_argument("--name", required=True, help="this backend's name (whoami's answer, and the server header)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with serve(args.host, args.port, args.name) as server:
        log.info("streamrpc backend %s listening on %s:%d", args.name, server.host, server.port)
        while not stop.wait(0.5):
            pass
        log.info("streamrpc backend %s stopping", args.name)


if __name__ == "__main__":
    main()
