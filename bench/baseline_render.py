# Pre-markdown-it renderer (regular expressions), kept as the baseline for bench/render.py.
# It is podbay/transports/render.py as of commit 6efd35a, copied verbatim below, so that one
# benchmark run compares the markdown-it-py renderers with the code they replaced.
# Not imported by podbay; do not fix bugs here: it must stay what was measured against.

"""Platform-neutral Markdown helpers for transports: splitting, plain text, escaping, code blocks.

Markdown is the source format of every reply; each transport renders it for its platform and
uses these pieces to respect message size limits and to embed user text literally.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

MIN_SPLIT_LIMIT = 40
"""Smallest ``limit`` :func:`split_markdown` accepts; fence overhead needs room."""

# Any indentation is accepted (CommonMark allows 0-3 spaces) so that fences nested in list items
# are recognised too: mistaking a rare indented-code line for a fence costs less than cutting a
# real fenced block without closing it.
_FENCE_OPEN = re.compile(r"(?P<indent>[ \t]*)(?P<marker>`{3,}|~{3,})(?P<info>.*)")
_FENCE_CLOSE = re.compile(r"[ \t]*(?P<marker>`{3,}|~{3,})\s*")
# A line starting like this may be a fence line; hard-split pieces must never start like this.
_FENCE_PREFIX = re.compile(r"[ \t]*(?:```|~~~)")


@dataclass(frozen=True)
class _Fence:
    """An opened fenced code block."""

    open_line: str
    indent: str
    marker: str

    @property
    def close_line(self) -> str:
        return self.indent + self.marker

    def closed_by(self, line: str) -> bool:
        m = _FENCE_CLOSE.fullmatch(line)
        return (
            m is not None
            and m["marker"][0] == self.marker[0]
            and len(m["marker"]) >= len(self.marker)
        )


def _open_fence(line: str) -> _Fence | None:
    """The fence ``line`` opens, if it is an opening fence line."""
    m = _FENCE_OPEN.fullmatch(line)
    # A backtick in the info string makes it inline code, not a fence (CommonMark).
    if m is None or (m["marker"][0] == "`" and "`" in m["info"]):
        return None
    return _Fence(line, m["indent"], m["marker"])


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
    """A paragraph or a fenced block, with the blank lines that separate it from the previous."""

    sep: list[str]
    lines: list[str]
    fence: _Fence | None = None
    closed: bool = True


def _parse_blocks(lines: list[str]) -> list[_Block]:
    blocks: list[_Block] = []
    sep: list[str] = []
    i = 0
    while i < len(lines):
        fence = _open_fence(lines[i])
        if fence is not None:
            end = i + 1
            while end < len(lines) and not fence.closed_by(lines[end]):
                end += 1
            # An unclosed fence runs to the end of the text, as in CommonMark.
            closed = end < len(lines)
            end = end + 1 if closed else end
            blocks.append(_Block(sep, lines[i:end], fence, closed))
            sep = []
        elif _is_blank(lines[i]):
            sep.append(lines[i])
            end = i + 1
        else:
            end = i + 1
            while end < len(lines) and not _is_blank(lines[end]) and not _open_fence(lines[end]):
                end += 1
            blocks.append(_Block(sep, lines[i:end]))
            sep = []
        i = end
    return blocks


def _text_len(lines: list[str]) -> int:
    return sum(map(len, lines)) + len(lines) - 1


class _Splitter:
    """Greedy packer of blocks into chunks; tracks an open fence to close and re-open it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[str] = []
        self.cur: list[str] = []
        self.size = 0  # len("\n".join(self.cur))
        self.fence: _Fence | None = None
        self.reserve = 0  # room kept for "\n" + the line closing self.fence
        self.reopened = False  # self.cur starts with a re-opening line we added
        self.has_body = False  # self.cur holds a non-blank line since the last (re)opening

    def fits(self, lines: list[str], reserve: int | None = None) -> bool:
        extra = sum(map(len, lines)) + len(lines) - (0 if self.cur else 1)
        return self.size + extra + (self.reserve if reserve is None else reserve) <= self.limit

    def room(self) -> int:
        return self.limit - self.size - (1 if self.cur else 0) - self.reserve

    def append(self, line: str) -> None:
        self.size += len(line) + (1 if self.cur else 0)
        self.cur.append(line)
        self.has_body = self.has_body or not _is_blank(line)

    def flush(self) -> None:
        lines = self.cur
        if self.fence is not None:
            # A re-opened fence holding only blank lines is not worth a message.
            lines = [] if self.reopened and not self.has_body else [*lines, self.fence.close_line]
        text = "\n".join(_strip_blank_lines(lines))
        if text:
            self.chunks.append(text)
        self.cur, self.size, self.has_body, self.reopened = [], 0, False, False

    def break_chunk(self) -> None:
        self.flush()
        if self.fence is not None:
            self.append(self.fence.open_line)
            self.reopened, self.has_body = True, False

    def add_block(self, block: _Block) -> None:
        lines = [*block.sep, *block.lines] if self.cur else block.lines
        if self.fits(lines):
            for line in lines:
                self.append(line)
        elif _text_len(block.lines) <= self.limit:
            # Moving the block whole to a new chunk beats splitting it.
            self.break_chunk()
            for line in block.lines:
                self.append(line)
        elif block.fence is not None and self._fence_reserve(block) is not None:
            self.add_fence(block)
        else:
            for line in lines:
                self.add_line(line)

    def _fence_reserve(self, block: _Block) -> int | None:
        """Room to keep for closing ``block``'s fence, or None if the fence is too costly to repeat.

        Repeating fence lines that fill more than half of every chunk would flood the chat with
        tiny messages; such a block is split like text instead, leaving its chunks unbalanced.
        """
        assert block.fence is not None
        closing = len(block.lines[-1]) if block.closed else 0
        reserve = 1 + max(len(block.fence.close_line), closing)
        return reserve if len(block.fence.open_line) + 1 + reserve <= self.limit // 2 else None

    def add_fence(self, block: _Block) -> None:
        fence, reserve = block.fence, self._fence_reserve(block)
        assert fence is not None and reserve is not None
        body = block.lines[1:-1] if block.closed else block.lines[1:]
        lead = next((i for i, line in enumerate(body) if not _is_blank(line)), len(body))
        # Don't leave the opening line at the end of a chunk with no code after it.
        if self.cur and not self.fits([*block.sep, *block.lines[:1], *body[: lead + 1]], reserve):
            self.break_chunk()
        for line in [*block.sep, fence.open_line] if self.cur else [fence.open_line]:
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
        start = 0
        while len(line) - start > (room := self.room()):
            # Fences are only closed and re-opened when a fresh chunk has room (_fence_reserve).
            assert room > 0
            cut = self._cut(line, start, room)
            self.append(line[start:cut])
            self.break_chunk()
            start = cut
        self.append(line[start:])

    def _cut(self, line: str, start: int, room: int) -> int:
        """Where the next piece of ``line`` ends: after a space if one is near, never at a fence."""
        end = start + room
        space = max(line.rfind(" ", start, end), line.rfind("\t", start, end))
        candidates = [space + 1] if space - start >= room // 2 else []
        candidates.extend(range(end, start, -1))
        for cut in candidates:
            if not _FENCE_PREFIX.match(line, cut) and not self._is_fence_line(line[start:cut]):
                return cut
        return end

    def _is_fence_line(self, piece: str) -> bool:
        if self.fence is not None:
            return self.fence.closed_by(piece)
        return _open_fence(piece) is not None


