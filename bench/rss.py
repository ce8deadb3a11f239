"""RSS benchmark (#8): idle memory of `podbay run` with Matrix and Slack against a bare nio bot.

Run: .venv/bin/python bench/rss.py   (writes bench/results/rss.json)
Needs matrix-synapse in the venv (tests/matrix/synapse_server.py starts it on 127.0.0.1).

podbay is the real command, ``.venv/bin/python -m podbay run``, as a subprocess with a
config file enabling ``[transports.matrix]`` (password login on the real Synapse) and
``[transports.slack]`` in http mode (its webhook server on a free 127.0.0.1 port) against
the fake Slack Web API (tests/fakes/slack_api.py) served by this process; its data dir and
HOME are temporary. It counts as idle once it has answered one Matrix ``help`` from a
human in a DM, one signed ``/podbay whoami`` slash command on Slack, and the fake has seen
its ``auth.test``. The baseline is a bare matrix-nio echo bot (below: login, join on
invite, echo every text as a notice, ``sync_forever``), idle once it has echoed one
message from the same human. Both are then sampled the same way: VmRSS (and VmHWM) from
/proc/<pid>/status and Pss from /proc/<pid>/smaps_rollup, once a second for 10 s.
Rounds alternate podbay and baseline; each round is a fresh process and a fresh login.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "matrix"))

from fakes.slack_api import FakeSlack, SlackCall  # noqa: E402
from nio import RoomCreateResponse  # noqa: E402
from synapse_server import SynapseServer  # noqa: E402
from test_matrix_transport import Human, human, wait_until_member  # noqa: E402

ROUNDS = 3
SAMPLE_EVERY_S = 1.0
SAMPLES = 11  # 10 s
GOAL_MB = 120.0  # the [bench] issue: podbay run with Matrix + Slack idles within 120 MB
READY_TIMEOUT_S = 60.0
SLACK_USER = "UALICE"

ECHO_BOT = '''"""A bare matrix-nio echo bot: the baseline of bench/rss.py."""
import asyncio
import os

from nio import AsyncClient, InviteMemberEvent, MatrixRoom, RoomMessageText


async def main() -> None:
    client = AsyncClient(os.environ["ECHO_HOMESERVER"], os.environ["ECHO_USER_ID"])
    await client.login(os.environ["ECHO_PASSWORD"])

    async def on_invite(room: MatrixRoom, event: InviteMemberEvent) -> None:
        if event.state_key == client.user_id and event.membership == "invite":
            await client.join(room.room_id)

    async def on_text(room: MatrixRoom, event: RoomMessageText) -> None:
        if event.sender != client.user_id:
            content = {"msgtype": "m.notice", "body": event.body}
            await client.room_send(room.room_id, "m.room.message", content)

    client.add_event_callback(on_invite, InviteMemberEvent)
    await client.sync(timeout=0, full_state=True)  # history is not echoed
    client.add_event_callback(on_text, RoomMessageText)
    print("ready", flush=True)
    await client.sync_forever(timeout=30000)


asyncio.run(main())
'''


def machine() -> dict[str, Any]:
    model, mem_kb = "", 0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    versions = {}
    for dist in ("aiohttp", "slack_bolt", "slack_sdk", "matrix-synapse", "matrix-nio", "docker"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "platform": platform.platform(),
        "packages": versions,
    }


def popen(
    argv: list[str], env: dict[str, str], log: Path, stdout: int | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in the repository with stderr (and stdout unless piped) to ``log``."""
    with open(log, "wb") as output:
        return subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output if stdout is None else stdout,
            stderr=output,
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile (status) and Pss (smaps_rollup), in kB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            found[key] = int(value.split()[0])
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "Pss":
                found["Pss"] = int(value.split()[0])
    except OSError:
        pass
    return found


async def sample(proc: subprocess.Popen[bytes]) -> list[dict[str, int]]:
    samples = []
    for i in range(SAMPLES):
        assert proc.poll() is None, f"exited with {proc.returncode} while idle"
        samples.append(memory_kb(proc.pid))
        if i < SAMPLES - 1:
            await asyncio.sleep(SAMPLE_EVERY_S)  # the sampling period, not a synchronisation
    return samples


def mb(kb: float) -> float:
    return round(kb / 1024, 1)


