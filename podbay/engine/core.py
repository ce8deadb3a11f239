"""The engine: owns state and side effects; knows nothing about chat platforms."""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field

from podbay.config import Settings
from podbay.engine.agent_cli import AgentCliStore
from podbay.engine.agents import Agent, NoAgent, build_agent
from podbay.engine.container_agent import ContainerAgent
from podbay.engine.docker import ContainerInfo, DockerProvisioner
from podbay.engine.jobs import JobRunner
from podbay.engine.lifecycle import ContainerStats, ProjectManager, instance_id
from podbay.engine.procs import ProcessTracker
from podbay.engine.runs import RunService
from podbay.engine.stacks import dev_ids
from podbay.engine.store import JobRow, ProjectRow, RunRow, SessionRow, Store
from podbay.errors import EngineError, NotConfigured, UserError
from podbay.messages import SessionKey
from podbay.redact import remember_secrets


@dataclass(frozen=True)
class StatusReport:
    projects: list[ProjectRow]
    active_runs: list[RunRow]
    queue_depths: dict[str, int]
    jobs: list[JobRow]
    containers: dict[str, ContainerInfo] = field(default_factory=dict)
    orphans: list[ContainerInfo] = field(default_factory=list)
    stats: dict[str, ContainerStats] = field(default_factory=dict)
    sessions: list[SessionRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        agent: Agent | None = None,
        provisioner: DockerProvisioner | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        # Every secret of the configuration ([agent.env], each transport's tokens).
        remember_secrets(settings.secret_values())
        # Every child podbay starts goes through this tracker: recorded in the store, killed
        # as a whole tree, and found again after a crash (kill_survivors at start-up).
        self.procs = ProcessTracker(store, scope=f"podbay-{instance_id(settings.data_dir)}")
        # The host agent (command preset); container runners are picked per project.
        self.agent = agent or (
            build_agent(
                settings.agent.command,
                procs=self.procs,
                stop_grace_s=settings.agent.stop_grace_s,
            )
            if settings.agent.where == "host"
            else NoAgent()
        )
        self._explicit_agent = agent is not None
        self.agent_clis = AgentCliStore(settings.data_dir, procs=self.procs)
        self._container_agent: ContainerAgent | None = None
        self.provisioner = provisioner
        self.runs = RunService(store, settings, self.runner_for)
        self.jobs = JobRunner(store)
        self.projects = (
            ProjectManager(store, settings, provisioner, procs=self.procs)
            if provisioner is not None
            else None
        )

    # -- agents -----------------------------------------------------------------------

    @property
    def agent_name(self) -> str:
        """What runs.agent records: the test's agent, or the configured preset."""
        if self._explicit_agent or self.settings.agent.where == "host":
            return self.agent.name
        return str(self.settings.agent.preset)

    def runner_for(self, project: ProjectRow | None) -> Agent:
        """The agent that runs freeform text of a conversation whose project is ``project``."""
        if self._explicit_agent or self.settings.agent.where == "host":
            return self.agent
        if project is None:
            raise UserError(
                "No active project: `use <project>` picks one, or `new project <name>` "
                "creates one. The coding agent runs inside a project's container."
            )
        if self.projects is None:
            raise NotConfigured(
                "Agents run inside project containers, and no Docker engine is configured "
                "(see `podbay doctor`)."
            )
        if self._container_agent is None:
            manager = self.projects
            uid, gid = dev_ids()
            self._container_agent = ContainerAgent(
                manager.docker,
                self.agent_clis,
                self.settings.agent,
                user=f"{uid}:{gid}",
                container_for=lambda request: (
                    request.container or manager.container_name(request.project)
                ),
            )
        return self._container_agent

    async def recent_runs(self, project: str | None = None, limit: int = 10) -> list[RunRow]:
        return await self.store.runs_recent(project=project, limit=limit)

    async def run_details(self, run_id: int, lines: int = 20) -> tuple[RunRow, list[str]]:
        """A run and the last ``lines`` of what it said."""
        run = await self.store.run_get(run_id)
        if run is None:
            raise UserError(f"No run #{run_id}; `runs` lists the recent ones.")
        events = await self.store.run_events(run_id)
        return run, [data for _, _, data in events[-lines:]]

    async def delete_run(self, run_id: int) -> RunRow:
        """Delete a finished run; an active one is refused, naming its status."""
        run = await self.store.run_delete(run_id)
        if run is None:
            raise UserError(f"No run #{run_id}; `runs` lists the recent ones.")
        if run.status in ("pending", "running"):
            raise UserError(
                f"Run #{run_id} is {run.status}: it cannot be deleted while it runs. "
                "`stop` it first (in its conversation), then delete it."
            )
        return run

    async def verbosity(self, session: SessionKey) -> int:
        return (await self.store.session_get(session)).verbose

    async def set_verbosity(self, session: SessionKey, level: int) -> None:
        await self.store.session_set_verbose(session, level)

    # -- projects ---------------------------------------------------------------------

    async def project(self, name: str) -> ProjectRow:
        row = await self.store.project_get(name)
        if row is None:
            names = [p.name for p in await self.store.project_list()]
            close = difflib.get_close_matches(name, names, n=1)
            if close:
                hint = f" Did you mean `{close[0]}`?"
            elif names:
                hint = f" Projects: {', '.join(names)}."
            else:
                hint = " There are no projects yet: `new project <name>` creates one."
            raise UserError(f"No project named `{name[:40]}`.{hint}")
        return row

    async def active_project(self, session: SessionKey) -> ProjectRow | None:
        row = await self.store.session_get(session)
        if row.active_project is None:
            return None
        return await self.store.project_get(row.active_project)

    async def use_project(self, session: SessionKey, name: str | None) -> ProjectRow | None:
        """Make ``name`` the session's active project (None clears it)."""
        project = await self.project(name) if name is not None else None
        await self.store.session_set_project(session, project.name if project else None)
        return project

    def ensure_no_job(self, project: str) -> None:
        """Raise :class:`BusyError` (what runs, since when) if ``project`` has a job running."""
        self.jobs.ensure_idle(project)

    async def container_logs(self, project: str, lines: int) -> str:
        """The last ``lines`` lines of ``project``'s container log."""
        # The manager says "container missing, rebuild recreates it" instead of a 404.
        return await self.require_projects().logs(project, lines)

    async def git_summary(self, project: ProjectRow) -> str | None:
        """One line on the project's git state, or None without a provisioner."""
        if self.projects is None:
            return None
        # Read inside the container as dev: host git must never open a tree it can write.
        return await self.projects.git_status(project)

    def require_projects(self) -> ProjectManager:
        if self.projects is None:
            raise NotConfigured(
                "No container provisioner is configured, so projects cannot be created or "
                "deleted. Start podbay with Docker available (see `podbay doctor`)."
            )
        return self.projects

    # -- status -----------------------------------------------------------------------

    async def status(self) -> StatusReport:
        projects = await self.store.project_list()
        containers: dict[str, ContainerInfo] = {}
        orphans: list[ContainerInfo] = []
        notes: list[str] = []
        stats: dict[str, ContainerStats] = {}
        if self.projects is not None:
            try:
                # One engine call for every container, however many projects there are.
                mine = await self.projects.managed_containers()
            except EngineError as exc:
                notes.append(f"Docker: {exc}")
            else:
                known = {p.name for p in projects}
                for info in mine:
                    if info.project in known:
                        containers[info.project] = info
                    else:
                        orphans.append(info)
            stats = dict(self.projects.stats_cache)
        return StatusReport(
            projects=projects,
            active_runs=await self.store.runs_active(),
            queue_depths=await self.store.queue_depths(),
            jobs=await self.store.jobs_active(),
            containers=containers,
            orphans=orphans,
            stats=stats,
            sessions=await self.store.sessions_recent(time.time() - 86400),
            notes=notes,
        )
