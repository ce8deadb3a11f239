"""Persistent state: projects, sessions, the inbox, agent runs, jobs and the audit log.

Everything lives in one SQLite database reached through ONE aiosqlite connection. That
connection is shared by every coroutine, so each public method holds ``Store._lock``: a
transaction must never interleave with statements from another coroutine.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import MISSING, Field, dataclass, fields, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, cast

import aiosqlite

from podbay.errors import StorageFull, StoreError
from podbay.messages import Action, Inbound, Sender, SessionKey
from podbay.retry import Backoff

log = logging.getLogger(__name__)

__all__ = [
    "MIGRATIONS",
    "AuditRow",
    "EventRow",
    "InboxRow",
    "InboxStatus",
    "JobRow",
    "JobStatus",
    "ProjectRow",
    "RunRow",
    "RunStatus",
    "SessionRow",
    "Store",
]

RunStatus = Literal["pending", "running", "succeeded", "failed", "cancelled", "interrupted"]
InboxStatus = Literal["received", "processing", "done", "failed", "interrupted"]
JobStatus = Literal["pending", "running", "succeeded", "failed", "interrupted"]

# One tuple of statements per schema version (index 0 = version 1). Statements are run one
# by one inside a single transaction: executescript() would COMMIT implicitly and could leave
# a half-applied migration behind. Never edit a released migration; append a new one.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        """
        CREATE TABLE projects (
            name TEXT PRIMARY KEY,
            stack TEXT NOT NULL DEFAULT '',
            path TEXT NOT NULL,
            git_url TEXT NOT NULL DEFAULT '',
            ssh_port INTEGER UNIQUE,
            state TEXT NOT NULL DEFAULT 'creating',
            container_id TEXT NOT NULL DEFAULT '',
            image TEXT NOT NULL DEFAULT '',
            created_by TEXT NOT NULL DEFAULT '',
            settings TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
        """
        CREATE TABLE sessions (
            session_key TEXT PRIMARY KEY,
            transport TEXT NOT NULL,
            conversation TEXT NOT NULL,
            thread TEXT NOT NULL DEFAULT '',
            active_project TEXT REFERENCES projects(name) ON DELETE SET NULL,
            agent_sessions TEXT NOT NULL DEFAULT '{}',
            last_activity REAL NOT NULL
        )
        """,
        # runs.project has no foreign key on purpose: run history survives project removal.
        """
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY,
            session_key TEXT NOT NULL,
            project TEXT NOT NULL DEFAULT '',
            prompt TEXT NOT NULL,
            agent TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL CHECK (status IN
                ('pending', 'running', 'succeeded', 'failed', 'cancelled', 'interrupted')),
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            exit_code INTEGER,
            usage TEXT NOT NULL DEFAULT '{}',
            cost_usd REAL,
            error TEXT NOT NULL DEFAULT ''
        )
        """,
        """
        CREATE TABLE run_events (
            id INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            kind TEXT NOT NULL,
            data TEXT NOT NULL,
            at REAL NOT NULL,
            UNIQUE (run_id, seq)
        )
        """,
        """
        CREATE TABLE inbox (
            id INTEGER PRIMARY KEY,
            transport TEXT NOT NULL,
            platform_id TEXT NOT NULL,
            session_key TEXT NOT NULL,
            conversation TEXT NOT NULL,
            thread TEXT NOT NULL DEFAULT '',
            sender_id TEXT NOT NULL,
            sender_name TEXT NOT NULL DEFAULT '',
            is_direct INTEGER NOT NULL DEFAULT 0,
            mentioned INTEGER NOT NULL DEFAULT 0,
            text TEXT NOT NULL,
            kind TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL CHECK (status IN
                ('received', 'processing', 'done', 'failed', 'interrupted')),
            note TEXT NOT NULL DEFAULT '',
            run_id INTEGER REFERENCES runs(id) ON DELETE SET NULL,
            received_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            UNIQUE (transport, platform_id)
        )
        """,
        "CREATE INDEX inbox_status ON inbox (status)",
        "CREATE INDEX inbox_session_status ON inbox (session_key, status)",
        """
        CREATE TABLE jobs (
            id INTEGER PRIMARY KEY,
            project TEXT NOT NULL,
            kind TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN
                ('pending', 'running', 'succeeded', 'failed', 'interrupted')),
            session_key TEXT NOT NULL DEFAULT '',
            requested_by TEXT NOT NULL DEFAULT '',
            params TEXT NOT NULL DEFAULT '{}',
            steps TEXT NOT NULL DEFAULT '[]',
            error TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL
        )
        """,
        """
        CREATE TABLE audit (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            actor TEXT NOT NULL,
            session_key TEXT NOT NULL DEFAULT '',
            action TEXT NOT NULL,
            target TEXT NOT NULL DEFAULT '',
            result TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT ''
        )
        """,
    ),
    (
        # The whole Inbound as JSON (aliases, ambient, by_reaction ...): a replay after a
        # crash must see exactly what arrived. Rows from before this migration keep ''.
        "ALTER TABLE inbox ADD COLUMN inbound TEXT NOT NULL DEFAULT ''",
        # Every child process podbay starts (agent, git, ssh-keygen ...), so that the next
        # start can kill the survivors of a crash. start_ticks is /proc/<pid>/stat field 22:
        # with the pid it identifies the process even after the pid is reused.
        """
        CREATE TABLE processes (
            id INTEGER PRIMARY KEY,
            pid INTEGER NOT NULL,
            pgid INTEGER NOT NULL,
            start_ticks INTEGER NOT NULL,
            kind TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '',
            project TEXT NOT NULL DEFAULT '',
            session_key TEXT NOT NULL DEFAULT '',
            run_id INTEGER,
            container TEXT NOT NULL DEFAULT '',
            started_at REAL NOT NULL,
            ended_at REAL
        )
        """,
        "CREATE INDEX processes_live ON processes (ended_at)",
    ),
    (
        # Per conversation: how much tool detail is shown, and when its last agent turn
        # began (engine events after that are told to the agent at the next turn).
        "ALTER TABLE sessions ADD COLUMN verbose INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE sessions ADD COLUMN last_turn_at REAL NOT NULL DEFAULT 0",
        "ALTER TABLE runs ADD COLUMN num_turns INTEGER",
        # Things that happened to a project (created, restarted, rebuilt, container died, a
        # job failed), for the agent's context.
        """
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            project TEXT NOT NULL,
            kind TEXT NOT NULL,
            text TEXT NOT NULL,
            at REAL NOT NULL
        )
        """,
        "CREATE INDEX events_project_at ON events (project, at)",
    ),
    (
        # When an unknown sender was last refused: one refusal per interval, across restarts.
        "CREATE TABLE denials (identity TEXT PRIMARY KEY, at REAL NOT NULL)",
        # When an SSH port was last given up (a project deleted or rolled back): free ports
        # that were never used, or freed longest ago, are handed out first, so an editor's
        # idea of "the host on port N" changes as rarely as possible.
        "CREATE TABLE ports_released (port INTEGER PRIMARY KEY, at REAL NOT NULL)",
    ),
    (
        # Sources that `delete` kept: `new project --path` may take such a folder over again
        # (only that exact folder, with the same device and inode).
        """
        CREATE TABLE kept_sources (
            path TEXT PRIMARY KEY,
            project TEXT NOT NULL,
            dev INTEGER NOT NULL,
            ino INTEGER NOT NULL,
            at REAL NOT NULL
        )
        """,
    ),
    (
        # The inbox's status indexes hold only the rows still to be handled: a row marked
        # done leaves them rather than moving to another entry, and an index of live rows
        # stays small however long the history is. Each is on id, the order recovery
        # reads them in; `status = ...` in a query's WHERE selects the index.
        "DROP INDEX inbox_status",
        "DROP INDEX inbox_session_status",
        "CREATE INDEX inbox_received ON inbox (id) WHERE status = 'received'",
        "CREATE INDEX inbox_processing ON inbox (id) WHERE status = 'processing'",
    ),
    (
        # The rows being processed by conversation: a run's messages are marked done
        # together, and their entries now lie side by side. Ordered by id they were spread
        # over the whole index (one conversation's messages arrive between everyone
        # else's), and marking a run done rewrote a page of it per message.
        "DROP INDEX inbox_processing",
        "CREATE INDEX inbox_processing ON inbox (session_key) WHERE status = 'processing'",
    ),
]

_RESTARTED = "podbay restarted"
_PROJECT_FIELDS = frozenset(
    {"stack", "path", "git_url", "ssh_port", "state", "container_id", "image", "settings"}
)

Params = Sequence[Any]


# --------------------------------------------------------------------------- row values


@dataclass(frozen=True, slots=True)
class ProjectRow:
    name: str
    stack: str
    path: str
    git_url: str
    ssh_port: int | None
    state: str
    container_id: str
    image: str
    created_by: str
    settings: dict[str, Any]
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class InboxRow:
    """An inbox entry; ``inbound`` is exactly what arrived (its text as stored, redacted)."""

    id: int
    inbound: Inbound
    kind: str
    status: InboxStatus
    note: str
    run_id: int | None


