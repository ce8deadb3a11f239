"""A project whose container was removed behind podbay's back: every command says so and
names the fix; `rebuild` recreates it. No internal error or traceback reaches the user."""

from __future__ import annotations

import asyncio
import subprocess

from docker_support import DM, DockerHarness, ssh


async def test_ssh_restart_and_logs_of_a_missing_container_say_rebuild_recreates_it(
    dh: DockerHarness,
) -> None:
    await dh.ask("new project nest", "is ready")
    name = dh.manager.container_name("nest")
    await asyncio.to_thread(
        subprocess.run, ["docker", "rm", "-f", name], check=True, capture_output=True
    )
    since = len(dh.transport.sent)
    for command in ("ssh nest", "restart nest", "logs nest"):
        reply = await dh.ask(command, "rebuild nest")
        assert "container of `nest` is missing" in reply, (command, reply)
    await dh.dispatcher.drain()
    said = [r.text for s, r in dh.transport.sent[since:] if s == DM]
    assert not [t for t in said if "internal error" in t or "ref `" in t or "Traceback" in t]
    assert not [t for t in said if "SSH: `ssh" in t], "no instructions for a missing container"

    await dh.ask("rebuild nest", "Rebuilt `nest`")
    row = await dh.store.project_get("nest")
    assert row is not None and row.ssh_port is not None
    result = await asyncio.to_thread(ssh, dh.manager.key_path("nest"), row.ssh_port, "echo back")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "back"
    await dh.ask("logs nest", "log lines of `nest`")
