"""Freeform text drives the REAL Claude Code and Codex CLIs inside a project's container.

Only the hosted LLM is fake: an aiohttp server on 127.0.0.1 speaking the Anthropic Messages
or OpenAI Responses stream. The container runs on host networking, so the CLI reaches it.
podbay fetches the CLI from npm itself (once per data dir) and mounts it read-only.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from docker_support import DM, container_settings, expected_uid, remove_instance_containers
from fakes import anthropic_api as claude_api
from fakes import openai_api as codex_api
from fakes.transport import MemoryTransport

from podbay.bot import Podbay
from podbay.config import AgentConfig, Settings
from podbay.engine.lifecycle import ProjectManager

TURN_TIMEOUT = 180.0  # the first turn also fetches the CLI from npm


@dataclass
class AgentBot:
    settings: Settings
    bot: Podbay
    transport: MemoryTransport
    projects: Path

    @property
    def manager(self) -> ProjectManager:
        assert self.bot.engine is not None and self.bot.engine.projects is not None
        return self.bot.engine.projects

    async def ask(self, text: str, expect: str, timeout: float = TURN_TIMEOUT) -> str:
        since = len(self.transport.sent)
        await self.transport.say(text, session=DM, direct=True)
        return await self.transport.wait_for_text(expect, session=DM, timeout=timeout, since=since)

    def texts(self) -> list[str]:
        return self.transport.texts(DM)

    async def in_container(self, project: str, command: str) -> str:
        return await docker_cli("exec", self.manager.container_name(project), "sh", "-c", command)


async def docker_cli(*args: str) -> str:
    """The docker client, as an operator would use it (off the event loop)."""
    out = await asyncio.to_thread(
        subprocess.run, ["docker", *args], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout


async def start_bot(tmp_path: Path, agent: AgentConfig) -> AgentBot:
    settings = container_settings(tmp_path)
    settings.agent = agent
    (tmp_path / "projects").mkdir()
    transport = MemoryTransport()
    bot = Podbay(settings, transports=[transport], shutdown_grace_s=1)
    await bot.start()
    return AgentBot(settings, bot, transport, tmp_path / "projects")


async def stop_bot(ab: AgentBot) -> None:
    instance = ab.manager.instance
    await ab.bot.stop()
    await asyncio.to_thread(remove_instance_containers, instance, ab.settings)


@pytest.fixture
async def anthropic() -> AsyncIterator[claude_api.FakeAnthropic]:
    async with claude_api.FakeAnthropic() as fake:
        yield fake


@pytest.fixture
async def claude(
    docker_engine: None, tmp_path: Path, anthropic: claude_api.FakeAnthropic
) -> AsyncIterator[AgentBot]:
    agent = AgentConfig(
        preset="claude",
        base_url=anthropic.base_url,
        # The CLI retries 429/5xx ten times with back-off by default: errors at once here.
        env={"ANTHROPIC_API_KEY": anthropic.api_key, "CLAUDE_CODE_MAX_RETRIES": "0"},
    )
    ab = await start_bot(tmp_path, agent)
    try:
        yield ab
    finally:
        await stop_bot(ab)


async def test_claude_writes_a_file_streams_tool_text_and_footer_then_resumes(
    claude: AgentBot, anthropic: claude_api.FakeAnthropic
) -> None:
    await claude.ask("new project demo", "is ready", timeout=300)
    anthropic.script(
        claude_api.write("/workspace/hello.txt", "hello from claude\n"),
        claude_api.Text("I created hello.txt."),
    )
    await claude.ask("please create hello.txt", "turn")  # the footer counts turns
    texts = claude.texts()
    assert any("🔧 Write hello.txt" in t for t in texts)
    assert "I created hello.txt." in texts
    hello = claude.projects / "demo" / "hello.txt"
    assert hello.read_text() == "hello from claude\n"
    assert hello.stat().st_uid == expected_uid(), "written by dev, not root"
    first_turns = len(anthropic.turn_requests)

    anthropic.script(claude_api.Text("Still here."))
    await claude.ask("and now?", "Still here.")
    resumed = anthropic.turn_requests[first_turns]
    history = json.dumps(resumed.body["messages"])
    assert "please create hello.txt" in history, "the second turn resumes the first"
    assert "hello from claude" in history
    assert all(r.headers.get("x-api-key") == anthropic.api_key for r in anthropic.turn_requests)


async def test_stop_ends_a_hanging_claude_run_and_nothing_of_it_remains(
    claude: AgentBot, anthropic: claude_api.FakeAnthropic
) -> None:
    await claude.ask("new project demo", "is ready", timeout=300)
    anthropic.script(claude_api.Hang())
    await claude.transport.say("think forever", session=DM, direct=True)
    await asyncio.wait_for(anthropic.hanging.wait(), TURN_TIMEOUT)
    reply = await claude.ask("stop", "Stopped.", timeout=30)
    assert "Dropped 0" in reply
    ps = await claude.in_container("demo", "ps -eo pid,args")
    assert "claude" not in ps and "/opt/podbay/agents" not in ps, ps
    assert claude.bot.store is not None
    (run,) = await claude.bot.store.runs_recent()
    assert run.status == "cancelled"


async def test_a_rate_limit_from_the_api_is_reported_as_such(
    claude: AgentBot, anthropic: claude_api.FakeAnthropic
) -> None:
    await claude.ask("new project demo", "is ready", timeout=300)
    anthropic.script(claude_api.rate_limited(times=50))
    reply = await claude.ask("do something", "Agent run failed")
    assert "rate-limiting" in reply


async def test_an_auth_error_from_the_api_is_reported_as_such(
    claude: AgentBot, anthropic: claude_api.FakeAnthropic
) -> None:
    await claude.ask("new project demo", "is ready", timeout=300)
    anthropic.script(claude_api.auth_error(times=50))
    reply = await claude.ask("do something", "Agent run failed")
    assert "refused the credentials" in reply


async def test_the_api_key_is_in_no_inspect_log_row_or_reply(
    claude: AgentBot, anthropic: claude_api.FakeAnthropic, tmp_path: Path
) -> None:
    await claude.ask("new project demo", "is ready", timeout=300)
    anthropic.script(claude_api.Text("ok"))
    await claude.ask("hi", "ok")
    key = anthropic.api_key
    inspect = await docker_cli("inspect", claude.manager.container_name("demo"))
    assert key not in inspect
    assert all(key not in t for t in claude.texts())
    db = sqlite3.connect(claude.settings.data_dir / "podbay.db")
    try:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
            for row in db.execute(f"SELECT * FROM {table}"):
                assert all(key not in str(v) for v in row), table
    finally:
        db.close()
    log = claude.settings.data_dir / "podbay.log"
    assert not log.exists() or key not in log.read_text()


@pytest.fixture
async def openai() -> AsyncIterator[codex_api.FakeOpenAI]:
    async with codex_api.FakeOpenAI() as fake:
        yield fake


@pytest.fixture
async def codex(
    docker_engine: None, tmp_path: Path, openai: codex_api.FakeOpenAI
) -> AsyncIterator[AgentBot]:
    agent = AgentConfig(
        preset="codex",
        base_url=openai.base_url,
        model=openai.model,
        env={"OPENAI_API_KEY": openai.api_key},
    )
    ab = await start_bot(tmp_path, agent)
    try:
        yield ab
    finally:
        await stop_bot(ab)


async def test_codex_writes_a_file_and_resumes_its_thread(
    codex: AgentBot, openai: codex_api.FakeOpenAI
) -> None:
    await codex.ask("new project demo", "is ready", timeout=300)
    openai.script(
        codex_api.shell("printf 'hello from codex\\n' > hello.txt"),
        codex_api.Text("I created hello.txt."),
    )
    await codex.ask("please create hello.txt", "tokens")  # the footer: the run is recorded
    assert "I created hello.txt." in codex.texts()
    hello = codex.projects / "demo" / "hello.txt"
    assert hello.read_text() == "hello from codex\n"
    assert hello.stat().st_uid == expected_uid()
    assert any("🔧 $" in t and "hello.txt" in t for t in codex.texts())
    first_turns = len(openai.turn_requests)

    openai.script(codex_api.Text("Still here."))
    await codex.ask("and now?", "tokens")  # the footer comes once the run is recorded
    assert "Still here." in codex.texts()
    resumed = json.dumps(openai.turn_requests[first_turns].body)
    assert "please create hello.txt" in resumed, "the second turn resumes the thread"
    # codex sums usage over the thread; podbay reports each run's own share.
    assert codex.bot.store is not None
    second, first = await codex.bot.store.runs_recent(limit=2)
    assert first.usage["input_tokens"] == 2 * codex_api.INPUT_TOKENS  # two model calls
    assert second.usage["input_tokens"] == codex_api.INPUT_TOKENS, second.usage


async def test_a_lost_claude_conversation_starts_fresh_and_says_so(
    claude: AgentBot, anthropic: claude_api.FakeAnthropic
) -> None:
    await claude.ask("new project demo", "is ready", timeout=300)
    anthropic.script(claude_api.Text("First answer."))
    await claude.ask("remember this", "First answer.")
    # The CLI's own record of the conversation is gone (a new home volume, a cleanup).
    await claude.in_container("demo", "rm -rf /home/dev/.podbay/agent-home/.claude/projects")
    anthropic.script(claude_api.Text("Fresh answer."))
    await claude.ask("and now?", "Fresh answer.")
    assert any("started a fresh agent session" in t for t in claude.texts())


async def test_the_command_preset_runs_in_the_container_as_dev(
    docker_engine: None, tmp_path: Path
) -> None:
    agent = AgentConfig(
        preset="command", where="container", command=["sh", "-c", "cat; echo; id -u; pwd"]
    )
    ab = await start_bot(tmp_path, agent)
    try:
        await ab.ask("new project demo", "is ready", timeout=300)
        reply = await ab.ask("hello from chat", "/workspace")
        lines = reply.splitlines()
        assert lines[:1] == ["hello from chat"] or "hello from chat" in ab.texts()
        assert str(expected_uid()) in reply
    finally:
        await stop_bot(ab)
