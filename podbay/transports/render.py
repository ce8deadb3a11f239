"""Markdown for every platform: one parser, one token model, one small renderer per dialect.

Every reply is Markdown. It is parsed once, by markdown-it-py (CommonMark plus GFM tables and
strikethrough), into a flat list of markdown-it ``Token`` whose ``.map`` holds the source line
range of each block. Raw HTML is *not* recognised: ``<b>`` or ``List<T>`` in a reply shows as
written on every platform, which is what agent output needs. That list, from :func:`parse`, is
the one model of a reply:

- :func:`split_markdown` cuts the *source* into chunks on the block boundaries of the map, so
  each chunk is Markdown again and every chunk is rendered on its own;
- a :class:`Renderer` turns tokens into one platform's dialect.

Writing a renderer (Slack mrkdwn and WhatsApp live in ``render_chat.py``)::

    class Renderer:
        def render(self, tokens: Sequence[Token]) -> str      # the reply, ready to send
        def escape_text(self, text: str) -> str               # user text, shown literally
        def render_markdown(self, text: str) -> str           # render(parse(text))

:class:`PlainRenderer` is a line-oriented renderer over the syntax tree
(``markdown_it.tree.SyntaxTreeNode``) meant to be subclassed. It dispatches every block node to
``block_<type>(node) -> list[str]`` (lines, without a trailing newline) and every inline node to
``inline_<type>(node) -> str``; :meth:`PlainRenderer.blocks` and
:meth:`PlainRenderer.inline_children` render children (``blocks`` keeps one blank line between
blocks where the source had one). Literal text reaches the output only through
``inline_text``/``inline_code_inline``/``block_fence``…, which call :meth:`escape_text` where a
dialect needs it. A dialect overrides what differs, e.g. ``inline_strong`` returning
``f"*{self.inline_children(node)}*"``. :class:`MatrixHtmlRenderer` uses markdown-it's HTML
renderer, then nh3 with the allowlist the Matrix spec recommends for ``formatted_body``.

User text embedded in a Markdown reply (file names, command output) goes through
:func:`escape_markdown` or :func:`code_block`, so it cannot inject formatting.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import nh3
from markdown_it import MarkdownIt
from markdown_it.token import Token
from markdown_it.tree import SyntaxTreeNode

__all__ = [
    "MIN_SPLIT_LIMIT",
    "MatrixHtmlRenderer",
    "PlainRenderer",
    "Renderer",
    "Token",
    "code_block",
    "escape_markdown",
    "markdown_to_html",
    "markdown_to_plain",
    "parse",
    "split_markdown",
]

# html=False: raw HTML is text. Agents write `Vec<u8>` and `<details>` alike, and showing what
# was written beats a sanitiser silently eating it.
_MD = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])


_MAX_INLINE_NESTING = 32


def _flatten_deep(children: list[Token]) -> list[Token]:
    """``children`` with emphasis nested deeper than :data:`_MAX_INLINE_NESTING` left as
    written: markdown-it bounds block nesting but not emphasis pairs, and renderers recurse."""
    depth, out = 0, []
    for token in children:
        depth += max(token.nesting, 0)
        too_deep = depth > _MAX_INLINE_NESTING
        depth += min(token.nesting, 0)
        out.append(
            Token("text", "", 0, content=token.markup) if too_deep and token.nesting else token
        )
    return out


def parse(text: str) -> list[Token]:
    """The token stream of ``text``; block tokens carry ``.map`` = [first line, end line)."""
    tokens = _MD.parse(text)
    for token in tokens:
        if token.children and len(token.children) > 2 * _MAX_INLINE_NESTING:
            token.children = _flatten_deep(token.children)
    return tokens


class Renderer:
    """Renders the token stream of a reply into one platform's dialect."""

    def render(self, tokens: Sequence[Token]) -> str:
        raise NotImplementedError

    def escape_text(self, text: str) -> str:
        """``text`` (user text, already literal) so that it shows literally in this dialect."""
        raise NotImplementedError

    def render_markdown(self, text: str) -> str:
        return self.render(parse(text))


def _content_end(node: SyntaxTreeNode) -> int:
    """The line after the last source line holding content of ``node`` (not trailing blanks)."""
    while True:
        children = [child for child in node.children if child.map is not None]
        if not children or node.type in ("fence", "code_block", "table"):
            assert node.map is not None
            return node.map[1]
        node = children[-1]


