"""awesomerpc codecs that misbehave on one cmd, for what their connections' neighbours see
(tests/integration/test_inprocess.py, test_inprocess_admin.py):

- ``BlockingAwesomeRpcCodec``: decode blocks (time.sleep) for cmd 55: what a codec stuck in a
  blocking call costs the connections beside it, and when a reload applies. Before it blocks it
  writes BLOCKING_LINE to stderr (the bridge's log; in-process, Envoy's), so a test can wait until
  the frame has reached the codec, and RESUMED_LINE when the block ends.
- ``CrashingAwesomeRpcCodec``: decode crashes the process for cmd 66 (a read of address 0
  through ctypes: a SIGSEGV no Python code can catch), as a bug in a C extension would; it writes
  CRASHING_LINE first."""

from __future__ import annotations

import ctypes
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
BLOCKING_LINE = "misbehaving_codecs: decode blocks"
RESUMED_LINE = "misbehaving_codecs: decode resumes"
CRASHING_CMD = 66
CRASHING_LINE = "misbehaving_codecs: decode reads address 0"
_CMD = struct.Struct("!h")
_CMD_OFFSET = 9


def frame_cmd(buffer: bytearray) -> int | None:
    """The cmd of the awesomerpc frame at the start of ``buffer``, once its header has it."""
    return _CMD.unpack_from(buffer, _CMD_OFFSET)[0] if len(buffer) >= _CMD_OFFSET + 2 else None


class BlockingAwesomeRpcCodec(AwesomeRpcCodec):
    def decode(self, buffer: bytearray, metadata: Metadata) -> DecodeStatus:
        if frame_cmd(buffer) == BLOCKING_CMD:
            sys.stderr.write(f"{BLOCKING_LINE} for {BLOCK_SECONDS}s\n")
            sys.stderr.flush()
            time.sleep(BLOCK_SECONDS)
            sys.stderr.write(f"{RESUMED_LINE}\n")
            sys.stderr.flush()
        return super().decode(buffer, metadata)


class CrashingAwesomeRpcCodec(AwesomeRpcCodec):
    def decode(self, buffer: bytearray, metadata: Metadata) -> DecodeStatus:
        if frame_cmd(buffer) == CRASHING_CMD:
            sys.stderr.write(f"{CRASHING_LINE}\n")
            sys.stderr.flush()
            ctypes.string_at(0)
        return super().decode(buffer, metadata)
