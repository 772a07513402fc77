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

An exception from any of these is contained: it is logged once as ``filter_error`` and counted;
in ``on_request`` the request gets an UNSPECIFIED error reply. See docs/writing-a-filter.md.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
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
