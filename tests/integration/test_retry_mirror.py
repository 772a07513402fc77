"""Route retries and request mirroring through a real Envoy and the bridge.

Retries: a cluster of two hosts, one of them bad (refuses connections, resets every request, or
answers too late), the other a healthy example backend; every request gets its real answer.
Mirroring: a copy of each request goes to a mirror cluster whose answers are read and dropped;
a mirror that is missing or slow never changes or delays the primary's reply.

Every test runs in both bridge modes (ext_proc and inprocess); the one that adds a mirror by a
reload reloads with SIGHUP, in-process with POST /reload.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
import urllib.request

import pytest
import yaml

from examples.awesomerpc.client import AwesomeRpcClient
from tests.integration.both_modes import in_process, reload
from tests.integration.harness import MODES, Stack, awesomerpc_config, free_port, multi_endpoint_cluster, port_open, run_async, stack_class, wait_until

CMD = 1


class ResettingBackend:
    """Accepts connections, reads a request and closes the connection without answering."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.resets = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                if conn.recv(65536):
                    self.resets += 1
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture
def stacks(tmp_path, mode):
    started: list[Stack] = []
    extras = []

    def make(bad_port: int | None, *, retry_policy=None, mirrors=None, backends=None, backend_args=None, **listener_options) -> Stack:
        backends = dict(backends or {"good": free_port()})
        pool = [backends["good"]] + ([bad_port] if bad_port else [])
        route = {"match": {"headers": [{"name": "cmd", "exact": str(CMD)}]}, "route": {"cluster": "pool"}}
        if retry_policy:
            route["retry_policy"] = retry_policy
        if mirrors:
            route["request_mirror_policies"] = mirrors
        cfg = awesomerpc_config(free_port(), {name: port for name, port in backends.items() if name != "good"}, [route], **listener_options)
        cfg["clusters"].append(multi_endpoint_cluster("pool", pool))
        cfg["bridge"] = {"metrics_port": free_port()}  # where an in-process reload is asked for
        s = stack_class(mode)(tmp_path, cfg, backends, backend_args=backend_args or {})
        s.metrics_port = cfg["bridge"]["metrics_port"]
        s.listen_port = cfg["listeners"][0]["port"]
        started.append(s)
        return s.start()

    yield make, extras
    for s in started:
        s.stop()
    for extra in extras:
        extra.stop()


async def calls(s: Stack, n: int, concurrency: int = 10, before_leaving=None):
    """``n`` calls on one connection; ``before_leaving`` (blocking, run in a thread) is waited
    for before the client closes it."""
    async with await AwesomeRpcClient.connect("127.0.0.1", s.listen_port) as c:
        replies = []
        for start in range(0, n, concurrency):
            replies += await asyncio.gather(*(c.call(CMD, f"r{i}".encode()) for i in range(start, min(n, start + concurrency))))
        if before_leaving is not None:
            await asyncio.to_thread(before_leaving)
        return replies


def mirror_counters(s: Stack) -> dict[str, float]:
    """The core's mirror counters (sent, response, failed), for a failure's message."""
    with urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {name: float(value) for name, value in re.findall(r"^metabridge_(mirror_\w+)_total\{[^}]*\} (\S+)$", text, re.M)}


def all_from_good(replies) -> bool:
    return all(r.rsp_code == 0 and r.body.startswith(b"good|") for r in replies)


@pytest.mark.parametrize("mode", MODES)
def test_a_host_that_refuses_connections(stacks):
    make, _ = stacks
    s = make(free_port(), retry_policy={"num_retries": 1, "retry_on": ["connect_failure"]})
    replies = run_async(calls(s, 60))
    assert len(replies) == 60 and all_from_good(replies)


@pytest.mark.parametrize("mode", MODES)
def test_a_host_that_resets_mid_request(stacks):
    make, extras = stacks
    bad = ResettingBackend()
    extras.append(bad)
    s = make(bad.port, retry_policy={"num_retries": 1, "retry_on": ["reset"]})
    replies = run_async(calls(s, 60))
    assert len(replies) == 60 and all_from_good(replies), [r for r in replies if r.rsp_code][:3]
    assert bad.resets > 0, "some requests did reach the bad host first"
    assert s.log("bridge").count('"request_retry"') >= bad.resets


@pytest.mark.parametrize("mode", MODES)
def test_without_a_retry_policy_the_reset_requests_get_error_replies(stacks):
    make, extras = stacks
    bad = ResettingBackend()
    extras.append(bad)
    s = make(bad.port)
    replies = run_async(calls(s, 40))
    assert len(replies) == 40 and any(r.rsp_code != 0 for r in replies) and not all_from_good(replies)


