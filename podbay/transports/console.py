"""The local console: each stdin line is a message from the local operator.

Replies are printed as they come: plain text when stdout is piped (what scripts and tests
read), rendered with rich (headings, syntax-coloured code, tables) when it is a terminal.
Works interactively and with piped input;
``closed`` is set once end of input has been reached and every line was submitted.

One bad line never stops the console: stdin is read as bytes and decoded line by line, so a
line that is not valid text gets an error reply of its own, and a line that cannot be
submitted (whatever the reason) is answered with a reference id while the next line goes on.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import getpass
import logging
import secrets
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from pydantic import Field

from podbay.configbase import TransportSection
from podbay.messages import Inbound, MessageRef, Reply, Sender, SessionKey
from podbay.transports.base import Capabilities, Health, Submit
from podbay.transports.plugins import TransportContext, TransportPlugin
from podbay.transports.render import markdown_to_plain

if TYPE_CHECKING:
    from rich.console import Console

log = logging.getLogger(__name__)

CONSOLE_SESSION = SessionKey("console", "local")


@dataclass(frozen=True)
class _Undecodable:
    """A line whose bytes are not text in the console's encoding."""

    encoding: str
    reason: str


def _decode(raw: bytes, encoding: str) -> str | _Undecodable:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        return _Undecodable(encoding, f"byte 0x{raw[exc.start]:02x} at position {exc.start}")


def _checked(line: str) -> str | _Undecodable:
    # A text stream opened with errors="surrogateescape" hands undecodable bytes over as
    # lone surrogates, which nothing downstream (SQLite, the terminal) can encode.
    try:
        line.encode("utf-8")
    except UnicodeEncodeError as exc:
        return _Undecodable("UTF-8", f"position {exc.start}")
    return line


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
        self.health = Health(self.name, local=True)
        self._rich: Console | None = None
        self._printing = asyncio.Lock()

    def _lines(self) -> Iterator[str | _Undecodable]:
        """stdin line by line; bytes are decoded here so that one bad line stays one line."""
        binary = getattr(self._stdin, "buffer", None)
        if binary is None:  # a text-only stream (StringIO): already decoded
            for line in self._stdin:
                yield _checked(line)
            return
        encoding = getattr(self._stdin, "encoding", None) or "utf-8"
        try:
            encoding = codecs.lookup(encoding).name.upper()
        except LookupError:
            encoding = "UTF-8"
        for raw in binary:
            yield _decode(raw, encoding)

    async def start(self, submit: Submit) -> None:
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str | _Undecodable | None] = asyncio.Queue()

        def read() -> None:
            # A plain thread: a blocking readline must not hold the event loop, and a
            # daemon thread never keeps the process alive at exit.
            try:
                for line in self._lines():
                    loop.call_soon_threadsafe(lines.put_nowait, line)
            except (OSError, ValueError):
                pass
            finally:
                loop.call_soon_threadsafe(lines.put_nowait, None)

        async def consume() -> None:
            number = count = 0
            try:
                while (line := await lines.get()) is not None:
                    number += 1
                    if isinstance(line, _Undecodable):
                        await self._error(
                            f"Input line {number} is not valid {line.encoding} text "
                            f"({line.reason}); it was ignored."
                        )
                        continue
                    text = line.rstrip("\r\n")
                    if not text.strip():
                        continue
                    count += 1
                    inbound = Inbound(
                        session=CONSOLE_SESSION,
                        sender=self.sender,
                        text=text,
                        platform_id=f"{self._run_id}-{count}",
                        is_direct=True,
                    )
                    try:
                        await submit(inbound)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        # Whatever went wrong belongs to this line alone: say so, go on.
                        ref = secrets.token_hex(4)
                        log.exception(
                            "console line %d could not be submitted [ref %s]", number, ref
                        )
                        await self._error(
                            f"Input line {number} could not be handled (ref {ref}); "
                            "see the log for details."
                        )
            finally:
                self.health.stopped()
                self.closed.set()

        if self._interactive:
            self._write("podbay chat — type `help`; Ctrl-D quits.\n")
        threading.Thread(target=read, name="console-stdin", daemon=True).start()
        self._consumer = asyncio.create_task(consume(), name="console-consumer")
        self.health.watch(self._consumer, may_end=True)
        self.health.connected()

    async def _error(self, text: str) -> None:
        await self.send(CONSOLE_SESSION, Reply(text, "error"))

    async def send(self, session: SessionKey, reply: Reply) -> MessageRef:
        self._sent += 1
        if self._terminal():
            # In a thread: rich and its highlighter load, and render, for 100 ms and more on
            # a first reply; one reply at a time, so their lines never mix.
            async with self._printing:
                await asyncio.to_thread(self._print_rich, reply.text)
        else:
            self._write(markdown_to_plain(reply.text).rstrip("\n") + "\n")
        return MessageRef(session, (str(self._sent),))

    async def edit(self, ref: MessageRef, reply: Reply) -> MessageRef:
        return await self.send(ref.session, reply)

    async def redact(self, session: SessionKey, platform_id: str, reason: str) -> bool:
        return False  # the history is not podbay's to change

    async def typing(self, session: SessionKey, active: bool) -> None:
        return None

    def _terminal(self) -> bool:
        try:
            return self._stdout.isatty()
        except (ValueError, OSError):  # a closed stream
            return False

    def _print_rich(self, text: str) -> None:
        if self._rich is None:
            # Imported on first use: piped runs (and every test of them) never pay for rich.
            from rich.console import Console

            self._rich = Console(file=self._stdout, force_terminal=True, highlight=False)
        from rich.markdown import Markdown

        with contextlib.suppress(BrokenPipeError, ValueError):
            self._rich.print(Markdown(text, code_theme="monokai"))

    def _write(self, text: str) -> None:
        try:
            self._stdout.write(text)
            self._stdout.flush()
        except (BrokenPipeError, ValueError):
            pass

    async def stop(self) -> None:
        self.health.stopped()
        if self._consumer is not None and not self._consumer.done():
            self._consumer.cancel()
            await asyncio.gather(self._consumer, return_exceptions=True)


class ConsoleTransportConfig(TransportSection):
    enabled: bool = Field(False, description="Serve the local console in `podbay run`.")


def _create(context: TransportContext) -> ConsoleTransport:
    return ConsoleTransport()


PLUGIN = TransportPlugin(
    name="console",
    config=ConsoleTransportConfig,
    create=_create,
    summary="The local console (stdin/stdout).",
)
