"""Agent presets: how to start Claude Code and Codex, and how to read what they print.

A preset builds the argv (``argv``), the prompt bytes for stdin (``stdin``) and the
environment it needs on top of ``[agent.env]`` (``env``), and makes a fresh stream parser
per run (``parser``). The parser turns the CLI's JSON lines into podbay's
:mod:`~podbay.engine.agents` events; its ``finish`` gives the run's
:class:`~podbay.engine.agents.FinishedEvent`, with failures classified from the CLI's own
JSON (exit codes are 1 for every kind of failure).

Both CLIs are run unattended inside the project container, which is the sandbox; the
formats below were recorded from the real CLIs (``tests/engine/streams/``).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

from podbay.config import AgentConfig
from podbay.engine.agents import (
    AgentEvent,
    FailureKind,
    FinishedEvent,
    NoticeEvent,
    RunRequest,
    TextEvent,
    ToolEvent,
    paragraphs,
)

PresetName = Literal["claude", "codex"]
WORKSPACE = "/workspace"
SUMMARY_CHARS = 80  # one chat line per tool call
DETAIL_CHARS = 2000  # verbose 2 shows this much of a tool's input or output

# How each CLI says that the conversation to resume does not exist (recorded):
# claude: a result event with subtype error_during_execution and
#   errors ["No conversation found with session ID: <id>"] (the same text on stderr);
# codex: nothing on stdout; stderr "Error: thread/resume: thread/resume failed: no rollout
#   found for thread id <id> (code -32600)".
CLAUDE_NO_CONVERSATION = "No conversation found with session ID"
CODEX_NO_CONVERSATION = "no rollout found for thread id"


class StreamParser(Protocol):
    """Reads one run's output; a new parser per run."""

    # True once the CLI said the conversation given to --resume / resume does not exist:
    # the runner retries without it and tells the chat it started a fresh agent session.
    conversation_missing: bool

    def feed(self, line: str) -> list[AgentEvent]:
        """Events for one line of the CLI's stdout (non-JSON lines are ignored)."""
        ...

    def finish(self, exit_code: int, stderr_tail: str) -> FinishedEvent:
        """The run's outcome, once the process has exited."""
        ...


class AgentPreset(Protocol):
    name: PresetName

    def argv(
        self,
        request: RunRequest,
        *,
        resume_id: str | None,
        config: AgentConfig | None = None,
        executable: str = ...,
    ) -> list[str]: ...

    def stdin(self, request: RunRequest) -> bytes: ...

    def env(self, config: AgentConfig | None = None) -> dict[str, str]: ...

    def parser(self, *, workdir: str = WORKSPACE) -> StreamParser: ...


# -- claude ----------------------------------------------------------------------------


