"""bridge/core/router.py: first match wins, every matcher kind, weighted picks, the exact-match index."""

from __future__ import annotations

import math

import pytest

import metabridge.core.router as router_module
from metabridge.sdk.codec import Headers
from metabridge.config.model import HeaderMatch, RouteConfig, WeightedCluster
from metabridge.core.router import Router


def route(name: str, *matchers: HeaderMatch, cluster: str | None = None, weighted=None, request_mutation=None, response_mutation=None) -> RouteConfig:
    if weighted is None:
        clusters = (WeightedCluster(cluster or name, 1),)
    else:
        clusters = tuple(WeightedCluster(n, w) for n, w in weighted)
    return RouteConfig(
        name=name,
        headers=tuple(matchers),
        clusters=clusters,
        request_mutation=dict(request_mutation or {}),
        response_mutation=dict(response_mutation or {}),
    )


def exact(name, value, invert=False):
    return HeaderMatch(name, "exact", value, invert)


def prefix(name, value, invert=False):
    return HeaderMatch(name, "prefix", value, invert)


def suffix(name, value, invert=False):
    return HeaderMatch(name, "suffix", value, invert)


def regex(name, value, invert=False):
    return HeaderMatch(name, "regex", value, invert)


def present(name, value=True, invert=False):
    return HeaderMatch(name, "present", value, invert)


def matched(router: Router, **headers) -> str | None:
    found = router.match(Headers(headers))
    return None if found is None else found.name


# ---- matcher kinds ----------------------------------------------------------------------------

MATCHER_CASES = [
    # (matcher, headers, expected)
    (exact("cmd", "1"), {"cmd": "1"}, True),
    (exact("cmd", "1"), {"cmd": "10"}, False),
    (exact("cmd", "1"), {}, False),
    (exact("cmd", "1", invert=True), {"cmd": "1"}, False),
    (exact("cmd", "1", invert=True), {"cmd": "2"}, True),
    (exact("cmd", "1", invert=True), {}, True),
    (exact("svc", "Echo"), {"svc": "echo"}, False),  # values are case-sensitive
    (prefix("op", "get"), {"op": "getUser"}, True),
    (prefix("op", "get"), {"op": "get"}, True),
    (prefix("op", "get"), {"op": "forget"}, False),
    (prefix("op", "get"), {}, False),
    (prefix("op", "get", invert=True), {"op": "getUser"}, False),
    (prefix("op", "get", invert=True), {"op": "putUser"}, True),
    (prefix("op", "get", invert=True), {}, True),
    (suffix("op", "User"), {"op": "getUser"}, True),
    (suffix("op", "User"), {"op": "getUsers"}, False),
    (suffix("op", "User"), {}, False),
    (suffix("op", "User", invert=True), {"op": "getUser"}, False),
    (suffix("op", "User", invert=True), {"op": "getUsers"}, True),
    (regex("op", "get[A-Z][a-z]+"), {"op": "getUser"}, True),
    # Full match, like Envoy's safe_regex: a match inside the value is not enough.
    (regex("op", "get[A-Z][a-z]+"), {"op": "xgetUser"}, False),
    (regex("op", "get[A-Z][a-z]+"), {"op": "getUser2"}, False),
    (regex("op", "get"), {"op": "getUser"}, False),
    (regex("op", "get[A-Z][a-z]+"), {}, False),
    (regex("op", "get.*", invert=True), {"op": "getUser"}, False),
    (regex("op", "get.*", invert=True), {"op": "putUser"}, True),
    (present("trace"), {"trace": ""}, True),
    (present("trace"), {"other": "1"}, False),
    (present("trace", invert=True), {"trace": "x"}, False),
    (present("trace", invert=True), {}, True),
    (present("trace", False), {}, True),
    (present("trace", False), {"trace": "x"}, False),
    (present("trace", False, invert=True), {"trace": "x"}, True),
    (present("trace", False, invert=True), {}, False),
]


@pytest.mark.parametrize(("matcher", "headers", "expected"), MATCHER_CASES)
def test_each_matcher_kind(matcher, headers, expected):
    router = Router([route("only", matcher)])
    assert (matched(router, **headers) == "only") is expected


