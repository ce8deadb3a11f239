"""Slack benchmark: slash command → ack and → first reply, podbay against a bare slack_bolt app.

Run: .venv/bin/python bench/slack.py [--no-matrix]   (writes bench/results/slack.json)
Both sides serve Slack's HTTP Events API on 127.0.0.1 and talk to the same fake Slack
(tests/fakes/slack_api.py). podbay is a real ``Podbay`` with the Slack plugin, wired as
tests/fakes/slack_world.py wires it (FakeAgent, docker=False); the baseline is
slack_bolt's minimal ``AsyncApp`` that acks and says "hello", behind a tiny aiohttp app.
Each sample is one signed ``/podbay whoami`` slash command, sent alone (no queueing): ack
= until the HTTP response is read; first reply = until the fake sees the chat.postMessage
(``SlackCall.at``). Requests alternate between the two sides and rotate over 10 channels.
With a real Synapse (tests/matrix/synapse_server.py) the Matrix ``help`` round trip is
measured beside it: a human client sends ``help`` in a DM, until the bot's notice syncs.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "matrix"))

from fakes.agent import FakeAgent  # noqa: E402
from fakes.slack_api import FakeSlack, SlackCall  # noqa: E402

from podbay.bot import Podbay  # noqa: E402
from podbay.transports.slack import EVENTS_PATH  # noqa: E402

SAMPLES = 200
WARMUP = 10
CHANNELS = [f"C{n:04d}" for n in range(1, 11)]
MATRIX_SAMPLES = 30
MATRIX_WARMUP = 3
ACK_GOAL = 1.2  # the [bench] issue: podbay's ack within 1.2x the bare slack_bolt app


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
    for dist in ("aiohttp", "slack_bolt", "slack_sdk", "matrix-synapse", "matrix-nio"):
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


def summary(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    return {
        "samples": len(ordered),
        "median_ms": round(statistics.median(ordered), 2),
        "p95_ms": round(ordered[max(0, int(len(ordered) * 0.95) - 1)], 2),
        "min_ms": round(ordered[0], 2),
        "max_ms": round(ordered[-1], 2),
        "raw_ms": [round(v, 3) for v in values],
    }


class Side:
    """One server answering slash commands at ``url``; ``marker`` is in its reply only."""

    def __init__(self, name: str, url: str, marker: str) -> None:
        self.name, self.url, self.marker = name, url, marker
        self.ms: dict[str, list[float]] = {"ack": [], "first_reply": []}


async def one_command(
    fake: FakeSlack, http: aiohttp.ClientSession, side: Side, channel: str
) -> tuple[float, float]:
    """Send one signed ``/podbay whoami``; (ack ms, first reply ms)."""
    payload = fake.slash_command("whoami", user_id="UALICE", channel_id=channel)
    body = urllib.parse.urlencode(payload).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded", **fake.sign(body)}
    began = time.monotonic()

    def answer(call: SlackCall) -> bool:
        args = json.dumps(call.args)
        return (
            call.at >= began
            and not call.failed
            and call.args.get("channel") == channel
            and side.marker in args
        )

    async with http.post(side.url, data=body, headers=headers) as response:
        await response.read()
        acked = time.monotonic()
        assert response.status == 200, f"{side.name}: HTTP {response.status}"
    (reply, *_) = await fake.wait_for("chat.postMessage", answer, timeout=10)
    return (acked - began) * 1000, (reply.at - began) * 1000


async def start_baseline(fake: FakeSlack) -> tuple[web.AppRunner, str]:
    """slack_bolt's hello-world AsyncApp on the same fake, served by a bare aiohttp app."""
    from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
    from slack_bolt.async_app import AsyncApp
    from slack_sdk.web.async_client import AsyncWebClient

    client = AsyncWebClient(base_url=fake.base_url, token=fake.bot_token)
    bolt = AsyncApp(client=client, signing_secret=fake.signing_secret)

    @bolt.command("/podbay")
    async def hello(ack: Any, say: Any) -> None:
        await ack()
        await say("hello")

    async def events(request: web.Request) -> web.Response:
        return await to_aiohttp_response(await bolt.async_dispatch(await to_bolt_request(request)))

    app = web.Application()
    app.router.add_post("/slack/events", events)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    return runner, f"http://127.0.0.1:{port}/slack/events"


