"""What a test running in both bridge modes does differently in each: the process the core runs
in, and how a changed config file is reloaded (SIGHUP to the bridge process; POST /reload on the
admin endpoint inside Envoy, which needs bridge.metrics_port)."""

from __future__ import annotations

import signal
import subprocess
import urllib.error
import urllib.request

from tests.integration.harness import InProcessStack, Stack


def in_process(stack: Stack) -> bool:
    return isinstance(stack, InProcessStack)


def core_process(stack: Stack) -> subprocess.Popen:
    """The process the core runs in: the bridge's, or Envoy's in-process."""
    return stack.procs["envoy" if in_process(stack) else "bridge"]


def post(port: int, path: str) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def reload(stack: Stack, metrics_port: int | None = None) -> tuple[int, str] | None:
    """Ask the core to re-read its config file: SIGHUP to the bridge process (it logs the outcome;
    returns None), or in-process POST /reload on ``metrics_port`` (returns its status and body,
    the reload done)."""
    if not in_process(stack):
        stack.procs["bridge"].send_signal(signal.SIGHUP)
        return None
    assert metrics_port is not None, "an in-process reload is POST /reload on bridge.metrics_port"
    return post(metrics_port, "/reload")
