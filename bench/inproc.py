"""The bridge's own CPU per request, in one process, without Envoy.

``python -m bench.inproc [--protocol awesomerpc|dubbo] [--depth N] [--requests N]``

Drives one bridge gRPC connection (metabridge.transport.grpc_server) with the bytes Envoy would send it: an
ext_proc ``Process`` stream, each request as a ``read_data`` message and each response as a
``write_data`` message carrying HCM's HTTP/2 DATA frame for the tunnel. Every answer the bridge
writes is parsed and the responses reaching the client are checked. The figure is CPU time per
request of that loop: the cost of the bridge's code alone, steadier than the full benchmark
(nothing else runs), so it shows what a change to the hot path saves. ``--depth`` requests
travel in each message, as pipelined clients send them.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import time

from hpack import Encoder

from bench import wire
from bench.stacks import bridge_listener_config
from metabridge.transport import http2
from metabridge._proto.network_ext_proc_pb2 import Data, ProcessingRequest, ProcessingResponse
from metabridge.config.model import parse
from metabridge.transport.grpc_server import GrpcConnection
from metabridge.runner import install_event_loop
from metabridge.core.runtime import build_runtimes
from metabridge.transport.ext_proc import SERVICE_NAME, serve_methods
from metabridge.wire import LISTENER_METADATA_KEY, UPSTREAM_HOST_HEADER


class _Transport:
    """Collects what the connection writes."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise AssertionError("the bridge closed the gRPC connection")

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data


class _Server:
    def __init__(self, methods) -> None:
        self.methods = methods
        self.max_message = 64 * 1024 * 1024
        self.connections: set = set()
        self.stopping = False


# Envoy's side of either connection: windows as large as the bridge's, so that, like Envoy in
# steady state, it never holds the bridge back.
_OPEN_WINDOWS = http2.frame(http2.SETTINGS, 0, 0, struct.pack(">HL", http2.SETTINGS_INITIAL_WINDOW_SIZE, http2.MAX_WINDOW)) + http2.frame(
    http2.WINDOW_UPDATE, 0, 0, http2.u32.pack(http2.MAX_WINDOW - http2.DEFAULT_WINDOW)
)


def _grpc_data(body: bytes) -> bytes:
    return http2.frame(http2.DATA, 0, 1, b"\x00" + http2.u32.pack(len(body)) + body)


def _answers(written: bytes) -> list[ProcessingResponse]:
    """The ProcessingResponses in the bytes the bridge wrote on its gRPC stream."""
    out, pos, payload = [], 0, bytearray()
    while pos + 9 <= len(written):
        hi, lo, kind, _, _ = http2._frame_header.unpack_from(written, pos)
        length = hi << 16 | lo
        if kind == http2.DATA:
            payload += written[pos + 9 : pos + 9 + length]
        pos += 9 + length
    pos = 0
    while pos + 5 <= len(payload):
        length = http2.u32.unpack_from(payload, pos + 1)[0]
        out.append(ProcessingResponse.FromString(bytes(payload[pos + 5 : pos + 5 + length])))
        pos += 5 + length
    return out


# What --with adds to the bench listener: a filter that never refuses (its cost, not its
# refusals, is measured), or a hash policy on the benchmark's route to a RING_HASH cluster.
_LOCAL_RATELIMIT = {"name": "local_ratelimit", "config": {"token_bucket": {"max_tokens": 10**9, "tokens_per_fill": 10**9, "fill_interval": "1s"}}}
_HASH_KEYS = {wire.AWESOMERPC: ["cmd"], wire.DUBBO: ["interface", "method"]}
FEATURES = ("local_ratelimit", "hash_policy")


def bench_config(protocol: str, features: tuple[str, ...] = ()) -> dict:
    raw = bridge_listener_config(protocol, routes=1, listen_port=1, backend_port=2)
    if "local_ratelimit" in features:
        raw["listeners"][0]["filters"] = [_LOCAL_RATELIMIT]
    if "hash_policy" in features:
        raw["listeners"][0]["routes"][-1]["hash_policy"] = _HASH_KEYS[protocol]
        raw["clusters"][0]["lb_policy"] = "RING_HASH"
    return raw


