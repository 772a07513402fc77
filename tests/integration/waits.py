"""Waiting for an observable condition instead of sleeping a fixed time: a test that needs a
request in flight, queued or seen by Envoy waits for the backend's log, Envoy's stats or the
core's log to say so."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tests.integration.harness import Stack, wait_until

async def until(check: Callable[[], object], timeout: float, what: str) -> object:
    """harness.wait_until from a coroutine: polls ``check`` in a thread, so the test's own
    connections keep being served meanwhile."""
    return await asyncio.to_thread(wait_until, check, timeout, what)


def slow_requests_received(stack: Stack, backend: str, delay_ms: int) -> int:
    """How many cmd 98 requests of ``delay_ms`` the example backend ``backend`` has received (it
    logs each on arrival: examples/awesomerpc/server.py)."""
    return stack.log(f"backend-{backend}").count(f": answering in {delay_ms} ms")
