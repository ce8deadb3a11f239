"""Claude Code and Codex presets: the argv podbay runs and what it makes of their output.

The parser tests replay streams recorded from the real CLIs (``streams/record.py``: the
pinned binaries in a project-shaped container against the fake LLM APIs). The end-to-end
tests run the real CLIs on the host against the fakes, through the presets' argv.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from fakes import anthropic_api as claude_api
from fakes import openai_api as codex_api
from fakes.agent_clis import AgentClis, agent_clis

from podbay.config import AgentConfig
from podbay.engine.agents import (
    AgentEvent,
    FinishedEvent,
    NoticeEvent,
    RunRequest,
    TextEvent,
    ToolEvent,
)
from podbay.engine.presets import (
    CLAUDE,
    CODEX,
    StreamParser,
    claude_tool_event,
    preset_for,
    shorten,
    unwrap_shell,
)

STREAMS = Path(__file__).parent / "streams"
REQUEST = RunRequest(prompt="create hello.txt", session="console:op", project="demo")


def recorded(name: str) -> tuple[list[str], dict[str, Any]]:
    lines = (STREAMS / f"{name}.jsonl").read_text().splitlines()
    meta = json.loads((STREAMS / f"{name}.meta.json").read_text())
    return lines, meta


def replay(parser: StreamParser, name: str) -> tuple[list[AgentEvent], FinishedEvent]:
    """Feed a recorded stdout to ``parser`` and finish with the recorded exit and stderr."""
    lines, meta = recorded(name)
    events = [event for line in lines for event in parser.feed(line)]
    return events, parser.finish(meta["exit_code"], meta["stderr"])


def first(name: str, kind: str) -> dict[str, Any]:
    lines, _ = recorded(name)
    return next(e for e in map(json.loads, lines) if e.get("type") == kind)


# -- claude argv -------------------------------------------------------------------------


def test_claude_argv_is_print_mode_stream_json_with_the_permission_mode() -> None:
    argv = CLAUDE.argv(REQUEST, resume_id=None, config=None)

    assert argv == [
        "claude",
        "-p",
        "--output-format",
        "stream-json",
        "--verbose",
        "--permission-mode",
        "bypassPermissions",
    ]
    assert CLAUDE.stdin(REQUEST) == b"create hello.txt"


def test_claude_argv_adds_model_resume_and_extra_args_in_that_order() -> None:
    config = AgentConfig(
        preset="claude",
        model="claude-opus-5-5",
        permission_mode="acceptEdits",
        extra_args=["--max-turns", "5"],
    )

    argv = CLAUDE.argv(
        REQUEST, resume_id="c07ed14a", config=config, executable="/opt/podbay/agents/claude"
    )

    assert argv == [
        "/opt/podbay/agents/claude",
        "-p",
        "--output-format",
        "stream-json",
        "--verbose",
        "--permission-mode",
        "acceptEdits",
        "--model",
        "claude-opus-5-5",
        "--resume",
        "c07ed14a",
        "--max-turns",
        "5",
    ]


def test_claude_env_points_at_a_custom_endpoint_and_turns_off_nonessential_traffic() -> None:
    assert CLAUDE.env(None) == {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    config = AgentConfig(preset="claude", base_url="http://127.0.0.1:9/")
    assert CLAUDE.env(config)["ANTHROPIC_BASE_URL"] == "http://127.0.0.1:9/"


# -- claude streams ----------------------------------------------------------------------


def test_claude_stream_relays_paragraphs_and_one_line_per_tool_use() -> None:
    parser = CLAUDE.parser()

    events, finished = replay(parser, "claude_tool_use")

    command = "cat hello.txt && python3 -m pytest -q tests/ --maxfail=1"
    assert events == [
        TextEvent("I'll create the file."),
        TextEvent("Writing it now."),
        ToolEvent("Write", "🔧 Write hello.txt", "hello.txt: 1 line"),
        ToolEvent("Bash", f"🔧 Bash: {command}", command),
        TextEvent("Wrote hello.txt."),
        TextEvent("It says hello."),
    ]
    assert finished == FinishedEvent(
        ok=True,
        exit_code=0,
        usage={
            "input_tokens": 3 * claude_api.INPUT_TOKENS,
            "output_tokens": 3 * claude_api.OUTPUT_TOKENS,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
        cost_usd=0.00324,
        agent_session_id=first("claude_tool_use", "system")["session_id"],
        num_turns=3,
    )
    assert parser.conversation_missing is False


def test_claude_resumed_run_reports_its_own_cost_not_the_sessions_total() -> None:
    events, finished = replay(CLAUDE.parser(), "claude_resume")

    assert events == [TextEvent("Still here.")]
    assert finished.ok and finished.num_turns == 1
    # The result's total_cost_usd (0.00432) covers both runs of the session.
    assert first("claude_resume", "result")["total_cost_usd"] == 0.00432
    assert finished.cost_usd == 0.00108
    assert finished.usage["input_tokens"] == claude_api.INPUT_TOKENS
    # The same conversation continues: the runner keeps resuming this id.
    assert finished.agent_session_id == first("claude_tool_use", "result")["session_id"]


def test_claude_rate_limit_is_classified_from_the_result_not_shown_as_an_answer() -> None:
    events, finished = replay(CLAUDE.parser(), "claude_rate_limit")

    # The CLI's synthetic "API Error: …" assistant message is not the agent's answer.
    assert events == []
    assert finished.ok is False and finished.exit_code == 1
    assert finished.failure == "rate_limit"
    assert finished.error == (
        "API Error: Request rejected (429) · "
        "Number of request tokens has exceeded your per-minute rate limit"
    )


def test_claude_retry_after_a_rate_limit_is_announced_once_and_the_run_succeeds() -> None:
    events, finished = replay(CLAUDE.parser(), "claude_rate_limit_retry")

    assert events == [
        NoticeEvent("Claude API rate limit (429); the agent is retrying."),
        TextEvent("Made it."),
    ]
    assert finished.ok and finished.failure == ""


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("claude_auth", "Invalid API key · Fix external API key"),
        ("claude_no_key", "Not logged in · Please run /login"),
    ],
)
def test_claude_authentication_failures_are_classified_as_auth(name: str, message: str) -> None:
    events, finished = replay(CLAUDE.parser(), name)

    assert events == []
    assert (finished.ok, finished.failure, finished.error) == (False, "auth", message)


def test_claude_max_turns_is_its_own_failure_kind() -> None:
    events, finished = replay(CLAUDE.parser(), "claude_max_turns")

    assert events == [ToolEvent("Bash", "🔧 Bash: echo one", "echo one")]
    assert finished.ok is False
    assert finished.failure == "max_turns"
    assert finished.error == "Reached maximum number of turns (1)"
    assert finished.num_turns == 2


def test_claude_resume_of_an_unknown_session_is_detected_and_not_kept() -> None:
    parser = CLAUDE.parser()
    _, meta = recorded("claude_unknown_session")
    unknown = meta["argv"][meta["argv"].index("--resume") + 1]

    events, finished = replay(parser, "claude_unknown_session")

    assert events == []
    assert parser.conversation_missing is True
    assert finished.ok is False and finished.failure == "execution"
    assert finished.error == f"No conversation found with session ID: {unknown}"
    # The result event echoes the unknown id: the runner must not resume it again.
    assert finished.agent_session_id == ""


def test_claude_unknown_session_is_detected_from_stderr_when_no_result_was_printed() -> None:
    parser = CLAUDE.parser()

    finished = parser.finish(1, "No conversation found with session ID: 1234\n")

    assert parser.conversation_missing is True
    assert finished.ok is False and finished.agent_session_id == ""


def test_claude_run_that_ends_without_a_result_fails_with_its_stderr() -> None:
    parser = CLAUDE.parser()
    lines, _ = recorded("claude_tool_use")
    # Killed after the first tool call: the init and two assistant events, no result.
    for line in lines[:3]:
        parser.feed(line)

    finished = parser.finish(137, "")

    assert finished.ok is False and finished.failure == "execution"
    assert finished.error == "claude exited with status 137 and no result"
    assert finished.agent_session_id == first("claude_tool_use", "system")["session_id"]


def test_claude_parser_ignores_lines_that_are_not_json_objects() -> None:
    parser = CLAUDE.parser()

    assert parser.feed("") == []
    assert parser.feed("Warning: something the CLI printed") == []
    assert parser.feed('{"type": "assistant", "message": ') == []
    assert parser.feed("[1, 2]") == []


def test_claude_subagent_text_is_not_relayed_but_its_tool_calls_are() -> None:
    parser = CLAUDE.parser()
    nested = {
        "type": "assistant",
        "parent_tool_use_id": "toolu_1",
        "message": {
            "model": "claude-opus-5-5",
            "content": [
                {"type": "text", "text": "Subagent musing."},
                {"type": "tool_use", "name": "Read", "input": {"file_path": "/workspace/a.py"}},
            ],
        },
    }

    assert parser.feed(json.dumps(nested)) == [
        ToolEvent("Read", "🔧 Read a.py", "a.py"),
    ]


# -- claude tool lines -------------------------------------------------------------------


def test_long_and_multiline_bash_commands_are_cut_to_one_short_line() -> None:
    long = "pytest -q " + " ".join(f"tests/test_{n}.py" for n in range(20))
    event = claude_tool_event("Bash", {"command": long}, workdir="/workspace")

    assert len(event.summary) <= len("🔧 Bash: ") + 80
    assert event.summary.endswith("…")
    assert event.detail == long
    script = claude_tool_event("Bash", {"command": "set -e\nmake\nmake test"}, workdir="/w")
    assert script.summary == "🔧 Bash: set -e …"


def test_paths_outside_the_workspace_are_shown_whole() -> None:
    inside = claude_tool_event("Edit", {"file_path": "/workspace/src/a.py"}, workdir="/workspace")
    outside = claude_tool_event("Read", {"file_path": "/etc/hosts"}, workdir="/workspace")
    lookalike = claude_tool_event("Read", {"file_path": "/workspace2/x"}, workdir="/workspace")

    assert inside.summary == "🔧 Edit src/a.py"
    assert outside.summary == "🔧 Read /etc/hosts"
    assert lookalike.summary == "🔧 Read /workspace2/x"


def test_edit_detail_shows_the_replaced_lines() -> None:
    event = claude_tool_event(
        "Edit",
        {"file_path": "/workspace/a.py", "old_string": "x = 1", "new_string": "x = 2\ny = 3"},
        workdir="/workspace",
    )

    assert event.detail == "a.py\n- x = 1\n+ x = 2\n+ y = 3"


def test_other_tools_name_their_subject() -> None:
    grep = claude_tool_event("Grep", {"pattern": "TODO", "path": "src"}, workdir="/workspace")
    mcp = claude_tool_event("mcp__github__create_issue", {"title": "x"}, workdir="/workspace")
    todo = claude_tool_event("TodoWrite", {"todos": []}, workdir="/workspace")

    assert grep.summary == "🔧 Grep: TODO"
    assert mcp.summary == "🔧 github.create_issue"
    assert todo.summary == "🔧 TodoWrite"
    assert json.loads(todo.detail) == {"todos": []}


def test_shorten_keeps_short_single_lines_as_they_are() -> None:
    assert shorten("  pytest -q  ") == "pytest -q"
    assert shorten("x" * 81) == "x" * 79 + "…"


# -- codex argv --------------------------------------------------------------------------


CODEX_BASE = [
    "codex",
    "exec",
    "--json",
    "--skip-git-repo-check",
    "--dangerously-bypass-approvals-and-sandbox",
    "-c",
    "check_for_update_on_startup=false",
]


def test_codex_argv_runs_unattended_and_reads_the_prompt_from_stdin() -> None:
    assert CODEX.argv(REQUEST, resume_id=None, config=None) == [*CODEX_BASE, "-"]
    assert CODEX.stdin(REQUEST) == b"create hello.txt"
    assert CODEX.env(None) == {}


def test_codex_resume_puts_exec_options_before_the_subcommand() -> None:
    config = AgentConfig(preset="codex", model="gpt-5.5", extra_args=["--ephemeral"])

    argv = CODEX.argv(REQUEST, resume_id="01a23352", config=config)

    assert argv == [*CODEX_BASE, "-m", "gpt-5.5", "--ephemeral", "resume", "01a23352", "-"]


def test_codex_custom_endpoint_is_a_model_provider_given_with_config_overrides() -> None:
    config = AgentConfig(preset="codex", base_url="http://127.0.0.1:8000/v1")

    argv = CODEX.argv(REQUEST, resume_id=None, config=config)

    overrides = [argv[i + 1] for i, word in enumerate(argv) if word == "-c"]
    assert overrides == [
        "check_for_update_on_startup=false",
        'model_providers.podbay.name="podbay endpoint"',
        'model_providers.podbay.base_url="http://127.0.0.1:8000/v1"',
        'model_providers.podbay.wire_api="responses"',
        'model_providers.podbay.env_key="OPENAI_API_KEY"',
        'model_provider="podbay"',
        "analytics.enabled=false",
        "features.plugins=false",
    ]
    assert argv[-1] == "-"


def test_preset_for_names_the_choices() -> None:
    assert preset_for("claude") is CLAUDE and preset_for("codex") is CODEX
    with pytest.raises(ValueError, match=r"\['claude', 'codex'\]"):
        preset_for("aider")


# -- codex streams -----------------------------------------------------------------------


def test_codex_stream_relays_messages_and_one_line_per_edit_and_command() -> None:
    parser = CODEX.parser()

    events, finished = replay(parser, "codex_tool_use")

    assert events == [
        TextEvent("I'll add the files."),
        TextEvent("Starting now."),
        ToolEvent("edit", "🔧 Edit hello.txt", "add hello.txt"),
        ToolEvent("edit", "🔧 Edit hello.txt, src/a.py", "update hello.txt\nadd src/a.py"),
        ToolEvent(
            "command",
            "🔧 $ cat hello.txt && false (exit 1)",
            "$ cat hello.txt && false\nhello, world",
        ),
        TextEvent("Done: hello.txt and src/a.py."),
        TextEvent("The check failed."),
    ]
    assert finished == FinishedEvent(
        ok=True,
        exit_code=0,
        usage={
            "input_tokens": 4 * codex_api.INPUT_TOKENS,
            "cached_input_tokens": 4 * codex_api.CACHED_TOKENS,
            "cache_write_input_tokens": 0,
            "output_tokens": 4 * codex_api.OUTPUT_TOKENS,
            "reasoning_output_tokens": 4 * codex_api.REASONING_TOKENS,
        },
        cost_usd=None,
        agent_session_id=first("codex_tool_use", "thread.started")["thread_id"],
        num_turns=1,
    )
    assert parser.conversation_missing is False


def test_codex_resume_continues_the_same_thread() -> None:
    events, finished = replay(CODEX.parser(), "codex_resume")

    assert events == [TextEvent("Still here.")]
    assert finished.ok
    assert finished.agent_session_id == first("codex_tool_use", "thread.started")["thread_id"]
    _, meta = recorded("codex_resume")
    assert meta["argv"][-3:] == ["resume", finished.agent_session_id, "-"]


def test_codex_own_sandbox_cannot_run_commands_in_a_project_container() -> None:
    # Why the preset passes --dangerously-bypass-approvals-and-sandbox.
    events, _ = replay(CODEX.parser(), "codex_sandboxed")

    command = next(e for e in events if isinstance(e, ToolEvent))
    assert command.summary == "🔧 $ echo hi > sandboxed.txt (exit 1)"
    assert "bwrap: No permissions to create a new namespace" in command.detail


def test_codex_rate_limit_is_reported_once_and_classified() -> None:
    events, finished = replay(CODEX.parser(), "codex_rate_limit")

    assert events == []
    assert (finished.ok, finished.failure) == (False, "rate_limit")
    assert finished.error == "exceeded retry limit, last status: 429 Too Many Requests"
    assert finished.agent_session_id == first("codex_rate_limit", "thread.started")["thread_id"]


def test_codex_reconnect_is_a_notice_and_not_a_failure() -> None:
    events, finished = replay(CODEX.parser(), "codex_rate_limit_retry")

    assert events == [
        NoticeEvent(
            "Codex: Reconnecting... 1/5 (exceeded retry limit, last status: 429 Too Many Requests)"
        ),
        TextEvent("done"),
    ]
    assert finished.ok and finished.failure == ""


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "codex_auth",
            "unexpected status 401 Unauthorized: Incorrect API key provided: sk-****. "
            "You can find your API key at the dashboard.",
        ),
        ("codex_no_key", "Missing environment variable: `OPENAI_API_KEY`."),
    ],
)
def test_codex_authentication_failures_are_classified_as_auth(name: str, message: str) -> None:
    events, finished = replay(CODEX.parser(), name)

    assert events == []
    assert (finished.ok, finished.failure, finished.error) == (False, "auth", message)


def test_codex_resume_of_an_unknown_thread_is_detected_from_stderr() -> None:
    parser = CODEX.parser()
    _, meta = recorded("codex_unknown_thread")

    events, finished = replay(parser, "codex_unknown_thread")

    assert events == []
    assert parser.conversation_missing is True
    assert finished.ok is False and finished.failure == "execution"
    assert finished.agent_session_id == ""
    assert finished.error == meta["stderr"].strip()
    assert "no rollout found for thread id" in finished.error


def test_codex_run_killed_mid_turn_is_not_a_success() -> None:
    parser = CODEX.parser()
    lines, _ = recorded("codex_tool_use")
    for line in lines[:4]:
        parser.feed(line)

    finished = parser.finish(-9, "")

    assert finished.ok is False and finished.failure == "execution"
    assert finished.error == "codex exited with status -9 and no result"


def test_shell_wrappers_are_unwrapped_for_the_chat() -> None:
    assert unwrap_shell("/usr/bin/bash -lc 'pytest -q'") == "pytest -q"
    assert unwrap_shell("/bin/sh -c 'a && b'") == "a && b"
    assert unwrap_shell("pytest -q") == "pytest -q"
    assert unwrap_shell("bash -lc 'unbalanced") == "bash -lc 'unbalanced"


# -- end to end: the real CLIs on the host, through the presets -----------------------------

PATH = "/usr/local/bin:/usr/bin:/bin"
RUN_TIMEOUT_S = 90.0


@pytest.fixture(scope="module")
def clis() -> AgentClis:
    return agent_clis()


async def run_preset(
    argv: list[str], stdin: bytes, env: dict[str, str], cwd: Path, parser: StreamParser
) -> tuple[list[AgentEvent], FinishedEvent]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,
        limit=16 * 1024 * 1024,  # claude's init line lists every tool and skill
        start_new_session=True,
    )
    assert process.stdin and process.stdout and process.stderr
    process.stdin.write(stdin)
    await process.stdin.drain()
    process.stdin.close()
    events: list[AgentEvent] = []

    async def read() -> bytes:
        assert process.stdout and process.stderr
        stderr = asyncio.create_task(process.stderr.read())
        while line := await process.stdout.readline():
            events.extend(parser.feed(line.decode()))
        return await stderr

    try:
        stderr = await asyncio.wait_for(read(), RUN_TIMEOUT_S)
        code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return events, parser.finish(code, stderr.decode()[-2000:])


async def test_claude_preset_drives_the_real_cli_to_write_a_file_and_resume(
    clis: AgentClis, tmp_path: Path
) -> None:
    workdir, home = tmp_path / "work", tmp_path / "home"
    workdir.mkdir()
    home.mkdir()
    async with claude_api.FakeAnthropic() as fake:
        fake.script(
            claude_api.write(str(workdir / "hello.txt"), "hi\n", text="Creating it."),
            claude_api.Text("Done."),
        )
        config = AgentConfig(preset="claude", base_url=fake.base_url)
        env = {"PATH": PATH, "HOME": str(home), "ANTHROPIC_API_KEY": fake.api_key}
        env |= {"CLAUDE_CODE_MAX_RETRIES": "0", **CLAUDE.env(config)}
        if os.geteuid() == 0:
            env["IS_SANDBOX"] = "1"  # root refuses bypassPermissions otherwise
        argv = CLAUDE.argv(REQUEST, resume_id=None, config=config, executable=str(clis.claude))

        events, finished = await run_preset(
            argv, CLAUDE.stdin(REQUEST), env, workdir, CLAUDE.parser(workdir=str(workdir))
        )

        assert (workdir / "hello.txt").read_text() == "hi\n"
        assert events == [
            TextEvent("Creating it."),
            ToolEvent("Write", "🔧 Write hello.txt", "hello.txt: 1 line"),
            TextEvent("Done."),
        ]
        assert finished.ok, finished.error
        assert finished.num_turns == 2 and finished.cost_usd and finished.cost_usd > 0

        fake.script(claude_api.Text("Again."))
        resumed = RunRequest(prompt="once more")
        argv = CLAUDE.argv(
            resumed,
            resume_id=finished.agent_session_id,
            config=config,
            executable=str(clis.claude),
        )
        events, again = await run_preset(argv, CLAUDE.stdin(resumed), env, workdir, CLAUDE.parser())

        assert events == [TextEvent("Again.")]
        assert again.ok and again.agent_session_id == finished.agent_session_id
        sent = json.dumps(fake.turn_requests[-1].body["messages"])
        assert "create hello.txt" in sent and "once more" in sent


async def test_codex_preset_drives_the_real_cli_to_write_a_file_and_resume(
    clis: AgentClis, tmp_path: Path
) -> None:
    workdir, home = tmp_path / "work", tmp_path / "home"
    workdir.mkdir()
    home.mkdir()
    async with codex_api.FakeOpenAI() as fake:
        fake.script(codex_api.add_file("hello.txt", "hi\n"), codex_api.Text("Done."))
        # Only the preset's -c options say where the endpoint is: no config.toml.
        config = AgentConfig(preset="codex", model=fake.model, base_url=fake.base_url)
        env = {"PATH": PATH, "HOME": str(home), "OPENAI_API_KEY": fake.api_key}
        argv = CODEX.argv(REQUEST, resume_id=None, config=config, executable=str(clis.codex))

        events, finished = await run_preset(
            argv, CODEX.stdin(REQUEST), env, workdir, CODEX.parser(workdir=str(workdir))
        )

        assert (workdir / "hello.txt").read_text() == "hi\n"
        assert events == [
            ToolEvent("edit", "🔧 Edit hello.txt", "add hello.txt"),
            TextEvent("Done."),
        ]
        assert finished.ok, finished.error
        assert finished.agent_session_id
        assert fake.turn_requests[0].header("authorization") == f"Bearer {fake.api_key}"

        fake.script(codex_api.Text("Again."))
        resumed = RunRequest(prompt="once more")
        argv = CODEX.argv(
            resumed, resume_id=finished.agent_session_id, config=config, executable=str(clis.codex)
        )
        events, again = await run_preset(argv, CODEX.stdin(resumed), env, workdir, CODEX.parser())

        assert events == [TextEvent("Again.")]
        assert again.ok and again.agent_session_id == finished.agent_session_id
        sent = json.dumps(fake.turn_requests[-1].body["input"])
        assert "create hello.txt" in sent and "once more" in sent
