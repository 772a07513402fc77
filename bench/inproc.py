"""The bridge's own CPU per request, in one process, without Envoy.

``python -m bench.inproc [--protocol awesomerpc|dubbo] [--depth N] [--requests N]``
``python -m bench.inproc --codec REF [--samples FILE.py[:NAME]] [--depth N] [--requests N]``

Drives one bridge gRPC connection (metabridge.transport.grpc_server) with the bytes Envoy would send it: an
ext_proc ``Process`` stream, each request as a ``read_data`` message and each response as a
``write_data`` message carrying HCM's HTTP/2 DATA frame for the tunnel. Every answer the bridge
writes is parsed and the responses reaching the client are checked. The figure is CPU time per
request of that loop: the cost of the bridge's code alone, steadier than the full benchmark
(nothing else runs), so it shows what a change to the hot path saves. ``--depth`` requests
travel in each message, as pipelined clients send them.

``--codec REF`` measures any codec (a config's ``ref:``) instead of a built-in protocol, behind
one catch-all route: the request is the first request sample and the upstream's answer its
response (``requests[0]`` and ``responses[0]`` of the ``Samples`` in ``--samples``, as for
``metabridge check-codec``; a built-in codec's own samples without it). The same frame is sent
``--depth`` times, so a codec with request ids is measured at depth 1 only.
"""

from __future__ import annotations

import argparse
import atexit
import asyncio
import os
import struct
import subprocess
import sys
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
from metabridge.registry import CodecLoadError, load_codec_class
from metabridge.sdk.codec import DecodeStatus, Direction, MessageType, Metadata
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
# The access log writes every line to /dev/null: its formatting and writes are measured, not a disk.
_ACCESS_LOG = {"name": "access_log", "config": {"path": os.devnull}}
# shared_local_ratelimit: the same filter as with bridge.workers > 1, its bucket shared through a file.
FEATURES = ("local_ratelimit", "shared_local_ratelimit", "hash_policy", "access_log", "tracing")


_COLLECTOR: list = []  # the test OTLP collector process and its address, started once


