"""Routes from an xDS server: the RouteConfiguration translation, the ACK/NACK state machine,
the stream client against a real grpcio xDS server (reconnect, TLS), and the rds config keys."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from datetime import timedelta

import pytest
import yaml
from envoy_data_plane.envoy.config.core import v3 as core
from envoy_data_plane.envoy.config.route import v3 as r
from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryResponse
from envoy_data_plane.envoy.type import v3 as type_v3
from envoy_data_plane.envoy.type.matcher import v3 as matcher
from envoy_data_plane.google.protobuf import Any

from metabridge.codecs.awesomerpc import AwesomeRpcCodec
from metabridge.config.model import CodecConfig, ConfigError, HeaderMatch, MirrorPolicy, RetryPolicy, WeightedCluster, load, parse
from metabridge.core.router import Router
from metabridge.core.runtime import ListenerRuntime, reload_routes
from metabridge.xds import client as xds_client
from metabridge.xds.client import RdsClient, Subscription, node_for
from metabridge.xds.translate import TYPE_URL, TranslationError, translate
from tests.integration.harness import free_port
from tests.xds_server import XdsServer, aeraki_route, aeraki_route_config, make_certs

V1, V2, V3 = "outbound|20880|v1|greeter.example", "outbound|20880|v2|greeter.example", "outbound|20880|v3|greeter.example"
CLUSTERS = {V1: object(), V2: object()}
NAME = "greeter.example_20880"


def one_route(route: r.Route, name: str = NAME) -> r.RouteConfiguration:
    return aeraki_route_config(name, [route])


# -- translation --------------------------------------------------------------------------------



def run_then_stop(server, main) -> None:
    """Run the test's client coroutine (bounded), then stop the xDS server whatever happened."""
    try:
        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        server.stop()

def test_an_aeraki_route_configuration_becomes_the_routes_a_file_gives():
    config = aeraki_route_config(NAME, [
        aeraki_route("canary", cluster=V2, exact={"x-canary": "true"}, request_mutation={"x-routed-by": "rds"}, response_mutation={"x-served-by": "v2"}),
        aeraki_route("split", weighted=[(V1, 80), (V2, 20)], prefix={"method": "say"}, regex={"interface": "com\\.example\\..*"}, hash_keys=["user"], mirror=(V2, 12.5)),
        aeraki_route("catch-all", cluster=V1, present=["interface"]),
    ])
    routes = translate(config, CLUSTERS)
    assert [route.name for route in routes] == ["canary", "split", "catch-all"]
    canary, split, catch_all = routes
    assert canary.headers == (HeaderMatch("x-canary", "exact", "true"),)
    assert canary.clusters == (WeightedCluster(V2, 1),)
    assert (canary.request_mutation, canary.response_mutation) == ({"x-routed-by": "rds"}, {"x-served-by": "v2"})
    assert split.headers == (HeaderMatch("method", "prefix", "say"), HeaderMatch("interface", "regex", "com\\.example\\..*"))
    assert split.clusters == (WeightedCluster(V1, 80), WeightedCluster(V2, 20))
    assert split.hash_policy == ("user",)
    assert split.mirrors == (MirrorPolicy(V2, 12.5),)
    assert catch_all.headers == (HeaderMatch("interface", "present", True),)
    # The same routes as the config file's syntax gives.
    file_routes = parse(
        {
            "codecs": {"c": {"ref": "x.py:C"}},
            "listeners": [{"name": "l", "port": 1, "codec": "c", "routes": [
                {"name": "canary", "match": {"headers": [{"name": "x-canary", "exact": "true"}]}, "route": {"cluster": V2},
                 "request_mutation": [{"key": "x-routed-by", "value": "rds"}], "response_mutation": [{"key": "x-served-by", "value": "v2"}]},
            ]}],
            "clusters": [{"name": V2, "endpoints": [{"address": "127.0.0.1", "port": 1}]}],
        }
    ).listeners[0].routes
    assert file_routes[0] == canary
    Router(routes)  # and the router takes them


