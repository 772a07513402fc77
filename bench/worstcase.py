"""The worst valid message of a size for each built-in codec's decode, and what decoding it costs.

``python -m bench.worstcase [--max-frame-size 4MiB] [--repeat N] [--quick] [--uncapped]``

The bridge decodes on one event loop, so the time one ``decode`` call takes is time every other
connection waits. For each built-in codec (awesomerpc; Dubbo requests, responses and a response
mutation; Thrift binary and compact, framed and unframed) this builds messages of
``max_frame_size`` bytes shaped to make that call work hardest: many one-byte values where the
codec steps over values one at a time, padded with one long string (cheap to step over) up to
the size. Each shape stays within the codec's caps (``max_elements``, ``max_container_size``,
``max_nesting_depth``, read from a default instance), so it is a message the codec accepts as
configured; ``--uncapped`` builds them as if there were no caps, which shows what refusing them
costs. Every message is decoded in one call on a fresh codec, best of ``--repeat``; the table
gives the call's CPU time (steadier than wall time on a shared machine; the loop is stalled at
least that long) and the cost per MiB, and the worst shape of each codec is listed at the end.
"""

from __future__ import annotations

import argparse
import functools
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.wire import hessian_string
from metabridge.config.model import parse_size
from metabridge.registry import load_codec_class
from metabridge.sdk.codec import Codec, CodecError, DecodeStatus, Metadata

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
QUICK_FRAME_SIZE = 256 * 1024
_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class Caps:
    """What a shape may use: values walked per message, per container, containers open at once,
    attachments."""

    elements: int = _UNLIMITED
    container: int = _UNLIMITED
    depth: int = _UNLIMITED
    attachments: int = _UNLIMITED


def caps_of(codec: Codec) -> Caps:
    """The caps of a codec instance (none for a codec that has no such options)."""
    limits = getattr(codec, "limits", None)  # Thrift
    if limits is not None:
        return Caps(limits.elements, limits.container_size, limits.nesting_depth)
    if hasattr(codec, "max_elements"):  # Dubbo
        return Caps(codec.max_elements, depth=codec.max_nesting_depth, attachments=codec.max_attachments)
    return Caps()


def fit(size: int, build: Callable[[int], bytes]) -> bytes:
    """``build(pad)`` with the pad that makes it ``size`` bytes (or the largest under it: a
    length encoding that grows at a threshold can skip the exact size)."""
    pad, best = 0, b""
    for _ in range(16):
        data = build(pad)
        if len(data) == size:
            return data
        if len(best) < len(data) < size:
            best = data
        pad += size - len(data)
        if pad < 0:
            break
    if not best:
        raise ValueError(f"cannot build a message of {size} bytes: even the smallest is larger")
    return best


