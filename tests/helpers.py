"""Helpers the unit tests share."""

from __future__ import annotations

from metabridge.sdk.codec import Codec, DecodeStatus, Metadata


def decode_frames(codec: Codec, buffer: bytearray) -> list[Metadata]:
    """Decode every whole frame at the front of ``buffer``, which ``codec`` removes as it goes;
    what is left is the start of a frame still incomplete (or nothing)."""
    decoded: list[Metadata] = []
    for _ in range(len(buffer) + 1):  # every decoded frame takes at least one byte
        metadata = Metadata()
        if codec.decode(buffer, metadata) is DecodeStatus.WAIT_FOR_DATA:
            return decoded
        decoded.append(metadata)
    raise AssertionError(f"{type(codec).__name__}.decode reported a frame without taking any bytes of the buffer")
