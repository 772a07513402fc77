"""Time for the proxy core, behind a small interface so any transport can drive it.

The ext_proc transport uses the asyncio loop's clock; an in-process transport supplies its own
(a timer thread that schedules onto Envoy's worker). The core only ever calls ``now`` and
``call_at``, and cancels what ``call_at`` returned.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer: ...


class LoopClock:
    """The running asyncio loop's monotonic clock."""

    __slots__ = ("_loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()

    def now(self) -> float:
        return self._loop.time()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        return self._loop.call_at(when, callback)


class Deadlines:
    """Items that each expire at their own time, on one armed timer (the earliest deadline).

    An item is dropped lazily: ``expired`` skips items for which ``is_done(item)`` holds, so
    settling a request costs nothing here.
    """

    __slots__ = ("_clock", "_heap", "_seq", "_timer", "_armed_at", "_on_fire")

    def __init__(self, clock: Clock, on_fire: Callable[[], None]) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, object]] = []
        self._seq = itertools.count()
        self._timer: Timer | None = None
        self._armed_at = 0.0
        self._on_fire = on_fire

    def add(self, deadline: float, item: object) -> None:
        heapq.heappush(self._heap, (deadline, next(self._seq), item))
        if self._timer is None or deadline < self._armed_at:
            self._arm(deadline)

    def expired(self, is_done: Callable[[object], bool]) -> list:
        """Items past their deadline and not done; re-arms for the next one."""
        self._timer = None
        heap, now, out = self._heap, self._clock.now(), []
        while heap and (heap[0][0] <= now or is_done(heap[0][2])):
            _, _, item = heapq.heappop(heap)
            if not is_done(item):
                out.append(item)
        if heap:
            self._arm(heap[0][0])
        return out

    @property
    def size(self) -> int:
        return len(self._heap)

    def compact(self, is_done: Callable[[object], bool]) -> None:
        """Drop done items (called once they outnumber the live ones: a slow request at the
        head must not keep every fast one behind it referenced until it expires)."""
        self._heap = [entry for entry in self._heap if not is_done(entry[2])]
        heapq.heapify(self._heap)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = when
        self._timer = self._clock.call_at(when, self._on_fire)
