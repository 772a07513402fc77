"""Prometheus exposition of the per-listener counters (metabridge.stats) and the filters' own
counters, read at scrape time.

Counters stay plain integers on the hot path; this collector turns them into
``metabridge_<name>_total{listener="..."}`` (gauges for the ``*_active`` ones) when scraped.
"""

from __future__ import annotations

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from metabridge.stats import COUNTERS, GAUGES


class ListenerStatsCollector(Collector):
    def __init__(self, runtimes, grpc_stats=None) -> None:
        self._runtimes = runtimes  # name -> ListenerRuntime
        self._grpc_stats = grpc_stats  # the gRPC server's transport counters (GrpcServer.stats)

    def collect(self):
        snapshots = {name: runtime.stats.snapshot() for name, runtime in self._runtimes.items()}
        for counter in COUNTERS:
            family = CounterMetricFamily(f"metabridge_{counter}", f"metabridge {counter.replace('_', ' ')}", labels=["listener"])
            for name, snapshot in snapshots.items():
                family.add_metric([name], snapshot[counter])
            yield family
        for gauge in GAUGES:
            family = GaugeMetricFamily(f"metabridge_{gauge}", f"metabridge {gauge.replace('_', ' ')}", labels=["listener"])
            for name, snapshot in snapshots.items():
                family.add_metric([name], snapshot[gauge])
            yield family
        yield from self._filter_families()
        if self._grpc_stats is not None:
            for counter, value in self._grpc_stats.snapshot().items():
                family = CounterMetricFamily(f"metabridge_grpc_{counter}", f"the bridge's gRPC server: {counter.replace('_', ' ')}")
                family.add_metric([], value)
                yield family

    def _filter_families(self):
        """Each filter's own counters (a ``stats`` with ``snapshot()``), as
        ``metabridge_filter_<filter>_<counter>_total{listener, index}``; ``index`` is the
        filter's place in the chain (a listener may list a filter twice)."""
        families: dict[str, CounterMetricFamily] = {}
        for name, runtime in self._runtimes.items():
            for index, current in enumerate(runtime.chain.filters):
                stats = getattr(current, "stats", None)
                if stats is None or not callable(getattr(stats, "snapshot", None)):
                    continue
                for counter, value in stats.snapshot().items():
                    metric = f"metabridge_filter_{current.name}_{counter}"
                    family = families.get(metric)
                    if family is None:
                        family = families[metric] = CounterMetricFamily(metric, f"{current.name} filter: {counter.replace('_', ' ')}", labels=["listener", "index"])
                    family.add_metric([name, str(index)], value)
        yield from families.values()


def serve_metrics(runtimes, address: str, port: int, grpc_stats=None):
    """Serve /metrics on address:port (Prometheus text format) for these listeners (and the
    gRPC server's own counters)."""
    REGISTRY.register(ListenerStatsCollector(runtimes, grpc_stats))
    server, _thread = start_http_server(port, addr=address)
    return server
