"""A podbay wired with the Slack plugin, as `podbay run` wires it, against the fake Slack.

``slack_world`` (HTTP mode) posts Slack's signed requests to podbay's real webhook server;
``socket_world`` has the fake Socket Mode server send envelopes instead.
"""

from __future__ import annotations

import io
import json
import secrets
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fakes.agent import FakeAgent
from fakes.slack_api import FakeSlack
from fakes.worlds import all_rows, wipe_registry
from podbay.bot import Podbay
from podbay.config import Settings
from podbay.transports.slack import EVENTS_PATH, SlackTransport

ALICE, BOB, EVE = "UALICE", "UBOB", "UEVE"  # admin, operator, unknown


@dataclass
class World:
    fake: FakeSlack
    bot: Podbay
    transport: SlackTransport
    agent: FakeAgent
    http: aiohttp.ClientSession
    wiped: list[str]
    data_dir: Path

    @property
    def url(self) -> str:
        return self.bot.http.local_url(EVENTS_PATH)

    async def post(
        self,
        body: bytes,
        content_type: str,
        *,
        headers: dict[str, str] | None = None,
        signed: bool = True,
        timeout: float = 10,
    ) -> aiohttp.ClientResponse:
        sent = {"Content-Type": content_type, **(self.fake.sign(body) if signed else {})}
        sent.update(headers or {})
        async with self.http.post(
            self.url,
            data=io.BytesIO(body),
            headers=sent,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            await response.read()
            return response

    async def command(self, text: str, *, user: str = ALICE, channel: str = "C0001") -> int:
        payload = self.fake.slash_command(text, user_id=user, channel_id=channel)
        body = urllib.parse.urlencode(payload).encode()
        response = await self.post(body, "application/x-www-form-urlencoded", timeout=3)
        return response.status

    async def event(self, event: dict[str, Any], *, retry: int | None = None) -> dict[str, Any]:
        envelope = self.fake.event_callback(event)
        await self.deliver_event(envelope, retry=retry)
        return envelope

    async def deliver_event(self, envelope: dict[str, Any], *, retry: int | None = None) -> int:
        headers = {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"}
        response = await self.post(
            json.dumps(envelope).encode(), "application/json", headers=headers if retry else None
        )
        return response.status

    async def click(self, payload: dict[str, Any]) -> int:
        body = urllib.parse.urlencode({"payload": json.dumps(payload)}).encode()
        response = await self.post(body, "application/x-www-form-urlencoded")
        return response.status

    def rows(self) -> str:
        """Every row of every table, as text (to search for secrets)."""
        return all_rows(self.data_dir / "podbay.db")


def message_event(
    text: str,
    *,
    user: str = ALICE,
    channel: str = "C0001",
    channel_type: str = "channel",
    kind: str = "app_mention",
    thread_ts: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": kind,
        "user": user,
        "text": text,
        "ts": f"1700000{secrets.randbelow(10**6):06d}.{secrets.randbelow(10**6):06d}",
        "channel": channel,
        "channel_type": channel_type,
        "event_ts": "1700000000.000001",
        **extra,
    }
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


def block_actions(
    fake: FakeSlack, prompt: dict[str, Any], kind: str, *, user: str, channel: str = "C0001"
) -> dict[str, Any]:
    """The ``block_actions`` payload of a click on the prompt's Confirm/Cancel button."""
    message = prompt["message"]
    button = next(
        element
        for block in message["blocks"]
        if block["type"] == "actions"
        for element in block["elements"]
        if element["action_id"] == f"podbay.{kind}"
    )
    return {
        "type": "block_actions",
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": "TFAKE"},
        "api_app_id": "AFAKE",
        "token": "deprecated-verification-token",
        "container": {"type": "message", "message_ts": prompt["ts"], "channel_id": channel},
        "trigger_id": f"t.{secrets.token_hex(6)}",
        "team": {"id": fake.team_id, "domain": "fake"},
        "channel": {"id": channel, "name": "general"},
        "message": {**message, "ts": prompt["ts"]},
        "response_url": fake.response_url("click"),
        "actions": [
            {
                "type": "button",
                "action_id": button["action_id"],
                "block_id": "b1",
                "text": button["text"],
                "value": button["value"],
                "action_ts": f"1700000000.{secrets.randbelow(10**6):06d}",
            }
        ],
    }


def slack_settings(fake: FakeSlack, data_dir: Path, **slack: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        access={"admins": [f"slack:{ALICE}"], "operators": [f"slack:{BOB}"]},
        dispatcher={"coalesce_window_ms": 50, "max_window_ms": 200},
        http={"host": "127.0.0.1", "port": 0},
        transports={
            "slack": {
                "enabled": True,
                "bot_token": fake.bot_token,
                "signing_secret": fake.signing_secret,
                "app_token": fake.app_token,
                "api_base_url": fake.base_url,
                **slack,
            }
        },
    )


async def _world(tmp_path: Path, **slack: Any) -> AsyncIterator[World]:
    fake = FakeSlack()
    await fake.start()
    wiped: list[str] = []
    agent = FakeAgent(auto_release=0.0)
    settings = slack_settings(fake, tmp_path / "data", **slack)
    bot = Podbay(settings, agent=agent, docker=False, registry=wipe_registry(wiped))
    (transport,) = bot.transports  # built by the slack plugin, as `podbay run` does
    assert isinstance(transport, SlackTransport)
    await bot.start()
    http = aiohttp.ClientSession()
    try:
        yield World(fake, bot, transport, agent, http, wiped, settings.data_dir)
    finally:
        await http.close()
        await bot.stop()
        await fake.stop()


@pytest.fixture
async def slack_world(tmp_path: Path) -> AsyncIterator[World]:
    async for world in _world(tmp_path):
        yield world


@pytest.fixture
async def socket_world(tmp_path: Path) -> AsyncIterator[World]:
    async for world in _world(tmp_path, mode="socket"):
        yield world
