"""The access log filter (``access_log``): one line per request, written off the event loop.

    filters:
      - name: access_log
        config:
          path: /var/log/metabridge/access.log   # default: the bridge's standard output
          format: json                            # default; or a format string of %COMMAND%s
          headers: [x-canary, traceparent]        # request headers to log (json: "headers")
          flush_interval: 1s                      # the longest a line waits to be written
          max_pending: 10000                      # lines waiting for the writer; past it, dropped

``on_complete`` copies what the line needs from the request into a tuple and appends it to the
file's queue (a deque); nothing else happens on the event loop. One writer thread per file and
process formats the queued lines and writes them every ``flush_interval``, or as soon as
FLUSH_LINES are waiting, in ``write()`` calls of whole lines of at most PIPE_BUF bytes to a file
opened with O_APPEND: several worker processes (or listeners) may share one file, or one
standard output pipe, without their lines interleaving. When the queue is full the line is
dropped and counted (``dropped``): the event loop never waits for the disk.

SIGUSR1 makes every writer of the process reopen its file (after logrotate renamed it); the
handler is installed on the bridge's event loop when a filter with a file is built there. With
``bridge.workers``, the supervisor passes SIGUSR1 on to each worker. See docs/access-log.md.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import re
import select
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

from metabridge.config.model import parse_duration
from metabridge.config.schema import DURATION
from metabridge.filters.local_ratelimit import check_config
from metabridge.logs import event, failure
from metabridge.sdk.codec import MessageType, ResponseStatus
from metabridge.sdk.filter import Filter

log = logging.getLogger("metabridge.filters.access_log")

STDOUT = "-"
FLUSH_LINES = 512  # this many waiting lines wake the writer before its interval is up
PIPE_BUF = getattr(select, "PIPE_BUF", 4096)  # the size up to which a write() is never interleaved

CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "path": {"type": "string", "minLength": 1},
        "format": {"type": "string", "minLength": 1},
        "headers": {"type": "array", "items": {"type": "string", "minLength": 1}, "uniqueItems": True},
        "flush_interval": {"type": "string", "pattern": DURATION},
        "max_pending": {"type": "integer", "minimum": 1},
    },
}

# What on_complete copies from a request, by position (the writer thread formats it).
START, LISTENER, CONNECTION, REQUEST_ID, OPERATION, MESSAGE_TYPE, HEADERS, ROUTE, CLUSTER, UPSTREAM_HOST, OUTCOME, DURATION_S, BYTES_IN, BYTES_OUT, ATTEMPTS = range(15)

# Format-string commands -> the record field they print (REQ(name) is handled apart).
COMMANDS: dict[str, int] = {
    "START_TIME": START,
    "LISTENER": LISTENER,
    "CONNECTION_ID": CONNECTION,
    "REQUEST_ID": REQUEST_ID,
    "OPERATION": OPERATION,
    "MESSAGE_TYPE": MESSAGE_TYPE,
    "ROUTE": ROUTE,
    "CLUSTER": CLUSTER,
    "UPSTREAM_HOST": UPSTREAM_HOST,
    "RESPONSE_STATUS": OUTCOME,
    "DURATION": DURATION_S,
    "BYTES_RECEIVED": BYTES_IN,
    "BYTES_SENT": BYTES_OUT,
    "ATTEMPTS": ATTEMPTS,
}
_COMMAND = re.compile(r"%([A-Z_]+)(?:\(([^)%]*)\))?%")

Record = tuple
Formatter = Callable[[Record], str]


_second: tuple[int, str] = (-1, "")  # the last whole second iso_time formatted, and its text


def iso_time(seconds: float) -> str:
    """UTC with milliseconds, as Envoy's %START_TIME% prints by default."""
    global _second
    whole = int(seconds)
    cached = _second  # one read: writer threads of other files may replace it meanwhile
    if cached[0] != whole:
        cached = _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{cached[1]}.{int((seconds - whole) * 1000):03d}Z"


def outcome(request) -> str:
    """The response's status (``ok``/``error``), the local reply's error type, ``oneway`` (sent,
    no reply expected) or ``no_reply`` (the connection closed first)."""
    if request.error is not None:
        return request.error.value
    response = request.response
    if response is not None:
        return "error" if response.response_status is ResponseStatus.ERROR or response.message_type is MessageType.ERROR else "ok"
    if request.metadata.message_type is MessageType.ONEWAY:
        return "oneway"
    if request.is_stream and request.replied:
        return "ok"
    return "no_reply"


def _json(value: Any) -> str:
    if value is None:
        return "null"
    if type(value) is int:
        return str(value)
    return _quote(value if type(value) is str else str(value))


