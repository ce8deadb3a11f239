"""Project commands: new project, delete (engine jobs), restart, rebuild, ssh, logs.

They validate everything before anything is created, then hand the work to the engine as
a background job whose progress is posted to the conversation.
"""

from __future__ import annotations

from podbay.commands.context import CommandContext
from podbay.commands.registry import CommandSpec, Invocation, Option, Positional, Registry
from podbay.commands.roles import Role
from podbay.engine.jobs import JobHandle
from podbay.engine.lifecycle import NewProjectRequest, check_memory, parse_cpus
from podbay.engine.ssh import connection_info
from podbay.errors import UserError
from podbay.transports.render import code_block


async def cmd_new_project(ctx: CommandContext, inv: Invocation) -> None:
    name = inv.args["name"]
    # Busy first: nothing may be announced (or planned) for a project whose job still runs.
    ctx.engine.ensure_no_job(name)
    manager = ctx.engine.require_projects()
    token = inv.opt("token")
    if token is not None and (token == "[redacted]" or not token.strip()):
        raise UserError("The token was redacted before podbay stored this message; send it again.")
    request = NewProjectRequest(
        name=name,
        requested_by=ctx.sender.identity,
        requester_name=ctx.sender.name,
        session=ctx.session,
        stack=inv.opt("stack"),
        git_url=inv.opt("git"),
        path=inv.opt("path"),
        cpus=parse_cpus(inv.opt("cpus")),
        memory=check_memory(inv.opt("memory")),
        token=token,
    )
    # Every check, then name, path and port are reserved; nothing else exists before the job.
    plan = await manager.plan(request)
    progress = ctx.progress()

    async def work(job: JobHandle) -> str:
        # Announced from inside the job: it is only said once the job has really started.
        try:
            await progress.update("\n".join([f"Creating `{name}` at `{plan.path}`…", *plan.notes]))
        except BaseException:
            await manager.release(plan)
            raise
        created = await manager.create(plan, job, progress.update)
        project = created.project
        lines = [
            f"**{project.name}** is ready · {project.stack or 'base image'} "
            f"({created.stack_reason})",
            f"Source: `{project.path}` (mounted at `/workspace`)",
            created.connection,
            created.identity_note,
        ]
        if created.token_note:
            lines.append(created.token_note)
        lines.append("Freeform messages here now go to its agent.")
        return "\n".join(lines)

    try:
        await ctx.start_job(name, "new project", work)
    except BaseException:
        await manager.release(plan)  # the job never started: give the reservation back
        raise


async def cmd_delete(ctx: CommandContext, inv: Invocation) -> None:
    manager = ctx.engine.require_projects()
    project = await ctx.engine.project(inv.args["project"])
    purge = inv.flag("purge")
    kept = (
        f"the source at `{project.path}` moves to podbay's trash"
        if purge
        else f"the source at `{project.path}` is kept"
    )
    summary = (
        f"Delete project `{project.name}`? This cancels its agent runs and removes its "
        f"container, volume, SSH port {project.ssh_port} and keys; {kept}."
    )

    async def action() -> None:
        async def work(job: JobHandle) -> str:
            return await manager.delete(project.name, purge=purge, job=job)

        await ctx.reply(f"Deleting `{project.name}`…", "progress")
        await ctx.start_job(project.name, "delete", work)

    await ctx.propose(summary, action)


async def cmd_restart(ctx: CommandContext, inv: Invocation) -> None:
    manager = ctx.engine.require_projects()
    project = await ctx.engine.project(inv.args["project"])
    await manager.require_container(project.name)  # said at once, not as a failed job

    async def work(job: JobHandle) -> str:
        await manager.restart(project.name, job)
        return f"Restarted `{project.name}`; SSH is answering on port {project.ssh_port}."

    await ctx.start_job(project.name, "restart", work)


async def cmd_rebuild(ctx: CommandContext, inv: Invocation) -> None:
    manager = ctx.engine.require_projects()
    project = await ctx.engine.project(inv.args["project"])
    progress = ctx.progress()

    async def work(job: JobHandle) -> str:
        return await manager.rebuild(project.name, job, progress.update)

    await ctx.start_job(project.name, "rebuild", work)


async def cmd_ssh(ctx: CommandContext, inv: Invocation) -> None:
    manager = ctx.engine.require_projects()
    project = await ctx.engine.project(inv.args["project"])
    target = await manager.ssh_target(project)
    await manager.require_container(project.name)
    # Connection details are for whoever asked (ephemeral where the platform has it).
    await ctx.reply(connection_info(target), private=True)


async def cmd_logs(ctx: CommandContext, inv: Invocation) -> None:
    project = await ctx.engine.project(inv.args["project"])
    raw = inv.opt("n") or "50"
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise UserError(f"-n takes a number of lines from 1 to 1000, got {raw[:10]!r}.")
    text = (await ctx.engine.container_logs(project.name, int(raw))).strip("\n")
    await ctx.reply(f"Last {raw} log lines of `{project.name}`:\n{code_block(text or '(empty)')}")


def register(registry: Registry) -> None:
    registry.add(
        CommandSpec(
            "new project",
            "create a project with its own container and SSH access",
            cmd_new_project,
            kind="job",
            role=Role.OPERATOR,
            positionals=(Positional("name"),),
            options=(
                Option("stack", "S", help="rust, node, go, python, ruby or jvm (default: detect)"),
                Option("git", "URL", help="clone this repository (https, ssh or user@host:path)"),
                Option("path", "DIR", help="host directory for the source"),
                Option("cpus", "N", help="CPU limit"),
                Option("memory", "SIZE", help="memory limit, e.g. 4g"),
                Option("token", "T", help="git push token (private chats only)", secret=True),
            ),
        )
    )
    registry.add(
        CommandSpec(
            "delete",
            "remove a project's container and keys (keeps the source)",
            cmd_delete,
            kind="job",
            role=Role.ADMIN,
            positionals=(Positional("project"),),
            options=(Option("purge", help="also move the source to podbay's trash"),),
        )
    )
    registry.add(
        CommandSpec(
            "restart",
            "restart a project's container",
            cmd_restart,
            kind="job",
            role=Role.OPERATOR,
            positionals=(Positional("project"),),
        )
    )
    registry.add(
        CommandSpec(
            "rebuild",
            "rebuild the image if its inputs changed and recreate the container",
            cmd_rebuild,
            kind="job",
            role=Role.OPERATOR,
            positionals=(Positional("project"),),
        )
    )
    registry.add(
        CommandSpec(
            "ssh",
            "show how to connect an editor to a project",
            cmd_ssh,
            role=Role.OPERATOR,
            positionals=(Positional("project"),),
        )
    )
    registry.add(
        CommandSpec(
            "logs",
            "show a project's container log",
            cmd_logs,
            role=Role.OPERATOR,
            positionals=(Positional("project"),),
            options=(Option("n", "N", short="n", help="how many lines (default 50)"),),
        )
    )
