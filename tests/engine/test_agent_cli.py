"""Agent CLIs fetched once from the real npm (the host's own registry configuration).

The installs are real: ~400 MB and a few seconds each with npm's cache warm, so each CLI is
installed once per module and the tests read that install.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from podbay.engine.agent_cli import DEFAULT_VERSIONS, AgentCli, AgentCliStore, container_path
from podbay.engine.procs import ProcessTracker
from podbay.engine.store import Store
from podbay.errors import UserError

pytestmark = pytest.mark.skipif(
    shutil.which("npm") is None or platform.machine() != "x86_64",
    reason="needs npm on linux x86_64",
)


def counting_npm(where: Path) -> tuple[str, Path]:
    """An ``npm`` that appends its argv to a file, then is the real npm."""
    log = where / "npm-calls"
    script = where / "npm"
    script.write_text(
        f'#!/bin/sh\necho "$*" >> {log}\nexec {shutil.which("npm")} "$@"\n', encoding="utf-8"
    )
    script.chmod(0o755)
    return str(script), log


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@dataclass
class Installed:
    data_dir: Path
    npm: str
    npm_log: Path
    results: list[AgentCli]
    progress: list[str]


@pytest.fixture(scope="module")
def claude_install(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """Two podbay tasks asking for claude at the same moment, on an empty data dir."""
    base = tmp_path_factory.mktemp("agents-claude")
    npm, log = counting_npm(base)
    progress: list[str] = []

    async def note(text: str) -> None:
        progress.append(text)

    async def both() -> list[AgentCli]:
        store = AgentCliStore(base / "data", npm=npm)
        return list(
            await asyncio.gather(store.ensure("claude", "", note), store.ensure("claude", ""))
        )

    results = asyncio.run(both())
    yield Installed(base / "data", npm, log, results, progress)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def tracker(tmp_path: Path) -> AsyncIterator[ProcessTracker]:
    store = await Store.open(tmp_path / "podbay.db")
    yield ProcessTracker(store)
    await store.close()


async def run(*argv: str, home: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env={"HOME": str(home), "PATH": os.environ["PATH"]},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    return out.decode()


def test_two_first_uses_at_once_install_claude_once(claude_install: Installed) -> None:
    first, second = claude_install.results
    assert first == second
    installs = [c for c in calls(claude_install.npm_log) if c.startswith("install")]
    assert len(installs) == 1
    assert f"@anthropic-ai/claude-code-linux-x64@{DEFAULT_VERSIONS['claude']}" in installs[0]
    assert "--ignore-scripts" in installs[0]
    assert len(claude_install.progress) == 1 and "Fetching claude" in claude_install.progress[0]


async def test_the_installed_claude_binary_runs_and_reports_the_pinned_version(
    claude_install: Installed, tmp_path: Path
) -> None:
    cli = claude_install.results[0]
    version = DEFAULT_VERSIONS["claude"]
    assert cli.host_path == claude_install.data_dir / "agents" / "claude" / version / "claude"
    assert container_path(cli) == f"/opt/podbay/agents/claude/{version}/claude"
    out = await run(str(cli.host_path), "--version", home=tmp_path)
    assert version in out


def test_the_install_is_writable_by_nobody_but_podbay_and_leaves_no_staging(
    claude_install: Installed,
) -> None:
    agents = claude_install.data_dir / "agents"
    assert [p.name for p in agents.iterdir()] == ["claude"]
    for path in [agents, *agents.rglob("*")]:
        mode = path.lstat().st_mode
        assert mode & (stat.S_IWGRP | stat.S_IWOTH) == 0, path
        assert path.lstat().st_uid == os.getuid()
        if path.is_dir():
            assert stat.S_IMODE(mode) == 0o755, path
    assert stat.S_IMODE(claude_install.results[0].host_path.stat().st_mode) == 0o755


async def test_a_later_start_finds_the_install_without_running_npm(
    claude_install: Installed,
) -> None:
    before = calls(claude_install.npm_log)
    progress: list[str] = []

    async def note(text: str) -> None:
        progress.append(text)

    store = AgentCliStore(claude_install.data_dir, npm=claude_install.npm)
    cli = await store.ensure("claude", DEFAULT_VERSIONS["claude"], note)
    assert cli == claude_install.results[0]
    assert calls(claude_install.npm_log) == before and progress == []
    assert store.installed() == [cli]
    assert store.lookup("claude") == cli and store.lookup("codex") is None


async def test_codex_is_installed_with_its_helpers_next_to_it(
    tmp_path: Path, tracker: ProcessTracker
) -> None:
    store = AgentCliStore(tmp_path / "data", procs=tracker)
    try:
        cli = await store.ensure("codex")
        version = DEFAULT_VERSIONS["codex"]
        assert container_path(cli) == f"/opt/podbay/agents/codex/{version}/bin/codex"
        assert cli.host_path == tmp_path / "data" / "agents" / "codex" / version / "bin" / "codex"
        # codex finds rg relative to itself, so the directory came along.
        assert (cli.host_dir / "codex-path" / "rg").is_file()
        out = await run(str(cli.host_path), "--version", home=tmp_path)
        assert version in out
        assert await tracker.store.processes_live() == []  # type: ignore[union-attr]
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp_path / "data", True)


async def test_an_unknown_version_says_what_failed_and_how_to_fix_it_leaving_nothing(
    tmp_path: Path,
) -> None:
    store = AgentCliStore(tmp_path / "data")
    with pytest.raises(UserError) as caught:
        await store.ensure("claude", "0.0.1")
    message = str(caught.value)
    assert "npm install @anthropic-ai/claude-code-linux-x64@0.0.1" in message
    assert "404" in message or "No matching version" in message  # npm's own words
    assert "[agent] version" in message and "registry" in message
    agents = tmp_path / "data" / "agents"
    assert list(agents.rglob("*")) == []
    assert store.installed() == []


async def test_a_staging_dir_of_a_crashed_podbay_is_removed_at_the_next_install(
    tmp_path: Path,
) -> None:
    dead = await asyncio.create_subprocess_exec("true")
    await dead.wait()
    agents = tmp_path / "data" / "agents"
    abandoned = agents / f".tmp-claude-9.9.9-{dead.pid}-abcd1234"
    (abandoned / "npm").mkdir(parents=True)
    (abandoned / "npm" / "half-written").write_text("x")
    store = AgentCliStore(tmp_path / "data")
    with pytest.raises(UserError):
        await store.ensure("claude", "0.0.1")
    assert list(agents.iterdir()) == []


async def test_without_npm_the_error_says_to_install_it(tmp_path: Path) -> None:
    store = AgentCliStore(tmp_path / "data", npm=str(tmp_path / "no-such-npm"))
    with pytest.raises(UserError) as caught:
        await store.ensure("claude")
    assert "not on PATH" in str(caught.value) and "npm" in str(caught.value)


@pytest.mark.parametrize("version", ["../../etc", "latest", "1.2"])
async def test_a_version_that_is_not_exact_is_refused_before_npm(
    tmp_path: Path, version: str
) -> None:
    npm, log = counting_npm(tmp_path)
    store = AgentCliStore(tmp_path / "data", npm=npm)
    with pytest.raises(UserError) as caught:
        await store.ensure("claude", version)
    assert "exact version" in str(caught.value)
    assert calls(log) == [] and not (tmp_path / "data" / "agents").exists()


async def test_an_unsupported_machine_gets_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    store = AgentCliStore(tmp_path / "data")
    with pytest.raises(UserError) as caught:
        await store.ensure("codex")
    message = str(caught.value)
    assert "riscv64" in message and "x86_64" in message and 'preset = "command"' in message