def json_formatter(headers: Sequence[str]) -> Formatter:
    """One JSON object per line, written out field by field (a third of json.dumps' time);
    non-ASCII characters are \\u escapes."""
    names = tuple(_quote(name) for name in headers)

    def format_json(r: Record) -> str:
        line = (
            f'{{"start_time":"{iso_time(r[START])}","listener":{_quote(r[LISTENER])},"connection":{_quote(r[CONNECTION])},'
            f'"request_id":{_json(r[REQUEST_ID])},"operation":{_quote(r[OPERATION])},"message_type":"{r[MESSAGE_TYPE]}",'
            f'"route":{_quote(r[ROUTE])},"cluster":{_quote(r[CLUSTER])},"upstream_host":{_quote(r[UPSTREAM_HOST])},'
            f'"outcome":"{r[OUTCOME]}","duration_ms":{round(r[DURATION_S] * 1000, 3)},"bytes_in":{r[BYTES_IN]},'
            f'"bytes_out":{r[BYTES_OUT]},"attempts":{r[ATTEMPTS]}'
        )
        if not names:
            return line + "}"
        present = ",".join(f"{name}:{_quote(value)}" for name, value in zip(names, r[HEADERS]) if value is not None)
        return f'{line},"headers":{{{present}}}}}'

    return format_json


def _text(field: int, value: Any) -> str:
    if value is None or value == "":
        return "-"  # as Envoy prints a value that is not there
    if field == START:
        return iso_time(value)
    if field == DURATION_S:
        return str(int(value * 1000))  # whole milliseconds, as Envoy's %DURATION%
    return str(value)


def compile_format(text: str, headers: list[str]) -> Formatter:
    """A formatter for an Envoy-style format string; each %REQ(name)% is added to ``headers``
    (the headers to copy from each request). Raises ValueError for an unknown command."""
    parts: list[str | tuple[int, int]] = []  # literal text, or (field, header index)
    pos = 0
    for found in _COMMAND.finditer(text):
        parts.append(text[pos : found.start()])
        command, argument = found.group(1), found.group(2)
        if command == "REQ" and argument:
            name = argument.strip().lower()
            if name not in headers:
                headers.append(name)
            parts.append((HEADERS, headers.index(name)))
        elif command in COMMANDS and argument is None:
            parts.append((COMMANDS[command], -1))
        else:
            known = ", ".join(f"%{c}%" for c in COMMANDS)
            raise ValueError(f"format: unknown command {found.group(0)!r} (known: {known}, %REQ(header)%)")
        pos = found.end()
    parts.append(text[pos:])
    parts = [p for p in parts if p != ""]

    def format_text(r: Record) -> str:
        out = []
        for part in parts:
            if isinstance(part, str):
                out.append(part)
            else:
                field, index = part
                out.append(_text(field, r[HEADERS][index] if index >= 0 else r[field]))
        return "".join(out)

    return format_text


