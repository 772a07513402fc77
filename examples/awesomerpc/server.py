"""An awesomerpc backend for demos and tests.

    python -m examples.awesomerpc.server --port 10001 --name v1 [--host 127.0.0.1]

It logs one line once listening (with the real port, so ``--port 0`` is usable) and exits with
status 0 on SIGTERM or SIGINT. In-process: ``server = await serve(host, port, name)``.

Every request is answered with its own flow and cmd (the cmd the backend saw, so a client can
tell whether the proxy rewrote it), rsp_code 0 and the body ``b"<name>|" + request body`` (so a
client can tell which backend answered). Each request runs in its own task, so replies on one
connection may come back out of order. Special commands, for failure tests:

    cmd 0   heartbeat: answered with cmd 0, rsp_code 0, no body.
    cmd 98  delay: the body is an ASCII integer of milliseconds; sleep that long, then answer as
            usual. Other requests on the connection are served meanwhile. A body that is not a
            non-negative integer is answered at once with rsp_code 400 and a message body.
            The backend logs ``cmd 98 flow <flow> from <peer>: answering in <ms> ms`` when the
            request arrives, so a test can wait until a slow request has reached it.
    cmd 99  drop: close the connection at once, without answering this or any in-flight request.

Bytes that are not awesomerpc (e.g. a len below 13) close the connection.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from metabridge.sdk.codec import CodecError, DecodeStatus, Metadata, MessageType
from examples.awesomerpc.protocol import AwesomeRpcCodec, encode_frame

DELAY_CMD = 98
DROP_CMD = 99
BAD_REQUEST = 400
READ_CHUNK = 64 * 1024

log = logging.getLogger("awesomerpc.server")


class _Connection:
    """One client connection: decodes pipelined requests and answers each in its own task."""

    def __init__(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float = 0.0) -> None:
        self.prefix = f"{name}|".encode()
        self.delay = delay  # seconds every reply waits (a slow host)
        self.reader = reader
        self.writer = writer
        self.codec = AwesomeRpcCodec()
        self.tasks: set[asyncio.Task] = set()
        self.peer = writer.get_extra_info("peername")

    async def run(self) -> None:
        buffer = bytearray()
        try:
            while chunk := await self.reader.read(READ_CHUNK):
                buffer += chunk
                while True:
                    request = Metadata()
                    if self.codec.decode(buffer, request) is DecodeStatus.WAIT_FOR_DATA:
                        break
                    if request.properties["cmd"] == DROP_CMD:
                        log.info("cmd %d from %s: closing the connection without answering", DROP_CMD, self.peer)
                        return
                    task = asyncio.create_task(self._answer(request))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
        except CodecError as exc:
            log.warning("closing the connection from %s: %s", self.peer, exc)
        except ConnectionError as exc:
            log.info("connection from %s lost: %s", self.peer, exc)
        finally:
            for task in self.tasks:
                task.cancel()
            self.writer.close()

    async def _answer(self, request: Metadata) -> None:
        if request.message_type is MessageType.HEARTBEAT:
            reply = self.codec.heartbeat_reply(request)
        else:
            reply = await self._reply(request)
        if self.writer.is_closing():
            return
        self.writer.write(reply)
        try:
            await self.writer.drain()
        except ConnectionError:
            pass  # the reader side sees the same loss and closes the connection

    async def _reply(self, request: Metadata) -> bytes:
        flow, cmd = request.request_id, request.properties["cmd"]
        body = request.frame[request.header_size :]
        if cmd == DELAY_CMD:
            try:
                delay_ms = int(body.decode("ascii"))
                if delay_ms < 0:
                    raise ValueError("negative")
            except ValueError:
                message = f"cmd {DELAY_CMD} wants a body of ASCII milliseconds (a non-negative integer), got {body[:32]!r}"
                return encode_frame(flow, cmd, message.encode(), rsp_code=BAD_REQUEST)
            log.info("cmd %d flow %d from %s: answering in %d ms", DELAY_CMD, flow, self.peer, delay_ms)
            await asyncio.sleep(delay_ms / 1000)
        if self.delay:
            await asyncio.sleep(self.delay)
        return encode_frame(flow, cmd, self.prefix + body)


async def serve(host: str, port: int, name: str, delay: float = 0.0) -> asyncio.Server:
    """Start a backend called ``name`` on host:port (0 = any free port) and return its server;
    ``delay``: seconds added before every reply."""

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _Connection(name, reader, writer, delay).run()
        except asyncio.CancelledError:
            # Shutdown cancels open connections; run() has already closed the socket. Ending
            # normally keeps the stream machinery from logging the cancellation as an error.
            pass

    # A proxy opens an upstream connection per tunnel, often many at once: a short accept queue
    # would turn a burst into refused connections.
    return await asyncio.start_server(on_connection, host, port, backlog=1024)


async def _main(host: str, port: int, name: str, delay: float) -> None:
    server = await serve(host, port, name, delay)
    bound_host, bound_port = server.sockets[0].getsockname()[:2]
    log.info("awesomerpc backend %s listening on %s:%d", name, bound_host, bound_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("awesomerpc backend %s stopping", name)
    # Open connections are cancelled by asyncio.run on the way out and close their sockets.
    server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.awesomerpc.server", description="An awesomerpc example backend.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="port to listen on; 0 picks a free one")
    parser.add_argument("--name", required=True, help="this backend's name, echoed at the start of every reply body")
    parser.add_argument("--delay-ms", type=int, default=0, help="milliseconds every reply waits (plays a slow host; default 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_main(args.host, args.port, args.name, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
