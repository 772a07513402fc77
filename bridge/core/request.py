"""One request (or one stream) from decode to reply: what filters, access logs and spans read."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from metabridge.sdk.codec import ErrorType, Metadata

if TYPE_CHECKING:
    from metabridge.core.connection import Connection
    from metabridge.core.pool import Link
    from metabridge.core.router import Route


class ActiveRequest:
    """A request in flight.

    Timestamps are the core clock's (monotonic seconds): ``received`` when decoded,
    ``forwarded`` when written toward the upstream, ``first_response`` when its response (or
    the stream's first upstream message) was decoded, ``replied`` when its reply was queued for
    the client. ``error`` is the local reply's type when the bridge answered it itself.
    """

    __slots__ = (
        "connection",
        "metadata",
        "route",
        "cluster",
        "link",
        "received",
        "forwarded",
        "first_response",
        "replied",
        "deadline",
        "attempt",
        "state",
        "request_mutation",
        "response_mutation",
        "response",
        "error",
        "done",
        "reply",
        "next_filter",
        "paused",
        "is_stream",
        "client_closed",
        "upstream_closed",
        "frame",
        "expires",
        "mirror",
        "hash_key",
        "reply_size",
    )

    def __init__(self, connection: Connection, metadata: Metadata, received: float) -> None:
        self.connection = connection
        self.metadata = metadata
        self.route: Route | None = None
        self.cluster = ""
        self.link: Link | None = None
        self.received = received
        self.forwarded = 0.0
        self.first_response = 0.0
        self.replied = 0.0
        self.deadline = 0.0
        self.attempt = 0  # forwarding attempts (a connect failure re-dispatches to another host)
        self.state: dict[str, Any] = {}  # filters' own per-request state, by filter name
        self.request_mutation: dict[str, str] | None = None  # extra headers for the upstream request, set by filters
        self.response_mutation: dict[str, str] | None = None  # extra headers for the reply, set by filters
        self.response: Metadata | None = None  # the decoded response, while filters need it
        self.error: ErrorType | None = None
        self.done = False  # answered (by its response or a local reply) or given up
        self.reply: bytes | None = None  # in-order protocols: the reply waiting for its turn
        self.next_filter = 0  # where the chain goes on when a paused request resumes
        self.paused = False
        self.is_stream = False
        self.client_closed = False  # streams: the client closed its side
        self.upstream_closed = False  # streams: the upstream closed its side
        self.frame = b""  # what was sent upstream, kept while it may be sent again (re-dispatch, retry)
        self.expires = 0.0  # the overall deadline (``deadline`` is the current try's)
        self.mirror = False  # a copy for a mirror cluster: its reply is read and dropped
        self.hash_key = ""  # the route's hash_policy values: RING_HASH / MAGLEV choose the host by it
        self.reply_size = 0  # bytes of a reply the bridge built (a local reply, a mutated response); else len(response.frame)

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
