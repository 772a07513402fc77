"""The access log filter: line formatting (JSON and format strings), the fields it reads from a
request through a connection (answered, local reply, closed unanswered), batching into whole-line
writes of at most PIPE_BUF, the bounded queue, reopening on SIGUSR1, write errors and config errors."""

from __future__ import annotations

import json
import logging
import os
import signal

import pytest

from metabridge.core.chain import FilterChain
from metabridge.filters import BUILTIN
from metabridge.filters import access_log
from metabridge.filters.access_log import PIPE_BUF, AccessLogFilter, compile_format, json_formatter
from tests.unit.connection_harness import ROUTE_NOT_FOUND, ROUTES, Harness, encode_frame, in_loop, wait_until

# A record as on_complete builds it (access_log.START ... access_log.ATTEMPTS).
RECORD = (1764633600.25, "dubbo", "c-7", 42, "com.example.Greeter/echo", "request", ("v2", None), "greeter", "greeter-v2", "127.0.0.1:20881", "ok", 0.0123456, 180, 95, 1)


def logger(tmp_path, **config) -> AccessLogFilter:
    # A long interval: the tests decide when lines are written (drain) unless they test the timer.
    return AccessLogFilter({"path": str(tmp_path / "access.log"), "flush_interval": "60s", **config}, listener="test")


def with_filter(f: AccessLogFilter) -> Harness:
    h = Harness(routes=ROUTES)
    h.runtime.chain = FilterChain((f,), "test", h.stats)
    return h


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_json_line_has_every_field_and_only_present_headers():
    entry = json.loads(json_formatter(["x-canary", "x-absent"])(RECORD))
    assert entry == {
        "start_time": "2025-12-02T00:00:00.250Z",
        "listener": "dubbo",
        "connection": "c-7",
        "request_id": 42,
        "operation": "com.example.Greeter/echo",
        "message_type": "request",
        "route": "greeter",
        "cluster": "greeter-v2",
        "upstream_host": "127.0.0.1:20881",
        "outcome": "ok",
        "duration_ms": 12.346,
        "bytes_in": 180,
        "bytes_out": 95,
        "attempts": 1,
        "headers": {"x-canary": "v2"},
    }


def test_format_string_commands_as_envoy_prints_them():
    headers = ["x-canary"]
    fmt = compile_format("[%START_TIME%] %LISTENER% %CONNECTION_ID% %REQUEST_ID% %OPERATION% %MESSAGE_TYPE% %ROUTE% %CLUSTER% %UPSTREAM_HOST% %RESPONSE_STATUS% %DURATION% %BYTES_RECEIVED% %BYTES_SENT% %ATTEMPTS% %REQ(X-Canary)% %REQ(x-other)%", headers)
    assert headers == ["x-canary", "x-other"], "REQ() names are added to the headers copied from each request"
    record = RECORD[:6] + (("v2", None),) + RECORD[7:]
    assert fmt(record) == "[2025-12-02T00:00:00.250Z] dubbo c-7 42 com.example.Greeter/echo request greeter greeter-v2 127.0.0.1:20881 ok 12 180 95 1 v2 -"
    local = RECORD[:7] + ("", "", "", "route_not_found") + RECORD[11:]
    assert compile_format("%ROUTE% %CLUSTER% %UPSTREAM_HOST% %RESPONSE_STATUS%", [])(local) == "- - - route_not_found"


@pytest.mark.parametrize("fmt", ["%NOPE%", "%LISTENER(x)%", "%REQ()%"])
def test_an_unknown_command_is_a_config_error(tmp_path, fmt):
    with pytest.raises(ValueError, match="unknown command"):
        logger(tmp_path, format=fmt)


@pytest.mark.parametrize(
    ("config", "problem"),
    [({"path": "/nonexistent-dir/access.log"}, "does not exist"), ({"max_pending": 0}, "max_pending"), ({"flush_interval": "0s"}, "flush_interval"), ({"colour": "red"}, "colour")],
)
def test_bad_config_is_refused(config, problem):
    with pytest.raises(ValueError, match=problem):
        AccessLogFilter(config, listener="test")


def test_building_the_filter_opens_nothing(tmp_path):
    f = logger(tmp_path)
    assert not f.writer.started
    assert not (tmp_path / "access.log").exists(), "validate and the supervisor's check build filters too"
    assert BUILTIN["access_log"] == "metabridge.filters.access_log:AccessLogFilter"


@in_loop
async def test_one_line_per_request_with_what_the_core_recorded(tmp_path):
    f = logger(tmp_path, headers=["cmd"])
    h = with_filter(f)
    h.read(encode_frame(1, 1, b"ping") + encode_frame(2, 7, b"x"))  # cmd 7: no route
    h.answer_all(b"pong")
    assert [flow for flow, *_ in h.client_frames()] == [2, 1]
    f.writer.drain()
    by_id = {entry["request_id"]: entry for entry in lines(tmp_path / "access.log")}
    ok, missing = by_id[1], by_id[2]
    assert ok["listener"] == "test" and ok["connection"] == h.session.id
    assert (ok["operation"], ok["route"], ok["cluster"], ok["upstream_host"]) == ("cmd1", "cmd-1", "c1", "127.0.0.1:10001")
    assert (ok["outcome"], ok["attempts"], ok["headers"]) == ("ok", 1, {"cmd": "1"})
    assert ok["bytes_in"] == len(encode_frame(1, 1, b"ping")) and ok["bytes_out"] == len(encode_frame(1, 1, b"pong"))
    assert 0 <= ok["duration_ms"] < 5000
    assert (missing["outcome"], missing["route"], missing["cluster"], missing["upstream_host"], missing["attempts"]) == ("route_not_found", "", "", "", 0)
    assert missing["bytes_out"] == len(encode_frame(2, 7, rsp_code=ROUTE_NOT_FOUND)), "the local reply the codec built"
    assert f.stats.snapshot() == {"lines": 2, "dropped": 0, "write_errors": 0}


