"""Wiring: store, engine, registry, dispatcher and transports, with a start/stop lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from podbay.commands.catalog import build_registry
from podbay.commands.registry import Registry
from podbay.commands.roles import role_for
from podbay.config import Settings
from podbay.dispatcher import Dispatcher
from podbay.engine.agents import Agent
from podbay.engine.core import Engine
from podbay.engine.docker import DockerProvisioner
from podbay.engine.reconcile import Reconciler
from podbay.engine.store import Store
from podbay.errors import ConfigError, EngineError
from podbay.messages import Reply, SessionKey
from podbay.supervisor import Supervisor
from podbay.transports.base import Transport
from podbay.transports.http import WebhookServer
from podbay.transports.plugins import TransportContext, create_enabled

log = logging.getLogger(__name__)

DB_NAME = "podbay.db"
_SECOND_SAMPLE_S = 5.0  # after start-up, the first CPU figure needs a second stats sample


def database_path(settings: Settings) -> Path:
    return settings.data_dir / DB_NAME


class Podbay:
    """One running podbay. Use as ``async with Podbay(settings) as bot``.

    ``transports`` defaults to every transport plugin the configuration enables, built on
    this podbay's webhook server (``http``); tests may pass their own instead.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        transports: Sequence[Transport] | None = None,
        agent: Agent | None = None,
        docker: bool = True,
        registry: Registry | None = None,
        shutdown_grace_s: float | None = None,
    ) -> None:
        self.settings = settings
        # One aiohttp app for every webhook (Slack, WhatsApp); started only when one is mounted.
        self.http = WebhookServer(settings.http)
        self.transports = (
            list(transports) if transports is not None else create_enabled(self.context())
        )
        self._agent = agent
        self._provisioner = DockerProvisioner() if docker else None
        # Extra commands (plugins, tests) come as a registry built on build_registry().
        self._registry = registry
        self._background: list[asyncio.Task[None]] = []
        self.shutdown_grace_s = (
            settings.dispatcher.shutdown_grace_s if shutdown_grace_s is None else shutdown_grace_s
        )
        self._lock_file: IO[str] | None = None
        self.store: Store | None = None
        self.engine: Engine | None = None
        self.dispatcher: Dispatcher | None = None
        self._started: list[Transport] = []
        # Set after each retention pass (tests and `status` may wait for the first).
        self.pruned = asyncio.Event()
        # Watches every transport; `podbay run` ends when one has failed for good.
        self.supervisor = Supervisor(settings.data_dir)

    def context(self) -> TransportContext:
        """What a transport plugin is built with (its routes go on ``http``)."""
        access = self.settings.access
        return TransportContext(
            settings=self.settings,
            http=self.http,
            is_allowed=lambda identity: role_for(identity, access) is not None,
        )

    def _lock(self) -> None:
        data_dir = self.settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        handle = (data_dir / "podbay.lock").open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.close()
            raise ConfigError(
                f"another podbay is already running with data dir {data_dir}; stop it or "
                "pass a different --data-dir"
            ) from exc
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_file = handle

    async def start(self) -> None:
        """Open the store, kill what a crashed run left behind, start the transports, then
        recover and reconcile (so their notices reach the chats) before dispatching."""
        self._lock()
        try:
            self.store = await Store.open(database_path(self.settings))
            self.engine = Engine(
                self.store, self.settings, agent=self._agent, provisioner=self._provisioner
            )
            registry = self._registry or build_registry(
                self.settings.bot.name, self.settings.bot.aliases
            )
            self.dispatcher = Dispatcher(self.engine, registry, self.settings)
            for transport in self.transports:
                self.dispatcher.attach(transport)
            # Survivors of a crash (an agent, a git clone) die before anything else happens:
            # an orphaned clone must never touch a project re-created under its name.
            survivors = await self.engine.procs.kill_survivors()
            # Transports start first so recovery notices reach them; until recover() has
            # run, the dispatcher only records what arrives (in the inbox) and holds it.
            for transport in self.transports:
                await self.supervisor.start(transport, self.dispatcher.submit)
                self._started.append(transport)
            if self.http.needed:
                await self.http.start()
            if self.engine.projects is not None:
                self.engine.projects.cancel_runs = self.dispatcher.cancel_project_runs
                await self._start_background(self.engine, self.dispatcher)
            await self.dispatcher.recover(survivors)
            self._background.append(asyncio.create_task(self._prune_forever(), name="prune"))
        except BaseException:
            await self.stop()
            raise

    async def _prune_forever(self) -> None:
        """Retention: old inbox rows, run events and audit entries go, at start and then
        every ``store.prune_interval_s`` (``store.retention_days = 0`` keeps everything)."""
        cfg = self.settings.store
        while cfg.retention_days > 0 and self.store is not None:
            try:
                pruned = await self.store.prune(time.time() - cfg.retention_days * 86400)
                if any(pruned.values()):
                    log.info("pruned rows older than %g days: %s", cfg.retention_days, pruned)
            except Exception:
                log.exception("pruning old rows failed")
            self.pruned.set()
            await asyncio.sleep(cfg.prune_interval_s)

    async def _start_background(self, engine: Engine, dispatcher: Dispatcher) -> None:
        manager = engine.projects
        assert manager is not None

        async def notify(session: SessionKey, text: str) -> None:
            await dispatcher.send(session, Reply(text, "error"))

        reconciler = Reconciler(manager, notify, lambda p: engine.jobs.busy(p) is not None)
        docker_cfg = self.settings.docker

        async def attempt(what: str, step: Callable[[], Awaitable[object]]) -> None:
            try:
                await step()
            except EngineError as exc:
                log.warning("%s skipped: %s", what, exc)
            except Exception:
                log.exception("%s failed", what)

        async def every(interval: float, what: str, step: Callable[[], Awaitable[object]]) -> None:
            while True:
                await asyncio.sleep(interval)
                await attempt(what, step)

        # The first pass completes before any message is handled: a project half-created
        # before a crash is rolled back before anyone can use its name or port again.
        await attempt("reconcile", reconciler.run_once)

        async def sample_stats() -> None:
            # Bounded so a slow engine never lets cycles pile up behind each other.
            await manager.sample_stats(timeout_s=min(10.0, docker_cfg.stats_interval_s))

        async def sample_forever() -> None:
            # Nothing waits for stats: the first sample is taken here in the background, and
            # a second soon after, since CPU use is the change between two samples.
            await attempt("stats sampling", sample_stats)
            await asyncio.sleep(min(_SECOND_SAMPLE_S, docker_cfg.stats_interval_s))
            await attempt("stats sampling", sample_stats)
            await every(docker_cfg.stats_interval_s, "stats sampling", sample_stats)

        self._background = [
            asyncio.create_task(
                every(docker_cfg.reconcile_interval_s, "reconcile", reconciler.run_once),
                name="reconcile",
            ),
            asyncio.create_task(sample_forever(), name="stats"),
        ]

    async def stop(self) -> None:
        """Stop transports, finish or cancel work, and close the store. Idempotent."""
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._background = []
        # No new webhook deliveries; what is in flight is in the inbox or stays with Slack.
        await self.http.stop()
        # The dispatcher goes first: its last replies still need the transports.
        if self.dispatcher is not None:
            await self.dispatcher.shutdown(self.shutdown_grace_s)
            self.dispatcher = None
        for transport in reversed(self._started):
            try:
                await transport.stop()
            except Exception:
                log.exception("stopping transport %s failed", transport.name)
        self._started.clear()
        await self.supervisor.close()
        if self._provisioner is not None:
            await self._provisioner.close()
        if self.store is not None:
            await self.store.close()
            self.store = None
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    async def __aenter__(self) -> Podbay:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
