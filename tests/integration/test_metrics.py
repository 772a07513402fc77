"""The admin endpoint through a real Envoy: /metrics values with their listener, route and
cluster labels after real traffic, /ready, /config_dump, /routes following a SIGHUP reload, and
with two worker processes one scrape that counts every worker's requests.

The first test runs in both bridge modes: in-process the admin endpoint is served from inside
Envoy with the same names, it has no metabridge_grpc_* families (no gRPC server), and the reload
is POST /reload instead of SIGHUP. What does not apply in-process:
- one scrape over two workers: it needs bridge worker processes (bridge.workers) and Envoy's bridge cluster.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from examples.awesomerpc.client import AwesomeRpcClient
from metabridge.config import bootstrap as envoy_config
from tests.integration.both_modes import core_process, in_process, reload
from tests.integration.harness import MODES, Stack, awesomerpc_config, cmd_route, free_port, port_open, run_async, stack_class, wait_until

ROUTE_NOT_FOUND = 404  # awesomerpc's rsp_code for a ROUTE_NOT_FOUND reply


def get(port: int, path: str):
    return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    text = get(port, "/metrics").read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def labels(route: str = "", cluster: str = "", **extra) -> tuple:
    # route "" and cluster "": answered before routing (Prometheus itself drops empty labels).
    return tuple(sorted({"listener": "awesomerpc", "route": route, "cluster": cluster, **extra}.items()))


def make_stack(tmp_path, routes, mode: str = "ext_proc", **bridge) -> Stack:
    ports = {"v1": free_port(), "v2": free_port()}
    cfg = awesomerpc_config(free_port(), ports, routes)
    cfg["bridge"] = {"metrics_port": free_port(), **bridge}
    stack = stack_class(mode)(tmp_path, cfg, ports)
    stack.listen_port = cfg["listeners"][0]["port"]
    stack.metrics_port = cfg["bridge"]["metrics_port"]
    return stack


async def calls(port: int, cmds: list[int]) -> list:
    async with await AwesomeRpcClient.connect("127.0.0.1", port) as client:
        return [await client.call(cmd, b"m") for cmd in cmds]


SPLIT = {"name": "split", "match": {"headers": [{"name": "cmd", "exact": "2"}]}, "route": {"weighted_clusters": [{"name": "v1", "weight": 50}, {"name": "v2", "weight": 50}]}}


@pytest.mark.parametrize("mode", MODES)
def test_metrics_carry_listener_route_and_cluster_and_the_admin_endpoints_answer(tmp_path, mode):
    stack = make_stack(tmp_path, [cmd_route(1, "v1"), SPLIT], mode)
    try:
        stack.start()
        wait_until(lambda: port_open(stack.metrics_port), 10, "the admin endpoint", core_process(stack))
        assert get(stack.metrics_port, "/ready").status == 200
        # In-process a connection counts at accept, so the harness's one probe of the listener
        # counts (once Envoy's worker has accepted it); in the ext_proc mode at its first bytes
        # (the probe sent none).
        cx_before = 1 if in_process(stack) else 0
        cx_total = ("metabridge_downstream_cx_total", (("listener", "awesomerpc"),))
        wait_until(lambda: scrape(stack.metrics_port)[cx_total] == cx_before, 10, f"{cx_before} connection(s) counted before the traffic")

        replies = run_async(calls(stack.listen_port, [1] * 5 + [2] * 40 + [9]))
        assert [r.rsp_code for r in replies] == [0] * 45 + [ROUTE_NOT_FOUND]
        m = scrape(stack.metrics_port)
        listener = (("listener", "awesomerpc"),)
        assert m[("metabridge_request_total", listener)] == 46
        assert m[("metabridge_request_twoway_total", listener)] == 46
        assert m[("metabridge_request_active", listener)] == 0
        assert m[("metabridge_downstream_cx_total", listener)] == cx_before + 1
        assert m[("metabridge_response_success_total", labels("cmd1", "v1"))] == 5
        split = [m[("metabridge_response_success_total", labels("split", cluster))] for cluster in ("v1", "v2")]
        assert sum(split) == 40 and min(split) > 0, f"the 50/50 split should reach both clusters: {split}"
        assert m[("metabridge_local_response_route_not_found_total", labels())] == 1
        assert m[("metabridge_local_response_timeout_total", labels("cmd1", "v1"))] == 0
        # request_time_ms: one observation per answered request, in the (route, cluster) it went to.
        assert m[("metabridge_request_time_ms_count", labels("cmd1", "v1"))] == 5
        assert m[("metabridge_request_time_ms_bucket", labels("cmd1", "v1", le="+Inf"))] == 5
        assert m[("metabridge_request_time_ms_bucket", labels("cmd1", "v1", le="1000"))] == 5
        assert m[("metabridge_request_time_ms_sum", labels("cmd1", "v1"))] > 0
        assert sum(m[("metabridge_request_time_ms_count", labels("split", c))] for c in ("v1", "v2")) == 40
        assert m[("metabridge_request_time_ms_count", labels())] == 1
        if in_process(stack):
            assert not [name for name, _ in m if name.startswith("metabridge_grpc_")], "no gRPC server inside Envoy"
        else:
            assert m[("metabridge_grpc_connections_total", ())] >= 1

        dump = json.load(get(stack.metrics_port, "/config_dump"))
        assert dump["metrics_port"] == stack.metrics_port and [c for c in dump["clusters"]] == ["v1", "v2"]
        assert [r["name"] for r in dump["listeners"][0]["routes"]] == ["cmd1", "split"]

        # /routes is the live table: after a reload (SIGHUP; in-process POST /reload) with cmd 1
        # pointed at v2 it shows the new route,
        # and the next request counts under (cmd1, v2).
        table = json.load(get(stack.metrics_port, "/routes"))["listeners"]["awesomerpc"]
        assert [(r["name"], [c["name"] for c in r["clusters"]]) for r in table["routes"]] == [("cmd1", ["v1"]), ("split", ["v1", "v2"])]
        raw = yaml.safe_load(stack.config_path.read_text())
        raw["listeners"][0]["routes"] = [cmd_route(1, "v2")]
        stack.config_path.write_text(yaml.safe_dump(raw))
        posted = reload(stack, stack.metrics_port)
        assert posted is None or posted[0] == 200, posted

        def reloaded():
            routes = json.load(get(stack.metrics_port, "/routes"))["listeners"]["awesomerpc"]["routes"]
            return [(r["name"], [c["name"] for c in r["clusters"]]) for r in routes] == [("cmd1", ["v2"])]

        wait_until(reloaded, 10, "/routes showing the reloaded table")
        assert run_async(calls(stack.listen_port, [1]))[0].body == b"v2|m"
        m = scrape(stack.metrics_port)
        assert m[("metabridge_response_success_total", labels("cmd1", "v2"))] == 1
        assert m[("metabridge_response_success_total", labels("cmd1", "v1"))] == 5  # counters stay across a reload
    finally:
        stack.stop()


def bridge_hosts_requests(stack: Stack) -> dict[str, int]:
    """Envoy's rq_total per bridge worker (hosts of its bridge cluster): ext_proc streams opened."""
    text = get(stack.admin_port, "/clusters").read().decode()
    found = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == envoy_config.BRIDGE_CLUSTER and parts[2] == "rq_total":
            found[parts[1]] = int(parts[3])
    return found


