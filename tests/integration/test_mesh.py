"""Kubernetes manifests through a real Envoy and the bridge, started as a user would:
`metabridge render --manifests DIR -c base.yaml` for Envoy's bootstrap and
`metabridge run --manifests DIR -c base.yaml` for the bridge, in front of real Dubbo and Thrift
peers (and awesomerpc backends behind a private ApplicationProtocol). Each test shows a
MetaRouter's weighted split, its canary by attribute and its mirror taking effect, in both
bridge modes (in-process, the module inside Envoy reads the manifests and the base itself).
"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import yaml

from metabridge.config import bootstrap as envoy_config
from tests.integration.harness import MODES, REPO, Stack, free_port, port_open, run_async, wait_until
from tests.peers.dubbo_peers import call, start_provider
from tests.peers.thrift_peers import FRAMED_BINARY, EchoServer, client_for

HOST = "127.0.0.1"
GREETER = "com.example.Greeter"


class MeshStack(Stack):
    """A Stack whose listeners, routes and clusters come from a manifests folder; the config
    file Stack writes (bridge.listen, envoy.admin_port, bridge.mode) is their base config.
    In-process there is no bridge process: Envoy's module reads the manifests and the base."""

    def __init__(self, tmp: Path, manifests: Path, listen_ports: list[int], backends: dict[str, int] | None = None, mode: str = "ext_proc") -> None:
        super().__init__(tmp, {"bridge": {"mode": mode}}, backends)
        self.mode = mode
        self.manifests = manifests
        self.listen_ports = listen_ports

    def _metabridge(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "metabridge.cli", *args, "--manifests", str(self.manifests), "-c", str(self.config_path)]

    def start_bridge(self) -> None:
        if self.mode == "inprocess":
            return
        proc = self._spawn("bridge", self._metabridge("--log-level", "debug", "run"))
        sock = Path(self.bridge_address[len("unix:"):])
        health = [sys.executable, "-m", "metabridge.cli", "health", "--address", self.bridge_address]
        wait_until(lambda: sock.exists() and subprocess.run(health, capture_output=True).returncode == 0, 15, "bridge", proc)

    def start_envoy(self) -> None:
        bootstrap = self.tmp / "bootstrap.yaml"
        rendered = subprocess.run(self._metabridge("render", "-o", str(bootstrap)), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert rendered.returncode == 0, rendered.stderr
        command = [envoy_config.find_envoy(), "-c", str(bootstrap), "--concurrency", "1", "--log-level", "info", "--use-dynamic-base-id"]
        if self.mode == "inprocess":
            proc = self._spawn("envoy", command, envoy_config.inprocess_environment())
            self.logs["bridge"] = self.logs["envoy"]  # the core logs into Envoy's output
        else:
            proc = self._spawn("envoy", command)
        wait_until(lambda: port_open(self.admin_port) and all(port_open(p) for p in self.listen_ports), 20, "envoy", proc)


@pytest.fixture(params=MODES)
def mesh_stack(tmp_path, request):
    """Factory: mesh_stack(documents_by_file, listen_ports, backends=None) writes the manifests
    under tmp and starts example awesomerpc backends ({name: port}), the bridge and Envoy from
    them, in each mode; stopped after the test."""
    started: list[MeshStack] = []

    def make(files: dict[str, list[dict]], listen_ports: list[int], backends: dict[str, int] | None = None) -> MeshStack:
        folder = tmp_path / "manifests"
        folder.mkdir()
        for name, documents in files.items():
            (folder / name).write_text(yaml.safe_dump_all(documents, sort_keys=False))
        stack = MeshStack(tmp_path, folder, listen_ports, backends, request.param)
        started.append(stack)
        return stack.start()

    yield make
    for stack in started:
        stack.stop()


def example_documents(path: str) -> list[dict]:
    return list(yaml.safe_load_all((REPO / path).read_text()))


def test_dubbo_example_manifests_split_canary_and_mirror(mesh_stack):
    """examples/mesh/dubbo as written (ServiceEntry, DestinationRule v1/v2, MetaRouter), with the
    ServiceEntry's port and endpoint ports moved to free ones: x-canary=true -> v2; echo() -> v1
    and a copy to v2; every other Greeter call 80/20 with the attachment x-routed-by added."""
    v1, v2 = start_provider(GREETER, name="greeter-v1"), start_provider(GREETER, name="greeter-v2")
    try:
        port = free_port()
        (entry,) = example_documents("examples/mesh/dubbo/serviceentry.yaml")
        entry["spec"]["ports"][0]["number"] = port
        for endpoint, provider in zip(entry["spec"]["endpoints"], (v1, v2), strict=True):
            endpoint["ports"]["tcp-metaprotocol-dubbo"] = provider.port
        mesh_stack(
            {
                "serviceentry.yaml": [entry],
                "destinationrule.yaml": example_documents("examples/mesh/dubbo/destinationrule.yaml"),
                "metarouter.yaml": example_documents("examples/mesh/dubbo/metarouter.yaml"),
            },
            [port],
        )

        n = 300
        answers = Counter(call(HOST, port, GREETER, "whoami") for _ in range(n))
        assert sum(answers.values()) == n and set(answers) <= {"greeter-v1", "greeter-v2"}
        # Binomial(300, 0.2): mean 60, sd ~6.9; +-5 sd catches a wrong split without flaking.
        assert 25 <= answers["greeter-v2"] <= 95, answers
        split = [r for p in (v1, v2) for r in p.received if r.method == "whoami"]
        assert len(split) == n and all(r.attachments.get("x-routed-by") == "metabridge" for r in split)

        canary = [call(HOST, port, GREETER, "whoami", attachments={"x-canary": "true"}) for _ in range(20)]
        assert canary == ["greeter-v2"] * 20
        assert sum(1 for r in v2.received if r.attachments.get("x-canary") == "true") == 20
        assert not any(r.attachments.get("x-canary") for r in v1.received)

        assert [call(HOST, port, GREETER, "echo", [f"m{i}"]) for i in range(10)] == [f"m{i}" for i in range(10)]
        primary = [r.args[0] for r in v1.received if r.method == "echo"]
        assert primary == [f"m{i}" for i in range(10)]
        # The copies are sent beside the primaries; their answers are dropped.
        wait_until(lambda: sorted(r.args[0] for r in v2.received if r.method == "echo") == sorted(primary), 10, "mirrored echo calls at v2")
    finally:
        v1.stop()
        v2.stop()


def thrift_manifests(port: int, v1: EchoServer, v2: EchoServer) -> dict[str, list[dict]]:
    """Aeraki's Thrift sample's shape: a Service with a tcp-metaprotocol-thrift-* port, its
    EndpointSlices (one per version, as both peers share 127.0.0.1) pointing at labelled Pods,
    subsets by version, and a MetaRouter with a canary by method, a mirror and a split."""
    namespace, service = "meta-thrift", "echo"
    pods = [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"echo-{s.name}", "namespace": namespace, "labels": {"app": "echo", "version": s.name}}, "status": {"phase": "Running", "podIP": HOST}}
        for s in (v1, v2)
    ]
    slices = [
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": f"echo-{s.name}", "namespace": namespace, "labels": {"kubernetes.io/service-name": service}},
            "ports": [{"name": "tcp-metaprotocol-thrift-echo", "port": s.port}],
            "endpoints": [{"addresses": [HOST], "conditions": {"ready": True}, "targetRef": {"kind": "Pod", "name": f"echo-{s.name}", "namespace": namespace}}],
        }
        for s in (v1, v2)
    ]
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service, "namespace": namespace},
        "spec": {"selector": {"app": "echo"}, "ports": [{"name": "tcp-metaprotocol-thrift-echo", "port": port, "targetPort": 9090}]},
    }
    rule = {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "DestinationRule",
        "metadata": {"name": service, "namespace": namespace},
        "spec": {"host": f"{service}.{namespace}.svc.cluster.local", "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]},
    }
    router = {
        "apiVersion": "metaprotocol.aeraki.io/v1alpha1",
        "kind": "MetaRouter",
        "metadata": {"name": service, "namespace": namespace},
        "spec": {
            "hosts": [service],
            "routes": [
                {"name": "echo-canary", "match": {"attributes": {"method": {"exact": "echo"}}}, "route": [{"destination": {"host": service, "subset": "v2"}}]},
                {
                    "name": "notify-mirrored",
                    "match": {"attributes": {"method": {"exact": "notify"}}},
                    "route": [{"destination": {"host": service, "subset": "v1"}}],
                    "mirror": {"host": service, "subset": "v2"},
                    "mirrorPercentage": {"value": 100.0},
                },
                {
                    "name": "traffic-split",
                    "match": {"attributes": {"method": {"prefix": "who"}}},
                    "route": [{"destination": {"host": service, "subset": "v1"}, "weight": 20}, {"destination": {"host": service, "subset": "v2"}, "weight": 80}],
                },
            ],
        },
    }
    # Pods in a kind: List, as `kubectl get pods -o yaml` prints them; the rest one per document.
    return {"service.yaml": [svc, *slices], "pods.yaml": [{"apiVersion": "v1", "kind": "List", "items": pods}], "rules.yaml": [rule, router]}


def test_thrift_service_endpoint_slices_split_canary_and_mirror(mesh_stack):
    v1, v2 = EchoServer("v1", FRAMED_BINARY).start(), EchoServer("v2", FRAMED_BINARY).start()
    try:
        for server in (v1, v2):
            server.handler.echo = lambda s, name=server.name: f"{name}:{s}"
        port = free_port()
        mesh_stack(thrift_manifests(port, v1, v2), [port])
        n = 300
        with client_for(HOST, port, FRAMED_BINARY) as client:
            answers = Counter(client.whoami() for _ in range(n))
            canary = [client.echo(f"c{i}") for i in range(10)]
            for i in range(5):
                client.notify(f"n{i}")  # oneway: no reply from either
            after = client.whoami()
        assert sum(answers.values()) == n and set(answers) <= {"v1", "v2"}
        # Binomial(300, 0.8) for v2: mean 240, sd ~6.9.
        assert 205 <= answers["v2"] <= 275, answers
        assert canary == [f"v2:c{i}" for i in range(10)]
        assert after in ("v1", "v2")
        for i in range(5):
            assert v1.handler.wait_for_notification(f"n{i}"), f"n{i} did not reach v1"
            assert v2.handler.wait_for_notification(f"n{i}"), f"the copy of n{i} did not reach v2"
        assert v1.handler.notifications == [f"n{i}" for i in range(5)]
        assert v1.errors == [] and v2.errors == []
    finally:
        v1.stop()
        v2.stop()


def test_private_protocol_through_an_application_protocol(mesh_stack):
    """awesomerpc is no Aeraki protocol: an ApplicationProtocol names it, with the metabridge codec
    in its annotation; cmd 2 is the canary, cmd 1 is split 50/50 and mirrored to the shadow, cmd 3
    is rate limited by the MetaRouter's localRateLimit."""
    from examples.awesomerpc.client import AwesomeRpcClient

    port = free_port()
    backends = {name: free_port() for name in ("v1", "v2", "shadow")}
    protocol = {
        "apiVersion": "metaprotocol.aeraki.io/v1alpha1",
        "kind": "ApplicationProtocol",
        "metadata": {"name": "awesomerpc", "annotations": {"metabridge.io/codec": "awesomerpc"}},
        "spec": {"protocol": "awesomerpc", "codec": "example.codec.awesomerpc"},
    }
    entry = {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "ServiceEntry",
        "metadata": {"name": "awesome", "namespace": "apps"},
        "spec": {
            "hosts": ["awesome.example.com"],
            "ports": [{"number": port, "name": "tcp-metaprotocol-awesomerpc-main", "protocol": "TCP"}],
            "resolution": "STATIC",
            "endpoints": [{"address": HOST, "ports": {"tcp-metaprotocol-awesomerpc-main": p}, "labels": {"track": name}} for name, p in backends.items()],
        },
    }
    rule = {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "DestinationRule",
        "metadata": {"name": "awesome", "namespace": "apps"},
        "spec": {"host": "awesome.example.com", "subsets": [{"name": name, "labels": {"track": name}} for name in backends]},
    }

    def dest(subset: str) -> dict:
        return {"host": "awesome.example.com", "subset": subset}

    router = {
        "apiVersion": "metaprotocol.aeraki.io/v1alpha1",
        "kind": "MetaRouter",
        "metadata": {"name": "awesome", "namespace": "apps"},
        "spec": {
            "hosts": ["awesome.example.com"],
            # cmd 3: two calls an hour (the listener's local_ratelimit filter).
            "localRateLimit": {"conditions": [{"match": {"attributes": {"cmd": {"exact": "3"}}}, "tokenBucket": {"maxTokens": 2, "tokensPerFill": 2, "fillInterval": "1h"}}]},
            "routes": [
                {"name": "rest", "match": {"attributes": {"cmd": {"exact": "3"}}}, "route": [{"destination": dest("v1")}]},
                {"name": "canary", "match": {"attributes": {"cmd": {"exact": "2"}}}, "route": [{"destination": dest("v2")}]},
                {"name": "split", "match": {"attributes": {"cmd": {"exact": "1"}}}, "route": [{"destination": dest("v1"), "weight": 50}, {"destination": dest("v2"), "weight": 50}], "mirror": dest("shadow")},
            ],
        },
    }
    stack = mesh_stack({"protocol.yaml": [protocol], "service.yaml": [entry, rule, router]}, [port], backends)

    async def calls(cmd: int, n: int) -> list:
        async with await AwesomeRpcClient.connect(HOST, port) as client:
            return [await client.call(cmd, b"x") for _ in range(n)]

    n = 200
    split = Counter(r.body for r in run_async(calls(1, n)))
    assert sum(split.values()) == n and set(split) <= {b"v1|x", b"v2|x"}, split
    assert 65 <= split[b"v2|x"] <= 135, split  # Binomial(200, 0.5): sd ~7.1
    assert [r.body for r in run_async(calls(2, 10))] == [b"v2|x"] * 10
    assert [r.rsp_code for r in run_async(calls(3, 3))] == [0, 0, 429]
    # The shadow answered every copy (13 bytes each); the client saw only the primaries' answers.
    shadow = f"cluster.outbound|{port}|shadow|awesome.example.com.upstream_cx_rx_bytes_total"
    wait_until(lambda: envoy_stat(stack, shadow) >= n * 13, 10, "the mirror's answers")


def envoy_stat(stack: Stack, name: str) -> int:
    """Like Stack.envoy_stat, for names with '|' (a regex character) in them."""
    query = urllib.parse.quote(f"^{re.escape(name)}$")
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.admin_port}/stats?filter={query}", timeout=2) as reply:
        for line in reply.read().decode().splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
    raise KeyError(name)
