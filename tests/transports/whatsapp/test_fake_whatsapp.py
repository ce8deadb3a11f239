"""The fake WhatsApp providers (tests/fakes/whatsapp_api.py), driven by a real aiohttp client.

If these pass, a WhatsApp transport test failing against a fake is about podbay, not about
the fake misreading the Cloud API or Twilio wire format.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from fakes.whatsapp_api import FakeGraph, FakeTwilio


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def graph() -> AsyncIterator[FakeGraph]:
    async with FakeGraph() as server:
        yield server


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilio]:
    async with FakeTwilio() as server:
        yield server


async def post_graph(
    http: aiohttp.ClientSession,
    graph: FakeGraph,
    body: dict[str, Any],
    *,
    token: str = "",
    url: str = "",
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token or graph.access_token}"}
    async with http.post(url or graph.messages_url, json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def post_twilio(
    http: aiohttp.ClientSession, twilio: FakeTwilio, form: dict[str, str], *, password: str = ""
) -> tuple[int, dict[str, Any]]:
    user_pass = f"{twilio.account_sid}:{password or twilio.auth_token}".encode()
    headers = {"Authorization": "Basic " + base64.b64encode(user_pass).decode()}
    async with http.post(twilio.messages_url, data=form, headers=headers) as resp:
        return resp.status, await resp.json()


TO = {"messaging_product": "whatsapp", "to": "15550001111"}


def text(body: str) -> dict[str, Any]:
    return TO | {"type": "text", "text": {"body": body}}


def buttons(body: str = "Approve?", *pairs: tuple[str, str]) -> dict[str, Any]:
    replies = [{"type": "reply", "reply": {"id": i, "title": t}} for i, t in pairs or [("y", "Y")]]
    interactive = {"type": "button", "body": {"text": body}, "action": {"buttons": replies}}
    return TO | {"type": "interactive", "interactive": interactive}


# -- Graph -------------------------------------------------------------------------------


async def test_graph_answers_text_and_buttons_with_distinct_wamids(
    graph: FakeGraph, http: aiohttp.ClientSession
) -> None:
    waiting = asyncio.create_task(graph.wait_for(lambda c: c.kind == "interactive"))
    status, sent = await post_graph(http, graph, text("hello"))
    assert status == 200
    assert sent["contacts"] == [{"input": "15550001111", "wa_id": "15550001111"}]
    status, pressed = await post_graph(http, graph, buttons("Run it?", ("y", "Yes"), ("n", "No")))
    assert status == 200
    [call] = await waiting
    assert call.body["interactive"]["action"]["buttons"][1]["reply"]["title"] == "No"
    ids = [sent["messages"][0]["id"], pressed["messages"][0]["id"]]
    assert all(i.startswith("wamid.") for i in ids) and ids[0] != ids[1]
    assert [c.body["text"]["body"] for c in graph.messages("text")] == ["hello"]
    assert graph.calls[0].token == graph.access_token


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        (text("x" * 4096), True),
        (text("x" * 4097), False),
        (text(""), False),
        (buttons("b" * 1024), True),
        (buttons("b" * 1025), False),
        (buttons("?", ("y", "t" * 20)), True),
        (buttons("?", ("y", "t" * 21)), False),
        (buttons("?", ("i" * 256, "Yes")), True),
        (buttons("?", ("i" * 257, "Yes")), False),
        (buttons("?", ("a", "A"), ("b", "B"), ("c", "C"), ("d", "D")), False),
        (text("hi") | {"messaging_product": "sms"}, False),
        ({"messaging_product": "whatsapp", "type": "text", "text": {"body": "no to"}}, False),
        (text("hi") | {"type": "image"}, False),
        (TO | {"type": "reaction", "reaction": {"message_id": "wamid.1", "emoji": ""}}, True),
    ],
)
async def test_graph_enforces_sizes_and_shapes(
    graph: FakeGraph, http: aiohttp.ClientSession, body: dict[str, Any], ok: bool
) -> None:
    status, answer = await post_graph(http, graph, body)
    assert (status, graph.calls[0].failed) == ((200, False) if ok else (400, True))
    if not ok:
        assert answer["error"]["code"] == 100 == graph.calls[0].error_code
        assert answer["error"]["error_data"]["messaging_product"] == "whatsapp"
        assert graph.messages() == []


async def test_graph_read_receipt_with_typing_indicator(
    graph: FakeGraph, http: aiohttp.ClientSession
) -> None:
    read = {"messaging_product": "whatsapp", "status": "read", "message_id": "wamid.in1"}
    status, answer = await post_graph(http, graph, read | {"typing_indicator": {"type": "text"}})
    assert (status, answer) == (200, {"success": True})
    assert [c.body["message_id"] for c in graph.messages("read")] == ["wamid.in1"]
    status, _ = await post_graph(http, graph, read | {"typing_indicator": {"type": "audio"}})
    assert status == 400


@pytest.mark.parametrize(("status", "code"), [(400, 131047), (429, 130429), (500, 131000)])
async def test_graph_injected_failure_then_recovery(
    graph: FakeGraph, http: aiohttp.ClientSession, status: int, code: int
) -> None:
    graph.fail_next(status=status)
    got, answer = await post_graph(http, graph, text("hi"))
    assert (got, answer["error"]["code"]) == (status, code)
    assert answer["error"]["type"] == "OAuthException" and answer["error"]["fbtrace_id"]
    if code == 131047:
        assert answer["error"]["message"] == "Re-engagement message"
        assert "24 hours" in answer["error"]["error_data"]["details"]
    assert (await post_graph(http, graph, text("hi")))[0] == 200
    assert [c.failed for c in graph.calls] == [True, False]


async def test_graph_refuses_bad_token_and_other_phone_number(
    graph: FakeGraph, http: aiohttp.ClientSession
) -> None:
    status, answer = await post_graph(http, graph, text("hi"), token="EAAG-wrong")
    assert (status, answer["error"]["code"]) == (401, 190)
    async with http.post(graph.messages_url, json=text("hi")) as resp:  # no Authorization
        assert (resp.status, (await resp.json())["error"]["code"]) == (401, 190)
    other = f"{graph.base_url}/{graph.version}/999/messages"
    status, answer = await post_graph(http, graph, text("hi"), url=other)
    assert (status, answer["error"]["code"]) == (400, 100)
    newer = f"{graph.base_url}/v99.0/{graph.phone_number_id}/messages"
    assert (await post_graph(http, graph, text("hi"), url=newer))[0] == 200
    assert [c.error_code for c in graph.calls] == [190, 190, 100, None]


async def test_graph_webhook_payloads_and_signature(graph: FakeGraph) -> None:
    payload = graph.text_message("status", wa_id="15557770000", name="Bob", wamid="wamid.abc")
    assert payload["object"] == "whatsapp_business_account"
    value = payload["entry"][0]["changes"][0]["value"]
    assert value["metadata"]["phone_number_id"] == graph.phone_number_id
    assert value["contacts"] == [{"profile": {"name": "Bob"}, "wa_id": "15557770000"}]
    [message] = value["messages"]
    assert (message["from"], message["id"], message["type"]) == ("15557770000", "wamid.abc", "text")
    assert message["text"] == {"body": "status"} and message["timestamp"].isdigit()

    pressed = graph.button_reply("approve:7", "Approve", context_wamid="wamid.q")
    [message] = pressed["entry"][0]["changes"][0]["value"]["messages"]
    assert message["interactive"] == {
        "type": "button_reply",
        "button_reply": {"id": "approve:7", "title": "Approve"},
    }
    assert message["context"] == {"from": graph.display_phone_number, "id": "wamid.q"}

    value = graph.status_update("wamid.out", "failed")["entry"][0]["changes"][0]["value"]
    assert "messages" not in value and value["statuses"][0]["errors"][0]["code"] == 131047

    raw = json.dumps(payload).encode()
    expected = hmac.new(b"fake-app-secret-0123456789", raw, hashlib.sha256).hexdigest()
    assert graph.sign(raw) == {"X-Hub-Signature-256": f"sha256={expected}"}
    assert graph.sign(raw, "other") != graph.sign(raw)


async def test_wait_for_times_out_naming_what_was_seen(
    graph: FakeGraph, http: aiohttp.ClientSession
) -> None:
    await post_graph(http, graph, text("x" * 5000))
    with pytest.raises(TimeoutError, match=r"0 of 1 .*messages \(100\)"):
        await graph.wait_for(lambda c: not c.failed, timeout=0.2)


# -- Twilio ------------------------------------------------------------------------------


def twilio_text(twilio: FakeTwilio, body: str) -> dict[str, str]:
    return {"To": "whatsapp:+15550001111", "From": twilio.from_number, "Body": body}


async def test_twilio_send_is_queued(twilio: FakeTwilio, http: aiohttp.ClientSession) -> None:
    waiting = asyncio.create_task(twilio.wait_for())
    status, answer = await post_twilio(http, twilio, twilio_text(twilio, "hello"))
    assert status == 201
    assert re.fullmatch(r"SM[0-9a-f]{32}", answer["sid"])
    assert (answer["status"], answer["body"]) == ("queued", "hello")
    assert answer["to"] == "whatsapp:+15550001111"
    assert answer["from"] == twilio.from_number and answer["account_sid"] == twilio.account_sid
    [call] = await waiting
    assert call.form["Body"] == "hello" and call.account_sid == twilio.account_sid
    assert twilio.messages() == [call]


@pytest.mark.parametrize(("length", "status", "code"), [(1600, 201, None), (1601, 400, 21617)])
async def test_twilio_body_limit(
    twilio: FakeTwilio, http: aiohttp.ClientSession, length: int, status: int, code: int | None
) -> None:
    got, answer = await post_twilio(http, twilio, twilio_text(twilio, "x" * length))
    assert (got, answer.get("code"), twilio.calls[0].error_code) == (status, code, code)
    if code:
        assert "1600 character limit" in answer["message"] and answer["status"] == 400


async def test_twilio_refuses_bad_auth_and_other_sender(
    twilio: FakeTwilio, http: aiohttp.ClientSession
) -> None:
    status, answer = await post_twilio(http, twilio, twilio_text(twilio, "hi"), password="nope")
    assert (status, answer["code"], answer["status"]) == (401, 20003, 401)
    assert answer["more_info"] == "https://www.twilio.com/docs/errors/20003"
    async with http.post(twilio.messages_url, data=twilio_text(twilio, "hi")) as resp:
        assert (resp.status, (await resp.json())["code"]) == (401, 20003)
    wrong_from = twilio_text(twilio, "hi") | {"From": "whatsapp:+15550000000"}
    assert (await post_twilio(http, twilio, wrong_from))[0] == 400
    assert [c.error_code for c in twilio.calls] == [20003, 20003, 63007]
    assert twilio.calls[1].account_sid == ""


async def test_twilio_63016_injection_then_recovery(
    twilio: FakeTwilio, http: aiohttp.ClientSession
) -> None:
    twilio.fail_next()
    status, answer = await post_twilio(http, twilio, twilio_text(twilio, "late"))
    assert (status, answer["code"]) == (400, 63016)
    assert "outside the allowed window" in answer["message"]
    assert (await post_twilio(http, twilio, twilio_text(twilio, "late")))[0] == 201
    assert [c.failed for c in twilio.calls] == [True, False]


async def test_twilio_inbound_form_and_signature() -> None:
    twilio = FakeTwilio(auth_token="12345")  # only builds payloads: no server needed
    form = twilio.inbound("Approve", button_payload="approve:7", from_="whatsapp:+15557770000")
    assert form["From"] == "whatsapp:+15557770000" and form["WaId"] == "15557770000"
    assert (form["To"], form["NumMedia"], form["ProfileName"]) == (twilio.from_number, "0", "Alice")
    assert (form["ButtonPayload"], form["ButtonText"]) == ("approve:7", "Approve")
    assert re.fullmatch(r"SM[0-9a-f]{32}", form["MessageSid"])
    assert "ButtonPayload" not in twilio.inbound("hi")

    # The worked example in Twilio's webhook security docs (auth token "12345").
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+12349013030", "Digits": "1234"}
    params |= {"From": "+12349013030", "To": "+18005551212"}
    assert twilio.sign(url, params) == {"X-Twilio-Signature": "0/KCTR6DLpKmkAf8muzZqo1nDgQ="}
    data = url + "".join(k + form[k] for k in sorted(form))
    expected = base64.b64encode(hmac.new(b"12345", data.encode(), hashlib.sha1).digest()).decode()
    assert twilio.sign(url, form)["X-Twilio-Signature"] == expected
    assert twilio.sign(url, form, token="other") != twilio.sign(url, form)
    assert twilio.sign(url, form | {"Body": "Deny"}) != twilio.sign(url, form)
