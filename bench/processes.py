"""Child processes of the benchmark: start with a log file, wait until ready, read CPU time, stop."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class StartError(Exception):
    """A process the benchmark needs did not come up; the message says which and where its log is."""


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _port_candidates() -> Iterator[int]:
    # Ports from outside the kernel's ephemeral range: a port picked by binding to 0 is an
    # ephemeral one, and any outgoing connection made before the process that needs it binds
    # (Envoy starts seconds after its port is chosen) can take it, which fails that start with
    # "address in use". The start is random so that concurrent runs rarely try the same ports.
    low, high = _ephemeral_range()
    span = range(20000, low) if low - 20000 >= 2000 else range(high + 1, 65536)
    start = random.randrange(len(span))
    while True:
        for i in range(len(span)):
            yield span[(start + i) % len(span)]


_candidates = _port_candidates()


def free_port() -> int:
    """A loopback TCP port nobody is bound to now, outside the ephemeral range."""
    for _ in range(1000):
        port = next(_candidates)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError("no free loopback port found outside the ephemeral range")


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # Fields after the command name (which may hold spaces) start at state (field 3);
    # utime and stime are fields 14 and 15.
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and all its live descendants (a bridge with worker processes)."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            total += cpu_seconds(current)
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    pending.extend(int(child) for child in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited between the listing and the read
    return total


def machine_busy_seconds() -> float:
    """CPU time all cores of the machine spent busy (not idle or waiting on I/O), from /proc/stat:
    compared with the benchmark's own processes it shows what else was running."""
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()  # "cpu user nice system idle iowait irq softirq steal ..."
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


class Child:
    """One child process in its own session, its output in ``log_path``."""

    def __init__(self, name: str, args: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartError(f"{self.name} exited with status {self.proc.returncode} before {what}; see {self.log_path}")
            try:
                if check():
                    return
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                last = exc
            time.sleep(0.05)
        detail = f" (last error: {last})" if last else ""
        raise StartError(f"{self.name}: not {what} within {timeout:g}s{detail}; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
