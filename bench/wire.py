"""The two wire formats the benchmark speaks, reduced to what a load generator and an echo backend need.

Both sides are hot paths on a 2-vCPU machine shared with the proxies under test, so everything is
precomputed: a request is a fixed header with the request id patched in plus a constant body, and
a response is checked by comparing bytes with the one the echo backend must send back.

- awesomerpc (codecs/awesomerpc.py): 13-byte header ``version u8, flow u32, len u32 (whole
  frame), cmd i16, rsp_code i16``. The backend echoes each request frame byte for byte, which is
  a valid OK response (same flow, same cmd, rsp_code 0, same body).
- Dubbo2 with Hessian2: 16-byte header ``magic 0xdabb u16, flag u8, status u8, id i64, body
  length i32``. A request body is the Java consumer's layout: dubbo version, service path,
  service version, method, parameter descriptor, one String argument (the payload), attachments
  map. The backend answers RESPONSE_VALUE (int 1) followed by the argument's Hessian2 bytes, i.e.
  it returns the payload as the String result.

The Dubbo side is written here rather than taken from codecs/dubbo: the native generic_proxy path
must run without metabridge's codec, and the load generator needs templates, not a codec.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

AWESOMERPC = "awesomerpc"
DUBBO = "dubbo"
PROTOCOLS = (AWESOMERPC, DUBBO)

# -- awesomerpc --------------------------------------------------------------------------------

_ARPC_HEADER = struct.Struct("!BIIhh")
ARPC_HEADER_SIZE = _ARPC_HEADER.size  # 13
_ARPC_LEN = struct.Struct("!I")
_ARPC_LEN_OFFSET = 5
ARPC_CMD = 1  # the command every benchmark request carries; routes match on it

# -- Dubbo2 / Hessian2 -------------------------------------------------------------------------

_DUBBO_HEADER = struct.Struct(">HBBqi")
DUBBO_HEADER_SIZE = _DUBBO_HEADER.size  # 16
_DUBBO_LEN = struct.Struct(">i")
_DUBBO_LEN_OFFSET = 12
DUBBO_MAGIC = 0xDABB
_FLAG_REQUEST = 0x80
_FLAG_TWOWAY = 0x40
_FLAG_EVENT = 0x20
_HESSIAN2 = 0x02
_STATUS_OK = 20
_RESPONSE_VALUE = b"\x91"  # Hessian2 compact int 1: Dubbo's RESPONSE_VALUE result type
_HESSIAN_NULL = b"N"

DUBBO_VERSION = "2.0.2"
DUBBO_SERVICE = "org.metabridge.bench.EchoService"
DUBBO_SERVICE_VERSION = "1.0.0"
DUBBO_METHOD = "echo"
_STRING_DESCRIPTOR = "Ljava/lang/String;"
_HESSIAN_CHUNK = 0xFFFF  # chars per Hessian2 string chunk


class WireError(Exception):
    """Bytes that are not what this benchmark sends or expects."""


def hessian_string(text: str) -> bytes:
    """Hessian2 encoding of an ASCII string (lengths count characters, so ASCII keeps them = bytes)."""
    data = text.encode("ascii")
    size = len(data)
    if size <= 31:
        return bytes([size]) + data
    if size <= 1023:
        return bytes([0x30 + (size >> 8), size & 0xFF]) + data
    pieces = []
    offset = 0
    while size - offset > _HESSIAN_CHUNK:
        pieces.append(b"R" + _HESSIAN_CHUNK.to_bytes(2, "big") + data[offset : offset + _HESSIAN_CHUNK])
        offset += _HESSIAN_CHUNK
    pieces.append(b"S" + (size - offset).to_bytes(2, "big") + data[offset:])
    return b"".join(pieces)


def skip_hessian_string(data: bytes | bytearray, pos: int) -> int:
    """The offset just past the Hessian2 string (or null) at ``pos``; ASCII content only."""
    while True:
        tag = data[pos]
        if tag == 0x4E:  # N: null
            return pos + 1
        if tag <= 0x1F:
            size, pos, final = tag, pos + 1, True
        elif 0x30 <= tag <= 0x33:
            size, pos, final = ((tag - 0x30) << 8) | data[pos + 1], pos + 2, True
        elif tag in (0x52, 0x53):  # R: non-final chunk, S: final chunk
            size, pos, final = (data[pos + 1] << 8) | data[pos + 2], pos + 3, tag == 0x53
        else:
            raise WireError(f"expected a Hessian2 string at offset {pos}, found tag 0x{tag:02x}")
        end = pos + size
        if end > len(data):
            raise WireError(f"Hessian2 string at offset {pos} runs past the end of the frame")
        if not data[pos:end].isascii():
            raise WireError(f"Hessian2 string at offset {pos} is not ASCII (the benchmark only sends ASCII)")
        pos = end
        if final:
            return pos


def payload_bytes(size: int) -> bytes:
    """A recognisable ASCII payload of ``size`` bytes (a misplaced byte shows up as a mismatch)."""
    pattern = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return (pattern * (size // len(pattern) + 1))[:size]


@dataclass(frozen=True)
class RequestTemplate:
    """How to build request ``n`` and what its response must look like.

    ``build(request_id)`` returns the request frame; a response frame ``f`` is right when
    ``response_id(f)`` is the id and ``f[header_size:] == expected_body`` and the header says OK.
    """

    protocol: str
    payload_size: int
    body: bytes  # request body after the header
    expected_body: bytes  # response body after the header

    def build(self, request_id: int) -> bytes:
        if self.protocol == AWESOMERPC:
            return _ARPC_HEADER.pack(1, request_id, ARPC_HEADER_SIZE + len(self.body), ARPC_CMD, 0) + self.body
        header = _DUBBO_HEADER.pack(DUBBO_MAGIC, _FLAG_REQUEST | _FLAG_TWOWAY | _HESSIAN2, 0, request_id, len(self.body))
        return header + self.body


def request_template(protocol: str, payload_size: int) -> RequestTemplate:
    payload = payload_bytes(payload_size)
    if protocol == AWESOMERPC:
        return RequestTemplate(protocol, payload_size, payload, payload)
    if protocol != DUBBO:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    argument = hessian_string(payload.decode("ascii"))
    body = b"".join(
        [
            hessian_string(DUBBO_VERSION),
            hessian_string(DUBBO_SERVICE),
            hessian_string(DUBBO_SERVICE_VERSION),
            hessian_string(DUBBO_METHOD),
            hessian_string(_STRING_DESCRIPTOR),
            argument,
            # Attachments as a Java consumer sends them (an untyped map: H ... Z).
            b"H"
            + hessian_string("path")
            + hessian_string(DUBBO_SERVICE)
            + hessian_string("interface")
            + hessian_string(DUBBO_SERVICE)
            + hessian_string("version")
            + hessian_string(DUBBO_SERVICE_VERSION)
            + b"Z",
        ]
    )
    return RequestTemplate(protocol, payload_size, body, _RESPONSE_VALUE + argument)


def header_size(protocol: str) -> int:
    return ARPC_HEADER_SIZE if protocol == AWESOMERPC else DUBBO_HEADER_SIZE


def frame_length(protocol: str, buffer: bytes | bytearray, offset: int) -> int:
    """Total length of the frame at ``offset`` once its header is there; 0 while it is not."""
    if protocol == AWESOMERPC:
        if len(buffer) - offset < ARPC_HEADER_SIZE:
            return 0
        length = _ARPC_LEN.unpack_from(buffer, offset + _ARPC_LEN_OFFSET)[0]
        if length < ARPC_HEADER_SIZE:
            raise WireError(f"awesomerpc frame announces len {length}, less than its header")
        return length
    if len(buffer) - offset < DUBBO_HEADER_SIZE:
        return 0
    if buffer[offset] != 0xDA or buffer[offset + 1] != 0xBB:
        raise WireError(f"Dubbo frame starts with 0x{bytes(buffer[offset:offset + 2]).hex()}, not the magic 0xdabb")
    body = _DUBBO_LEN.unpack_from(buffer, offset + _DUBBO_LEN_OFFSET)[0]
    if body < 0:
        raise WireError(f"Dubbo frame announces a negative body length {body}")
    return DUBBO_HEADER_SIZE + body


def response_id(protocol: str, frame: bytes | bytearray, offset: int = 0) -> int:
    """The request id of a response frame, or -1 when its header does not say OK."""
    if protocol == AWESOMERPC:
        _, flow, _, cmd, rsp_code = _ARPC_HEADER.unpack_from(frame, offset)
        return flow if rsp_code == 0 and cmd == ARPC_CMD else -1
    _, flag, status, request_id, _ = _DUBBO_HEADER.unpack_from(frame, offset)
    ok = status == _STATUS_OK and not flag & (_FLAG_REQUEST | _FLAG_EVENT)
    return request_id if ok else -1


def describe_response(protocol: str, frame: bytes | bytearray, offset: int = 0) -> str:
    """A short description of a response header, for error reports."""
    if protocol == AWESOMERPC:
        _, flow, length, cmd, rsp_code = _ARPC_HEADER.unpack_from(frame, offset)
        return f"awesomerpc flow={flow} len={length} cmd={cmd} rsp_code={rsp_code}"
    _, flag, status, request_id, body = _DUBBO_HEADER.unpack_from(frame, offset)
    return f"dubbo id={request_id} flag=0x{flag:02x} status={status} body={body}"


# -- the echo backend's answers ----------------------------------------------------------------


def dubbo_answer(frame: bytes | bytearray, offset: int, length: int) -> bytes:
    """The backend's reply to the Dubbo frame at ``offset``: the argument string as the result,
    or an OK heartbeat reply to a heartbeat. Raises WireError for anything else."""
    _, flag, _, request_id, _ = _DUBBO_HEADER.unpack_from(frame, offset)
    if flag & _FLAG_EVENT:
        return _DUBBO_HEADER.pack(DUBBO_MAGIC, _FLAG_EVENT | _HESSIAN2, _STATUS_OK, request_id, 1) + _HESSIAN_NULL
    if not flag & _FLAG_REQUEST:
        raise WireError(f"Dubbo frame {request_id} is not a request (flag 0x{flag:02x})")
    end = offset + length
    pos = offset + DUBBO_HEADER_SIZE
    for _ in range(5):  # dubbo version, service path, service version, method, descriptor
        pos = skip_hessian_string(frame, pos)
    arg_end = skip_hessian_string(frame, pos)
    if arg_end > end:
        raise WireError(f"Dubbo request {request_id}: argument runs past the frame")
    argument = bytes(frame[pos:arg_end])
    return _DUBBO_HEADER.pack(DUBBO_MAGIC, _HESSIAN2, _STATUS_OK, request_id, 1 + len(argument)) + _RESPONSE_VALUE + argument
