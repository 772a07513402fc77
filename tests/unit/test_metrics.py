"""bridge/stats.py, bridge/metrics.py, bridge/admin.py: the counters, the request_time_ms
histogram, the collector's families and labels, the merge of worker snapshots, and the admin
endpoint's answers."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from metabridge.admin import REDACTED, LocalAdmin, SupervisorAdmin, config_dump, redact, serve_admin, serve_worker_socket
from metabridge.config.model import load
from metabridge.core.runtime import build_runtimes
from metabridge.metrics import BridgeCollector, MergedCollector, families_snapshot
from metabridge.stats import TIME_BOUNDS_MS, ListenerStats, RouteStats
from metabridge.transport.grpc_server import GrpcStats
from tests.unit.connection_harness import ROUTE_NOT_FOUND, TIMEOUT, Harness, encode_frame, in_loop, wait_until

REPO = Path(__file__).resolve().parents[2]


def samples(collector) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in collector.collect():
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def route_labels(listener: str, route: str, cluster: str, **extra) -> tuple:
    return tuple(sorted({"listener": listener, "route": route, "cluster": cluster, **extra}.items()))


def test_filters_counters_are_exported_per_listener_and_place_in_the_chain():
    runtimes = build_runtimes(load(REPO / "examples" / "governance.yaml"))
    listener, runtime = next(iter(runtimes.items()))
    limiter_index = next(i for i, f in enumerate(runtime.chain.filters) if f.name == "local_ratelimit")
    limiter = runtime.chain.filters[limiter_index]
    limiter.stats.rate_limited = 7
    got = samples(BridgeCollector(runtimes))
    key = ("metabridge_filter_local_ratelimit_rate_limited_total", (("index", str(limiter_index)), ("listener", listener)))
    assert got[key] == 7
    assert got[("metabridge_rate_limited_total", (("listener", listener),))] == 7
    assert got[("metabridge_request_total", (("listener", listener),))] == 0


def test_a_filters_active_count_is_a_gauge():
    runtimes = build_runtimes(load(REPO / "examples" / "governance.yaml"))
    listener, runtime = next(iter(runtimes.items()))
    index, fault = next((i, f) for i, f in enumerate(runtime.chain.filters) if f.name == "fault")
    fault.stats.active_faults = 2
    families = {family.name: family for family in BridgeCollector(runtimes).collect()}
    assert families["metabridge_filter_fault_active_faults"].type == "gauge"
    assert families["metabridge_filter_fault_active_faults"].samples[0].value == 2
    assert families["metabridge_filter_fault_delays_injected"].type == "counter"


def test_the_grpc_servers_counters_are_exported():
    stats = GrpcStats()
    stats.streams_reset = 3
    got = {sample.name: sample.value for family in BridgeCollector({}, stats).collect() for sample in family.samples}
    assert got["metabridge_grpc_streams_reset_total"] == 3 and got["metabridge_grpc_connections_total"] == 0


def test_histogram_buckets_are_inclusive_upper_bounds_and_cumulative():
    stats = RouteStats()
    for ms in (0.05, 0.1, 0.3, 7.0, 10.0, 60000.0, 90000.0):
        stats.observe(ms)
    # le is inclusive: 0.1 goes in the 0.1 bucket, 10.0 in the 10 bucket, 90 s past the last bound.
    assert stats.buckets[0] == 2 and stats.buckets[TIME_BOUNDS_MS.index(0.5)] == 1
    assert stats.buckets[TIME_BOUNDS_MS.index(10.0)] == 2 and stats.buckets[-2] == 1 and stats.buckets[-1] == 1
    runtimes = {"l": _runtime_with(stats)}
    got = samples(BridgeCollector(runtimes))
    bucket = lambda le: got[("metabridge_request_time_ms_bucket", route_labels("l", "r", "c", le=le))]  # noqa: E731
    assert [bucket("0.1"), bucket("0.25"), bucket("0.5"), bucket("5"), bucket("10"), bucket("60000"), bucket("+Inf")] == [2, 2, 3, 3, 5, 6, 7]
    assert got[("metabridge_request_time_ms_count", route_labels("l", "r", "c"))] == 7
    assert abs(got[("metabridge_request_time_ms_sum", route_labels("l", "r", "c"))] - 150017.45) < 1e-6


class _Runtime:
    def __init__(self, stats) -> None:
        self.stats = stats
        self.chain = type("Chain", (), {"filters": ()})()


def _runtime_with(route_stats: RouteStats) -> _Runtime:
    stats = ListenerStats()
    stats.routes[("r", "c")] = route_stats
    return _Runtime(stats)


@in_loop
async def test_outcomes_are_counted_per_route_and_cluster_with_their_time():
    h = Harness(request_timeout=0.05)
    h.read(encode_frame(1, 1, b"a") + encode_frame(2, 2, b"b") + encode_frame(3, 9, b"no route"))
    h.hcm.accept(1)
    h.hcm.send(1, encode_frame(1, 1, b"ok"))
    h.write()
    await wait_until(lambda: h.stats.local_response_timeout == 1, "the timeout")  # cmd 2 on c2 gets no answer
    got = samples(BridgeCollector({"test": h.runtime}))
    assert got[("metabridge_response_success_total", route_labels("test", "cmd-1", "c1"))] == 1
    assert got[("metabridge_local_response_timeout_total", route_labels("test", "cmd-2", "c2"))] == 1
    assert got[("metabridge_local_response_route_not_found_total", route_labels("test", "", ""))] == 1
    # Every answered two-way request is timed: the response, the timeout (>= 50 ms), the no-route reply.
    assert got[("metabridge_request_time_ms_count", route_labels("test", "cmd-1", "c1"))] == 1
    assert got[("metabridge_request_time_ms_bucket", route_labels("test", "cmd-2", "c2", le="25"))] == 0
    assert got[("metabridge_request_time_ms_bucket", route_labels("test", "cmd-2", "c2", le="100"))] == 1
    assert got[("metabridge_request_time_ms_count", route_labels("test", "", ""))] == 1
    assert got[("metabridge_request_total", (("listener", "test"),))] == 3
    assert h.client_frames()[-1][2] == TIMEOUT and ROUTE_NOT_FOUND in [frame[2] for frame in h.client_frames()]


@in_loop
async def test_a_client_leaving_with_requests_in_flight_is_counted():
    h = Harness()
    h.read(encode_frame(1, 1, b"a"))
    h.session.close()
    assert h.stats.cx_destroy_remote_with_active_rq == 1 and h.stats.cx_destroy_local_with_active_rq == 0


def _snapshot(pid: int, requests: int, active: int) -> dict:
    stats = ListenerStats()
    stats.request = requests
    stats.request_active = active
    stats.route("r", "c").observe(1.0)
    return {"pid": pid, "ready": True, "families": families_snapshot(BridgeCollector({"l": _Runtime(stats)}))}


def test_merged_workers_sum_and_never_go_backwards_when_a_worker_restarts():
    replies = [_snapshot(100, 5, 1), _snapshot(200, 7, 2)]
    merged = MergedCollector(lambda: replies)
    first = samples(merged)
    request, active = ("metabridge_request_total", (("listener", "l"),)), ("metabridge_request_active", (("listener", "l"),))
    count = ("metabridge_request_time_ms_count", route_labels("l", "r", "c"))
    assert (first[request], first[active], first[count]) == (12, 3, 2)
    replies[0] = None  # worker 0 does not answer: its last counters stay, its gauge goes
    second = samples(merged)
    assert (second[request], second[active]) == (12, 2)
    replies[0] = _snapshot(101, 1, 0)  # restarted with fresh counters: the old process's are carried
    third = samples(merged)
    assert (third[request], third[active], third[count]) == (13, 2, 3)


def test_the_merged_exposition_parses_as_prometheus_text():
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedCollector(lambda: [_snapshot(1, 2, 0), _snapshot(2, 3, 0)]))
    families = {family.name: family for family in text_string_to_metric_families(generate_latest(registry).decode())}
    assert families["metabridge_request"].samples[0].value == 5
    assert families["metabridge_request_time_ms"].type == "histogram"


def test_config_dump_redacts_secret_looking_option_keys():
    assert redact({"api_key": "k", "nested": {"password": "p", "user": "u"}, "list": [{"auth_token": "t"}]}) == {
        "api_key": REDACTED,
        "nested": {"password": REDACTED, "user": "u"},
        "list": [{"auth_token": REDACTED}],
    }
    config = load(REPO / "examples" / "governance.yaml")
    runtimes = build_runtimes(config)
    runtimes["awesomerpc"].config.filters[0].config["auth_token"] = "s3cret"  # as if the file had it
    dump = json.loads(json.dumps(config_dump(config, runtimes)))
    assert [listener["name"] for listener in dump["listeners"]] == list(runtimes)
    assert dump["listeners"][0]["routes"] and dump["clusters"]
    assert dump["listeners"][0]["filters"][0]["config"]["auth_token"] == REDACTED and "s3cret" not in json.dumps(dump)


def test_config_dump_shows_the_clusters_a_live_change_left_in_force(tmp_path):
    from metabridge.core.runtime import apply_config
    from tests.unit.test_live_config import write_config

    path = tmp_path / "c.yaml"
    write_config(path, {"v1": [2001], "v2": [2002]}, {1: "v1"})
    config = load(path)
    runtimes = build_runtimes(config)
    write_config(path, {"v1": [2001, 2003], "v3": [2004]}, {1: "v3"})
    assert apply_config(runtimes, load(path), envoy_follows=True)
    dump = config_dump(config, runtimes)
    assert sorted(dump["clusters"]) == ["v1", "v3"]
    assert [e["port"] for e in dump["clusters"]["v1"]["endpoints"]] == [2001, 2003]


class _Server:
    stopping = False
    stats = GrpcStats()


def test_admin_endpoints_over_http_and_a_workers_socket(tmp_path):
    config = load(REPO / "examples" / "awesomerpc.yaml")
    runtimes = build_runtimes(config)
    runtimes["awesomerpc"].stats.request = 4
    server = _Server()
    admin = LocalAdmin(config, runtimes, server)
    http, port = serve_admin(admin, "127.0.0.1", 0)
    worker = serve_worker_socket(admin, str(tmp_path / "w.sock"))
    supervisor, supervisor_port = serve_admin(SupervisorAdmin([str(tmp_path / "w.sock"), str(tmp_path / "missing.sock")]), "127.0.0.1", 0)
    try:
        get = lambda p, path: urllib.request.urlopen(f"http://127.0.0.1:{p}{path}", timeout=5)  # noqa: E731
        assert get(port, "/ready").status == 200
        assert 'metabridge_request_total{listener="awesomerpc"} 4.0' in get(port, "/metrics").read().decode()
        routes = json.load(get(port, "/routes"))["listeners"]["awesomerpc"]["routes"]
        assert [r["name"] for r in routes] == [r.name for r in config.listener("awesomerpc").routes]
        assert json.load(get(port, "/config_dump"))["listeners"][0]["name"] == "awesomerpc"
        # The supervisor: worker 1 never answers, so it is not ready; the metrics are worker 0's.
        try:
            get(supervisor_port, "/ready")
            raise AssertionError("/ready answered 200 with a worker missing")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503 and "worker(s) 1 of 2" in exc.read().decode()
        assert 'metabridge_request_total{listener="awesomerpc"} 4.0' in get(supervisor_port, "/metrics").read().decode()
        assert json.load(get(supervisor_port, "/routes"))["listeners"]["awesomerpc"]["routes"] == routes
        server.stopping = True
        try:
            get(port, "/ready")
            raise AssertionError("/ready answered 200 while stopping")
        except urllib.error.HTTPError as exc:
            assert exc.code == 503
        # POST actions exist only where the admin has them (in-process: Envoy owns the signals).
        for path in ("/reload", "/reopen_logs", "/nothing"):
            try:
                urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST"), timeout=5)
                raise AssertionError(f"POST {path} answered 200 on a bridge process's admin")
            except urllib.error.HTTPError as exc:
                assert exc.code == 404
    finally:
        for running in (http, worker, supervisor):
            running.shutdown()
            running.server_close()
