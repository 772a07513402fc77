"""One request (or one stream) from decode to reply: what filters, access logs and spans read."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bridge.sdk.codec import ErrorType, Metadata

if TYPE_CHECKING:
    from bridge.core.connection import Connection
    from bridge.core.pool import Link
    from bridge.core.router import Route


class ActiveRequest:
    """A request in flight.

    Timestamps are the core clock's (monotonic seconds): ``received`` when decoded,
    ``forwarded`` when written toward the upstream, ``first_response`` when its response (or
    the stream's first upstream message) was decoded, ``replied`` when its reply was queued for
    the client. ``error`` is the local reply's type when the bridge answered it itself.
    """

    # Defaults live on the class; __init__ sets only what every request has (the core creates
    # one per request, and most requests never touch most of these).
    route: Route | None = None
    cluster = ""
    link: Link | None = None
    forwarded = 0.0
    first_response = 0.0
    replied = 0.0
    deadline = 0.0
    attempt = 0  # forwarding attempts (a connect failure re-dispatches to another host)
    response_mutation: dict[str, str] | None = None  # extra headers for the reply, set by filters
    response: Metadata | None = None
    error: ErrorType | None = None
    done = False  # answered (by its response or a local reply) or given up
    reply: bytes | None = None  # in-order protocols: the reply waiting for its turn
    next_filter = 0  # where the chain goes on when a paused request resumes
    paused = False
    is_stream = False
    client_closed = False  # streams: the client closed its side
    upstream_closed = False  # streams: the upstream closed its side
    frame = b""  # what was sent upstream, kept for a re-dispatch to another host

    def __init__(self, connection: Connection, metadata: Metadata, received: float) -> None:
        self.connection = connection
        self.metadata = metadata
        self.received = received
        self.state: dict[str, Any] = {}  # filters' own per-request state, by filter name

    @property
    def upstream_host(self) -> str:
        link = self.link
        return link.tunnel.upstream_host if link is not None else ""

    @property
    def listener(self) -> str:
        return self.connection.listener.name

    def local_reply(self, kind: ErrorType, message: str) -> None:
        """Answer this request with the codec's error reply (a filter's way to say no)."""
        self.connection.answer(self, kind, message)

    def resume(self) -> None:
        """Continue a request a filter paused with STOP, with the next filter."""
        self.connection.resume(self)

    def __repr__(self) -> str:
        return f"ActiveRequest({self.metadata!r}, route={self.route.name if self.route else None}, cluster={self.cluster!r}, done={self.done})"
