"""``python -m bench.worstcase --quick`` runs and prints its table; nothing about speed is asserted.

What is checked is what makes the figures mean something: every built-in codec and wire variant
has a row, every message is the size asked for, and each one is a message the codec accepts as
configured (within its caps), while the same shapes built past the caps are refused.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QUICK_SIZE = 256 * 1024
TARGETS = [
    "awesomerpc",
    "dubbo request",
    "dubbo response",
    "dubbo response + response_mutation",
    "thrift binary framed",
    "thrift binary buffered",
    "thrift compact framed",
    "thrift compact buffered",
]
ROW = re.compile(r"^(?P<target>\S.*?)\s{2,}(?P<shape>\S.*?)\s+(?P<bytes>\d+)\s+(?P<ms>\d+\.\d\d)\s+(?P<per_mib>\d+)  (?P<outcome>.+)$")


def run(*args: str) -> tuple[list[dict], list[str]]:
    result = subprocess.run([sys.executable, "-m", "bench.worstcase", "--quick", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    table, _, worst = result.stdout.partition("worst shape per codec:")
    rows = [m.groupdict() for m in map(ROW.match, table.splitlines()) if m]
    return rows, [line.strip() for line in worst.splitlines() if line.strip()]


def test_quick_run_has_every_codec_and_only_accepted_messages_of_the_size():
    rows, worst = run()
    assert [t for t in dict.fromkeys(r["target"] for r in rows)] == TARGETS
    assert all(int(r["bytes"]) == QUICK_SIZE for r in rows), [(r["target"], r["shape"], r["bytes"]) for r in rows]
    assert [r for r in rows if r["outcome"] != "decoded"] == []
    mib = QUICK_SIZE / 2**20
    for r in rows:  # µs/MiB is the time over the size (ms are rounded to 0.01)
        ms, per_mib = float(r["ms"]), int(r["per_mib"])
        assert ms >= 0 and abs(per_mib - ms * 1000 / mib) <= 5 / mib + 1
    # One "worst" line per codec, naming one of its shapes.
    assert len(worst) == len(TARGETS)
    shapes = {(r["target"], r["shape"]) for r in rows}
    for target, line in zip(TARGETS, worst):
        assert line.startswith(target) and any(line.startswith(f"{target} ") and shape in line for t, shape in shapes if t == target)


def test_uncapped_shapes_are_refused_where_the_codec_walks():
    rows, _ = run("--uncapped", "--only", "empty")
    outcomes = {(r["target"], r["shape"]): r["outcome"] for r in rows}
    assert outcomes[("dubbo request", "empty lists")].startswith("refused: dubbo: request 1 is over a limit")
    assert "max_container_size" in outcomes[("thrift compact buffered", "lists of empty structs")]
    # Framed Thrift does not walk the message, so there is nothing to cap.
    assert outcomes[("thrift binary framed", "lists of empty structs")] == "decoded"
