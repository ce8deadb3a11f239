"""The one Markdown model: golden renderings (plain, Matrix HTML), the Matrix allowlist, the
rich console, and properties of splitting over generated Markdown."""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from podbay.messages import Reply
from podbay.transports.console import CONSOLE_SESSION, ConsoleTransport
from podbay.transports.render import (
    MATRIX_ATTRIBUTES,
    MATRIX_TAGS,
    MatrixHtmlRenderer,
    PlainRenderer,
    Renderer,
    markdown_to_html,
    markdown_to_plain,
    parse,
    split_markdown,
)

# --- golden: plain ----------------------------------------------------------------------------

DOCUMENT = """# Release *notes*

Some **bold**, _em_, ~~gone~~ and `code`.
Second line of the paragraph.

- one
  - nested [link](https://x.org/a)
- two

| name | size |
|:-----|-----:|
| a.py | 10 |

```python title
print("<hi>")
```
"""


def test_document_renders_as_plain_text() -> None:
    assert markdown_to_plain(DOCUMENT) == (
        "Release notes\n"
        "\n"
        "Some bold, em, gone and code.\n"
        "Second line of the paragraph.\n"
        "\n"
        "• one\n"
        "  • nested link (https://x.org/a)\n"
        "• two\n"
        "\n"
        "name │ size\n"
        "─────┼─────\n"
        "a.py │ 10\n"
        "\n"
        '    print("<hi>")'
    )


def test_inline_html_is_shown_as_written_in_plain_text() -> None:
    assert markdown_to_plain("use <b>Vec<u8></b> here") == "use <b>Vec<u8></b> here"


def test_loose_list_keeps_its_blank_lines_and_ordered_numbers() -> None:
    assert markdown_to_plain("3) a\n\n4) b") == "3) a\n\n4) b"


# --- golden: Matrix HTML ----------------------------------------------------------------------


def test_document_renders_as_matrix_html() -> None:
    assert markdown_to_html(DOCUMENT) == (
        "<h1>Release <em>notes</em></h1>\n"
        "<p>Some <strong>bold</strong>, <em>em</em>, <del>gone</del> and <code>code</code>.<br>\n"
        "Second line of the paragraph.</p>\n"
        "<ul>\n<li>one\n<ul>\n"
        '<li>nested <a href="https://x.org/a">link</a></li>\n'
        "</ul>\n</li>\n<li>two</li>\n</ul>\n"
        "<table>\n<thead>\n<tr>\n<th>name</th>\n<th>size</th>\n</tr>\n</thead>\n"
        "<tbody>\n<tr>\n<td>a.py</td>\n<td>10</td>\n</tr>\n</tbody>\n</table>\n"
        '<pre><code class="language-python">print("&lt;hi&gt;")\n</code></pre>'
    )


@pytest.mark.parametrize(
    "markdown",
    [
        "<script>alert(1)</script>",
        "<img src=x onerror=alert(1)>",
        "[click](javascript:alert(1))",
        "[click](JaVaScRiPt:alert(1))",
        "[data](data:text/html;base64,PHNjcmlwdD4=)",
        "![x](javascript:alert(1))",
        "<a href='javascript:alert(1)'>x</a>",
    ],
)
def test_script_and_javascript_links_never_become_markup(markdown: str) -> None:
    rendered = markdown_to_html(markdown)
    assert "<script" not in rendered
    assert "<img" not in rendered
    assert 'href="javascript' not in rendered.lower()
    assert 'href="data' not in rendered.lower()
    _assert_within_allowlist(rendered)


def test_only_mxc_images_are_embedded_and_others_become_links() -> None:
    assert markdown_to_html("![cat](mxc://s/m) ![dog](https://x.org/d.png)") == (
        '<p><img src="mxc://s/m" alt="cat"> <a href="https://x.org/d.png">dog</a></p>'
    )


def test_mailto_and_autolinks_stay_links() -> None:
    assert markdown_to_html("<a@b.org> <https://x.org>") == (
        '<p><a href="mailto:a@b.org">a@b.org</a> <a href="https://x.org">https://x.org</a></p>'
    )


def test_renderers_share_the_base_interface() -> None:
    tokens = parse("**x** & y")
    renderers: list[Renderer] = [PlainRenderer(), MatrixHtmlRenderer()]
    assert [r.render(tokens) for r in renderers] == ["x & y", "<p><strong>x</strong> &amp; y</p>"]
    assert [r.escape_text("<a&b>") for r in renderers] == ["<a&b>", "&lt;a&amp;b&gt;"]
    assert renderers[1].render_markdown("# t") == "<h1>t</h1>"


# --- Matrix allowlist, checked by an HTML parser ----------------------------------------------


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, attrs))


