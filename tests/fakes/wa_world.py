"""A podbay wired with the WhatsApp plugin, as `podbay run` wires it, against the fake
Graph API (Meta) or the fake Twilio API; webhooks are posted, signed, to podbay's real
webhook server."""

from __future__ import annotations

import io
import json
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fakes.agent import FakeAgent
from fakes.whatsapp_api import FakeGraph, FakeTwilio
from fakes.worlds import all_rows, wipe_registry
from podbay.bot import Podbay
from podbay.config import Settings
from podbay.transports.whatsapp import META_PATH, TWILIO_PATH, WhatsAppTransport

ALICE, BOB, EVE = "15550001111", "15550002222", "15550009876"  # admin, operator, unknown
PUBLIC = "https://bot.example.org"


@dataclass
class World:
    bot: Podbay
    transport: WhatsAppTransport
    agent: FakeAgent
    http: aiohttp.ClientSession
    wiped: list[str]
    data_dir: Path
    graph: FakeGraph | None = None
    twilio: FakeTwilio | None = None

    def url(self, path: str) -> str:
        return self.bot.http.local_url(path)

    async def meta(
        self, payload: dict[str, Any], *, signature: str | None = "good"
    ) -> aiohttp.ClientResponse:
        assert self.graph is not None
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if signature == "good":
            headers.update(self.graph.sign(body))
        elif signature is not None:
            headers["X-Hub-Signature-256"] = signature
        async with self.http.post(self.url(META_PATH), data=io.BytesIO(body), headers=headers) as r:
            await r.read()
            return r

    async def say(self, text: str, *, wa_id: str = ALICE, wamid: str | None = None) -> str:
        assert self.graph is not None
        payload = self.graph.text_message(text, wa_id=wa_id, wamid=wamid)
        response = await self.meta(payload)
        assert response.status == 200
        return str(payload["entry"][0]["changes"][0]["value"]["messages"][0]["id"])

    async def twilio_post(
        self, fields: dict[str, str], *, signed: bool = True, url: str | None = None
    ) -> aiohttp.ClientResponse:
        assert self.twilio is not None
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if signed:
            headers.update(self.twilio.sign(url or PUBLIC + TWILIO_PATH, fields))
        body = urllib.parse.urlencode(fields).encode()
        async with self.http.post(self.url(TWILIO_PATH), data=body, headers=headers) as r:
            await r.read()
            return r

    def rows(self) -> str:
        """Every row of every table, as text (to search for secrets)."""
        return all_rows(self.data_dir / "podbay.db")


def meta_settings(graph: FakeGraph, data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        access={"admins": [f"whatsapp:+{ALICE}"], "operators": [f"whatsapp:+{BOB}"]},
        dispatcher={"coalesce_window_ms": 50, "max_window_ms": 200},
        http={"host": "127.0.0.1", "port": 0, "public_url": PUBLIC},
        transports={
            "whatsapp": {
                "enabled": True,
                "provider": "meta",
                "verify_token": graph.verify_token,
                "app_secret": graph.app_secret,
                "access_token": graph.access_token,
                "phone_number_id": graph.phone_number_id,
                "graph_api_base": graph.base_url,
                "graph_api_version": graph.version,
            }
        },
    )


def twilio_settings(twilio: FakeTwilio, data_dir: Path, **extra: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        access={"admins": [f"whatsapp:+{ALICE}"], "operators": [f"whatsapp:+{BOB}"]},
        dispatcher={"coalesce_window_ms": 50, "max_window_ms": 200},
        http={"host": "127.0.0.1", "port": 0, "public_url": PUBLIC},
        transports={
            "whatsapp": {
                "enabled": True,
                "provider": "twilio",
                "account_sid": twilio.account_sid,
                "auth_token": twilio.auth_token,
                "from_number": twilio.from_number,
                "twilio_api_base": twilio.base_url,
                **extra,
            }
        },
    )


async def _world(settings: Settings, **fakes: Any) -> AsyncIterator[World]:
    wiped: list[str] = []
    agent = FakeAgent(auto_release=0.0)
    bot = Podbay(settings, agent=agent, docker=False, registry=wipe_registry(wiped))
    (transport,) = bot.transports  # built by the whatsapp plugin, as `podbay run` does
    assert isinstance(transport, WhatsAppTransport)
    await bot.start()
    http = aiohttp.ClientSession()
    try:
        yield World(bot, transport, agent, http, wiped, settings.data_dir, **fakes)
    finally:
        await http.close()
        await bot.stop()


@pytest.fixture
async def meta_world(tmp_path: Path) -> AsyncIterator[World]:
    async with FakeGraph() as graph:
        async for world in _world(meta_settings(graph, tmp_path / "data"), graph=graph):
            yield world


@pytest.fixture
async def twilio_world(tmp_path: Path) -> AsyncIterator[World]:
    async with FakeTwilio() as twilio:
        async for world in _world(twilio_settings(twilio, tmp_path / "data"), twilio=twilio):
            yield world
