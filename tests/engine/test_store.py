"""Contract tests for podbay.engine.store.Store, on a file database and in memory."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Coroutine, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from podbay.engine.store import MIGRATIONS, Store
from podbay.errors import StoreError
from podbay.messages import Action, Inbound, Sender, SessionKey

ROOM = SessionKey("matrix", "!room:example.org")
THREAD = SessionKey("slack", "C123", "1700000000.000100")

T = TypeVar("T")


class FakeClock:
    """Returns 1000.0, 1001.0, ... so every timestamp is distinct and predictable."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        value = self.now
        self.now += 1.0
        return value


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["file", "memory"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> AsyncIterator[Store]:
    path: str | Path = tmp_path / "podbay.db" if request.param == "file" else ":memory:"
    async with await Store.open(path, clock=clock) as opened:
        yield opened


def message(
    platform_id: str,
    *,
    session: SessionKey = ROOM,
    text: str = "hello",
    user: str = "@alice:example.org",
) -> Inbound:
    return Inbound(
        session=session,
        sender=Sender(session.transport, user, "Alice"),
        text=text,
        platform_id=platform_id,
        received_at=500.0,
    )


async def add(store: Store, platform_id: str, **kwargs: Any) -> int:
    id_ = await store.inbox_add(message(platform_id, **kwargs))
    assert id_ is not None
    return id_


async def status_of(store: Store, id_: int) -> str:
    row = await store.inbox_get(id_)
    assert row is not None
    return row.status


# --------------------------------------------------------------------------- schema


async def test_fresh_database_is_at_latest_schema(store: Store) -> None:
    assert await store.schema_version() == len(MIGRATIONS)
    # The tables of migration 1 are usable.
    await store.project_add("web", "/srv/web")
    assert [p.name for p in await store.project_list()] == ["web"]


async def test_reopen_keeps_data_and_does_not_rerun_migrations(tmp_path: Path) -> None:
    path = tmp_path / "podbay.db"
    async with await Store.open(path, clock=FakeClock(1000.0)) as store:
        await store.project_add("web", "/srv/web", ssh_port=2201)

    async with await Store.open(path, clock=FakeClock(9000.0)) as store:
        assert await store.schema_version() == len(MIGRATIONS)
        project = await store.project_get("web")
        assert project is not None
        assert project.ssh_port == 2201

    with sqlite3.connect(path) as raw:
        applied = raw.execute("SELECT version, applied_at FROM schema_migrations").fetchall()
    raw.close()
    # Recorded once, by the first open (the second clock starts at 9000).
    assert len(applied) == len(MIGRATIONS)
    assert all(at < 9000.0 for _, at in applied)


async def test_file_database_uses_wal_and_creates_parent_dirs(tmp_path: Path) -> None:
    path = tmp_path / "state" / "nested" / "podbay.db"
    async with await Store.open(path):
        assert path.exists()
        raw = sqlite3.connect(path)
        try:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            raw.close()


async def test_newer_schema_is_refused_with_upgrade_hint(tmp_path: Path) -> None:
    path = tmp_path / "podbay.db"
    async with await Store.open(path):
        pass
    raw = sqlite3.connect(path)
    with raw:
        raw.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?, 0)",
            (len(MIGRATIONS) + 1,),
        )
    raw.close()

    with pytest.raises(StoreError, match=r"newer than this podbay.*upgrade podbay") as info:
        await Store.open(path)
    assert f"version {len(MIGRATIONS) + 1}" in str(info.value)
    assert f"knows {len(MIGRATIONS)}" in str(info.value)


async def test_close_is_idempotent(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "podbay.db")
    await store.close()
    await store.close()


# --------------------------------------------------------------------------- inbox


async def test_inbox_add_dedupes_per_transport(store: Store) -> None:
    first = await store.inbox_add(message("evt-1"))
    again = await store.inbox_add(message("evt-1", text="redelivered"))
    other_transport = await store.inbox_add(message("evt-1", session=THREAD))
    other_id = await store.inbox_add(message("evt-2"))

    assert isinstance(first, int)
    assert again is None
    assert isinstance(other_transport, int)
    assert isinstance(other_id, int)
    assert len({first, other_transport, other_id}) == 3
    row = await store.inbox_get(first)
    assert row is not None
    assert row.inbound.text == "hello"  # the redelivery did not overwrite anything


