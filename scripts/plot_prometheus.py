"""Send awesomerpc traffic through a running compose stack and plot what its Prometheus recorded.

    METABRIDGE_PROMETHEUS_CONFIG=$PWD/tests/docker/prometheus.yml docker compose up -d
    .venv/bin/python scripts/plot_prometheus.py --out docs/observability-prometheus.png

(the tests' Prometheus config scrapes every second, which the 15 s rate windows below need).

For ``--duration`` seconds it sends, over a few connections, cmd 2 (route cmd-2-to-v2), cmd 1
(the 80/20 split) and now and then a cmd without a route, at a rate that steps up and down; then
it reads requests/s per route and cluster, p50/p99 latency and local replies from Prometheus's
HTTP API (/api/v1/query_range) and draws them with matplotlib. It needs the project's virtualenv.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.parse
import urllib.request
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's examples/
from examples.awesomerpc.client import AwesomeRpcClient  # noqa: E402

QUERIES = {
    "requests/s by route and cluster": 'sum by (route, cluster) (rate(metabridge_request_time_ms_count{listener="awesomerpc"}[15s]))',
    "latency (ms)": {
        "p50": 'histogram_quantile(0.5, sum by (le) (rate(metabridge_request_time_ms_bucket{listener="awesomerpc"}[15s])))',
        "p99": 'histogram_quantile(0.99, sum by (le) (rate(metabridge_request_time_ms_bucket{listener="awesomerpc"}[15s])))',
    },
    "local replies/s": {"ROUTE_NOT_FOUND": 'sum(rate(metabridge_local_response_route_not_found_total{listener="awesomerpc"}[15s]))'},
}


async def send(host: str, port: int, duration: float, connections: int) -> int:
    """Requests at a rate that steps 50 -> 200 -> 100 per second and connection; every 20th has no route."""
    sent = 0
    deadline = time.monotonic() + duration

    async def one(index: int) -> None:
        nonlocal sent
        async with await AwesomeRpcClient.connect(host, port) as client:
            i = index
            while (left := deadline - time.monotonic()) > 0:
                phase = (duration - left) / duration
                rate = 50 if phase < 1 / 3 else 200 if phase < 2 / 3 else 100
                cmd = 7 if i % 20 == 0 else (2 if i % 2 else 1)
                await client.call(cmd, b"plot")
                sent += 1
                i += 1
                await asyncio.sleep(1 / rate)

    await asyncio.gather(*(one(i) for i in range(connections)))
    return sent


def query_range(base: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{params}", timeout=10) as response:
        body = json.load(response)
    if body["status"] != "success":
        raise SystemExit(f"Prometheus refused {expr}: {body}")
    return body["data"]["result"]


def scraped_at(base: str) -> float:
    """When Prometheus last scraped the bridge."""
    params = urllib.parse.urlencode({"query": 'timestamp(up{job="metabridge"})'})
    with urllib.request.urlopen(f"{base}/api/v1/query?{params}", timeout=10) as response:
        result = json.load(response)["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def plot(base: str, start: float, end: float, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(QUERIES), 1, figsize=(9, 8), sharex=True)
    for axis, (title, queries) in zip(axes, QUERIES.items()):
        named = queries if isinstance(queries, dict) else {"": queries}
        for name, expr in named.items():
            for series in query_range(base, expr, start, end, 2):
                labels = series["metric"]
                # Route and cluster "" are stored without the labels: answered before routing.
                label = name or (f"{labels['route']} -> {labels['cluster']}" if labels else "(no route)")
                times = [datetime.fromtimestamp(float(t)) for t, _ in series["values"]]
                axis.plot(times, [float(v) for _, v in series["values"]], label=label)
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="upper left")
    axes[-1].set_xlabel("time (from the compose stack's Prometheus, /api/v1/query_range)")
    figure.tight_layout()
    figure.savefig(out, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=10000, help="Envoy's awesomerpc listener")
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--duration", type=float, default=180.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--out", default="prometheus.png")
    args = parser.parse_args()
    start = time.time()
    sent = asyncio.run(send(args.host, args.port, args.duration, args.connections))
    end = time.time()
    while scraped_at(args.prometheus) < end + 15:  # the traffic's end, one rate window later
        time.sleep(1)
    plot(args.prometheus, start - 15, end + 15, args.out)
    print(f"sent {sent} requests; wrote {args.out}")


if __name__ == "__main__":
    main()
