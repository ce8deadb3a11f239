"""Run commands: runs, run <id>, delete run <id>, verbose."""

from __future__ import annotations

import time

from podbay.commands.context import CommandContext
from podbay.commands.registry import CommandSpec, Invocation, Positional, Registry
from podbay.commands.roles import Role
from podbay.engine.store import RunRow
from podbay.errors import UserError
from podbay.transports.render import code_block

RUN_ID = r"#?\d{1,12}"


def _duration(run: RunRow) -> str:
    start = run.started_at or run.created_at
    end = run.finished_at or time.time()
    seconds = max(0.0, end - start)
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def _line(run: RunRow) -> str:
    cost = f" · ${run.cost_usd:.4f}" if run.cost_usd is not None else ""
    where = f" · `{run.project}`" if run.project else ""
    prompt = " ".join(run.prompt.split())
    prompt = prompt if len(prompt) <= 60 else prompt[:59] + "…"
    return f"• #{run.id} {run.status}{where} · {_duration(run)}{cost} · {prompt!r}"


def _run_id(raw: str) -> int:
    digits = raw.lstrip("#")
    if not digits.isdigit():
        raise UserError(f"A run id is a number such as `12` (see `runs`), got {raw[:20]!r}.")
    return int(digits)


async def cmd_runs(ctx: CommandContext, inv: Invocation) -> None:
    name = inv.args.get("project")
    project = (await ctx.engine.project(name)).name if name else None
    runs = await ctx.engine.recent_runs(project)
    if not runs:
        where = f" of `{project}`" if project else ""
        await ctx.reply(f"No agent runs{where} yet.")
        return
    title = f"Recent runs of `{project}`" if project else "Recent runs"
    await ctx.reply("\n".join([f"**{title}**", *(_line(r) for r in runs)]))


async def cmd_run(ctx: CommandContext, inv: Invocation) -> None:
    run, output = await ctx.engine.run_details(_run_id(inv.args["id"]))
    lines = [_line(run)]
    if run.num_turns is not None:
        lines.append(f"turns: {run.num_turns}")
    if run.usage:
        lines.append("usage: " + ", ".join(f"{k} {v}" for k, v in sorted(run.usage.items())))
    if run.error:
        lines.append(f"error: {run.error[:300]}")
    if output:
        lines.append("last output:\n" + code_block("\n".join(output)[-2000:]))
    await ctx.reply("\n".join(lines))


async def cmd_delete_run(ctx: CommandContext, inv: Invocation) -> None:
    run = await ctx.engine.delete_run(_run_id(inv.args["id"]))
    await ctx.reply(f"Deleted run #{run.id} ({run.status}) and its output.")


async def cmd_verbose(ctx: CommandContext, inv: Invocation) -> None:
    raw = inv.args.get("level")
    if raw is None:
        level = await ctx.engine.verbosity(ctx.session)
        await ctx.reply(
            f"Verbosity here is {level} (0: answers only, 1: a line per tool, 2: details)."
        )
        return
    if raw not in ("0", "1", "2"):
        raise UserError(f"`verbose` takes 0, 1 or 2, got {raw[:10]!r}.")
    await ctx.engine.set_verbosity(ctx.session, int(raw))
    await ctx.reply(f"Verbosity here is now {raw}.")


def register(registry: Registry) -> None:
    registry.add(
        CommandSpec(
            "runs",
            "list recent agent runs (of one project)",
            cmd_runs,
            positionals=(Positional("project", required=False),),
        )
    )
    registry.add(
        CommandSpec(
            "run",
            "show one agent run with its last output",
            cmd_run,
            positionals=(Positional("id", pattern=RUN_ID, hint="a run number such as 12"),),
        )
    )
    registry.add(
        CommandSpec(
            "delete run",
            "delete a finished agent run and its output",
            cmd_delete_run,
            role=Role.OPERATOR,
            positionals=(Positional("id", pattern=RUN_ID, hint="a run number such as 12"),),
        )
    )
    registry.add(
        CommandSpec(
            "verbose",
            "how much tool detail agent runs show here: 0, 1 or 2",
            cmd_verbose,
            role=Role.OPERATOR,
            positionals=(Positional("level", required=False, pattern=r"[012]", hint="0, 1 or 2"),),
        )
    )