async def test_inbox_round_trips_inbound_and_stores_override_text(store: Store) -> None:
    inbound = Inbound(
        session=THREAD,
        sender=Sender("slack", "U42", "Bob"),
        text="token=s3cret deploy",
        platform_id="1700000000.000200",
        received_at=1234.5,
        is_direct=True,
        mentioned=True,
    )
    id_ = await store.inbox_add(inbound, text="token=[redacted] deploy")
    assert id_ is not None

    row = await store.inbox_get(id_)
    assert row is not None
    assert row.inbound == replace(inbound, text="token=[redacted] deploy")
    assert (row.kind, row.status, row.note, row.run_id) == ("", "received", "", None)
    assert await store.inbox_get(id_ + 1000) is None


async def test_inbox_mark_updates_kind_and_note_only_when_given(store: Store) -> None:
    a = await add(store, "a")
    b = await add(store, "b")
    untouched = await add(store, "c")

    await store.inbox_mark([a, b], "processing", kind="job", note="deploying")
    await store.inbox_mark([a], "done")

    row_a, row_b, row_c = [await store.inbox_get(i) for i in (a, b, untouched)]
    assert row_a is not None and row_b is not None and row_c is not None
    assert (row_a.status, row_a.kind, row_a.note) == ("done", "job", "deploying")
    assert (row_b.status, row_b.kind, row_b.note) == ("processing", "job", "deploying")
    assert (row_c.status, row_c.kind, row_c.note) == ("received", "", "")


async def test_inbox_recover(store: Store) -> None:
    busy1 = await add(store, "1")
    waiting1 = await add(store, "2")
    finished = await add(store, "3")
    busy2 = await add(store, "4")
    waiting2 = await add(store, "5")
    await store.inbox_mark([busy2, busy1], "processing", kind="freeform")
    await store.inbox_mark([finished], "done")

    interrupted, received = await store.inbox_recover()

    assert [r.id for r in interrupted] == [busy1, busy2]
    assert all(r.status == "interrupted" and r.kind == "freeform" for r in interrupted)
    assert [r.id for r in received] == [waiting1, waiting2]
    assert all(r.status == "received" for r in received)
    assert await status_of(store, busy1) == "interrupted"
    assert await status_of(store, busy2) == "interrupted"
    assert await status_of(store, waiting1) == "received"
    assert await status_of(store, finished) == "done"

    again_interrupted, again_received = await store.inbox_recover()
    assert again_interrupted == []
    assert [r.id for r in again_received] == [waiting1, waiting2]


async def test_queue_depths_counts_unattached_freeform_processing(store: Store) -> None:
    counted = [await add(store, f"q{i}") for i in range(2)]
    attached = await add(store, "attached")
    control = await add(store, "control")
    waiting = await add(store, "waiting")
    finished = await add(store, "finished")
    elsewhere = await add(store, "elsewhere", session=THREAD)

    await store.inbox_mark([*counted, attached, elsewhere], "processing", kind="freeform")
    run_id = await store.run_create(ROOM, "web", "fix it", "claude", inbox_ids=[attached])
    await store.inbox_mark([control], "processing", kind="control")
    await store.inbox_mark([waiting], "received", kind="freeform")
    await store.inbox_mark([finished], "done", kind="freeform")

    assert await store.queue_depths() == {str(ROOM): 2, str(THREAD): 1}
    row = await store.inbox_get(attached)
    assert row is not None and row.run_id == run_id


# --------------------------------------------------------------------------- sessions


async def test_session_get_default_then_set_project(store: Store) -> None:
    default = await store.session_get(ROOM)
    assert default.session_key == str(ROOM)
    assert default.active_project is None
    assert default.agent_sessions == {}
    assert await store.sessions_using("web") == []

    await store.project_add("web", "/srv/web")
    await store.session_set_project(ROOM, "web")
    await store.session_set_project(THREAD, "web")
    selected = await store.session_get(ROOM)
    assert selected.active_project == "web"
    assert selected.last_activity > 0
    assert sorted(await store.sessions_using("web")) == sorted([ROOM, THREAD])

    await store.session_set_project(ROOM, None)
    assert (await store.session_get(ROOM)).active_project is None
    assert await store.sessions_using("web") == [THREAD]


