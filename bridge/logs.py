"""Structured logging: one JSON object per line on stderr.

Use ``log.info("event_name", extra={"fields": {...}})`` (or ``event(log, level, name, **fields)``);
the event name is a short snake_case identifier, the fields carry the details.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("hpack", "h2", "grpc"):  # per-frame debug chatter, never useful in our logs
        logging.getLogger(noisy).setLevel(logging.WARNING)


def event(log: logging.Logger, level: int, name: str, exc_info: bool = False, **fields) -> None:
    if log.isEnabledFor(level):
        log.log(level, name, exc_info=exc_info, extra={"fields": fields})


def failure(log: logging.Logger, name: str, exc: BaseException, **fields) -> None:
    """An ERROR event for an exception caught where it happened (a plugin's, or a bug), with
    its traceback: contained failures are logged once, here."""
    event(log, logging.ERROR, name, exc_info=(type(exc), exc, exc.__traceback__), **fields)
