"""The one redaction function: applied before text is stored, logged, echoed or given to an agent.

It masks three kinds of secret, wherever they appear in the text:

* values of secret options (``--token X``) and their near-miss spellings: an em or en dash
  (phones turn ``--`` into ``—``), a single dash, any case, and abbreviations of at least
  three letters (``--tok``); quoted values are masked whole;
* passwords in URLs (``https://user:PASS@host``), and a bare token used as the user name of an
  http(s) URL (``https://TOKEN@host``); ``ssh://git@host`` keeps its ordinary user name;
* known token shapes: Slack (``xoxb-``, ``xoxp-``, ``xapp-``), OpenAI and Anthropic (``sk-``),
  GitHub (``ghp_``, ``gho_``, ``ghs_``, ``github_pat_``) and GitLab (``glpat-``).

Every pattern is anchored on a literal prefix and bounds its repetitions, so the work is linear
in the length of the text: a megabyte of adversarial input is handled in well under a second.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable

REDACTED = "[redacted]"
DEFAULT_SECRET_OPTIONS = ("token",)

# ASCII hyphen-minus plus the Unicode dashes keyboards and phones substitute for it.
DASHES = "-\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d"
_DASH = f"[{re.escape(DASHES)}]"
# An abbreviation of a secret option must have this many letters to count ("--tok").
MIN_ABBREVIATION = 3
# Longest quoted option value masked as one; a longer quoted run is masked up to its first
# blank, which covers any credential (they have no blanks).
_MAX_QUOTED = 256
# Longest userinfo looked at in a URL, and the longest scheme looked back for.
_MAX_USERINFO = 2048
_MAX_SCHEME = 32
# A bare http(s) user name this long is a token (GitHub and GitLab accept them there).
_MIN_BARE_TOKEN = 16

_SCHEME_TAIL = re.compile(rf"[A-Za-z][A-Za-z0-9+.\-]{{0,{_MAX_SCHEME - 1}}}\Z")
# Greedy up to the last "@" before the path: an unencoded "@" in a password stays masked.
_URL_USERINFO = re.compile(rf"://(?P<userinfo>[^\s/?#]{{1,{_MAX_USERINFO}}})@")
# The literal starts of the token shapes: those that are tokens on their own, and those that
# also begin ordinary words ("sk-learn"), which must have a digit in the body to count.
_TOKEN_PREFIXES = r"gh[pousr]_|github_pat_|glpat-|xapp-"
_WORDLIKE_PREFIXES = r"sk-|xox[a-z]-"
_SHAPE_PREFIXES = f"{_TOKEN_PREFIXES}|{_WORDLIKE_PREFIXES}"
_SHAPES = re.compile(
    # Starting only where a run of body characters starts keeps "sk-sk-sk-..." linear.
    r"(?<![A-Za-z0-9_\-])(?:"
    rf"(?:{_TOKEN_PREFIXES})[A-Za-z0-9_\-]{{16,}}"
    rf"|(?:{_WORDLIKE_PREFIXES})(?=[A-Za-z_\-]{{0,256}}[0-9])[A-Za-z0-9_\-]{{16,}}"
    r")"
)


# Secrets from podbay's own configuration ([agent.env] values, platform tokens): whatever
# their shape, they are masked wherever they appear. Process-wide on purpose: a log line
# from any module must not carry them either.
_configured: set[str] = set()
_MIN_CONFIGURED = 8  # shorter values would mask ordinary words


def remember_secrets(values: Iterable[str]) -> None:
    """Mask these exact values from now on (values shorter than 8 characters are ignored)."""
    _configured.update(v for v in values if len(v) >= _MIN_CONFIGURED)


def _names(secret_options: Iterable[str]) -> tuple[str, ...]:
    if isinstance(secret_options, frozenset):
        return _frozen_names(secret_options)  # a registry's: asked for every message
    return tuple(sorted({n.lower() for n in secret_options if n}))


@functools.lru_cache(maxsize=16)
def _frozen_names(secret_options: frozenset[str]) -> tuple[str, ...]:
    return tuple(sorted({n.lower() for n in secret_options if n}))


@functools.lru_cache(maxsize=16)
def _option_patterns(names: tuple[str, ...]) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(pattern finding ``FLAG SEP VALUE`` in text, pattern matching one flag exactly)."""
    spellings: set[str] = set()
    for name in names:
        spellings.add(name)
        spellings.update(name[:k] for k in range(MIN_ABBREVIATION, len(name)))
    alternatives = "|".join(re.escape(s) for s in sorted(spellings, key=len, reverse=True))
    flag = rf"{_DASH}{{1,3}}(?:{alternatives})"
    # Possessive: the value never starts with a blank, so giving blanks back cannot help.
    sep = r"(?:[ \t]*+[=:][ \t]*+|\s++)"
    quoted = "|".join(
        f"{re.escape(o)}[^{re.escape(c)}]{{0,{_MAX_QUOTED}}}{re.escape(c)}"
        for o, c in ('""', "''", "“”", "‘’")
    )
    found = re.compile(
        # Not inside a word ("non-token values"), and not a path ("a/-token").
        rf"(?<![\w{re.escape(DASHES)}./\\])(?P<flag>{flag})(?P<sep>{sep})"
        # The value is not itself a secret flag: in "--token --token X" the secret is X.
        rf"(?!{flag}(?:[=:\s]|\Z))"
        # A closing Markdown backtick ("`--token X`") is left in place.
        rf"(?P<value>{quoted}|\S+?(?=`?(?:\s|\Z)))",
        re.IGNORECASE,
    )
    exact = re.compile(rf"(?P<dashes>{_DASH}{{1,3}})(?P<name>{alternatives})", re.IGNORECASE)
    return found, exact


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] in "\"'“‘" and value[-1] in "\"'”’":
        return value[1:-1]
    return value


