"""Independent Dubbo2/Hessian2 peers for tests: a consumer and a provider nobody here wrote.

- Consumer: ``dubbo-ssl-python`` (``dubbo_ssl``), a maintained Python client for Java Dubbo 2.x
  services derived from Apache's dubbo-python2. ``call()`` uses it with a direct address.
- Provider: ``dubbo-py`` (``dubbo``). Its ready-made ``DubboService`` binds 0.0.0.0, looks up a
  public address on start and hides attachments from handlers, so ``DubboProvider`` serves with
  dubbo-py's own codec pieces (``Decoder``, ``DubboResponse``, ``DubboHeartBeatResponse``) on a
  loopback socket instead. ``call_raw()`` is dubbo-py's consumer side (``DubboRequest`` +
  ``Decoder``), a second consumer to cross-check replies with.

Everything binds and targets 127.0.0.1. The provider answers, for its interface and version:
  whoami()              -> its name (which instance answered)
  echo(String s)        -> s
  attachments()         -> the attachments map it received
  fail(String message)  -> a SERVICE_ERROR (70) response carrying ``message``
"""

from __future__ import annotations

import argparse
import io
import logging
import socket
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dubbo.codec.hessian2 import Decoder, DubboHeartBeatRequest, DubboHeartBeatResponse, DubboRequest, DubboResponse
from dubbo.errors import DubboError
from dubbo_ssl.client import DubboClient
from dubbo_ssl.codec.decoder import Response as SslResponseBody
from dubbo_ssl.codec.decoder import parse_response_head
from dubbo_ssl.codec.encoder import Object as SslObject
from dubbo_ssl.codec.encoder import Request as SslRequest
from dubbo_ssl.common.exceptions import DubboException, DubboRequestTimeoutException

from tests.peers.cli import peer_parser, run, serve_until_terminated
from tests.peers.tcp_server import ConnectionServer

LOOPBACK = "127.0.0.1"
DUBBO_VERSION = "2.0.2"

# The consumer library's errors, re-exported so tests need not know where they live.
ConsumerError = DubboException
ConsumerTimeout = DubboRequestTimeoutException

logger = logging.getLogger(__name__)


def _not_a_heartbeat_check(record: logging.LogRecord) -> bool:
    # The consumer's heartbeat thread checks every pooled connection each few seconds and logs a
    # KeyError at ERROR, forever, for one whose peer a finished test stopped (the library keeps
    # the pool for the whole process): hundreds of lines in a failing test's captured log, none
    # about that test. Its calls' own failures still reach the tests, as exceptions.
    return record.funcName != "_send_heartbeat"


logging.getLogger("dubbo_ssl").addFilter(_not_a_heartbeat_check)


# -- consumer ----------------------------------------------------------------------------------


def call(
    host: str,
    port: int,
    interface: str,
    method: str,
    args: Sequence[Any] = (),
    attachments: Mapping[str, Any] | None = None,
    *,
    version: str = "1.0.0",
    group: str | None = None,
    timeout: float = 5.0,
) -> Any:
    """Invoke ``interface.method(*args)`` on host:port with dubbo-ssl-python's consumer.

    Returns the result, or raises the library's error: ``ConsumerError`` (a
    ``DubboResponseException`` for error statuses and exceptions) or ``ConsumerTimeout``.
    The library keeps one pooled connection per host:port for the whole process.
    """
    client = DubboClient(interface, group, version=version, dubbo_version=DUBBO_VERSION, host=f"{host}:{port}")
    return client.call(method, list(args), context=dict(attachments) if attachments else None, timeout=timeout)


def call_raw(
    host: str,
    port: int,
    interface: str,
    method: str,
    args: Sequence[Any] = (),
    attachments: Mapping[str, Any] | None = None,
    *,
    version: str = "1.0.0",
    request_id: int = 1,
    timeout: float = 5.0,
) -> DubboResponse:
    """One call with dubbo-py's consumer codec on a fresh connection; returns its DubboResponse
    (``status``, ``data``, ``error``), whatever the status."""
    frame = DubboRequest(
        id=request_id,
        twoway=True,
        dubbo_version=DUBBO_VERSION,
        service_name=interface,
        method_name=method,
        args=list(args),
        service_version=version,
        attachment=dict(attachments or {}),
    ).encode()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(frame)
        while True:
            message = Decoder(sock).decode()
            if isinstance(message, DubboResponse):
                return message


def heartbeats_raw(host: str, port: int, request_ids: Sequence[int], *, timeout: float = 5.0) -> list[bytes]:
    """Send one dubbo-py two-way heartbeat request per id on a fresh connection, then read as
    many whole frames back; returns them as bytes (read them with ``decode_with_dubbo_py`` or
    ``decode_with_dubbo_ssl``). Raises ``ConnectionError`` if the peer closes first."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"".join(DubboHeartBeatRequest(request_id, twoway=True).encode() for request_id in request_ids))
        replies = []
        for _ in request_ids:
            header = _recv_exactly(sock, 16)
            replies.append(header + _recv_exactly(sock, struct.unpack_from(">i", header, 12)[0]))
        return replies


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def decode_with_dubbo_py(frame: bytes) -> Any:
    """dubbo-py's reading of one frame: DubboRequest, DubboResponse or a heartbeat object."""
    return Decoder(io.BytesIO(frame)).decode()


