"""The demo client: sends each kind of request through Envoy and says who answered.

    python -m examples.awesomerpc.demo_client --host 127.0.0.1 --port 10000 [--admin-port 9901]

It expects the routes of examples/awesomerpc.yaml (cmd 2 -> v2, cmd 1 split 80/20 v1/v2, cmd 3
rewritten to cmd 30 on its way to v1, anything else: no route). Exits non-zero when an answer is
not what that config promises, so the demo doubles as a check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.request
from collections import Counter

from examples.awesomerpc.client import AwesomeRpcClient
from examples.awesomerpc.protocol import ERROR_CODES

SPLIT_SAMPLES = 500


def _backend(body: bytes) -> str:
    return body.split(b"|", 1)[0].decode()


def _upstream_connections(admin_port: int | None) -> int | None:
    if not admin_port:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats?format=json&filter=upstream_cx_total$", timeout=2) as r:
            stats = json.load(r)["stats"]
    except OSError:
        return None
    return sum(s["value"] for s in stats if s["name"].startswith("cluster.awesomerpc"))


async def demo(host: str, port: int, admin_port: int | None) -> list[str]:
    problems = []

    def check(ok: bool, what: str) -> str:
        if not ok:
            problems.append(what)
        return "ok" if ok else "UNEXPECTED"

    async with await AwesomeRpcClient.connect(host, port) as client:
        print("routing by cmd:")
        for cmd, want in ((2, "v2"), (3, "v1")):
            reply = await client.call(cmd, b"hello")
            print(f"  cmd {cmd} -> answered by {_backend(reply.body)} (backend saw cmd {reply.cmd})  [{check(_backend(reply.body) == want, f'cmd {cmd} should reach {want}')}]")
        print("  (cmd 3 is rewritten to cmd 30 by the route's request_mutation)")

        replies = await asyncio.gather(*(client.call(1, b"split") for _ in range(SPLIT_SAMPLES)))
        seen = Counter(_backend(r.body) for r in replies)
        share = seen["v1"] / SPLIT_SAMPLES
        print(f"weighted split, cmd 1 (80/20): v1 {seen['v1']}, v2 {seen['v2']} of {SPLIT_SAMPLES} -> {share:.0%} v1  [{check(0.7 <= share <= 0.9, 'the 80/20 split is off')}]")

        reply = await client.call(7, b"nobody handles this")
        name = next((k.name for k, v in ERROR_CODES.items() if v == reply.rsp_code), "?")
        print(f"no route, cmd 7 -> error reply rsp_code={reply.rsp_code} ({name}) for flow {reply.flow}  [{check(name == 'ROUTE_NOT_FOUND', 'cmd 7 should get ROUTE_NOT_FOUND')}]")

    before = _upstream_connections(admin_port)
    async with await AwesomeRpcClient.connect(host, port) as fresh:
        hb = await fresh.heartbeat()
    after = _upstream_connections(admin_port)
    where = "answered by the bridge"
    if before is not None and after is not None:
        where += f"; upstream connections before/after: {before}/{after}"
        check(before == after, "a heartbeat reached a backend")
    print(f"heartbeat, cmd 0 -> rsp_code={hb.rsp_code} ({where})  [{check(hb.cmd == 0 and hb.rsp_code == 0, 'heartbeat reply is wrong')}]")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=10000)
    parser.add_argument("--admin-port", type=int, help="Envoy's admin port, to show heartbeats never reach a backend")
    args = parser.parse_args(argv)
    problems = asyncio.run(demo(args.host, args.port, args.admin_port))
    if problems:
        print("demo: " + "; ".join(problems), file=sys.stderr)
        return 1
    print("demo: every answer was as configured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
