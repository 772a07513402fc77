"""metabridge.transport.inprocess without Envoy: a fake native module records what the Session
asks of Envoy. Containment of the transport's own failures, timers through the timer thread."""

from __future__ import annotations

import gc
import logging
import threading

import pytest

from metabridge.config.model import CodecConfig, ListenerConfig
from metabridge.core.router import Router
from metabridge.core.runtime import ListenerRuntime
from metabridge.transport import inprocess
from tests.unit.connection_harness import AwesomeRpcCodec, encode_frame, route


class FakeNative:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.scheduled = threading.Event()

    def inject_read(self, handle, data, end=False):
        self.calls.append(("inject_read", handle, bytes(data)))

    def inject_write(self, handle, data, end=False):
        self.calls.append(("inject_write", handle, bytes(data)))

    def close(self, handle, flush=True):
        self.calls.append(("close", handle, flush))

    def count_error(self, handle):
        self.calls.append(("count_error", handle))

    def schedule(self, handle):
        self.calls.append(("schedule", handle))
        self.scheduled.set()
        return True

    def hold_hooks(self):
        self.calls.append(("hold_hooks",))

    def release_hooks(self):
        self.calls.append(("release_hooks",))


@pytest.fixture
def native(monkeypatch):
    fake = FakeNative()
    monkeypatch.setattr(inprocess, "native", fake)
    yield fake
    # A test's sessions may still have timers pending: collect them (they are in cycles) while
    # the fake is in place, so the timer thread does not post them to the real module later.
    gc.collect()


def factory(**options) -> inprocess.FilterFactory:
    config = ListenerConfig(name="arpc", address="127.0.0.1", port=1, codec="awesomerpc", routes=(route("r1", "1", "v1"),), **options)
    return inprocess.FilterFactory(ListenerRuntime(config=config, codec_cls=AwesomeRpcCodec, codec_entry=CodecConfig("awesomerpc", "awesomerpc"), router=Router(config.routes)))


def test_a_request_becomes_hcm_bytes_and_a_no_route_a_local_reply(native):
    session = factory().new_connection(7)
    to_hcm = session.on_read(encode_frame(1, 1, b"x"), False)
    assert to_hcm.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # the HTTP/2 connection, then CONNECT + DATA
    assert encode_frame(1, 1, b"x") in to_hcm  # the request travels in the tunnel's DATA
    assert session.on_read(encode_frame(2, 9, b"?"), False) == b""  # cmd 9 has no route
    assert [c[0] for c in native.calls] == ["inject_write"]  # the local reply, to the client


def test_a_transport_failure_is_contained_logged_once_and_counted(native, caplog, monkeypatch):
    f = factory()
    sessions = [f.new_connection(h) for h in (1, 2)]
    for s in sessions:
        monkeypatch.setattr(s.connection, "receive_client", lambda *a: 1 / 0)
    with caplog.at_level(logging.ERROR, logger="metabridge.inprocess"):
        assert [s.on_read(b"abc", False) for s in sessions] == [b"", b""]
    assert f.errors == 2
    assert [r.getMessage() for r in caplog.records].count("inprocess_transport_error") == 1
    assert ("close", 1, False) in native.calls and ("close", 2, False) in native.calls
    assert [c for c in native.calls if c[0] == "count_error"] == [("count_error", 1), ("count_error", 2)]  # Envoy's counter


def test_a_failing_post_leaves_the_timer_thread_serving_the_others(native, caplog, monkeypatch):
    schedule = native.schedule
    monkeypatch.setattr(native, "schedule", lambda handle: 1 / 0 if handle == 4 else schedule(handle))
    with caplog.at_level(logging.ERROR, logger="metabridge.inprocess"):
        broken = factory(idle_timeout=0.02).new_connection(4)
        healthy = factory(idle_timeout=0.1).new_connection(5)
        assert native.scheduled.wait(5), "the timer thread stopped at the failing post"
    assert ("schedule", 5) in native.calls and broken is not None and healthy is not None
    assert [r.getMessage() for r in caplog.records if r.name == "metabridge.inprocess"] == ["inprocess_timer_post_failed"]


def test_a_timer_posts_an_event_and_runs_on_scheduled(native):
    session = factory(idle_timeout=0.05).new_connection(3)
    assert native.scheduled.wait(5), "the timer thread never posted the idle timer's event"
    session.on_scheduled()
    assert ("close", 3, True) in native.calls  # idle: the connection is closed


def test_nothing_reaches_envoy_after_destroy(native):
    session = factory(idle_timeout=0.05).new_connection(4)
    session.on_destroy()
    assert session.on_read(encode_frame(1, 1, b"x"), False) == b""
    session.post()
    assert native.calls == []


