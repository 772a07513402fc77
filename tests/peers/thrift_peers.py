"""Real Thrift peers (thriftpy2) for tests: an Echo server and clients, in every wire variant.

The service is tests/peers/echo.thrift. A server runs in background threads of the test process
(``EchoServer``) or in a child process (``spawn_server``); either way it listens on a host/port
(port 0 = a free one) and reports its name through ``whoami()``, so tests can tell which backend
answered. ``notify`` (oneway) calls are recorded so tests can wait for them.

Variants: transport framed|buffered x protocol binary|compact, optionally multiplexed (the
client prefixes method names with ``Echo:``; the server dispatches through a
TMultiplexedProcessor). ``FRAMED_BINARY`` and ``BUFFERED_COMPACT`` are the two the tests use most.

Command line, for trying a proxy by hand:
    python -m tests.peers.thrift_peers serve --name v1 --port 10101 --transport framed --protocol binary
    python -m tests.peers.thrift_peers call --port 10100 whoami
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import thriftpy2
from thriftpy2.protocol import TBinaryProtocolFactory, TCompactProtocolFactory, TMultiplexedProtocol
from thriftpy2.thrift import TApplicationException, TClient, TMessageType, TMultiplexedProcessor, TProcessor
from thriftpy2.transport import TBufferedTransportFactory, TFramedTransportFactory, TMemoryBuffer, TSocket, TTransportException

from tests.peers.cli import peer_parser, run, serve_until_terminated
from tests.peers.tcp_server import ConnectionServer

LOOPBACK = "127.0.0.1"
IDL_PATH = Path(__file__).with_name("echo.thrift")
SERVICE_NAME = "Echo"  # the multiplexed service name
REPO_ROOT = Path(__file__).resolve().parents[2]

log = logging.getLogger(__name__)

echo_thrift: ModuleType = thriftpy2.load(str(IDL_PATH), module_name="echo_thrift")
"""The loaded IDL: ``echo_thrift.Echo``, ``echo_thrift.Payload``, ``echo_thrift.EchoError``, ..."""


@dataclass(frozen=True)
class Variant:
    """How a peer puts Thrift on the wire."""

    transport: str = "framed"  # framed | buffered
    protocol: str = "binary"  # binary | compact
    multiplexed: bool = False
    strict: bool = True  # binary only: False writes the old non-strict message header

    def __post_init__(self) -> None:
        if self.transport not in ("framed", "buffered") or self.protocol not in ("binary", "compact"):
            raise ValueError(f"unknown Thrift variant {self.transport}/{self.protocol}; use framed|buffered and binary|compact")

    @property
    def name(self) -> str:
        return f"{self.transport}-{self.protocol}" + ("-multiplexed" if self.multiplexed else "") + ("" if self.strict else "-nonstrict")

    def transport_factory(self):
        return TFramedTransportFactory() if self.transport == "framed" else TBufferedTransportFactory()

    def protocol_factory(self):
        if self.protocol == "compact":
            return TCompactProtocolFactory()
        return TBinaryProtocolFactory(strict_read=False, strict_write=self.strict)


FRAMED_BINARY = Variant("framed", "binary")
BUFFERED_COMPACT = Variant("buffered", "compact")
VARIANTS = (FRAMED_BINARY, BUFFERED_COMPACT)


class EchoHandler:
    """The Echo service; ``name`` is what ``whoami`` answers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._notifications: list[str] = []
        self._arrived = threading.Condition()

    def whoami(self) -> str:
        return self.name

    def echo(self, s: str) -> str:
        return s

    def notify(self, s: str) -> None:
        with self._arrived:
            self._notifications.append(s)
            self._arrived.notify_all()

    def fail(self, message: str, declared: bool) -> str:
        if declared:
            raise echo_thrift.EchoError(message=message)
        raise TApplicationException(TApplicationException.INTERNAL_ERROR, message)

    def mirror(self, payload):
        return payload

    def ping(self) -> None:
        return None

    @property
    def notifications(self) -> list[str]:
        with self._arrived:
            return list(self._notifications)

    def wait_for_notification(self, text: str, timeout: float = 10.0) -> bool:
        """True once ``notify(text)`` has arrived; False if it has not within ``timeout`` seconds."""
        with self._arrived:
            return self._arrived.wait_for(lambda: text in self._notifications, timeout)


