"""Wiring: store, engine, registry, dispatcher and transports, with a start/stop lifecycle."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from podbay.commands.catalog import build_registry
from podbay.config import Settings
from podbay.dispatcher import Dispatcher
from podbay.engine.agents import Agent
from podbay.engine.core import Engine, Provisioner
from podbay.engine.store import Store
from podbay.errors import ConfigError
from podbay.transports.base import Transport

log = logging.getLogger(__name__)

DB_NAME = "podbay.db"


def database_path(settings: Settings) -> Path:
    return settings.data_dir / DB_NAME


class Podbay:
    """One running podbay. Use as ``async with Podbay(settings, transports=[...]) as bot``."""

    def __init__(
        self,
        settings: Settings,
        *,
        transports: Sequence[Transport] = (),
        agent: Agent | None = None,
        provisioner: Provisioner | None = None,
        shutdown_grace_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.transports = list(transports)
        self._agent = agent
        self._provisioner = provisioner
        self.shutdown_grace_s = (
            settings.dispatcher.shutdown_grace_s if shutdown_grace_s is None else shutdown_grace_s
        )
        self._lock_file: IO[str] | None = None
        self.store: Store | None = None
        self.engine: Engine | None = None
        self.dispatcher: Dispatcher | None = None
        self._started: list[Transport] = []

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
        self._lock()
        try:
            self.store = await Store.open(database_path(self.settings))
            self.engine = Engine(
                self.store, self.settings, agent=self._agent, provisioner=self._provisioner
            )
            registry = build_registry(self.settings.bot.name, self.settings.bot.aliases)
            self.dispatcher = Dispatcher(self.engine, registry, self.settings)
            for transport in self.transports:
                self.dispatcher.attach(transport)
            await self.dispatcher.recover()
            for transport in self.transports:
                await transport.start(self.dispatcher.submit)
                self._started.append(transport)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop transports, finish or cancel work, and close the store. Idempotent."""
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
