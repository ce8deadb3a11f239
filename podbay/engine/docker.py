"""The Docker provisioner: images and containers, found by label.

The Docker SDK is blocking, so every call goes through ``asyncio.to_thread``. The SDK
honours ``DOCKER_HOST`` (including ``ssh://``), so a remote engine sits behind the same
class; another backend (Kubernetes) would implement the same methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import tarfile
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from podbay.engine.stacks import ImageSpec
from podbay.errors import EngineError

log = logging.getLogger(__name__)

MANAGED_LABEL = "podbay.managed"
PROJECT_LABEL = "podbay.project"
INSTANCE_LABEL = "podbay.instance"

OnLine = Callable[[str], None]


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    project: str
    instance: str
    user: str
    env: Mapping[str, str]
    binds: Mapping[str, tuple[str, str]]  # host path -> (container path, "ro"|"rw")
    volumes: Mapping[str, str]  # volume name -> container path
    network: Literal["bridge", "host"]
    ssh_port: int
    cpus: float
    memory_bytes: int
    pids_limit: int
    bridge_network: str = "podbay"


@dataclass(frozen=True)
class EngineInfo:
    """What the engine behind ``DOCKER_HOST`` has (it may be another machine)."""

    cpus: int
    memory_bytes: int


@dataclass(frozen=True)
class ExecResult:
    """A finished (or timed-out) command run inside a container."""

    exit_code: int | None  # None when it timed out before the engine reported one
    stdout: str
    stderr: str
    timed_out: bool = False


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    project: str
    instance: str
    state: str  # running, exited, created, restarting, paused, dead
    exit_code: int | None
    started_at: str
    image: str
    labels: Mapping[str, str] = field(default_factory=dict)
    status_text: str = ""  # the engine's own summary, e.g. "Up 5 minutes"

    @property
    def label(self) -> str:
        if self.state == "exited":
            return f"exited({self.exit_code})"
        return self.state


def _info(attrs: Mapping[str, Any]) -> ContainerInfo:
    state = attrs.get("State") or {}
    config = attrs.get("Config") or {}
    labels = config.get("Labels") or {}
    return ContainerInfo(
        id=attrs.get("Id", ""),
        name=str(attrs.get("Name", "")).lstrip("/"),
        project=labels.get(PROJECT_LABEL, ""),
        instance=labels.get(INSTANCE_LABEL, ""),
        state=state.get("Status", "unknown"),
        exit_code=state.get("ExitCode"),
        started_at=state.get("StartedAt", ""),
        image=config.get("Image", ""),
        labels=labels,
    )


def _summary_info(item: Mapping[str, Any]) -> ContainerInfo:
    """From the list endpoint (one call for all containers)."""
    labels = item.get("Labels") or {}
    status = str(item.get("Status", ""))  # e.g. "Exited (1) 3 minutes ago"
    exit_code = None
    if status.startswith("Exited (") and ")" in status:
        try:
            exit_code = int(status[len("Exited (") : status.index(")")])
        except ValueError:
            exit_code = None
    names = item.get("Names") or [""]
    return ContainerInfo(
        id=item.get("Id", ""),
        name=str(names[0]).lstrip("/"),
        project=labels.get(PROJECT_LABEL, ""),
        instance=labels.get(INSTANCE_LABEL, ""),
        state=item.get("State", "unknown"),
        exit_code=exit_code,
        started_at=str(item.get("Created", "")),
        image=item.get("Image", ""),
        labels=labels,
        status_text=status,
    )


class DockerProvisioner:
    """Images and containers on a Docker engine reached through ``DOCKER_HOST``."""

    name = "docker"

    def __init__(self, client_factory: Callable[[], Any] | None = None) -> None:
        self._factory = client_factory
        self._client: Any = None

    def _docker(self) -> Any:
        if self._client is None:
            try:
                if self._factory is not None:
                    self._client = self._factory()
                else:
                    from docker.client import DockerClient

                    self._client = DockerClient.from_env(timeout=120)
            except Exception as exc:
                raise EngineError(f"cannot reach the Docker engine: {exc}") from exc
        return self._client

    async def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return await asyncio.to_thread(fn)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"docker {what} failed: {_short(exc)}") from exc

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await asyncio.to_thread(client.close)

    async def ping(self) -> None:
        await self._call("ping", lambda: self._docker().ping())

    async def engine_info(self) -> EngineInfo:
        """CPUs and memory of the engine's machine (``docker info``), not of podbay's."""
        info = await self._call("info", lambda: self._docker().info())
        return EngineInfo(int(info.get("NCPU") or 1), int(info.get("MemTotal") or 0))

    # -- images -----------------------------------------------------------------------

    async def image_exists(self, tag: str) -> bool:
        def probe() -> bool:
            from docker.errors import ImageNotFound

            try:
                self._docker().images.get(tag)
            except ImageNotFound:
                return False
            return True

        return bool(await self._call("image lookup", probe))

    async def build(self, spec: ImageSpec, on_line: OnLine | None = None) -> None:
        """Build ``spec``; ``on_line`` gets each output line. Failure quotes the last 20."""
        tail: deque[str] = deque(maxlen=20)
        loop = asyncio.get_running_loop()

        def emit(line: str) -> None:
            tail.append(line)
            if on_line is not None:
                loop.call_soon_threadsafe(on_line, line)

        def run() -> str | None:
            context = _tar_context(spec)
            stream = self._docker().api.build(
                fileobj=context,
                custom_context=True,
                tag=spec.tag,
                buildargs=dict(spec.buildargs),
                network_mode="host",
                rm=True,
                forcerm=True,
                decode=True,
                labels={MANAGED_LABEL: "1"},
            )
            for chunk in stream:
                if "stream" in chunk:
                    for line in str(chunk["stream"]).splitlines():
                        if line.strip():
                            emit(line)
                if "error" in chunk:
                    emit(str(chunk["error"]).strip())
                    return str(chunk["error"]).strip()
            return None

        try:
            error = await asyncio.to_thread(run)
        except Exception as exc:
            raise EngineError(
                f"building {spec.tag} failed: {_short(exc)}\n" + "\n".join(tail)
            ) from exc
        if error is not None:
            raise EngineError(f"building {spec.tag} failed: {error}\n" + "\n".join(tail))

    # -- containers -------------------------------------------------------------------

    async def create(self, spec: ContainerSpec) -> str:
        def run() -> str:
            client = self._docker()
            kwargs: dict[str, Any] = {
                "name": spec.name,
                "detach": True,
                "user": spec.user,
                "environment": dict(spec.env),
                "labels": {
                    MANAGED_LABEL: "1",
                    PROJECT_LABEL: spec.project,
                    INSTANCE_LABEL: spec.instance,
                },
                "cap_drop": ["ALL"],
                "security_opt": ["no-new-privileges"],
                "nano_cpus": int(spec.cpus * 1e9),
                "mem_limit": spec.memory_bytes,
                "pids_limit": spec.pids_limit,
                "restart_policy": {"Name": "unless-stopped"},
                "volumes": {
                    **{host: {"bind": c, "mode": mode} for host, (c, mode) in spec.binds.items()},
                    **{vol: {"bind": c, "mode": "rw"} for vol, c in spec.volumes.items()},
                },
            }
            if spec.network == "host":
                kwargs["network_mode"] = "host"
            else:
                _ensure_network(client, spec.bridge_network)
                kwargs["network"] = spec.bridge_network
                # Published on loopback only: the project is reachable from this machine.
                kwargs["ports"] = {f"{spec.ssh_port}/tcp": ("127.0.0.1", spec.ssh_port)}
            container = client.containers.create(spec.image, **kwargs)
            return str(container.id)

        return str(await self._call("create", run))

    async def start(self, name: str) -> None:
        await self._call("start", lambda: self._docker().containers.get(name).start())

    async def restart(self, name: str, grace_s: int = 10) -> None:
        await self._call(
            "restart", lambda: self._docker().containers.get(name).restart(timeout=grace_s)
        )

    async def stop(self, name: str, grace_s: int = 10) -> None:
        await self._call("stop", lambda: self._docker().containers.get(name).stop(timeout=grace_s))

    async def remove(self, name: str, *, volumes: tuple[str, ...] = ()) -> bool:
        """Stop (10 s grace) and remove a podbay container and the named volumes."""

        def run() -> bool:
            from docker.errors import NotFound

            client = self._docker()
            removed = False
            try:
                container = client.containers.get(name)
            except NotFound:
                container = None
            if container is not None:
                labels = container.attrs.get("Config", {}).get("Labels") or {}
                if labels.get(MANAGED_LABEL) != "1":
                    raise EngineError(f"refusing to remove {name}: it lacks podbay's labels")
                if container.status == "running":
                    container.stop(timeout=10)
                container.remove(v=True, force=True)
                removed = True
            for volume in volumes:
                with contextlib.suppress(NotFound):
                    client.volumes.get(volume).remove(force=True)
            return removed

        return bool(await self._call("remove", run))

    async def inspect(self, name: str) -> ContainerInfo | None:
        def run() -> ContainerInfo | None:
            from docker.errors import NotFound

            try:
                return _info(self._docker().containers.get(name).attrs)
            except NotFound:
                return None

        result = await self._call("inspect", run)
        return result if isinstance(result, ContainerInfo) else None

    async def inspect_raw(self, name: str) -> dict[str, Any]:
        result = await self._call("inspect", lambda: self._docker().api.inspect_container(name))
        return dict(result)

    async def list_managed(self) -> list[ContainerInfo]:
        """Every podbay-labelled container, in ONE engine call."""

        def run() -> list[ContainerInfo]:
            items = self._docker().api.containers(all=True, filters={"label": f"{MANAGED_LABEL}=1"})
            return [_summary_info(item) for item in items]

        return list(await self._call("list", run))

    async def logs(self, name: str, tail: int = 50) -> str:
        def run() -> str:
            raw = self._docker().containers.get(name).logs(tail=tail, timestamps=False)
            return bytes(raw).decode(errors="replace")

        return str(await self._call("logs", run))

    # -- commands inside containers ---------------------------------------------------

    def _exec_create(
        self,
        name: str,
        argv: list[str],
        *,
        user: str,
        workdir: str,
        env: Mapping[str, str] | None,
        stdin: bool = False,
    ) -> str:
        """Create (not start) an exec; shared by exec_run and a future streaming exec."""
        created = self._docker().api.exec_create(
            name,
            argv,
            stdout=True,
            stderr=True,
            stdin=stdin,
            tty=False,
            user=user,
            workdir=workdir,
            environment=dict(env or {}),
            privileged=False,
        )
        return str(created["Id"])

    async def exec_run(
        self,
        name: str,
        argv: list[str],
        *,
        user: str,
        workdir: str = "/workspace",
        timeout_s: float = 10.0,
        env: Mapping[str, str] | None = None,
        max_output: int = 1 << 20,
    ) -> ExecResult:
        """Run ``argv`` in the running container ``name`` as ``user`` and collect its output.

        Inside the container, coreutils' ``timeout`` ends the command (SIGTERM, then SIGKILL
        2 s later) so the engine's exec finishes; podbay stops waiting shortly after that
        in any case. Output beyond ``max_output`` bytes per stream is cut off.
        """
        limit = max(1, int(timeout_s + 0.999))
        wrapped = ["timeout", "-k", "2", str(limit), *argv]

        def run() -> tuple[int | None, bytes, bytes]:
            exec_id = self._exec_create(name, wrapped, user=user, workdir=workdir, env=env)
            api = self._docker().api
            out, err = api.exec_start(exec_id, demux=True)
            code = api.exec_inspect(exec_id).get("ExitCode")
            return code, (out or b"")[:max_output], (err or b"")[:max_output]

        try:
            code, out, err = await asyncio.wait_for(self._call("exec", run), timeout=timeout_s + 5)
        except TimeoutError:
            return ExecResult(None, "", "", timed_out=True)
        # 124: timeout(1) ended it; 137: its SIGKILL after the grace.
        timed_out = code in (124, 137)
        return ExecResult(
            code, out.decode(errors="replace"), err.decode(errors="replace"), timed_out
        )

    async def stats(self, name: str) -> tuple[float, int, int]:
        """(CPU percent, memory bytes, memory limit) from one non-streaming sample."""

        def run() -> tuple[float, int, int]:
            s = self._docker().api.stats(name, stream=False)
            cpu = s.get("cpu_stats", {})
            pre = s.get("precpu_stats", {})
            delta = cpu.get("cpu_usage", {}).get("total_usage", 0) - pre.get("cpu_usage", {}).get(
                "total_usage", 0
            )
            system = cpu.get("system_cpu_usage", 0) - pre.get("system_cpu_usage", 0)
            cpus = cpu.get("online_cpus") or 1
            percent = (delta / system) * cpus * 100 if system > 0 and delta > 0 else 0.0
            memory = s.get("memory_stats", {})
            return percent, int(memory.get("usage", 0)), int(memory.get("limit", 0))

        result = await self._call("stats", run)
        return (float(result[0]), int(result[1]), int(result[2]))


def _ensure_network(client: Any, name: str) -> None:
    if not client.networks.list(names=[name]):
        client.networks.create(name, driver="bridge", labels={MANAGED_LABEL: "1"})


def _tar_context(spec: ImageSpec) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = spec.dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        tar.addfile(info, io.BytesIO(data))
        for path in spec.files:
            tar.add(path, arcname=str(path.relative_to(spec.context)), recursive=False)
        for name, content in spec.extra:
            member = tarfile.TarInfo(name)
            member.size, member.mtime, member.mode = len(content), int(time.time()), 0o644
            tar.addfile(member, io.BytesIO(content))
    buffer.seek(0)
    return buffer


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]
