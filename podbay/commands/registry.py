"""Command specifications and the registry that parses chat text against them.

A registry is an instance: the bot builds one, tests build their own.
"""

from __future__ import annotations

import bisect
import difflib
import functools
import itertools
import math
import re
import shlex
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from podbay.commands.roles import Role
from podbay.errors import UsageError
from podbay.messages import Action
from podbay.redact import DASHES, REDACTED, Redactor, redactor, secret_option_name

if TYPE_CHECKING:
    from podbay.commands.context import CommandContext

CommandKind = Literal["control", "job"]
Handler = Callable[["CommandContext", "Invocation"], Awaitable[None]]


@dataclass(frozen=True)
class Positional:
    name: str
    required: bool = True
    rest: bool = False  # takes every remaining word ("help new project")
    # A value must match this (e.g. r"#?\d+" for a run id). Text whose first argument does
    # not is no attempt at the command: "run tests" is a prompt, "run 12" a command.
    pattern: str | None = None
    hint: str = ""  # what a valid value looks like, for the usage error


@dataclass(frozen=True)
class Option:
    """``--name VALUE`` (or ``--name=VALUE``); a switch when ``metavar`` is None."""

    name: str
    metavar: str | None = None
    short: str = ""
    help: str = ""
    secret: bool = False  # the value is redacted before the message is stored


@dataclass(frozen=True)
class CommandSpec:
    name: str
    summary: str
    handler: Handler
    kind: CommandKind = "control"
    role: Role = Role.VIEWER
    positionals: tuple[Positional, ...] = ()
    options: tuple[Option, ...] = ()
    details: str = ""
    # Plain (unprefixed) text whose arguments do not fit is freeform ("delete the unused
    # imports") unless the command is strict; multi-word names are unambiguous enough.
    strict: bool | None = None

    @property
    def words(self) -> tuple[str, ...]:
        return tuple(self.name.split())

    @property
    def is_strict(self) -> bool:
        return len(self.words) > 1 if self.strict is None else self.strict

    @property
    def usage(self) -> str:
        parts = [self.name]
        for pos in self.positionals:
            parts.append(f"<{pos.name}>" if pos.required else f"[{pos.name}]")
        for opt in self.options:
            flag = f"-{opt.short}" if opt.short else f"--{opt.name}"
            parts.append(f"[{flag} {opt.metavar}]" if opt.metavar else f"[{flag}]")
        return " ".join(parts)

    def option(self, name: str) -> Option | None:
        for opt in self.options:
            if name in (opt.name, opt.short):
                return opt
        return None


@dataclass(frozen=True)
class Invocation:
    """A recognised command with its parsed arguments."""

    spec: CommandSpec
    args: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, str | bool] = field(default_factory=dict)

    def opt(self, name: str) -> str | None:
        value = self.options.get(name)
        return value if isinstance(value, str) else None

    def flag(self, name: str) -> bool:
        return self.options.get(name) is True


@dataclass(frozen=True)
class Freeform:
    """Text for the coding agent; ``addressed`` when the bot was named or mentioned."""

    text: str
    addressed: bool = False


Parsed = Invocation | Freeform

_WORD = re.compile(r"\S+")
# How close a misspelt command must be to be treated as one rather than as freeform.
_NEAR_MISS = 0.8
# A token that looks like an option: dashes (ASCII or the Unicode ones phones produce) and a
# letter. A lone "-" or "—" is punctuation.
_DASH_RUN = re.compile(f"[{re.escape(DASHES)}]+")
_OPTION_LIKE = re.compile(rf"(?<!\S)[{re.escape(DASHES)}]{{1,3}}[^\W\d_]")
# A whole word that is an option rather than a value: dashes, then a letter ("-1" is a value).
_OPTION_WORD = re.compile(rf"[{re.escape(DASHES)}]+[^\W\d_]")
# Text after the command words longer than this is not a command: real ones (a git URL, a
# path, a token) are far shorter, and tokenising megabytes is what made parsing slow.
MAX_COMMAND_CHARS = 4096
# Longest word compared with command names for "did you mean": difflib is quadratic, and a
# much longer word cannot be close to a short name anyway.
_MAX_SUGGEST = 64
# Words examined at the start of a message: the longest command name plus two.
_HEAD_WORDS = 4
# At most this many words (with the command words) is short enough to be an attempt.
_ATTEMPT_WORDS = 3
_PUNCTUATION = "`'\".,;:!?()[]{}<>"
# Shorter "secrets" are not replaced throughout an error message (they would mangle it).
_MIN_SCRUBBED = 4


