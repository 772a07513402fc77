"""Dubbo2 wire constants and framing: the 16-byte header, statuses, result types, descriptors."""

from __future__ import annotations

import enum
import functools
import struct

MAGIC = 0xDABB
HEADER = struct.Struct(">HBBqi")  # magic, flag, status, request id, body length
HEADER_SIZE = HEADER.size  # 16

FLAG_REQUEST = 0x80
FLAG_TWOWAY = 0x40
FLAG_EVENT = 0x20
SERIALIZATION_MASK = 0x1F
HESSIAN2 = 2

# Serialization ids other Dubbo setups use; named in errors so an operator knows what to change.
SERIALIZATION_NAMES = {
    2: "hessian2",
    3: "java",
    4: "compactedjava",
    6: "fastjson",
    7: "nativejava",
    8: "kryo",
    9: "fst",
    10: "native-hessian",
    11: "protostuff",
    12: "avro",
    21: "gson",
    22: "protobuf-json",
    23: "protobuf",
    25: "kryo2",
}


class Status(enum.IntEnum):
    OK = 20
    CLIENT_TIMEOUT = 30
    SERVER_TIMEOUT = 31
    BAD_REQUEST = 40
    BAD_RESPONSE = 50
    SERVICE_NOT_FOUND = 60
    SERVICE_ERROR = 70
    SERVER_ERROR = 80
    CLIENT_ERROR = 90
    SERVER_THREADPOOL_EXHAUSTED = 100


class ResultType(enum.IntEnum):
    """First value of an OK response body (Dubbo's DubboCodec.RESPONSE_*)."""

    WITH_EXCEPTION = 0
    VALUE = 1
    NULL_VALUE = 2
    WITH_EXCEPTION_WITH_ATTACHMENTS = 3
    VALUE_WITH_ATTACHMENTS = 4
    NULL_VALUE_WITH_ATTACHMENTS = 5


EXCEPTION_RESULTS = frozenset({ResultType.WITH_EXCEPTION, ResultType.WITH_EXCEPTION_WITH_ATTACHMENTS})
RESULTS_WITH_ATTACHMENTS = frozenset(
    {ResultType.WITH_EXCEPTION_WITH_ATTACHMENTS, ResultType.VALUE_WITH_ATTACHMENTS, ResultType.NULL_VALUE_WITH_ATTACHMENTS}
)
# Result types whose value (or exception) comes before the attachments map.
RESULTS_WITH_VALUE = frozenset({ResultType.WITH_EXCEPTION_WITH_ATTACHMENTS, ResultType.VALUE_WITH_ATTACHMENTS})
HESSIAN_NULL_BODY = b"N"


def pack_header(flag: int, status: int, request_id: int, body_length: int) -> bytes:
    return HEADER.pack(MAGIC, flag, status, request_id, body_length)


_PRIMITIVES = frozenset("VZBCDFIJS")


@functools.lru_cache(maxsize=4096)
def count_parameters(descriptor: str) -> int:
    """How many arguments a JVM parameter descriptor names ("Ljava/lang/String;[IJ" -> 3).

    Cached: a service sees the same few descriptors over and over. Raises ValueError.
    """
    count = i = 0
    size = len(descriptor)
    while i < size:
        while i < size and descriptor[i] == "[":
            i += 1
        if i == size:
            raise ValueError(f"parameter descriptor {descriptor!r} ends inside an array type")
        ch = descriptor[i]
        if ch in _PRIMITIVES:
            i += 1
        elif ch == "L":
            end = descriptor.find(";", i)
            if end < 0:
                raise ValueError(f"parameter descriptor {descriptor!r} has an unterminated class name")
            i = end + 1
        else:
            raise ValueError(f"parameter descriptor {descriptor!r} has an unknown type code {ch!r} at {i}")
        count += 1
    return count