@in_loop
async def test_a_request_left_unanswered_when_the_connection_closes_is_logged(tmp_path):
    f = logger(tmp_path)
    h = with_filter(f)
    h.read(encode_frame(5, 1, b"ping"))
    h.close()
    f.writer.drain()
    [entry] = lines(tmp_path / "access.log")
    assert (entry["request_id"], entry["outcome"], entry["cluster"]) == (5, "no_reply", "c1")


@in_loop
async def test_lines_wait_for_the_interval_then_go_in_few_whole_line_writes(tmp_path, monkeypatch):
    writes: list[bytes] = []
    real_write = os.write

    def counting_write(fd, data):
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(access_log.os, "write", counting_write)
    f = logger(tmp_path, flush_interval="500ms", headers=["cmd"])
    h = with_filter(f)
    h.read(b"".join(encode_frame(flow, 1, b"ping") for flow in range(1, 101)))
    h.answer_all(b"pong")
    assert writes == [], "nothing is written on the event loop, nor per request"
    path = tmp_path / "access.log"
    await wait_until(lambda: path.exists() and len(path.read_text().splitlines()) == 100, "the writer thread's flush")
    total = sum(len(w) for w in writes)
    assert total == path.stat().st_size
    assert len(writes) * 5 <= 100, "a write carries many lines"
    assert all(len(w) <= PIPE_BUF and w.endswith(b"\n") for w in writes), "whole lines, never more than PIPE_BUF per write"


@in_loop
async def test_a_full_queue_wakes_the_writer_before_its_interval(tmp_path):
    f = logger(tmp_path)  # 60 s interval: only the size trigger can write in time
    h = with_filter(f)
    h.read(b"".join(encode_frame(flow, 1) for flow in range(1, access_log.FLUSH_LINES + 1)))
    h.answer_all(b"pong")
    path = tmp_path / "access.log"
    await wait_until(lambda: path.exists() and len(path.read_text().splitlines()) == access_log.FLUSH_LINES, "the size-triggered flush")


@in_loop
async def test_past_max_pending_lines_are_dropped_and_counted(tmp_path):
    f = logger(tmp_path, max_pending=3)
    h = with_filter(f)
    h.read(b"".join(encode_frame(flow, 1) for flow in range(1, 8)))
    h.answer_all(b"pong")
    assert len(h.client_frames()) == 7, "requests are served whatever the log does"
    assert f.stats.snapshot()["dropped"] == 4 and f.stats.lines == 3
    f.writer.drain()
    assert len(lines(tmp_path / "access.log")) == 3


@in_loop
async def test_sigusr1_reopens_the_file_after_rotation(tmp_path):
    f = logger(tmp_path)
    h = with_filter(f)
    path = tmp_path / "access.log"
    h.read(encode_frame(1, 1))
    h.answer_all(b"pong")
    f.writer.drain()
    os.rename(path, tmp_path / "access.log.1")
    os.kill(os.getpid(), signal.SIGUSR1)  # the handler the first line installed on this loop
    await wait_until(lambda: f.writer.reopens == 1, "the signal to be handled")
    h.read(encode_frame(2, 1))
    h.answer_all(b"pong")
    f.writer.drain()
    assert [e["request_id"] for e in lines(tmp_path / "access.log.1")] == [1]
    assert [e["request_id"] for e in lines(path)] == [2]


@in_loop
async def test_a_failing_write_is_counted_and_logged_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="metabridge.filters.access_log")
    f = logger(tmp_path)
    h = with_filter(f)
    f.writer.path = str(tmp_path / "gone" / "access.log")  # a folder that does not exist
    for flow in (1, 2):
        h.read(encode_frame(flow, 1))
        h.answer_all(b"pong")
        f.writer.drain()
    assert f.stats.snapshot()["write_errors"] == 2
    assert [r.getMessage() for r in caplog.records].count("access_log_write_failed") == 1
    (tmp_path / "gone").mkdir()
    h.read(encode_frame(3, 1))
    h.answer_all(b"pong")
    f.writer.drain()
    assert [e["request_id"] for e in lines(tmp_path / "gone" / "access.log")] == [3]
    assert "access_log_write_recovered" in [r.getMessage() for r in caplog.records]


def test_json_escapes_what_a_peer_sent():
    record = RECORD[:4] + ('Greeter/"echo"\n', "request", ('v"2', "ü€")) + RECORD[7:]
    entry = json.loads(json_formatter(["x-canary", "x-name"])(record))
    assert entry["operation"] == 'Greeter/"echo"\n' and entry["headers"] == {"x-canary": 'v"2', "x-name": "ü€"}
    assert json.loads(json_formatter([])(RECORD[:3] + (None,) + RECORD[4:]))["request_id"] is None


@in_loop
async def test_a_bridge_that_has_logged_nothing_yet_survives_the_rotation_signal(tmp_path):
    f = logger(tmp_path)  # built on the running loop, as the bridge builds its filters
    assert not f.writer.started
    os.kill(os.getpid(), signal.SIGUSR1)  # without the handler this would end the test process
    await wait_until(lambda: f.writer.reopens == 1, "the signal to be handled")