def test_every_header_matcher_kind():
    headers = [
        r.HeaderMatcher(name="a", exact_match="1"),
        r.HeaderMatcher(name="b", suffix_match="z", invert_match=True),
        r.HeaderMatcher(name="c"),  # no specifier: present
        r.HeaderMatcher(name="d", present_match=False),
        r.HeaderMatcher(name="e", string_match=matcher.StringMatcher(exact="x")),
        r.HeaderMatcher(name="f", string_match=matcher.StringMatcher(prefix="p")),
        r.HeaderMatcher(name="g", string_match=matcher.StringMatcher(suffix="s")),
        r.HeaderMatcher(name="h", string_match=matcher.StringMatcher(safe_regex=matcher.RegexMatcher(regex="[0-9]+"))),
    ]
    route = r.Route(match=r.RouteMatch(headers=headers), route=r.RouteAction(cluster=V1))
    (translated,) = translate(one_route(route), CLUSTERS)
    assert translated.name == "route0"  # unnamed: as in a file
    assert translated.headers == (
        HeaderMatch("a", "exact", "1"),
        HeaderMatch("b", "suffix", "z", invert=True),
        HeaderMatch("c", "present", True),
        HeaderMatch("d", "present", False),
        HeaderMatch("e", "exact", "x"),
        HeaderMatch("f", "prefix", "p"),
        HeaderMatch("g", "suffix", "s"),
        HeaderMatch("h", "regex", "[0-9]+"),
    )


@pytest.mark.parametrize(
    ("fraction", "percent"),
    [
        (None, 100.0),
        (type_v3.FractionalPercent(numerator=25, denominator=type_v3.FractionalPercentDenominatorType.HUNDRED), 25.0),
        (type_v3.FractionalPercent(numerator=500, denominator=type_v3.FractionalPercentDenominatorType.TEN_THOUSAND), 5.0),
        (type_v3.FractionalPercent(numerator=125_000, denominator=type_v3.FractionalPercentDenominatorType.MILLION), 12.5),
        (type_v3.FractionalPercent(numerator=300, denominator=type_v3.FractionalPercentDenominatorType.HUNDRED), 100.0),
    ],
)
def test_mirror_fraction(fraction, percent):
    policy = r.RouteActionRequestMirrorPolicy(cluster=V2, runtime_fraction=None if fraction is None else core.RuntimeFractionalPercent(default_value=fraction))
    route = r.Route(name="m", match=r.RouteMatch(prefix="/"), route=r.RouteAction(cluster=V1, request_mirror_policies=[policy]))
    assert translate(one_route(route), CLUSTERS)[0].mirrors == (MirrorPolicy(V2, percent),)


def test_timeout_and_retry_policy():
    action = r.RouteAction(
        cluster=V1,
        timeout=timedelta(seconds=1.5),
        retry_policy=r.RetryPolicy(retry_on="connect-failure,reset,timeout", num_retries=3, per_try_timeout=timedelta(milliseconds=250)),
    )
    (route,) = translate(one_route(r.Route(name="t", match=r.RouteMatch(prefix="/"), route=action)), CLUSTERS)
    assert route.timeout == 1.5
    assert route.retry == RetryPolicy(num_retries=3, retry_on=frozenset({"connect_failure", "reset", "timeout"}), per_try_timeout=0.25)


def test_no_virtual_host_is_no_routes():
    assert translate(r.RouteConfiguration(name=NAME), CLUSTERS) == ()


