"""What a connection does when a tunnel fails or ends, and when Envoy drains or breaks the
HTTP/2 connection its tunnels use."""

from __future__ import annotations

import logging

from metabridge.core.pool import Link
from metabridge.core.request import ActiveRequest
from metabridge.core.tunnels import ConnectionDraining, TunnelState
from metabridge.logs import event
from metabridge.sdk.codec import ErrorType

log = logging.getLogger("metabridge.connection")

# Envoy response flags on a failed CONNECT -> the error the client gets, and whether the request
# may go to another host (it never reached a backend, and another host may do better).
_FLAG_ERRORS = {
    "NC": (ErrorType.CLUSTER_NOT_FOUND, "cluster {cluster!r} not found", False),
    "UH": (ErrorType.NO_HEALTHY_UPSTREAM, "no healthy upstream in cluster {cluster!r}", False),
    "UO": (ErrorType.OVER_LIMIT, "cluster {cluster!r} is over its circuit-breaker limits", False),
    "UF": (ErrorType.UNSPECIFIED, "connection to an upstream of cluster {cluster!r} failed", True),
    "URX": (ErrorType.UNSPECIFIED, "connection to an upstream of cluster {cluster!r} failed", True),
    "UT": (ErrorType.TIMEOUT, "connecting to cluster {cluster!r} timed out", True),
    # Not Envoy's: HCM reset the CONNECT with REFUSED_STREAM (metabridge.core.tunnels), unprocessed.
    "REFUSED_STREAM": (ErrorType.UNSPECIFIED, "Envoy refused the tunnel's stream to cluster {cluster!r} (REFUSED_STREAM)", True),
}
_UNKNOWN_FAILURE = (ErrorType.UNSPECIFIED, "no upstream connection to cluster {cluster!r}", True)


