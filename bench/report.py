"""Turning point records into the run's results: ratios, targets, headroom, a table, JSON, a chart.

A point record (bench.runner) has: scenario (path/protocol), path, protocol, routes, group,
load (e.g. "16x8 100 B"), connections, depth, payload, window_s, requests, rps, p50_ms, p90_ms,
p99_ms, cpu_us_per_request and cpu_cores per process role (envoy, bridge, backend, client),
machine_busy_cores, others_busy_cores, client_workers, errors, error_samples.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench.stacks import DIRECT, GENERIC_PROXY, METABRIDGE, TCP_PROXY

# What the project aims for (reported, not enforced): (numerator, denominator, load, goal).
TARGETS = [
    (f"{METABRIDGE}/awesomerpc", f"{TCP_PROXY}/awesomerpc", "16x1 100 B", 0.3),
    (f"{METABRIDGE}/dubbo", f"{TCP_PROXY}/dubbo", "16x1 100 B", 0.3),
    (f"{METABRIDGE}/dubbo", f"{GENERIC_PROXY}/dubbo", "16x8 100 B", 0.5),
]


def _index(points: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(p["scenario"], p["load"]): p for p in points if p["requests"]}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def ratios(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """metabridge against tcp_proxy (same protocol) and generic_proxy (Dubbo) at every shared load."""
    index = _index(points)
    out = []
    for p in points:
        if p["path"] != METABRIDGE or not p["requests"] or p["routes"] > 1:
            continue
        baselines = [f"{TCP_PROXY}/{p['protocol']}"] + ([f"{GENERIC_PROXY}/dubbo"] if p["protocol"] == "dubbo" else [])
        for baseline in baselines:
            other = index.get((baseline, p["load"]))
            if other is None:
                continue
            out.append(
                {
                    "load": p["load"],
                    "numerator": p["scenario"],
                    "denominator": baseline,
                    "rps_ratio": _ratio(p["rps"], other["rps"]),
                    "p99_ratio": _ratio(p["p99_ms"], other["p99_ms"]),
                }
            )
    return out


def route_growth(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Many routes against one, same path and load: what route matching costs."""
    index = _index(points)
    out = []
    for p in points:
        if p["routes"] <= 1 or not p["requests"]:
            continue
        base_load = p["load"].removesuffix(f" {p['routes']} routes")
        base = index.get((p["scenario"], base_load))
        if base is None:
            continue
        bridge_many = p["cpu_us_per_request"].get("bridge")
        bridge_one = base["cpu_us_per_request"].get("bridge")
        out.append(
            {
                "scenario": p["scenario"],
                "load": base_load,
                "routes": p["routes"],
                "rps_ratio": _ratio(p["rps"], base["rps"]),
                "bridge_cpu_us_per_request": {"1": bridge_one, str(p["routes"]): bridge_many},
            }
        )
    return out


