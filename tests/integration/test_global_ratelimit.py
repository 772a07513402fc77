"""The global rate limit filter (``ratelimit``) through a real Envoy and the bridge, against the
test rate limit service (tests/peers/ratelimit_service.py, grpc's thread-pool server in the test
process); and Envoy's own ``envoy.filters.network.ratelimit`` against the same service, which
shows the service speaks the API as Envoy does."""

from __future__ import annotations

import asyncio
import copy
import json
import time
import urllib.request

import pytest
import yaml

from metabridge.config import bootstrap as envoy_config
from metabridge.sdk.codec import ErrorType
from examples.awesomerpc.client import AwesomeRpcClient, ConnectionClosed
from examples.awesomerpc.protocol import ERROR_CODES
from tests.integration.harness import MODES, Stack, awesomerpc_config, cmd_route, example_config, free_port, port_open, run_async, stack_class, wait_until
from tests.peers.ratelimit_service import ThreadedServer, limit

OVER_LIMIT = ERROR_CODES[ErrorType.OVER_LIMIT]


@pytest.fixture
def rls():
    servers = []

    def make(*limits: str) -> ThreadedServer:
        server = ThreadedServer([limit(spec) for spec in limits]).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(params=MODES)
def proxy(request, tmp_path):
    """make(filter_config, closed=None) -> Stack with an awesomerpc listener (cmd 1 -> v1, cmd 2 -> v2)
    whose chain is the ratelimit filter; with ``closed``, a second listener ``closed`` whose filter
    config is updated by it. ``stack.ports`` names each listener's port. Both modes: in-process
    the calls run on a loop in a thread inside Envoy, their answers applied on the worker."""
    stacks = []
    mode = request.param
    cls = stack_class(mode)

    def make(filter_config: dict, closed: dict | None = None) -> Stack:
        v1, v2, listen = free_port(), free_port(), free_port()
        config = awesomerpc_config(
            listen,
            {"awesomerpc-v1": v1, "awesomerpc-v2": v2},
            [cmd_route(1, "awesomerpc-v1"), cmd_route(2, "awesomerpc-v2")],
            request_timeout="5s",
            filters=[{"name": "ratelimit", "config": filter_config}],
        )
        ports = {"awesomerpc": listen}
        if closed is not None:
            second = copy.deepcopy(config["listeners"][0])
            second.update(name="closed", port=free_port())
            second["filters"][0]["config"].update(closed)
            config["listeners"].append(second)
            ports["closed"] = second["port"]
        config["bridge"] = {"mode": mode}
        stack = cls(tmp_path, config, {"v1": v1, "v2": v2})
        stack.ports = ports
        stacks.append(stack)
        return stack.start()

    yield make
    for stack in stacks:
        stack.stop()


def events(stack: Stack, name: str) -> list[dict]:
    return [json.loads(line) for line in stack.log("bridge").splitlines() if f'"{name}"' in line]


def test_under_the_limit_all_pass_and_over_it_over_limit(rls, proxy):
    service = rls("cmd=1:5/hour")  # fixed windows: an hour makes a reset during the test unlikely
    stack = proxy({"domain": "awesomerpc", "descriptors": [{"property": "cmd", "descriptor_key": "cmd"}], "rls": {"address": service.address}, "timeout": "1s"})
    port = stack.ports["awesomerpc"]

    async def main():
        async with await AwesomeRpcClient.connect("127.0.0.1", port) as a, await AwesomeRpcClient.connect("127.0.0.1", port) as b:
            under = [await (a if i % 2 else b).call(1, b"%d" % i) for i in range(5)]  # the limit is global: both connections count
            over = await asyncio.gather(*(c.call(1, b"late") for c in (a, b, a)))
            other = await b.call(2, b"free")  # cmd 2 has no limit in the service
            return under, over, other

    under, over, other = run_async(main(), 30)
    assert [(r.rsp_code, r.body) for r in under] == [(0, b"v1|%d" % i) for i in range(5)]
    assert [r.rsp_code for r in over] == [OVER_LIMIT] * 3
    assert (other.rsp_code, other.body) == (0, b"v2|free")
    assert service.logic.descriptors_seen() == [("awesomerpc", ((("cmd", "1"),),))] * 8 + [("awesomerpc", ((("cmd", "2"),),))]
    assert len(events(stack, "ratelimit_over_limit")) == 3


