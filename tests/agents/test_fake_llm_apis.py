"""The real Claude Code and Codex CLIs, run on the host against the fake LLM APIs.

These pin down what podbay's agent presets rely on: the argv and environment that make
each CLI work unattended against a loopback endpoint, the JSON events it prints (tool
calls, results, session/thread ids, usage, errors) and how it resumes a conversation.
The binaries are the real npm packages (``fakes.agent_clis``); only the hosted LLM is fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fakes import anthropic_api as claude_api
from fakes import openai_api as codex_api
from fakes.agent_clis import AgentClis, agent_clis

RUN_TIMEOUT_S = 90.0
# Lines of stream-json can be long (the init event lists every tool and skill).
STREAM_LIMIT = 16 * 1024 * 1024
PATH = "/usr/local/bin:/usr/bin:/bin"

CLAUDE_ARGS = [
    "-p",
    "--output-format",
    "stream-json",
    "--verbose",
    "--permission-mode",
    "bypassPermissions",
]
# The container is the sandbox: codex's own (bwrap) sandbox cannot start there.
CODEX_ARGS = [
    "exec",
    "--json",
    "--skip-git-repo-check",
    "--dangerously-bypass-approvals-and-sandbox",
]


@pytest.fixture(scope="session")
def clis() -> AgentClis:
    return agent_clis()


@pytest.fixture
async def anthropic() -> AsyncIterator[claude_api.FakeAnthropic]:
    async with claude_api.FakeAnthropic() as fake:
        yield fake


@pytest.fixture
async def openai() -> AsyncIterator[codex_api.FakeOpenAI]:
    async with codex_api.FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


# -- running a CLI -----------------------------------------------------------------


@dataclass
class CliRun:
    returncode: int
    events: list[dict[str, Any]]
    stderr: str

    def of_type(self, kind: str, subtype: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e.get("type") == kind and (subtype is None or e.get("subtype") == subtype)
        ]

    def one(self, kind: str, subtype: str | None = None) -> dict[str, Any]:
        found = self.of_type(kind, subtype)
        assert len(found) == 1, f"expected one {kind}/{subtype} event, got {self.events}"
        return found[0]


class LiveCli:
    """A CLI process whose JSON lines are read as they come (for runs that never end)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def start(cls, argv: list[str], *, env: dict[str, str], cwd: Path, stdin: str) -> LiveCli:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=cwd,
            limit=STREAM_LIMIT,
            # Its own process group, so the whole tree can be killed.
            start_new_session=True,
        )
        assert process.stdin is not None
        process.stdin.write(stdin.encode())
        await process.stdin.drain()
        process.stdin.close()
        return cls(process)

    async def next_event(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = RUN_TIMEOUT_S
    ) -> dict[str, Any]:
        assert self.process.stdout is not None

        async def read() -> dict[str, Any]:
            assert self.process.stdout is not None
            while True:
                line = await self.process.stdout.readline()
                if not line:
                    raise AssertionError(f"the CLI ended first; events: {self.events}")
                if not line.strip():
                    continue
                event: dict[str, Any] = json.loads(line)
                self.events.append(event)
                if predicate(event):
                    return event

        return await asyncio.wait_for(read(), timeout)

    async def finish(self, timeout: float = RUN_TIMEOUT_S) -> CliRun:
        assert self.process.stdout is not None and self.process.stderr is not None
        try:
            out, err = await asyncio.wait_for(
                asyncio.gather(self.process.stdout.read(), self.process.stderr.read()), timeout
            )
            await self.process.wait()
        finally:
            await self.kill()
        for line in out.decode().splitlines():
            if line.strip():
                self.events.append(json.loads(line))
        assert self.process.returncode is not None
        return CliRun(self.process.returncode, self.events, err.decode())

    async def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()


async def run_cli(argv: list[str], *, env: dict[str, str], cwd: Path, stdin: str) -> CliRun:
    live = await LiveCli.start(argv, env=env, cwd=cwd, stdin=stdin)
    return await live.finish()


