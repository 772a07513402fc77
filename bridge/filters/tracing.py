"""The tracing filter (``tracing``): an OpenTelemetry span per request, exported over OTLP/gRPC.

    filters:
      - name: tracing
        config:
          collector: {address: "127.0.0.1:4317", timeout: 5s}   # OTLP/gRPC (or unix:/path)
          service_name: metabridge        # the spans' resource service.name
          random_sampling: 100            # % of requests without a trace context that are traced
          client_sampling: 100            # % of requests with an x-client-trace-id header traced
          overall_sampling: 100           # upper bound on the two above
          flush_interval: 1s              # the batch processor's schedule delay
          max_queue_size: 2048            # spans waiting for export; past it the SDK drops them

One span per request, named by its operation (the codec's ``operation_name``), of kind SERVER:
it is the proxy serving the consumer's call, from decode to the reply being queued, with the
upstream call inside it. Its attributes say where the request went (listener, route, cluster,
upstream host), how it ended (``metabridge.status``: the access log's outcome) and its request
id. Spans are handed to the SDK's BatchSpanProcessor, whose thread exports them in batches:
the event loop never waits for the collector.

Trace context is W3C ``traceparent``/``tracestate`` in the request's headers. When the codec
``carries_headers`` (Dubbo: attachments), a consumer's ``traceparent`` makes the span its child,
and the span's own context is written into the upstream request (``request.request_mutation``)
so the provider's span is the proxy's child. With a ``traceparent``, its sampled flag decides
(as OpenTelemetry's parent-based sampling, and Envoy's OpenTelemetry tracer, do); without one,
the reference's percentages do: ``client_sampling`` for requests with ``x-client-trace-id``,
``random_sampling`` for others, then ``overall_sampling`` caps both. A request not traced is
forwarded untouched. See docs/tracing.md.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from metabridge.config.model import parse_duration
from metabridge.config.schema import DURATION
from metabridge.filters.access_log import outcome
from metabridge.filters.local_ratelimit import check_config
from metabridge.logs import event
from metabridge.sdk.filter import Filter, FilterStatus

log = logging.getLogger("metabridge.filters.tracing")

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
CLIENT_TRACE_ID = "x-client-trace-id"
_FINE = frozenset(("ok", "oneway"))  # outcomes whose span status stays UNSET

_PERCENTAGE = {"type": "number", "minimum": 0, "maximum": 100}
CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["collector"],
    "properties": {
        "collector": {
            "type": "object",
            "additionalProperties": False,
            "required": ["address"],
            "properties": {"address": {"type": "string", "minLength": 1}, "timeout": {"type": "string", "pattern": DURATION}},
        },
        "service_name": {"type": "string", "minLength": 1},
        "random_sampling": _PERCENTAGE,
        "client_sampling": _PERCENTAGE,
        "overall_sampling": _PERCENTAGE,
        "flush_interval": {"type": "string", "pattern": DURATION},
        "max_queue_size": {"type": "integer", "minimum": 1},
    },
}


class Exporter:
    """The process's OTLP exporter for one collector and service, started at first use; counts
    what it could not deliver."""

    def __init__(self, address: str, timeout: float, service_name: str, flush_interval: float, max_queue_size: int) -> None:
        self.address = address
        self.timeout = timeout
        self.service_name = service_name
        self.flush_interval = flush_interval
        self.max_queue_size = max_queue_size
        self.export_failures = 0
        self.spans_lost = 0
        self.tracer = None
        self._lock = threading.Lock()
        self._failing = False

    def start(self):
        """The SDK tracer; the provider, its batch processor's thread and the gRPC channel are
        made here, in the process that serves requests (not when the filter is built)."""
        with self._lock:
            if self.tracer is None:
                sdk = _sdk()
                # The exporter logs every retry of a failing export; exported() logs it once.
                logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter").setLevel(logging.ERROR)
                otlp = sdk.OTLPSpanExporter(endpoint=self.address, insecure=True, timeout=self.timeout)
                provider = sdk.TracerProvider(sampler=sdk.ALWAYS_ON, resource=sdk.Resource.create({"service.name": self.service_name}))
                batches = sdk.BatchSpanProcessor(
                    _counting(otlp, self), max_queue_size=self.max_queue_size, schedule_delay_millis=self.flush_interval * 1000, max_export_batch_size=min(512, self.max_queue_size)
                )
                provider.add_span_processor(batches)
                self.tracer = provider.get_tracer("metabridge")
        return self.tracer

    def exported(self, ok: bool, spans: int) -> None:
        if not ok:
            self.export_failures += 1
            self.spans_lost += spans
            if not self._failing:  # logged once until an export succeeds again
                self._failing = True
                event(log, logging.ERROR, "tracing_export_failed", collector=self.address, spans_lost=spans)
        elif self._failing:
            self._failing = False
            event(log, logging.INFO, "tracing_export_recovered", collector=self.address, export_failures=self.export_failures)


class _Sdk:
    """The OpenTelemetry names the filter uses, imported once (the packages are the optional
    extra ``tracing``)."""

    def __init__(self) -> None:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
        from opentelemetry.sdk.trace.sampling import ALWAYS_ON

        self.OTLPSpanExporter, self.Resource, self.TracerProvider, self.BatchSpanProcessor, self.ALWAYS_ON = OTLPSpanExporter, Resource, TracerProvider, BatchSpanProcessor, ALWAYS_ON
        self.SpanExporter, self.SpanExportResult = SpanExporter, SpanExportResult
        self.SERVER, self.NonRecordingSpan, self.SpanContext, self.TraceState = trace.SpanKind.SERVER, trace.NonRecordingSpan, trace.SpanContext, trace.TraceState
        self.SAMPLED, self.set_span_in_context, self.Status, self.ERROR = trace.TraceFlags(trace.TraceFlags.SAMPLED), trace.set_span_in_context, trace.Status, trace.StatusCode.ERROR


_loaded: list[_Sdk] = []


def _sdk() -> _Sdk:
    if not _loaded:
        try:
            _loaded.append(_Sdk())
        except ImportError as exc:
            raise ValueError(f"needs the OpenTelemetry SDK and OTLP exporter (pip install 'metabridge[tracing]'): {exc}") from None
    return _loaded[0]


_counting_class = None


def _counting(inner, owner: Exporter):
    """``inner`` (the OTLP exporter) wrapped to tell ``owner`` how each export went."""
    global _counting_class
    if _counting_class is None:
        sdk = _sdk()

        class Counting(sdk.SpanExporter):
            def __init__(self, inner, owner: Exporter) -> None:
                self.inner = inner
                self.owner = owner

            def export(self, spans: Sequence):
                try:
                    result = self.inner.export(spans)
                except Exception:  # noqa: BLE001 - counted and logged as a failed export
                    result = sdk.SpanExportResult.FAILURE
                self.owner.exported(result is sdk.SpanExportResult.SUCCESS, len(spans))
                return result

            def shutdown(self) -> None:
                self.inner.shutdown()

            def force_flush(self, timeout_millis: int = 30000) -> bool:
                return self.inner.force_flush(timeout_millis)

        _counting_class = Counting
    return _counting_class(inner, owner)


_exporters: dict[tuple, Exporter] = {}


def exporter_for(address: str, timeout: float, service_name: str, flush_interval: float, max_queue_size: int) -> Exporter:
    """One exporter per collector and settings in a process: the listeners' filters, and those a
    reload builds, share it."""
    key = (address, timeout, service_name, flush_interval, max_queue_size)
    exporter = _exporters.get(key)
    if exporter is None:
        exporter = _exporters[key] = Exporter(*key)
    return exporter


def parse_traceparent(value: str | None) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a W3C traceparent, or None when it is not valid."""
    if not value or len(value) < 55:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2 or parts[0] == "ff":
        return None
    if parts[0] == "00" and len(parts) != 4:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
        int(parts[0], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(flags & 1)


def format_traceparent(trace_id: int, span_id: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-01"


class TracingStats:
    __slots__ = ("spans", "not_sampled", "_exporter")

    def __init__(self, exporter: Exporter) -> None:
        self.spans = 0  # started (and ended, once their request completes)
        self.not_sampled = 0
        self._exporter = exporter

    def snapshot(self) -> dict[str, int]:
        # The exporter's counts: filters sharing a collector report the same.
        return {"spans": self.spans, "not_sampled": self.not_sampled, "export_failures": self._exporter.export_failures, "spans_lost": self._exporter.spans_lost}


class TracingFilter(Filter):
    name = "tracing"

    def __init__(self, config: Mapping[str, Any], *, listener: str, rand: Callable[[], float] = random.random) -> None:
        super().__init__(config, listener=listener)
        check_config(config, CONFIG_SCHEMA)
        collector = config["collector"]
        timeout = parse_duration(collector.get("timeout", "5s"))
        flush_interval = parse_duration(config.get("flush_interval", "1s"))
        if timeout <= 0 or flush_interval <= 0:
            raise ValueError("collector.timeout and flush_interval must be more than 0s")
        self.random_sampling = float(config.get("random_sampling", 100)) / 100
        self.client_sampling = float(config.get("client_sampling", 100)) / 100
        self.overall_sampling = float(config.get("overall_sampling", 100)) / 100
        self.rand = rand
        self.exporter = exporter_for(collector["address"], timeout, config.get("service_name", "metabridge"), flush_interval, int(config.get("max_queue_size", 2048)))
        self.stats = TracingStats(self.exporter)
        self._sdk = _sdk()  # imported now: a missing package is a config error, not a first request's wait
        self._tracer = None
        self._carries = False  # the listener's codec's carries_headers, read at the first request

    def sampled(self, headers: Mapping[str, str], parent: tuple[int, int, bool] | None) -> bool:
        """Whether to trace this request: the parent's flag, else the reference's percentages."""
        if parent is not None:
            return parent[2]
        share = self.client_sampling if CLIENT_TRACE_ID in headers else self.random_sampling
        if share < 1 and self.rand() >= share:
            return False
        return self.overall_sampling >= 1 or self.rand() < self.overall_sampling

    def _start(self, request) -> None:
        self._tracer = self.exporter.start()
        self._carries = bool(getattr(request.connection.listener.codec_cls, "carries_headers", False))

    def on_request(self, request) -> FilterStatus:
        if self._tracer is None:
            self._start(request)
        headers = request.metadata.headers
        parent = parse_traceparent(headers.get(TRACEPARENT)) if self._carries else None
        if not self.sampled(headers, parent):
            self.stats.not_sampled += 1
            return FilterStatus.CONTINUE
        sdk = self._sdk
        context = None
        state = headers.get(TRACESTATE) if parent is not None else None
        if parent is not None:
            remote = sdk.SpanContext(parent[0], parent[1], is_remote=True, trace_flags=sdk.SAMPLED, trace_state=_trace_state(sdk.TraceState, state))
            context = sdk.set_span_in_context(sdk.NonRecordingSpan(remote))
        # The span starts when the request was decoded (the core clock is monotonic: convert).
        started = time.time_ns() - int((request.connection.clock.now() - request.received) * 1e9)
        metadata = request.metadata
        span = self._tracer.start_span(
            metadata.operation_name or self.listener,
            context=context,
            kind=sdk.SERVER,
            start_time=started,
            attributes={"metabridge.listener": self.listener} if metadata.request_id is None else {"metabridge.listener": self.listener, "metabridge.request_id": metadata.request_id},
        )
        request.state[self.name] = span
        if self._carries:
            own = span.get_span_context()
            mutation = {TRACEPARENT: format_traceparent(own.trace_id, own.span_id)}
            if state:
                mutation[TRACESTATE] = state
            request.request_mutation = {**request.request_mutation, **mutation} if request.request_mutation else mutation
        self.stats.spans += 1
        return FilterStatus.CONTINUE

    def on_complete(self, request) -> None:
        span = request.state.pop(self.name, None)
        if span is None:
            return
        status = outcome(request)
        route = request.route
        span.set_attributes(
            {
                "metabridge.route": route.name if route is not None else "",
                "metabridge.cluster": request.cluster,
                "metabridge.upstream_host": request.upstream_host,
                "metabridge.status": status,
                "metabridge.attempts": request.attempt,
            }
        )
        if status not in _FINE:
            span.set_status(self._sdk.Status(self._sdk.ERROR, status))
        now = request.connection.clock.now()
        span.end(end_time=time.time_ns() - int((now - (request.replied or now)) * 1e9))


def _trace_state(TraceState, header: str | None):
    """The consumer's tracestate, kept as it came when the SDK can read it."""
    if not header:
        return None
    try:
        return TraceState.from_header([header])
    except Exception:  # noqa: BLE001 - an unreadable tracestate is dropped, as W3C says
        return None