class UpstreamEvents:
    """Mixed into Connection."""

    def _cancel_setup_timer(self, link: Link) -> None:
        if link.setup_timer is not None:
            link.setup_timer.cancel()
            link.setup_timer = None

    def _on_tunnel_opened(self, link: Link) -> None:
        self._cancel_setup_timer(link)
        self.pool.opened(link)
        for request in link.pending():
            if request.route is None or request.route.retry is None:
                # Kept only for a re-dispatch, which an open tunnel never needs.
                request.frame = request.metadata.frame = b""

    def on_link_opened(self, link: Link) -> None:
        """A tunnel queued behind a circuit breaker gets no signal from Envoy: time its setup."""
        self.stats.tunnel_opened += 1
        if not link.tunnel.id:  # over HCM's stream limit: it waits for a stream
            self.stats.tunnel_stream_waited += 1
        when = self.clock.now() + self.listener.config.tunnel_setup_timeout
        link.setup_timer = self.clock.call_at(when, lambda: self._event(self._on_setup_timeout, link))

    def _on_setup_timeout(self, link: Link) -> None:
        if link.dropped or link.tunnel.state is not TunnelState.OPENING:
            return
        self.stats.tunnel_failed += 1
        self._drop_link(link, ErrorType.TIMEOUT, f"no upstream connection to cluster {link.tunnel.cluster!r} within {self.listener.config.tunnel_setup_timeout:g}s", reset=True, failed=True, retry_on="connect_failure")

    def _on_tunnel_failed(self, link: Link, status: int, flags: str) -> None:
        """Envoy answered the CONNECT with an error: nothing on the tunnel reached a backend, so
        its requests may go to another slot once each; the rest get the mapped error."""
        self.stats.tunnel_failed += 1
        cluster = link.tunnel.cluster
        found = [f for f in flags.split(",") if f in _FLAG_ERRORS]  # e.g. "UF,URX"
        kind, template, redispatch = _FLAG_ERRORS[found[0]] if found else _UNKNOWN_FAILURE
        # "UO,UF": a connect failed and Envoy's own retry of it overflowed: still never sent.
        redispatch = redispatch or any(_FLAG_ERRORS[f][2] for f in found)
        message = template.format(cluster=cluster)
        if status:
            message += f" (Envoy answered {status}{', ' + flags if flags else ''})"
        # A refused stream says nothing about the host: its slot does not rest, and each of its
        # requests may go once more than a connect failure allows (on a new stream, the same
        # host's when the cluster has no other).
        refused = flags == "REFUSED_STREAM"
        if redispatch:
            self._redispatch(link, message, failed=not refused, extra=1 if refused else 0)
        retry_on = "no_healthy_upstream" if kind is ErrorType.NO_HEALTHY_UPSTREAM else "connect_failure" if redispatch else ""
        self._drop_link(link, kind, message, failed=not refused, retry_on=retry_on)

    def _redispatch(self, link: Link, reason: str, failed: bool = True, extra: int = 0) -> None:
        """Move requests that never reached a backend from a dead tunnel to another one (each
        at most once per host of its cluster, plus ``extra``)."""
        waiting = [r for r in link.pending() if not r.is_stream and r.attempt < self.pool.size(r.cluster) + extra]
        if not waiting:
            return
        self.pool.remove(link, failed=failed)
        link.dropped = True
        for request in waiting:
            other = self.pick_for(request, avoid=link)
            if other is None or other is link:
                continue
            self._detach(request, link)
            if self._register(request, other):
                request.attempt += 1
                self.stats.request_redispatched += 1
                event(log, logging.DEBUG, "request_redispatched", listener=self.listener.name, connection=self.id, cluster=request.cluster, reason=reason, attempt=request.attempt)
                self._send(other, request.frame)
                if other.tunnel.state is not TunnelState.OPENING:
                    request.frame = b""

    def _detach(self, request: ActiveRequest, link: Link, keep_place: bool = False) -> None:
        """Take a request off a tunnel. ``keep_place``: the tunnel may still answer it (a retry
        after a timeout), so an in-order protocol's late response must find a done stand-in."""
        metadata = request.metadata
        if self._by_id:
            if link.by_id.get(metadata.request_id) is request:
                del link.by_id[metadata.request_id]
        else:
            try:
                at = link.in_order.index(request)
            except ValueError:
                pass
            else:
                if keep_place:
                    stand_in = ActiveRequest(self, metadata, request.received)
                    stand_in.done = True
                    link.in_order[at] = stand_in
                else:
                    del link.in_order[at]
        link.active -= 1
        request.link = None

    def _drop_link(self, link: Link, kind: ErrorType, message: str, reset: bool = False, failed: bool = False, retry_on: str = "") -> None:
        """Forget a tunnel; every request still waiting on it is retried (``retry_on`` names the
        reason, for routes whose retry policy allows it) or gets exactly one error reply."""
        self.upstream.close_tunnel(link.tunnel, reset=reset)
        self.pool.remove(link, failed=failed)
        link.dropped = True
        self._cancel_setup_timer(link)
        self._to_links.pop(link, None)
        waiting = link.pending()
        link.by_id.clear()
        link.in_order.clear()
        link.streams.clear()
        if waiting:
            event(log, logging.WARNING, "tunnel_lost", listener=self.listener.name, connection=self.id, cluster=link.tunnel.cluster, upstream=link.tunnel.upstream_host, pending=len(waiting), reason=message)
        for request in waiting:
            if request.is_stream:
                self._streams.pop(request.metadata.stream_id, None)
            elif retry_on and self.retry(request, retry_on, link):
                continue
            self.fail(request, kind, message)

    def _on_draining(self, ev: ConnectionDraining) -> None:
        """HCM drains (graceful GOAWAY): open tunnels finish their requests, the refused ones'
        requests move to open tunnels, and the client connection ends once nothing is in flight."""
        self.stats.downstream_cx_drained += 1
        event(log, logging.INFO, "upstream_draining", listener=self.listener.name, connection=self.id, last_stream_id=ev.last_stream_id, refused=len(ev.refused), requests_in_flight=self.active)
        for tunnel in ev.refused:
            link = tunnel.owner
            self._redispatch(link, "Envoy is draining")
            self._drop_link(link, ErrorType.UNSPECIFIED, "Envoy is draining this connection and refused the upstream connection")
        self._finish_if_drained()

    def _on_connection_lost(self, reason: str) -> None:
        event(log, logging.ERROR, "upstream_http2_lost", listener=self.listener.name, connection=self.id, reason=reason)
        for link in self.pool.links():
            self._drop_link(link, ErrorType.UNSPECIFIED, reason)
        # No new tunnel can be opened on this connection: end it once the replies are out.
        self._finished = True
        self._close = True
