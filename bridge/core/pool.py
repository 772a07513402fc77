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
A route with a hash policy on a RING_HASH / MAGLEV cluster uses HashedHosts instead: Envoy's
ring picks each key's host.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from typing import TYPE_CHECKING

from metabridge.core.tunnels import Tunnel
from metabridge.sdk.codec import Direction, ErrorType

if TYPE_CHECKING:
    from metabridge.core.request import ActiveRequest

SLOT_BACKOFF = 1.0  # seconds a slot rests after its tunnel failed to connect


class Link:
    """The connection's side of one tunnel: its response decoder and the requests on it."""

    __slots__ = ("tunnel", "codec", "buffer", "by_id", "in_order", "streams", "setup_timer", "dropped", "active", "slot", "hash_key", "retiring")

    def __init__(self, tunnel: Tunnel, codec, slot: Slot | None) -> None:
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
        self.slot = slot  # None for a tunnel opened for a hash key
        self.hash_key = ""  # the key it was opened for, until it is known which host it reached
        self.retiring = False  # reached a host another tunnel serves: closes once it is idle

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
    __slots__ = ("hosts", "slots", "policy", "next")

    def __init__(self, hosts: tuple[str, ...], policy: str) -> None:
        self.hosts = hosts  # the listener's plan they were made from
        self.slots = [Slot(h) for h in hosts]
        self.policy = policy
        self.next = random.randrange(len(self.slots))  # connections do not all start on host 0


class HashedHosts:
    """Consistent hashing for one cluster: which host each key went to, and one tunnel per host.

    Envoy's ring (RING_HASH / MAGLEV) decides a key's host; the bridge cannot compute it, so a
    key seen for the first time gets a tunnel of its own carrying the key in HASH_KEY_HEADER, and
    the host Envoy reports for it (UPSTREAM_HOST_HEADER) is remembered for the key. Once several
    keys have led to one host, their requests share that host's tunnel; a second tunnel that
    reached a host already served is retired once its requests are answered. When a host's
    tunnel ends, its keys are looked up again, so only they move.
    """

    __slots__ = ("by_host", "key_host", "probing", "retired")

    LIMIT = 4096  # keys remembered per cluster and connection (least recently used go first)

    def __init__(self) -> None:
        self.by_host: dict[str, Link] = {}
        self.key_host: OrderedDict[str, str] = OrderedDict()
        self.probing: dict[str, Link] = {}  # key -> the tunnel opened for it, host not yet known
        self.retired: set[Link] = set()  # duplicates finishing their requests

    def learn(self, link: Link) -> None:
        """``link``'s tunnel connected: remember its key's host; keep or retire the tunnel."""
        # Without Envoy's word on the host, the tunnel itself stands for it.
        key, host = link.hash_key, link.tunnel.upstream_host or f"tunnel {link.tunnel.id}"
        link.hash_key = ""
        if self.probing.get(key) is link:
            del self.probing[key]
        self.key_host[key] = host
        self.key_host.move_to_end(key)
        if len(self.key_host) > self.LIMIT:
            self.key_host.popitem(last=False)
        serving = self.by_host.get(host)
        if serving is None or serving.dropped:
            self.by_host[host] = link
        elif serving is not link:
            link.retiring = True
            self.retired.add(link)

    def forget(self, link: Link) -> None:
        for key, probe in list(self.probing.items()):
            if probe is link:
                del self.probing[key]
        self.retired.discard(link)
        for host, serving in list(self.by_host.items()):
            if serving is link:
                del self.by_host[host]


