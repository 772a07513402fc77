"""``python -m bench.inproc`` runs, and its driver checks what the bridge sends back.

It asserts nothing about speed: only that the in-process driver still speaks to the bridge the
way Envoy does (a change to the wire code that broke it would make the figure meaningless).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from bench import inproc, wire

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("protocol", wire.PROTOCOLS)
@pytest.mark.parametrize("depth", [1, 8])
def test_measure_passes_responses_through(protocol, depth):
    assert asyncio.run(inproc.measure(protocol, depth, requests=400)) > 0


def test_command_prints_the_figure():
    result = subprocess.run([sys.executable, "-m", "bench.inproc", "--requests", "200", "--repeat", "1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "µs of bridge CPU per request" in result.stdout


def test_instruction_count_command_prints_a_per_request_figure():
    """bench.instructions under valgrind (it fails with a message saying so where valgrind is
    missing); few requests, so this checks the plumbing, not the figure."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.instructions", "--requests", "100", "300"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    figure = result.stdout.split(":")[1].split("instructions")[0]
    assert int(figure.replace(",", "")) > 1000


@pytest.mark.parametrize("feature", ["local_ratelimit", "hash_policy"])
@pytest.mark.parametrize("protocol", wire.PROTOCOLS)
def test_measure_with_a_governance_feature_passes_responses_through(protocol, feature):
    assert asyncio.run(inproc.measure(protocol, 4, requests=200, features=(feature,))) > 0
