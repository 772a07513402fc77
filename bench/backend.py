"""The benchmark's echo backend: awesomerpc on one port, Dubbo on another, as cheap as possible.

    python -m bench.backend --awesomerpc-port 0 --dubbo-port 0

It prints one line, ``ready awesomerpc=PORT dubbo=PORT``, once both ports listen, and exits on
SIGTERM or SIGINT. One process, uvloop, asyncio Protocols: per read it answers every whole frame
with one write, so pipelined requests cost one syscall per batch. awesomerpc requests are echoed
byte for byte; Dubbo requests get their String argument back as the result (see bench.wire).
A connection that sends anything else is closed, with one line on standard error.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from bench import wire


class _EchoProtocol(asyncio.Protocol):
    __slots__ = ("protocol", "transport", "buffer")

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        protocol = self.protocol
        offset = 0
        replies = []
        try:
            while True:
                length = wire.frame_length(protocol, buffer, offset)
                if not length or len(buffer) - offset < length:
                    break
                if protocol == wire.DUBBO:
                    replies.append(wire.dubbo_answer(buffer, offset, length))
                offset += length
        except wire.WireError as exc:
            print(f"bench backend: closing a {protocol} connection: {exc}", file=sys.stderr, flush=True)
            self.transport.abort()
            return
        if not offset:
            return
        if protocol == wire.AWESOMERPC:
            self.transport.write(bytes(buffer[:offset]))  # the echo is the answer
        else:
            self.transport.write(replies[0] if len(replies) == 1 else b"".join(replies))
        del buffer[:offset]


async def serve(awesomerpc_port: int, dubbo_port: int, host: str = "127.0.0.1") -> list[asyncio.Server]:
    loop = asyncio.get_running_loop()
    servers = []
    for protocol, port in ((wire.AWESOMERPC, awesomerpc_port), (wire.DUBBO, dubbo_port)):
        servers.append(await loop.create_server(lambda p=protocol: _EchoProtocol(p), host, port, backlog=1024))
    return servers


async def _main(args) -> None:
    servers = await serve(args.awesomerpc_port, args.dubbo_port, args.host)
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    print(f"ready awesomerpc={ports[0]} dubbo={ports[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.backend", description="Echo backend for the benchmark (awesomerpc and Dubbo).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--awesomerpc-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--dubbo-port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    import uvloop

    uvloop.run(_main(args))


if __name__ == "__main__":
    main()