def test_service_down_fails_open_or_closed_as_configured(proxy):
    nobody = f"127.0.0.1:{free_port()}"
    stack = proxy(
        {"domain": "awesomerpc", "descriptors": [{"property": "cmd", "descriptor_key": "cmd"}], "rls": {"address": nobody}, "timeout": "1s"},
        closed={"failure_mode_deny": True},
    )

    async def main():
        async with await AwesomeRpcClient.connect("127.0.0.1", stack.ports["awesomerpc"]) as fail_open, await AwesomeRpcClient.connect("127.0.0.1", stack.ports["closed"]) as fail_closed:
            return await fail_open.call(1, b"a"), await fail_open.call(2, b"b"), await fail_closed.call(1, b"c"), await fail_closed.call(2, b"d")

    opened, opened_2, closed, closed_2 = run_async(main(), 30)
    assert (opened.rsp_code, opened.body, opened_2.body) == (0, b"v1|a", b"v2|b"), "fail open: requests pass"
    assert (closed.rsp_code, closed_2.rsp_code) == (OVER_LIMIT, OVER_LIMIT), "fail closed: refused"
    failures = events(stack, "ratelimit_service_failed")
    assert sorted((e["listener"], e["outcome"], e["denied"]) for e in failures) == [("awesomerpc", "error", False)] * 2 + [("closed", "error", True)] * 2
    assert all("UNAVAILABLE" in e["error"] for e in failures)


def test_a_slow_service_costs_its_timeout_and_the_bridge_serves_others_meanwhile(rls, proxy):
    service = rls()
    service.logic.delay = 3.0
    timeout = 0.3
    stack = proxy(
        {
            "domain": "awesomerpc",
            "descriptors": [{"property": "cmd", "descriptor_key": "cmd"}],
            "match": {"headers": [{"name": "cmd", "exact": "1"}]},  # cmd 2 is not limited
            "rls": {"address": service.address},
            "timeout": f"{timeout * 1000:g}ms",
        },
        closed={"failure_mode_deny": True},
    )

    async def others(port: int, stop: asyncio.Event) -> list[float]:
        """Another connection's calls, one after the other, while the slow one waits."""
        took = []
        async with await AwesomeRpcClient.connect("127.0.0.1", port) as c:
            while not stop.is_set():
                started = time.monotonic()
                reply = await c.call(2, b"o")
                assert reply.body == b"v2|o"
                took.append(time.monotonic() - started)
        return took

    async def main():
        port = stack.ports["awesomerpc"]
        async with await AwesomeRpcClient.connect("127.0.0.1", port) as warm:
            await warm.call(2, b"warm")  # tunnels and Envoy warmed up before measuring
        stop = asyncio.Event()
        meanwhile = asyncio.ensure_future(others(port, stop))
        async with await AwesomeRpcClient.connect("127.0.0.1", port) as c, await AwesomeRpcClient.connect("127.0.0.1", stack.ports["closed"]) as d:
            started = time.monotonic()
            slow = asyncio.ensure_future(c.call(1, b"slow"))
            same_connection = await c.call(2, b"same")
            same_took = time.monotonic() - started
            allowed = await slow
            allowed_took = time.monotonic() - started
            stop.set()
            other_calls = await meanwhile
            started = time.monotonic()
            denied = await d.call(1, b"x")
            denied_took = time.monotonic() - started
        return same_connection, same_took, allowed, allowed_took, other_calls, denied, denied_took

    same_connection, same_took, allowed, allowed_took, other_calls, denied, denied_took = run_async(main(), 30)
    assert (allowed.rsp_code, allowed.body) == (0, b"v1|slow"), "fail open after the timeout"
    assert timeout <= allowed_took < timeout + 0.7, f"the timeout holds: answered after {allowed_took:.3f}s with a service that takes 3 s"
    assert same_connection.body == b"v2|same" and same_took < timeout, f"the connection's other request did not wait ({same_took:.3f}s)"
    assert len(other_calls) >= 3 and max(other_calls) < timeout, f"another connection was served meanwhile: {len(other_calls)} calls, slowest {max(other_calls):.3f}s"
    assert denied.rsp_code == OVER_LIMIT and timeout <= denied_took < timeout + 0.7, f"fail closed after the timeout ({denied_took:.3f}s)"
    outcomes = sorted((e["listener"], e["outcome"]) for e in events(stack, "ratelimit_service_failed"))
    assert outcomes == [("awesomerpc", "timeout"), ("closed", "timeout")]


