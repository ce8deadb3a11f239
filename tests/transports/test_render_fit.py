"""Rendered chunks fit the platform's limit, even where rendering makes the text longer."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podbay.transports.render import markdown_to_plain, split_rendered
from podbay.transports.render_chat import markdown_to_mrkdwn, markdown_to_whatsapp

RENDERERS: dict[str, Callable[[str], str]] = {
    "slack": markdown_to_mrkdwn,
    "whatsapp": markdown_to_whatsapp,
    "plain": markdown_to_plain,
}

# Pieces whose rendering grows: Slack escapes & < >, WhatsApp spells links out.
PIECES = [
    "a < b && c > d",
    "[docs](https://example.org/a/very/long/path/to/the/documentation/page)",
    "| a | b |\n|---|---|\n| 1 | 2 |",
    "- item with `code` and **bold**",
    "```python\nprint('<tag> & more')\n```",
    "plain words " * 5,
    "# Heading & <more>",
]


@pytest.mark.parametrize("dialect", sorted(RENDERERS))
def test_text_that_grows_when_rendered_is_split_so_every_message_fits(dialect: str) -> None:
    render = RENDERERS[dialect]
    text = "\n\n".join(PIECES * 40)
    limit = 600
    chunks = split_rendered(text, limit, render)
    assert len(chunks) > 1
    assert all(chunk.strip() for chunk in chunks)
    assert all(len(render(chunk)) <= limit for chunk in chunks), [len(render(c)) for c in chunks]


@settings(max_examples=60, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(PIECES), min_size=1, max_size=60),
    limit=st.integers(min_value=200, max_value=2000),
    dialect=st.sampled_from(sorted(RENDERERS)),
)
def test_every_rendered_chunk_fits_its_limit(pieces: list[str], limit: int, dialect: str) -> None:
    render = RENDERERS[dialect]
    chunks = split_rendered("\n\n".join(pieces), limit, render)
    assert chunks and all(chunk.strip() for chunk in chunks)
    assert all(len(render(chunk)) <= limit for chunk in chunks)
