"""Bounds-checked readers for Thrift's binary and compact protocols.

A reader works in place on the caller's buffer from ``pos`` up to ``end``. It decodes the message
header and *walks* the message's struct without a schema: every type, nested structs and
containers included, so it finds where an unframed message ends. A framed message needs no walk:
``peek_fields`` reads just the first field or two, which say whether a reply is a success.

The walk's work is capped (``Limits``): nesting depth, elements per container and fields plus
elements per message, counting only what is walked one step at a time (a list of numbers is
stepped over at once and costs no more than its bytes).

The walk is resumable. Its state (``Walk``: a position and an explicit stack of open structs and
containers) only ever advances by whole steps (a field header with its value, or one container
element), so when the bytes run out mid-step the state still describes the last step boundary and
walking resumes from there once more bytes have arrived. A large message arriving in many pieces
is therefore walked once, not once per piece.

Running out of bytes raises ``NeedMoreData`` carrying a buffer length the message needs at least,
or a CodecError when the bytes are known to be complete (a framed message overrunning its frame).
Anything that can never be valid Thrift raises CodecError; IndexError/struct.error never escape.
"""

from __future__ import annotations

import re
import struct

from metabridge.sdk.codec import CodecError

from .wire import (
    APPLICATION_EXCEPTION_MESSAGE_FIELD,
    APPLICATION_EXCEPTION_TYPE_FIELD,
    BINARY_VERSION_1,
    BINARY_VERSION_MASK,
    COMPACT_PROTOCOL_ID,
    COMPACT_TYPE_SHIFT,
    COMPACT_VERSION,
    COMPACT_VERSION_MASK,
    MESSAGE_TYPE_NAMES,
    BinaryType,
    CompactType,
)

_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_MAX_LENGTH = 0x7FFFFFFF  # lengths and sizes are i32 on the wire
_STOP = 0  # the STOP field type, in both protocols
_STRUCT = 12  # the struct type id, the same in both protocols


