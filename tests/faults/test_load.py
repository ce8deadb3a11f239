"""Load test: 100 conversations × 10 messages through the in-memory transport.

A real dispatcher on a real SQLite store drives a fake agent whose runs overlap (each
finishes after a short random delay). What a user would notice is checked: every message
reaches the agent exactly once and in the order it was sent, each conversation gets the
agent's answer to all of it and is not left "typing…", no conversation ever has two runs at
once, the global run cap holds (and is reached), every inbox row ends up done and every run
succeeded, and podbay's memory returns near where it was before the load (idle
conversations are forgotten). A second test mixes a burst of `whoami`/`status` commands
into the same load: each is answered exactly once.

The figures (messages, runs, concurrency, memory, wall time) are printed on every run (and
recorded as the ``load_figures`` property in JUnit XML). Each conversation has its own
sender, as a hundred people in a hundred rooms would.
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from fakes.agent import FakeAgent
from fakes.transport import MemoryTransport

from podbay.commands.catalog import build_registry
from podbay.config import Settings
from podbay.dispatcher import Dispatcher
from podbay.engine.core import Engine
from podbay.engine.store import InboxRow, Store
from podbay.messages import Reply, SessionKey

CONVERSATIONS = 100
MESSAGES = 10
CAP = 4  # dispatcher.max_concurrent_runs
WARM_UP = (10, 2)  # conversations × messages before the memory baseline
# What the load may leave behind. Bounded caches (the per-sender rate windows, dicts that
# grew) come to about 150 KiB; keeping every message's Inbound alone would add 580 KiB.
RETAINED_LIMIT = 512 * 1024
WHOAMI_AFTER, STATUS_AFTER = 3, 6  # positions of the commands in the command test
FEEDERS = 4  # messages submitted at once
DRAIN_TIMEOUT_S = 120.0


@dataclass
class World:
    settings: Settings
    store: Store
    dispatcher: Dispatcher
    transport: MemoryTransport
    agent: FakeAgent


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    settings = Settings(
        data_dir=tmp_path / "data",
        access={"operators": ["memory:*"]},
        dispatcher={
            "coalesce_window_ms": 20,
            "max_window_ms": 200,
            "max_queued_messages": 20,
            "max_concurrent_runs": CAP,
        },
    )
    store = await Store.open(settings.data_dir / "podbay.db")
    agent = FakeAgent(auto_release=0.02)
    engine = Engine(store, settings, agent=agent)
    dispatcher = Dispatcher(engine, build_registry(settings.bot.name), settings)
    # Every submitted message is followed by a check of the dispatcher's invariants.
    transport = MemoryTransport(after_submit=lambda: _check_invariants(dispatcher))
    dispatcher.attach(transport)
    await transport.start(dispatcher.submit)
    await dispatcher.recover()
    try:
        yield World(settings, store, dispatcher, transport, agent)
        _check_invariants(dispatcher)
    finally:
        for run in agent.runs:
            run.release.set()
        await dispatcher.shutdown(grace_s=2)
        await store.close()


def _check_invariants(dispatcher: Dispatcher) -> None:
    problems = dispatcher.invariant_violations()
    assert problems == [], f"dispatcher invariants broken: {problems}"


def _room(prefix: str, c: int) -> SessionKey:
    return SessionKey("memory", f"{prefix}-{c}")


def _texts(c: int, messages: int = MESSAGES) -> list[str]:
    return [f"c{c}-m{m}" for m in range(messages)]


def _script(c: int, messages: int, commands: bool) -> list[str]:
    """What conversation ``c`` sends, in order: unique texts, commands where asked."""
    script: list[str] = []
    for m, text in enumerate(_texts(c, messages)):
        script.append(text)
        if commands and m == WHOAMI_AFTER:
            script.append("whoami")
        if commands and m == STATUS_AFTER:
            script.append("status")
    return script


async def _send_rounds(world: World, prefix: str, scripts: list[list[str]]) -> None:
    """Round-robin, as receive loops deliver them: each feeder (think of several webhook
    requests in flight) sends its conversations' next lines in turn, each stored before its
    next. The conversations interleave, and so do the feeders: a command at one position
    is a burst of it across all conversations."""

    async def feed(k: int) -> None:
        mine = range(k, len(scripts), FEEDERS)
        for i in range(max(len(s) for s in scripts)):
            for c in mine:
                if i < len(scripts[c]):
                    text = scripts[c][i]
                    await world.transport.say(text, session=_room(prefix, c), user=f"u{c}")

    await asyncio.gather(*(feed(k) for k in range(FEEDERS)))


async def _drain(world: World) -> None:
    await asyncio.wait_for(world.dispatcher.drain(), DRAIN_TIMEOUT_S)


def _forget_records(world: World) -> None:
    """Drop what the fakes recorded (runs, replies, typing): podbay's memory is measured."""
    world.agent.forget()
    world.transport.sent.clear()
    world.transport.typing_calls.clear()


