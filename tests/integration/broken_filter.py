"""A deliberately broken filter for tests/integration/test_filters.py: a plain exception from
``on_request`` for cmd 61 and from ``on_complete`` for cmd 62; every other request passes."""

from __future__ import annotations

from metabridge.sdk.filter import Filter, FilterStatus


class BrokenFilter(Filter):
    name = "broken"

    def on_request(self, request):
        if request.metadata.headers.get("cmd") == "61":
            raise RuntimeError("planted on_request bug")
        return FilterStatus.CONTINUE

    def on_complete(self, request):
        if request.metadata.headers.get("cmd") == "62":
            raise RuntimeError("planted on_complete bug")