def test_the_governance_example_checks_cmd_9_with_the_service(tmp_path, rls):
    """examples/governance.yaml as written, its ratelimit filter pointed at the test service."""
    service = rls("cmd=9:2/hour")
    ports = {name: free_port() for name in ("awesomerpc-v1", "awesomerpc-v2")}
    listen = free_port()
    config = example_config("examples/governance.yaml", {"awesomerpc": listen}, ports)
    for cluster in config["clusters"]:  # the two-host clusters: the same two backends
        for endpoint, name in zip(cluster["endpoints"], ("awesomerpc-v1", "awesomerpc-v2")):
            endpoint["port"] = ports[name]
    (entry,) = [f for f in config["listeners"][0]["filters"] if f["name"] == "ratelimit"]
    entry["config"]["rls"]["address"] = service.address
    stack = Stack(tmp_path, config, {"v1": ports["awesomerpc-v1"], "v2": ports["awesomerpc-v2"]})
    try:
        stack.start()

        async def main():
            async with await AwesomeRpcClient.connect("127.0.0.1", listen) as c:
                return [await c.call(9, b"x") for _ in range(3)], await c.call(1, b"y")

        checked, unchecked = run_async(main(), 30)
    finally:
        stack.stop()
    assert [(r.rsp_code, r.body) for r in checked] == [(0, b"v1|x"), (0, b"v1|x"), (OVER_LIMIT, b"")]
    assert unchecked.body == b"v1|y"
    assert service.logic.descriptors_seen() == [("awesomerpc", ((("cmd", "9"),),))] * 3, "only cmd 9 is checked"


# ---- Envoy's own network ratelimit filter against the test service ------------------------------


def envoy_ratelimit_bootstrap(admin: int, listen: int, rls_port: int, backend: int) -> dict:
    """A listener with [envoy.filters.network.ratelimit, tcp_proxy]: Envoy asks the service once
    per connection (domain envoy-tcp, descriptor source=test) and fails closed on an error."""

    def static(name: str, port: int, **extra) -> dict:
        endpoint = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
        return {"name": name, "type": "STATIC", "connect_timeout": "1s", "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]}, **extra}

    http2 = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
    ratelimit = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.ratelimit.v3.RateLimit",
        "stat_prefix": "rl",
        "domain": "envoy-tcp",
        "descriptors": [{"entries": [{"key": "source", "value": "test"}]}],
        "timeout": "2s",
        "failure_mode_deny": True,  # an answer it cannot read would refuse every connection
        "rate_limit_service": {"grpc_service": {"envoy_grpc": {"cluster_name": "rls"}}, "transport_api_version": "V3"},
    }
    tcp_proxy = {"@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": "tcp", "cluster": "backend"}
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "rl",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {"name": "envoy.filters.network.ratelimit", "typed_config": ratelimit},
                                {"name": "envoy.filters.network.tcp_proxy", "typed_config": tcp_proxy},
                            ]
                        }
                    ],
                }
            ],
            "clusters": [static("rls", rls_port, typed_extension_protocol_options=http2), static("backend", backend)],
        },
    }


def test_envoys_network_ratelimit_filter_gets_the_test_services_answers(tmp_path, rls):
    service = rls("source=test:2/hour")
    backend, listen = free_port(), free_port()
    stack = Stack(tmp_path, awesomerpc_config(free_port(), {"v1": backend}, [cmd_route(1, "v1")]))
    try:
        stack.start_backend("v1", backend)
        bootstrap = tmp_path / "envoy-ratelimit.yaml"
        bootstrap.write_text(yaml.safe_dump(envoy_ratelimit_bootstrap(stack.admin_port, listen, service.port, backend), sort_keys=False))
        proc = stack._spawn("envoy", [envoy_config.find_envoy(), "-c", str(bootstrap), "--concurrency", "1", "--log-level", "info", "--use-dynamic-base-id"])
        wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{stack.admin_port}/ready", timeout=1).status == 200, 20, "envoy", proc)
        wait_until(lambda: port_open(listen), 10, "envoy's ratelimit listener", proc)
        # port_open's probe connection asked the service once; start counting from here.
        wait_until(lambda: stack.envoy_stat("ratelimit.rl.total") >= 1, 5, "the probe's check")
        probes = stack.envoy_stat("ratelimit.rl.total")
        wait_until(lambda: len(service.logic.requests) >= probes, 5, "the probe's request reaching the service")
        service.logic.counters.clear()
        service.logic.requests.clear()

        async def one_connection():
            try:
                async with await AwesomeRpcClient.connect("127.0.0.1", listen) as c:
                    return (await c.call(1, b"tcp", timeout=5)).body
            except ConnectionClosed as exc:
                return exc

        results = [run_async(one_connection(), 20) for _ in range(3)]
        assert results[:2] == [b"v1|tcp", b"v1|tcp"], f"under the limit: proxied ({results})"
        assert isinstance(results[2], ConnectionClosed), f"over the limit: Envoy closed the connection ({results[2]!r})"
        assert service.logic.descriptors_seen() == [("envoy-tcp", ((("source", "test"),),))] * 3, "what Envoy sent, as the service read it"
        assert stack.envoy_stat("ratelimit.rl.total") - probes == 3
        assert stack.envoy_stat("ratelimit.rl.over_limit") == 1, "Envoy read the service's OVER_LIMIT"
        assert stack.envoy_stat("ratelimit.rl.error") == 0 and stack.envoy_stat("ratelimit.rl.failure_mode_allowed") == 0
    finally:
        stack.stop()