def test_all_matchers_of_a_route_must_hold():
    router = Router([route("and", exact("cmd", "1"), prefix("op", "get"), present("trace"), suffix("svc", ".v2"))])
    full = {"cmd": "1", "op": "getUser", "trace": "t", "svc": "echo.v2"}
    assert matched(router, **full) == "and"
    for missing in full:
        partial = {k: v for k, v in full.items() if k != missing}
        assert matched(router, **partial) is None, f"matched without {missing}"
    assert matched(router, **{**full, "svc": "echo.v1"}) is None


def test_route_without_matchers_matches_everything():
    router = Router([route("catch-all")])
    assert matched(router) == "catch-all"
    assert matched(router, cmd="7") == "catch-all"


def test_header_keys_are_case_insensitive_both_ways():
    router = Router([route("upper-config", exact("CMD", "1")), route("mixed-prefix", prefix("Op-Name", "get"))])
    assert matched(router, cmd="1") == "upper-config"
    assert matched(router, Cmd="1") == "upper-config"
    assert router.match(Headers({"OP-NAME": "getX"})).name == "mixed-prefix"
    assert Router([route("present", present("X-Trace"))]).match(Headers({"x-trace": "1"})) is not None


def test_no_route_matches():
    router = Router([route("one", exact("cmd", "1")), route("two", prefix("op", "get"))])
    assert matched(router, cmd="2", op="put") is None
    assert matched(router) is None
    assert Router([]).match(Headers({"cmd": "1"})) is None


# ---- first match wins --------------------------------------------------------------------------


def test_first_match_wins_in_route_order():
    router = Router([route("first", prefix("op", "get")), route("second", prefix("op", "getU")), route("third")])
    assert matched(router, op="getUser") == "first"
    assert matched(router, op="put") == "third"


def test_first_match_wins_when_indexed_and_unindexed_routes_interleave():
    router = Router(
        [
            route("r0-indexed", exact("cmd", "1"), exact("svc", "a")),
            route("r1-unindexed", prefix("op", "get")),
            route("r2-indexed", exact("cmd", "1")),
            route("r3-unindexed", suffix("op", "User")),
            route("r4-indexed", exact("cmd", "2")),
            route("r5-indexed-other-key", exact("svc", "b")),
        ]
    )
    assert matched(router, cmd="1", svc="a", op="getUser") == "r0-indexed"
    assert matched(router, cmd="1", svc="b", op="getUser") == "r1-unindexed"  # before r2 and r5
    assert matched(router, cmd="1", svc="b", op="putUser") == "r2-indexed"  # before r3 and r5
    assert matched(router, cmd="2", op="putUser") == "r3-unindexed"  # before r4
    assert matched(router, cmd="2", op="put") == "r4-indexed"
    assert matched(router, cmd="3", svc="b", op="put") == "r5-indexed-other-key"
    # An indexed route under one key does not hide an earlier one indexed under another key.
    assert matched(router, cmd="2", svc="b", op="put") == "r4-indexed"
    assert matched(router, cmd="9", op="put") is None


def test_route_indexed_on_a_later_exact_matcher_still_honours_an_inverted_one():
    # The inverted exact matcher cannot be indexed; the route is indexed on svc and the cmd test
    # still runs.
    router = Router([route("not-cmd-2", exact("cmd", "2", invert=True), exact("svc", "a")), route("fallback")])
    assert matched(router, cmd="1", svc="a") == "not-cmd-2"
    assert matched(router, cmd="2", svc="a") == "fallback"
    assert matched(router, svc="a") == "not-cmd-2"


def test_mutations_are_carried_by_the_matched_route():
    router = Router(
        [
            route("tagged", exact("cmd", "3"), cluster="v1", request_mutation={"cmd": "30", "x-env": "canary"}, response_mutation={"x-served-by": "bridge"}),
            route("plain"),
        ]
    )
    found = router.match(Headers({"cmd": "3"}))
    assert found.request_mutation == {"cmd": "30", "x-env": "canary"}
    assert found.response_mutation == {"x-served-by": "bridge"}
    assert found.pick_cluster() == "v1"
    plain = router.match(Headers({"cmd": "4"}))
    assert plain.request_mutation == {} and plain.response_mutation == {}
    assert [r.name for r in router.routes] == ["tagged", "plain"]


# ---- weighted clusters ---------------------------------------------------------------------------

JUST_UNDER_ONE = math.nextafter(1.0, 0.0)


def pick(route_config: RouteConfig, value: float) -> str:
    return Router([route_config]).routes[0].pick_cluster(lambda: value)