def claude_env(fake: claude_api.FakeAnthropic, home: Path, **extra: str) -> dict[str, str]:
    env = {
        "PATH": PATH,
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": fake.base_url,
        "ANTHROPIC_API_KEY": fake.api_key,
        # Without it the CLI also probes HEAD /api/hello and resolves api.anthropic.com.
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        # The CLI retries 429/5xx/401 up to 10 times with back-off (minutes): fail at once.
        "CLAUDE_CODE_MAX_RETRIES": "0",
    }
    if os.geteuid() == 0:
        # As root the CLI refuses bypassPermissions unless told it is in a sandbox
        # (podbay runs it as uid 1000 in the container, where this is not needed).
        env["IS_SANDBOX"] = "1"
    env.update(extra)
    return env


def codex_env(fake: codex_api.FakeOpenAI, home: Path, *, retries: int = 0) -> dict[str, str]:
    codex_home = home / ".codex"
    codex_home.mkdir(exist_ok=True)
    (codex_home / "config.toml").write_text(fake.codex_config(retries=retries))
    return {
        "PATH": PATH,
        "HOME": str(home),
        "CODEX_HOME": str(codex_home),
        codex_api.ENV_KEY: fake.api_key,
    }


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    return [block.get("text", "") for block in content if block.get("type") == "text"]


# -- claude --------------------------------------------------------------------------


async def test_claude_writes_a_file_with_the_write_tool_and_ends_with_a_result(
    clis: AgentClis, anthropic: claude_api.FakeAnthropic, workdir: Path, home: Path
) -> None:
    target = workdir / "hello.txt"
    anthropic.script(
        claude_api.write(str(target), "hello from the fake\n", text="Writing the file."),
        claude_api.Text("Wrote hello.txt."),
    )

    run = await run_cli(
        [str(clis.claude), *CLAUDE_ARGS],
        env=claude_env(anthropic, home),
        cwd=workdir,
        stdin="create hello.txt",
    )

    assert run.returncode == 0, run.stderr
    assert target.read_text() == "hello from the fake\n"
    init = run.one("system", "init")
    session_id = init["session_id"]
    assert init["cwd"] == str(workdir)
    assert init["permissionMode"] == "bypassPermissions"
    assert "Write" in init["tools"] and "Bash" in init["tools"]
    # One assistant event per content block: the text, then the tool call, then the answer.
    blocks = [b for e in run.of_type("assistant") for b in e["message"]["content"]]
    assert [b["type"] for b in blocks] == ["text", "tool_use", "text"]
    assert blocks[0]["text"] == "Writing the file."
    assert blocks[1]["name"] == "Write"
    assert blocks[1]["input"] == {"file_path": str(target), "content": "hello from the fake\n"}
    tool_results = [
        b
        for e in run.of_type("user")
        for b in e["message"]["content"]
        if b["type"] == "tool_result"
    ]
    assert [r["tool_use_id"] for r in tool_results] == [blocks[1]["id"]]
    result = run.one("result")
    assert result["subtype"] == "success" and result["is_error"] is False
    assert result["session_id"] == session_id
    assert result["result"] == "Wrote hello.txt."
    assert result["num_turns"] == 2
    assert result["total_cost_usd"] > 0
    assert result["usage"]["input_tokens"] == 2 * claude_api.INPUT_TOKENS
    assert result["usage"]["output_tokens"] == 2 * claude_api.OUTPUT_TOKENS
    # What the fake saw: two turns, our key, the tool result sent back; nothing else.
    first, second = anthropic.turn_requests
    assert [r.handled_as for r in anthropic.requests] == ["script", "script"]
    assert first.path == "/v1/messages" and first.header("x-api-key") == anthropic.api_key
    assert first.body["stream"] is True
    assert "create hello.txt" in _texts(first.body["messages"][0]["content"])
    last = second.body["messages"][-1]
    assert last["role"] == "user"
    assert last["content"][0]["type"] == "tool_result"
    assert last["content"][0]["tool_use_id"] == blocks[1]["id"]


