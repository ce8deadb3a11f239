"""The authorization matrix: every command of README.md's "## Commands" table, sent by an
unknown sender, a viewer, an operator and an admin, on every transport.

The table is parsed at test time and checked against the command registry (same commands,
same roles), so README and code cannot drift apart unnoticed. Then each command is sent by
each role, and:

- a role below the one README names gets "`x` needs the R role; you are …" (to that sender
  alone), nothing changes (no row of any state table, no agent run, no job, no pending
  request) and the audit log records the refusal;
- a sufficient role is never refused for its role (it may fail for other reasons: there
  is no Docker here, so project commands answer that no provisioner is configured);
- an unknown sender gets one "not allowed" reply (later messages none, within
  ``access.deny_reply_interval_s``), nothing it sends executes, and each is audited;
- freeform text needs the operator role (its refusal is not audited: no command ran).

The role check lives in the dispatcher, so most of the matrix runs on in-memory transports
named after each real one (console, matrix, slack, whatsapp) with identities spelled as
those platforms spell them. A representative subset then goes end to end through the real
Slack (signed slash commands to /slack/events) and WhatsApp Meta (signed webhooks) plugins.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import fakes.slack_world as slack_world
import fakes.wa_world as wa_world
from fakes.agent import FakeAgent
from fakes.slack_api import FakeSlack
from fakes.transport import MemoryTransport
from fakes.whatsapp_api import FakeGraph

from podbay.bot import Podbay, database_path
from podbay.commands.catalog import build_registry
from podbay.commands.context import CommandContext
from podbay.commands.registry import CommandSpec, Invocation, Positional, Registry
from podbay.commands.roles import Role
from podbay.config import AccessConfig, Settings
from podbay.messages import SessionKey

TESTS = Path(__file__).resolve().parent.parent
README = TESTS.parent / "README.md"


# -- the README table ------------------------------------------------------------------

ROLES = {"viewer": Role.VIEWER, "operator": Role.OPERATOR, "admin": Role.ADMIN}
# "requester": anyone podbay knows may send it; it only ever decides their own request.
README_ROLES = {**ROLES, "requester": Role.VIEWER}
ARTICLE = {"viewer": "a viewer", "operator": "an operator", "admin": "an admin"}
# The concrete line sent for each command ({run}: a finished run that exists).
LINES = {
    "help": "help",
    "whoami": "whoami",
    "status": "status",
    "use": "use demo",
    "stop": "stop",
    "confirm": "confirm",
    "cancel": "cancel",
    "new project": "new project x",
    "delete": "delete demo",
    "restart": "restart demo",
    "rebuild": "rebuild demo",
    "ssh": "ssh demo",
    "logs": "logs demo",
    "runs": "runs",
    "run": "run {run}",
    "delete run": "delete run {run}",
    "verbose": "verbose 2",  # the default is 1: 2 is a change
}
FREEFORM = "please explain how the build works"
# Every refusal for a role, as the dispatcher words them.
ROLE_REFUSAL = re.compile(r"needs the (viewer|operator|admin) role; you are")


@dataclass(frozen=True)
class Row:
    command: str  # the command's name: the words before its first argument
    role: str  # as README writes it
    line: int  # in README.md


def readme_commands() -> list[Row]:
    """Every command of the "## Commands" table (`confirm` / `cancel` is two)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("## Commands")
    rows: list[Row] = []
    for number, text in enumerate(lines[start + 1 :], start + 2):
        if text.startswith("## "):
            break
        if not text.startswith("|"):
            if rows:
                break  # the table has ended
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", text.strip().strip("|"))]
        if len(cells) < 2 or cells[0] in ("command", "") or set(cells[0]) <= set("-: "):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        assert names, f"README.md:{number}: no `command` in the first cell: {text!r}"
        for usage in names:
            words: list[str] = []
            for word in usage.split():
                if word[0] in "<[-":
                    break
                words.append(word)
            assert words, f"README.md:{number}: {usage!r} names no command"
            rows.append(Row(" ".join(words), cells[1], number))
    assert rows, 'README.md has no "## Commands" table'
    return rows


def line_for(command: str, run_id: int) -> str:
    return LINES[command].format(run=run_id)


