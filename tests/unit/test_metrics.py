"""bridge/metrics.py: listener counters and filters' own counters as Prometheus families."""

from __future__ import annotations

from pathlib import Path

from metabridge.config.model import load
from metabridge.core.runtime import build_runtimes
from metabridge.metrics import ListenerStatsCollector

REPO = Path(__file__).resolve().parents[2]


def samples(runtimes) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in ListenerStatsCollector(runtimes).collect():
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_filters_counters_are_exported_per_listener_and_place_in_the_chain():
    runtimes = build_runtimes(load(REPO / "examples" / "governance.yaml"))
    listener, runtime = next(iter(runtimes.items()))
    limiter_index = next(i for i, f in enumerate(runtime.chain.filters) if f.name == "local_ratelimit")
    limiter = runtime.chain.filters[limiter_index]
    counter = next(iter(limiter.stats.snapshot()))
    setattr(limiter.stats, counter, 7)
    got = samples(runtimes)
    key = (f"metabridge_filter_local_ratelimit_{counter}_total", (("index", str(limiter_index)), ("listener", listener)))
    assert got[key] == 7
    assert got[("metabridge_request_total", (("listener", listener),))] == 0


def test_the_grpc_servers_counters_are_exported():
    from metabridge.transport.grpc_server import GrpcStats

    stats = GrpcStats()
    stats.streams_reset = 3
    got = {}
    for family in ListenerStatsCollector({}, stats).collect():
        for sample in family.samples:
            got[sample.name] = sample.value
    assert got["metabridge_grpc_streams_reset_total"] == 3 and got["metabridge_grpc_connections_total"] == 0
