"""Command specifications and the registry that parses chat text against them.

A registry is an instance: the bot builds one, tests build their own.
"""

from __future__ import annotations

import difflib
import re
import shlex
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from podbay.commands.roles import Role
from podbay.errors import UsageError

if TYPE_CHECKING:
    from podbay.commands.context import CommandContext

CommandKind = Literal["control", "job"]
Handler = Callable[["CommandContext", "Invocation"], Awaitable[None]]


@dataclass(frozen=True)
class Positional:
    name: str
    required: bool = True
    rest: bool = False  # takes every remaining word ("help new project")


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


class Registry:
    """Holds command specs; parses text into an :class:`Invocation` or :class:`Freeform`."""

    def __init__(self, bot_name: str = "podbay", aliases: Iterable[str] = ()) -> None:
        self._specs: dict[str, CommandSpec] = {}
        self.bot_name = bot_name
        self._aliases = tuple(dict.fromkeys(a.lower() for a in (bot_name, *aliases) if a))

    def add(self, spec: CommandSpec) -> CommandSpec:
        if spec.name in self._specs:
            raise ValueError(f"command {spec.name!r} is already registered")
        self._specs[spec.name] = spec
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
        lowered = stripped.lower()
        names = [*self._aliases, *(a.lower() for a in extra_aliases if a)]
        # Longest first so "@podbay:example.org" wins over "@podbay".
        for name in sorted({n for alias in names for n in (alias, "@" + alias)}, key=len)[::-1]:
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
        self, text: str, *, mentioned: bool = False, extra_aliases: Iterable[str] = ()
    ) -> Parsed:
        """Parse chat text. Raises only :class:`UsageError`."""
        rest, addressed, bang = self.strip_address(text, extra_aliases)
        addressed = addressed or mentioned
        spans = list(_WORD.finditer(rest))
        words = [m.group(0) for m in spans]
        if not words:
            help_spec = self._specs.get("help")
            if (bang or addressed) and help_spec is not None:
                return self._bind(help_spec, [])  # a bare "@podbay" asks for help
            return Freeform(rest, addressed)
        spec, used = self._match(words)
        if spec is None:
            return self._unknown(words, rest, addressed=addressed, bang=bang)
        # Re-tokenise what follows the command words with shell-like quoting.
        tail = rest[spans[used - 1].end() :]
        try:
            tokens = shlex.split(tail)
        except ValueError as exc:
            if bang or spec.is_strict:
                raise UsageError(f"{exc}: check your quotes.\nusage: {spec.usage}") from exc
            return Freeform(rest, addressed)
        try:
            return self._bind(spec, tokens)
        except UsageError:
            if bang or spec.is_strict:
                raise
            return Freeform(rest, addressed)

    def _match(self, words: list[str]) -> tuple[CommandSpec | None, int]:
        lowered = [w.lower() for w in words]
        best: CommandSpec | None = None
        for spec in self._specs.values():
            n = len(spec.words)
            if tuple(lowered[:n]) == spec.words and (best is None or n > len(best.words)):
                best = spec
        return best, (len(best.words) if best else 0)

    def suggest(self, word: str, cutoff: float = 0.6) -> str | None:
        names = [s.name for s in self._specs.values()]
        firsts = {s.words[0]: s.name for s in self._specs.values()}
        close = difflib.get_close_matches(word.lower(), [*names, *firsts], n=1, cutoff=cutoff)
        if not close:
            return None
        return firsts.get(close[0], close[0])

    def _unknown(self, words: list[str], rest: str, *, addressed: bool, bang: bool) -> Parsed:
        phrase = " ".join(words[:2]).lower()
        near = self.suggest(words[0], cutoff=0.6 if bang else _NEAR_MISS) or (
            self.suggest(phrase, cutoff=_NEAR_MISS) if len(words) > 1 else None
        )
        # A short plain message that is a near miss of a command is almost surely a typo;
        # anything longer is a request for the agent.
        if bang or (near and len(words) <= 3):
            hint = f" Did you mean `{near}`?" if near else ""
            raise UsageError(f"Unknown command `{words[0][:40]}`.{hint} Send `help` for the list.")
        return Freeform(rest, addressed)

    def _bind(self, spec: CommandSpec, tokens: list[str]) -> Invocation:
        args: dict[str, str] = {}
        options: dict[str, str | bool] = {}
        positionals: list[str] = []
        i = 0
        only_positionals = False
        while i < len(tokens):
            token = tokens[i]
            i += 1
            if only_positionals or not token.startswith("-") or token == "-":
                positionals.append(token)
                continue
            if token == "--":
                only_positionals = True
                continue
            name, eq, value = token.lstrip("-").partition("=")
            short = not token.startswith("--")
            opt = spec.option(name) if (not short or len(name) == 1) else None
            if opt is None or (short and opt.short != name):
                known = [f"--{o.name}" for o in spec.options]
                close = difflib.get_close_matches("--" + name, known, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise UsageError(f"unknown option {token.split('=')[0]}{hint}\nusage: {spec.usage}")
            if opt.metavar is None:
                if eq:
                    raise UsageError(f"--{opt.name} takes no value\nusage: {spec.usage}")
                options[opt.name] = True
                continue
            if not eq:
                if i >= len(tokens):
                    raise UsageError(f"--{opt.name} needs a value\nusage: {spec.usage}")
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
            raise UsageError(f"unexpected argument {extra[:60]!r}\nusage: {spec.usage}")
        for pos, value in zip(spec.positionals, positionals, strict=False):
            args[pos.name] = value
        missing = [p.name for p in spec.positionals[len(positionals) :] if p.required]
        if missing:
            raise UsageError(f"missing <{missing[0]}>\nusage: {spec.usage}")
        return Invocation(spec, args, options)

    # -- secrets ----------------------------------------------------------------------

    def secret_options(self) -> set[str]:
        return {o.name for s in self._specs.values() for o in s.options if o.secret}

    def redact(self, text: str) -> str:
        """Mask the values of secret options (``--token X``) so they are never stored."""
        names = self.secret_options()
        if not names:
            return text
        alternatives = "|".join(re.escape(n) for n in sorted(names))
        pattern = re.compile(
            rf"(--(?:{alternatives}))(=|\s+)(\"[^\"]*\"|'[^']*'|\S+)", re.IGNORECASE
        )
        return pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}[redacted]", text)

    def has_secret(self, text: str) -> bool:
        return self.redact(text) != text
