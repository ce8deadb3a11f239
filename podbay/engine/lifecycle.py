"""Project lifecycle: create, delete, restart, rebuild, and the trash.

Every step is recorded on the job row, and every failure rolls back what this attempt
created, so nothing is left half-made: no container, directory, port, key or row.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from podbay.config import Settings
from podbay.engine import git
from podbay.engine.docker import ContainerInfo, ContainerSpec, DockerProvisioner
from podbay.engine.jobs import JobHandle
from podbay.engine.projects import validate_git_url, validate_name, validate_stack
from podbay.engine.ssh import allocate_port, connection_info, generate_keypair, wait_for_port
from podbay.engine.stacks import (
    ImageSpec,
    Stack,
    base_image_spec,
    detect_stack,
    dev_ids,
    discover_stacks,
    stack_image_spec,
)
from podbay.engine.store import ProjectRow, Store
from podbay.errors import EngineError, StoreError, UserError
from podbay.messages import SessionKey

log = logging.getLogger(__name__)

_MEMORY = re.compile(r"^\d+(\.\d+)?[kmg]?b?$", re.IGNORECASE)
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
    token: str | None = None


@dataclass(frozen=True)
class Plan:
    """A validated request: everything checked, nothing created yet."""

    request: NewProjectRequest
    path: Path
    cpus: float
    memory: str


@dataclass(frozen=True)
class ContainerStats:
    cpu_percent: float
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


def instance_id(data_dir: Path) -> str:
    """Labels this podbay's containers, so two podbays on one engine never mix them up."""
    return hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:10]


