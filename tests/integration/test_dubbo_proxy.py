"""The Dubbo codec through a real Envoy and the bridge, between independent Dubbo peers.

The consumer is dubbo-ssl-python (``call``) or dubbo-py's consumer side (``call_raw``); providers
are built from dubbo-py's codec and run on threads of the test process, so tests can see what
they received. dubbo-ssl-python keeps one connection per host:port for the whole process, so
every call of a test to its listener shares one downstream connection.

Every proxy test runs in both modes (the ``proxy`` fixture's parameter): the bridge process
behind ext_proc, and the core inside Envoy (bridge.mode inprocess, docs/inprocess.md). Nothing
here is about the bridge as a separate process.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from dubbo.codec.hessian2 import DubboHeartBeatResponse

from tests.integration.harness import MODES, REPO, proxy_factory, read_until_closed, stack_class
from tests.peers.dubbo_peers import (
    ConsumerError,
    ConsumerTimeout,
    DubboProvider,
    call,
    call_raw,
    decode_with_dubbo_py,
    decode_with_dubbo_ssl,
    heartbeats_raw,
    start_provider,
)

HOST = "127.0.0.1"
GREETER = "com.example.Greeter"
ADMIN = "com.example.Admin"
DUBBO_CODEC = "codecs/dubbo:DubboCodec"
SERVICE_NOT_FOUND = 60


@pytest.fixture(params=MODES)
def proxy(request, tmp_path) -> Iterator:
    """Factory, in each mode: proxy(providers={cluster: (interface, name)}, routes=[...]) runs one provider per
    cluster behind a dubbo listener; without routes, examples/dubbo.yaml (routes, options,
    clusters dubbo-v1/dubbo-v2) is used with its clusters served by the given providers.
    ``.backends`` of what it returns are the providers, by cluster."""

    def start_backend(cluster: str, spec: tuple[str, str]) -> DubboProvider:
        interface, name = spec
        return start_provider(interface, name=name)

    mode = request.param
    with proxy_factory(tmp_path, codec="dubbo", ref=DUBBO_CODEC, example="examples/dubbo.yaml", start_backend=start_backend, stack_cls=stack_class(mode), bridge={"mode": mode}) as make:
        yield make


def route(cluster: str, **headers: str) -> dict:
    return {"match": {"headers": [{"name": key, "exact": value} for key, value in headers.items()]}, "route": {"cluster": cluster}}


def methods_seen(provider: DubboProvider) -> list[str]:
    return [received.method for received in provider.received]



def test_routes_by_interface_and_method(proxy):
    p = proxy(
        {"greeter-v1": (GREETER, "greeter-v1"), "greeter-v2": (GREETER, "greeter-v2"), "admin": (ADMIN, "admin")},
        [route("admin", interface=ADMIN), route("greeter-v2", interface=GREETER, method="echo"), route("greeter-v1", interface=GREETER)],
    )
    assert call(HOST, p.port, GREETER, "whoami") == "greeter-v1"
    assert call(HOST, p.port, GREETER, "echo", ["héllo €"]) == "héllo €"
    assert call(HOST, p.port, ADMIN, "whoami") == "admin"
    large = "ü€" * 15_000  # about 75 KB each way: several reads, several HTTP/2 DATA frames
    assert call(HOST, p.port, GREETER, "echo", [large]) == large
    assert call(HOST, p.port, GREETER, "whoami") == "greeter-v1"
    assert methods_seen(p.backends["greeter-v1"]) == ["whoami", "whoami"]
    assert methods_seen(p.backends["greeter-v2"]) == ["echo", "echo"]
    assert methods_seen(p.backends["admin"]) == ["whoami"]

    # Calls in flight together on the consumer's one connection, over three upstreams: each
    # answer is matched to its call by request id.
    calls = [(GREETER, "echo", [f"m{i}"]) if i % 3 == 0 else (ADMIN, "whoami", []) if i % 3 == 1 else (GREETER, "whoami", []) for i in range(30)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(lambda c: call(HOST, p.port, *c), calls))
    assert answers == [f"m{i}" if i % 3 == 0 else "admin" if i % 3 == 1 else "greeter-v1" for i in range(30)]


def test_example_config_routes_mutates_and_answers_no_route(proxy):
    """examples/dubbo.yaml: attachments() -> dubbo-v2 with x-routed-by added; x-canary=true ->
    dubbo-v2; other Greeter calls -> dubbo-v1; any other interface has no route."""
    p = proxy({"dubbo-v1": (GREETER, "greeter-v1"), "dubbo-v2": (GREETER, "greeter-v2")})
    v1, v2 = p.backends["dubbo-v1"], p.backends["dubbo-v2"]

    assert call(HOST, p.port, GREETER, "whoami") == "greeter-v1"
    assert call(HOST, p.port, GREETER, "whoami", attachments={"x-canary": "true"}) == "greeter-v2"
    seen = call(HOST, p.port, GREETER, "attachments", attachments={"x-trace": "t-1"})
    assert seen["x-routed-by"] == "metabridge"  # the route's request_mutation
    assert seen["x-trace"] == "t-1"  # the consumer's own attachment is kept
    assert seen["interface"] == GREETER
    assert [r.attachments.get("x-routed-by") for r in v2.received if r.method == "attachments"] == ["metabridge"]
    assert methods_seen(v1) == ["whoami"]
    # A provider's error response passes through to the consumer.
    with pytest.raises(ConsumerError, match="greeter-v1: boom"):
        call(HOST, p.port, GREETER, "fail", ["boom"])

    # No route: the consumer gets the error reply at once, not its own timeout.
    with pytest.raises(ConsumerError) as raised:
        call(HOST, p.port, "com.example.Unknown", "whoami", timeout=5)
    assert not isinstance(raised.value, ConsumerTimeout)
    assert "no route matches com.example.Unknown/whoami" in str(raised.value)
    # The second consumer library sees the status and message the codec put there.
    raw = call_raw(HOST, p.port, "com.example.Unknown", "whoami", request_id=41, timeout=5)
    assert (raw.id, raw.status) == (41, SERVICE_NOT_FOUND)
    assert "no route matches com.example.Unknown/whoami" in raw.error
    # The consumer's connection stays usable after the error reply.
    assert call(HOST, p.port, GREETER, "whoami") == "greeter-v1"
    assert methods_seen(v1) == ["whoami", "fail", "whoami"]
    assert all(r.interface == GREETER for r in v1.received + v2.received)


def test_heartbeats_answered_by_the_proxy_and_garbage_closes_only_that_connection(proxy):
    p = proxy({"v1": (GREETER, "greeter-v1")}, [route("v1", interface=GREETER)])
    provider = p.backends["v1"]

    replies = heartbeats_raw(HOST, p.port, [7, 8, 2**40])
    for request_id, reply in zip([7, 8, 2**40], replies, strict=True):
        decoded = decode_with_dubbo_py(reply)
        assert isinstance(decoded, DubboHeartBeatResponse) and decoded.id == request_id
        assert decode_with_dubbo_ssl(reply) == (1, None)  # a heartbeat response with a null body
    # Answered by the proxy: no upstream connection was made, the provider saw nothing.
    assert p.stack.envoy_stat("cluster.v1.upstream_cx_total") == 0
    assert provider.heartbeats == 0 and provider.received == []

    assert call(HOST, p.port, GREETER, "echo", ["before"]) == "before"
    with socket.create_connection((HOST, p.port), timeout=5) as bad:
        bad.sendall(b"\xca\xfe" + bytes(14) + b"not dubbo")  # wrong magic
        leaked = read_until_closed(bad)
    assert leaked == b""  # closed, with nothing (no raw HTTP/2) sent to the client
    assert call(HOST, p.port, GREETER, "echo", ["after"]) == "after"
    assert "bad_request_closing_connection" in p.stack.log("bridge")
    assert methods_seen(provider) == ["echo", "echo"]


def test_example_config_validates():
    result = subprocess.run([sys.executable, "-m", "metabridge.cli", "validate", "-c", "examples/dubbo.yaml"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "examples/dubbo.yaml: OK" in result.stdout
