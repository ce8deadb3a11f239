"""Coding-agent runners.

An :class:`Agent` starts runs; an :class:`AgentRun` is an async iterator of
:class:`AgentEvent` values with a ``cancel()`` that returns only once the agent's
process is gone. The ``command`` preset with ``where = "host"`` runs a configured argv on
this machine with the prompt on stdin. Container runners and Claude Code / Codex presets
plug in behind the same interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from podbay.errors import NotConfigured


@dataclass(frozen=True)
class RunRequest:
    """What an agent run needs to know."""

    prompt: str
    session: str = ""
    project: str = ""
    workdir: Path | None = None
    session_state: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TextEvent:
    """A chunk of the agent's answer (a whole paragraph or code block)."""

    text: str


@dataclass(frozen=True)
class FinishedEvent:
    """The last event of every run that was not cancelled."""

    ok: bool
    exit_code: int | None = None
    error: str = ""
    usage: Mapping[str, int] = field(default_factory=dict)
    cost_usd: float | None = None
    agent_session_id: str = ""


AgentEvent = TextEvent | FinishedEvent


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
    ) -> None:
        if not argv:
            raise ValueError("argv must not be empty")
        self.argv = list(argv)
        self._env = env
        self._stderr_lines = stderr_lines
        self._kill_grace_s = kill_grace_s

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
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr: deque[str] = deque(maxlen=agent._stderr_lines)
        self._cancelled = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def __aiter__(self) -> AsyncIterator[AgentEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[AgentEvent]:
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self._agent.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self._request.workdir,
                env=self._agent.environment(self._request),
                # Its own process group, so cancel() reaches the agent's children too.
                start_new_session=True,
            )
        except OSError as exc:
            yield FinishedEvent(
                ok=False, error=f"cannot start agent {self._agent.argv[0]!r}: {exc.strerror}"
            )
            return
        proc = self._proc
        assert proc.stdin and proc.stdout and proc.stderr
        stderr_task = asyncio.create_task(self._drain_stderr(proc.stderr))
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(self._request.prompt.encode())
                await proc.stdin.drain()
            proc.stdin.close()
            buffer = ""
            while chunk := await proc.stdout.read(65536):
                buffer += chunk.decode(errors="replace")
                done, buffer = paragraphs(buffer, final=False)
                for text in done:
                    yield TextEvent(text)
            done, _ = paragraphs(buffer, final=True)
            for text in done:
                yield TextEvent(text)
            code = await proc.wait()
            await stderr_task
        finally:
            if not stderr_task.done():
                stderr_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stderr_task
        if code == 0:
            yield FinishedEvent(ok=True, exit_code=0)
        else:
            tail = "\n".join(self._stderr)
            yield FinishedEvent(ok=False, exit_code=code, error=tail or f"exit status {code}")

    async def _drain_stderr(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self._stderr.append(line.decode(errors="replace").rstrip("\n"))

    async def cancel(self) -> None:
        """SIGTERM the agent's process group, SIGKILL after a grace period, and reap it."""
        self._cancelled = True
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        self._signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self._agent._kill_grace_s)
        except TimeoutError:
            self._signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
        # Children that ignored SIGTERM while their leader exited must not outlive the run.
        self._signal_group(proc.pid, signal.SIGKILL)
        # Signals are delivered asynchronously: wait until the kernel has really ended them.
        for _ in range(200):
            if not await asyncio.to_thread(group_members, proc.pid):
                break
            await asyncio.sleep(0.01)

    @staticmethod
    def _signal_group(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``, from /proc (Linux)."""
    members: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                stat = handle.read()
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, pgrp, ...
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            members.append(int(entry))
    return members


def build_agent(command: Sequence[str], preset: str = "command", where: str = "host") -> Agent:
    """The agent described by ``[agent]``."""
    if preset != "command" or where != "host":
        raise NotConfigured(f"agent preset {preset!r} where {where!r} is not available")
    if not command:
        return NoAgent()
    return HostCommandAgent(command)