def _assert_within_allowlist(fragment: str) -> None:
    parser = _Tags()
    parser.feed(fragment)
    parser.close()
    for tag, attrs in parser.found:
        assert tag in MATRIX_TAGS, (tag, fragment)
        for name, value in attrs:
            assert name in MATRIX_ATTRIBUTES.get(tag, frozenset()), (tag, name, fragment)
            value = value or ""
            if name == "href":
                assert re.match(r"(https?|mailto):", value, re.IGNORECASE), value
            if name == "src":
                assert value.startswith("mxc://"), value
            if name == "class":
                assert re.fullmatch(r"language-\S+", value), value


_HOSTILE = st.sampled_from(
    [
        "<script>",
        "</script>",
        "<img src=x onerror=y>",
        "<a href='javascript:x'>",
        "javascript:",
        "[a](javascript:x)",
        "[a](https://ok.org)",
        "![i](http://x/i.png)",
        "<https://x.org>",
        "```js onload=1\n",
        "```\n",
        "<style>",
        '"',
        "'",
        "&",
        "<",
        ">",
        "**",
        "~~",
        "|",
        "|-|",
        "\n",
        "\n\n",
        "- ",
        "> ",
        "# ",
        "x",
        " ",
    ]
)
_hostile_markdown = st.lists(_HOSTILE, max_size=40).map("".join)


@settings(max_examples=300, deadline=None)
@given(_hostile_markdown)
def test_matrix_html_never_leaves_the_allowlist(markdown: str) -> None:
    _assert_within_allowlist(markdown_to_html(markdown))


# --- console ----------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_console_on_a_terminal_renders_headings_tables_and_coloured_code() -> None:
    out = _Terminal()
    console = ConsoleTransport(stdin=io.StringIO(""), stdout=out, user="op")
    text = "# Title\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```python\ndef f():\n    return 1\n```"
    await console.send(CONSOLE_SESSION, Reply(text))
    written = out.getvalue()
    assert "\x1b[" in written, "a terminal gets ANSI styling"
    plain = re.sub(r"\x1b\[[0-9;]*m", "", written)
    assert "Title" in plain and "#" not in plain
    assert re.search(r"a +b *\n *─+ *\n *1 +2", plain), "the table is drawn in columns"
    assert "def f():" in plain and "```" not in plain


async def test_console_piped_prints_plain_text() -> None:
    out = io.StringIO()
    console = ConsoleTransport(stdin=io.StringIO(""), stdout=out, user="op")
    await console.send(CONSOLE_SESSION, Reply("# Title\n\n**bold** `x`"))
    assert out.getvalue() == "Title\n\nbold x\n"


# --- splitting: properties over generated Markdown --------------------------------------------

_WORDS = st.sampled_from(["alpha", "béta", "漢字", "😀", "x_y", "**b**", "`c`", "[l](u)", "~~s~~"])
_inline = st.lists(_WORDS, min_size=1, max_size=30).map(" ".join)
_long_word = st.text(st.sampled_from("abcé漢😀"), min_size=100, max_size=300)


@st.composite
def _block(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["para", "heading", "list", "table", "fence", "quote", "long"]))
    if kind == "heading":
        return "#" * draw(st.integers(1, 6)) + " " + draw(_inline)
    if kind == "list":
        items = draw(st.lists(st.tuples(st.integers(0, 2), _inline), min_size=1, max_size=6))
        return "\n".join("  " * depth + "- " + text for depth, text in items)
    if kind == "table":
        rows = draw(st.lists(st.tuples(_WORDS, _WORDS), min_size=1, max_size=8))
        return "| h1 | h2 |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    if kind == "fence":
        marker = draw(st.sampled_from(["```", "~~~", "````"]))
        info = draw(st.sampled_from(["", "python", "sh {.x}"]))
        body = draw(st.lists(st.one_of(_inline, _long_word, st.just("")), max_size=15))
        return "\n".join([marker + info, *body, marker])
    if kind == "quote":
        return "> " + draw(_inline)
    if kind == "long":
        return draw(_long_word)
    return "\n".join(draw(st.lists(_inline, min_size=1, max_size=4)))


def _join_blocks(blocks: list[str]) -> str:
    # Each table gets a header of its own, so that a header seen twice was repeated by a cut.
    numbered = iter(range(len(blocks)))
    return "\n\n".join(
        re.sub(r"^\| h1 \| h2 \|", lambda _: f"| h1 | t{next(numbered)} |", block)
        for block in blocks
    )


_document = st.lists(_block(), min_size=1, max_size=10).map(_join_blocks)
_SPLIT_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _size(text: str, unit: str) -> int:
    return len(text) if unit == "chars" else len(text.encode())


