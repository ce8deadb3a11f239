"""Slack mrkdwn and WhatsApp text from Markdown replies: golden renderings and escaping."""

from __future__ import annotations

import pytest

from podbay.transports.render_chat import (
    ZWSP,
    SlackRenderer,
    WhatsAppRenderer,
    markdown_to_mrkdwn,
    markdown_to_whatsapp,
)

DOCUMENT = """# Release *notes*

Some **bold**, _italic_, ~~gone~~ and `a<b>` code.
A [guide](https://example.com/?a=1&b=2), <https://example.com>, [mail](mailto:a@b.org).

- one
- two
  - nested **deep**
    1. deeper
- three

3. third
4. fourth

> quoted
> line

```python
def f() -> bool:
    return 1 < 2
```

| Name | Size |
|:-----|-----:|
| a.py | 10 |
| b | 2000 |

---

<b>raw</b> stays text
"""

SLACK_GOLDEN = """*Release _notes_*

Some *bold*, _italic_, ~gone~ and `a&lt;b&gt;` code.
A <https://example.com/?a=1&amp;b=2|guide>, <https://example.com>, <mailto:a@b.org|mail>.

• one
• two
  ◦ nested *deep*
    1. deeper
• three

3. third
4. fourth

> quoted
> line

```
def f() -&gt; bool:
    return 1 &lt; 2
```

```
Name | Size
-----+-----
a.py |   10
b    | 2000
```

────────────────────

&lt;b&gt;raw&lt;/b&gt; stays text"""

WHATSAPP_GOLDEN = """*Release _notes_*

Some *bold*, _italic_, ~gone~ and `a<b>` code.
A guide (https://example.com/?a=1&b=2), https://example.com, mail (mailto:a@b.org).

• one
• two
  ◦ nested *deep*
    1. deeper
• three

3. third
4. fourth

> quoted
> line

```
def f() -> bool:
    return 1 < 2
```

```
Name | Size
-----+-----
a.py |   10
b    | 2000
```

────────────────────

<b>raw</b> stays text"""


def test_slack_renders_a_reply_as_mrkdwn() -> None:
    assert markdown_to_mrkdwn(DOCUMENT) == SLACK_GOLDEN


def test_whatsapp_renders_a_reply_in_its_own_syntax() -> None:
    assert markdown_to_whatsapp(DOCUMENT) == WHATSAPP_GOLDEN


def test_fence_info_string_is_dropped_because_neither_platform_shows_a_language() -> None:
    source = "```rust title=main.rs\nfn main() {}\n```"
    assert markdown_to_mrkdwn(source) == "```\nfn main() {}\n```"
    assert markdown_to_whatsapp(source) == "```\nfn main() {}\n```"


def test_three_backticks_inside_a_fence_cannot_close_it_early() -> None:
    source = "````\n```\ninner\n```\n````"
    rendered = markdown_to_whatsapp(source)
    lines = rendered.split("\n")
    assert lines[0] == "```" and lines[-1] == "```"
    assert "```" not in "\n".join(lines[1:-1])
    assert "\n".join(lines[1:-1]).replace(ZWSP, "") == "```\ninner\n```"


@pytest.mark.parametrize(
    "source",
    ["<!channel> deploy now", "<!here>", "<!everyone>", "ping <@U123ABC> in <#C123ABC>"],
)
def test_slack_special_commands_and_mentions_in_text_are_shown_not_sent(source: str) -> None:
    rendered = markdown_to_mrkdwn(source)
    assert "<" not in rendered and ">" not in rendered
    assert rendered == source.replace("<", "&lt;").replace(">", "&gt;")


def test_slack_injection_inside_a_link_label_or_code_stays_escaped() -> None:
    rendered = markdown_to_mrkdwn("[<!channel>](https://x.org) `<!here>`\n\n```\n<!channel>\n```")
    assert (
        rendered == "<https://x.org|&lt;!channel&gt;> `&lt;!here&gt;`\n\n```\n&lt;!channel&gt;\n```"
    )


@pytest.mark.parametrize("word", ["@here", "@channel", "@everyone", "@HERE"])
def test_slack_at_mentions_in_text_are_neutralised(word: str) -> None:
    rendered = markdown_to_mrkdwn(f"hello {word} and bob@here.com")
    assert word not in rendered
    assert rendered == f"hello @{ZWSP}{word[1:]} and bob@{ZWSP}here.com"


def test_slack_mentions_lookalikes_are_left_alone() -> None:
    assert markdown_to_mrkdwn("@heretic @channels a@b.org") == "@heretic @channels a@b.org"


