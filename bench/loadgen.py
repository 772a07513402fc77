"""The load generator: a few long-lived worker processes, each a uvloop event loop of raw
asyncio Protocols that keep ``depth`` requests outstanding on each of their connections.

A point runs in four steps: every worker opens its share of the connections and reports ready;
the coordinator fixes the measurement window [t0, t1) on the system-wide monotonic clock (after
a warm-up) and says go; workers send from then on, counting only responses received inside the
window; at t1 they stop sending, wait for what is still in flight, and report. Every response is
checked: its request id must be one outstanding on that connection and its body the expected
bytes. Anything else, a lost response or a closed connection is an error.

Request ids are unique across all connections of a point (connection index in the high bits),
so a proxy that shares upstream connections between clients never sees two requests with one id.
"""

from __future__ import annotations

import array
import asyncio
import multiprocessing
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from bench import wire

_SEQ_BITS = 20  # request ids: connection index << 20 | sequence; 256 connections fit in 28 bits
_SEQ_MASK = (1 << _SEQ_BITS) - 1
MAX_CONNECTIONS = 1 << (32 - _SEQ_BITS)  # awesomerpc ids are u32
_MAX_ERROR_SAMPLES = 5


@dataclass(frozen=True)
class LoadSpec:
    """One measurement point as the load generator sees it."""

    protocol: str
    port: int
    connections: int
    depth: int
    payload_size: int
    duration: float
    warmup: float
    drain_timeout: float = 15.0
    host: str = "127.0.0.1"


@dataclass
class LoadResult:
    """What the workers measured inside the window, merged."""

    window: float
    completed: int
    latencies_us: list[int]  # one per response received inside the window, sorted
    errors: int
    error_samples: list[str] = field(default_factory=list)

    @property
    def requests_per_second(self) -> float:
        return self.completed / self.window if self.window > 0 else 0.0

    def percentile_ms(self, fraction: float) -> float | None:
        """Nearest-rank percentile of the latencies in milliseconds (None without samples)."""
        if not self.latencies_us:
            return None
        index = min(len(self.latencies_us) - 1, max(0, int(fraction * len(self.latencies_us) + 0.5) - 1))
        return self.latencies_us[index] / 1000.0


# -- worker side -------------------------------------------------------------------------------


