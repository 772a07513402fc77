"""The Thrift codec through a real Envoy and the bridge, between real thriftpy2 clients and servers.

Every proxy test runs in two wire variants: framed transport + binary protocol, and buffered
(unframed) transport + compact protocol; the codec detects the variant per connection. Servers
run on threads of the test process, so tests can see what they received.

Every proxy test also runs in both modes (the ``proxy`` fixture's parameter): the bridge process
behind ext_proc, and the core inside Envoy (bridge.mode inprocess, docs/inprocess.md). Nothing
here is about the bridge as a separate process.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from thriftpy2.thrift import TApplicationException

from tests.integration.harness import MODES, REPO, proxy_factory, read_until_closed, stack_class
from tests.peers.thrift_peers import BUFFERED_COMPACT, FRAMED_BINARY, EchoServer, Variant, client_for, sample_payload

HOST = "127.0.0.1"
THRIFT_CODEC = "codecs/thrift:ThriftCodec"


def method_route(method: str, cluster: str, **headers: str) -> dict:
    matchers = [{"name": "method", "exact": method}] + [{"name": key, "exact": value} for key, value in headers.items()]
    return {"name": f"{method}-to-{cluster}", "match": {"headers": matchers}, "route": {"cluster": cluster}}


@pytest.fixture(params=[FRAMED_BINARY, BUFFERED_COMPACT], ids=lambda v: v.name)
def variant(request) -> Variant:
    return request.param


@pytest.fixture(params=MODES)
def proxy(request, tmp_path) -> Iterator:
    """Factory, in each mode: proxy(servers={cluster: variant}, routes=[...]) runs one EchoServer per cluster
    (named after it) behind a thrift listener; without routes, examples/thrift.yaml's routes and
    options are used with its clusters thrift-v1/thrift-v2 served by the given servers.
    ``.backends`` of what it returns are the servers, by cluster."""

    def start_backend(cluster: str, variant: Variant) -> EchoServer:
        return EchoServer(cluster, variant).start()

    mode = request.param
    with proxy_factory(tmp_path, codec="thrift", ref=THRIFT_CODEC, example="examples/thrift.yaml", start_backend=start_backend, stack_cls=stack_class(mode), bridge={"mode": mode}) as make:
        yield make


def tag_echo(server: EchoServer) -> None:
    """Make ``server`` answer echo(s) with "<name>:<s>", so a test sees which server answered."""
    server.handler.echo = lambda s: f"{server.name}:{s}"



def test_example_routes_by_method_and_answers_the_rest_with_unknown_method(proxy, variant):
    """examples/thrift.yaml: whoami -> thrift-v1, echo -> thrift-v2, anything else has no route."""
    p = proxy({"thrift-v1": variant, "thrift-v2": variant})
    for server in p.backends.values():
        tag_echo(server)
    with client_for(HOST, p.port, variant) as client:
        answers = [client.whoami(), client.echo("héllo"), client.whoami(), client.echo("again")]
        with pytest.raises(TApplicationException) as raised:
            client.ping()
        # A oneway call without a route is dropped with no reply: were one sent, the client
        # would read it as whoami's answer below.
        client.notify("nowhere")
        after = [client.whoami(), client.echo("in step")]
    assert answers == ["thrift-v1", "thrift-v2:héllo", "thrift-v1", "thrift-v2:again"]
    assert raised.value.type == TApplicationException.UNKNOWN_METHOD
    assert raised.value.message == "ROUTE_NOT_FOUND: no route matches ping"
    assert after == ["thrift-v1", "thrift-v2:in step"]
    assert all(server.handler.notifications == [] and server.errors == [] for server in p.backends.values())


def test_oneway_and_large_messages_keep_the_connection_in_step(proxy, variant):
    """Oneway calls reach the server and get no reply; a message of a few hundred KB arrives in
    many reads (walked piecewise when unframed) and comes back whole."""
    routes = [method_route("notify", "v1"), method_route("whoami", "v1"), method_route("echo", "v2"), method_route("mirror", "v2")]
    p = proxy({"v1": variant, "v2": variant}, routes)
    large = sample_payload(7)
    large.text = "é€" * 100_000
    large.numbers = list(range(-20_000, 20_000))
    with client_for(HOST, p.port, variant) as client:
        client.notify("first")
        assert client.whoami() == "v1"
        assert p.backends["v1"].handler.wait_for_notification("first", timeout=5)
        client.notify("second")
        assert client.mirror(large) == large
        client.notify("third")
        assert client.echo("in step") == "in step"
        assert p.backends["v1"].handler.wait_for_notification("third", timeout=5)
    assert p.backends["v1"].handler.notifications == ["first", "second", "third"]
    assert p.backends["v2"].handler.notifications == []


def test_multiplexed_calls_route_on_service(proxy, variant):
    """v2 serves multiplexed (``Echo:whoami``), v1 plain; the ``service`` header tells them apart."""
    multiplexed = Variant(variant.transport, variant.protocol, multiplexed=True)
    p = proxy({"v1": variant, "v2": multiplexed}, [method_route("whoami", "v2", service="Echo"), method_route("whoami", "v1")])
    with client_for(HOST, p.port, multiplexed) as mux, client_for(HOST, p.port, variant) as plain:
        assert mux.whoami() == "v2"
        assert plain.whoami() == "v1"
        with pytest.raises(TApplicationException) as raised:
            mux.echo("no route for Echo:echo")
        mux.notify("no route either")  # oneway: dropped without a reply
        assert mux.whoami() == "v2"
    assert raised.value.type == TApplicationException.UNKNOWN_METHOD
    assert raised.value.message == "ROUTE_NOT_FOUND: no route matches Echo:echo"
    assert p.backends["v2"].handler.notifications == []


def test_garbage_closes_only_that_connection(proxy, variant):
    p = proxy({"v1": variant, "v2": variant}, [method_route("whoami", "v1"), method_route("echo", "v2")])
    with client_for(HOST, p.port, variant) as healthy:
        assert healthy.whoami() == "v1"
        with socket.create_connection((HOST, p.port), timeout=5) as bad:
            bad.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # neither framed nor buffered Thrift
            leaked = read_until_closed(bad)
        assert healthy.echo("still here") == "still here"
        assert healthy.whoami() == "v1"
    assert leaked == b""  # closed, with nothing (no raw HTTP/2) sent to the client
    assert "bad_request_closing_connection" in p.stack.log("bridge")


def test_example_config_validates():
    result = subprocess.run([sys.executable, "-m", "metabridge.cli", "validate", "-c", "examples/thrift.yaml"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "examples/thrift.yaml: OK" in result.stdout
