"""Thrift through the compose stack: a thriftpy2 client (tests/peers/thrift_peers, framed binary
like the servers) on the host calls the containerized Envoy, which the bridge routes by
examples/docker.yaml's Thrift routes (the same as examples/thrift.yaml: whoami to v1, echo to v2)
to the two server containers."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from thriftpy2.thrift import TApplicationException

from tests.docker.conftest import REPO_ROOT
from tests.peers.thrift_peers import client_for

if TYPE_CHECKING:
    from tests.docker.conftest import Stack

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1500)]

CONNECTIONS = ".upstream_cx_total"
V1_CONNECTIONS = "cluster.thrift-v1" + CONNECTIONS
V2_CONNECTIONS = "cluster.thrift-v2" + CONNECTIONS
CALLS = 20


def _upstream_connections_opened(stack: Stack, calls) -> dict[str, int]:
    """Runs ``calls(client)`` on a connection of its own; returns how many upstream connections
    Envoy opened to each Thrift cluster meanwhile (the bridge opens tunnels per downstream
    connection and cluster, on first use)."""
    before = stack.envoy_counters(CONNECTIONS)
    with client_for(stack.host, stack.thrift_port) as client:
        calls(client)
    after = stack.envoy_counters(CONNECTIONS)
    return {name: after[name] - before[name] for name in (V1_CONNECTIONS, V2_CONNECTIONS)}


def test_calls_are_routed_by_method_to_both_servers(stack: Stack) -> None:
    # whoami names the server that answered; echo does not, so Envoy's upstream connection
    # counts show which cluster each connection's calls reached.
    answers: list[str] = []
    opened = _upstream_connections_opened(stack, lambda client: answers.extend(client.whoami() for _ in range(CALLS)))
    assert answers == ["v1"] * CALLS
    assert opened[V2_CONNECTIONS] == 0 and opened[V1_CONNECTIONS] >= 1, opened

    texts = [f"héllo {i} " + "€" * i * 100 for i in range(CALLS)]
    answers = []
    opened = _upstream_connections_opened(stack, lambda client: answers.extend(client.echo(text) for text in texts))
    assert answers == texts
    assert opened[V1_CONNECTIONS] == 0 and opened[V2_CONNECTIONS] >= 1, opened


def test_no_route_reaches_the_client_as_an_application_exception(stack: Stack) -> None:
    with client_for(stack.host, stack.thrift_port) as client:
        with pytest.raises(TApplicationException) as raised:
            client.ping()
        # A oneway call without a route is dropped with no reply: were one sent, the client
        # would read it as whoami's answer below.
        client.notify("nowhere")
        after = [client.whoami(), client.echo("in step")]
    assert raised.value.type == TApplicationException.UNKNOWN_METHOD
    assert raised.value.message == "ROUTE_NOT_FOUND: no route matches ping"
    assert after == ["v1", "in step"]


def test_documented_command_line_call(stack: Stack) -> None:
    """docs/docker.md's way to try the Thrift listener by hand."""
    command = [sys.executable, "-m", "tests.peers.thrift_peers", "call", "--port", str(stack.thrift_port), "whoami"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, "v1\n"), result.stderr
