"""The run service: executes one agent run for the dispatcher.

It picks the runner for the conversation's active project (on the host or in the project's
container), tells the agent what happened to the project since the conversation's last turn,
records the run and each of its events, and owns cancellation: a cancelled run is stopped
(every process of it) before the cancellation returns. The dispatcher only decides *when*
a run happens and relays the events it yields.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from podbay.config import Settings
from podbay.engine.agents import (
    Agent,
    AgentEvent,
    AgentRun,
    FinishedEvent,
    NoticeEvent,
    RunRequest,
    TextEvent,
    ToolEvent,
)
from podbay.engine.procs import ProcessesSurvived
from podbay.engine.store import ProjectRow, SessionRow, Store
from podbay.errors import UserError
from podbay.messages import SessionKey
from podbay.redact import redact

log = logging.getLogger(__name__)

Notify = Callable[[SessionKey, str], Awaitable[None]]
# Picks the runner for a project (None: no active project); raises UserError when none fits.
RunnerFor = Callable[[ProjectRow | None], Agent]


@dataclass(frozen=True)
class RunPlan:
    """Everything a run needs, decided before it starts."""

    run_id: int
    session: SessionKey
    prompt: str
    project: ProjectRow | None
    session_row: SessionRow
    workdir: Path


class RunService:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        runner_for: RunnerFor,
        *,
        notify: Notify | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self.runner_for = runner_for
        # Where survivors of a stop are reported (the dispatcher sets it to its send).
        self.notify = notify
        self._clock = clock

    async def context_note(self, project: ProjectRow | None, session_row: SessionRow) -> str:
        """One short note of what happened to the project since this conversation's last
        turn ("" when nothing did, or on the first turn)."""
        if project is None or not session_row.last_turn_at:
            return ""
        events = await self.store.events_since(project.name, session_row.last_turn_at)
        if not events:
            return ""
        items = "; ".join(
            f"{e.text} ({time.strftime('%H:%M', time.localtime(e.at))})" for e in events
        )
        return f"[podbay: since your last turn in this conversation: {items}.]\n\n"

    async def execute(self, plan: RunPlan) -> AsyncIterator[AgentEvent]:
        """Run the agent; yields its events (redacted) and last a FinishedEvent.

        Raises UserError before anything starts when no runner fits (no active project for
        a container agent, no agent configured); the run is then recorded as failed.
        """
        try:
            agent = self.runner_for(plan.project)
        except UserError as exc:
            await self.store.session_mark_turn(plan.session, self._clock())
            await self.store.run_finish(plan.run_id, "failed", error=str(exc))
            raise
        note = await self.context_note(plan.project, plan.session_row)
        project = plan.project
        request = RunRequest(
            prompt=note + plan.prompt,
            run_id=plan.run_id,
            session=str(plan.session),
            project=project.name if project else "",
            workdir=plan.workdir,
            container=project.container_id if project else "",
            session_state=(
                {"agent_session_id": plan.session_row.agent_sessions[project.name]}
                if project and project.name in plan.session_row.agent_sessions
                else {}
            ),
        )
        if project is not None and request.session_state:
            # Codex reports usage summed over its whole thread: the runner subtracts what
            # the previous run of this conversation reported.
            previous = await self.store.runs_recent(
                project=project.name, session=plan.session, limit=2
            )
            earlier = [r for r in previous if r.id != plan.run_id]
            totals = earlier[0].usage.get("thread_totals") if earlier else None
            if isinstance(totals, dict):
                request = replace(
                    request,
                    session_state={**request.session_state, "thread_totals": json.dumps(totals)},
                )
        run: AgentRun | None = None
        finished: FinishedEvent | None = None
        try:
            run = agent.run(request)
            # One write: the run began, and so did the conversation's turn (its "last
            # activity" in status, and where the next turn's context note starts).
            # Neither this nor the events are waited for: run_finish, committed after them
            # (in order), is.
            await self.store.run_start(plan.run_id, turn=plan.session, wait=False)
            async with asyncio.timeout(self.settings.agent.timeout_s):
                async for event in run:
                    if isinstance(event, FinishedEvent):
                        finished = event
                        continue
                    event = _redacted(event)
                    await self.store.run_event(plan.run_id, _kind(event), _text(event), wait=False)
                    yield event
        except asyncio.CancelledError:
            survivors = await self._stop(run, plan.session)
            error = "stopped" + (f"; still running: {survivors}" if survivors else "")
            await self.store.run_finish_if_active(plan.run_id, "cancelled", error=error)
            raise
        except TimeoutError:
            await self._stop(run, plan.session)
            finished = FinishedEvent(
                ok=False,
                error=f"timed out after {self.settings.agent.timeout_s} s; stopped",
                failure="timeout",
            )
        except UserError as exc:
            # Not the agent failing but podbay unable to start it: say only why.
            await self._stop(run, plan.session)
            await self.store.run_finish(plan.run_id, "failed", error=str(exc))
            raise
        except Exception as exc:
            ref = secrets.token_hex(4)
            log.exception("agent run %s failed [ref %s]", plan.run_id, ref)
            await self._stop(run, plan.session)
            finished = FinishedEvent(
                ok=False, error=f"internal error (ref {ref}): {exc}", failure="internal"
            )
        if finished is None:
            finished = FinishedEvent(ok=False, error="the agent ended without a result")
        finished = FinishedEvent(
            ok=finished.ok,
            exit_code=finished.exit_code,
            error=redact(finished.error),
            usage=finished.usage,
            cost_usd=finished.cost_usd,
            agent_session_id=finished.agent_session_id,
            num_turns=finished.num_turns,
            failure=finished.failure,
        )
        # Not waited for either: the caller's next write (the dispatcher marks the run's
        # messages done) is committed after it, and every read sees it.
        await self.store.run_finish(
            plan.run_id,
            "succeeded" if finished.ok else "failed",
            wait=False,
            exit_code=finished.exit_code,
            error=finished.error,
            usage=dict(finished.usage),
            cost_usd=finished.cost_usd,
            num_turns=finished.num_turns,
        )
        if finished.agent_session_id and project is not None:
            await self.store.session_set_agent_session(
                plan.session, project.name, finished.agent_session_id
            )
        yield finished

    async def _stop(self, run: AgentRun | None, session: SessionKey) -> str:
        """Stop ``run``; processes that survive it are reported, never silently left."""
        if run is None:
            return ""
        try:
            await run.cancel()
        except ProcessesSurvived as exc:
            pids = ", ".join(str(p) for p in exc.pids)
            log.error("processes of an agent run in %s survived the stop: %s", session, pids)
            if self.notify is not None:
                await self.notify(
                    session,
                    f"Stopping the agent left processes running (pids {pids}); podbay "
                    "could not kill them. Check with `ps`, and tell an admin.",
                )
            return pids
        return ""


def _redacted(event: AgentEvent) -> AgentEvent:
    # Agents echo what they were given; a secret shape never leaves podbay.
    if isinstance(event, TextEvent):
        return TextEvent(redact(event.text))
    if isinstance(event, ToolEvent):
        return ToolEvent(event.name, redact(event.summary), redact(event.detail))
    if isinstance(event, NoticeEvent):
        return NoticeEvent(redact(event.text))
    return event


def _kind(event: AgentEvent) -> str:
    if isinstance(event, ToolEvent):
        return "tool"
    if isinstance(event, NoticeEvent):
        return "notice"
    return "text"


def _text(event: AgentEvent) -> str:
    if isinstance(event, ToolEvent):
        return event.summary
    if isinstance(event, TextEvent | NoticeEvent):
        return event.text
    return ""