class ClaudePreset:
    """Claude Code: ``claude -p --output-format stream-json --verbose``, prompt on stdin."""

    name: PresetName = "claude"

    def argv(
        self,
        request: RunRequest,
        *,
        resume_id: str | None,
        config: AgentConfig | None = None,
        executable: str = "claude",
    ) -> list[str]:
        argv = [
            executable,
            "-p",  # print mode: one turn, no TTY; the prompt comes from stdin
            "--output-format",
            "stream-json",
            "--verbose",  # required by -p with stream-json
            "--permission-mode",
            (config.permission_mode if config else "") or "bypassPermissions",
        ]
        model = config.model if config else ""
        if model:
            argv += ["--model", model]
        if resume_id:
            argv += ["--resume", resume_id]
        return argv + list(config.extra_args if config else ())

    def stdin(self, request: RunRequest) -> bytes:
        return request.prompt.encode()

    def env(self, config: AgentConfig | None = None) -> dict[str, str]:
        # The binary is pinned and mounted read-only: its auto-updater, telemetry and error
        # reporting have nothing to do; with a custom endpoint they would also be the only
        # traffic to Anthropic. [agent.env] may still override both.
        env = {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
        base_url = config.base_url if config else ""
        if base_url:
            env["ANTHROPIC_BASE_URL"] = base_url
        return env

    def parser(self, *, workdir: str = WORKSPACE) -> ClaudeStreamParser:
        return ClaudeStreamParser(workdir=workdir)


class ClaudeStreamParser:
    """``--output-format stream-json --verbose``: one JSON object per line.

    ``system/init`` (session id), ``assistant`` (one content block per event: text,
    tool_use, thinking), ``user`` (tool results), ``system/api_retry`` and a last
    ``result`` with the canonical session id, turns, cost and usage. API errors arrive as
    a synthetic assistant message (``is_api_error_message``) followed by a result with
    ``is_error`` and ``api_error_status``; its subtype still says "success".
    """

    def __init__(self, *, workdir: str = WORKSPACE) -> None:
        self.conversation_missing = False
        self._workdir = workdir
        self._session_id = ""
        self._result: dict[str, Any] | None = None
        self._api_error = ""  # the synthetic message's "error": rate_limit, authentication_failed
        self._announced_retry = False

    def feed(self, line: str) -> list[AgentEvent]:
        event = _json_object(line)
        if event is None:
            return []
        kind = event.get("type")
        if kind == "system":
            return self._system(event)
        if kind == "assistant":
            return self._assistant(event)
        if kind == "result":
            self._result = event
            if CLAUDE_NO_CONVERSATION in " ".join(_strings(event.get("errors"))):
                self.conversation_missing = True
        return []

    def _system(self, event: dict[str, Any]) -> list[AgentEvent]:
        if event.get("subtype") == "init":
            self._session_id = _str(event.get("session_id"))
        elif event.get("subtype") == "api_retry" and not self._announced_retry:
            # Retries can take minutes with back-off: say once why the run is quiet.
            self._announced_retry = True
            status = event.get("error_status")
            what = _str(event.get("error")).replace("_", " ") or "API error"
            code = f" ({status})" if isinstance(status, int) else ""
            return [NoticeEvent(f"Claude API {what}{code}; the agent is retrying.")]
        return []

    def _assistant(self, event: dict[str, Any]) -> list[AgentEvent]:
        message = event.get("message")
        if not isinstance(message, dict):
            return []
        if event.get("is_api_error_message") or message.get("model") == "<synthetic>":
            # "API Error: …" text made up by the CLI: the result event reports it.
            self._api_error = _str(event.get("error"))
            return []
        # A subagent's (Task tool) own text is not the answer; its tool calls still are
        # work done in the workspace.
        nested = bool(event.get("parent_tool_use_id"))
        events: list[AgentEvent] = []
        for block in _dicts(message.get("content")):
            if block.get("type") == "text" and not nested:
                # Each event carries one whole block, so its text is complete.
                done, _ = paragraphs(_str(block.get("text")), final=True)
                events.extend(TextEvent(text) for text in done)
            elif block.get("type") == "tool_use":
                tool_input = block.get("input")
                events.append(
                    claude_tool_event(
                        _str(block.get("name")) or "tool",
                        tool_input if isinstance(tool_input, dict) else {},
                        workdir=self._workdir,
                    )
                )
        return events

    def finish(self, exit_code: int, stderr_tail: str) -> FinishedEvent:
        result = self._result
        if result is None:
            if CLAUDE_NO_CONVERSATION in stderr_tail:
                self.conversation_missing = True
            return FinishedEvent(
                ok=False,
                exit_code=exit_code,
                error=stderr_tail.strip() or f"claude exited with status {exit_code} and no result",
                agent_session_id="" if self.conversation_missing else self._session_id,
                failure=_classify_text(stderr_tail) or "execution",
            )
        ok = result.get("subtype") == "success" and not result.get("is_error")
        error = ""
        failure: FailureKind = ""
        if not ok:
            failure = self._failure(result)
            error = _str(result.get("result")) or "; ".join(_strings(result.get("errors")))
            error = error or _str(result.get("subtype")) or "the agent reported an error"
        session_id = _str(result.get("session_id")) or self._session_id
        turns = result.get("num_turns")
        return FinishedEvent(
            ok=ok,
            exit_code=exit_code,
            error=error,
            usage=_claude_usage(result.get("usage")),
            cost_usd=_claude_cost(result),
            agent_session_id="" if self.conversation_missing else session_id,
            num_turns=turns if isinstance(turns, int) else None,
            failure=failure,
        )

    def _failure(self, result: dict[str, Any]) -> FailureKind:
        if result.get("subtype") == "error_max_turns":
            return "max_turns"
        status = result.get("api_error_status")
        error_type = _str(result.get("api_error_type"))
        if status == 429 or error_type == "rate_limit_error" or self._api_error == "rate_limit":
            return "rate_limit"
        if (
            status in (401, 403)
            or error_type in ("authentication_error", "permission_error")
            or self._api_error == "authentication_failed"
        ):
            return "auth"
        return "execution"


def _claude_usage(value: object) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    keys = (
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    )
    return {key: value[key] for key in keys if isinstance(value.get(key), int)}


def _claude_cost(result: dict[str, Any]) -> float | None:
    """This run's cost. ``total_cost_usd`` is the whole session's after a ``--resume``;
    ``model_usage_since_last_result`` holds just this run's, per model."""
    since = result.get("model_usage_since_last_result")
    if isinstance(since, dict) and since:
        costs = [m.get("costUSD") for m in since.values() if isinstance(m, dict)]
        if costs and all(isinstance(c, int | float) for c in costs):
            return float(sum(c for c in costs if isinstance(c, int | float)))
    total = result.get("total_cost_usd")
    return float(total) if isinstance(total, int | float) else None


_PATH_TOOLS = {"Read", "Write", "Edit", "MultiEdit", "NotebookEdit", "NotebookRead"}
# The argument that says what a tool call is about, for tools without a path.
_SUBJECT_KEYS = ("pattern", "url", "query", "description", "skill", "prompt")


def claude_tool_event(name: str, tool_input: Mapping[str, Any], *, workdir: str) -> ToolEvent:
    """One chat line for a Claude Code tool call (``🔧 Write hello.txt``), fuller detail."""
    path = _str(tool_input.get("file_path") or tool_input.get("notebook_path"))
    if name in _PATH_TOOLS and path:
        shown = relative_path(path, workdir)
        return ToolEvent(name, f"🔧 {name} {shown}", _claude_path_detail(name, shown, tool_input))
    if name == "Bash":
        command = _str(tool_input.get("command"))
        return ToolEvent(name, f"🔧 Bash: {shorten(command)}", _clip(command))
    if name.startswith("mcp__"):
        # mcp__<server>__<tool>
        label = ".".join(part for part in name.split("__")[1:] if part) or name
        return ToolEvent(name, f"🔧 {label}", _json_detail(tool_input))
    subject = next((_str(tool_input[k]) for k in _SUBJECT_KEYS if _str(tool_input.get(k))), "")
    summary = f"🔧 {name}: {shorten(subject)}" if subject else f"🔧 {name}"
    return ToolEvent(name, summary, _json_detail(tool_input))


def _claude_path_detail(name: str, shown: str, tool_input: Mapping[str, Any]) -> str:
    if name == "Write":
        lines = len(_str(tool_input.get("content")).splitlines())
        return f"{shown}: {lines} line{'' if lines == 1 else 's'}"
    if name == "Edit":
        old, new = _str(tool_input.get("old_string")), _str(tool_input.get("new_string"))
        removed = "".join(f"- {line}\n" for line in old.splitlines())
        added = "".join(f"+ {line}\n" for line in new.splitlines())
        return _clip(f"{shown}\n{removed}{added}".rstrip("\n"))
    if name == "MultiEdit":
        edits = tool_input.get("edits")
        return f"{shown}: {len(edits) if isinstance(edits, list) else 0} edits"
    return shown


# -- codex -----------------------------------------------------------------------------

# The custom endpoint's provider id in codex's config (``-c model_provider=podbay``).
CODEX_PROVIDER = "podbay"
CODEX_DEFAULT_ENV_KEY = "OPENAI_API_KEY"


class CodexPreset:
    """Codex: ``codex exec --json``, resumed with ``codex exec … resume <thread_id>``."""

    name: PresetName = "codex"

    def argv(
        self,
        request: RunRequest,
        *,
        resume_id: str | None,
        config: AgentConfig | None = None,
        executable: str = "codex",
    ) -> list[str]:
        argv = [
            executable,
            "exec",
            "--json",
            # /workspace need not be a git repository (a new project is not).
            "--skip-git-repo-check",
            # The project container is the sandbox (uid 1000, --cap-drop ALL,
            # no-new-privileges). codex's own sandbox cannot work inside it: with
            # `--sandbox workspace-write` every command fails with "bwrap: No permissions
            # to create a new namespace" (recorded in tests/engine/streams/
            # codex_sandboxed.jsonl), and any approval policy but "never" would wait for
            # a human. This flag is the one that means "no approvals, no inner sandbox".
            "--dangerously-bypass-approvals-and-sandbox",
            # The binary is pinned and mounted read-only: an update check is pointless.
            "-c",
            "check_for_update_on_startup=false",
        ]
        model = config.model if config else ""
        if model:
            argv += ["-m", model]
        base_url = config.base_url if config else ""
        if base_url:
            argv += codex_provider_overrides(base_url)
        argv += list(config.extra_args if config else ())
        # The options above belong to `exec` and must precede the subcommand; `-` makes
        # codex read the prompt from stdin (and not wait for more after it).
        if resume_id:
            argv += ["resume", resume_id]
        return [*argv, "-"]

    def stdin(self, request: RunRequest) -> bytes:
        return request.prompt.encode()

    def env(self, config: AgentConfig | None = None) -> dict[str, str]:
        return {}

    def parser(self, *, workdir: str = WORKSPACE) -> CodexStreamParser:
        return CodexStreamParser(workdir=workdir)


def codex_provider_overrides(base_url: str, env_key: str = CODEX_DEFAULT_ENV_KEY) -> list[str]:
    """``-c`` options that point codex at an OpenAI Responses endpoint at ``base_url``.

    The key is read from ``env_key`` in the agent's environment (``[agent.env]``). A
    custom endpoint is meant to be the only one, so codex's analytics and plugin sync
    (which call chatgpt.com, ab.chatgpt.com and api.github.com) are turned off too.
    Values are TOML (JSON strings are valid TOML basic strings).
    """
    prefix = f"model_providers.{CODEX_PROVIDER}"
    settings = {
        f"{prefix}.name": json.dumps("podbay endpoint"),
        f"{prefix}.base_url": json.dumps(base_url),
        f"{prefix}.wire_api": json.dumps("responses"),
        f"{prefix}.env_key": json.dumps(env_key),
        "model_provider": json.dumps(CODEX_PROVIDER),
        "analytics.enabled": "false",
        "features.plugins": "false",
    }
    argv: list[str] = []
    for key, value in settings.items():
        argv += ["-c", f"{key}={value}"]
    return argv


class CodexStreamParser:
    """``codex exec --json``: ``thread.started``, ``turn.started``, ``item.started`` /
    ``item.completed`` (agent_message, command_execution, file_change, reasoning, …),
    ``turn.completed`` with usage, and ``error`` / ``turn.failed`` with a message.

    A fatal API error is an ``error`` event followed by ``turn.failed`` with the same
    message; an ``error`` starting "Reconnecting..." is a retry and not fatal.
    """

    def __init__(self, *, workdir: str = WORKSPACE) -> None:
        self.conversation_missing = False
        self._workdir = workdir
        self._thread_id = ""
        self._turns = 0
        self._usage: dict[str, int] = {}
        self._failed = ""  # turn.failed's message
        self._error = ""  # the last error event's message
        self._announced_retry = False

    def feed(self, line: str) -> list[AgentEvent]:
        event = _json_object(line)
        if event is None:
            return []
        kind = event.get("type")
        if kind == "thread.started":
            self._thread_id = _str(event.get("thread_id"))
        elif kind == "item.completed":
            item = event.get("item")
            return self._item(item) if isinstance(item, dict) else []
        elif kind == "turn.completed":
            self._turns += 1
            usage = event.get("usage")
            if isinstance(usage, dict):
                self._usage = {k: v for k, v in usage.items() if isinstance(v, int)}
        elif kind == "turn.failed":
            error = event.get("error")
            message = _str(error.get("message")) if isinstance(error, dict) else ""
            self._failed = _codex_message(message) or self._error or "the turn failed"
        elif kind == "error":
            message = _codex_message(_str(event.get("message")))
            if message.startswith("Reconnecting"):
                if not self._announced_retry:
                    self._announced_retry = True
                    return [NoticeEvent(f"Codex: {shorten(message, 200)}")]
                return []
            self._error = message
        return []

    def _item(self, item: dict[str, Any]) -> list[AgentEvent]:
        kind = item.get("type")
        if kind == "agent_message":
            done, _ = paragraphs(_str(item.get("text")), final=True)
            return [TextEvent(text) for text in done]
        if kind == "command_execution":
            command = unwrap_shell(_str(item.get("command")))
            code = item.get("exit_code")
            status = f" (exit {code})" if isinstance(code, int) else ""
            output = _str(item.get("aggregated_output"))
            detail = _clip(f"$ {command}\n{output}".rstrip("\n"))
            return [ToolEvent("command", f"🔧 $ {shorten(command)}{status}", detail)]
        if kind == "file_change":
            changes = list(_dicts(item.get("changes")))
            paths = [relative_path(_str(c.get("path")), self._workdir) for c in changes]
            detail = "\n".join(
                f"{_str(c.get('kind')) or 'change'} {p}"
                for c, p in zip(changes, paths, strict=True)
            )
            failed = "" if item.get("status") in (None, "completed") else " (failed)"
            return [ToolEvent("edit", f"🔧 Edit {shorten(', '.join(paths))}{failed}", detail)]
        if kind == "mcp_tool_call":
            label = ".".join(p for p in (_str(item.get("server")), _str(item.get("tool"))) if p)
            return [ToolEvent("mcp", f"🔧 {label or 'MCP tool'}", _json_detail(item))]
        if kind == "web_search":
            query = _str(item.get("query"))
            return [ToolEvent("web_search", f"🔧 Search: {shorten(query)}", query)]
        if kind == "error":
            # A non-fatal problem codex reports as an item (e.g. unknown model metadata).
            return [NoticeEvent(f"Codex: {shorten(_str(item.get('message')), 200)}")]
        # reasoning, todo_list and future item types carry nothing for the chat.
        return []

    def finish(self, exit_code: int, stderr_tail: str) -> FinishedEvent:
        if CODEX_NO_CONVERSATION in stderr_tail:
            self.conversation_missing = True
        ok = self._turns > 0 and not self._failed
        error = ""
        failure: FailureKind = ""
        if not ok:
            error = self._failed or self._error or stderr_tail.strip()
            error = error or f"codex exited with status {exit_code} and no result"
            failure = _classify_text(error) or "execution"
        return FinishedEvent(
            ok=ok,
            exit_code=exit_code,
            error=error,
            usage=dict(self._usage),
            cost_usd=None,  # codex reports tokens only
            agent_session_id="" if self.conversation_missing else self._thread_id,
            num_turns=self._turns or None,
            failure=failure,
        )


# codex appends ", url: <endpoint>, request id: <id>" to API errors: noise in a chat line.
_CODEX_ERROR_NOISE = re.compile(r",\s*(?:url|request id): [^,)]*")


def _codex_message(message: str) -> str:
    return _CODEX_ERROR_NOISE.sub("", message).strip()


def unwrap_shell(command: str) -> str:
    """``/usr/bin/bash -lc 'pytest -q'`` → ``pytest -q``: codex shows the wrapper."""
    try:
        words = shlex.split(command)
    except ValueError:
        return command
    shells = ("bash", "sh", "zsh", "dash")
    if len(words) == 3 and words[0].rsplit("/", 1)[-1] in shells and words[1] in ("-c", "-lc"):
        return words[2]
    return command


# -- shared ----------------------------------------------------------------------------

_RATE_LIMIT = re.compile(
    r"\b429\b|too many requests|rate[ _-]?limit|usage limit|quota", re.IGNORECASE
)
_AUTH = re.compile(
    r"\b401\b|\b403\b|unauthori[sz]ed|forbidden|invalid[ _-]api[ _-]key|incorrect api key"
    r"|authentication|not logged in|please run /login|missing environment variable",
    re.IGNORECASE,
)


def _classify_text(text: str) -> FailureKind:
    """A failure kind from an error message, for CLIs that give only a message."""
    if _RATE_LIMIT.search(text):
        return "rate_limit"
    if _AUTH.search(text):
        return "auth"
    return ""


def relative_path(path: str, workdir: str = WORKSPACE) -> str:
    """``/workspace/src/a.py`` → ``src/a.py``; paths elsewhere are shown whole."""
    root = workdir.rstrip("/")
    if root and path.startswith(root + "/"):
        return path[len(root) + 1 :] or path
    return path


def shorten(text: str, limit: int = SUMMARY_CHARS) -> str:
    """The first line of ``text``, cut to ``limit`` characters; an ellipsis marks a cut."""
    stripped = text.strip()
    first = stripped.split("\n", 1)[0].rstrip()
    if len(first) > limit:
        return first[: limit - 1].rstrip() + "…"
    return first + (" …" if first != stripped else "")


def _clip(text: str, limit: int = DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json_detail(value: object) -> str:
    return _clip(json.dumps(value, ensure_ascii=False, sort_keys=True))


def _json_object(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line.startswith("{"):
        return None  # warnings and other noise some versions print on stdout
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


def _strings(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _dicts(value: object) -> Sequence[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


CLAUDE = ClaudePreset()
CODEX = CodexPreset()
PRESETS: dict[str, AgentPreset] = {"claude": CLAUDE, "codex": CODEX}


def preset_for(name: str) -> AgentPreset:
    """The preset called ``name`` ("claude" or "codex")."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"no agent preset {name!r}; choose one of {sorted(PRESETS)}") from None
