"""Live config in bridge.mode inprocess, without Envoy: the dynamic in-process bootstrap, the
runner's snapshots and their acks (live.Snapshots, shared with bridge workers), and the
in-process side (new_filter_config, the control socket's ``apply``) driven as Envoy drives it:
each listener of every LDS file written gets its filter config, so a listener the core does not
know would fail here as Envoy would refuse it."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from metabridge import logs
from metabridge.config import bootstrap as envoy_config
from metabridge.config import live
from metabridge.config.model import load
from metabridge.inprocess_runner import InsideEnvoy
from metabridge.transport import inprocess
from tests.unit.test_inprocess_transport import FakeNative
from tests.unit.test_live_config import write_config

MODULE_FILTER = "envoy.filters.network.dynamic_modules"


def inprocess_config(path: Path, clusters: dict[str, list[int]], routes: dict[int, str], listeners: int = 1) -> None:
    write_config(path, clusters, routes, listeners)
    raw = yaml.safe_load(path.read_text())
    raw["bridge"] = {"mode": "inprocess"}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture
def live_dir():
    # Short: the control socket's path must fit a Unix socket address (108 bytes).
    directory = Path(tempfile.mkdtemp(prefix="mb-live-"))
    yield directory
    for key in [k for k in inprocess._ADMINS if k == str(directory)]:
        admin = inprocess._ADMINS.pop(key)
        if admin.control is not None:
            admin.control.shutdown()
            admin.control.server_close()
    inprocess._RUNTIMES.pop(str(directory), None)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(autouse=True)
def native(monkeypatch):
    """The module's side, for the applies' hold_hooks/release_hooks (no connection here)."""
    monkeypatch.setattr(inprocess, "native", FakeNative())


@pytest.fixture(autouse=True)
def no_log_setup(monkeypatch):
    monkeypatch.setattr(logs, "setup", lambda level="info": None)  # the in-process side's start-up; pytest keeps the log


def module_settings(listener: dict) -> dict:
    [module] = [f for f in listener["filter_chains"][0]["filters"] if f["name"] == MODULE_FILTER]
    return json.loads(module["typed_config"]["filter_config"]["value"])


def test_the_inprocess_dynamic_bootstrap_has_the_module_on_every_listener_and_no_bridge_cluster(tmp_path, live_dir):
    path = tmp_path / "c.yaml"
    inprocess_config(path, {"a": [16001], "b": [16002]}, {1: "a", 2: "b"}, listeners=2)
    config = load(path)
    boot, files = envoy_config.build_inprocess_dynamic(config, tmp_path / "xds", live_dir=live_dir)
    _, ext_proc_files = envoy_config.build_dynamic(config, tmp_path / "xds")
    assert "static_resources" not in boot, "no bridge cluster: the core runs inside Envoy"
    assert boot["dynamic_resources"] == envoy_config.build_dynamic(config, tmp_path / "xds")[0]["dynamic_resources"]
    assert files[envoy_config.CDS_FILE] == ext_proc_files[envoy_config.CDS_FILE]
    assert {n: f for n, f in files.items() if n.startswith("rds-")} == {n: f for n, f in ext_proc_files.items() if n.startswith("rds-")}
    listeners = files[envoy_config.LDS_FILE]["resources"]
    for listener, ext_proc in zip(listeners, ext_proc_files[envoy_config.LDS_FILE]["resources"], strict=True):
        names = [f["name"] for f in listener["filter_chains"][0]["filters"]]
        assert names == [MODULE_FILTER, "envoy.filters.network.http_connection_manager"]
        assert module_settings(listener) == {"config": str(path.resolve()), "manifests": None, "listener": listener["name"], "live": str(live_dir)}
        assert listener["filter_chains"][0]["filters"][1] == ext_proc["filter_chains"][0]["filters"][1], "HCM (with RDS) as in the ext_proc mode"
    raw = yaml.safe_load(path.read_text())
    raw["listeners"][0]["rds"] = {"server": "127.0.0.1:1", "route_config_name": "l0"}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(envoy_config.EnvoyConfigError, match="RDS"):
        envoy_config.build_inprocess_dynamic(load(path), tmp_path / "xds", live_dir=live_dir)


def test_snapshots_wait_for_each_live_applier_and_name_the_ones_that_do_not_ack(tmp_path, caplog):
    path = tmp_path / "c.yaml"
    write_config(path, {"a": [16001]}, {1: "a"})
    config = load(path)
    snapshots = live.Snapshots(tmp_path)
    told = []

    def applier(index, acks, alive=True):
        async def notify():
            told.append(index)
            if acks:
                live.write_ack(tmp_path, index, live.read_snapshot(tmp_path)[0])

        return live.Applier(index, notify, lambda: alive)

    assert asyncio.run(snapshots.apply(config, [applier(0, True), applier(1, False, alive=False)])) == []
    assert told == [0], "a stopped applier is not told: it starts from the snapshot in force"
    version, loaded = live.read_snapshot(tmp_path)
    assert live.read_ack(tmp_path, 0) == version and loaded == config
    with caplog.at_level(logging.WARNING):
        assert asyncio.run(snapshots.apply(config, [applier(0, True), applier(2, False)], timeout=0.1)) == [2]
    [slow] = [r.fields for r in caplog.records if r.getMessage() == "workers_slow_to_apply_config"]
    assert slow["workers"] == [2] and slow["version"] == live.read_snapshot(tmp_path)[0] != version


class EnvoyTakingListeners:
    """Envoy's admin as LiveConfig sees it; on every LDS file it makes each listener's filter
    config as Envoy does (new_filter_config), which raises for a listener the core does not know."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.factories: dict[str, inprocess.FilterFactory] = {}

    def take_listeners(self) -> None:
        for listener in yaml.safe_load((self.directory / envoy_config.LDS_FILE).read_text())["resources"]:
            settings = module_settings(listener)
            self.factories[listener["name"]] = inprocess.new_filter_config(b"metabridge", json.dumps(settings).encode())

    async def failures(self, prefix):
        return ("0", "0")

    async def wait_version(self, prefix, version, before):
        if prefix.endswith("lds"):
            self.take_listeners()


