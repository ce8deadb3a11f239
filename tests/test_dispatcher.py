from __future__ import annotations

import asyncio
import random

import pytest
from fakes.agent import FakeAgent
from fakes.harness import Harness

from podbay.commands.context import CommandContext
from podbay.commands.registry import CommandSpec, Invocation, Positional, Registry
from podbay.commands.roles import Role
from podbay.config import Settings
from podbay.engine.jobs import JobHandle
from podbay.messages import SessionKey

ROOM = SessionKey("memory", "room-1")


async def test_three_messages_inside_the_window_become_one_run(harness: Harness) -> None:
    for text in ("fix the tests", "and the linter", "then commit"):
        await harness.transport.say(text)
    run = await harness.agent.next_started()
    assert run.request.prompt == "fix the tests\n\nand the linter\n\nthen commit"
    run.release.set()
    await harness.transport.wait_for_text("echo: fix the tests")
    await harness.dispatcher.drain()
    assert len(harness.agent.runs) == 1
    rows = await harness.store.runs_recent(session=ROOM)
    assert [r.status for r in rows] == ["succeeded"]


async def test_messages_during_a_run_are_batched_into_one_follow_up(harness: Harness) -> None:
    await harness.transport.say("first")
    first = await harness.agent.next_started()
    for text in ("second", "third", "fourth"):
        await harness.transport.say(text)
    await asyncio.sleep(0.3)  # well past the coalescing window: still no second run
    assert len(harness.agent.runs) == 1
    first.release.set()
    follow_up = await harness.agent.next_started()
    assert follow_up.request.prompt == "second\n\nthird\n\nfourth"
    follow_up.release.set()
    await harness.dispatcher.drain()
    assert len(harness.agent.runs) == 2


async def test_batch_from_several_senders_names_each_sender(harness: Harness) -> None:
    await harness.transport.say("switch to postgres", user="alice")
    await harness.transport.say("no, sqlite", user="bob")
    run = await harness.agent.next_started()
    assert run.request.prompt == "Alice: switch to postgres\n\nBob: no, sqlite"
    run.release.set()


async def test_stop_cancels_the_run_and_drops_the_queue(harness: Harness) -> None:
    await harness.transport.say("long job")
    run = await harness.agent.next_started()
    await harness.transport.say("queued one")
    await harness.transport.say("queued two")
    await harness.transport.say("stop")
    await harness.transport.wait_for_text("Stopped. Dropped 2 queued message(s).")
    assert run.cancelled and run.done
    (row,) = await harness.store.runs_recent(session=ROOM)
    assert row.status == "cancelled"
    await harness.dispatcher.drain()
    assert len(harness.agent.runs) == 1, "dropped messages must not start a run"
    await harness.transport.say("stop")
    await harness.transport.wait_for_text("Nothing to stop.")


async def test_control_command_is_answered_while_a_run_is_active(harness: Harness) -> None:
    await harness.transport.say("busy work")
    run = await harness.agent.next_started()
    await harness.transport.say("whoami")
    reply = await harness.transport.wait_for_text("You are `memory:alice`")
    assert "admin" in reply
    assert not run.done
    run.release.set()


async def test_redelivered_platform_id_executes_once(harness: Harness) -> None:
    await harness.transport.say("whoami", platform_id="evt-1")
    await harness.transport.say("whoami", platform_id="evt-1")
    await harness.dispatcher.drain()
    assert len(harness.transport.texts(ROOM)) == 1
    assert harness.dispatcher.stats["redeliveries"] == 1


async def test_overflow_is_refused_with_a_reply(harness: Harness) -> None:
    await harness.transport.say("running")
    run = await harness.agent.next_started()
    limit = harness.settings.dispatcher.max_queued_messages
    for i in range(limit + 2):
        await harness.transport.say(f"msg {i}")

    def refusals() -> list[str]:
        return [t for t in harness.transport.texts(ROOM) if t.startswith("Not queued")]

    await harness.transport.wait_for(lambda: len(refusals()) == 2)
    await asyncio.sleep(0.2)
    assert len(refusals()) == 2
    assert f"the limit is {limit}" in refusals()[0]
    run.release.set()
    follow_up = await harness.agent.next_started()
    assert follow_up.request.prompt.split("\n\n") == [f"msg {i}" for i in range(limit)]
    follow_up.release.set()


