"""``python -m bench.inproc_module`` runs, and its driver checks what the session sends back
(nothing about speed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import inproc_module, wire

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("protocol", wire.PROTOCOLS)
@pytest.mark.parametrize("depth", [1, 8])
def test_measure_passes_responses_through(protocol, depth):
    assert inproc_module.measure(protocol, depth, requests=400) > 0


def test_command_prints_the_figure():
    result = subprocess.run([sys.executable, "-m", "bench.inproc_module", "--requests", "200", "--repeat", "1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "µs of Python CPU per request in-process" in result.stdout
