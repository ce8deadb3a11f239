"""The transport interface.

A transport turns platform events into :class:`Inbound` values and renders :class:`Reply`
values back. It never decides what a message means.

A transport also reports how it is doing through its :class:`Health`: connected,
reconnecting (with the attempt and the last error), or failed. The supervisor
(:mod:`podbay.supervisor`) watches it; ``status`` and ``podbay doctor`` show it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Literal, Protocol, runtime_checkable

from podbay.errors import TransportError
from podbay.messages import Inbound, MessageRef, Reply, SessionKey

log = logging.getLogger(__name__)

Submit = Callable[[Inbound], Awaitable[None]]

Status = Literal["starting", "connected", "reconnecting", "failed", "stopped"]


class TransportFailed(TransportError):
    """The transport cannot go on and retrying will not help (e.g. rejected credentials)."""


class DeliveryRefused(TransportError):
    """The platform refused this reply for a reason no retry fixes (WhatsApp's closed
    24-hour customer-service window). The transport does not retry it; the dispatcher logs
    it and records it, once, on the conversation's current run."""


@dataclass(frozen=True)
class Capabilities:
    max_message_length: int = 4000
    edits: bool = False
    threads: bool = False
    buttons: bool = False
    typing: bool = False
    redaction: bool = False


@dataclass(frozen=True)
class TransportState:
    """One transport's condition, as shown by ``status`` and ``podbay doctor``."""

    name: str
    status: Status = "starting"
    attempt: int = 0
    last_error: str | None = None
    since: float = 0.0
    # The local console: its state is plain to whoever types, so reports leave it out.
    local: bool = False

    def describe(self) -> str:
        if self.status == "reconnecting":
            error = f", last error: {self.last_error}" if self.last_error else ""
            return f"{self.name}: reconnecting (attempt {self.attempt}{error})"
        if self.status == "failed":
            return f"{self.name}: failed: {self.last_error or 'unknown error'}"
        return f"{self.name}: {self.status}"

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "status": self.status,
            "attempt": self.attempt,
            "last_error": self.last_error,
            "since": self.since,
            "local": self.local,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> TransportState:
        status = str(data.get("status", "stopped"))
        attempt = data.get("attempt", 0)
        since = data.get("since", 0.0)
        error = data.get("last_error")
        return cls(
            name=str(data.get("name", "?")),
            status=status if status in _STATUSES else "stopped",  # type: ignore[arg-type]
            attempt=int(attempt) if isinstance(attempt, int | float) else 0,
            last_error=str(error) if error is not None else None,
            since=float(since) if isinstance(since, int | float) else 0.0,
            local=data.get("local") is True,
        )


_STATUSES = {"starting", "connected", "reconnecting", "failed", "stopped"}


class Health:
    """What a transport says about itself. Listeners hear every change; ``failed_event``
    is set once the transport has given up (the supervisor ends ``podbay run`` then)."""

    def __init__(self, name: str, *, local: bool = False) -> None:
        self.state = TransportState(name, since=time.time(), local=local)
        self._listeners: list[Callable[[TransportState], None]] = []
        self.failed_event = asyncio.Event()

    def listen(self, listener: Callable[[TransportState], None]) -> None:
        self._listeners.append(listener)

    def _set(self, **changes: object) -> None:
        new = replace(self.state, **changes)  # type: ignore[arg-type]
        if new.status != self.state.status:
            new = replace(new, since=time.time())
        if new == self.state:
            return
        self.state = new
        for listener in list(self._listeners):
            try:
                listener(new)
            except Exception:
                log.exception("transport state listener failed")

    def connected(self) -> None:
        if self.state.status != "failed":
            self._set(status="connected", attempt=0, last_error=None)

    def reconnecting(self, attempt: int, error: str) -> None:
        if self.state.status != "failed":
            self._set(status="reconnecting", attempt=attempt, last_error=error)

    def failed(self, error: str) -> None:
        self._set(status="failed", last_error=error)
        self.failed_event.set()

    def stopped(self) -> None:
        if self.state.status != "failed":
            self._set(status="stopped", attempt=0)

    def watch(self, task: asyncio.Task[None], *, may_end: bool = False) -> None:
        """Report ``task``'s death: an exception (or, unless ``may_end``, a return) means the
        transport no longer hears anything, which must never go unnoticed."""

        def done(finished: asyncio.Task[None]) -> None:
            if finished.cancelled():
                return
            exc = finished.exception()
            if isinstance(exc, TransportFailed):
                self.failed(str(exc)[:500])  # expected and explained: no traceback
            elif exc is not None:
                log.error(
                    "transport %s: task %s died",
                    self.state.name,
                    finished.get_name(),
                    exc_info=exc,
                )
                reason = str(exc) if isinstance(exc, TransportError) else repr(exc)
                self.failed(reason[:300])
            elif not may_end:
                self.failed(f"task {finished.get_name()} ended unexpectedly")

        task.add_done_callback(done)


@runtime_checkable
class Transport(Protocol):
    name: str
    capabilities: Capabilities

    async def start(self, submit: Submit) -> None:
        """Begin delivering inbound messages to ``submit``; returns once started."""

    async def send(self, session: SessionKey, reply: Reply) -> MessageRef:
        """Render and send a reply, split to the platform's size limit."""

    async def edit(self, ref: MessageRef, reply: Reply) -> MessageRef:
        """Replace a sent message's content (only when ``capabilities.edits``)."""

    async def typing(self, session: SessionKey, active: bool) -> None:
        """Show or clear a typing/working indicator (a no-op without ``capabilities.typing``)."""

    async def redact(self, session: SessionKey, platform_id: str, reason: str) -> bool:
        """Remove an inbound message from the chat history (one that carried a secret).
        Returns whether it is gone; ``False`` without ``capabilities.redaction``."""

    async def stop(self) -> None:
        """Stop receiving and release every resource."""


@runtime_checkable
class Supervised(Protocol):
    """A transport that reports its own health (every built-in transport does)."""

    name: str
    health: Health
