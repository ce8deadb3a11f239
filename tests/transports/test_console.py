"""The console transport reads real bytes from a pipe, the way `podbay chat` does."""

from __future__ import annotations

import asyncio
import io
import os

from podbay.messages import Inbound
from podbay.transports.console import ConsoleTransport


def piped_stdin(data: bytes) -> io.TextIOWrapper:
    """A text stdin over a real pipe that holds ``data`` and then ends."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, data)
    os.close(write_fd)
    return io.TextIOWrapper(open(read_fd, "rb"), encoding="utf-8", errors="surrogateescape")


async def test_a_failing_submit_is_answered_for_its_line_and_the_next_lines_still_arrive() -> None:
    stdout = io.StringIO()
    submitted: list[str] = []

    async def submit(inbound: Inbound) -> None:
        if inbound.text == "explode":
            raise RuntimeError("cannot store this one")
        submitted.append(inbound.text)

    stdin = piped_stdin(b"first\nexplode\n\xff\xfe bad\nlast\n")
    console = ConsoleTransport(stdin, stdout, user="op")
    await console.start(submit)
    try:
        await asyncio.wait_for(console.closed.wait(), 10)
    finally:
        await console.stop()
        stdin.close()
    assert submitted == ["first", "last"]
    out = stdout.getvalue()
    assert "Input line 2 could not be handled (ref " in out
    assert "cannot store this one" not in out, "internals go to the log, not the reply"
    assert "Input line 3 is not valid UTF-8 text (byte 0xff at position 0)" in out
    assert console.health.state.status == "stopped"


async def test_lone_surrogates_from_a_text_stream_are_refused_not_submitted() -> None:
    stdout = io.StringIO()
    submitted: list[str] = []

    async def submit(inbound: Inbound) -> None:
        submitted.append(inbound.text)

    console = ConsoleTransport(io.StringIO("ok\nbad \udcff\nstill ok\n"), stdout, user="op")
    await console.start(submit)
    try:
        await asyncio.wait_for(console.closed.wait(), 10)
    finally:
        await console.stop()
    assert submitted == ["ok", "still ok"]
    assert "Input line 2 is not valid UTF-8 text" in stdout.getvalue()
