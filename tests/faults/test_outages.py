"""Chat platform APIs failing for a while: replies are retried and sent exactly once.

The fake Slack Web API and the fake WhatsApp Cloud API (Graph) answer podbay's replies
with 429 (rate limited) and 5xx (server error) for a while, then recover. What a user
notices: the answer arrives once the API is back, and it arrives once, never twice.

(The homeserver outage, Synapse stopped for 30 s, is tests/matrix/test_outage_30s.py: it
needs the Synapse fixture of tests/matrix.)
"""

from __future__ import annotations

import json
from typing import Any

import fakes.slack_world as _slack
import fakes.wa_world as _wa
from fakes.slack_world import World as SlackWorld
from fakes.slack_world import slack_world
from fakes.wa_world import World as WaWorld
from fakes.wa_world import meta_world

__all__ = ["meta_world", "slack_world"]  # the fixtures, for pytest to find here


def slack_posts(world: SlackWorld, fragment: str) -> list[Any]:
    """Every chat.postMessage call whose arguments contain ``fragment`` (failed ones too)."""
    return [c for c in world.fake.calls_to("chat.postMessage") if fragment in json.dumps(c.args)]


async def test_slack_5xx_and_429_for_a_while_are_retried_and_the_reply_posted_once(
    slack_world: SlackWorld,
) -> None:
    fake = slack_world.fake
    slack_world.agent.auto_release = None  # the reply is due while Slack is failing
    event = _slack.message_event(
        "fix the build", channel="D0001", channel_type="im", kind="message"
    )
    await slack_world.event(event)
    run = await slack_world.agent.next_started()
    # Three failures in a row: podbay's slack_sdk handlers retry up to 3 times in all.
    fake.fail_next("chat.postMessage", status=500)
    fake.fail_next("chat.postMessage", status=503)
    fake.fail_next("chat.postMessage", status=429, retry_after=1)
    run.release.set()
    await fake.wait_for("chat.postMessage", lambda c: not c.failed, timeout=30)
    attempts = slack_posts(slack_world, "echo: fix the build")
    errors = [c.error for c in attempts]
    assert errors == ["internal_error", "internal_error", "ratelimited", None], attempts
    assert all(c.args == attempts[-1].args for c in attempts), "the same reply each time"
    # Slack's rate-limit contract: wait Retry-After seconds before the next call.
    assert attempts[3].at - attempts[2].at >= 1.0, "Retry-After: 1 was not honoured"

    # Nothing is posted again later: the next answer comes after exactly one copy.
    await slack_world.event(_slack.message_event("<@UPODBAY> whoami"))
    await fake.wait_for("chat.postMessage", lambda c: "slack:UALICE" in json.dumps(c.args))
    delivered = [c for c in slack_posts(slack_world, "echo: fix the build") if not c.failed]
    assert len(delivered) == 1
    assert delivered[0].args["channel"] == "D0001"


def graph_texts(world: WaWorld, fragment: str) -> list[Any]:
    """Every text message podbay sent through the Graph API containing ``fragment``."""
    return [
        c
        for c in world.graph.calls
        if c.kind == "text" and fragment in json.dumps(c.body, ensure_ascii=False)
    ]


async def test_whatsapp_5xx_and_429_for_a_while_are_retried_and_the_reply_sent_once(
    meta_world: WaWorld,
) -> None:
    graph = meta_world.graph
    meta_world.agent.auto_release = None
    await meta_world.say("fix the build")
    run = await meta_world.agent.next_started()
    # The read receipt with the typing indicator has gone out: the failures below meet
    # the reply (podbay tries 4 times: 3 failures still get it through).
    await graph.wait_for(lambda c: "typing_indicator" in c.body and not c.failed)
    graph.fail_next(status=500, times=2)
    graph.fail_next(status=429, times=1)
    run.release.set()
    await graph.wait_for(lambda c: c.kind == "text" and not c.failed, timeout=30)
    attempts = graph_texts(meta_world, "echo: fix the build")
    assert [c.error_code for c in attempts] == [131000, 131000, 130429, None], attempts
    assert all(c.body == attempts[-1].body for c in attempts), "the same reply each time"

    await meta_world.say("whoami")
    await graph.wait_for(lambda c: c.kind == "text" and "whatsapp:+" in json.dumps(c.body))
    delivered = [c for c in graph_texts(meta_world, "echo: fix the build") if not c.failed]
    assert len(delivered) == 1, "sent exactly once"
    assert delivered[0].body["to"] == _wa.ALICE
