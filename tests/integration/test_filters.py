"""Listener filter chains through a real Envoy and the bridge: the example deny filter as
examples/filters.yaml configures it, and a broken filter whose exceptions cost only their own
request. Both run in both bridge modes (ext_proc and inprocess)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from examples.awesomerpc.client import AwesomeRpcClient
from examples.awesomerpc.protocol import ERROR_CODES
from metabridge.sdk.codec import ErrorType
from tests.integration.harness import MODES, REPO, example_config, free_port, run_async, stack_class

OVER_LIMIT = ERROR_CODES[ErrorType.OVER_LIMIT]
UNSPECIFIED = ERROR_CODES[ErrorType.UNSPECIFIED]


@pytest.fixture
def filters_stack(tmp_path, mode):
    """examples/filters.yaml with its two backends, plus the broken filter after the deny filter."""
    ports = {"awesomerpc-v1": free_port(), "awesomerpc-v2": free_port()}
    listen = free_port()
    config = example_config("examples/filters.yaml", {"awesomerpc": listen}, ports)
    config["listeners"][0]["filters"].append({"name": "broken", "ref": f"{REPO / 'tests/integration/broken_filter.py'}:BrokenFilter"})
    s = stack_class(mode)(tmp_path, config, {"v1": ports["awesomerpc-v1"], "v2": ports["awesomerpc-v2"]})
    s.listen_port = listen
    yield s.start()
    s.stop()


def run(coro):
    return run_async(coro, 30)


@pytest.mark.parametrize("mode", MODES)
def test_the_example_deny_filter_holds_then_refuses_and_others_pass(filters_stack):
    async def main():
        async with await AwesomeRpcClient.connect("127.0.0.1", filters_stack.listen_port) as c:
            started = time.monotonic()
            denied, allowed, other = await asyncio.gather(c.call(13, b"x"), c.call(1, b"a"), c.call(2, b"b"))
            return denied, allowed, other, time.monotonic() - started

    denied, allowed, other, took = run(main())
    assert denied.rsp_code == OVER_LIMIT and took >= 0.05, "cmd 13 is held 50 ms, then refused"
    assert (allowed.rsp_code, allowed.body) == (0, b"v1|a")
    assert (other.rsp_code, other.body) == (0, b"v2|b")


@pytest.mark.parametrize("mode", MODES)
def test_a_broken_filter_costs_only_its_own_request(filters_stack):
    async def main():
        async with await AwesomeRpcClient.connect("127.0.0.1", filters_stack.listen_port) as c:
            broken = await c.call(61, b"x")
            after_complete_bug = await c.call(62, b"y")
            fine = await c.call(1, b"z")
        async with await AwesomeRpcClient.connect("127.0.0.1", filters_stack.listen_port) as other:
            return broken, after_complete_bug, fine, await other.call(2, b"w")

    broken, after_complete_bug, fine, other = run(main())
    assert broken.rsp_code == UNSPECIFIED
    assert (after_complete_bug.rsp_code, after_complete_bug.body) == (0, b"v1|y"), "a failing on_complete loses nothing"
    assert (fine.body, other.body) == (b"v1|z", b"v2|w")
    events = [json.loads(line) for line in filters_stack.log("bridge").splitlines() if '"filter_error"' in line]
    assert [(e["filter"], e["hook"]) for e in events] == [("broken", "on_request"), ("broken", "on_complete")]
    assert all("planted" in e["exception"] and e["listener"] == "awesomerpc" for e in events)
