"""Git on the host: hardened clone, init, and a short summary for status."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from podbay.errors import EngineError, UserError

# Git variables the operator may set on purpose (a CA bundle, an ssh key); every other
# GIT_* variable (GIT_DIR, GIT_CONFIG_*, ...) could redirect what podbay's git does.
_KEPT_GIT_VARS = {"GIT_SSL_CAINFO", "GIT_SSL_CAPATH", "GIT_SSH_COMMAND"}


def _git_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PODBAY_") and (not k.startswith("GIT_") or k in _KEPT_GIT_VARS)
    }
    env["GIT_TERMINAL_PROMPT"] = "0"  # never wait for a password nobody can type
    env["GIT_ASKPASS"] = "true"
    env["SSH_ASKPASS"] = "true"
    env.setdefault("GIT_SSH_COMMAND", "ssh")
    # Never prompt, even through a user-supplied ssh command.
    env["GIT_SSH_COMMAND"] += " -o BatchMode=yes"
    return env


async def _git(*args: str, cwd: Path | None = None, timeout_s: float = 60) -> str:
    proc = await asyncio.create_subprocess_exec(
        "git",
        # Sources are owned by the container user while podbay may run as root.
        "-c",
        "safe.directory=*",
        *args,
        cwd=cwd,
        env=_git_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise UserError(f"git {_verb(args)} timed out after {int(timeout_s)} s") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in err.decode(errors="replace").splitlines() if ln.strip()]
        raise UserError(f"git {_verb(args)} failed: {' '.join(lines)[:400]}")
    return out.decode(errors="replace")


def _verb(args: tuple[str, ...]) -> str:
    """The git subcommand among ``args`` (skipping ``-c key=value`` pairs)."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "-c":
            skip = True
        elif not arg.startswith("-"):
            return arg
    return "command"


async def clone(url: str, dest: Path, timeout_s: float) -> None:
    """Clone ``url`` into the existing empty ``dest``: no local/ext transports, no submodules."""
    await _git(
        "-c",
        "protocol.file.allow=never",
        "-c",
        "protocol.ext.allow=never",
        "-c",
        "core.hooksPath=/dev/null",
        "clone",
        "--no-recurse-submodules",
        "--",
        url,
        str(dest),
        timeout_s=timeout_s,
    )


async def init(dest: Path) -> None:
    await _git("init", "--quiet", str(dest))


async def global_identity() -> tuple[str, str]:
    """The host's global git user.name/user.email ('' when unset)."""
    values = []
    for key in ("user.name", "user.email"):
        try:
            values.append((await _git("config", "--global", "--get", key)).strip())
        except (UserError, EngineError, OSError):
            values.append("")
    return values[0], values[1]


@dataclass(frozen=True)
class GitSummary:
    remote: str
    branch: str
    dirty: int


async def summary(path: Path) -> GitSummary | None:
    if not (path / ".git").exists():
        return None
    try:
        remote = (await _git("config", "--get", "remote.origin.url", cwd=path)).strip()
    except UserError:
        remote = ""
    try:
        branch = (await _git("rev-parse", "--abbrev-ref", "HEAD", cwd=path)).strip()
    except UserError:
        branch = "(no commits)"
    try:
        dirty = len((await _git("status", "--porcelain", cwd=path)).splitlines())
    except UserError:
        dirty = 0
    return GitSummary(remote, branch, dirty)
