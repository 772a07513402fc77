"""A connection's timers and buffer accounting: request deadlines, frame timeout, idle timeout,
drain probes, and its share of the process's undecoded-bytes budget."""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import deque

from metabridge.logs import event
from metabridge.sdk.codec import ErrorType

log = logging.getLogger("metabridge.connection")

_order = itertools.count()  # ties between equal deadlines in the heap
_NEVER = float("inf")


class ConnectionTimers:
    """Mixed into Connection."""

    def _add_deadline(self, request) -> None:
        """Queue a request's deadline (Connection.forward inlines the in-order case)."""
        deadline = request.deadline
        fifo = self._deadline_fifo
        if not fifo or deadline >= fifo[-1].deadline:
            fifo.append(request)
        else:
            heapq.heappush(self._deadline_heap, (deadline, next(_order), request))
        if self._deadline_timer is None or deadline < self._deadline_armed:
            self._arm_deadlines(deadline)

    def _arm_deadlines(self, when: float) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._deadline_armed = when
        self._deadline_timer = self.clock.call_at(when, self._on_deadlines)

    def _on_deadlines(self) -> None:
        self._deadline_timer = None
        self._event(self._expire_requests)

    def _expire_requests(self) -> None:
        """Fail every request past its deadline; re-arm for the earliest one still waiting."""
        fifo, heap, now, expired = self._deadline_fifo, self._deadline_heap, self.clock.now(), []
        while fifo and (fifo[0].done or fifo[0].deadline <= now):
            request = fifo.popleft()
            if not request.done:
                expired.append(request)
        while heap and (heap[0][2].done or heap[0][0] <= now):
            request = heapq.heappop(heap)[2]
            if not request.done:
                expired.append(request)
        if fifo or heap:
            self._arm_deadlines(min(fifo[0].deadline if fifo else _NEVER, heap[0][0] if heap else _NEVER))
        for request in expired:
            if self.retry(request, "timeout", request.link):
                continue
            self.fail(request, ErrorType.TIMEOUT, f"no response within {request.expires - request.received:g}s from cluster {request.cluster!r} ({request.attempt} attempt(s))")

    def _compact_deadlines(self) -> None:
        """Drop settled requests from behind a slow one at the head."""
        self._deadline_fifo = deque(r for r in self._deadline_fifo if not r.done)
        self._deadline_heap = [entry for entry in self._deadline_heap if not entry[2].done]
        heapq.heapify(self._deadline_heap)

    def _cancel_deadlines(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._deadline_fifo.clear()
        self._deadline_heap.clear()

    def _track_buffer(self) -> None:
        """Account undecoded bytes against the process budget; arm the frame timer for a partial."""
        held = len(self._inbuf)
        budget = self.listener.budget
        budget.used += held - self._buffered
        self._buffered = held
        if held and budget.used > budget.limit:
            self.stats.downstream_cx_overflow += 1
            self._release_buffer()
            self._close_now(f"the bridge holds {budget.used + held} undecoded bytes across its connections, over max_buffered_bytes {budget.limit}")
            return
        if held and not self._holding:
            if not self._partial_since:
                self._partial_since = self._last_activity
                if self._frame_timer is None:
                    self._frame_timer = self.clock.call_at(self._partial_since + self._frame_timeout, self._on_frame_timer)
        else:
            self._partial_since = 0.0

    def _release_buffer(self) -> None:
        self.listener.budget.used -= self._buffered
        self._buffered = 0
        self._inbuf.clear()

    def _on_frame_timer(self) -> None:
        self._frame_timer = None
        since = self._partial_since
        if not since or self._finished:
            return
        if self.clock.now() - since < self._frame_timeout:
            self._frame_timer = self.clock.call_at(since + self._frame_timeout, self._on_frame_timer)
            return
        self.stats.downstream_cx_frame_timeout += 1
        self._event(self._close_now, f"a frame begun {self.clock.now() - since:.1f}s ago is still not whole (frame_timeout {self._frame_timeout:g}s)")

    def _probe_drain(self) -> None:
        """Ask HCM, now and then, whether Envoy is draining (see Upstream.send_drain_probe)."""
        self._probe_timer = None
        if self._finished or self.upstream.draining or self.upstream.lost:
            return
        self._probe_timer = self.clock.call_at(self.clock.now() + self._probe_interval, self._probe_drain)
        if self.pool.links():  # without tunnels the next CONNECT's answer carries any GOAWAY
            self._event(self.upstream.send_drain_probe)

    def _check_idle(self) -> None:
        idle_for = self.clock.now() - self._last_activity
        timeout = self.listener.config.idle_timeout
        if idle_for < timeout:
            self._idle_timer = self.clock.call_at(self.clock.now() + timeout - idle_for, self._check_idle)
            return
        self.stats.idle_timeout += 1
        event(log, logging.INFO, "idle_timeout", listener=self.listener.name, connection=self.id, idle_seconds=round(idle_for, 3))
        self._event(self._close_now, "idle")
