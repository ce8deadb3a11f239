"""The coding agent inside a project's container.

A run is a ``docker exec`` in the project's container, as ``dev``, in ``/workspace``, with
``HOME`` on the project's home volume (the CLIs keep their sessions there, so a later turn
can resume). The CLI itself is podbay's read-only copy under ``/opt/podbay/agents``. The
``[agent.env]`` values go to that exec only: never into the container's configuration, a
log line, a stored row or a reply. Every process of the run carries a tag, so a stop finds
and kills all of them, inside the container, and checks that none is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

from podbay.config import AgentConfig
from podbay.engine.agent_cli import AgentCliStore
from podbay.engine.agents import (
    AgentEvent,
    FinishedEvent,
    NoticeEvent,
    RunRequest,
    TextEvent,
    paragraphs,
)
from podbay.engine.docker import DockerProvisioner, ExecStream
from podbay.engine.presets import AgentPreset, StreamParser, preset_for
from podbay.engine.procs import ProcessesSurvived
from podbay.errors import UserError

log = logging.getLogger(__name__)

# On the project's home volume (mounted at /home/dev/.podbay), so it survives restarts and
# rebuilds: Claude Code keeps its sessions in ~/.claude, Codex in ~/.codex.
AGENT_HOME = "/home/dev/.podbay/agent-home"
_MISSING_CLI_EXIT = 127
# Runs the CLI from /workspace with HOME created; says so when the CLI is not mounted (a
# container created before podbay mounted its agents).
_WRAPPER = (
    'mkdir -p "$HOME" && cd /workspace || exit 1; '
    'case "$1" in /*) if [ ! -x "$1" ]; then '
    'echo "podbay: agent CLI missing at $1" >&2; exit 127; fi;; esac; '
    'exec "$@"'
)


class CommandParser:
    """The ``command`` preset in a container: stdout is the answer, paragraph by paragraph."""

    conversation_missing = False

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, line: str) -> list[AgentEvent]:
        done, self._buffer = paragraphs(self._buffer + line + "\n", final=False)
        return [TextEvent(t) for t in done]

    def finish(self, exit_code: int, stderr_tail: str) -> FinishedEvent:
        done, _ = paragraphs(self._buffer, final=True)
        self.tail = [TextEvent(t) for t in done]
        if exit_code == 0:
            return FinishedEvent(ok=True, exit_code=0)
        return FinishedEvent(
            ok=False,
            exit_code=exit_code,
            error=stderr_tail or f"exit status {exit_code}",
            failure="execution",
        )


class _Parser(Protocol):
    conversation_missing: bool

    def feed(self, line: str) -> list[AgentEvent]: ...

    def finish(self, exit_code: int, stderr_tail: str) -> FinishedEvent: ...


class ContainerAgent:
    """Runs the configured preset (claude, codex or a command) in project containers."""

    def __init__(
        self,
        provisioner: DockerProvisioner,
        clis: AgentCliStore,
        config: AgentConfig,
        *,
        user: str,
        container_for: Callable[[RunRequest], str],
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name: str = config.preset
        self.provisioner = provisioner
        self.clis = clis
        self.config = config
        self.user = user
        self.container_for = container_for
        # Resolved once at start ([agent.env] with its *_FILE entries read).
        self._env = dict(env if env is not None else config.resolved_env())

    def run(self, request: RunRequest) -> ContainerRun:
        return ContainerRun(self, request)


class ContainerRun:
    def __init__(self, agent: ContainerAgent, request: RunRequest) -> None:
        self._agent = agent
        self._request = request
        self._container = agent.container_for(request)
        self._tags: list[str] = []
        self._stream: ExecStream | None = None

    def __aiter__(self) -> AsyncIterator[AgentEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[AgentEvent]:
        agent = self._agent
        config = agent.config
        resume = self._request.session_state.get("agent_session_id") or None
        if config.preset == "command":
            if not config.command:
                raise UserError(
                    'No agent command is configured: set `[agent] command = ["your-agent"]`.'
                )
            async for event in self._exec(list(config.command), CommandParser(), {}):
                yield event
            return
        preset = preset_for(config.preset)
        if await asyncio.to_thread(agent.clis.lookup, config.preset, config.version) is None:
            yield NoticeEvent(
                f"Fetching the {config.preset} CLI (first use only; every project shares it)…"
            )
        cli = await agent.clis.ensure(config.preset, config.version)
        while True:
            argv = preset.argv(
                self._request, resume_id=resume, config=config, executable=cli.container_path
            )
            parser = preset.parser()
            async for event in self._exec(argv, parser, preset.env(config), preset):
                if isinstance(event, FinishedEvent) and parser.conversation_missing and resume:
                    break  # retried below, without the lost conversation
                yield event
            else:
                return
            resume = None
            yield NoticeEvent(
                "The earlier agent conversation was not found in this container (a new "
                "home volume?); started a fresh agent session."
            )

    async def _exec(
        self,
        argv: list[str],
        parser: _Parser | StreamParser,
        preset_env: Mapping[str, str],
        preset: AgentPreset | None = None,
    ) -> AsyncIterator[AgentEvent]:
        agent = self._agent
        # podbay's own settings never reach the agent; the preset's defaults come first so
        # that [agent.env] can override them.
        env = {"HOME": AGENT_HOME, **preset_env, **agent._env}
        env = {k: v for k, v in env.items() if not k.startswith("PODBAY_")}
        tag = f"r{self._request.run_id or 0}-{secrets.token_hex(6)}"
        self._tags.append(tag)
        stdin = preset.stdin(self._request) if preset is not None else self._request.prompt.encode()
        stream = await agent.provisioner.exec_stream(
            self._container,
            ["sh", "-c", _WRAPPER, "podbay-agent", *argv],
            user=agent.user,
            env=env,
            tag=tag,
        )
        self._stream = stream
        stderr: deque[str] = deque(maxlen=20)
        writer = asyncio.create_task(_feed(stream, stdin))
        # Both streams are cut into lines before decoding: b"\n" never occurs inside a UTF-8
        # multibyte sequence, so a character split across two frames is joined again first.
        pending = b""
        pending_err = b""
        try:
            while (chunk := await stream.read()) is not None:
                which, data = chunk
                if which == "stderr":
                    pending_err += data
                    *err_lines, pending_err = pending_err.split(b"\n")
                    # Only the tail of stderr is ever shown: a line without end stays bounded.
                    pending_err = pending_err[-65536:]
                    for raw in err_lines:
                        if raw.strip():
                            stderr.append(raw.decode(errors="replace").rstrip("\r"))
                    continue
                pending += data
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    for event in parser.feed(raw.decode(errors="replace")):
                        yield event
            if pending:
                for event in parser.feed(pending.decode(errors="replace")):
                    yield event
            if pending_err.strip():
                stderr.append(pending_err.decode(errors="replace"))
            code = await stream.wait()
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
        tail = "\n".join(stderr)
        if code == _MISSING_CLI_EXIT and "podbay: agent CLI missing" in tail:
            project = self._request.project or "the project"
            raise UserError(
                f"This container has no agent CLI mounted (it was created before podbay ran "
                f"agents in containers): `rebuild {project}` recreates it with the same "
                "source, keys and port."
            )
        finished = parser.finish(code, tail)
        if preset is not None and preset.name == "codex" and finished.usage:
            finished = _per_run_usage(finished, self._request.session_state)
        if isinstance(parser, CommandParser):
            for event in parser.tail:
                yield event
        yield finished

    async def cancel(self) -> None:
        """SIGTERM to every process of the run in the container, SIGKILL after
        ``agent.stop_grace_s``, and a check that none is left (ProcessesSurvived if so)."""
        agent = self._agent
        survivors: list[int] = []
        for tag in self._tags:
            survivors += await agent.provisioner.kill_tagged(
                self._container, tag, grace_s=agent.config.stop_grace_s, user=agent.user
            )
        if self._stream is not None:
            with contextlib.suppress(Exception):
                await self._stream.close()
        if survivors:
            raise ProcessesSurvived(f"agent run in {self._container}", survivors)


async def _feed(stream: ExecStream, data: bytes) -> None:
    try:
        await stream.write(data)
    finally:
        await stream.close_stdin()


def _per_run_usage(finished: FinishedEvent, session_state: Mapping[str, str]) -> FinishedEvent:
    """Codex's ``turn.completed`` usage counts the whole thread: keep those totals (for the
    next run to subtract) and report this run's share."""
    totals = {k: v for k, v in finished.usage.items() if isinstance(v, int)}
    try:
        before = json.loads(session_state.get("thread_totals", "{}"))
    except ValueError:
        before = {}
    if not isinstance(before, dict):
        before = {}
    usage: dict[str, Any] = {
        k: max(0, v - int(before.get(k, 0) or 0)) if isinstance(before.get(k, 0), int) else v
        for k, v in totals.items()
    }
    usage["thread_totals"] = totals
    return dataclasses.replace(finished, usage=usage)