class Writer:
    """One file's (or standard output's) queue and the thread that writes it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pending: deque[tuple[Formatter, Record]] = deque()
        self.max_pending = 10_000
        self.flush_interval = 1.0
        self.write_errors = 0
        self.reopen = False  # set by SIGUSR1: close the file before the next write
        self.reopens = 0
        self._wake = threading.Event()
        self._lock = threading.Lock()  # one drain at a time (the thread's, or the one at exit)
        self._fd: int | None = None
        self._thread: threading.Thread | None = None
        self._failing = False

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"access-log {self.path}", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            self.drain()

    def drain(self) -> None:
        """Format and write what is queued (called by the thread, and once at exit)."""
        with self._lock:
            try:
                self._drain()
            except Exception as exc:  # noqa: BLE001 - a bug here must not stop the thread
                self.write_errors += 1
                failure(log, "access_log_writer_error", exc, path=self.path)

    def _drain(self) -> None:
        if self.reopen:
            self.reopen = False
            self._close()
        pending = self.pending
        count = len(pending)
        if not count:
            return
        chunks: list[bytes] = []
        chunk: list[bytes] = []
        size = 0
        popleft = pending.popleft
        for _ in range(count):
            formatter, record = popleft()
            line = (formatter(record) + "\n").encode("utf-8", "replace")
            if size + len(line) > PIPE_BUF and chunk:
                chunks.append(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        chunks.append(b"".join(chunk))
        self._write(chunks, count)

    def _write(self, chunks: list[bytes], lines: int) -> None:
        try:
            fd = self._open()
            for data in chunks:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
        except OSError as exc:
            self.write_errors += 1
            self._close()
            if not self._failing:  # logged once until a write succeeds again
                self._failing = True
                event(log, logging.ERROR, "access_log_write_failed", path=self.path, error=str(exc), lines_lost=lines)
            return
        if self._failing:
            self._failing = False
            event(log, logging.INFO, "access_log_write_recovered", path=self.path, write_errors=self.write_errors)

    def _open(self) -> int:
        if self._fd is None:
            if self.path == STDOUT:
                self._fd = 1
            else:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        return self._fd

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and fd != 1:
            os.close(fd)


_writers: dict[str, Writer] = {}
_signal_loop: asyncio.AbstractEventLoop | None = None


def writer_for(path: str) -> Writer:
    """The process's writer for ``path`` (filters of several listeners, and the filters a reload
    builds, share it)."""
    writer = _writers.get(path)
    if writer is None:
        writer = _writers[path] = Writer(path)
    return writer


def reopen_files() -> None:
    """SIGUSR1: every writer reopens its file before its next write."""
    for writer in _writers.values():
        if writer.path != STDOUT:
            writer.reopen = True
            writer.reopens += 1
            writer.wake()
    event(log, logging.INFO, "access_log_reopen", files=[w.path for w in _writers.values() if w.path != STDOUT])


def _install_reopen_handler() -> None:
    global _signal_loop
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    if loop is not _signal_loop:
        loop.add_signal_handler(signal.SIGUSR1, reopen_files)
        _signal_loop = loop


@atexit.register
def _flush_at_exit() -> None:
    for writer in _writers.values():
        writer.drain()


class AccessLogStats:
    __slots__ = ("lines", "dropped", "_writer")

    def __init__(self, writer: Writer) -> None:
        self.lines = 0  # queued for writing
        self.dropped = 0  # the queue was full
        self._writer = writer

    def snapshot(self) -> dict[str, int]:
        # write_errors are the file's: filters sharing a file report the same count.
        return {"lines": self.lines, "dropped": self.dropped, "write_errors": self._writer.write_errors}


class AccessLogFilter(Filter):
    name = "access_log"

    def __init__(self, config: Mapping[str, Any], *, listener: str) -> None:
        super().__init__(config, listener=listener)
        check_config(config, CONFIG_SCHEMA)
        headers = [h.lower() for h in config.get("headers", ())]
        fmt = config.get("format", "json")
        self.formatter = json_formatter(headers) if fmt == "json" else compile_format(fmt, headers)
        self.headers = tuple(headers)
        self.path = config.get("path", STDOUT)
        if self.path != STDOUT and not os.path.isdir(os.path.dirname(os.path.abspath(self.path))):
            raise ValueError(f"path: the folder of {self.path!r} does not exist")
        self.flush_interval = parse_duration(config.get("flush_interval", "1s"))
        if self.flush_interval <= 0:
            raise ValueError("flush_interval: must be more than 0s")
        self.max_pending = int(config.get("max_pending", 10_000))
        # The file is opened, and its thread started, when the first line is queued: building
        # the filter (metabridge validate, the supervisor's check) opens nothing. The SIGUSR1
        # handler goes on the running loop now, so a bridge that has logged nothing yet is not
        # ended by a rotation's signal (validate has no loop: nothing is installed).
        self.writer = writer_for(self.path)
        if self.path != STDOUT:
            _install_reopen_handler()
        self.writer.flush_interval = self.flush_interval  # the latest config's: a reload may change them
        self.writer.max_pending = self.max_pending
        self.stats = AccessLogStats(self.writer)

    def on_complete(self, request) -> None:
        writer = self.writer
        pending = writer.pending
        if len(pending) >= writer.max_pending:
            self.stats.dropped += 1
            return
        if not writer.started:
            self._start()
        metadata = request.metadata
        connection = request.connection
        now = connection.clock.now()
        received = request.received
        route = request.route
        response = request.response
        headers = metadata.headers
        pending.append((
            self.formatter,
            (
                time.time() - (now - received),
                self.listener,
                connection.id,
                metadata.request_id,
                metadata.operation_name,
                metadata.message_type.value,
                tuple([headers.get(h) for h in self.headers]) if self.headers else (),
                route.name if route is not None else "",
                request.cluster,
                request.upstream_host,
                outcome(request),
                (request.replied or now) - received,
                metadata.header_size + metadata.body_size or len(metadata.frame),
                request.reply_size or (len(response.frame) if response is not None else 0),
                request.attempt,
            ),
        ))
        self.stats.lines += 1
        if len(pending) == FLUSH_LINES:
            writer.wake()

    def _start(self) -> None:
        if self.path != STDOUT:
            _install_reopen_handler()  # a filter built outside the loop that now serves it
        self.writer.start()
