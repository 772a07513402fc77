"""A connection's upstream pool: per cluster, one tunnel slot per host, picked per request.

Per-request load balancing. Each cluster gets as many slots as it has endpoints (or the
listener's ``tunnels_per_cluster``). A slot's tunnel is opened on first use with the slot's
endpoint in HOST_OVERRIDE_HEADER; Envoy's override_host policy sends it there when that host is
in the cluster, and the tunnel route retries a failed connect on a host the cluster's lb_policy
picks among the healthy ones. So Envoy still chooses, health-checks and circuit-breaks hosts,
while every request of one long-lived client
connection picks a slot by the cluster's lb_policy: ROUND_ROBIN rotates, LEAST_REQUEST takes
the slot with the fewest requests in flight, RANDOM draws one. A slot whose tunnel failed to
connect waits ``SLOT_BACKOFF`` before it is tried again (its requests go to other slots).
The pool is keyed by cluster (a hash key joins the key once hash policies exist).
"""

from __future__ import annotations

import random
from collections import deque
from typing import TYPE_CHECKING

from bridge.core.tunnels import Tunnel, TunnelState

if TYPE_CHECKING:
    from bridge.core.request import ActiveRequest

SLOT_BACKOFF = 1.0  # seconds a slot rests after its tunnel failed to connect


class Link:
    """The connection's side of one tunnel: its response decoder and the requests on it."""

    __slots__ = ("tunnel", "codec", "buffer", "by_id", "in_order", "streams", "setup_timer", "dropped", "active", "slot")

    def __init__(self, tunnel: Tunnel, codec, slot: Slot) -> None:
        self.tunnel = tunnel
        self.codec = codec
        self.buffer = bytearray()
        self.by_id: dict[object, ActiveRequest] = {}
        # Protocols without request ids: responses come back in request order. A request that
        # timed out stays here (done) so its late response is recognised and dropped.
        self.in_order: deque[ActiveRequest] = deque()
        self.streams: dict[object, ActiveRequest] = {}
        self.setup_timer = None
        self.dropped = False  # given up; whatever still arrives for it is ignored
        self.active = 0  # requests and streams waiting on it
        self.slot = slot

    def pending(self) -> list[ActiveRequest]:
        return [*self.by_id.values(), *(r for r in self.in_order if not r.done), *self.streams.values()]

    def __repr__(self) -> str:
        return f"Link({self.tunnel!r}, active={self.active})"


class Slot:
    __slots__ = ("host", "link", "retry_at")

    def __init__(self, host: str) -> None:
        self.host = host  # "ip:port" to ask Envoy for, or "" to let its lb_policy choose
        self.link: Link | None = None
        self.retry_at = 0.0


class ClusterSlots:
    __slots__ = ("slots", "policy", "next")

    def __init__(self, hosts: tuple[str, ...], policy: str) -> None:
        self.slots = [Slot(h) for h in hosts]
        self.policy = policy
        self.next = random.randrange(len(self.slots))  # connections do not all start on host 0


class UpstreamPool:
    def __init__(self, connection) -> None:
        self._connection = connection
        self._clusters: dict[str, ClusterSlots] = {}

    def pick(self, cluster: str, avoid: Link | None = None) -> Link | None:
        """The link for one request to ``cluster``, opening a slot's tunnel when needed;
        None when no tunnel can carry it (the HTTP/2 connection to HCM is draining or lost)."""
        slots = self._clusters.get(cluster)
        if slots is None:
            hosts, policy = self._connection.listener.cluster_plan(cluster)
            slots = self._clusters[cluster] = ClusterSlots(hosts, policy)
        members = slots.slots
        if len(members) == 1 and avoid is None and members[0].link is not None:
            return members[0].link
        upstream = self._connection.upstream
        can_open = not (upstream.draining or upstream.lost)
        if len(members) == 1 and avoid is None:
            return self._open(cluster, members[0]) if can_open else None
        now = self._connection.clock.now()
        n = len(members)
        if slots.policy == "LEAST_REQUEST":
            order = sorted(range(n), key=lambda i: (members[i].link.active if members[i].link else 0, (i - slots.next) % n))
            slots.next += 1
        else:
            start = random.randrange(n) if slots.policy == "RANDOM" else slots.next
            slots.next = start + 1
            order = [(start + k) % n for k in range(n)]
        fallback = None
        for i in order:
            slot = members[i]
            link = slot.link
            if link is not None:
                if link is not avoid:
                    return link
            elif can_open and now >= slot.retry_at:
                return self._open(cluster, slot)
            elif can_open and fallback is None:
                fallback = slot
        if fallback is not None:  # every other slot is resting: try again rather than fail
            return self._open(cluster, fallback)
        return None

    def _open(self, cluster: str, slot: Slot) -> Link:
        connection = self._connection
        tunnel = connection.upstream.open_tunnel(cluster, slot.host)
        link = Link(tunnel, connection.listener.new_codec_for_responses(), slot)
        tunnel.owner = link
        slot.link = link
        connection.on_link_opened(link)
        return link

    def remove(self, link: Link, failed: bool = False) -> None:
        """Forget a link; ``failed``: its tunnel never connected, so the slot rests a while."""
        slot = link.slot
        if slot.link is link:
            slot.link = None
            if failed:
                slot.retry_at = self._connection.clock.now() + SLOT_BACKOFF

    def links(self) -> list[Link]:
        return [s.link for c in self._clusters.values() for s in c.slots if s.link is not None]

    def size(self, cluster: str) -> int:
        slots = self._clusters.get(cluster)
        return len(slots.slots) if slots else 1

    def is_open(self, link: Link) -> bool:
        return link.tunnel.state is not TunnelState.CLOSED
