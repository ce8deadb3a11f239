"""The database under stress: a write lock held by another connection, a full disk.

- Another connection (a second process would look the same) holds SQLite's write lock
  with ``BEGIN EXCLUSIVE`` while podbay is working. Shorter than podbay's ``busy_timeout``
  (``PRAGMA busy_timeout=5000`` in podbay/engine/store.py) podbay waits: every message is
  handled exactly once. Longer, a message that cannot be stored gets an error reply (today
  "I could not store that message ...; send it again."), and every other one is still
  handled once: none vanishes silently.
- The data dir is a 2 MiB tmpfs, filled up to the last byte: each message gets an error
  reply, podbay keeps running, works again once space is freed, and the database passes
  ``PRAGMA integrity_check`` with every earlier row intact. Mounting needs root
  (CAP_SYS_ADMIN); elsewhere that test is skipped and says why.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from fakes.agent import FakeAgent
from fakes.harness import Harness
from fakes.transport import MemoryTransport
from fault_support_outage import WriteLock, fill

from podbay.commands.catalog import build_registry
from podbay.config import Settings
from podbay.dispatcher import Dispatcher
from podbay.engine.core import Engine
from podbay.engine.store import Store


@pytest.fixture
def agent() -> FakeAgent:
    """Runs finish on their own unless a test holds them (``auto_release = None``)."""
    return FakeAgent(auto_release=0.01)


def rows(db_path: Path, sql: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(db_path)
    try:
        return list(db.execute(sql).fetchall())
    finally:
        db.close()


def delivered(agent: FakeAgent) -> list[str]:
    """Every message the agent was given, in order (a batch is joined by blank lines)."""
    return [part for prompt in agent.prompts() for part in prompt.split("\n\n")]


async def busy_timeout_s(store: Store) -> float:
    row = await store._fetchone("PRAGMA busy_timeout")  # the connection podbay writes with
    assert row is not None
    return float(row[0]) / 1000


async def test_a_write_lock_shorter_than_the_busy_timeout_delays_work_and_loses_nothing(
    harness: Harness,
) -> None:
    transport, agent = harness.transport, harness.agent
    db_path = harness.settings.data_dir / "podbay.db"
    hold_s = await busy_timeout_s(harness.store) / 3  # well inside podbay's patience
    agent.auto_release = None
    await transport.say("fix the build")
    run = await agent.next_started()
    async with WriteLock(db_path) as lock:
        run.release.set()  # the run ends while nothing can be written
        agent.auto_release = 0.01
        sent = ["then run the tests", "whoami", "and commit"]
        submits = [asyncio.create_task(transport.say(text)) for text in sent]
        await asyncio.sleep(hold_s)  # the other writer's transaction lasts this long
        # Messages are acknowledged only once stored. (A run's records are written behind:
        # its answer may show while they wait for the lock; they are committed after it.)
        assert not any(s.done() for s in submits), "stored while the database was locked?"
        assert delivered(agent) == ["fix the build"], "a run began before its messages were stored"
        await lock.release()
    await asyncio.wait_for(asyncio.gather(*submits), 30)
    await transport.wait_for_text("echo: fix the build")
    await transport.wait_for_text("You are `memory:alice`")
    await transport.wait_for_text("and commit")
    await transport.say("after the lock")
    await transport.wait_for_text("echo: after the lock")
    await harness.dispatcher.drain()

    assert delivered(agent) == [
        "fix the build",
        "then run the tests",
        "and commit",
        "after the lock",
    ]
    texts = transport.texts()
    assert sum("You are `memory:alice`" in t for t in texts) == 1
    assert sum("echo: fix the build" in t for t in texts) == 1
    assert transport.texts(kind="error") == []
    assert not [t for t in texts if "went wrong" in t or "failed" in t]
    # The answer given during the lock is on record too.
    (first,) = [r for r in await harness.store.runs_recent(limit=10) if r.prompt == "fix the build"]
    assert (first.status, [d for _, _, d in await harness.store.run_events(first.id)]) == (
        "succeeded",
        ["echo: fix the build"],
    )
    inbox = rows(db_path, "SELECT text, status FROM inbox ORDER BY id")
    assert inbox == [(text, "done") for text in ["fix the build", *sent, "after the lock"]]
    assert {r[0] for r in rows(db_path, "SELECT status FROM runs")} == {"succeeded"}


async def test_a_write_lock_longer_than_the_busy_timeout_refuses_with_a_reply_never_silently(
    harness: Harness,
) -> None:
    transport, agent = harness.transport, harness.agent
    db_path = harness.settings.data_dir / "podbay.db"
    hold_s = await busy_timeout_s(harness.store) + 2  # beyond podbay's patience
    await transport.say("before the lock")
    await transport.wait_for_text("echo: before the lock")
    await harness.dispatcher.drain()  # its run is recorded as finished before the lock
    sent = ["first while locked", "whoami", "second while locked", "third while locked"]
    async with WriteLock(db_path) as lock:
        submits = [asyncio.create_task(transport.say(text)) for text in sent]
        await asyncio.sleep(hold_s)  # the other writer's transaction lasts this long
        await lock.release()
    await asyncio.wait_for(asyncio.gather(*submits), 60)
    await transport.say("after the lock")
    await transport.wait_for_text("after the lock", timeout=30)
    await harness.dispatcher.drain()

    texts = transport.texts()
    refusals = transport.texts(kind="error")  # today: "I could not store that message ..."
    assert all("Traceback" not in t and "database is locked" not in t for t in refusals)
    stored = [r[0] for r in rows(db_path, "SELECT text FROM inbox ORDER BY id")]
    handled = delivered(agent) + ["whoami"] * sum("You are `memory:alice`" in t for t in texts)
    for text in sent:
        # Either handled exactly once, or not stored and the sender was told so.
        assert handled.count(text) == stored.count(text) <= 1, (text, handled, stored)
    assert len(sent) - sum(text in stored for text in sent) == len(refusals)
    assert handled.count("after the lock") == 1, "podbay works again once the lock is gone"
    statuses = rows(db_path, "SELECT status FROM inbox")
    assert all(status == "done" for (status,) in statuses), statuses


@dataclass
class Running:
    store: Store
    dispatcher: Dispatcher
    transport: MemoryTransport
    agent: FakeAgent


@asynccontextmanager
async def podbay_on(data_dir: Path) -> AsyncIterator[Running]:
    """The dispatcher, store and engine on ``data_dir``, as in tests/conftest.py."""
    settings = Settings(
        data_dir=data_dir,
        access={"admins": ["memory:alice"]},
        dispatcher={"coalesce_window_ms": 50, "max_window_ms": 200},
    )
    store = await Store.open(data_dir / "podbay.db")
    agent = FakeAgent(auto_release=0.01)
    dispatcher = Dispatcher(Engine(store, settings, agent=agent), build_registry(), settings)
    transport = MemoryTransport()
    dispatcher.attach(transport)
    await transport.start(dispatcher.submit)
    await dispatcher.recover()
    try:
        yield Running(store, dispatcher, transport, agent)
        assert dispatcher.invariant_violations() == []
    finally:
        await dispatcher.shutdown(grace_s=2)
        await store.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted at ``<tmp>/data`` (unmounted afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root (CAP_SYS_ADMIN); not root here")
    mount = tmp_path / "data"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount)], check=True)  # a file still open


async def test_a_full_disk_is_reported_podbay_keeps_running_and_the_database_stays_intact(
    small_disk: Path,
) -> None:
    db_path = small_disk / "podbay.db"
    filler = small_disk / "filler"
    async with podbay_on(small_disk) as bot:
        transport = bot.transport
        await transport.say("before the disk filled")
        await transport.wait_for_text("echo: before the disk filled")
        await transport.say("verbose 2")
        await transport.wait_for_text("Verbosity here is now 2.")
        await bot.dispatcher.drain()  # recorded as done before the disk fills

        await asyncio.to_thread(fill, filler)
        assert os.statvfs(small_disk).f_bavail == 0
        seen = len(transport.sent)
        await transport.say("while the disk is full")
        await transport.say("verbose 0")
        await transport.wait_for(lambda: len(transport.sent) >= seen + 2)
        errors = transport.sent[seen:]
        assert [reply.kind for _, reply in errors] == ["error", "error"], errors
        assert all("Traceback" not in reply.text for _, reply in errors), errors

        await asyncio.to_thread(filler.unlink)  # space again: podbay never stopped
        await transport.say("after the disk was freed")
        await transport.wait_for_text("echo: after the disk was freed")
        await transport.say("verbose 1")
        await transport.wait_for_text("Verbosity here is now 1.")
        await bot.dispatcher.drain()
        assert delivered(bot.agent) == ["before the disk filled", "after the disk was freed"]

    assert rows(db_path, "PRAGMA integrity_check") == [("ok",)]
    assert rows(db_path, "SELECT text, status FROM inbox ORDER BY id") == [
        ("before the disk filled", "done"),
        ("verbose 2", "done"),
        ("after the disk was freed", "done"),
        ("verbose 1", "done"),
    ]
    assert rows(db_path, "SELECT prompt, status FROM runs ORDER BY id") == [
        ("before the disk filled", "succeeded"),
        ("after the disk was freed", "succeeded"),
    ]
    async with podbay_on(small_disk) as restarted:  # and it starts again on that database
        # (a new MemoryTransport numbers its messages from m1 again: a fresh id)
        await restarted.transport.say("after a restart", platform_id="after-restart")
        await restarted.transport.wait_for_text("echo: after a restart")