class EchoServer:
    """An Echo server on background threads (a ConnectionServer: one thread per connection).

    Use as a context manager (``with EchoServer("v1") as server: server.port``) or call
    ``start()``/``stop()``.
    """

    def __init__(self, name: str, variant: Variant = FRAMED_BINARY, host: str = LOOPBACK, port: int = 0) -> None:
        self.name = name
        self.variant = variant
        self.handler = EchoHandler(name)
        self.errors: list[BaseException] = []  # unexpected failures of connection threads
        processor = TProcessor(echo_thrift.Echo, self.handler)
        if variant.multiplexed:
            multiplexed = TMultiplexedProcessor()
            multiplexed.register_processor(SERVICE_NAME, processor)
            processor = multiplexed
        self._processor = processor
        self._server = ConnectionServer(self._serve, host, port, name=f"thrift-{name}")
        self.host, self.port = self._server.host, self._server.port

    def start(self) -> EchoServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> EchoServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _serve(self, conn: socket.socket) -> None:
        transport = self.variant.transport_factory().get_transport(TSocket(sock=conn))
        protocol = self.variant.protocol_factory().get_protocol(transport)
        try:
            while True:
                self._processor.process(protocol, protocol)
        except TTransportException:
            pass  # the client closed the connection
        except Exception as exc:  # noqa: BLE001 - recorded for the test to assert on
            if not self._server.stopped:
                log.warning("thrift peer %s: connection failed: %r", self.name, exc)
                self.errors.append(exc)
        finally:
            transport.close()


def make_client(host: str, port: int, variant: Variant = FRAMED_BINARY, *, timeout: float = 10.0) -> TClient:
    """A connected Echo client; call ``client.close()`` when done (or use ``client_for``)."""
    sock = TSocket(host, port, socket_timeout=int(timeout * 1000), connect_timeout=int(timeout * 1000))
    transport = variant.transport_factory().get_transport(sock)
    protocol = variant.protocol_factory().get_protocol(transport)
    if variant.multiplexed:
        protocol = TMultiplexedProtocol(protocol, SERVICE_NAME)
    transport.open()
    return TClient(echo_thrift.Echo, protocol)


@contextlib.contextmanager
def client_for(host: str, port: int, variant: Variant = FRAMED_BINARY, *, timeout: float = 10.0) -> Iterator[TClient]:
    client = make_client(host, port, variant, timeout=timeout)
    try:
        yield client
    finally:
        client.close()


def sample_payload(seed: int = 1):
    """A Payload with every field set, different for each ``seed``."""
    return echo_thrift.Payload(
        flag=bool(seed % 2),
        small=seed % 100,
        short_number=-seed,
        number=seed * 1000,
        big_number=seed * 10**12,
        ratio=seed / 8,
        text=f"text-{seed}-é",
        blob=bytes(range(seed % 7)),
        numbers=list(range(seed % 20)),
        tags=[f"tag{i}" for i in range(seed % 4)],  # a set on the wire; thriftpy2 reads sets as lists
        counters={f"c{i}": i * seed for i in range(3)},
        inner=echo_thrift.Inner(id=seed, label="inner"),
        inners=[echo_thrift.Inner(id=i, label=str(i)) for i in range(seed % 3)],
        flags_by_id={i: [True, False][: i + 1] for i in range(2)},
        far_flag=True,
    )


def encode_message(variant: Variant, method: str, message_type: int, seqid: int, body) -> bytes:
    """One message exactly as a thriftpy2 peer of ``variant`` puts it on the wire (framed when
    the variant is; ``Echo:`` prefixed for calls when multiplexed). ``body`` is a thriftpy2
    struct: ``echo_thrift.Echo.echo_args(s="hi")``, ``..._result(...)``, a TApplicationException."""
    memory = TMemoryBuffer()
    transport = variant.transport_factory().get_transport(memory)
    protocol = variant.protocol_factory().get_protocol(transport)
    if variant.multiplexed:
        protocol = TMultiplexedProtocol(protocol, SERVICE_NAME)
    protocol.write_message_begin(method, message_type, seqid)
    body.write(protocol)
    protocol.write_message_end()
    transport.flush()
    return memory.getvalue()


