"""Storage trouble during work: a write lock held longer than SQLite's busy_timeout is
waited out (the agent's answer still arrives), and a full disk is named in the reply, also
when it fills up during a run (full-disk cases need root for the tmpfs mount)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fakes.agent import FakeAgent
from fakes.harness import Harness
from fault_support_outage import WriteLock, fill
from test_storage_faults import busy_timeout_s, podbay_on, small_disk

__all__ = ["small_disk"]


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent(auto_release=None)


async def test_a_write_lock_longer_than_busy_timeout_as_a_run_ends_is_waited_out(
    harness: Harness,
) -> None:
    """The agent finishes while another process holds the write lock beyond busy_timeout:
    podbay waits the lock out and the answer reaches the chat."""
    transport, agent = harness.transport, harness.agent
    db_path = harness.settings.data_dir / "podbay.db"
    hold_s = await busy_timeout_s(harness.store) + 2  # beyond podbay's patience
    await transport.say("fix the build")
    run = await agent.next_started()
    async with WriteLock(db_path) as lock:
        run.release.set()  # the agent answers "echo: fix the build" now
        await asyncio.sleep(hold_s)
        await lock.release()
    await harness.dispatcher.drain()
    assert any("echo: fix the build" in t for t in transport.texts()), transport.texts()


async def test_a_full_disk_is_named_in_the_reply(small_disk: Path) -> None:
    """The reply to a message podbay cannot store on a full disk says why."""
    async with podbay_on(small_disk) as bot:
        await bot.transport.say("before")
        await bot.transport.wait_for_text("echo: before")
        await bot.dispatcher.drain()
        await asyncio.to_thread(fill, small_disk / "filler")
        await bot.transport.say("while the disk is full")
        await bot.transport.wait_for(lambda: len(bot.transport.sent) >= 2)
        reply = bot.transport.sent[-1][1].text
        assert "disk" in reply.lower() or "space" in reply.lower(), reply


async def test_a_disk_filling_up_during_a_run_is_told_to_the_user(small_disk: Path) -> None:
    """The disk fills while the agent works: the conversation is told, not left waiting."""
    async with podbay_on(small_disk) as bot:
        bot.agent.auto_release = None
        await bot.transport.say("fix the build")
        run = await bot.agent.next_started()
        await asyncio.to_thread(fill, small_disk / "filler")
        run.release.set()
        await bot.dispatcher.drain()
        assert bot.transport.sent, "the user is told nothing at all"
        assert any("disk is full" in t for t in bot.transport.texts()), bot.transport.texts()