class _Run:
    """One worker's part of one point: its connections and their shared counters."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.template = wire.request_template(spec.protocol, spec.payload_size)
        self.header_size = wire.header_size(spec.protocol)
        self.expected = self.template.expected_body
        self.t0 = float("inf")
        self.t1 = float("inf")
        self.sending = False
        self.completed = 0
        self.latencies = array.array("I")
        self.errors = 0
        self.samples: list[str] = []
        self.clients: list[_Client] = []
        self.drained = asyncio.Event()

    def error(self, message: str, count: int = 1) -> None:
        self.errors += count
        if len(self.samples) < _MAX_ERROR_SAMPLES:
            self.samples.append(message)

    def outstanding(self) -> int:
        return sum(len(c.pending) for c in self.clients)

    def check_drained(self) -> None:
        if not self.sending and self.outstanding() == 0:
            self.drained.set()


class _Client(asyncio.Protocol):
    def __init__(self, run: _Run, index: int) -> None:
        self.run = run
        self.index = index
        self.base = index << _SEQ_BITS
        self.seq = 0
        self.pending: dict[int, float] = {}
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closing = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, count: int, now: float) -> None:
        build = self.run.template.build
        pending = self.pending
        frames = []
        for _ in range(count):
            self.seq = (self.seq + 1) & _SEQ_MASK
            request_id = self.base | self.seq
            pending[request_id] = now
            frames.append(build(request_id))
        self.transport.write(frames[0] if count == 1 else b"".join(frames))

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        run = self.run
        protocol = run.spec.protocol
        buffer = self.buffer
        buffer += data
        pending = self.pending
        header_size = run.header_size
        expected = run.expected
        in_window = run.t0 <= now < run.t1
        offset = 0
        answered = 0
        try:
            while True:
                length = wire.frame_length(protocol, buffer, offset)
                if not length or len(buffer) - offset < length:
                    break
                request_id = wire.response_id(protocol, buffer, offset)
                sent = pending.pop(request_id, None)
                if sent is None:
                    run.error(f"connection {self.index}: unexpected response ({wire.describe_response(protocol, buffer, offset)})")
                elif buffer[offset + header_size : offset + length] != expected:
                    run.error(f"connection {self.index}: request {request_id}: response body differs from the payload sent ({length - header_size} bytes)")
                else:
                    answered += 1
                    if in_window:
                        run.completed += 1
                        run.latencies.append(int((now - sent) * 1e6))
                offset += length
        except wire.WireError as exc:
            run.error(f"connection {self.index}: {exc}")
            self.close()
            return
        if offset:
            del buffer[:offset]
        if run.sending and now < run.t1:
            if answered:
                self.send(answered, now)
        elif not pending:
            run.check_drained()

    def connection_lost(self, exc) -> None:
        if not self.closing:
            lost = len(self.pending)
            reason = f": {exc}" if exc else ""
            self.run.error(f"connection {self.index} closed by the peer with {lost} request(s) outstanding{reason}", max(1, lost))
            self.pending.clear()
            self.closing = True
            self.run.check_drained()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.abort()


async def _connect(run: _Run, indices: list[int]) -> None:
    loop = asyncio.get_running_loop()
    spec = run.spec
    for index in indices:
        _, client = await loop.create_connection(lambda i=index: _Client(run, i), spec.host, spec.port)
        run.clients.append(client)


async def _drive(run: _Run, t0: float, t1: float) -> None:
    run.t0, run.t1 = t0, t1
    run.sending = True
    now = time.monotonic()
    for client in run.clients:
        client.send(run.spec.depth, now)
    await asyncio.sleep(max(0.0, t1 - time.monotonic()))
    run.sending = False
    run.check_drained()
    try:
        await asyncio.wait_for(run.drained.wait(), run.spec.drain_timeout)
    except asyncio.TimeoutError:
        run.error(f"{run.outstanding()} response(s) did not arrive within {run.spec.drain_timeout:g}s after the window", run.outstanding())
    for client in run.clients:
        client.close()


def _worker(conn) -> None:
    """A worker process: serves ("run", spec, indices) commands until it receives None."""
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    while True:
        message = conn.recv()
        if message is None:
            break
        _, spec, indices = message
        run = _Run(spec)
        try:
            loop.run_until_complete(_connect(run, indices))
        except Exception as exc:  # noqa: BLE001 - reported to the coordinator, which raises
            for client in run.clients:
                client.close()
            conn.send(("failed", f"cannot connect to {spec.host}:{spec.port}: {exc!r}"))
            continue
        conn.send(("ready", None))
        command = conn.recv()
        if command[0] == "abort":  # another worker could not connect: no point to run
            for client in run.clients:
                client.close()
            loop.run_until_complete(asyncio.sleep(0))
            continue
        _, t0, t1 = command
        try:
            loop.run_until_complete(_drive(run, t0, t1))
        except Exception:  # noqa: BLE001
            run.error("load generator worker failed:\n" + traceback.format_exc())
        # Let the aborted transports finish closing before the next point.
        loop.run_until_complete(asyncio.sleep(0))
        conn.send(("done", (run.completed, run.latencies.tobytes(), run.errors, run.samples)))
    loop.close()


# -- coordinator side --------------------------------------------------------------------------


class LoadGeneratorError(Exception):
    """The load generator could not run a point (e.g. the target refused connections)."""


class LoadGenerator:
    """``workers`` worker processes, started once and reused for every point."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError("the load generator needs at least one worker process")
        context = multiprocessing.get_context("spawn")  # no inherited threads or sockets
        self._pipes = []
        self._procs = []
        for _ in range(workers):
            parent, child = context.Pipe()
            proc = context.Process(target=_worker, args=(child,), daemon=True)
            proc.start()
            child.close()
            self._pipes.append(parent)
            self._procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def workers_for(self, connections: int) -> int:
        return min(len(self._procs), connections)

    def run(self, spec: LoadSpec, on_window: Callable[[str], None] | None = None) -> LoadResult:
        """Run one point; ``on_window("start")`` / ``on_window("end")`` are called at t0 / t1
        (for CPU readings of the processes under test)."""
        if not 1 <= spec.connections <= MAX_CONNECTIONS:
            raise ValueError(f"connections must be 1..{MAX_CONNECTIONS}, got {spec.connections}")
        used = self.workers_for(spec.connections)
        pipes = self._pipes[:used]
        for w, pipe in enumerate(pipes):
            pipe.send(("run", spec, list(range(w, spec.connections, used))))
        statuses = [self._receive(pipe, 30.0, "connect") for pipe in pipes]
        failures = [detail for status, detail in statuses if status != "ready"]
        if failures:
            for pipe, (status, _) in zip(pipes, statuses):
                if status == "ready":  # connected and waiting for "go"
                    pipe.send(("abort",))
            raise LoadGeneratorError("; ".join(failures))
        t0 = time.monotonic() + spec.warmup
        t1 = t0 + spec.duration
        for pipe in pipes:
            pipe.send(("go", t0, t1))
        _sleep_until(t0)
        if on_window:
            on_window("start")
        _sleep_until(t1)
        if on_window:
            on_window("end")
        completed = errors = 0
        latencies: list[int] = []
        samples: list[str] = []
        for pipe in pipes:
            _, (done, raw, errs, errs_samples) = self._receive(pipe, spec.drain_timeout + 30.0, "finish")
            completed += done
            values = array.array("I")
            values.frombytes(raw)
            latencies.extend(values)
            errors += errs
            samples.extend(errs_samples)
        latencies.sort()
        return LoadResult(window=t1 - t0, completed=completed, latencies_us=latencies, errors=errors, error_samples=samples[:_MAX_ERROR_SAMPLES])

    def _receive(self, pipe, timeout: float, what: str):
        try:
            if pipe.poll(timeout):
                return pipe.recv()
        except (EOFError, OSError) as exc:
            raise LoadGeneratorError(f"a load generator worker died before it could {what}: {exc!r}") from exc
        raise LoadGeneratorError(f"a load generator worker did not {what} within {timeout:g}s")

    def close(self) -> None:
        for pipe in self._pipes:
            try:
                pipe.send(None)
            except OSError:
                pass
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)