def test_with_two_workers_one_scrape_counts_every_workers_requests(tmp_path):
    stack = make_stack(tmp_path, [cmd_route(1, "v1"), cmd_route(2, "v2")], workers=2)
    try:
        stack.start()
        wait_until(lambda: port_open(stack.metrics_port), 10, "the supervisor's admin endpoint", stack.procs["bridge"])
        wait_until(lambda: get(stack.metrics_port, "/ready").status == 200, 10, "both workers ready")

        async def many():
            return await asyncio.gather(*(calls(stack.listen_port, [1 + i % 2] * 3) for i in range(16)))

        replies = [r for batch in run_async(many()) for r in batch]
        assert len(replies) == 48 and all(r.rsp_code == 0 for r in replies)
        per_worker = bridge_hosts_requests(stack)
        assert len(per_worker) == 2 and min(per_worker.values()) > 0, f"Envoy should spread connections over both workers: {per_worker}"

        m = scrape(stack.metrics_port)
        assert m[("metabridge_request_total", (("listener", "awesomerpc"),))] == 48
        assert m[("metabridge_downstream_cx_total", (("listener", "awesomerpc"),))] == 16
        assert m[("metabridge_response_success_total", labels("cmd1", "v1"))] == 24
        assert m[("metabridge_request_time_ms_count", labels("cmd2", "v2"))] == 24
        routes = json.load(get(stack.metrics_port, "/routes"))
        assert len(routes["workers"]) == 2 and routes["workers"][0] == routes["workers"][1] == routes["listeners"]
        assert json.load(get(stack.metrics_port, "/config_dump"))["workers"] == 2
    finally:
        stack.stop()
