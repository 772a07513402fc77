"""The in-process mode's Python CPU per request, without Envoy.

``python -m bench.inproc_module [--protocol awesomerpc|dubbo] [--depth N] [--requests N]``

Drives metabridge.transport.inprocess.Session as the dynamic module does (``on_read`` with the
client's bytes, ``on_write`` with HCM's HTTP/2 DATA frame for the tunnel), with a stand-in for
Envoy's side that only records what the session asks of it. The responses reaching the client
are checked. Against ``python -m bench.inproc`` (the same core behind the ext_proc transport)
the difference is the transport: protobuf and gRPC framing there, two method calls here. What
Envoy itself spends (sockets, HCM) is not in this figure.

``--instructions`` counts instead, as ``python -m bench.instructions`` does for bench.inproc:
this module under callgrind at two request counts, the difference per request (load-independent;
needs valgrind); ``--tree DIR`` counts another checkout (as bench.instructions' ``--tree``).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from hpack import Encoder

from bench import wire
from bench.instructions import callgrind
from bench.inproc import _OPEN_WINDOWS, bench_config
from metabridge.config.model import parse
from metabridge.core.runtime import build_runtimes
from metabridge.transport import http2, inprocess
from metabridge.wire import UPSTREAM_HOST_HEADER

_HERE = Path(__file__).resolve().parents[1]


class _Envoy:
    """What the module would do for the session: nothing but keep the client's bytes."""

    def __init__(self) -> None:
        self.to_client: list[bytes] = []

    def inject_write(self, handle, data, end=False):
        self.to_client.append(bytes(data))

    def inject_read(self, handle, data, end=False):
        pass

    def close(self, handle, flush=True):
        raise AssertionError("the session closed the connection")

    def schedule(self, handle):
        return True

    def count_error(self, handle):
        raise AssertionError("the transport contained a failure")


def measure(protocol: str, depth: int, requests: int, payload: int = 100) -> float:
    """CPU µs per request of one Session handling ``requests`` requests."""
    template = wire.request_template(protocol, payload)
    frames = [template.build(i) for i in range(1, depth + 1)]
    responses = frames if protocol == wire.AWESOMERPC else [wire.dubbo_answer(f, 0, len(f)) for f in frames]
    request_bytes, response_bytes = b"".join(frames), b"".join(responses)
    saved, inprocess.native = inprocess.native, _Envoy()
    runtime = build_runtimes(parse(bench_config(protocol)))["bench"]
    session = inprocess.FilterFactory(runtime).new_connection(1)
    try:
        hcm = Encoder()
        hcm_open = _OPEN_WINDOWS + http2.frame(http2.SETTINGS, http2.ACK, 0) + http2.frame(http2.HEADERS, http2.END_HEADERS, 1, hcm.encode([(":status", "200"), (UPSTREAM_HOST_HEADER, "127.0.0.1:2")]))
        data = http2.frame(http2.DATA, 0, 1, response_bytes)
        session.on_read(request_bytes, False)
        if session.on_write(hcm_open + data, False) != response_bytes:
            raise SystemExit("the session did not pass the responses through unchanged")
        rounds = max(1, requests // depth)
        on_read, on_write = session.on_read, session.on_write
        start = time.process_time()
        for _ in range(rounds):
            on_read(request_bytes, False)
            on_write(data, False)
        elapsed = time.process_time() - start
        session.on_read(request_bytes, False)
        if session.on_write(data, False) != response_bytes:
            raise SystemExit("the session stopped passing the responses through")
    finally:
        session.on_destroy()  # its timers never reach the stand-in again
        inprocess.native = saved
    return elapsed / (rounds * depth) * 1e6


def count_instructions(tree: Path, protocol: str, depth: int, payload: int, requests: int) -> int:
    """Instructions of one whole run of ``requests`` requests under callgrind, from ``tree``."""
    args = ["--protocol", protocol, "--depth", str(depth), "--payload", str(payload), "--requests", str(requests), "--repeat", "1"]
    return callgrind(tree, "bench.inproc_module", args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.inproc_module", description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=wire.PROTOCOLS, default=wire.AWESOMERPC)
    parser.add_argument("--depth", type=int, default=1, help="requests per read (default 1)")
    parser.add_argument("--payload", type=int, default=100)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3, help="report the best of this many runs")
    parser.add_argument("--instructions", action="store_true", help="count instructions per request under callgrind (2000 and 6000 requests) instead of timing")
    parser.add_argument("--tree", type=Path, default=_HERE, help="with --instructions: the repository checkout to count (default: this one)")
    args = parser.parse_args(argv)
    if args.instructions:
        if shutil.which("valgrind") is None:
            raise SystemExit("valgrind is not installed (apt-get install valgrind)")
        few, many = 2000, 6000
        counts = [count_instructions(args.tree, args.protocol, args.depth, args.payload, n) for n in (many, few)]
        per_request = (counts[0] - counts[1]) / (many - few)
        print(f"{args.protocol} depth {args.depth}, {args.payload} B: {per_request:,.0f} instructions per request in-process ({args.tree})")
        return
    best = min(measure(args.protocol, args.depth, args.requests, args.payload) for _ in range(args.repeat))
    print(f"{args.protocol} depth {args.depth}, {args.payload} B: {best:.1f} µs of Python CPU per request in-process")


if __name__ == "__main__":
    main()