def read_exception_reply(variant: Variant, data: bytes) -> tuple[str, int, int, TApplicationException]:
    """(method name, message type, seqid, exception) of an EXCEPTION message, read by thriftpy2
    the way its client reads a reply; raises AssertionError for any other message type."""
    transport = variant.transport_factory().get_transport(TMemoryBuffer(data))
    protocol = variant.protocol_factory().get_protocol(transport)
    name, message_type, seqid = protocol.read_message_begin()
    if message_type != TMessageType.EXCEPTION:
        raise AssertionError(f"expected an EXCEPTION message, got message type {message_type} for {name!r}")
    exception = TApplicationException()
    exception.read(protocol)
    protocol.read_message_end()
    return name, message_type, seqid, exception


class ServerProcess:
    """An Echo server in a child process (``spawn_server``); notifications arrive on its stdout."""

    def __init__(self, process: subprocess.Popen, host: str, port: int) -> None:
        self.process = process
        self.host = host
        self.port = port
        self._notifications: list[str] = []
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            if line.startswith("notify "):
                with self._arrived:
                    self._notifications.append(line[len("notify ") :].rstrip("\n"))
                    self._arrived.notify_all()

    def wait_for_notification(self, text: str, timeout: float = 10.0) -> bool:
        with self._arrived:
            return self._arrived.wait_for(lambda: text in self._notifications, timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._reader.join(timeout=5)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def spawn_server(name: str, variant: Variant = FRAMED_BINARY, host: str = LOOPBACK, port: int = 0, *, startup_timeout: float = 30.0) -> ServerProcess:
    """Start an Echo server in a child process and wait until it listens."""
    command = [sys.executable, "-m", "tests.peers.thrift_peers", "serve", "--name", name, "--host", host, "--port", str(port)]
    command += ["--transport", variant.transport, "--protocol", variant.protocol]
    if variant.multiplexed:
        command.append("--multiplexed")
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True, bufsize=1)
    # readline() blocks; a timer kills a child that never reports, which ends the read.
    watchdog = threading.Timer(startup_timeout, process.kill)
    watchdog.start()
    try:
        line = process.stdout.readline()
    finally:
        watchdog.cancel()
    if not line.startswith("listening "):
        process.kill()
        process.wait(timeout=10)
        raise RuntimeError(f"thrift peer {name} did not start (exit code {process.returncode}, first output {line!r})")
    listen_host, _, listen_port = line.split()[1].rpartition(":")
    return ServerProcess(process, listen_host, int(listen_port))


def _serve_forever(args: argparse.Namespace) -> None:
    variant = Variant(args.transport, args.protocol, args.multiplexed)
    server = EchoServer(args.name, variant, args.host, args.port)
    original_notify = server.handler.notify

    def notify_and_print(s: str) -> None:
        original_notify(s)
        print(f"notify {s}", flush=True)

    server.handler.notify = notify_and_print
    server.start()
    serve_until_terminated(server.host, server.port, server.stop)


def _call(args: argparse.Namespace) -> None:
    variant = Variant(args.transport, args.protocol, args.multiplexed)
    with client_for(args.host, args.port, variant) as client:
        result = getattr(client, args.method)(*args.args)
    print(result)


def main(argv: list[str] | None = None) -> None:
    parser, serve_parser, call_parser = peer_parser("python -m tests.peers.thrift_peers", "Thrift Echo peers (thriftpy2)", call_port=10100, serve=_serve_forever, call=_call)
    for sub in (serve_parser, call_parser):
        sub.add_argument("--transport", choices=("framed", "buffered"), default="framed")
        sub.add_argument("--protocol", choices=("binary", "compact"), default="binary")
        sub.add_argument("--multiplexed", action="store_true")
    serve_parser.add_argument("--name", default="echo")
    call_parser.add_argument("method", choices=("whoami", "echo", "notify", "ping"))
    call_parser.add_argument("args", nargs="*")
    run(parser, argv)


if __name__ == "__main__":
    main()
