"""Validation of project requests. Pure functions: nothing here creates anything."""

from __future__ import annotations

import re

from podbay.errors import UserError

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,38}$")

_SCP_LIKE = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:(?!/)[^\s]+$")


def validate_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise UserError(
            f"Invalid project name {name[:60]!r}: use 1-39 characters, lowercase letters, digits "
            "and '-', starting with a letter (e.g. `my-app`)."
        )
    return name


def validate_stack(stack: str, known: tuple[str, ...]) -> str:
    if stack not in known:
        raise UserError(f"Unknown stack {stack[:40]!r}: choose one of {', '.join(known)}.")
    return stack


def validate_git_url(url: str) -> str:
    """Allow https://, ssh:// and scp-like user@host:path; refuse anything git could abuse."""
    if url.startswith("-"):
        raise UserError("Invalid git URL: it must not start with '-'.")
    lowered = url.lower()
    if lowered.startswith(("https://", "ssh://")) and len(url) > len("ssh://") + 1:
        if any(c.isspace() for c in url):
            raise UserError("Invalid git URL: it must not contain spaces.")
        return url
    if _SCP_LIKE.match(url) and "::" not in url:
        return url
    raise UserError(
        f"Unsupported git URL {url[:80]!r}: use https://host/owner/repo.git, "
        "ssh://user@host/path or user@host:path (file://, ext:: and local paths are refused)."
    )
