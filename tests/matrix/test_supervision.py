"""Transport supervision against a real Synapse: outages, fatal credentials, bad events."""

from __future__ import annotations

import asyncio
import json
import secrets
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from counting_proxy import CountingProxy
from fakes.agent import FakeAgent
from nio import AsyncClient, LoginResponse
from synapse_server import SynapseServer
from test_matrix_transport import (
    MatrixWorld,
    bot_settings,
    delivered,
    dm_with_bot,
    human,
)

from podbay.bot import Podbay
from podbay.commands.roles import role_for
from podbay.config import Settings
from podbay.messages import Inbound
from podbay.retry import Backoff, max_attempts_within
from podbay.transports.base import Submit, TransportState
from podbay.transports.matrix import MatrixTransport


def transport_for(settings: Settings, **kwargs: object) -> MatrixTransport:
    return MatrixTransport(
        settings.transports.matrix,
        settings.data_dir,
        lambda identity: role_for(identity, settings.access) is not None,
        **kwargs,  # type: ignore[arg-type]
    )


async def wait_for_state(
    transport: MatrixTransport, done: Callable[[TransportState], bool], timeout: float = 60
) -> TransportState:
    changed = asyncio.Event()
    transport.health.listen(lambda _: changed.set())
    async with asyncio.timeout(timeout):
        while not done(transport.health.state):
            changed.clear()
            await changed.wait()
    return transport.health.state


async def test_after_an_outage_podbay_reconnects_with_backoff_and_answers_once(
    synapse: SynapseServer, tmp_path: Path
) -> None:
    proxy = CountingProxy(synapse.port)
    await proxy.start()
    tag = secrets.token_hex(3)
    bot_id = await synapse.register(f"podbay{tag}", "bot-password")
    alice = await human(synapse, f"alice{tag}")
    settings = bot_settings(
        synapse, tmp_path / "data", bot_id, [f"matrix:{alice.client.user_id}"],
        homeserver=proxy.url,
    )  # fmt: skip
    backoff = Backoff(base=0.2, cap=1.0)
    transport = transport_for(settings, backoff=backoff)
    agent = FakeAgent(auto_release=0.05)
    bot = Podbay(settings, transports=[transport], agent=agent, docker=False)
    await bot.start()
    try:
        await asyncio.wait_for(transport.ready.wait(), 30)
        room = await dm_with_bot(MatrixWorld(synapse, bot_id, alice, agent, bot, transport))
        await alice.say(room, "before the outage")
        await alice.wait_for_notice("echo: before the outage")

        await synapse.pause()
        await proxy.wait_for_refusals(5)
        state = await wait_for_state(transport, lambda s: s.attempt >= 3)
        assert state.describe().startswith("matrix: reconnecting (attempt ")
        assert "last error: " in state.describe()
        published = settings.data_dir / "transports.json"
        assert stat.S_IMODE(published.stat().st_mode) == 0o600
        [matrix] = json.loads(published.read_text())["transports"]
        assert matrix["status"] == "reconnecting" and matrix["attempt"] >= 3

        await synapse.resume()
        await wait_for_state(transport, lambda s: s.status == "connected")
        refused = list(proxy.refused)
        # Each wait is at least half its ceiling: this many tries fit the outage at most.
        bound = max_attempts_within(backoff, refused[-1] - refused[0])
        assert 5 <= len(refused) <= bound, (len(refused), bound)

        await alice.say(room, "after the outage")
        await alice.wait_for_notice("echo: after the outage")
        await alice.say(room, "and one more")
        await alice.wait_for_notice("echo: and one more")
        assert delivered(agent) == ["before the outage", "after the outage", "and one more"]
        await alice.say(room, "status")
        report = await alice.wait_for_notice("Transports")
        assert "matrix: connected" in report["body"]
    finally:
        await bot.stop()
        await alice.client.close()
        await proxy.stop()


async def test_an_exception_for_one_event_is_reported_and_later_events_still_arrive(
    synapse: SynapseServer, tmp_path: Path
) -> None:
    tag = secrets.token_hex(3)
    bot_id = await synapse.register(f"podbay{tag}", "bot-password")
    alice = await human(synapse, f"alice{tag}")
    settings = bot_settings(synapse, tmp_path / "data", bot_id, [f"matrix:{alice.client.user_id}"])
    poisoned: list[str] = []

    class PoisonedSubmit(MatrixTransport):
        async def start(self, submit: Submit) -> None:
            async def guarded(inbound: Inbound) -> None:
                if inbound.text == "poison":
                    poisoned.append(inbound.platform_id)
                    raise RuntimeError("this event cannot be handled")
                await submit(inbound)

            await super().start(guarded)

    transport = PoisonedSubmit(
        settings.transports.matrix,
        settings.data_dir,
        lambda identity: role_for(identity, settings.access) is not None,
    )
    agent = FakeAgent(auto_release=0.05)
    bot = Podbay(settings, transports=[transport], agent=agent, docker=False)
    await bot.start()
    try:
        await asyncio.wait_for(transport.ready.wait(), 30)
        room = await dm_with_bot(MatrixWorld(synapse, bot_id, alice, agent, bot, transport))
        await alice.say(room, "poison")
        await alice.say(room, "after the poison")
        await alice.wait_for_notice("echo: after the poison")
        error = await alice.wait_for_notice("could not be handled")
        assert "(ref " in error["body"] and "cannot be handled" not in error["body"]
        await alice.say(room, "later still")
        await alice.wait_for_notice("echo: later still")
        assert len(poisoned) == 1, "the failing event is not fetched and retried again"
        assert transport.health.state.status == "connected"
        saved = json.loads((settings.data_dir / "matrix" / "state.json").read_text())
        assert saved["next_batch"]
    finally:
        await bot.stop()
        await alice.client.close()


