"""Tests for the platform-neutral Markdown helpers."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from podbay.transports.render import (
    code_block,
    escape_markdown,
    markdown_to_plain,
    parse,
    split_markdown,
)

# --- helpers: an independent reading of fences, used to check the splitter -------------------

_OPENING = re.compile(r"[ \t]*(`{3,}|~{3,})(.*)")
_FENCE_LIKE = re.compile(r"[ \t]*(?:`{3,}|~{3,}).*")


def _ends_inside_fence(text: str) -> bool:
    """Whether a fenced block opened in ``text`` is still open at its end."""
    open_marker: str | None = None
    for line in text.split("\n"):
        m = _OPENING.fullmatch(line)
        if m is None:
            continue
        marker, rest = m.groups()
        if open_marker is None:
            if not (marker[0] == "`" and "`" in rest):
                open_marker = marker
        elif marker[0] == open_marker[0] and len(marker) >= len(open_marker) and not rest.strip():
            open_marker = None
    return open_marker is not None


def _fence_lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if _FENCE_LIKE.fullmatch(line)]


def _nonspace(text: str) -> str:
    return "".join(text.split())


def _content_matches(text: str, chunks: list[str]) -> bool:
    """Whether dropping some added close/re-open pairs at chunk edges gives back ``text``.

    At each boundary the splitter either added nothing or closed a fence at the end of the
    chunk and re-opened it at the start of the next; try both and keep the consistent ones.
    """
    expected = _nonspace(text)
    states = {(0, False)}  # (position in expected, the chunk starts with an added re-open line)
    for i, chunk in enumerate(chunks):
        lines = chunk.split("\n")
        next_states = set()
        for pos, reopened in states:
            if reopened and not _FENCE_LIKE.fullmatch(lines[0]):
                continue
            body = lines[1:] if reopened else lines
            closes = [False]
            if i < len(chunks) - 1 and body and _FENCE_LIKE.fullmatch(body[-1]):
                closes.append(True)
            for closed in closes:
                piece = _nonspace("\n".join(body[:-1] if closed else body))
                if expected.startswith(piece, pos):
                    next_states.add((pos + len(piece), closed))
        states = next_states
    return (len(expected), False) in states


def _strip_outer_blank_lines(text: str) -> str:
    lines = text.split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


# --- split_markdown: examples -----------------------------------------------------------------


def test_text_that_fits_comes_back_as_one_chunk_without_outer_blank_lines() -> None:
    text = "\n\n  \n# Title\n\nSome *text*.\n\n```py\nx = 1\n```\n\n\n"
    assert split_markdown(text, 100) == ["# Title\n\nSome *text*.\n\n```py\nx = 1\n```"]


@pytest.mark.parametrize("text", ["", "\n", "  \n\t\n   "])
def test_empty_or_whitespace_text_gives_no_chunks(text: str) -> None:
    assert split_markdown(text, 100) == []


@pytest.mark.parametrize("limit", [0, 1, 39])
def test_limit_too_small_for_fence_overhead_is_rejected(limit: int) -> None:
    with pytest.raises(ValueError, match="at least 40"):
        split_markdown("hello", limit)


def test_whole_paragraphs_are_packed_into_each_chunk() -> None:
    paragraphs = [f"Paragraph {i} " + "x" * 18 for i in range(5)]  # 30 characters each
    chunks = split_markdown("\n\n".join(paragraphs), 70)
    assert chunks == [
        f"{paragraphs[0]}\n\n{paragraphs[1]}",
        f"{paragraphs[2]}\n\n{paragraphs[3]}",
        paragraphs[4],
    ]


def test_paragraph_longer_than_limit_is_split_at_line_boundaries() -> None:
    lines = [f"line {i} " + "y" * 20 for i in range(6)]  # 27 characters each
    chunks = split_markdown("\n".join(lines), 60)
    assert chunks == ["\n".join(lines[i : i + 2]) for i in range(0, 6, 2)]


def test_code_block_that_fits_a_chunk_is_moved_whole_to_the_next_chunk() -> None:
    intro = "Here is the fix for the failing test in the parser:"
    block = "```python\ndef parse(x):\n    return int(x)\n```"
    assert split_markdown(f"{intro}\n\n{block}\n\nDone.", 60) == [intro, f"{block}\n\nDone."]


def test_code_block_moves_whole_even_without_a_blank_line_before_it() -> None:
    intro = "Output of the command that was run just now:"
    block = "```\n$ make test\nall 12 tests passed\n```"
    assert split_markdown(f"{intro}\n{block}", 50) == [intro, block]


def test_long_code_block_is_closed_and_reopened_with_its_language() -> None:
    code = [f"print('line number {i}')" for i in range(10)]
    text = "```python\n" + "\n".join(code) + "\n```"
    chunks = split_markdown(text, 80)
    assert len(chunks) > 1
    for chunk in chunks:
        assert len(chunk) <= 80
        assert chunk.startswith("```python\n")
        assert chunk.endswith("\n```")
    inner = [line for chunk in chunks for line in chunk.split("\n")[1:-1]]
    assert inner == code


def test_long_tilde_fence_is_reopened_with_the_same_marker_and_indentation() -> None:
    code = [f"step {i}: " + "z" * 20 for i in range(8)]
    text = "  ~~~~ sh\n" + "\n".join(code) + "\n  ~~~~"
    chunks = split_markdown(text, 70)
    assert len(chunks) > 1
    for chunk in chunks:
        assert chunk.startswith("  ~~~~ sh\n")
        assert chunk.endswith("\n  ~~~~")


def test_split_code_block_keeps_the_text_around_it() -> None:
    code = "\n".join(f"x{i} = {i}" for i in range(30))
    text = f"Before.\n\n```js\n{code}\n```\n\nAfter."
    chunks = split_markdown(text, 60)
    assert chunks[0].startswith("Before.\n\n```js\n")
    assert chunks[-1].endswith("\n```\n\nAfter.")
    assert all(not _ends_inside_fence(chunk) for chunk in chunks)


def test_line_inside_code_that_looks_like_a_fence_does_not_close_it() -> None:
    code = ["```python", "~~~", "``"] * 6
    text = "```\n" + "\n".join(code) + "\n```"
    chunks = split_markdown(text, 45)
    assert len(chunks) > 1
    assert all(not _ends_inside_fence(chunk) for chunk in chunks)
    assert _content_matches(text, chunks)


def test_very_long_line_is_hard_split_within_the_limit() -> None:
    line = "".join(chr(ord("a") + i % 26) for i in range(250))
    chunks = split_markdown(f"Short intro.\n\n{line}\n\nShort outro.", 60)
    assert all(len(chunk) <= 60 for chunk in chunks)
    assert chunks[0] == "Short intro."
    assert "".join(chunks[1:]) == f"{line}\n\nShort outro."


def test_hard_split_prefers_a_space_near_the_end_of_the_room() -> None:
    text = " ".join(["word"] * 30)
    chunks = split_markdown(text, 42)
    assert all(chunk.endswith(" ") for chunk in chunks[:-1])
    assert "".join(chunks) == text


def test_very_long_line_in_code_block_is_split_with_fences_around_every_piece() -> None:
    text = "```python\n" + "x" * 200 + "\n```"
    chunks = split_markdown(text, 50)
    assert len(chunks) == 6
    for chunk in chunks:
        assert len(chunk) <= 50
        first, *_, last = chunk.split("\n")
        assert (first, last) == ("```python", "```")
    assert "".join(chunk[len("```python\n") : -len("\n```")] for chunk in chunks) == "x" * 200


def test_hard_split_never_leaves_a_fence_at_the_start_of_a_piece() -> None:
    text = "a" * 40 + "```python" + "b" * 50
    chunks = split_markdown(text, 40)
    assert all(not _FENCE_LIKE.fullmatch(chunk) for chunk in chunks)
    assert "".join(chunks) == text


def test_unclosed_code_block_is_closed_between_chunks_but_left_open_at_the_end() -> None:
    text = "```\n" + "\n".join(f"row {i:02} " + "r" * 20 for i in range(6))
    chunks = split_markdown(text, 70)
    assert len(chunks) > 1
    assert all(chunk.endswith("\n```") for chunk in chunks[:-1])
    assert chunks[-1].startswith("```\n")
    assert not chunks[-1].endswith("```")


def test_fence_with_an_opening_line_too_long_to_repeat_is_split_like_text() -> None:
    # Repeating a 30-character opening line would leave under half of each chunk for code.
    text = "```" + "i" * 27 + "\n" + "\n".join(["code line"] * 10) + "\n```"
    chunks = split_markdown(text, 50)
    assert len(chunks) == 3
    assert all(len(chunk) <= 50 for chunk in chunks)
    assert "\n".join(chunks) == text


# --- split_markdown: properties ---------------------------------------------------------------

_TEXT_CHARS = st.sampled_from("abcdefghijklmnop xyz*_`#-[]()é漢😀")
_short_line = st.text(_TEXT_CHARS, min_size=1, max_size=60).filter(lambda s: s.strip())
# Longer than any limit drawn below, so that hard splits happen.
_long_line = st.text(_TEXT_CHARS, min_size=161, max_size=400).filter(lambda s: s.strip())
_word_line = st.one_of(_short_line, _short_line, _long_line)
_paragraph = st.lists(_word_line, min_size=1, max_size=5).map("\n".join)


@st.composite
def _fenced_block(draw: st.DrawFn) -> str:
    marker = draw(st.sampled_from(["```", "````", "~~~"]))
    info = draw(st.sampled_from(["", "python", "js", " sh", "c++ {.x}"]))
    indent = draw(st.sampled_from(["", "  "]))
    # Lines that look like fences but cannot close this one.
    decoys = ["``", "```js", "~~~ x"] + (["```"] if marker == "````" else [])
    decoys.append("~~~" if marker[0] == "`" else "```")
    body_line = st.one_of(st.sampled_from(["", "    ", *decoys]), _word_line)
    body = draw(st.lists(body_line, max_size=12))
    return "\n".join([indent + marker + info, *body, indent + marker])


_separator = st.sampled_from(["\n", "\n\n", "\n\n\n", "\n \n"])


@st.composite
def _markdown_document(draw: st.DrawFn) -> str:
    blocks = draw(st.lists(st.one_of(_paragraph, _fenced_block()), min_size=1, max_size=8))
    text = blocks[0]
    for block in blocks[1:]:
        text += draw(_separator) + block
    return text


_any_text = st.one_of(_markdown_document(), st.text(), st.text(_TEXT_CHARS | st.just("\n")))
_PROPERTY_SETTINGS = settings(
    max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_PROPERTY_SETTINGS
@given(text=_any_text, limit=st.integers(40, 160))
def test_every_chunk_is_within_the_limit_and_never_blank_at_its_edges(
    text: str, limit: int
) -> None:
    for chunk in split_markdown(text, limit):
        assert 0 < len(chunk) <= limit
        lines = chunk.split("\n")
        assert lines[0].strip() and lines[-1].strip()


def _fence_states(text: str) -> list[tuple[bool, bool]]:
    """(closed, splittable) for each fenced block CommonMark finds in ``text``.

    Closed: its last line closes it (not the end of the text or of a list item). Splittable:
    outside block quotes and not opened after a list marker, so its opening line can be
    repeated on its own.
    """
    lines = text.split("\n")
    states, quotes = [], 0
    for token in parse(text):
        quotes += {"blockquote_open": 1, "blockquote_close": -1}.get(token.type, 0)
        if token.type != "fence" or token.map is None:
            continue
        start, end = token.map
        last = lines[end - 1].strip() if end - 1 < len(lines) else ""
        closed = (
            end - start >= 2 and last.startswith(token.markup) and not last.strip(token.markup[0])
        )
        splittable = not quotes and lines[start].lstrip(" \t").startswith(token.markup)
        states.append((closed, splittable))
    return states


@_PROPERTY_SETTINGS
@given(text=_any_text, limit=st.integers(40, 160))
def test_every_chunk_has_balanced_fences(text: str, limit: int) -> None:
    chunks = split_markdown(text, limit)
    # Only promised when the input closes its fences (as CommonMark reads them: a fence opened
    # in a list item ends with the item), they can be repeated on their own, and they are short
    # enough to repeat (opening and closing line with their newlines within half the limit).
    longest = max(map(len, _fence_lines(text)), default=0)
    if not all(closed and ok for closed, ok in _fence_states(text)) or 2 * longest + 2 > limit // 2:
        return
    assert [chunk for chunk in chunks if not all(c for c, _ in _fence_states(chunk))] == []


@_PROPERTY_SETTINGS
@given(text=_any_text, limit=st.integers(40, 160))
def test_no_character_is_lost_or_duplicated(text: str, limit: int) -> None:
    assert _content_matches(text, split_markdown(text, limit))


@_PROPERTY_SETTINGS
@given(text=_any_text, limit=st.integers(40, 400))
def test_text_that_fits_comes_back_unchanged(text: str, limit: int) -> None:
    whole = _strip_outer_blank_lines(text)
    if whole and len(whole) <= limit:
        assert split_markdown(text, limit) == [whole]


# --- markdown_to_plain ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("markdown", "plain"),
    [
        ("# Title", "Title"),
        ("### Deeper title ###", "Deeper title"),
        ("#hashtag", "#hashtag"),
        ("**bold** and __bold__", "bold and bold"),
        ("*em* and _em_", "em and em"),
        ("~~strike~~", "strike"),
        ("**bold with *em* inside**", "bold with em inside"),
        ("snake_case_names stay", "snake_case_names stay"),
        # CommonMark: `*` between digits is emphasis, `_` inside a word is not.
        (r"2\*3\*4 and a_b_c", "2*3*4 and a_b_c"),
        ("run `make *all*` now", "run make *all* now"),
        ("``a ` b``", "a ` b"),
        ("[docs](https://x.org/d)", "docs (https://x.org/d)"),
        ("[https://x.org](https://x.org)", "https://x.org"),
        ("[**bold** link](u)", "bold link (u)"),
        ("see <https://x.org/a?b=1>", "see https://x.org/a?b=1"),
        ("- one", "• one"),
        ("* two", "• two"),
        ("+ three", "• three"),
        # Four leading spaces alone make indented code (CommonMark); nesting is under an item.
        ("- top\n  - nested *item*", "• top\n  • nested item"),
        ("3. third\n4. fourth", "3. third\n4. fourth"),
        ("1. first", "1. first"),
        ("> quoted **text**", "> quoted text"),
        ("> - quoted item", "> • quoted item"),
        ("---", "─" * 20),
        ("* * *", "─" * 20),
        (r"\*not em\* and \_x\_ and \\", "*not em* and _x_ and \\"),
        (r"\# not a heading", "# not a heading"),
    ],
)
def test_markdown_renders_as_plain_text(markdown: str, plain: str) -> None:
    assert markdown_to_plain(markdown) == plain


def test_code_block_lines_are_indented_and_left_untouched() -> None:
    markdown = "Run:\n```python\nx = a_b * c_d  # **not bold**\n\n- [x](y)\n```\nDone."
    assert markdown_to_plain(markdown) == (
        "Run:\n    x = a_b * c_d  # **not bold**\n\n    - [x](y)\nDone."
    )


def test_absurdly_nested_emphasis_is_rendered_without_recursing_forever() -> None:
    text = "**" * 2000 + "a" + "**" * 2000
    assert markdown_to_plain(text).strip("*") == "a"


def test_unclosed_code_block_runs_to_the_end() -> None:
    assert markdown_to_plain("~~~\n# not a title\n*x*") == "    # not a title\n    *x*"


# --- escape_markdown --------------------------------------------------------------------------


def test_escape_markdown_backslashes_every_markdown_punctuation_character() -> None:
    assert escape_markdown(r"a_b*c [x](y) #1 \ `~") == r"a\_b\*c \[x\]\(y\) \#1 \\ \`\~"


@settings(max_examples=500, deadline=None)
@given(st.text(st.characters(codec="utf-8")).filter(str.isprintable).map(str.strip))
def test_escaped_text_renders_back_to_itself(text: str) -> None:
    assert markdown_to_plain(escape_markdown(text)) == text


# --- code_block -------------------------------------------------------------------------------


def test_code_block_uses_a_fence_longer_than_any_backtick_run_inside() -> None:
    assert code_block("x = 1") == "```\nx = 1\n```"
    assert code_block("a ```` b\n```", "md") == "`````md\na ```` b\n```\n`````"


def test_code_block_drops_one_trailing_newline() -> None:
    assert code_block("x\n", "py") == "```py\nx\n```"


def test_code_block_rejects_an_info_string_that_would_break_the_fence() -> None:
    with pytest.raises(ValueError):
        code_block("x", "py`")
    with pytest.raises(ValueError):
        code_block("x", "py\nmore")


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.sampled_from("`~ ab\n")), info=st.sampled_from(["", "py"]))
def test_code_block_content_cannot_close_its_fence(text: str, info: str) -> None:
    block = code_block(text, info)
    lines = block.split("\n")
    # The fence is open after every line but the last, which closes it.
    assert all(_ends_inside_fence("\n".join(lines[:i])) for i in range(1, len(lines)))
    assert not _ends_inside_fence(block)
    assert markdown_to_plain(block) == "\n".join(
        "    " + line if line else line for line in text.removesuffix("\n").split("\n")
    )
