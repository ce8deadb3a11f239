"""Slack mrkdwn and WhatsApp text, rendered from the markdown-it token stream of a reply.

Both dialects are "chat markdown": ``*bold*``, ``_italic_``, ``~strike~``, backtick code, ``>``
quotes, and nothing else. Headings become bold lines, lists become ``•``/``1.`` lines, tables
become fenced monospace with aligned columns. Splitting to a platform limit is not done here:
split the *source* with ``render.split_markdown`` and render each chunk.

Escaping, the part that matters for safety:

- **Slack** decodes exactly ``&amp;``, ``&lt;`` and ``&gt;`` and treats ``<...>`` as a link,
  mention (``<@U123>``, ``<#C123>``) or special command (``<!channel>``, ``<!here>``). Text
  therefore has ``& < >`` entity-encoded, so ``<!channel>`` in a reply shows as written and
  pings nobody; only the ``<url|label>`` this renderer writes itself is left raw. Plain
  ``@channel``/``@here``/``@everyone`` are only mentions when a message is posted with
  ``link_names``/``parse=full``; they get a zero-width space after the ``@`` anyway, so a
  later change of posting options cannot turn user text into a ping.
- **WhatsApp** has no escape character at all. Its markers only format when they sit at a word
  boundary (``*bold*`` formats, ``a*b*c`` and ``snake_case_name`` do not), so a marker in text
  that is *not* between two letters/digits gets a zero-width space on each side, and a line of
  text that would start a quote or list (``>``, ``- ``, ``* ``, ``1. ``) gets one in front.
  This is best effort: WhatsApp documents no escaping and its parser is not public. Text that
  must arrive byte for byte (paths, command output) belongs in a code span or fence, inside
  which neither platform formats anything; only a run of three backticks, which would close
  the fence, is broken up there.

The same marker rule applies to Slack text, which formats on word boundaries the same way.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from markdown_it.token import Token
from markdown_it.tree import SyntaxTreeNode

from podbay.transports.render import _MAX_INLINE_NESTING, _flatten_deep, parse

__all__ = [
    "ChatRenderer",
    "SlackRenderer",
    "WhatsAppRenderer",
    "markdown_to_mrkdwn",
    "markdown_to_whatsapp",
]

ZWSP = "\u200b"
_MARKERS = frozenset("*_~`")
_MENTION = re.compile(r"@(?=(?:channel|here|everyone)\b)", re.IGNORECASE)
# Lines of text that a chat client would read as a quote or list item.
_LINE_START = re.compile(r"^(?=[ \t]*(?:>|&gt;|[-*+•][ \t]|\d{1,9}[.)][ \t]))", re.MULTILINE)
_TRIPLE_BACKTICK = re.compile(r"`(?=``)")
_LINK_SCHEMES = ("http:", "https:", "mailto:")
_EMPHASIS = {"strong": "*", "em": "_", "s": "~"}
_BULLETS = ("•", "◦", "▪")
RULE = "─" * 20


def _neutralise_markers(text: str) -> str:
    """``text`` with every ``* _ ~ ` `` that could open or close formatting fenced by ZWSPs."""
    if not any(c in _MARKERS for c in text):
        return text
    out: list[str] = []
    last = len(text) - 1
    for i, c in enumerate(text):
        if c in _MARKERS and not (0 < i < last and text[i - 1].isalnum() and text[i + 1].isalnum()):
            out.append(f"{ZWSP}{c}{ZWSP}")
        else:
            out.append(c)
    return "".join(out)


def _width(text: str) -> int:
    """Columns ``text`` takes in a monospace font (wide East Asian characters take two)."""
    return sum(
        0
        if unicodedata.combining(c) or c == ZWSP
        else 2
        if unicodedata.east_asian_width(c) in "WF"
        else 1
        for c in text
    )


def _pad(text: str, width: int, align: str) -> str:
    room = width - _width(text)
    if align == "right":
        return " " * room + text
    if align == "center":
        return " " * (room // 2) + text + " " * (room - room // 2)
    return text + " " * room


def _literal(node: SyntaxTreeNode) -> str:
    """The text a reader sees in ``node``'s inline content, without any markup."""
    if node.type in ("text", "code_inline", "html_inline"):
        return node.content
    if node.type in ("softbreak", "hardbreak"):
        return " "
    if node.type == "image":
        return node.content or _literal_children(node)
    return _literal_children(node)


def _literal_children(node: SyntaxTreeNode) -> str:
    return "".join(_literal(child) for child in node.children)


def _href(node: SyntaxTreeNode) -> str:
    return str(node.attrs.get("href", node.attrs.get("src", "")))


class ChatRenderer:
    """Chat-markdown over the syntax tree; subclasses set the escaping and the link form."""

    fence = "```"

    # --- entry points ------------------------------------------------------------------------

    def render(self, tokens: Sequence[Token]) -> str:
        tokens = [
            token.copy(children=_flatten_deep(token.children))
            if token.children and len(token.children) > 2 * _MAX_INLINE_NESTING
            else token
            for token in tokens
        ]
        return "\n".join(self.blocks(SyntaxTreeNode(tokens), depth=0)).strip("\n")

    def render_markdown(self, text: str) -> str:
        return self.render(parse(text))

    def escape_text(self, text: str) -> str:
        """``text`` (user text) so that it shows as written and formats or pings nothing."""
        return _LINE_START.sub(ZWSP, _neutralise_markers(self.escape_code(text)))

    def escape_code(self, text: str) -> str:
        """``text`` inside monospace, where only the platform's own encoding applies."""
        return text

    # --- blocks ------------------------------------------------------------------------------

    def blocks(self, node: SyntaxTreeNode, depth: int, tight: bool = False) -> list[str]:
        """Lines of ``node``'s block children: one blank line between blocks unless ``tight``."""
        out: list[str] = []
        for child in node.children:
            lines = self.block(child, depth)
            if not lines:
                continue
            if out and not tight:
                out.append("")
            out.extend(lines)
        return out

    def block(self, node: SyntaxTreeNode, depth: int) -> list[str]:
        kind = node.type
        if kind in ("paragraph", "inline"):
            return self.inline_lines(node, frozenset())
        if kind == "heading":
            return [self.wrap("*", line) for line in self.inline_lines(node, frozenset({"*"}))]
        if kind == "hr":
            return [RULE]
        if kind == "blockquote":
            return [f"> {line}" if line else ">" for line in self.blocks(node, depth)]
        if kind in ("bullet_list", "ordered_list"):
            return self.list_lines(node, depth)
        if kind in ("fence", "code_block"):
            return self.fenced(node.content.removesuffix("\n").split("\n"))
        if kind == "table":
            return self.table(node)
        if kind == "html_block":
            return self.escape_text(node.content.removesuffix("\n")).split("\n")
        return self.blocks(node, depth)

    def list_lines(self, node: SyntaxTreeNode, depth: int) -> list[str]:
        ordered = node.type == "ordered_list"
        number = int(node.attrs.get("start", 1)) if ordered else 0
        # markdown-it hides the paragraphs of a tight list: its items sit on adjacent lines.
        paragraphs = [c for item in node.children for c in item.children if c.type == "paragraph"]
        tight = all(p.hidden for p in paragraphs)
        out: list[str] = []
        for item in node.children:
            marker = f"{number}." if ordered else _BULLETS[depth % len(_BULLETS)]
            lines = self.blocks(item, depth + 1, tight=tight) or [""]
            if out and not tight:
                out.append("")
            out.append(f"{marker} {lines[0]}".rstrip())
            pad = " " * (len(marker) + 1)
            out.extend(pad + line if line else line for line in lines[1:])
            number += 1
        return out

    def fenced(self, lines: list[str]) -> list[str]:
        # Three backticks inside would end the block early; a ZWSP keeps them apart.
        body = [_TRIPLE_BACKTICK.sub("`" + ZWSP, self.escape_code(line)) for line in lines]
        return [self.fence, *body, self.fence]

    def table(self, node: SyntaxTreeNode) -> list[str]:
        rows: list[list[str]] = []
        aligns: list[str] = []
        for section in node.children:
            for row in section.children:
                rows.append([_literal_children(cell).strip() for cell in row.children])
                if not aligns:
                    aligns = [
                        str(cell.attrs.get("style", "")).removeprefix("text-align:")
                        for cell in row.children
                    ]
        columns = max(len(row) for row in rows)
        rows = [row + [""] * (columns - len(row)) for row in rows]
        widths = [max(_width(row[i]) for row in rows) for i in range(columns)]
        lines = [
            " | ".join(_pad(cell, w, a) for cell, w, a in zip(row, widths, aligns, strict=False))
            for row in rows
        ]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return self.fenced([line.rstrip() for line in lines])

    # --- inline ------------------------------------------------------------------------------

    def inline_lines(self, node: SyntaxTreeNode, active: frozenset[str]) -> list[str]:
        return self.inline_children(node, active).split("\n")

    def inline_children(self, node: SyntaxTreeNode, active: frozenset[str]) -> str:
        children = node.children
        out: list[str] = []
        for i, child in enumerate(children):
            if child.type in _EMPHASIS and (
                (i > 0 and _literal(children[i - 1])[-1:].isalnum())
                or (i + 1 < len(children) and _literal(children[i + 1])[:1].isalnum())
            ):
                # Chat markers only format at word boundaries: "a*b*c" would show its stars.
                out.append(self.inline_children(child, active | {_EMPHASIS[child.type]}))
            else:
                out.append(self.inline(child, active))
        return "".join(out)

    def inline(self, node: SyntaxTreeNode, active: frozenset[str]) -> str:
        kind = node.type
        if kind in ("text", "html_inline"):
            return self.escape_text(node.content)
        if kind in ("softbreak", "hardbreak"):
            return "\n"
        if kind == "code_inline":
            return self.code_inline(node.content)
        marker = _EMPHASIS.get(kind)
        if marker is not None:
            inner = self.inline_children(node, active | {marker})
            return inner if marker in active else self.wrap(marker, inner)
        if kind in ("link", "image"):
            label = (
                self.escape_text(node.content or _literal_children(node))
                if kind == "image"
                else self.inline_children(node, active)
            )
            return self.link(label, _literal_children(node) or node.content, _href(node))
        return self.inline_children(node, active)

    @staticmethod
    def wrap(marker: str, inner: str) -> str:
        """``inner`` between ``marker``s, line by line: chat formatting never spans a newline."""
        return "\n".join(
            f"{marker}{line}{marker}" if line.strip() else line for line in inner.split("\n")
        )

    def code_inline(self, content: str) -> str:
        if "`" in content or not content.strip():
            return self.escape_text(content)  # a backtick cannot be put inside a code span
        return f"`{self.escape_code(content)}`"

    def link(self, label: str, label_text: str, url: str) -> str:
        raise NotImplementedError


