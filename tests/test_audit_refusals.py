"""Every refusal is on record: a viewer's freeform message ("Talking to the agent needs the
operator role") is audited like a refused command or an unknown sender's message."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fakes.agent import FakeAgent
from fakes.transport import MemoryTransport

from podbay.bot import Podbay
from podbay.config import Settings


async def test_a_refused_freeform_message_is_audited(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        access={"admins": ["memory:ada"], "viewers": ["memory:vera"]},
        dispatcher={"coalesce_window_ms": 0, "max_window_ms": 0},
    )
    transport = MemoryTransport()
    async with Podbay(settings, transports=[transport], agent=FakeAgent(0.0), docker=False) as bot:
        assert bot.store is not None and bot.dispatcher is not None
        await transport.say("please explain the build", user="vera")
        await asyncio.wait_for(bot.dispatcher.drain(), 10)
        assert transport.texts() == [
            "Talking to the agent needs the operator role; you are a viewer."
        ]
        await transport.say("use demo", user="vera")  # for comparison: a refused command
        await asyncio.wait_for(bot.dispatcher.drain(), 10)
        entries = [(a.actor, a.action, a.result) for a in await bot.store.audit_recent(10)]
    assert (
        "memory:vera",
        "use",
        "refused: `use` needs the operator role; you are a viewer.",
    ) in entries
    assert (
        "memory:vera",
        "freeform",
        "refused: Talking to the agent needs the operator role; you are a viewer.",
    ) in entries