def test_closed_connections_do_not_pile_up_in_the_timer_heap(native):
    f = factory(idle_timeout=3600)  # each connection's idle timer: an hour away
    for handle in range(5000):
        f.new_connection(handle).on_destroy()
    live = f.new_connection(99999)
    assert len(inprocess._TIMERS._heap) < 2 * inprocess.TimerThread._COMPACT_MIN
    assert any(entry[2]() is live for entry in inprocess._TIMERS._heap)  # the open one's timer stays


def test_a_close_decided_during_hcms_write_happens_even_if_the_client_speaks_first(native, monkeypatch):
    session = factory().new_connection(5)
    session.on_read(encode_frame(1, 1, b"x"), False)
    monkeypatch.setattr(session.connection, "take", lambda: (b"to-hcm", b"", True, False))
    session.on_write(b"", False)  # the core decides to close inside HCM's write: deferred
    assert ("close", 5, True) not in native.calls and ("schedule", 5) in native.calls
    monkeypatch.setattr(session.connection, "take", lambda: (b"", b"", False, False))
    assert session.on_read(encode_frame(2, 1, b"y"), False) == b""  # before the scheduled event ran
    assert ("close", 5, True) in native.calls and session.factory.errors == 0


def test_a_callback_from_another_thread_runs_on_the_worker_not_on_that_thread(native):
    session = factory().new_connection(4)
    ran_on: list[str] = []
    caller = threading.Thread(target=session.clock.call_soon_threadsafe, args=(lambda: ran_on.append(threading.current_thread().name),), name="other")
    caller.start()
    caller.join()
    assert ran_on == [] and ("schedule", 4) in native.calls  # posted to the worker, not run there
    session.on_scheduled()
    assert ran_on == [threading.current_thread().name]
    session.on_destroy()
    session.clock.call_soon_threadsafe(lambda: ran_on.append("late"))
    assert native.calls.count(("schedule", 4)) == 1  # nothing is posted for a destroyed connection


def test_admin_reload_refuses_a_broken_config_and_keeps_the_routes(tmp_path, native):
    import yaml

    from metabridge.config.model import load
    from metabridge.core.runtime import build_runtimes
    from tests.integration.harness import awesomerpc_config, cmd_route

    path = tmp_path / "c.yaml"
    raw = awesomerpc_config(1, {"v1": 2, "v2": 3}, [cmd_route(1, "v1")])
    path.write_text(yaml.safe_dump(raw))
    config = load(path)
    runtimes = build_runtimes(config)
    admin = inprocess.InprocessAdmin(config, runtimes)
    path.write_text("listeners: [")
    ok, detail = admin.reload()
    assert not ok and str(path) in detail
    assert [r.name for r in runtimes["awesomerpc"].config.routes] == ["cmd1"]
    raw["listeners"][0]["routes"] = [cmd_route(1, "v2"), cmd_route(2, "v2")]
    path.write_text(yaml.safe_dump(raw))
    assert admin.reload() == (True, str(path))
    assert [r.name for r in runtimes["awesomerpc"].config.routes] == ["cmd1", "cmd2"]
    assert admin.ready() == (True, "serving") and "metabridge_request_total" in admin.metrics().decode()



def test_a_reload_applies_with_the_hooks_held_and_lets_them_go_whatever_happens(tmp_path, native, monkeypatch):
    """The config is applied between native.hold_hooks and release_hooks (the module keeps every
    Envoy thread's hooks out meanwhile: tests/integration/test_inprocess_admin.py), and the hooks
    are let go when applying raises."""
    import yaml

    from metabridge.config.model import load
    from metabridge.core.runtime import build_runtimes
    from tests.integration.harness import awesomerpc_config, cmd_route

    path = tmp_path / "c.yaml"
    raw = awesomerpc_config(1, {"v1": 2, "v2": 3}, [cmd_route(1, "v1")])
    path.write_text(yaml.safe_dump(raw))
    config = load(path)
    admin = inprocess.InprocessAdmin(config, build_runtimes(config))
    real_apply = inprocess.apply_config

    def apply(*args, **kwargs):
        native.calls.append(("apply",))
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(inprocess, "apply_config", apply)
    assert admin.reload() == (True, str(path))
    assert native.calls == [("hold_hooks",), ("apply",), ("release_hooks",)]

    native.calls.clear()
    monkeypatch.setattr(inprocess, "apply_config", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        admin.reload()
    assert native.calls == [("hold_hooks",), ("release_hooks",)]
