"""A deliberately broken awesomerpc codec for the fault tests (tests/integration/test_faults_and_limits.py).

It is the real AwesomeRpcCodec except for two planted bugs, both plain exceptions (not
CodecError), so they exercise the bridge's containment of codec bugs rather than its handling of
bad input:

    cmd 66 (DECODE_BUG_CMD)    ``decode`` raises RuntimeError before consuming the frame
    cmd 67 (ON_ERROR_BUG_CMD)  ``on_error`` raises RuntimeError (route cmd 67 nowhere so that the
                               bridge needs a local reply for it)

Loaded by the bridge as a file ref: ``<repo>/tests/integration/broken_codec.py:BrokenAwesomeRpcCodec``.
"""

from __future__ import annotations

import struct
from pathlib import Path

from metabridge.registry import load_codec_class
from metabridge.sdk.codec import DecodeStatus, Error, Metadata

# codecs/ is not importable as a package (``codecs`` is a standard-library module): load the
# codec the way the bridge does.
_REPO = Path(__file__).resolve().parents[2]
AwesomeRpcCodec = load_codec_class("codecs/awesomerpc.py:AwesomeRpcCodec", _REPO)

DECODE_BUG_CMD = 66
ON_ERROR_BUG_CMD = 67
_CMD = struct.Struct("!h")
_CMD_OFFSET = 9
_HEADER_SIZE = 13


class BrokenAwesomeRpcCodec(AwesomeRpcCodec):
    name = "broken-awesomerpc"

    def decode(self, buffer: bytearray, metadata: Metadata) -> DecodeStatus:
        if len(buffer) >= _HEADER_SIZE and _CMD.unpack_from(buffer, _CMD_OFFSET)[0] == DECODE_BUG_CMD:
            raise RuntimeError(f"deliberate decode bug (cmd {DECODE_BUG_CMD})")
        return super().decode(buffer, metadata)

    def on_error(self, metadata: Metadata, error: Error) -> bytes:
        if metadata.properties.get("cmd") == ON_ERROR_BUG_CMD:
            raise RuntimeError(f"deliberate on_error bug (cmd {ON_ERROR_BUG_CMD}, {error.type.value})")
        return super().on_error(metadata, error)
