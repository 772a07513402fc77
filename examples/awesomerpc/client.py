"""An asyncio awesomerpc client: many concurrent calls on one connection, matched by flow.

    client = await AwesomeRpcClient.connect("127.0.0.1", 10000)
    reply = await client.call(1, b"hello")          # Reply(flow, cmd, rsp_code, body)
    await client.heartbeat()
    client.close(); await client.wait_closed()       # or: async with await AwesomeRpcClient.connect(...)

``call_sync`` does one call for simple scripts, and ``python -m examples.awesomerpc.client --port
10000 --cmd 1 --body hello`` does one from the shell. ``encode_frame`` (re-exported from the codec)
crafts raw frames for tests.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import NamedTuple

from metabridge.sdk.codec import CodecError, DecodeStatus, Metadata
from examples.awesomerpc.protocol import HEARTBEAT_CMD, AwesomeRpcCodec, encode_frame

__all__ = ["AwesomeRpcClient", "ConnectionClosed", "Reply", "call_sync", "encode_frame"]

READ_CHUNK = 64 * 1024
_FLOW_LIMIT = 1 << 32

log = logging.getLogger("awesomerpc.client")


class ConnectionClosed(ConnectionError):
    """The connection is gone (closed by the server, by ``close()``, or broken), so the call has no reply."""


class Reply(NamedTuple):
    flow: int
    cmd: int
    rsp_code: int
    body: bytes


class AwesomeRpcClient:
    """One awesomerpc connection. Create it with ``await AwesomeRpcClient.connect(host, port)``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, max_frame_size: int | None = None) -> None:
        self._reader = reader
        self._writer = writer
        self._codec = AwesomeRpcCodec() if max_frame_size is None else AwesomeRpcCodec(max_frame_size=max_frame_size)
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self._next_flow = 1
        self._closed_reason: str | None = None
        self._reader_task = asyncio.create_task(self._read_replies())

    @classmethod
    async def connect(cls, host: str, port: int, *, max_frame_size: int | None = None) -> AwesomeRpcClient:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, max_frame_size=max_frame_size)

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    async def call(self, cmd: int, body: bytes = b"", timeout: float = 5.0) -> Reply:
        """Send one request and wait for its reply.

        Raises ConnectionClosed if the connection is or becomes closed before the reply, and
        TimeoutError if no reply comes within ``timeout`` seconds (a late reply is dropped).
        """
        if self._closed_reason is not None:
            raise ConnectionClosed(f"awesomerpc call cmd={cmd}: {self._closed_reason}")
        flow = self._allocate_flow()
        frame = encode_frame(flow, cmd, body)
        reply: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[flow] = reply
        try:
            self._writer.write(frame)
            await self._writer.drain()
            return await asyncio.wait_for(reply, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"awesomerpc call cmd={cmd} flow={flow} got no reply within {timeout}s") from None
        except ConnectionError as exc:
            if isinstance(exc, ConnectionClosed):
                raise
            raise ConnectionClosed(f"awesomerpc call cmd={cmd} flow={flow}: sending failed: {exc}") from exc
        finally:
            if self._pending.get(flow) is reply:
                del self._pending[flow]

    async def heartbeat(self, timeout: float = 5.0) -> Reply:
        return await self.call(HEARTBEAT_CMD, timeout=timeout)

    def close(self) -> None:
        """Close the connection; pending calls raise ConnectionClosed."""
        self._shut("closed by the client")
        self._reader_task.cancel()

    async def wait_closed(self) -> None:
        try:
            await self._reader_task
        except asyncio.CancelledError:
            pass
        try:
            await self._writer.wait_closed()
        except ConnectionError:
            pass

    async def __aenter__(self) -> AwesomeRpcClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    def _allocate_flow(self) -> int:
        # Flows are u32 and wrap; skipping the ones in flight keeps replies unambiguous.
        for _ in range(len(self._pending) + 1):
            flow = self._next_flow
            self._next_flow = flow + 1 if flow + 1 < _FLOW_LIMIT else 1
            if flow not in self._pending:
                return flow
        raise RuntimeError(f"awesomerpc client: all {_FLOW_LIMIT - 1} flow ids are in flight")

    async def _read_replies(self) -> None:
        buffer = bytearray()
        reason = "the server closed the connection"
        try:
            while chunk := await self._reader.read(READ_CHUNK):
                buffer += chunk
                while True:
                    metadata = Metadata()
                    if self._codec.decode(buffer, metadata) is DecodeStatus.WAIT_FOR_DATA:
                        break
                    self._deliver(metadata)
        except CodecError as exc:
            reason = f"the server sent bytes that are not awesomerpc: {exc}"
        except ConnectionError as exc:
            reason = f"the connection broke: {exc}"
        finally:
            # Whatever ended the reader (including a bug or close()), no reply can arrive any more.
            self._shut(reason)

    def _deliver(self, metadata: Metadata) -> None:
        reply = self._pending.pop(metadata.request_id, None)
        if reply is None or reply.done():
            log.debug("dropping a reply for flow %d: no call is waiting for it (timed out?)", metadata.request_id)
            return
        reply.set_result(
            Reply(metadata.request_id, metadata.properties["cmd"], metadata.properties["rsp_code"], metadata.frame[metadata.header_size :])
        )

    def _shut(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        pending, self._pending = self._pending, {}
        for flow, reply in pending.items():
            if not reply.done():
                reply.set_exception(ConnectionClosed(f"awesomerpc call flow={flow}: {self._closed_reason}"))
        self._writer.close()


def call_sync(host: str, port: int, cmd: int, body: bytes = b"", timeout: float = 5.0) -> Reply:
    """One call on a fresh connection, for scripts without an event loop."""

    async def once() -> Reply:
        async with await AwesomeRpcClient.connect(host, port) as client:
            return await client.call(cmd, body, timeout)

    return asyncio.run(once())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.awesomerpc.client", description="Make one awesomerpc call and print the reply.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cmd", type=int, default=1, help="command number (0 = heartbeat)")
    parser.add_argument("--body", default="", help="request body (UTF-8 text)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the reply")
    args = parser.parse_args(argv)
    reply = call_sync(args.host, args.port, args.cmd, args.body.encode(), args.timeout)
    print(f"flow={reply.flow} cmd={reply.cmd} rsp_code={reply.rsp_code} body={reply.body!r}")


if __name__ == "__main__":
    main()
