from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from podbay.engine.agents import (
    FinishedEvent,
    HostCommandAgent,
    HostCommandRun,
    RunRequest,
    TextEvent,
    group_members,
    paragraphs,
)


def script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "agent.py"
    path.write_text(body)
    return [sys.executable, str(path)]


async def collect(run: HostCommandRun) -> tuple[list[str], FinishedEvent]:
    texts: list[str] = []
    finished: FinishedEvent | None = None
    async for event in run:
        if isinstance(event, TextEvent):
            texts.append(event.text)
        else:
            finished = event
    assert finished is not None
    return texts, finished


async def test_prompt_arrives_on_stdin_and_stdout_streams_by_paragraph(tmp_path: Path) -> None:
    argv = script(
        tmp_path,
        "import sys\n"
        "prompt = sys.stdin.read()\n"
        "print(f'You said: {prompt}')\n"
        "print()\n"
        "print('```')\nprint('code line 1')\nprint()\nprint('code line 2')\nprint('```')\n"
        "print()\nprint('bye')\n",
    )
    texts, finished = await collect(HostCommandAgent(argv).run(RunRequest("hello agent")))
    assert texts == ["You said: hello agent", "```\ncode line 1\n\ncode line 2\n```", "bye"]
    assert finished.ok and finished.exit_code == 0


async def test_nonzero_exit_is_a_failure_quoting_the_last_stderr_lines(tmp_path: Path) -> None:
    argv = script(
        tmp_path,
        "import sys\n"
        "for i in range(30): print(f'err {i}', file=sys.stderr)\n"
        "print('partial answer')\n"
        "sys.exit(4)\n",
    )
    texts, finished = await collect(HostCommandAgent(argv).run(RunRequest("x")))
    assert texts == ["partial answer"]
    assert not finished.ok and finished.exit_code == 4
    lines = finished.error.splitlines()
    assert lines[0] == "err 10" and lines[-1] == "err 29" and len(lines) == 20


async def test_missing_agent_binary_is_a_failed_run(tmp_path: Path) -> None:
    agent = HostCommandAgent([str(tmp_path / "no-such-agent")])
    texts, finished = await collect(agent.run(RunRequest("x")))
    assert texts == [] and not finished.ok
    assert "cannot start agent" in finished.error


async def test_agent_never_sees_podbay_secrets_in_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PODBAY_TRANSPORTS__SLACK__BOT_TOKEN", "xoxb-secret")
    argv = script(tmp_path, "import os\nprint(sorted(k for k in os.environ if 'PODBAY' in k))\n")
    texts, _ = await collect(HostCommandAgent(argv).run(RunRequest("x", project="demo")))
    # PODBAY_PROCESS is the tag that finds the run's processes again; it holds no secret.
    assert texts == ["['PODBAY_PROCESS', 'PODBAY_PROJECT']"]


async def test_runs_in_the_project_directory(tmp_path: Path) -> None:
    argv = script(tmp_path, "import os\nprint(os.getcwd())\n")
    workdir = tmp_path / "proj"
    workdir.mkdir()
    texts, _ = await collect(HostCommandAgent(argv).run(RunRequest("x", workdir=workdir)))
    assert texts == [str(workdir)]


