"""Per-project SSH: keypairs, port allocation and connection instructions for editors."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Iterable
from pathlib import Path

from podbay.engine.procs import ProcessTracker
from podbay.errors import EngineError, UserError

SSH_USER = "dev"


async def generate_keypair(path: Path, comment: str, *, procs: ProcessTracker | None = None) -> str:
    """Write an ed25519 keypair (private key 0600) and return the public key line."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in (path, path.with_name(path.name + ".pub")):
        stale.unlink(missing_ok=True)
    if procs is not None:
        done = await procs.run(
            "ssh-keygen",
            *("-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)),
            kind="ssh-keygen",
            detail=f"ssh-keygen {comment}",
            merge_stderr=True,
        )
        if done.returncode != 0:
            said = done.stdout.decode(errors="replace").strip()[:300]
            raise EngineError(f"ssh-keygen failed: {said}")
        os.chmod(path, 0o600)
        return path.with_name(path.name + ".pub").read_text().strip()
    proc = await asyncio.create_subprocess_exec(
        "ssh-keygen",
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-C",
        comment,
        "-f",
        str(path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise EngineError(f"ssh-keygen failed: {out.decode(errors='replace').strip()[:300]}")
    os.chmod(path, 0o600)
    return path.with_name(path.name + ".pub").read_text().strip()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def allocate_port(low: int, high: int, taken: Iterable[int]) -> int:
    """The first port in [low, high] that is neither registered nor bound on 127.0.0.1."""
    used = set(taken)
    for port in range(low, high + 1):
        if port not in used and port_is_free(port):
            return port
    raise UserError(
        f"No free SSH port left in {low}-{high}: delete a project or widen "
        "`projects.ssh_port_range` in the config."
    )


async def wait_for_port(port: int, timeout_s: float, host: str = "127.0.0.1") -> bool:
    """True once something accepts a TCP connection (and speaks SSH) on ``port``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.1)
            continue
        try:
            banner = await asyncio.wait_for(reader.readline(), 2)
        except (OSError, TimeoutError):
            banner = b""
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if banner.startswith(b"SSH-"):
            return True
        await asyncio.sleep(0.1)
    return False


def host_alias(project: str) -> str:
    return f"podbay-{project}"


def ssh_command(project: str, port: int, key: Path) -> str:
    return f"ssh -i {key} -p {port} {SSH_USER}@127.0.0.1"


def ssh_config_block(project: str, port: int, key: Path) -> str:
    return "\n".join(
        [
            f"Host {host_alias(project)}",
            "  HostName 127.0.0.1",
            f"  Port {port}",
            f"  User {SSH_USER}",
            f"  IdentityFile {key}",
            "  IdentitiesOnly yes",
            "  StrictHostKeyChecking accept-new",
        ]
    )


def connection_info(project: str, port: int, key: Path) -> str:
    """Markdown: the ssh command, a config block and one line per editor."""
    alias = host_alias(project)
    return "\n".join(
        [
            f"SSH: `{ssh_command(project, port, key)}`",
            "Add to `~/.ssh/config` (or run `podbay ssh-config`):",
            "```",
            ssh_config_block(project, port, key),
            "```",
            f"• VS Code: Remote-SSH → Connect to Host → `{alias}`, open `/workspace`",
            f"• JetBrains Gateway: SSH connection `{alias}` (port {port}), project `/workspace`",
            f'• Zed: `zed ssh://{alias}/workspace` (or "Open Remote Project")',
            f"• Neovim: `nvim scp://{alias}//workspace/` · Emacs TRAMP: `/ssh:{alias}:/workspace/`",
        ]
    )
