"""Project lifecycle: create, delete, restart, rebuild, and the trash.

`plan` checks everything and reserves name, source folder and SSH port in one store
transaction (a 'creating' row). The job records on that row what it creates, as it goes,
and a failure (or the reconciler after a crash) removes exactly those things and nothing
else: never a folder it did not make, never a folder another project points to.

The source folder is writable by the container, so host-side code treats it as hostile:
no host git in it, no following symlinks in it (creation and chown go through O_NOFOLLOW
directory descriptors), and repository state is read inside the container.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from podbay.config import Settings
from podbay.engine import git
from podbay.engine.docker import (
    ContainerInfo,
    ContainerSpec,
    DockerProvisioner,
    StatsSample,
    cpu_percent,
)
from podbay.engine.jobs import JobHandle
from podbay.engine.procs import ProcessTracker
from podbay.engine.projects import (
    check_cpus,
    parse_memory,
    split_url_credentials,
    validate_git_url,
    validate_name,
    validate_stack,
)
from podbay.engine.ssh import (
    HOST_KEY_MOUNT,
    HOST_KEY_NAME,
    SSH_USER,
    SshTarget,
    connection_info,
    generate_keypair,
    known_hosts_path,
    port_is_free,
    wait_for_port,
    write_known_hosts,
)
from podbay.engine.stacks import (
    ImageSpec,
    Stack,
    base_image_spec,
    detect_stack,
    dev_ids,
    discover_stacks,
    progress_line,
    stack_image_spec,
)
from podbay.engine.store import ProjectRow, Store
from podbay.errors import EngineError, StoreError, UserError
from podbay.messages import SessionKey
from podbay.transports.render import code_block

log = logging.getLogger(__name__)

Progress = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class NewProjectRequest:
    name: str
    requested_by: str  # "<transport>:<user id>"
    requester_name: str = ""
    session: SessionKey | None = None
    stack: str | None = None
    git_url: str | None = None
    path: str | None = None
    cpus: float | None = None
    memory: str | None = None
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Plan:
    """A validated request with its reservation (the 'creating' row); nothing else exists.

    ``request.git_url`` carries no password and ``request.token`` is None: the secret is
    only in ``credential``, which is written to the credentials file and nowhere else.
    """

    request: NewProjectRequest
    path: Path
    cpus: float
    memory: str
    ssh_port: int
    existed: bool  # the folder was there (empty) when checked
    identity: tuple[int, int] | None  # its (st_dev, st_ino) then
    notes: tuple[str, ...] = ()
    credential: tuple[str, str] | None = field(default=None, repr=False)  # (user, secret)
    # The folder is the source `delete` kept of an earlier project: taken over as it is
    # (no git runs on it, and a rollback leaves every file of it alone).
    adopted: bool = False


@dataclass(frozen=True)
class ContainerStats:
    cpu_percent: float | None  # None until two samples of the same container exist
    memory_bytes: int
    memory_limit: int
    sampled_at: float


@dataclass(frozen=True)
class Created:
    project: ProjectRow
    stack_reason: str
    identity_note: str
    connection: str
    token_note: str = ""


def _consume(task: asyncio.Task[StatsSample]) -> None:
    """Retrieve an abandoned stats read's outcome, so asyncio does not report it."""
    if not task.cancelled():
        task.exception()


def instance_id(data_dir: Path) -> str:
    """Labels this podbay's containers, so two podbays on one engine never mix them up."""
    return hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:10]


def parse_cpus(raw: str | None) -> float | None:
    """The number in ``--cpus``; its bounds (engine CPUs) are checked by ``plan``."""
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1
    if not 0 < value < float("inf"):
        raise UserError(f"--cpus takes a positive number such as 2 or 0.5, got {raw[:20]!r}.")
    return value


def check_memory(raw: str | None) -> str | None:
    if raw is not None:
        parse_memory(raw)
    return raw


class SourceChanged(UserError):
    """The source folder is no longer the one ``plan`` checked (e.g. a symlink now)."""