@contextmanager
def _traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


def _traced_now() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def _is_whoami(c: int, reply: Reply) -> bool:
    return reply.text.startswith(f"You are `memory:u{c}` (operator) in session `memory:load-{c}`")


def _is_status(reply: Reply) -> bool:
    return reply.text.startswith("**Projects") and "**Runs" in reply.text


def _check_agent(agent: FakeAgent) -> None:
    """Each conversation's messages reached the agent exactly once, in the order sent."""
    delivered: dict[str, list[str]] = {}
    for run in agent.runs:
        delivered.setdefault(run.request.session, []).extend(run.request.prompt.split("\n\n"))
    for c in range(CONVERSATIONS):
        got = delivered.pop(str(_room("load", c)), [])
        assert got == _texts(c), f"conversation {c}: the agent was given {got}"
    assert delivered == {}, f"runs in conversations nobody wrote in: {list(delivered)}"
    assert agent.violations == [], "two runs at once in one conversation"
    assert agent.max_global <= CAP, f"{agent.max_global} runs at once; the cap is {CAP}"
    assert agent.max_global == CAP, "the load never filled every run slot"


def _check_replies(transport: MemoryTransport, commands: bool) -> None:
    """What each conversation saw: the agent's answer to every message, once; each command
    answered once; nothing else but "Queued" notices; no "typing…" left on."""
    replies: dict[SessionKey, list[Reply]] = {}
    for session, reply in transport.sent:
        assert reply.kind != "error", f"error reply in {session}: {reply.text}"
        replies.setdefault(session, []).append(reply)
    typing: dict[SessionKey, bool] = {}
    for session, active in transport.typing_calls:
        typing[session] = active
    for c in range(CONVERSATIONS):
        key = _room("load", c)
        seen = replies.pop(key, [])
        answered = [
            text
            for r in seen
            if r.kind == "agent"
            for text in r.text.removeprefix("echo: ").split("\n\n")
        ]
        assert answered == _texts(c), f"conversation {c}: the agent answered {answered}"
        whoami = sum(_is_whoami(c, r) for r in seen)
        status = sum(_is_status(r) for r in seen)
        assert (whoami, status) == ((1, 1) if commands else (0, 0)), (
            f"conversation {c}: whoami answered {whoami}×, status {status}×"
        )
        others = [
            r.text
            for r in seen
            if r.kind != "agent"
            and not r.text.startswith("Queued (")
            and not _is_whoami(c, r)
            and not _is_status(r)
        ]
        assert others == [], f"conversation {c}: unexpected replies {others}"
        assert typing.get(key) is False, f"conversation {c} is left showing typing…"
    assert replies == {}, f"replies to conversations nobody wrote in: {list(replies)}"


async def _inbox_rows(store: Store, expected: int) -> list[InboxRow]:
    """Every inbox row (ids are dense rowids), checking none exists beyond ``expected``."""
    rows = [await store.inbox_get(i) for i in range(1, expected + 2)]
    assert rows[-1] is None, f"more inbox rows than the {expected} messages sent"
    missing = [i + 1 for i, row in enumerate(rows[:-1]) if row is None]
    assert missing == [], f"inbox rows missing: {missing[:10]}"
    return [row for row in rows if row is not None]