@dataclass(frozen=True, slots=True)
class RunRow:
    id: int
    session_key: str
    project: str
    prompt: str
    agent: str
    status: RunStatus
    created_at: float
    started_at: float | None
    finished_at: float | None
    exit_code: int | None
    usage: dict[str, Any]
    cost_usd: float | None
    error: str
    num_turns: int | None = None


@dataclass(frozen=True, slots=True)
class JobRow:
    id: int
    project: str
    kind: str
    status: JobStatus
    session_key: str
    requested_by: str
    params: dict[str, Any]
    steps: list[dict[str, Any]]
    error: str
    created_at: float
    started_at: float | None
    finished_at: float | None


@dataclass(frozen=True, slots=True)
class AuditRow:
    id: int
    at: float
    actor: str
    session_key: str
    action: str
    target: str
    result: str
    detail: str


@dataclass(frozen=True, slots=True)
class SessionRow:
    session_key: str
    active_project: str | None
    agent_sessions: dict[str, str]
    last_activity: float
    verbose: int = 1
    last_turn_at: float = 0.0


@dataclass(frozen=True, slots=True)
class EventRow:
    id: int
    project: str
    kind: str
    text: str
    at: float


def _session(row: sqlite3.Row) -> SessionRow:
    return SessionRow(
        session_key=row["session_key"],
        active_project=row["active_project"],
        agent_sessions={k: str(v) for k, v in _json_dict(row["agent_sessions"]).items()},
        last_activity=row["last_activity"],
        verbose=int(row["verbose"]),
        last_turn_at=float(row["last_turn_at"]),
    )


def _json_dict(text: str) -> dict[str, Any]:
    value = json.loads(text)
    return cast(dict[str, Any], value) if isinstance(value, dict) else {}


def _json_list(text: str) -> list[dict[str, Any]]:
    value = json.loads(text)
    return cast(list[dict[str, Any]], value) if isinstance(value, list) else []