def test_a_new_listener_is_known_inside_envoy_before_envoy_takes_it_and_versions_are_acked(tmp_path, live_dir):
    path = tmp_path / "c.yaml"
    inprocess_config(path, {"a": [16001], "b": [16002]}, {1: "a"})
    config = load(path)
    xds = tmp_path / "xds"
    inside = InsideEnvoy(live_dir, lambda: True)
    cfg = live.LiveConfig(live.ConfigSource(config=path), config, xds, inside.apply, render=functools.partial(envoy_config.build_inprocess_dynamic, live_dir=live_dir))
    envoy = cfg.admin = EnvoyTakingListeners(xds)
    first = inside.snapshots.publish(config)
    envoy.take_listeners()  # Envoy starts: the first filter config builds every runtime from the snapshot
    assert live.read_ack(live_dir, live.INTERPRETER) == first
    runtimes = inprocess._RUNTIMES[str(live_dir)]
    assert sorted(runtimes) == ["l0"]

    inprocess_config(path, {"a": [16001], "b": [16002]}, {1: "b"}, listeners=2)
    assert asyncio.run(cfg.reload())
    assert sorted(envoy.factories) == ["l0", "l1"] and envoy.factories["l1"].runtime is runtimes["l1"]
    assert [r.clusters[0].name for r in runtimes["l0"].config.routes] == ["b"], "the routes step reached the runtimes inside Envoy"
    assert live.read_ack(live_dir, live.INTERPRETER) == live.read_snapshot(live_dir)[0] != first

    # A config with a listener the runner has not published: Envoy would refuse it.
    with pytest.raises(KeyError, match="no listener 'l9'"):
        inprocess.new_filter_config(b"metabridge", json.dumps({"config": str(path), "listener": "l9", "live": str(live_dir)}).encode())

    admin = inprocess._ADMINS[str(live_dir)]
    ok, detail = admin.reload()
    assert not ok and "live config" in detail and "SIGHUP" in detail, "POST /reload would apply a config the runner does not know of"


