"""Validation of project requests. Pure functions: nothing here creates anything."""

from __future__ import annotations

import re
import unicodedata

from podbay.errors import UserError

NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,38}")  # fullmatch: "$" would let a final "\n" in

_SCP_LIKE = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:(?!/)[^\s]+$")


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        rule = (
            f"Invalid project name {name[:60]!r}: use 1-39 characters, lowercase letters, "
            "digits and '-', starting with a letter (e.g. `my-app`)."
        )
        odd = next((c for c in name if not c.isascii() or not c.isprintable()), None)
        if odd is not None:
            # A look-alike (Cyrillic "е", fullwidth, an invisible joiner) is named, or the
            # name looks right and the user cannot see what is wrong.
            described = unicodedata.name(odd, "a control character")
            rule += (
                f" It contains U+{ord(odd):04X} ({described}), which is not one of those "
                "even if it looks like one."
            )
        raise UserError(rule)
    return name


def validate_stack(stack: str, known: tuple[str, ...]) -> str:
    if stack not in known:
        raise UserError(f"Unknown stack {stack[:40]!r}: choose one of {', '.join(known)}.")
    return stack


def validate_git_url(url: str) -> str:
    """Allow https://, ssh:// and scp-like user@host:path; refuse anything git could abuse."""
    if any(ord(c) < 32 or ord(c) == 127 for c in url):
        raise UserError("Invalid git URL: it contains a control character (NUL, newline …).")
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


# Docker's own bounds: the engine refuses less than 6 MiB of memory, stores limits as
# int64 bytes, and refuses NanoCPUs below 0.01 CPU or above the engine's CPU count.
MIN_MEMORY_BYTES = 6 * 1024 * 1024
MAX_MEMORY_BYTES = 2**63 - 1
MIN_CPUS = 0.01
_MEMORY_RE = re.compile(r"^(\d+(?:\.\d+)?)([bkmg]?)b?$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_memory(raw: str, what: str = "--memory") -> int:
    """``raw`` (``512m``, ``4g``, ``1073741824``) in bytes, within Docker's bounds."""
    match = _MEMORY_RE.match(raw.strip())
    if match is None:
        raise UserError(f"{what} takes a size such as 512m or 4g, got {raw[:20]!r}.")
    number, unit = match.groups()
    # Decimal arithmetic on the digits: a float would turn 99999999999999999999g into inf.
    whole, _, fraction = number.partition(".")
    scale = _UNITS[unit.lower()]
    value = int(whole) * scale + (int(fraction) * scale // 10 ** len(fraction) if fraction else 0)
    if value < MIN_MEMORY_BYTES:
        raise UserError(
            f"{what} must be at least 6m (Docker's minimum; 0 would mean no limit), "
            f"got {raw[:20]!r}."
        )
    if value > MAX_MEMORY_BYTES:
        raise UserError(f"{what} {raw[:24]} is too large; use a size such as 4g or 16g.")
    return value


def check_cpus(value: float, host_cpus: int, what: str = "--cpus") -> float:
    """``value`` if Docker accepts it on an engine with ``host_cpus`` CPUs."""
    if not value >= MIN_CPUS:  # also catches NaN
        raise UserError(f"{what} must be at least {MIN_CPUS} (one hundredth of a CPU).")
    if value > host_cpus:
        raise UserError(
            f"{what} {value:g} is too many: this Docker engine has only {host_cpus} CPUs; "
            f"use at most {host_cpus}."
        )
    return value


def split_url_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``https://user:PASS@host/x`` → (``https://host/x``, (user, PASS)).

    The password must never be stored with the URL, so podbay keeps it in the project's
    credentials file instead; a URL without a password comes back unchanged.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url, None
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return url, None
    user, _, password = userinfo.partition(":")
    if not host or not password:
        return url, None
    if scheme.lower() != "https":
        # git over ssh never uses a password from the URL; storing it would only leak it.
        raise UserError(
            "A password in an ssh:// URL is never used (ssh uses keys): remove `:password` "
            "from the URL, or use an https:// URL."
        )
    return f"{scheme}://{host}{slash}{path}", (user, password)