@pytest.mark.parametrize(
    ("rand", "cluster"),
    [(0.0, "v1"), (0.5, "v1"), (0.7999, "v1"), (0.8 - 1e-12, "v1"), (0.8, "v2"), (0.999, "v2"), (JUST_UNDER_ONE, "v2")],
)
def test_weighted_pick_boundaries(rand, cluster):
    assert pick(route("split", weighted=[("v1", 80), ("v2", 20)]), rand) == cluster


@pytest.mark.parametrize(
    ("rand", "cluster"),
    [(0.0, "a"), (0.2499, "a"), (0.25, "b"), (0.7499, "b"), (0.75, "c"), (0.999, "c"), (JUST_UNDER_ONE, "c")],
)
def test_weighted_pick_three_way(rand, cluster):
    assert pick(route("three", weighted=[("a", 1), ("b", 2), ("c", 1)]), rand) == cluster


def test_zero_weight_clusters_are_never_picked():
    config = route("zeros", weighted=[("zero-first", 0), ("b", 50), ("zero-middle", 0), ("d", 50), ("zero-last", 0)])
    compiled = Router([config]).routes[0]
    picks = {compiled.pick_cluster(lambda v=i / 1000: v) for i in range(1000)}
    picks.add(compiled.pick_cluster(lambda: JUST_UNDER_ONE))
    assert picks == {"b", "d"}
    assert pick(config, math.nextafter(0.5, 0.0)) == "b"
    assert pick(config, 0.5) == "d"
    # And with the real random source.
    assert {compiled.pick_cluster() for _ in range(200)} <= {"b", "d"}


def test_single_positive_weight_always_wins():
    config = route("one-live", weighted=[("dead", 0), ("live", 7)])
    assert {pick(config, v) for v in (0.0, 0.5, 0.999, JUST_UNDER_ONE)} == {"live"}


def test_plain_cluster_ignores_rand():
    assert pick(route("plain", cluster="only"), 0.999) == "only"


@pytest.mark.parametrize("weights", [[("a", 0), ("b", 0)], [("a", 0)]])
def test_weights_adding_up_to_zero_are_refused_when_compiling(weights):
    # The config loader refuses these too; a Router built directly must neither fail per message
    # (IndexError) nor send everything to a lone zero-weight cluster.
    with pytest.raises(ValueError, match="'dead-split'.*add up to 0"):
        Router([route("dead-split", weighted=weights)])


# ---- the exact-match index ------------------------------------------------------------------------


@pytest.fixture
def predicate_calls(monkeypatch):
    """Counts every matcher evaluation of the Routers built while the fixture is active."""
    calls = {"n": 0}
    real_compile = router_module._compile_matcher

    def counting_compile(matcher):
        predicate = real_compile(matcher)

        def counted(headers):
            calls["n"] += 1
            return predicate(headers)

        return counted

    monkeypatch.setattr(router_module, "_compile_matcher", counting_compile)
    return calls


def test_a_thousand_routes_are_looked_up_through_the_index(predicate_calls):
    configs = []
    for i in range(1000):
        configs.append(route(f"cmd-{i}", exact("cmd", str(i)), present("svc"), cluster=f"c{i}"))
        if i in (250, 750):
            configs.append(route(f"prefix-after-{i}", prefix("op", "admin."), cluster="admin"))
    configs.append(route("catch-all", cluster="default"))
    router = Router(configs)

    for cmd in ("0", "500", "999"):
        predicate_calls["n"] = 0
        found = router.match(Headers({"cmd": cmd, "svc": "s", "op": "get"}))
        assert found.name == f"cmd-{cmd}"
        assert found.pick_cluster() == f"c{cmd}"
        # The two unindexed prefix routes before it (when they are) plus the route's own two.
        assert predicate_calls["n"] <= 4, predicate_calls["n"]

    predicate_calls["n"] = 0
    assert router.match(Headers({"cmd": "999", "svc": "s", "op": "admin.stop"})).name == "prefix-after-250"
    assert predicate_calls["n"] <= 3

    predicate_calls["n"] = 0
    assert router.match(Headers({"cmd": "999", "op": "get"})).name == "catch-all"  # cmd-999 lacks svc
    assert predicate_calls["n"] <= 4

    predicate_calls["n"] = 0
    assert router.match(Headers({"cmd": "5000", "op": "get"})).name == "catch-all"
    assert predicate_calls["n"] <= 2
