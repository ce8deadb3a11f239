"""A loopback HTTP/1.1 proxy in front of a server, like nginx in front of Synapse: while the
server is down, every request gets ``502 Bad Gateway`` and is recorded, so a test can count
a client's reconnection attempts (one request, one connection: nothing is retried here)."""

from __future__ import annotations

import asyncio
import contextlib
import time


class CountingProxy:
    """``127.0.0.1:<port>`` → ``127.0.0.1:<upstream_port>``. ``refused`` holds the monotonic
    time of every request whose request line contains ``count_path`` and which could not be
    passed on because the upstream refused the connection."""

    def __init__(self, upstream_port: int, count_path: str = "/sync") -> None:
        self.upstream_port = upstream_port
        self.count_path = count_path
        self.refused: list[float] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def wait_for_refusals(self, count: int, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while len(self.refused) < count:
                self._changed.clear()
                await self._changed.wait()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            request_line = await reader.readline()
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            if self.count_path.encode() in request_line:
                self.refused.append(time.monotonic())
                self._changed.set()
            writer.write(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\n"
                b"Content-Length: 11\r\nConnection: close\r\n\r\nBad Gateway"
            )
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.transport.abort()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        up_writer.write(request_line)
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer)),
            asyncio.create_task(self._pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)
        self._pipes.difference_update(pipes)
        for end in (writer, up_writer):
            end.transport.abort()
            self._writers.discard(end)

    @staticmethod
    async def _pipe(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await source.read(65536):
                target.write(data)
                await target.drain()
        target.transport.abort()  # one side gone: the whole connection is
