"""Group commit of inbox writes: many writes share a transaction, yet each caller returns
only once its own row is committed, with its own id; redeliveries stay None."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from podbay.engine.store import Store
from podbay.messages import Inbound, Sender, SessionKey


def message(n: int, platform_id: str | None = None) -> Inbound:
    return Inbound(
        session=SessionKey("memory", f"room-{n % 7}"),
        sender=Sender("memory", "alice"),
        text=f"message {n}",
        platform_id=platform_id or f"p{n}",
    )


def committed(db: Path) -> dict[str, str]:
    """What another process sees: platform id -> status."""
    connection = sqlite3.connect(db)
    try:
        return dict(connection.execute("SELECT platform_id, status FROM inbox"))
    finally:
        connection.close()


async def test_concurrent_writes_get_their_own_ids_and_redeliveries_none(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    store = await Store.open(db)
    try:
        # 600 at once (more than one multi-row INSERT), with redeliveries among them.
        inbounds = [message(n) for n in range(600)] + [message(n) for n in range(0, 600, 50)]
        ids = await asyncio.gather(*(store.inbox_add(m) for m in inbounds))
        fresh, again = ids[:600], ids[600:]
        assert all(isinstance(i, int) for i in fresh) and len(set(fresh)) == 600
        assert again == [None] * 12
        # Each id is the row of its own message.
        rows = {
            (await store.inbox_get(i)).inbound.platform_id: i  # type: ignore[union-attr]
            for i in fresh
            if i is not None
        }
        assert rows == {f"p{n}": fresh[n] for n in range(600)}
        seen = committed(db)
        assert len(seen) == 600 and set(seen.values()) == {"received"}
        # Status changes for many rows at once, interleaved with new messages.
        marks = [store.inbox_mark([i], "done", kind="test") for i in fresh if i is not None]
        more = [store.inbox_add(message(n)) for n in range(600, 650)]
        await asyncio.gather(*marks, *more)
        seen = committed(db)
        assert sum(s == "done" for s in seen.values()) == 600 and len(seen) == 650
    finally:
        await store.close()


async def test_returned_means_committed(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    store = await Store.open(db)
    try:
        for n in range(5):
            row = await store.inbox_add(message(n))
            # Another connection sees it at once: acknowledged only once stored.
            assert committed(db)[f"p{n}"] == "received"
            assert row is not None
            await store.inbox_mark([row], "processing")
            assert committed(db)[f"p{n}"] == "processing"
    finally:
        await store.close()


async def test_a_failed_batch_fails_every_caller_and_the_next_batch_works(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    store = await Store.open(db)
    blocker = sqlite3.connect(db, timeout=0)
    try:
        await store._execute("PRAGMA busy_timeout=0")  # fail at once instead of waiting
        blocker.execute("BEGIN EXCLUSIVE")
        results = await asyncio.gather(
            *(store.inbox_add(message(n)) for n in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, sqlite3.OperationalError) for r in results), results
        blocker.rollback()
        assert isinstance(await store.inbox_add(message(9)), int)
        assert set(committed(db)) == {"p9"}  # nothing of the failed batch half-written
    finally:
        blocker.close()
        await store.close()
