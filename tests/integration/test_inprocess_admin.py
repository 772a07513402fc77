"""The admin endpoint (bridge.metrics_port) in bridge.mode inprocess: served by the interpreter
inside Envoy, with the bridge process's metric names and labels, counting every Envoy worker's
connections; ``POST /reload`` applies a changed config to new connections and refuses a broken
one (SIGHUP belongs to Envoy); `metabridge run --no-watch` turns its SIGHUP into that request.
Under live config (`metabridge run` without --no-watch) the runner applies changes instead:
tests/integration/test_live_config.py."""

from __future__ import annotations

import asyncio
import json

import pytest
import yaml

from examples.awesomerpc.client import AwesomeRpcClient
from metabridge.native import build as native_build
from tests.integration.misbehaving_codecs import BLOCKING_CMD, BLOCKING_LINE, RESUMED_LINE
from tests.integration.both_modes import post
from tests.integration.harness import InProcessStack, ReloadableCodec, awesomerpc_config, cmd_route, codec_config, free_port, port_open, run_async, wait_until
from tests.integration.test_inprocess import _stats
from tests.integration.waits import until
from tests.integration.test_metrics import ROUTE_NOT_FOUND, get, labels, scrape

NO_ROUTE_CMD = 7


@pytest.fixture(scope="module", autouse=True)
def native_module():
    assert native_build.main() == 0, "the dynamic module must build here (scripts/setup.sh builds it)"


@pytest.fixture
def stack(tmp_path):
    ports = {"v1": free_port(), "v2": free_port()}
    cfg = awesomerpc_config(free_port(), ports, [cmd_route(1, "v1"), cmd_route(2, "v2")])
    cfg["bridge"] = {"mode": "inprocess", "metrics_port": free_port()}
    s = InProcessStack(tmp_path, cfg, ports)
    s.concurrency = 2
    s.listen_port = cfg["listeners"][0]["port"]
    s.metrics_port = cfg["bridge"]["metrics_port"]
    s.start()
    wait_until(lambda: port_open(s.metrics_port), 10, "the in-process admin endpoint", s.procs["envoy"])
    yield s
    s.stop()


async def calls(port: int, cmds: list[int]) -> list:
    async with await AwesomeRpcClient.connect("127.0.0.1", port) as client:
        return [await client.call(cmd, b"m") for cmd in cmds]



def route_clusters(port: int) -> list:
    routes = json.load(get(port, "/routes"))["listeners"]["awesomerpc"]["routes"]
    return [(r["name"], [c["name"] for c in r["clusters"]]) for r in routes]


def test_metrics_and_admin_endpoints_inside_envoy(stack):
    assert get(stack.metrics_port, "/ready").status == 200
    listener = (("listener", "awesomerpc"),)

    async def main():  # 20 connections, spread over Envoy's two workers
        return await asyncio.gather(*(calls(stack.listen_port, [1, 1, 2, 9]) for _ in range(20)))

    replies = run_async(main(), 60)
    assert [[r.rsp_code for r in rs] for rs in replies] == [[0, 0, 0, ROUTE_NOT_FOUND]] * 20
    accepted = {line.split("worker_")[1].split(".")[0]: int(line.rsplit(": ", 1)[1]) for line in _stats(stack).splitlines() if f"_{stack.listen_port}.worker_" in line and line.split(":")[0].endswith("downstream_cx_total")}
    assert accepted.keys() == {"0", "1"} and min(accepted.values()) > 0, accepted  # both workers took connections

    m = scrape(stack.metrics_port)
    assert m[("metabridge_request_total", listener)] == 80
    # Counted at accept, so the harness's port probes too: the sum of Envoy's workers' counts.
    assert m[("metabridge_downstream_cx_total", listener)] == sum(accepted.values()) >= 20
    assert m[("metabridge_request_active", listener)] == 0
    assert m[("metabridge_response_success_total", labels("cmd1", "v1"))] == 40
    assert m[("metabridge_response_success_total", labels("cmd2", "v2"))] == 20
    assert m[("metabridge_local_response_route_not_found_total", labels())] == 20
    assert m[("metabridge_request_time_ms_count", labels("cmd1", "v1"))] == 40
    assert m[("metabridge_request_time_ms_bucket", labels("cmd1", "v1", le="+Inf"))] == 40
    assert m[("metabridge_request_time_ms_sum", labels("cmd1", "v1"))] > 0
    assert not any(name.startswith("metabridge_grpc_") for name, _ in m)  # no bridge gRPC server in-process

    assert route_clusters(stack.metrics_port) == [("cmd1", ["v1"]), ("cmd2", ["v2"])]
    dump = json.load(get(stack.metrics_port, "/config_dump"))
    assert dump["mode"] == "inprocess" and dump["metrics_port"] == stack.metrics_port
    assert [r["name"] for r in dump["listeners"][0]["routes"]] == ["cmd1", "cmd2"]


