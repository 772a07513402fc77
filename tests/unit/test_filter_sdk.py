"""metabridge.sdk.filter.call_later: a filter's timer on its request's connection clock, the same
call in both bridge modes (no asyncio loop runs on Envoy's workers in-process)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from metabridge.core.clock import LoopClock
from metabridge.sdk.filter import call_later


class ManualClock:
    """A clock whose time moves only when told; due timers run on advance()."""

    def __init__(self) -> None:
        self.time = 100.0
        self.timers: list[list] = []  # [when, callback, cancelled]

    def now(self) -> float:
        return self.time

    def call_at(self, when, callback):
        entry = [when, callback, False]
        self.timers.append(entry)
        return SimpleNamespace(cancel=lambda: entry.__setitem__(2, True))

    def advance(self, seconds: float) -> None:
        self.time += seconds
        for entry in sorted(self.timers, key=lambda e: e[0]):
            if entry[0] <= self.time and not entry[2]:
                entry[2] = True
                entry[1]()


def request_on(clock) -> SimpleNamespace:
    return SimpleNamespace(connection=SimpleNamespace(clock=clock))


def test_the_callback_runs_with_its_arguments_once_the_delay_is_past_on_the_connections_clock():
    clock, calls = ManualClock(), []
    call_later(request_on(clock), 0.05, lambda *args: calls.append(args), "a", 2)
    assert clock.timers[0][0] == 100.05, "scheduled at the clock's now + delay"
    clock.advance(0.04)
    assert calls == []
    clock.advance(0.02)
    assert calls == [("a", 2)]
    clock.advance(1)
    assert calls == [("a", 2)], "once"


def test_a_cancelled_timer_never_runs():
    clock, calls = ManualClock(), []
    call_later(request_on(clock), 0.01, calls.append, "x").cancel()
    clock.advance(1)
    assert calls == []


def test_on_an_event_loop_clock_it_is_the_loops_timer():
    async def main():
        loop = asyncio.get_running_loop()
        fired = loop.create_future()
        started = loop.time()
        call_later(request_on(LoopClock(loop)), 0.02, fired.set_result, "done")
        return await asyncio.wait_for(fired, 5), loop.time() - started

    result, took = asyncio.run(main())
    assert result == "done" and took >= 0.02 - 0.001  # uvloop's clock counts whole milliseconds
