"""Engine jobs: long project operations (new project, delete, restart, rebuild).

One job at a time per project. Each job is a row in the store whose steps are recorded as
they happen, so a crash in the middle can be recovered. Jobs run as background tasks and
never block a session's freeform lane.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from podbay.engine.store import Store
from podbay.errors import BusyError, UserError
from podbay.messages import SessionKey

log = logging.getLogger(__name__)

Notify = Callable[[str], Awaitable[None]]

# What a finished job means for the project's agent (told at the conversation's next turn).
_DONE = {
    "new project": "the project was created",
    "restart": "the container was restarted",
    "rebuild": "the container was rebuilt (a fresh container; the source and home are kept)",
}


class JobHandle:
    """Given to a job's work function: record steps and tell the requester."""

    def __init__(self, store: Store, job_id: int, project: str, notify: Notify) -> None:
        self._store = store
        self.id = job_id
        self.project = project
        self._notify = notify

    async def step(self, name: str, detail: str = "", *, tell: bool = False) -> None:
        await self._store.job_step(self.id, name, "done", detail)
        if tell:
            await self.progress(detail or name)

    async def progress(self, text: str) -> None:
        await self._notify(text)


Work = Callable[[JobHandle], Awaitable[str]]


@dataclass(frozen=True)
class RunningJob:
    id: int
    kind: str
    project: str
    task: asyncio.Task[None]
    started_at: float  # wall clock, shown to users as "since 14:02:11"


class JobRunner:
    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._running: dict[str, RunningJob | None] = {}

    def running(self) -> list[RunningJob]:
        return [job for job in self._running.values() if job is not None]

    def busy(self, project: str) -> str | None:
        job = self._running.get(project)
        if project in self._running:
            return job.kind if job else "job"
        return None

    def ensure_idle(self, project: str) -> None:
        """Raise :class:`BusyError` naming the running job and since when, if one runs."""
        if project not in self._running:
            return
        job = self._running[project]
        if job is None:  # reserved by a submit that is still recording its row
            raise BusyError(f"busy: a job is starting for {project}; try again in a moment.")
        since = time.strftime("%H:%M:%S", time.localtime(job.started_at))
        age = max(0, int(self._clock() - job.started_at))
        ago = f"{age} s" if age < 120 else f"{age // 60} min"
        raise BusyError(
            f"busy: {job.kind} running for {project} since {since} ({ago} ago); "
            "try again when it has finished (`status` shows it)."
        )

    async def submit(
        self,
        project: str,
        kind: str,
        work: Work,
        *,
        session: SessionKey | None,
        requested_by: str,
        notify: Notify,
        params: dict[str, object] | None = None,
    ) -> int:
        """Start ``work`` in the background; raises :class:`BusyError` if a job runs."""
        self.ensure_idle(project)
        # Reserve before the first await so two submits cannot both pass the check.
        self._running[project] = None
        try:
            job_id = await self._store.job_create(
                project, kind, session=session, requested_by=requested_by, params=params
            )
        except BaseException:
            del self._running[project]
            raise
        handle = JobHandle(self._store, job_id, project, notify)
        task = asyncio.create_task(self._run(handle, kind, work), name=f"job-{kind}-{project}")
        self._running[project] = RunningJob(job_id, kind, project, task, self._clock())
        return job_id

    async def _run(self, handle: JobHandle, kind: str, work: Work) -> None:
        try:
            await self._store.job_start(handle.id)
            result = await work(handle)
        except asyncio.CancelledError:
            await asyncio.shield(self._store.job_finish(handle.id, "interrupted", "cancelled"))
            raise
        except UserError as exc:
            await self._store.job_finish(handle.id, "failed", str(exc))
            await self._event(handle.project, "job failed", f"`{kind}` failed: {exc}")
            await self._tell(handle, f"{kind} {handle.project} failed: {exc}")
        except Exception as exc:
            ref = secrets.token_hex(4)
            log.exception("job %s (%s %s) failed [ref %s]", handle.id, kind, handle.project, ref)
            await self._store.job_finish(handle.id, "failed", f"{type(exc).__name__}: {exc}")
            await self._event(handle.project, "job failed", f"`{kind}` failed (internal error)")
            await self._tell(handle, f"{kind} {handle.project} failed (internal error, ref {ref}).")
        else:
            await self._store.job_finish(handle.id, "succeeded")
            if kind in _DONE:
                await self._event(handle.project, kind, _DONE[kind])
            if result:
                await self._tell(handle, result)
        finally:
            self._running.pop(handle.project, None)

    async def _event(self, project: str, kind: str, text: str) -> None:
        """Record what happened to the project; the agent hears of it at its next turn."""
        try:
            await self._store.event_add(project, kind, text[:300])
        except Exception:
            log.exception("could not record event %r of %s", kind, project)

    @staticmethod
    async def _tell(handle: JobHandle, text: str) -> None:
        try:
            await handle.progress(text)
        except Exception:
            log.exception("could not report the end of job %s", handle.id)

    async def wait_idle(self) -> None:
        while tasks := [job.task for job in self.running()]:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def cancel_all(self) -> None:
        tasks = [job.task for job in self.running()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
