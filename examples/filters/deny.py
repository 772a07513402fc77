"""An example filter: refuse requests whose header has one of the listed values.

    filters:
      - name: deny
        ref: filters/deny.py:DenyFilter
        config: {header: cmd, values: ["13"], error: OVER_LIMIT, hold: 50ms}

``hold`` (optional) keeps a refused request waiting that long before the error reply, without
blocking anything else: it shows how a filter pauses a request (returns STOP) and finishes it
later from a timer, set with the SDK's ``call_later``, which works in both bridge modes (ext_proc
and inprocess, where no asyncio loop runs). See docs/writing-a-filter.md.
"""

from __future__ import annotations

from metabridge.config.model import parse_duration
from metabridge.sdk.codec import ErrorType
from metabridge.sdk.filter import Filter, FilterStatus, call_later


class DenyFilter(Filter):
    name = "deny"

    def __init__(self, config, *, listener):
        super().__init__(config, listener=listener)
        self.header = config["header"]  # a KeyError here is reported as "rejects its config"
        self.values = frozenset(str(v) for v in config["values"])
        self.error = ErrorType[config.get("error", "OVER_LIMIT")]
        self.hold = parse_duration(config["hold"]) if "hold" in config else 0.0

    def on_request(self, request):
        value = request.metadata.headers.get(self.header)
        if value not in self.values:
            return FilterStatus.CONTINUE
        message = f"{self.header}={value} is denied on listener {self.listener!r}"
        request.state[self.name] = value  # per-request state lives on the request
        if not self.hold:
            request.local_reply(self.error, message)
            return FilterStatus.STOP
        # Pause: the connection goes on serving other requests; the reply comes later, from a
        # timer on the request's connection clock (asyncio's loop exists only in ext_proc mode).
        call_later(request, self.hold, request.local_reply, self.error, message)
        return FilterStatus.STOP
