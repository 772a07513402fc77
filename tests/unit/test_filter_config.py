"""Filters named in the config: the example deny filter through a connection, and every way a
filter entry can be wrong."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metabridge.config.model import load, parse
from metabridge.core.runtime import build_runtimes
from metabridge.registry import CodecLoadError
from tests.unit.connection_harness import OVER_LIMIT, Harness, encode_frame, in_loop, parse_frames, wait_until

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "filters.yaml"


@in_loop
async def test_the_example_deny_filter_holds_then_refuses_and_lets_the_rest_through():
    runtime = build_runtimes(load(EXAMPLE))["awesomerpc"]
    assert [f.name for f in runtime.chain.filters] == ["deny"]
    h = Harness()
    h.runtime.chain = runtime.chain
    h.read(encode_frame(1, 13) + encode_frame(2, 1))
    assert [flow for flow, *_ in parse_frames(bytes(h.hcm.received[1]))] == [2], "cmd 1 is routed at once"
    assert h.client_frames() == [], "cmd 13 is held for 50 ms, not refused yet"
    await wait_until(lambda: h.client_frames(), "the held refusal")
    assert h.client_frames() == [(1, 13, OVER_LIMIT, b"")]


def _with_filters(filters) -> dict:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["listeners"][0]["filters"] = filters
    return raw


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ([{"name": "nonesuch"}], "unknown filter 'nonesuch'"),
        ([{"name": "deny", "ref": "filters/deny.py:DenyFilter", "config": {}}], "rejects its config: KeyError"),
        ([{"name": "deny", "ref": "filters/deny.py:parse_duration"}], "expected a subclass of metabridge.sdk.filter.Filter"),
        ([{"name": "deny", "ref": "filters/missing.py:X"}], "no such file or folder"),
    ],
)
def test_a_bad_filter_entry_is_refused_naming_the_entry(filters, message):
    config = parse(_with_filters(filters), str(EXAMPLE), EXAMPLE.parent)
    with pytest.raises(CodecLoadError) as caught:
        build_runtimes(config)
    assert "listeners[awesomerpc].filters[0]" in str(caught.value) or message in str(caught.value)
    assert message in str(caught.value)
