"""Property: a secret a user sends, in any of the forms podbay knows, never reaches a stored
row, a log line, a reply or the agent."""

from __future__ import annotations

import asyncio
import io
import logging
import sqlite3
from pathlib import Path

from fakes.agent import FakeAgent
from fakes.transport import MemoryTransport
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podbay.commands.catalog import build_registry
from podbay.commands.context import CommandContext
from podbay.commands.registry import CommandSpec, Invocation, Positional
from podbay.config import Settings
from podbay.dispatcher import Dispatcher
from podbay.engine.core import Engine
from podbay.engine.store import Store
from podbay.messages import SessionKey
from podbay.redact import RedactingFormatter

DM = SessionKey("memory", "dm-alice")
GROUP = SessionKey("memory", "room-1")

# Each template puts the secret where a user might: option spellings phones produce, a
# password in a git URL, a known token shape, freeform text for the agent, a mistyped command.
TEMPLATES = [
    "new project demo --token {s}",
    "new project demo —token {s}",
    "new project demo -token={s}",
    "new project demo --tok '{s}'",
    "new project demo --git https://alice:{s}@127.0.0.1:9/repo.git",
    "please push with --token {s} when done",
    "use the key ghp_{s} for the api",
    "delete demo2 —token {s}",
    "explode https://bob:{s}@127.0.0.1/x.git",
    "help ghp_{s}",
]

secrets_ = st.text(
    alphabet="ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789", min_size=16, max_size=40
).map(lambda body: "Zq9" + body)


async def scenario(tmp: Path, secret: str, direct: bool) -> list[str]:
    """Everything podbay stored, logged, replied or gave the agent."""
    config = Settings(
        data_dir=tmp,
        access={"admins": ["memory:alice"]},
        dispatcher={"coalesce_window_ms": 0, "max_window_ms": 0},
    )
    registry = build_registry()

    async def explode(ctx: CommandContext, inv: Invocation) -> None:
        # An internal error whose message quotes what the user typed.
        raise RuntimeError(f"cannot explode {inv.args['what']}")

    registry.add(CommandSpec("explode", "test", explode, positionals=(Positional("what"),)))
    agent = FakeAgent(auto_release=0.0)
    log_lines = io.StringIO()
    handler = logging.StreamHandler(log_lines)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    root, ours = logging.getLogger(), logging.getLogger("podbay")
    root.addHandler(handler)
    old_level = ours.level
    ours.setLevel(logging.DEBUG)
    try:
        async with await Store.open(tmp / "podbay.db") as store:
            dispatcher = Dispatcher(Engine(store, config, agent=agent), registry, config)
            transport = MemoryTransport()
            dispatcher.attach(transport)
            await transport.start(dispatcher.submit)
            await dispatcher.recover()
            for template in TEMPLATES:
                await transport.say(
                    template.format(s=secret), session=DM if direct else GROUP, direct=direct
                )
            await dispatcher.drain()
            await dispatcher.shutdown()
    finally:
        root.removeHandler(handler)
        ours.setLevel(old_level)
    seen = [r.text for _, r in transport.sent]
    seen += agent.prompts()
    seen.append(log_lines.getvalue())
    db = sqlite3.connect(tmp / "podbay.db")
    try:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            for row in db.execute(f"SELECT * FROM {table}"):
                seen += [str(value) for value in row]
    finally:
        db.close()
    return seen


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(secret=secrets_, direct=st.booleans())
def test_no_row_log_line_reply_or_prompt_ever_contains_the_secret(
    tmp_path_factory: object, secret: str, direct: bool
) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        seen = asyncio.run(scenario(Path(tmp), secret, direct))
    leaks = [text for text in seen if secret in text]
    assert leaks == []
    # The scenario did reach the places it checks: the agent got the freeform prompts.
    assert any("[redacted]" in text for text in seen)


async def test_configured_agent_secrets_are_masked_in_agent_output(tmp_path: Path) -> None:
    from podbay.engine.agents import FinishedEvent, TextEvent

    key = "plainkey-without-any-known-shape-42"
    config = Settings(
        data_dir=tmp_path,
        access={"admins": ["memory:alice"]},
        agent={"env": {"SOME_API_KEY": key}},
    )
    agent = FakeAgent(auto_release=0.0)
    agent.script = [TextEvent(f"my key is {key}"), FinishedEvent(ok=True)]
    async with await Store.open(tmp_path / "podbay.db") as store:
        dispatcher = Dispatcher(Engine(store, config, agent=agent), build_registry(), config)
        transport = MemoryTransport()
        dispatcher.attach(transport)
        await transport.start(dispatcher.submit)
        await dispatcher.recover()
        await transport.say("what is your key?", session=DM, direct=True)
        await dispatcher.drain()
        replies = transport.texts(DM)
        assert "my key is [redacted]" in replies
        (run,) = await store.runs_recent()
        events = await store.run_events(run.id)
        assert all(key not in data for _, _, data in events)
        await dispatcher.shutdown()