def _valid_dashes(dashes: str) -> bool:
    """``-x``, ``--name``, or one Unicode dash (``—name``: a phone's ``--``); not ``---``."""
    return dashes in ("-", "--") or (len(dashes) == 1 and dashes != "-")


def _address_names(aliases: Iterable[str]) -> list[str]:
    """Every way to address the bot by ``aliases``, longest first (so that
    "@podbay:example.org" wins over "@podbay")."""
    return sorted({n for alias in aliases for n in (alias, "@" + alias)}, key=len)[::-1]


@dataclass(frozen=True)
class _Pool:
    """What a word or phrase is compared with for suggestions, shortest first."""

    names: list[str]
    lengths: list[int]
    letters: frozenset[str]  # every letter of every name

    @staticmethod
    def of(names: Iterable[str]) -> _Pool:
        ordered = sorted(names, key=len)
        return _Pool(ordered, [len(n) for n in ordered], frozenset("".join(ordered)))


class Registry:
    """Holds command specs; parses text into an :class:`Invocation` or :class:`Freeform`."""

    def __init__(self, bot_name: str = "podbay", aliases: Iterable[str] = ()) -> None:
        self._specs: dict[str, CommandSpec] = {}
        self._pools: tuple[dict[str, str], _Pool, _Pool] | None = None
        # Built once per set of commands (parsing runs for every message).
        self._secret_options: frozenset[str] | None = None
        self._redactor: Redactor | None = None
        self._by_first: dict[str, list[CommandSpec]] | None = None
        # The same first words come back again and again: their suggestions are kept.
        self._suggested = functools.lru_cache(maxsize=4096)(self._suggest)
        self._phrase_reach = functools.lru_cache(maxsize=4096)(self._reach_of_phrases)
        self._charsets: dict[str, frozenset[str]] = {}  # letters of each command word
        self._address_names: list[str] | None = None  # what strip_address looks for
        self._address_starts: frozenset[str] = frozenset()  # and their first letters
        self.bot_name = bot_name
        self._aliases = tuple(dict.fromkeys(a.lower() for a in (bot_name, *aliases) if a))

    def add(self, spec: CommandSpec) -> CommandSpec:
        if spec.name in self._specs:
            raise ValueError(f"command {spec.name!r} is already registered")
        self._specs[spec.name] = spec
        self._pools = self._secret_options = self._by_first = self._redactor = None
        self._suggested.cache_clear()
        self._phrase_reach.cache_clear()
        return spec

    def get(self, name: str) -> CommandSpec | None:
        return self._specs.get(name)

    def specs(self) -> list[CommandSpec]:
        """Every command, in registration order (the order help lists them in)."""
        return list(self._specs.values())

    # -- addressing -------------------------------------------------------------------

    def strip_address(self, text: str, extra_aliases: Iterable[str] = ()) -> tuple[str, bool, bool]:
        """Remove a leading ``!``, bot name or mention. Returns (rest, addressed, bang)."""
        stripped = text.strip()
        if stripped.startswith("!"):
            return stripped[1:].lstrip(), True, True
        extra = [a.lower() for a in extra_aliases if a]
        if extra:
            candidates = _address_names([*self._aliases, *extra])
        else:
            if self._address_names is None:
                self._address_names = _address_names(self._aliases)
                self._address_starts = frozenset(name[0] for name in self._address_names)
            if stripped[:1].lower()[:1] not in self._address_starts:
                return stripped, False, False  # most messages: no name can start them
            candidates = self._address_names
        # Only the start can hold a name: lowering all of a long message would be wasted work.
        lowered = stripped[: len(candidates[0]) + 1 if candidates else 1].lower()
        for name in candidates:
            if lowered.startswith(name):
                rest = stripped[len(name) :]
                if not rest or rest[0] in " \t\n:,":
                    rest = rest.lstrip(" \t\n:,")
                    if rest.startswith("!"):
                        rest = rest[1:]
                    return rest, True, False
        return stripped, False, False

    # -- parsing ----------------------------------------------------------------------

    def parse(
        self,
        text: str,
        *,
        mentioned: bool = False,
        extra_aliases: Iterable[str] = (),
        projects: Collection[str] = (),
    ) -> Parsed:
        """Parse chat text. Raises only :class:`UsageError`, whose text never holds a secret.

        Plain text that starts with a command word but does not fit it is freeform ("delete
        the unused imports") unless it looks like an attempt at the command; then it gets the
        usage error, so that a mistyped command never reaches the agent as a prompt. An
        attempt has an option-like token (``--x``, ``-x``, ``—x``), is at most three words,
        or names a project: ``projects`` are the names of existing projects, matched against
        the first argument, and for job commands (``delete``, ``restart``...) against every
        word. A ``!`` prefix, and multi-word commands, always give the usage error.

        The work is linear in the length of ``text``.
        """
        rest, addressed, bang = self.strip_address(text, extra_aliases)
        addressed = addressed or mentioned
        try:
            return self._parse(rest, addressed=addressed, bang=bang, projects=projects)
        except UsageError as exc:
            message = self._scrub(str(exc), rest)
            if message == str(exc):
                raise
            # "from None": the original message, secret included, must not reach a traceback.
            raise UsageError(message) from None

    def _parse(
        self, rest: str, *, addressed: bool, bang: bool, projects: Collection[str]
    ) -> Parsed:
        heads = list(itertools.islice(_WORD.finditer(rest), _HEAD_WORDS))
        words = [m.group(0) for m in heads]
        if not words:
            help_spec = self._specs.get("help")
            if (bang or addressed) and help_spec is not None:
                return self._bind(help_spec, [])  # a bare "@podbay" asks for help
            return Freeform(rest, addressed)
        spec, used = self._match(words)
        if spec is None:
            return self._unknown(words, rest, addressed=addressed, bang=bang, projects=projects)
        tail = rest[heads[used - 1].end() :]

        def insist() -> bool:
            return bang or spec.is_strict or self._is_attempt(spec, words[used:], tail, projects)

        if len(tail) > MAX_COMMAND_CHARS:
            if insist():
                raise UsageError(
                    f"That is too long for a command ({len(tail)} characters after "
                    f"`{spec.name}`, at most {MAX_COMMAND_CHARS}).\nusage: {spec.usage}"
                )
            return Freeform(rest, addressed)
        # Re-tokenise what follows the command words with shell-like quoting.
        try:
            tokens = shlex.split(tail)
        except ValueError as exc:
            if insist():
                raise UsageError(f"{exc}: check your quotes.\nusage: {spec.usage}") from exc
            return Freeform(rest, addressed)
        try:
            return self._bind(spec, tokens)
        except UsageError:
            if insist():
                raise
            return Freeform(rest, addressed)

    def _is_attempt(
        self, spec: CommandSpec, args: list[str], tail: str, projects: Collection[str]
    ) -> bool:
        """Whether text starting with ``spec``'s words is an attempt at that command."""
        first = spec.positionals[0] if spec.positionals else None
        if (
            first is not None
            and first.pattern is not None
            and args
            and not re.fullmatch(first.pattern, args[0])
            and _OPTION_LIKE.search(tail) is None
        ):
            return False
        if len(spec.words) + len(args) <= _ATTEMPT_WORDS:  # ``args`` holds at most two words
            return True
        if _OPTION_LIKE.search(tail) is not None:
            return True
        names = {p.lower() for p in projects}
        if not names:
            return False
        if args and args[0].strip(_PUNCTUATION).lower() in names:
            return True
        # "delete the demo2 project": a job changes a project, so naming one anywhere is an
        # attempt. Control commands ("use the api client...") only count their argument.
        if spec.kind == "job":
            head = tail[:MAX_COMMAND_CHARS]
            return any(w.strip(_PUNCTUATION).lower() in names for w in head.split())
        return False

    def _match(self, words: list[str]) -> tuple[CommandSpec | None, int]:
        if not words:
            return None, 0
        if self._by_first is None:
            self._by_first = {}
            for spec in self._specs.values():
                self._by_first.setdefault(spec.words[0], []).append(spec)
        first = words[0].lower() if len(words[0]) <= _MAX_SUGGEST else ""
        candidates = self._by_first.get(first)
        if not candidates:
            return None, 0
        lowered = [w.lower() if len(w) <= _MAX_SUGGEST else "" for w in words[:4]]
        best: CommandSpec | None = None
        for spec in candidates:
            n = len(spec.words)
            if tuple(lowered[:n]) == spec.words and (best is None or n > len(best.words)):
                best = spec
        return best, (len(best.words) if best else 0)

    def _suggestion_pools(self) -> tuple[dict[str, str], _Pool, _Pool]:
        """(first word -> its first command, what a word is compared with, what a
        two-word phrase is compared with), built once per set of commands."""
        if self._pools is None:
            firsts: dict[str, str] = {}
            for spec in self._specs.values():
                # "delet" suggests `delete`, the first command of that word, not `delete run`.
                firsts.setdefault(spec.words[0], spec.name)
            names = [s.name for s in self._specs.values()]
            words = _Pool.of(dict.fromkeys([*names, *firsts]))
            phrases = _Pool.of(n for n in names if " " in n)
            self._pools = (firsts, words, phrases)
        return self._pools

    def suggest(self, word: str, cutoff: float = 0.6) -> str | None:
        if len(word) > _MAX_SUGGEST:
            return None
        lowered = word.lower()
        if " " in lowered:
            # Phrases rarely come back (every message has its own), and few commands have
            # several words: looked up each time rather than crowding the first words out.
            return self._suggest(lowered, cutoff)
        return self._suggested(lowered, cutoff)

    def _suggest(self, lowered: str, cutoff: float) -> str | None:
        firsts, words, phrases = self._suggestion_pools()
        # A phrase of two words can only be near a command of several (a one-word name is
        # never within the cutoff of "statsu please"); a word may be near either.
        pool = phrases if " " in lowered and cutoff >= _NEAR_MISS else words
        near = self._within_reach(lowered, pool, cutoff)
        if not near:
            return None
        close = difflib.get_close_matches(lowered, near, n=1, cutoff=cutoff)
        if not close:
            return None
        return firsts.get(close[0], close[0])

    def _within_reach(self, lowered: str, pool: _Pool, cutoff: float) -> list[str]:
        """The candidates difflib could find within ``cutoff`` of ``lowered``, by upper
        bounds of its ratio (2 * matches / total length) that cost no matcher: the shorter
        length, and the letters of ``lowered`` that the candidate has at all. Most words
        are near no command, and this runs for every message."""
        size = len(lowered)
        # 2 * min(size, length) >= cutoff * (size + length) bounds the length both ways:
        # only that stretch of the pool (sorted by length) is looked at, and the bound is
        # still checked exactly below.
        shortest = int(size * cutoff / (2 - cutoff))
        longest = int(size * (2 - cutoff) / cutoff) + 1
        lengths = pool.lengths
        window = pool.names[
            bisect.bisect_left(lengths, shortest) : bisect.bisect_right(lengths, longest)
        ]
        if not window:
            return []
        letters = set(lowered)
        absent = letters - pool.letters
        if absent:
            # Letters no name has at all bound every candidate's ratio at once (the
            # shortest candidate of the window gives the largest bound).
            shared = size - sum(map(lowered.count, absent))
            if 2 * shared < cutoff * (size + len(window[0])):
                return []
        kept: list[str] = []
        for candidate in window:
            total = size + len(candidate)
            if 2 * min(size, len(candidate)) < cutoff * total:
                continue
            absent = letters - self._charset(candidate)
            if absent:
                shared = size - sum(map(lowered.count, absent))
                if 2 * min(shared, len(candidate)) < cutoff * total:
                    continue
            kept.append(candidate)
        return kept

    def _phrase_may_be_near(self, phrase: str) -> bool:
        """Whether difflib could find a command of several words within _NEAR_MISS of
        ``phrase`` (two words), judged by the length of its second word alone: every
        phrase has its own, but the first words come back."""
        first, _, second = phrase.partition(" ")
        return len(second) in self._phrase_reach(first)

    def _reach_of_phrases(self, first: str) -> frozenset[int]:
        """The lengths a second word may have for "``first`` <second>" to come within
        _NEAR_MISS of a command of several words. difflib's ratio is 2 * matches / total
        length; the matches are at most what the two share letter for letter, which is at
        most what "``first`` " shares with the name plus the whole second word, and at most
        the name's length. (Loosened by a hair against rounding.)"""
        cutoff, head = _NEAR_MISS, Counter(first + " ")
        sizes: set[int] = set()
        for name in self._suggestion_pools()[2].names:
            shared = sum((head & Counter(name)).values())
            # 2 * (shared + size) >= cutoff * (len(first) + 1 + size + len(name))
            low = (cutoff * (len(first) + 1 + len(name)) - 2 * shared) / (2 - cutoff)
            # 2 * len(name) >= cutoff * (len(first) + 1 + size + len(name))
            high = len(name) * (2 - cutoff) / cutoff - len(first) - 1
            sizes.update(range(max(0, math.ceil(low - 1e-6)), math.floor(high + 1e-6) + 1))
        return frozenset(sizes)

    def _charset(self, word: str) -> frozenset[str]:
        found = self._charsets.get(word)
        if found is None:
            found = self._charsets[word] = frozenset(word)
        return found

    def _unknown(
        self,
        words: list[str],
        rest: str,
        *,
        addressed: bool,
        bang: bool,
        projects: Collection[str],
    ) -> Parsed:
        near = self.suggest(words[0], cutoff=0.6 if bang else _NEAR_MISS)
        if near is None and len(words) > 1:
            phrase = " ".join(words[:2]).lower()
            if len(phrase) <= _MAX_SUGGEST and self._phrase_may_be_near(phrase):
                near = self.suggest(phrase, cutoff=_NEAR_MISS)
        if bang or (near and self._near_miss_is_attempt(near, words, rest, projects)):
            hint = f" Did you mean `{near}`?" if near else ""
            raise UsageError(
                f"Unknown command `{self._quote(words[0], 40)}`.{hint} Send `help` for the list."
            )
        return Freeform(rest, addressed)

    def _near_miss_is_attempt(
        self, near: str, words: list[str], rest: str, projects: Collection[str]
    ) -> bool:
        """A near miss of a command is a typo when short, when its first argument names a
        project, or when it carries one of that command's options ("delet x --purge").

        An option alone is not enough: "log the body when --debug is set" is a request.
        """
        if len(words) <= _ATTEMPT_WORDS:
            return True
        if len(words) > 1 and words[1].strip(_PUNCTUATION).lower() in {p.lower() for p in projects}:
            return True
        spec = self._specs[near]
        secrets = [o.name for o in spec.options if o.secret]
        for match in _OPTION_LIKE.finditer(rest, 0, MAX_COMMAND_CHARS):
            end = rest.find(" ", match.start())
            flag = rest[match.start() : end if end >= 0 else len(rest)].partition("=")[0]
            name = _DASH_RUN.sub("", flag, count=1)
            if spec.option(name) is not None or secret_option_name(flag, secrets) is not None:
                return True
        return False

    def _bind(self, spec: CommandSpec, tokens: list[str]) -> Invocation:
        args: dict[str, str] = {}
        options: dict[str, str | bool] = {}
        positionals: list[str] = []
        secrets = [o.name for o in spec.options if o.secret]
        i = 0
        only_positionals = False
        while i < len(tokens):
            token = tokens[i]
            i += 1
            if token == "--" and not only_positionals:
                only_positionals = True
                continue
            dashes = _DASH_RUN.match(token)
            if only_positionals or dashes is None or dashes.end() == len(token):
                positionals.append(token)  # includes a lone "-" or "—"
                continue
            flag, eq, value = token.partition("=")
            name = flag[dashes.end() :]
            if not _valid_dashes(dashes.group(0)):
                raise UsageError(self._too_many_dashes(spec, flag, name, secrets))
            # "—stack" is "--stack" typed on a phone; only a single ASCII "-" is short.
            short = dashes.group(0) == "-"
            opt = spec.option(name) if (not short or len(name) == 1) else None
            if opt is not None and short and opt.short != name:
                opt = None
            if opt is None:
                # "-token", "--tok", "—TOKEN": bind them, so the value is taken as the secret
                # it is (and redacted) rather than echoed back as a stray argument.
                secret = secret_option_name(flag, secrets)
                opt = spec.option(secret) if secret else None
            if opt is None:
                owners = self._owners(name, spec)
                if owners:
                    raise UsageError(
                        f"--{name} is an option of {owners}, not of `{spec.name}`\n"
                        f"usage: {spec.usage}"
                    )
                known = [f"--{o.name}" for o in spec.options if len(o.name) > 1]
                known += [f"-{o.short}" for o in spec.options if o.short]
                close = difflib.get_close_matches(
                    "--" + name[:_MAX_SUGGEST], known, n=1, cutoff=0.6
                )
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise UsageError(
                    f"unknown option {self._quote(flag, 60)}{hint}\nusage: {spec.usage}"
                )
            if opt.metavar is None:
                if eq:
                    raise UsageError(f"--{opt.name} takes no value\nusage: {spec.usage}")
                options[opt.name] = True
                continue
            if not eq:
                if i >= len(tokens):
                    raise UsageError(f"--{opt.name} needs a value\nusage: {spec.usage}")
                if not only_positionals and _OPTION_WORD.match(tokens[i]):
                    # "--token --bogus=x": the option's value was forgotten. The next word
                    # is not echoed: for a secret option it may be the secret after all.
                    raise UsageError(
                        f"--{opt.name} needs a value, and the word after it looks like an "
                        f"option (write --{opt.name}=VALUE for a value that starts with a "
                        f"dash)\nusage: {spec.usage}"
                    )
                value = tokens[i]
                i += 1
            if opt.name in options:
                raise UsageError(f"--{opt.name} given twice\nusage: {spec.usage}")
            options[opt.name] = value
        if spec.positionals and spec.positionals[-1].rest:
            keep = len(spec.positionals) - 1
            if len(positionals) > keep:
                positionals[keep:] = [" ".join(positionals[keep:])]
        if len(positionals) > len(spec.positionals):
            extra = " ".join(positionals[len(spec.positionals) :])
            raise UsageError(f"unexpected argument '{self._quote(extra, 60)}'\nusage: {spec.usage}")
        for pos, value in zip(spec.positionals, positionals, strict=False):
            if pos.pattern is not None and not re.fullmatch(pos.pattern, value):
                raise UsageError(
                    f"<{pos.name}> must be {pos.hint or 'of the form ' + pos.pattern}, got "
                    f"'{self._quote(value, 40)}'\nusage: {spec.usage}"
                )
            args[pos.name] = value
        missing = [p.name for p in spec.positionals[len(positionals) :] if p.required]
        if missing:
            raise UsageError(f"missing <{missing[0]}>\nusage: {spec.usage}")
        return Invocation(spec, args, options)

    def _too_many_dashes(
        self, spec: CommandSpec, flag: str, name: str, secrets: Collection[str]
    ) -> str:
        """The error for ``---path``: which option was meant, if any (the flag redacted)."""
        opt = spec.option(name)
        if opt is None:
            secret = secret_option_name("--" + name, secrets)
            opt = spec.option(secret) if secret else None
        meant = opt.name if opt is not None else None
        if meant is None and self._owners(name, spec):
            meant = name
        hint = f": an option takes two dashes, --{meant}" if meant else ""
        return f"unknown option {self._quote(flag, 60)}{hint}\nusage: {spec.usage}"

    def _owners(self, name: str, spec: CommandSpec) -> str:
        """The other commands that have option ``name``, as "`delete`" or "`a` or `b`"."""
        if len(name) <= 1:
            return ""
        owners = [
            f"`{other.name}`"
            for other in self._specs.values()
            if other is not spec and any(o.name == name for o in other.options)
        ]
        return " or ".join(owners)

    def _quote(self, text: str, limit: int) -> str:
        """User text for an error message: redacted before it is cut, since a cut secret no
        longer has a recognisable shape. Linear, like the rest of parsing."""
        quoted = self.redact(text)
        return quoted if len(quoted) <= limit else quoted[: limit - 1] + "…"

    def _scrub(self, message: str, text: str) -> str:
        """``message`` without any secret that occurs in ``text`` (defence in depth)."""
        for value in sorted(self.secret_values(text), key=len, reverse=True):
            if len(value) >= _MIN_SCRUBBED:
                message = message.replace(value, REDACTED)
        # Not redact(message): fragments were redacted by _quote, and the message's own
        # layout ("unknown option —token\nusage: ...") would read as a flag and its value.
        return message

    # -- secrets ----------------------------------------------------------------------

    def for_action(self, action: Action) -> Invocation:
        """The command a click stands for (``confirm``/``cancel`` of a proposal)."""
        spec = self._specs.get(action.kind)
        if spec is None:
            raise UsageError(f"Buttons for {action.kind!r} are not handled here.")
        return Invocation(spec, {"proposal": action.target})

    def secret_options(self) -> frozenset[str]:
        if self._secret_options is None:
            self._secret_options = frozenset(
                o.name for s in self._specs.values() for o in s.options if o.secret
            )
        return self._secret_options

    def _redaction(self) -> Redactor:
        if self._redactor is None:
            self._redactor = redactor(self.secret_options())
        return self._redactor

    def redact(self, text: str) -> str:
        """``text`` with every secret masked (see :mod:`podbay.redact`), using the names of
        this registry's secret options (``--token``) and their near-miss spellings."""
        return self._redaction().redact(text)

    def has_secret(self, text: str) -> bool:
        return self._redaction().has_secret(text)

    def secret_values(self, text: str) -> list[str]:
        return self._redaction().secret_values(text)
