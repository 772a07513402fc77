"""Building whole Dubbo2/Hessian2 frames: requests, responses, heartbeats, error replies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .hessian2 import JavaObject, Long, Writer, encode_string
from .protocol import (
    FLAG_EVENT,
    FLAG_REQUEST,
    FLAG_TWOWAY,
    HESSIAN2,
    HESSIAN_NULL_BODY,
    RESULTS_WITH_ATTACHMENTS,
    ResultType,
    Status,
    pack_header,
)

DEFAULT_DUBBO_VERSION = "2.0.2"


def parameter_descriptor(args: Sequence[Any]) -> str:
    """A JVM descriptor for Python arguments (what a Java consumer would declare)."""
    parts = []
    for arg in args:
        if isinstance(arg, bool):
            parts.append("Z")
        elif isinstance(arg, int):
            parts.append("I" if -0x80000000 <= arg <= 0x7FFFFFFF else "J")
        elif isinstance(arg, Long):
            parts.append("J")
        elif isinstance(arg, float):
            parts.append("D")
        elif isinstance(arg, str):
            parts.append("Ljava/lang/String;")
        elif isinstance(arg, (bytes, bytearray)):
            parts.append("[B")
        elif isinstance(arg, (list, tuple)):
            parts.append("Ljava/util/List;")
        elif isinstance(arg, Mapping):
            parts.append("Ljava/util/Map;")
        elif isinstance(arg, JavaObject):
            parts.append("L" + arg.class_name.replace(".", "/") + ";")
        else:
            parts.append("Ljava/lang/Object;")
    return "".join(parts)


def build_request(
    request_id: int,
    interface: str,
    method: str,
    args: Sequence[Any] = (),
    *,
    version: str | None = "0.0.0",
    attachments: Mapping[str, Any] | None = None,
    dubbo_version: str = DEFAULT_DUBBO_VERSION,
    parameter_types: str | None = None,
    twoway: bool = True,
) -> bytes:
    """A request frame laid out like Java Dubbo's DubboCodec.encodeRequestData."""
    body = Writer()
    body.write(dubbo_version).write(interface).write(version).write(method)
    body.write(parameter_descriptor(args) if parameter_types is None else parameter_types)
    for arg in args:
        body.write(arg)
    body.write(dict(attachments or {}))
    payload = body.getvalue()
    flag = FLAG_REQUEST | HESSIAN2 | (FLAG_TWOWAY if twoway else 0)
    return pack_header(flag, 0, request_id, len(payload)) + payload


def build_response(
    request_id: int,
    result_type: ResultType,
    value: Any = None,
    *,
    attachments: Mapping[str, Any] | None = None,
) -> bytes:
    """An OK response; ``value`` is the result, or the exception object for exception types."""
    body = Writer()
    body.write(int(result_type))
    if result_type not in (ResultType.NULL_VALUE, ResultType.NULL_VALUE_WITH_ATTACHMENTS):
        body.write(value)
    if result_type in RESULTS_WITH_ATTACHMENTS:
        body.write(dict(attachments or {}))
    payload = body.getvalue()
    return pack_header(HESSIAN2, Status.OK, request_id, len(payload)) + payload


def build_error_response(request_id: int, status: int, message: str | None, serialization: int = HESSIAN2) -> bytes:
    """A non-OK response: Dubbo puts just the error message (a string) in the body."""
    payload = HESSIAN_NULL_BODY if message is None else encode_string(message)
    return pack_header(serialization, status, request_id, len(payload)) + payload


def build_heartbeat(request_id: int, *, response: bool, twoway: bool = True, serialization: int = HESSIAN2) -> bytes:
    """A heartbeat request (event flag, null body) or the OK response to one."""
    if response:
        flag, status = FLAG_EVENT | serialization, Status.OK
    else:
        flag, status = FLAG_REQUEST | FLAG_EVENT | serialization | (FLAG_TWOWAY if twoway else 0), 0
    return pack_header(flag, status, request_id, len(HESSIAN_NULL_BODY)) + HESSIAN_NULL_BODY


__all__ = [
    "DEFAULT_DUBBO_VERSION",
    "build_error_response",
    "build_heartbeat",
    "build_request",
    "build_response",
    "parameter_descriptor",
]
