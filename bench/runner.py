"""Runs the points: one echo backend and one load generator for the whole run, each path's
processes started before its points and stopped after them, CPU time read around each window."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.loadgen import LoadGenerator, LoadGeneratorError, LoadResult, LoadSpec
from bench.processes import StartError, cpu_seconds, machine_busy_seconds, tree_cpu_seconds
from bench.scenarios import Point
from bench.stacks import Backend, Stack


@dataclass(frozen=True)
class Timing:
    duration: float  # seconds measured per point
    warmup: float  # seconds of load before the window opens
    drain_timeout: float = 15.0


def measure_point(point: Point, port: int, loadgen: LoadGenerator, timing: Timing, pids: dict[str, int]) -> dict[str, Any]:
    """Run one point against ``port`` and return its record (see bench.report for the fields)."""
    spec = LoadSpec(
        protocol=point.path.protocol,
        port=port,
        connections=point.connections,
        depth=point.depth,
        payload_size=point.payload,
        duration=timing.duration,
        warmup=timing.warmup,
        drain_timeout=timing.drain_timeout,
    )
    used_workers = loadgen.pids[: loadgen.workers_for(point.connections)]
    readings: dict[str, dict[str, float]] = {}

    def on_window(edge: str) -> None:
        readings[edge] = {role: tree_cpu_seconds(pid) for role, pid in pids.items()}
        readings[edge]["client"] = sum(cpu_seconds(pid) for pid in used_workers)
        readings[edge][_MACHINE] = machine_busy_seconds()

    result = loadgen.run(spec, on_window)
    cpu = {role: readings["end"][role] - readings["start"][role] for role in readings["start"]}
    return _record(point, result, cpu, len(used_workers))


_MACHINE = "machine"


def _record(point: Point, result: LoadResult, cpu: dict[str, float], client_workers: int) -> dict[str, Any]:
    completed = result.completed
    machine = cpu.pop(_MACHINE)
    ours = sum(cpu.values())
    return {
        **point_fields(point),
        "window_s": round(result.window, 3),
        "requests": completed,
        "rps": round(result.requests_per_second, 1),
        "p50_ms": _round(result.percentile_ms(0.50)),
        "p90_ms": _round(result.percentile_ms(0.90)),
        "p99_ms": _round(result.percentile_ms(0.99)),
        # CPU time per request (µs) of each process, and how many cores each kept busy.
        "cpu_us_per_request": {role: round(seconds * 1e6 / completed, 1) if completed else None for role, seconds in cpu.items()},
        "cpu_cores": {role: round(seconds / result.window, 2) for role, seconds in cpu.items()},
        # Busy cores of the whole machine, and the part of them that was not the benchmark's
        # processes: a large "others" means the numbers were taken on a shared, busy machine.
        "machine_busy_cores": round(machine / result.window, 2),
        "others_busy_cores": round(max(0.0, machine - ours) / result.window, 2),
        "client_workers": client_workers,
        "errors": result.errors,
        "error_samples": result.error_samples,
    }


def point_fields(point: Point) -> dict[str, Any]:
    return {
        "scenario": point.path.name,
        "path": point.path.path,
        "protocol": point.path.protocol,
        "routes": point.path.routes,
        "group": point.group,
        "load": point.load,
        "connections": point.connections,
        "depth": point.depth,
        "payload": point.payload,
    }


def failed_record(point: Point, message: str) -> dict[str, Any]:
    """A point that could not be measured: no numbers and one error saying why."""
    return {
        **point_fields(point),
        "window_s": 0.0,
        "requests": 0,
        "rps": 0.0,
        "p50_ms": None,
        "p90_ms": None,
        "p99_ms": None,
        "cpu_us_per_request": {},
        "cpu_cores": {},
        "machine_busy_cores": None,
        "others_busy_cores": None,
        "client_workers": 0,
        "errors": 1,
        "error_samples": [message],
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def run_points(
    points: list[Point],
    timing: Timing,
    workdir: Path,
    client_workers: int,
    bridge_workers: int = 1,
    envoy_concurrency: int = 1,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Measure every point in order; a path that cannot start marks its points failed."""
    workdir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    backend = Backend(workdir)
    try:
        with LoadGenerator(client_workers) as loadgen:
            for spec, group in itertools.groupby(points, key=lambda p: p.path):
                group = list(group)
                stack = Stack(spec, backend.ports, workdir, bridge_workers, envoy_concurrency)
                started = time.monotonic()
                try:
                    port = stack.start()
                except (StartError, OSError, ValueError) as exc:
                    progress(f"{spec.name}: cannot start: {exc}")
                    records += [failed_record(p, f"{spec.name} did not start: {exc}") for p in group]
                    continue
                progress(f"{spec.name}{f' ({spec.routes} routes)' if spec.routes > 1 else ''}: started in {time.monotonic() - started:.1f}s")
                try:
                    pids = {"backend": backend.pid, **stack.pids()}
                    for point in group:
                        try:
                            record = measure_point(point, port, loadgen, timing, pids)
                        except LoadGeneratorError as exc:
                            record = failed_record(point, str(exc))
                        records.append(record)
                        progress(_progress_line(record))
                finally:
                    stack.stop()
    finally:
        backend.stop()
    return records


def _progress_line(record: dict[str, Any]) -> str:
    if not record["requests"]:
        return f"  {record['load']:<22} FAILED: {'; '.join(record['error_samples'])}"
    line = f"  {record['load']:<22} {record['rps']:>10,.0f} req/s  p50 {record['p50_ms']:.3f} ms  p99 {record['p99_ms']:.3f} ms"
    if record["errors"]:
        line += f"  {record['errors']} ERRORS: {'; '.join(record['error_samples'])}"
    return line