def test_post_reload_applies_to_new_connections_and_refuses_a_broken_config(stack):
    assert run_async(calls(stack.listen_port, [1]))[0].body == b"v1|m"
    good = stack.config_path.read_text()
    raw = yaml.safe_load(good)
    raw["listeners"][0]["routes"] = [cmd_route(1, "v2"), cmd_route(2, "v2")]
    stack.config_path.write_text(yaml.safe_dump(raw))
    status, body = post(stack.metrics_port, "/reload")
    assert status == 200 and body.startswith("reloaded"), body
    assert route_clusters(stack.metrics_port) == [("cmd1", ["v2"]), ("cmd2", ["v2"])]

    async def many():  # new connections on both workers follow the new route
        return await asyncio.gather(*(calls(stack.listen_port, [1]) for _ in range(10)))

    assert [rs[0].body for rs in run_async(many(), 60)] == [b"v2|m"] * 10

    raw["listeners"][0]["routes"] = [cmd_route(1, "nosuchcluster")]  # a route to an unknown cluster
    stack.config_path.write_text(yaml.safe_dump(raw))
    status, body = post(stack.metrics_port, "/reload")
    assert status == 400 and body.startswith("refused") and "nosuchcluster" in body, body
    assert route_clusters(stack.metrics_port) == [("cmd1", ["v2"]), ("cmd2", ["v2"])]
    assert run_async(calls(stack.listen_port, [1]))[0].body == b"v2|m"  # the old config stays
    assert "reload_failed_keeping_old_routes" in stack.log("envoy")

    assert post(stack.metrics_port, "/metrics")[0] == 404  # only /reload takes a POST


def test_a_reload_waits_for_the_hook_in_progress_on_another_worker(tmp_path):
    """POST /reload applies only while no hook runs on any Envoy worker, so a connection sees one
    config whole: with a codec blocked inside a hook, the reload is applied after the hook returns
    (the log shows the codec resuming before routes_reloaded), and the blocked request and the
    connections after the reload are answered."""
    ports = {"v1": free_port(), "v2": free_port()}
    cfg = codec_config("awesomerpc", "tests/integration/misbehaving_codecs.py:BlockingAwesomeRpcCodec", free_port(), ports, [cmd_route(1, "v1"), cmd_route(BLOCKING_CMD, "v1")])
    cfg["bridge"] = {"mode": "inprocess", "metrics_port": free_port()}
    s = InProcessStack(tmp_path, cfg, ports)
    s.concurrency = 2
    s.start()
    try:
        metrics_port, listen_port = cfg["bridge"]["metrics_port"], cfg["listeners"][0]["port"]
        wait_until(lambda: port_open(metrics_port), 10, "the in-process admin endpoint", s.procs["envoy"])
        cfg["listeners"][0]["routes"] = [cmd_route(1, "v2"), cmd_route(BLOCKING_CMD, "v1")]
        s.config_path.write_text(yaml.safe_dump(cfg))

        async def main():
            async with await AwesomeRpcClient.connect("127.0.0.1", listen_port) as client:
                blocked = asyncio.ensure_future(client.call(BLOCKING_CMD, b"slow", timeout=10))
                await until(lambda: BLOCKING_LINE in s.log("envoy"), 10, "the blocking frame at the codec")
                reloaded = await asyncio.to_thread(post, metrics_port, "/reload")
                return reloaded, s.log("envoy"), await blocked

        (status, body), log, blocked = run_async(main(), 60)
        assert status == 200 and body.startswith("reloaded"), body
        assert log.index(RESUMED_LINE) < log.index("routes_reloaded"), "the reload applied while a hook was running"
        assert blocked.rsp_code == 0 and blocked.body == b"v1|slow"
        assert run_async(calls(listen_port, [1]))[0].body == b"v2|m"
    finally:
        s.stop()


def test_sighup_to_metabridge_run_reloads_inside_envoy(tmp_path):
    """`metabridge run --with-envoy --no-watch` in-process (the static bootstrap): SIGHUP goes to
    the module as POST /reload. (Without --no-watch the config is live and SIGHUP applies it
    through the runner: test_live_config.py.)"""
    import signal
    import sys

    ports = {"v1": free_port(), "v2": free_port()}
    cfg = awesomerpc_config(free_port(), ports, [cmd_route(1, "v1")])
    s = InProcessStack(tmp_path, cfg, ports)
    cfg["bridge"] = {"mode": "inprocess", "metrics_port": free_port()}
    s.config_path.write_text(yaml.safe_dump(cfg))
    port, metrics = cfg["listeners"][0]["port"], cfg["bridge"]["metrics_port"]
    for name, backend in ports.items():
        s.start_backend(name, backend)
    try:
        runner = s._spawn("run", [sys.executable, "-m", "metabridge.cli", "run", "-c", str(s.config_path), "--with-envoy", "--no-watch"])
        wait_until(lambda: port_open(port) and port_open(metrics), 30, "listener and admin endpoint", runner)
        assert run_async(calls(port, [1]))[0].body == b"v1|m"
        cfg["listeners"][0]["routes"] = [cmd_route(1, "v2")]
        s.config_path.write_text(yaml.safe_dump(cfg))
        runner.send_signal(signal.SIGHUP)
        wait_until(lambda: route_clusters(metrics) == [("cmd1", ["v2"])], 20, "the reload through SIGHUP", runner)
        assert run_async(calls(port, [1]))[0].body == b"v2|m"
        assert runner.poll() is None  # SIGHUP did not stop the runner or its Envoy
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=20) == 0
    finally:
        s.stop()


