from __future__ import annotations

from podbay.commands.context import ProgressMessage
from podbay.messages import MessageRef, Reply, SessionKey

ROOM = SessionKey("memory", "room")


class Recorder:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.edited: list[tuple[str, str]] = []

    async def send(self, session: SessionKey, reply: Reply) -> MessageRef:
        self.sent.append(reply.text)
        return MessageRef(session, (f"m{len(self.sent)}",))

    async def edit(self, ref: MessageRef, reply: Reply) -> MessageRef:
        self.edited.append((ref.ids[0], reply.text))
        return ref


async def test_progress_edits_one_message_in_place_at_most_every_1_5_s() -> None:
    rec = Recorder()
    now = [0.0]
    progress = ProgressMessage(ROOM, rec.send, rec.edit, clock=lambda: now[0])
    for t, step in [
        (0, "step 1"),
        (1.0, "step 2"),
        (2.0, "step 3"),
        (2.5, "step 4"),
        (3.6, "step 5"),
    ]:
        now[0] = t
        await progress.update(step)
    assert rec.sent == ["step 1"]
    assert rec.edited == [("m1", "step 3"), ("m1", "step 5")]


async def test_progress_sends_at_most_one_message_per_interval_without_edits() -> None:
    rec = Recorder()
    now = [0.0]
    progress = ProgressMessage(ROOM, rec.send, None, interval_s=10, clock=lambda: now[0])
    for t, text in [(0, "a"), (3, "b"), (9.9, "c"), (10, "d"), (15, "e"), (21, "f")]:
        now[0] = t
        await progress.update(text)
    assert rec.sent == ["a", "d", "f"]
