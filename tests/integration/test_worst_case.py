"""The worst valid message of max_frame_size, through a real Envoy and the bridge, does not starve
another connection.

For each built-in codec (awesomerpc; Dubbo; Thrift binary and compact, framed and unframed) one
client sends every shape bench.worstcase builds for it (the messages that make decode work
hardest, each of the listener's max_frame_size, 4 MiB, and within the codec's caps, so each is
decoded and answered, here with the codec's no-route error reply) while a healthy client on its
own connection keeps calling a real backend. Every healthy call must succeed within its timeout,
some of them while the attack is under way, and the healthy connection must still be the same
open one at the end.

Every test runs in both bridge modes (ext_proc and inprocess, where the decode work runs on
Envoy's worker, so a capped decode is what keeps the healthy connection served there too).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from dubbo.codec.hessian2 import DubboRequest, DubboResponse
from thriftpy2.thrift import TApplicationException
from thriftpy2.transport import TSocket

from bench import worstcase
from metabridge.sdk.codec import DEFAULT_MAX_FRAME_SIZE
from examples.awesomerpc.client import encode_frame
from tests.integration.harness import MODES, Stack, awesomerpc_config, free_port, proxy_factory, stack_class
from tests.peers.dubbo_peers import _recv_exactly as recv_exactly  # raises ConnectionError if the proxy closes
from tests.peers.dubbo_peers import decode_with_dubbo_py, start_provider
from tests.peers.thrift_peers import EchoServer, Variant, client_for

HOST = "127.0.0.1"
GREETER = "com.example.Greeter"
# A healthy call slower than this fails the test: a bridge stalled for seconds by one message
# (4-6 s per message before decode work was capped) would miss it; a capped one (about 0.1 s
# at worst) has ample room on a loaded machine.
HEALTHY_TIMEOUT = 3.0
AWESOMERPC_HEADER = struct.Struct("!BIIhh")
AWESOMERPC_NOT_FOUND = 404


@dataclass
class Healthy:
    """A client calling in a loop on one connection until told to stop; what it saw."""

    call: Callable[[int], None]  # one call, raising if its answer is wrong or late
    spans: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each call
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    first: threading.Event = field(default_factory=threading.Event)

    @property
    def calls(self) -> int:
        return len(self.spans)

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                self.call(self.calls)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)
                self.first.set()
                return
            self.spans.append((start, time.monotonic()))
            self.first.set()


def attack_alongside(healthy: Healthy, attack: Callable[[], None]) -> None:
    """Run ``attack`` while ``healthy`` calls on; fails unless every call succeeded and some
    were in flight during the attack."""
    thread = threading.Thread(target=healthy.run, name="healthy-client", daemon=True)
    thread.start()
    try:
        assert healthy.first.wait(30), "the healthy client's first call did not complete"
        began = time.monotonic()
        attack()
        ended = time.monotonic()
    finally:
        healthy.stop.set()
        thread.join(30)
    assert not thread.is_alive(), "the healthy client is stuck in a call"
    assert healthy.errors == [], f"a healthy call failed during the attack: {healthy.errors[0]!r}"
    overlapping = [end - start for start, end in healthy.spans if start < ended and end > began]
    assert overlapping, f"no healthy call was in flight during the {ended - began:.2f} s attack"


def send_worst_messages(name: str, port: int, read_reply: Callable[[socket.socket, str], None]) -> Callable[[], None]:
    """Each shape of bench.worstcase's target ``name``, on a connection of its own to ``port``;
    ``read_reply`` checks the answer (waiting for it is what says the message was dealt with)."""
    target = worstcase.find_target(name)

    def attack() -> None:
        for shape in target.shapes:
            message = worstcase.build(target, shape, DEFAULT_MAX_FRAME_SIZE)
            with socket.create_connection((HOST, port), timeout=30) as sock:
                sock.sendall(message)
                read_reply(sock, shape)

    return attack


# -- awesomerpc -------------------------------------------------------------------------------


@pytest.fixture
def awesomerpc_stack(tmp_path, mode) -> Iterator[Stack]:
    backend = free_port()
    route = {"name": "cmd2", "match": {"headers": [{"name": "cmd", "exact": "2"}]}, "route": {"cluster": "v1"}}
    stack = stack_class(mode)(tmp_path, awesomerpc_config(free_port(), {"v1": backend}, [route], request_timeout="5s"), {"v1": backend})
    try:
        yield stack.start()
    finally:
        stack.stop()


@pytest.mark.parametrize("mode", MODES)
def test_awesomerpc(awesomerpc_stack):
    port = awesomerpc_stack.config["listeners"][0]["port"]
    with socket.create_connection((HOST, port), timeout=HEALTHY_TIMEOUT) as sock:

        def call(n: int) -> None:
            body = f"healthy {n}".encode()
            sock.sendall(encode_frame(n + 1, 2, body))
            _, flow, length, cmd, rsp_code = AWESOMERPC_HEADER.unpack(recv_exactly(sock, AWESOMERPC_HEADER.size))
            echoed = recv_exactly(sock, length - AWESOMERPC_HEADER.size)
            assert (flow, cmd, rsp_code, echoed) == (n + 1, 2, 0, b"v1|" + body)  # the backend says who answered

        def read_reply(attacker: socket.socket, shape: str) -> None:
            _, flow, length, cmd, rsp_code = AWESOMERPC_HEADER.unpack(recv_exactly(attacker, AWESOMERPC_HEADER.size))
            assert (flow, rsp_code) == (1, AWESOMERPC_NOT_FOUND), f"{shape}: not the no-route reply"

        healthy = Healthy(call)
        attack_alongside(healthy, send_worst_messages("awesomerpc", port, read_reply))
        call(healthy.calls)  # the same connection still answers


# -- Dubbo ------------------------------------------------------------------------------------


@pytest.fixture
def dubbo_proxy(tmp_path, mode) -> Iterator:
    def start_backend(cluster: str, name: str):
        return start_provider(GREETER, name=name)

    with proxy_factory(tmp_path, codec="dubbo", ref="codecs/dubbo:DubboCodec", example="examples/dubbo.yaml", start_backend=start_backend, stack_cls=stack_class(mode)) as make:
        yield make({"greeter": "greeter"}, [{"match": {"headers": [{"name": "interface", "exact": GREETER}]}, "route": {"cluster": "greeter"}}])


@pytest.mark.parametrize("mode", MODES)
def test_dubbo(dubbo_proxy):
    with socket.create_connection((HOST, dubbo_proxy.port), timeout=HEALTHY_TIMEOUT) as sock:

        def call(n: int) -> None:
            request = DubboRequest(id=n + 1, twoway=True, dubbo_version="2.0.2", service_name=GREETER, method_name="echo", args=[f"healthy {n}"], service_version="1.0.0")
            sock.sendall(request.encode())
            header = recv_exactly(sock, 16)
            reply = decode_with_dubbo_py(header + recv_exactly(sock, struct.unpack_from(">i", header, 12)[0]))
            assert isinstance(reply, DubboResponse) and (reply.id, reply.status, reply.data) == (n + 1, 20, f"healthy {n}")

        def read_reply(attacker: socket.socket, shape: str) -> None:
            header = recv_exactly(attacker, 16)
            request_id, status = struct.unpack_from(">q", header, 4)[0], header[3]
            assert (request_id, status) == (1, 60), f"{shape}: not the SERVICE_NOT_FOUND reply"

        healthy = Healthy(call)
        attack_alongside(healthy, send_worst_messages("dubbo request", dubbo_proxy.port, read_reply))
        call(healthy.calls)  # the same connection still answers
    assert [r.method for r in dubbo_proxy.backends["greeter"].received] == ["echo"] * (healthy.calls + 1)


# -- Thrift -----------------------------------------------------------------------------------

THRIFT_VARIANTS = [Variant(transport, protocol) for protocol in ("binary", "compact") for transport in ("framed", "buffered")]


@pytest.fixture(params=THRIFT_VARIANTS, ids=lambda v: v.name)
def thrift_proxy(request, tmp_path, mode) -> Iterator:
    variant = request.param
    route = {"match": {"headers": [{"name": "method", "exact": "echo"}]}, "route": {"cluster": "v1"}}
    with proxy_factory(
        tmp_path, codec="thrift", ref="codecs/thrift:ThriftCodec", example="examples/thrift.yaml", start_backend=lambda cluster, v: EchoServer(cluster, v).start(),
        stack_cls=stack_class(mode),
    ) as make:
        yield variant, make({"v1": variant}, [route])


@pytest.mark.parametrize("mode", MODES)
def test_thrift(thrift_proxy):
    variant, proxy = thrift_proxy
    target = f"thrift {variant.protocol} {variant.transport}"

    def read_reply(attacker: socket.socket, shape: str) -> None:
        # thriftpy2 reads the reply as its client would: an EXCEPTION for the unrouted call "m".
        transport = variant.transport_factory().get_transport(TSocket(sock=attacker))
        protocol = variant.protocol_factory().get_protocol(transport)
        name, _, seqid = protocol.read_message_begin()
        exception = TApplicationException()
        exception.read(protocol)
        assert (name, seqid, exception.type) == ("m", 1, TApplicationException.UNKNOWN_METHOD), f"{shape}: not the no-route reply"

    with client_for(HOST, proxy.port, variant, timeout=HEALTHY_TIMEOUT) as client:

        def call(n: int) -> None:
            assert client.echo(f"healthy {n}") == f"healthy {n}"

        healthy = Healthy(call)
        attack_alongside(healthy, send_worst_messages(target, proxy.port, read_reply))
        call(healthy.calls)  # the same connection still answers
    assert proxy.backends["v1"].errors == []
