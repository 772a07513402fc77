"""The filter SDK: the contract between metabridge and a request filter.

Each listener runs its requests through a chain of filters, in the order the config lists them,
ending in the router. One filter instance serves every connection of its listener, so keep
per-request state on ``request.state`` (a dict), not on the filter.

    on_request(request) -> FilterStatus
        Called once per request (and once per stream, on STREAM_INIT) on the way in.
        CONTINUE passes the request to the next filter. STOP means the filter has taken the
        request over: it has answered it (``request.local_reply(...)``) or it will later call
        ``request.resume()`` (continue with the next filter) or ``request.local_reply(...)``.
        A paused request does not block other requests or other connections.
        ``request.request_mutation`` may be set here: headers for the upstream request.
    on_response(request, response) -> None
        Called with the decoded response (a Metadata), in reverse filter order, before it is
        encoded for the client. ``request.response_mutation`` may be extended here.
    on_complete(request) -> None
        Called exactly once per request that reached this filter, after its reply was queued
        for the client (a response or a local reply) or when it ended without one (oneway,
        connection closed). Access logs and latency stats read ``request`` here.

A filter that returned STOP and finishes the request later from a timer schedules it with
``call_later(request, delay, callback, *args)``: the timer runs on the request's connection's
clock, which is the event loop's in the bridge process (ext_proc mode) and the connection's Envoy
worker in bridge.mode inprocess, where no asyncio loop runs (``asyncio.get_running_loop()``
raises there).

An exception from any of these is contained: it is logged once as ``filter_error`` and counted;
in ``on_request`` the request gets an UNSPECIFIED error reply. See docs/writing-a-filter.md.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from metabridge.core.clock import Timer
    from metabridge.core.request import ActiveRequest
    from metabridge.sdk.codec import Metadata


class FilterStatus(enum.Enum):
    CONTINUE = "continue"
    STOP = "stop"


class Filter:
    """Base class for filters. ``config`` is the filter's ``config`` mapping from the listener."""

    name: ClassVar[str] = ""

    def __init__(self, config: Mapping[str, Any], *, listener: str) -> None:
        self.config = config
        self.listener = listener

    def on_request(self, request: ActiveRequest) -> FilterStatus:
        return FilterStatus.CONTINUE

    def on_response(self, request: ActiveRequest, response: Metadata) -> None:
        return None

    def on_complete(self, request: ActiveRequest) -> None:
        return None


FILTER_HOOKS = ("on_request", "on_response", "on_complete")


def call_later(request: ActiveRequest, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
    """Run ``callback(*args)`` ``delay`` seconds from now on the clock of ``request``'s connection,
    in either bridge mode (the bridge process's event loop, or the connection's Envoy worker
    in-process); what the callback does to the request (``local_reply``, ``resume``) is sent as
    from any other hook. The returned timer's ``cancel()`` stops it."""
    clock = request.connection.clock
    return clock.call_at(clock.now() + delay, functools.partial(callback, *args) if args else callback)
