"""Transport supervision: podbay never goes deaf without saying so.

Every transport reports its own :class:`~podbay.transports.base.Health` and registers its
background tasks there; a task that dies makes the transport "failed". Transient trouble
(refused, reset, timeouts, 5xx, 429) is the transport's to retry, through
:mod:`podbay.retry`; the supervisor's part is to

- start the transports and give every one a health (a transport without one is
  "connected" once started),
- publish each change to ``<data dir>/transports.json`` (mode 0600), because ``podbay
  status`` and ``podbay doctor`` run in another process and must show the same states,
- and tell ``podbay run`` when a transport has failed, so it exits non-zero with the
  reason instead of running on hearing nothing.

The file names the pid of the podbay that wrote it; a reader that finds that process gone
knows nobody is serving (see :func:`read_published`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from podbay.transports.base import (
    Health,
    Submit,
    Supervised,
    Transport,
    TransportFailed,
    TransportState,
)

log = logging.getLogger(__name__)

STATE_FILE = "transports.json"


class Supervisor:
    """Starts and watches transports; ``failed`` is set once any of them gave up."""

    def __init__(self, data_dir: Path | None) -> None:
        self._path = data_dir / STATE_FILE if data_dir is not None else None
        self._health: dict[str, Health] = {}
        self.failed = asyncio.Event()
        self._writing: asyncio.Task[None] | None = None
        self._dirty = False
        self._closed = False

    def health(self, transport: Transport) -> Health:
        if isinstance(transport, Supervised):
            return transport.health
        return self._health.setdefault(transport.name, Health(transport.name))

    async def start(self, transport: Transport, submit: Submit) -> None:
        """Start ``transport``; a :class:`TransportFailed` is recorded, then raised."""
        health = self.health(transport)
        self._health[transport.name] = health
        health.listen(self._changed)
        self._publish()
        try:
            await transport.start(submit)
        except TransportFailed as exc:
            health.failed(str(exc))
            raise
        if not isinstance(transport, Supervised):
            health.connected()

    def states(self) -> list[TransportState]:
        return [health.state for health in self._health.values()]

    def failures(self) -> list[TransportState]:
        return [s for s in self.states() if s.status == "failed"]

    async def wait_failed(self) -> TransportState:
        await self.failed.wait()
        return self.failures()[0]

    def _changed(self, state: TransportState) -> None:
        if state.status == "failed":
            log.error("transport %s", state.describe())
            self.failed.set()
        elif state.status == "reconnecting":
            log.info("transport %s", state.describe())
        self._publish()

    def _publish(self) -> None:
        # Coalesced and off the event loop: a reconnect storm writes the file at most
        # once per change burst, never blocking message handling.
        if self._path is None:
            return
        self._dirty = True
        if self._writing is None or self._writing.done():
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to publish to
                self._writing = asyncio.get_running_loop().create_task(self._write_loop())

    async def _write_loop(self) -> None:
        while self._dirty:
            self._dirty = False
            # A stopped podbay names no pid: nobody serves these transports any more.
            pid = None if self._closed else os.getpid()
            payload = {"pid": pid, "written_at": time.time(), "transports": [
                s.to_json() for s in self.states()
            ]}  # fmt: skip
            try:
                await asyncio.to_thread(_write_private, self._path, payload)
            except OSError as exc:
                log.warning("could not write %s: %s", self._path, exc)
                return

    async def close(self) -> None:
        """Write the final states (every transport stopped, or failed)."""
        for health in self._health.values():
            health.stopped()
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)
        self._closed = self._dirty = True
        await self._write_loop()


def _write_private(path: Path | None, payload: object) -> None:
    assert path is not None
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle)
    os.replace(tmp, path)


@dataclass(frozen=True)
class Published:
    """What a running (or the last) podbay wrote about its transports."""

    running: bool
    transports: tuple[TransportState, ...]


def read_published(data_dir: Path) -> Published | None:
    """The transport states a podbay published in ``data_dir`` (None: none ever did).

    ``running`` is False when the writer's process is gone: its states are history then.
    """
    try:
        data = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    pid = data.get("pid")
    running = isinstance(pid, int) and _alive(pid) and pid == _lock_holder(data_dir)
    states = tuple(
        TransportState.from_json(t) for t in data.get("transports", []) if isinstance(t, dict)
    )
    return Published(running, states)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_holder(data_dir: Path) -> int | None:
    # The running podbay writes its pid into the lock file it holds (see Podbay._lock);
    # a pid that merely got reused by another process will not match it.
    try:
        text = (data_dir / "podbay.lock").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
