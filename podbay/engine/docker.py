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
import os
import re
import socket
import tarfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from podbay.engine.stacks import ImageSpec
from podbay.errors import EngineError, EngineUnavailable

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
                if _unreachable(exc):
                    raise _unavailable(exc) from exc
                raise EngineError(f"cannot reach the Docker engine: {exc}") from exc
        return self._client

    async def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return await asyncio.to_thread(fn)
        except EngineError:
            raise
        except Exception as exc:
            if _unreachable(exc):
                raise _unavailable(exc) from exc
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

    async def exec_stream(
        self,
        name: str,
        argv: list[str],
        *,
        user: str,
        workdir: str = "/workspace",
        env: Mapping[str, str],
        tag: str,
    ) -> ExecStream:
        """Start ``argv`` in the running container ``name`` and stream it (see ExecStream).

        ``env`` goes to this exec only: Docker keeps an exec's environment out of the
        container's config, so ``docker inspect`` never shows it. The command gets
        ``PODBAY_RUN=<tag>`` and its own session inside the container, which is how
        :meth:`kill_tagged` finds every process it starts, also with a remote engine.
        """
        _check_tag(tag)
        if not argv:
            raise ValueError("exec_stream needs a command")
        wrapped = ["sh", "-c", _SESSION_WRAPPER, "podbay-exec", *argv]
        full_env = {**env, RUN_TAG_ENV: tag}
        loop = asyncio.get_running_loop()

        def start() -> tuple[str, Any]:
            exec_id = self._exec_create(
                name, wrapped, user=user, workdir=workdir, env=full_env, stdin=True
            )
            return exec_id, self._docker().api.exec_start(exec_id, socket=True)

        started = asyncio.ensure_future(self._call("exec", start))
        try:
            exec_id, raw = await asyncio.shield(started)
        except asyncio.CancelledError:
            # The thread still finishes starting it: close that connection when it does.
            started.add_done_callback(_close_started)
            raise
        return ExecStream(self, exec_id, raw, loop)

    async def exec_exit_code(self, exec_id: str) -> int | None:
        """The exec's exit code once it has ended, None while it runs."""
        state = await self._call("exec inspect", lambda: self._docker().api.exec_inspect(exec_id))
        if state.get("Running"):
            return None
        code = state.get("ExitCode")
        if code is None:
            raise EngineError("the engine reports no exit code for the finished command")
        return int(code)

    async def kill_tagged(
        self, name: str, tag: str, *, grace_s: float, user: str | None = None
    ) -> list[int]:
        """End every process of the exec tagged ``tag`` in ``name``; return the pids left.

        Inside the container (so it works with a remote engine): SIGTERM to each process
        carrying ``PODBAY_RUN=<tag>`` or in the session or under a process of one, then
        SIGKILL to whatever is left after ``grace_s``, then a re-check. It runs as ``user``,
        by default the container's configured user. A stopped or missing container has no
        processes left: [].
        """
        ticks = max(0, int(grace_s * 10 + 0.999))
        return await self._tagged_script(name, tag, "kill", ticks, user, timeout_s=grace_s + 10)

    async def tagged_processes(self, name: str, tag: str, *, user: str | None = None) -> list[int]:
        """Pids of the live processes of the exec tagged ``tag`` in ``name`` (see kill_tagged)."""
        return await self._tagged_script(name, tag, "list", 0, user, timeout_s=10)

    async def _tagged_script(
        self, name: str, tag: str, mode: str, ticks: int, user: str | None, *, timeout_s: float
    ) -> list[int]:
        _check_tag(tag)
        info = await self.inspect(name)
        if info is None or info.state != "running":
            return []
        if user is None:
            config = (await self.inspect_raw(name)).get("Config") or {}
            user = str(config.get("User") or "")
            if not user:
                raise EngineError(f"{name} has no configured user to look for processes as")
        try:
            result = await self.exec_run(
                name,
                ["sh", "-c", _TAGGED_SCRIPT, "podbay-procs", tag, mode, str(ticks)],
                user=user,
                workdir="/",
                timeout_s=timeout_s,
            )
        except EngineError:
            # Stopped meanwhile: then nothing of the run is left either.
            info = await self.inspect(name)
            if info is None or info.state != "running":
                return []
            raise
        # Only integers are taken from what the container printed.
        for line in result.stdout.splitlines():
            if line.startswith(_ALIVE_MARKER):
                words = line[len(_ALIVE_MARKER) :].split()
                if all(word.isdigit() for word in words):
                    return [int(word) for word in words]
        if result.timed_out:
            raise EngineError(f"finding the processes of run {tag} in {name} timed out")
        raise EngineError(
            f"finding the processes of run {tag} in {name} failed (exit {result.exit_code})"
        )

    async def stats(self, name: str) -> StatsSample:
        """One sample of the container's CPU counters and memory.

        One-shot where the engine offers it (API 1.41+): the reply comes at once instead of
        after the engine's 1-2 s priming read, so CPU use is left to the caller to work out
        from two samples. Older engines prime, and their CPU percent comes with the sample.
        """

        def run() -> StatsSample:
            from docker.errors import InvalidVersion

            api = self._docker().api
            try:
                s = api.stats(name, stream=False, one_shot=True)
            except InvalidVersion:
                s = api.stats(name, stream=False)
            cpu = s.get("cpu_stats") or {}
            pre = s.get("precpu_stats") or {}
            total = int((cpu.get("cpu_usage") or {}).get("total_usage") or 0)
            system = int(cpu.get("system_cpu_usage") or 0)
            cpus = int(cpu.get("online_cpus") or 1)
            percent: float | None = None
            pre_system = int(pre.get("system_cpu_usage") or 0)
            if pre_system:
                pre_total = int((pre.get("cpu_usage") or {}).get("total_usage") or 0)
                percent = cpu_percent(pre_total, pre_system, total, system, cpus)
            memory = s.get("memory_stats") or {}
            return StatsSample(
                cpu_total_ns=total,
                system_cpu_ns=system,
                online_cpus=cpus,
                memory_bytes=int(memory.get("usage") or 0),
                memory_limit=int(memory.get("limit") or 0),
                cpu_percent=percent,
            )

        sample: StatsSample = await self._call("stats", run)
        return sample


