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
    assert texts == ["['PODBAY_PROJECT']"]


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
