"""Which access-log writer costs less CPU: the filter's writer thread, or a flush on the event loop.

    python -m bench.access_log_writers [--requests N] [--repeat N]

Runs bench.inproc's awesomerpc measure with ``--with access_log`` (lines to /dev/null) twice:
as shipped (a thread per file formats and writes the queued lines), and with the same Writer
drained on the event loop instead (by a timer, and at once when FLUSH_LINES are waiting). The
formatting and the writes are the same; the difference is the thread's hand-offs of the GIL.
Prints the bridge's CPU µs per request of each, best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import asyncio

from bench import inproc
from metabridge.filters import access_log


def _drain_on_the_loop() -> None:
    """Patch Writer so the event loop drains it: a timer every flush_interval, and wake()."""

    def start(self) -> None:
        loop = asyncio.get_running_loop()

        def tick() -> None:
            self.drain()
            loop.call_later(self.flush_interval, tick)

        self._thread = loop.call_later(self.flush_interval, tick)  # marks the writer started

    access_log.Writer.start = start
    access_log.Writer.wake = access_log.Writer.drain
    access_log._writers.clear()  # new writers: the first run's thread keeps only its own, now idle


def _best(requests: int, repeat: int) -> float:
    return min(asyncio.run(inproc.measure("awesomerpc", 1, requests, 100, ("access_log",))) for _ in range(repeat))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.access_log_writers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    inproc.install_event_loop()
    thread = _best(args.requests, args.repeat)
    _drain_on_the_loop()
    loop = _best(args.requests, args.repeat)
    print(f"access log, awesomerpc depth 1, 100 B: writer thread {thread:.1f} µs, event-loop flush {loop:.1f} µs of bridge CPU per request")


if __name__ == "__main__":
    main()
