"""The Dubbo proxy scenarios of test_dubbo_proxy in both modes (``mode``): the bridge process
(ext_proc) and the core inside Envoy (bridge.mode inprocess, docs/inprocess.md)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from dubbo.codec.hessian2 import DubboHeartBeatResponse

from tests.integration.harness import MODES, codec_config, free_port, proxy_factory, read_until_closed, stack_class
from tests.integration.test_dubbo_proxy import ADMIN, DUBBO_CODEC, GREETER, HOST, SERVICE_NOT_FOUND, methods_seen, route
from tests.peers.dubbo_peers import ConsumerError, ConsumerTimeout, call, call_raw, decode_with_dubbo_py, heartbeats_raw, start_provider


@pytest.fixture(params=MODES)
def proxy(request, tmp_path) -> Iterator:
    """proxy(providers={cluster: (interface, name)}, routes=None) in the parametrized mode;
    without routes, examples/dubbo.yaml with its clusters served by the providers."""

    def start_backend(cluster: str, spec: tuple[str, str]):
        interface, name = spec
        return start_provider(interface, name=name)

    stack_cls = stack_class(request.param)
    with proxy_factory(tmp_path, codec="dubbo", ref=DUBBO_CODEC, example="examples/dubbo.yaml", start_backend=start_backend, stack_cls=stack_cls, bridge={"mode": request.param}) as make:
        yield make


def test_routes_by_interface_and_method(proxy):
    p = proxy(
        {"greeter-v1": (GREETER, "greeter-v1"), "greeter-v2": (GREETER, "greeter-v2"), "admin": (ADMIN, "admin")},
        [route("admin", interface=ADMIN), route("greeter-v2", interface=GREETER, method="echo"), route("greeter-v1", interface=GREETER)],
    )
    assert call(HOST, p.port, GREETER, "whoami") == "greeter-v1"
    assert call(HOST, p.port, ADMIN, "whoami") == "admin"
    large = "ü€" * 15_000  # about 75 KB each way: several reads, several HTTP/2 DATA frames
    assert call(HOST, p.port, GREETER, "echo", [large]) == large
    calls = [(GREETER, "echo", [f"m{i}"]) if i % 3 == 0 else (ADMIN, "whoami", []) if i % 3 == 1 else (GREETER, "whoami", []) for i in range(30)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(lambda c: call(HOST, p.port, *c), calls))
    assert answers == [f"m{i}" if i % 3 == 0 else "admin" if i % 3 == 1 else "greeter-v1" for i in range(30)]
    assert methods_seen(p.backends["greeter-v2"]) == ["echo"] * 11


def test_example_config_mutates_and_answers_no_route(proxy):
    p = proxy({"dubbo-v1": (GREETER, "greeter-v1"), "dubbo-v2": (GREETER, "greeter-v2")})
    assert call(HOST, p.port, GREETER, "whoami") == "greeter-v1"
    seen = call(HOST, p.port, GREETER, "attachments", attachments={"x-trace": "t-1"})
    assert seen["x-routed-by"] == "metabridge" and seen["x-trace"] == "t-1"
    with pytest.raises(ConsumerError, match="greeter-v1: boom"):
        call(HOST, p.port, GREETER, "fail", ["boom"])
    with pytest.raises(ConsumerError) as raised:
        call(HOST, p.port, "com.example.Unknown", "whoami", timeout=5)
    assert not isinstance(raised.value, ConsumerTimeout)
    raw = call_raw(HOST, p.port, "com.example.Unknown", "whoami", request_id=41, timeout=5)
    assert (raw.id, raw.status) == (41, SERVICE_NOT_FOUND)
    assert call(HOST, p.port, GREETER, "whoami") == "greeter-v1"


def test_heartbeats_local_and_garbage_closes_only_that_connection(proxy):
    p = proxy({"v1": (GREETER, "greeter-v1")}, [route("v1", interface=GREETER)])
    replies = heartbeats_raw(HOST, p.port, [7, 8])
    assert [decode_with_dubbo_py(r).id for r in replies] == [7, 8]
    assert all(isinstance(decode_with_dubbo_py(r), DubboHeartBeatResponse) for r in replies)
    assert p.stack.envoy_stat("cluster.v1.upstream_cx_total") == 0
    assert call(HOST, p.port, GREETER, "echo", ["before"]) == "before"
    with socket.create_connection((HOST, p.port), timeout=5) as bad:
        bad.sendall(b"\xca\xfe" + bytes(14) + b"not dubbo")
        leaked = read_until_closed(bad)
    assert leaked == b""
    assert call(HOST, p.port, GREETER, "echo", ["after"]) == "after"
    assert "bad_request_closing_connection" in p.stack.log("bridge")


@pytest.mark.parametrize("mode", MODES)
def test_tracing_span_reaches_the_collector(tmp_path, mode):
    """The tracing filter (its exporter thread, OTLP over gRPC) in both modes."""
    from tests.otlp_receiver import OtlpReceiver

    trace_id, consumer_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    with OtlpReceiver() as collector, start_provider(GREETER, name="greeter") as provider:
        port = free_port()
        filters = [{"name": "tracing", "config": {"collector": {"address": collector.address}, "service_name": "metabridge-test", "flush_interval": "100ms"}}]
        cfg = codec_config("dubbo", DUBBO_CODEC, port, {"greeter": provider.port}, [route("greeter", interface=GREETER)], request_timeout="5s", filters=filters)
        cfg.setdefault("bridge", {})["mode"] = mode
        stack = stack_class(mode)(tmp_path, cfg).start()
        try:
            seen = call(HOST, port, GREETER, "attachments", attachments={"traceparent": f"00-{trace_id}-{consumer_span}-01"})
            [span] = collector.wait_for(1)
        finally:
            stack.stop()
    assert (span.name, span.trace_id, span.parent_span_id) == (f"{GREETER}/attachments", trace_id, consumer_span)
    assert seen["traceparent"] == f"00-{trace_id}-{span.span_id}-01"
