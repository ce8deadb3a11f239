"""Start-up order of a whole podbay: recovery notices reach transports that are running."""

from __future__ import annotations

from fakes.agent import FakeAgent
from fakes.transport import MemoryTransport

from podbay.bot import Podbay, database_path
from podbay.config import Settings
from podbay.engine.store import Store
from podbay.messages import Inbound, MessageRef, Reply, Sender, SessionKey

ROOM = SessionKey("memory", "room-1")


class StartedOnlyTransport(MemoryTransport):
    """Like a real platform client: sending before start() is lost (here: recorded)."""

    def __init__(self) -> None:
        super().__init__()
        self.started = False
        self.lost: list[str] = []

    async def start(self, submit: object) -> None:  # type: ignore[override]
        await super().start(submit)  # type: ignore[arg-type]
        self.started = True

    async def send(self, session: SessionKey, reply: Reply) -> MessageRef:
        if not self.started:
            self.lost.append(reply.text)
        return await super().send(session, reply)


async def test_recovery_notices_are_sent_after_the_transports_started(settings: Settings) -> None:
    async with await Store.open(database_path(settings)) as store:
        row = await store.inbox_add(
            Inbound(ROOM, Sender("memory", "alice"), "refactor the parser", "p1")
        )
        assert row is not None
        await store.inbox_mark([row], "processing", kind="freeform")
        await store.job_create("demo", "new project", session=ROOM, requested_by="memory:alice")
    transport = StartedOnlyTransport()
    async with Podbay(settings, transports=[transport], agent=FakeAgent(), docker=False):
        pass
    assert transport.lost == []
    texts = transport.texts(ROOM)
    assert any("restarted while working on: refactor the parser" in t for t in texts)
    assert any("restarted during `new project` of demo" in t for t in texts)
