"""The package's shape: committed generated code is current, the SDK is importable from
``metabridge``, and the repository's codecs/ folder never shadows the standard library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import metabridge
from metabridge.sdk import codec as sdk_codec
from metabridge.sdk import filter as sdk_filter

REPO = Path(__file__).resolve().parents[2]


def test_the_committed_generated_code_matches_the_protos():
    result = subprocess.run([sys.executable, "scripts/gen_proto.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_sdk_is_importable_from_the_package():
    for name in metabridge.__all__:
        assert hasattr(metabridge, name), name
    assert metabridge.Codec is sdk_codec.Codec and metabridge.Filter is sdk_filter.Filter
    major, minor = metabridge.CODEC_API_VERSION
    assert (major, minor) >= (1, 0)


def test_codecs_folder_is_never_the_top_level_codecs_module():
    # With the repository first on sys.path (as when running from a checkout), `codecs` is still
    # the standard library's, and the built-in codecs are reachable only as metabridge.codecs.
    probe = "import codecs, sys; print(codecs.__spec__.origin); import metabridge.codecs.dubbo as d; print(d.__name__)"
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env={"PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    origin, dubbo = result.stdout.split()
    assert str(REPO) not in origin, f"`import codecs` found the repository's folder: {origin}"
    assert dubbo == "metabridge.codecs.dubbo"
