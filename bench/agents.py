"""Agent benchmark: a Claude Code turn through podbay against the same CLI run directly.

Run: .venv/bin/python bench/agents.py   (writes bench/results/agents.json)
Needs a Docker engine (./scripts/ensure-docker) and npm (podbay fetches the real CLI once).
Only the hosted LLM is fake (tests/fakes/anthropic_api.py on 127.0.0.1); the container uses
host networking to reach it. Both sides drive the same binary in the same container against
the same fake, and both resume their own conversation on every timed turn, so what differs
is podbay: inbox, dispatcher, run service, store rows, the exec wrapper and tagging, parsing
and relaying the stream to chat. Turns alternate between the two sides so that a busy
moment on this shared machine lands on both.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "containers"))

from docker_support import DM, container_settings, remove_instance_containers  # noqa: E402
from fakes.anthropic_api import FakeAnthropic  # noqa: E402
from fakes.transport import MemoryTransport  # noqa: E402

from podbay.bot import Podbay  # noqa: E402
from podbay.config import AgentConfig, DispatcherConfig  # noqa: E402
from podbay.engine.container_agent import AGENT_HOME  # noqa: E402
from podbay.engine.lifecycle import ProjectManager  # noqa: E402
from podbay.engine.stacks import dev_ids  # noqa: E402

TURNS = 20
PROJECT = "bench"
WARMUP_TIMEOUT_S = 300.0  # the first turn also fetches the CLI from npm
TURN_TIMEOUT_S = 120.0
# The direct runs keep their conversation apart from podbay's, on the same home volume.
DIRECT_HOME = "/home/dev/.podbay/bench-direct-home"


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    docker = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "platform": platform.platform(),
        "docker_server": docker,
    }


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_s": round(statistics.median(ordered), 3),
        "p95_s": round(ordered[max(0, int(len(ordered) * 0.95) - 1)], 3),
        "min_s": round(ordered[0], 3),
        "max_s": round(ordered[-1], 3),
    }


class Direct:
    """The same CLI, run by hand with ``docker exec`` as an operator would."""

    def __init__(self, container: str, cli: str, fake: FakeAnthropic) -> None:
        self.container = container
        self.cli = cli
        self.fake = fake
        self.session_id: str | None = None
        uid, gid = dev_ids()
        self.user = f"{uid}:{gid}"

    async def prepare(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            "docker", "exec", "-u", self.user, self.container, "mkdir", "-p", DIRECT_HOME
        )
        assert await proc.wait() == 0

    async def noop(self) -> float:
        """``docker exec <container> true``: what the docker client and exec cost alone."""
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            "docker", "exec", "-u", self.user, self.container, "true"
        )
        assert await proc.wait() == 0
        return time.perf_counter() - started

    async def turn(self, prompt: str) -> float:
        argv = [
            "docker",
            "exec",
            "-i",
            "-u",
            self.user,
            "-w",
            "/workspace",
            "-e",
            f"HOME={DIRECT_HOME}",
            "-e",
            f"ANTHROPIC_BASE_URL={self.fake.base_url}",
            # Name only: the value comes from this process's environment, not the argv.
            "-e",
            "ANTHROPIC_API_KEY",
            "-e",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
            "-e",
            "CLAUDE_CODE_MAX_RETRIES=0",
            self.container,
            self.cli,
            "-p",
            "--output-format",
            "stream-json",
            "--verbose",
            "--permission-mode",
            "bypassPermissions",
        ]
        if self.session_id:
            argv += ["--resume", self.session_id]
        env = {**os.environ, "ANTHROPIC_API_KEY": self.fake.api_key}
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        out, err = await asyncio.wait_for(proc.communicate(prompt.encode()), TURN_TIMEOUT_S)
        elapsed = time.perf_counter() - started
        assert proc.returncode == 0, err.decode(errors="replace")
        result = next(
            json.loads(line)
            for line in reversed(out.decode().splitlines())
            if line.startswith("{") and json.loads(line).get("type") == "result"
        )
        assert not result.get("is_error") and result.get("result") == "done", result
        self.session_id = result["session_id"]
        return elapsed


class ThroughPodbay:
    def __init__(self, transport: MemoryTransport) -> None:
        self.transport = transport

    async def ask(self, text: str, expect: str, limit_s: float) -> str:
        since = len(self.transport.sent)
        await self.transport.say(text, session=DM, direct=True)
        return await self.transport.wait_for_text(expect, session=DM, timeout=limit_s, since=since)

    async def turn(self, prompt: str, limit_s: float = TURN_TIMEOUT_S) -> float:
        since = len(self.transport.sent)
        started = time.perf_counter()
        await self.transport.say(prompt, session=DM, direct=True)
        # The footer ("… · 1 turn · …") is the last thing a run posts.
        await self.transport.wait_for_text("turn", session=DM, timeout=limit_s, since=since)
        elapsed = time.perf_counter() - started
        texts = [r.text for s, r in self.transport.sent[since:] if s == DM]
        assert "done" in texts, texts
        return elapsed


async def main(turns: int = TURNS) -> None:
    with tempfile.TemporaryDirectory() as raw:
        tmp = Path(raw)
        (tmp / "projects").mkdir()
        async with FakeAnthropic() as fake:
            settings = container_settings(tmp)
            # No coalescing window: it is a deliberate wait (1.5 s by default) for more
            # lines, not machinery; the figures are podbay's cost on top of the agent.
            settings.dispatcher = DispatcherConfig(coalesce_window_ms=0, max_window_ms=1000)
            settings.agent = AgentConfig(
                preset="claude",
                base_url=fake.base_url,
                env={"ANTHROPIC_API_KEY": fake.api_key, "CLAUDE_CODE_MAX_RETRIES": "0"},
            )
            transport = MemoryTransport()
            bot = Podbay(settings, transports=[transport], shutdown_grace_s=1)
            await bot.start()
            assert bot.engine is not None and bot.engine.projects is not None
            manager: ProjectManager = bot.engine.projects
            try:
                results = await measure(bot, manager, transport, fake, turns)
            finally:
                await bot.stop()
                await asyncio.to_thread(remove_instance_containers, manager.instance, settings)
    out = ROOT / "bench" / "results" / "agents.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


async def measure(
    bot: Podbay,
    manager: ProjectManager,
    transport: MemoryTransport,
    fake: FakeAnthropic,
    turns: int,
) -> dict[str, Any]:
    assert bot.engine is not None
    podbay = ThroughPodbay(transport)
    await podbay.ask(f"new project {PROJECT}", "is ready", limit_s=300)
    warm_up = await podbay.turn("warm up: say done", limit_s=WARMUP_TIMEOUT_S)
    cli = bot.engine.agent_clis.lookup("claude")
    assert cli is not None, "the warm-up turn fetched the CLI"
    direct = Direct(manager.container_name(PROJECT), cli.container_path, fake)
    await direct.prepare()
    await direct.turn("warm up: say done")  # its own conversation, resumed from here on

    through: list[float] = []
    by_hand: list[float] = []
    requests_before = len(fake.requests)
    history = {"podbay": 0, "direct": 0}

    async def through_podbay(prompt: str) -> None:
        through.append(await podbay.turn(prompt))
        history["podbay"] = _last_history(fake)

    async def directly(prompt: str) -> None:
        by_hand.append(await direct.turn(prompt))
        history["direct"] = _last_history(fake)

    for i in range(turns):
        prompt = f"benchmark turn {i}: answer done"
        # Alternate which side goes first, so neither always follows the other.
        first, second = (through_podbay, directly) if i % 2 == 0 else (directly, through_podbay)
        await first(prompt)
        await second(prompt)
    requests = len(fake.requests) - requests_before
    noops = [await direct.noop() for _ in range(turns)]
    # Resuming means each request carries the whole conversation so far: check that both
    # sides really did (the last request of each holds every earlier turn).
    assert all(n >= 2 * turns for n in history.values()), history

    p, d = summary(through), summary(by_hand)
    return {
        "benchmark": "agents",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "cli": {"name": cli.name, "version": cli.version, "path": cli.container_path},
        "turns": turns,
        "method": (
            "one freeform turn through podbay (MemoryTransport -> footer reply) vs the same "
            "CLI via `docker exec -i` (start -> exit) in the same container against the "
            "same fake Anthropic API on 127.0.0.1 (it answers 'done'); interleaved"
        ),
        "resume": (
            "both resume: podbay passes --resume on every turn after its warm-up, and the "
            "direct runs pass --resume with the session_id of their previous result"
        ),
        "messages_in_last_request": history,
        "coalesce_window_ms": 0,
        "warm_up_turn_incl_cli_fetch_s": round(warm_up, 3),
        "fake_api_requests_during_timed_turns": requests,
        "podbay": p,
        "direct_docker_exec": d,
        # podbay execs through the Engine API socket; the direct side also starts the
        # docker client for every run, which this isolates.
        "docker_exec_true": summary(noops),
        "ratio_median_podbay_over_direct": round(p["median_s"] / d["median_s"], 3),
        "overhead_median_s": round(p["median_s"] - d["median_s"], 3),
        "agent_home_podbay": AGENT_HOME,
    }


def _last_history(fake: FakeAnthropic) -> int:
    """How many messages the latest model request carried (the conversation so far)."""
    body = fake.turn_requests[-1].body
    assert isinstance(body, dict)
    return len(body["messages"])


if __name__ == "__main__":
    asyncio.run(main())
