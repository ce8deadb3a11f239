"""What a new user meets first: role wording, config secrets, doctor, the Debian mirror."""

from __future__ import annotations

from fakes.harness import Harness


async def test_an_operator_is_told_they_are_an_operator(harness: Harness) -> None:
    await harness.transport.say("delete demo", user="bob")
    reply = await harness.transport.wait_for_text("needs the admin role")
    assert "you are an operator" in reply
