"""The router, the last step of every filter chain, and its route table.

Per-request routing with MetaProtocol's semantics: routes in order, first match wins.

A route matches when all its header matchers (exact, prefix, suffix, regex, present, each
optionally inverted) hold on the message's routable headers. Its action is one cluster or a
weighted split (a random pick per message), plus request and response mutations.

Lookup is not a linear scan of every route: each route that has a non-inverted exact matcher is
indexed under that (key, value); a lookup only evaluates the routes indexed under the message's
own values plus the routes that cannot be indexed, in route order, so first-match-wins holds and
1000 routes cost about as much as a handful.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from metabridge.config.model import HeaderMatch, RouteConfig
from metabridge.sdk.codec import ErrorType, Headers

Predicate = Callable[[Mapping[str, str]], bool]


def _compile_matcher(m: HeaderMatch) -> Predicate:
    key = m.name.lower()
    if m.kind == "exact":
        value = m.value

        def test(h):
            return h.get(key) == value
    elif m.kind == "prefix":
        value = m.value

        def test(h):
            v = h.get(key)
            return v is not None and v.startswith(value)
    elif m.kind == "suffix":
        value = m.value

        def test(h):
            v = h.get(key)
            return v is not None and v.endswith(value)
    elif m.kind == "regex":
        # Envoy's safe_regex semantics: the whole value must match.
        pattern = re.compile(m.value)

        def test(h):
            v = h.get(key)
            return v is not None and pattern.fullmatch(v) is not None
    elif m.kind == "present":
        want = bool(m.value)

        def test(h):
            return (key in h) == want
    else:
        raise ValueError(f"unknown matcher kind {m.kind!r}")
    if m.invert:
        return lambda h: not test(h)
    return test


def compile_header_matches(matches: Iterable[HeaderMatch]) -> Predicate:
    """One predicate that holds when all ``matches`` hold on a message's headers, compiled as a
    route's matchers are (so a filter's ``match`` means what a route's does); no matchers: it
    always holds. Raises re.error for an invalid regex."""
    predicates = tuple(_compile_matcher(m) for m in matches)
    if not predicates:
        return lambda h: True
    if len(predicates) == 1:
        return predicates[0]
    return lambda h: all(predicate(h) for predicate in predicates)


@dataclass(slots=True)
class Route:
    """A compiled route: what the session needs after a match."""

    name: str
    clusters: tuple[str, ...]
    cumulative_weights: tuple[int, ...]
    request_mutation: dict[str, str]
    response_mutation: dict[str, str]
    timeout: float | None = None  # seconds; None: the listener's request_timeout
    mirrors: tuple = ()  # metabridge.config.model.MirrorPolicy
    retry: object | None = None  # metabridge.config.model.RetryPolicy
    hash_policy: tuple[str, ...] = ()  # header keys whose values choose the host (RING_HASH / MAGLEV)

    def pick_cluster(self, rand: Callable[[], float] = random.random) -> str:
        if len(self.clusters) == 1:
            return self.clusters[0]
        point = rand() * self.cumulative_weights[-1]
        return self.clusters[bisect.bisect_right(self.cumulative_weights, point)]


class Router:
    def __init__(self, routes: tuple[RouteConfig, ...] | list[RouteConfig]) -> None:
        self._routes: list[Route] = []
        self._predicates: list[tuple[Predicate, ...]] = []
        # (header key) -> value -> ascending route indices; routes without an exact matcher go
        # to _unindexed and are always candidates.
        self._index: dict[str, dict[str, list[int]]] = {}
        self._unindexed: list[int] = []
        for i, rc in enumerate(routes):
            # Zero-weight clusters take no traffic; a route with nothing left could never pick.
            weighted = [w for w in rc.clusters if w.weight > 0]
            if not weighted:
                raise ValueError(f"route {rc.name!r}: weighted cluster weights add up to 0; give at least one cluster a positive weight")
            self._routes.append(
                Route(
                    name=rc.name,
                    clusters=tuple(w.name for w in weighted),
                    cumulative_weights=tuple(itertools.accumulate(w.weight for w in weighted)),
                    request_mutation=dict(rc.request_mutation),
                    response_mutation=dict(rc.response_mutation),
                    timeout=rc.timeout,
                    mirrors=rc.mirrors,
                    retry=rc.retry,
                    hash_policy=tuple(k.lower() for k in rc.hash_policy),
                )
            )
            exact = next((m for m in rc.headers if m.kind == "exact" and not m.invert), None)
            if exact is None:
                self._unindexed.append(i)
            else:
                self._index.setdefault(exact.name.lower(), {}).setdefault(exact.value, []).append(i)
            # A route found through the index already has its indexed value: that matcher holds.
            self._predicates.append(tuple(_compile_matcher(m) for m in rc.headers if m is not exact))

    @property
    def routes(self) -> list[Route]:
        return self._routes

    def match(self, headers: Mapping[str, str]) -> Route | None:
        """The first route whose matchers all hold, or None."""
        if type(headers) is Headers:
            # Its entries, keyed lower-cased as every key here is: a plain dict's get is a C
            # call, Headers.get a Python one (and the matchers make one or two per route).
            headers = headers._items
        first = self._unindexed or None  # the one candidate list, while there is only one
        more = None
        for key, by_value in self._index.items():
            hits = by_value.get(headers.get(key))
            if hits:
                if first is None:
                    first = hits
                elif more is None:
                    more = [first, hits]
                else:
                    more.append(hits)
        if first is None:
            return None
        candidates = first if more is None else heapq.merge(*more)
        predicates = self._predicates
        for i in candidates:
            for predicate in predicates[i]:
                if not predicate(headers):
                    break
            else:
                return self._routes[i]
        return None


def route_request(request) -> None:
    """The terminal filter: match a route, pick its cluster, apply the request mutation and
    hand the frame to the connection's upstream pool with the route's timeout."""
    connection = request.connection
    metadata = request.metadata
    route = connection.listener.router.match(metadata.headers)
    if route is None:
        request.local_reply(ErrorType.ROUTE_NOT_FOUND, f"no route matches {metadata.operation_name or dict(metadata.headers)}")
        return
    request.route = route
    clusters = route.clusters
    request.cluster = clusters[0] if len(clusters) == 1 else route.pick_cluster()
    frame = metadata.frame
    mutation = route.request_mutation
    if request.request_mutation:  # a filter's headers (a trace context) on top of the route's
        mutation = {**mutation, **request.request_mutation}
    if mutation:
        frame = connection.encode_request(request, mutation)
        if frame is None:
            return  # answered: the mutation could not be applied
    timeout = route.timeout if route.timeout is not None else connection.listener.config.request_timeout
    connection.forward(request, frame, timeout)