class SourceNotEmpty(UserError):
    """The source folder exists and holds files: podbay never takes over such a folder."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} already exists and is not an empty directory.")
        self.path = path


class ProjectManager:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        provisioner: DockerProvisioner,
        *,
        cancel_runs: Callable[[str], Awaitable[int]] | None = None,
        procs: ProcessTracker | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.docker = provisioner
        self.instance = instance_id(settings.data_dir)
        self.cancel_runs = cancel_runs
        self.procs = procs  # records git and ssh-keygen children (None: untracked)
        self._image_lock = asyncio.Lock()
        # known_hosts is rewritten whole from the store: one writer at a time, so a slow
        # rewrite can never land after (and undo) a newer one.
        self._known_hosts_lock = asyncio.Lock()
        # Names reserved by plan() in this process and not yet finished by create() or
        # release(): the reconciler must not take them for leftovers of a crash.
        self._reserved: set[str] = set()
        self._engine_cpus: int | None = None
        # Filled in the background by sample_stats(); status never waits on docker stats.
        self.stats_cache: dict[str, ContainerStats] = {}
        # The last raw read per project (with its container id): CPU use is a difference.
        self._stats_raw: dict[str, tuple[str, StatsSample]] = {}
        self._stats_reads: dict[str, asyncio.Task[StatsSample]] = {}  # the last read each
        self._stats_lock = asyncio.Lock()

    async def managed_containers(self) -> list[ContainerInfo]:
        """This podbay's containers (one engine call)."""
        return [c for c in await self.docker.list_managed() if c.instance == self.instance]

    async def sample_stats(self, *, timeout_s: float = 10.0, concurrency: int = 8) -> None:
        """Refresh CPU and memory of every running project container.

        The containers are read concurrently (at most ``concurrency`` engine calls at once,
        each a thread) and the whole cycle ends within ``timeout_s``: a container whose
        figures are late keeps its previous sample, whose age status shows. CPU use is the
        change between this sample and the previous one of the same container.
        """
        # One cycle at a time: each works out CPU use from the one before it.
        async with self._stats_lock:
            await self._sample_stats(timeout_s, concurrency)

    async def _sample_stats(self, timeout_s: float, concurrency: int) -> None:
        running = [c for c in await self.managed_containers() if c.state == "running"]
        limit = asyncio.Semaphore(concurrency)

        async def one(info: ContainerInfo) -> tuple[ContainerInfo, StatsSample | None]:
            late = self._stats_reads.get(info.project)
            if late is not None and not late.done():
                # Its last read has not come back (a thread blocked on the engine): another
                # would only pile up threads behind it.
                return info, None
            try:
                async with asyncio.timeout(timeout_s), limit:
                    read = asyncio.create_task(self.docker.stats(info.name))
                    read.add_done_callback(_consume)
                    self._stats_reads[info.project] = read
                    # shield: a timeout abandons the read; it still ends (and is consumed).
                    return info, await asyncio.shield(read)
            except (EngineError, TimeoutError):
                return info, None

        sampled = await asyncio.gather(*(one(info) for info in running))
        now = time.time()
        previous, raw = self.stats_cache, self._stats_raw
        fresh: dict[str, ContainerStats] = {}
        fresh_raw: dict[str, tuple[str, StatsSample]] = {}
        for info, sample in sampled:
            if sample is None:
                if info.project in previous:
                    fresh[info.project] = previous[info.project]
                if info.project in raw:
                    fresh_raw[info.project] = raw[info.project]
                continue
            cpu = sample.cpu_percent
            before = raw.get(info.project)
            if cpu is None and before is not None and before[0] == info.id:
                cpu = cpu_percent(
                    before[1].cpu_total_ns,
                    before[1].system_cpu_ns,
                    sample.cpu_total_ns,
                    sample.system_cpu_ns,
                    sample.online_cpus,
                )
            fresh[info.project] = ContainerStats(cpu, sample.memory_bytes, sample.memory_limit, now)
            fresh_raw[info.project] = (info.id, sample)
        self.stats_cache, self._stats_raw = fresh, fresh_raw
        for project in set(self._stats_reads) - {info.project for info in running}:
            if self._stats_reads[project].done():
                del self._stats_reads[project]

    # -- names and places -------------------------------------------------------------

    def stacks(self) -> dict[str, Stack]:
        return discover_stacks(self.settings.docker.stacks_dirs)

    def container_name(self, project: str) -> str:
        return f"{self.settings.docker.name_prefix}{project}"

    def volume_name(self, project: str) -> str:
        return f"{self.settings.docker.name_prefix}{project}-home"

    def keys_dir(self, project: str) -> Path:
        return self.settings.data_dir / "keys" / project

    def key_path(self, project: str) -> Path:
        return self.keys_dir(project) / "id_ed25519"

    def host_key_path(self, project: str) -> Path:
        """The project's sshd host key: made here, mounted read-only, pinned in known_hosts."""
        return self.keys_dir(project) / HOST_KEY_NAME

    def host_alias(self, project: str) -> str:
        """The ssh `Host` (and HostKeyAlias) of a project: its container's name."""
        return self.container_name(project)

    def known_hosts(self) -> Path:
        return known_hosts_path(self.settings.data_dir)

    # -- ssh ----------------------------------------------------------------------------

    async def ssh_target(self, row: ProjectRow) -> SshTarget:
        """How to reach ``row``'s sshd; the host key is pinned when podbay made it."""
        if row.ssh_port is None:
            raise UserError(f"`{row.name}` has no SSH port yet; it is {row.state}.")
        pinned = await asyncio.to_thread(self.host_key_path(row.name).with_suffix(".pub").is_file)
        if pinned and not await asyncio.to_thread(self.known_hosts().is_file):
            await self.sync_known_hosts()  # removed by hand: the instructions need it
        return SshTarget(
            alias=self.host_alias(row.name),
            port=row.ssh_port,
            key=self.key_path(row.name),
            known_hosts=self.known_hosts() if pinned else None,
        )

    async def sync_known_hosts(self) -> None:
        """Rewrite podbay's known_hosts from the projects whose host key podbay made."""
        async with self._known_hosts_lock:
            rows = await self.store.project_list()

            def write() -> None:
                entries = []
                for row in rows:
                    public = self.host_key_path(row.name).with_suffix(".pub")
                    with contextlib.suppress(FileNotFoundError):
                        entries.append((self.host_alias(row.name), public.read_text()))
                write_known_hosts(self.known_hosts(), entries)

            await asyncio.to_thread(write)

    async def _make_host_key(self, project: str) -> None:
        path = self.host_key_path(project)
        await generate_keypair(path, f"podbay-host-{project}", procs=self.procs)
        if os.getuid() == 0:
            # sshd runs as the container user and must read its key through the bind mount.
            uid, gid = dev_ids()
            os.chown(path, uid, gid, follow_symlinks=False)
        await self.sync_known_hosts()

    def secrets_dir(self, project: str) -> Path:
        return self.settings.data_dir / "secrets" / project

    def trash_dir(self) -> Path:
        return self.settings.data_dir / "trash"

    # -- validation -------------------------------------------------------------------

    async def plan(self, request: NewProjectRequest) -> Plan:
        """Check everything a user can get wrong, then reserve name, path and port.

        The reservation is a 'creating' row: hand the plan to :meth:`create`, or give it
        back with :meth:`release` when the job is not started.
        """
        validate_name(request.name)
        if request.stack is not None:
            validate_stack(request.stack, tuple(self.stacks()))
        url, credential = None, None
        if request.git_url is not None:
            validate_git_url(request.git_url)
            url, credential = split_url_credentials(request.git_url)
        if credential is not None and request.token:
            raise UserError(
                "Give the git password either in the URL or with --token, not both; "
                "send the command again with one of them."
            )
        if request.token:
            credential = ("oauth2", request.token)
        adopted = False
        try:
            path, existed, identity = await asyncio.to_thread(self._resolve_path, request)
        except SourceNotEmpty as exc:
            path = exc.path
            identity = await self._kept_source(request, path)
            if identity is None:
                raise await self._not_empty(request, path) from None
            existed, adopted = True, True
        cpus, memory, notes = await self._limits(request)
        try:
            row = await self.store.project_reserve(
                request.name,
                path,
                port_range=self.settings.projects.ssh_port_range,
                port_is_free=port_is_free,
                stack=request.stack or "",
                git_url=url or "",
                created_by=request.requested_by,
                settings={"cpus": cpus, "memory": memory, "created": []},
            )
        except StoreError as exc:
            raise UserError(str(exc)) from exc
        self._reserved.add(request.name)
        assert row.ssh_port is not None
        clean = replace(request, git_url=url, token=None)
        return Plan(
            clean, path, cpus, memory, row.ssh_port, existed, identity, notes, credential, adopted
        )

    async def _kept_source(self, request: NewProjectRequest, path: Path) -> tuple[int, int] | None:
        """The identity of ``path`` when it may be taken over: the source `delete` kept,
        named explicitly with --path, still the same folder, and no --git to clone."""
        kept = await self.store.kept_source_get(str(path))
        if kept is None or request.path is None:
            return None
        if request.git_url is not None:
            raise UserError(
                f"`{path}` is the kept source of `{kept[0]}`: it already has its files, so "
                "--git cannot clone into it. Drop --git to reuse it as it is."
            )
        try:
            info = await asyncio.to_thread(os.lstat, path)
        except OSError:
            return None
        if not stat.S_ISDIR(info.st_mode) or (info.st_dev, info.st_ino) != kept[1:]:
            return None  # not the folder that was kept any more
        return info.st_dev, info.st_ino

    async def _not_empty(self, request: NewProjectRequest, path: Path) -> UserError:
        """The refusal of a folder that holds files, with the next step."""
        # Another project's source (or a folder inside it) is the more useful thing to say.
        conflict = await self.store.project_source_conflict(request.name, path)
        if conflict is not None:
            return UserError(conflict)
        name = request.name
        other = path.with_name(f"{path.name}-2")
        recorded = await self.store.kept_source_get(str(path))
        if recorded is not None:
            return UserError(
                f"`{path}` holds the source kept when project `{recorded[0]}` was deleted. "
                f"To reuse it as it is: `new project {name} --path {path}`. To start afresh: "
                f"`new project {name} --path {other}`, or remove the old folder yourself "
                f"(`rm -rf {path}`) and send the command again."
            )
        kept = ""
        if request.path is None:
            kept = (
                f" It is probably the source kept when a project `{name}` was deleted "
                "(delete keeps sources unless given --purge)."
            )
        return UserError(
            f"`{path}` already exists and is not an empty directory.{kept} podbay only creates "
            "a project in a new or empty folder. To create it elsewhere: "
            f"`new project {name} --path {other}`. To free this place, move the old folder "
            f"away first (e.g. `mv {path} {path}.old`) and send the command again."
        )

    async def release(self, plan: Plan) -> None:
        """Give back the reservation of a plan whose job was never started."""
        name = plan.request.name
        if name not in self._reserved:
            return
        self._reserved.discard(name)
        row = await self.store.project_get(name)
        if row is not None and row.state == "creating" and not row.settings.get("created"):
            await self.store.project_remove(name, port_was_used=False)

    def is_reserved(self, project: str) -> bool:
        """True while a plan of this process holds ``project`` (planned, not yet finished)."""
        return project in self._reserved

    async def engine_cpus(self) -> int:
        """CPUs of the Docker engine's machine (``DOCKER_HOST`` may be another one)."""
        if self._engine_cpus is None:
            try:
                self._engine_cpus = (await self.docker.engine_info()).cpus
            except EngineError as exc:
                raise UserError(f"Cannot check the CPU limit: {exc}") from exc
        return self._engine_cpus

    async def _limits(self, request: NewProjectRequest) -> tuple[float, str, tuple[str, ...]]:
        docker_cfg = self.settings.docker
        host = await self.engine_cpus()
        notes: list[str] = []
        if request.cpus is not None:
            cpus = check_cpus(request.cpus, host)
        elif docker_cfg.cpus > host:
            # A default bigger than the machine must not make every `new project` fail.
            cpus = float(host)
            notes.append(
                f"docker.cpus = {docker_cfg.cpus:g} is more than this Docker engine's {host} "
                f"CPUs, so `{request.name}` gets {host}; lower `docker.cpus` in the config."
            )
        else:
            cpus = docker_cfg.cpus
        memory = request.memory or docker_cfg.memory
        parse_memory(memory, "--memory" if request.memory else "docker.memory")
        return cpus, memory, tuple(notes)

    def _resolve_path(
        self, request: NewProjectRequest
    ) -> tuple[Path, bool, tuple[int, int] | None]:
        """(resolved path, whether it exists, its identity): resolved once, here."""
        projects = self.settings.projects
        if request.path and any(ord(c) < 32 for c in request.path):
            raise UserError("--path contains a control character (NUL, newline …); remove it.")
        raw = Path(request.path).expanduser() if request.path else projects.root / request.name
        if not raw.is_absolute():
            raise UserError(f"--path must be absolute (e.g. /home/me/code/app), got {raw}.")
        path = Path(os.path.realpath(raw))
        roots = [Path(os.path.realpath(r)) for r in projects.roots()]
        if not any(path == r or path.is_relative_to(r) for r in roots):
            allowed = ", ".join(str(r) for r in roots)
            raise UserError(
                f"{path} is outside the allowed project roots ({allowed}); pick a path inside "
                "one, or add its parent to `projects.allowed_roots`."
            )
        if path in roots:
            raise UserError(f"{path} is a project root itself; use a folder inside it.")
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return path, False, None
        if not stat.S_ISDIR(info.st_mode) or os.listdir(path):
            raise SourceNotEmpty(path)
        return path, True, (info.st_dev, info.st_ino)

    # -- create -----------------------------------------------------------------------

    async def create(self, plan: Plan, job: JobHandle, progress: Progress) -> Created:
        """Build the planned project; on any failure remove what this job created."""
        req = plan.request
        try:
            row = await self.store.project_get(req.name)
            if row is None or row.state != "creating":
                raise UserError(f"The reservation of `{req.name}` is gone; send the command again.")
            row = await self.store.project_update(
                req.name, settings={**row.settings, "job": job.id}
            )
            await job.step("registered", f"port {plan.ssh_port}")
            return await self._build_out(plan, row, job, progress)
        except BaseException as exc:
            await asyncio.shield(self._rollback(req.name))
            if isinstance(exc, EngineError):
                raise UserError(f"Could not create `{req.name}`: {exc}") from exc
            raise
        finally:
            self._reserved.discard(req.name)

    async def _build_out(
        self,
        plan: Plan,
        row: ProjectRow,
        job: JobHandle,
        progress: Progress,
    ) -> Created:
        req = plan.request
        uid, gid = dev_ids()
        port = plan.ssh_port
        settings = dict(row.settings)
        created: list[dict[str, Any]] = list(settings.get("created") or [])

        async def record(entry: dict[str, Any]) -> None:
            # Written before (or right after) the thing exists: a crash leaves a row that
            # names everything the reconciler must remove, and nothing else.
            created.append(entry)
            settings["created"] = created
            await self.store.project_update(req.name, settings=settings)

        await record({"what": "keys"})
        public_key = await generate_keypair(
            self.key_path(req.name), f"podbay-{req.name}", procs=self.procs
        )
        authorized = "\n".join([public_key, *self.settings.ssh.authorized_keys]) + "\n"
        auth_file = self.keys_dir(req.name) / "authorized_keys"
        auth_file.write_text(authorized)
        auth_file.chmod(0o644)
        await self._make_host_key(req.name)
        await job.step("keys", "ed25519 keypair and host key")

        credentials: Path | None = None
        if plan.credential is not None:
            await record({"what": "secrets"})
            credentials = await asyncio.to_thread(
                self._write_credentials, req.name, plan.credential, req.git_url, uid, gid
            )

        source = await asyncio.to_thread(_make_source, plan)
        await record(source)
        identity = (int(source["dev"]), int(source["ino"]))
        if plan.adopted:
            # Its files were written by a container: no host git runs there.
            await job.step("source", f"reused the kept source {plan.path}")
        elif req.git_url:
            await progress(f"Cloning {req.git_url}…")
            await git.clone(
                req.git_url,
                plan.path,
                self.settings.git.clone_timeout_s,
                procs=self.procs,
                credentials=credentials,
            )
            await job.step("source", f"cloned {req.git_url}")
        else:
            await git.init(plan.path, procs=self.procs)
            await job.step("source", "git init")
        # Checked again after git ran there, and chowned through the checked descriptor.
        await asyncio.to_thread(_secure_source, plan.path, identity, uid, gid)

        stacks = self.stacks()
        if req.stack:
            stack_name: str | None = req.stack
            stack_reason = "as requested"
        else:
            # Only names at the top are read, before any container ran there.
            detection = await asyncio.to_thread(detect_stack, plan.path, stacks)
            stack_name, stack_reason = detection.stack, detection.reason
        row = await self.store.project_update(req.name, stack=stack_name or "")

        token_note = ""
        if plan.credential is not None:
            user = plan.credential[0]
            if user == "oauth2":
                token_note = (
                    "Push token stored (read-only in the container, never in its environment)."
                )
                if req.git_url and not req.git_url.lower().startswith("https://"):
                    token_note += " Note: tokens only help with https:// remotes."
            else:
                token_note = (
                    "Password from the git URL stored in the credentials file (read-only in "
                    "the container); the remote is saved without it."
                )

        name, email, identity_note = await self._identity(req)
        settings.update({"git_name": name, "git_email": email})
        row = await self.store.project_update(req.name, settings=settings)
        image = await self.ensure_image(stack_name, progress)
        await job.step("image", image)
        spec = self._container_spec(row, image)
        await record({"what": "container", "name": spec.name})
        container_id = await self.docker.create(spec)
        await self.store.project_update(req.name, container_id=container_id, image=image)
        await job.step("container", container_id[:12])
        await self.docker.start(spec.name)
        await self._wait_ready(spec.name, port)
        await job.step("ready", f"ssh on {port}")
        row = await self.store.project_update(req.name, state="ready")
        if plan.adopted:
            await self.store.kept_source_remove(str(plan.path))
        if req.session is not None:
            await self.store.session_set_project(req.session, req.name)
        return Created(
            project=row,
            stack_reason=stack_reason,
            identity_note=identity_note,
            connection=connection_info(await self.ssh_target(row)),
            token_note=token_note,
        )

    def _container_spec(self, row: ProjectRow, image: str) -> ContainerSpec:
        """The container of ``row``; the same for create, rebuild and recovery."""
        assert row.ssh_port is not None
        uid, gid = dev_ids()
        binds: dict[str, tuple[str, str]] = {
            row.path: ("/workspace", "rw"),
            str(self.keys_dir(row.name) / "authorized_keys"): ("/run/podbay/authorized_keys", "ro"),
        }
        host_key = self.host_key_path(row.name)
        if host_key.exists():
            binds[str(host_key)] = (HOST_KEY_MOUNT, "ro")
        creds = self.secrets_dir(row.name) / "git-credentials"
        if creds.exists():
            binds[str(creds)] = ("/run/podbay/git-credentials", "ro")
        # The agent CLIs podbay fetches (engine/agent_cli.py), shared read-only by every
        # project; Docker would create a missing bind source as root, so make it first.
        from podbay.engine.agent_cli import CONTAINER_ROOT, agents_root

        binds[str(agents_root(self.settings.data_dir))] = (CONTAINER_ROOT, "ro")
        listen = "127.0.0.1" if self.settings.docker.network == "host" else "0.0.0.0"
        docker_cfg = self.settings.docker
        return ContainerSpec(
            name=self.container_name(row.name),
            image=image,
            project=row.name,
            instance=self.instance,
            user=f"{uid}:{gid}",
            env={
                "PODBAY_SSH_PORT": str(row.ssh_port),
                "PODBAY_SSH_LISTEN": listen,
                "PODBAY_GIT_NAME": str(row.settings.get("git_name", "")),
                "PODBAY_GIT_EMAIL": str(row.settings.get("git_email", "")),
            },
            binds=binds,
            volumes={self.volume_name(row.name): "/home/dev/.podbay"},
            network=docker_cfg.network,
            ssh_port=row.ssh_port,
            cpus=float(row.settings.get("cpus", docker_cfg.cpus)),
            memory_bytes=parse_memory(str(row.settings.get("memory", docker_cfg.memory))),
            pids_limit=docker_cfg.pids_limit,
        )

    async def _wait_ready(self, container: str, port: int) -> None:
        timeout = self.settings.docker.ready_timeout_s
        if not await wait_for_port(port, timeout):
            logs = (await self.docker.logs(container, tail=10)).strip()
            raise EngineError(
                f"sshd did not answer on 127.0.0.1:{port} within {timeout:.0f} s. "
                f"Container log:\n{logs or '(empty)'}"
            )

    async def _cancel_runs(self, project: str, job: JobHandle) -> None:
        """Agent runs in the container end before it goes away (each one is told)."""
        if self.cancel_runs is not None:
            cancelled = await self.cancel_runs(project)
            await job.step("runs", f"cancelled {cancelled}")

    def _missing(self, project: str) -> UserError:
        return UserError(
            f"The container of `{project}` is missing (removed outside podbay?). "
            f"`rebuild {project}` recreates it with the same source, keys and port."
        )

    async def require_container(self, project: str) -> ContainerInfo:
        """The project's container; a UserError saying how to recreate it when it is gone."""
        info = await self.docker.inspect(self.container_name(project))
        if info is None:
            raise self._missing(project)
        return info

    async def logs(self, project: str, lines: int) -> str:
        """The last ``lines`` lines of the project's container log."""
        await self.require_container(project)
        try:
            return await self.docker.logs(self.container_name(project), lines)
        except EngineError:
            await self.require_container(project)  # gone in between: say so
            raise

    async def restart(self, project: str, job: JobHandle) -> None:
        row = await self._row(project)
        assert row.ssh_port is not None
        await asyncio.to_thread(_check_source, row)
        await self.require_container(project)
        await self._cancel_runs(project, job)
        try:
            await self.docker.restart(self.container_name(project))
        except EngineError:
            await self.require_container(project)  # gone in between: say so
            raise
        await self._wait_ready(self.container_name(project), row.ssh_port)
        await job.step("restarted")

    async def rebuild(self, project: str, job: JobHandle, progress: Progress) -> str:
        """New image if inputs changed; a new container with the same source, keys, port
        and host key (the home volume is kept)."""
        row = await self._row(project)
        await self._cancel_runs(project, job)
        # Docker follows a symlink at the bind source: never mount what the path now
        # points to unless it is still a real directory at the same place.
        await asyncio.to_thread(_check_source, row)
        image = await self.ensure_image(row.stack or None, progress)
        changed = image != row.image
        await job.step("image", image)
        if not await asyncio.to_thread(self.host_key_path(project).exists):
            # A project from before podbay made host keys: it gets one podbay knows.
            await self._make_host_key(project)
        await self.docker.remove(self.container_name(project))
        spec = self._container_spec(row, image)
        container_id = await self.docker.create(spec)
        await self.store.project_update(project, container_id=container_id, image=image)
        await self.docker.start(spec.name)
        assert row.ssh_port is not None
        await self._wait_ready(spec.name, row.ssh_port)
        await job.step("ready")
        what = f"new image {image}" if changed else f"image {image} (inputs unchanged)"
        return f"Rebuilt `{project}` with {what}; same source, keys, port {row.ssh_port}."

    async def git_status(self, row: ProjectRow, timeout_s: float = 10.0) -> str:
        """One status line about the repository, read INSIDE the container as dev.

        The source is writable by the container, so its .git/config (fsmonitor, pager,
        hooks ...) is the container's code: it may run in the container, never on the host.
        """
        name = self.container_name(row.name)
        remote = f" · remote {row.git_url}" if row.git_url else ""
        try:
            info = await self.docker.inspect(name)
            if info is None or info.state != "running":
                state = info.label if info is not None else "missing"
                return (
                    f"git: unknown (the container is not running: {state}; "
                    f"`restart {row.name}` starts it){remote}"
                )
            result = await self.docker.exec_run(
                name,
                ["git", "status", "--porcelain=v2", "--branch"],
                user=SSH_USER,
                workdir="/workspace",
                timeout_s=timeout_s,
            )
        except EngineError as exc:
            return f"git: unknown ({exc}){remote}"
        if result.timed_out:
            return f"git: unknown (git status took longer than {timeout_s:g} s){remote}"
        if result.exit_code != 0:
            first = (result.stderr.strip().splitlines() or ["no output"])[0][:160]
            return f"git: unknown ({first}){remote}"
        repo = git.parse_status_v2(result.stdout)
        sync = ""
        if repo.ahead or repo.behind:
            sync = f" · {repo.ahead} ahead, {repo.behind} behind"
        return f"git: branch {repo.branch} · {repo.dirty} uncommitted{sync}{remote}"

    async def _row(self, project: str) -> ProjectRow:
        row = await self.store.project_get(project)
        if row is None:
            raise UserError(f"No project named `{project}`.")
        if row.state != "ready":
            raise UserError(f"`{project}` is {row.state}; wait for it to finish.")
        return row

    def _write_credentials(
        self, project: str, credential: tuple[str, str], url: str | None, uid: int, gid: int
    ) -> Path:
        """Store the credential 0600 for the container user, in git's credential-store form."""
        host = "github.com"
        if url and url.lower().startswith("https://"):
            host = url.split("/")[2].split("@")[-1]
        user, secret = credential
        folder = self.secrets_dir(project)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / "git-credentials"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"https://{user}:{secret}@{host}\n")
        if os.getuid() == 0:
            # The container user must read it through the bind mount; nobody else may.
            os.chown(path, uid, gid, follow_symlinks=False)
        return path

    async def _identity(self, req: NewProjectRequest) -> tuple[str, str, str]:
        cfg = self.settings.git
        if cfg.user_name and cfg.user_email:
            return cfg.user_name, cfg.user_email, "Git identity from podbay's config."
        name, email = await git.global_identity()
        if name and email:
            return name, email, "Git identity from this host's global git config."
        user = req.requested_by.partition(":")[2] or "podbay"
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", user).strip("-") or "user"
        transport = req.requested_by.partition(":")[0] or "chat"
        return (
            req.requester_name or user,
            f"{safe}@{transport}.podbay.invalid",
            "Git identity derived from your chat identity; set `git.user_name` and "
            "`git.user_email` in the config for a real one.",
        )

    async def ensure_image(self, stack: str | None, progress: Progress | None = None) -> str:
        """The tag of the image for ``stack`` (None: the base), building what is missing."""
        uid, gid = dev_ids()
        docker_cfg = self.settings.docker
        try:
            base = base_image_spec(docker_cfg.base_image, uid, gid, docker_cfg.extra_ca_certs)
        except OSError as exc:
            raise UserError(
                f"cannot read a file of `docker.extra_ca_certs`: {exc.filename}: {exc.strerror}"
            ) from exc
        specs: list[ImageSpec] = [base]
        if stack is not None:
            stacks = self.stacks()
            if stack not in stacks:
                raise UserError(f"Unknown stack {stack!r}: choose one of {', '.join(stacks)}.")
            specs.append(stack_image_spec(base, stacks[stack]))
        # One build at a time: two projects of one stack must not build it twice.
        async with self._image_lock:
            for spec in specs:
                if await self.docker.image_exists(spec.tag):
                    continue
                await self._build(spec, progress)
        return specs[-1].tag

    async def _build(self, spec: ImageSpec, progress: Progress | None) -> None:
        lines: list[str] = []
        if progress is not None:
            await progress(f"Building image {spec.tag} (first time only; cached afterwards)…")

        def on_line(line: str) -> None:
            lines.append(line)

        build = asyncio.create_task(self.docker.build(spec, on_line))
        try:
            while not build.done():
                await asyncio.wait({build}, timeout=10)
                if not build.done() and progress is not None and lines:
                    step = next((ln for ln in reversed(lines) if ln.startswith("Step ")), lines[-1])
                    await progress(f"Building {spec.tag}: {progress_line(step)}")
        finally:
            if not build.done():
                build.cancel()
        try:
            build.result()
        except EngineError as exc:
            raise UserError(
                f"Image build failed. Last lines:\n{code_block(_tail(str(exc)))}"
            ) from exc

    # -- rollback and removal ---------------------------------------------------------

    async def _rollback(self, project: str) -> None:
        """Remove what the job of ``project`` recorded as created, then its row."""
        log.info("rolling back project %s", project)
        row = await self.store.project_get(project)
        if row is None:
            return
        entries = row.settings.get("created")
        if entries is None:
            # A row from before podbay recorded what it created.
            entries = [{"what": "keys"}, {"what": "secrets"}, {"what": "container"}]
            if row.settings.get("created_dir"):
                entries.append({"what": "dir", "path": row.path})
        others = [Path(r.path) for r in await self.store.project_list() if r.name != project]
        if any(e.get("what") == "container" for e in entries):
            with contextlib.suppress(Exception):
                await self.docker.remove(
                    self.container_name(project), volumes=(self.volume_name(project),)
                )
        folders = [
            folder
            for what, folder in (
                ("keys", self.keys_dir(project)),
                ("secrets", self.secrets_dir(project)),
            )
            if any(e.get("what") == what for e in entries)
        ]
        sources = [e for e in entries if e.get("what") in ("dir", "contents")]
        await asyncio.to_thread(_undo_files, folders, sources, others)
        with contextlib.suppress(Exception):
            await self.store.project_remove(project)
        with contextlib.suppress(Exception):
            await self.sync_known_hosts()

    async def recover_half_created(self, row: ProjectRow) -> None:
        """Roll back a project left in 'creating' by a crash (or a reservation never used)."""
        await self._rollback(row.name)

    async def delete(self, project: str, *, purge: bool, job: JobHandle) -> str:
        row = await self.store.project_get(project)
        if row is None:
            raise UserError(f"No project named `{project}`.")
        if self.cancel_runs is not None:
            cancelled = await self.cancel_runs(project)
            await job.step("runs", f"cancelled {cancelled}")
        await self.docker.remove(self.container_name(project), volumes=(self.volume_name(project),))
        await job.step("container", "removed")
        await asyncio.to_thread(
            _undo_files, [self.keys_dir(project), self.secrets_dir(project)], [], []
        )
        await job.step("keys", "removed")
        kept = f"Source kept at `{row.path}` (`new project <name> --path {row.path}` reuses it)."
        if purge and await asyncio.to_thread(Path(row.path).exists):
            entry = await asyncio.to_thread(self._move_to_trash, project, Path(row.path))
            kept = f"Source moved to the trash as `{entry}` (`podbay trash restore {entry}`)."
        else:
            try:
                info = await asyncio.to_thread(os.lstat, row.path)
            except OSError:
                info = None
            if info is not None and stat.S_ISDIR(info.st_mode):
                await self.store.kept_source_add(row.path, project, info.st_dev, info.st_ino)
        await self.store.project_remove(project)
        await self.sync_known_hosts()
        await job.step("row", "removed")
        return (
            f"Deleted `{project}`: container, volume, port {row.ssh_port} and keys are gone. {kept}"
        )

    # -- trash ------------------------------------------------------------------------

    def _move_to_trash(self, project: str, source: Path) -> str:
        trash = self.trash_dir()
        trash.mkdir(parents=True, exist_ok=True, mode=0o700)
        entry = f"{project}-{time.strftime('%Y%m%d-%H%M%S')}"
        target = trash / entry
        suffix = 1
        while target.exists():
            suffix += 1
            target = trash / f"{entry}-{suffix}"
        _move_tree(source, target)
        (trash / f"{target.name}.json").write_text(
            json.dumps({"project": project, "path": str(source), "at": time.time()})
        )
        return target.name

    def trash_entries(self) -> list[tuple[str, str]]:
        trash = self.trash_dir()
        if not trash.is_dir():
            return []
        entries = []
        for meta in sorted(trash.glob("*.json")):
            info: dict[str, Any] = json.loads(meta.read_text())
            entries.append((meta.stem, str(info.get("path", ""))))
        return entries

    def trash_restore(self, entry: str) -> Path:
        trash = self.trash_dir()
        meta = trash / f"{entry}.json"
        if "/" in entry or not meta.is_file() or not (trash / entry).exists():
            raise UserError(f"No trash entry `{entry}`; `podbay trash` lists them.")
        original = Path(json.loads(meta.read_text())["path"])
        if original.exists():
            raise UserError(f"{original} exists again; move it away first.")
        original.parent.mkdir(parents=True, exist_ok=True)
        _move_tree(trash / entry, original)
        meta.unlink()
        return original

    def trash_empty(self) -> int:
        entries = self.trash_entries()
        for entry, _ in entries:
            # The user asked for exactly this: the trash is the only place podbay deletes.
            shutil.rmtree(self.trash_dir() / entry, ignore_errors=True)
            (self.trash_dir() / f"{entry}.json").unlink(missing_ok=True)
        return len(entries)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(path: Path, *, create_last: bool = False, create_parents: bool = False) -> int:
    """An fd of directory ``path``, opened component by component without following any
    symlink (ELOOP/ENOTDIR instead). ``create_last``: the last component must not exist
    and is made here (FileExistsError otherwise); ``create_parents``: missing parents are
    made. The caller closes the fd."""
    fd = os.open("/", _DIR_FLAGS)
    try:
        parts = path.parts[1:]
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            if last and create_last:
                os.mkdir(part, 0o755, dir_fd=fd)
            elif create_parents and not last:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fd_identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _changed(path: Path, why: str) -> SourceChanged:
    return SourceChanged(
        f"{path} changed since it was checked ({why}); nothing was created there. "
        "Check the folder and send the command again."
    )


