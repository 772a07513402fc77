"""Which points the benchmark measures: the full matrix, and the reduced one of ``--quick``.

A point is a path (bench.stacks.PathSpec) under one load: connections x requests outstanding per
connection, with one payload size. Three groups:

- ``load``: every path under 1x1 (latency), 16x1, 16x8 (pipelined) and 256x1, 100 B and 4 KiB;
- ``routes``: metabridge with 1000 routes, the real one last (route-matching cost);
- ``size``: 64 KiB and 1 MiB payloads at 1x1 (copy and buffering cost).
"""

from __future__ import annotations

from dataclasses import dataclass

from bench import wire
from bench.stacks import DIRECT, GENERIC_PROXY, INPROCESS, METABRIDGE, TCP_PROXY, PathSpec

KIB = 1024
MIB = 1024 * 1024
MANY_ROUTES = 1000


@dataclass(frozen=True)
class Point:
    path: PathSpec
    connections: int
    depth: int
    payload: int
    group: str  # load | routes | size

    @property
    def load(self) -> str:
        """The load label, the same for every path (e.g. '16x8 100 B')."""
        label = f"{self.connections}x{self.depth} {size_label(self.payload)}"
        return label + (f" {self.path.routes} routes" if self.path.routes > 1 else "")

    @property
    def label(self) -> str:
        return f"{self.path.name} {self.load}"


def size_label(size: int) -> str:
    if size >= MIB and size % MIB == 0:
        return f"{size // MIB} MiB"
    if size >= KIB and size % KIB == 0:
        return f"{size // KIB} KiB"
    return f"{size} B"


def paths(quick: bool) -> list[PathSpec]:
    """The paths in the order they run."""
    if quick:
        return [
            PathSpec(DIRECT, wire.AWESOMERPC),
            PathSpec(TCP_PROXY, wire.AWESOMERPC),
            PathSpec(GENERIC_PROXY, wire.DUBBO),
            PathSpec(METABRIDGE, wire.AWESOMERPC),
            PathSpec(METABRIDGE, wire.DUBBO),
        ]
    return [
        PathSpec(DIRECT, wire.AWESOMERPC),
        PathSpec(DIRECT, wire.DUBBO),
        PathSpec(TCP_PROXY, wire.AWESOMERPC),
        PathSpec(TCP_PROXY, wire.DUBBO),
        PathSpec(GENERIC_PROXY, wire.DUBBO),
        PathSpec(METABRIDGE, wire.AWESOMERPC),
        PathSpec(METABRIDGE, wire.DUBBO),
        PathSpec(INPROCESS, wire.AWESOMERPC),
        PathSpec(INPROCESS, wire.DUBBO),
    ]


def matrix(quick: bool) -> list[Point]:
    """Every point, grouped by path so each path's processes start once."""
    chosen = paths(quick)
    if quick:
        loads = [(16, 1), (16, 8)]
        payloads = [100]
        sizes = [64 * KIB]
        routes_loads = [(16, 1)]
        size_paths = [PathSpec(METABRIDGE, wire.AWESOMERPC)]
    else:
        loads = [(1, 1), (16, 1), (16, 8), (256, 1)]
        payloads = [100, 4 * KIB]
        sizes = [64 * KIB, MIB]
        routes_loads = [(1, 1), (16, 1), (16, 8)]
        size_paths = chosen
    points: list[Point] = []
    for spec in chosen:
        points += [Point(spec, c, d, p, "load") for p in payloads for c, d in loads]
        if spec in size_paths:
            points += [Point(spec, 1, 1, size, "size") for size in sizes]
    many = PathSpec(METABRIDGE, wire.AWESOMERPC, routes=MANY_ROUTES)
    points += [Point(many, c, d, 100, "routes") for c, d in routes_loads]
    return points
