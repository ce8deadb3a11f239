"""ProcessTracker: children are recorded, killed as a whole tree, and found after a crash."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from podbay.engine.procs import ProcessTracker, start_ticks
from podbay.engine.store import Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await Store.open(tmp_path / "podbay.db")
    yield store
    await store.close()


def alive(pid: int) -> bool:
    return start_ticks(pid) is not None  # None: gone or a zombie


async def wait_gone(pid: int, timeout: float = 30) -> None:
    """Wait until ``pid`` (not our child) has exited: a pidfd turns readable then."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    gone = loop.create_future()
    loop.add_reader(fd, lambda: gone.done() or gone.set_result(None))
    try:
        await asyncio.wait_for(gone, timeout)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_a_finished_child_is_recorded_and_closed(store: Store) -> None:
    tracker = ProcessTracker(store)
    # It waits for its input, so it is surely still running when its start time is read.
    done = await tracker.run(
        "sh",
        "-c",
        "read line; echo $line",
        input=b"hello\n",
        kind="git",
        detail="git clone",
        project="demo",
    )
    assert (done.returncode, done.stdout) == (0, b"hello\n")
    assert await store.processes_live() == []
    rows = await store._fetchall("SELECT * FROM processes")  # type: ignore[attr-defined]
    assert [(r["kind"], r["detail"], r["project"]) for r in rows] == [("git", "git clone", "demo")]
    assert rows[0]["pid"] > 0 and rows[0]["start_ticks"] > 0 and rows[0]["ended_at"]


async def test_run_returns_when_the_leader_exits_though_a_child_holds_its_output(
    store: Store, tmp_path: Path
) -> None:
    # A background child inherits stdout: communicate() would wait for it for 600 s.
    pidfile = tmp_path / "bg.pid"
    tracker = ProcessTracker(store)
    done = await asyncio.wait_for(
        tracker.run("sh", "-c", f"sleep 600 & echo $! > {pidfile}; echo out", kind="git"),
        60,
    )
    assert (done.returncode, done.stdout) == (0, b"out\n")
    assert not alive(int(pidfile.read_text())), "the leftover child was not killed"
    assert await store.processes_live() == []


