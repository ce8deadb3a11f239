"""Coding-agent runners.

An :class:`Agent` starts runs; an :class:`AgentRun` is an async iterator of
:class:`AgentEvent` values with a ``cancel()`` that returns only once the agent's
process is gone. The ``command`` preset with ``where = "host"`` runs a configured argv on
this machine with the prompt on stdin. Container runners and Claude Code / Codex presets
plug in behind the same interface.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from podbay.engine.procs import (
    KILL_VERIFY_S,
    PIPE,
    ProcessesSurvived,
    ProcessTracker,
    TrackedProcess,
    snapshot,
)
from podbay.errors import NotConfigured


@dataclass(frozen=True)
class RunRequest:
    """What an agent run needs to know."""

    prompt: str
    session: str = ""
    project: str = ""
    workdir: Path | None = None
    run_id: int | None = None  # the store's run row, recorded with the agent's processes
    # Agent-specific state carried between turns; "agent_session_id" resumes a conversation.
    session_state: Mapping[str, str] = field(default_factory=dict)
    container: str = ""  # the project's container, for runners that exec into it


@dataclass(frozen=True)
class TextEvent:
    """A chunk of the agent's answer (a whole paragraph or code block)."""

    text: str


@dataclass(frozen=True)
class ToolEvent:
    """The agent used a tool: one short line for the chat (``🔧 Write hello.txt``).

    ``detail`` is the longer form (a command's full text, a diff summary) shown at
    verbosity 2.
    """

    name: str
    summary: str
    detail: str = ""


@dataclass(frozen=True)
class NoticeEvent:
    """Something podbay itself tells the chat about the run ("started a fresh session")."""

    text: str


# Why a run failed, classified from the agent's own structured output, never from the exit
# code alone.
FailureKind = Literal["", "rate_limit", "auth", "max_turns", "execution", "timeout", "internal"]


@dataclass(frozen=True)
class FinishedEvent:
    """The last event of every run that was not cancelled."""

    ok: bool
    exit_code: int | None = None
    error: str = ""
    usage: Mapping[str, int] = field(default_factory=dict)
    cost_usd: float | None = None
    agent_session_id: str = ""
    num_turns: int | None = None
    failure: FailureKind = ""


AgentEvent = TextEvent | ToolEvent | NoticeEvent | FinishedEvent


class AgentRun(Protocol):
    def __aiter__(self) -> AsyncIterator[AgentEvent]: ...

    async def cancel(self) -> None:
        """Stop the run; returns only when nothing of it is left running."""


class Agent(Protocol):
    name: str

    def run(self, request: RunRequest) -> AgentRun: ...


class NoAgent:
    """Used when no agent is configured: every run explains how to configure one."""

    name = "none"

    def run(self, request: RunRequest) -> AgentRun:
        raise NotConfigured(
            'No agent is configured. Set `[agent] command = ["your-agent", "--flag"]` in the '
            "config (see `podbay init`)."
        )


def paragraphs(buffer: str, *, final: bool) -> tuple[list[str], str]:
    """Split complete paragraphs off ``buffer``; a code fence is never split.

    Returns (complete paragraphs, remainder). With ``final`` the remainder is flushed too.
    """
    done: list[str] = []
    current: list[str] = []
    in_fence = False
    lines = buffer.split("\n")
    # The last element is an incomplete line unless the buffer ends with "\n".
    tail = lines.pop()
    for line in lines:
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        if not line.strip() and not in_fence:
            if current:
                done.append("\n".join(current))
                current = []
            continue
        current.append(line)
    remainder = "\n".join([*current, tail]) if current else tail
    if final:
        if remainder.strip():
            done.append(remainder.strip("\n"))
        remainder = ""
    return done, remainder


class HostCommandAgent:
    """Runs ``argv`` on the host with the prompt on stdin; stdout is the answer."""

    name = "command"

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stderr_lines: int = 20,
        kill_grace_s: float = 5.0,
        procs: ProcessTracker | None = None,
    ) -> None:
        if not argv:
            raise ValueError("argv must not be empty")
        self.argv = list(argv)
        self._env = env
        self._stderr_lines = stderr_lines
        self._kill_grace_s = kill_grace_s
        # Without a store-backed tracker runs are still grouped, tagged and killed as a
        # whole, only not recorded for recovery after a crash.
        self.procs = procs or ProcessTracker()

    def run(self, request: RunRequest) -> HostCommandRun:
        return HostCommandRun(self, request)

    def environment(self, request: RunRequest) -> dict[str, str]:
        base = dict(os.environ if self._env is None else self._env)
        # podbay's own settings can hold platform tokens; the agent must never see them.
        env = {k: v for k, v in base.items() if not k.startswith("PODBAY_")}
        env["PODBAY_PROJECT"] = request.project
        return env


