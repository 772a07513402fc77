"""The fault injection filter (``fault``): delay or abort a share of the requests.

    filters:
      - name: fault
        config:
          delay: {fixed_delay: 100ms, percentage: 50}      # hold half the requests 100 ms
          abort: {error: TIMEOUT, percentage: 10}           # answer 10 % with the codec's TIMEOUT reply
          match: {headers: [{name: cmd, exact: "5"}]}       # optional: only these requests (a route's match)

Each request the match selects (every request without ``match``) is delayed with probability
``delay.percentage`` and aborted with probability ``abort.percentage``, decided independently
when it arrives; ``percentage`` is 0-100 and defaults to 100. A delayed request is paused on a
timer of the connection's clock (metabridge.core.clock: the event loop's in the ext_proc mode,
the module's timer thread inside Envoy) and then resumes with the next filter, or, if it was also chosen for
an abort, gets its error reply after the delay, as Envoy's fault filter does. Nothing else
waits: other requests on the connection and other connections go on. The abort is the codec's
error reply for ``abort.error`` (one of metabridge.sdk.codec.ErrorType). See docs/filters/fault.md.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Mapping
from typing import Any

from metabridge.config.model import parse_duration
from metabridge.config.schema import DURATION
from metabridge.filters.local_ratelimit import MATCH_SCHEMA, check_config, compile_match
from metabridge.sdk.codec import ErrorType
from metabridge.sdk.filter import Filter, FilterStatus

_PERCENTAGE = {"type": "number", "minimum": 0, "maximum": 100}
CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "delay": {
            "type": "object",
            "additionalProperties": False,
            "required": ["fixed_delay"],
            "properties": {"fixed_delay": {"type": "string", "pattern": DURATION}, "percentage": _PERCENTAGE},
        },
        "abort": {
            "type": "object",
            "additionalProperties": False,
            "required": ["error"],
            "properties": {"error": {"enum": [e.name for e in ErrorType]}, "percentage": _PERCENTAGE},
        },
        "match": MATCH_SCHEMA,
    },
}


class FaultStats:
    """The filter's counters (plain integers) and its one gauge; ``snapshot()`` is what an exporter reads."""

    __slots__ = ("delays_injected", "aborts_injected", "active_faults")

    def __init__(self) -> None:
        self.delays_injected = 0
        self.aborts_injected = 0
        self.active_faults = 0  # gauge: requests held by a delay right now

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class _Held:
    """A delayed request's timer, on ``request.state[filter.name]``."""

    __slots__ = ("owner", "handle", "abort")

    def __init__(self, owner: FaultFilter, abort: bool) -> None:
        self.owner = owner
        self.abort = abort
        self.handle = None  # the clock's timer while held


class FaultFilter(Filter):
    name = "fault"

    def __init__(self, config: Mapping[str, Any], *, listener: str, rand: Callable[[], float] = random.random) -> None:
        super().__init__(config, listener=listener)
        check_config(config, CONFIG_SCHEMA)
        if "delay" not in config and "abort" not in config:
            raise ValueError("(config): give a 'delay', an 'abort' or both")
        self.rand = rand
        self.stats = FaultStats()
        delay = config.get("delay")
        self.delay = parse_duration(delay["fixed_delay"]) if delay else None
        self.delay_share = float(delay.get("percentage", 100)) / 100 if delay else 0.0
        abort = config.get("abort")
        self.error = ErrorType[abort["error"]] if abort else None
        self.abort_share = float(abort.get("percentage", 100)) / 100 if abort else 0.0
        self.match = compile_match(config["match"], "match") if "match" in config else None

    def on_request(self, request) -> FilterStatus:
        if self.match is not None and not self.match(request.metadata.headers):
            return FilterStatus.CONTINUE
        rand = self.rand
        delay = self.delay is not None and rand() < self.delay_share
        abort = self.error is not None and rand() < self.abort_share
        if delay:
            held = _Held(self, abort)
            clock = request.connection.clock
            held.handle = clock.call_at(clock.now() + self.delay, functools.partial(self._release, request, held))
            request.state[self.name] = held
            self.stats.delays_injected += 1
            self.stats.active_faults += 1
            return FilterStatus.STOP
        if abort:
            self._abort(request)
            return FilterStatus.STOP
        return FilterStatus.CONTINUE

    def _abort(self, request) -> None:
        self.stats.aborts_injected += 1
        request.local_reply(self.error, f"fault injected: abort with {self.error.name} on listener {self.listener!r}")

    def _release(self, request, held: _Held) -> None:
        """The delay is over: abort the request if it was chosen for that, else resume it."""
        held.handle = None
        self.stats.active_faults -= 1
        if request.done:
            return
        if held.abort:
            self._abort(request)
        else:
            request.resume()

    def on_complete(self, request) -> None:
        held = request.state.get(self.name)
        if isinstance(held, _Held) and held.owner is self and held.handle is not None:
            # Ended while still held (the connection closed): the timer has nothing left to do.
            held.handle.cancel()
            held.handle = None
            self.stats.active_faults -= 1