RULE = "─" * 20


class PlainRenderer(Renderer):
    """Readable plain text: piped console output, Matrix ``body``, fallbacks."""

    bullet = "•"
    rule = RULE
    code_indent = "    "

    def render(self, tokens: Sequence[Token]) -> str:
        return "\n".join(self.blocks(SyntaxTreeNode(list(tokens))))

    def escape_text(self, text: str) -> str:
        return text

    # --- blocks ------------------------------------------------------------------------------

    def blocks(self, node: SyntaxTreeNode) -> list[str]:
        """The lines of ``node``'s block children, one blank line where the source had one."""
        out: list[str] = []
        previous_end: int | None = None
        for child in node.children:
            lines = self.block(child)
            if child.map is not None:
                if previous_end is not None and child.map[0] > previous_end and out:
                    out.append("")
                previous_end = _content_end(child)
            out.extend(lines)
        return out

    def block(self, node: SyntaxTreeNode) -> list[str]:
        method: Callable[[SyntaxTreeNode], list[str]] | None = getattr(
            self, f"block_{node.type}", None
        )
        return method(node) if method is not None else self.blocks(node)

    def block_paragraph(self, node: SyntaxTreeNode) -> list[str]:
        return self.inline_children(node).split("\n")

    def block_inline(self, node: SyntaxTreeNode) -> list[str]:
        return self.inline_children(node).split("\n")

    def block_heading(self, node: SyntaxTreeNode) -> list[str]:
        return self.inline_children(node).split("\n")

    def block_hr(self, node: SyntaxTreeNode) -> list[str]:
        return [self.rule]

    def block_blockquote(self, node: SyntaxTreeNode) -> list[str]:
        return [f"> {line}" if line else ">" for line in self.blocks(node)]

    def list_marker(self, item: SyntaxTreeNode, number: int | None) -> str:
        if number is None:
            return self.bullet
        return f"{number}{item.markup or '.'}"

    def _list(self, node: SyntaxTreeNode, ordered: bool) -> list[str]:
        start = node.attrs.get("start", 1) if ordered else None
        number = int(start) if start is not None else None
        out: list[str] = []
        previous_end: int | None = None
        for item in node.children:
            marker = self.list_marker(item, number) + " "
            if item.map is not None:
                if previous_end is not None and item.map[0] > previous_end:
                    out.append("")
                previous_end = _content_end(item)
            lines = self.blocks(item) or [""]
            out.append((marker + lines[0]).rstrip())
            pad = " " * len(marker)
            out.extend(pad + line if line else line for line in lines[1:])
            if number is not None:
                number += 1
        return out

    def block_bullet_list(self, node: SyntaxTreeNode) -> list[str]:
        return self._list(node, ordered=False)

    def block_ordered_list(self, node: SyntaxTreeNode) -> list[str]:
        return self._list(node, ordered=True)

    def code_lines(self, node: SyntaxTreeNode) -> list[str]:
        return node.content.removesuffix("\n").split("\n")

    def block_fence(self, node: SyntaxTreeNode) -> list[str]:
        return [self.code_indent + line if line else line for line in self.code_lines(node)]

    def block_code_block(self, node: SyntaxTreeNode) -> list[str]:
        return self.block_fence(node)

    def block_html_block(self, node: SyntaxTreeNode) -> list[str]:
        return self.escape_text(node.content.removesuffix("\n")).split("\n")

    def table_rows(self, node: SyntaxTreeNode) -> list[list[str]]:
        """The table's cells as text, header row first."""
        rows: list[list[str]] = []
        for section in node.children:
            for row in section.children:
                rows.append(
                    [self.inline_children(cell).replace("\n", " ") for cell in row.children]
                )
        return rows

    def block_table(self, node: SyntaxTreeNode) -> list[str]:
        rows = self.table_rows(node)
        widths = [
            max(len(row[i]) if i < len(row) else 0 for row in rows) for i in range(len(rows[0]))
        ]
        lines = [
            " │ ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip()
            for row in rows
        ]
        lines.insert(1, "─┼─".join("─" * w for w in widths))
        return lines

    # --- inline ------------------------------------------------------------------------------

    def inline_children(self, node: SyntaxTreeNode) -> str:
        return "".join(self.inline(child) for child in node.children)

    def inline(self, node: SyntaxTreeNode) -> str:
        method: Callable[[SyntaxTreeNode], str] | None = getattr(self, f"inline_{node.type}", None)
        return method(node) if method is not None else self.inline_children(node)

    def inline_text(self, node: SyntaxTreeNode) -> str:
        return self.escape_text(node.content)

    def inline_code_inline(self, node: SyntaxTreeNode) -> str:
        return self.escape_text(node.content)

    def inline_html_inline(self, node: SyntaxTreeNode) -> str:
        return self.escape_text(node.content)

    def inline_softbreak(self, node: SyntaxTreeNode) -> str:
        # Chat replies are written line by line (status reports, lists made of "•" lines).
        return "\n"

    def inline_hardbreak(self, node: SyntaxTreeNode) -> str:
        return "\n"

    def link_url(self, node: SyntaxTreeNode) -> str:
        """The target of a link or image, as a reader would type it."""
        url = str(node.attrs.get("href", node.attrs.get("src", "")))
        return _MD.normalizeLinkText(url)

    def inline_link(self, node: SyntaxTreeNode) -> str:
        label, url = self.inline_children(node), self.link_url(node)
        if node.markup == "autolink" or label in ("", url, url.removeprefix("mailto:")):
            return self.escape_text(url) if node.markup != "autolink" else label
        return f"{label} ({self.escape_text(url)})"

    def inline_image(self, node: SyntaxTreeNode) -> str:
        return self.inline_link(node)


