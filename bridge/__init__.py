"""metabridge: a MetaProtocol layer-7 proxy with Python codecs and a stock Envoy.

The codec and filter SDK is importable from here::

    from metabridge import Codec, DecodeStatus, Metadata, MessageType, ErrorType

``CODEC_API_VERSION`` is the version of that contract (docs/writing-a-codec.md): a codec may
check it, and it changes, major first, whenever a change to the SDK could break a codec.
"""

from metabridge.sdk.codec import (
    CODEC_API_VERSION,
    DEFAULT_MAX_FRAME_SIZE,
    Codec,
    CodecError,
    DecodeStatus,
    Direction,
    Error,
    ErrorType,
    FrameTooLarge,
    Headers,
    MalformedFrame,
    MessageType,
    Metadata,
    ResponseStatus,
    take_frame,
)
from metabridge.sdk.filter import Filter, FilterStatus

__version__ = "0.1.0"

__all__ = [
    "CODEC_API_VERSION",
    "DEFAULT_MAX_FRAME_SIZE",
    "Codec",
    "CodecError",
    "DecodeStatus",
    "Direction",
    "Error",
    "ErrorType",
    "Filter",
    "FilterStatus",
    "FrameTooLarge",
    "Headers",
    "MalformedFrame",
    "MessageType",
    "Metadata",
    "ResponseStatus",
    "take_frame",
    "__version__",
]