def shrink(room: int, count: int, build: Callable[[int], bytes]) -> bytes:
    """``build(n)`` for the largest ``n <= count`` whose bytes fit in ``room``."""
    while True:
        data = build(count)
        if len(data) <= room or count == 0:
            return data
        count = min(count - 1, count * room // len(data))  # units may be several bytes each


# -- awesomerpc ---------------------------------------------------------------------------------


def awesomerpc_frame(size: int, caps: Caps) -> bytes:
    body = b"x" * (size - 13)
    return struct.pack("!BIIhh", 1, 1, size, 1, 0) + body


# -- Dubbo / Hessian2 ---------------------------------------------------------------------------

_DUBBO_PREFIX = b"".join(hessian_string(s) for s in ("2.0.2", "com.example.Bench", "1.0.0", "m"))


def dubbo_request(arguments: list[bytes], attachments: bytes = b"HZ") -> bytes:
    descriptor = "Ljava/lang/Object;" * len(arguments)
    body = _DUBBO_PREFIX + hessian_string(descriptor) + b"".join(arguments) + attachments
    return struct.pack(">HBBqi", 0xDABB, 0xC2, 0, 1, len(body)) + body


def dubbo_response(value: bytes) -> bytes:
    body = b"\x94" + value + b"HZ"  # RESPONSE_VALUE_WITH_ATTACHMENTS, an empty map
    return struct.pack(">HBBqi", 0xDABB, 0x02, 20, 1, len(body)) + body


def _hessian_list(items: bytes, count: int) -> bytes:
    return b"X" + b"I" + struct.pack(">i", count) + items


def _values(size: int, caps: Caps, spare: int) -> int:
    """How many one-byte values fit the size and the value cap, keeping ``spare`` of the cap for
    the other values of the message."""
    return max(0, min(size, caps.elements - spare))


_DUBBO_ROOM = 128  # bytes kept for the header, the body's strings and the padding's tag


def dubbo_values(unit: bytes, prologue: bytes = b"") -> Callable[[int, Caps], bytes]:
    """A request with one list of ``unit`` values (after ``prologue``, e.g. a class definition),
    and a string argument padding it to the size."""

    def build(size: int, caps: Caps) -> bytes:
        def values(count: int) -> bytes:
            return _hessian_list(prologue + unit * count, count + (1 if prologue else 0))

        # The list, the padding string and the prologue's value are values too.
        items = shrink(size - _DUBBO_ROOM, _values(size, caps, spare=3), values)
        return fit(size, lambda pad: dubbo_request([hessian_string("p" * pad), items]))

    return build


def dubbo_attachments(size: int, caps: Caps) -> bytes:
    """As many attachments as fit (distinct short keys, empty values): each is two values, and a
    routing header."""

    def entries(count: int) -> bytes:
        return b"H" + b"".join(hessian_string(f"{i:x}") + b"\x00" for i in range(count)) + b"Z"

    attachments = shrink(size - _DUBBO_ROOM, min(_values(size, caps, spare=2) // 2, caps.attachments), entries)
    return fit(size, lambda pad: dubbo_request([hessian_string("p" * pad)], attachments))


def dubbo_one_string(size: int, caps: Caps) -> bytes:
    return fit(size, lambda pad: dubbo_request([hessian_string("p" * pad)]))


def dubbo_response_nulls(size: int, caps: Caps) -> bytes:
    nulls = shrink(size - _DUBBO_ROOM, _values(size, caps, spare=2), lambda count: b"N" * count)
    return fit(size, lambda pad: dubbo_response(_hessian_list(nulls + hessian_string("p" * pad), len(nulls) + 1)))


# -- Thrift -------------------------------------------------------------------------------------


_THRIFT_ROOM = 64  # bytes kept for the message header and the padding field's header


class ThriftWriter:
    """The few encodings the shapes need, in one protocol."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        compact = protocol == "compact"
        self.STRUCT, self.LIST, self.STRING = (12, 9, 8) if compact else (12, 15, 11)
        self.compact = compact

    @staticmethod
    def varint(value: int) -> bytes:
        out = bytearray()
        while value > 0x7F:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
        return bytes(out)

    def message(self, fields: bytes) -> bytes:
        """A CALL ``m``, seqid 1, whose argument struct holds ``fields``."""
        if self.compact:
            return b"\x82\x21\x01\x01m" + fields + b"\x00"
        return bytes.fromhex("80010001 00000001") + b"m" + struct.pack(">i", 1) + fields + b"\x00"

    def field(self, field_type: int, field_id: int) -> bytes:
        """A field header; ids go up by one, which compact writes as a one-byte delta."""
        return bytes([0x10 | field_type]) if self.compact else bytes([field_type]) + struct.pack(">h", field_id)

    def list_header(self, element_type: int, count: int) -> bytes:
        if self.compact:
            return bytes([(count << 4) | element_type]) if count < 15 else bytes([0xF0 | element_type]) + self.varint(count)
        return bytes([element_type]) + struct.pack(">i", count)

    def string(self, size: int) -> bytes:
        return (self.varint(size) if self.compact else struct.pack(">i", size)) + b"p" * size

    def empty_string(self) -> bytes:
        return b"\x00" if self.compact else bytes(4)


def thrift_lists(element: Callable[[ThriftWriter], tuple[int, bytes]]) -> Callable[[ThriftWriter, int, Caps], bytes]:
    """Lists of one-step elements (as many lists as the container cap makes it take), then a
    string field padding the message to the size."""

    def build(writer: ThriftWriter, size: int, caps: Caps) -> bytes:
        element_type, unit = element(writer)

        def lists(steps: int) -> bytes:
            fields, field_id = [], 0
            while steps > 1:
                count = min(caps.container, steps - 1)  # the list's own field is a step too
                field_id += 1
                fields.append(writer.field(writer.LIST, field_id) + writer.list_header(element_type, count) + unit * count)
                steps -= count + 1
            return b"".join(fields)

        body = shrink(size - _THRIFT_ROOM, _values(size // len(unit), caps, spare=1), lists)  # the padding field is one step
        return fit(size, lambda pad: writer.message(body + writer.field(writer.STRING, 0x7FFF) + writer.string(pad)))

    return build


def thrift_nested(writer: ThriftWriter, size: int, caps: Caps) -> bytes:
    """Chains of struct fields nested as deep as the cap allows, one after another."""
    # The argument struct is the first level; 64 is Apache Thrift's limit, and was the codec's
    # fixed one before it became an option.
    depth = min(caps.depth, 64) - 1
    inner = writer.field(writer.STRUCT, 1) * (depth - 1) + b"\x00" * depth  # field 1 inside field 1 ...
    chains = min((size - _THRIFT_ROOM) // (len(inner) + 3), (caps.elements - 1) // depth)
    body = b"".join(writer.field(writer.STRUCT, i + 1) + inner for i in range(chains))
    return fit(size, lambda pad: writer.message(body + writer.field(writer.STRING, 0x7FFF) + writer.string(pad)))


def thrift_one_string(writer: ThriftWriter, size: int, caps: Caps) -> bytes:
    return fit(size, lambda pad: writer.message(writer.field(writer.STRING, 1) + writer.string(pad)))


THRIFT_SHAPES: dict[str, Callable[[ThriftWriter, int, Caps], bytes]] = {
    "lists of empty structs": thrift_lists(lambda w: (w.STRUCT, b"\x00")),
    "lists of empty strings": thrift_lists(lambda w: (w.STRING, w.empty_string())),
    "nested structs": thrift_nested,
    "one string": thrift_one_string,
}


# -- targets ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One codec in one wire variant, the shapes to try on it, and the call to time."""

    name: str
    ref: str
    options: dict
    shapes: dict[str, Callable[[int, Caps], bytes]]
    mutation: dict | None = None  # also time encode with this mutation (a route's response_mutation)


def _framed(build: Callable[[int, Caps], bytes]) -> Callable[[int, Caps], bytes]:
    def framed(size: int, caps: Caps) -> bytes:
        message = build(size - 4, caps)
        return struct.pack(">I", len(message)) + message

    return framed


def _thrift_targets() -> Iterator[Target]:
    for protocol in ("binary", "compact"):
        writer = ThriftWriter(protocol)
        for transport in ("framed", "buffered"):
            shapes = {}
            for name, shape in THRIFT_SHAPES.items():
                bound = functools.partial(shape, writer)
                shapes[name] = _framed(bound) if transport == "framed" else bound
            yield Target(f"thrift {protocol} {transport}", "codecs/thrift:ThriftCodec", {"protocol": protocol, "transport": transport}, shapes)


def targets() -> list[Target]:
    return [
        Target("awesomerpc", "codecs/awesomerpc.py:AwesomeRpcCodec", {}, {"one frame": awesomerpc_frame}),
        Target(
            "dubbo request",
            "codecs/dubbo:DubboCodec",
            {},
            {
                "nulls": dubbo_values(b"N"),
                "empty lists": dubbo_values(b"\x78"),
                "empty strings": dubbo_values(b"\x00"),
                "zero-field objects": dubbo_values(b"\x60", prologue=b"C" + hessian_string("A") + b"\x90" + b"\x60"),
                "attachments": dubbo_attachments,
                "one string": dubbo_one_string,
            },
        ),
        Target("dubbo response", "codecs/dubbo:DubboCodec", {}, {"nulls": dubbo_response_nulls}),
        Target("dubbo response + response_mutation", "codecs/dubbo:DubboCodec", {}, {"nulls": dubbo_response_nulls}, mutation={"x-served-by": "v2"}),
        *_thrift_targets(),
    ]


# -- measuring ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    target: str
    shape: str
    size: int
    outcome: str  # "decoded" or "refused: <the CodecError>"
    seconds: float

    @property
    def us_per_mib(self) -> float:
        return self.seconds * 1e6 / (self.size / MiB)


def codec_for(target: Target, size: int) -> Codec:
    """A fresh codec of the target's, with room for a whole message of ``size`` bytes."""
    codec_class = load_codec_class(target.ref, REPO)
    body_room = {"max_body_size": size} if "dubbo" in target.ref else {}  # Dubbo's own body cap
    return codec_class(max_frame_size=size, options={**target.options, **body_room})


def build(target: Target, shape: str, size: int, *, uncapped: bool = False) -> bytes:
    """The target's ``shape`` message of ``size`` bytes, within the caps of its default codec."""
    return target.shapes[shape](size, Caps() if uncapped else caps_of(codec_for(target, size)))


def find_target(name: str) -> Target:
    for candidate in targets():
        if candidate.name == name:
            return candidate
    raise KeyError(f"no target {name!r}; known: {', '.join(t.name for t in targets())}")


def measure(target: Target, shape: str, size: int, repeat: int, uncapped: bool) -> Result:
    data = build(target, shape, size, uncapped=uncapped)
    best, outcome = float("inf"), "decoded"
    for _ in range(repeat):
        codec, buffer, metadata = codec_for(target, size), bytearray(data), Metadata()
        start = time.process_time()
        try:
            status = codec.decode(buffer, metadata)
            if target.mutation is not None:
                codec.encode(metadata, target.mutation)
        except CodecError as exc:
            elapsed = time.process_time() - start
            outcome = f"refused: {exc}"
        else:
            elapsed = time.process_time() - start
            if status is not DecodeStatus.DONE or buffer:
                raise SystemExit(f"{target.name} / {shape}: decode did not take the whole {len(data)}-byte message ({status}, {len(buffer)} left)")
        best = min(best, elapsed)
    return Result(target.name, shape, len(data), outcome, best)


def run(size: int, repeat: int, uncapped: bool = False, only: str = "") -> list[Result]:
    return [
        measure(target, shape, size, repeat, uncapped)
        for target in targets()
        for shape in target.shapes
        if only in f"{target.name} / {shape}"
    ]


def report(results: list[Result], size: int, repeat: int) -> str:
    lines = [f"decode of the worst messages of max_frame_size {size} bytes ({size / MiB:g} MiB), best of {repeat}", ""]
    header = f"{'codec':<36} {'shape':<24} {'bytes':>9} {'ms':>10} {'µs/MiB':>12}  outcome"
    lines += [header, "-" * len(header)]
    for r in results:
        outcome = r.outcome if len(r.outcome) <= 160 else r.outcome[:157] + "..."
        lines.append(f"{r.target:<36} {r.shape:<24} {r.size:>9} {r.seconds * 1e3:>10.2f} {r.us_per_mib:>12.0f}  {outcome}")
    lines += ["", "worst shape per codec:"]
    for name in dict.fromkeys(r.target for r in results):
        worst = max((r for r in results if r.target == name), key=lambda r: r.seconds)
        lines.append(f"  {name:<36} {worst.shape:<24} {worst.seconds * 1e3:>10.2f} ms {worst.us_per_mib:>12.0f} µs/MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.worstcase", description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-frame-size", default="4MiB", help="message size, bytes or e.g. 4MiB (default 4MiB; quick: 256KiB)")
    parser.add_argument("--repeat", type=int, default=3, help="decode each message this many times, report the fastest (default 3; quick: 1)")
    parser.add_argument("--quick", action="store_true", help="256 KiB messages, one run each: a smoke test of a few seconds")
    parser.add_argument("--uncapped", action="store_true", help="build the shapes ignoring the codecs' caps (they are then refused)")
    parser.add_argument("--only", default="", metavar="TEXT", help="only the rows whose 'codec / shape' contains TEXT, e.g. 'thrift binary'")
    args = parser.parse_args(argv)
    size = QUICK_FRAME_SIZE if args.quick and args.max_frame_size == "4MiB" else parse_size(args.max_frame_size)
    repeat = 1 if args.quick else args.repeat
    if repeat < 1 or size < 1024:
        parser.error("--repeat must be at least 1 and --max-frame-size at least 1KiB")
    results = run(size, repeat, args.uncapped, args.only)
    if not results:
        parser.error(f"--only {args.only!r} matches no 'codec / shape'")
    print(report(results, size, repeat))


if __name__ == "__main__":
    main()