async def test_session_set_project_requires_existing_project(store: Store) -> None:
    with pytest.raises(StoreError, match="project ghost does not exist"):
        await store.session_set_project(ROOM, "ghost")
    assert (await store.session_get(ROOM)).active_project is None


async def test_session_agent_sessions_and_touch(store: Store, clock: FakeClock) -> None:
    await store.session_set_agent_session(ROOM, "web", "agent-1")
    await store.session_set_agent_session(ROOM, "api", "agent-2")
    await store.session_set_agent_session(ROOM, "web", "agent-3")
    row = await store.session_get(ROOM)
    assert row.agent_sessions == {"web": "agent-3", "api": "agent-2"}

    before = row.last_activity
    await store.session_touch(ROOM)
    after = await store.session_get(ROOM)
    assert after.last_activity > before
    assert after.agent_sessions == row.agent_sessions  # touching keeps the map

    await store.session_touch(THREAD)  # creates the row
    assert (await store.session_get(THREAD)).last_activity > after.last_activity


# --------------------------------------------------------------------------- projects


async def test_project_add_get_list(store: Store, clock: FakeClock) -> None:
    clock.now = 42.0
    added = await store.project_add(
        "web",
        "/srv/web",
        stack="python",
        git_url="git@example.org:web.git",
        ssh_port=2201,
        created_by="matrix:@alice:example.org",
        settings={"agent": "claude"},
    )
    await store.project_add("api", "/srv/api")

    assert added.name == "web"
    assert (added.stack, added.path, added.git_url) == (
        "python",
        "/srv/web",
        "git@example.org:web.git",
    )
    assert (added.ssh_port, added.state, added.container_id, added.image) == (
        2201,
        "creating",
        "",
        "",
    )
    assert added.created_by == "matrix:@alice:example.org"
    assert added.settings == {"agent": "claude"}
    assert added.created_at == added.updated_at == 42.0
    assert await store.project_get("web") == added
    assert await store.project_get("nope") is None
    assert [p.name for p in await store.project_list()] == ["api", "web"]
    assert await store.ports_in_use() == {2201}


async def test_project_uniqueness_errors_are_clear(store: Store) -> None:
    await store.project_add("web", "/srv/web", ssh_port=2201)

    with pytest.raises(StoreError, match=r"^project web already exists$") as info:
        await store.project_add("web", "/srv/other", ssh_port=2299)
    assert isinstance(info.value.__cause__, sqlite3.IntegrityError)

    with pytest.raises(StoreError, match=r"^ssh port 2201 is already in use$"):
        await store.project_add("api", "/srv/api", ssh_port=2201)

    assert [p.name for p in await store.project_list()] == ["web"]
    assert await store.ports_in_use() == {2201}


async def test_project_update(store: Store) -> None:
    before = await store.project_add("web", "/srv/web", ssh_port=2201)
    await store.project_add("api", "/srv/api", ssh_port=2202)

    after = await store.project_update(
        "web", state="running", container_id="abc123", image="podbay/python", settings={"x": 1}
    )
    assert (after.state, after.container_id, after.image) == ("running", "abc123", "podbay/python")
    assert after.settings == {"x": 1}
    assert after.ssh_port == 2201
    assert after.created_at == before.created_at
    assert after.updated_at > before.updated_at
    assert await store.project_get("web") == after

    released = await store.project_update("web", ssh_port=None)
    assert released.ssh_port is None
    assert await store.ports_in_use() == {2202}

    with pytest.raises(StoreError, match="ssh port 2202 is already in use"):
        await store.project_update("web", ssh_port=2202)
    with pytest.raises(StoreError, match="created_by"):
        await store.project_update("web", created_by="mallory")
    with pytest.raises(StoreError, match="project ghost does not exist"):
        await store.project_update("ghost", state="running")


async def test_project_remove_clears_sessions_but_keeps_run_history(store: Store) -> None:
    await store.project_add("web", "/srv/web", ssh_port=2201)
    await store.session_set_project(ROOM, "web")
    run_id = await store.run_create(ROOM, "web", "hi", "claude")

    assert await store.project_remove("web") is True
    assert await store.project_remove("web") is False

    # ON DELETE SET NULL only happens when foreign keys are enforced.
    assert (await store.session_get(ROOM)).active_project is None
    assert await store.sessions_using("web") == []
    assert await store.ports_in_use() == set()
    run = await store.run_get(run_id)
    assert run is not None and run.project == "web"


