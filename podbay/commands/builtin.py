"""Control commands: help, whoami, status, use, stop, confirm, cancel."""

from __future__ import annotations

import time

from podbay.commands.confirm import Proposal
from podbay.commands.context import CommandContext
from podbay.commands.registry import CommandSpec, Invocation, Positional, Registry
from podbay.commands.roles import Role
from podbay.commands.status import render_status
from podbay.errors import PermissionDenied, UserError

CONTROL_COMMANDS = ("help", "status", "stop", "use", "whoami", "confirm", "cancel")


async def cmd_help(ctx: CommandContext, inv: Invocation) -> None:
    allowed = [s for s in ctx.registry.specs() if s.role <= ctx.role]
    topic = inv.args.get("command")
    if topic:
        spec = ctx.registry.get(topic.lower()) or next(
            (s for s in allowed if s.words[0] == topic.lower()), None
        )
        if spec is None or spec.role > ctx.role:
            near = ctx.registry.suggest(topic)
            hint = f" Did you mean `{near}`?" if near else ""
            raise UserError(f"No command `{topic[:40]}`.{hint} Send `help` for the list.")
        text = f"`{spec.usage}`\n{spec.summary}"
        if spec.details:
            text += f"\n\n{spec.details}"
        options = [o for o in spec.options if o.help]
        if options:
            text += "\n" + "\n".join(
                f"• `--{o.name}{' ' + o.metavar if o.metavar else ''}` {o.help}" for o in options
            )
        if spec.role > Role.VIEWER:
            text += f"\n(needs the {spec.role.label} role)"
        await ctx.reply(text)
        return
    name = ctx.registry.bot_name
    lines = [f"**{name}** — you are {ctx.role.label}. Commands:"]
    lines += [f"• `{s.usage}` — {s.summary}" for s in allowed]
    if ctx.role >= Role.OPERATOR:
        lines.append("Anything else you write goes to the coding agent of your active project.")
    lines.append(f"`help <command>` for details. Prefix with `!` or `{name}` in busy rooms.")
    await ctx.reply("\n".join(lines))


async def cmd_whoami(ctx: CommandContext, inv: Invocation) -> None:
    active = await ctx.engine.active_project(ctx.session)
    project = f"`{active.name}`" if active else "none"
    await ctx.reply(
        f"You are `{ctx.sender.identity}` ({ctx.role.label}) in session `{ctx.session}`. "
        f"Active project: {project}."
    )


async def cmd_status(ctx: CommandContext, inv: Invocation) -> None:
    name = inv.args.get("project")
    if not name:
        report = await ctx.engine.status()
        await ctx.reply(render_status(report, transports=ctx.control.transport_states()))
        return
    project = await ctx.engine.project(name)
    lines = [
        f"**{project.name}** · {project.stack or 'base image'} · {project.state}",
        f"path: `{project.path}`",
    ]
    if project.image:
        lines.append(f"image: {project.image}")
    lines.append(f"created: {time.strftime('%Y-%m-%d %H:%M', time.localtime(project.created_at))}")
    cpus = project.settings.get("cpus")
    if cpus is not None:
        lines.append(f"limits: {float(cpus):g} CPUs, {project.settings.get('memory')} memory")
    git = await ctx.engine.git_summary(project)
    if git is not None:
        lines.append(git)
    runs = await ctx.engine.recent_runs(project=project.name, limit=5)
    if runs:
        lines.append("recent runs:")
        lines += [f"• #{r.id} {r.status}: {r.prompt[:60]!r}" for r in runs]
    await ctx.reply("\n".join(lines))


async def cmd_use(ctx: CommandContext, inv: Invocation) -> None:
    name = inv.args.get("project")
    if name is None:
        active = await ctx.engine.active_project(ctx.session)
        if active is None:
            await ctx.reply("No active project. `use <project>` picks one.")
        else:
            await ctx.reply(f"Active project: `{active.name}` (`{active.path}`).")
        return
    project = await ctx.engine.use_project(ctx.session, name)
    assert project is not None
    await ctx.reply(f"Now using `{project.name}`. Freeform messages go to its agent.")


async def cmd_stop(ctx: CommandContext, inv: Invocation) -> None:
    await ctx.reply(await ctx.control.stop_session(ctx.session))


def _own_proposal(ctx: CommandContext, verb: str) -> Proposal:
    """The proposal this `confirm`/`cancel` decides, taken out; refuses anyone else's."""
    timeout = int(ctx.proposals.timeout_s)
    action = ctx.inbound.action
    if action is not None:
        # A click names its proposal: decide exactly that one, if the clicker may.
        proposal = ctx.proposals.find(action.target)
        if proposal is None or proposal.session != ctx.session:
            raise UserError(
                f"That request is no longer open: it was decided already, or it expired "
                f"(requests expire after {timeout} s)."
            )
        if proposal.requester != ctx.sender.identity:
            raise PermissionDenied(
                f"Only {proposal.requester} can {verb} their request ({proposal.summary})."
            )
        if ctx.role < proposal.role:
            raise PermissionDenied(
                f"Deciding this needs the {proposal.role.label} role; you are "
                f"{ctx.role.with_article}."
            )
        taken = ctx.proposals.take(proposal.session, proposal.requester)
        assert taken is proposal
        return proposal
    proposal = ctx.proposals.take(ctx.session, ctx.sender.identity)
    if proposal is not None:
        return proposal
    others = ctx.proposals.others(ctx.session, ctx.sender.identity)
    if others:
        raise UserError(
            f"Only {others[0].requester} can {verb} their request ({others[0].summary})."
        )
    raise UserError(f"Nothing to {verb} (requests expire after {timeout} s).")


async def cmd_confirm(ctx: CommandContext, inv: Invocation) -> None:
    proposal = _own_proposal(ctx, "confirm")
    await ctx.decided(proposal, f"Confirmed by {ctx.sender.name}.")
    await proposal.action()


async def cmd_cancel(ctx: CommandContext, inv: Invocation) -> None:
    proposal = _own_proposal(ctx, "cancel")
    await ctx.decided(proposal, f"Cancelled by {ctx.sender.name}.")
    await ctx.reply(f"Cancelled: {proposal.summary}")


def register(registry: Registry) -> None:
    add = registry.add
    add(
        CommandSpec(
            "help",
            "list commands, or explain one",
            cmd_help,
            positionals=(Positional("command", required=False, rest=True),),
        )
    )
    add(
        CommandSpec(
            "status",
            "projects, runs, queues and jobs (or one project in detail)",
            cmd_status,
            positionals=(Positional("project", required=False),),
        )
    )


def register_session_commands(registry: Registry) -> None:
    add = registry.add
    add(
        CommandSpec(
            "use",
            "pick the project freeform messages go to (no name: show it)",
            cmd_use,
            role=Role.OPERATOR,
            positionals=(Positional("project", required=False),),
        )
    )
    add(
        CommandSpec(
            "stop",
            "cancel this conversation's agent run and drop its queue",
            cmd_stop,
            role=Role.OPERATOR,
        )
    )
    add(CommandSpec("confirm", "go ahead with your pending request", cmd_confirm))
    add(CommandSpec("cancel", "drop your pending request", cmd_cancel))
    add(CommandSpec("whoami", "show your identity, role and active project", cmd_whoami))
