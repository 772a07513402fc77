"""The awesomerpc wire format, taken from the codec so the peers never restate the header layout.

codecs/awesomerpc.py is loaded through the codec registry (the same way the bridge loads it), not
imported as ``codecs.awesomerpc``: ``codecs`` is a standard-library module.
"""

from __future__ import annotations

import sys
from pathlib import Path

from metabridge.registry import load_codec_class

REPO_ROOT = Path(__file__).resolve().parents[2]
CODEC_REF = "codecs/awesomerpc.py:AwesomeRpcCodec"

AwesomeRpcCodec = load_codec_class(CODEC_REF, REPO_ROOT)
_codec_module = sys.modules[AwesomeRpcCodec.__module__]

encode_frame = _codec_module.encode_frame
HEADER_SIZE: int = _codec_module.HEADER_SIZE
HEARTBEAT_CMD: int = _codec_module.HEARTBEAT_CMD
ERROR_CODES = _codec_module.ERROR_CODES

__all__ = ["AwesomeRpcCodec", "encode_frame", "HEADER_SIZE", "HEARTBEAT_CMD", "ERROR_CODES", "REPO_ROOT", "CODEC_REF"]