# -- identities: one per role, spelled as each platform spells users ------------------

TRANSPORTS: dict[str, dict[str, str]] = {
    "console": {"admin": "ada", "operator": "otto", "viewer": "vera", "unknown": "eve"},
    "matrix": {
        "admin": "@ada:example.org",
        "operator": "@otto:example.org",
        "viewer": "@vera:example.org",
        "unknown": "@eve:example.org",
    },
    "slack": {"admin": "UADA01", "operator": "UOTTO01", "viewer": "UVERA01", "unknown": "UEVE01"},
    "whatsapp": {
        "admin": "+15550000001",
        "operator": "+15550000002",
        "viewer": "+15550000003",
        "unknown": "+15550000009",
    },
}
ORDER = ("unknown", "viewer", "operator", "admin")


def access_for(users: dict[str, dict[str, str]]) -> AccessConfig:
    """``[access]`` listing each transport's admin, operator and viewer (no "console:*")."""
    listed = {
        role: [f"{transport}:{who[role]}" for transport, who in users.items()]
        for role in ("admin", "operator", "viewer")
    }
    return AccessConfig.model_validate(
        {"admins": listed["admin"], "operators": listed["operator"], "viewers": listed["viewer"]}
    )


class NamedTransport(MemoryTransport):
    """A :class:`MemoryTransport` that says it is ``name``: its senders and sessions are
    ``name:…``, as the real transport's are."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


# -- what may not change --------------------------------------------------------------

# Written for every message, refused or not; everything else is state a command may change.
_PER_MESSAGE_TABLES = {"inbox", "audit", "denials", "schema_migrations", "sqlite_sequence"}


def state_rows(db: Path) -> dict[str, list[str]]:
    """Every row of every state table (sessions without their last-activity time)."""
    con = sqlite3.connect(db)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        rows: dict[str, list[str]] = {}
        for table in sorted(set(tables) - _PER_MESSAGE_TABLES):
            columns = [
                r[1] for r in con.execute(f"PRAGMA table_info({table})") if r[1] != "last_activity"
            ]
            select = f"SELECT {', '.join(columns)} FROM {table}"
            rows[table] = sorted(repr(r) for r in con.execute(select))
        return rows
    finally:
        con.close()


def snapshot(bot: Podbay, agent: FakeAgent) -> dict[str, object]:
    assert bot.engine is not None and bot.dispatcher is not None
    return {
        "rows": state_rows(database_path(bot.settings)),
        "agent runs": len(agent.runs),
        "jobs running": len(bot.engine.jobs.running()),
        "pending requests": len(bot.dispatcher.proposals),
    }


async def audit_since(bot: Podbay, after: int, actor: str) -> list[tuple[str, str]]:
    """(action, result) of each audit entry for ``actor`` newer than entry ``after``."""
    assert bot.store is not None
    recent = await bot.store.audit_recent(limit=200)
    return [(a.action, a.result) for a in reversed(recent) if a.id > after and a.actor == actor]


async def last_audit_id(bot: Podbay) -> int:
    assert bot.store is not None
    recent = await bot.store.audit_recent(limit=1)
    return recent[0].id if recent else 0


async def settle(bot: Podbay) -> None:
    """Wait until every message submitted so far is handled (and its run, if any, done)."""
    assert bot.dispatcher is not None
    await asyncio.wait_for(bot.dispatcher.drain(), 10)


async def seed(bot: Podbay, session: SessionKey, tmp: Path) -> int:
    """A project `demo` (so commands naming it are about something real) and one
    finished run; returns the run's id."""
    assert bot.store is not None
    if await bot.store.project_get("demo") is None:
        source = tmp / "demo"
        source.mkdir(exist_ok=True)
        await bot.store.project_add("demo", source, ssh_port=2299, state="running")
    run_id = await bot.store.run_create(session, "demo", "an earlier question", "fake")
    await bot.store.run_finish(run_id, "succeeded", exit_code=0)
    return run_id


