"""The in-memory podbay used by dispatcher and command tests (built by tests/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass

from fakes.agent import FakeAgent
from fakes.transport import MemoryTransport
from podbay.commands.registry import Registry
from podbay.config import Settings
from podbay.dispatcher import Dispatcher
from podbay.engine.core import Engine
from podbay.engine.store import Store


@dataclass
class Harness:
    settings: Settings
    store: Store
    engine: Engine
    dispatcher: Dispatcher
    transport: MemoryTransport
    agent: FakeAgent
    registry: Registry
