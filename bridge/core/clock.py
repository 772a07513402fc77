"""Time for the proxy core, behind a small interface so any transport can drive it.

The ext_proc transport uses the asyncio loop's clock; an in-process transport supplies its own
(a timer thread that schedules onto Envoy's worker). The core only ever calls ``now`` and
``call_at``, and cancels what ``call_at`` returned.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer: ...


class LoopClock:
    """The running asyncio loop's monotonic clock."""

    __slots__ = ("now", "call_at")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        loop = loop or asyncio.get_running_loop()
        # The loop's own methods, not wrappers: the core reads the clock on every message.
        self.now = loop.time
        self.call_at = loop.call_at


class Deadlines:
    """Items (with ``deadline`` and ``done`` attributes) that each expire at their own time, on
    one armed timer for the earliest deadline.

    Most items arrive in deadline order (one timeout for all): those go to a FIFO, the others to
    a heap; ``expired`` takes from both. A done item is dropped lazily, so settling a request
    costs nothing here.
    """

    __slots__ = ("_clock", "_fifo", "_heap", "_seq", "_timer", "_armed_at", "_on_fire")

    def __init__(self, clock: Clock, on_fire: Callable[[], None]) -> None:
        self._clock = clock
        self._fifo: deque = deque()
        self._heap: list[tuple[float, int, object]] = []
        self._seq = itertools.count()
        self._timer: Timer | None = None
        self._armed_at = 0.0
        self._on_fire = on_fire

    def add(self, item) -> None:
        deadline = item.deadline
        fifo = self._fifo
        if not fifo or deadline >= fifo[-1].deadline:
            fifo.append(item)
        else:
            heapq.heappush(self._heap, (deadline, next(self._seq), item))
        if self._timer is None or deadline < self._armed_at:
            self._arm(deadline)

    def expired(self) -> list:
        """Items past their deadline and not done; re-arms for the next one."""
        self._timer = None
        fifo, heap, now, out = self._fifo, self._heap, self._clock.now(), []
        while fifo and (fifo[0].done or fifo[0].deadline <= now):
            item = fifo.popleft()
            if not item.done:
                out.append(item)
        while heap and (heap[0][2].done or heap[0][0] <= now):
            item = heapq.heappop(heap)[2]
            if not item.done:
                out.append(item)
        if fifo or heap:
            self._arm(min(fifo[0].deadline if fifo else heap[0][0], heap[0][0] if heap else fifo[0].deadline))
        return out

    @property
    def size(self) -> int:
        return len(self._fifo) + len(self._heap)

    def compact(self) -> None:
        """Drop done items (called once they outnumber the live ones: a slow request at the
        head must not keep every fast one behind it referenced until it expires)."""
        self._fifo = deque(item for item in self._fifo if not item.done)
        self._heap = [entry for entry in self._heap if not entry[2].done]
        heapq.heapify(self._heap)

    def forget_all(self) -> None:
        """Drop every item (all are done); the armed timer may fire and find nothing."""
        if self._fifo:
            self._fifo.clear()
        if self._heap:
            self._heap.clear()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fifo.clear()
        self._heap.clear()

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = when
        self._timer = self._clock.call_at(when, self._on_fire)
