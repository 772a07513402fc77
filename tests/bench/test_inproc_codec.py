"""``python -m bench.inproc --codec REF``: any codec, driven with its sample frames."""

from __future__ import annotations

import asyncio

import pytest

from bench import inproc
from metabridge.kit import builtin_samples

CODEC_FILE = '''
from metabridge.codecs.awesomerpc import AwesomeRpcCodec, encode_frame
from metabridge.kit.conformance import Samples


class MyCodec(AwesomeRpcCodec):
    name = "mine"


MINE = Samples(requests=[encode_frame(9, 4, b"ping")], responses=[encode_frame(9, 4, b"pong")])
'''


@pytest.mark.parametrize(("name", "depth"), [("awesomerpc", 1), ("dubbo", 1), ("thrift", 4)])
def test_builtin_codecs_pass_their_response_samples_through(name, depth):
    assert asyncio.run(inproc.measure_codec(name, builtin_samples.BUILTIN[name](), depth, requests=200)) > 0


def test_a_codec_file_with_its_samples_file(tmp_path, capsys):
    path = tmp_path / "mine.py"
    path.write_text(CODEC_FILE)
    inproc.main(["--codec", f"{path}:MyCodec", "--samples", f"{path}:MINE", "--requests", "200", "--repeat", "1", "--with", "hash_policy"])
    assert capsys.readouterr().out.startswith(f"{path}:MyCodec depth 1, 17 B request, with hash_policy: ")


def test_a_codec_with_request_ids_is_refused_past_depth_1():
    with pytest.raises(SystemExit, match="only --depth 1 works"):
        asyncio.run(inproc.measure_codec("awesomerpc", builtin_samples.awesomerpc(), 2, requests=10))


def test_a_codec_without_builtin_samples_needs_a_samples_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(CODEC_FILE)
    with pytest.raises(SystemExit, match="is not a built-in codec; pass --samples"):
        inproc.main(["--codec", f"{path}:MyCodec"])