async def test_cancel_kills_the_agent_and_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    argv = script(
        tmp_path,
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen(['sleep', '60'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\nprint(flush=True)\n"
        "time.sleep(60)\n",
    )
    run = HostCommandAgent(argv, kill_grace_s=2).run(RunRequest("x"))
    iterator = aiter(run)
    first = await anext(iterator)
    assert first == TextEvent("started")
    pending = asyncio.create_task(anext(iterator))
    await asyncio.sleep(0.05)
    pending.cancel()
    await asyncio.gather(pending, return_exceptions=True)
    leader = run.pid
    assert leader is not None
    await run.cancel()
    child = int(pidfile.read_text())
    assert group_members(leader) == [], "cancel() returned while the agent's group lived on"
    for pid in (leader, child):
        assert not _alive(pid), f"process {pid} survived cancel()"


async def _start_and_wait_for_pids(
    tmp_path: Path, body: str, names: list[str], grace_s: float
) -> tuple[HostCommandRun, dict[str, int], asyncio.Task[tuple[list[str], FinishedEvent]]]:
    """Start an agent that prints one line "<name> <pid>" per process it started."""
    run = HostCommandAgent(script(tmp_path, body), kill_grace_s=grace_s).run(RunRequest("x"))
    iterator = aiter(run)
    pids: dict[str, int] = {}
    while set(pids) != set(names):
        event = await asyncio.wait_for(anext(iterator), 30)
        assert isinstance(event, TextEvent), event
        for line in event.text.splitlines():
            name, pid = line.split()
            pids[name] = int(pid)

    async def rest() -> tuple[list[str], FinishedEvent]:
        texts: list[str] = []
        async for event in iterator:
            if isinstance(event, FinishedEvent):
                return texts, event
            texts.append(event.text)
        raise AssertionError("no FinishedEvent")

    return run, pids, asyncio.create_task(rest())


# A child that ignores SIGTERM and keeps the agent's stdout open; it reports itself only
# once SIGTERM is ignored.
_STUBBORN_CHILD = (
    "import os, subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import os, signal, time; "
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    'print("child", os.getpid(), flush=True); print(flush=True); time.sleep(600)\'])\n'
    "print('leader', os.getpid()); print(flush=True)\n"
    "time.sleep(600)\n"
)


async def test_a_child_holding_stdout_does_not_make_cancel_wait_out_the_grace(
    tmp_path: Path,
) -> None:
    # The grace period is for the agent itself; once it has exited on SIGTERM, what it
    # left behind is killed at once. With 600 s of grace, cancel() can only return within
    # the deadline below if it stops waiting when the leader is gone.
    run, pids, rest = await _start_and_wait_for_pids(
        tmp_path, _STUBBORN_CHILD, ["leader", "child"], grace_s=600
    )
    await asyncio.wait_for(run.cancel(), 60)
    for name, pid in pids.items():
        assert not _alive(pid), f"{name} {pid} survived cancel()"
    _, finished = await asyncio.wait_for(rest, 30)
    assert not finished.ok


_SETSID_VARIANTS = {
    # A new session leaves the process group that killpg reaches.
    "setsid": "subprocess.Popen([sys.executable, GRAND], start_new_session=True, "
    "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)",
    # ... and with an empty environment it carries no tag either; its parent still lives.
    "setsid, empty environment": "subprocess.Popen([sys.executable, GRAND], "
    "start_new_session=True, env={}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)",
    # A classic daemon: its parent exits at once, so only the environment tag leads to it.
    "double fork": "subprocess.run([sys.executable, GRAND, 'fork'], "
    "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)",
}


@pytest.mark.parametrize("variant", list(_SETSID_VARIANTS))
async def test_a_child_that_leaves_the_process_group_is_killed_by_cancel(
    tmp_path: Path, variant: str
) -> None:
    pidfile = tmp_path / "escaped.pid"
    grand = tmp_path / "grand.py"
    grand.write_text(
        "import os, subprocess, sys, time\n"
        "if sys.argv[1:] == ['fork']:\n"
        "    subprocess.Popen([sys.executable, __file__], start_new_session=True)\n"
        "    sys.exit(0)\n"
        f"open({str(pidfile)!r} + '.tmp', 'w').write(str(os.getpid()))\n"
        f"os.rename({str(pidfile)!r} + '.tmp', {str(pidfile)!r})\n"
        "time.sleep(600)\n"
    )
    body = (
        "import os, subprocess, sys, time\n"
        f"GRAND = {str(grand)!r}\n"
        f"{_SETSID_VARIANTS[variant]}\n"
        f"while not os.path.exists({str(pidfile)!r}): time.sleep(0.01)\n"
        "print('leader', os.getpid()); print(flush=True)\n"
        "time.sleep(600)\n"
    )
    run, pids, rest = await _start_and_wait_for_pids(tmp_path, body, ["leader"], grace_s=5)
    escaped = int(pidfile.read_text())
    assert _alive(escaped)
    await asyncio.wait_for(run.cancel(), 60)
    assert not _alive(pids["leader"])
    assert not _alive(escaped), f"the {variant} child survived cancel()"
    await asyncio.wait_for(rest, 30)


async def test_leftovers_are_killed_when_the_agent_finishes(tmp_path: Path) -> None:
    pidfile = tmp_path / "bg.pid"
    argv = script(
        tmp_path,
        "import subprocess, sys\n"
        "bg = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(bg.pid))\n"
        "print('done')\n",
    )
    texts, finished = await asyncio.wait_for(
        collect(HostCommandAgent(argv).run(RunRequest("x"))), 60
    )
    assert texts == ["done"] and finished.ok
    assert not _alive(int(pidfile.read_text())), "the agent's background child outlived its run"


async def test_a_megabyte_prompt_to_cat_comes_back_whole() -> None:
    # cat writes while it reads: the prompt must be written while stdout is being read.
    prompt = "".join(f"line {i:07d} " + "x" * 100 + "\n" for i in range(9000))
    assert len(prompt) > 1_000_000
    texts, finished = await asyncio.wait_for(
        collect(HostCommandAgent(["cat"]).run(RunRequest(prompt))), 60
    )
    assert finished.ok
    assert "\n\n".join(texts) == prompt.strip("\n")


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"  # a zombie has exited; only its parent's wait() is missing


def test_paragraph_splitter_keeps_code_fences_whole() -> None:
    done, rest = paragraphs("a\n\n```\nx\n\ny\n", final=False)
    assert done == ["a"] and rest == "```\nx\n\ny\n"
    done, rest = paragraphs(rest + "```\n\nz", final=True)
    assert done == ["```\nx\n\ny\n```", "z"] and rest == ""
