"""podbay pins every host key it makes: the printed `ssh` command and the ssh-config block log
in with StrictHostKeyChecking=yes, first time and after delete and re-create on the same port."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from docker_support import DockerHarness, container_settings, remove_instance_containers
from fakes.agent import FakeAgent
from fakes.transport import MemoryTransport

from podbay.bot import Podbay


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def one_port(docker_engine: None, tmp_path: Path) -> AsyncIterator[DockerHarness]:
    """A podbay whose SSH port range is a single port: every project gets that port."""
    settings = container_settings(tmp_path)
    port = free_port()
    settings = settings.model_copy(
        update={"projects": settings.projects.model_copy(update={"ssh_port_range": (port, port)})}
    )
    (tmp_path / "projects").mkdir()
    transport = MemoryTransport()
    bot = Podbay(settings, transports=[transport], agent=FakeAgent(), shutdown_grace_s=1)
    await bot.start()
    harness = DockerHarness(settings, bot, transport, FakeAgent(), tmp_path / "projects")
    try:
        yield harness
    finally:
        instance = harness.manager.instance
        await bot.stop()
        await asyncio.to_thread(remove_instance_containers, instance, settings)


def strict_env(home: Path) -> dict[str, str]:
    # A scratch HOME: nothing in the user's own ~/.ssh may help or hurt.
    home.mkdir(exist_ok=True)
    return {**os.environ, "HOME": str(home)}


def run_printed_command(reply: str, home: Path, command: str) -> subprocess.CompletedProcess[str]:
    """The `ssh ...` line of the reply, as a user pastes it, with strict host key checking."""
    found = re.search(r"SSH: `([^`]+)`", reply)
    assert found, reply
    argv = shlex.split(found.group(1))
    assert argv[0] == "ssh"
    strict = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
    return subprocess.run(
        [argv[0], *strict, *argv[1:], command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=strict_env(home),
    )


def run_config_block(
    reply: str, home: Path, alias: str, command: str
) -> subprocess.CompletedProcess[str]:
    """The ssh-config block of the reply as the only ssh config, via its Host alias."""
    found = re.search(r"```\n(Host .*?)\n```", reply, re.S)
    assert found, reply
    config = home / "config"
    home.mkdir(exist_ok=True)
    config.write_text(found.group(1) + "\n")
    return subprocess.run(
        [
            "ssh",
            "-F",
            str(config),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            alias,
            command,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=strict_env(home),
    )


def host_key(port: int) -> str:
    out = subprocess.run(
        ["ssh-keyscan", "-t", "ed25519", "-p", str(port), "127.0.0.1"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    ).stdout
    return out.split()[-1] if out.strip() else ""


async def test_printed_ssh_command_and_config_block_log_in_with_strict_host_key_checking(
    one_port: DockerHarness, tmp_path: Path
) -> None:
    dh = one_port
    reply = await dh.ask("new project demo", "is ready")
    row = await dh.store.project_get("demo")
    assert row is not None and row.ssh_port is not None
    alias = dh.manager.container_name("demo")
    home = tmp_path / "home"

    first = await asyncio.to_thread(run_printed_command, reply, home, "echo first")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "first"
    block = await asyncio.to_thread(run_config_block, reply, home, alias, "echo block")
    assert block.returncode == 0, block.stderr
    assert block.stdout.strip() == "block"
    known = dh.settings.data_dir / "ssh" / "known_hosts"
    assert f"{alias} ssh-ed25519 " in known.read_text()
    # The user's own known_hosts is never written to.
    assert not (home / ".ssh" / "known_hosts").exists()

    # Delete, and create a project of the same name on the same (only) port: a new host key.
    old_key = await asyncio.to_thread(host_key, row.ssh_port)
    await dh.ask("delete demo --purge", "Reply `confirm`")
    await dh.ask("confirm", "Deleted `demo`")
    assert alias not in known.read_text()
    again = await dh.ask("new project demo", "is ready")
    row2 = await dh.store.project_get("demo")
    assert row2 is not None and row2.ssh_port == row.ssh_port
    assert await asyncio.to_thread(host_key, row.ssh_port) != old_key

    second = await asyncio.to_thread(run_printed_command, again, home, "echo second")
    assert second.returncode == 0, second.stderr
    assert "CHANGED" not in second.stderr and second.stdout.strip() == "second"
    block2 = await asyncio.to_thread(run_config_block, again, home, alias, "echo block2")
    assert block2.returncode == 0, block2.stderr

    # The `ssh` command shows the same instructions (and writes known_hosts again if it was
    # removed by hand), and a rebuild keeps the host key.
    known.unlink()
    info = await dh.ask("ssh demo", "SSH:")
    assert f"{alias} ssh-ed25519 " in known.read_text()
    before = await asyncio.to_thread(host_key, row.ssh_port)
    await dh.ask("rebuild demo", "Rebuilt `demo`")
    assert await asyncio.to_thread(host_key, row.ssh_port) == before
    after = await asyncio.to_thread(run_printed_command, info, home, "echo rebuilt")
    assert after.returncode == 0, after.stderr


async def test_ssh_host_alias_comes_from_the_container_name_prefix(dh: DockerHarness) -> None:
    reply = await dh.ask("new project named", "is ready")
    prefix = dh.settings.docker.name_prefix
    assert prefix != "podbay-"
    assert f"Host {prefix}named\n" in reply
    assert f"`{prefix}named`" in reply and "podbay-named" not in reply
