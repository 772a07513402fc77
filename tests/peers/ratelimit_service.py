"""A rate limit service for tests: Envoy's ``envoy.service.ratelimit.v3.RateLimitService`` (the
API envoyproxy/ratelimit serves) over grpcio, with counters per descriptor and time window.

Limits are matched as envoyproxy/ratelimit matches its config: a ``Limit`` lists entries
``(key, value)``, where a value of None matches any value and keeps a counter per distinct
value; a request's descriptor takes the first limit whose entries equal its own. Each
(domain, descriptor, window) has a counter; a window is a fixed period of the limit's unit
(second, minute, hour, day) on the wall clock, as envoyproxy/ratelimit's fixed windows are. A
descriptor that carries its own ``limit`` (the API's override) is counted against that. Every
descriptor's hit counts even when it is over, and the answer is OVER_LIMIT when any descriptor
is over, with a status per descriptor (limit, remaining, time until reset).

For tests, ``delay`` makes every answer late (seconds) and ``fail`` (a grpc.StatusCode) makes
every call fail; ``requests`` records what was asked. Two servers share the logic: ``AioServer``
(grpc.aio, on the caller's event loop) and ``ThreadedServer`` (grpc's thread-pool server, for
tests whose event loops come and go, and for Envoy).

    python -m tests.peers.ratelimit_service serve --port 8081 --limit cmd=1:5/minute --limit cmd:100/second
    python -m tests.peers.ratelimit_service call --port 8081 --domain awesomerpc cmd=1
"""

from __future__ import annotations

import argparse
import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass

import grpc

from metabridge._proto import ratelimit_pb2_grpc
from metabridge._proto.ratelimit_pb2 import RateLimitDescriptor, RateLimitRequest, RateLimitResponse
from tests.peers.cli import serve_until_terminated
from tests.peers.tcp_server import LOOPBACK

Unit = RateLimitResponse.RateLimit.Unit
UNIT_SECONDS = {Unit.SECOND: 1, Unit.MINUTE: 60, Unit.HOUR: 3600, Unit.DAY: 86400}
UNITS = {"second": Unit.SECOND, "minute": Unit.MINUTE, "hour": Unit.HOUR, "day": Unit.DAY}


@dataclass(frozen=True)
class Limit:
    entries: tuple[tuple[str, str | None], ...]  # (key, value); None: any value, a counter each
    requests_per_unit: int
    unit: str = "second"
    name: str = ""

    def matches(self, entries: tuple[tuple[str, str], ...]) -> bool:
        return len(entries) == len(self.entries) and all(k == lk and (lv is None or v == lv) for (k, v), (lk, lv) in zip(entries, self.entries))


def limit(spec: str) -> Limit:
    """``cmd=1:5/minute``, ``cmd:10/s``, ``service=a,cmd=1:3/m`` -> Limit (key without '=': any value)."""
    m = re.fullmatch(r"(.+):([0-9]+)/(s|second|m|minute|h|hour|d|day)", spec)
    if not m:
        raise ValueError(f"not a limit: {spec!r} (expected KEY[=VALUE][,KEY[=VALUE]...]:N/UNIT)")
    entries = []
    for part in m.group(1).split(","):
        key, sep, value = part.partition("=")
        entries.append((key, value if sep else None))
    unit = {"s": "second", "m": "minute", "h": "hour", "d": "day"}.get(m.group(3), m.group(3))
    return Limit(tuple(entries), int(m.group(2)), unit, name=spec)


