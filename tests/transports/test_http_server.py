"""The webhook server, exercised over real HTTP on 127.0.0.1 with an ephemeral port."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import pytest
from aiohttp import web

from podbay.config import HttpConfig
from podbay.errors import ConfigError
from podbay.transports.http import WebhookServer

LIMIT = 2048
TIMEOUT_S = 5.0


def _config(**overrides: object) -> HttpConfig:
    values: dict[str, object] = {"host": "127.0.0.1", "port": 0, "max_body_bytes": LIMIT}
    return HttpConfig.model_validate({**values, **overrides})


class Recorded:
    """What the test route saw: how often it ran and the bodies it read in full."""

    def __init__(self) -> None:
        self.calls = 0
        self.bodies: list[bytes] = []


class LogWatch(logging.Handler):
    """Records of podbay.http as they are emitted; a test awaits the one it expects.

    The access line is written after the response went out, so a client can see the
    response first: waiting on the record is the synchronisation.
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self._changed.set()

    async def wait_for(self, predicate: Callable[[str], bool]) -> str:
        async with asyncio.timeout(TIMEOUT_S):
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
def recorded() -> Recorded:
    return Recorded()


@pytest.fixture
def watch(caplog: pytest.LogCaptureFixture) -> Iterator[LogWatch]:
    caplog.set_level(logging.DEBUG)  # every logger, aiohttp's included
    handler = LogWatch()
    logger = logging.getLogger("podbay.http")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@pytest.fixture
async def server(recorded: Recorded, watch: LogWatch) -> AsyncIterator[WebhookServer]:
    async def events(request: web.Request) -> web.StreamResponse:
        recorded.calls += 1
        recorded.bodies.append(await request.read())
        return web.Response(text="received")

    async def boom(request: web.Request) -> web.StreamResponse:
        raise RuntimeError("boom SECRETX")

    srv = WebhookServer(_config())
    srv.add_route("POST", "/slack/events", events)
    srv.add_route("get", "/boom", boom)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_healthz_and_mounted_routes_answer(
    server: WebhookServer, client: aiohttp.ClientSession, recorded: Recorded
) -> None:
    assert server.port not in (0, 8765)
    assert server.local_url("/healthz") == f"http://127.0.0.1:{server.port}/healthz"
    async with client.get(server.local_url("/healthz")) as resp:
        assert resp.status == 200
        assert await resp.json() == {"ok": True}
    async with client.post(server.local_url("/slack/events"), data=b"hello") as resp:
        assert resp.status == 200
        assert await resp.text() == "received"
    assert recorded.bodies == [b"hello"]
    assert server.routes == [("POST", "/slack/events"), ("GET", "/boom")]
    assert server.needed


async def test_unknown_path_is_404_and_wrong_method_is_405(
    server: WebhookServer, client: aiohttp.ClientSession, recorded: Recorded
) -> None:
    async with client.get(server.local_url("/nowhere")) as resp:
        assert resp.status == 404
    async with client.get(server.local_url("/slack/events")) as resp:
        assert resp.status == 405
    assert recorded.calls == 0


async def test_content_length_over_the_limit_is_413_and_the_handler_never_runs(
    server: WebhookServer, client: aiohttp.ClientSession, recorded: Recorded
) -> None:
    url = server.local_url("/slack/events")
    async with client.post(url, data=b"x" * (LIMIT + 1)) as resp:
        assert resp.status == 413
        assert resp.content_type == "text/plain"
        assert f"limit {LIMIT} bytes" in await resp.text()
    assert recorded.calls == 0
    # Exactly the limit is accepted.
    async with client.post(url, data=b"y" * LIMIT) as resp:
        assert resp.status == 200
    assert recorded.bodies == [b"y" * LIMIT]