# --------------------------------------------------------------------------- runs


async def test_run_lifecycle_and_events(store: Store, clock: FakeClock) -> None:
    clock.now = 10.0
    run_id = await store.run_create(ROOM, "web", "add a test", "claude")
    created = await store.run_get(run_id)
    assert created is not None
    assert (created.status, created.created_at, created.started_at) == ("pending", 10.0, None)
    assert (created.session_key, created.project, created.prompt, created.agent) == (
        str(ROOM),
        "web",
        "add a test",
        "claude",
    )
    assert [r.id for r in await store.runs_active()] == [run_id]

    await store.run_start(run_id)
    await store.run_event(run_id, "text", "working")
    await store.run_event(run_id, "tool", '{"name": "bash"}')
    await store.run_event(run_id, "text", "done")
    other = await store.run_create(THREAD, "api", "other", "codex")
    await store.run_event(other, "text", "independent numbering")
    await store.run_finish(
        run_id, "succeeded", exit_code=0, usage={"input_tokens": 12}, cost_usd=0.25
    )

    assert await store.run_events(run_id) == [
        (1, "text", "working"),
        (2, "tool", '{"name": "bash"}'),
        (3, "text", "done"),
    ]
    assert await store.run_events(other) == [(1, "text", "independent numbering")]
    finished = await store.run_get(run_id)
    assert finished is not None
    assert finished.status == "succeeded"
    assert finished.started_at == 11.0
    assert finished.finished_at is not None and finished.finished_at > finished.started_at
    assert (finished.exit_code, finished.usage, finished.cost_usd, finished.error) == (
        0,
        {"input_tokens": 12},
        0.25,
        "",
    )
    assert [r.id for r in await store.runs_active()] == [other]
    assert await store.run_get(run_id + 1000) is None


async def test_run_unknown_ids_raise(store: Store) -> None:
    with pytest.raises(StoreError):
        await store.run_event(999, "text", "orphan")  # foreign key to runs
    with pytest.raises(StoreError, match="run 999 does not exist"):
        await store.run_start(999)
    with pytest.raises(StoreError, match="run 999 does not exist"):
        await store.run_finish(999, "failed")


async def test_runs_interrupt_stale(store: Store) -> None:
    pending = await store.run_create(ROOM, "web", "a", "claude")
    running = await store.run_create(ROOM, "web", "b", "claude")
    done = await store.run_create(ROOM, "web", "c", "claude")
    await store.run_start(running)
    await store.run_finish(done, "failed", exit_code=1, error="boom")

    assert await store.runs_interrupt_stale() == 2
    assert await store.runs_interrupt_stale() == 0
    assert await store.runs_active() == []
    for run_id in (pending, running):
        run = await store.run_get(run_id)
        assert run is not None
        assert (run.status, run.error) == ("interrupted", "podbay restarted")
        assert run.finished_at is not None
    kept = await store.run_get(done)
    assert kept is not None and (kept.status, kept.error) == ("failed", "boom")


async def test_runs_recent_filters_newest_first(store: Store) -> None:
    web_room = [await store.run_create(ROOM, "web", f"p{i}", "claude") for i in range(3)]
    api_room = await store.run_create(ROOM, "api", "x", "claude")
    web_thread = await store.run_create(THREAD, "web", "y", "claude")

    assert [r.id for r in await store.runs_recent()] == [
        web_thread,
        api_room,
        *reversed(web_room),
    ]
    assert [r.id for r in await store.runs_recent(limit=2)] == [web_thread, api_room]
    assert [r.id for r in await store.runs_recent(project="web")] == [
        web_thread,
        *reversed(web_room),
    ]
    assert [r.id for r in await store.runs_recent(session=ROOM)] == [
        api_room,
        *reversed(web_room),
    ]
    assert [r.id for r in await store.runs_recent(project="web", session=ROOM, limit=2)] == [
        web_room[2],
        web_room[1],
    ]
    assert await store.runs_recent(project="nope") == []


# --------------------------------------------------------------------------- jobs


