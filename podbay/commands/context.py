"""The explicit context every command handler receives."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from podbay.commands.confirm import Action, Proposal, Proposals
from podbay.commands.registry import Registry
from podbay.commands.roles import Role
from podbay.config import Settings
from podbay.engine.core import Engine
from podbay.engine.jobs import Work
from podbay.messages import Action as Decision
from podbay.messages import Button, Inbound, MessageRef, Reply, ReplyKind, Sender, SessionKey
from podbay.transports.base import TransportState

Send = Callable[[SessionKey, Reply], Awaitable[MessageRef | None]]
Edit = Callable[[MessageRef, Reply], Awaitable[MessageRef | None]]


class ProgressMessage:
    """Progress of a long job: one message edited in place (at most every 1.5 s) where the
    transport can edit, otherwise at most one new message per ``interval_s``."""

    edit_interval_s = 1.5

    def __init__(
        self,
        session: SessionKey,
        send: Send,
        edit: Edit | None,
        *,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._send = send
        self._edit = edit
        self._interval = interval_s
        self._clock = clock
        self._ref: MessageRef | None = None
        self._last_sent: float | None = None

    async def update(self, text: str) -> None:
        reply = Reply(text, "progress")
        now = self._clock()
        if self._edit is not None:
            if self._ref is None:
                self._ref = await self._send(self._session, reply)
                self._last_sent = now
            elif self._last_sent is None or now - self._last_sent >= self.edit_interval_s:
                # Edits are cheap but not free: at most one per edit_interval_s.
                self._last_sent = now
                self._ref = await self._edit(self._ref, reply) or self._ref
            return
        if self._last_sent is None or now - self._last_sent >= self._interval:
            self._last_sent = now
            await self._send(self._session, reply)


class SessionControl(Protocol):
    """What commands may ask of the dispatcher."""

    async def stop_session(self, session: SessionKey) -> str: ...

    def transport_states(self) -> Sequence[TransportState]: ...


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
    edit: Edit | None = None
    # The role the command being handled needs (a proposal keeps it for the decision).
    required_role: Role = Role.VIEWER
    # The transport offers buttons (a prompt's buttons are replaced by the decision).
    buttons: bool = False

    @property
    def session(self) -> SessionKey:
        return self.inbound.session

    @property
    def sender(self) -> Sender:
        return self.inbound.sender

    async def reply(
        self, text: str, kind: ReplyKind = "info", *, private: bool = False
    ) -> MessageRef | None:
        """Answer in this conversation; ``private`` is for the sender's eyes where possible."""
        return await self.send(
            self.session, Reply(text, kind, private_to=self.sender if private else None)
        )

    def progress(self) -> ProgressMessage:
        return ProgressMessage(self.session, self.send, self.edit)

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
        proposal, replaced = self.proposals.propose(
            self.session, self.sender.identity, summary, action, role=self.required_role
        )
        note = f"\n(This replaces your earlier request: {replaced.summary})" if replaced else ""
        timeout = int(self.proposals.timeout_s)
        if replaced is not None:
            await self.decided(replaced, "replaced by a newer request")
        proposal.prompt = await self.send(
            self.session,
            Reply(
                f"{summary}\nReply `confirm` within {timeout} s to go ahead, or `cancel`.{note}",
                "confirm",
                buttons=(
                    Button("Confirm", Decision("confirm", proposal.id), "danger"),
                    Button("Cancel", Decision("cancel", proposal.id)),
                ),
            ),
        )

    async def decided(self, proposal: Proposal, outcome: str) -> None:
        """Replace a prompt's buttons with its outcome (where there were buttons)."""
        if not self.buttons or self.edit is None or proposal.prompt is None:
            return
        await self.edit(proposal.prompt, Reply(f"{proposal.summary}\n{outcome}", "info"))
