"""The tracing filter: traceparent parsing, the sampling decision (parent's flag; client, random
and overall percentages), spans through a connection exported to a test OTLP collector (name,
kind, attributes, parent, status), the trace context written into the upstream request when the
codec carries headers (and not otherwise), export failures, and config errors."""

from __future__ import annotations

import logging

import pytest

from metabridge.core.chain import FilterChain
from metabridge.filters import BUILTIN
from metabridge.filters.tracing import TracingFilter, format_traceparent, parse_traceparent
from tests.otlp_receiver import SERVER, STATUS_ERROR, OtlpReceiver
from tests.unit.connection_harness import HEADER, ROUTES, AwesomeRpcCodec, Harness, encode_frame, in_loop, parse_frames

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


class CarryingCodec(AwesomeRpcCodec):
    """awesomerpc that says it carries headers, with the headers taken from each frame's body
    (``k=v;k=v``) and the mutations its encode was asked to write recorded."""

    carries_headers = True
    mutations: list[dict] = []

    def decode(self, buffer, metadata):
        status = super().decode(buffer, metadata)
        if metadata.frame and metadata.properties.get("cmd") != 0:
            body = metadata.frame[HEADER.size :].decode()
            for item in filter(None, body.split(";")):
                key, _, value = item.partition("=")
                metadata.headers[key] = value
        return status

    def encode(self, metadata, mutation):
        CarryingCodec.mutations.append(dict(mutation))
        return super().encode(metadata, mutation)


def tracing(address: str = "127.0.0.1:1", **config) -> TracingFilter:
    return TracingFilter({"collector": {"address": address, "timeout": "1s"}, "flush_interval": "50ms", **config}, listener="test")


def with_filter(f: TracingFilter, codec=CarryingCodec) -> Harness:
    h = Harness(routes=ROUTES, codec_cls=codec)
    h.runtime.chain = FilterChain((f,), "test", h.stats)
    return h


def answer_all(h: Harness) -> None:
    for sid, data in h.hcm.received.items():
        h.hcm.accept(sid)
        for flow, cmd, _, _ in parse_frames(bytes(data)):
            h.hcm.send(sid, encode_frame(flow, cmd, b"pong"))
    h.write()


def test_traceparent_parsing():
    assert parse_traceparent(TRACEPARENT) == (int(TRACE_ID, 16), int(PARENT_ID, 16), True)
    assert parse_traceparent(f"00-{TRACE_ID}-{PARENT_ID}-00")[2] is False
    assert parse_traceparent(f"01-{TRACE_ID}-{PARENT_ID}-01-future") is not None, "a later version may add fields"
    for bad in (None, "", "garbage", f"00-{'0' * 32}-{PARENT_ID}-01", f"00-{TRACE_ID}-{'0' * 16}-01", f"ff-{TRACE_ID}-{PARENT_ID}-01", f"00-{TRACE_ID}-{PARENT_ID}-01-x", f"00-{TRACE_ID[:-1]}g-{PARENT_ID}-01"):
        assert parse_traceparent(bad) is None, bad
    assert format_traceparent(int(TRACE_ID, 16), int(PARENT_ID, 16)) == TRACEPARENT


def test_sampling_follows_the_parent_then_the_percentages():
    f = tracing(random_sampling=0, client_sampling=100, overall_sampling=100)
    assert f.sampled({}, (1, 2, True)) and not f.sampled({}, (1, 2, False)), "a traceparent's flag decides"
    assert not f.sampled({}, None), "random_sampling 0"
    assert f.sampled({"x-client-trace-id": "abc"}, None), "client_sampling for x-client-trace-id"
    capped = tracing(random_sampling=100, overall_sampling=0)
    assert not capped.sampled({}, None) and not capped.sampled({"x-client-trace-id": "abc"}, None), "overall_sampling caps both"


def test_sampling_percentages_within_statistical_bounds():
    import random

    f = tracing(random_sampling=30, overall_sampling=50)
    f.rand = random.Random(11).random
    traced = sum(f.sampled({}, None) for _ in range(10_000))
    assert 1300 <= traced <= 1700, traced  # 15 % of 10 000; sd ~36


@pytest.mark.parametrize(
    ("config", "problem"),
    [({}, "collector"), ({"collector": {"address": "x:1"}, "random_sampling": 101}, "random_sampling"), ({"collector": {"address": "x:1", "timeout": "0s"}}, "timeout")],
)
def test_bad_config_is_refused(config, problem):
    with pytest.raises(ValueError, match=problem):
        TracingFilter(config, listener="test")


