"""Hessian 2.0 serialization, as much as a Dubbo proxy needs.

``Reader`` walks a Hessian2 byte string in place: it skips any value (nested lists, maps, typed
objects with class definitions, back-references, chunked strings and binaries) without building
Python objects, and reads the few things routing needs: strings, ints and maps whose string
entries become headers. ``encode_*`` write strings, ints, null and string maps; ``encode_value``
writes the general values that error replies and tests need.

Strings follow Java's Hessian: the length counts UTF-16 code units and the bytes are UTF-8 with
characters outside the BMP written as two 3-byte surrogate halves (CESU-8). A real 4-byte UTF-8
sequence, which some non-Java encoders emit, is read as the two UTF-16 units it stands for.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class HessianError(ValueError):
    """The bytes are not a well-formed Hessian2 value (or end too early)."""


class HessianLimitError(HessianError):
    """Stepping over the bytes would take more work than the Reader's caps allow."""


_I16 = struct.Struct(">h")
_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_F64 = struct.Struct(">d")

_TAG_LIST_END = 0x5A  # 'Z': ends maps and variable-length lists
_UNTIL_END = -1  # skip-stack marker: values continue until a 'Z'
_STRING_CHUNK_UNITS = 0x8000  # what Java's Hessian2Output uses for long strings
_BINARY_CHUNK_BYTES = 0x8000

# Tags whose value has a fixed number of bytes after the tag (scalars); None = needs a closer look.
_FIXED_SIZE: list[int | None] = [None] * 256
for _tag in range(0x80, 0xC0):
    _FIXED_SIZE[_tag] = 0  # int, one octet
for _tag in range(0xC0, 0xD0):
    _FIXED_SIZE[_tag] = 1  # int, two octets
for _tag in range(0xD0, 0xD8):
    _FIXED_SIZE[_tag] = 2  # int, three octets
for _tag in range(0xD8, 0xF0):
    _FIXED_SIZE[_tag] = 0  # long, one octet
for _tag in range(0xF0, 0x100):
    _FIXED_SIZE[_tag] = 1  # long, two octets
for _tag in range(0x38, 0x40):
    _FIXED_SIZE[_tag] = 2  # long, three octets
for _tag, _size in {
    0x4E: 0,  # N null
    0x54: 0,  # T true
    0x46: 0,  # F false
    0x49: 4,  # I int
    0x59: 4,  # long as int32
    0x4C: 8,  # L long
    0x44: 8,  # D double
    0x5B: 0,  # double 0.0
    0x5C: 0,  # double 1.0
    0x5D: 1,  # double as byte
    0x5E: 2,  # double as short
    0x5F: 4,  # double as int32 milli-units (hessian-lite) / float32 (spec)
    0x4A: 8,  # date, milliseconds
    0x4B: 4,  # date, minutes
}.items():
    _FIXED_SIZE[_tag] = _size
del _tag, _size

_STRING_TAGS = frozenset([*range(0x00, 0x20), 0x30, 0x31, 0x32, 0x33, 0x52, 0x53])


def _plain_string(data: bytes, pos: int, end: int) -> tuple[int, int] | None:
    """The byte span of the text of the string at ``pos`` when it is unchunked ASCII in its short
    (up to 31 units) or medium (up to 1023, e.g. most service names) form: there its byte length
    is its unit count. None for anything else, which the general code then handles."""
    tag = data[pos]
    if tag < 0x20:
        start = pos + 1
        stop = start + tag
    elif 0x30 <= tag <= 0x33 and pos + 1 < end:
        start = pos + 2
        stop = start + (((tag - 0x30) << 8) | data[pos + 1])
    else:
        return None
    if stop <= end and data[start:stop].isascii():
        return start, stop
    return None