def wipe_registry(wiped: list[str]) -> Registry:
    """The real commands plus `wipe <thing>` (operator), which asks for `confirm` first:
    without Docker no real command gets as far as asking."""

    async def wipe(ctx: CommandContext, inv: Invocation) -> None:
        async def action() -> None:
            wiped.append(inv.args["thing"])
            await ctx.reply(f"wiped {inv.args['thing']}")

        await ctx.propose(f"Wipe {inv.args['thing']}?", action)

    registry = build_registry()
    registry.add(
        CommandSpec(
            "wipe", "test", wipe, kind="job", role=Role.OPERATOR,
            positionals=(Positional("thing"),),
        )
    )  # fmt: skip
    return registry


# -- 1. README against the registry ---------------------------------------------------


def test_readme_commands_table_matches_the_registry() -> None:
    rows = readme_commands()
    registry = build_registry()
    specs = {s.name: s for s in registry.specs()}
    problems: list[str] = []
    seen: set[str] = set()
    for row in rows:
        if row.command in seen:
            problems.append(f"README.md:{row.line}: `{row.command}` is listed twice")
        seen.add(row.command)
        if row.role not in README_ROLES:
            problems.append(
                f"README.md:{row.line}: `{row.command}` has role {row.role!r}; expected one "
                f"of {', '.join(README_ROLES)}"
            )
        spec = specs.get(row.command)
        if spec is None:
            problems.append(f"README.md:{row.line}: `{row.command}` is not a registered command")
        elif row.role in README_ROLES and README_ROLES[row.role] != spec.role:
            problems.append(
                f"README.md:{row.line}: `{row.command}` is {row.role} in README but needs "
                f"the {spec.role.label} role in the registry"
            )
        if row.command not in LINES:
            problems.append(
                f"README.md:{row.line}: `{row.command}` has no line to send in LINES "
                "(add one to this test)"
            )
    for name, spec in specs.items():
        if name not in seen:
            problems.append(
                f"`{name}` ({spec.role.label}) is registered but missing from README's "
                "## Commands table"
            )
    # Each line really is the command it stands for (not freeform, not a usage error).
    for name in LINES:
        parsed = registry.parse(line_for(name, 1), projects=["demo"])
        if not isinstance(parsed, Invocation) or parsed.spec.name != name:
            problems.append(f"LINES[{name!r}] parses as {parsed!r}, not as `{name}`")
    assert not problems, "README and the registry disagree:\n" + "\n".join(problems)


# -- 2. the whole matrix, on every transport (in memory) ------------------------------


