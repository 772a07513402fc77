"""bridge/config/model.py: the example configs load; every error names the file, the path and the problem."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from metabridge.sdk.codec import DEFAULT_MAX_FRAME_SIZE
from metabridge.config.model import Config, ConfigError, HeaderMatch, WeightedCluster, load, parse, parse_duration, parse_size

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))

MINIMAL = {
    "codecs": {"demo": {"ref": "demo.py:Demo"}},
    "listeners": [
        {
            "name": "front",
            "port": 15000,
            "codec": "demo",
            "routes": [
                {"name": "cmd-1", "match": {"headers": [{"name": "cmd", "exact": "1"}]}, "route": {"cluster": "one"}},
                {"route": {"weighted_clusters": [{"name": "one", "weight": 3}, {"name": "two", "weight": 1}]}},
            ],
        }
    ],
    "clusters": [
        {"name": "one", "endpoints": [{"address": "127.0.0.1", "port": 16001}]},
        {"name": "two", "endpoints": [{"address": "127.0.0.1", "port": 16002}]},
    ],
}


def minimal() -> dict:
    return copy.deepcopy(MINIMAL)


def write(tmp_path: Path, raw_or_text, name: str = "metabridge.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw_or_text if isinstance(raw_or_text, str) else yaml.safe_dump(raw_or_text, sort_keys=False))
    return path


def load_error(tmp_path: Path, raw_or_text) -> tuple[Path, str]:
    path = write(tmp_path, raw_or_text)
    with pytest.raises(ConfigError) as info:
        load(path)
    return path, str(info.value)


def assert_names(message: str, path: Path, where: str, *problem: str) -> None:
    """The message has a line naming the file and the path inside it, and says what is wrong."""
    line = next((line for line in message.splitlines() if f"{path}: {where}:" in line), None)
    assert line is not None, f"no line naming '{path}: {where}:' in:\n{message}"
    for words in problem:
        assert words in line, f"{words!r} not in {line!r}"


# ---- what loads ---------------------------------------------------------------------------------


def test_there_are_example_configs():
    assert ROOT / "examples" / "awesomerpc.yaml" in EXAMPLES


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_load(example):
    config = load(example)
    assert config.source == str(example)
    assert config.base_dir == example.parent
    assert config.listeners, "an example without listeners shows nothing"
    for listener in config.listeners:
        assert listener.codec in config.codecs
        assert listener.port > 0


def test_awesomerpc_example_values():
    config = load(ROOT / "examples" / "awesomerpc.yaml")
    listener = config.listener("awesomerpc")
    assert (listener.address, listener.port, listener.codec) == ("127.0.0.1", 10000, "awesomerpc")
    assert listener.max_frame_size == 1024 * 1024
    assert (listener.request_timeout, listener.idle_timeout) == (5.0, 600.0)
    assert [r.name for r in listener.routes] == ["cmd-2-to-v2", "cmd-1-split-80-20", "cmd-3-tagged"]
    assert listener.routes[0].headers == (HeaderMatch("cmd", "exact", "2"),)
    assert listener.routes[1].clusters == (WeightedCluster("awesomerpc-v1", 80), WeightedCluster("awesomerpc-v2", 20))
    assert listener.routes[2].request_mutation == {"cmd": "30"}
    assert set(config.clusters) == {"awesomerpc-v1", "awesomerpc-v2"}
    assert config.codecs["awesomerpc"].ref == "../codecs/awesomerpc.py:AwesomeRpcCodec"
    assert config.message_timeout == 5.0
    with pytest.raises(KeyError):
        config.listener("nope")


def test_defaults_of_a_minimal_config(tmp_path):
    config = load(write(tmp_path, minimal()))
    listener = config.listeners[0]
    assert listener.address == "127.0.0.1"
    assert listener.max_frame_size == DEFAULT_MAX_FRAME_SIZE
    assert (listener.request_timeout, listener.idle_timeout, listener.tunnel_setup_timeout) == (30.0, 3600.0, 10.0)
    assert listener.routes[1].name == "route1"  # unnamed routes get their index
    assert listener.routes[0].clusters == (WeightedCluster("one", 1),)
    assert (config.workers, config.log_level, config.envoy_admin_port) == (1, "info", 9901)
    assert config.clusters["one"].connect_timeout == 1.0 and config.clusters["one"].health_check is None


def test_every_option_is_read(tmp_path):
    raw = minimal()
    raw["bridge"] = {"listen": "127.0.0.1:9100", "workers": 2, "metrics_port": 9200, "log_level": "debug"}
    raw["envoy"] = {"admin_address": "127.0.0.2", "admin_port": 0, "message_timeout": "750ms", "concurrency": 2}
    raw["codecs"]["demo"]["options"] = {"strict": True}
    raw["listeners"][0].update(
        {"address": "127.0.0.3", "max_frame_size": "64 KiB", "request_timeout": "1.5s", "idle_timeout": "2m", "tunnel_setup_timeout": "250ms", "tunnels_per_cluster": 4}
    )
    raw["listeners"][0]["routes"][0]["request_mutation"] = [{"key": "x-a", "value": "1"}]
    raw["listeners"][0]["routes"][0]["response_mutation"] = [{"key": "x-b", "value": "2"}]
    raw["clusters"][0].update(
        {
            "connect_timeout": "100ms",
            "lb_policy": "RING_HASH",
            "circuit_breakers": {"max_connections": 8, "max_pending_requests": 4},
            "health_check": {"interval": "2s", "timeout": "500ms", "unhealthy_threshold": 3, "healthy_threshold": 2},
        }
    )
    config = load(write(tmp_path, raw))
    assert (config.bridge_listen, config.workers, config.metrics_port, config.log_level) == ("127.0.0.1:9100", 2, 9200, "debug")
    assert (config.envoy_admin_address, config.envoy_admin_port, config.message_timeout, config.envoy_concurrency) == ("127.0.0.2", 0, 0.75, 2)
    assert config.codecs["demo"].options == {"strict": True}
    listener = config.listeners[0]
    assert (listener.address, listener.max_frame_size, listener.request_timeout, listener.idle_timeout) == ("127.0.0.3", 65536, 1.5, 120.0)
    assert (listener.tunnel_setup_timeout, listener.tunnels_per_cluster) == (0.25, 4)
    assert listener.routes[0].request_mutation == {"x-a": "1"} and listener.routes[0].response_mutation == {"x-b": "2"}
    one = config.clusters["one"]
    assert (one.connect_timeout, one.lb_policy, one.max_connections, one.max_pending_requests) == (0.1, "RING_HASH", 8, 4)
    assert (one.health_check.interval, one.health_check.timeout, one.health_check.unhealthy_threshold, one.health_check.healthy_threshold) == (2.0, 0.5, 3, 2)


def test_every_matcher_kind_is_read(tmp_path):
    raw = minimal()
    raw["listeners"][0]["routes"][0]["match"]["headers"] = [
        {"name": "a", "exact": "1"},
        {"name": "b", "prefix": "p", "invert": True},
        {"name": "c", "suffix": "s"},
        {"name": "d", "regex": "r.*"},
        {"name": "e", "present": False},
    ]
    headers = load(write(tmp_path, raw)).listeners[0].routes[0].headers
    assert headers == (
        HeaderMatch("a", "exact", "1"),
        HeaderMatch("b", "prefix", "p", True),
        HeaderMatch("c", "suffix", "s"),
        HeaderMatch("d", "regex", "r.*"),
        HeaderMatch("e", "present", False),
    )


# ---- what does not, and how it says so --------------------------------------------------------


def test_yaml_syntax_error(tmp_path):
    path, message = load_error(tmp_path, "codecs:\n  demo: {ref: x\nlisteners: []\n")
    assert message.startswith(f"{path}: not valid YAML:")
    assert "line 3" in message  # where the parser gave up


def test_empty_file(tmp_path):
    path, message = load_error(tmp_path, "")
    assert_names(message, path, "(top level)", "None is not of type 'object'")


def test_unknown_top_level_key(tmp_path):
    raw = minimal()
    raw["routes"] = []
    path, message = load_error(tmp_path, raw)
    assert_names(message, path, "(top level)", "unknown key 'routes'")


def test_unknown_nested_key(tmp_path):
    raw = minimal()
    raw["listeners"][0]["timeout"] = "5s"
    path, message = load_error(tmp_path, raw)
    assert_names(message, path, "listeners[0]", "unknown key 'timeout'")


@pytest.mark.parametrize(
    ("drop", "where", "key"),
    [
        (lambda raw: raw.pop("clusters"), "(top level)", "'clusters'"),
        (lambda raw: raw["listeners"][0].pop("port"), "listeners[0]", "'port'"),
        (lambda raw: raw["clusters"][1].pop("endpoints"), "clusters[1]", "'endpoints'"),
        (lambda raw: raw["codecs"]["demo"].pop("ref"), "codecs.demo", "'ref'"),
        (lambda raw: raw["listeners"][0]["routes"][0].pop("route"), "listeners[0].routes[0]", "'route'"),
    ],
)
def test_missing_required_key(tmp_path, drop, where, key):
    raw = minimal()
    drop(raw)
    path, message = load_error(tmp_path, raw)
    assert_names(message, path, where, key, "is a required property")


@pytest.mark.parametrize(
    ("change", "where", "problem"),
    [
        (lambda raw: raw["listeners"][0].update(port="15000"), "listeners[0].port", "'15000' is not of type 'integer'"),
        (lambda raw: raw["listeners"][0].update(port=70000), "listeners[0].port", "70000 is greater than the maximum"),
        (lambda raw: raw.update(listeners={"name": "front"}), "listeners", "is not of type 'array'"),
        (lambda raw: raw["clusters"][0]["endpoints"][0].update(port=None), "clusters[0].endpoints[0].port", "None is not of type 'integer'"),
        (lambda raw: raw["listeners"][0]["routes"][0]["match"]["headers"][0].update(exact=1), "listeners[0].routes[0].match.headers[0].exact", "1 is not of type 'string'"),
        (lambda raw: raw.update(bridge={"workers": "2"}), "bridge.workers", "'2' is not of type 'integer'"),
        (lambda raw: raw["clusters"][0].update(lb_policy="FASTEST"), "clusters[0].lb_policy", "'FASTEST' is not one of"),
    ],
)
def test_wrong_type_or_value(tmp_path, change, where, problem):
    raw = minimal()
    change(raw)
    path, message = load_error(tmp_path, raw)
    assert_names(message, path, where, problem)


@pytest.mark.parametrize("text", ["5", "5 s", "5sec", "-1s", "1d", "s", "1.s", "5s\n", "\n5s"])
def test_bad_duration(tmp_path, text):
    raw = minimal()
    raw["listeners"][0]["request_timeout"] = text
    path, message = load_error(tmp_path, raw)
    assert_names(message, path, "listeners[0].request_timeout", repr(text))


@pytest.mark.parametrize("value", ["1 MB", "1.5MiB", "-1", "MiB", "0", "0 KiB", "1MiB\n", 0, -5])
def test_bad_size(tmp_path, value):
    raw = minimal()
    raw["listeners"][0]["max_frame_size"] = value
    path, message = load_error(tmp_path, raw)
    assert_names(message, path, "listeners[0].max_frame_size", repr(value))


def test_bad_duration_in_a_cluster_health_check(tmp_path):
    raw = minimal()
    raw["clusters"][1]["health_check"] = {"interval": "often"}
    path, message = load_error(tmp_path, raw)
    assert_names(message, path, "clusters[1].health_check.interval", "'often'")


def test_duplicate_listener_name(tmp_path):
    raw = minimal()
    raw["listeners"].append({**copy.deepcopy(raw["listeners"][0]), "port": 15001})
    path, message = load_error(tmp_path, raw)
    assert_names(message, path, "listeners[1].name", "duplicate listener name 'front'")


def test_duplicate_cluster_name(tmp_path):
    raw = minimal()
    raw["clusters"].append(copy.deepcopy(raw["clusters"][0]))
    path, message = load_error(tmp_path, raw)
    assert_names(message, path, "clusters[2].name", "duplicate cluster name 'one'")


def test_duplicate_port(tmp_path):
    raw = minimal()
    raw["listeners"].append({**copy.deepcopy(raw["listeners"][0]), "name": "back"})
    path, message = load_error(tmp_path, raw)
    assert_names(message, path, "listeners[1].port", "127.0.0.1:15000 is used by another listener")


def test_same_port_on_other_addresses_or_port_zero_is_fine(tmp_path):
    raw = minimal()
    raw["listeners"].append({**copy.deepcopy(raw["listeners"][0]), "name": "back", "address": "127.0.0.2"})
    raw["listeners"].append({**copy.deepcopy(raw["listeners"][0]), "name": "ephemeral-1", "port": 0})
    raw["listeners"].append({**copy.deepcopy(raw["listeners"][0]), "name": "ephemeral-2", "port": 0})
    assert [listener.name for listener in load(write(tmp_path, raw)).listeners] == ["front", "back", "ephemeral-1", "ephemeral-2"]


def test_unknown_codec_for_a_listener(tmp_path):
    raw = minimal()
    raw["listeners"][0]["codec"] = "thrift"
    path, message = load_error(tmp_path, raw)
    assert_names(message, path, "listeners[0].codec", "unknown codec 'thrift'", "known: demo")


def test_invalid_regex(tmp_path):
    raw = minimal()
    raw["listeners"][0]["routes"][0]["match"]["headers"] = [{"name": "op", "regex": "get(User"}]
    path, message = load_error(tmp_path, raw)
    assert_names(message, path, "listeners[0].routes[0].match.headers[0].regex", "invalid regular expression", "missing )")


def test_matcher_with_two_kinds(tmp_path):
    raw = minimal()
    raw["listeners"][0]["routes"][0]["match"]["headers"] = [{"name": "op", "exact": "a", "prefix": "b"}]
    path, message = load_error(tmp_path, raw)
    assert_names(message, path, "listeners[0].routes[0].match.headers[0]", "give exactly one of exact, prefix, suffix, regex, present; this has exact and prefix")


@pytest.mark.parametrize(
    ("action", "has"),
    [({}, "none"), ({"cluster": "one", "weighted_clusters": [{"name": "one", "weight": 1}]}, "cluster and weighted_clusters")],
)
def test_a_route_action_needs_exactly_one_target(tmp_path, action, has):
    raw = minimal()
    raw["listeners"][0]["routes"][0]["route"] = action
    path, message = load_error(tmp_path, raw)
    assert message.splitlines()[1].startswith(f"  {path}: listeners[0].routes[0].route: give exactly one of cluster, weighted_clusters; this has {has} (line ")


@pytest.mark.parametrize("weights", [[0, 0], [0], [0, 0, 0]])
def test_weighted_clusters_adding_up_to_zero(tmp_path, weights):
    raw = minimal()
    raw["listeners"][0]["routes"][1]["route"] = {"weighted_clusters": [{"name": f"c{i}", "weight": w} for i, w in enumerate(weights)]}
    path, message = load_error(tmp_path, raw)
    assert_names(message, path, "listeners[0].routes[1].route.weighted_clusters", "weights add up to 0")


def test_some_zero_weights_are_fine(tmp_path):
    raw = minimal()
    raw["listeners"][0]["routes"][1]["route"] = {"weighted_clusters": [{"name": "one", "weight": 0}, {"name": "two", "weight": 5}]}
    assert load(write(tmp_path, raw)).listeners[0].routes[1].clusters == (WeightedCluster("one", 0), WeightedCluster("two", 5))


@pytest.mark.parametrize("listen", ["localhost", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:0", "127.0.0.1:70000", "unix:"])
def test_bad_bridge_listen(tmp_path, listen):
    raw = minimal()
    raw["bridge"] = {"listen": listen}
    path, message = load_error(tmp_path, raw)
    assert_names(message, path, "bridge.listen", repr(listen))


def test_worker_ports_past_65535(tmp_path):
    raw = minimal()
    raw["bridge"] = {"listen": "127.0.0.1:65534", "workers": 3}
    path, message = load_error(tmp_path, raw)
    assert_names(message, path, "bridge.listen", "65536")


def test_several_problems_are_reported_together(tmp_path):
    raw = minimal()
    raw["listeners"][0]["codec"] = "nope"
    raw["clusters"].append(copy.deepcopy(raw["clusters"][0]))
    _, message = load_error(tmp_path, raw)
    assert "unknown codec 'nope'" in message and "duplicate cluster name 'one'" in message


def test_missing_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}: cannot read config file: No such file or directory"


def test_unreadable_file(tmp_path):
    # A folder cannot be read as a file, even by root (who ignores permission bits).
    path = tmp_path / "folder.yaml"
    path.mkdir()
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}: cannot read config file: Is a directory"


def test_parse_without_a_file_names_its_source():
    raw = minimal()
    raw["listeners"][0]["port"] = "x"
    with pytest.raises(ConfigError, match=r"inline: listeners\[0\]\.port:"):
        parse(raw, "inline")


# ---- durations, sizes, worker addresses ---------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("0ms", 0.0), ("5s", 5.0), ("1.5s", 1.5), ("2m", 120.0), ("0.5m", 30.0), ("1h", 3600.0), ("10ms", 0.01)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "ms", "5 s", "-5s", "5S", "1d", "1.5.5s", "5s\n", " 5s"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "size"),
    [(4194304, 4194304), ("4194304", 4194304), ("10B", 10), ("512 KiB", 512 * 1024), ("4MiB", 4 * 1024**2), ("1GiB", 1024**3), ("1 B", 1)],
)
def test_parse_size(value, size):
    assert parse_size(value) == size


@pytest.mark.parametrize("value", ["", "MiB", "1MB", "1.5MiB", "-1", "4 mib", "1MiB\n", "4  MiB", "0", 0, True])
def test_parse_size_rejects(value):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(value)


def config_with(listen: str, workers: int) -> Config:
    raw = minimal()
    raw["bridge"] = {"listen": listen, "workers": workers}
    return parse(raw)


@pytest.mark.parametrize(
    ("listen", "workers", "addresses"),
    [
        ("unix:/run/mb.sock", 1, ["unix:/run/mb.sock"]),
        ("unix:/run/mb.sock", 3, ["unix:/run/mb.sock.0", "unix:/run/mb.sock.1", "unix:/run/mb.sock.2"]),
        ("127.0.0.1:9100", 1, ["127.0.0.1:9100"]),
        ("127.0.0.1:9100", 3, ["127.0.0.1:9100", "127.0.0.1:9101", "127.0.0.1:9102"]),
        ("[::1]:9100", 3, ["[::1]:9100", "[::1]:9101", "[::1]:9102"]),
    ],
)
def test_worker_addresses(listen, workers, addresses):
    assert config_with(listen, workers).worker_addresses() == addresses


def test_default_bridge_address_is_a_unix_socket():
    assert parse(minimal()).worker_addresses() == ["unix:/tmp/metabridge.sock"]


DURATION_FORMS = "(accepted: a number and a unit (ms, s, m or h): 250ms, 5s, 1m, 1.5h)"
SIZE_FORMS = "(accepted: bytes, or a whole number with B, KiB, MiB or GiB: 65536, 64KiB, 4MiB)"


def test_schema_errors_say_the_accepted_forms_and_the_nearest_key():
    raw = {
        "codecs": {"a": {"ref": "x.py:A"}},
        "listeners": [{"name": "l", "port": 1, "codec": "a", "routes": [], "request_timout": "5s", "max_frame_size": "1MB", "idle_timeout": "5 s"}],
        "clusters": [],
    }
    with pytest.raises(ConfigError) as caught:
        parse(raw, "x.yaml")
    assert str(caught.value).splitlines() == [
        "invalid config:",
        "  x.yaml: listeners[0]: unknown key 'request_timout' (did you mean 'request_timeout'?); valid keys: address, codec, drain_probe_interval, filters, "
        "frame_timeout, idle_timeout, max_client_buffer, max_frame_size, max_requests_in_flight, max_upstream_queue, name, port, rds, request_timeout, routes, "
        "tunnel_setup_timeout, tunnels_per_cluster",
        f"  x.yaml: listeners[0].idle_timeout: '5 s' is not a duration: no space between the number and the unit: 5s {DURATION_FORMS}",
        f"  x.yaml: listeners[0].max_frame_size: '1MB' is not a size: use 1MiB or 1000000 {SIZE_FORMS}",
    ]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("1MB", "'1MB' is not a size: use 1MiB or 1000000"),
        ("4kb", "'4kb' is not a size: use 4KiB or 4000"),
        ("4 mib", "'4 mib' is not a size: units are written MiB: 4MiB"),
        ("1.5MiB", "'1.5MiB' is not a size: it must be a whole number; use 1536KiB"),
        ("4  MiB", "'4  MiB' is not a size: one space at most between the number and the unit: 4MiB"),
        ("1TiB", "'1TiB' is not a size: unknown unit 'TiB'"),
        ("MiB", "'MiB' is not a size: it needs a number, e.g. 4MiB"),
        ("1MiB\n", "'1MiB\\n' is not a size: remove the spaces or line breaks around it: 1MiB"),
        ("0", "'0' is not a size: it must be at least 1 byte"),
        (0, "0 is not a size: it must be at least 1 byte"),
        (-5, "-5 is not a size: it must be at least 1 byte"),
        (1.5, "1.5 is not a size: it must be a whole number of bytes"),
        ("lots", "'lots' is not a size"),
    ],
)
def test_size_errors_say_what_is_wrong_and_the_accepted_forms(tmp_path, value, problem):
    raw = minimal()
    raw["listeners"][0]["max_frame_size"] = value
    path, message = load_error(tmp_path, raw)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "max_frame_size" in text)
    assert message.splitlines()[1:] == [f"  {path}: listeners[0].max_frame_size: {problem} {SIZE_FORMS} (line {line})"]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("5", "'5' is not a duration: it needs a unit, e.g. 5s or 5ms"),
        (5000, "5000 is not a duration: it needs a unit, e.g. 5000s or 5000ms"),
        ("5 s", "'5 s' is not a duration: no space between the number and the unit: 5s"),
        ("5S", "'5S' is not a duration: units are lower case: 5s"),
        ("5sec", "'5sec' is not a duration: use 5s"),
        ("2 minutes", "'2 minutes' is not a duration: use 2m"),
        ("1d", "'1d' is not a duration: use 24h"),
        ("-1s", "'-1s' is not a duration: a duration cannot be negative"),
        ("10us", "'10us' is not a duration: unknown unit 'us'"),
        ("5s\n", "'5s\\n' is not a duration: remove the spaces or line breaks around it: 5s"),
        ("often", "'often' is not a duration"),
    ],
)
def test_duration_errors_say_what_is_wrong_and_the_accepted_forms(tmp_path, value, problem):
    raw = minimal()
    raw["clusters"][1]["health_check"] = {"interval": value}
    path, message = load_error(tmp_path, raw)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "interval" in text)
    assert message.splitlines()[1:] == [f"  {path}: clusters[1].health_check.interval: {problem} {DURATION_FORMS} (line {line})"]


def test_no_error_shows_a_regular_expression(tmp_path):
    raw = minimal()
    raw["listeners"][0].update(name="front door", request_timeout="soon", max_frame_size="big")
    raw["clusters"][0]["name"] = "one/two"
    _, message = load_error(tmp_path, raw)
    assert "^" not in message and "\\Z" not in message and "does not match" not in message
    assert "'front door' is not a name: use letters, digits, '_', '.' and '-'" in message
    assert "'one/two' is not a name" in message


@pytest.mark.parametrize(
    ("change", "where", "problem"),
    [
        (lambda raw: raw["listeners"][0].update(idle_timout="5s"), "listeners[0]", "unknown key 'idle_timout' (did you mean 'idle_timeout'?); valid keys: "),
        (lambda raw: raw.update(cluster=[]), "(top level)", "unknown key 'cluster' (did you mean 'clusters'?); valid keys: bridge, clusters, codecs, envoy, listeners"),
        (lambda raw: raw["clusters"][0].update(lb_polcy="RANDOM"), "clusters[0]", "unknown key 'lb_polcy' (did you mean 'lb_policy'?)"),
        (lambda raw: raw["codecs"]["demo"].update(option={}), "codecs.demo", "unknown key 'option' (did you mean 'options'?); valid keys: options, ref"),
        (lambda raw: raw["listeners"][0]["routes"][0]["route"].update(timeout="1s"), "listeners[0].routes[0].route", "unknown key 'timeout'; valid keys: cluster, weighted_clusters"),
    ],
)
def test_unknown_keys_name_the_nearest_valid_one_and_their_line(tmp_path, change, where, problem):
    raw = minimal()
    change(raw)
    path, message = load_error(tmp_path, raw)
    key = problem.split("'")[1]
    line = [n for n, text in enumerate(path.read_text().splitlines(), 1) if text.lstrip(" -").startswith(f"{key}:")][-1]  # the added key is the last
    assert_names(message, path, where, problem, f"(line {line})")


@pytest.mark.parametrize(
    ("change", "where", "name", "hint"),
    [
        (lambda route: route.update(route={"cluster": "onee"}), "listeners[0].routes[0].route.cluster", "onee", " (did you mean 'one'?)"),
        (lambda route: route.update(route={"weighted_clusters": [{"name": "one", "weight": 1}, {"name": "tow", "weight": 1}]}), "listeners[0].routes[0].route.weighted_clusters[1].name", "tow", " (did you mean 'two'?)"),
        (lambda route: route.update(request_mirror_policies=[{"cluster": "shadow"}]), "listeners[0].routes[0].request_mirror_policies[0].cluster", "shadow", ""),
    ],
    ids=["route", "weighted", "mirror"],
)
def test_a_route_naming_an_undefined_cluster_is_an_error(tmp_path, change, where, name, hint):
    raw = minimal()
    change(raw["listeners"][0]["routes"][0])
    path, message = load_error(tmp_path, raw)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if name in text)
    assert message.splitlines()[1:] == [f"  {path}: {where}: unknown cluster {name!r}{hint}; define it under 'clusters' (known: one, two) (line {line})"]


def test_an_undefined_cluster_without_any_cluster_defined(tmp_path):
    raw = minimal()
    raw["clusters"] = []
    raw["listeners"][0]["routes"] = [{"route": {"cluster": "one"}}]
    path, message = load_error(tmp_path, raw)
    assert_names(message, path, "listeners[0].routes[0].route.cluster", "unknown cluster 'one'; define it under 'clusters' (there are no clusters)")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("round_robin", "'round_robin' is not one of ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV (did you mean 'ROUND_ROBIN'?)"),
        ("FASTEST", "'FASTEST' is not one of ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV"),
    ],
)
def test_a_value_not_among_the_choices_suggests_the_nearest(tmp_path, value, problem):
    raw = minimal()
    raw["clusters"][0]["lb_policy"] = value
    path, message = load_error(tmp_path, raw)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "lb_policy" in text)
    assert message.splitlines()[1:] == [f"  {path}: clusters[0].lb_policy: {problem} (line {line})"]


def test_an_unknown_codec_suggests_the_nearest(tmp_path):
    raw = minimal()
    raw["listeners"][0]["codec"] = "dmeo"
    path, message = load_error(tmp_path, raw)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "dmeo" in text)
    assert message.splitlines()[1:] == [f"  {path}: listeners[0].codec: unknown codec 'dmeo' (did you mean 'demo'?); define it under 'codecs' (known: demo) (line {line})"]


def test_config_knows_the_line_of_each_path(tmp_path):
    config = load(write(tmp_path, minimal()))
    text = write(tmp_path, minimal()).read_text().splitlines()
    assert config.at("codecs.demo.ref") == f" (line {next(n for n, t in enumerate(text, 1) if 'ref:' in t)})"
    assert config.at("clusters[1].endpoints[0].port") == f" (line {next(n for n, t in enumerate(text, 1) if 'port: 16002' in t)})"
    assert config.at("clusters[1].no_such_key") == config.at("clusters[1]")  # the deepest part the file has
    assert parse(minimal()).at("codecs.demo.ref") == ""  # no file, no line


def test_errors_name_the_line_in_the_file(tmp_path):
    path = tmp_path / "lines.yaml"
    path.write_text(
        "codecs: {a: {ref: x.py:A}}\n"
        "listeners:\n"
        "  - name: l\n"
        "    port: 1\n"
        "    codec: b\n"
        "    routes: []\n"
        "    idel_timeout: 5s\n"
        "clusters: []\n"
    )
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert "listeners[0]: unknown key 'idel_timeout' (did you mean 'idle_timeout'?)" in str(caught.value)
    assert str(caught.value).splitlines()[1].endswith("(line 7)")
    path.write_text(path.read_text().replace("    idel_timeout: 5s\n", ""))
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert "listeners[0].codec: unknown codec 'b'" in str(caught.value) and str(caught.value).endswith("(line 5)")


def test_bridge_grpc_limits_become_the_grpc_servers_keywords():
    raw = yaml.safe_load((ROOT / "examples" / "awesomerpc.yaml").read_text())
    raw["bridge"]["grpc"] = {
        "max_concurrent_streams": 10,
        "max_header_list_size": "32KiB",
        "max_message_size": "8MiB",
        "reset_rate": {"burst": 50, "per_second": 5},
    }
    config = parse(raw, "x.yaml", ROOT / "examples")
    assert config.grpc_limits == {"max_concurrent_streams": 10, "max_header_list_size": 32768, "max_message": 8 * 1024 * 1024, "reset_burst": 50, "reset_rate": 5.0}
    from metabridge.transport.grpc_server import GrpcServer

    server = GrpcServer({}, **config.grpc_limits)  # every key is one the server takes
    assert server.max_message == 8 * 1024 * 1024