# --- Matrix -----------------------------------------------------------------------------------

# The tags and attributes the Matrix client-server spec recommends for `formatted_body`
# (section "m.room.message msgtypes", HTML). Links keep only http, https and mailto.
MATRIX_TAGS = frozenset(
    (
        "font",
        "del",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "blockquote",
        "p",
        "a",
        "ul",
        "ol",
        "sup",
        "sub",
        "li",
        "b",
        "i",
        "u",
        "strong",
        "em",
        "strike",
        "code",
        "hr",
        "br",
        "div",
        "table",
        "thead",
        "tbody",
        "tr",
        "th",
        "td",
        "caption",
        "pre",
        "span",
        "img",
        "details",
        "summary",
    )
)
MATRIX_ATTRIBUTES: dict[str, frozenset[str]] = {
    "font": frozenset({"data-mx-bg-color", "data-mx-color", "color"}),
    "span": frozenset({"data-mx-bg-color", "data-mx-color", "data-mx-spoiler"}),
    "a": frozenset({"href", "target"}),
    "img": frozenset({"width", "height", "alt", "title", "src"}),
    "ol": frozenset({"start"}),
    "code": frozenset({"class"}),
}
MATRIX_LINK_SCHEMES = frozenset({"http", "https", "mailto"})
_LANGUAGE_CLASS = re.compile(r"language-[A-Za-z0-9_+#.-]{1,40}")


def _matrix_attribute(tag: str, attribute: str, value: str) -> str | None:
    if tag == "img" and attribute == "src":
        return value if value.startswith("mxc://") else None  # the spec: only mxc images
    if tag == "a" and attribute == "href":
        scheme = value.split(":", 1)[0].lower() if ":" in value else ""
        return value if scheme in MATRIX_LINK_SCHEMES else None
    if tag == "code" and attribute == "class":
        return value if _LANGUAGE_CLASS.fullmatch(value) else None
    return value


def sanitize_matrix_html(fragment: str) -> str:
    """``fragment`` with only what the Matrix ``formatted_body`` allowlist permits."""
    return nh3.clean(
        fragment,
        tags=set(MATRIX_TAGS),
        clean_content_tags={"script", "style"},
        attributes={tag: set(names) for tag, names in MATRIX_ATTRIBUTES.items()},
        attribute_filter=_matrix_attribute,
        url_schemes=set(MATRIX_LINK_SCHEMES) | {"mxc"},
        link_rel=None,
        strip_comments=True,
    )


