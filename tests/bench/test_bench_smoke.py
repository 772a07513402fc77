"""The benchmark end to end in quick mode, plus the native Envoy bootstraps it compares with.

The quick run starts every path (backend alone, tcp_proxy, generic_proxy with its Dubbo codec,
metabridge for awesomerpc and Dubbo) for real and checks that each point produced numbers with
no wrong or missing response, and that the JSON, Markdown and PNG outputs were written. It asserts
nothing about speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from bench import native, wire
from bench.processes import free_port
from bench.scenarios import matrix
from bench.stacks import DIRECT, INPROCESS, METABRIDGE, TCP_PROXY, PathSpec, Stack
from metabridge.config.bootstrap import validate_with_envoy

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.bench
def test_quick_run_measures_every_scenario_without_errors(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, f"bench exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"

    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "quick"
    assert results["errors"] == 0
    expected = {(p.path.name, p.load) for p in matrix(quick=True)}
    measured = {(p["scenario"], p["load"]) for p in results["points"]}
    assert measured == expected

    for point in results["points"]:
        where = f"{point['scenario']} {point['load']}"
        assert point["errors"] == 0, f"{where}: {point['error_samples']}"
        assert point["requests"] > 0 and point["rps"] > 0, where
        assert 0 < point["p50_ms"] <= point["p90_ms"] <= point["p99_ms"], where
        roles = set(point["cpu_us_per_request"])
        assert {"backend", "client"} <= roles, where
        if point["path"] != DIRECT:
            assert "envoy" in roles, where
        if point["path"] == METABRIDGE:
            assert point["cpu_us_per_request"]["bridge"] > 0, where

    # metabridge is compared with tcp_proxy and with the native generic_proxy in the same run.
    pairs = {(r["numerator"], r["denominator"]) for r in results["ratios"]}
    assert ("metabridge/awesomerpc", "tcp_proxy/awesomerpc") in pairs
    assert ("metabridge/dubbo", "generic_proxy/dubbo") in pairs
    assert all(r["rps_ratio"] > 0 for r in results["ratios"])
    assert results["headroom"] and results["route_growth"]
    assert results["machine"]["nproc"] >= 1 and results["machine"]["cpu_model"]

    assert (out / "results.png").read_bytes()[:8] == PNG_SIGNATURE
    table = (out / "results.md").read_text()
    assert "metabridge/dubbo" in table and "generic_proxy/dubbo" in table
    assert "metabridge/awesomerpc" in proc.stdout and "errors: 0" in proc.stdout


@pytest.mark.parametrize(
    "bootstrap",
    [native.tcp_proxy_bootstrap(19901, 19000, 19001), native.generic_proxy_bootstrap(19901, 19000, 19001)],
    ids=["tcp_proxy", "generic_proxy_dubbo"],
)
def test_native_bootstraps_pass_envoy_validation(bootstrap):
    validate_with_envoy(yaml.safe_dump(bootstrap, sort_keys=False))


def test_generic_proxy_bootstrap_routes_on_service_and_method():
    config = native.generic_proxy_bootstrap(19901, 19000, 19001)
    proxy = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert proxy["codec_config"]["name"] == "envoy.generic_proxy.codecs.dubbo"
    (route,) = proxy["route_config"]["routes"]["matcher_list"]["matchers"]
    match = route["predicate"]["single_predicate"]["custom_match"]["typed_config"]
    assert match["host"] == {"exact": "org.metabridge.bench.EchoService"}
    assert match["method"] == {"exact": "echo"}


@pytest.mark.parametrize("path", [TCP_PROXY, INPROCESS])
def test_every_envoy_runs_with_the_concurrency_asked_for(tmp_path, path):
    """``bench run --envoy-concurrency N`` reaches Envoy's command line on native and metabridge
    paths alike (Envoy's /server_info reports the workers it runs)."""
    stack = Stack(PathSpec(path, wire.AWESOMERPC), {wire.AWESOMERPC: free_port()}, tmp_path, envoy_concurrency=2)
    try:
        stack.start()
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.admin_port}/server_info", timeout=5) as r:
            assert json.load(r)["command_line_options"]["concurrency"] == 2
    finally:
        stack.stop()


def test_envoy_concurrency_below_one_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "run", "--envoy-concurrency", "0", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--envoy-concurrency >= 1" in proc.stderr
