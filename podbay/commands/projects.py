"""Project commands (engine jobs): new project, delete.

They validate everything before anything is created, then hand the work to the engine as a
background job. Without a container provisioner they say so.
"""

from __future__ import annotations

import re
from pathlib import Path

from podbay.commands.context import CommandContext
from podbay.commands.registry import CommandSpec, Invocation, Option, Positional, Registry
from podbay.commands.roles import Role
from podbay.engine.projects import validate_git_url, validate_name, validate_stack
from podbay.errors import UsageError, UserError

_MEMORY = re.compile(r"^\d+(\.\d+)?[kmg]?b?$", re.IGNORECASE)


def _validate_new(inv: Invocation) -> None:
    validate_name(inv.args["name"])
    if (stack := inv.opt("stack")) is not None:
        validate_stack(stack)
    if (url := inv.opt("git")) is not None:
        validate_git_url(url)
    if (path := inv.opt("path")) is not None and not Path(path).expanduser().is_absolute():
        raise UserError(f"--path must be absolute (e.g. /home/me/code/app), got {path[:80]!r}.")
    if (cpus := inv.opt("cpus")) is not None:
        try:
            ok = 0 < float(cpus) <= 256
        except ValueError:
            ok = False
        if not ok:
            raise UsageError(f"--cpus takes a positive number such as 2 or 0.5, got {cpus[:20]!r}.")
    if (memory := inv.opt("memory")) is not None and not _MEMORY.match(memory):
        raise UsageError(f"--memory takes a size such as 512m or 4g, got {memory[:20]!r}.")


async def cmd_new_project(ctx: CommandContext, inv: Invocation) -> None:
    _validate_new(inv)
    name = inv.args["name"]
    if await ctx.engine.store.project_get(name) is not None:
        raise UserError(f"A project named `{name}` already exists; pick another name.")
    ctx.engine.require_provisioner()
    raise UserError("Project creation is not available in this build.")


async def cmd_delete(ctx: CommandContext, inv: Invocation) -> None:
    project = await ctx.engine.project(inv.args["project"])
    ctx.engine.require_provisioner()
    raise UserError(f"Deleting `{project.name}` is not available in this build.")


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