def _url_secret(match: re.Match[str]) -> tuple[int, int] | None:
    """The span of the secret in a ``scheme://userinfo@`` match, if it has one."""
    userinfo = match.group("userinfo")
    start = match.start("userinfo")
    user, colon, password = userinfo.partition(":")
    if colon:
        if not password or password == REDACTED:
            return None
        return start + len(user) + 1, match.end("userinfo")
    head = match.string[max(0, match.start() - _MAX_SCHEME) : match.start()]
    scheme = _SCHEME_TAIL.search(head)
    if (
        scheme is not None
        and scheme.group(0).lower().rsplit("+", 1)[-1] in ("http", "https")
        and len(user) >= _MIN_BARE_TOKEN
        and user != REDACTED
    ):
        return start, match.end("userinfo")
    return None


@functools.lru_cache(maxsize=16)
def _maybe(names: tuple[str, ...]) -> re.Pattern[str]:
    """What every match of the patterns below contains: a dash before the first letters of
    a secret option's name (every spelling starts with them), a URL's ``://``, or a token
    shape's literal prefix. Text without any of them (most messages) skips the patterns,
    which look behind at every position."""
    heads = sorted({re.escape(n[:MIN_ABBREVIATION]) for n in names}, key=len, reverse=True)
    options = [rf"(?i:{_DASH}(?:{'|'.join(heads)}))"] if heads else []
    return re.compile("|".join([*options, "://", _SHAPE_PREFIXES]))


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    spans.sort()
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


class Redactor:
    """Redaction for one set of secret option names, its patterns looked up once: what
    runs for every message and every line an agent prints."""

    __slots__ = ("_found", "_maybe", "names")

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self._maybe = _maybe(names)
        self._found = _option_patterns(names)[0] if names else None

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Sorted, non-overlapping spans of every secret in ``text``."""
        spans: list[tuple[int, int]] = []
        if self._maybe.search(text) is not None:
            if self._found is not None:
                for m in self._found.finditer(text):
                    if m.group("value") != REDACTED:
                        spans.append(m.span("value"))
            for m in _URL_USERINFO.finditer(text):
                span = _url_secret(m)
                if span is not None:
                    spans.append(span)
            spans.extend(m.span() for m in _SHAPES.finditer(text))
        elif not _configured:
            return spans  # most text: nothing that could start a secret
        for value in _configured:
            start = text.find(value)
            while start != -1:
                spans.append((start, start + len(value)))
                start = text.find(value, start + len(value))
        return _merged(spans)

    def redact(self, text: str) -> str:
        """``text`` with every secret replaced by ``[redacted]``; unchanged when it has none."""
        spans = self.spans(text)
        if not spans:
            return text
        parts: list[str] = []
        last = 0
        for start, end in spans:
            parts += [text[last:start], REDACTED]
            last = end
        parts.append(text[last:])
        return "".join(parts)

    def has_secret(self, text: str) -> bool:
        """Whether :meth:`redact` would change ``text``."""
        return bool(self.spans(text))

    def secret_values(self, text: str) -> list[str]:
        """The secrets themselves (option values without their quotes), in order."""
        return [_unquote(text[start:end]) for start, end in self.spans(text)]


@functools.lru_cache(maxsize=16)
def _redactor(names: tuple[str, ...]) -> Redactor:
    return Redactor(names)


_DEFAULT = _redactor(_names(DEFAULT_SECRET_OPTIONS))


def redactor(secret_options: Iterable[str] = DEFAULT_SECRET_OPTIONS) -> Redactor:
    """The :class:`Redactor` for these secret option names (``--token``)."""
    if secret_options is DEFAULT_SECRET_OPTIONS:
        return _DEFAULT  # every log line and agent event: no names to sort
    return _redactor(_names(secret_options))


def redact(text: str, secret_options: Iterable[str] = DEFAULT_SECRET_OPTIONS) -> str:
    """``text`` with every secret replaced by ``[redacted]``; unchanged when it has none."""
    return redactor(secret_options).redact(text)


def has_secret(text: str, secret_options: Iterable[str] = DEFAULT_SECRET_OPTIONS) -> bool:
    """Whether :func:`redact` would change ``text``."""
    return redactor(secret_options).has_secret(text)


def secret_values(text: str, secret_options: Iterable[str] = DEFAULT_SECRET_OPTIONS) -> list[str]:
    """The secrets themselves (option values without their quotes), in order of appearance."""
    return redactor(secret_options).secret_values(text)


def secret_option_name(flag: str, secret_options: Iterable[str]) -> str | None:
    """The secret option that ``flag`` (``—tok``, ``-TOKEN``, ...) spells, if any.

    Used by the parser so that a near-miss spelling binds to the option (and its value is
    never echoed as a stray argument) exactly when redaction treats it as a secret.
    """
    secret_options = list(secret_options)
    names = _names(secret_options)
    if not names:
        return None
    _, exact = _option_patterns(names)
    match = exact.fullmatch(flag)
    if match is None:
        return None
    spelt = match.group("name").lower()
    return next((name for name in secret_options if name.lower().startswith(spelt)), None)


class RedactingFormatter(logging.Formatter):
    """Formats log records, then redacts the whole line: message, arguments and traceback
    (an exception's text may quote a URL with its password)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))
