"""The tracing filter through a real Envoy and the bridge, between real Dubbo peers: a
consumer's traceparent (a Dubbo attachment) makes the proxy's span its child, the span reaches
a test OTLP collector with its name and attributes, and the provider receives a traceparent
whose parent is the proxy's span. Both tests run in both bridge modes (ext_proc and inprocess:
the exporter's thread runs inside Envoy)."""

from __future__ import annotations

import pytest

from tests.integration.harness import MODES, codec_config, free_port, stack_class
from tests.otlp_receiver import SERVER, STATUS_ERROR, OtlpReceiver
from tests.peers.dubbo_peers import ConsumerError, call, start_provider

HOST = "127.0.0.1"
GREETER = "com.example.Greeter"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CONSUMER_SPAN = "b7ad6b7169203331"


@pytest.fixture(params=MODES)
def traced(tmp_path, request):
    """A dubbo listener with the tracing filter in front of one provider, and the collector."""
    with OtlpReceiver() as collector, start_provider(GREETER, name="greeter") as provider:
        port = free_port()
        routes = [{"name": "greeter", "match": {"headers": [{"name": "interface", "exact": GREETER}]}, "route": {"cluster": "greeter"}}]
        filters = [{"name": "tracing", "config": {"collector": {"address": collector.address}, "service_name": "metabridge-test", "flush_interval": "100ms"}}]
        cfg = codec_config("dubbo", "codecs/dubbo:DubboCodec", port, {"greeter": provider.port}, routes, request_timeout="5s", filters=filters)
        stack = stack_class(request.param)(tmp_path, cfg).start()
        try:
            yield port, collector, provider
        finally:
            stack.stop()


def test_the_proxy_span_joins_the_consumers_trace_and_the_provider_gets_the_proxys_context(traced):
    port, collector, provider = traced
    seen = call(HOST, port, GREETER, "attachments", attachments={"traceparent": f"00-{TRACE_ID}-{CONSUMER_SPAN}-01", "tracestate": "congo=t61rcWkgMzE"})
    [span] = collector.wait_for(1)

    assert (span.name, span.kind, span.trace_id, span.parent_span_id) == (f"{GREETER}/attachments", SERVER, TRACE_ID, CONSUMER_SPAN)
    assert span.resource["service.name"] == "metabridge-test"
    attributes = span.attributes
    assert (attributes["metabridge.listener"], attributes["metabridge.route"], attributes["metabridge.cluster"]) == ("dubbo", "greeter", "greeter")
    assert attributes["metabridge.upstream_host"] == f"127.0.0.1:{provider.port}"
    assert (attributes["metabridge.status"], attributes["metabridge.attempts"]) == ("ok", 1)
    assert attributes["metabridge.request_id"] == provider.received[-1].request_id
    assert span.start_ns < span.end_ns

    # What the provider saw (it answers attachments() with them): the same trace, the proxy's
    # span as the parent, and the consumer's tracestate passed on.
    assert seen["traceparent"] == f"00-{TRACE_ID}-{span.span_id}-01"
    assert seen["tracestate"] == "congo=t61rcWkgMzE"
    assert provider.received[-1].attachments["traceparent"] == seen["traceparent"]


def test_without_a_traceparent_the_proxy_starts_the_trace_and_local_replies_are_errors(traced):
    port, collector, provider = traced
    seen = call(HOST, port, GREETER, "attachments")
    [root] = collector.wait_for(1)
    assert root.parent_span_id == "" and root.trace_id != TRACE_ID
    assert seen["traceparent"] == f"00-{root.trace_id}-{root.span_id}-01", "the provider's parent is the proxy's new span"

    with pytest.raises(ConsumerError, match="no route"):
        call(HOST, port, "com.example.Unknown", "whoami", attachments={"traceparent": f"00-{TRACE_ID}-{CONSUMER_SPAN}-01"})
    refused = next(s for s in collector.wait_for(2) if s.name == "com.example.Unknown/whoami")
    assert (refused.trace_id, refused.parent_span_id) == (TRACE_ID, CONSUMER_SPAN)
    assert (refused.attributes["metabridge.status"], refused.status_code, refused.attributes["metabridge.cluster"]) == ("route_not_found", STATUS_ERROR, "")
    assert [r.method for r in provider.received] == ["attachments"], "the refused call never reached the provider"