def _with(**route_fields) -> r.RouteConfiguration:
    fields = {"name": "bad", "match": r.RouteMatch(prefix="/"), "route": r.RouteAction(cluster=V1), **route_fields}
    return one_route(r.Route(**fields))


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (r.RouteConfiguration(name=NAME, virtual_hosts=[r.VirtualHost(name="a"), r.VirtualHost(name="b")]), "virtual_hosts: 2 virtual hosts ('a', 'b'); metabridge takes one per listener"),
        (r.RouteConfiguration(name=NAME, virtual_hosts=[r.VirtualHost(name="a", rate_limits=[r.RateLimit(stage=1)])]), "virtual_hosts[0].rate_limits: not supported by metabridge"),
        (r.RouteConfiguration(name=NAME, request_headers_to_remove=["x"]), "route_config.request_headers_to_remove: not supported"),
        (_with(route=None, redirect=r.RedirectAction(host_redirect="elsewhere")), "virtual_hosts[0].routes[0]: a redirect route is not supported"),
        (_with(route=None, direct_response=r.DirectResponseAction(status=200)), "a direct_response route is not supported"),
        (_with(match=r.RouteMatch(prefix="/api")), "virtual_hosts[0].routes[0].match.prefix: '/api': only '/'"),
        (_with(match=r.RouteMatch(path="/exact")), "virtual_hosts[0].routes[0].match.path: not supported by metabridge (metabridge matches a request's attributes as headers; there is no path)"),
        (_with(match=r.RouteMatch(prefix="/", query_parameters=[r.QueryParameterMatcher(name="q")])), "match.query_parameters: not supported"),
        (_with(match=r.RouteMatch(prefix="/", headers=[r.HeaderMatcher(name="x", contains_match="y")])), "match.headers[0].contains_match: not supported"),
        (_with(match=r.RouteMatch(prefix="/", headers=[r.HeaderMatcher(name="x", range_match=type_v3.Int64Range(start=1, end=2))])), "match.headers[0].range_match: not supported"),
        (_with(match=r.RouteMatch(prefix="/", headers=[r.HeaderMatcher(name="x", string_match=matcher.StringMatcher(exact="y", ignore_case=True))])), "match.headers[0].string_match.ignore_case: not supported"),
        (_with(match=r.RouteMatch(prefix="/", headers=[r.HeaderMatcher(name="x", string_match=matcher.StringMatcher(contains="y"))])), "string_match.contains: not supported"),
        (_with(route=r.RouteAction(cluster_header="x-cluster")), "routes[0].route.cluster_header: not supported"),
        (_with(route=r.RouteAction(prefix_rewrite="/v2", cluster=V1)), "routes[0].route.prefix_rewrite: not supported"),
        (_with(route=r.RouteAction(weighted_clusters=r.WeightedCluster(clusters=[r.WeightedClusterClusterWeight(name=V1, weight=1, request_headers_to_add=[core.HeaderValueOption(header=core.HeaderValue(key="k", value="v"))])]))), "route.weighted_clusters.clusters[0].request_headers_to_add: not supported"),
        (_with(route=r.RouteAction(cluster=V1, hash_policy=[r.RouteActionHashPolicy(cookie=r.RouteActionHashPolicyCookie(name="c"))])), "route.hash_policy[0].cookie: not supported by metabridge (metabridge hashes on request attributes: use header)"),
        (_with(route=r.RouteAction(cluster=V1, request_mirror_policies=[r.RouteActionRequestMirrorPolicy(cluster=V2, runtime_fraction=core.RuntimeFractionalPercent(runtime_key="k"))])), "runtime_fraction.runtime_key: not supported by metabridge (there is no Envoy runtime in the bridge)"),
        (_with(route=r.RouteAction(cluster=V1, timeout=timedelta(0))), "route.timeout: 0 (no timeout) is not supported"),
        (_with(route=r.RouteAction(cluster=V1, retry_policy=r.RetryPolicy(retry_on="5xx,reset"))), "route.retry_policy.retry_on: 5xx not supported"),
        (_with(route=r.RouteAction()), "virtual_hosts[0].routes[0].route: no cluster; give cluster or weighted_clusters"),
        (_with(typed_per_filter_config={"envoy.filters.http.local_ratelimit": Any(type_url="x", value=b"")}), "routes[0].typed_per_filter_config: not supported"),
        (_with(request_headers_to_remove=["x"]), "routes[0].request_headers_to_remove: not supported"),
        (_with(route=r.RouteAction(cluster=V3)), f"virtual_hosts[0].routes[0].route.cluster: unknown cluster '{V3}' (did you mean"),
        (_with(route=r.RouteAction(cluster=V1, request_mirror_policies=[r.RouteActionRequestMirrorPolicy(cluster=V3)])), f"routes[0].request_mirror_policies[0].cluster: unknown cluster '{V3}'"),
        (_with(route=r.RouteAction(weighted_clusters=r.WeightedCluster(clusters=[r.WeightedClusterClusterWeight(name=V1, weight=0)]))), "routes[0].route.weighted_clusters: weights add up to 0"),
        (_with(match=r.RouteMatch(prefix="/", headers=[r.HeaderMatcher(name="x", safe_regex_match=matcher.RegexMatcher(regex="(unclosed"))])), "routes[0].match.headers[0].regex: invalid regular expression"),
        (_with(route=r.RouteAction(cluster="not a name")), "routes[0].route.cluster: 'not a name' is not a name"),
    ],
)
def test_refused_with_the_field_named(config, expected):
    with pytest.raises(TranslationError) as caught:
        translate(config, CLUSTERS)
    assert expected in str(caught.value)


