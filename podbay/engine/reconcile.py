"""Reconcile the registry with the containers podbay created (at start and periodically).

- A project left half-created by a crash (or reserved by a plan that never ran) is rolled
  back: exactly what its job recorded as created is removed.
- A dead or missing container is reported once to the conversations using the project.
- Nothing podbay did not create is ever deleted: unknown containers are only reported.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from podbay.engine.lifecycle import ProjectManager
from podbay.messages import SessionKey

log = logging.getLogger(__name__)

Notify = Callable[[SessionKey, str], Awaitable[None]]


class Reconciler:
    def __init__(
        self, manager: ProjectManager, notify: Notify, busy: Callable[[str], bool]
    ) -> None:
        self.manager = manager
        self.notify = notify
        self.busy = busy  # a project with a running job is left to that job
        self._reported: dict[str, str] = {}

    async def run_once(self) -> list[str]:
        """One pass; returns a line per action taken (for logs and tests)."""
        store = self.manager.store
        actions: list[str] = []
        containers = {c.project: c for c in await self.manager.managed_containers()}
        for row in await store.project_list():
            if self.busy(row.name) or self.manager.is_reserved(row.name):
                # A job, or a plan of this process about to start one, owns the row.
                continue
            if row.state == "creating":
                await self.manager.recover_half_created(row)
                actions.append(f"rolled back half-created {row.name}")
                continue
            info = containers.get(row.name)
            problem = None
            if info is None:
                problem = "its container is missing"
            elif info.state in ("exited", "dead"):
                problem = f"its container is {info.label}"
            if problem is None:
                self._reported.pop(row.name, None)
                continue
            if self._reported.get(row.name) == problem:
                continue
            self._reported[row.name] = problem
            actions.append(f"{row.name}: {problem}")
            await store.event_add(row.name, "container", problem)
            for key in await store.sessions_using(row.name):
                await self.notify(
                    key,
                    f"⚠ Project `{row.name}`: {problem}. `restart {row.name}` or "
                    f"`rebuild {row.name}` brings it back; `logs {row.name}` shows why.",
                )
        return actions