async def test_unknown_sender_is_refused_once_and_nothing_runs(harness: Harness) -> None:
    for text in ("fix everything", "status", "delete x"):
        await harness.transport.say(text, user="mallory")
    await harness.dispatcher.drain()
    texts = harness.transport.texts(ROOM)
    assert len(texts) == 1
    assert "not allowed" in texts[0] and "memory:mallory" in texts[0]
    assert harness.agent.runs == []


async def test_viewer_cannot_drive_the_agent(harness: Harness) -> None:
    await harness.transport.say("please refactor", user="victor")
    reply = await harness.transport.wait_for_text("operator role")
    assert "viewer" in reply
    await harness.transport.say("status", user="victor")
    await harness.transport.wait_for_text("Projects")
    assert harness.agent.runs == []


async def test_operator_cannot_delete(harness: Harness) -> None:
    await harness.transport.say("delete demo", user="bob")
    await harness.transport.wait_for_text("needs the admin role")


@pytest.mark.dispatcher(max_window_ms=250)
async def test_max_window_fires_a_batch_during_a_steady_trickle(
    harness: Harness, agent: FakeAgent
) -> None:
    agent.auto_release = 0.0
    for i in range(10):
        await harness.transport.say(f"line {i}")
        await asyncio.sleep(0.06)  # always inside the 100 ms coalescing window
    await harness.dispatcher.drain()
    assert len(agent.runs) >= 2, "the batch must fire at max_window_ms, not wait for silence"
    delivered = [p for r in agent.runs for p in r.request.prompt.split("\n\n")]
    assert delivered == [f"line {i}" for i in range(10)]


@pytest.mark.dispatcher(max_concurrent_runs=1)
async def test_global_cap_queues_other_sessions_and_says_so(
    harness: Harness, agent: FakeAgent
) -> None:
    other = SessionKey("memory", "room-2")
    await harness.transport.say("first")
    first = await agent.next_started()
    await harness.transport.say("second", session=other)
    await harness.transport.wait_for_text("Queued (0 ahead)", session=other)
    assert len(agent.runs) == 1
    first.release.set()
    second = await agent.next_started()
    assert second.request.prompt == "second"
    second.release.set()


async def test_failed_run_reports_exit_code_and_error(harness: Harness, agent: FakeAgent) -> None:
    await harness.transport.say("break it")
    run = await agent.next_started()
    run.fail = True
    run.release.set()
    reply = await harness.transport.wait_for_text("Agent run failed (exit 3)")
    assert "it broke" in reply
    (row,) = await harness.store.runs_recent(session=ROOM)
    assert row.status == "failed" and row.exit_code == 3


async def test_typing_indicator_runs_while_freeform_work_is_pending(harness: Harness) -> None:
    await harness.transport.say("think hard")
    run = await harness.agent.next_started()
    assert harness.transport.typing_calls == [(ROOM, True)]
    run.release.set()
    await harness.dispatcher.drain()
    assert harness.transport.typing_calls == [(ROOM, True), (ROOM, False)]


async def test_idle_sessions_are_evicted(harness: Harness, agent: FakeAgent) -> None:
    agent.auto_release = 0.0
    for i in range(30):
        await harness.transport.say(f"hi {i}", session=SessionKey("memory", f"room-{i}"))
    await harness.dispatcher.drain()
    assert harness.dispatcher.live_sessions == 0
    assert len(agent.runs) == 30


@pytest.mark.dispatcher(coalesce_window_ms=20, max_window_ms=100)
@pytest.mark.parametrize("seed", [1, 2])
async def test_many_sessions_at_random_times_deliver_every_message_exactly_once(
    harness: Harness, agent: FakeAgent, seed: int
) -> None:
    rng = random.Random(seed)
    agent.auto_release = 0.03
    sessions, per_session = 100, 20
    expected = {f"s{s}-m{m}" for s in range(sessions) for m in range(per_session)}

    async def writer(s: int) -> None:
        key = SessionKey("memory", f"room-{s}")
        for m in range(per_session):
            await asyncio.sleep(rng.uniform(0, 0.05))
            await harness.transport.say(f"s{s}-m{m}", session=key)

    await asyncio.gather(*(writer(s) for s in range(sessions)))
    await harness.dispatcher.drain()
    delivered = [p for r in agent.runs for p in r.request.prompt.split("\n\n")]
    assert len(delivered) == len(expected) and set(delivered) == expected
    order: dict[str, list[int]] = {}
    for p in delivered:
        session, _, m = p.partition("-m")
        order.setdefault(session, []).append(int(m))
    assert all(ms == sorted(ms) for ms in order.values()), "each session in arrival order"
    assert agent.violations == []
    assert agent.max_global <= harness.settings.dispatcher.max_concurrent_runs
    assert harness.dispatcher.live_sessions == 0
    assert harness.dispatcher.stats["refused"] == 0