def _make_source(plan: Plan) -> dict[str, Any]:
    """Create (or take over the empty) source folder with no-follow semantics; return the
    record of what was made: ``dir`` (a new folder) or ``contents`` (an existing one)."""
    path = plan.path
    try:
        fd = _open_dir(path, create_last=not plan.existed, create_parents=not plan.existed)
    except FileExistsError:
        raise _changed(path, "something appeared at that path") from None
    except OSError as exc:
        raise _changed(path, f"{exc.strerror or exc}; a symlink or file is in the way") from None
    try:
        identity = _fd_identity(fd)
        if plan.existed and identity != plan.identity:
            raise _changed(path, "it is another folder now")
        if plan.existed and not plan.adopted and os.listdir(fd):
            raise _changed(path, "it is not empty any more")
    finally:
        os.close(fd)
    # The resolved path must still lead here: no component was swapped for a link.
    if os.path.realpath(path) != str(path):
        raise _changed(path, "a folder on the way became a symlink")
    # "adopted": a kept source; its files are the user's and a rollback leaves them alone.
    what = "adopted" if plan.adopted else "contents" if plan.existed else "dir"
    return {"what": what, "path": str(path), "dev": identity[0], "ino": identity[1]}


def _secure_source(path: Path, identity: tuple[int, int], uid: int, gid: int) -> None:
    """Check the source is still the folder made for it; when root, chown the tree to the
    container user without following any symlink (the top level included)."""
    try:
        fd = _open_dir(path)
    except OSError as exc:
        raise _changed(path, f"{exc.strerror or exc}") from None
    try:
        if _fd_identity(fd) != identity:
            raise _changed(path, "it is another folder now")
        if os.getuid() != 0:
            return
        os.fchown(fd, uid, gid)
        for _dirpath, dirnames, filenames, dirfd in os.fwalk(".", dir_fd=fd, follow_symlinks=False):
            for name in dirnames + filenames:
                with contextlib.suppress(FileNotFoundError):
                    os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
    finally:
        os.close(fd)


