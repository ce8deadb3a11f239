"""The homeserver stopped for 30 s: podbay reconnects with backoff and answers once.

The real Synapse process is stopped (``SynapseServer.pause``: SIGTERM, same port and
database kept) for ``OUTAGE_S`` seconds and started again. podbay reaches it through a
``CountingProxy`` (as through nginx): while nothing listens upstream, each request podbay
makes is answered ``502`` and counted, so the test knows how often podbay knocked.

Nobody can write to a stopped homeserver, so the messages "sent meanwhile" are sent the
moment Synapse is back, while podbay is still cut off: the proxy's upstream is pointed at a
closed port until they are in (what a client sees of a homeserver that is still down).
Then the proxy lets podbay through again; each of those messages must reach the agent and
be answered exactly once.

podbay runs as ``podbay run`` wires it (the plugin builds the transport), so the pace under
test is ``podbay.retry.Backoff``'s defaults.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from pathlib import Path

from counting_proxy import CountingProxy
from fakes.agent import FakeAgent
from synapse_server import SynapseServer
from test_matrix_transport import (
    MatrixWorld,
    bot_settings,
    delivered,
    dm_with_bot,
    human,
    podbay_for,
)
from test_supervision import wait_for_state

from podbay.retry import Backoff, max_attempts_within

OUTAGE_S = 30.0  # how long the homeserver process is down (the scenario, not a sync wait)
GAP_S = Backoff().minimum(1)  # podbay's shortest wait between two attempts (0.25 s)


def closed_port() -> socket.socket:
    """A bound, never listening socket: connecting to its port is refused (keep it open)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


async def test_synapse_stopped_for_30_s_podbay_reconnects_paced_and_answers_each_message_once(
    synapse: SynapseServer, tmp_path: Path
) -> None:
    proxy = CountingProxy(synapse.port, count_path="/_matrix/")  # every client-API request
    await proxy.start()
    tag = secrets.token_hex(3)
    bot_id = await synapse.register(f"podbay{tag}", "bot-password")
    alice = await human(synapse, f"alice{tag}")  # talks to Synapse directly, not via the proxy
    settings = bot_settings(
        synapse, tmp_path / "data", bot_id, [f"matrix:{alice.client.user_id}"],
        homeserver=proxy.url,
    )  # fmt: skip
    agent = FakeAgent(auto_release=0.05)
    bot, transport = podbay_for(settings, agent)
    await bot.start()
    gate = closed_port()
    try:
        await asyncio.wait_for(transport.ready.wait(), 30)
        room = await dm_with_bot(MatrixWorld(synapse, bot_id, alice, agent, bot, transport))
        await alice.say(room, "before the outage")
        await alice.wait_for_notice("echo: before the outage")

        await synapse.pause()  # the homeserver process is gone
        stopped_at = time.monotonic()
        await wait_for_state(transport, lambda s: s.status == "reconnecting")
        await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - stopped_at)))  # the outage
        proxy.upstream_port = gate.getsockname()[1]  # podbay stays cut off ...
        await synapse.resume()  # ... while the homeserver comes back and alice writes
        meanwhile = [f"written during the outage #{i}" for i in range(1, 4)]
        for text in meanwhile:
            await alice.say(room, text)
        state = transport.health.state
        assert state.status == "reconnecting", state.describe()
        refused = list(proxy.refused)
        proxy.upstream_port = synapse.port  # the outage ends for podbay too

        # Paced, not flooding. podbay waits at least Backoff.minimum(1) between attempts, so
        # requests closer together are one attempt: aiohttp re-sends an idempotent request
        # once when the connection drops (RFC 9112 retry), here on the proxy's reset.
        attempts = [at for i, at in enumerate(refused) if i == 0 or at - refused[i - 1] >= GAP_S]
        window = attempts[-1] - attempts[0]
        bound = max_attempts_within(Backoff(), window)  # every wait is >= half its ceiling
        assert 5 <= len(attempts) <= bound, (refused, bound)  # 7 in 30 s by default
        assert len(refused) <= 2 * len(attempts), refused  # an unpaced loop: thousands

        await wait_for_state(transport, lambda s: s.status == "connected", timeout=90)
        await alice.wait_for_notice(meanwhile[-1], timeout=60)
        await alice.say(room, "after the outage")  # in order: nothing earlier is still due
        await alice.wait_for_notice("echo: after the outage")

        received = delivered(agent)
        for text in meanwhile:
            assert received.count(text) == 1, (text, received)
            answers = [n for n in alice.notices if text in n.get("body", "")]
            assert len(answers) == 1, (text, answers)
        assert received == ["before the outage", *meanwhile, "after the outage"]
    finally:
        gate.close()
        await bot.stop()
        await alice.client.close()
        await proxy.stop()
