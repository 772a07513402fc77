"""Waiting for an observable condition instead of sleeping a fixed time: a test that needs a
request in flight, queued or seen by Envoy waits for the backend's log, Envoy's stats or the
core's log to say so."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from tests.integration.harness import Stack

POLL_SECONDS = 0.02  # the poll loop's interval, not a wait for anything


async def until(check: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``check`` from a coroutine until it returns something true (returned), at most
    ``timeout`` s; an exception from ``check`` is retried until the deadline."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout}s (last error: {last})")
        await asyncio.sleep(POLL_SECONDS)


def slow_requests_received(stack: Stack, backend: str, delay_ms: int) -> int:
    """How many cmd 98 requests of ``delay_ms`` the example backend ``backend`` has received (it
    logs each on arrival: examples/awesomerpc/server.py)."""
    return stack.log(f"backend-{backend}").count(f": answering in {delay_ms} ms")
