"""Container benchmark: `new project` until SSH answers (cached image), status, delete.

Run: .venv/bin/python bench/containers.py   (writes bench/results/containers.json)
Needs a Docker engine (./scripts/ensure-docker). Uses host networking and loopback only.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fakes.agent import FakeAgent  # noqa: E402
from fakes.transport import MemoryTransport  # noqa: E402

from podbay.bot import Podbay  # noqa: E402
from podbay.config import Settings  # noqa: E402
from podbay.messages import SessionKey  # noqa: E402

DM = SessionKey("memory", "bench")


async def main(rounds: int = 5) -> None:
    with tempfile.TemporaryDirectory() as raw:
        tmp = Path(raw)
        (tmp / "projects").mkdir()
        cas = sorted(Path("/usr/local/share/ca-certificates").glob("*.crt"))
        settings = Settings(
            data_dir=tmp / "data",
            access={"admins": ["memory:*"]},
            projects={"root": tmp / "projects"},
            docker={
                "network": "host",
                "name_prefix": f"pbbench{secrets.token_hex(2)}-",
                "extra_ca_certs": cas,
            },
            git={"user_name": "Bench", "user_email": "bench@example.org"},
        )
        transport = MemoryTransport()
        async with Podbay(settings, transports=[transport], agent=FakeAgent(0.0)) as bot:
            assert bot.engine is not None and bot.engine.projects is not None
            manager = bot.engine.projects
            warm_started = time.perf_counter()
            await manager.ensure_image("python")
            warm = time.perf_counter() - warm_started
            create, status, delete = [], [], []
            for i in range(rounds):
                name = f"bench{i}"
                since = len(transport.sent)
                started = time.perf_counter()
                await transport.say(f"new project {name} --stack python", session=DM)
                await transport.wait_for_text("is ready", DM, timeout=300, since=since)
                create.append(time.perf_counter() - started)
                since = len(transport.sent)
                started = time.perf_counter()
                await transport.say("status", session=DM)
                await transport.wait_for_text("Projects (", DM, since=since)
                status.append(time.perf_counter() - started)
            for i in range(rounds):
                since = len(transport.sent)
                started = time.perf_counter()
                await transport.say(f"delete bench{i}", session=DM)
                await transport.wait_for_text("Reply `confirm`", DM, since=since)
                await transport.say("confirm", session=DM)
                await transport.wait_for_text(f"Deleted `bench{i}`", DM, timeout=120, since=since)
                delete.append(time.perf_counter() - started)

    def summary(values: list[float]) -> dict[str, float]:
        return {
            "median_s": round(statistics.median(values), 3),
            "max_s": round(max(values), 3),
        }

    results = {
        "benchmark": "containers",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "image_check_when_cached_s": round(warm, 3),
        "new_project_until_ssh_ready": summary(create),
        "status_with_projects": summary(status),
        "delete_after_confirm": summary(delete),
        "rounds": rounds,
    }
    out = ROOT / "bench" / "results" / "containers.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