def split_markdown(text: str, limit: int) -> list[str]:
    """Split a Markdown reply into chunks of at most ``limit`` characters.

    Splits at blank lines, else at line ends, else inside a line; keeps fenced blocks whole when
    they fit, otherwise closes the fence at the end of a chunk and re-opens it in the next. Text
    that fits comes back as is. Fences stay balanced unless the input leaves one open (the last
    chunk then does too) or its fence lines would take over half of every chunk.
    """
    if limit < MIN_SPLIT_LIMIT:
        raise ValueError(f"limit must be at least {MIN_SPLIT_LIMIT}, got {limit}")
    lines = _strip_blank_lines(text.split("\n"))
    whole = "\n".join(lines)
    if not whole:
        return []
    if len(whole) <= limit:
        return [whole]
    splitter = _Splitter(limit)
    for block in _parse_blocks(lines):
        splitter.add_block(block)
    splitter.flush()
    return splitter.chunks


_HEADING = re.compile(r"[ \t]{0,3}#{1,6}(?:[ \t]+(?P<title>.*?))?(?:[ \t]+#+)?[ \t]*")
_RULE = re.compile(r"[ \t]{0,3}(?:(?:-[ \t]*){3,}|(?:\*[ \t]*){3,}|(?:_[ \t]*){3,})")
_BULLET = re.compile(r"(?P<indent>[ \t]*)[-*+][ \t]+(?P<rest>.*)")
_QUOTE = re.compile(r"(?P<prefix>(?:[ \t]{0,3}>[ \t]?)+)(?P<rest>.*)")
# One left-to-right pass; the earliest match wins, so an escape or a code span consumes its
# characters before they can be taken as emphasis. Emphasis needs a non-word character outside
# its delimiters, which leaves snake_case_names and 2*3*4 alone.
_INLINE = re.compile(
    r"""
      \\(?P<esc>[!-/:-@\[-`{-~])
    | (?P<ticks>`+)(?P<code>.+?)(?<!`)(?P=ticks)(?!`)
    | <(?P<auto>[A-Za-z][A-Za-z0-9+.-]{1,31}:[^\s<>]*|[^\s<>@]+@[^\s<>@]+\.[^\s<>@]+)>
    | !?\[(?P<label>(?:\\.|[^\\\[\]])*)\]
      \((?P<url><[^<>\n]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)(?:[ \t]+(?:"[^"]*"|'[^']*'))?\)
    | (?<![\w*])\*\*(?=\S)(?P<strong>(?:\\.|[^\\])+?)(?<=\S)\*\*(?![\w*])
    | (?<!\w)__(?=\S)(?P<strong2>(?:\\.|[^\\])+?)(?<=\S)__(?!\w)
    | (?<![\w*])\*(?=[^\s*])(?P<em>(?:\\.|[^\\*])+?)(?<=\S)\*(?![\w*])
    | (?<!\w)_(?=[^\s_])(?P<em2>(?:\\.|[^\\_])+?)(?<=\S)_(?!\w)
    | ~~(?=\S)(?P<strike>(?:\\.|[^\\])+?)(?<=\S)~~
    """,
    re.VERBOSE,
)
_INNER_GROUPS = ("strong", "strong2", "em", "em2", "strike")
_MAX_NESTING = 16  # deeper emphasis is left as written rather than recursing without bound