async def test_restart_interrupts_processing_rows_and_redispatches_received_ones(
    settings: Settings, registry: Registry
) -> None:
    from fakes.transport import MemoryTransport

    from podbay.dispatcher import Dispatcher
    from podbay.engine.core import Engine
    from podbay.engine.store import Store
    from podbay.messages import Inbound, Sender

    alice = Sender("memory", "alice", "Alice")
    path = settings.data_dir / "podbay.db"
    async with await Store.open(path) as store:
        busy = await store.inbox_add(
            Inbound(ROOM, alice, "refactor the whole parser module please", "p1")
        )
        assert busy is not None
        await store.inbox_mark([busy], "processing", kind="freeform")
        await store.inbox_add(Inbound(ROOM, alice, "whoami", "p2"))
    agent = FakeAgent(auto_release=0.0)
    async with await Store.open(path) as store:
        dispatcher = Dispatcher(Engine(store, settings, agent=agent), registry, settings)
        transport = MemoryTransport()
        dispatcher.attach(transport)
        await dispatcher.recover()
        await dispatcher.drain()
        texts = transport.texts(ROOM)
        assert texts[0] == (
            "podbay restarted while working on: refactor the whole parser module please; "
            "resend if still needed"
        )
        assert any(t.startswith("You are `memory:alice`") for t in texts[1:])
        assert agent.runs == [], "interrupted work is not re-run on its own"
        row = await store.inbox_get(busy)
        assert row is not None and row.status == "interrupted"
        await dispatcher.shutdown()


async def test_a_prompt_stored_while_podbay_stops_is_run_after_the_next_start(
    settings: Settings, registry: Registry
) -> None:
    from fakes.transport import MemoryTransport

    from podbay.dispatcher import Dispatcher
    from podbay.engine.core import Engine
    from podbay.engine.store import Store

    path = settings.data_dir / "podbay.db"
    async with await Store.open(path) as store:
        agent = FakeAgent(auto_release=0.0)
        dispatcher = Dispatcher(Engine(store, settings, agent=agent), registry, settings)
        transport = MemoryTransport()
        dispatcher.attach(transport)
        await transport.start(dispatcher.submit)
        await dispatcher.recover()
        await transport.say("whoami")  # podbay is up and has read its project names
        await transport.wait_for_text("You are `memory:alice`")
        stopping: list[asyncio.Task[None]] = []
        store_message = store.inbox_add

        async def stop_meanwhile(*args: object, **kwargs: object) -> int | None:
            # The stop begins while the message is being stored (before its commit).
            stopping.append(asyncio.create_task(dispatcher.shutdown()))
            return await store_message(*args, **kwargs)  # type: ignore[arg-type]

        store.inbox_add = stop_meanwhile  # type: ignore[method-assign]
        await transport.say("fix the flaky test", platform_id="late")
        await stopping[0]
        assert agent.runs == [], "a stopping podbay starts no run"
    async with await Store.open(path) as store:
        agent = FakeAgent(auto_release=0.0)
        dispatcher = Dispatcher(Engine(store, settings, agent=agent), registry, settings)
        transport = MemoryTransport()
        dispatcher.attach(transport)
        await dispatcher.recover()
        await dispatcher.drain()
        assert agent.prompts() == ["fix the flaky test"], "the message is done, not lost"
        assert not any("restarted" in t for t in transport.texts()), "nor called interrupted"
        await dispatcher.shutdown()


async def test_token_outside_a_private_chat_is_refused_and_never_stored(harness: Harness) -> None:
    await harness.transport.say("new project demo --token ghp_supersecret123", platform_id="t1")
    reply = await harness.transport.wait_for_text("private 1:1")
    assert "ghp_supersecret123" not in reply
    cursor = await harness.store._db.execute("SELECT text FROM inbox")  # type: ignore[attr-defined]
    stored = [r[0] for r in await cursor.fetchall()]
    assert stored == ["new project demo --token [redacted]"]


# -- jobs and confirmation through the dispatcher, with commands registered for the test --


@pytest.fixture
def job_gate() -> asyncio.Event:
    return asyncio.Event()