async def test_every_command_for_every_role_on_every_transport(tmp_path: Path) -> None:
    rows = readme_commands()
    unsendable = [r.command for r in rows if r.command not in LINES]
    assert not unsendable, f"README commands with no line in LINES to send: {unsendable}"
    settings = Settings(
        data_dir=tmp_path / "data",
        access=access_for(TRANSPORTS),
        dispatcher={"coalesce_window_ms": 0, "max_window_ms": 0},
    )
    transports = {name: NamedTransport(name) for name in TRANSPORTS}
    agent = FakeAgent(auto_release=0.0)
    wiped: list[str] = []
    bot = Podbay(
        settings,
        transports=list(transports.values()),
        agent=agent,
        docker=False,
        registry=wipe_registry(wiped),
    )
    problems: list[str] = []
    async with bot:
        for tname, transport in transports.items():
            run_id = await seed(bot, SessionKey(tname, "history"), tmp_path)
            for role_name in ORDER:
                user = TRANSPORTS[tname][role_name]
                identity = f"{tname}:{user}"
                session = SessionKey(tname, f"room-{role_name}")
                role = ROLES.get(role_name)
                sends = [(row.command, row.role, line_for(row.command, run_id)) for row in rows]
                sends.append(("freeform", "operator", FREEFORM))
                for first, (command, needed, text) in enumerate(sends):
                    where = f"{tname} {role_name} ({identity}) sent {text!r}"
                    before = snapshot(bot, agent)
                    audit_mark = await last_audit_id(bot)
                    sent_mark = len(transport.sent)
                    await transport.say(text, session=session, user=user)
                    await settle(bot)
                    replies = [r for s, r in transport.sent[sent_mark:] if s == session]
                    audited = await audit_since(bot, audit_mark, identity)
                    after = snapshot(bot, agent)
                    if role is None:
                        # Unknown: one refusal per interval, nothing executed, each audited.
                        wanted = 1 if first == 0 else 0
                        denied = [r for r in replies if "not allowed to use podbay" in r.text]
                        if len(replies) != wanted or len(denied) != wanted:
                            problems.append(
                                f"{where}: expected {wanted} 'not allowed' reply, got "
                                f"{[r.text for r in replies]}"
                            )
                        elif wanted and identity not in denied[0].text:
                            problems.append(f"{where}: the refusal does not name {identity}")
                        if audited != [("message", "denied: unknown sender")]:
                            problems.append(f"{where}: audit log has {audited}")
                        if after != before:
                            problems.append(f"{where}: state changed: {_diff(before, after)}")
                        continue
                    needs = README_ROLES[needed]
                    if role < needs:
                        want = (
                            f"`{command}` needs the {needed} role; you are {ARTICLE[role_name]}."
                            if command != "freeform"
                            else "Talking to the agent needs the operator role; you are "
                            f"{ARTICLE[role_name]}."
                        )
                        got = [(r.text, r.kind, r.private_to) for r in replies]
                        if len(replies) != 1 or replies[0].text != want:
                            problems.append(f"{where}: expected {want!r}, got {got}")
                        elif replies[0].private_to is None or (
                            replies[0].private_to.identity != identity
                        ):
                            problems.append(f"{where}: the refusal is not private to the sender")
                        # A refused freeform message leaves no audit entry (no command ran).
                        if command != "freeform" and audited != [(command, f"refused: {want}")]:
                            problems.append(f"{where}: audit log has {audited}")
                        if after != before:
                            problems.append(f"{where}: state changed: {_diff(before, after)}")
                        continue
                    # Allowed: answered, and never refused for the sender's role.
                    texts = [r.text for r in replies]
                    if not texts:
                        problems.append(f"{where}: no reply at all")
                    if any(ROLE_REFUSAL.search(t) for t in texts):
                        problems.append(f"{where}: refused for the role: {texts}")
                    if command != "freeform" and (
                        len(audited) != 1
                        or audited[0][0] != command
                        or ROLE_REFUSAL.search(audited[0][1])
                    ):
                        problems.append(f"{where}: audit log has {audited}")
                    if command == "freeform" and after["agent runs"] == before["agent runs"]:
                        problems.append(f"{where}: no agent run started")
            await _requester_decides(bot, transport, agent, wiped, problems)
    assert agent.violations == []
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems)


async def _requester_decides(
    bot: Podbay,
    transport: NamedTransport,
    agent: FakeAgent,
    wiped: list[str],
    problems: list[str],
) -> None:
    """`confirm` / `cancel` are the requester's: in a shared room, a viewer and an admin
    cannot decide an operator's request (and an unknown sender is ignored); the operator can."""
    tname = transport.name
    who = TRANSPORTS[tname]
    room = SessionKey(tname, "shared")
    thing = f"cache-{tname}"
    requester = f"{tname}:{who['operator']}"
    done = len(wiped)

    async def say(role_name: str, text: str) -> list[str]:
        mark = len(transport.sent)
        await transport.say(text, session=room, user=who[role_name])
        await settle(bot)
        return [r.text for s, r in transport.sent[mark:] if s == room]

    prompt = await say("operator", f"wipe {thing}")
    if not any(f"Wipe {thing}?" in t for t in prompt):
        problems.append(f"{tname}: `wipe` asked nothing: {prompt}")
        return
    for role_name, verb in (("viewer", "confirm"), ("admin", "confirm"), ("admin", "cancel")):
        texts = await say(role_name, verb)
        want = f"Only {requester} can {verb} their request (Wipe {thing}?)."
        if texts != [want]:
            problems.append(f"{tname}: {role_name} sent {verb!r}: expected {want!r}, got {texts}")
    before = snapshot(bot, agent)
    await say("unknown", "confirm")
    if snapshot(bot, agent) != before or len(wiped) != done:
        problems.append(f"{tname}: an unknown sender's `confirm` decided the request")
    texts = await say("operator", "confirm")
    if wiped[done:] != [thing] or not any(f"wiped {thing}" in t for t in texts):
        problems.append(f"{tname}: the requester's `confirm` did not go ahead: {texts}")


