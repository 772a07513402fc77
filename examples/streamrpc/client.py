"""A blocking streamrpc client: streams and unary calls interleaved on one connection.

    with StreamRpcClient("127.0.0.1", 10300) as client:
        total = client.open_stream("sum")             # INIT (headers method=sum, service=demo)
        total.send(b"1"); total.send(b"2")            # DATA
        total.half_close()                            # HALF_CLOSE: the server may still send
        frames = total.recv_until_closed()            # [DATA b"3", CLOSE]
        reply = client.call("whoami")                 # REQUEST -> RESPONSE (a Frame)

Every read returns a ``protocol.Frame`` (type, id, body, headers, flags; ``.error``). Frames are
read only when asked for: ``recv(id)`` reads the socket until a frame for that id arrives and
keeps frames for other ids until they are asked for, so any order of reads across streams works.
Not thread-safe: use one client per thread.

From the shell: ``python -m examples.streamrpc.client --port 10300 sum 1 2 3`` (or ``count 5``,
``echo a b c``, ``whoami``).
"""

from __future__ import annotations

import argparse
import collections
import socket

from examples.streamrpc.protocol import MAX_ID, Frame, FrameType, ProtocolError, encode_frame, take_frame

__all__ = ["ConnectionClosed", "Stream", "StreamRpcClient"]


class ConnectionClosed(ConnectionError):
    """The server closed the connection (or sent bytes that are not streamrpc) before the frame came."""


class StreamRpcClient:
    def __init__(self, host: str, port: int, *, timeout: float = 5.0, service: str = "demo") -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.service = service
        self._next_id = 1
        self._buffer = bytearray()
        self._queued: dict[int, collections.deque[Frame]] = collections.defaultdict(collections.deque)

    def next_id(self) -> int:
        """Streams and calls share one id counter, so their ids never collide on this connection."""
        id_ = self._next_id
        self._next_id = id_ + 1 if id_ < MAX_ID else 1
        return id_

    def send_frame(self, type_: FrameType, id_: int, body: bytes = b"", headers: dict | None = None, flags: int = 0) -> None:
        self.send_raw(encode_frame(type_, id_, body, headers, flags))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def open_stream(self, method: str, body: bytes = b"", headers: dict | None = None) -> Stream:
        stream = Stream(self, self.next_id())
        self.send_frame(FrameType.INIT, stream.id, body, {"method": method, "service": self.service, **(headers or {})})
        return stream

    def call(self, method: str, body: bytes = b"", headers: dict | None = None, timeout: float | None = None) -> Frame:
        """One unary call: its RESPONSE (check ``.error``; the header ``code`` says why)."""
        id_ = self.next_id()
        self.send_frame(FrameType.REQUEST, id_, body, {"method": method, "service": self.service, **(headers or {})})
        return self.recv(id_, timeout)

    def recv(self, id_: int, timeout: float | None = None) -> Frame:
        """The next frame for stream or call ``id_``; raises TimeoutError or ConnectionClosed."""
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        while not self._queued[id_]:
            try:
                frame = take_frame(self._buffer)
            except ProtocolError as exc:
                raise ConnectionClosed(f"the server sent bytes that are not streamrpc: {exc}") from None
            if frame is not None:
                self._queued[frame.id].append(frame)
                continue
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError(f"streamrpc: no frame for id {id_} within {self.sock.gettimeout()}s") from None
            if not data:
                raise ConnectionClosed(f"streamrpc: the server closed the connection while id {id_} waited for a frame")
            self._buffer += data
        frame = self._queued[id_].popleft()
        if not self._queued[id_]:
            del self._queued[id_]
        return frame

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> StreamRpcClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Stream:
    """One stream of a client's connection (from ``StreamRpcClient.open_stream``)."""

    def __init__(self, client: StreamRpcClient, id_: int) -> None:
        self.client = client
        self.id = id_

    def send(self, body: bytes) -> None:
        self.client.send_frame(FrameType.DATA, self.id, body)

    def half_close(self) -> None:
        """Nothing more from this side; the server may go on sending."""
        self.client.send_frame(FrameType.HALF_CLOSE, self.id)

    def cancel(self) -> None:
        """Close both sides (the server stops and does not answer)."""
        self.client.send_frame(FrameType.CLOSE, self.id)

    def recv(self, timeout: float | None = None) -> Frame:
        return self.client.recv(self.id, timeout)

    def recv_until_closed(self, timeout: float | None = None) -> list[Frame]:
        """Frames until the server's side ends (its HALF_CLOSE or a CLOSE), that frame included."""
        frames = [self.recv(timeout)]
        while frames[-1].type not in (FrameType.HALF_CLOSE, FrameType.CLOSE):
            frames.append(self.recv(timeout))
        return frames


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.streamrpc.client", description="Run one streamrpc method and print what comes back.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("method", choices=["sum", "count", "echo", "whoami"])
    parser.add_argument("args", nargs="*", help="sum: integers; count: N; echo: messages")
    args = parser.parse_args(argv)
    with StreamRpcClient(args.host, args.port, timeout=args.timeout) as client:
        if args.method == "whoami":
            frames = [client.call("whoami")]
        else:
            body = args.args[0].encode() if args.method == "count" and args.args else b""
            stream = client.open_stream(args.method, body)
            if args.method != "count":
                for item in args.args:
                    stream.send(item.encode())
            stream.half_close()
            frames = stream.recv_until_closed()
    for frame in frames:
        print(f"{frame.type.name} id={frame.id} server={frame.headers.get('server', '?')}{' ERROR' if frame.error else ''} body={frame.body.decode(errors='replace')}")


if __name__ == "__main__":
    main()
