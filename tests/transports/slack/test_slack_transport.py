"""The Slack transport against the fake Slack, over HTTP (signed requests to podbay's real
/slack/events) and Socket Mode (envelopes from the fake's WebSocket server)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
from pathlib import Path

import pytest
from fakes.slack_world import ALICE, BOB, EVE, World, block_actions, message_event
from pydantic import SecretStr

from podbay.config import Settings
from podbay.errors import ConfigError
from podbay.transports.slack import WORKING_REACTION, plain_text


def posted(world: World, fragment: str, method: str = "chat.postMessage") -> list[dict]:
    return [
        c.args
        for c in world.fake.calls_to(method)
        if not c.failed and fragment in json.dumps(c.args)
    ]


async def reply_with(world: World, fragment: str, method: str = "chat.postMessage") -> dict:
    calls = await world.fake.wait_for(
        method, lambda c: not c.failed and fragment in json.dumps(c.args)
    )
    return calls[0].args


async def test_slash_command_is_acked_and_answered_in_the_channel_as_mrkdwn(
    slack_world: World,
) -> None:
    assert await slack_world.command("help") == 200
    reply = await reply_with(slack_world, "new project")
    assert reply["channel"] == "C0001"
    section = reply["blocks"][0]
    assert section["type"] == "section" and section["text"]["type"] == "mrkdwn"
    # Markdown `code` stays code, **bold** becomes Slack's *bold*: mrkdwn, not Markdown.
    assert "**" not in reply["text"]
    assert all(len(b["text"]["text"]) <= 3000 for b in reply["blocks"] if b["type"] == "section")


async def test_a_mention_in_a_thread_is_answered_in_that_thread(slack_world: World) -> None:
    event = message_event("<@UPODBAY> whoami", thread_ts="1699999999.000100")
    await slack_world.event(event)
    reply = await reply_with(slack_world, "slack:UALICE")
    assert reply["thread_ts"] == "1699999999.000100"
    assert reply["channel"] == "C0001"


async def test_a_dm_drives_the_agent_without_a_mention_and_shows_it_is_working(
    slack_world: World,
) -> None:
    slack_world.agent.auto_release = None  # hold the run: the reaction must be there meanwhile
    event = message_event("fix the tests", channel="D0001", channel_type="im", kind="message")
    await slack_world.event(event)
    run = await slack_world.agent.next_started()
    assert run.request.prompt == "fix the tests"
    await slack_world.fake.wait_for("reactions.add")
    assert slack_world.fake.reactions_on("D0001", event["ts"]) == {WORKING_REACTION}
    run.release.set()
    reply = await reply_with(slack_world, "echo: fix the tests")
    assert reply["channel"] == "D0001" and "thread_ts" not in reply
    await slack_world.fake.wait_for("reactions.remove")
    assert slack_world.fake.reactions_on("D0001", event["ts"]) == set()


async def test_channel_chatter_without_a_mention_runs_nothing(slack_world: World) -> None:
    # A channel message without a mention is not for podbay (and arrives only as `message`).
    await slack_world.event(message_event("lunch?", kind="message"))
    await slack_world.event(message_event("<@UPODBAY> whoami"))
    await reply_with(slack_world, "slack:UALICE")
    assert slack_world.agent.runs == []


async def test_bad_signatures_are_refused_and_nothing_executes(slack_world: World) -> None:
    payload = slack_world.fake.slash_command("new project evil")
    body = urllib.parse.urlencode(payload).encode()
    form = "application/x-www-form-urlencoded"
    tampered = slack_world.fake.sign(body.replace(b"evil", b"good"))
    stale = slack_world.fake.sign(body, timestamp=int(time.time()) - 301)
    wrong_key = slack_world.fake.sign(body, secret="not-the-signing-secret")
    for headers in (tampered, stale, wrong_key):
        response = await slack_world.post(body, form, headers=headers)
        assert response.status == 401
    response = await slack_world.post(body, form, signed=False)
    assert response.status == 401
    big = b"x" * (slack_world.bot.settings.http.max_body_bytes + 1)
    response = await slack_world.post(big, form)
    assert response.status == 413
    # A good request afterwards is answered: the refused ones left nothing queued before it.
    assert await slack_world.command("whoami") == 200
    await reply_with(slack_world, "slack:UALICE")
    assert not posted(slack_world, "evil")
    assert "evil" not in slack_world.rows()


async def test_a_retried_event_executes_once_and_bots_are_ignored(slack_world: World) -> None:
    event = message_event("ship it", channel="D0002", channel_type="im", kind="message")
    envelope = await slack_world.event(event)
    assert await slack_world.deliver_event(envelope, retry=1) == 200
    # The same message again as app_mention (Slack sends both for a DM mention): still once.
    await slack_world.event({**event, "type": "app_mention"})
    bot_says = message_event(
        "I am a bot", channel="D0002", channel_type="im", kind="message", bot_id="B999"
    )
    own = message_event("echo", channel="D0002", channel_type="im", kind="message", user="UPODBAY")
    edited = message_event(
        "edited", channel="D0002", channel_type="im", kind="message", subtype="message_changed"
    )
    for ignored in (bot_says, own, edited):
        await slack_world.event(ignored)
    await slack_world.event(
        message_event("last one", channel="D0002", channel_type="im", kind="message")
    )
    await reply_with(slack_world, "last one")
    prompts = [r.request.prompt for r in slack_world.agent.runs]
    assert "\n\n".join(prompts).split("\n\n") == ["ship it", "last one"]


async def test_a_slash_command_is_acked_while_an_agent_run_is_busy(slack_world: World) -> None:
    slack_world.agent.auto_release = None
    await slack_world.event(message_event("<@UPODBAY> think hard"))
    run = await slack_world.agent.next_started()
    # Slack gives up on an ack after 3 s: the command's request must come back within that
    # while the run in the same channel still holds its lane.
    assert await slack_world.command("status") == 200
    assert not run.done
    await reply_with(slack_world, "Projects")
    run.release.set()
    await reply_with(slack_world, "echo: think hard")


async def test_confirm_by_button_works_for_the_requester_only(slack_world: World) -> None:
    await slack_world.command("wipe cache")
    prompt_call = (
        await slack_world.fake.wait_for(
            "chat.postMessage", lambda c: "Wipe cache?" in json.dumps(c.args)
        )
    )[0]
    assert prompt_call.response is not None
    prompt = prompt_call.response
    assert any(b["type"] == "actions" for b in prompt["message"]["blocks"])
    # Bob is an operator but not the requester; Eve is not in [access] at all.
    await slack_world.click(block_actions(slack_world.fake, prompt, "confirm", user=BOB))
    refusal = await reply_with(slack_world, "Only slack:UALICE can confirm", "chat.postEphemeral")
    assert refusal["user"] == BOB
    await slack_world.click(block_actions(slack_world.fake, prompt, "confirm", user=EVE))
    await reply_with(slack_world, "not allowed", "chat.postMessage")
    assert slack_world.wiped == []
    await slack_world.click(block_actions(slack_world.fake, prompt, "confirm", user=ALICE))
    await reply_with(slack_world, "wiped cache")
    assert slack_world.wiped == ["cache"]
    # The buttons are gone: the prompt now says what was decided.
    await slack_world.fake.wait_for("chat.update")
    updated = slack_world.fake.message("C0001", prompt["ts"])
    assert "Confirmed by" in json.dumps(updated)
    assert not any(b["type"] == "actions" for b in updated.get("blocks", []))
    # A second click on the old prompt decides nothing more.
    await slack_world.click(block_actions(slack_world.fake, prompt, "confirm", user=ALICE))
    await reply_with(slack_world, "no longer open", "chat.postEphemeral")
    assert slack_world.wiped == ["cache"]


async def test_long_output_is_uploaded_as_a_file(slack_world: World) -> None:
    from podbay.engine.agents import FinishedEvent, TextEvent

    long_text = "\n".join(f"line {i}: " + "x" * 60 for i in range(400))  # ~27,000 chars
    slack_world.agent.script = [TextEvent(long_text), FinishedEvent(ok=True, exit_code=0)]
    await slack_world.event(message_event("<@UPODBAY> dump it", thread_ts="1699999999.000300"))
    (complete,) = await slack_world.fake.wait_for("files.completeUploadExternal")
    (got_url,) = slack_world.fake.calls_to("files.getUploadURLExternal")
    (upload,) = slack_world.fake.calls_to("upload")
    assert upload.target == complete.args["files"][0]["id"]
    assert slack_world.fake.uploaded(upload.target).decode() == long_text
    assert int(got_url.args["length"]) == len(long_text.encode())
    assert complete.args["channel_id"] == "C0001"
    assert complete.args["thread_ts"] == "1699999999.000300"
    assert "attached file" in complete.args["initial_comment"]
    assert not posted(slack_world, "line 399")  # not also pasted as messages


async def test_a_429_is_retried_after_retry_after_and_sent_once(slack_world: World) -> None:
    slack_world.fake.fail_next("chat.postMessage", status=429, retry_after=1)
    assert await slack_world.command("whoami") == 200
    await reply_with(slack_world, "slack:UALICE")
    first, second = slack_world.fake.calls_to("chat.postMessage")
    assert first.failed and first.error == "ratelimited" and not second.failed
    assert second.at - first.at >= 1.0  # Retry-After: 1 was honoured
    await slack_world.command("status")
    await reply_with(slack_world, "Projects")
    answered = [c for c in slack_world.fake.calls_to("chat.postMessage") if not c.failed]
    assert len([c for c in answered if "slack:UALICE" in json.dumps(c.args)]) == 1


async def test_not_in_channel_falls_back_to_the_response_url(slack_world: World) -> None:
    slack_world.fake.set_channel_members("C0009", [ALICE])  # the bot is not a member
    assert await slack_world.command("whoami", channel="C0009") == 200
    (answer,) = await slack_world.fake.wait_for("response_url")
    assert "slack:UALICE" in answer.args["text"]
    assert answer.args["response_type"] == "in_channel"


async def test_errors_meant_for_the_requester_are_ephemeral(slack_world: World) -> None:
    await slack_world.command("use nosuchproject", user=BOB)
    refusal = await reply_with(slack_world, "nosuchproject", "chat.postEphemeral")
    assert refusal["user"] == BOB and refusal["channel"] == "C0001"
    assert not posted(slack_world, "nosuchproject")


async def test_tokens_and_signing_secret_never_appear_in_logs_rows_or_replies(
    slack_world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake = slack_world.fake
    slack_world.fake.fail_next("chat.postMessage", error="channel_not_found")
    await slack_world.command("whoami")
    await slack_world.event(message_event("<@UPODBAY> hello"))
    await reply_with(slack_world, "echo: hello")
    await slack_world.command("status")
    await reply_with(slack_world, "Projects")
    secrets_ = [fake.bot_token, fake.signing_secret, fake.app_token]
    log_text = "\n".join(r.getMessage() for r in caplog.records)
    log_file = slack_world.data_dir / "podbay.log"
    if log_file.exists():
        log_text += log_file.read_text()
    replies = json.dumps([c.args for c in fake.calls])
    rows = slack_world.rows()
    for secret in secrets_:
        assert secret not in log_text
        assert secret not in rows
        assert secret not in replies
    assert "chat.postMessage failed: channel_not_found" in log_text


async def test_socket_mode_flows_with_every_envelope_acked(socket_world: World) -> None:
    fake = socket_world.fake
    await asyncio.wait_for(fake.socket_connected.wait(), 10)
    ack = await fake.send_envelope("slash_commands", fake.slash_command("whoami"))
    assert "envelope_id" in ack
    await reply_with(socket_world, "slack:UALICE")
    mention = message_event("<@UPODBAY> do it", thread_ts="1699999999.000200")
    await fake.send_envelope("events_api", fake.event_callback(mention))
    reply = await reply_with(socket_world, "echo: do it")
    assert reply["thread_ts"] == "1699999999.000200"
    await fake.send_envelope("slash_commands", fake.slash_command("wipe logs"))
    prompt_call = (
        await fake.wait_for("chat.postMessage", lambda c: "Wipe logs?" in json.dumps(c.args))
    )[0]
    assert prompt_call.response is not None
    click = block_actions(fake, prompt_call.response, "confirm", user=ALICE)
    await fake.send_envelope("interactive", click)
    await reply_with(socket_world, "wiped logs")
    assert socket_world.wiped == ["logs"]
    assert fake.unacked == set()


def test_each_mode_refuses_to_start_without_its_secret(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from podbay.config import load_settings

    base = '[transports.slack]\nenabled = true\nbot_token = "xoxb-1"\n'
    for extra, key in (("", "signing_secret"), ('mode = "socket"\n', "app_token")):
        config = tmp_path / "config.toml"
        config.write_text(base + extra)
        with pytest.raises(ConfigError) as err:
            load_settings(config)
        assert key in str(err.value) and "transports.slack" in str(err.value)
    with pytest.raises(ValidationError):
        Settings(transports={"slack": {"enabled": True, "signing_secret": "s"}})


def test_slack_markup_becomes_what_the_user_typed() -> None:
    text = "<@UPODBAY> new project demo --git <https://github.com/a/b.git> &lt;x&gt; &amp;"
    assert plain_text(text, "UPODBAY") == "new project demo --git https://github.com/a/b.git <x> &"
    assert plain_text("ask <@U1|bob> in <#C1|general>", "UPODBAY") == "ask @bob in #general"
    assert plain_text("see <http://github.com|github.com>") == "see github.com"
    assert plain_text("<mailto:git@example.org|git@example.org>:a/b") == "git@example.org:a/b"


async def test_doctor_checks_the_token_and_prints_the_request_url(tmp_path: Path) -> None:
    from fakes.slack_api import FakeSlack

    from podbay.transports.plugins import discover

    plugin = discover()["slack"]
    assert plugin.doctor is not None
    async with FakeSlack() as fake:
        settings = Settings(
            data_dir=tmp_path,
            http={"public_url": "https://bot.example.org"},
            transports={
                "slack": {
                    "enabled": True,
                    "bot_token": fake.bot_token,
                    "signing_secret": "s",
                    "api_base_url": fake.base_url,
                }
            },
        )
        report = await plugin.doctor(settings, settings.transport_config("slack"))
        assert report.problems == []
        assert any("https://bot.example.org/slack/events" in n for n in report.notes)
        wrong = settings.transport_config("slack").model_copy(
            update={"bot_token": SecretStr("xoxb-wrong")}
        )
        report = await plugin.doctor(settings, wrong)
        assert any("rejects the bot token" in p for p, _ in report.problems)


async def test_tool_progress_edits_one_message_and_the_last_edit_lands(
    slack_world: World,
) -> None:
    from podbay.engine.agents import FinishedEvent, TextEvent, ToolEvent

    tools = [ToolEvent("Bash", f"🔧 step {i}", "") for i in range(1, 8)]
    slack_world.agent.script = [*tools, TextEvent("all done"), FinishedEvent(ok=True)]
    await slack_world.event(message_event("<@UPODBAY> please build it"))
    await reply_with(slack_world, "all done")
    progress = posted(slack_world, "step 1")
    assert len(progress) == 1, "tool lines go into one message"
    (first,) = [c for c in slack_world.fake.calls_to("chat.postMessage") if "step 1" in str(c.args)]
    assert first.response is not None
    ts = first.response["ts"]
    # Edits of that message (throttled): whichever were coalesced, the last one shows step 7.
    await slack_world.fake.wait_for(
        "chat.update", lambda c: c.args["ts"] == ts and "step 7" in json.dumps(c.args)
    )
    assert "step 7" in json.dumps(slack_world.fake.message("C0001", ts))
    assert not posted(slack_world, "step 7")  # never posted as a message of its own
    updates = [c for c in slack_world.fake.calls_to("chat.update") if c.args["ts"] == ts]
    assert len(updates) < len(tools)


async def test_server_errors_are_retried_and_the_reply_is_sent_once(slack_world: World) -> None:
    slack_world.fake.fail_next("chat.postMessage", status=503, times=2)
    assert await slack_world.command("whoami") == 200
    await reply_with(slack_world, "slack:UALICE")
    attempts = slack_world.fake.calls_to("chat.postMessage")
    assert [c.failed for c in attempts] == [True, True, False]


async def test_a_reply_longer_than_a_section_is_split_into_sections(slack_world: World) -> None:
    from podbay.engine.agents import FinishedEvent, TextEvent

    paragraphs = [f"Paragraph {i}: " + "word " * 100 for i in range(16)]  # ~8,500 chars
    slack_world.agent.script = [TextEvent("\n\n".join(paragraphs)), FinishedEvent(ok=True)]
    await slack_world.event(message_event("<@UPODBAY> explain"))
    reply = await reply_with(slack_world, "Paragraph 15:")
    sections = [b["text"]["text"] for b in reply["blocks"] if b["type"] == "section"]
    assert len(sections) >= 3 and all(len(t) <= 3000 for t in sections)
    joined = "\n\n".join(sections)
    assert all(f"Paragraph {i}:" in joined for i in range(16))
    assert not slack_world.fake.calls_to("files.completeUploadExternal")  # under 12,000