def test_every_problem_is_reported_at_once():
    config = aeraki_route_config(NAME, [aeraki_route("a", cluster=V1), r.Route(name="b", redirect=r.RedirectAction()), r.Route(name="c", match=r.RouteMatch(prefix="/x"), route=r.RouteAction(cluster=V1))])
    with pytest.raises(TranslationError) as caught:
        translate(config, CLUSTERS)
    assert "routes[1]: a redirect route" in str(caught.value) and "routes[2].match.prefix" in str(caught.value)


# -- the ACK/NACK state machine -----------------------------------------------------------------


def _rds_config(**rds):
    raw = {
        "codecs": {"awesomerpc": {"ref": "awesomerpc"}},
        "listeners": [{"name": "greeter", "port": 20880, "codec": "awesomerpc", "rds": {"server": "127.0.0.1:1", "route_config_name": NAME, **rds}}],
        "clusters": [{"name": name, "endpoints": [{"address": "127.0.0.1", "port": 1}]} for name in (V1, V2)],
    }
    return parse(raw)


def _runtime(config) -> ListenerRuntime:
    listener = config.listeners[0]
    return ListenerRuntime(config=listener, codec_cls=AwesomeRpcCodec, codec_entry=CodecConfig("awesomerpc", "awesomerpc"), router=Router(listener.routes), clusters=config.clusters)


def _response(version: str, nonce: str, *configs, type_url: str = TYPE_URL) -> DiscoveryResponse:
    return DiscoveryResponse(version_info=version, nonce=nonce, type_url=type_url, resources=[Any(type_url=TYPE_URL, value=bytes(c)) for c in configs])


class _Applied:
    def __init__(self, refuse: bool = False) -> None:
        self.configs = []
        self.refuse = refuse

    def __call__(self, config):
        if self.refuse:
            raise TranslationError("refused for the test")
        self.configs.append(config)


def _subscription(apply) -> Subscription:
    rds = _rds_config(node_id="node-1", node_cluster="bridges").listeners[0].rds
    return Subscription(rds, apply, node_for(rds))


def test_first_request_names_the_resource_and_the_node():
    first = _subscription(_Applied()).first_request()
    assert (first.version_info, first.response_nonce, first.type_url, first.resource_names) == ("", "", TYPE_URL, [NAME])
    assert (first.node.id, first.node.cluster, first.node.user_agent_name) == ("node-1", "bridges", "metabridge")
    assert first.error_detail is None