@pytest.mark.parametrize("mode", MODES)
def test_a_host_that_answers_too_late(stacks):
    make, _ = stacks
    slow = free_port()
    s = make(
        slow,
        backends={"good": free_port(), "slow": slow},
        backend_args={"slow": ["--delay-ms", "2000"]},
        retry_policy={"num_retries": 1, "retry_on": ["timeout"], "per_try_timeout": "200ms"},
        request_timeout="5s",
    )
    started = time.monotonic()
    replies = run_async(calls(s, 20))
    took = time.monotonic() - started
    assert len(replies) == 20 and all_from_good(replies), [r.body for r in replies][:4]
    assert took < 2 * 2.0, f"each slow try gives up after 200 ms, far below the 2 s delay ({took:.1f}s for 2 rounds of 10)"


@pytest.mark.parametrize("mode", MODES)
def test_a_mirror_gets_copies_and_its_answers_are_dropped(stacks):
    make, _ = stacks
    s = make(None, backends={"good": free_port(), "shadow": free_port()}, mirrors=[{"cluster": "shadow", "runtime_fraction": 100}])

    def shadow_answered_all():
        # The shadow read every copy and answered it: Envoy counted bytes both ways on its
        # tunnels. The client's replies do not wait for the mirror's, so its last answers may
        # still be on the way: the client stays until they are in (its connection carries the
        # tunnels, which end with it; copies unanswered then are abandoned, see the next test).
        wait_until(lambda: s.envoy_stat("cluster.shadow.upstream_cx_rx_bytes_total") >= 40 * 13, 10, f"the shadow's answers to all 40 copies ({mirror_counters(s)})")

    replies = run_async(calls(s, 40, before_leaving=shadow_answered_all))
    assert len(replies) == 40 and all_from_good(replies), "the client sees only the primary's answers"
    counters = mirror_counters(s)
    assert (counters["mirror_sent"], counters["mirror_response"], counters["mirror_failed"], counters.get("mirror_abandoned", 0)) == (40, 40, 0, 0), counters


def slow_mirror(stacks, request_timeout: str):
    """A stack whose route mirrors every request to a shadow that answers after 3 s."""
    make, _ = stacks
    return make(
        None,
        backends={"good": free_port(), "shadow": free_port()},
        backend_args={"shadow": ["--delay-ms", "3000"]},
        mirrors=[{"cluster": "shadow", "runtime_fraction": 100}],
        request_timeout=request_timeout,
    )


@pytest.mark.parametrize("mode", MODES)
def test_copies_unanswered_when_the_client_leaves_are_counted_abandoned(stacks):
    """A slow mirror: the client has its primaries' answers and leaves while the copies are
    still at the shadow. They end with the client's connection, counted, not lost silently."""
    s = slow_mirror(stacks, request_timeout="10s")
    replies = run_async(calls(s, 10))
    assert len(replies) == 10 and all_from_good(replies)
    wait_until(lambda: mirror_counters(s).get("mirror_abandoned") == 10, 10, f"the 10 copies counted abandoned ({mirror_counters(s)})")
    counters = mirror_counters(s)
    assert (counters["mirror_sent"], counters["mirror_response"], counters["mirror_failed"]) == (10, 0, 0), counters


@pytest.mark.parametrize("mode", MODES)
def test_a_missing_or_slow_mirror_never_delays_the_primary(stacks):
    s = slow_mirror(stacks, request_timeout="1s")
    # A mirror to a cluster Envoy does not have: one a reload added (a route may name only
    # defined clusters, and Envoy's bootstrap has the clusters it was rendered with).
    raw = yaml.safe_load(s.config_path.read_text())
    raw["clusters"].append({"name": "nowhere", "endpoints": [{"address": "127.0.0.1", "port": free_port()}]})
    raw["listeners"][0]["routes"][0]["request_mirror_policies"].append({"cluster": "nowhere", "runtime_fraction": 100})
    s.config_path.write_text(yaml.safe_dump(raw))
    if in_process(s):
        wait_until(lambda: port_open(s.metrics_port), 10, "the in-process admin endpoint")
        assert reload(s, s.metrics_port)[0] == 200
    else:
        reload(s)
        wait_until(lambda: '"routes_reloaded"' in s.log("bridge"), 10, "route reload")
    started = time.monotonic()
    replies = run_async(calls(s, 40))
    took = time.monotonic() - started
    assert len(replies) == 40 and all_from_good(replies)
    assert took < 1.0, f"40 requests took {took:.2f}s: the primary waited on a mirror"

