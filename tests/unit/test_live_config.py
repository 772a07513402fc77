"""bridge/config/live.py and the dynamic bootstrap: what is rendered, which files are rewritten,
when a change is taken, and the order a change reaches Envoy and the workers in."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import yaml

from metabridge.config import bootstrap as envoy_config
from metabridge.config import live
from metabridge.config.model import load

ROOT = Path(__file__).resolve().parents[2]


def write_config(path: Path, clusters: dict[str, list[int]], routes: dict[int, str], listeners: int = 1) -> None:
    raw = {
        "codecs": {"awesomerpc": {"ref": "awesomerpc"}},
        "listeners": [
            {"name": f"l{i}", "port": 15000 + i, "codec": "awesomerpc", "routes": [{"name": f"cmd{cmd}", "match": {"headers": [{"name": "cmd", "exact": str(cmd)}]}, "route": {"cluster": c}} for cmd, c in routes.items()]}
            for i in range(listeners)
        ],
        "clusters": [{"name": name, "endpoints": [{"address": "127.0.0.1", "port": p} for p in ports]} for name, ports in clusters.items()],
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_the_dynamic_bootstrap_serves_the_static_ones_listeners_and_clusters_from_files(tmp_path):
    config = load(ROOT / "examples" / "awesomerpc.yaml")
    static = envoy_config.build_bootstrap(config)
    boot, files = envoy_config.build_dynamic(config, tmp_path)
    assert [c["name"] for c in boot["static_resources"]["clusters"]] == ["metabridge_bridge"]
    for kind, name in (("lds_config", envoy_config.LDS_FILE), ("cds_config", envoy_config.CDS_FILE)):
        source = boot["dynamic_resources"][kind]["path_config_source"]
        assert source == {"path": str(tmp_path / name), "watched_directory": {"path": str(tmp_path)}}
    assert boot["node"] == {"id": "metabridge", "cluster": "metabridge"}  # file-based CDS needs both
    clusters = {c["name"] for c in files[envoy_config.CDS_FILE]["resources"]}
    assert clusters == set(config.clusters)
    [listener] = files[envoy_config.LDS_FILE]["resources"]
    [static_listener] = static["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][1]["typed_config"]
    static_hcm = static_listener["filter_chains"][0]["filters"][1]["typed_config"]
    assert hcm["rds"]["route_config_name"] == "awesomerpc" and "route_config" not in hcm
    [route_config] = files[envoy_config.rds_file("awesomerpc")]["resources"]
    assert {k: v for k, v in route_config.items() if k != "@type"} == static_hcm["route_config"]
    assert listener["address"] == static_listener["address"]


def test_rds_file_names_are_safe_and_distinct():
    a, b = envoy_config.rds_file("outbound|20880||com.example.greeter"), envoy_config.rds_file("outbound_20880__com.example.greeter")
    assert a != b and "|" not in a and a.startswith("rds-") and a.endswith(".yaml")


def test_xds_files_are_replaced_by_rename_only_when_their_content_changed(tmp_path):
    xds = live.XdsDirectory(tmp_path)
    first = xds.write("cds.yaml", {"resources": [{"name": "a"}]})
    inode = os.stat(tmp_path / "cds.yaml").st_ino
    assert first and xds.write("cds.yaml", {"resources": [{"name": "a"}]}) is None
    assert os.stat(tmp_path / "cds.yaml").st_ino == inode, "an unchanged file is left alone"
    second = xds.write("cds.yaml", {"resources": [{"name": "b"}]})
    assert second not in (None, first)
    assert yaml.safe_load((tmp_path / "cds.yaml").read_text())["version_info"] == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cds.yaml"], "no temporary file is left"
    (tmp_path / "rds-old.yaml").write_text("x")
    xds.remove_except({"rds-new.yaml"})
    assert not (tmp_path / "rds-old.yaml").exists()


def test_a_change_is_taken_once_the_file_has_settled_and_only_if_its_content_changed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: 1\n")
    watch = live.ConfigWatch(live.ConfigSource(config=path))
    assert not watch.changed()
    path.write_text("a: 2\n")
    os.utime(path, ns=(1, 1))
    assert not watch.changed(), "first seen: it may still be being written"
    assert watch.changed()
    assert not watch.changed()
    path.write_text("a: 2\n")  # same content, new mtime
    os.utime(path, ns=(2, 2))
    assert not watch.changed() and not watch.changed()


def test_a_manifests_folder_is_watched_file_by_file(tmp_path):
    folder = tmp_path / "k8s"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.yaml").write_text("x: 1\n")
    (folder / "sub" / "b.yml").write_text("x: 1\n")
    (folder / "notes.txt").write_text("ignored")
    source = live.ConfigSource(config=tmp_path / "base.yaml", manifests=folder)
    assert source.files() == [tmp_path / "base.yaml", folder / "a.yaml", folder / "sub" / "b.yml"]
    watch = live.ConfigWatch(source)
    (folder / "sub" / "c.yaml").write_text("x: 2\n")
    assert not watch.changed() and watch.changed(), "a new manifest is a change"


class FakeEnvoy:
    """Envoy's admin as LiveConfig sees it: applies whatever file version is on disk, or
    refuses LDS updates while ``refuse_lds``; records what it had at each worker step."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.refuse_lds = False
        self.rejected = 0

    def clusters(self) -> set[str]:
        return {c["name"] for c in yaml.safe_load((self.directory / envoy_config.CDS_FILE).read_text())["resources"]}

    async def failures(self, prefix):
        return (str(self.rejected), "0")

    async def wait_version(self, prefix, version, before):
        if prefix.endswith("lds") and self.refuse_lds:
            self.rejected += 1
            raise live.LiveConfigError("Envoy refused the new LDS resources (its log says why)")


