"""Running the bridge in production: metrics, route reload without disconnects, worker processes.

The metrics test runs in both bridge modes (ext_proc and inprocess, where bridge.metrics_port is
served from inside Envoy). What does not apply in-process:
- route reload by SIGHUP: a signal to the bridge process; in-process reload is POST /reload (test_inprocess_admin.py).
- worker processes sharing the connections: bridge.workers, their gRPC health checks and a killed worker's restart.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest
import yaml

from examples.awesomerpc.client import AwesomeRpcClient
from metabridge.config.model import load
from tests.integration.harness import MODES, Stack, awesomerpc_config, cmd_route, free_port, port_open, stack_class, wait_until
from tests.integration.waits import until


def make_stack(tmp_path, routes, mode: str = "ext_proc", **bridge) -> Stack:
    ports = {"v1": free_port(), "v2": free_port()}
    cfg = awesomerpc_config(free_port(), ports, routes)
    cfg["bridge"] = bridge
    stack = stack_class(mode)(tmp_path, cfg, ports)
    stack.listen_port = cfg["listeners"][0]["port"]
    return stack


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    # Summed over the other labels (route, cluster) of the awesomerpc listener's series.
    found: dict[str, float] = {}
    for m in re.finditer(r'^(metabridge_\w+)\{([^}]*)\} ([0-9.e+]+)$', text, re.M):
        if 'listener="awesomerpc"' in m.group(2).split(","):
            key = m.group(1) + '{listener="awesomerpc"}'
            found[key] = found.get(key, 0.0) + float(m.group(3))
    return found


@pytest.mark.parametrize("mode", MODES)
def test_metrics_count_requests_and_local_replies(tmp_path, mode):
    metrics_port = free_port()
    stack = make_stack(tmp_path, [cmd_route(1, "v1")], mode, metrics_port=metrics_port)
    try:
        stack.start()

        async def main():
            async with await AwesomeRpcClient.connect("127.0.0.1", stack.listen_port) as c:
                for _ in range(5):
                    await c.call(1, b"x")
                await c.call(9, b"no route")

        asyncio.run(main())
        wait_until(lambda: port_open(metrics_port), 10, "the admin endpoint")  # in-process: a thread inside Envoy
        metrics = scrape(metrics_port)
        assert metrics['metabridge_request_total{listener="awesomerpc"}'] == 6
        assert metrics['metabridge_response_success_total{listener="awesomerpc"}'] == 5
        assert metrics['metabridge_local_response_route_not_found_total{listener="awesomerpc"}'] == 1
        assert metrics['metabridge_request_active{listener="awesomerpc"}'] == 0
    finally:
        stack.stop()


def test_sighup_reloads_routes_without_dropping_connections(tmp_path):
    stack = make_stack(tmp_path, [cmd_route(1, "v1")])
    try:
        stack.start()

        async def main():
            async with await AwesomeRpcClient.connect("127.0.0.1", stack.listen_port) as c:
                before = await c.call(1, b"a")
                # A broken config is refused and the old routes stay.
                good = stack.config_path.read_text()
                stack.config_path.write_text("listeners: [")
                stack.procs["bridge"].send_signal(signal.SIGHUP)
                await until(lambda: "reload_failed_keeping_old_routes" in stack.log("bridge"), 10, "the broken config refused")
                still = await c.call(1, b"b")
                # Now point cmd 1 at v2: the same connection follows the new route.
                raw = yaml.safe_load(good)
                raw["listeners"][0]["routes"] = [cmd_route(1, "v2")]
                stack.config_path.write_text(yaml.safe_dump(raw))
                stack.procs["bridge"].send_signal(signal.SIGHUP)
                await until(lambda: "routes_reloaded" in stack.log("bridge"), 10, "the new routes loaded")
                after = await c.call(1, b"c")
                return before, still, after, c.closed

        before, still, after, closed = asyncio.run(main())
        assert before.body == b"v1|a"
        assert still.body == b"v1|b"
        assert after.body == b"v2|c"
        assert not closed
        log = stack.log("bridge")
        assert "reload_failed_keeping_old_routes" in log and "routes_reloaded" in log
    finally:
        stack.stop()


def test_worker_processes_share_the_connections(tmp_path):
    metrics_port = free_port()
    stack = make_stack(tmp_path, [cmd_route(1, "v1"), cmd_route(2, "v2")], workers=2, metrics_port=metrics_port)
    try:
        stack.start()

        async def one(i):
            async with await AwesomeRpcClient.connect("127.0.0.1", stack.listen_port) as c:
                return (await c.call(1 + i % 2, b"w")).body

        async def many(n, first=0):
            return await asyncio.wait_for(asyncio.gather(*(one(first + i) for i in range(n))), 30)

        bodies = asyncio.run(many(20))
        assert sorted(set(bodies)) == [b"v1|w", b"v2|w"]
        # Envoy's gRPC health checks of the bridge workers are answered SERVING.
        wait_until(lambda: stack.envoy_stat("cluster.metabridge_bridge.health_check.success") >= 2, 10, "bridge health checks")
        assert stack.envoy_stat("cluster.metabridge_bridge.health_check.failure") == 0
        # One scrape of the supervisor counts both workers' requests (tests/integration/test_metrics.py
        # checks that each worker served some).
        assert scrape(metrics_port)['metabridge_request_total{listener="awesomerpc"}'] == 20

        # A worker that dies is restarted, and new connections keep working.
        worker_pids = [int(p) for p in re.findall(r'"event": "worker_started", "pid": (\d+)', stack.log("bridge"))]
        assert len(worker_pids) == 2
        os.kill(worker_pids[0], signal.SIGKILL)
        wait_until(lambda: len(re.findall(r'"worker_started"', stack.log("bridge"))) == 3, 15, "worker restart")
        worker0 = load(stack.config_path).worker_addresses()[0]
        wait_until(lambda: subprocess.run([sys.executable, "-m", "metabridge.cli", "health", "--address", worker0], capture_output=True).returncode == 0, 15, "restarted worker")
        # Envoy's view: its health check of the bridge cluster sees both workers serving again (a
        # check that failed while the worker was down happened before the one above passed).
        wait_until(lambda: stack.envoy_stat("cluster.metabridge_bridge.membership_healthy") == 2, 15, "both bridge workers healthy in Envoy")
        assert asyncio.run(many(4, first=0)) == [b"v1|w", b"v2|w"] * 2
    finally:
        stack.stop()
