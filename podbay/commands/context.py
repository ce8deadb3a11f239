"""The explicit context every command handler receives."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from podbay.commands.confirm import Action, Proposals
from podbay.commands.registry import Registry
from podbay.commands.roles import Role
from podbay.config import Settings
from podbay.engine.core import Engine
from podbay.engine.jobs import Work
from podbay.messages import Inbound, MessageRef, Reply, ReplyKind, Sender, SessionKey

Send = Callable[[SessionKey, Reply], Awaitable[MessageRef | None]]


class SessionControl(Protocol):
    """What commands may ask of the dispatcher."""

    async def stop_session(self, session: SessionKey) -> str: ...


@dataclass
class CommandContext:
    inbound: Inbound
    role: Role
    engine: Engine
    registry: Registry
    settings: Settings
    proposals: Proposals
    control: SessionControl
    send: Send

    @property
    def session(self) -> SessionKey:
        return self.inbound.session

    @property
    def sender(self) -> Sender:
        return self.inbound.sender

    async def reply(self, text: str, kind: ReplyKind = "info") -> MessageRef | None:
        return await self.send(self.session, Reply(text, kind))

    async def start_job(
        self, project: str, kind: str, work: Work, params: dict[str, object] | None = None
    ) -> int:
        """Run ``work`` as a background engine job; its progress is posted to this session."""
        session = self.session

        async def notify(text: str) -> None:
            await self.send(session, Reply(text, "progress"))

        return await self.engine.jobs.submit(
            project,
            kind,
            work,
            session=session,
            requested_by=self.sender.identity,
            notify=notify,
            params=params,
        )

    async def propose(self, summary: str, action: Action) -> None:
        """Ask the requester to confirm ``summary``; ``action`` runs on `confirm`."""
        replaced = self.proposals.propose(self.session, self.sender.identity, summary, action)
        note = f"\n(This replaces your earlier request: {replaced.summary})" if replaced else ""
        timeout = int(self.proposals.timeout_s)
        await self.reply(
            f"{summary}\nReply `confirm` within {timeout} s to go ahead, or `cancel`.{note}",
            "confirm",
        )