def make_live(tmp_path):
    path = tmp_path / "c.yaml"
    write_config(path, {"a": [16001], "b": [16002]}, {1: "a", 2: "b"})
    steps = []
    envoy = FakeEnvoy(tmp_path / "xds")

    async def apply_workers(config):
        steps.append((sorted(config.clusters), [lst.name for lst in config.listeners], sorted(envoy.clusters())))

    cfg = live.LiveConfig(live.ConfigSource(config=path), load(path), tmp_path / "xds", apply_workers)
    cfg.admin = envoy
    return path, cfg, envoy, steps


def test_clusters_reach_envoy_before_the_routes_that_use_them_and_leave_it_after(tmp_path):
    path, cfg, envoy, steps = make_live(tmp_path)
    write_config(path, {"a": [16001], "c": [16003]}, {1: "a", 2: "c"}, listeners=2)
    assert asyncio.run(cfg.reload())
    # The new listener's runtime first, with Envoy already holding c (and still b); then the routes.
    assert steps == [(["a", "b", "c"], ["l0", "l1"], ["a", "b", "c"]), (["a", "c"], ["l0", "l1"], ["a", "b", "c"])]
    assert envoy.clusters() == {"a", "c"}, "b leaves Envoy once no worker routes to it"
    assert [r["name"] for r in yaml.safe_load((tmp_path / "xds" / envoy_config.LDS_FILE).read_text())["resources"]] == ["l0", "l1"]
    assert cfg.config.clusters.keys() == {"a", "c"}


def test_a_config_that_does_not_load_is_refused_and_nothing_changes(tmp_path, caplog):
    path, cfg, envoy, steps = make_live(tmp_path)
    before = {p.name: p.read_text() for p in (tmp_path / "xds").iterdir()}
    path.write_text("listeners: [")
    assert not asyncio.run(cfg.reload())
    assert steps == [] and {p.name: p.read_text() for p in (tmp_path / "xds").iterdir()} == before
    [refused] = [r.fields for r in caplog.records if r.getMessage() == "live_config_refused_keeping_old"]
    assert "not valid YAML" in refused["error"] and refused["config"] == str(path)


def test_a_config_envoy_refuses_is_undone(tmp_path):
    path, cfg, envoy, steps = make_live(tmp_path)
    before = {p.name: p.read_text() for p in (tmp_path / "xds").iterdir()}
    old = cfg.config
    write_config(path, {"a": [16001], "c": [16003]}, {1: "a", 2: "c"}, listeners=2)
    envoy.refuse_lds = True
    assert not asyncio.run(cfg.reload())
    assert cfg.config is old
    assert steps[-1][0:2] == (["a", "b"], ["l0"]), "the workers are put back on the running config"
    after = {p.name: p.read_text() for p in (tmp_path / "xds").iterdir() if p.name in before}
    assert after == before, "Envoy's files are as the running config renders them"


