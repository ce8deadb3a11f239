"""The Synapse test homeserver itself: two nio clients talk through a real Synapse."""

from __future__ import annotations

import asyncio
import time

from nio import (
    AsyncClient,
    JoinResponse,
    LoginResponse,
    RoomCreateResponse,
    RoomInviteResponse,
    RoomMessageText,
    RoomSendResponse,
    SyncResponse,
)
from synapse_server import SynapseServer


async def _login(server: SynapseServer, user_id: str, password: str) -> AsyncClient:
    client = AsyncClient(server.url, user_id)
    response = await client.login(password, device_name="podbay-tests")
    if not isinstance(response, LoginResponse):
        await client.close()
        raise AssertionError(f"login as {user_id} failed: {response}")
    return client


async def _wait_for_message(
    client: AsyncClient, room_id: str, since: str, body: str, timeout: float = 30
) -> RoomMessageText:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = await client.sync(timeout=1000, since=since)
        assert isinstance(response, SyncResponse), response
        since = response.next_batch
        room = response.rooms.join.get(room_id)
        for event in room.timeline.events if room else []:
            if isinstance(event, RoomMessageText) and event.body == body:
                return event
    raise AssertionError(f"{client.user_id} never saw {body!r} in {room_id}")


async def test_two_users_exchange_a_message_through_synapse() -> None:
    async with asyncio.timeout(120), SynapseServer() as server:
        assert server.url.startswith("http://127.0.0.1:")
        directory = server.directory
        alice_id = await server.register("alice", "alice-password")
        bob_id = await server.register("bob", "bob-password", admin=True)
        assert alice_id == f"@alice:{server.server_name}"
        assert bob_id == f"@bob:{server.server_name}"

        alice = await _login(server, alice_id, "alice-password")
        try:
            bob = await _login(server, bob_id, "bob-password")
            try:
                created = await alice.room_create(name="podbay fixture")
                assert isinstance(created, RoomCreateResponse), created
                room_id = created.room_id
                first = await alice.sync(timeout=0)
                assert isinstance(first, SyncResponse), first

                invited = await alice.room_invite(room_id, bob_id)
                assert isinstance(invited, RoomInviteResponse), invited
                joined = await bob.join(room_id)
                assert isinstance(joined, JoinResponse), joined

                sent = await bob.room_send(
                    room_id, "m.room.message", {"msgtype": "m.text", "body": "hello, alice"}
                )
                assert isinstance(sent, RoomSendResponse), sent

                event = await _wait_for_message(alice, room_id, first.next_batch, "hello, alice")
                assert event.sender == bob_id
                assert event.event_id == sent.event_id
            finally:
                await bob.close()
        finally:
            await alice.close()
    assert not await asyncio.to_thread(directory.exists), "stop() removes the temporary directory"
