"""Every child process podbay starts, recorded so that none outlives podbay unnoticed.

:class:`ProcessTracker` starts children (agents, git, ssh-keygen ...) and records each one
in the store's ``processes`` table. Three things together find "every process of a run":

* **a process group**: each child leads its own session (``start_new_session``), so one
  ``killpg`` reaches the ordinary children while the leader lives;
* **an environment tag**: each child gets ``PODBAY_PROCESS=<tag>``, inherited by every
  descendant, including those that call ``setsid`` (leaving the group) or double-fork
  (leaving the parent chain). ``/proc/<pid>/environ`` shows it, also after a crash of
  podbay, when the group's leader is dead and its orphans belong to init;
* **the parent chain**: descendants of a tracked process count too, which catches a
  child that scrubbed its environment but still hangs below the tree.

Why not ``PR_SET_CHILD_SUBREAPER``: a subreaper must reap every orphan re-parented to it,
and ``waitpid(-1)`` would steal exit statuses from asyncio's child watcher; it also ends
with podbay, so after a ``kill -9`` orphans go to init anyway. Why not cgroups: they need
root or a delegated cgroup v2 subtree, which podbay cannot count on. Why not psutil: it
reads the same /proc files, and one pass over /proc here gives ppid, pgid, start time
and tag together.

Children also get ``PR_SET_PDEATHSIG = SIGKILL``: if podbay dies, the kernel kills the
direct child at once. Linux sends it when the *thread* that forked the child exits, so
:meth:`ProcessTracker.spawn` must run on the event-loop thread (asyncio forks there), never
inside ``asyncio.to_thread``. util-linux's ``setpriv --pdeathsig KILL`` sets it and then
execs the program (same pid, same start time), so Python can start the child with
``vfork``: a ``preexec_fn`` would force a full ``fork``, which copies podbay's page tables
on the event loop (50 ms with 1.6 GB resident, against 1 ms). Without setpriv, a
``preexec_fn`` sets it. The program is looked up on the child's PATH before the start, so
a missing one is still an OSError, as with a direct exec.

A tracked process is identified by (pid, start_ticks): ``start_ticks`` is field 22 of
``/proc/<pid>/stat`` and tells a process from a later one that reuses its pid. Signals
go through a pidfd after re-checking the start time, so a reused pid is never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from podbay.engine.store import ProcessRow, Store
from podbay.errors import EngineError

log = logging.getLogger(__name__)

TAG_VAR = "PODBAY_PROCESS"
_TAG_NEEDLE = TAG_VAR.encode() + b"="
# How long the SIGKILL rounds may take before the survivors are reported: SIGKILL cannot
# be caught, so only an unkillable process (D state, or not ours to signal) gets here.
KILL_VERIFY_S = 5.0
_POLL_S = 0.01

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT
_Stdio = int | IO[Any] | None

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


# Looked up once here: the child between fork and exec must do as little as possible.
_PRCTL = _load_prctl()


def _die_with_parent(parent: int) -> None:
    """preexec_fn: the kernel SIGKILLs this child when podbay (the forking thread) dies."""
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # podbay may have died between fork and prctl: then nobody would send the signal.
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


# The setpriv that sets PDEATHSIG for podbay's children (see the module docstring); a host
# binary found once on podbay's own PATH.
_SETPRIV = shutil.which("setpriv") if _PRCTL is not None else None


def _program(name: str, cwd: str | Path | None, env: Mapping[str, str]) -> str:
    """The file ``name`` runs, as exec would find it for the child: by the child's PATH,
    or relative to its working directory when ``name`` has a slash. Raises
    FileNotFoundError or PermissionError as exec would."""
    if os.sep in name:
        path = os.path.join(cwd, name) if cwd is not None else name
        found = path if os.path.isfile(path) else None
        if found is not None and not os.access(found, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)
    else:
        found = shutil.which(name, path=os.pathsep.join(os.get_exec_path(dict(env))))
        if found is not None and os.sep not in found:  # a relative PATH entry
            found = os.path.join(cwd, found) if cwd is not None else found
    if found is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
    return found


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True, slots=True)
class ProcInfo:
    """One live (non-zombie) process as /proc shows it."""

    pid: int
    ppid: int
    pgid: int
    start_ticks: int
    tag: str


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgid, start_ticks) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    # The command name (field 2) is parenthesised and may hold spaces or ")".
    fields = raw.rpartition(b")")[2].split()
    try:
        return fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[19])
    except (IndexError, ValueError):
        return None


def start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (None when the process is gone or a zombie)."""
    stat = _stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return None
    return stat[3]


