"""The WhatsApp transport against the fake Graph API (Meta) and the fake Twilio API:
signed webhooks posted to podbay's real endpoints, replies checked at the fakes."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from fakes.wa_world import ALICE, BOB, EVE, PUBLIC, World

from podbay.config import load_settings
from podbay.engine.agents import FinishedEvent, TextEvent
from podbay.errors import ConfigError
from podbay.transports.whatsapp import META_PATH, TWILIO_PATH, twilio_signature


def sent(world: World, kind: str = "text") -> list[dict[str, Any]]:
    """Bodies of the messages podbay sent (not read receipts), in order."""
    assert world.graph is not None
    return [c.body for c in world.graph.messages() if c.body.get("type") == kind]


def texts(world: World) -> list[str]:
    return [b["text"]["body"] for b in sent(world)]


async def graph_text(world: World, fragment: str) -> dict[str, Any]:
    assert world.graph is not None
    calls = await world.graph.wait_for(
        lambda c: not c.failed and fragment in json.dumps(c.body, ensure_ascii=False)
    )
    return calls[0].body


async def test_a_signed_text_message_is_answered_at_the_graph_api(meta_world: World) -> None:
    wamid = await meta_world.say("whoami")
    reply = await graph_text(meta_world, "whatsapp:+15550001111")
    assert reply["to"] == ALICE and reply["type"] == "text"
    assert reply["messaging_product"] == "whatsapp"
    # The message was marked read.
    assert meta_world.graph is not None
    reads = [c.body for c in meta_world.graph.messages() if c.body.get("status") == "read"]
    assert any(r["message_id"] == wamid for r in reads)


async def test_freeform_drives_the_agent_with_the_typing_indicator(meta_world: World) -> None:
    meta_world.agent.auto_release = None
    wamid = await meta_world.say("fix the build")
    run = await meta_world.agent.next_started()
    assert run.request.prompt == "fix the build"
    typing = await meta_world.graph.wait_for(  # type: ignore[union-attr]
        lambda c: "typing_indicator" in c.body
    )
    assert typing[0].body["message_id"] == wamid
    run.release.set()
    await graph_text(meta_world, "echo: fix the build")


async def test_bad_or_missing_signatures_are_refused_and_nothing_executes(
    meta_world: World,
) -> None:
    assert meta_world.graph is not None
    payload = meta_world.graph.text_message("wipe everything", wa_id=ALICE)
    assert (await meta_world.meta(payload, signature=None)).status == 401
    assert (await meta_world.meta(payload, signature="sha256=" + "0" * 64)).status == 401
    other = json.dumps(meta_world.graph.text_message("whoami")).encode()
    forged = meta_world.graph.sign(other)["X-Hub-Signature-256"]  # signs another body
    assert (await meta_world.meta(payload, signature=forged)).status == 401
    wrong_key = meta_world.graph.sign(json.dumps(payload).encode(), secret="not-the-secret")
    assert (
        await meta_world.meta(payload, signature=wrong_key["X-Hub-Signature-256"])
    ).status == 401
    await meta_world.say("whoami")  # a good one afterwards is answered
    await graph_text(meta_world, "whatsapp:+15550001111")
    assert "wipe everything" not in meta_world.rows()
    assert meta_world.wiped == [] and meta_world.agent.runs == []


async def test_a_duplicate_wamid_executes_once_and_statuses_are_ignored(meta_world: World) -> None:
    assert meta_world.graph is not None
    wamid = await meta_world.say("ship it")
    await meta_world.say("ship it", wamid=wamid)  # Meta redelivers the same message
    status = await meta_world.meta(meta_world.graph.status_update(wamid, "delivered"))
    assert status.status == 200
    await meta_world.say("last one")
    await graph_text(meta_world, "last one")
    prompts = "\n\n".join(r.request.prompt for r in meta_world.agent.runs).split("\n\n")
    assert prompts == ["ship it", "last one"]


async def test_the_verification_challenge(meta_world: World) -> None:
    assert meta_world.graph is not None
    url = meta_world.url(META_PATH)
    good = {"hub.mode": "subscribe", "hub.verify_token": meta_world.graph.verify_token}
    async with meta_world.http.get(url, params={**good, "hub.challenge": "1158201444"}) as r:
        assert r.status == 200 and await r.text() == "1158201444"
    wrong = {**good, "hub.verify_token": "guess", "hub.challenge": "1"}
    async with meta_world.http.get(url, params=wrong) as r:
        assert r.status == 403 and "1" not in await r.text()
    async with meta_world.http.get(
        url, params={**good, "hub.mode": "x", "hub.challenge": "2"}
    ) as r:
        assert r.status == 403


async def test_a_long_reply_is_split_at_4096_on_block_boundaries(meta_world: World) -> None:
    paragraphs = [f"Paragraph {i}. " + "word " * 150 for i in range(12)]  # ~9,300 chars
    long_text = "\n\n".join(paragraphs)
    meta_world.agent.script = [TextEvent(long_text), FinishedEvent(ok=True, exit_code=0)]
    await meta_world.say("write a lot")
    await graph_text(meta_world, "Paragraph 11.")
    chunks = [t for t in texts(meta_world) if "Paragraph" in t]
    assert len(chunks) >= 3 and all(len(c) <= 4096 for c in chunks)
    # Cut between paragraphs, never inside one; nothing lost, nothing repeated.
    joined = "\n\n".join(chunks)
    assert [p.strip() for p in joined.split("\n\n")] == [p.strip() for p in paragraphs]


async def test_confirm_by_button_for_the_requester_only(meta_world: World) -> None:
    graph = meta_world.graph
    assert graph is not None
    await meta_world.say("wipe cache")
    prompt = await graph_text(meta_world, "Wipe cache?")
    assert prompt["type"] == "interactive"
    buttons = prompt["interactive"]["action"]["buttons"]
    confirm = next(b["reply"] for b in buttons if b["reply"]["title"] == "Confirm")
    # Bob (an operator) presses a forged copy of the button in his own chat: refused there.
    await meta_world.meta(graph.button_reply(confirm["id"], "Confirm", wa_id=BOB))
    refusal = await graph_text(meta_world, "no longer open")
    assert refusal["to"] == BOB
    assert meta_world.wiped == []
    await meta_world.meta(graph.button_reply(confirm["id"], "Confirm", wa_id=EVE))
    await graph_text(meta_world, "not allowed")
    assert meta_world.wiped == []
    await meta_world.meta(graph.button_reply(confirm["id"], "Confirm", wa_id=ALICE))
    await graph_text(meta_world, "wiped cache")
    assert meta_world.wiped == ["cache"]


async def test_a_closed_24h_window_is_recorded_once_and_not_retried(meta_world: World) -> None:
    graph = meta_world.graph
    assert graph is not None
    meta_world.agent.script = [
        TextEvent("first paragraph"),
        TextEvent("second paragraph"),
        FinishedEvent(ok=True, exit_code=0),
    ]
    graph.fail_next(status=400, code=131047, message="Re-engagement message", times=10)
    await meta_world.say("do it")
    # Every reply of the run is refused (read receipts too); wait for the run to end.
    await graph.wait_for(lambda c: c.error_code == 131047 and c.kind == "text", count=2)
    dispatcher, store = meta_world.bot.dispatcher, meta_world.bot.store
    assert dispatcher is not None and store is not None
    await asyncio.wait_for(dispatcher.drain(), 10)
    (run,) = await store.runs_recent(limit=1)
    events = [e for e in await store.run_events(run.id) if e[1] == "undelivered"]
    assert len(events) == 1 and "24-hour" in events[0][2]
    assert meta_world.bot.engine is not None
    _, output = await meta_world.bot.engine.run_details(run.id)  # what `run <id>` shows
    assert any("24-hour" in line for line in output)
    sends = [c for c in graph.calls if c.kind == "text"]
    assert len(sends) >= 2 and all(c.error_code == 131047 for c in sends)
    bodies = [c.body["text"]["body"] for c in sends]
    assert len(bodies) == len(set(bodies)), "a refused reply is never retried"


async def test_twilio_signed_webhook_is_answered_in_1600_char_segments(
    twilio_world: World,
) -> None:
    twilio = twilio_world.twilio
    assert twilio is not None
    response = await twilio_world.twilio_post(twilio.inbound("whoami", from_=f"whatsapp:+{ALICE}"))
    assert response.status == 200
    (reply,) = await twilio.wait_for()
    assert reply.form["To"] == f"whatsapp:+{ALICE}" and reply.form["From"] == twilio.from_number
    assert "whatsapp:+15550001111" in reply.form["Body"]
    long_text = "\n\n".join(f"Step {i}: " + "go " * 100 for i in range(12))  # ~3,800 chars
    twilio_world.agent.script = [TextEvent(long_text), FinishedEvent(ok=True, exit_code=0)]
    await twilio_world.twilio_post(twilio.inbound("explain", from_=f"whatsapp:+{ALICE}"))
    await twilio.wait_for(lambda c: "Step 11" in c.form.get("Body", ""))
    segments = [c.form["Body"] for c in twilio.messages() if "Step" in c.form["Body"]]
    assert len(segments) >= 3 and all(len(s) <= 1600 for s in segments)


async def test_twilio_bad_signatures_are_refused(twilio_world: World) -> None:
    twilio = twilio_world.twilio
    assert twilio is not None
    fields = twilio.inbound("wipe all", from_=f"whatsapp:+{ALICE}")
    assert (await twilio_world.twilio_post(fields, signed=False)).status == 403
    wrong_url = await twilio_world.twilio_post(
        fields, url="https://evil.example.org/whatsapp/twilio"
    )
    assert wrong_url.status == 403
    tampered = dict(fields)
    headers = twilio.sign(PUBLIC + TWILIO_PATH, fields)
    tampered["Body"] = "something else"
    async with twilio_world.http.post(
        twilio_world.url(TWILIO_PATH), data=tampered, headers=headers
    ) as r:
        assert r.status == 403
    assert twilio.messages() == [] and twilio_world.wiped == []
    assert "wipe all" not in twilio_world.rows()


async def test_twilio_forwarded_headers_when_allowed(tmp_path: Path) -> None:
    from fakes.wa_world import _world, twilio_settings
    from fakes.whatsapp_api import FakeTwilio

    async with FakeTwilio() as twilio:
        settings = twilio_settings(twilio, tmp_path / "d", trust_forwarded_headers=True)
        async for world in _world(settings, twilio=twilio):
            fields = twilio.inbound("whoami", from_=f"whatsapp:+{ALICE}")
            seen_at = "https://proxy.example.net" + TWILIO_PATH
            headers = {
                **twilio.sign(seen_at, fields),
                "X-Forwarded-Proto": "https",
                "X-Forwarded-Host": "proxy.example.net",
            }
            async with world.http.post(world.url(TWILIO_PATH), data=fields, headers=headers) as r:
                assert r.status == 200
            await twilio.wait_for(lambda c: "whatsapp:+15550001111" in c.form.get("Body", ""))


async def test_unknown_numbers_never_execute(meta_world: World) -> None:
    await meta_world.say("wipe cache", wa_id=EVE)
    await graph_text(meta_world, "not allowed")
    assert meta_world.wiped == [] and meta_world.agent.runs == []


async def test_secrets_appear_in_no_log_row_or_reply(
    meta_world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    graph = meta_world.graph
    assert graph is not None
    graph.fail_next(status=500, code=1, message="temporary", times=1)
    await meta_world.say("whoami")
    await graph_text(meta_world, "whatsapp:+15550001111")
    await meta_world.say("hello agent")
    await graph_text(meta_world, "echo: hello agent")
    logs = "\n".join(r.getMessage() for r in caplog.records)
    replies = json.dumps([c.body for c in graph.calls])
    rows = meta_world.rows()
    for secret in (graph.app_secret, graph.access_token, graph.verify_token):
        assert secret not in logs and secret not in rows and secret not in replies


async def test_twilio_auth_token_appears_in_no_log_row_or_reply(
    twilio_world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    twilio = twilio_world.twilio
    assert twilio is not None
    await twilio_world.twilio_post(twilio.inbound("whoami", from_=f"whatsapp:+{ALICE}"))
    await twilio.wait_for()
    logs = "\n".join(r.getMessage() for r in caplog.records)
    assert twilio.auth_token not in logs
    assert twilio.auth_token not in twilio_world.rows()
    assert twilio.auth_token not in json.dumps([c.form for c in twilio.calls])


def test_each_provider_refuses_to_start_without_its_secrets(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    for body, keys in (
        ('provider = "meta"\n', ["verify_token", "app_secret", "access_token", "phone_number_id"]),
        ('provider = "twilio"\n', ["account_sid", "auth_token", "from_number"]),
    ):
        config.write_text("[transports.whatsapp]\nenabled = true\n" + body)
        with pytest.raises(ConfigError) as err:
            load_settings(config)
        for key in keys:
            assert key in str(err.value)


def test_twilio_signature_matches_the_documented_algorithm() -> None:
    # Twilio's own example (webhook security docs): URL, sorted params, HMAC-SHA1, base64.
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+12349013030",
        "Digits": "1234",
        "From": "+12349013030",
        "To": "+18005551212",
    }
    assert twilio_signature(url, params, "12345") == "0/KCTR6DLpKmkAf8muzZqo1nDgQ="


async def test_doctor_prints_the_callback_url(tmp_path: Path) -> None:
    from podbay.config import Settings
    from podbay.transports.plugins import discover

    plugin = discover()["whatsapp"]
    assert plugin.doctor is not None
    for provider, path, extra in (
        ("meta", META_PATH, {"verify_token": "v", "app_secret": "a", "access_token": "t",
                              "phone_number_id": "1"}),
        ("twilio", TWILIO_PATH, {"account_sid": "AC1", "auth_token": "t",
                                 "from_number": "whatsapp:+15550100"}),
    ):  # fmt: skip
        settings = Settings(
            data_dir=tmp_path,
            http={"public_url": PUBLIC},
            transports={"whatsapp": {"enabled": True, "provider": provider, **extra}},
        )
        report = await plugin.doctor(settings, settings.transport_config("whatsapp"))
        assert any(f"{PUBLIC}{path}" in note for note in report.notes)
        assert report.problems == []


async def test_non_ascii_signatures_and_tokens_are_refused_not_errors(meta_world: World) -> None:
    assert meta_world.graph is not None
    payload = meta_world.graph.text_message("whoami")
    assert (await meta_world.meta(payload, signature="sha256=é" + "0" * 63)).status == 401
    params = {"hub.mode": "subscribe", "hub.verify_token": "jeton-é", "hub.challenge": "7"}
    async with meta_world.http.get(meta_world.url(META_PATH), params=params) as r:
        assert r.status == 403


async def test_a_non_ascii_twilio_signature_is_refused(twilio_world: World) -> None:
    assert twilio_world.twilio is not None
    fields = twilio_world.twilio.inbound("whoami", from_=f"whatsapp:+{ALICE}")
    headers = {"X-Twilio-Signature": "sïgnature"}
    async with twilio_world.http.post(
        twilio_world.url(TWILIO_PATH), data=fields, headers=headers
    ) as r:
        assert r.status == 403