async def test_announced_oversized_body_is_refused_before_it_is_sent(
    server: WebhookServer, recorded: Recorded
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(
            b"POST /slack/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000000\r\n\r\n"
        )
        await writer.drain()
        async with asyncio.timeout(TIMEOUT_S):
            status = await reader.readline()
    finally:
        writer.close()
        await writer.wait_closed()
    assert status.startswith(b"HTTP/1.1 413 ")
    assert recorded.calls == 0


async def test_chunked_body_growing_over_the_limit_is_413(
    server: WebhookServer, client: aiohttp.ClientSession, recorded: Recorded
) -> None:
    async def chunks(count: int) -> AsyncIterator[bytes]:
        for _ in range(count):
            yield b"z" * 1024

    url = server.local_url("/slack/events")
    async with client.post(url, data=chunks(3)) as resp:
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
        assert resp.status == 413
        assert f"limit {LIMIT} bytes" in await resp.text()
    assert recorded.calls == 1 and recorded.bodies == []
    async with client.post(url, data=chunks(2)) as resp:
        assert resp.status == 200
    assert recorded.bodies == [b"z" * 2048]


async def test_access_log_has_the_path_but_no_query_header_or_body(
    server: WebhookServer,
    client: aiohttp.ClientSession,
    watch: LogWatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with client.post(
        server.local_url("/slack/events?token=SECRETQ"),
        data=b'{"text": "SECRETB"}',
        headers={"Authorization": "Bearer SECRETH"},
    ) as resp:
        assert resp.status == 200
    line = await watch.wait_for(lambda m: m.startswith("POST /slack/events "))
    assert " 200 " in line and "bytes" in line and line.endswith(" ms")
    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert "/slack/events" in logged
    for secret in ("SECRETQ", "SECRETB", "SECRETH", "token="):
        assert secret not in logged


async def test_handler_that_raises_gets_a_generic_500_and_a_logged_traceback(
    server: WebhookServer,
    client: aiohttp.ClientSession,
    watch: LogWatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with client.get(server.local_url("/boom?q=SECRETQ")) as resp:
        assert resp.status == 500
        body = await resp.text()
    assert "SECRETX" not in body and "Traceback" not in body and "RuntimeError" not in body
    await watch.wait_for(lambda m: m.startswith("GET /boom 500 "))
    failures = [r for r in caplog.records if r.name == "podbay.http" and r.exc_info]
    assert len(failures) == 1
    assert "/boom" in failures[0].getMessage()
    assert "SECRETQ" not in caplog.text


async def test_port_in_use_is_a_config_error_naming_http_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = WebhookServer(_config(port=port))
        with pytest.raises(ConfigError) as caught:
            await srv.start()
        await srv.stop()
    message = str(caught.value)
    assert "http.port" in message and "http.host" in message
    assert f"127.0.0.1:{port}" in message
    assert "in use" in message  # the OS error
    assert "set http.port to a free port" in message


async def test_routes_are_checked_and_closed_once_started() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response()

    srv = WebhookServer(_config())
    assert not srv.needed and srv.routes == []
    with pytest.raises(ValueError, match="/healthz"):
        srv.add_route("GET", "/healthz", handler)
    srv.add_route("POST", "/hook", handler)
    with pytest.raises(ValueError, match="POST /hook"):
        srv.add_route("post", "/hook", handler)
    srv.add_route("GET", "/hook", handler)  # another method on the same path is fine
    await srv.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            srv.add_route("POST", "/late", handler)
        assert srv.routes == [("POST", "/hook"), ("GET", "/hook")]
    finally:
        await srv.stop()


async def test_stop_is_idempotent_and_closes_the_port(client: aiohttp.ClientSession) -> None:
    never_started = WebhookServer(_config())
    await never_started.stop()
    await never_started.stop()

    srv = WebhookServer(_config())
    await srv.start()
    url = srv.local_url("/healthz")
    async with client.get(url) as resp:
        assert resp.status == 200
    await srv.stop()
    await srv.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with client.get(url):
            pass


def test_urls() -> None:
    srv = WebhookServer(_config(host="::1", port=8765))
    assert srv.port == 8765
    assert srv.local_url("/slack/events") == "http://[::1]:8765/slack/events"
    assert srv.public_url("/slack/events") == "http://[::1]:8765/slack/events"
    public = WebhookServer(_config(public_url="https://bot.example.org/"))
    assert public.public_url("/slack/events") == "https://bot.example.org/slack/events"