def _inline_plain(m: re.Match[str], depth: int) -> str:
    for verbatim in ("esc", "code", "auto"):
        if m[verbatim] is not None:
            return m[verbatim]
    if m["label"] is not None:
        label, url = _inline(m["label"], depth), m["url"]
        if url.startswith("<"):
            url = url[1:-1]
        return url if label in ("", url) else f"{label} ({url})"
    inner = next(m[name] for name in _INNER_GROUPS if m[name] is not None)
    return _inline(inner, depth)


def _inline(text: str, depth: int = 0) -> str:
    if depth > _MAX_NESTING:
        return text
    return _INLINE.sub(lambda m: _inline_plain(m, depth + 1), text)


def _plain_line(line: str) -> str:
    prefix = ""
    if quote := _QUOTE.fullmatch(line):
        prefix, line = quote["prefix"], quote["rest"]
    if _RULE.fullmatch(line):
        return prefix + "─" * 20
    if heading := _HEADING.fullmatch(line):
        return prefix + _inline(heading["title"] or "")
    if bullet := _BULLET.fullmatch(line):
        return f"{prefix}{bullet['indent']}• {_inline(bullet['rest'])}"
    return prefix + _inline(line)


def markdown_to_plain(text: str) -> str:
    """Render Markdown as readable plain text (a small subset, not CommonMark)."""
    out: list[str] = []
    fence: _Fence | None = None
    for line in text.split("\n"):
        if fence is not None:
            if fence.closed_by(line):
                fence = None
            else:
                out.append("    " + line if line else line)
        elif (fence := _open_fence(line)) is None:
            out.append(_plain_line(line))
    return "\n".join(out)


