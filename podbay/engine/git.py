"""Git on the host, only for folders podbay just made (clone, init) before any container runs
there; plus the parser of the status that is read inside the container."""

from __future__ import annotations

import asyncio
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from podbay.engine.procs import ProcessTracker
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


async def _git(
    *args: str,
    cwd: Path | None = None,
    timeout_s: float = 60,
    procs: ProcessTracker | None = None,
) -> str:
    if procs is not None:
        # Recorded and killed as a whole tree (git-remote-https included), so an orphaned
        # clone can never outlive podbay and later delete a re-created project's .git.
        try:
            done = await procs.run(
                "git",
                *args,
                kind="git",
                detail=f"git {_verb(args)}",
                cwd=cwd,
                env=_git_env(),
                timeout_s=timeout_s,
            )
        except TimeoutError:
            raise UserError(f"git {_verb(args)} timed out after {int(timeout_s)} s") from None
        if done.returncode != 0:
            said = done.stderr.decode(errors="replace")
            lines = [ln.strip() for ln in said.splitlines() if ln.strip()]
            raise UserError(f"git {_verb(args)} failed: {' '.join(lines)[:400]}")
        return done.stdout.decode(errors="replace")
    proc = await asyncio.create_subprocess_exec(
        "git",
        # No safe.directory override: git's ownership check keeps host git out of trees
        # the container user owns (their .git/config could run anything as podbay).
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


async def clone(
    url: str,
    dest: Path,
    timeout_s: float,
    *,
    procs: ProcessTracker | None = None,
    credentials: Path | None = None,
) -> None:
    """Clone ``url`` into the existing empty ``dest``: no local/ext transports, no submodules.

    ``credentials`` is a git credential-store file: the password reaches git through the
    helper reading that file, never through argv, the environment or the URL.
    """
    helper: tuple[str, ...] = ()
    if credentials is not None:
        # The empty helper first resets any helper from the host's config. Answer "get"
        # only: a failed attempt must not make credential-store erase the stored line.
        store = f"git credential-store --file={shlex.quote(str(credentials))} get"
        helper = (
            "-c",
            "credential.helper=",
            "-c",
            f'credential.helper=!f() {{ if [ "$1" = get ]; then {store}; fi; }}; f',
        )
    await _git(
        *helper,
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
        procs=procs,
    )


async def init(dest: Path, *, procs: ProcessTracker | None = None) -> None:
    await _git("init", "--quiet", str(dest), procs=procs)


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
    branch: str
    dirty: int
    ahead: int = 0
    behind: int = 0


def parse_status_v2(text: str) -> GitSummary:
    """Read ``git status --porcelain=v2 --branch`` output (run inside the container)."""
    branch, oid, dirty, ahead, behind = "", "", 0, 0, 0
    for line in text.splitlines():
        if line.startswith("# branch.head "):
            branch = line.removeprefix("# branch.head ").strip()
        elif line.startswith("# branch.oid "):
            oid = line.removeprefix("# branch.oid ").strip()
        elif line.startswith("# branch.ab "):
            parts = line.split()
            ahead, behind = abs(int(parts[2])), abs(int(parts[3]))
        elif line and not line.startswith("#"):
            dirty += 1
    if oid == "(initial)":
        branch = f"{branch} (no commits)"
    return GitSummary(branch or "(unknown)", dirty, ahead, behind)
