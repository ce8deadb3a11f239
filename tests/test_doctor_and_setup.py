"""What a new user meets first: role wording, config secrets, doctor, the Debian mirror."""

from __future__ import annotations

from fakes.harness import Harness


async def test_an_operator_is_told_they_are_an_operator(harness: Harness) -> None:
    await harness.transport.say("delete demo", user="bob")
    reply = await harness.transport.wait_for_text("needs the admin role")
    assert "you are an operator" in reply


def test_a_long_build_progress_line_is_cut_at_a_word_boundary() -> None:
    from podbay.engine.stacks import progress_line

    step = "Step 5/9 : RUN apt-get install -y --no-install-recommends " + " ".join(
        f"package-number-{i}" for i in range(20)
    )
    shown = progress_line(step)
    assert len(shown) <= 120 and shown.endswith("…")
    assert step.startswith(shown[:-1].rstrip())
    assert step[len(shown[:-1].rstrip())] == " ", "cut between words"
    assert progress_line("Step 1/9 : FROM base") == "Step 1/9 : FROM base"
    # One word longer than the limit is cut inside it rather than dropped.
    assert progress_line("x" * 300) == "x" * 119 + "…"
