from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podbay.commands.catalog import build_registry
from podbay.commands.registry import Freeform, Invocation, Parsed, Registry
from podbay.errors import UsageError, UserError


@pytest.fixture(scope="module")
def reg() -> Registry:
    return build_registry("podbay", aliases=("@podbay:example.org",))


def command(parsed: Parsed) -> Invocation:
    assert isinstance(parsed, Invocation), parsed
    return parsed


@pytest.mark.parametrize(
    "text",
    [
        "help",
        "HELP",
        "!help",
        "! help",
        "podbay help",
        "Podbay: help",
        "@podbay help",
        "@podbay, help",
        "@podbay:example.org: help",
        "  help  ",
    ],
)
def test_every_addressing_form_reaches_the_command(reg: Registry, text: str) -> None:
    assert command(reg.parse(text)).spec.name == "help"


def test_a_bare_mention_asks_for_help(reg: Registry) -> None:
    assert command(reg.parse("@podbay")).spec.name == "help"


def test_mentioned_by_the_platform_counts_as_addressed(reg: Registry) -> None:
    parsed = reg.parse("please look at the failing test", mentioned=True)
    assert parsed == Freeform("please look at the failing test", addressed=True)


def test_a_name_that_merely_starts_with_the_bot_name_is_not_a_mention(reg: Registry) -> None:
    assert isinstance(reg.parse("podbayish help"), Freeform)


def test_quoting_and_both_flag_forms(reg: Registry) -> None:
    inv = command(reg.parse("new project demo --stack=python --git 'https://example.org/a b.git'"))
    assert inv.spec.name == "new project"
    assert inv.args == {"name": "demo"}
    assert inv.options == {"stack": "python", "git": "https://example.org/a b.git"}


def test_switch_flags_and_double_dash(reg: Registry) -> None:
    inv = command(reg.parse("delete demo --purge"))
    assert inv.flag("purge") and inv.args == {"project": "demo"}
    inv = command(reg.parse("!use -- -weird"))
    assert inv.args == {"project": "-weird"}


def test_multiword_command_with_bad_arguments_shows_usage(reg: Registry) -> None:
    with pytest.raises(UsageError) as err:
        reg.parse("new project")
    assert "usage: new project <name> [--stack S]" in str(err.value)
    with pytest.raises(UsageError, match="--stack needs a value"):
        reg.parse("new project demo --stack")


def test_unknown_option_suggests_the_right_one(reg: Registry) -> None:
    with pytest.raises(UsageError, match=r"unknown option --stak \(did you mean --stack\?\)"):
        reg.parse("new project demo --stak python")


def test_unbalanced_quote_in_a_command_is_a_usage_error(reg: Registry) -> None:
    with pytest.raises(UsageError, match="quotes"):
        reg.parse("new project 'demo")


def test_plain_sentence_starting_with_a_command_word_is_freeform(reg: Registry) -> None:
    for text in (
        "delete the unused imports in parser.py",
        "use a dict instead of a list",
        "stop using global state",
        "status of the build? it's red",
    ):
        parsed = reg.parse(text)
        assert parsed == Freeform(text), text


def test_prefixed_command_with_bad_arguments_is_a_usage_error(reg: Registry) -> None:
    with pytest.raises(UsageError, match="usage: delete <project>"):
        reg.parse("!delete the unused imports")


def test_near_miss_of_a_command_suggests_it(reg: Registry) -> None:
    with pytest.raises(UsageError, match="Did you mean `status`"):
        reg.parse("statsu")
    with pytest.raises(UsageError, match="Did you mean `help`"):
        reg.parse("!hlep")


def test_unknown_prefixed_command_is_an_error_not_freeform(reg: Registry) -> None:
    with pytest.raises(UsageError, match="Unknown command `frobnicate`"):
        reg.parse("!frobnicate now")


def test_anything_else_is_freeform(reg: Registry) -> None:
    assert reg.parse("why does the build fail on CI?") == Freeform("why does the build fail on CI?")
    assert reg.parse("podbay why is it slow") == Freeform("why is it slow", addressed=True)


def test_secret_option_values_are_redacted(reg: Registry) -> None:
    assert reg.redact("new project x --token abc123 --stack go") == (
        "new project x --token [redacted] --stack go"
    )
    assert reg.redact("new project x --token='a b c'") == "new project x --token=[redacted]"
    assert reg.redact("no secrets here") == "no secrets here"


@settings(max_examples=2500, deadline=None)
@given(
    st.one_of(
        st.text(),
        st.builds(
            lambda head, tail: f"{head} {tail}",
            st.sampled_from(
                ["help", "!new project", "new project", "delete", "!use", "@podbay", "status"]
            ),
            st.text(),
        ),
    )
)
def test_parsing_arbitrary_unicode_yields_a_command_or_freeform(text: str) -> None:
    reg = _PROPERTY_REGISTRY
    try:
        parsed = reg.parse(text)
    except UserError:
        return  # the only error a user may see
    assert isinstance(parsed, Invocation | Freeform)


_PROPERTY_REGISTRY = build_registry("podbay")
