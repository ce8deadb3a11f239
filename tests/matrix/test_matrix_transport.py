"""The Matrix transport against a real Synapse homeserver, driven by a human nio client."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fakes.agent import FakeAgent
from nio import AsyncClient, JoinedMembersResponse, RoomCreateResponse, SyncResponse
from synapse_server import SynapseServer

from podbay.bot import Podbay
from podbay.commands.registry import Registry
from podbay.config import Settings
from podbay.transports.matrix import MatrixTransport


@dataclass
class Human:
    """A person in a Matrix client: sends messages, reads the bot's notices."""

    client: AsyncClient
    notices: list[dict[str, Any]] = field(default_factory=list)
    since: str | None = None

    async def sync_once(self, timeout_ms: int = 1000) -> None:
        response = await self.client.sync(
            timeout=timeout_ms,
            since=self.since,
            sync_filter={"room": {"timeline": {"limit": 500}}},
        )
        assert isinstance(response, SyncResponse), response
        self.since = response.next_batch
        for room in response.rooms.join.values():
            for event in room.timeline.events:
                content = event.source.get("content", {})
                if content.get("msgtype") == "m.notice":
                    self.notices.append({**content, "event_id": event.event_id})

    async def wait_for_notice(self, fragment: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for notice in self.notices:
                if fragment in notice.get("body", ""):
                    return notice
            await self.sync_once()
        raise AssertionError(f"no notice with {fragment!r}; got {self.notices}")

    async def say(self, room_id: str, text: str) -> None:
        response = await self.client.room_send(
            room_id, "m.room.message", {"msgtype": "m.text", "body": text}
        )
        assert hasattr(response, "event_id"), response


@dataclass
class MatrixWorld:
    server: SynapseServer
    bot_id: str
    alice: Human
    agent: FakeAgent
    podbay: Podbay
    transport: MatrixTransport


async def human(server: SynapseServer, localpart: str) -> Human:
    user_id = await server.register(localpart, "pw-" + localpart)
    client = AsyncClient(server.url, user_id)
    await client.login("pw-" + localpart)
    person = Human(client)
    await person.sync_once(0)
    return person


def bot_settings(
    synapse: SynapseServer,
    data_dir: Path,
    bot_id: str,
    admins: list[str],
    dispatcher: dict[str, int] | None = None,
    **matrix: object,
) -> Settings:
    return Settings(
        data_dir=data_dir,
        access={"admins": admins},
        dispatcher=dispatcher or {"coalesce_window_ms": 100, "max_window_ms": 500},
        transports={
            "matrix": {
                "enabled": True,
                "homeserver": synapse.url,
                "user_id": bot_id,
                "password": "bot-password",
                **matrix,
            }
        },
    )


def podbay_for(
    settings: Settings, agent: FakeAgent, registry: Registry | None = None
) -> tuple[Podbay, MatrixTransport]:
    """podbay wired as `podbay run` wires it, with the test's agent (start it yourself)."""
    bot = Podbay(settings, agent=agent, docker=False, registry=registry)
    (transport,) = bot.transports  # built by the matrix plugin, as `podbay run` does
    assert isinstance(transport, MatrixTransport)
    return bot, transport


def delivered(agent: FakeAgent) -> list[str]:
    """Every message the agent received, in order (batches are joined by blank lines)."""
    return [p for run in agent.runs for p in run.request.prompt.split("\n\n")]


async def wait_for_deliveries(agent: FakeAgent, count: int, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:  # the agent runs in another task; poll what it has received so far
        if len(delivered(agent)) >= count or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1)  # nothing more may trickle in
    return delivered(agent)


@pytest.fixture
async def world(synapse: SynapseServer, tmp_path: Path) -> AsyncIterator[MatrixWorld]:
    tag = secrets.token_hex(3)
    bot_id = await synapse.register(f"podbay{tag}", "bot-password")
    alice = await human(synapse, f"alice{tag}")
    settings = bot_settings(
        synapse,
        tmp_path / "data",
        bot_id,
        [f"matrix:{alice.client.user_id}"],
        {"coalesce_window_ms": 300, "max_window_ms": 2000, "max_queued_messages": 100},
    )
    agent = FakeAgent(auto_release=0.05)
    bot, transport = podbay_for(settings, agent)
    await bot.start()
    await asyncio.wait_for(transport.ready.wait(), 30)
    try:
        yield MatrixWorld(synapse, bot_id, alice, agent, bot, transport)
    finally:
        await bot.stop()
        await alice.client.close()


async def wait_until_member(client: AsyncClient, room_id: str, user_id: str) -> None:
    """Wait until ``user_id`` has joined ``room_id`` (as seen by ``client``)."""
    deadline = time.monotonic() + 30
    while True:
        members = await client.joined_members(room_id)
        if isinstance(members, JoinedMembersResponse) and user_id in {
            m.user_id for m in members.members
        }:
            return
        assert time.monotonic() < deadline, f"{user_id} never joined {room_id}"
        await asyncio.sleep(0.2)


def restarted(world: MatrixWorld) -> Podbay:
    """A new podbay on the same data dir, as after a process restart (start it yourself)."""
    return podbay_for(world.podbay.settings, world.agent)[0]


async def dm_with_bot(world: MatrixWorld) -> str:
    created = await world.alice.client.room_create(invite=[world.bot_id], is_direct=True)
    assert isinstance(created, RoomCreateResponse), created
    await wait_until_member(world.alice.client, created.room_id, world.bot_id)
    return created.room_id


async def test_invited_bot_answers_help_and_status_with_html_notices(world: MatrixWorld) -> None:
    room = await dm_with_bot(world)
    await world.alice.say(room, "help")
    notice = await world.alice.wait_for_notice("Commands:")
    assert notice["format"] == "org.matrix.custom.html"
    assert "<code>status [project]</code>" in notice["formatted_body"]
    assert "`" not in notice["body"], "the plain body is rendered, not raw Markdown"
    await world.alice.say(room, "!status")
    status = await world.alice.wait_for_notice("Projects")
    assert "<strong>Projects</strong>" in status["formatted_body"]


async def test_a_burst_of_50_messages_reaches_the_agent_exactly_once(world: MatrixWorld) -> None:
    room = await dm_with_bot(world)
    sent = [f"burst message {i:02d}" for i in range(50)]
    for text in sent:
        await world.alice.say(room, text)
    received = await wait_for_deliveries(world.agent, 50)
    assert sorted(received) == sent, "every message exactly once"
    assert received == sent, "in order"
    assert 1 <= len(world.agent.runs) < 50, "coalesced into a few runs"


async def test_the_bot_never_processes_its_own_notices(world: MatrixWorld) -> None:
    room = await dm_with_bot(world)
    await world.alice.say(room, "explain the build")
    await world.alice.wait_for_notice("echo: explain the build")
    await asyncio.sleep(1.5)  # a sync or two later: the bot saw its own notice and skipped it
    assert [r.request.prompt for r in world.agent.runs] == ["explain the build"]
    store = world.podbay.store
    assert store is not None
    cursor = await store._db.execute(  # type: ignore[attr-defined]
        "SELECT count(*) FROM inbox WHERE sender_id = ?", (world.bot_id,)
    )
    row = await cursor.fetchone()
    assert row is not None and tuple(row) == (0,)


async def test_a_user_missing_from_access_gets_nothing_executed(world: MatrixWorld) -> None:
    mallory = await human(world.server, f"mallory{secrets.token_hex(3)}")
    try:
        room = await dm_with_bot(world)
        invited = await world.alice.client.room_invite(room, mallory.client.user_id)
        assert not hasattr(invited, "status_code"), invited
        await mallory.client.join(room)
        for text in ("status", "delete everything", "rewrite it in rust"):
            await mallory.say(room, text)
        refusal = await mallory.wait_for_notice("not allowed")
        assert mallory.client.user_id in refusal["body"]
        await asyncio.sleep(1.5)
        await mallory.sync_once()
        refusals = [n for n in mallory.notices if "not allowed" in n["body"]]
        assert len(refusals) == 1
        assert world.agent.runs == []
        assert not any("Projects" in n["body"] for n in mallory.notices)
    finally:
        await mallory.client.close()


async def test_invites_from_strangers_are_not_joined(world: MatrixWorld) -> None:
    stranger = await human(world.server, f"stranger{secrets.token_hex(3)}")
    try:
        created = await stranger.client.room_create(invite=[world.bot_id])
        assert isinstance(created, RoomCreateResponse)
        await asyncio.sleep(2)
        members = await stranger.client.joined_members(created.room_id)
        assert isinstance(members, JoinedMembersResponse)
        assert world.bot_id not in {m.user_id for m in members.members}
    finally:
        await stranger.client.close()


async def test_restart_answers_nothing_twice_and_processes_what_came_meanwhile(
    world: MatrixWorld,
) -> None:
    room = await dm_with_bot(world)
    await world.alice.say(room, "before the restart")
    await world.alice.wait_for_notice("echo: before the restart")
    await world.podbay.stop()
    await world.alice.say(room, "while podbay was down")
    settings = world.podbay.settings
    again = restarted(world)
    await again.start()
    try:
        await world.alice.wait_for_notice("echo: while podbay was down")
        await asyncio.sleep(1.5)
        prompts = [r.request.prompt for r in world.agent.runs]
        assert prompts == ["before the restart", "while podbay was down"]
        state = (settings.data_dir / "matrix" / "state.json").read_text()
        assert "access_token" in state and "next_batch" in state
    finally:
        await again.stop()


async def test_confirmation_by_reaction_from_the_requester_only(
    synapse: SynapseServer, tmp_path: Path
) -> None:
    from podbay.commands.catalog import build_registry
    from podbay.commands.context import CommandContext
    from podbay.commands.registry import CommandSpec, Invocation, Positional
    from podbay.commands.roles import Role

    tag = secrets.token_hex(3)
    bot_id = await synapse.register(f"podbay{tag}", "bot-password")
    alice = await human(synapse, f"alice{tag}")
    bob = await human(synapse, f"bob{tag}")
    done: list[str] = []

    async def wipe(ctx: CommandContext, inv: Invocation) -> None:
        async def action() -> None:
            done.append(inv.args["thing"])
            await ctx.reply(f"wiped {inv.args['thing']}")

        await ctx.propose(f"Wipe {inv.args['thing']}?", action)

    registry = build_registry()
    registry.add(
        CommandSpec(
            "wipe", "test", wipe, kind="job", role=Role.OPERATOR,
            positionals=(Positional("thing"),),
        )
    )  # fmt: skip
    allowed = {f"matrix:{alice.client.user_id}", f"matrix:{bob.client.user_id}"}
    settings = bot_settings(synapse, tmp_path / "data", bot_id, sorted(allowed))
    bot, transport = podbay_for(settings, FakeAgent(0.0), registry)
    await bot.start()
    try:
        await asyncio.wait_for(transport.ready.wait(), 30)
        created = await alice.client.room_create(invite=[bot_id, bob.client.user_id])
        assert isinstance(created, RoomCreateResponse)
        room = created.room_id
        await bob.client.join(room)
        await wait_until_member(alice.client, room, bot_id)
        await alice.say(room, "!wipe cache")
        await alice.wait_for_notice("Reply confirm")
        prompt = await alice.wait_for_notice("Wipe cache?")
        prompt_id = prompt["event_id"]

        async def react(person: Human) -> None:
            await person.client.room_send(
                room,
                "m.reaction",
                {"m.relates_to": {"rel_type": "m.annotation", "event_id": prompt_id, "key": "✅"}},
            )

        await react(bob)
        # Decided in the command layer: bob is told it is not his to confirm, and nothing runs.
        await alice.wait_for_notice(f"Only matrix:{alice.client.user_id} can confirm")
        assert done == [], "someone else's reaction decides nothing"
        await react(alice)
        await alice.wait_for_notice("wiped cache")
        assert done == ["cache"]
    finally:
        await bot.stop()
        await alice.client.close()
        await bob.client.close()


async def test_a_token_in_a_group_room_is_redacted_and_refused(world: MatrixWorld) -> None:
    carol = await human(world.server, f"carol{secrets.token_hex(3)}")
    try:
        created = await world.alice.client.room_create(
            invite=[world.bot_id, carol.client.user_id],
            # Everyone may redact here, podbay included (it has no elevated power level).
            power_level_override={"redact": 0},
        )
        assert isinstance(created, RoomCreateResponse)
        room = created.room_id
        await carol.client.join(room)
        await wait_until_member(world.alice.client, room, world.bot_id)
        token = "ghp_" + "s" * 30
        response = await world.alice.client.room_send(
            room, "m.room.message", {"msgtype": "m.text", "body": f"!new project x --token {token}"}
        )
        event_id = response.event_id  # type: ignore[union-attr]
        await world.alice.wait_for_notice("I redacted your message")
        await world.alice.wait_for_notice("private 1:1")
        context = await world.alice.client.room_context(room, event_id, limit=0)
        assert context.event.source.get("content", {}) == {}, "the message is redacted"  # type: ignore[union-attr]
        assert all(token not in n["body"] for n in world.alice.notices)
    finally:
        await carol.client.close()


async def test_an_encrypted_room_is_announced_not_ignored(world: MatrixWorld) -> None:
    created = await world.alice.client.room_create(
        invite=[world.bot_id],
        initial_state=[
            {
                "type": "m.room.encryption",
                "state_key": "",
                "content": {"algorithm": "m.megolm.v1.aes-sha2"},
            }
        ],
    )
    assert isinstance(created, RoomCreateResponse)
    room = created.room_id
    await wait_until_member(world.alice.client, room, world.bot_id)
    # A client without encryption support sends what an encrypting client would: an
    # m.room.encrypted event (its ciphertext is irrelevant: podbay cannot read it anyway).
    await world.alice.client.room_send(
        room,
        "m.room.encrypted",
        {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "AwgA", "sender_key": "k",
         "session_id": "s", "device_id": "D"},
    )  # fmt: skip
    notice = await world.alice.wait_for_notice("end-to-end encrypted")
    assert "not support" in notice["body"]
    assert world.agent.runs == []


async def test_messages_older_than_the_catch_up_age_get_one_missed_reply(
    world: MatrixWorld,
) -> None:
    room = await dm_with_bot(world)
    await world.alice.say(room, "hello")
    await world.alice.wait_for_notice("echo: hello")
    await world.podbay.stop()
    settings = world.podbay.settings
    settings.transports.matrix.catch_up_max_age_s = 1
    await world.alice.say(room, "stale one")
    await world.alice.say(room, "stale two")
    await asyncio.sleep(2.5)
    again = restarted(world)
    await again.start()
    try:
        await world.alice.wait_for_notice("missed while offline")
        await asyncio.sleep(1.5)
        await world.alice.sync_once()
        assert len([n for n in world.alice.notices if "missed while" in n["body"]]) == 1
        assert [r.request.prompt for r in world.agent.runs] == ["hello"]
    finally:
        await again.stop()


async def test_the_bot_leaves_a_room_where_no_allowed_user_remains(world: MatrixWorld) -> None:
    carol = await human(world.server, f"carol{secrets.token_hex(3)}")
    try:
        created = await world.alice.client.room_create(invite=[world.bot_id, carol.client.user_id])
        assert isinstance(created, RoomCreateResponse)
        room = created.room_id
        await carol.client.join(room)

        async def bot_in_room() -> bool:
            members = await carol.client.joined_members(room)
            assert isinstance(members, JoinedMembersResponse)
            return world.bot_id in {m.user_id for m in members.members}

        await wait_until_member(carol.client, room, world.bot_id)
        await world.alice.client.room_leave(room)
        deadline = time.monotonic() + 30
        while await bot_in_room():
            assert time.monotonic() < deadline, "the bot stayed with nobody it serves"
            await asyncio.sleep(0.2)
    finally:
        await carol.client.close()


def test_backoff_grows_with_jitter_is_capped_and_honours_retry_after() -> None:
    from podbay.retry import Backoff, max_attempts_within

    backoff = Backoff(base=0.5, cap=8)
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [min(8, 0.5 * 2**i) for i in range(8)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert max(delays) <= 8
    assert backoff.next_delay(retry_after_s=2.5) == 2.5
    assert backoff.next_delay(retry_after_s=600) == 8, "a server's wait is capped too"
    backoff.reset()
    assert backoff.next_delay() <= 0.5
    # Minimum waits 0.25, 0.5, 1, 2, 4 add up to 7.75 s: 8 s hold at most 6 attempts.
    assert max_attempts_within(Backoff(base=0.5, cap=8), 8) == 6


async def test_a_burst_larger_than_the_sync_limit_is_backfilled(world: MatrixWorld) -> None:
    room = await dm_with_bot(world)
    await world.alice.say(room, "warm up")
    await world.alice.wait_for_notice("echo: warm up")
    # While podbay is down 40 messages pile up; its next sync (limit 10) comes back limited.
    await world.podbay.stop()
    settings = world.podbay.settings
    settings.transports.matrix.sync_timeline_limit = 10
    sent = [f"flood {i:02d}" for i in range(40)]
    for text in sent:
        await world.alice.say(room, text)
    world.agent.runs.clear()
    again = restarted(world)
    await again.start()
    try:
        received = await wait_for_deliveries(world.agent, 40)
        assert sorted(received) == sent, "the limited timeline was backfilled"
    finally:
        await again.stop()


async def test_messages_from_before_the_first_start_are_never_answered(
    synapse: SynapseServer, tmp_path: Path
) -> None:
    tag = secrets.token_hex(3)
    bot_id = await synapse.register(f"podbay{tag}", "bot-password")
    alice = await human(synapse, f"alice{tag}")
    created = await alice.client.room_create()
    assert isinstance(created, RoomCreateResponse)
    room = created.room_id
    await alice.say(room, "ancient history, before podbay ever ran")
    await asyncio.sleep(1.1)  # Matrix timestamps are in ms: keep the order unambiguous
    settings = bot_settings(
        synapse,
        tmp_path / "data",
        bot_id,
        [f"matrix:{alice.client.user_id}"],
        ambient_rooms=[room],
    )
    agent = FakeAgent(auto_release=0.0)
    bot, transport = podbay_for(settings, agent)
    await bot.start()
    try:
        await asyncio.wait_for(transport.ready.wait(), 30)
        await alice.client.room_invite(room, bot_id)
        await wait_until_member(alice.client, room, bot_id)
        await alice.say(room, "fresh request")
        await alice.wait_for_notice("echo: fresh request")
        await asyncio.sleep(1)
        assert [r.request.prompt for r in agent.runs] == ["fresh request"]
    finally:
        await bot.stop()
        await alice.client.close()


async def test_typing_is_shown_and_renewed_while_the_agent_works(world: MatrixWorld) -> None:
    from nio import TypingNoticeEvent

    world.transport.typing_timeout_ms = 1500  # renewed every ~1 s; expires 1.5 s after a stop
    world.agent.auto_release = None  # the run lasts until released
    room = await dm_with_bot(world)

    async def typing_users() -> set[str]:
        # A fresh initial sync reports who is typing now (an incremental one only changes).
        alice = world.alice.client
        observer = AsyncClient(world.server.url, alice.user_id)
        observer.restore_login(alice.user_id, alice.device_id, alice.access_token)
        try:
            response = await observer.sync(timeout=0)
        finally:
            await observer.close()
        assert isinstance(response, SyncResponse)
        joined = response.rooms.join.get(room)
        users: set[str] = set()
        for event in joined.ephemeral if joined else []:
            if isinstance(event, TypingNoticeEvent):
                users = set(event.users)
        return users

    await world.alice.say(room, "think for a while")
    run = await world.agent.next_started(timeout=30)
    assert world.bot_id in await typing_users()
    await asyncio.sleep(3)  # twice the typing timeout: only renewal keeps it on
    assert world.bot_id in await typing_users()
    world.transport.typing_timeout_ms = 60000  # from now on only an explicit stop clears it
    await asyncio.sleep(1.2)  # the renewal loop picks up the long timeout
    await world.alice.sync_once(0)  # typing changes are reported from here on
    run.release.set()
    await world.alice.wait_for_notice("echo: think for a while")
    deadline = time.monotonic() + 10
    while True:
        response = await world.alice.client.sync(timeout=500, since=world.alice.since)
        assert isinstance(response, SyncResponse)
        world.alice.since = response.next_batch
        joined = response.rooms.join.get(room)
        changes = [
            e for e in (joined.ephemeral if joined else []) if isinstance(e, TypingNoticeEvent)
        ]
        if changes and world.bot_id not in changes[-1].users:
            break
        assert time.monotonic() < deadline, "typing was never switched off"
