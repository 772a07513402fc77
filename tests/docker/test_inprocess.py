"""The compose file's in-process mode (profile "inprocess"): one Envoy container runs
`metabridge run --with-envoy` with examples/docker-inprocess.yaml, the core inside Envoy as the
libmetabridge.so dynamic module the image builds. Every test of test_compose.py, test_dubbo.py,
test_thrift.py and test_prometheus.py runs against it too (the ``stack`` fixture's inprocess
mode); here: that no bridge is in its path, that a config it cannot serve fails its container
with a clear error, and that SIGHUP to the container reloads the config inside Envoy."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from examples.awesomerpc.client import AwesomeRpcClient
from tests.docker.conftest import GREETER, REPO_ROOT, SERVICES, _with_profile
from tests.peers import thrift_peers
from tests.peers.dubbo_peers import call

if TYPE_CHECKING:
    from tests.docker.conftest import Stack

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1500)]

INPROCESS_CONFIG = REPO_ROOT / "examples" / "docker-inprocess.yaml"
CONFIG_ENV = "METABRIDGE_INPROCESS_CONFIG"  # the config the envoy-inprocess service runs
MOUNTED_CONFIG = "examples/broken.yaml"  # inside the container, next to the example configs
MODULE_FILTER = "envoy.filters.network.dynamic_modules"
CALLS = 20  # per protocol
# Envoy's give-up: `metabridge run` restarts an Envoy that exits, five times within a minute at
# most, with a growing back-off, then exits 1. Each start loads the embedded interpreter.
BROKEN_EXIT_TIMEOUT_S = 240
RELOAD_TIMEOUT_S = 60


def _requests_by_listener(text: str) -> dict[str, float]:
    """metabridge_request_total by listener, from an admin endpoint's /metrics."""
    return {
        sample.labels["listener"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "metabridge_request_total"
    }


def _admin_json(stack: Stack, path: str) -> dict:
    with urllib.request.urlopen(f"http://{stack.host}:{stack.admin_port}{path}", timeout=5) as response:
        return json.load(response)


async def _awesomerpc_calls(stack: Stack, count: int) -> None:
    async with await AwesomeRpcClient.connect(stack.host, stack.listener_port) as client:
        for i in range(count):
            reply = await client.call(2, f"in-envoy-{i}".encode())
            assert (reply.rsp_code, reply.body) == (0, f"v2|in-envoy-{i}".encode()), reply


def test_requests_are_served_inside_envoy_with_no_bridge_in_their_path(inprocess_stack: Stack, ext_proc_stack: Stack) -> None:
    stack = inprocess_stack
    # Envoy's listeners run the module where the ext_proc mode has its network ext_proc filter.
    (dump,) = [c for c in _admin_json(stack, "/config_dump")["configs"] if c["@type"].endswith(".ListenersConfigDump")]
    listeners = [entry["listener"] for entry in dump.get("static_listeners", ())]
    listeners += [entry["active_state"]["listener"] for entry in dump.get("dynamic_listeners", ()) if "active_state" in entry]
    filters = {
        listener["name"]: [f["name"] for chain in listener["filter_chains"] for f in chain["filters"]] for listener in listeners
    }
    assert set(filters) == {"awesomerpc", "dubbo", "thrift"}, filters
    for name, chain in filters.items():
        assert MODULE_FILTER in chain and not any("ext_proc" in f for f in chain), (name, chain)
    # The module is loaded: its counter is in Envoy's stats.
    assert any(name.endswith("metabridge_inprocess_errors") for name in stack.envoy_counters("metabridge_inprocess_errors")), "the module's counter is not in Envoy's stats"

    before, bridge_before = _requests_by_listener(stack.metrics_text()), _requests_by_listener(ext_proc_stack.metrics_text())
    asyncio.run(_awesomerpc_calls(stack, CALLS))
    for _ in range(CALLS):
        assert call(stack.host, stack.dubbo_port, GREETER, "whoami") == "greeter-v1"
    with thrift_peers.client_for(stack.host, stack.thrift_port) as client:
        assert [client.whoami() for _ in range(CALLS)] == ["v1"] * CALLS
    after, bridge_after = _requests_by_listener(stack.metrics_text()), _requests_by_listener(ext_proc_stack.metrics_text())

    # The admin endpoint inside Envoy counted every request (and nothing else sent any to this
    # Envoy meanwhile); the bridge container, the ext_proc mode's, saw none of them.
    assert {name: after.get(name, 0) - before.get(name, 0) for name in ("awesomerpc", "dubbo", "thrift")} == {
        "awesomerpc": CALLS,
        "dubbo": CALLS,
        "thrift": CALLS,
    }
    assert bridge_after == bridge_before


def _broken_configs() -> dict[str, tuple[str, str]]:
    """examples/docker-inprocess.yaml broken two ways: (config text, what its container must say)."""
    text = INPROCESS_CONFIG.read_text()
    unknown_cluster = text.replace("route: {cluster: thrift-v2}", "route: {cluster: thrift-v3}")
    missing_codec = text.replace("ref: ../codecs/thrift:ThriftCodec", "ref: ../codecs/thrift:NoSuchCodec")
    assert unknown_cluster != text and missing_codec != text
    return {
        # Refused when `metabridge run` loads it, before Envoy starts.
        "unknown-cluster": (unknown_cluster, "unknown cluster 'thrift-v3'"),
        # Loads, but its codec does not: `metabridge run` refuses it before Envoy starts.
        "codec-does-not-load": (missing_codec, "has no attribute 'NoSuchCodec'"),
    }


@pytest.mark.parametrize("case", ["unknown-cluster", "codec-does-not-load"])
def test_a_broken_config_fails_the_container_with_a_clear_error(inprocess_stack: Stack, tmp_path: Path, case: str) -> None:
    text, message = _broken_configs()[case]
    assert yaml.safe_load(text)["bridge"]["mode"] == "inprocess"
    config = tmp_path / "broken.yaml"
    config.write_text(text)
    config.chmod(0o644)
    tmp_path.chmod(0o755)  # the container's user reads it through the bind mount
    # A one-off container of the service as it is defined, its config swapped for the broken one.
    service = SERVICES["inprocess"].envoy
    command = [
        *_with_profile(inprocess_stack.compose._compose_command).split(),
        "-f", str(REPO_ROOT / "docker-compose.yml"), "-p", inprocess_stack.project,
        "run", "--rm", "--no-deps", "-T", "-v", f"{config}:/opt/metabridge/app/{MOUNTED_CONFIG}:ro", service,
    ]
    env = {**os.environ, CONFIG_ENV: MOUNTED_CONFIG}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=BROKEN_EXIT_TIMEOUT_S)
    assert result.returncode != 0, f"the container exited 0 with a broken config:\n{result.stdout[-4000:]}"
    assert message in result.stdout, f"the container's output does not say {message!r}:\n{result.stdout[-4000:]}"


def test_sighup_to_the_container_reloads_the_config_inside_envoy(inprocess_stack: Stack) -> None:
    """docs/docker.md's reload: `kill -s HUP` reaches `metabridge run` (tini passes it on), which
    turns it into the admin endpoint's POST /reload inside Envoy; the stack serves on."""
    stack = inprocess_stack
    service = SERVICES["inprocess"].envoy
    before = stack.logs(service).count('"reload_applied"')
    stack.compose.execute(f"kill -s HUP {service}")
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while stack.logs(service).count('"reload_applied"') == before:
        assert time.monotonic() < deadline, f"no reload_applied within {RELOAD_TIMEOUT_S} s:\n{stack.logs(service)[-4000:]}"
        time.sleep(0.5)  # the poll loop's interval
    assert stack.container_state(service) == ("running", 0)
    stack.wait_until_serving()