async def test_a_timeout_kills_the_whole_tree(store: Store, tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    tracker = ProcessTracker(store)
    with pytest.raises(TimeoutError):
        await tracker.run(
            "sh",
            "-c",
            f"sleep 600 & echo $! > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; wait",
            kind="git",
            timeout_s=0.5,
        )
    if pidfile.exists():
        assert not alive(int(pidfile.read_text()))
    assert await store.processes_live() == []


async def test_kill_tree_sigkills_a_leader_that_ignores_sigterm_after_the_grace(
    store: Store,
) -> None:
    tracker = ProcessTracker(store)
    tracked = await tracker.spawn(
        sys.executable,
        "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(600)",
        kind="agent",
    )
    assert tracked.stdout is not None
    assert await tracked.stdout.readline() == b"ready\n"
    assert await tracker.kill_tree(tracked, grace_s=0.2) == []
    assert tracked.returncode == -signal.SIGKILL
    assert not alive(tracked.pid)
    assert await store.processes_live() == []


# Run as a separate "podbay": starts an agent-like tree through the tracker, reports the
# pids on stdout, and waits to be killed.
_FAKE_PODBAY = """
import asyncio, sys
from podbay.engine import procs
from podbay.engine.procs import PIPE, ProcessTracker
from podbay.engine.store import Store

if sys.argv[2] == "preexec":
    procs._SETPRIV = None  # as on a host without util-linux's setpriv

TREE = '''
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
daemon = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],
                          start_new_session=True)
print(os.getpid(), child.pid, daemon.pid, flush=True)
time.sleep(600)
'''

async def main():
    store = await Store.open(sys.argv[1])
    tracker = ProcessTracker(store, scope="test")
    tracked = await tracker.spawn(sys.executable, "-c", TREE, kind="agent", detail="tree",
                                  project="demo", session="console:local", run_id=7,
                                  stdout=PIPE)
    print((await tracked.stdout.readline()).decode().strip(), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


@pytest.mark.parametrize("pdeathsig_by", ["setpriv", "preexec"])
async def test_after_a_crash_the_leader_dies_with_podbay_and_the_rest_is_killed_at_start(
    tmp_path: Path, pdeathsig_by: str
) -> None:
    db = tmp_path / "podbay.db"
    script = tmp_path / "fake_podbay.py"
    script.write_text(_FAKE_PODBAY)
    fake = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(db), pdeathsig_by, stdout=asyncio.subprocess.PIPE
    )
    assert fake.stdout is not None
    line = await asyncio.wait_for(fake.stdout.readline(), 60)
    leader, child, daemon = map(int, line.split())
    fake.kill()  # kill -9 podbay
    await fake.wait()
    # PR_SET_PDEATHSIG: the kernel kills the direct child together with podbay.
    await wait_gone(leader)
    assert alive(child) and alive(daemon), "nothing left to recover: the test proves nothing"

    store = await Store.open(db)
    try:
        tracker = ProcessTracker(store, scope="test")
        (survivor,) = await tracker.kill_survivors()
        assert (survivor.kind, survivor.detail, survivor.project) == ("agent", "tree", "demo")
        assert (survivor.session_key, survivor.run_id, survivor.pid) == ("console:local", 7, leader)
        assert set(survivor.killed) == {child, daemon} and survivor.remaining == ()
        assert not alive(child) and not alive(daemon)
        assert await store.processes_live() == []
        assert await tracker.kill_survivors() == [], "a second start finds nothing"
    finally:
        await store.close()


async def test_start_up_never_kills_a_process_that_only_reuses_a_recorded_pid(
    store: Store,
) -> None:
    # A record whose pid now names another process (a different start time, no tag).
    stranger = await asyncio.create_subprocess_exec("sleep", "600", start_new_session=True)
    try:
        row = await store.process_add("agent", detail="old")
        ticks = start_ticks(stranger.pid)
        assert ticks is not None
        await store.process_started(row.id, stranger.pid, stranger.pid, ticks - 1)
        assert await ProcessTracker(store).kill_survivors() == []
        assert alive(stranger.pid)
        assert await store.processes_live() == [], "the stale record is closed"
    finally:
        stranger.kill()
        await stranger.wait()


async def test_tags_of_another_podbay_are_left_alone(store: Store, tmp_path: Path) -> None:
    other = ProcessTracker(None, scope="other-podbay")
    tracked = await other.spawn("sleep", "600", kind="agent")
    try:
        row = await store.process_add("agent")  # same id space, different scope
        await store.process_started(row.id, 0, 0, 0)
        assert await ProcessTracker(store, scope="mine").kill_survivors() == []
        assert alive(tracked.pid)
    finally:
        assert await other.kill_tree(tracked) == []


async def test_a_program_is_found_as_exec_finds_it_and_a_bad_one_is_refused_unrecorded(
    store: Store, tmp_path: Path
) -> None:
    tracker = ProcessTracker(store)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "hello-tool"
    tool.write_text('#!/bin/sh\necho "hello from $0 in $(pwd)"\n')
    tool.chmod(0o755)
    plain = bin_dir / "not-executable"
    plain.write_text("#!/bin/sh\necho never\n")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    # By the child's PATH, not podbay's.
    done = await tracker.run("hello-tool", kind="agent", env=env, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.decode().endswith(f" in {tmp_path}\n")
    # With a slash: relative to the child's working directory.
    done = await tracker.run("./bin/hello-tool", kind="agent", cwd=tmp_path)
    assert done.returncode == 0 and b"hello from" in done.stdout
    with pytest.raises(FileNotFoundError):
        await tracker.spawn("no-such-agent-cli", kind="agent", env=env)
    with pytest.raises(FileNotFoundError):
        await tracker.spawn("./bin/hello-tool", kind="agent")  # not relative to podbay's cwd
    with pytest.raises(PermissionError):
        await tracker.spawn(str(plain), kind="agent")
    assert await store.processes_live() == []