def test_ack_then_nack_keeps_the_accepted_version():
    applied = _Applied()
    sub = _subscription(applied)
    good = one_route(aeraki_route("all", cluster=V1))
    ack = sub.on_response(_response("7", "n1", good))
    assert (ack.version_info, ack.response_nonce, ack.error_detail) == ("7", "n1", None)
    assert applied.configs == [good]
    applied.refuse = True
    nack = sub.on_response(_response("8", "n2", good))
    assert (nack.version_info, nack.response_nonce) == ("7", "n2")  # the version in force, the nonce answered
    assert nack.error_detail.code == 3 and nack.error_detail.message == "version '8': refused for the test"
    assert sub.last_error == "version '8': refused for the test"
    # A new stream starts from the accepted version.
    assert sub.first_request().version_info == "7"
    applied.refuse = False
    again = sub.on_response(_response("9", "n3", good))
    assert (again.version_info, again.error_detail, sub.last_error) == ("9", None, None)


def test_nack_for_a_wrong_type_or_undecodable_resource():
    applied = _Applied()
    sub = _subscription(applied)
    wrong_type = sub.on_response(_response("1", "n1", type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster"))
    assert "type_url 'type.googleapis.com/envoy.config.cluster.v3.Cluster'" in wrong_type.error_detail.message
    garbage = DiscoveryResponse(version_info="2", nonce="n2", type_url=TYPE_URL, resources=[Any(type_url=TYPE_URL, value=b"\x08\x01")])  # name as a number
    nack = sub.on_response(garbage)
    assert "resources[0]: not a RouteConfiguration" in nack.error_detail.message and nack.version_info == ""
    other = DiscoveryResponse(version_info="3", nonce="n3", type_url=TYPE_URL, resources=[Any(type_url="type.googleapis.com/x.Y", value=b"")])
    assert "resources[0]: type_url 'type.googleapis.com/x.Y'" in sub.on_response(other).error_detail.message
    assert applied.configs == []


def test_a_response_without_the_resource_is_acked_and_changes_nothing():
    applied = _Applied()
    sub = _subscription(applied)
    ack = sub.on_response(_response("4", "n1", one_route(aeraki_route("x", cluster=V1), name="another_1")))
    assert (ack.version_info, ack.error_detail) == ("4", None)
    assert applied.configs == []


# -- the client over a real gRPC stream ---------------------------------------------------------


async def _until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout}s")
        await asyncio.sleep(0.02)


def _route_names(runtime) -> list[str]:
    return [route.name for route in runtime.router.routes]


def test_client_applies_pushes_nacks_a_bad_one_and_resumes_after_the_server_restarts():
    port = free_port()
    server = XdsServer(f"127.0.0.1:{port}").start()
    runtime = _runtime(_rds_config(server=f"127.0.0.1:{port}"))
    assert _route_names(runtime) == []

    async def main():
        nonlocal server
        task = asyncio.ensure_future(RdsClient(runtime, runtime.config.rds).run())
        try:
            first = await asyncio.to_thread(server.wait_for, lambda r: r.request.response_nonce == "", 10, "first request")
            assert first.request.resource_names == [NAME] and first.request.version_info == ""
            version, nonce = server.push([one_route(aeraki_route("all-v1", cluster=V1))])
            await asyncio.to_thread(server.wait_for, lambda r: r.request.response_nonce == nonce and not r.nack, 10, "ACK")
            assert _route_names(runtime) == ["all-v1"]
            assert runtime.config.routes[0].clusters == (WeightedCluster(V1, 1),)  # what /config_dump shows
            _, bad = server.push([one_route(aeraki_route("to-v3", cluster=V3))])
            nack = await asyncio.to_thread(server.wait_for, lambda r: r.request.response_nonce == bad, 10, "NACK")
            assert nack.nack and V3 in nack.error and nack.request.version_info == version
            assert _route_names(runtime) == ["all-v1"]
            # The server goes away and comes back: the client reconnects from the version it has.
            server.stop()
            server = XdsServer(f"127.0.0.1:{port}").start()
            again = await asyncio.to_thread(server.wait_for, lambda r: r.request.response_nonce == "", 15, "a new stream")
            assert again.request.version_info == version
            _, nonce = server.push([one_route(aeraki_route("all-v2", cluster=V2))])
            await asyncio.to_thread(server.wait_for, lambda r: r.request.response_nonce == nonce and not r.nack, 10, "ACK")
            assert _route_names(runtime) == ["all-v2"]
        finally:
            task.cancel()

    run_then_stop(server, main)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def test_client_over_mtls_presents_its_certificate(certs):
    server = XdsServer("127.0.0.1:0", tls=(certs["ca"], certs["server"], certs["server_key"])).start()
    tls = {"ca": str(certs["ca"]), "cert": str(certs["client"]), "key": str(certs["client_key"]), "server_name": "xds.test"}
    runtime = _runtime(_rds_config(server=server.address, tls=tls))

    async def main():
        task = asyncio.ensure_future(RdsClient(runtime, runtime.config.rds).run())
        try:
            version, _ = server.push([one_route(aeraki_route("all-v1", cluster=V1))])  # before the stream opens: its first response
            ack = await asyncio.to_thread(server.wait_for, lambda r: r.request.version_info == version and not r.nack, 15, "ACK over mTLS")
            assert ack.client_cn == "metabridge-client"
            assert _route_names(runtime) == ["all-v1"]
        finally:
            task.cancel()

    run_then_stop(server, main)


def test_client_without_a_certificate_is_refused_and_says_so(certs, caplog):
    server = XdsServer("127.0.0.1:0", tls=(certs["ca"], certs["server"], certs["server_key"])).start()
    runtime = _runtime(_rds_config(server=server.address, tls={"ca": str(certs["ca"]), "server_name": "xds.test"}))
    server.push([one_route(aeraki_route("all-v1", cluster=V1))])
    caplog.set_level(logging.WARNING, logger="metabridge.xds")

    async def main():
        task = asyncio.ensure_future(RdsClient(runtime, runtime.config.rds).run())
        try:
            await _until(lambda: any(rec.getMessage() == "rds_stream_failed" for rec in caplog.records), 15, "rds_stream_failed")
        finally:
            task.cancel()

    run_then_stop(server, main)
    failed = next(rec for rec in caplog.records if rec.getMessage() == "rds_stream_failed")
    assert failed.fields["server"] == server.address and failed.fields["error"].startswith("UNAVAILABLE")
    assert server.received == [] and _route_names(runtime) == []


def test_start_runs_a_client_per_rds_listener():
    runtime = _runtime(_rds_config(server=f"127.0.0.1:{free_port()}"))

    async def main():
        tasks = xds_client.start({"greeter": runtime, "static": _runtime(parse({
            "codecs": {"a": {"ref": "awesomerpc"}}, "listeners": [{"name": "static", "port": 1, "codec": "a", "routes": []}], "clusters": []}))})
        assert len(tasks) == 1 and not tasks[0].done()
        for task in tasks:
            task.cancel()

    asyncio.run(main())


# -- config and reload --------------------------------------------------------------------------


def test_rds_config_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "codecs": {"awesomerpc": {"ref": "awesomerpc"}},
        "listeners": [{"name": "greeter", "port": 20880, "codec": "awesomerpc", "rds": {
            "server": "unix:/run/xds.sock", "route_config_name": NAME, "api": "ads", "node_id": "n", "node_cluster": "c",
            "tls": {"ca": "certs/ca.pem", "cert": "certs/c.pem", "key": "certs/k.pem", "server_name": "xds.test"}}}],
        "clusters": [],
    }))
    rds = load(path).listeners[0].rds
    assert (rds.server, rds.route_config_name, rds.api, rds.node_id, rds.node_cluster) == ("unix:/run/xds.sock", NAME, "ads", "n", "c")
    assert (rds.tls.ca, rds.tls.cert, rds.tls.key, rds.tls.server_name) == (tmp_path / "certs/ca.pem", tmp_path / "certs/c.pem", tmp_path / "certs/k.pem", "xds.test")
    assert load(path).listeners[0].routes == ()


