"""`agent.stop_grace_s` decides how long a stopped host agent may clean up before SIGKILL."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from fakes.transport import MemoryTransport

from podbay.bot import Podbay
from podbay.config import Settings

AGENT = """
import os, signal, sys, time
started, term, cleaned = sys.argv[1:4]

def on_term(signum, frame):
    open(term, "w").write("got TERM")
    time.sleep(3)  # "cleaning up": longer than the configured grace
    open(cleaned, "w").write("cleaned up")
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
sys.stdin.read()
with open(started, "w") as fifo:
    fifo.write("started\\n")
while True:
    time.sleep(60)
"""


async def test_a_stopped_agent_gets_the_configured_grace_then_sigkill(tmp_path: Path) -> None:
    script = tmp_path / "agent.py"
    script.write_text(AGENT)
    started, term, cleaned = tmp_path / "started", tmp_path / "term", tmp_path / "cleaned"
    os.mkfifo(started)
    settings = Settings(
        data_dir=tmp_path / "data",
        access={"admins": ["memory:alice"]},
        dispatcher={"coalesce_window_ms": 0, "max_window_ms": 0},
        agent={
            "preset": "command",
            "command": [sys.executable, str(script), str(started), str(term), str(cleaned)],
            "stop_grace_s": 0.3,
        },
    )
    transport = MemoryTransport()
    async with Podbay(settings, transports=[transport], docker=False):
        reader = asyncio.create_task(asyncio.to_thread(started.read_text))
        await transport.say("work on it")
        assert (await asyncio.wait_for(reader, 30)).strip() == "started"
        await transport.say("stop")
        await transport.wait_for(lambda: any("Stopped" in t for t in transport.texts()), 30)
    assert term.read_text() == "got TERM"  # it was asked first
    # ... and killed once the 0.3 s grace was over, before its 3 s clean-up could finish.
    assert not cleaned.exists()
