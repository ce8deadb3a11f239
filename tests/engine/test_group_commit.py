"""Group commit of inbox writes: many writes share a transaction, yet each caller returns
only once its own row is committed, with its own id; redeliveries stay None."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from podbay.engine import store as store_module
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


async def test_a_failed_batch_fails_every_caller_and_the_next_batch_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A lock held longer than podbay waits for one (60 s; here 0.5 s, to keep this short).
    monkeypatch.setattr(store_module, "LOCKED_WAIT_S", 0.5)
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


def table(db: Path, sql: str) -> list[tuple[object, ...]]:
    """Rows another process sees."""
    connection = sqlite3.connect(db)
    try:
        return list(connection.execute(sql))
    finally:
        connection.close()


async def test_write_behind_is_committed_in_order_and_every_later_read_sees_it(
    tmp_path: Path,
) -> None:
    db = tmp_path / "p.db"
    room = SessionKey("memory", "room-1")
    store = await Store.open(db)
    try:
        first = await store.inbox_add(message(1))
        second = await store.inbox_add(message(2))
        assert first is not None and second is not None
        # None of these waits for the database...
        await store.inbox_mark([first, second], "processing", kind="freeform", wait=False)
        run_id = await store.run_create(room, "", "a prompt", "fake", inbox_ids=[first], wait=False)
        await store.run_start(run_id, turn=room, wait=False)
        await store.run_event(run_id, "text", "one", wait=False)
        await store.run_event(run_id, "text", "two", wait=False)
        await store.run_finish(run_id, "succeeded", exit_code=0, wait=False)
        # ...yet every read after them sees them, queued reads and locked ones alike.
        run = await store.run_get(run_id)
        assert run is not None and run.status == "succeeded" and run.exit_code == 0
        assert [text for _, _, text in await store.run_events(run_id)] == ["one", "two"]
        assert (await store.session_get(room)).last_turn_at > 0
        row = await store.inbox_get(first)
        assert row is not None and (row.status, row.run_id) == ("processing", run_id)
        # An awaited write returns only once everything queued before it is committed.
        await store.inbox_mark([second], "done")
        assert committed(db) == {"p1": "processing", "p2": "done"}
        assert table(db, "SELECT id, status FROM runs") == [(run_id, "succeeded")]
        assert table(db, "SELECT seq, data FROM run_events") == [(1, "one"), (2, "two")]
    finally:
        await store.close()


async def test_a_short_run_records_the_same_whether_or_not_its_record_was_sent_yet(
    tmp_path: Path,
) -> None:
    """A run started and finished while its INSERT is still queued goes in as one row;
    once the INSERT has gone, the start and the outcome are updates. Either way the row,
    the conversation's turn and the events are the same."""
    store = await Store.open(tmp_path / "p.db")
    clock = iter(range(1000, 2000))
    store._clock = lambda: float(next(clock))
    try:
        recorded = []
        for room, sent_first in (
            (SessionKey("memory", "a"), False),
            (SessionKey("memory", "b"), True),
        ):
            inbox = await store.inbox_add(message(len(recorded), f"run-{room}"))
            assert inbox is not None
            run_id = await store.run_create(
                room, "", "a prompt", "fake", inbox_ids=[inbox], wait=False
            )
            if sent_first:
                await store.inbox_mark([inbox], "processing")  # waits: the INSERT is sent
            await store.run_start(run_id, turn=room, wait=False)
            await store.run_event(run_id, "text", "done it", wait=False)
            await store.run_finish(
                run_id, "failed", exit_code=3, error="it broke", usage={"input_tokens": 7},
                cost_usd=0.25, num_turns=2, wait=False,
            )  # fmt: skip
            run = await store.run_get(run_id)
            session = await store.session_get(room)
            row = await store.inbox_get(inbox)
            assert run is not None and row is not None and row.run_id == run_id
            events = [(kind, text) for _, kind, text in await store.run_events(run_id)]
            recorded.append((run, session.last_turn_at, events))
        (folded, turn_a, events_a), (updated, turn_b, events_b) = recorded
        assert (folded.status, folded.exit_code, folded.error) == ("failed", 3, "it broke")
        assert (folded.usage, folded.cost_usd, folded.num_turns) == ({"input_tokens": 7}, 0.25, 2)
        assert folded.created_at < folded.started_at < folded.finished_at  # type: ignore[operator]
        assert turn_a == folded.started_at and events_a == [("text", "done it")]
        # The second run differs only in its id, its session and its times (later ones).
        same = ("status", "exit_code", "error", "usage", "cost_usd", "num_turns", "prompt")
        assert [getattr(updated, f) for f in same] == [getattr(folded, f) for f in same]
        assert updated.created_at < updated.started_at < updated.finished_at  # type: ignore[operator]
        assert turn_b == updated.started_at and events_b == events_a
    finally:
        await store.close()