async def measure(protocol: str, depth: int, requests: int, payload: int = 100, features: tuple[str, ...] = ()) -> float:
    """CPU µs per request of the bridge's gRPC connection handling ``requests`` requests."""
    config = parse(bench_config(protocol, features))
    runtimes = build_runtimes(config)
    transport = _Transport()
    conn = GrpcConnection(_Server(serve_methods(runtimes)))
    conn.connection_made(transport)
    headers = Encoder().encode(
        [(":method", "POST"), (":scheme", "http"), (":path", f"/{SERVICE_NAME}/Process"), (":authority", "bridge"),
         ("content-type", "application/grpc"), ("te", "trailers"), (LISTENER_METADATA_KEY, "bench")]
    )
    conn.data_received(http2.PREFACE + _OPEN_WINDOWS + http2.frame(http2.HEADERS, http2.END_HEADERS, 1, headers))

    template = wire.request_template(protocol, payload)
    request_frames = b"".join(template.build(i) for i in range(1, depth + 1))
    if protocol == wire.AWESOMERPC:
        responses = request_frames  # the echo backend sends each frame back
    else:
        responses = b"".join(wire.dubbo_answer(f, 0, len(f)) for f in (template.build(i) for i in range(1, depth + 1)))
    read_msg = _grpc_data(ProcessingRequest(read_data=Data(data=request_frames)).SerializeToString())
    hcm = Encoder()
    hcm_open = _OPEN_WINDOWS + http2.frame(http2.SETTINGS, http2.ACK, 0) + http2.frame(http2.HEADERS, http2.END_HEADERS, 1, hcm.encode([(":status", "200"), (UPSTREAM_HOST_HEADER, "127.0.0.1:2")]))
    first_write = _grpc_data(ProcessingRequest(write_data=Data(data=hcm_open + http2.frame(http2.DATA, 0, 1, responses))).SerializeToString())
    write_msg = _grpc_data(ProcessingRequest(write_data=Data(data=http2.frame(http2.DATA, 0, 1, responses))).SerializeToString())

    def round_trip(write: bytes) -> bytes:
        conn.data_received(read_msg)
        transport.take()
        conn.data_received(write)
        return b"".join(a.write_data.data for a in _answers(transport.take()))

    transport.take()
    if round_trip(first_write) != responses:
        raise SystemExit("the bridge did not pass the responses through unchanged")
    rounds = max(1, requests // depth)
    start = time.process_time()
    for _ in range(rounds):
        conn.data_received(read_msg)
        transport.chunks.clear()
        conn.data_received(write_msg)
        transport.chunks.clear()
    elapsed = time.process_time() - start
    if round_trip(write_msg) != responses:
        raise SystemExit("the bridge stopped passing the responses through")
    return elapsed / (rounds * depth) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.inproc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=wire.PROTOCOLS, default=wire.AWESOMERPC)
    parser.add_argument("--depth", type=int, default=1, help="requests per ext_proc message (default 1)")
    parser.add_argument("--payload", type=int, default=100, help="request and response body size in bytes (default 100)")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3, help="report the best of this many runs")
    parser.add_argument("--with", dest="features", action="append", choices=FEATURES, default=[], help="configure a governance feature on the listener (repeatable)")
    args = parser.parse_args(argv)
    install_event_loop()  # the bridge's own loop (uvloop), as `metabridge run` uses
    features = tuple(args.features)
    best = min(asyncio.run(measure(args.protocol, args.depth, args.requests, args.payload, features)) for _ in range(args.repeat))
    extra = f", with {' and '.join(features)}" if features else ""
    print(f"{args.protocol} depth {args.depth}, {args.payload} B{extra}: {best:.1f} µs of bridge CPU per request")


if __name__ == "__main__":
    main()
