"""Dispatcher defects of issue 8, each reproduced first, then fixed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from fakes.agent import FakeAgent
from fakes.harness import Harness
from fakes.transport import MemoryTransport

from podbay.commands.registry import Registry
from podbay.config import Settings
from podbay.dispatcher import Dispatcher
from podbay.engine.agents import AgentEvent, HostCommandAgent
from podbay.engine.core import Engine
from podbay.engine.runs import RunPlan
from podbay.engine.store import Store
from podbay.messages import Inbound, Sender, SessionKey

ROOM = SessionKey("memory", "room-1")
GROUP = SessionKey("memory", "group-1")
ALICE = Sender("memory", "alice", "Alice")


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait for a condition of the dispatcher's own state (there is no event to await)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - dispatcher state has no event of its own
            await asyncio.sleep(0.005)
    assert predicate(), what


async def test_end_of_input_does_not_split_a_burst(harness: Harness, agent: FakeAgent) -> None:
    agent.auto_release = 0.0
    for text in ("one", "two", "three"):
        await harness.transport.say(text)
    await harness.dispatcher.drain()
    assert agent.prompts() == ["one\n\ntwo\n\nthree"]
    assert harness.dispatcher.invariant_violations() == []


async def test_messages_during_a_project_cancellation_get_a_lane(
    harness: Harness, agent: FakeAgent
) -> None:
    store = harness.store
    await store.project_add("demo", "/nonexistent/demo", state="ready")
    await store.session_set_project(ROOM, "demo")
    await harness.transport.say("long work")
    first = await agent.next_started()
    agent.cancel_gate = asyncio.Event()
    cancelling = asyncio.create_task(harness.dispatcher.cancel_project_runs("demo"))
    await agent.cancelling.wait()
    await harness.transport.say("after the cancel")
    await until(lambda: bool(harness.dispatcher.snapshot()["queued"]), "the follow-up is queued")
    assert harness.dispatcher.invariant_violations() == []
    agent.cancel_gate.set()
    assert await cancelling == 1
    assert first.cancelled
    follow_up = await agent.next_started()
    assert follow_up.request.prompt == "after the cancel"
    follow_up.release.set()
    await harness.dispatcher.drain()
    assert harness.dispatcher.invariant_violations() == []
    statuses = [r.status for r in await store.runs_recent(session=ROOM)]
    assert statuses == ["succeeded", "cancelled"]


async def test_stop_right_after_a_run_is_recorded_leaves_no_pending_ghost(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = harness.store
    reached, hold = asyncio.Event(), asyncio.Event()
    runs = harness.dispatcher.engine.runs
    real_execute = runs.execute

    async def slow_execute(plan: RunPlan) -> AsyncIterator[AgentEvent]:
        # The run's row is recorded (it has an id); its agent has not begun.
        reached.set()
        await hold.wait()
        async for event in real_execute(plan):
            yield event

    monkeypatch.setattr(runs, "execute", slow_execute)
    await harness.transport.say("work")
    await reached.wait()  # the run row exists; the run has not begun
    await harness.transport.say("stop")
    await harness.transport.wait_for_text("Stopped.")
    assert await store.runs_active() == []
    (row,) = await store.runs_recent(session=ROOM)
    assert row.status == "cancelled"
    hold.set()


async def test_replayed_rows_keep_every_field(settings: Settings, registry: Registry) -> None:
    path = settings.data_dir / "podbay.db"
    async with await Store.open(path) as store:
        # Unaddressed chatter in a busy group room, and a message that names the bot by a
        # transport-provided alias: both arrived, then podbay crashed before handling them.
        await store.inbox_add(Inbound(GROUP, ALICE, "lunch anyone?", "g1", ambient=False))
        await store.inbox_add(
            Inbound(GROUP, ALICE, "robo: tidy the imports", "g2", ambient=False, aliases=("robo",))
        )
    agent = FakeAgent(auto_release=0.0)
    async with await Store.open(path) as store:
        dispatcher = Dispatcher(Engine(store, settings, agent=agent), registry, settings)
        transport = MemoryTransport()
        dispatcher.attach(transport)
        await dispatcher.recover()
        await dispatcher.drain()
        assert agent.prompts() == ["tidy the imports"]
        (g1,) = [r for r in [await store.inbox_get(i) for i in (1, 2)] if r and r.id == 1]
        assert g1.kind == "ignored"
        await dispatcher.shutdown()


async def test_messages_arriving_before_recovery_are_held_then_handled_once(
    settings: Settings, registry: Registry
) -> None:
    agent = FakeAgent(auto_release=0.0)
    async with await Store.open(settings.data_dir / "podbay.db") as store:
        dispatcher = Dispatcher(Engine(store, settings, agent=agent), registry, settings)
        transport = MemoryTransport()
        dispatcher.attach(transport)
        await transport.start(dispatcher.submit)
        await transport.say("whoami")
        await dispatcher.drain()  # an open gate would have answered by now
        assert transport.sent == [], "nothing is handled before recovery has run"
        await dispatcher.recover()
        await transport.say("whoami")
        await dispatcher.drain()
        assert len([t for t in transport.texts() if t.startswith("You are")]) == 2
        await dispatcher.shutdown()


async def test_an_overlong_message_is_refused_and_does_not_hold_up_others(
    harness: Harness,
) -> None:
    await harness.transport.say("new project " + "x" * 1_000_000)
    await harness.transport.say("whoami")
    reply = await harness.transport.wait_for_text("too long")
    assert "64 KiB" in reply and "max_message_bytes" in reply
    await harness.transport.wait_for_text("You are `memory:alice`")
    cursor = await harness.store._db.execute("SELECT max(length(text)) FROM inbox")  # type: ignore[attr-defined]
    (longest,) = await cursor.fetchone()
    assert longest < 70_000


async def test_text_that_cannot_be_stored_gets_its_own_error_reply(harness: Harness) -> None:
    await harness.transport.say("bad \udcff byte")
    await harness.transport.say("whoami")
    reply = await harness.transport.wait_for_text("could not read")
    assert "\udcff" not in reply
    await harness.transport.wait_for_text("You are `memory:alice`")


async def test_host_agent_without_a_project_runs_in_a_scratch_dir(
    settings: Settings, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # podbay's own working directory must never be used
    (tmp_path / "podbay-own-file").write_text("x")
    agent = HostCommandAgent(["sh", "-c", "pwd; ls -A; touch left-by-turn-one"])
    async with await Store.open(settings.data_dir / "podbay.db") as store:
        dispatcher = Dispatcher(Engine(store, settings, agent=agent), registry, settings)
        transport = MemoryTransport()
        dispatcher.attach(transport)
        await transport.start(dispatcher.submit)
        await dispatcher.recover()
        await transport.say("where am I?")
        await dispatcher.drain()
        (first,) = transport.texts(kind="agent")
        workdir = Path(first.splitlines()[0])
        assert workdir.is_relative_to(settings.data_dir.resolve())
        assert workdir != tmp_path
        assert first.splitlines()[1:] == [], "created empty"
        await transport.say("and now?")
        await dispatcher.drain()
        second = transport.texts(kind="agent")[1]
        assert second.splitlines() == [str(workdir), "left-by-turn-one"], "kept between turns"
        other = SessionKey("memory", "room-2")
        await transport.say("and here?", session=other)
        await dispatcher.drain()
        third = transport.texts(session=other, kind="agent")[0]
        assert third.splitlines()[0] != str(workdir), "one scratch dir per conversation"
        await dispatcher.shutdown()