async def run_podbay(tmp_path: Path, config: str) -> tuple[int, str]:
    """`podbay run` as a user runs it; returns its exit code and stderr."""
    path = tmp_path / "config.toml"
    path.write_text(config)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "podbay", "run",
        "--config", str(path), "--data-dir", str(tmp_path / "data"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError("podbay run kept running with credentials it cannot use") from None
    assert process.returncode is not None
    return process.returncode, err.decode()


def matrix_config(synapse: SynapseServer, bot_id: str, credential: str) -> str:
    return (
        "[transports.matrix]\n"
        f'enabled = true\nhomeserver = "{synapse.url}"\nuser_id = "{bot_id}"\n{credential}\n'
    )


async def test_a_revoked_access_token_ends_podbay_run_with_a_clear_error(
    synapse: SynapseServer, tmp_path: Path
) -> None:
    bot_id = await synapse.register(f"podbay{secrets.token_hex(3)}", "bot-password")
    client = AsyncClient(synapse.url, bot_id)
    assert isinstance(await client.login("bot-password"), LoginResponse)
    token = client.access_token
    await client.logout()  # the token is revoked on the server
    await client.close()
    code, err = await run_podbay(
        tmp_path, matrix_config(synapse, bot_id, f'access_token = "{token}"')
    )
    assert code != 0
    assert "matrix" in err and "M_UNKNOWN_TOKEN" in err and "access token" in err, err
    assert "Traceback" not in err
    assert token not in err


async def test_a_wrong_password_ends_podbay_run_with_a_clear_error(
    synapse: SynapseServer, tmp_path: Path
) -> None:
    bot_id = await synapse.register(f"podbay{secrets.token_hex(3)}", "bot-password")
    code, err = await run_podbay(tmp_path, matrix_config(synapse, bot_id, 'password = "wrong"'))
    assert code != 0
    assert "M_FORBIDDEN" in err and bot_id in err, err
    assert "Traceback" not in err and "wrong" not in err.replace("wrong password", "")


async def podbay_cli(tmp_path: Path, config: str, *args: str) -> tuple[int, str]:
    path = tmp_path / "cli-config.toml"
    path.write_text(config)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "podbay", *args,
        "--config", str(path), "--data-dir", str(tmp_path / "data"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_status_and_doctor_show_a_refused_homeserver_and_the_recovery(
    synapse: SynapseServer, tmp_path: Path
) -> None:
    tag = secrets.token_hex(3)
    bot_id = await synapse.register(f"podbay{tag}", "bot-password")
    settings = bot_settings(synapse, tmp_path / "data", bot_id, [])
    transport = transport_for(settings, backoff=Backoff(base=0.2, cap=1.0))
    bot = Podbay(settings, transports=[transport], agent=FakeAgent(0.0), docker=False)
    config = matrix_config(synapse, bot_id, 'password = "bot-password"')
    await bot.start()
    try:
        await asyncio.wait_for(transport.ready.wait(), 30)
        code, out = await podbay_cli(tmp_path, config, "status")
        assert code == 0 and "Transports: matrix: connected" in out, out
        code, out = await podbay_cli(tmp_path, config, "doctor")
        assert "ok: transport matrix: connected" in out, out

        await synapse.pause()  # nothing listens on the port now: connections are refused
        await wait_for_state(transport, lambda s: s.attempt >= 2)
        code, out = await podbay_cli(tmp_path, config, "status")
        assert "Transports: ⚠ matrix: reconnecting (attempt " in out, out
        assert "last error: connection refused)" in out
        code, out = await podbay_cli(tmp_path, config, "doctor")
        assert code == 1 and "problem: transport matrix: reconnecting (attempt " in out, out

        await synapse.resume()
        await wait_for_state(transport, lambda s: s.status == "connected")
        code, out = await podbay_cli(tmp_path, config, "status")
        assert "Transports: matrix: connected" in out, out
    finally:
        await bot.stop()
    code, out = await podbay_cli(tmp_path, config, "status")
    assert "Transports: podbay is not running" in out, out
