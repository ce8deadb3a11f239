"""[polish] messages a new user trips over: busy replies, crash-recovery notices, agent
output decoding, refusals across restarts and log code blocks."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import pytest
from fakes.agent import FakeAgent
from fakes.harness import Harness
from fakes.transport import MemoryTransport

from podbay.commands.context import CommandContext
from podbay.commands.registry import CommandSpec, Invocation, Positional, Registry
from podbay.commands.roles import Role
from podbay.config import Settings
from podbay.dispatcher import Dispatcher
from podbay.engine.agents import FinishedEvent, HostCommandAgent, RunRequest, TextEvent
from podbay.engine.core import Engine
from podbay.engine.jobs import JobHandle
from podbay.engine.store import Store
from podbay.messages import Inbound, Sender, SessionKey

ROOM = SessionKey("memory", "room-1")
ALICE = Sender("memory", "alice", "Alice")


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
    return registry


# -- (8) busy is checked before anything is announced ---------------------------------------


async def test_new_project_on_a_busy_project_answers_busy_with_the_job_and_its_age_only(
    harness: Harness, job_gate: asyncio.Event
) -> None:
    await harness.transport.say("slowjob demo")
    await harness.transport.wait_for_text("started the slow job")
    before = len(harness.transport.texts(ROOM))
    await harness.transport.say("new project demo")
    reply = await harness.transport.wait_for_text("busy", since=before)
    new = harness.transport.texts(ROOM)[before:]
    assert new == [reply], "the busy reply comes alone, with no 'Creating' line before it"
    assert "Creating" not in reply
    assert "slowjob" in reply and "demo" in reply
    assert re.search(r"since \d\d:\d\d:\d\d \(\d+ (s|min) ago\)", reply), reply
    job_gate.set()
    await harness.transport.wait_for_text("slowjob demo done")


# -- (12) one recovery line per interrupted run ---------------------------------------------


async def test_recovery_sends_one_line_per_interrupted_run_listing_its_messages(
    settings: Settings, registry: Registry
) -> None:
    path = settings.data_dir / "podbay.db"
    async with await Store.open(path) as store:
        ids = []
        for n, text in enumerate(("fix the parser", "and its tests", "rename the module")):
            row = await store.inbox_add(Inbound(ROOM, ALICE, text, f"p{n}"))
            assert row is not None
            ids.append(row)
        await store.inbox_mark(ids, "processing", kind="freeform")
        first = await store.run_create(
            ROOM, "", "fix the parser\n\nand its tests", "fake", inbox_ids=ids[:2]
        )
        second = await store.run_create(ROOM, "", "rename the module", "fake", inbox_ids=ids[2:])
    async with await Store.open(path) as store:
        dispatcher = Dispatcher(Engine(store, settings, agent=FakeAgent()), registry, settings)
        transport = MemoryTransport()
        dispatcher.attach(transport)
        await dispatcher.recover()
        await dispatcher.drain()
        (notice,) = transport.texts(ROOM)
        lines = notice.splitlines()
        assert len(lines) == 2, notice
        assert "fix the parser" in lines[0] and "and its tests" in lines[0]
        assert f"#{first}" in lines[0]
        assert "rename the module" in lines[1] and f"#{second}" in lines[1]
        assert all(line.startswith("podbay restarted while working on") for line in lines)
        await dispatcher.shutdown()


# -- (13) agent output is decoded incrementally ---------------------------------------------

# Writes each piece, then waits until podbay has read it out of the pipe before the next:
# every piece ends inside a multibyte character, so podbay's reads end mid-character too.
STRADDLING_AGENT = r"""
import fcntl, json, struct, sys, termios, time

def pending():
    return struct.unpack("i", fcntl.ioctl(1, termios.FIONREAD, b"\0\0\0\0"))[0]

out = sys.stdout.buffer
for piece in json.load(open(sys.argv[1])):
    out.write(bytes.fromhex(piece))
    out.flush()
    deadline = time.monotonic() + 10
    while pending() and time.monotonic() < deadline:
        time.sleep(0.001)