async def test_claude_resume_sends_the_first_turns_messages_again(
    clis: AgentClis, anthropic: claude_api.FakeAnthropic, workdir: Path, home: Path
) -> None:
    anthropic.script(
        claude_api.write(str(workdir / "hello.txt"), "hi\n"), claude_api.Text("Wrote it.")
    )
    env = claude_env(anthropic, home)
    first = await run_cli([str(clis.claude), *CLAUDE_ARGS], env=env, cwd=workdir, stdin="one")
    session_id = first.one("result")["session_id"]
    anthropic.script(claude_api.Text("Second answer."))

    second = await run_cli(
        [str(clis.claude), *CLAUDE_ARGS, "--resume", session_id],
        env=env,
        cwd=workdir,
        stdin="two",
    )

    assert second.returncode == 0, second.stderr
    assert second.one("system", "init")["session_id"] == session_id
    result = second.one("result")
    assert result["session_id"] == session_id and result["result"] == "Second answer."
    assert result["num_turns"] == 1
    # total_cost_usd covers the whole session, not just this run.
    assert result["total_cost_usd"] > first.one("result")["total_cost_usd"]
    messages = anthropic.turn_requests[-1].body["messages"]
    flat = [
        (m["role"], b.get("type"), b.get("text") or b.get("name"))
        for m in messages
        for b in (m["content"] if isinstance(m["content"], list) else [])
    ]
    assert ("user", "text", "one") in flat
    assert ("assistant", "tool_use", "Write") in flat
    assert ("assistant", "text", "Wrote it.") in flat
    assert flat[-1] == ("user", "text", "two")
    assert any(kind == "tool_result" for _, kind, _ in flat)


async def test_claude_resume_of_an_unknown_session_says_no_conversation_found(
    clis: AgentClis, anthropic: claude_api.FakeAnthropic, workdir: Path, home: Path
) -> None:
    unknown = str(uuid.uuid4())

    run = await run_cli(
        [str(clis.claude), *CLAUDE_ARGS, "--resume", unknown],
        env=claude_env(anthropic, home),
        cwd=workdir,
        stdin="hello?",
    )

    assert run.returncode == 1
    assert run.of_type("system", "init") == []
    result = run.one("result")
    assert result["subtype"] == "error_during_execution" and result["is_error"] is True
    assert result["errors"] == [f"No conversation found with session ID: {unknown}"]
    assert result["num_turns"] == 0
    assert f"No conversation found with session ID: {unknown}" in run.stderr
    assert anthropic.requests == []


async def test_claude_reports_a_rate_limit_in_the_result_event(
    clis: AgentClis, anthropic: claude_api.FakeAnthropic, workdir: Path, home: Path
) -> None:
    anthropic.script(claude_api.rate_limited(retry_after=0))

    run = await run_cli(
        [str(clis.claude), *CLAUDE_ARGS],
        env=claude_env(anthropic, home),
        cwd=workdir,
        stdin="hi",
    )

    assert run.returncode == 1
    result = run.one("result")
    # subtype says "success": the failure is in is_error and the api_error_* fields.
    assert result["subtype"] == "success" and result["is_error"] is True
    assert result["terminal_reason"] == "api_error"
    assert result["api_error_status"] == 429
    assert result["api_error_type"] == "rate_limit_error"
    assert result["result"].startswith("API Error: Request rejected (429)")
    synthetic = run.one("assistant")
    assert synthetic["message"]["model"] == "<synthetic>"
    assert synthetic["is_api_error_message"] is True and synthetic["error"] == "rate_limit"
    assert len(anthropic.turn_requests) == 1


async def test_claude_announces_a_retry_after_a_rate_limit_then_succeeds(
    clis: AgentClis, anthropic: claude_api.FakeAnthropic, workdir: Path, home: Path
) -> None:
    anthropic.script(claude_api.rate_limited(retry_after=0), claude_api.Text("Made it."))

    run = await run_cli(
        [str(clis.claude), *CLAUDE_ARGS],
        env=claude_env(anthropic, home, CLAUDE_CODE_MAX_RETRIES="1"),
        cwd=workdir,
        stdin="hi",
    )

    assert run.returncode == 0, run.stderr
    retry = run.one("system", "api_retry")
    assert retry["error_status"] == 429 and retry["error"] == "rate_limit"
    assert retry["attempt"] == 1 and retry["max_retries"] == 1
    assert run.one("result")["result"] == "Made it."