async def slack(tmp: Path) -> dict[str, Any]:
    import fakes.slack_world as conftest

    fake = FakeSlack()
    await fake.start()
    settings = conftest.slack_settings(fake, tmp / "data")
    # One benchmark user sends hundreds of commands: the per-sender limit would trip.
    settings.dispatcher.rate_limit_per_minute = 0
    bot = Podbay(settings, agent=FakeAgent(auto_release=0.0), docker=False)
    await bot.start()
    runner, baseline_url = await start_baseline(fake)
    sides = [
        Side("podbay", bot.http.local_url(EVENTS_PATH), f"slack:{conftest.ALICE}"),
        Side("slack_bolt_baseline", baseline_url, "hello"),
    ]
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            for i in range(WARMUP + SAMPLES):
                channel = CHANNELS[i % len(CHANNELS)]
                # Alternate the side that goes first, so neither always follows the other.
                for side in sides if i % 2 == 0 else sides[::-1]:
                    ack, reply = await one_command(fake, http, side, channel)
                    if i >= WARMUP:
                        side.ms["ack"].append(ack)
                        side.ms["first_reply"].append(reply)
    finally:
        await runner.cleanup()
        await bot.stop()
        await fake.stop()
    out: dict[str, Any] = {
        "requests_per_side": SAMPLES,
        "warmup_per_side": WARMUP,
        "channels": len(CHANNELS),
        "command": "/podbay whoami",
        "note": "both acks include slack_bolt's wait for ack(): its listener runner polls "
        "every 10 ms (slack_bolt/listener/asyncio_runner.py), so the reply, posted right "
        "after ack() in a task of its own, usually reaches the fake before the HTTP ack",
    }
    for side in sides:
        out[side.name] = {what: summary(values) for what, values in side.ms.items()}
    mine, theirs = out["podbay"], out["slack_bolt_baseline"]
    ratios = {
        f"{what}_{stat}": round(mine[what][f"{stat}_ms"] / theirs[what][f"{stat}_ms"], 2)
        for what in ("ack", "first_reply")
        for stat in ("median", "p95")
    }
    out["ratios_podbay_over_baseline"] = ratios
    out["goal"] = {
        "ack_median_at_most_x_baseline": ACK_GOAL,
        "ack_median_met": ratios["ack_median"] <= ACK_GOAL,
        "ack_p95_met": ratios["ack_p95"] <= ACK_GOAL,
    }
    return out


async def matrix(tmp: Path) -> dict[str, Any]:
    """``help`` round trips through podbay's Matrix transport on a real Synapse."""
    try:
        from nio import RoomCreateResponse
        from synapse_server import SynapseServer
        from test_matrix_transport import Human, bot_settings, human, podbay_for, wait_until_member
    except ImportError as exc:
        return {"skipped": True, "note": f"Matrix test helpers not importable: {exc}"}
    server = SynapseServer(tmp / "synapse")
    try:
        await server.start()
    except Exception as exc:
        return {"skipped": True, "note": f"Synapse did not start: {type(exc).__name__}"}
    bot: Podbay | None = None
    alice: Human | None = None
    try:
        tag = secrets.token_hex(3)
        bot_id = await server.register(f"podbay{tag}", "bot-password")
        alice = await human(server, f"alice{tag}")
        settings = bot_settings(
            server, tmp / "matrix-data", bot_id, [f"matrix:{alice.client.user_id}"]
        )
        bot, transport = podbay_for(settings, FakeAgent(auto_release=0.0))
        await bot.start()
        await asyncio.wait_for(transport.ready.wait(), 30)
        created = await alice.client.room_create(invite=[bot_id], is_direct=True)
        assert isinstance(created, RoomCreateResponse), created
        room = created.room_id
        await wait_until_member(alice.client, room, bot_id)
        samples: list[float] = []
        for i in range(MATRIX_WARMUP + MATRIX_SAMPLES):
            seen = len(alice.notices)
            began = time.monotonic()
            await alice.say(room, "help")
            while not any("Commands:" in n.get("body", "") for n in alice.notices[seen:]):
                assert time.monotonic() - began < 30, "no help notice within 30 s"
                await alice.sync_once()
            if i >= MATRIX_WARMUP:
                samples.append((time.monotonic() - began) * 1000)
        return {
            "skipped": False,
            "command": "help (DM, plain text)",
            "warmup": MATRIX_WARMUP,
            "synapse_startup_s": round(server.startup_seconds or 0.0, 1),
            "note": "human room_send until the bot's m.notice arrives in the human's /sync "
            "(long-poll); includes Synapse's event persistence and fan-out both ways",
            "round_trip": summary(samples),
        }
    finally:
        if bot is not None:
            await bot.stop()
        if alice is not None:
            await alice.client.close()
        await server.stop()


def _row(name: str, stats: dict[str, Any]) -> str:
    return f"  {name:<34} {stats['median_ms']:>9.2f} {stats['p95_ms']:>9.2f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--matrix",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the Matrix help round trip on a real Synapse (default: on)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as raw:
        tmp = Path(raw)
        results: dict[str, Any] = {
            "benchmark": "slack",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(),
            "slack_http": await slack(tmp),
        }
        if args.matrix:
            results["matrix"] = await matrix(tmp)
        else:
            results["matrix"] = {"skipped": True, "note": "--no-matrix"}
    out = ROOT / "bench" / "results" / "slack.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    s = results["slack_http"]
    print(f"{'':36} {'median ms':>9} {'p95 ms':>9}")
    for side in ("podbay", "slack_bolt_baseline"):
        for what in ("ack", "first_reply"):
            print(_row(f"{side} {what}", s[side][what]))
    m = results["matrix"]
    if m.get("skipped"):
        print(f"  matrix help round trip: skipped ({m['note']})")
    else:
        print(_row("matrix help round trip", m["round_trip"]))
    r, goal = s["ratios_podbay_over_baseline"], s["goal"]
    print(
        f"podbay/baseline: ack median {r['ack_median']}x, ack p95 {r['ack_p95']}x, "
        f"reply median {r['first_reply_median']}x, reply p95 {r['first_reply_p95']}x"
    )
    met = {True: "met", False: "missed"}
    print(
        f"goal ack <= {ACK_GOAL}x baseline: median {met[goal['ack_median_met']]}, p95 "
        f"{met[goal['ack_p95_met']]}"
    )
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