def decode_with_dubbo_ssl(frame: bytes) -> tuple[int, Any]:
    """dubbo-ssl-python's reading of one response frame: ``(heartbeat_kind, first body value)``,
    heartbeat_kind being 0 (not a heartbeat), 1 (heartbeat response) or 2 (heartbeat request).
    Raises the library's error for a non-OK status, as its consumer does."""
    heartbeat, body_length = parse_response_head(bytearray(frame[:16]))
    body = bytearray(frame[16 : 16 + body_length])
    return heartbeat, SslResponseBody(body).read_next() if body else None


# -- provider ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedCall:
    request_id: int
    interface: str
    version: str | None
    method: str
    args: tuple[Any, ...]
    attachments: dict[str, Any]
    twoway: bool


class DubboProvider:
    """A provider of one interface/version on 127.0.0.1, serving from threads."""

    def __init__(self, interface: str, *, version: str = "1.0.0", name: str = "provider", host: str = LOOPBACK, port: int = 0) -> None:
        self.interface = interface
        self.version = version
        self.name = name
        self.received: list[ReceivedCall] = []
        self.heartbeats = 0
        self._lock = threading.Lock()
        self._server = ConnectionServer(self._serve, host, port, name=f"dubbo-provider-{name}").start()
        self.host, self.port = self._server.host, self._server.port

    def __enter__(self) -> DubboProvider:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._server.stop()

    def invoke(self, request: DubboRequest) -> DubboResponse:
        interface = request.service_name.decode()
        version = request.service_version.decode() if request.service_version is not None else None
        method = request.method_name.decode()
        attachments = dict(request.attachment or {})
        with self._lock:
            self.received.append(ReceivedCall(request.id, interface, version, method, tuple(request.args), attachments, request.twoway))
        if interface != self.interface or version != self.version:
            return DubboResponse(request.id, 60, None, f"{self.name}: no service {interface}:{version} (serving {self.interface}:{self.version})")
        if method == "whoami":
            return DubboResponse(request.id, DubboResponse.OK, self.name, None)
        if method == "echo" and len(request.args) == 1:
            return DubboResponse(request.id, DubboResponse.OK, request.args[0], None)
        if method == "attachments":
            return DubboResponse(request.id, DubboResponse.OK, attachments, None)
        if method == "fail" and len(request.args) == 1:
            error = DubboError(70, f"{self.name}: {request.args[0]}")
            return DubboResponse(request.id, error.status, None, error.message)
        return DubboResponse(request.id, 70, None, f"{self.name}: no method {method} with {len(request.args)} argument(s)")

    def _serve(self, sock: socket.socket) -> None:
        try:
            while True:
                message = Decoder(sock).decode()
                if isinstance(message, DubboHeartBeatRequest):
                    with self._lock:
                        self.heartbeats += 1
                    if message.is_twoway():
                        sock.sendall(DubboHeartBeatResponse(message.id).encode())
                    continue
                if not isinstance(message, DubboRequest):
                    continue  # heartbeat responses, telnet text
                reply = self.invoke(message)
                if message.twoway:
                    sock.sendall(reply.encode())
        except (EOFError, OSError):
            pass
        except Exception:  # the library could not read what it was sent: drop the connection
            logger.exception("dubbo provider %s: cannot decode a message; closing the connection", self.name)


def start_provider(interface: str, *, version: str = "1.0.0", name: str = "provider", host: str = LOOPBACK, port: int = 0) -> DubboProvider:
    """A running provider; use as a context manager or call ``stop()``."""
    return DubboProvider(interface, version=version, name=name, host=host, port=port)


# -- scripted provider (for replies no real provider would send) --------------------------------


class ScriptedProvider:
    """Reads whole Dubbo frames on 127.0.0.1 and answers each with ``respond(frame)`` (bytes to
    send, possibly several frames, or None for no answer). Records the frames it received."""

    def __init__(self, respond: Callable[[bytes], bytes | None], *, host: str = LOOPBACK) -> None:
        self.respond = respond
        self.received: list[bytes] = []
        self._server = ConnectionServer(self._serve, host, name="scripted-provider").start()
        self.host, self.port = self._server.host, self._server.port

    def __enter__(self) -> ScriptedProvider:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._server.stop()

    stop = close  # the name harness.Backend (proxy_factory) stops backends by

    def _serve(self, sock: socket.socket) -> None:
        buffer = bytearray()
        try:
            while True:
                while len(buffer) >= 16 and len(buffer) >= 16 + struct.unpack_from(">i", buffer, 12)[0]:
                    size = 16 + struct.unpack_from(">i", buffer, 12)[0]
                    frame = bytes(buffer[:size])
                    del buffer[:size]
                    self.received.append(frame)
                    answer = self.respond(frame)
                    if answer:
                        sock.sendall(answer)
                data = sock.recv(65536)
                if not data:
                    return
                buffer += data
        except OSError:
            return


