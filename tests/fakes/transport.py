"""An in-memory transport: tests type messages in and read replies out."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from podbay.messages import Inbound, MessageRef, Reply, Sender, SessionKey
from podbay.transports.base import Capabilities, Submit

DEFAULT_SESSION = SessionKey("memory", "room-1")


class MemoryTransport:
    name = "memory"

    def __init__(
        self, *, typing: bool = True, after_submit: Callable[[], None] | None = None
    ) -> None:
        self.capabilities = Capabilities(max_message_length=4000, typing=typing)
        self.sent: list[tuple[SessionKey, Reply]] = []
        self.typing_calls: list[tuple[SessionKey, bool]] = []
        self._submit: Submit | None = None
        self._ids = itertools.count(1)
        self._changed = asyncio.Condition()
        self.stopped = False
        self._after_submit = after_submit

    async def start(self, submit: Submit) -> None:
        self._submit = submit

    async def say(
        self,
        text: str,
        *,
        session: SessionKey = DEFAULT_SESSION,
        user: str = "alice",
        name: str = "",
        platform_id: str | None = None,
        direct: bool = False,
    ) -> None:
        assert self._submit is not None, "transport not started"
        await self._submit(
            Inbound(
                session=session,
                sender=Sender(self.name, user, name or user.capitalize()),
                text=text,
                platform_id=platform_id or f"m{next(self._ids)}",
                is_direct=direct,
            )
        )
        if self._after_submit is not None:
            self._after_submit()

    async def send(self, session: SessionKey, reply: Reply) -> MessageRef:
        self.sent.append((session, reply))
        async with self._changed:
            self._changed.notify_all()
        return MessageRef(session, (str(len(self.sent)),))

    async def edit(self, ref: MessageRef, reply: Reply) -> MessageRef:
        return await self.send(ref.session, reply)

    async def redact(self, session: SessionKey, platform_id: str, reason: str) -> bool:
        return False  # the history is not podbay's to change

    async def typing(self, session: SessionKey, active: bool) -> None:
        self.typing_calls.append((session, active))

    async def stop(self) -> None:
        self.stopped = True

    def texts(self, session: SessionKey | None = None, kind: str | None = None) -> list[str]:
        return [
            r.text
            for s, r in self.sent
            if (session is None or s == session) and (kind is None or r.kind == kind)
        ]

    async def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 10.0, what: str = "a reply"
    ) -> None:
        async def check() -> None:
            async with self._changed:
                await self._changed.wait_for(predicate)

        try:
            await asyncio.wait_for(check(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"timed out waiting for {what}; sent so far: {self.sent}"
            ) from None

    async def wait_for_text(
        self,
        fragment: str,
        session: SessionKey | None = None,
        timeout: float = 10.0,
        *,
        since: int = 0,
    ) -> str:
        """The first reply containing ``fragment`` among those sent after ``since`` replies."""
        found: list[str] = []

        def match() -> bool:
            recent = [r.text for s, r in self.sent[since:] if session is None or s == session]
            found[:] = [t for t in recent if fragment in t]
            return bool(found)

        await self.wait_for(match, timeout, what=repr(fragment))
        return found[0]