async def test_claude_reports_an_authentication_error_in_the_result_event(
    clis: AgentClis, anthropic: claude_api.FakeAnthropic, workdir: Path, home: Path
) -> None:
    anthropic.script(claude_api.auth_error())

    run = await run_cli(
        [str(clis.claude), *CLAUDE_ARGS],
        env=claude_env(anthropic, home),
        cwd=workdir,
        stdin="hi",
    )

    assert run.returncode == 1
    result = run.one("result")
    assert result["is_error"] is True and result["terminal_reason"] == "api_error"
    assert result["api_error_status"] == 401
    assert result["api_error_type"] == "authentication_error"
    assert "Invalid API key" in result["result"]
    assert run.one("assistant")["error"] == "authentication_failed"


async def test_claude_stops_at_max_turns_with_an_error_result(
    clis: AgentClis, anthropic: claude_api.FakeAnthropic, workdir: Path, home: Path
) -> None:
    anthropic.script(*(claude_api.bash(f"echo {n}") for n in range(3)))

    run = await run_cli(
        [str(clis.claude), *CLAUDE_ARGS, "--max-turns", "2"],
        env=claude_env(anthropic, home),
        cwd=workdir,
        stdin="loop",
    )

    assert run.returncode == 1
    result = run.one("result")
    assert result["subtype"] == "error_max_turns" and result["is_error"] is True
    assert result["terminal_reason"] == "max_turns"
    assert result["errors"] == ["Reached maximum number of turns (2)"]
    outputs = [
        b["content"]
        for e in run.of_type("user")
        for b in e["message"]["content"]
        if b["type"] == "tool_result"
    ]
    assert outputs == ["0", "1"]


async def test_claude_keeps_waiting_on_a_stream_that_hangs(
    clis: AgentClis, anthropic: claude_api.FakeAnthropic, workdir: Path, home: Path
) -> None:
    anthropic.script(claude_api.Hang("Thinking about it"))
    live = await LiveCli.start(
        [str(clis.claude), *CLAUDE_ARGS, "--include-partial-messages"],
        env=claude_env(anthropic, home),
        cwd=workdir,
        stdin="hang",
    )
    try:
        await asyncio.wait_for(anthropic.hanging.wait(), RUN_TIMEOUT_S)
        # The partial text reaches stdout while the response is still open...
        delta = await live.next_event(
            lambda e: (
                e.get("type") == "stream_event"
                and e["event"].get("delta", {}).get("type") == "text_delta"
            )
        )
        assert delta["event"]["delta"]["text"] == "Thinking about it"
        # ...and the CLI has neither finished nor given up.
        assert live.process.returncode is None
        assert [e for e in live.events if e.get("type") == "result"] == []
    finally:
        await live.kill()
    assert live.process.returncode == -signal.SIGKILL


# -- codex ---------------------------------------------------------------------------