class MatrixHtmlRenderer(Renderer):
    """``org.matrix.custom.html`` for ``formatted_body``; the ``body`` is :class:`PlainRenderer`."""

    def __init__(self) -> None:
        self._md = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable(
            ["table", "strikethrough"]
        )
        rules = self._md.add_render_rule
        rules("image", self._image)
        rules("fence", self._fence)
        # markdown-it writes <s>, which the Matrix allowlist does not have; <del> means the same.
        rules("s_open", lambda *_: "<del>")
        rules("s_close", lambda *_: "</del>")

    @staticmethod
    def _image(
        self: object, tokens: Sequence[Token], idx: int, options: object, env: object
    ) -> str:
        # Matrix shows only mxc:// images; any other image becomes a link to it.
        token = tokens[idx]
        src = str(token.attrs.get("src", ""))
        alt = html.escape(token.content or src)
        if src.startswith("mxc://"):
            return f'<img src="{html.escape(src)}" alt="{alt}">'
        return f'<a href="{html.escape(src)}">{alt}</a>'

    @staticmethod
    def _fence(
        self: object, tokens: Sequence[Token], idx: int, options: object, env: object
    ) -> str:
        token = tokens[idx]
        language = token.info.strip().split(maxsplit=1)[0] if token.info.strip() else ""
        cls = f' class="language-{html.escape(language)}"' if language else ""
        return f"<pre><code{cls}>{html.escape(token.content)}</code></pre>\n"

    def render(self, tokens: Sequence[Token]) -> str:
        rendered = self._md.renderer.render(list(tokens), self._md.options, {})
        return sanitize_matrix_html(rendered).strip()

    def escape_text(self, text: str) -> str:
        return html.escape(text)


_PLAIN = PlainRenderer()
_MATRIX = MatrixHtmlRenderer()


def markdown_to_plain(text: str) -> str:
    """Render Markdown as readable plain text."""
    return _PLAIN.render(parse(text))


def markdown_to_html(text: str) -> str:
    """Render Markdown as Matrix ``formatted_body`` HTML, sanitised to the spec's allowlist."""
    return _MATRIX.render(parse(text))


# --- splitting --------------------------------------------------------------------------------

MIN_SPLIT_LIMIT = 40
"""Smallest ``limit`` :func:`split_markdown` accepts; fence overhead needs room."""

Unit = Literal["chars", "bytes"]

_FENCE_CLOSE = re.compile(r"[ \t]*(?P<marker>`{3,}|~{3,})[ \t]*")
# A line starting like this may be a fence line; hard-split pieces must never start like this.
_FENCE_PREFIX = re.compile(r"[ \t]*(?:```|~~~)")
_FENCE_OPEN = re.compile(r"[ \t]*(?:`{3,}(?P<info>[^`]*)|~{3,}.*)")


@dataclass(frozen=True)
class _Fence:
    """What a cut block repeats: a fenced code block opened on ``open_lines`` (as written in
    the source) and closed by ``close_line``, or a table (``marker`` empty) whose header rows
    are repeated and which has nothing to close."""

    open_lines: tuple[str, ...]
    indent: str
    marker: str

    @property
    def close_line(self) -> str | None:
        return self.indent + self.marker if self.marker else None

    def closed_by(self, line: str) -> bool:
        if not self.marker:
            return _FENCE_OPEN.fullmatch(line) is not None  # a table: no fence may start a piece
        m = _FENCE_CLOSE.fullmatch(line)
        return (
            m is not None
            and m["marker"][0] == self.marker[0]
            and len(m["marker"]) >= len(self.marker)
        )


def _is_blank(line: str) -> bool:
    return not line.strip()


def _strip_blank_lines(lines: list[str]) -> list[str]:
    start, end = 0, len(lines)
    while start < end and _is_blank(lines[start]):
        start += 1
    while end > start and _is_blank(lines[end - 1]):
        end -= 1
    return lines[start:end]


@dataclass
class _Block:
    """A run of lines or a fenced block, with the blank lines that separate it from the previous."""

    sep: list[str]
    lines: list[str]
    fence: _Fence | None = None
    closed: bool = True
    # Per line of ``lines``: it continues a list item begun on an earlier line.
    in_list: tuple[bool, ...] = ()


