"""bridge/core/runtime.py reload_routes: on SIGHUP a changed codec file serves later connections,
open ones keep theirs, and a codec that does not load is refused while the routes still reload."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import pytest
import yaml

from metabridge.config.model import CodecConfig, load
from metabridge.core.runtime import build_runtimes, reload_routes
from tests.unit.connection_harness import AwesomeRpcCodec, Harness, encode_frame, in_loop, route

CODEC = '''
from metabridge.codecs.awesomerpc import AwesomeRpcCodec


class Versioned(AwesomeRpcCodec):
    version = {version}
{extra}'''


def codec_text(version: int, extra: str = "") -> str:
    return CODEC.format(version=version, extra=extra)


@pytest.fixture
def setup(tmp_path):
    """A config file with one listener whose codec is the file versioned.py; yields
    (config path, codec path, runtimes) and forgets the codec modules afterwards."""
    before = set(sys.modules)
    codec = tmp_path / "versioned.py"
    codec.write_text(codec_text(1))
    raw = {
        "codecs": {"versioned": {"ref": "versioned.py:Versioned"}},
        "listeners": [{"name": "front", "port": 15000, "codec": "versioned", "routes": [{"name": "r1", "route": {"cluster": "one"}}]}],
        "clusters": [{"name": "one", "endpoints": [{"address": "127.0.0.1", "port": 16001}]}],
    }
    path = tmp_path / "metabridge.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    yield path, codec, build_runtimes(load(path))
    for name in set(sys.modules) - before:
        if name.startswith("_metabridge_codec_"):
            del sys.modules[name]


def events(caplog, name: str) -> list[dict]:
    return [record.fields for record in caplog.records if record.getMessage() == name]


def rename_route(path: Path, name: str) -> None:
    raw = yaml.safe_load(path.read_text())
    raw["listeners"][0]["routes"][0]["name"] = name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_a_changed_codec_serves_later_connections_and_open_ones_keep_theirs(setup, caplog):
    path, codec, runtimes = setup
    runtime = runtimes["front"]
    opened = runtime.codecs  # what a connection open before the reload makes its codecs from
    codec.write_text(codec_text(2))
    with caplog.at_level(logging.INFO, "metabridge.runtime"):
        reload_routes(runtimes, functools.partial(load, path), str(path))
    assert runtime.new_codec().version == 2
    assert opened.new().version == 1 and type(opened.new()) is opened.cls
    [reloaded] = events(caplog, "codec_reloaded")
    assert reloaded == {"listener": "front", "codec": "versioned", "ref": "versioned.py:Versioned", "file": str(codec), "module": runtime.codec_cls.__module__}
    assert events(caplog, "routes_reloaded"), "the routes are re-read as well"


def test_an_unchanged_codec_is_kept_as_it_is(setup, caplog):
    path, _, runtimes = setup
    before = runtimes["front"].codec_cls
    with caplog.at_level(logging.INFO, "metabridge.runtime"):
        reload_routes(runtimes, functools.partial(load, path), str(path))
    assert runtimes["front"].codec_cls is before and not events(caplog, "codec_reloaded")


@pytest.mark.parametrize(
    ("source", "error"),
    [
        ("class Versioned(:\n", "SyntaxError"),
        ("import mb_codec_dependency_not_installed\n", "ModuleNotFoundError: No module named 'mb_codec_dependency_not_installed'"),
        ("class Versioned:\n    has_request_id = True\n\n    def decode(self, buffer, metadata):\n        return None\n", "Versioned does not implement the codec contract: missing encode, on_error"),
        (codec_text(3, "\n    def __init__(self, **kwargs):\n        raise ValueError('option mode is required')\n"), "codecs.versioned.options: ValueError: option mode is required"),
    ],
    ids=["syntax-error", "import-error", "contract-violation", "options-refused"],
)
def test_a_codec_that_does_not_load_is_refused_and_the_old_one_stays(setup, caplog, source, error):
    path, codec, runtimes = setup
    runtime = runtimes["front"]
    codec.write_text(source)
    rename_route(path, "renamed")
    with caplog.at_level(logging.INFO, "metabridge.runtime"):
        reload_routes(runtimes, functools.partial(load, path), str(path))
    assert runtime.new_codec().version == 1
    [refused] = events(caplog, "codec_reload_failed_keeping_old_codec")
    assert (refused["listener"], refused["codec"], refused["file"]) == ("front", "versioned", str(codec))
    assert error in refused["error"], refused["error"]
    assert not events(caplog, "codec_reloaded")
    assert [r.name for r in runtime.config.routes] == ["renamed"], "the routes reload all the same"
    # Fixed, the next reload takes it.
    codec.write_text(codec_text(4))
    reload_routes(runtimes, functools.partial(load, path), str(path))
    assert runtime.new_codec().version == 4


def set_codec_options(path: Path, options: dict) -> None:
    raw = yaml.safe_load(path.read_text())
    raw["codecs"]["versioned"]["options"] = options
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_config_dump_shows_the_codec_a_reload_loaded_not_one_it_refused(setup):
    from metabridge.admin import config_dump

    path, codec, runtimes = setup
    start = load(path)
    codec.write_text(codec_text(2, "\n    def __init__(self, **kwargs):\n        super().__init__(**kwargs)\n        if self.options.get('mode') not in ('a', 'b'):\n            raise ValueError('mode must be a or b')\n"))
    set_codec_options(path, {"mode": "b"})
    reload_routes(runtimes, functools.partial(load, path), str(path))
    assert config_dump(start, runtimes)["codecs"]["versioned"]["options"] == {"mode": "b"}
    set_codec_options(path, {"mode": "z"})  # refused: mode b stays in force
    reload_routes(runtimes, functools.partial(load, path), str(path))
    assert runtimes["front"].codec_options == {"mode": "b"}
    assert config_dump(start, runtimes)["codecs"]["versioned"] == {"name": "versioned", "ref": "versioned.py:Versioned", "options": {"mode": "b"}}


def test_one_import_per_codec_however_many_listeners_use_it(setup):
    path, codec, _ = setup
    raw = yaml.safe_load(path.read_text())
    raw["listeners"].append({**raw["listeners"][0], "name": "back", "port": 15001})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    runtimes = build_runtimes(load(path))
    codec.write_text(codec_text(2))
    reload_routes(runtimes, functools.partial(load, path), str(path))
    assert runtimes["front"].codec_cls is runtimes["back"].codec_cls and runtimes["back"].codec_cls.version == 2


def test_a_new_cluster_is_reported_as_needing_envoy_restarted(setup, caplog):
    path, _, runtimes = setup
    raw = yaml.safe_load(path.read_text())
    raw["clusters"].append({"name": "two", "endpoints": [{"address": "127.0.0.1", "port": 16002}]})
    raw["listeners"][0]["routes"][0]["route"] = {"cluster": "two"}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with caplog.at_level(logging.INFO, "metabridge.runtime"):
        reload_routes(runtimes, functools.partial(load, path), str(path))
    [restart] = [fields for fields in events(caplog, "reload_needs_restart") if "cluster" in fields]
    assert restart["cluster"] == "two" and "new cluster" in restart["hint"] and "CLUSTER_NOT_FOUND" in restart["hint"]
    assert runtimes["front"].config.routes[0].clusters[0].name == "two"


@in_loop
async def test_an_open_connection_opens_its_later_tunnels_with_the_codec_it_started_with():
    class V1(AwesomeRpcCodec):
        version = 1

    class V2(V1):
        version = 2

    h = Harness(routes=(route("cmd-1", "1", "c1"), route("cmd-2", "2", "c2")), codec_cls=V1)
    h.read(encode_frame(1, 1, b"a"))  # a tunnel to c1
    h.runtime.use_codec(V2, CodecConfig("v2", "v2"))  # what a reload does
    h.read(encode_frame(2, 2, b"b"))  # a tunnel to c2, opened after the reload
    assert type(h.session.codec) is V1
    assert sorted(link.tunnel.cluster for link in h.session.pool.links()) == ["c1", "c2"]
    assert {type(link.codec) for link in h.session.pool.links()} == {V1}
    assert type(h.runtime.new_codec()) is V2, "a connection opened now gets the new codec"


def test_the_worker_supervisor_restarts_workers_from_the_reloaded_config(setup):
    from metabridge.runner import WorkerSupervisor

    path, _, _ = setup
    supervisor = WorkerSupervisor(load(path), ["unix:/nonexistent/a", "unix:/nonexistent/b"])
    rename_route(path, "after-reload")
    supervisor.reload()  # no worker is running: only the config a restarted one gets changes
    assert supervisor._config.listeners[0].routes[0].name == "after-reload"
    path.write_text("listeners: [")
    supervisor.reload()
    assert supervisor._config.listeners[0].routes[0].name == "after-reload", "a config that does not load is not taken"


def test_a_listener_switched_to_another_codec_gets_it_without_a_restart(setup, caplog):
    path, codec, runtimes = setup
    (codec.parent / "other.py").write_text(codec_text(7))
    raw = yaml.safe_load(path.read_text())
    raw["codecs"]["other"] = {"ref": "other.py:Versioned"}
    raw["listeners"][0]["codec"] = "other"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with caplog.at_level(logging.INFO, "metabridge.runtime"):
        reload_routes(runtimes, functools.partial(load, path), str(path))
    assert runtimes["front"].new_codec().version == 7
    assert [e["codec"] for e in events(caplog, "codec_reloaded")] == ["other"]
    assert not events(caplog, "reload_needs_restart")
