"""Start-up never waits for container stats; a relative --data-dir works end to end."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from docker_support import (
    DM,
    DockerHarness,
    ca_toml,
    container_settings,
    remove_instance_containers,
)
from fakes.agent import FakeAgent
from fakes.transport import MemoryTransport

from podbay.bot import Podbay
from podbay.engine.lifecycle import instance_id


async def test_start_answers_first_message_before_any_stats_call_returns(
    dh: DockerHarness,
) -> None:
    for name in ("s1", "s2", "s3", "s4"):
        await dh.ask(f"new project {name}", "is ready")
    settings = dh.settings.model_copy(
        update={"docker": dh.settings.docker.model_copy(update={"stats_interval_s": 3600})}
    )
    await dh.bot.stop()

    transport = MemoryTransport()
    bot = Podbay(settings, transports=[transport], agent=FakeAgent(auto_release=0.0))
    provisioner = bot._provisioner
    assert provisioner is not None
    real_stats = provisioner.stats
    started: list[str] = []
    finished: list[str] = []
    gate = asyncio.Event()  # stats calls are held until the first reply has been seen

    async def held_stats(name: str) -> Any:
        started.append(name)
        await gate.wait()
        sample = await real_stats(name)
        finished.append(name)
        return sample

    provisioner.stats = held_stats  # type: ignore[method-assign]
    # If start-up awaited a stats sample it would never return: the gate is still closed.
    await asyncio.wait_for(bot.start(), 30)
    try:
        # Fresh platform ids: the first bot already used m1.. in this inbox.
        await transport.say("whoami", session=DM, user="alice", direct=True, platform_id="w1")
        await transport.wait_for_text("admin", session=DM, timeout=60)
        assert finished == []

        gate.set()
        manager = bot.engine.projects  # type: ignore[union-attr]
        assert manager is not None
        deadline = asyncio.get_running_loop().time() + 60
        while len(manager.stats_cache) < 4:  # no event to wait on: a background cycle
            assert asyncio.get_running_loop().time() < deadline, manager.stats_cache
            await asyncio.sleep(0.05)
        assert sorted(finished) == sorted(started)
        assert len(set(started)) == 4

        since = len(transport.sent)
        await transport.say("status", session=DM, user="alice", direct=True, platform_id="w2")
        status = await transport.wait_for_text("s4", session=DM, timeout=60, since=since)
        lines = [line for line in status.splitlines() if re.match(r"• `s[1-4]`", line)]
        assert len(lines) == 4, status
        for line in lines:
            assert re.search(r"mem [0-9.]+[BKMG] \(sampled \d+s ago\)", line), line
    finally:
        await bot.stop()


def _run(
    cwd: Path, env: dict[str, str], *args: str, stdin: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "podbay", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=600,
        check=False,
    )


def test_relative_data_dir_creates_a_project(docker_engine: None, tmp_path: Path) -> None:
    settings = container_settings(tmp_path)
    work = tmp_path / "cwd"
    work.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(
        '[projects]\nroot = "relprojects"\n'
        f'[docker]\nnetwork = "host"\nname_prefix = "{settings.docker.name_prefix}"\n'
        + ca_toml()
        + '[git]\nuser_name = "Rel Dev"\nuser_email = "rel@example.org"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODBAY_")}
    env |= {"PODBAY_CONFIG": str(config), "PYTHONPATH": str(Path.cwd())}
    data_dir = (work / "reldata").resolve()
    try:
        created = _run(work, env, "--data-dir", "reldata", "chat", stdin="new project x\n")
        assert created.returncode == 0, created.stderr
        assert "x is ready" in created.stdout, created.stdout + created.stderr
        assert (data_dir / "podbay.db").exists()
        # Relative configured paths are resolved against the start directory too.
        assert (work / "relprojects" / "x").is_dir()
        assert str(data_dir / "keys" / "x") in created.stdout

        status = _run(work, env, "--data-dir", "reldata", "status", stdin="")
        assert "x · base · running" in status.stdout, status.stdout + status.stderr
    finally:
        remove_instance_containers(instance_id(data_dir), settings)


async def test_a_stalled_stats_read_keeps_its_previous_sample_and_the_cycle_still_ends(
    dh: DockerHarness,
) -> None:
    await dh.ask("new project quick", "is ready")
    await dh.ask("new project stuck", "is ready")
    manager = dh.manager
    await manager.sample_stats()
    first = dict(manager.stats_cache)
    assert set(first) == {"quick", "stuck"}
    # One read cannot give CPU use: that is the change between two samples.
    assert first["quick"].cpu_percent is None

    real_stats = manager.docker.stats
    never = asyncio.Event()
    stuck_reads: list[str] = []

    async def stall_one(name: str) -> Any:
        if name.endswith("stuck"):
            stuck_reads.append(name)
            await never.wait()
        return await real_stats(name)

    manager.docker.stats = stall_one  # type: ignore[method-assign]
    await manager.sample_stats(timeout_s=5.0)
    second = manager.stats_cache
    assert second["stuck"] == first["stuck"]  # kept, with its old age
    assert second["quick"].sampled_at > first["quick"].sampled_at
    assert second["quick"].cpu_percent is not None and second["quick"].cpu_percent >= 0
    # The next cycle does not stack another read on the one still hanging.
    await manager.sample_stats(timeout_s=5.0)
    assert len(stuck_reads) == 1
    assert manager.stats_cache["stuck"] == first["stuck"]

    since = len(dh.transport.sent)
    await dh.say("status")
    status = await dh.transport.wait_for_text("stuck", session=DM, timeout=60, since=since)
    assert re.search(r"`quick` · .* · cpu \d+% mem \S+ \(sampled \d+s ago\)", status), status
    never.set()  # the abandoned read ends; its outcome is consumed, nothing is reported