def _check_source(row: ProjectRow) -> None:
    """Refuse to (re)mount a source that is no longer a real directory at its path."""
    path = Path(row.path)
    try:
        os.close(_open_dir(path))
    except OSError as exc:
        raise UserError(
            f"The source of `{row.name}` at {path} is missing or no longer a plain folder "
            f"({exc.strerror or exc}); podbay will not mount it. Restore the folder first."
        ) from None


def _undo_files(folders: list[Path], sources: list[dict[str, Any]], others: list[Path]) -> None:
    """Remove podbay's own folders, then the recorded source: a folder podbay made is
    removed, a folder that was there (empty) is emptied. Never one another project uses,
    never through a symlink, never a folder that is not the one recorded."""
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    for entry in sources:
        path = Path(str(entry.get("path", "")))
        if not path.is_absolute() or path == Path("/"):
            continue
        if any(path == o or path.is_relative_to(o) or o.is_relative_to(path) for o in others):
            log.warning("rollback leaves %s alone: another project uses it", path)
            continue
        recorded = (entry.get("dev"), entry.get("ino"))
        try:
            if entry.get("what") == "dir":
                parent = _open_dir(path.parent)
                try:
                    info = os.stat(path.name, dir_fd=parent, follow_symlinks=False)
                    same = recorded == (None, None) or recorded == (info.st_dev, info.st_ino)
                    if stat.S_ISDIR(info.st_mode) and same:
                        shutil.rmtree(path.name, dir_fd=parent)
                finally:
                    os.close(parent)
            else:
                fd = _open_dir(path)
                try:
                    if recorded == _fd_identity(fd):
                        _empty_dir(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            log.warning("rollback could not clean %s: %s", path, exc)


def _empty_dir(fd: int) -> None:
    for name in os.listdir(fd):
        info = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)


def _move_tree(source: Path, target: Path) -> None:
    """Move a (container-written) tree: a rename, or across filesystems a copy that keeps
    symlinks as links, refuses FIFOs and devices, and drops setuid/setgid bits."""
    try:
        os.rename(source, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise

    def plain_copy(src: str, dst: str) -> None:
        shutil.copyfile(src, dst, follow_symlinks=False)  # SpecialFileError on a FIFO
        os.chmod(dst, os.lstat(src).st_mode & 0o777)

    shutil.copytree(source, target, symlinks=True, copy_function=plain_copy)
    shutil.rmtree(source)


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