async def test_job_lifecycle_and_steps(store: Store, clock: FakeClock) -> None:
    job_id = await store.job_create(
        "web", "create", session=ROOM, requested_by="matrix:@alice", params={"stack": "python"}
    )
    created = await store.job_get(job_id)
    assert created is not None
    assert (created.project, created.kind, created.status) == ("web", "create", "pending")
    assert (created.session_key, created.requested_by) == (str(ROOM), "matrix:@alice")
    assert (created.params, created.steps, created.started_at) == ({"stack": "python"}, [], None)

    await store.job_start(job_id)
    clock.now = 100.0
    await store.job_step(job_id, "clone", "ok")
    await store.job_step(job_id, "build", "failed", "exit 2")
    await store.job_finish(job_id, "failed", "build failed")

    job = await store.job_get(job_id)
    assert job is not None
    assert job.steps == [
        {"name": "clone", "status": "ok", "at": 100.0, "detail": ""},
        {"name": "build", "status": "failed", "at": 101.0, "detail": "exit 2"},
    ]
    assert (job.status, job.error) == ("failed", "build failed")
    assert job.started_at is not None and job.finished_at is not None
    assert await store.jobs_active() == []

    sessionless = await store.job_create("api", "destroy", session=None, requested_by="console")
    row = await store.job_get(sessionless)
    assert row is not None and row.session_key == "" and row.params == {}
    assert [j.id for j in await store.jobs_active()] == [sessionless]
    assert await store.job_get(job_id + 1000) is None
    with pytest.raises(StoreError, match="does not exist"):
        await store.job_step(job_id + 1000, "x", "ok")


async def test_jobs_interrupt_stale_returns_rows_as_they_were(store: Store) -> None:
    pending = await store.job_create("web", "create", session=ROOM, requested_by="a")
    running = await store.job_create("api", "rebuild", session=ROOM, requested_by="a")
    done = await store.job_create("db", "create", session=ROOM, requested_by="a")
    await store.job_start(running)
    await store.job_step(running, "build", "running")
    await store.job_finish(done, "succeeded")

    stale = await store.jobs_interrupt_stale()

    assert [(j.id, j.status) for j in stale] == [(pending, "pending"), (running, "running")]
    assert stale[1].steps[0]["name"] == "build"
    for job_id in (pending, running):
        job = await store.job_get(job_id)
        assert job is not None and job.status == "interrupted" and job.finished_at is not None
    kept = await store.job_get(done)
    assert kept is not None and kept.status == "succeeded"
    assert await store.jobs_interrupt_stale() == []


# --------------------------------------------------------------------------- audit


async def test_audit_recent_newest_first(store: Store) -> None:
    await store.audit("matrix:@alice", "project.create", "ok", session=ROOM, target="web")
    await store.audit("console", "project.remove", "denied", detail="not admin")
    await store.audit("slack:U1", "run", "ok")

    recent = await store.audit_recent()
    assert [(a.actor, a.action, a.result) for a in recent] == [
        ("slack:U1", "run", "ok"),
        ("console", "project.remove", "denied"),
        ("matrix:@alice", "project.create", "ok"),
    ]
    oldest = recent[-1]
    assert (oldest.session_key, oldest.target, oldest.detail) == (str(ROOM), "web", "")
    assert (recent[1].session_key, recent[1].detail) == ("", "not admin")
    assert recent[0].at > recent[1].at > recent[2].at
    assert [a.action for a in await store.audit_recent(limit=1)] == ["run"]


# --------------------------------------------------------------------------- transactions


async def test_failed_multi_row_change_writes_nothing(store: Store) -> None:
    ids = [await add(store, f"m{i}") for i in range(3)]
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        await store.inbox_mark(ids, cast(Any, "bogus"), kind="job", note="half")
    for id_ in ids:
        row = await store.inbox_get(id_)
        assert row is not None and (row.status, row.kind, row.note) == ("received", "", "")
    # The failed transaction was rolled back, so the next one can begin.
    await store.inbox_mark(ids, "done")
    assert [await status_of(store, i) for i in ids] == ["done"] * 3