def test_slack_link_target_is_only_written_raw_for_web_and_mail_schemes() -> None:
    assert markdown_to_mrkdwn("[x](ftp://files.example/a)") == "x (ftp://files.example/a)"
    # markdown-it refuses javascript: targets outright: the brackets stay text.
    assert "<javascript" not in markdown_to_mrkdwn("[x](javascript:alert(1))")


def test_slack_link_target_cannot_break_out_of_the_angle_brackets() -> None:
    rendered = markdown_to_mrkdwn("[a](https://x.org/a|b>c)")
    assert rendered == "<https://x.org/a%7Cb%3Ec|a>"


@pytest.mark.parametrize("render", [markdown_to_mrkdwn, markdown_to_whatsapp])
def test_escaped_markers_in_the_source_do_not_format(render: object) -> None:
    assert callable(render)
    rendered = render(r"\*not bold\* \_not italic\_ \~not struck\~ \`not code\`")
    for marker in "*_~`":
        assert f"{ZWSP}{marker}{ZWSP}" in rendered
    assert rendered.replace(ZWSP, "") == "*not bold* _not italic_ ~not struck~ `not code`"


@pytest.mark.parametrize("render", [markdown_to_mrkdwn, markdown_to_whatsapp])
def test_markers_inside_words_are_left_as_written(render: object) -> None:
    assert callable(render)
    # Between two letters or digits a marker can neither open nor close: no ZWSP needed.
    assert render(r"snake_case_name 2\*3\*4") == "snake_case_name 2*3*4"


@pytest.mark.parametrize("render", [markdown_to_mrkdwn, markdown_to_whatsapp])
def test_emphasis_inside_a_word_drops_markers_the_platform_would_show(render: object) -> None:
    assert callable(render)
    assert render("un**frigging**believable and ~~x~~y") == "unfriggingbelievable and xy"


def test_whatsapp_line_that_would_start_a_quote_or_list_is_kept_as_text() -> None:
    rendered = markdown_to_whatsapp("\\> not quoted\n\n\\- not a list\n\n1\\. not numbered")
    assert rendered.split("\n\n") == [
        f"{ZWSP}> not quoted",
        f"{ZWSP}- not a list",
        f"{ZWSP}1. not numbered",
    ]


def test_heading_with_bold_inside_is_one_bold_line() -> None:
    assert markdown_to_mrkdwn("## **Big** news") == "*Big news*"
    assert markdown_to_whatsapp("## **Big** news") == "*Big news*"


def test_emphasis_over_a_line_break_is_closed_on_each_line() -> None:
    assert markdown_to_whatsapp("**one\ntwo**") == "*one*\n*two*"


def test_inline_code_holding_a_backtick_is_shown_as_text() -> None:
    rendered = markdown_to_whatsapp("`` a`b ``")
    assert rendered.replace(ZWSP, "") == "a`b"
    assert not rendered.startswith("`")


def test_whatsapp_link_with_its_url_as_label_is_written_once() -> None:
    assert markdown_to_whatsapp("[https://a.org](https://a.org)") == "https://a.org"
    assert markdown_to_whatsapp("<mail@a.org>") == "mail@a.org"


def test_loose_list_keeps_blank_lines_between_items() -> None:
    assert markdown_to_whatsapp("- a\n\n- b") == "• a\n\n• b"


def test_table_columns_line_up_with_wide_characters_and_alignment() -> None:
    rendered = markdown_to_whatsapp("| k | v |\n|:-:|---|\n| 日本 | x |\n| a | yy |")
    assert rendered == "```\n k   | v\n-----+---\n日本 | x\n a   | yy\n```"


def test_deeply_nested_emphasis_renders_without_recursion_error() -> None:
    source = "*a " * 2000 + "b" + "*" * 2000
    assert markdown_to_mrkdwn(source).replace(ZWSP, "").count("a") == 2000


def test_escape_text_for_embedded_user_text() -> None:
    slack, whatsapp = SlackRenderer(), WhatsAppRenderer()
    name = "<!here> *x* & @channel\n> y"
    assert slack.escape_text(name) == (
        f"&lt;!here&gt; {ZWSP}*{ZWSP}x{ZWSP}*{ZWSP} &amp; @{ZWSP}channel\n{ZWSP}&gt; y"
    )
    assert whatsapp.escape_text(name) == (
        f"<!here> {ZWSP}*{ZWSP}x{ZWSP}*{ZWSP} & @channel\n{ZWSP}> y"
    )
    assert slack.escape_text("my_file.py") == "my_file.py"


def test_an_empty_reply_renders_empty() -> None:
    assert markdown_to_mrkdwn("") == ""
    assert WhatsAppRenderer().render([]) == ""