class HostCommandRun:
    def __init__(self, agent: HostCommandAgent, request: RunRequest) -> None:
        self._agent = agent
        self._request = request
        self._tracked: TrackedProcess | None = None
        self._stderr: deque[str] = deque(maxlen=agent._stderr_lines)
        self._cancelled = False
        self._stopping: asyncio.Task[list[int]] | None = None

    @property
    def pid(self) -> int | None:
        return self._tracked.pid if self._tracked else None

    def __aiter__(self) -> AsyncIterator[AgentEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[AgentEvent]:
        if self._cancelled:
            return
        procs = self._agent.procs
        request = self._request
        if request.workdir is not None and not request.project:
            # Without a project: the conversation's scratch directory, made on first use.
            await asyncio.to_thread(request.workdir.mkdir, parents=True, exist_ok=True, mode=0o700)
        try:
            tracked = await procs.spawn(
                *self._agent.argv,
                kind="agent",
                detail=Path(self._agent.argv[0]).name,
                project=request.project,
                session=request.session,
                run_id=request.run_id,
                cwd=request.workdir,
                env=self._agent.environment(request),
                stdin=PIPE,
                stdout=PIPE,
                stderr=PIPE,
            )
        except OSError as exc:
            yield FinishedEvent(
                ok=False, error=f"cannot start agent {self._agent.argv[0]!r}: {exc.strerror}"
            )
            return
        self._tracked = tracked
        assert tracked.stdin and tracked.stdout and tracked.stderr
        # Writing the prompt while reading the answer: an agent that echoes as it reads
        # (``cat``) fills the stdout pipe before it has read a large prompt.
        writer = asyncio.create_task(_write_prompt(tracked.stdin, request.prompt.encode()))
        stderr_task = asyncio.create_task(self._drain_stderr(tracked.stderr))
        # When the leader exits, whatever it left behind is killed, so the pipes reach EOF
        # even if a stray child held them open.
        reaper = asyncio.create_task(procs.finish(tracked))
        finished = False
        # Incremental: a read can end inside a multibyte character; its bytes wait for the
        # next read instead of each half becoming U+FFFD.
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            buffer = ""
            while chunk := await tracked.stdout.read(65536):
                buffer += decoder.decode(chunk)
                done, buffer = paragraphs(buffer, final=False)
                for text in done:
                    yield TextEvent(text)
            buffer += decoder.decode(b"", final=True)
            done, _ = paragraphs(buffer, final=True)
            for text in done:
                yield TextEvent(text)
            code = await tracked.wait_exit()
            survivors = await reaper
            await asyncio.wait([stderr_task], timeout=KILL_VERIFY_S)
            finished = True
        finally:
            for task in (writer, stderr_task, reaper):
                if not task.done():
                    task.cancel()
            await asyncio.gather(writer, stderr_task, reaper, return_exceptions=True)
            if not finished:
                # Closed or cancelled mid-run: stop the tree (with its grace) in the
                # background; cancel() waits for exactly this.
                self._stop_in_background()
            else:
                tracked.close()
        if survivors:
            raise ProcessesSurvived("agent run", survivors)
        if code == 0:
            yield FinishedEvent(ok=True, exit_code=0)
        else:
            tail = "\n".join(self._stderr)
            yield FinishedEvent(ok=False, exit_code=code, error=tail or f"exit status {code}")

    async def _drain_stderr(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self._stderr.append(line.decode(errors="replace").rstrip("\n"))

    def _stop_in_background(self) -> asyncio.Task[list[int]]:
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop(), name="agent-stop")
        return self._stopping

    async def _stop(self) -> list[int]:
        tracked = self._tracked
        if tracked is None:
            return []
        try:
            return await self._agent.procs.kill_tree(tracked, self._agent._kill_grace_s)
        finally:
            tracked.close()

    async def cancel(self) -> None:
        """Stop the run: SIGTERM to every process of it, SIGKILL to what is left once the
        agent itself has exited or after the grace period. Returns when nothing of the run
        is left; raises :class:`ProcessesSurvived` if something could not be killed.
        """
        self._cancelled = True
        if self._tracked is None:
            return
        # Shielded: a second cancellation of the caller must not leave the tree half-killed.
        survivors = await asyncio.shield(self._stop_in_background())
        if survivors:
            raise ProcessesSurvived("agent run", survivors)


async def _write_prompt(stdin: asyncio.StreamWriter, data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stdin.write(data)
        await stdin.drain()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stdin.close()


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``, from /proc (Linux)."""
    return [p.pid for p in snapshot().values() if p.pgid == pgid]


def build_agent(
    command: Sequence[str],
    preset: str = "command",
    where: str = "host",
    *,
    procs: ProcessTracker | None = None,
    stop_grace_s: float = 5.0,
) -> Agent:
    """The host agent described by ``[agent]``; its processes go through ``procs``, and a
    stop gives them ``stop_grace_s`` after SIGTERM before SIGKILL."""
    if preset != "command" or where != "host":
        raise NotConfigured(f"agent preset {preset!r} where {where!r} runs in containers")
    if not command:
        return NoAgent()
    return HostCommandAgent(command, procs=procs, kill_grace_s=stop_grace_s)