def test_building_the_filter_starts_no_exporter():
    f = tracing()
    assert f.exporter.tracer is None, "validate and the supervisor's check build filters too"
    assert BUILTIN["tracing"] == "metabridge.filters.tracing:TracingFilter"


@in_loop
async def test_spans_reach_the_collector_as_children_of_the_consumers_context():
    CarryingCodec.mutations.clear()
    with OtlpReceiver() as collector:
        f = tracing(collector.address, service_name="bridge-under-test")
        h = with_filter(f)
        h.read(encode_frame(1, 1, f"traceparent={TRACEPARENT};tracestate=vendor=x".encode()) + encode_frame(2, 2) + encode_frame(3, 7, f"traceparent={TRACEPARENT}".encode()))
        answer_all(h)
        assert sorted(flow for flow, *_ in h.client_frames()) == [1, 2, 3]
        spans = {s.attributes["metabridge.request_id"]: s for s in collector.wait_for(3)}
    child, root, refused = spans[1], spans[2], spans[3]
    assert (child.name, child.kind, child.trace_id, child.parent_span_id) == ("cmd1", SERVER, TRACE_ID, PARENT_ID)
    assert child.attributes == {
        "metabridge.listener": "test",
        "metabridge.request_id": 1,
        "metabridge.route": "cmd-1",
        "metabridge.cluster": "c1",
        "metabridge.upstream_host": "127.0.0.1:10001",
        "metabridge.status": "ok",
        "metabridge.attempts": 1,
    }
    assert child.resource["service.name"] == "bridge-under-test" and child.start_ns <= child.end_ns
    assert root.parent_span_id == "" and root.trace_id != TRACE_ID, "no traceparent: a new trace"
    assert (refused.attributes["metabridge.status"], refused.status_code, refused.attributes["metabridge.route"]) == ("route_not_found", STATUS_ERROR, "")
    # What the upstream request carried: the proxy's span as the parent, the consumer's tracestate.
    sent = [m for m in CarryingCodec.mutations if "traceparent" in m]
    assert {m["traceparent"] for m in sent} == {f"00-{child.trace_id}-{child.span_id}-01", f"00-{root.trace_id}-{root.span_id}-01"}
    assert [m.get("tracestate") for m in sent if TRACE_ID in m["traceparent"]] == ["vendor=x"]
    assert f.stats.snapshot() == {"spans": 3, "not_sampled": 0, "export_failures": 0, "spans_lost": 0}


@in_loop
async def test_not_sampled_requests_go_on_untouched():
    CarryingCodec.mutations.clear()
    f = tracing(random_sampling=0)
    h = with_filter(f)
    h.read(encode_frame(1, 1) + encode_frame(2, 1, f"traceparent=00-{TRACE_ID}-{PARENT_ID}-00".encode()))
    answer_all(h)
    assert len(h.client_frames()) == 2
    assert CarryingCodec.mutations == [] and f.stats.not_sampled == 2 and f.exporter.tracer is not None


@in_loop
async def test_a_codec_that_cannot_carry_headers_gets_root_spans_and_no_mutation():
    with OtlpReceiver() as collector:
        f = tracing(collector.address)
        h = with_filter(f, codec=AwesomeRpcCodec)
        h.read(encode_frame(1, 1))
        answer_all(h)
        [span] = collector.wait_for(1)
    assert span.parent_span_id == "" and span.name == "cmd1"
    assert [bytes(d) for d in h.hcm.received.values()] == [encode_frame(1, 1)], "forwarded as it came"


@in_loop
async def test_a_collector_that_is_down_costs_counted_lost_spans_logged_once(caplog):
    import asyncio

    caplog.set_level(logging.INFO, logger="metabridge.filters.tracing")
    f = tracing("127.0.0.1:9")  # nothing listens on the discard port here
    h = with_filter(f)
    for flow in (1, 2):
        h.read(encode_frame(flow, 1))
    answer_all(h)
    assert len(h.client_frames()) == 2, "requests are served whatever the collector does"
    for _ in range(1000):
        if f.exporter.export_failures:
            break
        await asyncio.sleep(0.01)
    assert f.exporter.spans_lost >= 1
    assert [r.getMessage() for r in caplog.records].count("tracing_export_failed") == 1


def test_the_observability_example_validates_and_opens_nothing():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    log = Path("/tmp/metabridge-access.log")  # the example's access log
    existed = log.exists()
    result = subprocess.run([sys.executable, "-m", "metabridge.cli", "validate", "-c", "examples/observability.yaml", "--no-envoy"], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "examples/observability.yaml: OK" in result.stdout
    assert log.exists() == existed, "validate builds the filters but opens no file"
