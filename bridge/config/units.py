"""Durations and sizes in the config file: the one place their syntax is defined, parsed and,
when a value does not fit it, explained."""

from __future__ import annotations

import re

# \Z, not $: the schema checks patterns with re.search, where $ also matches before a final
# newline, so "5s\n" would pass the schema and then fail to parse. A size must not be 0.
DURATION = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)\Z"
SIZE = r"^0*[1-9][0-9]* ?(B|KiB|MiB|GiB)?\Z"

DURATION_FORMS = "a number and a unit (ms, s, m or h): 250ms, 5s, 1m, 1.5h"
SIZE_FORMS = "bytes, or a whole number with B, KiB, MiB or GiB: 65536, 64KiB, 4MiB"

_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_BYTES = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}

# Units people write for a duration, as the one this syntax has (and its factor to it).
_DURATION_ALIASES = {
    "msec": ("ms", 1), "msecs": ("ms", 1), "millis": ("ms", 1), "millisecond": ("ms", 1), "milliseconds": ("ms", 1),
    "sec": ("s", 1), "secs": ("s", 1), "second": ("s", 1), "seconds": ("s", 1),
    "min": ("m", 1), "mins": ("m", 1), "minute": ("m", 1), "minutes": ("m", 1),
    "hr": ("h", 1), "hrs": ("h", 1), "hour": ("h", 1), "hours": ("h", 1),
    "d": ("h", 24), "day": ("h", 24), "days": ("h", 24),
}
# Decimal (and bare) size units, as the binary unit of the same letter and the decimal factor.
_DECIMAL_SIZES = {"k": ("KiB", 10**3), "m": ("MiB", 10**6), "g": ("GiB", 10**9)}


def parse_duration(text: str) -> float:
    """'250ms' / '5s' / '2m' / '1h' -> seconds."""
    m = re.fullmatch(DURATION, text) if isinstance(text, str) else None
    if not m:
        raise ValueError(duration_problem(text))
    unit = m.group(2)
    return float(text[: -len(unit)]) * _SECONDS[unit]


def parse_size(value: int | str) -> int:
    """4194304 / '4194304' / '4MiB' / '512 KiB' -> bytes (at least 1)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    m = re.fullmatch(SIZE, value) if isinstance(value, str) else None
    if not m:
        raise ValueError(size_problem(value))
    unit = m.group(1)
    return int(value[: -len(unit)] if unit else value) * _BYTES[unit]


def _number(text: str) -> str:
    return text.rstrip("0").rstrip(".") if "." in text else text


def duration_problem(value: object) -> str:
    """Why ``value`` is not a duration, with what to write instead and the accepted forms."""
    return f"{value!r} is not a duration{_duration_hint(value)} (accepted: {DURATION_FORMS})"


def _duration_hint(value: object) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            return ": a duration cannot be negative"
        return f": it needs a unit, e.g. {_number(str(value))}s or {_number(str(value))}ms"
    if not isinstance(value, str):
        return ""
    text = value.strip()
    if text != value and re.fullmatch(DURATION, text):
        return f": remove the spaces or line breaks around it: {text}"
    m = re.fullmatch(r"(-?)([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)", text)
    if not m:
        return ""
    sign, number, unit = m.groups()
    if sign:
        return ": a duration cannot be negative"
    if not unit:
        return f": it needs a unit, e.g. {number}s or {number}ms"
    if unit in _SECONDS:
        return f": no space between the number and the unit: {number}{unit}"
    if unit.lower() in _SECONDS:
        return f": units are lower case: {number}{unit.lower()}"
    if unit.lower() in _DURATION_ALIASES:
        to, factor = _DURATION_ALIASES[unit.lower()]
        return f": use {_number(str(float(number) * factor))}{to}"
    return f": unknown unit {unit!r}"


def size_problem(value: object) -> str:
    """Why ``value`` is not a size, with what to write instead and the accepted forms."""
    return f"{value!r} is not a size{_size_hint(value)} (accepted: {SIZE_FORMS})"


def _size_hint(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return ""
    if isinstance(value, (int, float)):
        return ": it must be at least 1 byte" if value < 1 else ": it must be a whole number of bytes"
    text = value.strip()
    if text != value and re.fullmatch(SIZE, text):
        return f": remove the spaces or line breaks around it: {text}"
    m = re.fullmatch(r"(-?)([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)", text)
    if not m:
        return ": it needs a number, e.g. 4MiB" if text in _BYTES else ""
    sign, number, unit = m.groups()
    if sign or float(number) == 0:
        return ": it must be at least 1 byte"
    if "." in number:
        exact = float(number) * _BYTES[unit] if unit in _BYTES else None
        for smaller in ("GiB", "MiB", "KiB", "B"):
            if exact is not None and exact % _BYTES[smaller] == 0:
                return f": it must be a whole number; use {int(exact) // _BYTES[smaller]}{smaller}"
        return ": it must be a whole number"
    if unit in _BYTES:
        return f": one space at most between the number and the unit: {number}{unit}"
    binary = {u.lower(): u for u in _BYTES if u}
    if unit.lower() in binary:
        return f": units are written {binary[unit.lower()]}: {number}{binary[unit.lower()]}"
    decimal = _DECIMAL_SIZES.get(unit.lower()[:1]) if unit.lower() in ("k", "kb", "m", "mb", "g", "gb") else None
    if decimal is not None:
        binary_unit, factor = decimal
        return f": use {number}{binary_unit} or {int(number) * factor}"
    return f": unknown unit {unit!r}"
