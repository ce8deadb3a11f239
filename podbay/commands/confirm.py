"""Propose → confirm for destructive commands.

A proposal is keyed by (session, requester): only the requester can confirm or cancel it,
a newer destructive request from them in that session replaces the older one, and it
expires after ``confirm_timeout_s``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from podbay.messages import SessionKey

Action = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Proposal:
    session: SessionKey
    requester: str
    summary: str
    action: Action
    expires_at: float


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
        self, session: SessionKey, requester: str, summary: str, action: Action
    ) -> Proposal | None:
        """Store a proposal; returns the one it replaced, if any."""
        self._purge()
        key = (session, requester)
        replaced = self._items.get(key)
        self._items[key] = Proposal(
            session, requester, summary, action, self._clock() + self.timeout_s
        )
        return replaced

    def take(self, session: SessionKey, requester: str) -> Proposal | None:
        """Remove and return the requester's live proposal in this session."""
        self._purge()
        return self._items.pop((session, requester), None)

    def others(self, session: SessionKey, requester: str) -> list[Proposal]:
        """Live proposals in this session made by someone else."""
        self._purge()
        return [p for (s, r), p in self._items.items() if s == session and r != requester]

    def __len__(self) -> int:
        self._purge()
        return len(self._items)