def parse_cpus(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1
    if not 0 < value <= 256:
        raise UserError(f"--cpus takes a positive number such as 2 or 0.5, got {raw[:20]!r}.")
    return value


def check_memory(raw: str | None) -> str | None:
    if raw is not None and not _MEMORY.match(raw):
        raise UserError(f"--memory takes a size such as 512m or 4g, got {raw[:20]!r}.")
    return raw


class ProjectManager:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        provisioner: DockerProvisioner,
        *,
        cancel_runs: Callable[[str], Awaitable[int]] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.docker = provisioner
        self.instance = instance_id(settings.data_dir)
        self.cancel_runs = cancel_runs
        self._image_lock = asyncio.Lock()
        # Filled in the background by sample_stats(); status never waits on docker stats.
        self.stats_cache: dict[str, ContainerStats] = {}

    async def managed_containers(self) -> list[ContainerInfo]:
        """This podbay's containers (one engine call)."""
        return [c for c in await self.docker.list_managed() if c.instance == self.instance]

    async def sample_stats(self) -> None:
        """Refresh CPU and memory of every running project container."""
        running = [c for c in await self.managed_containers() if c.state == "running"]
        fresh: dict[str, ContainerStats] = {}
        for info in running:
            try:
                cpu, memory, limit = await self.docker.stats(info.name)
            except EngineError:
                continue
            fresh[info.project] = ContainerStats(cpu, memory, limit, time.time())
        self.stats_cache = fresh

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

    def secrets_dir(self, project: str) -> Path:
        return self.settings.data_dir / "secrets" / project

    def trash_dir(self) -> Path:
        return self.settings.data_dir / "trash"

    # -- validation -------------------------------------------------------------------

    async def plan(self, request: NewProjectRequest) -> Plan:
        """Check everything a user can get wrong; create nothing."""
        validate_name(request.name)
        if request.stack is not None:
            validate_stack(request.stack, tuple(self.stacks()))
        if request.git_url is not None:
            validate_git_url(request.git_url)
        if await self.store.project_get(request.name) is not None:
            raise UserError(f"A project named `{request.name}` already exists; pick another.")
        path = self._resolve_path(request)
        docker_cfg = self.settings.docker
        cpus = request.cpus if request.cpus is not None else docker_cfg.cpus
        memory = request.memory or docker_cfg.memory
        return Plan(request, path, cpus, memory)

    def _resolve_path(self, request: NewProjectRequest) -> Path:
        projects = self.settings.projects
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
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"{path} already exists and is not an empty directory.")
        return path

    # -- create -----------------------------------------------------------------------

    async def create(self, plan: Plan, job: JobHandle, progress: Progress) -> Created:
        req = plan.request
        made_dir = not plan.path.exists()
        port = allocate_port(
            *self.settings.projects.ssh_port_range, await self.store.ports_in_use()
        )
        try:
            row = await self.store.project_add(
                req.name,
                plan.path,
                stack=req.stack or "",
                git_url=req.git_url or "",
                ssh_port=port,
                state="creating",
                created_by=req.requested_by,
                settings={
                    "created_dir": made_dir,
                    "cpus": plan.cpus,
                    "memory": plan.memory,
                    "job": job.id,
                },
            )
        except StoreError as exc:
            raise UserError(str(exc)) from exc
        await job.step("registered", f"port {port}")
        try:
            return await self._build_out(plan, row, job, progress)
        except BaseException as exc:
            await asyncio.shield(self._rollback(req.name, plan.path, made_dir))
            if isinstance(exc, EngineError):
                raise UserError(f"Could not create `{req.name}`: {exc}") from exc
            raise

    async def _build_out(
        self,
        plan: Plan,
        row: ProjectRow,
        job: JobHandle,
        progress: Progress,
    ) -> Created:
        req = plan.request
        uid, gid = dev_ids()
        assert row.ssh_port is not None
        port = row.ssh_port
        public_key = await generate_keypair(self.key_path(req.name), f"podbay-{req.name}")
        authorized = "\n".join([public_key, *self.settings.ssh.authorized_keys]) + "\n"
        auth_file = self.keys_dir(req.name) / "authorized_keys"
        auth_file.write_text(authorized)
        auth_file.chmod(0o644)
        await job.step("keys", "ed25519 keypair")

        plan.path.mkdir(parents=True, exist_ok=True)
        if req.git_url:
            await progress(f"Cloning {req.git_url}…")
            await git.clone(req.git_url, plan.path, self.settings.git.clone_timeout_s)
            await job.step("source", f"cloned {req.git_url}")
        else:
            await git.init(plan.path)
            await job.step("source", "git init")
        if os.getuid() == 0:
            await asyncio.to_thread(_chown_tree, plan.path, uid, gid)

        stacks = self.stacks()
        if req.stack:
            stack_name: str | None = req.stack
            stack_reason = "as requested"
        else:
            detection = detect_stack(plan.path, stacks)
            stack_name, stack_reason = detection.stack, detection.reason
        row = await self.store.project_update(req.name, stack=stack_name or "")

        token_note = ""
        if req.token:
            self._write_credentials(req.name, req.token, req.git_url, uid, gid)
            token_note = "Push token stored (read-only in the container, never in its environment)."
            if req.git_url and not req.git_url.lower().startswith("https://"):
                token_note += " Note: tokens only help with https:// remotes."

        name, email, identity_note = await self._identity(req)
        row = await self.store.project_update(
            req.name, settings={**row.settings, "git_name": name, "git_email": email}
        )
        image = await self.ensure_image(stack_name, progress)
        await job.step("image", image)
        spec = self._container_spec(row, image)
        container_id = await self.docker.create(spec)
        await self.store.project_update(req.name, container_id=container_id, image=image)
        await job.step("container", container_id[:12])
        await self.docker.start(spec.name)
        await self._wait_ready(spec.name, port)
        await job.step("ready", f"ssh on {port}")
        row = await self.store.project_update(req.name, state="ready")
        if req.session is not None:
            await self.store.session_set_project(req.session, req.name)
        return Created(
            project=row,
            stack_reason=stack_reason,
            identity_note=identity_note,
            connection=connection_info(req.name, port, self.key_path(req.name)),
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
        creds = self.secrets_dir(row.name) / "git-credentials"
        if creds.exists():
            binds[str(creds)] = ("/run/podbay/git-credentials", "ro")
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
            memory=str(row.settings.get("memory", docker_cfg.memory)),
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

    async def restart(self, project: str, job: JobHandle) -> None:
        row = await self._row(project)
        assert row.ssh_port is not None
        await self.docker.restart(self.container_name(project))
        await self._wait_ready(self.container_name(project), row.ssh_port)
        await job.step("restarted")

    async def rebuild(self, project: str, job: JobHandle, progress: Progress) -> str:
        """New image if inputs changed; a new container with the same source, keys, port
        and host key (the home volume is kept)."""
        row = await self._row(project)
        image = await self.ensure_image(row.stack or None, progress)
        changed = image != row.image
        await job.step("image", image)
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

    async def _row(self, project: str) -> ProjectRow:
        row = await self.store.project_get(project)
        if row is None:
            raise UserError(f"No project named `{project}`.")
        if row.state != "ready":
            raise UserError(f"`{project}` is {row.state}; wait for it to finish.")
        return row

    def _write_credentials(
        self, project: str, token: str, url: str | None, uid: int, gid: int
    ) -> Path:
        """Store the push token 0600 for the container user, in git's credential-store form."""
        host = "github.com"
        if url and url.lower().startswith("https://"):
            host = url.split("/")[2].split("@")[-1]
        folder = self.secrets_dir(project)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = folder / "git-credentials"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"https://oauth2:{token}@{host}\n")
        if os.getuid() == 0:
            # The container user must read it through the bind mount; nobody else may.
            os.chown(path, uid, gid)
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
                    await progress(f"Building {spec.tag}: {step[:120]}")
        finally:
            if not build.done():
                build.cancel()
        try:
            build.result()
        except EngineError as exc:
            raise UserError(
                f"Image build failed. Last lines:\n```\n{_tail(str(exc))}\n```"
            ) from exc

    # -- rollback and removal ---------------------------------------------------------

    async def _rollback(self, project: str, path: Path, made_dir: bool) -> None:
        log.info("rolling back project %s", project)
        with contextlib.suppress(Exception):
            await self.docker.remove(
                self.container_name(project), volumes=(self.volume_name(project),)
            )
        await asyncio.to_thread(
            _remove_files, [self.keys_dir(project), self.secrets_dir(project)], path, made_dir
        )
        with contextlib.suppress(Exception):
            await self.store.project_remove(project)

    async def recover_half_created(self, row: ProjectRow) -> None:
        """Roll back a project left in 'creating' by a crash."""
        made_dir = bool(row.settings.get("created_dir"))
        await self._rollback(row.name, Path(row.path), made_dir)

    async def delete(self, project: str, *, purge: bool, job: JobHandle) -> str:
        row = await self.store.project_get(project)
        if row is None:
            raise UserError(f"No project named `{project}`.")
        if self.cancel_runs is not None:
            cancelled = await self.cancel_runs(project)
            await job.step("runs", f"cancelled {cancelled}")
        await self.docker.remove(self.container_name(project), volumes=(self.volume_name(project),))
        await job.step("container", "removed")
        await asyncio.to_thread(_remove_files, [self.keys_dir(project), self.secrets_dir(project)])
        await job.step("keys", "removed")
        kept = f"Source kept at `{row.path}`."
        if purge and await asyncio.to_thread(Path(row.path).exists):
            entry = await asyncio.to_thread(self._move_to_trash, project, Path(row.path))
            kept = f"Source moved to the trash as `{entry}` (`podbay trash restore {entry}`)."
        await self.store.project_remove(project)
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
        shutil.move(str(source), target)
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
        shutil.move(str(trash / entry), original)
        meta.unlink()
        return original

    def trash_empty(self) -> int:
        entries = self.trash_entries()
        for entry, _ in entries:
            # The user asked for exactly this: the trash is the only place podbay deletes.
            shutil.rmtree(self.trash_dir() / entry, ignore_errors=True)
            (self.trash_dir() / f"{entry}.json").unlink(missing_ok=True)
        return len(entries)


def _remove_files(folders: list[Path], source: Path | None = None, made_dir: bool = False) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    # The source was absent or empty when validated, so everything in it is ours (a fresh
    # init or clone); a directory the user made stays, emptied again.
    if source is None:
        return
    if made_dir:
        shutil.rmtree(source, ignore_errors=True)
    elif source.is_dir():
        for child in source.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            with contextlib.suppress(FileNotFoundError):
                os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