async def test_failure_on_a_later_row_rolls_back_earlier_rows(tmp_path: Path) -> None:
    path = tmp_path / "podbay.db"
    async with await Store.open(path) as store:
        ids = [await add(store, f"m{i}") for i in range(3)]
        # A second connection installs a trigger that rejects only the LAST row, so the
        # first two updates have already been applied when the failure happens.
        raw = sqlite3.connect(path)
        try:
            with raw:
                raw.execute(
                    f"""
                    CREATE TRIGGER reject_last BEFORE UPDATE OF status ON inbox
                    WHEN NEW.id = {ids[-1]} BEGIN SELECT RAISE(ABORT, 'rejected'); END
                    """
                )
        finally:
            raw.close()

        with pytest.raises(sqlite3.IntegrityError, match="rejected"):
            await store.inbox_mark(ids, "processing", kind="freeform")
        assert [await status_of(store, i) for i in ids] == ["received"] * 3
        assert await store.queue_depths() == {}


# --------------------------------------------------------------------------- concurrency


async def concurrently(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Like asyncio.gather, but start the tasks in batches of 20.

    Creating hundreds of tasks in one step (debug mode records a stack per task) trips the
    conftest's event-loop block limit. The tasks still contend for the store at the same
    time: each one parks on the store's lock or connection long before the last is started.
    """
    tasks: list[asyncio.Task[T]] = []
    for i, coro in enumerate(coros):
        tasks.append(asyncio.create_task(coro))
        if i % 20 == 19:
            await asyncio.sleep(0)
    return await asyncio.gather(*tasks)


async def test_concurrent_inbox_adds_get_distinct_ids(store: Store) -> None:
    ids = await concurrently(store.inbox_add(message(f"c{i}")) for i in range(200))
    assert all(isinstance(i, int) for i in ids)
    assert len(set(ids)) == 200
    # Redeliveries racing each other: exactly one of each pair wins.
    pairs = await concurrently(store.inbox_add(message(f"d{i % 100}")) for i in range(200))
    winners = [i for i in pairs if i is not None]
    assert len(winners) == len(set(winners)) == 100
    assert not set(winners) & set(ids)
    # Redeliveries of the first batch are all recognised.
    again = await concurrently(store.inbox_add(message(f"c{i}")) for i in range(200))
    assert again == [None] * 200


async def test_concurrent_transactions_do_not_interleave(store: Store) -> None:
    run_id = await store.run_create(ROOM, "web", "p", "claude")
    job_id = await store.job_create("web", "create", session=ROOM, requested_by="a")

    def work() -> Iterator[Coroutine[Any, Any, None]]:
        # A generator, so each coroutine is created only when its task is started.
        for i in range(200):
            yield store.run_event(run_id, "text", str(i))
            if i < 100:
                yield store.job_step(job_id, f"step{i}", "ok")

    await concurrently(work())

    events = await store.run_events(run_id)
    assert [seq for seq, _, _ in events] == list(range(1, 201))
    assert sorted(int(data) for _, _, data in events) == list(range(200))
    job = await store.job_get(job_id)
    assert job is not None
    assert sorted(step["name"] for step in job.steps) == sorted(f"step{i}" for i in range(100))


async def test_project_names_follow_every_insert_and_removal(store: Store) -> None:
    assert await store.project_names() == []
    await store.project_add("alpha", "/src/alpha")
    assert await store.project_names() == ["alpha"]
    await store.project_reserve(
        "beta", "/src/beta", port_range=(2200, 2210), port_is_free=lambda port: True
    )
    assert sorted(await store.project_names()) == ["alpha", "beta"]
    await store.project_remove("alpha")
    assert await store.project_names() == ["beta"]


@pytest.mark.parametrize(
    "changed",
    [
        {},  # every field the columns hold: stored without the JSON copy
        {"ambient": False},
        {"aliases": ("robo", "@robo:example.org")},
        {"action": Action("confirm", "p-1")},
        {"is_direct": True, "mentioned": True},
        {"sender": Sender("matrix", "@alice:example.org", "Alice")},  # not the session's (slack)
    ],
)
async def test_a_replayed_message_is_exactly_what_arrived(
    store: Store, changed: dict[str, Any]
) -> None:
    arrived = replace(message("m-1", session=THREAD, text="deploy\n\tnow ✓"), **changed)
    inbox_id = await store.inbox_add(arrived)
    assert inbox_id is not None

    _, received = await store.inbox_recover()

    assert [r.inbound for r in received] == [arrived]
    row = await store.inbox_get(inbox_id)
    assert row is not None and row.inbound == arrived
