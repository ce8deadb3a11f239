"""A controllable in-memory agent that also checks the dispatcher's invariants."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from podbay.engine.agents import AgentEvent, FinishedEvent, RunRequest, TextEvent


@dataclass
class FakeRun:
    agent: FakeAgent
    request: RunRequest
    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False
    done: bool = False
    fail: bool = False

    def __aiter__(self) -> AsyncIterator[AgentEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[AgentEvent]:
        agent = self.agent
        session = self.request.session
        agent.active[session] += 1
        agent.global_active += 1
        agent.max_global = max(agent.max_global, agent.global_active)
        if agent.active[session] > 1:
            agent.violations.append(f"two runs at once in {session}")
        try:
            self.started.set()
            agent.started.put_nowait(self)
            if agent.auto_release is None:
                await self.release.wait()
            else:
                await asyncio.sleep(random.uniform(0, agent.auto_release))
            if agent.script is not None:
                for event in agent.script:
                    yield event
                return
            yield TextEvent(f"echo: {self.request.prompt}")
            if self.fail:
                yield FinishedEvent(ok=False, exit_code=3, error="it broke")
            else:
                yield FinishedEvent(ok=True, exit_code=0)
        finally:
            agent.active[session] -= 1
            if not agent.active[session]:
                del agent.active[session]
            agent.global_active -= 1
            self.done = True

    async def cancel(self) -> None:
        self.cancelled = True
        self.agent.cancelling.set()
        if self.agent.cancel_gate is not None:
            await self.agent.cancel_gate.wait()


class FakeAgent:
    """Runs block until released (``auto_release=None``) or finish after a random delay."""

    name = "fake"

    def __init__(self, auto_release: float | None = None) -> None:
        self.auto_release = auto_release
        self.runs: list[FakeRun] = []
        self.started: asyncio.Queue[FakeRun] = asyncio.Queue()
        self.active: Counter[str] = Counter()
        self.global_active = 0
        self.max_global = 0
        self.violations: list[str] = []
        # Set when a cancel begins; a cancel waits for ``cancel_gate`` when one is set, so a
        # test can act while a cancellation is under way.
        self.cancelling = asyncio.Event()
        self.cancel_gate: asyncio.Event | None = None
        # When set, every run yields exactly these events (tools, notices, a finish).
        self.script: list[AgentEvent] | None = None

    def run(self, request: RunRequest) -> FakeRun:
        run = FakeRun(self, request)
        self.runs.append(run)
        return run

    async def next_started(self, timeout: float = 10.0) -> FakeRun:
        return await asyncio.wait_for(self.started.get(), timeout)

    def forget(self) -> None:
        """Drop the record of finished runs (benchmarks measure what podbay retains)."""
        self.runs.clear()
        while not self.started.empty():
            self.started.get_nowait()

    def prompts(self) -> list[str]:
        return [r.request.prompt for r in self.runs]