def _diff(before: dict[str, Any], after: dict[str, Any]) -> str:
    out: list[str] = []
    for key in before:
        if key == "rows":
            for table in sorted(set(before["rows"]) | set(after["rows"])):
                old, new = before["rows"].get(table, []), after["rows"].get(table, [])
                if old != new:
                    gone = [r for r in old if r not in new]
                    came = [r for r in new if r not in old]
                    out.append(f"{table}: -{gone} +{came}")
        elif before[key] != after[key]:
            out.append(f"{key}: {before[key]} -> {after[key]}")
    return "; ".join(out)


# -- 3. end to end through the real webhook transports ---------------------------------


@dataclass(frozen=True)
class Case:
    role: str  # viewer, unknown or admin
    text: str
    audited: str | None  # the audit entry's action (None: freeform, which has none)
    expect: str  # a fragment of the reply, as the platform shows it
    refused: bool  # refused: nothing may change
    private: bool  # meant for the sender alone (ephemeral on Slack)


def cases(run_id: int) -> list[Case]:
    viewer_needs = "needs the {}; you are a viewer"
    return [
        Case("viewer", "delete demo", "delete", viewer_needs.format("admin role"), True, True),
        Case(
            "viewer",
            f"delete run {run_id}",
            "delete run",
            viewer_needs.format("operator role"),
            True,
            True,
        ),
        Case("viewer", "use demo", "use", viewer_needs.format("operator role"), True, True),
        Case("viewer", FREEFORM, None, "Talking to the agent needs the operator role", True, True),
        Case("viewer", "whoami", "whoami", "(viewer)", False, False),
        Case("unknown", "delete demo", "message", "not allowed to use podbay", True, False),
        Case("admin", "delete demo", "delete", "No container provisioner", False, True),
    ]


Send = Callable[[Case], Awaitable[None]]
ReplyWith = Callable[[Case], Awaitable[str]]


async def _end_to_end(
    bot: Podbay,
    agent: FakeAgent,
    users: dict[str, str],
    tmp: Path,
    session: SessionKey,
    send: Send,
    reply_with: ReplyWith,
) -> list[str]:
    """Run :func:`cases` through a real transport; ``users`` maps a role to its identity."""
    problems: list[str] = []
    run_id = await seed(bot, session, tmp)
    for case in cases(run_id):
        identity = users[case.role]
        where = f"{session.transport}: {case.role} sent {case.text!r}"
        before = snapshot(bot, agent)
        audit_mark = await last_audit_id(bot)
        await send(case)
        try:
            text = await reply_with(case)
        except TimeoutError as exc:
            problems.append(f"{where}: no reply with {case.expect!r}: {exc}")
            continue
        # The reply goes out before the message is marked done and audited: wait for that.
        await settle(bot)
        after = snapshot(bot, agent)
        if case.refused and after != before:
            problems.append(f"{where}: state changed: {_diff(before, after)}")
        if not case.refused and ROLE_REFUSAL.search(text):
            problems.append(f"{where}: refused for the role: {text!r}")
        audited = await audit_since(bot, audit_mark, identity)
        if case.audited is None:
            continue
        if case.role == "unknown":
            ok = audited == [("message", "denied: unknown sender")]
        elif case.refused:
            ok = (
                len(audited) == 1
                and audited[0][0] == case.audited
                and audited[0][1].startswith("refused: ")
                and ROLE_REFUSAL.search(audited[0][1]) is not None
            )
        else:
            ok = (
                len(audited) == 1
                and audited[0][0] == case.audited
                and not ROLE_REFUSAL.search(audited[0][1])
            )
        if not ok:
            problems.append(f"{where}: audit log has {audited}")
    return problems


