"""The access_log filter through a real Envoy and the bridge: the lines' fields for answered
requests and a local reply, a format string on standard output, and rotation (rename, SIGUSR1,
the new file gets the new lines) with two worker processes sharing one file.

The lines' fields and the format string run in both bridge modes (ext_proc and inprocess, where
the writer's thread runs inside Envoy and standard output is Envoy's). What does not apply
in-process:
- rotation with two workers: it needs bridge worker processes (bridge.workers) and SIGUSR1 to the bridge process; in-process a rotation is POST /reopen_logs or SIGUSR1 to `metabridge run` (test_inprocess_admin.py).
- SIGUSR1 to a bridge without an access log file: a signal to the bridge process (Envoy owns its signals in-process).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

from examples.awesomerpc.client import AwesomeRpcClient, encode_frame
from tests.integration.harness import MODES, Stack, awesomerpc_config, cmd_route, free_port, run_async, wait_until

ROUTES = [cmd_route(1, "v1"), cmd_route(2, "v2")]  # cmd 7 has no route


def access_log(**config) -> list[dict]:
    return [{"name": "access_log", "config": {"flush_interval": "50ms", **config}}]


def read_lines(path: Path) -> list[dict]:
    """Every line of the file as JSON (each must be whole: a torn line fails to parse)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def calls(port: int, plan: list[tuple[int, bytes]]) -> list:
    async with await AwesomeRpcClient.connect("127.0.0.1", port) as client:
        return [await client.call(cmd, body) for cmd, body in plan]


@pytest.mark.parametrize("mode", MODES)
def test_each_request_gets_a_line_with_its_route_cluster_host_outcome_and_sizes(stack, tmp_path):
    path = tmp_path / "access.log"
    s = stack(ROUTES, filters=access_log(path=str(path), headers=["cmd"]))
    plan = [(1, b"a"), (2, b"bb"), (1, b"ccc"), (7, b"dddd"), (2, b"")]
    replies = run_async(calls(s.listen_port, plan))
    assert [r.rsp_code for r in replies] == [0, 0, 0, 404, 0]

    entries = wait_until(lambda: len(read_lines(path)) == len(plan) and read_lines(path), 10, "the access log's lines")
    by_flow = {entry["request_id"]: entry for entry in entries}
    assert sorted(by_flow) == [r.flow for r in replies]
    assert len({entry["connection"] for entry in entries}) == 1, "one client connection"
    for (cmd, body), reply in zip(plan, replies, strict=True):
        entry = by_flow[reply.flow]
        assert entry["listener"] == "awesomerpc" and entry["operation"] == f"cmd{cmd}" and entry["headers"] == {"cmd": str(cmd)}
        assert entry["bytes_in"] == len(encode_frame(reply.flow, cmd, body))
        assert entry["bytes_out"] == len(encode_frame(reply.flow, cmd, reply.body)), "what the client received"
        assert entry["start_time"].endswith("Z") and 0 <= entry["duration_ms"] < 5000  # uvloop's clock ticks in ms
        if cmd == 7:
            assert (entry["outcome"], entry["route"], entry["cluster"], entry["upstream_host"], entry["attempts"]) == ("route_not_found", "", "", "", 0)
        else:
            cluster = f"v{cmd}"
            assert (entry["outcome"], entry["route"], entry["cluster"], entry["attempts"]) == ("ok", f"cmd{cmd}", cluster, 1)
            assert entry["upstream_host"] == f"127.0.0.1:{s.backends[cluster]}"


@pytest.mark.parametrize("mode", MODES)
def test_a_format_string_on_standard_output(stack):
    fmt = "ACCESS %LISTENER% %REQUEST_ID% %OPERATION% %ROUTE% %CLUSTER% %RESPONSE_STATUS% %ATTEMPTS% %REQ(cmd)%"
    s = stack(ROUTES, filters=access_log(format=fmt))
    replies = run_async(calls(s.listen_port, [(2, b"x"), (7, b"y")]))
    wanted = [f"ACCESS awesomerpc {replies[0].flow} cmd2 cmd2 v2 ok 1 2", f"ACCESS awesomerpc {replies[1].flow} cmd7 - - route_not_found 0 7"]
    found = wait_until(lambda: all(w in s.log("bridge").splitlines() for w in wanted), 10, "the lines on the bridge's (in-process: Envoy's) standard output")
    assert found


def test_rotation_with_two_workers_sharing_one_file(tmp_path):
    path, rotated = tmp_path / "access.log", tmp_path / "access.log.1"
    ports = {"v1": free_port(), "v2": free_port()}
    cfg = awesomerpc_config(free_port(), ports, ROUTES, filters=access_log(path=str(path)))
    cfg["bridge"] = {"workers": 2}
    s = Stack(tmp_path, cfg, ports).start()
    port = cfg["listeners"][0]["port"]
    try:
        sent = run_async(many_calls(port, connections=8, per_connection=25))  # both workers serve some
        wait_until(lambda: len(read_lines(path)) == sent, 10, "the lines before rotation")
        os.rename(path, rotated)
        os.kill(s.procs["bridge"].pid, signal.SIGUSR1)  # the supervisor passes it on to its workers
        wait_until(lambda: s.log("bridge").count('"access_log_reopen"') == 2, 10, "both workers to reopen their file")

        sent_after = run_async(many_calls(port, connections=8, per_connection=5))
        wait_until(lambda: len(read_lines(path)) == sent_after, 10, "the new lines in the new file")
        assert len(read_lines(rotated)) == sent, "the renamed file keeps the lines before rotation, and only those"
        assert len({entry["connection"] for entry in read_lines(path)}) == 8
        assert "worker_exited_restarting" not in s.log("bridge"), "no process died of the signal"
    finally:
        s.stop()


async def many_calls(port: int, *, connections: int, per_connection: int) -> int:
    """Calls on several connections at once; returns how many were answered (all must be OK)."""
    replies = await asyncio.gather(*(calls(port, [(1 + i % 2, b"r")] * per_connection) for i in range(connections)))
    assert all(r.rsp_code == 0 for batch in replies for r in batch)
    return sum(len(batch) for batch in replies)


def test_sigusr1_to_a_bridge_without_an_access_log_file_keeps_it_serving(stack):
    s = stack(ROUTES)
    bridge = s.procs["bridge"]
    bridge.send_signal(signal.SIGUSR1)
    # The signal is handled (the reopen is logged), and the bridge goes on serving.
    wait_until(lambda: "access_log_reopen" in s.log("bridge"), 10, "the bridge's SIGUSR1 handling")
    assert run_async(calls(s.listen_port, [(1, b"after")]))[0].body == b"v1|after"
    assert bridge.poll() is None
