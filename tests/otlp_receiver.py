"""A test OTLP/gRPC trace collector: a grpcio server implementing
opentelemetry.proto.collector.trace.v1.TraceService (the code opentelemetry-proto ships) that
keeps every span it is sent, with its resource attributes."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    kind: int  # trace_pb2.Span.SpanKind
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    attributes: dict
    resource: dict
    status_code: int  # trace_pb2.Status.StatusCode
    start_ns: int
    end_ns: int


SERVER = trace_pb2.Span.SPAN_KIND_SERVER
STATUS_ERROR = trace_pb2.Status.STATUS_CODE_ERROR


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """``with OtlpReceiver() as r:`` serves on 127.0.0.1:``r.port``; ``r.spans`` is what arrived."""

    def __init__(self, keep: bool = True, port: int = 0, show: bool = False) -> None:
        self.spans: list[ReceivedSpan] = []
        self.keep = keep  # False: count the spans, keep none (a long benchmark)
        self.show = show  # print a line per span
        self.count = 0
        self.exports = 0
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self.address = f"127.0.0.1:{self.port}"

    def __enter__(self) -> OtlpReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop(grace=None)

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context) -> trace_service_pb2.ExportTraceServiceResponse:  # noqa: N802 - the gRPC method's name
        if not self.keep:
            with self._lock:
                self.count += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
                self.exports += 1
            return trace_service_pb2.ExportTraceServiceResponse()
        received = []
        for resource_spans in request.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            name=span.name,
                            kind=span.kind,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            resource=resource,
                            status_code=span.status.code,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                        )
                    )
        if self.show:
            for span in received:
                print(f"span {span.name} trace={span.trace_id} span={span.span_id} parent={span.parent_span_id or '-'} {span.attributes}", flush=True)
        with self._lock:
            self.spans.extend(received)
            self.count += len(received)
            self.exports += 1
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedSpan]:
        """The spans once at least ``count`` have arrived; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.spans) >= count:
                    return list(self.spans)
            time.sleep(0.02)
        raise AssertionError(f"{len(self.spans)} of {count} spans reached the collector within {timeout}s")


def main(argv: list[str] | None = None) -> None:
    """Serve until standard input closes. ``--print``: a line per span (to try a config by
    hand); without it, spans are counted and dropped (bench.inproc --with tracing runs it as a
    separate process, so its CPU is not counted as the bridge's)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m tests.otlp_receiver", description="A test OTLP/gRPC trace collector on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0, help="default: a free port (printed as 'listening 127.0.0.1:PORT')")
    parser.add_argument("--print", dest="show", action="store_true", help="print a line per span received")
    args = parser.parse_args(argv)
    with OtlpReceiver(keep=args.show, port=args.port, show=args.show) as receiver:
        print(f"listening {receiver.address}", flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