@dataclass(frozen=True)
class StatsSample:
    """Raw figures of one stats read; ``cpu_percent`` only when the engine primed it."""

    cpu_total_ns: int
    system_cpu_ns: int
    online_cpus: int
    memory_bytes: int
    memory_limit: int
    cpu_percent: float | None = None


def cpu_percent(
    total_before: int, system_before: int, total_after: int, system_after: int, cpus: int
) -> float | None:
    """CPU use between two reads of the counters, as ``docker stats`` shows it (100 per CPU);
    None when the counters went backwards (a restarted container) or did not move."""
    delta = total_after - total_before
    system = system_after - system_before
    if system <= 0 or delta < 0:
        return None
    return delta / system * max(1, cpus) * 100


# -- streaming exec -----------------------------------------------------------------

RUN_TAG_ENV = "PODBAY_RUN"
_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_ALIVE_MARKER = "PODBAY-ALIVE"

# $0 podbay-exec, "$@" the command. runc already makes an exec its own session leader;
# elsewhere setsid(1) does: without forking when the shell leads no group, so the exit code
# stays the command's own.
_SESSION_WRAPPER = """\
fields() { pgrp=$3 sid=$4; }
read -r st < /proc/self/stat
fields ${st##*) }
if [ "$sid" = "$$" ]; then exec "$@"; fi
if [ "$pgrp" != "$$" ]; then exec setsid "$@"; fi
exec setsid --wait "$@"
"""

# $1 tag, $2 list|kill, $3 grace in tenths of a second. A process belongs to the run when
# its environment has PODBAY_RUN=<tag>, or its parent or session leader is known to belong
# (so a child that dropped the variable is found too); $known keeps dead members, whose
# pids still name sessions and parents. Zombies are dead already. Prints the live pids.
_TAGGED_SCRIPT = """\
tag=$1 mode=$2 ticks=$3 me=$$ known=' ' alive=''
fields() { state=$1 ppid=$2 sid=$4; }
scan() {
  for f in $(grep -lzxF -e "PODBAY_RUN=$tag" /proc/[0-9]*/environ 2>/dev/null); do
    p=${f#/proc/}; p=${p%/environ}
    case $known in *" $p "*) ;; *) known="$known$p ";; esac
  done
  grew=1
  while [ -n "$grew" ]; do
    grew='' alive=''
    for d in /proc/[0-9]*; do
      p=${d#/proc/}
      if [ "$p" = "$me" ] || [ "$p" = 1 ]; then continue; fi
      st=''
      { read -r st < "$d/stat"; } 2>/dev/null || continue
      [ -n "$st" ] || continue
      fields ${st##*) }
      case $known in
        *" $p "*) ;;
        *" $ppid "*|*" $sid "*) known="$known$p " grew=1 ;;
        *) continue ;;
      esac
      [ "$state" = Z ] || alive="$alive $p"
    done
  done
}
scan
if [ "$mode" = kill ]; then
  i=0
  while [ -n "$alive" ] && [ "$i" -lt "$ticks" ]; do
    kill -TERM $alive 2>/dev/null
    sleep 0.1
    i=$((i + 1))
    scan
  done
  i=0
  while [ -n "$alive" ] && [ "$i" -lt 30 ]; do
    kill -KILL $alive 2>/dev/null
    sleep 0.1
    i=$((i + 1))
    scan
  done
fi
echo "PODBAY-ALIVE$alive"
"""