def test_a_restarted_envoy_starts_from_the_snapshot_in_force_not_the_file(tmp_path, live_dir):
    path = tmp_path / "c.yaml"
    inprocess_config(path, {"a": [16001], "b": [16002]}, {1: "a"})
    snapshots = live.Snapshots(live_dir)
    inprocess_config(path, {"a": [16001], "b": [16002]}, {1: "b"}, listeners=2)
    version = snapshots.publish(load(path))
    path.write_text("listeners: [")  # saved since, and refused by the runner
    settings = {"config": str(path), "listener": "l1", "live": str(live_dir)}
    factory = inprocess.new_filter_config(b"metabridge", json.dumps(settings).encode())
    assert [r.clusters[0].name for r in factory.runtime.config.routes] == ["b"]
    assert live.read_ack(live_dir, live.INTERPRETER) == version
    shutil.rmtree(live_dir)
    inprocess._RUNTIMES.pop(str(live_dir))
    admin = inprocess._ADMINS.pop(str(live_dir))
    admin.control.shutdown()
    admin.control.server_close()
    with pytest.raises(RuntimeError, match="snapshot .* cannot be read.*metabridge run --with-envoy"):
        inprocess.new_filter_config(b"metabridge", json.dumps(settings).encode())


def test_render_dynamic_refuses_an_inprocess_config(tmp_path, capsys):
    from metabridge import cli

    path = tmp_path / "c.yaml"
    inprocess_config(path, {"a": [16001]}, {1: "a"})
    assert cli.main(["render", "-c", str(path), "--dynamic", str(tmp_path / "xds")]) == 2
    assert "metabridge run --with-envoy" in capsys.readouterr().err
    assert not (tmp_path / "xds").exists()


def test_envoy_for_live_config_drains_immediately_and_gets_the_modules_environment(tmp_path):
    from metabridge.runner import EnvoySupervisor

    path = tmp_path / "c.yaml"
    inprocess_config(path, {"a": [16001]}, {1: "a"})
    config = load(path)
    for dynamic in (True, False):
        envoy = EnvoySupervisor(config, [], "/bin/true", "info", "admin: {}\n", dynamic=dynamic, env={"METABRIDGE_PYTHON": "x"})
        try:
            assert ("--drain-strategy" in envoy._args) is dynamic
            assert envoy._env == {"METABRIDGE_PYTHON": "x"} and not envoy.running()
        finally:
            envoy.stop()


def test_the_runner_tells_the_interpreter_again_until_its_socket_answers(tmp_path, live_dir, monkeypatch):
    """An interpreter that started from the snapshot before the one just published, and whose
    socket did not answer the first time (it was starting up), still gets the new one."""
    from metabridge import inprocess_runner

    path = tmp_path / "c.yaml"
    inprocess_config(path, {"a": [16001], "b": [16002]}, {1: "a"})
    inside = InsideEnvoy(live_dir, lambda: True)
    first = inside.snapshots.publish(load(path))
    inprocess.new_filter_config(b"metabridge", json.dumps({"config": str(path), "listener": "l0", "live": str(live_dir)}).encode())
    assert live.read_ack(live_dir, live.INTERPRETER) == first
    asked = []

    def ask_worker(*args):
        asked.append(args[1])
        return None if len(asked) == 1 else real(*args)

    real = inprocess_runner.ask_worker
    monkeypatch.setattr(inprocess_runner, "ask_worker", ask_worker)
    inprocess_config(path, {"a": [16001], "b": [16002]}, {1: "b"})
    asyncio.run(inside.apply(load(path)))
    assert asked == ["apply", "apply"]
    assert live.read_ack(live_dir, live.INTERPRETER) == live.read_snapshot(live_dir)[0] != first
    assert [r.clusters[0].name for r in inprocess._RUNTIMES[str(live_dir)]["l0"].config.routes] == ["b"]
