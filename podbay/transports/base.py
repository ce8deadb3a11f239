"""The transport interface.

A transport turns platform events into :class:`Inbound` values and renders :class:`Reply`
values back. It never decides what a message means.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from podbay.messages import Inbound, MessageRef, Reply, SessionKey

Submit = Callable[[Inbound], Awaitable[None]]


@dataclass(frozen=True)
class Capabilities:
    max_message_length: int = 4000
    edits: bool = False
    threads: bool = False
    buttons: bool = False
    typing: bool = False
    redaction: bool = False


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

    async def stop(self) -> None:
        """Stop receiving and release every resource."""