def _unclosed_fences(text: str) -> int:
    lines = text.split("\n")
    count = 0
    for token in parse(text):
        if token.type == "fence" and token.map is not None:
            start, end = token.map
            last = lines[end - 1].strip()
            closed = end - start >= 2 and last.startswith(token.markup) and not last.strip(last[0])
            count += not closed
    return count


def _visible(text: str) -> str:
    """The plain rendering without whitespace and table rules: what a reader sees.

    Whitespace is left out because a cut line shows its halves on two lines; table rules
    because their width follows the widest cell of each chunk. Re-opened fences add nothing
    visible (fence lines are not rendered).
    """
    return "".join(c for c in markdown_to_plain(text) if not c.isspace() and c not in "─┼│")


def _trailing_table_header(chunk: str) -> list[str] | None:
    """The header rows of a table that runs to the end of ``chunk`` (and may continue)."""
    lines = chunk.split("\n")
    tables = [t.map for t in parse(chunk) if t.type == "table_open" and t.map is not None]
    if tables and tables[-1][1] >= len(lines):
        return lines[tables[-1][0] : tables[-1][0] + 2]
    return None


def _joined_visible(chunks: list[str]) -> str:
    """The visible text of ``chunks``, a table header repeated by a cut counted once."""
    out, header = [], None
    for chunk in chunks:
        seen = _visible(chunk)
        if header is not None and chunk.split("\n")[:2] == header:
            repeated = _visible("\n".join(header))
            assert seen.startswith(repeated)
            seen = seen[len(repeated) :]
        out.append(seen)
        header = _trailing_table_header(chunk)
    return "".join(out)


@_SPLIT_SETTINGS
@given(text=_document, limit=st.integers(40, 400), unit=st.sampled_from(["chars", "bytes"]))
def test_every_chunk_fits_and_none_is_empty(text: str, limit: int, unit: str) -> None:
    chunks = split_markdown(text, limit, unit=unit)  # type: ignore[arg-type]
    assert chunks
    for chunk in chunks:
        assert 0 < _size(chunk, unit) <= limit
        assert chunk.strip()


@_SPLIT_SETTINGS
@given(text=_document, limit=st.integers(60, 400), unit=st.sampled_from(["chars", "bytes"]))
def test_fences_are_balanced_in_every_chunk(text: str, limit: int, unit: str) -> None:
    for chunk in split_markdown(text, limit, unit=unit):  # type: ignore[arg-type]
        assert _unclosed_fences(chunk) == 0, chunk


@_SPLIT_SETTINGS
@given(text=_document, limit=st.integers(60, 400))
# Found by this property: a chunk cut from a list item was dedented as a whole, and an
# indented code block after the list turned into a list item.
@example(
    text="alpha\n\n- "
    + "alpha " * 11
    + "alpha\n- "
    + "alpha " * 19
    + "alpha\n  - "
    + "alpha " * 7
    + "alpha\n\nalpha\n\n    - alpha",
    limit=244,
)
def test_plain_text_of_the_chunks_joined_is_the_plain_text_of_the_whole(
    text: str, limit: int
) -> None:
    # A hard cut inside a line (the last resort) can separate `**` from its partner, or the
    # rest of a list item from its marker, which changes what is rendered: lines with any
    # Markdown syntax are kept shorter than a chunk, so only plain lines are cut hard.
    syntax = re.compile(r"[*`\[~_|#>-]")
    assume(all(len(line) < limit // 2 or not syntax.search(line) for line in text.split("\n")))
    chunks = split_markdown(text, limit)
    assert _joined_visible(chunks) == _visible(text)


def test_a_fence_cut_in_bytes_is_reopened_with_its_info_string() -> None:
    text = "```python\n" + "\n".join(f"s = '漢字 {i}'" for i in range(40)) + "\n```"
    chunks = split_markdown(text, 100, unit="bytes")
    assert len(chunks) > 1
    for chunk in chunks:
        assert len(chunk.encode()) <= 100
        assert chunk.startswith("```python\n") and chunk.endswith("\n```")


def test_a_long_line_of_multibyte_text_is_cut_within_the_byte_limit() -> None:
    line = "漢" * 500
    chunks = split_markdown(line, 100, unit="bytes")
    assert all(0 < len(chunk.encode()) <= 100 for chunk in chunks)
    assert "".join(chunks) == line


def test_a_cut_table_repeats_its_header_in_every_chunk() -> None:
    rows = [f"| file_{i}.py | {i * 10} lines |" for i in range(12)]
    text = "| name | size |\n|---|---|\n" + "\n".join(rows)
    chunks = split_markdown(text, 120)
    assert len(chunks) > 1
    for chunk in chunks:
        assert chunk.startswith("| name | size |\n|---|---|\n")
        assert markdown_to_plain(chunk).startswith("name")
    assert [line for chunk in chunks for line in chunk.split("\n")[2:]] == rows