@pytest.mark.parametrize(
    ("listener", "expected"),
    [
        ({}, "listeners[0]: 'routes' is a required property (or 'rds', to receive them from an xDS server)"),
        ({"rds": {"server": "xds", "route_config_name": NAME}}, "listeners[0].rds.server: 'xds': expected unix:PATH or HOST:PORT"),
        ({"rds": {"server": "xds:1", "route_config_name": NAME, "tls": {"ca": "a", "cert": "c"}}}, "listeners[0].rds.tls: 'key' is a dependency of 'cert'"),
        ({"rds": {"server": "xds:1"}}, "'route_config_name' is a required property"),
    ],
)
def test_rds_config_errors(listener, expected):
    with pytest.raises(ConfigError) as caught:
        parse({"codecs": {"a": {"ref": "awesomerpc"}}, "listeners": [{"name": "l", "port": 1, "codec": "a", **listener}], "clusters": []})
    assert expected in str(caught.value)


def test_sighup_reload_keeps_the_routes_from_rds(tmp_path):
    path = tmp_path / "c.yaml"
    raw = {
        "codecs": {"awesomerpc": {"ref": "awesomerpc"}},
        "listeners": [{"name": "greeter", "port": 20880, "codec": "awesomerpc", "request_timeout": "5s",
                       "rds": {"server": "127.0.0.1:1", "route_config_name": NAME},
                       "routes": [{"name": "fallback", "route": {"cluster": V1}}]}],
        "clusters": [{"name": name, "endpoints": [{"address": "127.0.0.1", "port": 1}]} for name in (V1, V2)],
    }
    path.write_text(yaml.safe_dump(raw))
    runtime = _runtime(load(path))
    assert _route_names(runtime) == ["fallback"]  # until the first push
    runtime.replace_routes(translate(one_route(aeraki_route("from-rds", cluster=V2)), runtime.clusters))
    raw["listeners"][0]["request_timeout"] = "7s"
    path.write_text(yaml.safe_dump(raw))
    reload_routes({"greeter": runtime}, functools.partial(load, path), str(path))
    assert runtime.config.request_timeout == 7.0  # the file's other settings apply
    assert _route_names(runtime) == ["from-rds"] and [r.name for r in runtime.config.routes] == ["from-rds"]