class NeedMoreData(Exception):
    """The message continues past the available bytes; ``needed`` is a buffer length (absolute
    index) that the message needs at least."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


class MessageHeader:
    __slots__ = ("name", "message_type", "seqid", "strict")

    def __init__(self, name: str, message_type: int, seqid: int, strict: bool) -> None:
        self.name = name
        self.message_type = message_type
        self.seqid = seqid
        self.strict = strict


class _StructFrame:
    __slots__ = ("last_field_id",)

    def __init__(self) -> None:
        self.last_field_id = 0  # compact field ids are deltas from the previous one


class _ContainerFrame:
    __slots__ = ("remaining", "types", "index", "last")

    def __init__(self, count: int, types: tuple[int, ...]) -> None:
        self.remaining = count  # elements (map: key/value pairs) still to walk
        self.types = types  # (element,) or (key, value)
        self.index = 0  # which of ``types`` comes next
        self.last = len(types) - 1


class Limits:
    """Caps on the work of walking one message; each names the codec option that sets it."""

    __slots__ = ("nesting_depth", "container_size", "elements")

    def __init__(self, nesting_depth: int, container_size: int, elements: int) -> None:
        self.nesting_depth = nesting_depth  # open structs and containers, the message struct included
        self.container_size = container_size  # elements of one walked list/set (map: entries)
        self.elements = elements  # fields and walked container elements in one message


class Walk:
    """The resumable state of walking one message struct.

    With ``capture`` (EXCEPTION messages) the TApplicationException's message and type fields are
    read on the way. ``budget`` is how many more fields and elements the walk may take.
    """

    __slots__ = ("pos", "stack", "first_field_id", "capture", "exception_message", "exception_type", "budget")

    def __init__(self, pos: int, *, capture: bool = False, budget: int = 0) -> None:
        self.pos = pos  # the last step boundary
        self.budget = budget  # as of that boundary
        self.stack: list[_StructFrame | _ContainerFrame] = [_StructFrame()]
        self.first_field_id: int | None = None  # of the message struct (REPLY: 0 = success)
        self.capture = capture
        self.exception_message: str | None = None
        self.exception_type: int | None = None


class Reader:
    """What both protocols share: bounds checks, the walk and stepping over containers."""

    protocol = ""
    STRING_TYPE = -1  # the protocol's type id of a string field
    I32_TYPE = -1
    ELEMENT_TYPES: frozenset[int] = frozenset()  # the type ids a container element may have
    ELEMENT_SIZES: dict[int, int] = {}  # bytes of each fixed-width type as a container element

    __slots__ = ("data", "pos", "end", "complete", "limits")

    def __init__(self, data: bytes | bytearray, pos: int, end: int, *, complete: bool, limits: Limits) -> None:
        self.data = data
        self.pos = pos
        self.end = end
        # True when data[pos:end] is the whole message (framed transport): running short is then
        # an error, not a reason to wait.
        self.complete = complete
        self.limits = limits

    # -- protocol specific -------------------------------------------------------------------
    def message_begin(self) -> MessageHeader:
        raise NotImplementedError

    def field_header(self, last_field_id: int) -> tuple[int, int]:
        """(type, field id) of the next field, or (STOP, 0) at the end of a struct."""
        raise NotImplementedError

    def value_step(self, value_type: int, in_container: bool) -> _StructFrame | _ContainerFrame | None:
        """Step over a value whose bytes are all its own (numbers, strings, containers of
        fixed-size or varint elements), or read the header of a struct or container whose
        contents must be walked and return the frame to push."""
        raise NotImplementedError

    def _length(self, what: str) -> int:
        """A string's or container's length (non-negative)."""
        raise NotImplementedError

    def _skip_elements(self, count: int, types: tuple[int, ...]) -> bool:
        """Step over a container's elements at once if the protocol can tell where they end
        without walking them; False if they must be walked."""
        return False

    def read_i32(self) -> int:
        raise NotImplementedError

    # -- shared ------------------------------------------------------------------------------
    def _short(self, needed: int) -> None:
        if self.complete:
            raise CodecError(f"Thrift {self.protocol} message runs {needed - self.end} byte(s) past the end of its frame")
        raise NeedMoreData(needed)

    def _advance(self, count: int) -> int:
        """Step over ``count`` bytes; returns where they start."""
        start = self.pos
        stop = start + count
        if stop > self.end:
            self._short(stop)
        self.pos = stop
        return start

    def _require(self, count: int) -> None:
        """Fail fast when fewer than ``count`` bytes remain (before walking a huge count)."""
        if self.pos + count > self.end:
            self._short(self.pos + count)

    def u8(self) -> int:
        pos = self.pos
        if pos >= self.end:
            self._short(pos + 1)
        self.pos = pos + 1
        return self.data[pos]

    def _name(self, length: int) -> str:
        start = self._advance(length)
        try:
            return bytes(self.data[start : start + length]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CodecError(f"Thrift {self.protocol} message name is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None

    def _check_message_type(self, message_type: int) -> None:
        if message_type not in MESSAGE_TYPE_NAMES:
            raise CodecError(f"unknown Thrift message type {message_type} (expected 1 call, 2 reply, 3 exception or 4 oneway)")

    def read_string(self) -> bytes:
        length = self._length("string")
        start = self._advance(length)
        return bytes(self.data[start : start + length])

    def _container(self, count: int, types: tuple[int, ...]) -> _ContainerFrame | None:
        """The frame to walk a container of ``count`` elements of ``types`` ((element,) or
        (key, value)) with, or None when it was stepped over whole."""
        if count == 0:
            return None  # empty containers may carry any element type; nothing to read
        for element_type in types:
            if element_type not in self.ELEMENT_TYPES:
                raise CodecError(f"unknown Thrift {self.protocol} type id {element_type} in a container")
        sizes = [self.ELEMENT_SIZES.get(element_type) for element_type in types]
        if None not in sizes:
            self._advance(count * sum(sizes))
            return None
        if self._skip_elements(count, types):
            return None
        cap = self.limits.container_size
        if count > cap:
            raise CodecError(
                f"Thrift {self.protocol} container of {count} elements to walk one by one is over the codec option "
                f"max_container_size ({cap}); raise it if such messages are expected"
            )
        self._require(count * len(types))  # every element takes at least one byte
        return _ContainerFrame(count, types)

    def walk(self, walk: Walk) -> None:
        """Advance ``walk`` to the end of the message struct (``walk.pos`` is then its end).

        Every field and every element stepped over one at a time spends one unit of
        ``walk.budget``; raises CodecError when it runs out or nesting goes too deep."""
        stack = walk.stack
        self.pos = committed = walk.pos
        budget = walk.budget
        max_depth = self.limits.nesting_depth
        root = stack[0] if stack else None
        field_header, value_step = self.field_header, self.value_step
        try:
            while stack:
                frame = stack[-1]
                if frame.__class__ is _StructFrame:
                    field_type, field_id = field_header(frame.last_field_id)
                    if field_type == _STOP:
                        stack.pop()
                        committed = self.pos
                        continue
                    if frame is root and walk.capture and self._capture(walk, field_type, field_id):
                        child = None
                    elif field_type == _STRUCT:
                        child = _StructFrame()
                    else:
                        child = value_step(field_type, False)
                    # The step is complete: commit it.
                    frame.last_field_id = field_id
                    if frame is root and walk.first_field_id is None:
                        walk.first_field_id = field_id
                else:
                    if frame.remaining == 0:
                        stack.pop()
                        continue
                    element_type = frame.types[frame.index]
                    # Structs are the usual walked element: pushed without a call.
                    child = _StructFrame() if element_type == _STRUCT else value_step(element_type, True)
                    if frame.index == frame.last:
                        frame.index = 0
                        frame.remaining -= 1
                    else:
                        frame.index += 1
                budget -= 1
                if budget < 0:
                    raise self._over_elements()
                if child is not None:
                    if len(stack) >= max_depth:
                        raise CodecError(
                            f"Thrift value nested deeper than {max_depth} levels (codec option max_nesting_depth); "
                            "raise it if such messages are expected"
                        )
                    if child.__class__ is _ContainerFrame and child.remaining * len(child.types) > budget:
                        raise self._over_elements()  # known from the container's header: no need to walk it
                    stack.append(child)
                committed = self.pos
                walk.budget = budget
        finally:
            walk.pos = committed  # the last step boundary, also when the bytes ran out mid-step

    def _over_elements(self) -> CodecError:
        return CodecError(
            f"Thrift {self.protocol} message has more than {self.limits.elements} fields and container elements to walk "
            "one by one (codec option max_elements); raise it if such messages are expected"
        )

    def peek_fields(self, walk: Walk) -> None:
        """Read what the metadata needs from the start of the message struct without walking it:
        the first field's id (a REPLY's outcome) and, with ``walk.capture``, the
        TApplicationException's message and type when they come first, as Thrift libraries write
        them. At most two field headers and their string or i32 values: constant work."""
        last_field_id = 0
        for _ in range(2 if walk.capture else 1):
            field_type, field_id = self.field_header(last_field_id)
            if field_type == _STOP:
                return
            if walk.first_field_id is None:
                walk.first_field_id = field_id
            if not (walk.capture and self._capture(walk, field_type, field_id)):
                return
            last_field_id = field_id

    def _capture(self, walk: Walk, field_type: int, field_id: int) -> bool:
        """Read a TApplicationException field of interest; False for any other field."""
        if field_id == APPLICATION_EXCEPTION_MESSAGE_FIELD and field_type == self.STRING_TYPE:
            walk.exception_message = self.read_string().decode("utf-8", errors="replace")
            return True
        if field_id == APPLICATION_EXCEPTION_TYPE_FIELD and field_type == self.I32_TYPE:
            walk.exception_type = self.read_i32()
            return True
        return False


# Bytes a value of each fixed-width binary type occupies.
_BINARY_FIXED = {
    BinaryType.BOOL: 1,
    BinaryType.BYTE: 1,
    BinaryType.DOUBLE: 8,
    BinaryType.I16: 2,
    BinaryType.I32: 4,
    BinaryType.I64: 8,
    BinaryType.UUID: 16,
}
_BINARY_TYPES = frozenset(_BINARY_FIXED) | {BinaryType.STRING, BinaryType.STRUCT, BinaryType.MAP, BinaryType.SET, BinaryType.LIST}


class BinaryReader(Reader):
    """TBinaryProtocol: big-endian fixed-width integers, i32-length strings and containers."""

    protocol = "binary"
    STRING_TYPE = BinaryType.STRING
    I32_TYPE = BinaryType.I32
    ELEMENT_TYPES = _BINARY_TYPES
    ELEMENT_SIZES = _BINARY_FIXED

    __slots__ = ("allow_non_strict",)

    def __init__(self, data: bytes | bytearray, pos: int, end: int, *, complete: bool, limits: Limits, allow_non_strict: bool = False) -> None:
        super().__init__(data, pos, end, complete=complete, limits=limits)
        self.allow_non_strict = allow_non_strict

    def i32(self) -> int:
        return _I32.unpack_from(self.data, self._advance(4))[0]

    def _length(self, what: str) -> int:
        length = self.i32()
        if length < 0:
            raise CodecError(f"Thrift binary {what} has a negative length ({length})")
        return length

    def message_begin(self) -> MessageHeader:
        first = self.i32()
        if first < 0:
            # Strict: 0x8001 0x00 <type>, then the name and the seqid.
            if first & BINARY_VERSION_MASK != BINARY_VERSION_1:
                raise CodecError(f"bad Thrift binary protocol version 0x{first & 0xFFFFFFFF:08x} (expected 0x8001000<type>)")
            message_type = first & 0xFF
            self._check_message_type(message_type)
            name = self._name(self._length("message name"))
            strict = True
        else:
            # Old non-strict encoding: the name's length, the name, a type byte, the seqid.
            if not self.allow_non_strict:
                raise CodecError(
                    "Thrift binary message without a version header (the old non-strict encoding, or not Thrift at all); "
                    "set the codec option protocol: binary to accept non-strict messages"
                )
            name = self._name(first)
            message_type = self.u8()
            self._check_message_type(message_type)
            strict = False
        return MessageHeader(name, message_type, self.i32(), strict)

    def field_header(self, last_field_id: int) -> tuple[int, int]:
        pos = self.pos  # u8 and _advance inlined: this runs once per field
        if pos >= self.end:
            self._short(pos + 1)
        field_type = self.data[pos]
        if field_type == _STOP:
            self.pos = pos + 1
            return _STOP, 0
        if pos + 3 > self.end:
            self._short(pos + 3)
        self.pos = pos + 3
        return field_type, _I16.unpack_from(self.data, pos + 1)[0]

    def value_step(self, value_type: int, in_container: bool) -> _StructFrame | _ContainerFrame | None:
        size = _BINARY_FIXED.get(value_type)
        if size is not None:
            self._advance(size)
        elif value_type == BinaryType.STRING:
            self._advance(self._length("string"))
        elif value_type == BinaryType.STRUCT:
            return _StructFrame()
        elif value_type in (BinaryType.LIST, BinaryType.SET):
            element_type = self.u8()
            return self._container(self._length("list/set"), (element_type,))
        elif value_type == BinaryType.MAP:
            key_type = self.u8()
            item_type = self.u8()
            return self._container(self._length("map"), (key_type, item_type))
        else:
            raise CodecError(f"unknown Thrift binary type id {value_type}")
        return None

    def read_i32(self) -> int:
        return self.i32()


# Compact: bytes a fixed-width value occupies as a struct field (booleans live in the field
# header) and as a container element (booleans are one byte there).
_COMPACT_FIELD_FIXED = {
    CompactType.BOOLEAN_TRUE: 0,
    CompactType.BOOLEAN_FALSE: 0,
    CompactType.BYTE: 1,
    CompactType.DOUBLE: 8,
    CompactType.UUID: 16,
}
_COMPACT_ELEMENT_FIXED = {**_COMPACT_FIELD_FIXED, CompactType.BOOLEAN_TRUE: 1, CompactType.BOOLEAN_FALSE: 1}
# Varint-encoded integers and the most bytes each may take (i16 is read as a varint32).
_COMPACT_VARINT = {CompactType.I16: 5, CompactType.I32: 5, CompactType.I64: 10}
_COMPACT_TYPES = frozenset(range(CompactType.BOOLEAN_TRUE, CompactType.UUID + 1))
_CONTINUATION_BYTES = bytes(range(0x80, 0x100))  # a varint byte with more to follow
_OVERLONG_VARINT = {size: re.compile(b"[\\x80-\\xff]{%d}" % size) for size in set(_COMPACT_VARINT.values())}


def _zigzag(value: int) -> int:
    return (value >> 1) ^ -(value & 1)


class CompactReader(Reader):
    """TCompactProtocol: zigzag varints, field-id deltas, booleans folded into field headers."""

    protocol = "compact"
    STRING_TYPE = CompactType.BINARY
    I32_TYPE = CompactType.I32
    ELEMENT_TYPES = _COMPACT_TYPES
    ELEMENT_SIZES = _COMPACT_ELEMENT_FIXED

    __slots__ = ()

    def varint(self, max_bytes: int) -> int:
        data, pos, end = self.data, self.pos, self.end
        result = shift = 0
        for _ in range(max_bytes):
            if pos >= end:
                self._short(pos + 1)
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                self.pos = pos
                return result
            shift += 7
        raise CodecError(f"Thrift compact varint longer than {max_bytes} bytes")

    def _skip_varints(self, count: int, max_bytes: int) -> None:
        """Step over ``count`` varints at C speed: each ends at a byte below 0x80, so count those
        in windows as long as the number of varints still to find."""
        data, start, end = self.data, self.pos, self.end
        pos, remaining = start, count
        while remaining:
            stop = pos + remaining
            if stop > end:
                found = len(data[pos:end].translate(None, _CONTINUATION_BYTES))
                self._check_varint_lengths(start, end, max_bytes)
                self._short(end + remaining - found)
            remaining -= len(data[pos:stop].translate(None, _CONTINUATION_BYTES))
            pos = stop
        # remaining reached 0 in a window made only of final bytes: pos is just past the last.
        self._check_varint_lengths(start, pos, max_bytes)
        self.pos = pos

    def _check_varint_lengths(self, start: int, stop: int, max_bytes: int) -> None:
        if _OVERLONG_VARINT[max_bytes].search(self.data, start, stop):
            raise CodecError(f"Thrift compact varint longer than {max_bytes} bytes")

    def _length(self, what: str) -> int:
        length = self.varint(5)
        if length > _MAX_LENGTH:
            raise CodecError(f"Thrift compact {what} length {length} does not fit an i32 (negative on the wire)")
        return length

    def message_begin(self) -> MessageHeader:
        protocol_id = self.u8()
        if protocol_id != COMPACT_PROTOCOL_ID:
            raise CodecError(f"bad Thrift compact protocol id 0x{protocol_id:02x} (expected 0x82)")
        version_and_type = self.u8()
        version = version_and_type & COMPACT_VERSION_MASK
        if version != COMPACT_VERSION:
            raise CodecError(f"unsupported Thrift compact protocol version {version} (expected {COMPACT_VERSION})")
        message_type = version_and_type >> COMPACT_TYPE_SHIFT
        self._check_message_type(message_type)
        seqid = self.varint(5) & 0xFFFFFFFF  # an i32 sent as an unsigned varint, not zigzag
        if seqid > 0x7FFFFFFF:
            seqid -= 1 << 32
        name = self._name(self._length("message name"))
        return MessageHeader(name, message_type, seqid, True)

    def field_header(self, last_field_id: int) -> tuple[int, int]:
        pos = self.pos  # u8 inlined: this runs once per field
        if pos >= self.end:
            self._short(pos + 1)
        byte = self.data[pos]
        self.pos = pos + 1
        field_type = byte & 0x0F
        if field_type == _STOP:
            return _STOP, 0
        delta = byte >> 4
        if delta:
            return field_type, last_field_id + delta
        field_id = _zigzag(self.varint(5))
        if not -0x8000 <= field_id <= 0x7FFF:
            raise CodecError(f"Thrift compact field id {field_id} does not fit an i16")
        return field_type, field_id

    def value_step(self, value_type: int, in_container: bool) -> _StructFrame | _ContainerFrame | None:
        size = (_COMPACT_ELEMENT_FIXED if in_container else _COMPACT_FIELD_FIXED).get(value_type)
        if size is not None:
            self._advance(size)
            return None
        max_bytes = _COMPACT_VARINT.get(value_type)
        if max_bytes is not None:
            self.varint(max_bytes)
        elif value_type == CompactType.BINARY:
            self._advance(self._length("string"))
        elif value_type == CompactType.STRUCT:
            return _StructFrame()
        elif value_type in (CompactType.LIST, CompactType.SET):
            size_and_type = self.u8()
            count = size_and_type >> 4
            if count == 15:  # 15 or more elements: the count follows as a varint
                count = self._length("list/set")
            return self._container(count, (size_and_type & 0x0F,))
        elif value_type == CompactType.MAP:
            count = self._length("map")
            if count:  # an empty map has no key/value type byte
                key_and_value = self.u8()
                return self._container(count, (key_and_value >> 4, key_and_value & 0x0F))
        else:
            raise CodecError(f"unknown Thrift compact type id {value_type}")
        return None

    def _skip_elements(self, count: int, types: tuple[int, ...]) -> bool:
        if not all(t in _COMPACT_VARINT for t in types):
            return False
        self._skip_varints(count * len(types), max(_COMPACT_VARINT[t] for t in types))
        return True

    def read_i32(self) -> int:
        value = _zigzag(self.varint(5))
        if not -0x80000000 <= value <= 0x7FFFFFFF:
            raise CodecError(f"Thrift compact i32 value {value} out of range")
        return value
