"""Propose → confirm for destructive commands.

A proposal is keyed by (session, requester): only the requester can confirm or cancel it,
a newer destructive request from them in that session replaces the older one, and it
expires after ``confirm_timeout_s``. Each proposal also has an id, which buttons and
reactions name (:class:`podbay.messages.Action`): a click decides exactly that proposal.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from podbay.commands.roles import Role
from podbay.messages import MessageRef, SessionKey

Action = Callable[[], Awaitable[None]]


@dataclass
class Proposal:
    session: SessionKey
    requester: str
    summary: str
    action: Action
    expires_at: float
    id: str = ""
    # The role the proposed command needs: checked again when it is decided.
    role: Role = Role.VIEWER
    # The prompt as sent: where buttons were offered, the decision replaces them.
    prompt: MessageRef | None = None


class Proposals:
    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        self._items: dict[tuple[SessionKey, str], Proposal] = {}

    def _purge(self) -> None:
        now = self._clock()
        for key in [k for k, p in self._items.items() if p.expires_at <= now]:
            del self._items[key]

    def propose(
        self,
        session: SessionKey,
        requester: str,
        summary: str,
        action: Action,
        *,
        role: Role = Role.VIEWER,
    ) -> tuple[Proposal, Proposal | None]:
        """Store a proposal; returns it and the one it replaced, if any."""
        self._purge()
        key = (session, requester)
        replaced = self._items.get(key)
        proposal = Proposal(
            session,
            requester,
            summary,
            action,
            self._clock() + self.timeout_s,
            id=secrets.token_hex(6),
            role=role,
        )
        self._items[key] = proposal
        return proposal, replaced

    def take(self, session: SessionKey, requester: str) -> Proposal | None:
        """Remove and return the requester's live proposal in this session."""
        self._purge()
        return self._items.pop((session, requester), None)

    def find(self, proposal_id: str) -> Proposal | None:
        """The live proposal with this id (it stays until taken)."""
        self._purge()
        return next((p for p in self._items.values() if p.id == proposal_id), None)

    def others(self, session: SessionKey, requester: str) -> list[Proposal]:
        """Live proposals in this session made by someone else."""
        self._purge()
        return [p for (s, r), p in self._items.items() if s == session and r != requester]

    def __len__(self) -> int:
        self._purge()
        return len(self._items)
