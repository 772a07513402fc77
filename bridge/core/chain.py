"""A listener's filter chain: its configured filters in order, then the router.

Every exception a filter raises is contained here: logged once as ``filter_error`` (listener,
filter, hook, request id, traceback), counted, and on the way in the request gets an
UNSPECIFIED reply, so a broken filter costs its own request, never the connection.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from metabridge.core.request import ActiveRequest
from metabridge.core.router import route_request
from metabridge.logs import failure
from metabridge.sdk.codec import ErrorType
from metabridge.sdk.filter import Filter, FilterStatus

log = logging.getLogger("metabridge.filters")

_STOP = FilterStatus.STOP


class FilterChain:
    __slots__ = ("filters", "listener", "stats")

    def __init__(self, filters: Sequence[Filter], listener: str, stats) -> None:
        self.filters = tuple(filters)
        self.listener = listener
        self.stats = stats

    def start(self, request: ActiveRequest) -> None:
        """Run the request through the filters from ``request.next_filter``, then the router."""
        filters = self.filters
        while request.next_filter < len(filters):
            current = filters[request.next_filter]
            request.next_filter += 1
            try:
                status = current.on_request(request)
            except Exception as exc:  # noqa: BLE001 - plugin code: contained, logged, counted
                self._failed(current, "on_request", request, exc)
                if not request.done:
                    request.local_reply(ErrorType.UNSPECIFIED, f"filter {current.name!r} failed: {type(exc).__name__}: {exc}")
                return
            if status is _STOP or request.done:
                request.paused = not request.done
                return
        route_request(request)

    def on_response(self, request: ActiveRequest, response) -> None:
        """The response, through the filters that saw the request, in reverse order."""
        filters = self.filters
        for i in range(min(request.next_filter, len(filters)) - 1, -1, -1):
            try:
                filters[i].on_response(request, response)
            except Exception as exc:  # noqa: BLE001
                self._failed(filters[i], "on_response", request, exc)

    def on_complete(self, request: ActiveRequest) -> None:
        filters = self.filters
        for i in range(min(request.next_filter, len(filters))):
            try:
                filters[i].on_complete(request)
            except Exception as exc:  # noqa: BLE001
                self._failed(filters[i], "on_complete", request, exc)

    def _failed(self, current: Filter, hook: str, request: ActiveRequest, exc: Exception) -> None:
        self.stats.filter_error += 1
        failure(
            log,
            "filter_error",
            exc,
            listener=self.listener,
            filter=current.name or type(current).__name__,
            hook=hook,
            request_id=request.metadata.request_id,
            operation=request.metadata.operation_name,
        )
