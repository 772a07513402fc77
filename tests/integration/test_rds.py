"""Routes from an xDS server through a real Envoy: a grpcio xDS server pushes Aeraki-shaped
RouteConfigurations to the bridge (two workers, a stream each), requests follow each accepted
push, a push naming an unknown cluster is NACKed with the error and the routes stay; and the
same over mTLS with a client certificate.

What does not apply in-process (so this file runs in ext_proc only):
- every test here: routes over RDS are the bridge process's xDS stream, and a listener with rds is refused in-process when the bootstrap is rendered (test_inprocess.py).
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from examples.awesomerpc.client import AwesomeRpcClient
from examples.awesomerpc.protocol import ERROR_CODES
from metabridge.sdk.codec import ErrorType
from tests.integration.harness import Stack, awesomerpc_config, free_port, run_async
from tests.xds_server import XdsServer, aeraki_route, aeraki_route_config, make_certs

HOST = "awesomerpc.example"


def istio(port: int, subset: str) -> str:
    return f"outbound|{port}|{subset}|{HOST}"


@pytest.fixture
def rds_stack(tmp_path):
    """Factory: rds_stack(xds, workers=1, tls=None) -> a started Stack whose awesomerpc listener
    takes its routes from ``xds`` (clusters outbound|PORT|v1|HOST and ...|v2|..., each an example
    backend answering with its name); ``listen_port`` and ``route_config_name`` are set."""
    started: list[Stack] = []

    def make(xds: XdsServer, workers: int = 1, tls: dict | None = None) -> Stack:
        listen = free_port()
        backends = {"v1": free_port(), "v2": free_port()}
        cfg = awesomerpc_config(listen, {istio(listen, name): port for name, port in backends.items()}, [], request_timeout="5s")
        listener = cfg["listeners"][0]
        del listener["routes"]
        listener["rds"] = {"server": xds.address, "route_config_name": f"{HOST}_{listen}", "node_id": "sidecar~127.0.0.1~metabridge.test~test.svc.cluster.local"}
        if tls:
            listener["rds"]["tls"] = tls
        cfg["bridge"] = {"workers": workers}
        stack = Stack(tmp_path, cfg, backends)
        stack.listen_port = listen
        stack.route_config_name = f"{HOST}_{listen}"
        started.append(stack)
        return stack.start()

    yield make
    for stack in started:
        stack.stop()


async def _call(port: int, cmd: int, count: int = 1) -> list:
    """``count`` calls on one new connection (a new connection may land on another worker)."""
    async with await AwesomeRpcClient.connect("127.0.0.1", port) as client:
        return [await client.call(cmd, b"x") for _ in range(count)]


def _served_by(reply) -> str:
    assert reply.rsp_code == 0, reply
    return reply.body.split(b"|")[0].decode()


def _follows(port: int, cmd: int, backend: str, within: float) -> float:
    """Seconds until calls with ``cmd`` on 4 new connections in a row (both workers) are all
    answered by ``backend``; fails past ``within``."""
    start = time.monotonic()
    while True:
        served = [_served_by(r) for _ in range(4) for r in run_async(_call(port, cmd))]
        if served == [backend] * 4:
            return time.monotonic() - start
        assert time.monotonic() - start < within, f"cmd {cmd} still answered by {served} {within}s after the push"


def test_pushed_routes_are_followed_and_a_bad_push_is_nacked(rds_stack):
    xds = XdsServer().start()
    try:
        s = rds_stack(xds, workers=2)
        port = s.listen_port
        v1, v2 = istio(port, "v1"), istio(port, "v2")
        xds.wait_streams(lambda r: r.request.response_nonce == "" and r.request.resource_names == [s.route_config_name], 2, 15, "a first request")
        # Before any push the listener has no routes.
        (reply,) = run_async(_call(port, 1))
        assert reply.rsp_code == ERROR_CODES[ErrorType.ROUTE_NOT_FOUND]

        # Version 1: everything to v1 (Aeraki's shape for a MetaRouter with one route).
        version, nonce = xds.push([aeraki_route_config(s.route_config_name, [aeraki_route("all", cluster=v1)])])
        acks = xds.wait_streams(lambda r: r.request.response_nonce == nonce, 2, 10, "an answer to version 1")
        assert all(not ack.nack and ack.request.version_info == version for ack in acks), [a.error for a in acks]
        served = Counter(_served_by(r) for cmd in (1, 2, 3) for _ in range(3) for r in run_async(_call(port, cmd, 2)))
        assert served == {"v1": 18}

        # Version 2: a canary by attribute (cmd 2 -> v2) and a 50/50 split for the rest.
        update = aeraki_route_config(s.route_config_name, [
            aeraki_route("canary", cluster=v2, exact={"cmd": "2"}),
            aeraki_route("split", weighted=[(v1, 50), (v2, 50)]),
        ])
        good_version, nonce = xds.push([update])
        assert _follows(port, 2, "v2", within=2.0) < 2.0
        acks = xds.wait_streams(lambda r: r.request.response_nonce == nonce, 2, 10, "an answer to version 2")
        assert all(not ack.nack and ack.request.version_info == good_version for ack in acks)
        split = Counter(_served_by(r) for _ in range(4) for r in run_async(_call(port, 1, 50)))
        assert sum(split.values()) == 200 and 60 <= split["v1"] <= 140, split  # Binomial(200, 0.5): sd ~7

        # Version 3 names a cluster the bridge does not have: NACKed by each worker, with the
        # error; the routes of version 2 stay.
        v3 = istio(port, "v3")
        bad = aeraki_route_config(s.route_config_name, [aeraki_route("to-v3", cluster=v3)])
        _, nonce = xds.push([bad])
        nacks = xds.wait_streams(lambda r: r.request.response_nonce == nonce, 2, 10, "an answer to version 3")
        for nack in nacks:
            assert nack.nack and nack.request.version_info == good_version
            assert f"unknown cluster '{v3}'" in nack.error and "virtual_hosts[0].routes[0].route.cluster" in nack.error
        assert [_served_by(r) for _ in range(4) for r in run_async(_call(port, 2))] == ["v2"] * 4  # the canary stays
        assert {_served_by(r) for _ in range(2) for r in run_async(_call(port, 1, 20))} == {"v1", "v2"}
        assert "rds_update_rejected" in s.log("bridge")
    finally:
        xds.stop()


def test_routes_over_mtls_with_a_client_certificate(rds_stack, tmp_path):
    certs = make_certs(tmp_path / "certs")
    xds = XdsServer("127.0.0.1:0", tls=(certs["ca"], certs["server"], certs["server_key"])).start()
    try:
        tls = {"ca": str(certs["ca"]), "cert": str(certs["client"]), "key": str(certs["client_key"]), "server_name": "xds.test"}
        s = rds_stack(xds, tls=tls)
        version, _ = xds.push([aeraki_route_config(s.route_config_name, [aeraki_route("all", cluster=istio(s.listen_port, "v2"))])])
        ack = xds.wait_for(lambda r: r.request.version_info == version, 15, "an ACK over mTLS")
        assert not ack.nack and ack.client_cn == "metabridge-client"
        assert [_served_by(r) for r in run_async(_call(s.listen_port, 1, 5))] == ["v2"] * 5
    finally:
        xds.stop()