def test_render_options_apply_to_every_file_written(tmp_path):
    path = tmp_path / "c.yaml"
    write_config(path, {"a": [16001]}, {1: "a"})

    async def apply_workers(config):
        pass

    cfg = live.LiveConfig(live.ConfigSource(config=path), load(path), tmp_path / "xds", apply_workers, render_options={"listener_address": "0.0.0.0", "endpoint_overrides": {"127.0.0.1:16001": "backend:16001"}})
    cfg.admin = FakeEnvoy(tmp_path / "xds")
    write_config(path, {"a": [16001]}, {1: "a"}, listeners=2)
    assert asyncio.run(cfg.reload())
    listeners = yaml.safe_load((tmp_path / "xds" / envoy_config.LDS_FILE).read_text())["resources"]
    assert [lst["address"]["socket_address"]["address"] for lst in listeners] == ["0.0.0.0", "0.0.0.0"]
    [cluster] = yaml.safe_load((tmp_path / "xds" / envoy_config.CDS_FILE).read_text())["resources"]
    assert cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"] == "backend"


@pytest.mark.parametrize("flag", ["--dynamic", "--no-watch", "--listener-address", "--endpoint"])
def test_run_has_the_live_config_flags(flag):
    from metabridge.cli import build_parser

    run = next(a for a in build_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith(" run"))
    assert flag in run.format_help()


def test_a_running_connection_follows_a_clusters_new_hosts_and_retires_a_removed_ones_tunnel():
    """The pool side of a live endpoint change: a new host gets a tunnel slot on connections
    already open; the tunnel of a host that left the cluster answers what it carries, then closes."""
    from metabridge.config.model import ClusterConfig, Endpoint
    from tests.unit.connection_harness import Harness, encode_frame, in_loop, parse_frames

    def cluster(*ports):
        return {"c1": ClusterConfig("c1", tuple(Endpoint("127.0.0.1", p) for p in ports))}

    @in_loop
    async def run():
        h = Harness(clusters=cluster(10001, 10002))
        h.read(encode_frame(1, 1) + encode_frame(2, 1))
        by_host = {r[b"x-metabridge-host"]: sid for sid, r in h.hcm.requests.items()}
        assert set(by_host) == {b"127.0.0.1:10001", b"127.0.0.1:10002"}
        gone = by_host[b"127.0.0.1:10001"]
        for sid in by_host.values():
            h.hcm.accept(sid)
        [(pending_flow, *_)] = parse_frames(bytes(h.hcm.received[gone]))
        kept = by_host[b"127.0.0.1:10002"]
        h.hcm.send(kept, encode_frame(parse_frames(bytes(h.hcm.received[kept]))[0][0], 1, b"ok"))
        h.write()
        # The reload: 10001 leaves c1, 10003 joins.
        h.runtime.clusters = cluster(10002, 10003)
        h.runtime.plans.clear()
        h.read(b"".join(encode_frame(flow, 1) for flow in range(10, 16)))
        hosts = {sid: r[b"x-metabridge-host"] for sid, r in h.hcm.requests.items()}
        assert sorted(hosts.values()) == [b"127.0.0.1:10001", b"127.0.0.1:10002", b"127.0.0.1:10003"]
        new = next(sid for sid, host in hosts.items() if host == b"127.0.0.1:10003")
        assert [f for f, *_ in parse_frames(bytes(h.hcm.received[gone]))] == [pending_flow], "the removed host gets nothing more"
        assert len(parse_frames(bytes(h.hcm.received[new]))) == 3 and len(parse_frames(bytes(h.hcm.received[kept]))) == 4
        assert gone not in h.hcm.ended and gone not in h.hcm.reset, "its request is still in flight"
        h.hcm.send(gone, encode_frame(pending_flow, 1, b"late but answered"))
        h.write()
        assert (pending_flow, b"late but answered") in [(f, body) for f, _, _, body in h.client_frames()]
        assert gone in h.hcm.ended or gone in h.hcm.reset, "then its tunnel closes"

    run()


def test_a_setting_read_only_at_start_is_named_as_needing_a_restart_and_the_rest_applies(tmp_path, caplog):
    path, cfg, envoy, steps = make_live(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["bridge"] = {"metrics_port": 19555}
    raw["listeners"][0]["routes"] = raw["listeners"][0]["routes"][:1]
    path.write_text(yaml.safe_dump(raw))
    assert asyncio.run(cfg.reload())
    [restart] = [r.fields for r in caplog.records if r.getMessage() == "reload_needs_restart"]
    assert restart["settings"] == ["metrics_port"]
    assert len(cfg.config.listeners[0].routes) == 1
