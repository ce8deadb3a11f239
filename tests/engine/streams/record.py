"""Record the real Claude Code and Codex JSON streams the preset parsers are tested on.

Not a test: run it by hand when the pinned CLI versions change, then review the diff::

    .venv/bin/python tests/engine/streams/record.py [name ...]

Each scenario runs the real CLI (``fakes.agent_clis``) inside a throwaway container shaped
like a project container (uid 1000, ``--cap-drop ALL``, ``no-new-privileges``, host network,
``/workspace`` bind-mounted, the binary mounted read-only) against the fake LLM APIs on
127.0.0.1, and writes ``<name>.jsonl`` (stdout, verbatim) and ``<name>.meta.json`` (exit code,
stderr, the argv used). The scratch home and workspace are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for the fakes

from fakes import anthropic_api as claude_api  # noqa: E402
from fakes import openai_api as codex_api  # noqa: E402
from fakes.agent_clis import agent_clis  # noqa: E402

from podbay.config import AgentConfig  # noqa: E402
from podbay.engine.agents import RunRequest  # noqa: E402
from podbay.engine.presets import CLAUDE, CODEX  # noqa: E402

IMAGE = "debian:bookworm-slim"
CLAUDE_EXE = "/opt/agent/claude"
CODEX_EXE = "/opt/agent/bin/codex"


@dataclass
class Box:
    """A scratch home and workspace for one scenario, shared by its runs (for resume)."""

    root: Path

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"


async def run_in_container(
    box: Box, argv: list[str], env: dict[str, str], stdin: str, mount: tuple[Path, str]
) -> tuple[int, str, str]:
    docker = [
        "docker",
        "run",
        "--rm",
        "-i",
        "--network",
        "host",
        "--user",
        "1000:1000",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "-v",
        f"{box.workspace}:/workspace",
        "-v",
        f"{box.home}:/home/dev",
        "-v",
        f"{mount[0]}:{mount[1]}:ro",
        "-w",
        "/workspace",
        "-e",
        "HOME=/home/dev",
    ]
    for key, value in env.items():
        docker += ["-e", f"{key}={value}"]
    process = await asyncio.create_subprocess_exec(
        *docker,
        IMAGE,
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin.encode()), 180)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def save(name: str, argv: list[str], code: int, out: str, err: str) -> None:
    (HERE / f"{name}.jsonl").write_text(out)
    meta = {"argv": argv, "exit_code": code, "stderr": err[-4000:]}
    (HERE / f"{name}.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{name}: exit {code}, {len(out.splitlines())} lines, stderr {err[-300:]!r}")


# -- claude --------------------------------------------------------------------------


def claude_env(fake: claude_api.FakeAnthropic) -> dict[str, str]:
    # The CLI retries 429/5xx up to 10 times with back-off: record the first answer.
    return {"ANTHROPIC_API_KEY": fake.api_key, "CLAUDE_CODE_MAX_RETRIES": "0"}


async def claude(
    box: Box,
    name: str,
    turns: list[claude_api.Turn],
    prompt: str,
    *extra: str,
    resume: str | None = None,
    **env: str,
) -> tuple[int, str, str]:
    clis = agent_clis()
    async with claude_api.FakeAnthropic() as fake:
        fake.script(*turns)
        request = RunRequest(prompt=prompt)
        config = AgentConfig(preset="claude", base_url=fake.base_url, extra_args=list(extra))
        argv = CLAUDE.argv(request, resume_id=resume, config=config, executable=CLAUDE_EXE)
        env = {**claude_env(fake), **CLAUDE.env(config), **env}
        code, out, err = await run_in_container(
            box, argv, env, CLAUDE.stdin(request).decode(), (clis.claude, CLAUDE_EXE)
        )
    save(name, argv, code, out, err)
    return code, out, err


def session_of(out: str) -> str:
    for line in out.splitlines():
        event = json.loads(line)
        if event.get("type") == "result":
            return str(event["session_id"])
    raise AssertionError("no result event")


async def claude_tool_use(box: Box) -> None:
    code, out, _ = await claude(
        box,
        "claude_tool_use",
        [
            claude_api.write(
                "/workspace/hello.txt", "hello\n", text="I'll create the file.\n\nWriting it now."
            ),
            claude_api.bash("cat hello.txt && python3 -m pytest -q tests/ --maxfail=1"),
            claude_api.Text("Wrote hello.txt.\n\nIt says hello."),
        ],
        "create hello.txt",
    )
    assert code == 0
    await claude(
        box, "claude_resume", [claude_api.Text("Still here.")], "again", resume=session_of(out)
    )


async def claude_rate_limit(box: Box) -> None:
    await claude(box, "claude_rate_limit", [claude_api.rate_limited()], "hi")


async def claude_rate_limit_retry(box: Box) -> None:
    await claude(
        box,
        "claude_rate_limit_retry",
        [claude_api.rate_limited(), claude_api.Text("Made it.")],
        "hi",
        CLAUDE_CODE_MAX_RETRIES="1",
    )


async def claude_auth(box: Box) -> None:
    await claude(box, "claude_auth", [claude_api.auth_error()], "hi")


async def claude_no_key(box: Box) -> None:
    # No credentials at all: what a user sees before setting [agent.env].
    await claude(box, "claude_no_key", [], "hi", ANTHROPIC_API_KEY="")


async def claude_max_turns(box: Box) -> None:
    await claude(
        box,
        "claude_max_turns",
        [claude_api.bash("echo one"), claude_api.bash("echo two")],
        "loop",
        "--max-turns",
        "1",
    )


async def claude_unknown_session(box: Box) -> None:
    await claude(box, "claude_unknown_session", [], "hello?", resume=str(uuid.uuid4()))


# -- codex ---------------------------------------------------------------------------


async def codex(
    box: Box,
    name: str,
    turns: list[codex_api.Turn],
    prompt: str,
    *,
    resume: str | None = None,
    rewrite: Callable[[list[str]], list[str]] = list,
    key: bool = True,
    retries: bool = False,
) -> tuple[int, str, str]:
    clis = agent_clis()
    async with codex_api.FakeOpenAI() as fake:
        fake.script(*turns)
        request = RunRequest(prompt=prompt)
        # No config.toml: the custom endpoint comes from the preset's -c options alone.
        # codex retries 429/5xx with back-off: record the first answer.
        config = AgentConfig(
            preset="codex",
            model=fake.model,
            base_url=fake.base_url,
            extra_args=[]
            if retries
            else [
                "-c",
                "model_providers.podbay.request_max_retries=0",
                "-c",
                "model_providers.podbay.stream_max_retries=0",
            ],
        )
        argv = rewrite(CODEX.argv(request, resume_id=resume, config=config, executable=CODEX_EXE))
        env: dict[str, str] = {}  # codex makes ~/.codex itself (a CODEX_HOME must exist)
        if key:
            env["OPENAI_API_KEY"] = fake.api_key
        code, out, err = await run_in_container(
            box, argv, env, CODEX.stdin(request).decode(), (clis.codex_dir, "/opt/agent")
        )
    save(name, argv, code, out, err)
    return code, out, err


def thread_of(out: str) -> str:
    for line in out.splitlines():
        event = json.loads(line)
        if event.get("type") == "thread.started":
            return str(event["thread_id"])
    raise AssertionError("no thread.started event")


async def codex_tool_use(box: Box) -> None:
    code, out, _ = await codex(
        box,
        "codex_tool_use",
        [
            codex_api.add_file("hello.txt", "hello\n", text="I'll add the files.\n\nStarting now."),
            codex_api.apply_patch(
                "*** Begin Patch\n*** Update File: hello.txt\n@@\n-hello\n+hello, world\n"
                "*** Add File: src/a.py\n+x = 1\n*** End Patch\n"
            ),
            codex_api.shell("cat hello.txt && false"),
            codex_api.Text("Done: hello.txt and src/a.py.\n\nThe check failed."),
        ],
        "create hello.txt",
    )
    assert code == 0
    await codex(
        box,
        "codex_resume",
        [codex_api.Text("Still here.")],
        "again",
        resume=thread_of(out),
    )


async def codex_sandboxed(box: Box) -> None:
    # codex's own sandbox (bubblewrap) instead of the bypass flag, under --cap-drop ALL and
    # no-new-privileges: why the preset bypasses it.
    def sandboxed(argv: list[str]) -> list[str]:
        flag = argv.index("--dangerously-bypass-approvals-and-sandbox")
        inner = ["--sandbox", "workspace-write", "-c", 'approval_policy="never"']
        return [*argv[:flag], *inner, *argv[flag + 1 :]]

    await codex(
        box,
        "codex_sandboxed",
        [codex_api.shell("echo hi > sandboxed.txt"), codex_api.Text("ok")],
        "sandbox",
        rewrite=sandboxed,
    )


async def codex_no_key(box: Box) -> None:
    await codex(box, "codex_no_key", [], "hi", key=False)


async def codex_rate_limit(box: Box) -> None:
    await codex(box, "codex_rate_limit", [codex_api.rate_limited()], "hi")


async def codex_rate_limit_retry(box: Box) -> None:
    # codex's default retries: a 429 is reported as "Reconnecting..." and then succeeds.
    await codex(box, "codex_rate_limit_retry", [codex_api.rate_limited()], "hi", retries=True)


async def codex_auth(box: Box) -> None:
    await codex(box, "codex_auth", [codex_api.auth_error()], "hi")


async def codex_unknown_thread(box: Box) -> None:
    await codex(box, "codex_unknown_thread", [], "hello?", resume=str(uuid.uuid4()))


SCENARIOS: dict[str, Callable[[Box], Awaitable[None]]] = {
    fn.__name__: fn
    for fn in (
        claude_tool_use,
        claude_rate_limit,
        claude_rate_limit_retry,
        claude_auth,
        claude_no_key,
        claude_max_turns,
        claude_unknown_session,
        codex_tool_use,
        codex_sandboxed,
        codex_no_key,
        codex_rate_limit,
        codex_rate_limit_retry,
        codex_auth,
        codex_unknown_thread,
    )
}


async def main(names: list[str]) -> None:
    for name in names or list(SCENARIOS):
        root = Path(tempfile.mkdtemp(prefix="podbay-streams-"))
        box = Box(root)
        box.home.mkdir()
        box.workspace.mkdir()
        shutil.chown(box.home, 1000, 1000)
        shutil.chown(box.workspace, 1000, 1000)
        try:
            await SCENARIOS[name](box)
        finally:
            # Files the container wrote belong to uid 1000; we run as root or as that user.
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