async def test_slack_slash_commands_are_checked_against_the_readme_roles(tmp_path: Path) -> None:
    users = {"admin": "UADA01", "viewer": "UVERA01", "unknown": "UEVE01"}
    agent = FakeAgent(auto_release=0.0)
    async with FakeSlack() as fake:
        base: Settings = slack_world.slack_settings(fake, tmp_path / "data")
        settings = base.model_copy(
            update={
                "access": AccessConfig.model_validate(
                    {"admins": [f"slack:{users['admin']}"], "viewers": [f"slack:{users['viewer']}"]}
                )
            }
        )
        bot = Podbay(settings, agent=agent, docker=False)
        (transport,) = bot.transports  # built by the slack plugin, as `podbay run` does
        async with bot, aiohttp.ClientSession() as http:
            world = slack_world.World(fake, bot, transport, agent, http, [], settings.data_dir)
            seen: set[int] = set()

            async def send(case: Case) -> None:
                status = await world.command(case.text, user=users[case.role])
                assert status == 200, f"/podbay {case.text} answered {status}"

            async def reply_with(case: Case) -> str:
                # Meant for the sender alone: ephemeral, to that user; else in the channel.
                method = "chat.postEphemeral" if case.private else "chat.postMessage"

                def fresh(call: Any) -> bool:
                    return (
                        id(call) not in seen
                        and not call.failed
                        and case.expect in _slack_text(call.args)
                        and (not case.private or call.args.get("user") == users[case.role])
                    )

                (call, *_) = await fake.wait_for(method, fresh, timeout=10)
                seen.add(id(call))
                return _slack_text(call.args)

            problems = await _end_to_end(
                bot,
                agent,
                {r: f"slack:{u}" for r, u in users.items()},
                tmp_path,
                SessionKey("slack", "C0001"),
                send,
                reply_with,
            )
            public = [_slack_text(c.args) for c in fake.calls_to("chat.postMessage")]
            if any(ROLE_REFUSAL.search(t) for t in public):
                problems.append(f"slack: a role refusal was posted to the whole channel: {public}")
    assert agent.runs == []
    assert not problems, "\n".join(problems)


async def test_whatsapp_messages_are_checked_against_the_readme_roles(tmp_path: Path) -> None:
    users = {"admin": "15550000001", "viewer": "15550000003", "unknown": "15550000009"}
    agent = FakeAgent(auto_release=0.0)
    async with FakeGraph() as graph:
        base: Settings = wa_world.meta_settings(graph, tmp_path / "data")
        settings = base.model_copy(
            update={
                "access": AccessConfig.model_validate(
                    {
                        "admins": [f"whatsapp:+{users['admin']}"],
                        "viewers": [f"whatsapp:+{users['viewer']}"],
                    }
                )
            }
        )
        bot = Podbay(settings, agent=agent, docker=False)
        (transport,) = bot.transports  # built by the whatsapp plugin
        async with bot, aiohttp.ClientSession() as http:
            world = wa_world.World(bot, transport, agent, http, [], settings.data_dir, graph=graph)
            seen: set[int] = set()

            async def send(case: Case) -> None:
                await world.say(case.text, wa_id=users[case.role])

            async def reply_with(case: Case) -> str:
                def fresh(call: Any) -> bool:
                    return (
                        id(call) not in seen
                        and not call.failed
                        and call.body.get("to") == users[case.role]
                        and case.expect in _wa_text(call.body)
                    )

                (call, *_) = await graph.wait_for(fresh, timeout=10)
                seen.add(id(call))
                return _wa_text(call.body)

            problems = await _end_to_end(
                bot,
                agent,
                {r: f"whatsapp:+{u}" for r, u in users.items()},
                tmp_path,
                SessionKey("whatsapp", users["viewer"]),
                send,
                reply_with,
            )
    assert agent.runs == []
    assert not problems, "\n".join(problems)


def _slack_text(args: dict[str, Any]) -> str:
    """What a Slack chat.* call shows: its text and its blocks' text."""
    parts = [str(args.get("text") or "")]
    blocks = args.get("blocks") or []
    if isinstance(blocks, str):
        parts.append(blocks)
    else:
        parts += [str((b.get("text") or {}).get("text") or "") for b in blocks]
    return "\n".join(parts)


def _wa_text(body: dict[str, Any]) -> str:
    """The text of a Graph messages request (a text message's body, else the whole JSON)."""
    if body.get("type") == "text":
        return str(body.get("text", {}).get("body", ""))
    return str(body)
