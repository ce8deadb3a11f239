"""Fixtures for tests against the real Docker engine.

`./scripts/test` starts dockerd and imports the offline base image first (scripts/ensure-docker);
if no engine answers here, these tests FAIL with the reason rather than skip.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from docker_support import DockerHarness, container_settings, remove_instance_containers
from fakes.agent import FakeAgent
from fakes.transport import MemoryTransport

from podbay.bot import Podbay


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[None]:
    from docker.client import DockerClient

    try:
        client = DockerClient.from_env(timeout=10)
        client.ping()
        client.images.get("debian:bookworm-slim")
    except Exception as exc:
        pytest.fail(
            f"Docker engine or base image not available ({exc}); run ./scripts/ensure-docker "
            "(./scripts/test does this) — container tests must run, not skip."
        )
    client.close()
    yield


@pytest.fixture
def docker_options() -> dict[str, object]:
    return {}


@pytest.fixture
async def dh(
    docker_engine: None, tmp_path: Path, docker_options: dict[str, object]
) -> AsyncIterator[DockerHarness]:
    settings = container_settings(tmp_path, **docker_options)
    (tmp_path / "projects").mkdir()
    transport = MemoryTransport()
    agent = FakeAgent(auto_release=0.0)
    bot = Podbay(settings, transports=[transport], agent=agent, shutdown_grace_s=1)
    await bot.start()
    harness = DockerHarness(settings, bot, transport, agent, tmp_path / "projects")
    try:
        yield harness
    finally:
        manager = harness.manager
        await bot.stop()
        await asyncio.to_thread(remove_instance_containers, manager.instance, settings)
