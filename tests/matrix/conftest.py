"""Fixtures shared by the Matrix tests: a real Synapse per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from synapse_server import SynapseServer


@pytest.fixture
async def synapse(tmp_path: Path) -> AsyncIterator[SynapseServer]:
    server = SynapseServer(tmp_path / "synapse")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
