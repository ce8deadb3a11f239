"""Per-project SSH: keypairs, port allocation and connection instructions for editors."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shlex
import socket
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
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


HOST_KEY_NAME = "ssh_host_ed25519_key"
# Where the entrypoint finds the host key podbay made for the project (read-only bind).
HOST_KEY_MOUNT = "/run/podbay/" + HOST_KEY_NAME


@dataclass(frozen=True)
class SshTarget:
    """Everything a client needs to reach one project's sshd without a trust prompt."""

    alias: str  # the `Host` name, also the HostKeyAlias in podbay's known_hosts
    port: int
    key: Path  # the client's private key
    known_hosts: Path | None  # podbay's known_hosts file; None: the host key is not known


def known_hosts_path(data_dir: Path) -> Path:
    return data_dir / "ssh" / "known_hosts"


def write_known_hosts(path: Path, entries: Iterable[tuple[str, str]]) -> None:
    """Replace ``path`` with one ``<alias> <key type> <key>`` line per (alias, public key).

    Lines are keyed by HostKeyAlias, not by 127.0.0.1:port: a port handed to a new project
    (with a new host key) can then never collide with what a client remembers for the old one.
    """
    lines = []
    for alias, public in entries:
        kind, _, rest = public.strip().partition(" ")
        blob = rest.split(" ", 1)[0]
        if kind and blob:
            lines.append(f"{alias} {kind} {blob}\n")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".known_hosts-")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(
                "# Written by podbay: one line per project (HostKeyAlias); edits are lost.\n"
            )
            handle.writelines(lines)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _quote_config(value: str) -> str:
    # ssh_config splits on whitespace; double quotes keep a path with spaces in one piece.
    return f'"{value}"' if any(c.isspace() for c in value) else value


def ssh_command(target: SshTarget) -> str:
    parts = ["ssh", "-i", shlex.quote(str(target.key)), "-p", str(target.port)]
    if target.known_hosts is not None:
        parts += [
            "-o",
            shlex.quote(f"UserKnownHostsFile={target.known_hosts}"),
            "-o",
            f"HostKeyAlias={target.alias}",
        ]
    parts.append(f"{SSH_USER}@127.0.0.1")
    return " ".join(parts)


def ssh_config_block(target: SshTarget) -> str:
    lines = [
        f"Host {target.alias}",
        "  HostName 127.0.0.1",
        f"  Port {target.port}",
        f"  User {SSH_USER}",
        f"  IdentityFile {_quote_config(str(target.key))}",
        "  IdentitiesOnly yes",
    ]
    if target.known_hosts is not None:
        # podbay made the host key, so the client needs no trust-on-first-use at all.
        lines += [
            f"  HostKeyAlias {target.alias}",
            f"  UserKnownHostsFile {_quote_config(str(target.known_hosts))}",
            "  StrictHostKeyChecking yes",
        ]
    else:
        lines.append("  StrictHostKeyChecking accept-new")
    return "\n".join(lines)


def connection_info(target: SshTarget) -> str:
    """Markdown: the ssh command, a config block and one line per editor."""
    alias = target.alias
    lines = [
        f"SSH: `{ssh_command(target)}`",
        "Add to `~/.ssh/config` (or run `podbay ssh-config`):",
        "```",
        ssh_config_block(target),
        "```",
        f"• VS Code: Remote-SSH → Connect to Host → `{alias}`, open `/workspace`",
        f"• JetBrains Gateway: SSH connection `{alias}` (port {target.port}), project `/workspace`",
        f'• Zed: `zed ssh://{alias}/workspace` (or "Open Remote Project")',
        f"• Neovim: `nvim scp://{alias}//workspace/` · Emacs TRAMP: `/ssh:{alias}:/workspace/`",
    ]
    if target.known_hosts is None:
        lines.append(
            "This project's host key is not pinned yet (it predates podbay pinning host "
            "keys): a `rebuild` gives it one that podbay knows."
        )
    return "\n".join(lines)