def test_client_over_ads():
    server = XdsServer("127.0.0.1:0").start()
    runtime = _runtime(_rds_config(server=server.address, api="ads"))

    async def main():
        task = asyncio.ensure_future(RdsClient(runtime, runtime.config.rds).run())
        try:
            version, _ = server.push([one_route(aeraki_route("all-v2", cluster=V2)), one_route(aeraki_route("x", cluster=V1), name="another_1")])
            ack = await asyncio.to_thread(server.wait_for, lambda r: r.request.version_info == version, 15, "ACK over ADS")
            assert not ack.nack and ack.method.endswith("AggregatedDiscoveryService/StreamAggregatedResources")
            assert _route_names(runtime) == ["all-v2"]  # its own RouteConfiguration, not the other
        finally:
            task.cancel()

    run_then_stop(server, main)


def test_client_uses_rds_by_default():
    server = XdsServer("127.0.0.1:0").start()
    runtime = _runtime(_rds_config(server=server.address))

    async def main():
        task = asyncio.ensure_future(RdsClient(runtime, runtime.config.rds).run())
        try:
            first = await asyncio.to_thread(server.wait_for, lambda r: True, 15, "a first request")
            assert first.method == "/envoy.service.route.v3.RouteDiscoveryService/StreamRoutes"
        finally:
            task.cancel()

    run_then_stop(server, main)


def test_an_unexpected_error_while_applying_is_a_nack_not_a_dead_subscription():
    def broken(config):
        raise KeyError("bug")

    sub = _subscription(broken)
    nack = sub.on_response(_response("1", "n1", one_route(aeraki_route("all", cluster=V1))))
    assert nack.error_detail.message == "version '1': KeyError: 'bug'" and nack.version_info == ""
