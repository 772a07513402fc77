"""The in-process mode (bridge.mode: inprocess): the core runs inside Envoy through the dynamic
module. What is only this mode's is tested here: the start-up failures (a config or codec that
does not load, the module missing from Envoy's search path, the module not built), render and
validate, ``metabridge run --with-envoy``, two Envoy workers on one interpreter, the refused
configs (RDS listeners), and a blocking codec (in both modes: what it costs the connections
beside it differs in kind, a bridge loop or an Envoy worker).

The scenarios both modes share run in both modes in the files that have them (their ``mode``
parameter): awesomerpc's routing, pipelining, local replies, heartbeats, dead and closing
backends, timeouts, malformed frames, clients leaving mid-request and the tunnel window in
test_awesomerpc_proxy; Dubbo in test_dubbo_proxy and test_dubbo_mutation, Thrift in
test_thrift_proxy, streams in test_streaming, the codec guide's and new-codec's projects in
test_codec_guide and test_new_codec; a codec that raises in test_faults_and_limits, the access
log in test_access_log, tracing in test_tracing. In-process elsewhere too: the admin endpoint and
POST /reload (test_inprocess_admin), live config (test_live_config), fault
(test_governance_filters) and the global rate limit (test_global_ratelimit).

Not in-process, because they are about the bridge as a separate process (docs/inprocess.md):
the bridge being killed or restarted, Envoy's message_timeout on a stalled bridge, bridge
workers, SIGHUP to the bridge (in-process: POST /reload, or SIGHUP to ``metabridge run``); RDS
listeners are refused (below). Each file lists its own.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from examples.awesomerpc.client import AwesomeRpcClient
from metabridge.config import bootstrap as envoy_config
from metabridge.config.model import load
from metabridge.native import build as native_build
from tests.integration.misbehaving_codecs import BLOCK_SECONDS, BLOCKING_CMD, BLOCKING_LINE, CRASHING_CMD, CRASHING_LINE
from tests.integration.harness import MODES, REPO, InProcessStack, Stack, awesomerpc_config, cmd_route, free_port, port_open, run_async, stack_class, wait_until
from tests.integration.waits import until

ROUTES = [cmd_route(1, "v1"), cmd_route(2, "v2"), cmd_route(BLOCKING_CMD, "v1")]


@pytest.fixture(scope="module", autouse=True)
def native_module():
    assert native_build.main() == 0, "the dynamic module must build here (scripts/setup.sh builds it)"


@pytest.fixture
def make(tmp_path):
    """make(mode, codec_ref) -> a started stack in ``mode`` of backends v1 and v2 behind an
    awesomerpc listener (ROUTES) whose codec is ``codec_ref``."""
    started: list[Stack] = []

    def factory(mode, codec_ref):
        ports = {name: free_port() for name in ("v1", "v2")}
        cfg = awesomerpc_config(free_port(), ports, ROUTES)
        cfg["codecs"]["awesomerpc"]["ref"] = codec_ref
        s = stack_class(mode)(tmp_path, cfg, ports)
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
def test_blocking_codec_stalls_its_worker_but_loses_nothing(make, mode):
    s = make(mode, codec_ref=f"{REPO / 'tests' / 'integration' / 'misbehaving_codecs.py'}:BlockingAwesomeRpcCodec")

    async def main():
        async with await connect(s) as a, await connect(s) as b:
            assert (await b.call(1, b"warm")).body == b"v1|warm"
            blocked = asyncio.ensure_future(a.call(BLOCKING_CMD, b"slow", timeout=10))
            await until(lambda: BLOCKING_LINE in s.log("bridge"), 10, "the blocking frame at the codec")
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


@pytest.mark.parametrize("watch", [True, False], ids=["live", "no-watch"])
def test_run_refuses_a_codec_that_does_not_load_before_envoy_starts(tmp_path, watch):
    """`metabridge run --with-envoy` builds what the interpreter inside Envoy will build first:
    a codec that does not load exits 2 with the config's error, live or not, and no Envoy is
    left running with its listener rejected."""
    import sys

    port = free_port()
    cfg = awesomerpc_config(port, {"v1": free_port()}, [cmd_route(1, "v1")])
    cfg["codecs"]["awesomerpc"]["ref"] = str(REPO / "codecs/awesomerpc.py") + ":NoSuchCodec"
    cfg["bridge"] = {"mode": "inprocess"}
    cfg["envoy"] = {"admin_port": free_port()}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    command = [sys.executable, "-m", "metabridge.cli", "run", "-c", str(path), "--with-envoy", *([] if watch else ["--no-watch"])]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "codecs.awesomerpc.ref" in result.stderr and "has no attribute 'NoSuchCodec'" in result.stderr
    assert "envoy_started" not in result.stdout + result.stderr
    assert not port_open(port)


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


def test_a_crash_in_codec_code_ends_envoy_and_run_restarts_it(tmp_path):
    """A crash no Python code can catch (SIGSEGV in a C call made by the codec) takes the whole
    Envoy down in-process, with every connection it held; `metabridge run --with-envoy` logs the
    signal and restarts Envoy, which serves new connections. (In the ext_proc mode the same crash
    ends only a bridge process: test_awesomerpc_proxy's killed-bridge test.)"""
    import json
    import resource
    import sys

    backend_port, listen_port = free_port(), free_port()
    cfg = awesomerpc_config(listen_port, {"v1": backend_port}, [cmd_route(1, "v1"), cmd_route(CRASHING_CMD, "v1")])
    cfg["codecs"]["awesomerpc"]["ref"] = f"{REPO / 'tests' / 'integration' / 'misbehaving_codecs.py'}:CrashingAwesomeRpcCodec"
    s = Stack(tmp_path, cfg, {"v1": backend_port})
    cfg["bridge"]["mode"] = "inprocess"
    s.config_path.write_text(yaml.safe_dump(cfg))
    s.start_backend("v1", backend_port)

    def events(name):
        return [e for e in (json.loads(line) for line in s.log("run").splitlines() if line.startswith("{")) if e.get("event") == name]

    try:
        core = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, core[1]))  # the crash leaves no core file in the checkout
        try:
            run_proc = s._spawn("run", [sys.executable, "-m", "metabridge.cli", "run", "-c", str(s.config_path), "--with-envoy", "--no-watch"])
        finally:
            resource.setrlimit(resource.RLIMIT_CORE, core)
        wait_until(lambda: port_open(listen_port), 30, "listener", run_proc)

        async def crash():
            async with await AwesomeRpcClient.connect("127.0.0.1", listen_port) as healthy, await AwesomeRpcClient.connect("127.0.0.1", listen_port) as crashing:
                assert (await healthy.call(1, b"before")).body == b"v1|before"
                with pytest.raises(ConnectionError):
                    await crashing.call(CRASHING_CMD, b"boom", timeout=20)
                with pytest.raises(ConnectionError):
                    await healthy.call(1, b"during", timeout=20)  # its Envoy is gone too

        run(crash())
        [exited] = wait_until(lambda: events("envoy_exited_restarting"), 20, "the crash logged", run_proc)
        assert exited["signal"] == "SIGSEGV" and exited["exit_code"] == -11, exited
        assert CRASHING_LINE in s.log("run")
        wait_until(lambda: len(events("envoy_started")) == 2, 20, "Envoy restarted", run_proc)

        async def after():
            async with await AwesomeRpcClient.connect("127.0.0.1", listen_port) as c:
                return await c.call(1, b"after")

        assert wait_until(lambda: run(after()).body == b"v1|after", 30, "the restarted Envoy serving", run_proc)
        assert run_proc.poll() is None
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


def test_rds_listeners_are_refused(tmp_path):
    cfg = awesomerpc_config(free_port(), {"v1": free_port()}, [])
    cfg["listeners"][0]["rds"] = {"server": "127.0.0.1:18000", "route_config_name": "rc"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(envoy_config.EnvoyConfigError, match="routes over RDS need the bridge process"):
        envoy_config.build_inprocess_bootstrap(load(path))
