"""The `metabridge` command, run as `python -m metabridge.cli` in a subprocess as a user would run it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = "examples/awesomerpc.yaml"


def metabridge(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metabridge.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_clean_failure(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("metabridge: "), result.stderr
    for word in words:
        assert word in result.stderr, f"{word!r} not in {result.stderr!r}"


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        ((), ["run", "render", "validate", "health", "--log-level", "metabridge validate -c examples/awesomerpc.yaml"]),
        (("run",), ["--config", "--listen", "--with-envoy", "--envoy-bin", "--envoy-log-level"]),
        (("render",), ["--config", "--output", "--check", "--bridge-address", "--listener-address", "--admin-address", "--endpoint"]),
        (("validate",), ["--config", "--no-envoy"]),
        (("health",), ["--address", "--timeout"]),
    ],
    ids=["metabridge", "run", "render", "validate", "health"],
)
def test_help(args, mentions):
    result = metabridge(*args, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: metabridge")
    for option in mentions:
        assert option in result.stdout, f"{option!r} missing from {' '.join(args) or 'top-level'} --help"


def test_no_command_is_a_usage_error():
    result = metabridge()
    assert result.returncode == 2 and "usage: metabridge" in result.stderr and "Traceback" not in result.stderr


def test_validate_the_example_with_envoy():
    result = metabridge("validate", "-c", EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{EXAMPLE}: OK (1 listener(s), 2 cluster(s))"


def test_validate_refuses_routes_to_undefined_clusters(tmp_path):
    config = yaml.safe_load((ROOT / EXAMPLE).read_text())
    config["codecs"]["awesomerpc"]["ref"] = str(ROOT / "codecs" / "awesomerpc.py") + ":AwesomeRpcCodec"
    config["listeners"][0]["routes"][0]["route"] = {"cluster": "awesomrpc-v1"}
    config["listeners"][0]["routes"][1]["request_mirror_policies"] = [{"cluster": "shade"}]
    path = tmp_path / "ghost.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = metabridge("validate", "--no-envoy", "-c", str(path))
    assert_clean_failure(result, 2)
    lines = result.stderr.splitlines()
    assert lines[0] == "metabridge: invalid config:"
    route_line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "awesomrpc-v1" in text)
    mirror_line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "shade" in text)
    assert lines[1:] == [
        f"  {path}: listeners[0].routes[0].route.cluster: unknown cluster 'awesomrpc-v1' (did you mean 'awesomerpc-v1'?);"
        f" define it under 'clusters' (known: awesomerpc-v1, awesomerpc-v2) (line {route_line})",
        f"  {path}: listeners[0].routes[1].request_mirror_policies[0].cluster: unknown cluster 'shade';"
        f" define it under 'clusters' (known: awesomerpc-v1, awesomerpc-v2) (line {mirror_line})",
    ]
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("codecs: [\n", ["not valid YAML"]),
        (
            "codecs: {c: {ref: c.py:C}}\nlisteners: [{name: l, port: 15000, codec: nope, routes: []}]\nclusters: []\n",
            ["listeners[0].codec", "unknown codec 'nope'"],
        ),
        (
            "codecs: {c: {ref: missing.py:C}}\nlisteners: [{name: l, port: 15000, codec: c, routes: []}]\nclusters: []\n",
            ["codecs.c.ref", "no such file or folder"],
        ),
    ],
    ids=["yaml-syntax", "unknown-codec", "missing-codec-file"],
)
def test_validate_a_bad_config_exits_2_with_the_message(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert_clean_failure(metabridge("validate", "--no-envoy", "-c", str(path)), 2, str(path), *words)


def test_missing_config_file_exits_2(tmp_path):
    path = tmp_path / "absent.yaml"
    assert_clean_failure(metabridge("render", "-c", str(path)), 2, str(path), "cannot read config file")


def test_render_prints_yaml_with_the_listener():
    result = metabridge("render", "-c", EXAMPLE)
    assert result.returncode == 0, result.stderr
    bootstrap = yaml.safe_load(result.stdout)
    listeners = {listener["name"]: listener for listener in bootstrap["static_resources"]["listeners"]}
    assert listeners["awesomerpc"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 10000}
    clusters = {cluster["name"] for cluster in bootstrap["static_resources"]["clusters"]}
    assert {"awesomerpc-v1", "awesomerpc-v2"} <= clusters


def test_render_to_a_file_with_overrides(tmp_path):
    out = tmp_path / "bootstrap.yaml"
    result = metabridge("render", "-c", EXAMPLE, "-o", str(out), "--listener-address", "0.0.0.0", "--endpoint", "127.0.0.1:10001=127.0.0.1:20001")
    assert result.returncode == 0 and result.stdout == "", result.stderr
    text = out.read_text()
    listener = yaml.safe_load(text)["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["address"] == "0.0.0.0"
    assert "20001" in text and "10001" not in text


def test_render_with_a_bad_bridge_address_exits_2():
    assert_clean_failure(metabridge("render", "-c", EXAMPLE, "--bridge-address", "nohost"), 2, "'nohost'", "host:port")


def test_health_of_a_bridge_that_is_not_there():
    result = metabridge("health", "--address", "unix:/nonexistent", "--timeout", "1")
    assert_clean_failure(result, 1, "unix:/nonexistent", "not answering", "UNAVAILABLE")
    assert result.stdout == ""


def test_codec_rejecting_its_options_is_a_clean_config_error(tmp_path):
    (tmp_path / "picky.py").write_text(
        textwrap.dedent(
            """\
            from metabridge.sdk.codec import Codec


            class Picky(Codec):
                def __init__(self, **kwargs):
                    super().__init__(**kwargs)
                    if self.options.get("mode") not in ("a", "b"):
                        raise ValueError(f"picky codec option mode: {self.options.get('mode')!r} is not one of a, b")

                def decode(self, buffer, metadata):
                    return None

                def encode(self, metadata, mutation):
                    return metadata.frame

                def on_error(self, metadata, error):
                    return b""
            """
        )
    )
    path = tmp_path / "picky.yaml"
    path.write_text("codecs: {picky: {ref: picky.py:Picky, options: {mode: c}}}\nlisteners: [{name: l, port: 15000, codec: picky, routes: []}]\nclusters: []\n")
    assert_clean_failure(metabridge("validate", "--no-envoy", "-c", str(path)), 2, "codecs.picky", "mode")


def test_run_with_a_bad_listen_override_exits_2_before_serving():
    result = metabridge("run", "-c", "examples/awesomerpc.yaml", "--listen", "localhost", timeout=60)
    assert_clean_failure(result, 2, "--listen", "'localhost'", "HOST:PORT")


def test_the_bridge_raises_its_soft_open_file_limit_to_the_hard_one():
    import resource
    import subprocess
    import sys

    code = (
        "import resource; from metabridge.runner import raise_open_file_limit; "
        "raise_open_file_limit(); print(*resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    low = 256 if hard == resource.RLIM_INFINITY else min(256, hard)
    result = subprocess.run(
        [sys.executable, "-c", f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({low}, {hard})); " + code],
        capture_output=True, text=True, check=True,
    )
    soft_after, hard_after = map(int, result.stdout.split())
    assert soft_after == (1 << 20 if hard == resource.RLIM_INFINITY else hard) and hard_after == hard


def test_validate_a_bad_filter_config_names_its_line_and_the_accepted_forms(tmp_path):
    path = tmp_path / "filters.yaml"
    path.write_text(
        f"codecs: {{a: {{ref: {ROOT / 'codecs' / 'awesomerpc.py'}:AwesomeRpcCodec}}}}\n"
        "listeners:\n"
        "  - name: l\n"
        "    port: 15000\n"
        "    codec: a\n"
        "    filters:\n"
        "      - name: local_ratelimit\n"
        "        config: {token_bucket: {max_tokens: 5, fill_interval: 1 s}}\n"
        "    routes: [{route: {cluster: c}}]\n"
        "clusters: [{name: c, endpoints: [{address: 127.0.0.1, port: 1}]}]\n"
    )
    result = metabridge("validate", "--no-envoy", "-c", str(path))
    assert_clean_failure(result, 2)
    assert result.stderr.strip() == (
        f"metabridge: {path}: listeners[l].filters[0]: 'local_ratelimit' rejects its config: ValueError: token_bucket.fill_interval: "
        "'1 s' is not a duration: no space between the number and the unit: 1s (accepted: a number and a unit (ms, s, m or h): 250ms, 5s, 1m, 1.5h) (line 7)"
    )
