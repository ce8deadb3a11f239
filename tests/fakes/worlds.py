"""What the Slack and WhatsApp test worlds share: a destructive test command, and a dump of
every row of the database (to search for secrets)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from podbay.commands.catalog import build_registry
from podbay.commands.context import CommandContext
from podbay.commands.registry import CommandSpec, Invocation, Positional, Registry
from podbay.commands.roles import Role


def wipe_registry(wiped: list[str]) -> Registry:
    """The real commands plus `wipe <thing>`, a destructive command that asks first."""

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


def all_rows(db_path: Path) -> str:
    """Every row of every table, as text."""
    db = sqlite3.connect(db_path)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return "\n".join(
            repr(row) for table in tables for row in db.execute(f"SELECT * FROM {table}")
        )
    finally:
        db.close()