class RateLimitLogic:
    """Counters per (domain, descriptor, window) and the answer to a RateLimitRequest."""

    def __init__(self, limits: Iterable[Limit] = (), *, clock: Callable[[], float] = time.time) -> None:
        self.limits = list(limits)
        self.clock = clock
        self.counters: dict[tuple, int] = {}
        self.requests: list[RateLimitRequest] = []  # every request asked, in order
        self.delay = 0.0  # seconds each answer waits
        self.fail: grpc.StatusCode | None = None  # every call fails with this status
        self.lock = threading.Lock()

    @property
    def calls(self) -> int:
        return len(self.requests)

    def descriptors_seen(self) -> list[tuple[str, tuple[tuple[tuple[str, str], ...], ...]]]:
        """What was asked, as (domain, (entries of each descriptor, ...)) per call."""
        return [(r.domain, tuple(tuple((e.key, e.value) for e in d.entries) for d in r.descriptors)) for r in self.requests]

    def record(self, request: RateLimitRequest) -> None:
        with self.lock:
            self.requests.append(request)

    def decide(self, request: RateLimitRequest) -> RateLimitResponse:
        now = self.clock()
        hits = request.hits_addend or 1
        response = RateLimitResponse(overall_code=RateLimitResponse.OK)
        with self.lock:
            for descriptor in request.descriptors:
                status = response.statuses.add(code=RateLimitResponse.OK)
                found = self._limit_for(descriptor)
                if found is None:
                    continue  # no limit configured for it: not limited
                per_unit, unit, name = found
                window = UNIT_SECONDS[unit]
                start = int(now // window)
                entries = tuple((e.key, e.value) for e in descriptor.entries)
                key = (request.domain, entries, unit, start)
                count = self.counters[key] = self.counters.get(key, 0) + hits
                status.current_limit.requests_per_unit = per_unit
                status.current_limit.unit = unit
                status.current_limit.name = name
                status.limit_remaining = max(per_unit - count, 0)
                status.duration_until_reset.FromNanoseconds(int(((start + 1) * window - now) * 1e9))
                if count > per_unit:
                    status.code = RateLimitResponse.OVER_LIMIT
                    response.overall_code = RateLimitResponse.OVER_LIMIT
        return response

    def _limit_for(self, descriptor: RateLimitDescriptor) -> tuple[int, int, str] | None:
        if descriptor.HasField("limit") and descriptor.limit.unit in UNIT_SECONDS:
            return descriptor.limit.requests_per_unit, descriptor.limit.unit, "override"
        entries = tuple((e.key, e.value) for e in descriptor.entries)
        for candidate in self.limits:
            if candidate.matches(entries):
                return candidate.requests_per_unit, UNITS[candidate.unit], candidate.name
        return None


class _AioServicer(ratelimit_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, logic: RateLimitLogic) -> None:
        self.logic = logic

    async def ShouldRateLimit(self, request, context):  # noqa: N802 - the API's name
        logic = self.logic
        logic.record(request)
        if logic.delay:
            await asyncio.sleep(logic.delay)
        if logic.fail is not None:
            await context.abort(logic.fail, "planted failure")
        return logic.decide(request)


class _ThreadedServicer(ratelimit_pb2_grpc.RateLimitServiceServicer):
    def __init__(self, logic: RateLimitLogic) -> None:
        self.logic = logic

    def ShouldRateLimit(self, request, context):  # noqa: N802
        logic = self.logic
        logic.record(request)
        if logic.delay:
            time.sleep(logic.delay)
        if logic.fail is not None:
            context.abort(logic.fail, "planted failure")
        return logic.decide(request)


class AioServer:
    """The service on the running event loop: ``server = await AioServer(limits).start()``."""

    def __init__(self, limits: Iterable[Limit] = (), *, address: str = f"{LOOPBACK}:0", clock: Callable[[], float] = time.time) -> None:
        self.logic = RateLimitLogic(limits, clock=clock)
        self._address = address
        self._server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        """Where the filter reaches it (HOST:PORT, or the unix: address given)."""
        return self._address if self._address.startswith("unix:") else f"{LOOPBACK}:{self.port}"

    async def start(self) -> AioServer:
        self._server = grpc.aio.server()
        ratelimit_pb2_grpc.add_RateLimitServiceServicer_to_server(_AioServicer(self.logic), self._server)
        self.port = self._server.add_insecure_port(self._address)
        await self._server.start()
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None


class ThreadedServer:
    """The service on grpc's thread pool, independent of any event loop (Envoy's tests use this)."""

    def __init__(self, limits: Iterable[Limit] = (), *, host: str = LOOPBACK, port: int = 0, address: str | None = None) -> None:
        self.logic = RateLimitLogic(limits)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        ratelimit_pb2_grpc.add_RateLimitServiceServicer_to_server(_ThreadedServicer(self.logic), self._server)
        self._given = address
        self.port = self._server.add_insecure_port(address or f"{host}:{port}")
        self.host = host

    @property
    def address(self) -> str:
        return self._given or f"{self.host}:{self.port}"

    def start(self) -> ThreadedServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None).wait(5)


def ask(address: str, domain: str, descriptors: list[list[tuple[str, str]]], timeout: float = 2.0) -> RateLimitResponse:
    """One ShouldRateLimit call (blocking), e.g. against envoyproxy/ratelimit to check its config."""
    request = RateLimitRequest(domain=domain)
    for entries in descriptors:
        descriptor = request.descriptors.add()
        for key, value in entries:
            descriptor.entries.add(key=key, value=value)
    with grpc.insecure_channel(address) as channel:
        return ratelimit_pb2_grpc.RateLimitServiceStub(channel).ShouldRateLimit(request, timeout=timeout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.peers.ratelimit_service", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve until SIGTERM or Ctrl-C")
    serve.add_argument("--host", default=LOOPBACK)
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--limit", action="append", default=[], type=limit, help="KEY[=VALUE][,...]:N/UNIT, e.g. cmd=1:5/minute (repeatable)")
    serve.add_argument("--delay-ms", type=float, default=0.0, help="every answer waits this long")
    serve.add_argument("--fail", choices=[c.name for c in grpc.StatusCode if c is not grpc.StatusCode.OK], help="every call fails with this status")
    call = commands.add_parser("call", help="one ShouldRateLimit call; prints the answer")
    call.add_argument("--host", default=LOOPBACK)
    call.add_argument("--port", type=int, default=8081)
    call.add_argument("--domain", required=True)
    call.add_argument("descriptor", nargs="+", help="KEY=VALUE[,KEY=VALUE...]: one descriptor's entries")
    args = parser.parse_args(argv)
    if args.command == "serve":
        server = ThreadedServer(args.limit, host=args.host, port=args.port)
        server.logic.delay = args.delay_ms / 1000
        server.logic.fail = grpc.StatusCode[args.fail] if args.fail else None
        server.start()
        serve_until_terminated(args.host, server.port, server.stop)
    else:
        descriptors = [[tuple(entry.split("=", 1)) for entry in spec.split(",")] for spec in args.descriptor]
        response = ask(f"{args.host}:{args.port}", args.domain, descriptors)
        print(RateLimitResponse.Code.Name(response.overall_code))
        for status in response.statuses:
            if not status.HasField("current_limit"):
                print(f"  {RateLimitResponse.Code.Name(status.code)} (no limit configured)")
                continue
            print(f"  {RateLimitResponse.Code.Name(status.code)} limit={status.current_limit.requests_per_unit}/{Unit.Name(status.current_limit.unit)} remaining={status.limit_remaining}")


if __name__ == "__main__":
    main()
