"""``python -m bench run [--quick] [--out DIR]``: measure every path, print a table, write
results.json, results.md and results.png into DIR (default: bench-results). Exits 1 when any
response was wrong or missing, or a path could not be measured."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from bench import report
from bench.runner import Timing, run_points
from bench.scenarios import matrix

QUICK = Timing(duration=2.0, warmup=0.5)
FULL = Timing(duration=10.0, warmup=1.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Benchmark metabridge against Envoy's tcp_proxy, its native generic_proxy and the bare backend.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run every scenario back to back")
    run.add_argument("--quick", action="store_true", help=f"reduced matrix, {QUICK.duration:g} s per point (a smoke test, about a minute)")
    run.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for results.json, results.md, results.png and process logs (default: bench-results)")
    run.add_argument("--duration", type=float, help=f"seconds measured per point (default: {FULL.duration:g}, quick: {QUICK.duration:g})")
    run.add_argument("--warmup", type=float, help=f"seconds of load before each window (default: {FULL.warmup:g}, quick: {QUICK.warmup:g})")
    run.add_argument("--bridge-workers", type=int, default=1, help="bridge worker processes on the metabridge paths (default: 1)")
    run.add_argument("--envoy-concurrency", type=int, default=1, help="worker threads of every Envoy, native and metabridge paths alike (default: 1)")
    run.add_argument("--only", action="append", metavar="TEXT", help="run only the points whose label contains TEXT, e.g. 'metabridge/awesomerpc 16x1' (repeatable)")
    run.add_argument("--client-workers", type=int, default=min(2, os.cpu_count() or 1), help="load generator processes (default: min(2, CPUs))")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    defaults = QUICK if args.quick else FULL
    timing = Timing(duration=args.duration or defaults.duration, warmup=args.warmup if args.warmup is not None else defaults.warmup)
    if timing.duration <= 0 or timing.warmup < 0 or args.client_workers < 1 or args.bridge_workers < 1 or args.envoy_concurrency < 1:
        print("bench: --duration must be > 0, --warmup >= 0, --client-workers, --bridge-workers and --envoy-concurrency >= 1", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    points = [p for p in matrix(args.quick) if not args.only or any(text in p.label for text in args.only)]
    if not points:
        print(f"bench: no point matches --only {args.only}", file=sys.stderr)
        return 2
    mode = "quick" if args.quick else "full"
    print(f"bench: {len(points)} points, {timing.duration:g} s each (+{timing.warmup:g} s warm-up), {args.client_workers} client worker(s), {args.bridge_workers} bridge worker(s), Envoy --concurrency {args.envoy_concurrency}; output in {out}", flush=True)
    started = time.monotonic()
    records = run_points(points, timing, out / "logs", args.client_workers, args.bridge_workers, args.envoy_concurrency, progress=lambda line: print(line, flush=True))
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    results = report.build_results(
        records,
        {
            "command": command,
            "mode": mode,
            "duration_s": timing.duration,
            "warmup_s": timing.warmup,
            "client_workers": args.client_workers,
            "bridge_workers": args.bridge_workers,
            "envoy_concurrency": args.envoy_concurrency,
            "elapsed_s": round(time.monotonic() - started, 1),
        },
    )
    report.write_json(results, out / "results.json")
    (out / "results.md").write_text(report.markdown(results))
    report.write_chart(results, out / "results.png")
    print()
    print(report.summary(results))
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'} in {results['elapsed_s']:g} s")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