# -- Hessian2 bodies written and read by dubbo-ssl-python (for scripted peers, raw consumers) ----
#
# One writer (or reader) per body, as Java's Hessian2Output/Hessian2Input: a later value may use
# the class definitions and type names an earlier one made (an attachment holding an object of an
# argument's class, written as 0x60 + fields, or a list naming its type by number).

JavaObject = SslObject  # a Java object for the writer: JavaObject("com.example.User", {"name": "ann"})

FLAG_EVENT = 0x20
OK = 20


def read_body_with_dubbo_ssl(frame: bytes) -> list[Any]:
    """Every value of a frame's body (after its 16-byte header) as dubbo-ssl-python's Hessian2
    reader reads them, with one reader for the whole body; objects are read as dicts."""
    reader = SslResponseBody(bytearray(frame[16:]))
    values = []
    while reader.length():
        values.append(reader.read_next())
    return values


def write_with_dubbo_ssl(*values: Any, attachments: Mapping[str, Any] | None = None) -> bytes:
    """``values`` written one after the other by one dubbo-ssl-python Hessian2 writer (its request
    encoder's), then, when given, ``attachments`` as an untyped map written the way that encoder
    writes a request's attachments (``H`` key value ... ``Z``), with the same writer."""
    writer = SslRequest({})
    out: list[int] = []
    for value in values:
        out.extend(writer._encode_single_value(value))
    if attachments is not None:
        out.append(ord("H"))
        for key, value in attachments.items():
            out.extend(writer._encode_single_value(key))
            out.extend(writer._encode_single_value(value))
        out.append(ord("Z"))
    return bytes(b & 0xFF for b in out)


def request_with_dubbo_ssl(
    request_id: int,
    interface: str,
    method: str,
    args: Sequence[Any] = (),
    attachments: Mapping[str, Any] | None = None,
    *,
    version: str = "1.0.0",
    group: str | None = None,
) -> bytes:
    """The request frame dubbo-ssl-python's consumer writes for this call (what ``call()`` sends),
    with the given request id: to send over a raw socket, e.g. when the reply is one its consumer
    cannot read (a result type with attachments)."""
    request = SslRequest(
        {
            "dubbo_version": DUBBO_VERSION,
            "path": interface,
            "version": version,
            "method": method,
            "group": group,
            "arguments": list(args),
            "context": dict(attachments) if attachments else None,
        }
    )
    request.invoke_id = request_id
    return bytes(request.encode())


def response_frame(request_id: int, body: bytes, *, status: int = OK) -> bytes:
    """A Hessian2 response frame: flag 0x02, ``status``, ``request_id`` and ``body``."""
    return struct.pack(">HBBqi", 0xDABB, 0x02, status, request_id, len(body)) + body


def exchange_raw(host: str, port: int, frames: bytes, *, replies: int = 1, timeout: float = 5.0) -> list[bytes]:
    """Send ``frames`` (one or more whole frames) on a fresh connection and return the next
    ``replies`` frames that are not events (heartbeats), as bytes. Raises ``ConnectionError`` if
    the peer closes first, ``socket.timeout`` if it stays silent."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(frames)
        answers = []
        while len(answers) < replies:
            header = _recv_exactly(sock, 16)
            frame = header + _recv_exactly(sock, struct.unpack_from(">i", header, 12)[0])
            if not header[2] & FLAG_EVENT:
                answers.append(frame)
        return answers


# -- command line ------------------------------------------------------------------------------


def _serve_forever(args: argparse.Namespace) -> None:
    provider = start_provider(args.interface, version=args.version, name=args.name, host=args.host, port=args.port)
    serve_until_terminated(provider.host, provider.port, provider.stop)


def _call(args: argparse.Namespace) -> None:
    attachments = {}
    for item in args.attachment:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--attachment {item!r}: write it as KEY=VALUE")
        attachments[key] = value
    print(call(args.host, args.port, args.interface, args.method, args.args, attachments, version=args.version, timeout=args.timeout))


def main(argv: list[str] | None = None) -> None:
    """``serve`` a provider or ``call`` one (through a proxy), for trying a config by hand:
    python -m tests.peers.dubbo_peers serve --name greeter-v1 --port 10201
    python -m tests.peers.dubbo_peers call --port 10200 whoami --attachment x-canary=true
    """
    parser, serve_parser, call_parser = peer_parser(
        "python -m tests.peers.dubbo_peers", "Dubbo2/Hessian2 peers (dubbo-py provider, dubbo-ssl-python consumer)", call_port=10200, serve=_serve_forever, call=_call
    )
    for sub in (serve_parser, call_parser):
        sub.add_argument("--interface", default="com.example.Greeter")
        sub.add_argument("--version", default="1.0.0")
    serve_parser.add_argument("--name", default="provider", help="what whoami() answers")
    call_parser.add_argument("method", choices=("whoami", "echo", "attachments", "fail"))
    call_parser.add_argument("args", nargs="*", help="string arguments")
    call_parser.add_argument("--attachment", action="append", default=[], metavar="KEY=VALUE")
    call_parser.add_argument("--timeout", type=float, default=5.0, help="seconds")
    run(parser, argv)


if __name__ == "__main__":
    main()