def _fences(tokens: Sequence[Token], lines: list[str]) -> dict[int, tuple[int, _Fence, bool]]:
    """Fenced blocks the parser found, by first line: (end line, fence, closed).

    A fence inside a block quote is left out: its lines carry the ``>`` prefix, so re-opening
    it in a new chunk would take more than its opening line; it is split like text.
    """
    found: dict[int, tuple[int, _Fence, bool]] = {}
    quotes = 0
    for token in tokens:
        if token.type == "blockquote_open":
            quotes += 1
        elif token.type == "blockquote_close":
            quotes -= 1
        elif token.type == "table_open" and token.map is not None and not quotes:
            # Rows cut off their header would be read as text: the header goes with every cut.
            start, end = token.map
            if end - start > 2 and token.level == 0:
                found[start] = (end, _Fence(tuple(lines[start : start + 2]), "", ""), False)
        elif token.type == "fence" and token.map is not None and not quotes:
            start, end = token.map
            line = lines[start]
            indent = line[: len(line) - len(line.lstrip(" \t"))]
            if not line.lstrip(" \t").startswith(token.markup):
                continue  # opened after a list marker ("- ```"): not repeatable on its own
            fence = _Fence((line,), indent, token.markup)
            closed = end - start >= 2 and fence.closed_by(lines[end - 1])
            found[start] = (end, fence, closed)
    return found


def _parse_blocks(lines: list[str]) -> list[_Block]:
    tokens = parse("\n".join(lines))
    fences = _fences(tokens, lines)
    lists = [
        t.map
        for t in tokens
        if t.type in ("bullet_list_open", "ordered_list_open") and t.level == 0 and t.map
    ]
    blocks: list[_Block] = []
    sep: list[str] = []
    i = 0
    while i < len(lines):
        if i in fences:
            end, fence, closed = fences[i]
            blocks.append(_Block(sep, lines[i:end], fence, closed))
            sep = []
        elif _is_blank(lines[i]):
            sep.append(lines[i])
            end = i + 1
        else:
            end = i + 1
            while end < len(lines) and not _is_blank(lines[end]) and end not in fences:
                end += 1
            in_list = tuple(any(start < j < stop for start, stop in lists) for j in range(i, end))
            blocks.append(_Block(sep, lines[i:end], in_list=in_list))
            sep = []
        i = end
    return blocks


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


