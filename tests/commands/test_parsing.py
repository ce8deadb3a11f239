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


# -- secrets in parse errors -----------------------------------------------------------

SECRET = "s3cr3t-Value-42xyz"


@pytest.mark.parametrize(
    "text",
    [
        f"new project x —token {SECRET} --bogus",
        f"new project x –token {SECRET} extra",
        f"new project x -token {SECRET} extra",
        f"new project x --tok {SECRET} extra",
        f"new project x --TOKEN={SECRET} extra",
        f"new project x --token {SECRET} --token {SECRET}",
        f"delete demo2 —token {SECRET}",
        f"!delete demo2 '--token {SECRET}'",
        f"!use demo2 https://alice:{SECRET}@example.org/x.git",
        "!ghp_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ now",
        "!use demo2 ghp_abcdefghijklmnopqrstuvwxyzABCDEFGHIJ",
        f"new project {'x' * 70} --bogus {SECRET}",
    ],
)
def test_a_usage_error_never_echoes_a_secret(reg: Registry, text: str) -> None:
    with pytest.raises(UsageError) as err:
        reg.parse(text)
    message = str(err.value)
    assert SECRET not in message and "ghp_abcdefghijklmnop" not in message, message
    assert "usage:" in message or "Unknown command" in message


@pytest.mark.parametrize(
    "flag", ["--token", "—token", "–token", "-token", "--tok", "--toke", "--TOKEN", "—Tok"]
)
def test_near_miss_spellings_of_the_token_option_bind_to_it(reg: Registry, flag: str) -> None:
    inv = command(reg.parse(f"new project demo {flag} {SECRET} --stack go"))
    assert inv.opt("token") == SECRET and inv.opt("stack") == "go"
    inv = command(reg.parse(f"new project demo {flag}={SECRET}"))
    assert inv.opt("token") == SECRET


def test_an_em_dash_works_as_an_option_prefix(reg: Registry) -> None:
    inv = command(reg.parse("new project demo —stack python"))
    assert inv.opt("stack") == "python"
    inv = command(reg.parse("delete demo —purge"))
    assert inv.flag("purge")


@pytest.mark.parametrize(
    "text",
    [
        "new project x —token abc123456",
        "new project x --tok abc123456",
        "new project x -token abc123456",
        "new project x --git https://alice:abc123456@example.org/x.git",
    ],
)
def test_registry_redaction_covers_near_misses_and_urls(reg: Registry, text: str) -> None:
    assert reg.has_secret(text)
    assert "abc123456" not in reg.redact(text)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(["new project demo", "!delete demo", "delete demo", "logs demo", "!use"]),
    st.sampled_from(["--token", "—token", "–token", "-token", "--tok", "--TOKEN", "—tok"]),
    st.sampled_from([" ", "="]),
    st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.~", min_size=8),
    st.text(max_size=40),
)
def test_no_parse_error_contains_a_generated_secret(
    head: str, flag: str, sep: str, secret: str, tail: str
) -> None:
    text = f"{head} {flag}{sep}{secret} {tail}"
    try:
        _PROPERTY_REGISTRY.parse(text)
    except UsageError as exc:
        assert secret not in str(exc) or secret in f"{head} {flag}{tail}"


# -- long input ---------------------------------------------------------------------------

MEGABYTE = 1_000_000


@pytest.mark.parametrize(
    ("text", "outcome"),
    [
        ("new project " + "x" * MEGABYTE, UsageError),
        ("new project demo --stack " + "x" * MEGABYTE, UsageError),
        ("!delete " + "a " * (MEGABYTE // 2), UsageError),
        ("delete demo " + "--purge " * (MEGABYTE // 8), UsageError),
        ("delete " + "x" * MEGABYTE, UsageError),
        ("new project demo --stak" + "k" * MEGABYTE, UsageError),
        ("!" + "x" * MEGABYTE, UsageError),
        ("statsu" + "u" * MEGABYTE, Freeform),
        ("delete the unused imports " + "and more " * (MEGABYTE // 9), Freeform),
        ("x" * MEGABYTE, Freeform),
        ("why " * (MEGABYTE // 4), Freeform),
        ("help " + "'" * MEGABYTE, UsageError),
        ("help " + "me " * (MEGABYTE // 3), Freeform),
        ("podbay " + "please " * (MEGABYTE // 7), Freeform),
    ],
    ids=lambda v: repr(v[:24]) if isinstance(v, str) else v.__name__,
)
def test_a_megabyte_message_parses_to_a_usage_error_or_freeform(
    reg: Registry, text: str, outcome: type
) -> None:
    # Quadratic tokenising took seconds per megabyte; the parse must simply come back.
    if outcome is UsageError:
        with pytest.raises(UsageError) as err:
            reg.parse(text, projects=["demo"])
        assert len(str(err.value)) < 1000
    else:
        assert isinstance(reg.parse(text, projects=["demo"]), Freeform)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("new project demo ---path /tmp/x", "---path: an option takes two dashes, --path"),
        ("new project demo ---stack go", "---stack: an option takes two dashes, --stack"),
        ("delete demo ---purge", "---purge: an option takes two dashes, --purge"),
        ("new project demo —-stack go", "—-stack: an option takes two dashes, --stack"),
    ],
)
def test_three_dashes_are_refused_naming_the_two_dash_option(
    reg: Registry, text: str, expected: str
) -> None:
    with pytest.raises(UsageError) as err:
        reg.parse(text)
    assert expected in str(err.value)


@pytest.mark.parametrize("form", ["---token {s}", "---token={s}", "———token {s}"])
def test_three_dash_token_is_refused_and_its_value_still_redacted(reg: Registry, form: str) -> None:
    text = "new project demo " + form.format(s=SECRET)
    with pytest.raises(UsageError) as err:
        reg.parse(text)
    assert "two dashes, --token" in str(err.value)
    assert SECRET not in str(err.value)
    assert SECRET not in reg.redact(text) and reg.has_secret(text)


@pytest.mark.parametrize(
    "text",
    [
        "new project demo --token --bogus=x",
        "new project demo --token --stack go",
        "new project demo --path —stack",
        "new project demo --stack -x",
    ],
)
def test_an_option_value_that_looks_like_an_option_is_an_error(reg: Registry, text: str) -> None:
    with pytest.raises(UsageError) as err:
        reg.parse(text)
    message = str(err.value)
    assert "needs a value" in message and "looks like an option" in message
    assert "=VALUE" in message


def test_a_negative_number_is_still_a_value(reg: Registry) -> None:
    inv = command(reg.parse("new project demo --cpus -1"))
    assert inv.opt("cpus") == "-1"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("new project demo --purge", "--purge is an option of `delete`, not of `new project`"),
        ("delete demo --stack go", "--stack is an option of `new project`, not of `delete`"),
        ("logs demo --purge", "--purge is an option of `delete`, not of `logs`"),
    ],
)
def test_an_option_of_another_command_says_which_command_it_belongs_to(
    reg: Registry, text: str, expected: str
) -> None:
    with pytest.raises(UsageError) as err:
        reg.parse(text)
    assert expected in str(err.value)
    assert "did you mean" not in str(err.value)
