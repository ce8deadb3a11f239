"""Per-sender rate limiting, retention of old rows, and `podbay backup`."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from fakes.agent import FakeAgent
from fakes.harness import Harness
from fakes.transport import MemoryTransport

from podbay.bot import Podbay
from podbay.cli import main
from podbay.commands.catalog import build_registry
from podbay.config import Settings
from podbay.dispatcher import Dispatcher
from podbay.engine.core import Engine
from podbay.engine.store import Store
from podbay.transports.base import Health


def inbox(db: Path, column: str) -> list[str]:
    """One column of every inbox row, oldest first (read as another process would)."""
    connection = sqlite3.connect(db)
    try:
        return [r[0] for r in connection.execute(f"SELECT {column} FROM inbox ORDER BY id")]
    finally:
        connection.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def limited(
    settings: Settings, clock: Clock, per_minute: int
) -> tuple[Store, Dispatcher, MemoryTransport]:
    settings.dispatcher.rate_limit_per_minute = per_minute
    store = await Store.open(settings.data_dir / "podbay.db")
    dispatcher = Dispatcher(
        Engine(store, settings, agent=FakeAgent(0.0)), build_registry(), settings, clock=clock
    )
    transport = MemoryTransport()
    dispatcher.attach(transport)
    await transport.start(dispatcher.submit)
    await dispatcher.recover()
    return store, dispatcher, transport


async def test_a_sender_over_the_limit_is_told_once_and_nothing_more_runs(
    settings: Settings,
) -> None:
    clock = Clock()
    store, dispatcher, transport = await limited(settings, clock, per_minute=3)
    try:
        for _ in range(6):
            await transport.say("whoami", user="bob")
        await dispatcher.drain()
        answers = [t for t in transport.texts() if "memory:bob" in t]
        told = [t for t in transport.texts() if "faster than podbay accepts" in t]
        assert len(answers) == 3
        assert len(told) == 1 and "3 a minute" in told[0]
        assert "rate_limit_per_minute" in told[0]
        # The dropped messages are on record, not lost without a trace.
        kinds = inbox(settings.data_dir / "podbay.db", "kind")
        assert kinds.count("rate-limited") == 3
        # Another sender is not affected.
        await transport.say("whoami", user="alice")
        await dispatcher.drain()
        assert any("memory:alice" in t for t in transport.texts())
        # A minute later bob may write again (and would be told again if he floods).
        clock.now += 61
        await transport.say("whoami", user="bob")
        await dispatcher.drain()
        assert len([t for t in transport.texts() if "memory:bob" in t]) == 4
    finally:
        await dispatcher.shutdown(0)
        await store.close()


async def test_the_local_console_has_no_limit(settings: Settings) -> None:
    clock = Clock()
    store, dispatcher, transport = await limited(settings, clock, per_minute=2)
    transport.health = Health("memory", local=True)  # type: ignore[attr-defined]
    try:
        for _ in range(5):
            await transport.say("whoami", user="bob")
        await dispatcher.drain()
        assert len([t for t in transport.texts() if "memory:bob" in t]) == 5
        assert not any("faster than podbay" in t for t in transport.texts())
    finally:
        await dispatcher.shutdown(0)
        await store.close()


async def test_unknown_senders_are_limited_without_being_told(settings: Settings) -> None:
    clock = Clock()
    store, dispatcher, transport = await limited(settings, clock, per_minute=2)
    try:
        for _ in range(5):
            await transport.say("whoami", user="mallory")
        await dispatcher.drain()
        assert not any("faster than podbay" in t for t in transport.texts())
        assert len([t for t in transport.texts() if "not allowed" in t]) <= 1
    finally:
        await dispatcher.shutdown(0)
        await store.close()


async def test_prune_removes_old_finished_rows_only(tmp_path: Path) -> None:
    clock = Clock()
    store = await Store.open(tmp_path / "p.db", clock=clock)
    try:
        harness_settings = Settings(data_dir=tmp_path, access={"admins": ["memory:*"]})
        engine = Engine(store, harness_settings, agent=FakeAgent(0.0))
        dispatcher = Dispatcher(engine, build_registry(), harness_settings)
        transport = MemoryTransport()
        dispatcher.attach(transport)
        await transport.start(dispatcher.submit)
        await dispatcher.recover()
        await transport.say("whoami")
        await transport.say("an old prompt")
        await dispatcher.drain()
        clock.now += 40 * 86400  # forty days later
        await transport.say("whoami", platform_id="new-1")
        await dispatcher.drain()
        await dispatcher.shutdown(0)
        pruned = await store.prune(clock.now - 30 * 86400)
        assert pruned["inbox"] == 2 and pruned["audit"] >= 1 and pruned["run_events"] >= 1
        assert inbox(tmp_path / "p.db", "platform_id") == ["new-1"]
        assert await store.prune(clock.now - 30 * 86400) == {
            "inbox": 0,
            "run_events": 0,
            "audit": 0,
        }
    finally:
        await store.close()


async def test_podbay_prunes_at_start(settings: Settings) -> None:
    settings.store.retention_days = 1
    store = await Store.open(settings.data_dir / "podbay.db", clock=lambda: time.time() - 3 * 86400)
    await store.audit("memory:alice", "whoami", "ok")
    await store.close()
    async with Podbay(settings, transports=[], docker=False, agent=FakeAgent(0.0)) as bot:
        await bot.pruned.wait()
        assert bot.store is not None
        assert await bot.store.audit_recent() == []


async def test_backup_is_a_consistent_copy_while_podbay_runs(
    harness: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str], clean_logging: None
) -> None:
    await harness.transport.say("whoami")
    await harness.dispatcher.drain()
    data_dir = str(harness.settings.data_dir)
    dest = tmp_path / "backup.db"
    assert main(["backup", str(dest), "--data-dir", data_dir]) == 0
    assert "consistent copy" in capsys.readouterr().out
    copy = sqlite3.connect(dest)
    try:
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert copy.execute("SELECT count(*) FROM audit").fetchone()[0] >= 1
    finally:
        copy.close()
    assert dest.stat().st_mode & 0o777 == 0o600
    # An existing file is not overwritten without --force.
    assert main(["backup", str(dest), "--data-dir", data_dir]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["backup", str(dest), "--data-dir", data_dir, "--force"]) == 0


async def test_a_backup_restores(tmp_path: Path, settings: Settings, clean_logging: None) -> None:
    async with Podbay(settings, transports=[], docker=False, agent=FakeAgent(0.0)) as bot:
        assert bot.store is not None
        await bot.store.audit("memory:alice", "marker", "before the backup")
    dest = tmp_path / "copy.db"
    assert main(["backup", str(dest), "--data-dir", str(settings.data_dir)]) == 0
    # Disaster: the database is lost. Restore as README says: put the copy in its place.
    db = settings.data_dir / "podbay.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    dest.replace(db)
    async with Podbay(settings, transports=[], docker=False, agent=FakeAgent(0.0)) as bot:
        assert bot.store is not None
        assert any(a.action == "marker" for a in await bot.store.audit_recent())
