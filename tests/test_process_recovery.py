"""No child outlives podbay unnoticed: the real CLI, killed with -9, restarted."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from fakes.podbay_cli import chat, crash, start_podbay
from test_cli import agent_config, clean_env

from podbay.engine.procs import start_ticks


def alive(pid: int) -> bool:
    return start_ticks(pid) is not None  # None: gone or a zombie


def wait_for_file(path: Path, proc: subprocess.Popen[str], timeout: float = 60) -> str:
    """The content of ``path`` once it exists (written by rename, so complete)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "podbay exited early"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)
    return path.read_text()


def wait_gone(pid: int, timeout: float = 30) -> None:
    """Until ``pid`` (not our child) has exited: its pidfd turns readable."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"process {pid} is still running"
    finally:
        os.close(fd)


# The agent's work: start a helper (as agents start compilers, test runners, servers)
# and wait for it. Both write their pid; neither ever ends by itself.
AGENT = """
import os, subprocess, sys, time
pids = {pids!r}
helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3600)'])
with open(pids + '.tmp', 'w') as out:
    out.write(f'{{os.getpid()}} {{helper.pid}}')
os.rename(pids + '.tmp', pids)
helper.wait()
"""


def test_after_kill_9_the_old_agent_is_stopped_and_its_conversation_told(
    tmp_path: Path,
) -> None:
    pids_file = tmp_path / "agent.pids"
    config = agent_config(tmp_path, AGENT.format(pids=str(pids_file)))
    env = clean_env(tmp_path, config)
    proc = start_podbay(env)
    helper = 0
    try:
        assert proc.stdin is not None
        proc.stdin.write("please refactor everything\n")
        proc.stdin.flush()
        leader, helper = map(int, wait_for_file(pids_file, proc).split())
        crash(proc)
        # PR_SET_PDEATHSIG ended the agent itself with podbay; its helper lives on.
        wait_gone(leader)
        assert alive(helper), "nothing survived the crash: this test would prove nothing"

        result = chat(env, "status\n", timeout=120)
        assert result.returncode == 0, result.stderr
        assert not alive(helper), "the previous run's agent process still runs"
        out = result.stdout
        assert "stopped what was still running from before" in out, out
        assert f"agent (pid {leader})" in out, out
        assert "podbay restarted while working on: please refactor everything" in out, out
        assert "Runs: none active" in out or "Runs:" not in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
        if helper and alive(helper):
            os.kill(helper, signal.SIGKILL)


def test_stop_kills_a_child_that_left_the_session_and_chat_exits_cleanly(
    tmp_path: Path,
) -> None:
    pid_file = tmp_path / "daemon.pid"
    daemon_py = tmp_path / "daemon.py"
    daemon_py.write_text(
        "import os, time\n"
        f"open({str(pid_file)!r} + '.tmp', 'w').write(str(os.getpid()))\n"
        f"os.rename({str(pid_file)!r} + '.tmp', {str(pid_file)!r})\n"
        "time.sleep(3600)\n"
    )
    # The agent starts a daemon in its own session that keeps the agent's stdout open.
    config = agent_config(
        tmp_path,
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, {str(daemon_py)!r}], start_new_session=True)\n"
        "time.sleep(3600)\n",
    )
    env = clean_env(tmp_path, config)
    proc = subprocess.Popen(
        [sys.executable, "-m", "podbay", "chat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    daemon = 0
    try:
        assert proc.stdin is not None
        proc.stdin.write("start the dev server\n")
        proc.stdin.flush()
        daemon = int(wait_for_file(pid_file, proc))
        _, err = proc.communicate("stop\n", timeout=120)
        assert proc.returncode == 0, err
        assert not alive(daemon), "a setsid'd child of the agent survived stop"
        assert "Event loop is closed" not in err, err
        assert "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if daemon and alive(daemon):
            os.kill(daemon, signal.SIGKILL)
