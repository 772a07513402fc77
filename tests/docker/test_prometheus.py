"""The compose stack's Prometheus: it scrapes the bridge's admin endpoint (in-process: the one
inside Envoy, for the in-process profile's Prometheus) and Envoy's /stats/prometheus; real
awesomerpc traffic shows up in its HTTP API (/api/v1/query) as the request counter and the
request_time_ms histogram (histogram_quantile over _bucket), and every PromQL expression of the
Grafana dashboard (docker/grafana/metabridge-dashboard.json) returns series from it."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from examples.awesomerpc.client import AwesomeRpcClient
from tests.docker.conftest import REPO_ROOT, TEST_INPROCESS_PROMETHEUS_CONFIG, TEST_PROMETHEUS_CONFIG

if TYPE_CHECKING:
    from tests.docker.conftest import Stack

DASHBOARD = REPO_ROOT / "docker" / "grafana" / "metabridge-dashboard.json"
STACK_PROMETHEUS_CONFIG = REPO_ROOT / "docker" / "prometheus" / "prometheus.yml"
STACK_INPROCESS_PROMETHEUS_CONFIG = REPO_ROOT / "docker" / "prometheus" / "prometheus-inprocess.yml"
SCRAPE_WAIT_S = 60
ROUTE, CLUSTER = "cmd-2-to-v2", "awesomerpc-v2"  # examples/docker.yaml: cmd 2 goes to v2
# Grafana's variables, as Grafana would expand them for this test's queries.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$listener": ".+"}


class Prometheus:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> list[dict]:
        """The instant vector ``expr`` evaluates to now (its result list)."""
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:  # a bad query: Prometheus says why
            pytest.fail(f"Prometheus refused {expr}: HTTP {exc.code}: {exc.read().decode(errors='replace')}", pytrace=False)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, condition, what: str, timeout: float = SCRAPE_WAIT_S) -> float:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = self.value(expr)
            except OSError as exc:  # not up yet
                last = exc
            if isinstance(last, float) and condition(last):
                return last
            time.sleep(0.5)  # the poll loop's interval
        pytest.fail(f"Prometheus never showed {what} within {timeout} s: {expr} = {last}", pytrace=False)


@pytest.fixture(scope="module")
def prometheus(stack: Stack) -> Prometheus:
    running = Prometheus(stack.prometheus_port)
    for job in ("metabridge", "envoy"):
        running.wait_for(f'up{{job="{job}"}}', lambda up: up == 1, f"the {job} target up")
    return running


def bridge_metrics(stack: Stack) -> dict[tuple[str, tuple], float]:
    """The admin endpoint's own /metrics now (the bridge's, or the one inside Envoy), by (sample
    name, sorted labels)."""
    text = stack.metrics_text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


async def _traffic(stack: Stack, requests: int, connections: int = 4) -> None:
    async def one_connection(count: int) -> None:
        async with await AwesomeRpcClient.connect(stack.host, stack.listener_port) as client:
            for _ in range(count):
                reply = await client.call(2, b"observed")
                assert reply.rsp_code == 0 and reply.body == b"v2|observed", reply

    await asyncio.wait_for(asyncio.gather(*(one_connection(requests // connections) for _ in range(connections))), 60)


@pytest.mark.parametrize(
    ("stack_path", "test_path"),
    [(STACK_PROMETHEUS_CONFIG, TEST_PROMETHEUS_CONFIG), (STACK_INPROCESS_PROMETHEUS_CONFIG, TEST_INPROCESS_PROMETHEUS_CONFIG)],
    ids=["ext_proc", "inprocess"],
)
def test_the_test_config_is_the_stacks_with_a_short_interval(stack_path, test_path) -> None:
    stack_config, test_config = (yaml.safe_load(path.read_text()) for path in (stack_path, test_path))
    assert test_config["scrape_configs"] == stack_config["scrape_configs"]
    assert test_config["global"]["scrape_interval"] == "1s"


def test_the_inprocess_config_scrapes_the_inprocess_envoy_under_the_same_jobs() -> None:
    # The same job names and paths (the dashboard's queries need nothing else), other targets.
    ext_proc, inprocess = (yaml.safe_load(path.read_text())["scrape_configs"] for path in (STACK_PROMETHEUS_CONFIG, STACK_INPROCESS_PROMETHEUS_CONFIG))
    strip = lambda jobs: [{key: value for key, value in job.items() if key != "static_configs"} for job in jobs]  # noqa: E731
    assert strip(inprocess) == strip(ext_proc)
    assert [job["static_configs"] for job in inprocess] == [[{"targets": ["envoy-inprocess:9102"]}], [{"targets": ["envoy-inprocess:9901"]}]]


def test_prometheus_sees_the_request_counter_and_latency_histogram_of_real_traffic(stack: Stack, prometheus: Prometheus) -> None:
    count_expr = f'metabridge_request_time_ms_count{{listener="awesomerpc", route="{ROUTE}", cluster="{CLUSTER}"}}'
    # A first request makes the series; once Prometheus has a sample of it, the traffic that
    # follows is an increase inside the rate window.
    asyncio.run(_traffic(stack, 1, connections=1))
    prometheus.wait_for(count_expr, lambda value: value >= 1, "the route's first request")
    asyncio.run(_traffic(stack, 200))
    own = bridge_metrics(stack)
    expected = own[("metabridge_request_time_ms_count", (("cluster", CLUSTER), ("listener", "awesomerpc"), ("route", ROUTE)))]
    requests = own[("metabridge_request_total", (("listener", "awesomerpc"),))]
    assert expected >= 201

    # Nothing else sends requests meanwhile, so a scrape after the traffic shows the bridge's values.
    assert prometheus.wait_for(count_expr, lambda value: value >= expected, "the traffic's requests") == expected
    assert prometheus.value('metabridge_request_total{listener="awesomerpc"}') == requests
    assert prometheus.value(f'metabridge_response_success_total{{listener="awesomerpc", route="{ROUTE}", cluster="{CLUSTER}"}}') >= 201
    window = f'rate(metabridge_request_time_ms_bucket{{listener="awesomerpc", route="{ROUTE}", cluster="{CLUSTER}"}}[1m])'
    p50 = prometheus.value(f"histogram_quantile(0.5, sum by (le) ({window}))")
    p99 = prometheus.value(f"histogram_quantile(0.99, sum by (le) ({window}))")
    # A local backend answers at once: the bridge's time is well under a second.
    assert p50 is not None and p99 is not None and not math.isnan(p99), (p50, p99)
    assert 0 < p50 <= p99 < 1000, (p50, p99)
    assert prometheus.value(f"sum(increase(metabridge_request_time_ms_count{{route=\"{ROUTE}\"}}[1m]))") > 100
    # Envoy's own counters arrive too (its own scrape): its listener saw the test's 5 connections.
    prometheus.wait_for('sum(envoy_listener_downstream_cx_total{envoy_listener_address=~".*10000"})', lambda value: value >= 5, "Envoy's listener connections")


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, Grafana's variables expanded."""
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: a variable this test does not expand: {expr}"
            found.append((panel["title"], expr))
    return found


def test_the_dashboard_shows_requests_errors_latency_local_replies_in_flight_and_rate_limits() -> None:
    exprs = " ".join(expr for _, expr in dashboard_expressions())
    for metric in ("metabridge_request_time_ms_count", "metabridge_request_time_ms_bucket", "metabridge_response_success_total", "metabridge_request_active", "metabridge_rate_limited_total"):
        assert metric in exprs
    assert re.search(r"histogram_quantile\(0\.5,", exprs) and re.search(r"histogram_quantile\(0\.99,", exprs)
    assert all(f"metabridge_local_response_{kind}_total" in exprs for kind in ("route_not_found", "over_limit", "timeout", "unspecified"))


def test_every_dashboard_query_returns_series_from_the_stacks_prometheus(stack: Stack, prometheus: Prometheus) -> None:
    asyncio.run(_traffic(stack, 8, connections=2))
    prometheus.wait_for('sum(increase(metabridge_request_time_ms_count[1m]))', lambda value: value > 0, "recent traffic")
    empty = [(title, expr) for title, expr in dashboard_expressions() if not prometheus.query(expr)]
    assert not empty, f"dashboard queries without series: {empty}"
