"""The command line the test peers share: ``serve`` a backend until SIGTERM, or ``call`` one.

A server prints ``listening HOST:PORT`` once it accepts connections (``thrift_peers.spawn_server``
waits for that line).
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Callable

from tests.peers.tcp_server import LOOPBACK

Command = Callable[[argparse.Namespace], None]


def peer_parser(prog: str, description: str, *, call_port: int, serve: Command, call: Command) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser]:
    """A parser with ``serve`` and ``call`` subcommands, both taking --host (default 127.0.0.1)
    and --port (serve: 0, a free port; call: ``call_port``); returns it and the two subparsers
    for the peer's own arguments. ``run(parser, argv)`` then runs the chosen one."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    commands = parser.add_subparsers(dest="command", required=True)
    subparsers = []
    for command, handler, default_port in (("serve", serve, 0), ("call", call, call_port)):
        sub = commands.add_parser(command)
        sub.set_defaults(handler=handler)
        sub.add_argument("--host", default=LOOPBACK)
        sub.add_argument("--port", type=int, default=default_port)
        subparsers.append(sub)
    return parser, subparsers[0], subparsers[1]


def run(parser: argparse.ArgumentParser, argv: list[str] | None) -> None:
    args = parser.parse_args(argv)
    args.handler(args)


def serve_until_terminated(host: str, port: int, stop: Callable[[], None]) -> None:
    """Announce a started server, wait for SIGTERM or Ctrl-C, then ``stop()`` it."""
    print(f"listening {host}:{port}", flush=True)
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: terminated.set())
    try:
        terminated.wait()
    except KeyboardInterrupt:
        pass
    stop()