@pytest.fixture
def registry(settings: Settings, job_gate: asyncio.Event) -> Registry:
    from podbay.commands.catalog import build_registry

    registry = build_registry(settings.bot.name)

    async def slow_work(handle: JobHandle) -> str:
        await handle.step("begin", "started the slow job", tell=True)
        await job_gate.wait()
        return f"slowjob {handle.project} done"

    async def slowjob(ctx: CommandContext, inv: Invocation) -> None:
        await ctx.start_job(inv.args["project"], "slowjob", slow_work)

    async def wipe(ctx: CommandContext, inv: Invocation) -> None:
        target = inv.args["thing"]

        async def action() -> None:
            await ctx.reply(f"wiped {target}")

        await ctx.propose(f"Wipe {target}?", action)

    registry.add(
        CommandSpec(
            "slowjob",
            "test job",
            slowjob,
            kind="job",
            role=Role.OPERATOR,
            positionals=(Positional("project"),),
        )
    )
    registry.add(
        CommandSpec(
            "wipe",
            "test destructive",
            wipe,
            kind="job",
            role=Role.OPERATOR,
            positionals=(Positional("thing"),),
        )
    )
    return registry


async def test_one_job_per_project_and_jobs_do_not_block_freeform(
    harness: Harness, job_gate: asyncio.Event
) -> None:
    await harness.transport.say("slowjob alpha")
    await harness.transport.wait_for_text("started the slow job")
    await harness.transport.say("slowjob alpha")
    await harness.transport.wait_for_text("busy: slowjob running for alpha")
    await harness.transport.say("slowjob beta")  # another project is fine
    await harness.transport.say("meanwhile, explain the code")
    run = await harness.agent.next_started()
    assert run.request.prompt == "meanwhile, explain the code"
    run.release.set()
    job_gate.set()
    await harness.dispatcher.drain()
    texts = harness.transport.texts(ROOM)
    assert "slowjob alpha done" in texts and "slowjob beta done" in texts
    jobs = await harness.store.jobs_active()
    assert jobs == []


async def test_only_the_requester_can_confirm(harness: Harness) -> None:
    await harness.transport.say("wipe cache", user="bob")
    await harness.transport.wait_for_text("Reply `confirm`")
    await harness.transport.say("confirm", user="alice")
    await harness.transport.wait_for_text("Only memory:bob can confirm")
    assert "wiped cache" not in harness.transport.texts()
    await harness.transport.say("confirm", user="bob")
    await harness.transport.wait_for_text("wiped cache")
    await harness.transport.say("confirm", user="bob")
    await harness.transport.wait_for_text("Nothing to confirm")


async def test_newer_request_replaces_older_and_cancel_drops_it(harness: Harness) -> None:
    await harness.transport.say("wipe one")
    await harness.transport.say("wipe two")
    await harness.transport.wait_for_text("replaces your earlier request: Wipe one?")
    await harness.transport.say("cancel")
    await harness.transport.wait_for_text("Cancelled: Wipe two?")
    await harness.transport.say("confirm")
    await harness.transport.wait_for_text("Nothing to confirm")
    assert not any(t.startswith("wiped") for t in harness.transport.texts())


async def test_proposal_expires(harness: Harness) -> None:
    clock = [1000.0]
    harness.dispatcher.proposals._clock = lambda: clock[0]  # type: ignore[attr-defined]
    await harness.transport.say("wipe disk")
    await harness.transport.wait_for_text("within 120 s")
    clock[0] += 121
    await harness.transport.say("confirm")
    await harness.transport.wait_for_text("Nothing to confirm")
    assert "wiped disk" not in harness.transport.texts()


async def test_commands_and_refusals_are_audited_without_secrets(harness: Harness) -> None:
    await harness.transport.say("status")
    await harness.transport.say("delete demo", user="bob")
    await harness.transport.say("hello", user="mallory")
    await harness.transport.say("new project demo --token s3cr3t-value", direct=True)
    await harness.dispatcher.drain()
    entries = await harness.store.audit_recent()
    summary = [(e.actor, e.action, e.result.split(":")[0]) for e in reversed(entries)]
    assert summary == [
        ("memory:alice", "status", "ok"),
        ("memory:bob", "delete", "refused"),
        ("memory:mallory", "message", "denied"),
        ("memory:alice", "new project", "refused"),
    ]
    assert all("s3cr3t-value" not in e.detail + e.result for e in entries)
