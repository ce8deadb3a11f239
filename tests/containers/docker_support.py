"""Helpers for tests against the real Docker engine (fixtures are in conftest.py).

`./scripts/test` starts dockerd and imports the offline base image first (scripts/ensure-docker);
if no engine answers here, these tests FAIL with the reason rather than skip.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fakes.agent import FakeAgent
from fakes.transport import MemoryTransport

from podbay.bot import Podbay
from podbay.config import Settings
from podbay.dispatcher import Dispatcher
from podbay.engine.core import Engine
from podbay.engine.lifecycle import ProjectManager
from podbay.engine.stacks import dev_ids
from podbay.engine.store import Store
from podbay.messages import SessionKey

DM = SessionKey("memory", "dm-alice")


@dataclass
class DockerHarness:
    settings: Settings
    bot: Podbay
    transport: MemoryTransport
    agent: FakeAgent
    projects_root: Path

    @property
    def store(self) -> Store:
        assert self.bot.store is not None
        return self.bot.store

    @property
    def engine(self) -> Engine:
        assert self.bot.engine is not None
        return self.bot.engine

    @property
    def dispatcher(self) -> Dispatcher:
        assert self.bot.dispatcher is not None
        return self.bot.dispatcher

    @property
    def manager(self) -> ProjectManager:
        assert self.engine.projects is not None
        return self.engine.projects

    async def say(self, text: str, *, user: str = "alice", direct: bool = True) -> None:
        await self.transport.say(text, session=DM, user=user, direct=direct)

    async def ask(self, text: str, expect: str, timeout: float = 300) -> str:
        """Send ``text``; return the first later reply containing ``expect``."""
        since = len(self.transport.sent)
        await self.say(text)
        return await self.transport.wait_for_text(expect, session=DM, timeout=timeout, since=since)


def local_ca_certs() -> list[Path]:
    """CAs this machine added locally (a TLS-intercepting proxy here): builds must trust
    them to reach npm, exactly as an operator on this network would configure podbay."""
    return sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))


def ca_toml() -> str:
    return "extra_ca_certs = [" + ", ".join(f'"{p}"' for p in local_ca_certs()) + "]\n"


def container_settings(tmp_path: Path, **docker: object) -> Settings:
    prefix = f"pbt{secrets.token_hex(3)}-"
    return Settings(
        data_dir=tmp_path / "data",
        access={"admins": ["memory:alice"], "operators": ["memory:bob"]},
        dispatcher={"coalesce_window_ms": 50, "max_window_ms": 500},
        projects={"root": tmp_path / "projects", "ssh_port_range": (2200, 2299)},
        docker={
            "network": "host",
            "name_prefix": prefix,
            "ready_timeout_s": 60,
            "reconcile_interval_s": 3600,
            "stats_interval_s": 3600,
            "extra_ca_certs": local_ca_certs(),
            **docker,
        },
        git={"user_name": "Test Dev", "user_email": "dev@example.org"},
    )


def remove_instance_containers(instance: str, settings: Settings) -> None:
    """Remove what a test's podbay created (and only that)."""
    from docker.client import DockerClient

    client = DockerClient.from_env(timeout=60)
    try:
        for container in client.containers.list(
            all=True, filters={"label": f"podbay.instance={instance}"}
        ):
            container.remove(force=True, v=True)
        for volume in client.volumes.list():
            if volume.name.startswith(settings.docker.name_prefix):
                volume.remove(force=True)
    finally:
        client.close()


def ssh(
    key: Path, port: int, command: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The real OpenSSH client, as an editor would use it."""
    return subprocess.run(
        [
            "ssh",
            "-i",
            str(key),
            "-p",
            str(port),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "IdentitiesOnly=yes",
            "dev@127.0.0.1",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "HOME": str(key.parent)},
    )


def expected_uid() -> int:
    return dev_ids()[0]