async def _check_store(world: World, expected_rows: int, expected_runs: int) -> None:
    """The record agrees: each message stored once and done, given to a run that succeeded."""
    rows = await _inbox_rows(world.store, expected_rows)
    assert Counter(row.status for row in rows) == {"done": expected_rows}
    load = [r for r in rows if r.inbound.session.conversation.startswith("load-")]
    stored = Counter(r.inbound.text for r in load if r.kind == "freeform")
    assert stored == Counter(t for c in range(CONVERSATIONS) for t in _texts(c))
    assert all(r.run_id is not None for r in load if r.kind == "freeform")
    assert all(r.run_id is None for r in load if r.kind != "freeform"), "a command ran"
    runs = await world.store.runs_recent(limit=10 * expected_rows)
    assert len(runs) == expected_runs
    assert {r.status for r in runs} == {"succeeded"}
    assert await world.store.runs_active() == []
    assert await world.store.queue_depths() == {}


async def _load(world: World, report: Callable[[str], None], *, commands: bool) -> None:
    agent, transport, dispatcher = world.agent, world.transport, world.dispatcher
    scripts = [_script(c, MESSAGES, commands) for c in range(CONVERSATIONS)]
    warm = [_script(c, WARM_UP[1], commands) for c in range(WARM_UP[0])]
    figures: dict[str, object] = {
        "conversations": CONVERSATIONS,
        "messages": CONVERSATIONS * MESSAGES,
        "commands": sum(map(len, scripts)) - CONVERSATIONS * MESSAGES,
    }
    try:
        with _traced():
            # Warm every code path (and lazily filled cache) up before the baseline.
            await _send_rounds(world, "warm", warm)
            await _drain(world)
            warm_runs = len(agent.runs)
            _forget_records(world)
            agent.max_global = 0
            baseline_snapshot = tracemalloc.take_snapshot()
            baseline = _traced_now()
            tracemalloc.reset_peak()

            started = time.perf_counter()
            await _send_rounds(world, "load", scripts)
            await _drain(world)
            figures["wall_s"] = round(time.perf_counter() - started, 2)
            figures["peak_growth_kib"] = (tracemalloc.get_traced_memory()[1] - baseline) // 1024
            load_runs = len(agent.runs)
            per_conversation = Counter(Counter(r.request.session for r in agent.runs).values())
            figures.update(
                runs=load_runs,
                # {number of runs: conversations that had that many}
                conversations_by_runs=dict(sorted(per_conversation.items())),
                max_concurrent=agent.max_global,
                queued_notices=sum(r.text.startswith("Queued (") for _, r in transport.sent),
            )

            _check_agent(agent)
            _check_replies(transport, commands)
            await _check_store(world, sum(map(len, warm + scripts)), warm_runs + load_runs)
            assert dispatcher.invariant_violations() == []
            assert dispatcher.live_sessions == 0, "idle conversations must be forgotten"
            assert dispatcher.active_runs == 0
            assert dispatcher.stats["refused"] == 0

            _forget_records(world)
            retained = _traced_now() - baseline
            figures["retained_kib"] = retained // 1024
            if retained >= RETAINED_LIMIT:
                growth = tracemalloc.take_snapshot().compare_to(baseline_snapshot, "lineno")
                pytest.fail(
                    f"{retained // 1024} KiB retained after the load (limit "
                    f"{RETAINED_LIMIT // 1024} KiB); largest growth:\n"
                    + "\n".join(str(s) for s in growth[:8])
                )
    finally:
        report("load figures: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


@pytest.fixture
def report(
    capsys: pytest.CaptureFixture[str], record_property: Callable[[str, object], None]
) -> Callable[[str], None]:
    """Show a line in the test output whether the test passes or fails."""

    def show(line: str) -> None:
        record_property("load_figures", line)
        with capsys.disabled():
            print(f"\n{line}")

    return show


async def test_a_hundred_conversations_of_ten_messages_are_each_delivered_once(
    world: World, report: Callable[[str], None]
) -> None:
    await _load(world, report, commands=False)


async def test_a_burst_of_commands_under_load_is_answered_once_each(
    world: World, report: Callable[[str], None]
) -> None:
    await _load(world, report, commands=True)