def _collector() -> str:
    """A test OTLP collector in its own process (tests/otlp_receiver.py): the spans' export is
    measured, the collector's CPU is not counted as the bridge's."""
    if not _COLLECTOR:
        proc = subprocess.Popen([sys.executable, "-m", "tests.otlp_receiver"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        atexit.register(proc.stdin.close)  # it exits when its standard input closes
        _COLLECTOR.append(proc.stdout.readline().split()[-1])
    return _COLLECTOR[0]


def bench_config(protocol: str, features: tuple[str, ...] = ()) -> dict:
    raw = bridge_listener_config(protocol, routes=1, listen_port=1, backend_port=2)
    filters = raw["listeners"][0].setdefault("filters", [])
    if "local_ratelimit" in features or "shared_local_ratelimit" in features:
        filters.append(_LOCAL_RATELIMIT)
    if "shared_local_ratelimit" in features:
        raw.setdefault("bridge", {})["workers"] = 2
    if "access_log" in features:
        filters.append(_ACCESS_LOG)
    if "tracing" in features:
        filters.append({"name": "tracing", "config": {"collector": {"address": _collector()}}})
    if "hash_policy" in features:
        raw["listeners"][0]["routes"][-1]["hash_policy"] = _HASH_KEYS[protocol]
        raw["clusters"][0]["lb_policy"] = "RING_HASH"
    return raw


def codec_config(ref: str, options: dict, features: tuple[str, ...] = (), hash_keys: list[str] | None = None) -> dict:
    """The bench listener with codec ``ref`` and one route that takes every request."""
    raw = bench_config(wire.AWESOMERPC, tuple(f for f in features if f != "hash_policy"))
    raw["codecs"] = {"bench": {"ref": ref, "options": options}}
    listener = raw["listeners"][0]
    listener["codec"] = "bench"
    listener["routes"] = [{"name": "bench", "route": {"cluster": raw["clusters"][0]["name"]}}]
    if "hash_policy" in features:
        listener["routes"][0]["hash_policy"] = hash_keys
        raw["clusters"][0]["lb_policy"] = "RING_HASH"
    return raw


async def measure(protocol: str, depth: int, requests: int, payload: int = 100, features: tuple[str, ...] = ()) -> float:
    """CPU µs per request of the bridge's gRPC connection handling ``requests`` requests."""
    template = wire.request_template(protocol, payload)
    request_frames = [template.build(i) for i in range(1, depth + 1)]
    if protocol == wire.AWESOMERPC:
        responses = request_frames  # the echo backend sends each frame back
    else:
        responses = [wire.dubbo_answer(f, 0, len(f)) for f in request_frames]
    return await _measure(bench_config(protocol, features), b"".join(request_frames), b"".join(responses), depth, requests)


def _decode_sample(cls, frame: bytes, direction: Direction, options: dict, what: str) -> tuple[Metadata, object]:
    codec = cls(options=options)
    codec.direction = direction
    buffer, metadata = bytearray(frame), Metadata()
    if codec.decode(buffer, metadata) is not DecodeStatus.DONE or buffer:
        raise SystemExit(f"{what} is not one whole frame for the codec; run metabridge check-codec on it")
    return metadata, codec


async def measure_codec(ref: str, samples, depth: int, requests: int, features: tuple[str, ...] = ()) -> float:
    """CPU µs per request with codec ``ref``, sending ``samples.requests[0]`` and answering
    ``samples.responses[0]``."""
    cls = load_codec_class(ref)
    if not samples.responses:
        raise SystemExit("--codec needs a response sample: Samples.responses[0], the reply to requests[0]")
    if depth > 1 and cls.has_request_id:
        raise SystemExit(f"--depth {depth}: {cls.__name__} matches responses by request id and every request sent is the same sample (one id), so only --depth 1 works")
    request, _ = _decode_sample(cls, samples.requests[0], Direction.REQUEST, samples.options, "requests[0]")
    if request.message_type is not MessageType.REQUEST:
        raise SystemExit(f"requests[0] decodes as {request.message_type.name}; the benchmark needs a request that gets a reply first")
    if "hash_policy" in features and not request.headers:
        raise SystemExit("--with hash_policy: requests[0] decodes with no headers to hash on")
    response, codec = _decode_sample(cls, samples.responses[0], Direction.RESPONSE, samples.options, "responses[0]")
    expected = bytes(codec.encode(response, {}))  # what the bridge writes to the client
    config = codec_config(ref, samples.options, features, sorted(request.headers))
    return await _measure(config, samples.requests[0] * depth, expected * depth, depth, requests, samples.responses[0] * depth)


async def _measure(raw_config: dict, request_frames: bytes, responses: bytes, depth: int, requests: int, upstream: bytes | None = None) -> float:
    """Send ``request_frames`` and answer them with ``upstream`` (default: ``responses``), which
    must reach the client as ``responses``, ``requests // depth`` times; CPU µs per request."""
    config = parse(raw_config)
    runtimes = build_runtimes(config)
    transport = _Transport()
    conn = GrpcConnection(_Server(serve_methods(runtimes)))
    conn.connection_made(transport)
    headers = Encoder().encode(
        [(":method", "POST"), (":scheme", "http"), (":path", f"/{SERVICE_NAME}/Process"), (":authority", "bridge"),
         ("content-type", "application/grpc"), ("te", "trailers"), (LISTENER_METADATA_KEY, "bench")]
    )
    conn.data_received(http2.PREFACE + _OPEN_WINDOWS + http2.frame(http2.HEADERS, http2.END_HEADERS, 1, headers))

    upstream = responses if upstream is None else upstream
    read_msg = _grpc_data(ProcessingRequest(read_data=Data(data=request_frames)).SerializeToString())
    hcm = Encoder()
    hcm_open = _OPEN_WINDOWS + http2.frame(http2.SETTINGS, http2.ACK, 0) + http2.frame(http2.HEADERS, http2.END_HEADERS, 1, hcm.encode([(":status", "200"), (UPSTREAM_HOST_HEADER, "127.0.0.1:2")]))
    first_write = _grpc_data(ProcessingRequest(write_data=Data(data=hcm_open + http2.frame(http2.DATA, 0, 1, upstream))).SerializeToString())
    write_msg = _grpc_data(ProcessingRequest(write_data=Data(data=http2.frame(http2.DATA, 0, 1, upstream))).SerializeToString())

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


def _samples(ref: str, spec: str | None):
    """The samples --codec sends: the --samples file's, else a built-in codec's own."""
    from metabridge.kit.builtin_samples import samples_for
    from metabridge.kit.check import load_samples
    from metabridge.kit.conformance import SamplesError

    try:
        if spec:
            return load_samples(spec)
        samples = samples_for(load_codec_class(ref))
    except (CodecLoadError, SamplesError) as exc:
        raise SystemExit(f"python -m bench.inproc: {exc}") from None
    if samples is None:
        raise SystemExit(f"python -m bench.inproc: {ref} is not a built-in codec; pass --samples FILE.py[:NAME] (a Samples, as for metabridge check-codec)")
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.inproc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=wire.PROTOCOLS, help=f"a built-in protocol's benchmark frames (default {wire.AWESOMERPC})")
    parser.add_argument("--codec", metavar="REF", help="measure this codec (file.py:Class, dir:Class, package.module:Class or an installed codec's name) with its sample frames")
    parser.add_argument("--samples", metavar="FILE.py[:NAME]", help="with --codec: a Python file defining NAME = Samples(...) (NAME defaults to SAMPLES); a built-in codec's own samples without it")
    parser.add_argument("--depth", type=int, default=1, help="requests per ext_proc message (default 1)")
    parser.add_argument("--payload", type=int, help="request and response body size in bytes (default 100; not with --codec)")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3, help="report the best of this many runs")
    parser.add_argument("--with", dest="features", action="append", choices=FEATURES, default=[], help="configure a governance feature on the listener (repeatable)")
    args = parser.parse_args(argv)
    if args.codec and (args.protocol or args.payload is not None):
        parser.error("--codec sends its sample frames as they are: leave out --protocol and --payload")
    if args.samples and not args.codec:
        parser.error("--samples goes with --codec")
    install_event_loop()  # the bridge's own loop (uvloop), as `metabridge run` uses
    features = tuple(args.features)
    if "shared_local_ratelimit" in features:
        from metabridge.filters.local_ratelimit import remove_shared_buckets

        atexit.register(remove_shared_buckets, os.getpid())  # the bucket's file
    extra = f", with {' and '.join(features)}" if features else ""
    if args.codec:
        samples = _samples(args.codec, args.samples)
        best = min(asyncio.run(measure_codec(args.codec, samples, args.depth, args.requests, features)) for _ in range(args.repeat))
        print(f"{args.codec} depth {args.depth}, {len(samples.requests[0])} B request{extra}: {best:.1f} µs of bridge CPU per request")
        return
    protocol, payload = args.protocol or wire.AWESOMERPC, 100 if args.payload is None else args.payload
    best = min(asyncio.run(measure(protocol, args.depth, args.requests, payload, features)) for _ in range(args.repeat))
    print(f"{protocol} depth {args.depth}, {payload} B{extra}: {best:.1f} µs of bridge CPU per request")


if __name__ == "__main__":
    main()