class _Splitter:
    """Greedy packer of blocks into chunks; tracks an open fence to close and re-open it."""

    def __init__(self, limit: int, size_of: Callable[[str], int]) -> None:
        self.limit = limit
        self.size_of = size_of
        self.chunks: list[str] = []
        self.cur: list[str] = []
        self.cur_in_list: list[bool] = []  # per line of self.cur: inside a list item
        self.size = 0  # size_of("\n".join(self.cur))
        self.fence: _Fence | None = None
        self.reserve = 0  # room kept for "\n" + the line closing self.fence
        self.reopened = False  # self.cur starts with a re-opening line we added
        self.has_body = False  # self.cur holds a non-blank line since the last (re)opening
        self.in_list = False  # the block being added continues a list item
        self.dedent = False  # self.cur starts inside a list item: its indentation must go

    def text_size(self, lines: list[str]) -> int:
        return sum(map(self.size_of, lines)) + len(lines) - 1

    def fits(self, lines: list[str], reserve: int | None = None) -> bool:
        extra = sum(map(self.size_of, lines)) + len(lines) - (0 if self.cur else 1)
        return self.size + extra + (self.reserve if reserve is None else reserve) <= self.limit

    def room(self) -> int:
        return self.limit - self.size - (1 if self.cur else 0) - self.reserve

    def append(self, line: str) -> None:
        if not self.cur:
            self.dedent = self.in_list
        self.size += self.size_of(line) + (1 if self.cur else 0)
        self.cur.append(line)
        self.cur_in_list.append(self.in_list)
        self.has_body = self.has_body or not _is_blank(line)

    def flush(self) -> None:
        lines = self.cur
        if self.dedent and lines:
            # Cut from its list item, a nested item or paragraph indented 4 or more would
            # read as an indented code block: the rest of that item starts the chunk at the
            # left margin. Only the item's own lines move; what follows the list (an
            # indented code block, say) keeps its indentation.
            first = next((ln for ln in lines if not _is_blank(ln)), "")
            n = len(first) - len(first.lstrip(" "))
            moved: list[str] = []
            for index, line in enumerate(lines):
                if not self.cur_in_list[index] and not _is_blank(line):
                    moved += lines[index:]
                    break
                moved.append(line[min(n, len(line) - len(line.lstrip(" "))) :])
            lines = moved
        if self.fence is not None:
            # A re-opened fence holding only blank lines is not worth a message.
            close = [] if self.fence.close_line is None else [self.fence.close_line]
            lines = [] if self.reopened and not self.has_body else [*lines, *close]
        lines = _strip_blank_lines(lines)
        text = "\n".join(lines)
        if text:
            self.chunks.append(text)
        self.cur, self.size, self.has_body, self.reopened = [], 0, False, False
        self.cur_in_list = []

    def break_chunk(self) -> None:
        self.flush()
        if self.fence is not None:
            for line in self.fence.open_lines:
                self.append(line)
            self.reopened, self.has_body = True, False

    def add_block(self, block: _Block) -> None:
        self.in_list = bool(block.in_list) and block.in_list[0]
        lines = [*block.sep, *block.lines] if self.cur else block.lines
        if self.fits(lines):
            for line in lines:
                self.append(line)
        elif self.text_size(block.lines) <= self.limit:
            # Moving the block whole to a new chunk beats splitting it.
            self.break_chunk()
            for line in block.lines:
                self.append(line)
        elif block.fence is not None and self._fence_reserve(block) is not None:
            self.add_fence(block)
        else:
            flags = [False] * (len(lines) - len(block.lines)) + list(block.in_list)
            flags += [False] * (len(lines) - len(flags))
            for line, in_list in zip(lines, flags, strict=True):
                self.in_list = in_list
                self.add_line(line)
        self.in_list = False

    def _fence_reserve(self, block: _Block) -> int | None:
        """Room to keep for closing ``block``'s fence, or None if the fence is too costly to repeat.

        Repeating fence lines that fill more than half of every chunk would flood the chat with
        tiny messages; such a block is split like text instead, leaving its chunks unbalanced.
        """
        assert block.fence is not None
        closing = self.size_of(block.lines[-1]) if block.closed else 0
        close_line = block.fence.close_line
        reserve = 0 if close_line is None else 1 + max(self.size_of(close_line), closing)
        fits = self.text_size(list(block.fence.open_lines)) + 1 + reserve <= self.limit // 2
        return reserve if fits else None

    def add_fence(self, block: _Block) -> None:
        fence, reserve = block.fence, self._fence_reserve(block)
        assert fence is not None and reserve is not None
        head = len(fence.open_lines)
        body = block.lines[head:-1] if block.closed else block.lines[head:]
        lead = next((i for i, line in enumerate(body) if not _is_blank(line)), len(body))
        # Don't leave the opening line at the end of a chunk with no code after it.
        if self.cur and not self.fits(
            [*block.sep, *block.lines[:head], *body[: lead + 1]], reserve
        ):
            self.break_chunk()
        opening = list(fence.open_lines)
        for line in [*block.sep, *opening] if self.cur else opening:
            self.append(line)
        self.fence, self.reserve, self.has_body = fence, reserve, False
        for line in body:
            self.add_line(line)
        if block.closed:
            self.append(block.lines[-1])  # the reserve keeps room for it
        self.fence, self.reserve = None, 0

    def add_line(self, line: str) -> None:
        if not self.cur and _is_blank(line):
            return
        if self.fits([line]):
            self.append(line)
            return
        # Without code yet, a first chunk of a fence would be sent empty: split the line instead.
        if self.has_body or self.reopened:
            self.break_chunk()
            if self.fits([line]):
                if self.cur or not _is_blank(line):
                    self.append(line)
                return
        self.hard_split(line)

    def hard_split(self, line: str) -> None:
        """The last resort: ``line`` alone is longer than a chunk."""
        start = 0
        while self.size_of(line[start:]) > (room := self.room()):
            # Fences are only closed and re-opened when a fresh chunk has room (_fence_reserve).
            assert room > 0
            cut = self._cut(line, start, room)
            self.append(line[start:cut])
            self.break_chunk()
            start = cut
        self.append(line[start:])

    def _fitting_end(self, line: str, start: int, room: int) -> int:
        """The largest end such that ``line[start:end]`` takes at most ``room``."""
        end = min(len(line), start + room)  # a character takes at least one unit
        while end > start + 1 and self.size_of(line[start:end]) > room:
            end -= max(1, (self.size_of(line[start:end]) - room) // 4)
        return end

    def _cut(self, line: str, start: int, room: int) -> int:
        """Where the next piece of ``line`` ends: after a space if one is near, never at a fence."""
        end = self._fitting_end(line, start, room)
        span = end - start
        space = max(line.rfind(" ", start, end), line.rfind("\t", start, end))
        candidates = [space + 1] if space - start >= span // 2 else []
        candidates.extend(range(end, start, -1))
        for cut in candidates:
            if not _FENCE_PREFIX.match(line, cut) and not self._is_fence_line(line[start:cut]):
                return cut
        return end

    def _is_fence_line(self, piece: str) -> bool:
        if self.fence is not None:
            return self.fence.closed_by(piece)
        return _FENCE_OPEN.fullmatch(piece) is not None


def split_markdown(text: str, limit: int, *, unit: Unit = "chars") -> list[str]:
    """Split a Markdown reply into chunks of at most ``limit`` characters (or UTF-8 bytes).

    Splits between the blocks the parser finds, then at blank lines, else at line ends, else
    inside a line (the last resort); keeps fenced blocks whole when they fit, otherwise closes
    the fence at the end of a chunk and re-opens it, with its info string, in the next. Text
    that fits comes back as is, without outer blank lines; no chunk is empty. Fences stay
    balanced unless the input leaves one open (the last chunk then does too) or its fence
    lines would take over half of every chunk.
    """
    if limit < MIN_SPLIT_LIMIT:
        raise ValueError(f"limit must be at least {MIN_SPLIT_LIMIT}, got {limit}")
    size_of: Callable[[str], int] = len if unit == "chars" else _utf8_len
    lines = _strip_blank_lines(text.split("\n"))
    whole = "\n".join(lines)
    if not whole:
        return []
    if size_of(whole) <= limit:
        return [whole]
    splitter = _Splitter(limit, size_of)
    for block in _parse_blocks(lines):
        splitter.add_block(block)
    splitter.flush()
    return splitter.chunks


# --- embedding user text ----------------------------------------------------------------------

_ESCAPED = re.compile(r"[\\`*_{}\[\]()#+\-.!|>~<&]")


def split_rendered(
    text: str, limit: int, render: Callable[[str], str], *, unit: Unit = "chars"
) -> list[str]:
    """Markdown chunks whose *rendered* form fits ``limit`` (characters or UTF-8 bytes).

    Rendering changes the size (Slack escapes ``&`` and ``<``, WhatsApp writes links as
    ``label (url)``, tables are padded), so a chunk that fits as Markdown may not fit as
    the platform's message: such a chunk is split again, with a limit shrunk by how much
    rendering grew it, until every rendered chunk fits.
    """
    size_of: Callable[[str], int] = len if unit == "chars" else _utf8_len
    fitted: list[str] = []
    pending = list(reversed(split_markdown(text, limit, unit=unit)))
    while pending:
        chunk = pending.pop()
        rendered = size_of(render(chunk))
        markdown = size_of(chunk)
        if rendered <= limit or markdown <= MIN_SPLIT_LIMIT:
            fitted.append(chunk)
            continue
        # Shrink by the growth (with a margin), and at least by a tenth, so this ends.
        smaller = min(int(markdown * limit / rendered * 0.95), markdown - max(1, markdown // 10))
        smaller = max(MIN_SPLIT_LIMIT, smaller)
        pending.extend(reversed(split_markdown(chunk, smaller, unit=unit)))
    return fitted


def escape_markdown(text: str) -> str:
    """Backslash-escape Markdown punctuation (and ``&``, which starts entities) so ``text``
    shows literally."""
    return _ESCAPED.sub(r"\\\g<0>", text)


def code_block(text: str, info: str = "") -> str:
    """Wrap ``text`` in a fenced code block that no line of ``text`` can close.

    One trailing newline of ``text`` is dropped so it does not become an empty code line.
    """
    if re.search(r"[`\r\n]", info):
        raise ValueError(f"info string must be one line without backticks: {info!r}")
    longest = max(map(len, re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    body = text.removesuffix("\n")
    return f"{fence}{info}\n{body}\n{fence}"