def _project(row: sqlite3.Row) -> ProjectRow:
    return ProjectRow(
        name=row["name"],
        stack=row["stack"],
        path=row["path"],
        git_url=row["git_url"],
        ssh_port=row["ssh_port"],
        state=row["state"],
        container_id=row["container_id"],
        image=row["image"],
        created_by=row["created_by"],
        settings=_json_dict(row["settings"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def inbound_to_json(inbound: Inbound, text: str) -> str:
    """Every field of ``inbound`` (with ``text`` in place of its text) as JSON; "" when the
    row's own columns already hold all of it (the common case: see :func:`_inbox`)."""
    if inbound.sender.transport == inbound.session.transport and all(
        getattr(inbound, name) == default for name, default in _EXTRA_DEFAULTS
    ):
        return ""
    # Field by field rather than dataclasses.asdict (a deep copy): this runs per message.
    data = {name: getattr(inbound, name) for name in _INBOUND_FIELDS}
    session, sender = inbound.session, inbound.sender
    data["session"] = {name: getattr(session, name) for name in _SESSION_FIELDS}
    data["sender"] = {name: getattr(sender, name) for name in _SENDER_FIELDS}
    data["aliases"] = list(inbound.aliases)
    if inbound.action is not None:
        data["action"] = {"kind": inbound.action.kind, "target": inbound.action.target}
    data["text"] = text
    return _JSON.encode(data)


# Every field is stored: a field added to these classes is replayed too.
_INBOUND_FIELDS = tuple(f.name for f in fields(Inbound))
# The fields the inbox table has columns for (with the sender's transport, the session's).
_COLUMN_FIELDS = frozenset(
    {"session", "sender", "text", "platform_id", "received_at", "is_direct", "mentioned"}
)


def _default(f: Field[Any]) -> object:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return _NO_DEFAULT


_NO_DEFAULT = object()  # equal to nothing: a field without a default is always stored
# Every other field with its default: a message whose fields are all at their defaults
# is stored in the columns alone (a field added to Inbound joins this list by itself).
_EXTRA_DEFAULTS = tuple(
    (f.name, _default(f)) for f in fields(Inbound) if f.name not in _COLUMN_FIELDS
)
_SESSION_FIELDS = tuple(f.name for f in fields(SessionKey))
_SENDER_FIELDS = tuple(f.name for f in fields(Sender))
_JSON = json.JSONEncoder(ensure_ascii=False)  # json.dumps would build one per call


def inbound_from_json(raw: str) -> Inbound:
    data = json.loads(raw)
    return Inbound(
        session=SessionKey(**data["session"]),
        sender=Sender(**data["sender"]),
        text=data["text"],
        platform_id=data["platform_id"],
        received_at=data["received_at"],
        is_direct=bool(data["is_direct"]),
        mentioned=bool(data["mentioned"]),
        aliases=tuple(data.get("aliases") or ()),
        ambient=bool(data.get("ambient", True)),
        action=_action(data.get("action")),
    )


def _action(data: object) -> Action | None:
    if not isinstance(data, dict) or data.get("kind") not in ("confirm", "cancel"):
        return None
    return Action(kind=data["kind"], target=str(data.get("target", "")))


def _inbox(row: sqlite3.Row) -> InboxRow:
    if row["inbound"]:
        inbound = inbound_from_json(row["inbound"])
    else:  # every other field at its default (or stored before migration 2)
        inbound = Inbound(
            session=SessionKey(row["transport"], row["conversation"], row["thread"]),
            sender=Sender(row["transport"], row["sender_id"], row["sender_name"]),
            text=row["text"],
            platform_id=row["platform_id"],
            received_at=row["received_at"],
            is_direct=bool(row["is_direct"]),
            mentioned=bool(row["mentioned"]),
        )
    return InboxRow(
        id=row["id"],
        inbound=inbound,
        kind=row["kind"],
        status=cast(InboxStatus, row["status"]),
        note=row["note"],
        run_id=row["run_id"],
    )


def _run(row: sqlite3.Row) -> RunRow:
    return RunRow(
        id=row["id"],
        session_key=row["session_key"],
        project=row["project"],
        prompt=row["prompt"],
        agent=row["agent"],
        status=cast(RunStatus, row["status"]),
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        exit_code=row["exit_code"],
        usage=_json_dict(row["usage"]),
        cost_usd=row["cost_usd"],
        error=row["error"],
        num_turns=row["num_turns"],
    )


def _job(row: sqlite3.Row) -> JobRow:
    return JobRow(
        id=row["id"],
        project=row["project"],
        kind=row["kind"],
        status=cast(JobStatus, row["status"]),
        session_key=row["session_key"],
        requested_by=row["requested_by"],
        params=_json_dict(row["params"]),
        steps=_json_list(row["steps"]),
        error=row["error"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


def _audit(row: sqlite3.Row) -> AuditRow:
    return AuditRow(
        id=row["id"],
        at=row["at"],
        actor=row["actor"],
        session_key=row["session_key"],
        action=row["action"],
        target=row["target"],
        result=row["result"],
        detail=row["detail"],
    )


def _project_integrity(exc: sqlite3.IntegrityError, name: str, port: int | None) -> StoreError:
    """Turn a constraint failure on ``projects`` into a message a user can act on."""
    text = str(exc)
    if "projects.ssh_port" in text:
        return StoreError(f"ssh port {port} is already in use")
    if "projects.name" in text:
        return StoreError(f"project {name} already exists")
    return StoreError(f"cannot store project {name}: {text}")


def _read_only_uri(path: str | Path) -> str:
    """``file:`` URI of ``path`` opened with SQLite's mode=ro (never creates the file)."""
    return Path(path).absolute().as_uri() + "?mode=ro"


def _source_conflict(name: str, wanted: Path, rows: Iterable[sqlite3.Row]) -> str | None:
    """The refusal of a project ``name`` with its source at ``wanted``, given the others."""
    rows = list(rows)
    if any(row["name"] == name for row in rows):
        return f"A project named `{name}` already exists; pick another."
    for row in rows:
        other = Path(row["path"])
        if wanted == other:
            relation = "is already the source of"
        elif wanted.is_relative_to(other):
            relation = "is inside the source of"
        elif other.is_relative_to(wanted):
            relation = "contains the source of"
        else:
            continue
        return (
            f"Cannot create `{name}`: `{wanted}` {relation} project `{row['name']}` "
            f"(`{other}`); one project's source never holds another's, so pick a folder "
            "outside it with --path."
        )
    return None


# --------------------------------------------------------------------------- the store

_INBOX_COLUMNS = """id, transport, platform_id, session_key, conversation, thread,
        sender_id, sender_name, is_direct, mentioned, text, inbound, received_at, updated_at"""
_INBOX_ROW = f"({', '.join('?' * 16)})"


def _inbox_insert(rows: int) -> str:
    return f"""
    INSERT INTO inbox ({_INBOX_COLUMNS}, status, kind)
    VALUES {", ".join([_INBOX_ROW] * rows)}
    ON CONFLICT (transport, platform_id) DO NOTHING"""


_INBOX_INSERT = _inbox_insert(1)
# A burst of messages is inserted by statements of these many rows each (few distinct
# statements, so they stay prepared in the connection's cache; 256 rows are 4,096 of
# SQLite's 32,766 parameters).
_INBOX_CHUNKS = (256, 64, 16, 4, 1)
_INBOX_INSERTS = {rows: _inbox_insert(rows) for rows in _INBOX_CHUNKS}
_INBOX_STORED = (
    "SELECT json_group_array(id) FROM inbox WHERE id IN (SELECT value FROM json_each(?))"
)
_MARK_SQL = """
    UPDATE inbox SET status = ?, kind = COALESCE(?, kind), note = COALESCE(?, note),
        updated_at = ?
    WHERE id """
# Which rows: one id, or several (a JSON array: one statement for any number of them).
_ONE_ID = "= ?"
_IDS = "IN (SELECT value FROM json_each(?))"
_MARK_LINK_SQL = """
    UPDATE inbox SET run_id = ?, status = ?, kind = COALESCE(?, kind),
        note = COALESCE(?, note), updated_at = ?
    WHERE id """

_MERGE_INBOX_ADD = ("inbox_add",)
_RUN_COLUMNS = (
    "id", "session_key", "project", "prompt", "agent", "status", "created_at",
    "started_at", "finished_at", "exit_code", "error", "usage", "cost_usd", "num_turns",
)  # fmt: skip
_RUN_OUTCOME = ("status", "finished_at", "exit_code", "error", "usage", "cost_usd", "num_turns")
_RUN_INSERT = (
    f"INSERT INTO runs ({', '.join(_RUN_COLUMNS)}) VALUES ({', '.join('?' * len(_RUN_COLUMNS))})"
)
Outcome = tuple[int, int | None]  # (rowcount, lastrowid) of a write's last statement
# How long a write waits for a lock another process holds (after SQLite's own busy_timeout).
LOCKED_WAIT_S = 60.0
# How long a batch of write-behind writes alone (nobody waits for them) waits for company:
# the first write or read someone waits for takes it along. A run's records then join the
# commit of its messages' "done" instead of making that wait behind a commit of their own.
WRITE_BEHIND_S = 0.01


@dataclass
class _Write:
    """One write (or read) waiting for the next group commit: its statements run in order, in a
    savepoint of their own (a failing write never takes the others of its batch along)."""

    statements: list[tuple[str, Params]]
    future: asyncio.Future[Any] | None = None  # None: nobody waits (write-behind)
    what: str = ""  # for the log, when a write-behind write fails
    # A query instead (one statement; the future gets its rows): queued like a write, it
    # sees every write queued before it, and waits for no lock of its own.
    read: bool = False
    # Writes side by side in a batch with equal keys run as one statement (see _MERGED):
    # 1,000 messages arriving together are one INSERT, not 1,000. ``rows`` is what each
    # adds to that statement.
    merge: tuple[object, ...] | None = None
    rows: Any = None


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _mark_turn_statements(key: SessionKey, at: float, now: float) -> list[tuple[str, Params]]:
    """The session exists, its turn began at ``at`` and it was active ``now`` (one
    statement: a run records it, and every statement of a batch counts)."""
    return [
        (
            """
            INSERT INTO sessions
                (session_key, transport, conversation, thread, last_activity, last_turn_at)
            VALUES (?, ?, ?, ?, ?, ?)
            ON CONFLICT (session_key) DO UPDATE
                SET last_turn_at = excluded.last_turn_at, last_activity = excluded.last_activity
            """,
            (str(key), key.transport, key.conversation, key.thread, now, at),
        ),
    ]


def _apply_write(conn: sqlite3.Connection, write: _Write) -> Outcome | list[sqlite3.Row]:
    if write.read:
        sql, params = write.statements[0]
        return conn.execute(sql, params).fetchall()
    outcome: Outcome = (0, None)
    for sql, params in write.statements:
        cursor = conn.execute(sql, params)
        outcome = (cursor.rowcount, cursor.lastrowid)
    return outcome


def _merged_inbox_add(conn: sqlite3.Connection, group: list[_Write]) -> list[Outcome]:
    rows = [write.rows for write in group]
    # Many rows per statement, and no rows returned: sqlite3 lets go of the GIL for every
    # step of a statement and must take it back from the event loop after it (up to a
    # switch interval each time while the loop is busy), so an executemany of 1,000 rows
    # (1,000 steps) could take hundreds of milliseconds; a statement of 256 rows is one
    # step, during which SQLite works beside the loop.
    added, start = 0, 0
    for chunk in _INBOX_CHUNKS:
        while len(rows) - start >= chunk:
            part = rows[start : start + chunk]
            added += conn.execute(_INBOX_INSERTS[chunk], list(itertools.chain(*part))).rowcount
            start += chunk
    if added == len(rows):
        return [(1, row[0]) for row in rows]
    # Some were redeliveries (a message sent twice in one batch: the second is one).
    ids = _JSON.encode([row[0] for row in rows])
    stored = set(json.loads(conn.execute(_INBOX_STORED, (ids,)).fetchone()[0]))
    return [(1, row[0]) if row[0] in stored else (0, None) for row in rows]


def _merged_inbox_mark(conn: sqlite3.Connection, group: list[_Write]) -> list[Outcome]:
    _, status, kind, note = cast(tuple[str, str, str | None, str | None], group[0].merge)
    ids = [one for write in group for one in write.rows]
    now = max(write.statements[0][1][3] for write in group)
    cursor = conn.execute(_MARK_SQL + _IDS, (status, kind, note, now, _JSON.encode(ids)))
    return [(cursor.rowcount, None)] * len(group)


# What runs each kind of merged writes: one statement, one outcome per write.
_MERGED: dict[object, Callable[[sqlite3.Connection, list[_Write]], list[Outcome]]] = {
    "inbox_add": _merged_inbox_add,
    "inbox_mark": _merged_inbox_mark,
}


def _apply_writes(conn: sqlite3.Connection, batch: list[_Write]) -> list[Any]:
    """Every write of ``batch`` in order, those side by side with equal keys merged."""
    results: list[Any] = []
    start, size = 0, len(batch)
    while start < size:
        key = batch[start].merge
        end = start + 1
        if key is not None:
            while end < size and batch[end].merge == key:
                end += 1
        if key is not None and end - start > 1:
            results.extend(_MERGED[key[0]](conn, batch[start:end]))
        else:
            results.append(_apply_write(conn, batch[start]))
        start = end
    return results


def _apply_batch(conn: sqlite3.Connection, batch: list[_Write]) -> list[Any]:
    """On the database's own thread: one transaction for the whole batch. Optimistic: if
    one write fails, the batch is rolled back and done again with a savepoint per write,
    so only that write fails. A batch of reads alone takes no write lock."""
    if all(w.read for w in batch):
        results: list[Any] = []
        for read in batch:
            try:
                results.append(_apply_write(conn, read))
            except sqlite3.Error as exc:
                results.append(exc)
        return results
    conn.execute("BEGIN IMMEDIATE")
    try:
        try:
            results = _apply_writes(conn, batch)
        except sqlite3.Error:
            # One by one now, merging nothing: a failure is its own write's alone.
            conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
            results = []
            for write in batch:
                conn.execute("SAVEPOINT write")
                try:
                    results.append(_apply_write(conn, write))
                except sqlite3.Error as exc:
                    conn.execute("ROLLBACK TO write")
                    results.append(exc)
                conn.execute("RELEASE write")
        conn.execute("COMMIT")
    except BaseException:
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    return results


class Store:
    """Async access to the podbay database. Create with :meth:`Store.open`."""

    def __init__(self, db: aiosqlite.Connection, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock
        self._lock = asyncio.Lock()
        # Project names, for parsing every message without a query; every method that
        # inserts or deletes a project row forgets it (rows are never renamed).
        self._names: list[str] | None = None
        self._names_generation = 0  # bumped whenever the names are forgotten
        self._names_loading: tuple[int, asyncio.Future[list[sqlite3.Row]]] | None = None
        self._read_only = False  # set by open(read_only=True): every write is refused
        # Group commit: inbox writes that arrive while one is being committed wait, and go
        # together in the next transaction (each caller still returns only once its own
        # write is committed: stored before acknowledged).
        self._pending: list[_Write] = []
        # Done when the batch of the last write queued is committed (reads wait for it).
        self._tail: asyncio.Future[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        # Someone waits for the pending batch (a write, a read, close()): it is not held
        # back (see WRITE_BEHIND_S). Cleared when the flusher takes the batch.
        self._urgent = False
        self._closing = False
        # Set while a batch of write-behind writes alone is held back: done when someone
        # starts waiting for it, or the hold is over.
        self._nudge: asyncio.Future[None] | None = None
        self._path: Path | None = None  # the database file (None in memory)
        # Run ids are handed out here, so a run can be recorded without waiting for the
        # database: one podbay writes a data directory (bot.py holds a lock on it).
        self._last_run_id = 0
        self._last_inbox_id = 0
        # The rows of runs recorded without waiting whose INSERT is still queued: a start
        # or an outcome recorded meanwhile (as the dispatcher records a short run's) goes
        # into the row to insert instead of an UPDATE of its own. Forgotten when the
        # flusher takes the batch (from then on the database thread reads the row).
        self._unsent_runs: dict[int, list[Any]] = {}
        # Of those, the writes that also link the run's messages to it, with the ids: the
        # messages marked done meanwhile get their link in that same UPDATE (one rewrite of
        # each row, not two). Forgotten with the rows, and by a queued read of the inbox.
        self._unsent_links: dict[int, tuple[_Write, tuple[str, Params], tuple[int, ...]]] = {}

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        read_only: bool = False,
    ) -> Store:
        """Open (creating if needed) the database at ``path`` and bring its schema up to date.

        ``":memory:"`` gives a private in-memory database. ``read_only`` (for commands that
        only look, like ``podbay status``) opens an existing file with SQLite's ``mode=ro``:
        no write transaction, no migration, so it never waits on a running podbay's writes;
        a schema other than the one this podbay knows is refused instead of migrated.
        """
        memory = str(path) == ":memory:"
        try:
            if read_only:
                if memory:
                    raise StoreError("an in-memory database cannot be opened read-only")
                # Checked first: a failed aiosqlite connect leaves its worker thread to report
                # to a loop that may be gone by then.
                if not await asyncio.to_thread(Path(path).is_file):
                    raise StoreError(f"cannot open database {path}: no such file")
                db = await aiosqlite.connect(_read_only_uri(path), uri=True, isolation_level=None)
            else:
                if not memory:
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                # isolation_level=None: sqlite3 must not open transactions behind our back;
                # _tx issues BEGIN IMMEDIATE / COMMIT itself.
                db = await aiosqlite.connect(str(path), isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from exc
        db.row_factory = sqlite3.Row
        store = cls(db, clock)
        store._read_only = read_only
        store._path = None if memory else Path(path)
        try:
            if read_only:
                await store._execute("PRAGMA busy_timeout=5000")
                await store._check_schema()
                return store
            if not memory:
                await store._execute("PRAGMA journal_mode=WAL")
            # foreign_keys is a no-op inside a transaction, so it must be set here, up front.
            await store._execute("PRAGMA foreign_keys=ON")
            await store._execute("PRAGMA synchronous=NORMAL")
            await store._execute("PRAGMA busy_timeout=5000")
            await store._migrate()
            row = await store._fetchone("SELECT COALESCE(MAX(id), 0) FROM runs")
            store._last_run_id = int(row[0]) if row is not None else 0
            row = await store._fetchone("SELECT COALESCE(MAX(id), 0) FROM inbox")
            store._last_inbox_id = int(row[0]) if row is not None else 0
        except BaseException as exc:
            # Close before propagating; a leaked connection keeps its worker thread alive.
            await db.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise StoreError(f"database {path} is unusable: {exc}") from exc
            raise
        return store

    async def _check_schema(self) -> None:
        """For a read-only open: the schema must be exactly the one this podbay knows."""
        try:
            current = await self.schema_version()
        except sqlite3.OperationalError:
            current = 0  # no schema_migrations table: nothing was ever migrated
        known = len(MIGRATIONS)
        if current > known:
            raise StoreError(
                f"database schema version {current} is newer than this podbay"
                f" (knows {known}); upgrade podbay"
            )
        if current < known:
            raise StoreError(
                f"database schema version {current} is older than this podbay (knows {known});"
                " start `podbay run` or `podbay chat` once to upgrade it"
            )

    async def close(self) -> None:
        """Close the connection (after the writes already asked for). Safe to call twice."""
        self._closing = True
        self._hurry()
        if self._flusher is not None:
            with suppress(BaseException):
                await self._flusher
        async with self._lock:
            await self._db.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ---------------------------------------------------------------- plumbing

    async def _execute(self, sql: str, params: Params = ()) -> tuple[int, int | None]:
        """Run one statement; return (rowcount, lastrowid)."""
        try:
            async with self._db.execute(sql, params) as cur:
                return cur.rowcount, cur.lastrowid
        except sqlite3.OperationalError as exc:
            raise self._translated(exc) from exc

    def _translated(self, exc: sqlite3.OperationalError) -> Exception:
        """A full disk is the user's to fix, and said so; other errors stay as they are."""
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(
            exc
        ):
            where = f" ({self._path.parent})" if self._path is not None else ""
            return StorageFull(f"podbay's disk is full{where}: nothing could be stored.")
        return exc

    async def _fetchall(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        # One hop to the database thread (execute, fetch and close there).
        return list(await self._db.execute_fetchall(sql, params))

    async def _fetchone(self, sql: str, params: Params = ()) -> sqlite3.Row | None:
        rows = await self._fetchall(sql, params)
        return rows[0] if rows else None

    @asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """The lock, taken once every write queued before is committed: a read sees every
        write asked for earlier, queued ones included (read your own writes)."""
        tail = self._tail
        if tail is not None and not tail.done():
            self._hurry()
            # Shielded: a cancelled reader must not cancel another caller's write.
            with suppress(Exception):
                await asyncio.shield(tail)
        async with self._lock:
            yield

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[None]:
        """Hold the lock for one BEGIN IMMEDIATE ... COMMIT; roll back on any exception."""
        if self._read_only:
            raise StoreError("the database was opened read-only; this command cannot change it")
        async with self._locked():
            # IMMEDIATE takes the write lock up front, so a read-modify-write cannot fail
            # half-way with SQLITE_BUSY when another process writes too.
            await self._execute("BEGIN IMMEDIATE")
            try:
                yield
                await self._execute("COMMIT")
            except BaseException:
                # OperationalError: SQLite already rolled back on its own (some I/O errors do).
                with suppress(sqlite3.OperationalError):
                    await self._execute("ROLLBACK")
                raise

    async def _migrate(self) -> None:
        async with self._tx():
            await self._execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations"
                " (version INTEGER PRIMARY KEY, applied_at REAL)"
            )
        current = await self.schema_version()
        known = len(MIGRATIONS)
        if current > known:
            raise StoreError(
                f"database schema version {current} is newer than this podbay"
                f" (knows {known}); upgrade podbay"
            )
        for version, statements in enumerate(MIGRATIONS, start=1):
            async with self._tx():
                # Checked inside the transaction: another process may have migrated meanwhile.
                done = await self._fetchone(
                    "SELECT 1 FROM schema_migrations WHERE version = ?", (version,)
                )
                if done is not None:
                    continue
                for statement in statements:
                    await self._execute(statement)
                await self._execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, self._clock()),
                )

    async def schema_version(self) -> int:
        """Highest applied migration (0 for an empty database)."""
        async with self._locked():
            row = await self._fetchone("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
        return int(row[0]) if row is not None else 0

    # ---------------------------------------------------------------- inbox

    async def inbox_add(
        self,
        inbound: Inbound,
        text: str | None = None,
        *,
        status: InboxStatus = "received",
        kind: str = "",
    ) -> int | None:
        """Record a received message; ``None`` if (transport, platform_id) is a redelivery.

        ``text`` replaces ``inbound.text`` in storage (callers pass a redacted copy). A
        message known to be a prompt its lane takes at once is stored as such (``status``
        "processing", ``kind`` "freeform"): one write less than marking it afterwards.
        Returns once the row is committed (group-committed with others arriving meanwhile).
        """
        self._check_writable()
        session = inbound.session
        stored = inbound.text if text is None else text
        # Ids are handed out here, as run ids are (a redelivery leaves its id unused).
        self._last_inbox_id += 1
        row = (
            self._last_inbox_id,
            session.transport,
            inbound.platform_id,
            str(session),
            session.conversation,
            session.thread,
            inbound.sender.user_id,
            inbound.sender.display_name,
            int(inbound.is_direct),
            int(inbound.mentioned),
            stored,
            inbound_to_json(inbound, stored),
            inbound.received_at,
            self._clock(),
            status,
            kind,
        )
        write = _Write([(_INBOX_INSERT, row)], merge=_MERGE_INBOX_ADD, rows=row)
        count, _ = await self._batched(write)
        return row[0] if count == 1 else None

    async def inbox_mark(
        self,
        ids: Sequence[int],
        status: InboxStatus,
        *,
        kind: str | None = None,
        note: str | None = None,
        wait: bool = True,
        run: int | None = None,
    ) -> None:
        """Set the status (and, when given, kind and note) of every id, all or nothing;
        returns once committed (with ``wait=False`` at once: see :meth:`_later`).

        ``run``: these are the messages of that run, as :meth:`run_create` linked them.
        While that link is still queued, this UPDATE links them instead.
        """
        if not ids:
            return
        if not wait:
            self.inbox_mark_later(ids, status, kind=kind, note=note)
            return
        linking = self._unsent_links.pop(run, None) if run is not None else None
        if linking is not None and linking[2] == tuple(ids):
            run_write, link, _ = linking
            run_write.statements.remove(link)
            params = (run, status, kind, note, self._clock(), json.dumps(list(ids)))
            await self._batched(_Write([(_MARK_LINK_SQL + _IDS, params)]))
            return
        await self._batched(self._mark(ids, status, kind, note))

    def inbox_mark_later(
        self,
        ids: Sequence[int],
        status: InboxStatus,
        *,
        kind: str | None = None,
        note: str | None = None,
    ) -> None:
        """:meth:`inbox_mark` without waiting (write-behind, see :meth:`_later`): callable
        where nothing may be awaited."""
        if ids:
            write = self._mark(ids, status, kind, note)
            self._later(write, f"the status of message(s) {', '.join(map(str, ids))}")

    def _mark(
        self, ids: Sequence[int], status: InboxStatus, kind: str | None, note: str | None
    ) -> _Write:
        which, rows = (_ONE_ID, ids[0]) if len(ids) == 1 else (_IDS, json.dumps(list(ids)))
        return _Write(
            [(_MARK_SQL + which, (status, kind, note, self._clock(), rows))],
            merge=("inbox_mark", status, kind, note),
            rows=tuple(ids),
        )

    async def _batched(self, write: _Write) -> Outcome:
        self._check_writable()
        write.future = asyncio.get_running_loop().create_future()
        self._queue(write)
        return cast(Outcome, await write.future)

    async def _read(self, sql: str, params: Params = ()) -> list[sqlite3.Row]:
        """A query, in order with the writes (it sees every write asked for before it).
        Never call it holding ``_lock``: the commit needs it."""
        read = _Write([(sql, params)], read=True)
        read.future = asyncio.get_running_loop().create_future()
        if "inbox" in sql:
            self._unsent_links.clear()  # it must see the messages linked to their runs
        self._queue(read)
        return cast(list[sqlite3.Row], await read.future)

    def _check_writable(self) -> None:
        if self._read_only:
            raise StoreError("the database was opened read-only; this command cannot change it")

    def _queue(self, write: _Write) -> None:
        """Queue ``write`` for the next group commit (in order: writes are committed in
        the order they were queued)."""
        if not self._pending:
            # The batch this write starts: done once it is committed (or failed).
            self._tail = asyncio.get_running_loop().create_future()
        self._pending.append(write)
        if write.future is not None:
            self._hurry()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="store-group-commit")

    def _hurry(self) -> None:
        """Someone waits for the pending batch: it is not held back, or no longer."""
        self._urgent = True
        if self._nudge is not None:
            _wake(self._nudge)

    async def _company(self) -> None:
        """Hold back a batch of write-behind writes alone, up to WRITE_BEHIND_S or until
        someone waits (see :meth:`_hurry`), then one turn of the loop more."""
        if self._urgent or self._closing:
            return
        loop = asyncio.get_running_loop()
        nudge = self._nudge = loop.create_future()
        timer = loop.call_later(WRITE_BEHIND_S, _wake, nudge)
        try:
            await nudge
        finally:
            timer.cancel()
            self._nudge = None
        await asyncio.sleep(0)

    def _later(self, write: _Write, what: str) -> None:
        """Queue ``write`` without waiting for it (write-behind). Still in order: every
        write or read asked for after it returns only once it is committed. A failure is
        logged (as "recording ``what`` failed"); the next awaited write, on the same disk,
        reports it to its caller."""
        self._check_writable()
        write.what = what
        self._queue(write)

    async def _commit(self, batch: list[_Write]) -> list[Any]:
        """Commit ``batch``; a database locked longer than busy_timeout (another process
        holding the write lock) is waited for with backoff, up to LOCKED_WAIT_S."""
        run = cast(Callable[..., Awaitable[list[Any]]], self._db._execute)
        backoff: Backoff | None = None  # made when first needed: it seeds a random source
        waited = 0.0
        while True:
            try:
                async with self._lock:
                    # One hop to the database thread for the whole batch (aiosqlite runs
                    # the function there, between its other statements).
                    return await run(_apply_batch, self._db._conn, batch)
            except sqlite3.OperationalError as exc:
                locked = getattr(exc, "sqlite_errorcode", None) in (
                    sqlite3.SQLITE_BUSY,
                    sqlite3.SQLITE_LOCKED,
                ) or "locked" in str(exc)
                if not locked or waited >= LOCKED_WAIT_S:
                    raise self._translated(exc) from exc
                backoff = backoff or Backoff(base=0.2, cap=5.0)
                delay = backoff.next_delay()
                log.warning("the database is locked by another process; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                waited += delay

    async def _flush(self) -> None:
        while self._pending:
            # One turn of the loop first: what the tasks woken with this write ask for
            # (a run's records, the next messages) joins the same commit.
            await asyncio.sleep(0)
            await self._company()
            batch, self._pending, self._urgent = self._pending, [], False
            self._unsent_runs.clear()
            self._unsent_links.clear()
            done = self._tail
            try:
                results: list[Any] = list(await self._commit(batch))
            except BaseException as exc:
                results = [exc] * len(batch)
                if isinstance(exc, asyncio.CancelledError):
                    self._settle(batch, results, done)
                    raise
            self._settle(batch, results, done)

    def _settle(
        self,
        batch: list[_Write],
        results: list[Any],
        done: asyncio.Future[None] | None,
    ) -> None:
        """Tell each write of a committed (or failed) batch how it went."""
        for write, result in zip(batch, results, strict=True):
            if isinstance(result, sqlite3.OperationalError):
                result = self._translated(result)
            future = write.future
            if future is None:
                if isinstance(result, BaseException) and not isinstance(
                    result, asyncio.CancelledError
                ):
                    log.error("recording %s failed: %s", write.what, result)
            elif future.done():
                continue
            elif isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        if done is not None and not done.done():
            done.set_result(None)

    async def inbox_recover(self) -> tuple[list[InboxRow], list[InboxRow]]:
        """After a restart: mark 'processing' rows 'interrupted' and return them, plus the
        still-'received' rows to redo, both ordered by id."""
        async with self._tx():
            processing = await self._fetchall(
                # By the partial index (then sorted): the table in id order is the whole
                # history.
                "SELECT * FROM inbox INDEXED BY inbox_processing"
                " WHERE status = 'processing' ORDER BY id"
            )
            await self._execute(
                "UPDATE inbox SET status = 'interrupted', updated_at = ?"
                " WHERE status = 'processing'",
                (self._clock(),),
            )
            received = await self._fetchall(
                "SELECT * FROM inbox WHERE status = 'received' ORDER BY id"
            )
        # The UPDATE above set exactly these rows' status, inside the same transaction.
        interrupted = [replace(_inbox(r), status="interrupted") for r in processing]
        return interrupted, [_inbox(r) for r in received]

    async def inbox_get(self, id: int) -> InboxRow | None:
        """One inbox entry by id."""
        async with self._locked():
            row = await self._fetchone("SELECT * FROM inbox WHERE id = ?", (id,))
        return _inbox(row) if row is not None else None

    async def queue_depths(self) -> dict[str, int]:
        """Per session key: free-form messages being processed but not yet given to a run."""
        async with self._locked():
            rows = await self._fetchall(
                """
                SELECT session_key, COUNT(*) FROM inbox
                WHERE kind = 'freeform' AND status = 'processing' AND run_id IS NULL
                GROUP BY session_key
                """
            )
        return {row[0]: int(row[1]) for row in rows}

    # ---------------------------------------------------------------- sessions

    async def session_get(self, key: SessionKey) -> SessionRow:
        """The stored session, or an empty default (not inserted) if there is none."""
        rows = await self._read("SELECT * FROM sessions WHERE session_key = ?", (str(key),))
        if not rows:
            return SessionRow(str(key), None, {}, 0.0)
        return _session(rows[0])

    async def sessions_recent(self, since: float) -> list[SessionRow]:
        """Sessions active at or after ``since``, most recent first."""
        async with self._locked():
            rows = await self._fetchall(
                "SELECT * FROM sessions WHERE last_activity >= ? ORDER BY last_activity DESC",
                (since,),
            )
        return [_session(r) for r in rows]

    async def _session_upsert(self, key: SessionKey, sets: str = "", params: Params = ()) -> None:
        """Insert the session if absent, then apply ``sets`` (extra ``col = ?, `` assignments)
        and bump last_activity."""
        now = self._clock()
        await self._execute(
            """
            INSERT INTO sessions (session_key, transport, conversation, thread, last_activity)
            VALUES (?, ?, ?, ?, ?)
            ON CONFLICT (session_key) DO NOTHING
            """,
            (str(key), key.transport, key.conversation, key.thread, now),
        )
        await self._execute(
            f"UPDATE sessions SET {sets}last_activity = ? WHERE session_key = ?",
            (*params, now, str(key)),
        )

    async def session_set_project(self, key: SessionKey, project: str | None) -> None:
        """Select (or clear, with None) the session's active project."""
        try:
            async with self._tx():
                await self._session_upsert(key, "active_project = ?, ", (project,))
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"project {project} does not exist") from exc

    async def session_set_agent_session(
        self, key: SessionKey, project: str, agent_session_id: str
    ) -> None:
        """Remember the agent's own session id for ``project`` in this conversation."""
        async with self._tx():
            row = await self._fetchone(
                "SELECT agent_sessions FROM sessions WHERE session_key = ?", (str(key),)
            )
            mapping = _json_dict(row["agent_sessions"]) if row is not None else {}
            mapping[project] = agent_session_id
            await self._session_upsert(key, "agent_sessions = ?, ", (json.dumps(mapping),))

    async def session_set_verbose(self, key: SessionKey, level: int) -> None:
        """How much tool detail this conversation is shown (0, 1 or 2)."""
        async with self._tx():
            await self._session_upsert(key, "verbose = ?, ", (level,))

    async def session_mark_turn(self, key: SessionKey, at: float) -> None:
        """An agent turn of this conversation began at ``at`` (group-committed)."""
        await self._batched(_Write(_mark_turn_statements(key, at, self._clock())))

    async def session_touch(self, key: SessionKey) -> None:
        """Record activity in the session now."""
        async with self._tx():
            await self._session_upsert(key)

    async def sessions_using(self, project: str) -> list[SessionKey]:
        """Sessions whose active project is ``project``."""
        async with self._locked():
            rows = await self._fetchall(
                "SELECT transport, conversation, thread FROM sessions"
                " WHERE active_project = ? ORDER BY session_key",
                (project,),
            )
        return [SessionKey(r["transport"], r["conversation"], r["thread"]) for r in rows]

    # ---------------------------------------------------------------- projects

    async def _project_get(self, name: str) -> ProjectRow | None:
        row = await self._fetchone("SELECT * FROM projects WHERE name = ?", (name,))
        return _project(row) if row is not None else None

    async def project_add(
        self,
        name: str,
        path: str | Path,
        *,
        stack: str = "",
        git_url: str = "",
        ssh_port: int | None = None,
        state: str = "creating",
        created_by: str = "",
        settings: dict[str, Any] | None = None,
    ) -> ProjectRow:
        """Insert a project; StoreError if the name or the SSH port is taken."""
        self._forget_names()
        now = self._clock()
        try:
            async with self._tx():
                await self._execute(
                    """
                    INSERT INTO projects (name, stack, path, git_url, ssh_port, state,
                        created_by, settings, created_at, updated_at)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                    """,
                    (
                        name,
                        stack,
                        str(path),
                        git_url,
                        ssh_port,
                        state,
                        created_by,
                        json.dumps(settings or {}),
                        now,
                        now,
                    ),
                )
                row = await self._project_get(name)
        except sqlite3.IntegrityError as exc:
            raise _project_integrity(exc, name, ssh_port) from exc
        assert row is not None  # just inserted in the same transaction
        self._forget_names()
        return row

    async def project_get(self, name: str) -> ProjectRow | None:
        """One project by name."""
        rows = await self._read("SELECT * FROM projects WHERE name = ?", (name,))
        return _project(rows[0]) if rows else None

    async def project_names(self) -> list[str]:
        """Names of all projects (cached: the dispatcher asks for every message)."""
        names = self._names
        if names is None:
            generation = self._names_generation
            loading = self._names_loading
            if loading is None or loading[0] != generation:
                # One query, however many messages ask at once.
                query = asyncio.ensure_future(self._read("SELECT name FROM projects"))
                loading = self._names_loading = (generation, query)
            rows = await asyncio.shield(loading[1])
            names = [str(r[0]) for r in rows]
            if self._names_generation == generation:  # no project changed meanwhile
                self._names = names
        return list(names)

    def cached_project_names(self) -> Sequence[str] | None:
        """The project names if known without a query (None: ask :meth:`project_names`)."""
        return self._names

    def _forget_names(self) -> None:
        self._names = None
        self._names_generation += 1

    async def project_list(self) -> list[ProjectRow]:
        """All projects ordered by name."""
        async with self._locked():
            rows = await self._fetchall("SELECT * FROM projects ORDER BY name")
        return [_project(r) for r in rows]

    async def project_update(self, name: str, **fields: Any) -> ProjectRow:
        """Change some of stack, path, git_url, ssh_port, state, container_id, image, settings."""
        unknown = sorted(set(fields) - _PROJECT_FIELDS)
        if unknown:
            raise StoreError(f"cannot update project field(s): {', '.join(unknown)}")
        values = dict(fields)
        if "settings" in values:
            values["settings"] = json.dumps(values["settings"] or {})
        if "path" in values:
            values["path"] = str(values["path"])
        # Column names come from the whitelist above, never from the caller verbatim.
        sets = "".join(f"{column} = ?, " for column in values)
        try:
            async with self._tx():
                count, _ = await self._execute(
                    f"UPDATE projects SET {sets}updated_at = ? WHERE name = ?",
                    (*values.values(), self._clock(), name),
                )
                row = await self._project_get(name) if count else None
        except sqlite3.IntegrityError as exc:
            raise _project_integrity(exc, name, fields.get("ssh_port")) from exc
        if row is None:
            raise StoreError(f"project {name} does not exist")
        return row

    async def project_remove(self, name: str, *, port_was_used: bool = True) -> bool:
        """Delete a project (sessions using it fall back to none); False if it did not exist.

        Its SSH port is recorded as released (unless ``port_was_used`` is False: a reservation
        given back before anything listened on it): it is handed out again only when no port
        that was never used, or that was freed earlier, is left.
        """
        self._forget_names()
        async with self._tx():
            row = await self._project_get(name)
            count, _ = await self._execute("DELETE FROM projects WHERE name = ?", (name,))
            if port_was_used and row is not None and row.ssh_port is not None:
                await self._execute(
                    "INSERT INTO ports_released (port, at) VALUES (?, ?) "
                    "ON CONFLICT (port) DO UPDATE SET at = excluded.at",
                    (row.ssh_port, self._clock()),
                )
        self._forget_names()
        return count > 0

    async def project_reserve(
        self,
        name: str,
        path: str | Path,
        *,
        port_range: tuple[int, int],
        port_is_free: Callable[[int], bool],
        stack: str = "",
        git_url: str = "",
        created_by: str = "",
        settings: dict[str, Any] | None = None,
    ) -> ProjectRow:
        """Reserve name, source path and SSH port in ONE transaction (a 'creating' row).

        StoreError (with a message for the user) if the name is taken, the path equals, is
        inside or contains another project's source, or no port in ``port_range`` is both
        unregistered and free (``port_is_free``, e.g. not bound on 127.0.0.1).
        """
        self._forget_names()
        wanted = Path(path)
        now = self._clock()
        async with self._tx():
            rows = await self._fetchall("SELECT name, path, ssh_port FROM projects")
            conflict = _source_conflict(name, wanted, rows)
            if conflict is not None:
                raise StoreError(conflict)
            used = {int(r["ssh_port"]) for r in rows if r["ssh_port"] is not None}
            low, high = port_range
            released = {
                int(r["port"]): float(r["at"])
                for r in await self._fetchall(
                    "SELECT port, at FROM ports_released WHERE port BETWEEN ? AND ?", (low, high)
                )
            }
            # Never-used ports first (in order), then the ones freed longest ago: a client
            # that still remembers "the project on port N" meets a new project there last.
            order = sorted(
                (p for p in range(low, high + 1) if p not in used),
                key=lambda p: (p in released, released.get(p, 0.0), p),
            )
            port = next((p for p in order if port_is_free(p)), None)
            if port is None:
                raise StoreError(
                    f"No free SSH port left in {low}-{high}: delete a project or widen "
                    "`projects.ssh_port_range` in the config."
                )
            await self._execute(
                """
                INSERT INTO projects (name, stack, path, git_url, ssh_port, state,
                    created_by, settings, created_at, updated_at)
                VALUES (?, ?, ?, ?, ?, 'creating', ?, ?, ?, ?)
                """,
                (
                    name,
                    stack,
                    str(wanted),
                    git_url,
                    port,
                    created_by,
                    json.dumps(settings or {}),
                    now,
                    now,
                ),
            )
            reserved = await self._project_get(name)
        assert reserved is not None  # inserted in the same transaction
        self._forget_names()
        return reserved

    async def project_source_conflict(self, name: str, path: str | Path) -> str | None:
        """Why ``name`` at ``path`` would be refused by :meth:`project_reserve` (name taken,
        or a source shared with another project), or None. Advisory: only the reservation
        decides, in its transaction."""
        async with self._locked():
            rows = await self._fetchall("SELECT name, path FROM projects")
        return _source_conflict(name, Path(path), rows)

    async def ports_in_use(self) -> set[int]:
        """SSH ports assigned to any project."""
        async with self._locked():
            rows = await self._fetchall("SELECT ssh_port FROM projects WHERE ssh_port IS NOT NULL")
        return {int(r[0]) for r in rows}

    # ---------------------------------------------------------------- runs

    async def run_create(
        self,
        session: SessionKey,
        project: str,
        prompt: str,
        agent: str,
        *,
        inbox_ids: Sequence[int] = (),
        wait: bool = True,
    ) -> int:
        """Record a new agent run in state 'pending' and link ``inbox_ids`` (the messages
        it handles) to it, in one write; returns its id. With ``wait=False`` it returns
        at once (see :meth:`_later`)."""
        self._check_writable()
        self._last_run_id += 1
        run_id = self._last_run_id
        now = self._clock()
        row: list[Any] = [run_id, str(session), project, prompt, agent, "pending", now]
        row += [None, None, None, "", "{}", None, None]  # started ... num_turns: not yet
        write = _Write([(_RUN_INSERT, row)])
        link: tuple[str, Params] | None = None
        if inbox_ids:
            link = (
                "UPDATE inbox SET run_id = ?, updated_at = ? WHERE id " + _IDS,
                (run_id, now, json.dumps(list(inbox_ids))),
            )
            write.statements.append(link)
        if wait:
            await self._batched(write)
        else:
            self._later(write, f"run {run_id}")
            self._unsent_runs[run_id] = row
            if link is not None:
                self._unsent_links[run_id] = (write, link, tuple(inbox_ids))
        return run_id

    async def run_start(
        self, run_id: int, *, turn: SessionKey | None = None, wait: bool = True
    ) -> None:
        """Mark a run 'running'; with ``turn``, that conversation's turn began now (one
        write for both). With ``wait=False`` it returns at once (see :meth:`_later`)."""
        now = self._clock()
        statements: list[tuple[str, Params]] = []
        if turn is not None:
            statements = _mark_turn_statements(turn, now, now)
        unsent = self._unsent_runs.get(run_id) if not wait else None
        if unsent is not None:
            unsent[_RUN_COLUMNS.index("status")] = "running"
            unsent[_RUN_COLUMNS.index("started_at")] = now
            if statements:
                self._later(_Write(statements), f"the start of run {run_id}")
            return
        statements.append(
            ("UPDATE runs SET status = 'running', started_at = ? WHERE id = ?", (now, run_id))
        )
        if not wait:
            self._later(_Write(statements), f"the start of run {run_id}")
            return
        count, _ = await self._batched(_Write(statements))
        if not count:
            raise StoreError(f"run {run_id} does not exist")

    async def run_finish(
        self,
        run_id: int,
        status: RunStatus,
        *,
        exit_code: int | None = None,
        error: str = "",
        usage: dict[str, Any] | None = None,
        cost_usd: float | None = None,
        num_turns: int | None = None,
        wait: bool = True,
    ) -> None:
        """Record the outcome of a run. With ``wait=False`` it returns at once (see
        :meth:`_later`)."""
        unsent = self._unsent_runs.get(run_id) if not wait else None
        if unsent is not None:
            outcome = (status, self._clock(), exit_code, error, json.dumps(usage or {}))
            for name, value in zip(_RUN_OUTCOME, (*outcome, cost_usd, num_turns), strict=True):
                unsent[_RUN_COLUMNS.index(name)] = value
            return
        write = _Write(
            [
                (
                    """
                    UPDATE runs SET status = ?, finished_at = ?, exit_code = ?, error = ?,
                        usage = ?, cost_usd = ?, num_turns = ?
                    WHERE id = ?
                    """,
                    (
                        status,
                        self._clock(),
                        exit_code,
                        error,
                        json.dumps(usage or {}),
                        cost_usd,
                        num_turns,
                        run_id,
                    ),
                )
            ]
        )
        if not wait:
            self._later(write, f"the outcome of run {run_id}")
            return
        count, _ = await self._batched(write)
        if not count:
            raise StoreError(f"run {run_id} does not exist")

    async def run_finish_if_active(self, run_id: int, status: RunStatus, *, error: str) -> bool:
        """Finish a run that is still pending or running; False if it had already ended."""
        async with self._locked():
            count, _ = await self._execute(
                """
                UPDATE runs SET status = ?, finished_at = ?, error = ?
                WHERE id = ? AND status IN ('pending', 'running')
                """,
                (status, self._clock(), error, run_id),
            )
        return count > 0

    async def run_event(self, run_id: int, kind: str, data: str, *, wait: bool = True) -> None:
        """Append an event to a run; events are numbered 1, 2, ... per run. With
        ``wait=False`` it returns at once (see :meth:`_later`)."""
        write = _Write(
            [
                (
                    """
                    INSERT INTO run_events (run_id, seq, kind, data, at)
                    SELECT ?, COALESCE(MAX(seq), 0) + 1, ?, ?, ? FROM run_events
                    WHERE run_id = ?
                    """,
                    (run_id, kind, data, self._clock(), run_id),
                )
            ]
        )
        if not wait:
            self._later(write, f"an event of run {run_id}")
            return
        try:
            await self._batched(write)
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"cannot record event for run {run_id}: {exc}") from exc

    async def run_events(self, run_id: int) -> list[tuple[int, str, str]]:
        """(seq, kind, data) of a run's events, in order."""
        async with self._locked():
            rows = await self._fetchall(
                "SELECT seq, kind, data FROM run_events WHERE run_id = ? ORDER BY seq",
                (run_id,),
            )
        return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]

    async def run_get(self, run_id: int) -> RunRow | None:
        """One run by id."""
        async with self._locked():
            row = await self._fetchone("SELECT * FROM runs WHERE id = ?", (run_id,))
        return _run(row) if row is not None else None

    async def runs_active(self) -> list[RunRow]:
        """Pending and running runs, oldest first."""
        async with self._locked():
            rows = await self._fetchall(
                "SELECT * FROM runs WHERE status IN ('pending', 'running') ORDER BY id"
            )
        return [_run(r) for r in rows]

    async def runs_recent(
        self,
        *,
        project: str | None = None,
        session: SessionKey | None = None,
        limit: int = 10,
    ) -> list[RunRow]:
        """The latest runs, newest first, optionally of one project and/or one session."""
        where: list[str] = []
        params: list[Any] = []
        if project is not None:
            where.append("project = ?")
            params.append(project)
        if session is not None:
            where.append("session_key = ?")
            params.append(str(session))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        async with self._locked():
            rows = await self._fetchall(
                f"SELECT * FROM runs {clause} ORDER BY id DESC LIMIT ?", (*params, limit)
            )
        return [_run(r) for r in rows]

    async def runs_interrupt_stale(self) -> int:
        """After a restart: pending/running runs become 'interrupted'; returns how many."""
        async with self._locked():
            count, _ = await self._execute(
                """
                UPDATE runs SET status = 'interrupted', finished_at = ?, error = ?
                WHERE status IN ('pending', 'running')
                """,
                (self._clock(), _RESTARTED),
            )
        return count

    async def run_delete(self, run_id: int) -> RunRow | None:
        """Delete a finished run (and its events); returns the row as it was.

        An active (pending or running) run is left alone and returned unchanged, so the
        caller can say why; None if there is no such run.
        """
        async with self._tx():
            row = await self._fetchone("SELECT * FROM runs WHERE id = ?", (run_id,))
            if row is None:
                return None
            if row["status"] not in ("pending", "running"):
                await self._execute("DELETE FROM runs WHERE id = ?", (run_id,))
        return _run(row)

    # ---------------------------------------------------------------- kept sources

    async def kept_source_add(self, path: str, project: str, dev: int, ino: int) -> None:
        """Remember that ``delete`` kept ``path``, the source of ``project``."""
        async with self._locked():
            await self._execute(
                """
                INSERT INTO kept_sources (path, project, dev, ino, at) VALUES (?, ?, ?, ?, ?)
                ON CONFLICT (path) DO UPDATE SET project = excluded.project,
                    dev = excluded.dev, ino = excluded.ino, at = excluded.at
                """,
                (path, project, dev, ino, self._clock()),
            )

    async def kept_source_get(self, path: str) -> tuple[str, int, int] | None:
        """(project, dev, ino) of a kept source, or None."""
        async with self._locked():
            row = await self._fetchone(
                "SELECT project, dev, ino FROM kept_sources WHERE path = ?", (path,)
            )
        return (str(row[0]), int(row[1]), int(row[2])) if row is not None else None

    async def kept_source_remove(self, path: str) -> None:
        async with self._locked():
            await self._execute("DELETE FROM kept_sources WHERE path = ?", (path,))

    # ---------------------------------------------------------------- events

    async def event_add(self, project: str, kind: str, text: str) -> None:
        """Record something that happened to ``project`` (for the agent's context)."""
        async with self._locked():
            await self._execute(
                "INSERT INTO events (project, kind, text, at) VALUES (?, ?, ?, ?)",
                (project, kind, text, self._clock()),
            )

    async def events_since(self, project: str, since: float, limit: int = 20) -> list[EventRow]:
        """Events of ``project`` after ``since``, oldest first (at most the latest ``limit``)."""
        async with self._locked():
            rows = await self._fetchall(
                "SELECT * FROM events WHERE project = ? AND at > ? ORDER BY id DESC LIMIT ?",
                (project, since, limit),
            )
        return [
            EventRow(int(r["id"]), r["project"], r["kind"], r["text"], float(r["at"]))
            for r in reversed(rows)
        ]

    # ---------------------------------------------------------------- jobs

    async def job_create(
        self,
        project: str,
        kind: str,
        *,
        session: SessionKey | None,
        requested_by: str,
        params: dict[str, Any] | None = None,
    ) -> int:
        """Record a new job in state 'pending'; returns its id."""
        async with self._locked():
            _, rowid = await self._execute(
                """
                INSERT INTO jobs (project, kind, status, session_key, requested_by, params,
                    created_at)
                VALUES (?, ?, 'pending', ?, ?, ?, ?)
                """,
                (
                    project,
                    kind,
                    str(session) if session is not None else "",
                    requested_by,
                    json.dumps(params or {}),
                    self._clock(),
                ),
            )
        assert rowid is not None
        return rowid

    async def job_start(self, job_id: int) -> None:
        """Mark a job 'running'."""
        async with self._locked():
            count, _ = await self._execute(
                "UPDATE jobs SET status = 'running', started_at = ? WHERE id = ?",
                (self._clock(), job_id),
            )
        if not count:
            raise StoreError(f"job {job_id} does not exist")

    async def job_step(self, job_id: int, name: str, status: str, detail: str = "") -> None:
        """Append a step {name, status, at, detail} to the job's step list."""
        async with self._tx():
            row = await self._fetchone("SELECT steps FROM jobs WHERE id = ?", (job_id,))
            if row is None:
                raise StoreError(f"job {job_id} does not exist")
            steps = _json_list(row["steps"])
            steps.append({"name": name, "status": status, "at": self._clock(), "detail": detail})
            await self._execute(
                "UPDATE jobs SET steps = ? WHERE id = ?", (json.dumps(steps), job_id)
            )

    async def job_finish(self, job_id: int, status: JobStatus, error: str = "") -> None:
        """Record the outcome of a job."""
        async with self._locked():
            count, _ = await self._execute(
                "UPDATE jobs SET status = ?, error = ?, finished_at = ? WHERE id = ?",
                (status, error, self._clock(), job_id),
            )
        if not count:
            raise StoreError(f"job {job_id} does not exist")

    async def job_get(self, job_id: int) -> JobRow | None:
        """One job by id."""
        async with self._locked():
            row = await self._fetchone("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(row) if row is not None else None

    async def jobs_active(self) -> list[JobRow]:
        """Pending and running jobs, oldest first."""
        async with self._locked():
            rows = await self._fetchall(
                "SELECT * FROM jobs WHERE status IN ('pending', 'running') ORDER BY id"
            )
        return [_job(r) for r in rows]

    async def jobs_interrupt_stale(self) -> list[JobRow]:
        """After a restart: pending/running jobs become 'interrupted'.

        Returns the rows as they were before, so the caller knows what was cut short.
        """
        async with self._tx():
            rows = await self._fetchall(
                "SELECT * FROM jobs WHERE status IN ('pending', 'running') ORDER BY id"
            )
            await self._execute(
                """
                UPDATE jobs SET status = 'interrupted', finished_at = ?, error = ?
                WHERE status IN ('pending', 'running')
                """,
                (self._clock(), _RESTARTED),
            )
        return [_job(r) for r in rows]

    # ---------------------------------------------------------------- audit

    async def audit(
        self,
        actor: str,
        action: str,
        result: str,
        *,
        session: SessionKey | None = None,
        target: str = "",
        detail: str = "",
    ) -> None:
        """Append an entry to the audit log."""
        async with self._locked():
            await self._execute(
                """
                INSERT INTO audit (at, actor, session_key, action, target, result, detail)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                """,
                (
                    self._clock(),
                    actor,
                    str(session) if session is not None else "",
                    action,
                    target,
                    result,
                    detail,
                ),
            )

    # ---------------------------------------------------------------- retention

    async def prune(self, before: float) -> dict[str, int]:
        """Delete what is older than ``before`` and done with: inbox rows in a final state,
        events of finished runs, audit entries. Returns how many rows went per table."""
        async with self._tx():
            inbox, _ = await self._execute(
                "DELETE FROM inbox WHERE status IN ('done', 'failed', 'interrupted')"
                " AND updated_at < ?",
                (before,),
            )
            events, _ = await self._execute(
                "DELETE FROM run_events WHERE at < ? AND run_id IN"
                " (SELECT id FROM runs WHERE status NOT IN ('pending', 'running'))",
                (before,),
            )
            audit, _ = await self._execute("DELETE FROM audit WHERE at < ?", (before,))
        return {"inbox": inbox, "run_events": events, "audit": audit}

    async def audit_recent(self, limit: int = 20) -> list[AuditRow]:
        """The latest audit entries, newest first."""
        async with self._locked():
            rows = await self._fetchall("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        return [_audit(r) for r in rows]

    # ---------------------------------------------------------------- denials

    async def denial_due(self, identity: str, interval_s: float) -> bool:
        """True (and recorded) if ``identity`` was not refused within ``interval_s``.

        Kept in the store so that a restart does not repeat a refusal; entries older than
        the interval are forgotten on the way, which keeps the table small.
        """
        now = self._clock()
        async with self._tx():
            await self._execute("DELETE FROM denials WHERE at <= ?", (now - interval_s,))
            row = await self._fetchone("SELECT at FROM denials WHERE identity = ?", (identity,))
            if row is not None and now >= row["at"]:
                return False
            await self._execute(
                "INSERT INTO denials (identity, at) VALUES (?, ?)"
                " ON CONFLICT (identity) DO UPDATE SET at = excluded.at",
                (identity, now),
            )
        return True

    # ---------------------------------------------------------------- processes

    async def process_add(
        self,
        kind: str,
        *,
        detail: str = "",
        project: str = "",
        session_key: str = "",
        run_id: int | None = None,
        container: str = "",
    ) -> ProcessRow:
        """Record a child about to be started (pid 0 until :meth:`process_started`).

        The row comes first so that its id can tag the child's environment: a crash between
        fork and :meth:`process_started` still leaves a row that finds the child.
        """
        now = self._clock()
        async with self._locked():
            _, rowid = await self._execute(
                """
                INSERT INTO processes (pid, pgid, start_ticks, kind, detail, project,
                    session_key, run_id, container, started_at)
                VALUES (0, 0, 0, ?, ?, ?, ?, ?, ?, ?)
                """,
                (kind, detail, project, session_key, run_id, container, now),
            )
            row = await self._fetchone("SELECT * FROM processes WHERE id = ?", (rowid,))
        assert row is not None
        return _process_row(row)

    async def process_started(self, id: int, pid: int, pgid: int, start_ticks: int) -> None:
        async with self._locked():
            await self._execute(
                "UPDATE processes SET pid = ?, pgid = ?, start_ticks = ? WHERE id = ?",
                (pid, pgid, start_ticks, id),
            )

    async def process_end(self, id: int) -> None:
        """Mark a process (and its whole tree) as gone."""
        async with self._locked():
            await self._execute(
                "UPDATE processes SET ended_at = ? WHERE id = ? AND ended_at IS NULL",
                (self._clock(), id),
            )

    async def processes_live(self) -> list[ProcessRow]:
        """Processes not known to have ended, oldest first."""
        async with self._locked():
            rows = await self._fetchall(
                "SELECT * FROM processes WHERE ended_at IS NULL ORDER BY id"
            )
        return [_process_row(r) for r in rows]

    async def processes_prune(self, keep_s: float = 7 * 86400) -> int:
        """Forget processes that ended more than ``keep_s`` ago; returns how many."""
        async with self._locked():
            count, _ = await self._execute(
                "DELETE FROM processes WHERE ended_at IS NOT NULL AND ended_at < ?",
                (self._clock() - keep_s,),
            )
        return count


@dataclass(frozen=True, slots=True)
class ProcessRow:
    """A child process podbay started; ``ended_at`` None means it may still run."""

    id: int
    pid: int
    pgid: int
    start_ticks: int
    kind: str
    detail: str
    project: str
    session_key: str
    run_id: int | None
    container: str
    started_at: float
    ended_at: float | None


def _process_row(row: sqlite3.Row) -> ProcessRow:
    return ProcessRow(
        id=row["id"],
        pid=row["pid"],
        pgid=row["pgid"],
        start_ticks=row["start_ticks"],
        kind=row["kind"],
        detail=row["detail"],
        project=row["project"],
        session_key=row["session_key"],
        run_id=row["run_id"],
        container=row["container"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
    )


def backup_database(source: Path, dest: Path) -> int:
    """A consistent copy of the database at ``source`` in ``dest``, taken with SQLite's
    online backup API (safe while podbay runs and writes). Written next to ``dest`` and
    renamed into place, mode 0600, checked with ``PRAGMA integrity_check``. Returns the
    number of pages copied. Blocking: call it in a thread."""
    if not source.exists():
        raise StoreError(f"there is no database at {source}: nothing to back up")
    tmp = dest.with_name(f".{dest.name}.partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(tmp)
            try:
                src.backup(dst)
                pages = int(dst.execute("PRAGMA page_count").fetchone()[0])
                check = dst.execute("PRAGMA integrity_check").fetchone()[0]
                if check != "ok":
                    raise StoreError(f"the copy failed its integrity check: {check}")
            finally:
                dst.close()
        finally:
            src.close()
        os.replace(tmp, dest)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise
    return pages