async def test_a_runs_messages_are_linked_to_it_and_done_whether_or_not_its_record_was_sent(
    tmp_path: Path,
) -> None:
    """Marked done while the run's record is still queued, the messages get their link to
    the run in that same update; a mark of other messages leaves the link alone."""
    db = tmp_path / "p.db"
    store = await Store.open(db)
    try:
        outcomes = []
        for n, (sent_first, marked) in enumerate(((False, 2), (True, 2), (False, 1))):
            ids = [await store.inbox_add(message(10 * n + i)) for i in range(2)]
            assert None not in ids
            inbox = [i for i in ids if i is not None]
            room = SessionKey("memory", f"r{n}")
            run_id = await store.run_create(room, "", "go", "fake", inbox_ids=inbox, wait=False)
            if sent_first:
                await store.session_get(room)  # a read: the queued INSERT goes first
            await store.run_finish(run_id, "succeeded", wait=False)
            await store.inbox_mark(inbox[:marked], "done", run=run_id)
            rows = [await store.inbox_get(i) for i in inbox]
            outcomes.append([(r.run_id == run_id, r.status) for r in rows if r is not None])
        assert outcomes == [
            [(True, "done"), (True, "done")],
            [(True, "done"), (True, "done")],
            # Not the messages the run was given: they are marked, the link stays the run's.
            [(True, "done"), (True, "received")],
        ]
        # And so on disk, read by another connection.
        assert list(committed(db).values()).count("done") == 5
    finally:
        await store.close()


async def test_write_behind_nobody_waits_for_still_reaches_the_disk(tmp_path: Path) -> None:
    """Held back for company (so a run's records share the commit of its messages' done),
    write-behind writes alone are still committed soon, with no read or awaited write."""
    db = tmp_path / "p.db"
    store = await Store.open(db)
    try:
        row = await store.inbox_add(message(1))
        assert row is not None
        await store.inbox_mark([row], "done", wait=False)
        assert committed(db) == {"p1": "received"}  # held back, for now
        flusher = store._flusher
        assert flusher is not None
        await asyncio.wait_for(asyncio.shield(flusher), 5)  # nobody hurries it
        assert committed(db) == {"p1": "done"}
    finally:
        await store.close()


async def test_a_write_someone_waits_for_takes_held_back_writes_along(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    store = await Store.open(db)
    try:
        first = await store.inbox_add(message(1))
        assert first is not None
        # An awaited write does not sit out the hold: the timer is not what commits it.
        with_timer_off = store_module.WRITE_BEHIND_S
        store_module.WRITE_BEHIND_S = 3600.0
        holding = asyncio.Event()
        hold = store._company

        async def company() -> None:
            holding.set()  # the hold begins before anything else runs
            await hold()

        store._company = company  # type: ignore[method-assign]
        try:
            await store.inbox_mark([first], "done", wait=False)
            await asyncio.wait_for(holding.wait(), 5)
            assert store._nudge is not None, "the write-behind batch is not held back"
            second = await asyncio.wait_for(store.inbox_add(message(2)), 5)
        finally:
            store_module.WRITE_BEHIND_S = with_timer_off
        assert second is not None
        assert committed(db) == {"p1": "done", "p2": "received"}
    finally:
        await store.close()


async def test_a_failed_write_behind_is_logged_and_takes_no_other_write_along(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "p.db"
    store = await Store.open(db)
    try:
        row = await store.inbox_add(message(1))
        assert row is not None
        # In one batch: an event of a run that does not exist (a foreign key fails), and a
        # status change that must still land.
        await store.run_event(999, "text", "lost", wait=False)
        await store.inbox_mark([row], "done", wait=False)
        assert isinstance(await store.inbox_add(message(2)), int)
        assert committed(db) == {"p1": "done", "p2": "received"}
        assert table(db, "SELECT * FROM run_events") == []
        assert "recording an event of run 999 failed" in caplog.text
    finally:
        await store.close()


async def test_run_ids_keep_counting_across_restarts(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    room = SessionKey("memory", "room-1")
    async with await Store.open(db) as store:
        ids = [await store.run_create(room, "", f"p{n}", "fake", wait=n % 2 == 0) for n in range(3)]
    assert ids == [1, 2, 3]
    async with await Store.open(db) as store:
        assert await store.run_create(room, "", "after a restart", "fake") == 4
        assert (await store.runs_recent(session=room))[0].prompt == "after a restart"


async def test_project_names_asked_by_many_at_once_follow_a_new_project(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "p.db")
    try:
        before = await asyncio.gather(*(store.project_names() for _ in range(50)))
        assert before == [[]] * 50
        asking = [asyncio.ensure_future(store.project_names()) for _ in range(50)]
        await store.project_add("web", tmp_path / "web")
        during = await asyncio.gather(*asking)
        assert all(names in ([], ["web"]) for names in during)
        after = await asyncio.gather(*(store.project_names() for _ in range(50)))
        assert after == [["web"]] * 50
    finally:
        await store.close()


async def test_inbox_ids_keep_counting_across_restarts(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    async with await Store.open(db) as store:
        first = await asyncio.gather(*(store.inbox_add(message(n)) for n in range(3)))
    async with await Store.open(db) as store:
        again = await store.inbox_add(message(0))  # a redelivery after the restart
        later = await store.inbox_add(message(3))
        assert again is None
        assert later is not None and later > max(i for i in first if i is not None)
        row = await store.inbox_get(later)
        assert row is not None and row.inbound.platform_id == "p3"
