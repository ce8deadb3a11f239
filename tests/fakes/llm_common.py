"""What the fake hosted-LLM servers share: an aiohttp app on 127.0.0.1 that records
every request and lets a test wait for the request it expects.

The concrete fakes are ``fakes.anthropic_api.FakeAnthropic`` and
``fakes.openai_api.FakeOpenAI``; this module holds only the plumbing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from aiohttp import web

DEFAULT_WAIT_S = 20.0


@dataclass
class RecordedRequest:
    """One HTTP request as the fake received it."""

    method: str
    path: str
    query: dict[str, str]
    # Lower-cased header names; every header, so tests can check the API key sent.
    headers: dict[str, str]
    raw: bytes
    # The parsed JSON body, or None when the body is empty or not JSON.
    body: Any
    # What the fake did with it: "script" (consumed a scripted turn), "default" (the
    # script was empty), "side" (an auxiliary call answered without the script), or
    # the name of another endpoint ("count_tokens", "models", "not_found", ...).
    handled_as: str = ""
    # The scripted turn's kind ("text", "tool_use", "error", "hang", ...), when one was used.
    turn_kind: str = ""
    # time.monotonic() when the request arrived (to see a client's retry pacing).
    at: float = 0.0

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class _Waiter:
    predicate: Callable[[RecordedRequest], bool]
    future: asyncio.Future[RecordedRequest] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class RecordingServer:
    """An aiohttp server on 127.0.0.1 with a random free port that records every request.

    Subclasses add routes in ``_routes`` and call ``_record`` first thing in each handler.
    Use as ``async with Fake() as fake:``; ``close`` also releases hanging streams.
    """

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self._waiters: list[_Waiter] = []
        self._runner: web.AppRunner | None = None
        self._port = 0
        # Set by close(): hanging handlers wait on it, so shutdown never blocks on them.
        self._closing = asyncio.Event()
        # Set once a "hang" turn has sent its partial stream: the client is now waiting.
        self.hanging = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------

    def _routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> Self:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self._routes(app)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        # A short shutdown grace: hanging streams are released by _closing anyway.
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])
        return self

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.cancel()
        self._waiters.clear()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def port(self) -> int:
        return self._port

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    # -- recording ---------------------------------------------------------------

    async def _record(self, request: web.Request) -> RecordedRequest:
        raw = await request.read()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            raw=raw,
            body=body,
            at=time.monotonic(),
        )
        self.requests.append(recorded)
        return recorded

    def _notify(self, recorded: RecordedRequest) -> None:
        """Wake waiters once the request has been classified (handled_as is set)."""
        for waiter in list(self._waiters):
            if not waiter.future.done() and waiter.predicate(recorded):
                waiter.future.set_result(recorded)
                self._waiters.remove(waiter)

    async def wait_for(
        self,
        predicate: Callable[[RecordedRequest], bool],
        timeout: float = DEFAULT_WAIT_S,
    ) -> RecordedRequest:
        """The first request (already received or future) that satisfies ``predicate``."""
        for recorded in self.requests:
            if recorded.handled_as and predicate(recorded):
                return recorded
        waiter = _Waiter(predicate)
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record(request)
        recorded.handled_as = "not_found"
        self._notify(recorded)
        return web.json_response(
            {"error": {"type": "not_found_error", "message": f"no route {request.path}"}},
            status=404,
        )

    async def _hang(self, response: web.StreamResponse) -> None:
        """Keep a started stream open until the server closes (the "hang mid-stream" turn)."""
        self.hanging.set()
        await self._closing.wait()
        del response  # nothing more is written: the client sees a stream that never ends


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event: ``event:`` line, one-line JSON ``data:``, blank line."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def start_sse(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
    response = web.StreamResponse(
        status=200,
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers},
    )
    await response.prepare(request)
    return response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
