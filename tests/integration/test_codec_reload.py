"""Codec reload through Envoy: on SIGHUP a rewritten codec file serves new connections while
open ones keep the codec they started with, and a broken rewrite is refused (logged) while the
last good codec goes on serving. Two bridge workers: the supervisor passes SIGHUP on to each.

What does not apply in-process (so this file runs in ext_proc only):
- the codec reload on SIGHUP with two workers: SIGHUP to the bridge process and bridge worker processes; in-process the same codec reload is POST /reload (test_inprocess_admin.py: new connections get the changed codec, open ones keep theirs, a broken one is refused).
"""

from __future__ import annotations

import asyncio
import json
import signal

from examples.awesomerpc.client import AwesomeRpcClient
from tests.integration.harness import ReloadableCodec, Stack, cmd_route, codec_config, free_port, run_async, wait_until

NO_ROUTE_CMD = 7
WORKERS = 2


def bridge_events(stack: Stack, name: str) -> list[dict]:
    events = []
    for line in stack.log("bridge").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == name:
            events.append(entry)
    return events


def reload_and_wait(stack: Stack, event: str) -> list[dict]:
    """SIGHUP the bridge; wait until every worker logged ``event`` once more."""
    seen = len(bridge_events(stack, event))
    stack.procs["bridge"].send_signal(signal.SIGHUP)
    wait_until(lambda: len(bridge_events(stack, event)) == seen + WORKERS, 15, f"{event} from {WORKERS} workers", stack.procs["bridge"])
    return bridge_events(stack, event)[seen:]


def test_sighup_reloads_a_changed_codec_for_new_connections_only(tmp_path):
    codec = ReloadableCodec(tmp_path)
    ports = {"v1": free_port()}
    cfg = codec_config("awesomerpc", codec.ref, free_port(), ports, [cmd_route(1, "v1")])
    cfg["bridge"] = {"workers": WORKERS}
    stack = Stack(tmp_path, cfg, ports)
    port = cfg["listeners"][0]["port"]
    try:
        stack.start()

        async def main():
            a = await AwesomeRpcClient.connect("127.0.0.1", port)
            before = await a.call(NO_ROUTE_CMD, b"?")
            # A visible change: the codec's error reply for ROUTE_NOT_FOUND carries rsp_code 444.
            codec.answer_no_route_with(444)
            reloaded = await asyncio.to_thread(reload_and_wait, stack, "codec_reloaded")
            async with await AwesomeRpcClient.connect("127.0.0.1", port) as b:
                b_new, b_routed = await b.call(NO_ROUTE_CMD, b"?"), await b.call(1, b"b")
            a_old, a_routed = await a.call(NO_ROUTE_CMD, b"?"), await a.call(1, b"a")
            # A codec that does not even compile: refused, and the last good one serves on.
            codec.break_it()
            refused = await asyncio.to_thread(reload_and_wait, stack, "codec_reload_failed_keeping_old_codec")
            async with await AwesomeRpcClient.connect("127.0.0.1", port) as c:
                c_reply = await c.call(NO_ROUTE_CMD, b"?")
            a_still = await a.call(NO_ROUTE_CMD, b"?")
            closed = a.closed
            a.close()
            await a.wait_closed()
            return before, reloaded, b_new, b_routed, a_old, a_routed, refused, c_reply, a_still, closed

        before, reloaded, b_new, b_routed, a_old, a_routed, refused, c_reply, a_still, closed = run_async(main(), 60)
        assert before.rsp_code == 404
        assert [(e["listener"], e["codec"], e["file"]) for e in reloaded] == [("awesomerpc", "awesomerpc", str(codec.path))] * WORKERS
        assert b_new.rsp_code == 444, "a connection opened after the reload gets the new codec"
        assert (b_routed.rsp_code, b_routed.body) == (0, b"v1|b")
        assert a_old.rsp_code == 404, "the connection opened before keeps the codec it started with"
        assert (a_routed.rsp_code, a_routed.body) == (0, b"v1|a")
        assert len(refused) == WORKERS
        for entry in refused:
            assert entry["level"] == "error" and entry["file"] == str(codec.path) and entry["codec"] == "awesomerpc"
            assert f"importing {codec.path} failed: SyntaxError" in entry["error"], entry["error"]
        assert c_reply.rsp_code == 444, "after a refused reload the last good codec serves new connections"
        assert a_still.rsp_code == 404 and not closed
        assert stack.procs["bridge"].poll() is None
    finally:
        stack.stop()
