"""The in-process mode (bridge.mode: inprocess): the core runs inside Envoy through the dynamic
module. The same awesomerpc scenarios run in both modes (``mode`` is a parameter); what only
one mode has is tested on its own.

Not parametrized, because they do not apply in-process (docs/inprocess.md): the bridge being
killed or restarted, Envoy's message_timeout on a stalled bridge, bridge workers (there is no
bridge process); SIGHUP reloads, live config and RDS (the bridge process's; RDS listeners are
refused). In-process elsewhere: the admin endpoint and POST /reload (test_inprocess_admin), fault
(test_governance_filters) and the global rate limit (test_global_ratelimit).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from examples.awesomerpc.client import AwesomeRpcClient, encode_frame
from examples.awesomerpc.protocol import ERROR_CODES
from metabridge.config import bootstrap as envoy_config
from metabridge.config.model import load
from metabridge.native import build as native_build
from metabridge.sdk.codec import ErrorType
from tests.integration.blocking_codec import BLOCK_SECONDS, BLOCKING_CMD
from tests.integration.broken_codec import DECODE_BUG_CMD
from tests.integration.harness import MODES, REPO, InProcessStack, Stack, stack_class, awesomerpc_config, cmd_route, free_port, port_open, read_until_closed, run_async, wait_until

CMD_SLOW = 98  # the example backend sleeps <body> ms before answering
ROUTES = [cmd_route(1, "v1"), cmd_route(2, "v2"), cmd_route(CMD_SLOW, "v1"), cmd_route(DECODE_BUG_CMD, "v1"), cmd_route(BLOCKING_CMD, "v1")]


@pytest.fixture(scope="module", autouse=True)
def native_module():
    assert native_build.main() == 0, "the dynamic module must build here (scripts/setup.sh builds it)"


@pytest.fixture
def make(tmp_path):
    """make(mode, routes=ROUTES, codec_ref=None, backends=("v1", "v2"), **listener_options) -> a started stack."""
    started: list[Stack] = []

    def factory(mode, routes=ROUTES, codec_ref=None, backends=("v1", "v2"), extra_clusters=None, **listener_options):
        ports = {name: free_port() for name in backends}
        cfg = awesomerpc_config(free_port(), {**ports, **(extra_clusters or {})}, routes, **listener_options)
        if codec_ref:
            cfg["codecs"]["awesomerpc"]["ref"] = codec_ref
        cfg.setdefault("bridge", {})["mode"] = mode
        (tmp_path / mode).mkdir(exist_ok=True)
        s = stack_class(mode)(tmp_path / mode, cfg, ports)
        s.listen_port = cfg["listeners"][0]["port"]
        started.append(s)
        return s.start()

    yield factory
    for s in started:
        s.stop()


def run(coro):
    return run_async(coro, 60)


async def connect(s: Stack) -> AwesomeRpcClient:
    return await AwesomeRpcClient.connect("127.0.0.1", s.listen_port)


@pytest.mark.parametrize("mode", MODES)
def test_routes_and_pipelined_requests(make, mode):
    s = make(mode)

    async def main():
        async with await connect(s) as c:
            first = [await c.call(1, b"a"), await c.call(2, b"b")]
            many = await asyncio.gather(*(c.call(1 + i % 2, f"m{i}".encode()) for i in range(50)))
            return first, many

    first, many = run(main())
    assert [(r.rsp_code, r.body) for r in first] == [(0, b"v1|a"), (0, b"v2|b")]
    assert [r.body for r in many] == [f"v{1 + i % 2}|m{i}".encode() for i in range(50)]
    if mode == "inprocess":  # the module's counter of contained failures exists, and none happened
        errors = [line for line in _stats(s).splitlines() if line.split(":")[0].endswith("metabridge_inprocess_errors")]
        assert errors and all(line.endswith(": 0") for line in errors), errors


@pytest.mark.parametrize("mode", MODES)
def test_local_replies_no_route_and_heartbeat(make, mode):
    s = make(mode)

    async def main():
        async with await connect(s) as c:
            return await c.call(7, b"?"), await c.heartbeat(), await c.call(1, b"after")

    bad, beat, good = run(main())
    assert bad.rsp_code == ERROR_CODES[ErrorType.ROUTE_NOT_FOUND] and bad.cmd == 7
    assert beat.cmd == 0 and beat.rsp_code == 0
    assert good.body == b"v1|after"
    assert s.envoy_stat("cluster.v2.upstream_cx_total") == 0  # the heartbeat never left


@pytest.mark.parametrize("mode", MODES)
def test_dead_backend_gets_error_reply(make, mode):
    s = make(mode, routes=[cmd_route(1, "dead")], backends=(), extra_clusters={"dead": free_port()})

    async def main():
        async with await connect(s) as c:
            return await c.call(1, b"x")

    assert run(main()).rsp_code == ERROR_CODES[ErrorType.UNSPECIFIED]


@pytest.mark.parametrize("mode", MODES)
def test_request_timeout_fires_from_the_core_timer(make, mode):
    s = make(mode, request_timeout="300ms")

    async def main():
        async with await connect(s) as c:
            started = time.monotonic()
            slow = await c.call(CMD_SLOW, b"1500")
            elapsed = time.monotonic() - started
            return slow, elapsed, await c.call(1, b"ok")

    slow, elapsed, fast = run(main())
    assert slow.rsp_code == ERROR_CODES[ErrorType.TIMEOUT]
    assert 0.25 < elapsed < 1.4  # the core's timer, not the backend's late reply
    assert fast.body == b"v1|ok"


@pytest.mark.parametrize("mode", MODES)
def test_idle_timeout_closes_the_connection(make, mode):
    s = make(mode, idle_timeout="500ms")
    import socket

    with socket.create_connection(("127.0.0.1", s.listen_port), timeout=5) as sock:
        sock.sendall(encode_frame(1, 1, b"x"))
        started = time.monotonic()
        data = read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert b"v1|x" in data
    assert 0.4 < elapsed < 4.0


@pytest.mark.parametrize("mode", MODES)
def test_codec_exception_closes_only_that_connection(make, mode):
    import socket

    s = make(mode, codec_ref=f"{REPO / 'tests' / 'integration' / 'broken_codec.py'}:BrokenAwesomeRpcCodec")

    async def main():
        async with await connect(s) as healthy:
            before = await healthy.call(1, b"before")
            with socket.create_connection(("127.0.0.1", s.listen_port), timeout=5) as bad:
                bad.sendall(encode_frame(1, 1, b"ok") + encode_frame(2, DECODE_BUG_CMD, b"boom"))
                data = await asyncio.get_running_loop().run_in_executor(None, read_until_closed, bad)
            after = await healthy.call(2, b"after")
            return before, data, after

    before, data, after = run(main())
    assert before.body == b"v1|before" and after.body == b"v2|after"
    assert b"v1|ok" in data  # the request before the bug was answered, then the connection closed
    assert "RuntimeError" in s.log("bridge")


@pytest.mark.parametrize("mode", MODES)
def test_blocking_codec_stalls_its_worker_but_loses_nothing(make, mode):
    s = make(mode, codec_ref=f"{REPO / 'tests' / 'integration' / 'blocking_codec.py'}:BlockingAwesomeRpcCodec")

    async def main():
        async with await connect(s) as a, await connect(s) as b:
            assert (await b.call(1, b"warm")).body == b"v1|warm"
            blocked = asyncio.ensure_future(a.call(BLOCKING_CMD, b"slow", timeout=10))
            await asyncio.sleep(0.1)  # let the blocking frame reach the codec first
            started = time.monotonic()
            other = await b.call(2, b"beside", timeout=10)
            return await blocked, other, time.monotonic() - started

    blocked, other, waited = run(main())
    assert blocked.rsp_code == 0 and other.body == b"v2|beside"
    # Both modes run every connection of a worker (bridge loop / Envoy worker) on one thread.
    assert waited > BLOCK_SECONDS / 2


def test_module_failure_at_start_up_is_reported(tmp_path):
    """The module's Python side cannot load the config (its codec is gone): Envoy refuses the
    listener and exits, and the log says why."""
    cfg = awesomerpc_config(free_port(), {"v1": free_port()}, [cmd_route(1, "v1")])
    cfg["bridge"] = {"mode": "inprocess", "listen": f"unix:{tmp_path}/unused.sock"}
    s = InProcessStack(tmp_path, cfg, {})
    args, env = s.envoy_command()
    cfg["codecs"]["awesomerpc"]["ref"] = str(tmp_path / "missing.py") + ":Codec"
    s.config_path.write_text(yaml.safe_dump(cfg))
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "new_filter_config" in output and "missing.py" in output


def test_missing_module_is_a_clear_error(tmp_path, monkeypatch):
    """Without the built module, rendering for inprocess mode says how to build it."""
    monkeypatch.setattr(native_build, "LIBRARY", Path(tmp_path) / "libmetabridge.so")
    with pytest.raises(envoy_config.EnvoyConfigError, match="metabridge.native.build"):
        envoy_config.inprocess_environment({})


def test_fault_and_ratelimit_render_in_process(tmp_path):
    """No longer refused: both run in-process (test_governance_filters, test_global_ratelimit)."""
    filters = [{"name": "fault", "config": {"delay": {"fixed_delay": "1s"}}}, {"name": "ratelimit", "config": {"domain": "d", "descriptors": [{"property": "cmd", "descriptor_key": "cmd"}], "rls": {"address": "127.0.0.1:1"}}}]
    cfg = awesomerpc_config(free_port(), {"v1": free_port()}, [cmd_route(1, "v1")], filters=filters)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    bootstrap = envoy_config.build_inprocess_bootstrap(load(path))
    names = [f["name"] for f in bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]]
    assert "envoy.filters.network.dynamic_modules" in names and "envoy.filters.network.ext_proc" not in names


def test_static_bootstrap_untouched_by_mode(tmp_path):
    """The inprocess bootstrap swaps only the network filter and drops the bridge cluster."""
    cfg = awesomerpc_config(free_port(), {"v1": free_port()}, [cmd_route(1, "v1")])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config = load(path)
    ext_proc = envoy_config.build_bootstrap(config)
    inprocess = envoy_config.build_inprocess_bootstrap(config)
    names = [f["name"] for f in inprocess["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]]
    assert names == ["envoy.filters.network.dynamic_modules", "envoy.filters.network.http_connection_manager"]
    assert [c["name"] for c in inprocess["static_resources"]["clusters"]] == [c["name"] for c in ext_proc["static_resources"]["clusters"] if c["name"] != envoy_config.BRIDGE_CLUSTER]
    assert inprocess["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][1] == ext_proc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][1]
    envoy_config.validate_with_envoy(envoy_config.render_inprocess_yaml(config), env=envoy_config.inprocess_environment())


def test_metabridge_run_with_envoy_in_process(tmp_path):
    """`metabridge run --with-envoy` with bridge.mode inprocess: Envoy alone serves the listener;
    SIGTERM stops it cleanly."""
    import signal
    import sys

    backend_port = free_port()
    cfg = awesomerpc_config(free_port(), {"v1": backend_port}, [cmd_route(1, "v1")])
    s = Stack(tmp_path, cfg, {"v1": backend_port})
    cfg["bridge"]["mode"] = "inprocess"
    s.config_path.write_text(yaml.safe_dump(cfg))
    s.start_backend("v1", backend_port)
    try:
        run_proc = s._spawn("run", [sys.executable, "-m", "metabridge.cli", "run", "-c", str(s.config_path), "--with-envoy"])
        wait_until(lambda: port_open(cfg["listeners"][0]["port"]), 30, "listener", run_proc)

        async def main():
            async with await AwesomeRpcClient.connect("127.0.0.1", cfg["listeners"][0]["port"]) as c:
                return await c.call(1, b"hi")

        assert run(main()).body == b"v1|hi"
        assert not Path(s.bridge_address.removeprefix("unix:")).exists()  # no bridge process listens
        run_proc.send_signal(signal.SIGTERM)  # the runner stops its Envoy
        assert run_proc.wait(timeout=20) == 0
        assert not port_open(cfg["listeners"][0]["port"])
        alone = subprocess.run([sys.executable, "-m", "metabridge.cli", "run", "-c", str(s.config_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert alone.returncode == 2 and "--with-envoy" in alone.stderr  # nothing to run without Envoy
    finally:
        s.stop()


def test_two_envoy_workers_share_the_interpreter(tmp_path):
    """--concurrency 2: both workers run the core (one Python thread state each, one GIL)."""
    ports = {"v1": free_port(), "v2": free_port()}
    cfg = awesomerpc_config(free_port(), ports, ROUTES)
    cfg["bridge"] = {"mode": "inprocess"}
    s = InProcessStack(tmp_path, cfg, ports)
    s.concurrency = 2
    s.listen_port = cfg["listeners"][0]["port"]
    s.start()
    try:
        async def one(i):
            async with await connect(s) as c:
                return [await c.call(1 + i % 2, f"{i}-{j}".encode()) for j in range(5)]

        async def main():
            return await asyncio.gather(*(one(i) for i in range(40)))

        replies = run(main())
        assert [[r.body for r in rs] for rs in replies] == [[f"v{1 + i % 2}|{i}-{j}".encode() for j in range(5)] for i in range(40)]
        workers = {line.split("worker_")[1].split(".")[0] for line in _stats(s).splitlines() if line.startswith("listener.127.0.0.1") and ".worker_" in line and "downstream_cx_total" in line and not line.endswith(": 0")}
        assert workers == {"0", "1"}, workers  # both workers took connections
    finally:
        s.stop()


def _stats(s: Stack) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{s.admin_port}/stats", timeout=2) as r:
        return r.read().decode()


@pytest.mark.parametrize("mode", MODES)
def test_clients_leaving_mid_request_leave_the_proxy_healthy(make, mode):
    """Connections closed with requests in flight, timers armed and tunnels opening: their
    state is freed and Envoy (with the module) keeps serving."""
    import socket

    s = make(mode, request_timeout="200ms")
    for i in range(100):
        with socket.create_connection(("127.0.0.1", s.listen_port), timeout=5) as sock:
            sock.sendall(encode_frame(i + 1, CMD_SLOW if i % 2 else 1, b"300" if i % 2 else b"x"))

    async def main():
        async with await connect(s) as c:
            return await c.call(2, b"still")

    assert run(main()).body == b"v2|still"
    wait_until(lambda: s.envoy_stat("listener.127.0.0.1_%d.downstream_cx_active" % s.listen_port) == 0, 10, "connections freed")


def test_render_and_validate_in_process(tmp_path):
    """`metabridge render --check` and `metabridge validate` take the in-process bootstrap
    for bridge.mode inprocess, and Envoy validates it with the module loaded."""
    import sys

    cfg = awesomerpc_config(free_port(), {"v1": free_port()}, [cmd_route(1, "v1")])
    cfg["bridge"] = {"mode": "inprocess"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = [sys.executable, "-m", "metabridge.cli"]
    rendered = subprocess.run([*cli, "render", "-c", str(path), "--check"], capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    bootstrap = yaml.safe_load(rendered.stdout)
    assert [f["name"] for f in bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]][0] == "envoy.filters.network.dynamic_modules"
    validated = subprocess.run([*cli, "validate", "-c", str(path)], capture_output=True, text=True, timeout=120)
    assert validated.returncode == 0 and "OK" in validated.stdout, validated.stderr


def test_envoy_without_the_module_refuses_to_start(tmp_path):
    """Envoy's search path without libmetabridge.so: Envoy exits at start-up, naming the module."""
    cfg = awesomerpc_config(free_port(), {"v1": free_port()}, [cmd_route(1, "v1")])
    cfg["bridge"] = {"mode": "inprocess", "listen": f"unix:{tmp_path}/unused.sock"}
    s = InProcessStack(tmp_path, cfg, {})
    args, env = s.envoy_command()
    (tmp_path / "empty").mkdir()
    env["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(tmp_path / "empty")
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Failed to load dynamic module" in result.stdout + result.stderr and "libmetabridge.so" in result.stdout + result.stderr


@pytest.mark.parametrize("mode", MODES)
def test_access_log_lines(make, mode, tmp_path):
    """The access log filter (its writer thread) works inside Envoy as in the bridge."""
    import json

    path = tmp_path / f"access-{mode}.log"
    s = make(mode, filters=[{"name": "access_log", "config": {"path": str(path)}}])

    async def main():
        async with await connect(s) as c:
            return await c.call(1, b"logged"), await c.call(7, b"?")

    ok, bad = run(main())
    assert ok.body == b"v1|logged" and bad.rsp_code == ERROR_CODES[ErrorType.ROUTE_NOT_FOUND]
    wait_until(lambda: path.exists() and len(path.read_text().splitlines()) == 2, 10, "two access log lines")
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert (first["listener"], first["cluster"], first["upstream_host"]) == ("awesomerpc", "v1", f"127.0.0.1:{s.backends['v1']}")
    assert second["cluster"] in ("", None) and second["outcome"] != first["outcome"]  # the local reply


def test_rds_listeners_are_refused(tmp_path):
    cfg = awesomerpc_config(free_port(), {"v1": free_port()}, [])
    cfg["listeners"][0]["rds"] = {"server": "127.0.0.1:18000", "route_config_name": "rc"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(envoy_config.EnvoyConfigError, match="routes over RDS need the bridge process"):
        envoy_config.build_inprocess_bootstrap(load(path))


@pytest.mark.parametrize("mode", MODES)
def test_responses_past_the_tunnel_window(make, mode):
    """24 MiB of responses on one tunnel, more than its 16 MiB window: the window must be given
    back to HCM (in-process: bytes for HCM made during HCM's write, sent from a scheduled event)."""
    s = make(mode, max_frame_size="2MiB")
    body = b"x" * (1024 * 1024)

    async def main():
        async with await connect(s) as c:
            return [await c.call(1, body, timeout=20) for _ in range(24)]

    replies = run(main())
    assert len(replies) == 24 and all(r.body == b"v1|" + body for r in replies)
