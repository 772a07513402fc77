"""Thrift wire constants: message types, type ids of both protocols, TApplicationException codes.

Values are those of the Apache Thrift specification (binary: doc/specs/thrift-binary-protocol.md,
compact: doc/specs/thrift-compact-protocol.md).
"""

from __future__ import annotations

# Message types (the low byte of a strict binary version word, the top 3 bits in compact).
CALL = 1
REPLY = 2
EXCEPTION = 3
ONEWAY = 4
MESSAGE_TYPE_NAMES = {CALL: "call", REPLY: "reply", EXCEPTION: "exception", ONEWAY: "oneway"}

# Binary protocol.
BINARY_VERSION_1 = 0x80010000
BINARY_VERSION_MASK = 0xFFFF0000
BINARY_FIRST_BYTE = 0x80  # first byte of every strict binary message (0x80 0x01 ...)


class BinaryType:
    STOP = 0
    BOOL = 2
    BYTE = 3
    DOUBLE = 4
    I16 = 6
    I32 = 8
    I64 = 10
    STRING = 11  # also binary
    STRUCT = 12
    MAP = 13
    SET = 14
    LIST = 15
    UUID = 16


# Compact protocol.
COMPACT_PROTOCOL_ID = 0x82
COMPACT_VERSION = 1
COMPACT_VERSION_MASK = 0x1F
COMPACT_TYPE_SHIFT = 5


class CompactType:
    STOP = 0
    BOOLEAN_TRUE = 1
    BOOLEAN_FALSE = 2
    BYTE = 3
    I16 = 4
    I32 = 5
    I64 = 6
    DOUBLE = 7
    BINARY = 8  # also string
    LIST = 9
    SET = 10
    MAP = 11
    STRUCT = 12
    UUID = 13


# TApplicationException (the struct an EXCEPTION message carries): field 1 message (string),
# field 2 type (i32) with these codes.
class ApplicationExceptionType:
    UNKNOWN = 0
    UNKNOWN_METHOD = 1
    INVALID_MESSAGE_TYPE = 2
    WRONG_METHOD_NAME = 3
    BAD_SEQUENCE_ID = 4
    MISSING_RESULT = 5
    INTERNAL_ERROR = 6
    PROTOCOL_ERROR = 7


APPLICATION_EXCEPTION_MESSAGE_FIELD = 1
APPLICATION_EXCEPTION_TYPE_FIELD = 2

# Apache Thrift's default recursion limit for nested structs and containers.
MAX_NESTING_DEPTH = 64

MULTIPLEX_SEPARATOR = ":"
FRAME_HEADER_SIZE = 4  # framed transport: a big-endian i32 length before each message
