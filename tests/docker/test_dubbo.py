"""Dubbo through the compose stack: dubbo-ssl-python (the consumer of tests/peers/dubbo_peers)
on the host calls the containerized Envoy, which the bridge routes by examples/docker.yaml's
Dubbo routes (the same as examples/dubbo.yaml) to the two provider containers."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest

from tests.docker.conftest import GREETER, REPO_ROOT
from tests.peers.dubbo_peers import ConsumerError, ConsumerTimeout, call, call_raw

if TYPE_CHECKING:
    from tests.docker.conftest import Stack

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1500)]

SERVICE_NOT_FOUND = 60  # the Dubbo status of the bridge's no-route reply
UNKNOWN = "com.example.Unknown"  # an interface no route matches
CONCURRENT_CALLS = 30


def test_calls_are_routed_to_both_provider_versions(stack: Stack) -> None:
    assert call(stack.host, stack.dubbo_port, GREETER, "whoami") == "greeter-v1"
    assert call(stack.host, stack.dubbo_port, GREETER, "whoami", attachments={"x-canary": "true"}) == "greeter-v2"
    text = "héllo €" * 2_000  # a few KB each way, non-ASCII
    assert call(stack.host, stack.dubbo_port, GREETER, "echo", [text]) == text

    # attachments() goes to v2 with the route's request_mutation added to the consumer's own.
    seen = call(stack.host, stack.dubbo_port, GREETER, "attachments", attachments={"x-trace": "t-1"})
    assert (seen["x-routed-by"], seen["x-trace"], seen["interface"]) == ("metabridge", "t-1", GREETER)

    # Calls in flight together on the consumer's one connection, to both providers: each answer
    # is matched to its call by request id.
    canary = [i % 2 == 0 for i in range(CONCURRENT_CALLS)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda c: call(stack.host, stack.dubbo_port, GREETER, "whoami", attachments={"x-canary": str(c).lower()}), canary))
    assert answers == ["greeter-v2" if c else "greeter-v1" for c in canary]


def test_no_route_and_provider_errors_reach_the_consumer_as_errors(stack: Stack) -> None:
    # No route: the consumer gets the bridge's error reply at once, not its own timeout.
    with pytest.raises(ConsumerError) as raised:
        call(stack.host, stack.dubbo_port, UNKNOWN, "whoami", timeout=5)
    assert not isinstance(raised.value, ConsumerTimeout)
    assert f"no route matches {UNKNOWN}/whoami" in str(raised.value)
    # dubbo-py's consumer sees the status and the request id of its call.
    raw = call_raw(stack.host, stack.dubbo_port, UNKNOWN, "whoami", request_id=77, timeout=5)
    assert (raw.id, raw.status) == (77, SERVICE_NOT_FOUND)
    assert f"no route matches {UNKNOWN}/whoami" in raw.error

    # A provider's error response passes through the proxy.
    with pytest.raises(ConsumerError, match="greeter-v1: boom"):
        call(stack.host, stack.dubbo_port, GREETER, "fail", ["boom"])
    # The consumer's connection stays usable after both errors.
    assert call(stack.host, stack.dubbo_port, GREETER, "whoami") == "greeter-v1"


def test_documented_command_line_call(stack: Stack) -> None:
    """docs/docker.md's way to try the Dubbo listener by hand."""
    command = [sys.executable, "-m", "tests.peers.dubbo_peers", "call", "--port", str(stack.dubbo_port), "whoami", "--attachment", "x-canary=true"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, "greeter-v2\n"), result.stderr