_SAFE_SCHEMES = ("http://", "https://", "mailto:", "matrix:")


def _link(url: str, label: str) -> str:
    if not url.lower().startswith(_SAFE_SCHEMES):
        return label  # javascript: and friends never become links
    return f'<a href="{html.escape(url, quote=True)}">{label}</a>'


def _inline_html_match(m: re.Match[str], depth: int) -> str:
    if m["esc"] is not None:
        return html.escape(m["esc"])
    if m["code"] is not None:
        return f"<code>{html.escape(m['code'])}</code>"
    if m["auto"] is not None:
        return _link(m["auto"], html.escape(m["auto"]))
    if m["label"] is not None:
        url = m["url"][1:-1] if m["url"].startswith("<") else m["url"]
        return _link(url, _inline_html(m["label"], depth) or html.escape(url))
    for name, tag in (
        ("strong", "strong"),
        ("strong2", "strong"),
        ("em", "em"),
        ("em2", "em"),
        ("strike", "del"),
    ):
        if m[name] is not None:
            return f"<{tag}>{_inline_html(m[name], depth)}</{tag}>"
    return html.escape(m[0])


def _inline_html(text: str, depth: int = 0) -> str:
    if depth > _MAX_NESTING:
        return html.escape(text)
    out: list[str] = []
    pos = 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos : m.start()]))
        out.append(_inline_html_match(m, depth + 1))
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


def _html_line(line: str) -> str:
    prefix = ""
    if quote := _QUOTE.fullmatch(line):
        prefix, line = "&gt; " * quote["prefix"].count(">"), quote["rest"]
    if _RULE.fullmatch(line):
        return prefix + "<hr>"
    if heading := _HEADING.fullmatch(line):
        return f"{prefix}<strong>{_inline_html(heading['title'] or '')}</strong>"
    if bullet := _BULLET.fullmatch(line):
        indent = "&nbsp;" * len(bullet["indent"].expandtabs(4))
        return f"{prefix}{indent}• {_inline_html(bullet['rest'])}"
    return prefix + _inline_html(line)


def markdown_to_html(text: str) -> str:
    """Render Markdown as the small, safe HTML subset chat clients show (Matrix's
    ``org.matrix.custom.html``). Everything is escaped first, so no markup is injected."""
    out: list[str] = []
    code: list[str] = []
    fence: _Fence | None = None
    language = ""
    for line in text.split("\n"):
        if fence is not None:
            if fence.closed_by(line):
                cls = f' class="language-{html.escape(language, quote=True)}"' if language else ""
                out.append(f"<pre><code{cls}>{html.escape(chr(10).join(code))}</code></pre>")
                fence, code = None, []
            else:
                code.append(line)
        elif (opened := _open_fence(line)) is not None:
            fence = opened
            language = line.strip().lstrip("`~").strip().split(" ")[0]
        else:
            out.append(_html_line(line) + "<br>")
    if fence is not None:  # an unclosed fence still renders as code
        out.append(f"<pre><code>{html.escape(chr(10).join(code))}</code></pre>")
    rendered = "\n".join(out)
    while rendered.endswith("<br>"):
        rendered = rendered[: -len("<br>")].rstrip("\n")
    return rendered


_ESCAPED = re.compile(r"[\\`*_{}\[\]()#+\-.!|>~<]")


def escape_markdown(text: str) -> str:
    """Backslash-escape Markdown punctuation so ``text`` shows literally."""
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