"""

CHARS = ["é", "😀", "€", "🎉", "ß", "🚀", "ü", "👍"] * 3


def straddling_pieces() -> list[bytes]:
    """Lines of filler, cut 1..3 bytes into a multibyte character at every 64 KiB boundary."""
    line = b"x" * 99 + b"\n"
    pieces: list[bytes] = []
    carry = b""
    written = 0
    for k, char in enumerate(CHARS):
        data = char.encode()
        cut = 1 + k % (len(data) - 1)
        filler = (line * 700)[: (k + 1) * 65536 - cut - written - len(carry)]
        piece = carry + filler + data[:cut]
        pieces.append(piece)
        written += len(piece)
        carry = data[cut:] + b"\n"
    pieces.append(carry)
    return pieces


async def test_host_agent_output_with_characters_split_across_reads_arrives_intact(
    tmp_path: Path,
) -> None:
    pieces = straddling_pieces()
    (tmp_path / "pieces.json").write_text(json.dumps([p.hex() for p in pieces]))
    script = tmp_path / "agent.py"
    script.write_text(STRADDLING_AGENT)
    argv = [sys.executable, str(script), str(tmp_path / "pieces.json")]
    texts: list[str] = []
    finished: FinishedEvent | None = None
    async for event in HostCommandAgent(argv).run(RunRequest("go")):
        if isinstance(event, TextEvent):
            texts.append(event.text)
        elif isinstance(event, FinishedEvent):
            finished = event
    assert finished is not None and finished.ok, finished
    answer = "\n\n".join(texts)
    assert "\ufffd" not in answer
    assert answer == b"".join(pieces).decode().strip("\n")
    for char in set(CHARS):
        assert answer.count(char) == 3


# -- (14) refusals of unknown senders are remembered across restarts ------------------------


async def test_unknown_sender_is_not_refused_again_after_a_restart(
    settings: Settings, registry: Registry
) -> None:
    path = settings.data_dir / "podbay.db"
    for attempt in range(2):
        async with await Store.open(path) as store:
            dispatcher = Dispatcher(Engine(store, settings, agent=FakeAgent()), registry, settings)
            transport = MemoryTransport()
            dispatcher.attach(transport)
            await transport.start(dispatcher.submit)
            await dispatcher.recover()
            await transport.say("let me in", user="mallory", platform_id=f"m{attempt}")
            await dispatcher.drain()
            texts = transport.texts(ROOM)
            if attempt == 0:
                assert len(texts) == 1 and "not allowed" in texts[0]
            else:
                assert texts == [], "a restart must not repeat the refusal within the interval"
            assert dispatcher.stats["denied"] == 1
            await dispatcher.shutdown()


# -- (18) logs render as one intact code block ----------------------------------------------


async def test_logs_containing_four_backticks_render_as_one_intact_code_block(
    harness: Harness,
) -> None:
    await harness.store.project_reserve(
        "demo",
        harness.settings.data_dir / "src" / "demo",
        port_range=(42000, 42010),
        port_is_free=lambda port: True,
    )
    log = "starting\n````\nnot the end of the block\n```\nstill inside\ndone"
    asked: list[tuple[str, int]] = []

    async def container_logs(project: str, lines: int) -> str:
        asked.append((project, lines))
        return log + "\n"

    harness.engine.container_logs = container_logs  # type: ignore[method-assign]
    await harness.transport.say("logs demo -n 7")
    reply = await harness.transport.wait_for_text("log lines of `demo`")
    assert asked == [("demo", 7)]
    head, _, block = reply.partition("\n")
    assert head == "Last 7 log lines of `demo`:"
    fence = re.match(r"`{3,}", block)
    assert fence is not None
    lines = block.split("\n")
    # Opened once, closed once, at the end: nothing in the log closes it early.
    assert lines[0] == fence[0] and lines[-1] == fence[0]
    assert len(fence[0]) > 4
    assert "\n".join(lines[1:-1]) == log