class UpstreamPool:
    def __init__(self, connection) -> None:
        self._connection = connection
        # The codec the connection started with (made with it): a reload changes the listener's
        # codec for later connections only, so every tunnel of this one decodes with this.
        self._codecs = connection.listener.codecs
        self._plans = connection.listener.plans  # emptied (never replaced) by a reload
        self._clusters: dict[str, ClusterSlots] = {}
        self._hashed: dict[str, HashedHosts] = {}
        self._orphans: set[Link] = set()  # tunnels to hosts a reload took out of their cluster

    def _replan(self, cluster: str, old: ClusterSlots, hosts: tuple[str, ...], policy: str) -> ClusterSlots:
        """A reload changed the cluster's hosts: new slots, keeping the tunnels of hosts still
        in it; a tunnel whose host left finishes its requests and then closes."""
        slots = ClusterSlots(hosts, policy)
        spare = [s for s in old.slots if s.link is not None]
        for slot in slots.slots:
            match = next((s for s in spare if s.host == slot.host), None)
            if match is not None:
                spare.remove(match)
                slot.link, match.link.slot = match.link, slot
        for orphan in spare:
            link = orphan.link
            link.retiring = True
            self._orphans.add(link)
            if link.active == 0:
                self._connection._drop_link(link, ErrorType.UNSPECIFIED, "its host left the cluster")
        return slots

    def pick_hashed(self, cluster: str, key: str, avoid: Link | None = None) -> Link | None:
        """The link for a request whose route hashes to ``key`` on ``cluster``."""
        hosts = self._hashed.get(cluster)
        if hosts is None:
            hosts = self._hashed[cluster] = HashedHosts()
        host = hosts.key_host.get(key)
        if host is not None:
            link = hosts.by_host.get(host)
            if link is not None and link is not avoid and not link.dropped:
                return link
        link = hosts.probing.get(key)
        if link is not None and link is not avoid:
            return link
        upstream = self._connection.upstream
        if upstream.draining or upstream.lost:
            return next((link for link in hosts.by_host.values() if link is not avoid), None)
        connection = self._connection
        link = Link(upstream.open_tunnel(cluster, hash_key=key), self._codecs.new(Direction.RESPONSE), None)
        link.tunnel.owner = link
        link.hash_key = key
        hosts.probing[key] = link
        connection.on_link_opened(link)
        return link

    def opened(self, link: Link) -> None:
        """A tunnel connected (Envoy said which host it reached)."""
        if link.hash_key:
            self._hashed[link.tunnel.cluster].learn(link)

    def pick(self, cluster: str, avoid: Link | None = None) -> Link | None:
        """The link for one request to ``cluster``, opening a slot's tunnel when needed, and
        another host's than ``avoid``'s when the cluster has one; None when no tunnel can carry
        it (the HTTP/2 connection to HCM is draining or lost)."""
        slots = self._clusters.get(cluster)
        plan = self._plans.get(cluster)  # the listener's cached plan (cluster_plan, inline)
        if slots is None or plan is None or slots.hosts is not plan[0]:
            slots = self._slots(cluster, slots)
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
            # Ties go round among the tied slots only: rotating over all of them would give a
            # busy slot's turns to the slot after it (two fast hosts beside a slow one got 2:1).
            loads = [m.link.active if m.link else 0 for m in members]
            least = min(loads)
            tied = [i for i in range(n) if loads[i] == least]
            first = tied[slots.next % len(tied)]
            slots.next += 1
            order = sorted(range(n), key=lambda i: (loads[i], (i - first) % n))  # first sorts first
        else:
            start = random.randrange(n) if slots.policy == "RANDOM" else slots.next
            slots.next = start + 1
            order = [(start + k) % n for k in range(n)]
        avoided = avoid.slot if avoid is not None else None  # a retry goes to another host
        fallback = None
        for i in order:
            slot = members[i]
            if slot is avoided:
                continue
            link = slot.link
            if link is not None:
                return link
            if can_open and now >= slot.retry_at:
                return self._open(cluster, slot)
            if can_open and fallback is None:
                fallback = slot
        if fallback is not None:  # every other slot is resting: try again rather than fail
            return self._open(cluster, fallback)
        if avoided is not None:  # no other host: the same one again, on a fresh tunnel if need be
            if avoided.link is not None and avoided.link is not avoid:
                return avoided.link
            if can_open:
                return self._open(cluster, avoided)
        return None

    def _slots(self, cluster: str, slots: ClusterSlots | None) -> ClusterSlots:
        """The cluster's slots for the listener's plan: made on first use, made again when a
        reload changed its hosts."""
        hosts, policy = self._connection.listener.cluster_plan(cluster)
        if slots is None:
            slots = self._clusters[cluster] = ClusterSlots(hosts, policy)
        elif slots.hosts is not hosts:  # a reload made a new plan: the same, or other hosts
            if slots.hosts == hosts and slots.policy == policy:
                slots.hosts = hosts
            else:
                slots = self._clusters[cluster] = self._replan(cluster, slots, hosts, policy)
        return slots

    def _open(self, cluster: str, slot: Slot) -> Link:
        connection = self._connection
        tunnel = connection.upstream.open_tunnel(cluster, slot.host)
        link = Link(tunnel, self._codecs.new(Direction.RESPONSE), slot)
        tunnel.owner = link
        slot.link = link
        connection.on_link_opened(link)
        return link

    def remove(self, link: Link, failed: bool = False) -> None:
        """Forget a link; ``failed``: its tunnel never connected, so the slot rests a while."""
        self._orphans.discard(link)
        slot = link.slot
        if slot is None:
            hosts = self._hashed.get(link.tunnel.cluster)
            if hosts is not None:
                hosts.forget(link)
            return
        if slot.link is link:
            slot.link = None
            if failed:
                slot.retry_at = self._connection.clock.now() + SLOT_BACKOFF

    def links(self) -> list[Link]:
        slotted = [s.link for c in self._clusters.values() for s in c.slots if s.link is not None]
        hashed = {id(link): link for h in self._hashed.values() for link in (*h.by_host.values(), *h.probing.values(), *h.retired)}
        return slotted + list(hashed.values()) + list(self._orphans)

    def size(self, cluster: str) -> int:
        """How many hosts a request may try in ``cluster`` (its tunnel slots)."""
        slots = self._clusters.get(cluster)
        return len(slots.slots) if slots else len(self._connection.listener.cluster_plan(cluster)[0])
