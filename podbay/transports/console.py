"""The local console: each stdin line is a message from the local operator.

Replies are printed as plain text as they come. Works interactively and with piped input;
``closed`` is set once end of input has been reached and every line was submitted.
"""

from __future__ import annotations

import asyncio
import getpass
import sys
import threading
import uuid
from typing import TextIO

from podbay.messages import Inbound, MessageRef, Reply, Sender, SessionKey
from podbay.transports.base import Capabilities, Submit
from podbay.transports.render import markdown_to_plain

CONSOLE_SESSION = SessionKey("console", "local")


class ConsoleTransport:
    name = "console"
    capabilities = Capabilities(max_message_length=1_000_000)

    def __init__(
        self,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        *,
        user: str | None = None,
    ) -> None:
        self._stdin = stdin or sys.stdin
        self._stdout = stdout or sys.stdout
        self._interactive = self._stdin.isatty() and self._stdout.isatty()
        self.sender = Sender("console", user or getpass.getuser(), user or getpass.getuser())
        # Platform ids must not repeat across runs, or the inbox would drop them as redeliveries.
        self._run_id = uuid.uuid4().hex[:12]
        self._sent = 0
        self.closed = asyncio.Event()
        self._consumer: asyncio.Task[None] | None = None

    async def start(self, submit: Submit) -> None:
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str | None] = asyncio.Queue()

        def read() -> None:
            # A plain thread: a blocking readline must not hold the event loop, and a
            # daemon thread never keeps the process alive at exit.
            try:
                for line in self._stdin:
                    loop.call_soon_threadsafe(lines.put_nowait, line)
            except (OSError, ValueError):
                pass
            finally:
                loop.call_soon_threadsafe(lines.put_nowait, None)

        async def consume() -> None:
            count = 0
            try:
                while (line := await lines.get()) is not None:
                    text = line.rstrip("\r\n")
                    if not text.strip():
                        continue
                    count += 1
                    await submit(
                        Inbound(
                            session=CONSOLE_SESSION,
                            sender=self.sender,
                            text=text,
                            platform_id=f"{self._run_id}-{count}",
                            is_direct=True,
                        )
                    )
            finally:
                self.closed.set()

        if self._interactive:
            self._write("podbay chat — type `help`; Ctrl-D quits.\n")
        threading.Thread(target=read, name="console-stdin", daemon=True).start()
        self._consumer = asyncio.create_task(consume(), name="console-consumer")

    async def send(self, session: SessionKey, reply: Reply) -> MessageRef:
        self._sent += 1
        self._write(markdown_to_plain(reply.text).rstrip("\n") + "\n")
        return MessageRef(session, (str(self._sent),))

    async def edit(self, ref: MessageRef, reply: Reply) -> MessageRef:
        return await self.send(ref.session, reply)

    async def typing(self, session: SessionKey, active: bool) -> None:
        return None

    def _write(self, text: str) -> None:
        try:
            self._stdout.write(text)
            self._stdout.flush()
        except (BrokenPipeError, ValueError):
            pass

    async def stop(self) -> None:
        if self._consumer is not None and not self._consumer.done():
            self._consumer.cancel()
            await asyncio.gather(self._consumer, return_exceptions=True)
