"""Time for the proxy core, behind a small interface so any transport can drive it.

The ext_proc transport uses the asyncio loop's clock; an in-process transport supplies its own
(a timer thread that schedules onto Envoy's worker). The core only ever calls ``now`` and
``call_at``, and cancels what ``call_at`` returned. ``call_soon_threadsafe`` is for a filter
whose work finishes on another thread (a gRPC call): the callback runs where the connection's
own callbacks run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer: ...

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> object: ...


class LoopClock:
    """The running asyncio loop's monotonic clock."""

    __slots__ = ("now", "call_at", "call_soon_threadsafe")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        loop = loop or asyncio.get_running_loop()
        # The loop's own methods, not wrappers: the core reads the clock on every message.
        self.now = loop.time
        self.call_at = loop.call_at
        self.call_soon_threadsafe = loop.call_soon_threadsafe