# Output chunks the reader may hold before it stops reading (and the engine, in turn,
# stops the command's writes): a slow consumer costs bounded memory.
_STREAM_BUFFER_BYTES = 4 << 20
_FRAME_HEADER = 8
_STREAM_NAMES: dict[int, Literal["stdout", "stderr"]] = {0: "stdout", 1: "stdout", 2: "stderr"}


def _check_tag(tag: str) -> None:
    if not _TAG_RE.fullmatch(tag):
        raise ValueError(f"a run tag is 1-64 letters, digits and _.:- (got {tag!r})")


def _close_started(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is None:
        _, raw = future.result()
        with contextlib.suppress(Exception):
            _SocketPump.unwrap(raw)[1].close()
        with contextlib.suppress(Exception):
            raw.close()


Chunk = tuple[Literal["stdout", "stderr"], bytes]


class _SocketPump:
    """Thread-side I/O on the hijacked exec connection.

    One thread reads and demultiplexes Docker's frames (8-byte header: stream type 1
    stdout or 2 stderr, three zero bytes, a big-endian length; then the payload); writes
    come from worker threads. Closing first shuts the socket down, which wakes blocked
    reads and writes, and only then closes the descriptor under both locks, so no thread
    ever uses a descriptor number that was reused meanwhile.
    """

    def __init__(
        self,
        raw: Any,
        deliver: Callable[[Chunk | None], None],
        label: str,
    ) -> None:
        self._raw = raw
        self._response, self._sock = self.unwrap(raw)
        self._deliver = deliver
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._budget = threading.Condition()
        self._buffered = 0
        self.closed = False
        self.write_closed = False
        self.error: str | None = None
        # Taken before anyone can write: it briefly makes the socket non-blocking, and a
        # concurrent sendall() on a non-blocking socket fails with EAGAIN.
        self._initial = self._take_buffered()
        self._thread = threading.Thread(target=self._pump, name=f"podbay-{label}", daemon=True)
        self._thread.start()

    @staticmethod
    def unwrap(raw: Any) -> tuple[Any, Any]:
        """(HTTP response, the socket under the SDK's SocketIO wrapper, if it is one)."""
        response = getattr(raw, "_response", None)
        if isinstance(raw, socket.SocketIO):
            return response, raw._sock  # type: ignore[attr-defined]
        return response, raw

    def _take_buffered(self) -> bytes:
        """Frames that arrived with the HTTP upgrade sit in http.client's read buffer,
        which reading the socket bypasses: take them first so none is lost."""
        reader = getattr(getattr(getattr(self._response, "raw", None), "_fp", None), "fp", None)
        if not isinstance(reader, io.BufferedReader) or not isinstance(self._sock, socket.socket):
            return b""
        try:
            self._sock.settimeout(0)  # peek never blocks: at most what the kernel has
            pending = reader.peek()
            return reader.read(len(pending)) if pending else b""
        except (OSError, ValueError):
            return b""
        finally:
            with contextlib.suppress(OSError):
                self._sock.settimeout(None)

    def _recv(self) -> bytes:
        with self._read_lock:
            if self.closed:
                return b""
            return bytes(self._sock.recv(1 << 16))

    def _pump(self) -> None:
        buffer = bytearray(self._initial)
        with contextlib.suppress(Exception):
            self._sock.settimeout(None)  # quiet commands are normal; close() unblocks
        stream = 1
        remaining = 0
        try:
            while True:
                while True:
                    if remaining == 0:
                        if len(buffer) < _FRAME_HEADER:
                            break
                        stream = buffer[0]
                        remaining = int.from_bytes(buffer[4:8], "big")
                        del buffer[:_FRAME_HEADER]
                        continue
                    if not buffer:
                        break
                    piece = bytes(buffer[:remaining])
                    del buffer[: len(piece)]
                    remaining -= len(piece)
                    self._push((_STREAM_NAMES.get(stream, "stdout"), piece))
                data = self._recv()
                if not data:
                    break
                buffer += data
        except OSError as exc:
            if not self.closed:
                self.error = _short(exc)
        except RuntimeError:
            pass  # the event loop is gone: nobody is listening any more
        finally:
            self.close()
            with contextlib.suppress(RuntimeError):
                self._deliver(None)

    def _push(self, chunk: Chunk) -> None:
        with self._budget:
            while self._buffered >= _STREAM_BUFFER_BYTES and not self.closed:
                self._budget.wait(0.5)
            self._buffered += len(chunk[1])
        self._deliver(chunk)

    def consumed(self, size: int) -> None:
        with self._budget:
            self._buffered -= size
            self._budget.notify()

    def send(self, data: bytes) -> None:
        with self._write_lock:
            if self.closed or self.write_closed:
                raise BrokenPipeError("the command's stdin is closed")
            self._sock.sendall(data)

    def shutdown_write(self) -> None:
        with self._write_lock:
            if self.closed or self.write_closed:
                return
            self.write_closed = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with self._state_lock:
            if self.closed:
                return
            self.closed = True
        with contextlib.suppress(Exception):
            self._sock.shutdown(socket.SHUT_RDWR)
        with self._budget:
            self._budget.notify_all()
        with self._read_lock, self._write_lock:
            for resource in (self._sock, self._raw, self._response):
                if resource is not None:
                    with contextlib.suppress(Exception):
                        resource.close()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class ExecStream:
    """A running ``docker exec``: its output as it comes, its stdin, its exit code.

    ``read()`` gives ``("stdout" | "stderr", bytes)`` chunks in the order the engine sent
    them, then None once the command and everything holding its output have ended.
    Close it (``async with``) when done early; at the end of output it closes itself.
    """

    def __init__(
        self,
        provisioner: DockerProvisioner,
        exec_id: str,
        raw: Any,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.exec_id = exec_id
        self._provisioner = provisioner
        self._queue: asyncio.Queue[Chunk | None] = asyncio.Queue()
        self._ended = asyncio.Event()  # the engine closed the output: the command is done
        self._at_eof = False
        self._exit_code: int | None = None

        def arrived(chunk: Chunk | None) -> None:
            self._queue.put_nowait(chunk)
            if chunk is None:
                self._ended.set()

        def deliver(chunk: Chunk | None) -> None:
            loop.call_soon_threadsafe(arrived, chunk)

        self._pump = _SocketPump(raw, deliver, f"exec-{exec_id[:12]}")

    async def __aenter__(self) -> ExecStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def read(self) -> Chunk | None:
        """The next output chunk, or None at the end of both streams."""
        if self._at_eof:
            return None
        chunk = await self._queue.get()
        if chunk is None:
            self._at_eof = True
            if self._pump.error is not None:
                raise EngineError(f"the command's output broke off: {self._pump.error}")
            return None
        self._pump.consumed(len(chunk[1]))
        return chunk

    async def write(self, data: bytes) -> None:
        """Write to the command's stdin (waits while the command does not read)."""
        try:
            await asyncio.to_thread(self._pump.send, data)
        except OSError as exc:
            raise EngineError(f"writing to the command's stdin failed: {_short(exc)}") from exc

    async def close_stdin(self) -> None:
        """End of input: the command reads EOF; its output keeps coming."""
        await asyncio.to_thread(self._pump.shutdown_write)

    async def wait(self) -> int:
        """The exit code, once the command has ended (its output may still be unread).

        The end of the output stream says when to ask the engine; until then it is asked
        now and then, since a background process may hold the output open for a while.
        """
        if self._exit_code is not None:
            return self._exit_code
        interval = 0.1
        ended_before = False
        while True:
            if not self._ended.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ended.wait(), timeout=interval)
            code = await self._provisioner.exec_exit_code(self.exec_id)
            if code is not None:
                self._exit_code = code
                return code
            if self._ended.is_set():
                # Output ended: the engine records the exit within moments, unless the
                # command closed its output and goes on (then this slows down again).
                interval = min(interval * 2, 2.0) if ended_before else 0.02
                ended_before = True
                await asyncio.sleep(interval)
            else:
                interval = min(interval * 2, 2.0)

    async def close(self) -> None:
        """Drop the connection (the command keeps running: kill_tagged ends it)."""
        await asyncio.to_thread(self._pump.close)
        await asyncio.to_thread(self._pump.join, 5.0)


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


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the engine is not there at all: a refused
    or missing socket, a connection that broke, no API version to fetch."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ConnectionError | FileNotFoundError):
            return True
        name = type(current).__name__
        text = str(current)
        if name in ("ConnectionError", "ProtocolError", "NewConnectionError", "MaxRetryError"):
            return True
        if "Error while fetching server API version" in text:
            return True
        args = getattr(current, "args", ())
        nested = next((a for a in args if isinstance(a, BaseException)), None)
        current = current.__cause__ or current.__context__ or nested
    return False


def _unavailable(exc: BaseException) -> EngineUnavailable:
    where = os.environ.get("DOCKER_HOST") or "the default socket"
    return EngineUnavailable(
        f"The Docker engine is not reachable ({where}): {_short(exc)}. Nothing was changed; "
        "try again once Docker is back (`podbay doctor` checks it)."
    )