def run_summary(samples: list[dict[str, int]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("VmRSS", "Pss", "RssAnon", "RssFile"):
        values = [s[key] for s in samples if key in s]
        if values:
            out[f"{key}_median_mb"] = mb(statistics.median(values))
            out[f"{key}_max_mb"] = mb(max(values))
    out["VmHWM_mb"] = mb(max(s["VmHWM"] for s in samples))
    out["threads"] = max(s["Threads"] for s in samples)
    out["raw_VmRSS_kb"] = [s["VmRSS"] for s in samples]
    return out


async def stop(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
    return proc.returncode


async def dm(alice: Human, bot_id: str) -> str:
    created = await alice.client.room_create(invite=[bot_id], is_direct=True)
    assert isinstance(created, RoomCreateResponse), created
    await wait_until_member(alice.client, created.room_id, bot_id)
    return str(created.room_id)


class World:
    def __init__(self, tmp: Path, server: SynapseServer, fake: FakeSlack, alice: Human) -> None:
        self.tmp, self.server, self.fake, self.alice = tmp, server, fake, alice

    async def podbay(self, n: int) -> dict[str, Any]:
        base = self.tmp / f"podbay{n}"
        (base / "home").mkdir(parents=True)
        bot_id = await self.server.register(f"podbay{n}{secrets.token_hex(3)}", "bot-password")
        port = free_port()
        config = base / "config.toml"
        admins = [f"matrix:{self.alice.client.user_id}", f"slack:{SLACK_USER}"]
        config.write_text(
            "[access]\n"
            f"admins = {json.dumps(admins)}\n"
            "[http]\n"
            f'host = "127.0.0.1"\nport = {port}\n'
            "[transports.matrix]\n"
            "enabled = true\n"
            f'homeserver = "{self.server.url}"\n'
            f'user_id = "{bot_id}"\n'
            'password = "bot-password"\n'
            "[transports.slack]\n"
            "enabled = true\n"
            'mode = "http"\n'
            f'bot_token = "{self.fake.bot_token}"\n'
            f'signing_secret = "{self.fake.signing_secret}"\n'
            f'api_base_url = "{self.fake.base_url}"\n'
        )
        config.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PODBAY_")}
        env.update(
            HOME=str(base / "home"),
            PODBAY_CONFIG=str(config),
            PODBAY_DATA_DIR=str(base / "data"),
        )
        auth_before = len(self.fake.calls_to("auth.test"))
        argv = [sys.executable, "-m", "podbay", "run"]
        proc = await asyncio.to_thread(popen, argv, env, base / "podbay.log")
        try:
            started = time.monotonic()
            room = await dm(self.alice, bot_id)
            seen = len(self.alice.notices)
            await self.alice.say(room, "help")
            await self.wait_notice("Commands:", seen, proc)
            await self.slash_whoami(port, proc)
            assert len(self.fake.calls_to("auth.test")) > auth_before, "no auth.test seen"
            ready_s = time.monotonic() - started
            samples = await sample(proc)
        finally:
            code = await stop(proc)
        return {
            "until_idle_s": round(ready_s, 2),
            "exit_code_on_sigterm": code,
            **run_summary(samples),
        }

    async def echo(self, n: int) -> dict[str, Any]:
        base = self.tmp / f"echo{n}"
        base.mkdir()
        script = base / "echo_bot.py"
        script.write_text(ECHO_BOT)
        bot_id = await self.server.register(f"echo{n}{secrets.token_hex(3)}", "echo-password")
        env = {
            **os.environ,
            "ECHO_HOMESERVER": self.server.url,
            "ECHO_USER_ID": bot_id,
            "ECHO_PASSWORD": "echo-password",
        }
        argv = [sys.executable, str(script)]
        proc = await asyncio.to_thread(popen, argv, env, base / "echo.log", stdout=subprocess.PIPE)
        try:
            started = time.monotonic()
            assert proc.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
            assert line.strip() == b"ready", line
            room = await dm(self.alice, bot_id)
            seen = len(self.alice.notices)
            token = f"ping-{secrets.token_hex(4)}"
            await self.alice.say(room, token)
            await self.wait_notice(token, seen, proc)
            ready_s = time.monotonic() - started
            samples = await sample(proc)
        finally:
            code = await stop(proc)
        return {
            "until_idle_s": round(ready_s, 2),
            "exit_code_on_sigterm": code,
            **run_summary(samples),
        }

    async def wait_notice(self, fragment: str, seen: int, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not any(fragment in n.get("body", "") for n in self.alice.notices[seen:]):
            assert proc.poll() is None, f"the bot exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"no notice with {fragment!r}"
            await self.alice.sync_once()  # a long-poll: returns as soon as an event arrives

    async def slash_whoami(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        payload = self.fake.slash_command("whoami", user_id=SLACK_USER, channel_id="C0001")
        body = urllib.parse.urlencode(payload).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded", **self.fake.sign(body)}
        url = f"http://127.0.0.1:{port}/slack/events"
        began = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:  # the webhook server may still be starting: retry refused connects
                assert proc.poll() is None, f"podbay exited with {proc.returncode}"
                try:
                    async with http.post(url, data=body, headers=headers) as response:
                        await response.read()
                        assert response.status == 200, response.status
                        break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline, "podbay's webhook server never answered"
                    await asyncio.sleep(0.1)

        def answer(call: SlackCall) -> bool:
            return call.at >= began and not call.failed and SLACK_USER in json.dumps(call.args)

        await self.fake.wait_for("chat.postMessage", answer, timeout=30)


def combined(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("VmRSS_median_mb", "Pss_median_mb", "RssAnon_median_mb", "VmHWM_mb")
    return {
        key: round(statistics.median(r[key] for r in runs), 1) for key in keys if key in runs[0]
    }


async def main() -> None:
    with tempfile.TemporaryDirectory() as raw:
        tmp = Path(raw)
        server = SynapseServer(tmp / "synapse")
        fake = FakeSlack()
        await fake.start()
        fake.set_channel_members("C0001", [fake.bot_user_id, SLACK_USER])
        await server.start()
        alice: Human | None = None
        runs: dict[str, list[dict[str, Any]]] = {"podbay": [], "nio_echo_bot": []}
        try:
            alice = await human(server, f"alice{secrets.token_hex(3)}")
            world = World(tmp, server, fake, alice)
            for n in range(ROUNDS):
                # Alternate which side goes first in a round.
                sides = {"podbay": world.podbay, "nio_echo_bot": world.echo}
                order = list(sides) if n % 2 == 0 else list(sides)[::-1]
                for name in order:
                    runs[name].append(await sides[name](n))
        finally:
            if alice is not None:
                await alice.client.close()
            await server.stop()
            await fake.stop()
    results = report(runs)
    out = ROOT / "bench" / "results" / "rss.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'':16} {'VmRSS MB':>9} {'Pss MB':>9} {'anon MB':>9} {'HWM MB':>9}")
    for side in ("podbay", "nio_echo_bot"):
        c = results[side]["median_of_runs"]
        print(
            f"  {side:<14} {c['VmRSS_median_mb']:>9} {c.get('Pss_median_mb', '-'):>9} "
            f"{c['RssAnon_median_mb']:>9} {c['VmHWM_mb']:>9}"
        )
    print(f"ratio podbay / echo bot (VmRSS): {results['ratio_vmrss_podbay_over_echo']}x")
    for goal in results["goals"]:
        met = "met" if goal["met"] else "missed"
        print(f"goal #{goal['id']} {goal['goal']}: {goal['value']} {goal['unit']} -> {met}")
    print(f"wrote {out.relative_to(ROOT)}")


def report(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    podbay, echo = combined(runs["podbay"]), combined(runs["nio_echo_bot"])
    value = podbay["VmRSS_median_mb"]
    worst = max(r["VmRSS_max_mb"] for r in runs["podbay"])
    return {
        "benchmark": "rss",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "method": (
            "`python -m podbay run` (Matrix password login on a real Synapse + Slack http "
            "mode against tests/fakes/slack_api.py; Docker engine reachable) vs a bare "
            "matrix-nio echo bot; each idle after answering one message, then VmRSS/Pss "
            f"sampled every {SAMPLE_EVERY_S:.0f} s, {SAMPLES} samples; {ROUNDS} alternating "
            "rounds, fresh process and login each"
        ),
        "rounds": ROUNDS,
        "podbay": {"median_of_runs": podbay, "runs": runs["podbay"]},
        "nio_echo_bot": {"median_of_runs": echo, "runs": runs["nio_echo_bot"]},
        "ratio_vmrss_podbay_over_echo": round(value / echo["VmRSS_median_mb"], 2),
        "ratio_pss_podbay_over_echo": (
            round(podbay["Pss_median_mb"] / echo["Pss_median_mb"], 2)
            if "Pss_median_mb" in podbay and "Pss_median_mb" in echo
            else None
        ),
        "goals": [
            {
                "id": 8,
                "goal": f"idle RSS of podbay run with Matrix + Slack <= {GOAL_MB:.0f} MB",
                "value": value,
                "limit": GOAL_MB,
                "unit": "MB",
                "met": value <= GOAL_MB,
                "note": f"VmRSS median of {ROUNDS} runs (MB = MiB); highest sample {worst} MiB; "
                f"echo bot {echo['VmRSS_median_mb']} MiB",
            }
        ],
    }


if __name__ == "__main__":
    asyncio.run(main())