def _tag(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            raw = handle.read()
    except OSError:
        return ""
    for item in raw.split(b"\0"):
        if item.startswith(_TAG_NEEDLE):
            return item[len(_TAG_NEEDLE) :].decode(errors="replace")
    return ""


def snapshot() -> dict[int, ProcInfo]:
    """Every live process on this host (blocking: call through ``asyncio.to_thread``)."""
    found: dict[int, ProcInfo] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        pid = int(entry)
        stat = _stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            continue
        found[pid] = ProcInfo(pid, stat[1], stat[2], stat[3], _tag(pid))
    return found


def members(
    procs: Mapping[int, ProcInfo],
    *,
    tag: str,
    pid: int,
    start: int,
    pgid: int,
    leader_unreaped: bool = False,
    known: Mapping[int, int] | None = None,
) -> list[ProcInfo]:
    """The processes of one tracked tree in ``procs``.

    The group counts only while its leader is provably the one podbay started (same
    start time, or not reaped yet): once the group is empty its id may be reused.
    ``known`` (pid -> start_ticks) are processes found earlier: one whose parent has just
    exited is no longer a descendant, but it is still part of the tree.
    """
    known = known or {}
    me = os.getpid()
    leader = procs.get(pid)
    leader_is_ours = leader_unreaped or (
        start > 0 and leader is not None and leader.start_ticks == start
    )
    chosen = {
        p.pid
        for p in procs.values()
        if (tag and p.tag == tag)
        or (leader_is_ours and pgid > 0 and p.pgid == pgid)
        or (p.pid == pid and start > 0 and p.start_ticks == start)
        or known.get(p.pid) == p.start_ticks
    }
    # Descendants of anything chosen: a child may have dropped both the group and the tag.
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    stack = list(chosen)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in chosen:
                chosen.add(child)
                stack.append(child)
    chosen.discard(me)
    return sorted((procs[p] for p in chosen), key=lambda p: p.pid)


def _signal_exact(proc: ProcInfo, sig: signal.Signals) -> None:
    """Signal ``proc`` only if its pid still names the same process (pidfd, no race)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return
    except (OSError, AttributeError):  # kernel < 5.3 or not Linux: best effort
        if start_ticks(proc.pid) == proc.start_ticks:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(proc.pid, sig)
        return
    try:
        # The pidfd pins the process: if the start time matches now, it is the same one.
        if start_ticks(proc.pid) == proc.start_ticks:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- tracked children


class _TrackingProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's stream protocol plus an event for the leader's exit.

    ``Process.wait()`` returns only once every pipe is closed too, so a grandchild that
    holds stdout would keep it waiting; ``exited`` fires when the leader is reaped.
    """

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited = asyncio.Event()
        self.transport: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self.transport = transport
        super().connection_made(transport)

    def process_exited(self) -> None:
        super().process_exited()
        self.exited.set()


class TrackedProcess:
    """A child started by :meth:`ProcessTracker.spawn`."""

    def __init__(
        self,
        protocol: _TrackingProtocol,
        *,
        record_id: int | None,
        pid: int,
        start: int,
        tag: str,
        kind: str,
        detail: str,
    ) -> None:
        self._protocol = protocol
        self.record_id = record_id
        self.pid = pid
        self.pgid = pid  # start_new_session: the child leads its own group
        self.start_ticks = start
        self.tag = tag
        self.kind = kind
        self.detail = detail
        self.stdin: asyncio.StreamWriter | None = protocol.stdin
        self.stdout: asyncio.StreamReader | None = protocol.stdout
        self.stderr: asyncio.StreamReader | None = protocol.stderr
        self.ended = False

    @property
    def returncode(self) -> int | None:
        transport = self._protocol.transport
        return None if transport is None else transport.get_returncode()

    @property
    def exited(self) -> bool:
        return self._protocol.exited.is_set()

    async def wait_exit(self) -> int:
        """The leader's exit status; unlike ``Process.wait()`` it never waits for pipes."""
        await self._protocol.exited.wait()
        code = self.returncode
        assert code is not None
        return code

    def close(self) -> None:
        """Close our ends of the pipes: readers see EOF even if a stray process holds them."""
        transport = self._protocol.transport
        if transport is not None and not transport.is_closing():
            transport.close()


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class Survivor:
    """A process row of an earlier podbay whose processes were still running at start-up.

    ``killed`` are the pids that :meth:`ProcessTracker.kill_survivors` killed; ``remaining``
    are those it could not kill (then the row stays open and is tried again next start).
    """

    row: ProcessRow
    killed: tuple[int, ...]
    remaining: tuple[int, ...] = ()

    @property
    def pid(self) -> int:
        return self.row.pid

    @property
    def kind(self) -> str:
        return self.row.kind

    @property
    def detail(self) -> str:
        return self.row.detail

    @property
    def project(self) -> str:
        return self.row.project

    @property
    def session_key(self) -> str:
        return self.row.session_key

    @property
    def run_id(self) -> int | None:
        return self.row.run_id


class ProcessesSurvived(EngineError):
    """Processes of a run could not be killed."""

    def __init__(self, what: str, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        super().__init__(
            f"{what}: {len(self.pids)} process(es) could not be stopped "
            f"(pid {', '.join(map(str, self.pids[:10]))})"
        )


class ProcessTracker:
    """Starts, records, kills and verifies podbay's child processes.

    ``store=None`` tracks in memory only (no recovery after a crash). ``scope`` keeps the
    tags of two podbays (two data dirs) on one host apart.
    """

    def __init__(self, store: Store | None = None, *, scope: str = "podbay") -> None:
        self.store = store
        self.scope = scope
        self._counter = 0

    async def spawn(
        self,
        *argv: str,
        kind: str,
        detail: str = "",
        project: str = "",
        session: str = "",
        run_id: int | None = None,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        stdin: _Stdio = DEVNULL,
        stdout: _Stdio = PIPE,
        stderr: _Stdio = PIPE,
        limit: int = 2**16,
    ) -> TrackedProcess:
        """Start ``argv`` in its own session, tagged, recorded, dying with podbay.

        Call from the event-loop thread only (see the module docstring: PDEATHSIG).
        Raises OSError when the program cannot be started (the record is then closed).
        """
        record_id: int | None = None
        if self.store is not None:
            row = await self.store.process_add(
                kind, detail=detail, project=project, session_key=session, run_id=run_id
            )
            record_id = row.id
            # Derived from the row, so that a later start can find the processes again.
            tag = f"{self.scope}.{row.id}.{row.started_at:.6f}"
        else:
            self._counter += 1
            tag = f"{self.scope}.mem{os.getpid()}.{self._counter}.{os.urandom(4).hex()}"
        child_env = dict(os.environ if env is None else env)
        child_env[TAG_VAR] = tag
        loop = asyncio.get_running_loop()
        parent = os.getpid()
        try:
            launch: list[str] = list(argv)
            extra: dict[str, Any] = {}
            if _SETPRIV is not None:
                program = _program(argv[0], cwd, child_env)
                launch = [_SETPRIV, "--pdeathsig", "KILL", "--", program, *argv[1:]]
            else:
                extra["preexec_fn"] = lambda: _die_with_parent(parent)
            transport, protocol = await loop.subprocess_exec(
                lambda: _TrackingProtocol(limit, loop),
                *launch,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                cwd=cwd,
                env=child_env,
                start_new_session=True,
                **extra,
            )
        except BaseException:
            if self.store is not None and record_id is not None:
                await self.store.process_end(record_id)
            raise
        pid = transport.get_pid()
        stat = _stat(pid)
        # Only while the child is unreaped is its ppid podbay; otherwise the pid may already
        # name another process, whose start time must not be recorded as ours.
        start = stat[3] if stat is not None and stat[1] == parent else 0
        tracked = TrackedProcess(
            protocol,
            record_id=record_id,
            pid=pid,
            start=start,
            tag=tag,
            kind=kind,
            detail=detail,
        )
        if self.store is not None and record_id is not None:
            try:
                await self.store.process_started(record_id, pid, pid, start)
            except BaseException:
                # Nobody would hold the child if we gave up here.
                await asyncio.shield(self.kill_tree(tracked, 0))
                tracked.close()
                raise
        return tracked

    async def members(self, target: TrackedProcess | ProcessRow) -> list[ProcInfo]:
        """The live processes of ``target``'s tree."""
        return await asyncio.to_thread(self._members_now, target)

    def _members_now(self, target: TrackedProcess | ProcessRow) -> list[ProcInfo]:
        return members(snapshot(), **self._identity(target))

    def _identity(self, target: TrackedProcess | ProcessRow) -> dict[str, Any]:
        if isinstance(target, TrackedProcess):
            return {
                "tag": target.tag,
                "pid": target.pid,
                "start": target.start_ticks,
                "pgid": target.pgid,
                "leader_unreaped": not target.exited,
            }
        return {
            "tag": f"{self.scope}.{target.id}.{target.started_at:.6f}",
            "pid": target.pid,
            "start": target.start_ticks,
            "pgid": target.pgid,
        }

    async def kill_tree(self, target: TrackedProcess | ProcessRow, grace_s: float = 0) -> list[int]:
        """Stop every process of ``target`` and verify that none remains.

        SIGTERM goes to the whole tree; then podbay waits up to ``grace_s`` for the leader
        alone (a child still holding a pipe does not extend the wait), and SIGKILLs whatever
        is left. Returns the pids that survived even SIGKILL (normally none); the record is
        closed only when nothing remains.
        """
        loop = asyncio.get_running_loop()
        # Everything found once stays found: signalling the leader re-parents its children
        # to init, which cuts them off the parent chain.
        known: dict[int, int] = {}
        if grace_s > 0 and not self._leader_done(target):
            # Members first, the group after: the group signal is for processes forked
            # since the scan, and the scan must see the tree before the leader dies.
            await asyncio.to_thread(self._signal_members, target, signal.SIGTERM, known)
            self._signal_group(target, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self._wait_leader(target)
        deadline = loop.time() + KILL_VERIFY_S
        while True:
            left = await asyncio.to_thread(self._signal_members, target, signal.SIGKILL, known)
            self._signal_group(target, signal.SIGKILL)
            if not left:
                break
            if loop.time() > deadline:
                survivors = [p.pid for p in left]
                log.error("%s: processes survived SIGKILL: %s", _what(target), survivors)
                return survivors
            # Delivery of SIGKILL is asynchronous: poll until the kernel has ended them.
            await asyncio.sleep(_POLL_S)
        if isinstance(target, TrackedProcess):
            # Reaping is the child watcher's job; after SIGKILL it is imminent.
            await target.wait_exit()
            target.close()
        await self._close_record(target)
        return []

    async def finish(self, tracked: TrackedProcess) -> list[int]:
        """After the leader exited: kill what it left behind and close the record."""
        await tracked.wait_exit()
        return await self.kill_tree(tracked, 0)

    async def run(
        self,
        *argv: str,
        kind: str,
        detail: str = "",
        project: str = "",
        timeout_s: float | None = None,
        input: bytes | None = None,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        merge_stderr: bool = False,
    ) -> Completed:
        """Run ``argv`` to completion like ``communicate()``, tracked.

        On timeout the whole tree is killed and TimeoutError raised. Output that a stray
        descendant keeps open does not make this wait: the run ends with its leader.
        """
        tracked = await self.spawn(
            *argv,
            kind=kind,
            detail=detail,
            project=project,
            cwd=cwd,
            env=env,
            stdin=PIPE if input is not None else DEVNULL,
            stdout=PIPE,
            stderr=STDOUT if merge_stderr else PIPE,
        )
        readers = [
            asyncio.create_task(stream.read())
            for stream in (tracked.stdout, tracked.stderr)
            if stream is not None
        ]
        writer = asyncio.create_task(_feed(tracked.stdin, input)) if input is not None else None
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    code = await tracked.wait_exit()
            except TimeoutError:
                await self.kill_tree(tracked, 0)
                raise
            await self.kill_tree(tracked, 0)
            # The tree is dead, so EOF follows what is still buffered in the pipes; the bound
            # only matters if something outside the tree holds a pipe open.
            await asyncio.wait(readers, timeout=KILL_VERIFY_S)
            tracked.close()
            outputs = await asyncio.gather(*readers)
        finally:
            for task in [*readers, *([writer] if writer else [])]:
                task.cancel()
            await asyncio.gather(*readers, *([writer] if writer else []), return_exceptions=True)
            if not tracked.ended:
                # Cancelled from outside: still never leave the tree behind.
                await asyncio.shield(self.kill_tree(tracked, 0))
        out = outputs[0] if outputs else b""
        err = outputs[1] if len(outputs) > 1 else b""
        return Completed(code, out, err)

    async def kill_survivors(self) -> list[Survivor]:
        """At start-up: kill the processes an earlier podbay left running.

        Every open record whose processes still live is killed with its whole tree and
        returned; records whose processes are all gone are closed silently.
        """
        if self.store is None:
            return []
        found: list[Survivor] = []
        for row in await self.store.processes_live():
            alive = await self.members(row)
            if not alive:
                await self.store.process_end(row.id)
                continue
            log.warning(
                "killing %d leftover process(es) of %s %s (pid %s)",
                len(alive),
                row.kind,
                row.detail,
                row.pid,
            )
            remaining = await self.kill_tree(row, 0)
            found.append(Survivor(row, tuple(p.pid for p in alive), tuple(remaining)))
        await self.store.processes_prune()
        return found

    # -- helpers --------------------------------------------------------------------------

    def _leader_done(self, target: TrackedProcess | ProcessRow) -> bool:
        if isinstance(target, TrackedProcess):
            return target.exited
        return target.start_ticks == 0 or start_ticks(target.pid) != target.start_ticks

    async def _wait_leader(self, target: TrackedProcess | ProcessRow) -> None:
        if isinstance(target, TrackedProcess):
            await target.wait_exit()
            return
        # Not our child (an earlier podbay's): a pidfd turns readable when it exits.
        try:
            fd = os.pidfd_open(target.pid)
        except ProcessLookupError:
            return
        except (OSError, AttributeError):
            while not self._leader_done(target):  # noqa: ASYNC110 - no pidfd, no event
                await asyncio.sleep(_POLL_S)
            return
        loop = asyncio.get_running_loop()
        gone = loop.create_future()

        def exited() -> None:
            if not gone.done():
                gone.set_result(None)

        loop.add_reader(fd, exited)
        try:
            if not self._leader_done(target):
                await gone
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    def _signal_group(self, target: TrackedProcess | ProcessRow, sig: signal.Signals) -> None:
        # Only while the leader is unreaped is the group id surely still ours.
        if isinstance(target, TrackedProcess) and not target.exited:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(target.pgid, sig)

    def _signal_members(
        self, target: TrackedProcess | ProcessRow, sig: signal.Signals, known: dict[int, int]
    ) -> list[ProcInfo]:
        """Blocking: signal every member (adding it to ``known``); return those alive."""
        alive = members(snapshot(), **self._identity(target), known=known)
        for proc in alive:
            known[proc.pid] = proc.start_ticks
        for proc in alive:
            _signal_exact(proc, sig)
        return alive

    async def _close_record(self, target: TrackedProcess | ProcessRow) -> None:
        if isinstance(target, TrackedProcess):
            if target.ended:
                return
            target.ended = True
            record_id = target.record_id
        else:
            record_id = target.id
        if self.store is not None and record_id is not None:
            await self.store.process_end(record_id)


async def _feed(stdin: asyncio.StreamWriter | None, data: bytes) -> None:
    if stdin is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stdin.write(data)
        await stdin.drain()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stdin.close()


def _what(target: TrackedProcess | ProcessRow) -> str:
    return f"{target.kind} {target.detail} (pid {target.pid})".replace("  ", " ")