class SlackRenderer(ChatRenderer):
    """Slack ``mrkdwn`` for ``chat.postMessage`` text and Block Kit ``mrkdwn`` text objects."""

    def escape_code(self, text: str) -> str:
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    def escape_text(self, text: str) -> str:
        return super().escape_text(_MENTION.sub("@" + ZWSP, text))

    def link(self, label: str, label_text: str, url: str) -> str:
        if not url.lower().startswith(_LINK_SCHEMES):
            # Slack would not open other schemes; show the target instead of a dead link.
            return label if not url or label_text == url else f"{label} ({self.escape_text(url)})"
        # markdown-it percent-encodes "<", ">" and "|" in targets; "&" still needs its entity.
        target = url.replace("&", "&amp;")
        if label_text in ("", url, url.removeprefix("mailto:")):
            return f"<{target}>"
        return f"<{target}|{label.replace(chr(10), ' ')}>"


class WhatsAppRenderer(ChatRenderer):
    """WhatsApp message text (Cloud API and Twilio alike)."""

    def link(self, label: str, label_text: str, url: str) -> str:
        # WhatsApp has no link markup; it links a bare URL itself.
        if not url or label_text in (url, url.removeprefix("mailto:")):
            return url.removeprefix("mailto:") if url else label
        return f"{label} ({url})" if label_text else url


_SLACK = SlackRenderer()
_WHATSAPP = WhatsAppRenderer()


def markdown_to_mrkdwn(text: str) -> str:
    """Render Markdown as Slack mrkdwn."""
    return _SLACK.render_markdown(text)


def markdown_to_whatsapp(text: str) -> str:
    """Render Markdown as WhatsApp formatted text."""
    return _WHATSAPP.render_markdown(text)
