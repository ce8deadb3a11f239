"""The fake Slack platform (tests/fakes/slack_api.py) against the real slack_sdk and slack_bolt.

If these pass, a Slack transport test failing against the fake is about podbay, not about
the fake misreading what slack_sdk sends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from fakes.slack_api import FakeSlack
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_sdk.errors import SlackApiError, SlackRequestError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # slack_sdk routes through an HTTP(S)_PROXY from the environment; traffic stays local.
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    async with FakeSlack() as server:
        yield server


def client_for(fake: FakeSlack, token: str | None = None, **kwargs: Any) -> AsyncWebClient:
    return AsyncWebClient(token=token or fake.bot_token, base_url=fake.base_url, **kwargs)


async def slack_error(call: Awaitable[Any]) -> str:
    with pytest.raises(SlackApiError) as raised:
        await call
    return str(raised.value.response["error"])


async def test_post_update_and_thread_roundtrip(fake: FakeSlack) -> None:
    client = client_for(fake)
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "*hi*"}}]
    first = await client.chat_postMessage(channel="C1", text="hi", blocks=blocks)
    reply = await client.chat_postMessage(channel="C1", text="in thread", thread_ts=first["ts"])
    assert float(reply["ts"]) > float(first["ts"])
    assert reply["message"]["thread_ts"] == first["ts"]
    assert first["message"]["bot_id"] == fake.bot_id

    [post, _] = fake.calls_to("chat.postMessage")
    assert post.args["blocks"] == blocks and post.token == fake.bot_token and not post.failed

    updated = await client.chat_update(channel="C1", ts=first["ts"], text="bye")
    assert updated["ts"] == first["ts"]
    assert fake.message("C1", first["ts"])["text"] == "bye"
    assert await slack_error(client.chat_update(channel="C1", ts="1.000001", text="x")) == (
        "message_not_found"
    )
    assert await slack_error(client.chat_update(channel="C2", ts=first["ts"], text="x")) == (
        "message_not_found"
    )


async def test_post_message_validation(fake: FakeSlack) -> None:
    client = client_for(fake)
    section = {"type": "section", "text": {"type": "mrkdwn", "text": "x"}}
    long_section = {"type": "section", "text": {"type": "mrkdwn", "text": "x" * 3001}}
    assert await slack_error(client.chat_postMessage(channel="", text="hi")) == (
        "channel_not_found"
    )
    with pytest.warns(UserWarning):  # slack_sdk itself warns about a missing text
        assert await slack_error(client.chat_postMessage(channel="C1")) == "no_text"
    assert await slack_error(client.chat_postMessage(channel="C1", text="x" * 40_001)) == (
        "msg_too_long"
    )
    too_many = [section] * 51
    assert await slack_error(client.chat_postMessage(channel="C1", text="t", blocks=too_many)) == (
        "invalid_blocks"
    )
    assert await slack_error(
        client.chat_postMessage(channel="C1", text="t", blocks=[long_section])
    ) == ("invalid_blocks")
    await client.chat_postMessage(channel="C1", text="x" * 40_000, blocks=[section] * 50)

    fake.set_channel_members("C9", ["UALICE"])
    assert await slack_error(client.chat_postMessage(channel="C9", text="hi")) == "not_in_channel"
    failed = [c for c in fake.calls_to("chat.postMessage") if c.failed]
    assert len(failed) == 6 and failed[-1].error == "not_in_channel"


async def test_tokens_are_checked(fake: FakeSlack) -> None:
    assert await slack_error(client_for(fake, "xoxb-wrong").auth_test()) == "invalid_auth"
    assert await slack_error(AsyncWebClient(base_url=fake.base_url).auth_test()) == "not_authed"
    app_client = client_for(fake, fake.app_token)
    assert await slack_error(app_client.chat_postMessage(channel="C1", text="x")) == (
        "not_allowed_token_type"
    )
    bot = client_for(fake)
    assert await slack_error(bot.apps_connections_open(app_token=fake.bot_token)) == (
        "not_allowed_token_type"
    )
    assert await slack_error(bot.api_call("chat.frobnicate")) == "unknown_method"
    auth = await bot.auth_test()
    assert (auth["user_id"], auth["bot_id"], auth["team_id"]) == ("UPODBAY", "BPODBAY", "TFAKE")


async def test_ephemeral_reactions_users_and_conversations(fake: FakeSlack) -> None:
    client = client_for(fake)
    ephemeral = await client.chat_postEphemeral(channel="C1", user="UALICE", text="psst")
    assert ephemeral["message_ts"]
    fake.set_channel_members("C2", [fake.bot_user_id])
    assert await slack_error(client.chat_postEphemeral(channel="C2", user="UBOB", text="x")) == (
        "user_not_in_channel"
    )

    await client.reactions_add(channel="C1", timestamp="1700000000.000100", name="eyes")
    assert await slack_error(
        client.reactions_add(channel="C1", timestamp="1700000000.000100", name="eyes")
    ) == ("already_reacted")
    assert fake.reactions_on("C1", "1700000000.000100") == {"eyes"}
    await client.reactions_remove(channel="C1", timestamp="1700000000.000100", name="eyes")
    assert await slack_error(
        client.reactions_remove(channel="C1", timestamp="1700000000.000100", name="eyes")
    ) == ("no_reaction")
    # reactions.* travel as query parameters on a POST; the fake reads them there.
    assert fake.calls_to("reactions.add")[0].args["name"] == "eyes"

    fake.add_user("UALICE", "alice", real_name="Alice A", display_name="ali")
    user = (await client.users_info(user="UALICE"))["user"]
    assert (user["name"], user["real_name"], user["profile"]["display_name"]) == (
        "alice",
        "Alice A",
        "ali",
    )
    assert (await client.conversations_info(channel="D123"))["channel"]["is_im"] is True
    assert (await client.conversations_info(channel="C123"))["channel"]["is_im"] is False


async def test_injected_errors_and_server_failures(fake: FakeSlack) -> None:
    client = client_for(fake)
    fake.fail_next("chat.postMessage", error="not_in_channel")
    assert await slack_error(client.chat_postMessage(channel="C1", text="x")) == "not_in_channel"
    fake.fail_next("chat.postMessage", status=500)
    with pytest.raises(SlackApiError) as raised:
        await client.chat_postMessage(channel="C1", text="x")
    assert raised.value.response.status_code == 500
    await client.chat_postMessage(channel="C1", text="x")  # the failures were used up
    assert [c.failed for c in fake.calls_to("chat.postMessage")] == [True, True, False]


async def test_rate_limit_is_retried_after_retry_after(fake: FakeSlack) -> None:
    client = client_for(fake, retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=1)])
    fake.fail_next("chat.postMessage", status=429, retry_after=1)
    response = await client.chat_postMessage(channel="C1", text="eventually")
    assert response["ok"] is True
    first, second = fake.calls_to("chat.postMessage")
    assert (first.failed, first.error, second.failed) == (True, "ratelimited", False)
    assert second.at - first.at >= 1.0  # slack_sdk honoured Retry-After


async def test_files_upload_v2(fake: FakeSlack) -> None:
    client = client_for(fake)
    content = b"line one\nline two\n" * 100
    result = await client.files_upload_v2(
        filename="log.txt", content=content, channel="C1", thread_ts="1700000000.000100"
    )
    file_id = result["file"]["id"]
    assert fake.uploaded(file_id) == content
    assert [c.method for c in fake.calls] == [
        "files.getUploadURLExternal",
        "upload",
        "files.completeUploadExternal",
    ]
    announce, upload, complete = fake.calls
    assert announce.args["length"] == str(len(content))
    assert upload.args["content"] == content and upload.token == ""
    assert complete.args["files"] == [{"id": file_id, "title": "log.txt"}]
    assert (complete.args["channel_id"], complete.args["thread_ts"]) == ("C1", "1700000000.000100")

    assert await slack_error(client.files_completeUploadExternal(files=[{"id": "FNOPE"}])) == (
        "file_not_found"
    )
    fake.fail_next("upload", status=500)
    with pytest.raises(SlackRequestError, match="Failed to upload"):
        await client.files_upload_v2(filename="b.txt", content=b"x", channel="C1")
    # The announced file was never uploaded: completing it is refused.
    announced = fake.calls_to("files.getUploadURLExternal")[-1]
    assert announced.args["filename"] == "b.txt" and announced.response is not None
    never_uploaded = [{"id": announced.response["file_id"]}]
    assert await slack_error(client.files_completeUploadExternal(files=never_uploaded)) == (
        "file_not_found"
    )


async def test_wait_for_and_its_timeout_message(fake: FakeSlack) -> None:
    client = client_for(fake)
    waiter = asyncio.create_task(
        fake.wait_for("chat.postMessage", lambda c: c.args.get("text") == "two", timeout=5)
    )
    await client.chat_postMessage(channel="C1", text="one")
    await client.chat_postMessage(channel="C1", text="two")
    [call] = await waiter
    assert call.args["text"] == "two"
    with pytest.raises(TimeoutError, match=r"0 of 1 matching chat.update.*chat.postMessage"):
        await fake.wait_for("chat.update", timeout=0.2)


async def test_response_url_and_signature(fake: FakeSlack) -> None:
    # Bolt's respond() posts to the response_url with slack_sdk's webhook client.
    webhook = AsyncWebhookClient(fake.response_url("cmd7"))
    sent = await webhook.send_dict({"text": "done", "response_type": "in_channel"})
    assert sent.status_code == 200
    [call] = await fake.wait_for("response_url")
    assert call.target == "cmd7" and call.args == {"text": "done", "response_type": "in_channel"}

    body = b"token=x&command=%2Fpodbay&text=hi"
    headers = fake.sign(body)
    verifier = SignatureVerifier(fake.signing_secret)
    assert verifier.is_valid_request(body, headers)
    assert not verifier.is_valid_request(body, fake.sign(body, secret="other"))


async def test_socket_mode_slash_command_and_event_are_acked(fake: FakeSlack) -> None:
    app = AsyncApp(
        # Named, as podbay's is: unnamed, bolt walks inspect.stack() on the event loop.
        name="fake-slack-check",
        client=client_for(fake),
        signing_secret=fake.signing_secret,
        request_verification_enabled=False,
    )
    commands: list[str] = []
    mentioned = asyncio.Event()

    async def podbay(ack: Callable[..., Awaitable[None]], command: dict[str, Any]) -> None:
        commands.append(command["text"])
        await ack()

    async def on_mention(event: dict[str, Any]) -> None:
        if event["text"] == "<@UPODBAY> hi":
            mentioned.set()

    app.command("/podbay")(podbay)
    app.event("app_mention")(on_mention)
    handler = AsyncSocketModeHandler(app, fake.app_token)
    try:
        await handler.connect_async()  # type: ignore[no-untyped-call]
        [opened] = fake.calls_to("apps.connections.open")
        assert opened.token == fake.app_token
        ack = await fake.send_envelope("slash_commands", fake.slash_command("status"))
        assert commands == ["status"]
        assert [a["envelope_id"] for a in fake.acks] == [ack["envelope_id"]]

        event = {"type": "app_mention", "user": "UALICE", "text": "<@UPODBAY> hi",
                 "channel": "C1", "ts": "1700000001.000100"}  # fmt: skip
        await fake.send_envelope("events_api", fake.event_callback(event))
        await asyncio.wait_for(mentioned.wait(), 5)

        # No listener for /other: Bolt answers 404 and never acks; the fake says so.
        with pytest.raises(TimeoutError, match="no ack for slash_commands"):
            await fake.send_envelope(
                "slash_commands", fake.slash_command("x", command="/other"), timeout=0.5
            )
        assert len(fake.unacked) == 1 and len(fake.acks) == 2
    finally:
        await handler.close_async()  # type: ignore[no-untyped-call]


async def test_socket_hello_and_ticket(fake: FakeSlack) -> None:
    opened = await client_for(fake, fake.app_token).apps_connections_open(app_token=fake.app_token)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(opened["url"]) as ws:
            hello = await ws.receive_json(timeout=5)
            assert hello["type"] == "hello" and hello["num_connections"] == 1
            assert hello["connection_info"] == {"app_id": "AFAKE"}
            await asyncio.wait_for(fake.socket_connected.wait(), 5)
        forged = opened["url"].split("?")[0] + "?ticket=forged"
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await session.ws_connect(forged)