def test_post_reload_gives_new_connections_a_changed_codec_and_refuses_a_broken_one(tmp_path):
    codec = ReloadableCodec(tmp_path)
    ports = {"v1": free_port()}
    cfg = codec_config("awesomerpc", codec.ref, free_port(), ports, [cmd_route(1, "v1")])
    cfg["bridge"] = {"mode": "inprocess", "metrics_port": free_port()}
    s = InProcessStack(tmp_path, cfg, ports)
    s.concurrency = 2
    port, metrics = cfg["listeners"][0]["port"], cfg["bridge"]["metrics_port"]
    s.start()
    try:
        wait_until(lambda: port_open(metrics), 10, "the in-process admin endpoint", s.procs["envoy"])

        async def main():
            a = await AwesomeRpcClient.connect("127.0.0.1", port)
            before = await a.call(NO_ROUTE_CMD, b"?")
            # A visible change: the codec's ROUTE_NOT_FOUND reply carries rsp_code 444.
            codec.answer_no_route_with(444)
            reloaded = await asyncio.to_thread(post, metrics, "/reload")
            new = await asyncio.gather(*(calls(port, [NO_ROUTE_CMD, 1]) for _ in range(6)))
            old = await a.call(NO_ROUTE_CMD, b"?")
            codec.break_it()
            refused = await asyncio.to_thread(post, metrics, "/reload")
            after = await calls(port, [NO_ROUTE_CMD, 1])
            a.close()
            await a.wait_closed()
            return before, reloaded, new, old, refused, after

        before, reloaded, new, old, refused, after = run_async(main(), 60)
        assert before.rsp_code == 404
        assert reloaded[0] == 200, reloaded
        assert [[r.rsp_code for r in rs] for rs in new] == [[444, 0]] * 6, "connections opened after the reload get the new codec"
        assert old.rsp_code == 404, "the connection opened before keeps the codec it started with"
        assert refused[0] == 400 and str(codec.path) in refused[1], refused
        assert [r.rsp_code for r in after] == [444, 0], "the last good codec serves on"
    finally:
        s.stop()


@pytest.mark.parametrize("watch", [True, False], ids=["live", "no-watch"])
def test_sigusr1_to_metabridge_run_reopens_the_access_log_inside_envoy(tmp_path, watch):
    """Rotation in-process: rename the access log, send SIGUSR1 to `metabridge run`; it reaches the
    writer inside Envoy as POST /reopen_logs, and the next lines go to a new file at the path."""
    import os
    import signal
    import sys

    path, rotated = tmp_path / "access.log", tmp_path / "access.log.1"
    ports = {"v1": free_port()}
    cfg = awesomerpc_config(free_port(), ports, [cmd_route(1, "v1")], filters=[{"name": "access_log", "config": {"path": str(path), "flush_interval": "50ms"}}])
    s = InProcessStack(tmp_path, cfg, ports)
    cfg["bridge"] = {"mode": "inprocess", "metrics_port": free_port()}
    s.config_path.write_text(yaml.safe_dump(cfg))
    port, metrics = cfg["listeners"][0]["port"], cfg["bridge"]["metrics_port"]
    s.start_backend("v1", ports["v1"])

    def lines(p) -> int:
        return len(p.read_text().splitlines()) if p.exists() else 0

    try:
        runner = s._spawn("run", [sys.executable, "-m", "metabridge.cli", "run", "-c", str(s.config_path), "--with-envoy", *([] if watch else ["--no-watch"])])
        wait_until(lambda: port_open(port) and port_open(metrics), 30, "listener and admin endpoint", runner)
        assert [r.body for r in run_async(calls(port, [1, 1, 1]))] == [b"v1|m"] * 3
        wait_until(lambda: lines(path) == 3, 10, "three access log lines")
        os.rename(path, rotated)
        runner.send_signal(signal.SIGUSR1)
        wait_until(lambda: '"reopen_logs_applied"' in s.log("run"), 20, "the reopen through SIGUSR1", runner)
        assert [r.body for r in run_async(calls(port, [1, 1]))] == [b"v1|m"] * 2
        wait_until(lambda: lines(path) == 2, 10, "the new lines in a new file at the path")
        assert lines(rotated) == 3, "the renamed file keeps the lines before rotation, and only those"
        assert runner.poll() is None  # SIGUSR1 did not stop the runner or its Envoy
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=20) == 0
    finally:
        s.stop()
