from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from fakes.agent import FakeAgent
from fakes.harness import Harness
from fakes.transport import MemoryTransport
from hypothesis import settings as hypothesis_settings

from podbay.commands.catalog import build_registry
from podbay.commands.registry import Registry
from podbay.config import Settings
from podbay.dispatcher import Dispatcher
from podbay.engine.core import Engine
from podbay.engine.store import Store

# CI runs every property test on the same examples: a clean clone has no example database,
# and a run must not pass or fail by the luck of the draw. Locally, Hypothesis explores.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

# A callback that holds the event loop longer than this fails the test.
BLOCK_LIMIT_S = float(os.environ.get("PODBAY_TEST_BLOCK_LIMIT_S", "0.1"))


class _GcClock:
    """Total time spent in garbage collection: a full collection after a hypothesis
    run can take 100+ ms, which is the interpreter's pause, not podbay blocking."""

    def __init__(self) -> None:
        self.total = 0.0
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._started


_GC = _GcClock()


@pytest.fixture
async def _event_loop_watchdog() -> AsyncIterator[None]:
    loop = asyncio.get_running_loop()
    stalls: list[tuple[float, float]] = []
    tick = 0.01

    async def watch() -> None:
        while True:
            before, cpu_before, gc_before = loop.time(), time.thread_time(), _GC.total
            await asyncio.sleep(tick)
            in_gc = _GC.total - gc_before
            lag = loop.time() - before - tick - in_gc
            cpu = time.thread_time() - cpu_before - in_gc
            # A stall counts when the loop thread itself was busy (CPU) or waited in a
            # blocking call for long; a short stall with no CPU is the machine
            # descheduling us (2 cores shared with dockerd), not podbay blocking.
            if lag > BLOCK_LIMIT_S and (cpu > lag / 2 or lag > 5 * BLOCK_LIMIT_S):
                stalls.append((lag, cpu))

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if stalls:
        lag, cpu = max(stalls)
        pytest.fail(
            f"event loop blocked {len(stalls)} time(s), worst {lag * 1000:.0f} ms "
            f"({cpu * 1000:.0f} ms of it on the CPU)"
        )


@pytest.fixture(autouse=True)
def event_loop_never_blocks(request: pytest.FixtureRequest) -> None:
    """Async tests fail if anything blocks the event loop for more than BLOCK_LIMIT_S."""
    if inspect.iscoroutinefunction(getattr(request.node, "obj", None)):
        request.getfixturevalue("_event_loop_watchdog")


@pytest.fixture
def settings(tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Test settings; ``@pytest.mark.dispatcher(key=value)`` overrides [dispatcher] keys."""
    dispatcher: dict[str, int] = {
        "coalesce_window_ms": 100,
        "max_window_ms": 1000,
        "max_queued_messages": 20,
        "max_concurrent_runs": 4,
        # One test user often sends hundreds of messages; the limit has tests of its own.
        "rate_limit_per_minute": 0,
    }
    marker = request.node.get_closest_marker("dispatcher")
    if marker is not None:
        dispatcher.update(marker.kwargs)
    return Settings(
        data_dir=tmp_path / "data",
        access={
            "admins": ["memory:alice", "console:*"],
            "operators": ["memory:bob"],
            "viewers": ["memory:victor"],
        },
        dispatcher=dispatcher,
    )


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent()


@pytest.fixture
def registry(settings: Settings) -> Registry:
    return build_registry(settings.bot.name)


@pytest.fixture
async def harness(
    settings: Settings, agent: FakeAgent, registry: Registry
) -> AsyncIterator[Harness]:
    store = await Store.open(settings.data_dir / "podbay.db")
    engine = Engine(store, settings, agent=agent)
    dispatcher = Dispatcher(engine, registry, settings)
    # Every message a test submits is followed by a check of the dispatcher's invariants.
    transport = MemoryTransport(after_submit=lambda: _check_invariants(dispatcher))
    dispatcher.attach(transport)
    await transport.start(dispatcher.submit)
    await dispatcher.recover()
    try:
        yield Harness(settings, store, engine, dispatcher, transport, agent, registry)
        _check_invariants(dispatcher)
    finally:
        for run in agent.runs:
            run.release.set()
        await dispatcher.shutdown(grace_s=2)
        await store.close()


def _check_invariants(dispatcher: Dispatcher) -> None:
    problems = dispatcher.invariant_violations()
    assert problems == [], f"dispatcher invariants broken: {problems}"


@pytest.fixture
def project_root() -> Iterator[Path]:
    yield Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_logging() -> Iterator[None]:
    """_setup_logging configures the root logger: give it back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    podbay_level = logging.getLogger("podbay").level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    logging.getLogger("podbay").setLevel(podbay_level)