def targets(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    index = _index(points)
    out = []
    for numerator, denominator, load, goal in TARGETS:
        a, b = index.get((numerator, load)), index.get((denominator, load))
        ratio = _ratio(a["rps"], b["rps"]) if a and b else None
        out.append(
            {
                "target": f"{numerator} / {denominator} requests/s at {load} >= {goal}",
                "ratio": ratio,
                "met": None if ratio is None else ratio >= goal,
            }
        )
    return out


def headroom(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """How much faster the client + backend went on their own than through the fastest proxy:
    a factor well above 1 means the load generator was not what limited the proxied paths."""
    index = _index(points)
    out = []
    for p in points:
        if p["path"] != DIRECT or not p["requests"]:
            continue
        proxied = [q for q in points if q["protocol"] == p["protocol"] and q["load"] == p["load"] and q["path"] != DIRECT and q["requests"]]
        if not proxied:
            continue
        best = max(proxied, key=lambda q: q["rps"])
        out.append(
            {
                "load": p["load"],
                "protocol": p["protocol"],
                "direct_rps": p["rps"],
                "fastest_proxy": best["scenario"],
                "fastest_proxy_rps": best["rps"],
                "factor": _ratio(p["rps"], best["rps"]),
                "client_cpu_us_per_request": index[(p["scenario"], p["load"])]["cpu_us_per_request"].get("client"),
            }
        )
    return out


def machine_info() -> dict[str, Any]:
    cpu_model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "envoy": _envoy_version(),
    }


def _envoy_version() -> str:
    from metabridge.config.bootstrap import find_envoy

    try:
        out = subprocess.run([find_envoy(), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    # "<path to envoy>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    _, found, rest = out.partition("version:")
    fields = rest.split()[0].split("/") if found and rest.split() else []
    return fields[1] if len(fields) > 1 else out.strip() or "unknown"


def build_results(points: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        **meta,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "errors": sum(p["errors"] for p in points),
        "points": points,
        "ratios": ratios(points),
        "targets": targets(points),
        "route_growth": route_growth(points),
        "headroom": headroom(points),
    }


# -- text ---------------------------------------------------------------------------------------

_COLUMNS = [
    ("scenario", "scenario", "{}"),
    ("load", "load", "{}"),
    ("req/s", "rps", "{:,.0f}"),
    ("p50 ms", "p50_ms", "{:.2f}"),
    ("p90 ms", "p90_ms", "{:.2f}"),
    ("p99 ms", "p99_ms", "{:.2f}"),
    ("Envoy µs/req", ("cpu_us_per_request", "envoy"), "{:.1f}"),
    ("bridge µs/req", ("cpu_us_per_request", "bridge"), "{:.1f}"),
    ("other load (cores)", "others_busy_cores", "{:.2f}"),
    ("errors", "errors", "{}"),
]


def _cell(point: dict[str, Any], key, fmt: str) -> str:
    value = point[key[0]].get(key[1]) if isinstance(key, tuple) else point.get(key)
    return "-" if value is None else fmt.format(value)


def _rows(points: list[dict[str, Any]]) -> list[list[str]]:
    return [[_cell(p, key, fmt) for _, key, fmt in _COLUMNS] for p in points]


def text_table(points: list[dict[str, Any]]) -> str:
    header = [title for title, _, _ in _COLUMNS]
    rows = _rows(points)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _markdown_table(header: list[str], rows: list[list[str]], numeric_from: int = 2) -> str:
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, align] + rows)


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: the points table, ratios, targets, route growth and headroom."""
    points = results["points"]
    parts = [_markdown_table([t for t, _, _ in _COLUMNS], _rows(points))]
    if results["ratios"]:
        parts.append(
            _markdown_table(
                ["metabridge", "baseline", "load", "req/s ratio", "p99 ratio"],
                [[r["numerator"], r["denominator"], r["load"], _fmt(r["rps_ratio"]), _fmt(r["p99_ratio"])] for r in results["ratios"]],
                numeric_from=3,
            )
        )
    parts.append(
        _markdown_table(
            ["target", "ratio", "met"],
            [[t["target"], _fmt(t["ratio"]), {True: "yes", False: "no", None: "not measured"}[t["met"]]] for t in results["targets"]],
            numeric_from=1,
        )
    )
    if results["route_growth"]:
        rows = []
        for g in results["route_growth"]:
            cpu = g["bridge_cpu_us_per_request"]
            rows.append([g["scenario"], g["load"], str(g["routes"]), _fmt(g["rps_ratio"]), _fmt(cpu.get("1")), _fmt(cpu.get(str(g["routes"])))])
        parts.append(_markdown_table(["scenario", "load", "routes", "req/s vs 1 route", "bridge µs/req, 1 route", "bridge µs/req, many"], rows, numeric_from=2))
    if results["headroom"]:
        parts.append(
            _markdown_table(
                ["load", "protocol", "direct req/s", "fastest proxy", "its req/s", "direct / proxy", "client µs/req"],
                [
                    [h["load"], h["protocol"], f"{h['direct_rps']:,.0f}", h["fastest_proxy"], f"{h['fastest_proxy_rps']:,.0f}", _fmt(h["factor"]), _fmt(h["client_cpu_us_per_request"])]
                    for h in results["headroom"]
                ],
                numeric_from=2,
            )
        )
    return "\n\n".join(parts) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def summary(results: dict[str, Any]) -> str:
    """What the console shows at the end: the table, ratios, targets and errors."""
    lines = [text_table(results["points"]), ""]
    for r in results["ratios"]:
        lines.append(f"{r['numerator']} / {r['denominator']} at {r['load']}: req/s x{_fmt(r['rps_ratio'])}, p99 x{_fmt(r['p99_ratio'])}")
    for g in results["route_growth"]:
        lines.append(f"{g['scenario']} at {g['load']}: {g['routes']} routes give x{_fmt(g['rps_ratio'])} the req/s of 1 route")
    for h in results["headroom"]:
        lines.append(f"headroom at {h['load']} ({h['protocol']}): direct {h['direct_rps']:,.0f} req/s = x{_fmt(h['factor'])} the fastest proxy ({h['fastest_proxy']})")
    for t in results["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"target {t['target']}: {_fmt(t['ratio'])} ({verdict})")
    lines.append(f"errors: {results['errors']}")
    return "\n".join(lines)


# -- files --------------------------------------------------------------------------------------


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


def write_chart(results: dict[str, Any], path: Path) -> None:
    """Requests/s and p99 latency per load, one bar per scenario (log scales)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    points = [p for p in results["points"] if p["requests"]]
    loads = list(dict.fromkeys(p["load"] for p in results["points"]))
    scenarios = list(dict.fromkeys(p["scenario"] for p in results["points"]))
    index = {(p["scenario"], p["load"]): p for p in points}
    width = 0.8 / max(1, len(scenarios))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8.0, 1.3 * len(loads) + 3), 9), sharex=True)
    for i, scenario in enumerate(scenarios):
        xs, rps, p99 = [], [], []
        for x, load in enumerate(loads):
            p = index.get((scenario, load))
            if p is not None:
                xs.append(x - 0.4 + width * (i + 0.5))
                rps.append(p["rps"])
                p99.append(p["p99_ms"])
        top.bar(xs, rps, width, label=scenario)
        bottom.bar(xs, p99, width, label=scenario)
    top.set_yscale("log")
    top.set_ylabel("requests/s (log)")
    top.set_title(f"metabridge benchmark ({results['mode']}, {results['date']}, {results['machine']['nproc']} vCPU)")
    top.legend(fontsize="small", ncol=2)
    top.grid(axis="y", which="both", alpha=0.3)
    bottom.set_yscale("log")
    bottom.set_ylabel("p99 latency, ms (log)")
    bottom.grid(axis="y", which="both", alpha=0.3)
    # Plain numbers (20,000 rather than 2x10^4); between decades only 2 and 5 are labelled.
    plain = FuncFormatter(lambda value, _: f"{value:,.10g}")
    minor = FuncFormatter(lambda value, _: f"{value:,.10g}" if f"{value:.0e}"[0] in "25" else "")
    for axis in (top, bottom):
        axis.yaxis.set_major_formatter(plain)
        axis.yaxis.set_minor_formatter(minor)
        axis.tick_params(axis="y", which="minor", labelsize="x-small")
    bottom.set_xticks(range(len(loads)))
    bottom.set_xticklabels(loads, rotation=30, ha="right", fontsize="small")
    bottom.set_xlabel("connections x outstanding requests, payload")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