async def test_codex_writes_a_file_with_apply_patch_and_reports_usage(
    clis: AgentClis, openai: codex_api.FakeOpenAI, workdir: Path, home: Path
) -> None:
    openai.script(
        codex_api.add_file("hello.txt", "hello from the fake\n"), codex_api.Text("Wrote it.")
    )

    run = await run_cli(
        [str(clis.codex), *CODEX_ARGS],
        env=codex_env(openai, home),
        cwd=workdir,
        stdin="create hello.txt",
    )

    assert run.returncode == 0, run.stderr
    assert (workdir / "hello.txt").read_text() == "hello from the fake\n"
    kinds = [e["type"] for e in run.events]
    assert kinds == [
        "thread.started",
        "turn.started",
        "item.started",
        "item.completed",
        "item.completed",
        "turn.completed",
    ]
    thread_id = run.one("thread.started")["thread_id"]
    assert uuid.UUID(thread_id)
    change, message = (e["item"] for e in run.of_type("item.completed"))
    assert change["type"] == "file_change" and change["status"] == "completed"
    assert change["changes"] == [{"path": str(workdir / "hello.txt"), "kind": "add"}]
    assert message == {"id": message["id"], "type": "agent_message", "text": "Wrote it."}
    usage = run.one("turn.completed")["usage"]
    assert usage["input_tokens"] == 2 * codex_api.INPUT_TOKENS
    assert usage["cached_input_tokens"] == 2 * codex_api.CACHED_TOKENS
    assert usage["output_tokens"] == 2 * codex_api.OUTPUT_TOKENS
    assert usage["reasoning_output_tokens"] == 2 * codex_api.REASONING_TOKENS
    first, second = openai.turn_requests
    assert [r.path for r in openai.requests] == ["/v1/responses", "/v1/responses"]
    assert first.header("authorization") == f"Bearer {openai.api_key}"
    assert first.body["model"] == codex_api.DEFAULT_MODEL and first.body["stream"] is True
    tools = {t.get("name") for t in first.body["tools"]}
    assert {"exec_command", "apply_patch"} <= tools
    output = second.body["input"][-1]
    assert output["type"] == "custom_tool_call_output"
    assert "Success. Updated the following files:\nA hello.txt" in output["output"]


async def test_codex_runs_a_shell_command_and_reports_reasoning_and_output(
    clis: AgentClis, openai: codex_api.FakeOpenAI, workdir: Path, home: Path
) -> None:
    openai.script(
        codex_api.shell("printf 'hi\\n' > made.txt && echo made", reasoning="Plan: make it"),
        codex_api.Text("ok"),
    )

    run = await run_cli(
        [str(clis.codex), *CODEX_ARGS],
        env=codex_env(openai, home),
        cwd=workdir,
        stdin="run it",
    )

    assert run.returncode == 0, run.stderr
    assert (workdir / "made.txt").read_text() == "hi\n"
    started = run.one("item.started")["item"]
    assert started["type"] == "command_execution" and started["status"] == "in_progress"
    reasoning, command, message = (e["item"] for e in run.of_type("item.completed"))
    assert reasoning["type"] == "reasoning" and reasoning["text"] == "Plan: make it"
    assert message["type"] == "agent_message" and message["text"] == "ok"
    assert command["type"] == "command_execution" and command["status"] == "completed"
    assert command["exit_code"] == 0 and command["aggregated_output"] == "made\n"
    assert "printf" in command["command"] and command["command"].startswith("/")
    output = openai.turn_requests[1].body["input"][-1]
    assert output["type"] == "function_call_output" and "made" in output["output"]


async def test_codex_resume_sends_the_thread_history_again(
    clis: AgentClis, openai: codex_api.FakeOpenAI, workdir: Path, home: Path
) -> None:
    openai.script(codex_api.add_file("hello.txt", "hi\n"), codex_api.Text("Wrote it."))
    env = codex_env(openai, home)
    first = await run_cli([str(clis.codex), *CODEX_ARGS], env=env, cwd=workdir, stdin="one")
    thread_id = first.one("thread.started")["thread_id"]
    openai.script(codex_api.Text("Second answer."))

    second = await run_cli(
        [str(clis.codex), *CODEX_ARGS, "resume", thread_id, "-"],
        env=env,
        cwd=workdir,
        stdin="two",
    )

    assert second.returncode == 0, second.stderr
    assert second.one("thread.started")["thread_id"] == thread_id
    assert second.of_type("item.completed")[-1]["item"]["text"] == "Second answer."
    # turn.completed usage counts the whole thread so far, not just this turn.
    assert second.one("turn.completed")["usage"]["input_tokens"] == 3 * codex_api.INPUT_TOKENS
    items = openai.turn_requests[-1].body["input"]
    flat = [
        (i.get("type"), i.get("role"), " ".join(c.get("text", "") for c in i.get("content", [])))
        for i in items
    ]
    assert ("message", "user", "one") in flat
    assert ("custom_tool_call", None, "") in flat
    assert ("custom_tool_call_output", None, "") in flat
    assert ("message", "assistant", "Wrote it.") in flat
    assert flat[-1] == ("message", "user", "two")