def skip_plain_strings(data: bytes, pos: int, count: int, budget: int) -> tuple[int, int]:
    """Step over up to ``count`` values from ``pos`` (and no more than ``budget``) while each is a
    plain string (see _plain_string): where it stopped and how many it stepped over. Dubbo's
    arguments are mostly such strings, and this needs no Reader (a Reader can go on from there,
    ``spent`` the values stepped over)."""
    end = len(data)
    skipped = 0
    while skipped < count and skipped < budget and pos < end:
        span = _plain_string(data, pos, end)
        if span is None:
            break
        pos = span[1]
        skipped += 1
    return pos, skipped


def _is_int_tag(tag: int) -> bool:
    return tag >= 0x80 or tag in (0x49, 0x4C, 0x59) or 0x38 <= tag <= 0x3F


class Reader:
    """A cursor over one Hessian2 stream (for Dubbo: one message body).

    ``pos`` is the offset of the next value. Class definitions are remembered across values,
    as they are within one Dubbo message. Methods raise HessianError for malformed or truncated
    input and nothing else.

    Caps (None: none): ``max_elements`` values stepped over or read as map entries in all (each
    nested value counts; the few strings read with ``read_string`` do not), and
    ``max_depth`` lists, maps and objects open at once. Going over raises HessianLimitError.
    """

    __slots__ = ("data", "pos", "end", "_class_fields", "budget", "max_elements", "max_depth")

    def __init__(self, data: bytes, pos: int = 0, max_elements: int | None = None, max_depth: int | None = None, spent: int = 0) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data)
        self._class_fields: list[int] = []
        self.max_elements = max_elements
        # Values still allowed (caps are positive); ``spent``: already stepped over before ``pos``.
        self.budget = (max_elements or sys.maxsize) - spent
        self.max_depth = max_depth or sys.maxsize

    def _over_elements(self) -> HessianLimitError:
        return HessianLimitError(f"more than {self.max_elements} Hessian2 values to step over (codec option max_elements)")

    def at_end(self) -> bool:
        return self.pos >= self.end

    def peek(self) -> int:
        if self.pos >= self.end:
            raise HessianError(f"Hessian2 data ends at offset {self.pos} where a value was expected")
        return self.data[self.pos]

    # -- reading -----------------------------------------------------------------------------

    def read_int(self) -> int:
        """An int or long in any of its encodings."""
        try:
            return self._read_int()
        except (IndexError, struct.error):
            raise HessianError(f"Hessian2 integer truncated at offset {self.pos}") from None

    def _read_int(self) -> int:
        data = self.data
        pos = self.pos
        tag = data[pos]
        if 0x80 <= tag <= 0xBF:
            self.pos = pos + 1
            return tag - 0x90
        if 0xC0 <= tag <= 0xCF:
            value = ((tag - 0xC8) << 8) | data[pos + 1]
            size = 2
        elif 0xD0 <= tag <= 0xD7:
            value = ((tag - 0xD4) << 16) | (data[pos + 1] << 8) | data[pos + 2]
            size = 3
        elif 0xD8 <= tag <= 0xEF:
            value, size = tag - 0xE0, 1
        elif 0xF0 <= tag <= 0xFF:
            value = ((tag - 0xF8) << 8) | data[pos + 1]
            size = 2
        elif 0x38 <= tag <= 0x3F:
            value = ((tag - 0x3C) << 16) | (data[pos + 1] << 8) | data[pos + 2]
            size = 3
        elif tag == 0x49 or tag == 0x59:
            value, size = _I32.unpack_from(data, pos + 1)[0], 5
        elif tag == 0x4C:
            value, size = _I64.unpack_from(data, pos + 1)[0], 9
        else:
            raise HessianError(f"expected a Hessian2 integer at offset {pos}, found tag 0x{tag:02x}")
        if pos + size > self.end:
            raise IndexError
        self.pos = pos + size
        return value

    def read_string(self) -> str:
        """A string; anything else (null included) is an error."""
        pos = self.pos
        if pos < self.end and self.data[pos] in _STRING_TAGS:
            return self._read_string()
        tag = self.peek()
        raise HessianError(f"expected a Hessian2 string at offset {pos}, found tag 0x{tag:02x}")

    def read_string_or_null(self) -> str | None:
        pos = self.pos
        if pos < self.end and self.data[pos] == 0x4E:
            self.pos = pos + 1
            return None
        return self.read_string()

    def _read_string(self) -> str:
        start = self.pos
        data = self.data
        span = _plain_string(data, start, self.end)
        if span is not None:
            self.pos = span[1]
            return data[span[0] : span[1]].decode("ascii")
        spans = self._string_spans()
        if len(spans) == 1:
            raw = self.data[spans[0][0] : spans[0][1]]
        else:
            raw = b"".join(self.data[a:b] for a, b in spans)
        try:
            return _decode_utf8(raw)
        except UnicodeDecodeError as exc:
            raise HessianError(f"Hessian2 string at offset {start} is not valid UTF-8: {exc.reason}") from None

    def _string_spans(self) -> list[tuple[int, int]]:
        """Consume a (possibly chunked) string; return the byte spans of its chunks."""
        data, end = self.data, self.end
        spans = []
        pos = self.pos
        while True:
            if pos >= end:
                raise HessianError(f"Hessian2 string truncated at offset {pos}")
            tag = data[pos]
            if tag <= 0x1F:
                units, pos, final = tag, pos + 1, True
            elif 0x30 <= tag <= 0x33:
                if pos + 2 > end:
                    raise HessianError(f"Hessian2 string truncated at offset {pos}")
                units, pos, final = ((tag - 0x30) << 8) | data[pos + 1], pos + 2, True
            elif tag == 0x52 or tag == 0x53:  # 'R' chunk, 'S' final chunk
                if pos + 3 > end:
                    raise HessianError(f"Hessian2 string truncated at offset {pos}")
                units, pos, final = _U16.unpack_from(data, pos + 1)[0], pos + 3, tag == 0x53
            else:
                raise HessianError(f"expected a Hessian2 string chunk at offset {pos}, found tag 0x{tag:02x}")
            chunk_end = self._skip_utf8_units(pos, units)
            spans.append((pos, chunk_end))
            pos = chunk_end
            if final:
                self.pos = pos
                return spans

    def _skip_utf8_units(self, pos: int, units: int) -> int:
        """The offset after ``units`` UTF-16 code units of UTF-8 text starting at ``pos``."""
        data, end = self.data, self.end
        ascii_end = pos + units
        if ascii_end <= end and data[pos:ascii_end].isascii():
            return ascii_end
        while units > 0:
            if pos >= end:
                raise HessianError(f"Hessian2 string truncated at offset {pos}")
            lead = data[pos]
            if lead < 0x80:
                pos += 1
            elif lead < 0xC0:
                raise HessianError(f"invalid UTF-8 lead byte 0x{lead:02x} in a Hessian2 string at offset {pos}")
            elif lead < 0xE0:
                pos += 2
            elif lead < 0xF0:
                pos += 3
            elif lead < 0xF8:
                pos += 4
                units -= 1  # one 4-byte sequence is a surrogate pair: two UTF-16 units
            else:
                raise HessianError(f"invalid UTF-8 lead byte 0x{lead:02x} in a Hessian2 string at offset {pos}")
            units -= 1
        if pos > end:
            raise HessianError(f"Hessian2 string truncated at offset {end}")
        return pos

    def read_map_entries(self, max_entries: int | None = None) -> list[tuple[str | None, str | None, int, int, int]]:
        """Read a map (untyped 'H', typed 'M', or null) and return its entries in order; more
        than ``max_entries`` of them raise HessianLimitError.

        Each entry is ``(key, value, key_start, value_start, value_end)``: key and value are the
        strings they hold, or None when they are not strings (those values are skipped, not
        built). Offsets, relative to the map's first byte, let a caller rewrite entries in place
        (also in another body holding the same map bytes elsewhere).
        """
        origin = self.pos
        tag = self.peek()
        if tag == 0x4E:
            self.pos += 1
            return []
        if tag == 0x48:
            self.pos += 1
        elif tag == 0x4D:
            self.pos += 1
            try:
                self._skip_type()
            except (IndexError, struct.error):
                raise HessianError(f"Hessian2 map type truncated at offset {self.pos}") from None
        else:
            raise HessianError(f"expected a Hessian2 map at offset {self.pos}, found tag 0x{tag:02x}")
        entries = []
        data, end = self.data, self.end
        room = sys.maxsize if max_entries is None else max_entries
        while True:
            key_start = self.pos
            if key_start >= end:
                self.peek()  # raises: truncated
            tag = data[key_start]
            if tag == _TAG_LIST_END:
                break
            if len(entries) == room:
                raise HessianLimitError(f"more than {max_entries} attachments (codec option max_attachments)")
            if tag in _STRING_TAGS:
                self._spend()
                key = self._read_string()
            else:
                key = self._skip_value()
            value_start = self.pos
            if value_start < end and data[value_start] in _STRING_TAGS:
                self._spend()
                value = self._read_string()
            else:
                value = self._skip_value()
            entries.append((key, value, key_start - origin, value_start - origin, self.pos - origin))
        self.pos += 1
        return entries

    def _skip_value(self) -> None:
        self.skip()
        return None

    def _spend(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise self._over_elements()

    # -- skipping ----------------------------------------------------------------------------

    def skip(self) -> None:
        """Step over one whole value, however deeply nested, without building it.

        Iterative (an explicit stack of 'values left' counters), so hostile nesting cannot hit
        Python's recursion limit; each value stepped over spends one unit of ``budget``, so the
        work is bounded by ``max_elements`` (and by the input size: every value is a byte at least).
        """
        if self.pos < self.end:  # a short or medium ASCII string, the usual argument: no stack needed
            span = _plain_string(self.data, self.pos, self.end)
            if span is not None:
                self.budget -= 1  # _spend, inlined on the hot path
                if self.budget < 0:
                    raise self._over_elements()
                self.pos = span[1]
                return
        try:
            self._skip()
        except (IndexError, struct.error):
            raise HessianError(f"Hessian2 value truncated at offset {min(self.pos, self.end)}") from None
        if self.pos > self.end:
            raise HessianError(f"Hessian2 value truncated at offset {self.end}")

    def _skip(self) -> None:
        fixed = _FIXED_SIZE
        data, end = self.data, self.end
        pos = self.pos
        stack = [1]
        budget = self.budget
        max_depth = self.max_depth
        try:
            while stack:
                left = stack[-1]
                if left == _UNTIL_END:
                    if data[pos] == _TAG_LIST_END:
                        pos += 1
                        stack.pop()
                        continue
                elif left == 0:
                    stack.pop()
                    continue
                else:
                    stack[-1] = left - 1
                budget -= 1
                if budget < 0:
                    raise self._over_elements()
                tag = data[pos]
                size = fixed[tag]
                if size is not None:
                    pos += 1 + size
                    continue
                span = _plain_string(data, pos, end)  # the most common value
                if span is not None:
                    pos = span[1]
                    continue
                self.pos = pos
                children = self._skip_compound(tag)
                pos = self.pos
                if children:
                    if len(stack) > max_depth:
                        raise HessianLimitError(f"Hessian2 value nested deeper than {max_depth} levels at offset {pos} (codec option max_nesting_depth)")
                    if children > budget:  # a list or object announcing more values than may follow
                        raise self._over_elements()
                    stack.append(children)
        finally:
            self.pos = max(pos, self.pos)
            self.budget = budget

    def _skip_compound(self, tag: int) -> int:
        """Skip a value whose size depends on its content. Returns how many child values follow
        (``_UNTIL_END`` for 'Z'-terminated ones, 0 when the value is complete)."""
        data = self.data
        while tag == 0x43:  # 'C' class definition: name, field count, field names; a value follows
            self.pos += 1
            self._string_spans()
            count = self._read_int()
            if count < 0:
                raise HessianError(f"Hessian2 class definition with {count} fields at offset {self.pos}")
            for _ in range(count):
                self._string_spans()
            self._class_fields.append(count)
            tag = data[self.pos]
            size = _FIXED_SIZE[tag]
            if size is not None:
                self.pos += 1 + size
                return 0
        if tag in _STRING_TAGS:
            self._string_spans()
            return 0
        if 0x20 <= tag <= 0x2F or 0x34 <= tag <= 0x37 or tag == 0x41 or tag == 0x42:
            self._skip_binary()
            return 0
        if 0x60 <= tag <= 0x6F:  # object, class given by the tag
            self.pos += 1
            return self._fields_of(tag - 0x60)
        if 0x70 <= tag <= 0x77:  # typed list, length in the tag
            self.pos += 1
            self._skip_type()
            return tag - 0x70
        if 0x78 <= tag <= 0x7F:  # untyped list, length in the tag
            self.pos += 1
            return tag - 0x78
        self.pos += 1
        if tag == 0x48 or tag == 0x57:  # 'H' untyped map, 'W' variable untyped list
            return _UNTIL_END
        if tag == 0x4D or tag == 0x55:  # 'M' typed map, 'U' variable typed list
            self._skip_type()
            return _UNTIL_END
        if tag == 0x56:  # 'V' fixed typed list
            self._skip_type()
            return self._length()
        if tag == 0x58:  # 'X' fixed untyped list
            return self._length()
        if tag == 0x4F:  # 'O' object, class by number
            return self._fields_of(self._read_int())
        if tag == 0x51:  # 'Q' back-reference to an earlier list/map/object
            self._read_int()
            return 0
        self.pos -= 1
        raise HessianError(f"unexpected Hessian2 tag 0x{tag:02x} at offset {self.pos}")

    def _length(self) -> int:
        length = self._read_int()
        if length < 0:
            raise HessianError(f"negative Hessian2 list length {length} at offset {self.pos}")
        return length

    def _fields_of(self, class_ref: int) -> int:
        if not 0 <= class_ref < len(self._class_fields):
            raise HessianError(f"Hessian2 object refers to undefined class #{class_ref} at offset {self.pos}")
        return self._class_fields[class_ref]

    def _skip_type(self) -> None:
        """A list/map type: a type name string, or an int referring to an earlier one."""
        tag = self.data[self.pos]
        if tag in _STRING_TAGS:
            self._string_spans()
        elif _is_int_tag(tag):
            self._read_int()
        else:
            raise HessianError(f"expected a Hessian2 type name at offset {self.pos}, found tag 0x{tag:02x}")

    def _skip_binary(self) -> None:
        data = self.data
        while True:
            tag = data[self.pos]
            if 0x20 <= tag <= 0x2F:
                length, header, final = tag - 0x20, 1, True
            elif 0x34 <= tag <= 0x37:
                length, header, final = ((tag - 0x34) << 8) | data[self.pos + 1], 2, True
            elif tag == 0x41 or tag == 0x42:  # 'A' chunk, 'B' final chunk
                length, header, final = _U16.unpack_from(data, self.pos + 1)[0], 3, tag == 0x42
            else:
                raise HessianError(f"expected a Hessian2 binary chunk at offset {self.pos}, found tag 0x{tag:02x}")
            self.pos += header + length
            if self.pos > self.end:
                raise IndexError
            if final:
                return


def _decode_utf8(raw: bytes) -> str:
    if raw.isascii():
        return raw.decode("ascii")
    text = raw.decode("utf-8", "surrogatepass")
    # Java writes a non-BMP character as two 3-byte surrogate halves: join them back up.
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


# -- writing -----------------------------------------------------------------------------------

NULL = b"N"


def encode_int(value: int) -> bytes:
    """A 32-bit int in its most compact Hessian2 form."""
    if -0x10 <= value <= 0x2F:
        return bytes((0x90 + value,))
    if -0x800 <= value <= 0x7FF:
        return bytes((0xC8 + (value >> 8), value & 0xFF))
    if -0x40000 <= value <= 0x3FFFF:
        return bytes((0xD4 + (value >> 16), (value >> 8) & 0xFF, value & 0xFF))
    if -0x80000000 <= value <= 0x7FFFFFFF:
        return b"I" + _I32.pack(value)
    raise ValueError(f"{value} does not fit a Hessian2 int; use encode_long")


def encode_long(value: int) -> bytes:
    if -0x08 <= value <= 0x0F:
        return bytes((0xE0 + value,))
    if -0x800 <= value <= 0x7FF:
        return bytes((0xF8 + (value >> 8), value & 0xFF))
    if -0x40000 <= value <= 0x3FFFF:
        return bytes((0x3C + (value >> 16), (value >> 8) & 0xFF, value & 0xFF))
    if -0x80000000 <= value <= 0x7FFFFFFF:
        return b"\x59" + _I32.pack(value)
    if -0x8000000000000000 <= value <= 0x7FFFFFFFFFFFFFFF:
        return b"L" + _I64.pack(value)
    raise ValueError(f"{value} does not fit a Java long")


def encode_string(text: str) -> bytes:
    """A string the way Java's Hessian2Output writes it (UTF-16 unit counts, CESU-8 bytes,
    chunks of 32768 units)."""
    if text.isascii():
        raw, units = text.encode("ascii"), len(text)
        if units <= _STRING_CHUNK_UNITS:
            return _string_chunk(raw, units, final=True)
        parts = [
            _string_chunk(raw[i : i + _STRING_CHUNK_UNITS], min(_STRING_CHUNK_UNITS, units - i), final=i + _STRING_CHUNK_UNITS >= units)
            for i in range(0, units, _STRING_CHUNK_UNITS)
        ]
        return b"".join(parts)
    # One Python str per UTF-16 unit, so lengths and chunk boundaries match Java's.
    halves = _utf16_units(text)
    parts = []
    for i in range(0, max(len(halves), 1), _STRING_CHUNK_UNITS):
        piece = halves[i : i + _STRING_CHUNK_UNITS]
        parts.append(_string_chunk(piece.encode("utf-8", "surrogatepass"), len(piece), final=i + _STRING_CHUNK_UNITS >= len(halves)))
    return b"".join(parts)


def _utf16_units(text: str) -> str:
    """``text`` with every non-BMP character split into its two surrogate halves."""
    if all(ord(ch) < 0x10000 for ch in text):
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if code < 0x10000:
            out.append(ch)
        else:
            code -= 0x10000
            out.append(chr(0xD800 + (code >> 10)))
            out.append(chr(0xDC00 + (code & 0x3FF)))
    return "".join(out)


def _string_chunk(raw: bytes, units: int, *, final: bool) -> bytes:
    if not final:
        return b"R" + _U16.pack(units) + raw
    if units <= 0x1F:
        return bytes((units,)) + raw
    if units <= 0x3FF:
        return bytes((0x30 + (units >> 8), units & 0xFF)) + raw
    return b"S" + _U16.pack(units) + raw


def encode_string_map(items: Iterable[tuple[str, str]]) -> bytes:
    """An untyped map of string keys to string values (Dubbo's attachments)."""
    return b"H" + b"".join(encode_string(k) + encode_string(v) for k, v in items) + b"Z"


# -- general values (error replies, tests, peers) -----------------------------------------------


@dataclass(frozen=True)
class Long:
    """A Java long (Python ints are written as Java ints when they fit)."""

    value: int


@dataclass(frozen=True)
class Double:
    value: float


@dataclass(frozen=True)
class Date:
    millis: int


@dataclass(frozen=True)
class TypedList:
    type: str
    items: tuple[Any, ...]
    variable_length: bool = False


@dataclass(frozen=True)
class TypedMap:
    type: str
    entries: tuple[tuple[Any, Any], ...]


@dataclass(frozen=True)
class JavaObject:
    """An instance of a Java class: written as a class definition (once) and an object."""

    class_name: str
    fields: tuple[tuple[str, Any], ...] = field(default=())


@dataclass(frozen=True)
class Ref:
    """A back-reference to the n-th list/map/object written earlier in the same stream."""

    index: int


class Writer:
    """Encodes general values into one Hessian2 stream (class definitions are shared)."""

    def __init__(self) -> None:
        self._classes: dict[tuple[str, tuple[str, ...]], int] = {}
        self._parts: list[bytes] = []

    def getvalue(self) -> bytes:
        return b"".join(self._parts)

    def write(self, value: Any) -> Writer:
        self._write(value)
        return self

    def _write(self, value: Any) -> None:
        out = self._parts.append
        if value is None:
            out(NULL)
        elif value is True:
            out(b"T")
        elif value is False:
            out(b"F")
        elif isinstance(value, int):
            out(encode_int(value) if -0x80000000 <= value <= 0x7FFFFFFF else encode_long(value))
        elif isinstance(value, Long):
            out(encode_long(value.value))
        elif isinstance(value, (float, Double)):
            out(_encode_double(value.value if isinstance(value, Double) else value))
        elif isinstance(value, str):
            out(encode_string(value))
        elif isinstance(value, (bytes, bytearray)):
            out(_encode_binary(bytes(value)))
        elif isinstance(value, Date):
            out(b"\x4a" + _I64.pack(value.millis))
        elif isinstance(value, Ref):
            out(b"\x51" + encode_int(value.index))
        elif isinstance(value, (list, tuple)):
            out(bytes((0x78 + len(value),)) if len(value) <= 7 else b"X" + encode_int(len(value)))
            for item in value:
                self._write(item)
        elif isinstance(value, TypedList):
            if value.variable_length:
                out(b"U" + encode_string(value.type))
            elif len(value.items) <= 7:
                out(bytes((0x70 + len(value.items),)) + encode_string(value.type))
            else:
                out(b"V" + encode_string(value.type) + encode_int(len(value.items)))
            for item in value.items:
                self._write(item)
            if value.variable_length:
                out(b"Z")
        elif isinstance(value, Mapping):
            out(b"H")
            for k, v in value.items():
                self._write(k)
                self._write(v)
            out(b"Z")
        elif isinstance(value, TypedMap):
            out(b"M" + encode_string(value.type))
            for k, v in value.entries:
                self._write(k)
                self._write(v)
            out(b"Z")
        elif isinstance(value, JavaObject):
            names = tuple(name for name, _ in value.fields)
            key = (value.class_name, names)
            ref = self._classes.get(key)
            if ref is None:
                ref = self._classes[key] = len(self._classes)
                out(b"C" + encode_string(value.class_name) + encode_int(len(names)) + b"".join(map(encode_string, names)))
            out(bytes((0x60 + ref,)) if ref <= 0x0F else b"O" + encode_int(ref))
            for _, item in value.fields:
                self._write(item)
        else:
            raise TypeError(f"cannot write {type(value).__name__} as Hessian2")


def encode_value(value: Any) -> bytes:
    return Writer().write(value).getvalue()


def _encode_double(value: float) -> bytes:
    if value == 0.0 and math.copysign(1.0, value) > 0:
        return b"\x5b"
    if value == 1.0:
        return b"\x5c"
    if value.is_integer() and -0x80 <= value < 0x80:
        return b"\x5d" + struct.pack(">b", int(value))
    if value.is_integer() and -0x8000 <= value < 0x8000:
        return b"\x5e" + _I16.pack(int(value))
    return b"D" + _F64.pack(value)


def _encode_binary(raw: bytes) -> bytes:
    if len(raw) <= 0x0F:
        return bytes((0x20 + len(raw),)) + raw
    if len(raw) <= 0x3FF:
        return bytes((0x34 + (len(raw) >> 8), len(raw) & 0xFF)) + raw
    parts = []
    for i in range(0, len(raw), _BINARY_CHUNK_BYTES):
        piece = raw[i : i + _BINARY_CHUNK_BYTES]
        final = i + _BINARY_CHUNK_BYTES >= len(raw)
        parts.append((b"B" if final else b"A") + _U16.pack(len(piece)) + piece)
    return b"".join(parts)
