"""An awesomerpc codec whose decode blocks (time.sleep) for cmd 55: what a codec stuck in a
blocking call costs the connections beside it (tests/integration/test_inprocess.py), and when a
reload applies (test_inprocess_admin.py). Before it blocks it writes BLOCKING_LINE to stderr (the
bridge's log; in-process, Envoy's), so a test can wait until the frame has reached the codec, and
RESUMED_LINE when the block ends."""

from __future__ import annotations

import struct
import sys
import time
from pathlib import Path

from metabridge.registry import load_codec_class
from metabridge.sdk.codec import DecodeStatus, Metadata

_REPO = Path(__file__).resolve().parents[2]
AwesomeRpcCodec = load_codec_class("codecs/awesomerpc.py:AwesomeRpcCodec", _REPO)

BLOCKING_CMD = 55
BLOCK_SECONDS = 1.0
BLOCKING_LINE = "blocking_codec: decode blocks"
RESUMED_LINE = "blocking_codec: decode resumes"
_CMD = struct.Struct("!h")
_CMD_OFFSET = 9


class BlockingAwesomeRpcCodec(AwesomeRpcCodec):
    def decode(self, buffer: bytearray, metadata: Metadata) -> DecodeStatus:
        if len(buffer) >= _CMD_OFFSET + 2 and _CMD.unpack_from(buffer, _CMD_OFFSET)[0] == BLOCKING_CMD:
            sys.stderr.write(f"{BLOCKING_LINE} for {BLOCK_SECONDS}s\n")
            sys.stderr.flush()
            time.sleep(BLOCK_SECONDS)
            sys.stderr.write(f"{RESUMED_LINE}\n")
            sys.stderr.flush()
        return super().decode(buffer, metadata)