async def test_codex_resume_of_an_unknown_thread_fails_without_json(
    clis: AgentClis, openai: codex_api.FakeOpenAI, workdir: Path, home: Path
) -> None:
    unknown = str(uuid.uuid4())

    run = await run_cli(
        [str(clis.codex), *CODEX_ARGS, "resume", unknown, "-"],
        env=codex_env(openai, home),
        cwd=workdir,
        stdin="hello?",
    )

    assert run.returncode == 1
    assert run.events == []
    assert f"no rollout found for thread id {unknown}" in run.stderr
    assert openai.requests == []


async def test_codex_reports_a_rate_limit_as_turn_failed(
    clis: AgentClis, openai: codex_api.FakeOpenAI, workdir: Path, home: Path
) -> None:
    openai.script(codex_api.rate_limited(retry_after=0))

    run = await run_cli(
        [str(clis.codex), *CODEX_ARGS],
        env=codex_env(openai, home),
        cwd=workdir,
        stdin="hi",
    )

    assert run.returncode == 1
    assert [e["type"] for e in run.events] == [
        "thread.started",
        "turn.started",
        "error",
        "turn.failed",
    ]
    failed = run.one("turn.failed")["error"]["message"]
    assert failed.startswith("exceeded retry limit, last status: 429 Too Many Requests")
    assert run.one("error")["message"] == failed
    assert len(openai.turn_requests) == 1


async def test_codex_announces_a_retry_as_an_error_event_then_succeeds(
    clis: AgentClis, openai: codex_api.FakeOpenAI, workdir: Path, home: Path
) -> None:
    openai.script(codex_api.rate_limited(retry_after=0))

    run = await run_cli(
        [str(clis.codex), *CODEX_ARGS],
        env=codex_env(openai, home, retries=1),
        cwd=workdir,
        stdin="hi",
    )

    # One retry, then the script's default answer: the "Reconnecting" error is not fatal.
    assert run.returncode == 0, run.stderr
    errors = [e["message"] for e in run.of_type("error")]
    assert len(errors) == 1 and errors[0].startswith("Reconnecting... 1/1 (")
    assert "429 Too Many Requests" in errors[0]
    assert run.of_type("turn.failed") == []
    assert run.of_type("item.completed")[-1]["item"]["text"] == "done"


async def test_codex_reports_an_authentication_error_as_turn_failed(
    clis: AgentClis, openai: codex_api.FakeOpenAI, workdir: Path, home: Path
) -> None:
    openai.script(codex_api.auth_error())

    run = await run_cli(
        [str(clis.codex), *CODEX_ARGS],
        env=codex_env(openai, home),
        cwd=workdir,
        stdin="hi",
    )

    assert run.returncode == 1
    failed = run.one("turn.failed")["error"]["message"]
    assert failed.startswith("unexpected status 401 Unauthorized: Incorrect API key provided")
    assert run.one("error")["message"] == failed


async def test_codex_keeps_waiting_on_a_stream_that_hangs(
    clis: AgentClis, openai: codex_api.FakeOpenAI, workdir: Path, home: Path
) -> None:
    openai.script(codex_api.Hang())
    live = await LiveCli.start(
        [str(clis.codex), *CODEX_ARGS], env=codex_env(openai, home), cwd=workdir, stdin="hang"
    )
    try:
        started = await live.next_event(lambda e: e.get("type") == "turn.started")
        assert started == {"type": "turn.started"}
        await asyncio.wait_for(openai.hanging.wait(), RUN_TIMEOUT_S)
        assert live.process.returncode is None
        assert [e["type"] for e in live.events] == ["thread.started", "turn.started"]
    finally:
        await live.kill()
    assert live.process.returncode == -signal.SIGKILL
