"""A mistyped command must never reach the coding agent as a prompt (issue 8, item 7).

Text that starts with a command word and looks like an attempt at that command (it has
an option-like token, names an existing project, or is at most three words) gets that
command's usage error; a sentence that merely starts with a command word stays freeform.
"""

from __future__ import annotations

import difflib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podbay.commands.catalog import build_registry
from podbay.commands.registry import Freeform, Invocation, Registry
from podbay.errors import UsageError

PROJECTS = ("demo2", "api", "web")


@pytest.fixture(scope="module")
def reg() -> Registry:
    return build_registry("podbay", aliases=("@podbay:example.org",))


USAGE_ERRORS = [
    # The examples.
    ("delete demo2 --prune", r"unknown option --prune \(did you mean --purge\?\)"),
    ("delete demo2 --purge please", "unexpected argument 'please'"),
    ("logs demo2 --lines 5", "unknown option --lines"),
    ("restart demo2 now", "unexpected argument 'now'"),
    ("rebuild demo2 --force", "unknown option --force"),
    ("delete", "missing <project>"),
    ("restart", "missing <project>"),
    ("ssh", "missing <project>"),
    ("logs", "missing <project>"),
    # More of the same kinds.
    ("rebuild", "missing <project>"),
    ("Delete demo2 --prune", "did you mean --purge"),
    ("delete demo2 —prune", "did you mean --purge"),
    ("delete demo2 -purge", "usage: delete <project>"),
    ("delete demo2 now please", "unexpected argument 'now please'"),
    ("delete the demo2 project", "usage: delete <project>"),
    ("restart the api server after the config change", "usage: restart <project>"),
    ("restart demo2 right now please", "unexpected argument"),
    ("ssh demo2 please", "unexpected argument 'please'"),
    ("ssh demo2 --port 2200", "unknown option --port"),
    ("logs demo2 -f", "unknown option -f"),
    ("logs demo2 —lines 5", "unknown option —lines"),
    ("rebuild demo2 --no-cache", "unknown option --no-cache"),
    ("status demo2 --verbose", "unknown option --verbose"),
    ("use demo2 please", "unexpected argument 'please'"),
    ("stop it", "unexpected argument 'it'"),
    ("cancel that", "unexpected argument 'that'"),
    ("whoami --json", "unknown option --json"),
    ("new project", "missing <name>"),
    ("new", "Did you mean `new project`"),
    # Near misses of a command word are attempts too when they look like one.
    ("delet demo2 --purge", "Did you mean `delete`"),
    ("delet demo2 --purge please", "Did you mean `delete`"),
    ("rebuidl demo2 and then restart it", "Did you mean `rebuild`"),
    # Addressed and prefixed forms.
    ("podbay restart demo2 now", "unexpected argument 'now'"),
    ("@podbay delete demo2 --prune", "did you mean --purge"),
    ("@podbay:example.org: logs demo2 --lines 5", "unknown option --lines"),
    ("!restart the server after changing the config file", "usage: restart <project>"),
    ("!delete the unused imports", "usage: delete <project>"),
    ("! ssh", "missing <project>"),
    # Three dashes, an option of another command, a forgotten option value (issue 10).
    ("delete demo2 ---purge", "an option takes two dashes, --purge"),
    ("restart demo2 --purge", "--purge is an option of `delete`, not of `restart`"),
    ("new project x --token --stack go", "--token needs a value, and the word after it looks"),
]


@pytest.mark.parametrize(("text", "message"), USAGE_ERRORS)
def test_an_attempt_at_a_command_gets_its_usage_error(
    reg: Registry, text: str, message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        reg.parse(text, projects=PROJECTS)


FREEFORM = [
    "delete the unused imports",
    "delete the unused imports in parser.py",
    "delete unused code -- it is dead anyway",
    "restart the server after changing the config file",
    "status of the migration is unclear, please check",
    "status — the build is red again, can you look",
    "use a dict instead of a list",
    "use the api client instead of raw requests",
    "stop using global state in the parser",
    "logs should include the request id",
    "ssh keys are not loaded in the container, why",
    "rebuild the index when the schema changes",
    "rebuild the cache - it is stale after deploys",
    "cancel the subscription flow when the user clicks twice",
    "confirm that the migration is reversible please",
    "whoami endpoint should return the role too",
    "new features need tests, please add some",
    "log the request body when --debug is set",
    "uses of the --verbose flag should be documented",
    "why does delete demo2 --prune not work?",
]


@pytest.mark.parametrize("text", FREEFORM)
def test_a_sentence_starting_with_a_command_word_stays_freeform(reg: Registry, text: str) -> None:
    assert reg.parse(text, projects=PROJECTS) == Freeform(text)


@pytest.mark.parametrize(
    "text",
    [
        "podbay delete the unused imports",
        "@podbay restart the server after changing the config file",
        "@podbay:example.org: use the api client instead of raw requests",
        # Any case, and after leading blanks: the name is looked for at the start alone.
        "  Podbay, delete the unused imports",
        "@PODBAY restart the server after changing the config file",
    ],
)
def test_an_addressed_sentence_stays_addressed_freeform(reg: Registry, text: str) -> None:
    parsed = reg.parse(text, projects=PROJECTS)
    assert isinstance(parsed, Freeform) and parsed.addressed
    assert parsed.text.split()[0] in ("delete", "restart", "use")


def test_naming_a_project_only_counts_for_projects_that_exist(reg: Registry) -> None:
    text = "delete demo2 now please"
    assert reg.parse(text) == Freeform(text)  # no project called demo2
    with pytest.raises(UsageError):
        reg.parse(text, projects=["demo2"])


def test_well_formed_commands_still_parse(reg: Registry) -> None:
    for text, name in [
        ("delete demo2 --purge", "delete"),
        ("logs demo2 -n 5", "logs"),
        ("restart demo2", "restart"),
        ("rebuild demo2", "rebuild"),
        ("ssh demo2", "ssh"),
        ("help me understand this", "help"),
        ("status", "status"),
    ]:
        parsed = reg.parse(text, projects=PROJECTS)
        assert isinstance(parsed, Invocation) and parsed.spec.name == name, text


def test_the_tables_cover_at_least_thirty_lines() -> None:
    assert len(USAGE_ERRORS) + len(FREEFORM) >= 30 and len(FREEFORM) >= 15


def _reference_suggestion(registry: Registry, word: str, cutoff: float) -> str | None:
    """What difflib itself finds among every command name and first word (the suggestion
    before any shortcut): the shortcut must never change a suggestion."""
    specs = registry.specs()
    firsts: dict[str, str] = {}
    for spec in specs:
        firsts.setdefault(spec.words[0], spec.name)
    names = [s.name for s in specs]
    words = list(dict.fromkeys([*names, *firsts]))
    phrases = [n for n in names if " " in n]
    pool = phrases if " " in word and cutoff >= 0.8 else words
    close = difflib.get_close_matches(word, pool, n=1, cutoff=cutoff)
    return firsts.get(close[0], close[0]) if close else None


def _near_misses() -> st.SearchStrategy[str]:
    """Command names with a letter dropped, doubled, swapped or replaced, and noise."""
    names = sorted({s.name for s in build_registry().specs()})

    @st.composite
    def mutated(draw: st.DrawFn) -> str:
        name = draw(st.sampled_from(names))
        i = draw(st.integers(0, len(name) - 1))
        letter = draw(st.sampled_from("abcdeilnorstuy "))
        edit = draw(st.sampled_from(["drop", "double", "swap", "replace", "append"]))
        if edit == "drop":
            return name[:i] + name[i + 1 :]
        if edit == "double":
            return name[:i] + name[i] + name[i:]
        if edit == "swap" and i + 1 < len(name):
            return name[:i] + name[i + 1] + name[i] + name[i + 2 :]
        if edit == "replace":
            return name[:i] + letter + name[i + 1 :]
        return name + letter

    noise = st.text(alphabet="abcdefgilmnoprstuwy0123 ", min_size=1, max_size=14)
    return st.one_of(mutated(), noise).map(str.lower).filter(str.strip)


@given(word=_near_misses(), cutoff=st.sampled_from([0.6, 0.8]))
@settings(max_examples=400, deadline=None)
def test_suggestions_are_the_ones_difflib_finds(word: str, cutoff: float) -> None:
    registry = build_registry()
    assert registry.suggest(word, cutoff) == _reference_suggestion(registry, word, cutoff)


def _two_words() -> st.SearchStrategy[tuple[str, str]]:
    """Commands of several words, mistyped, split into a first word and the rest (whose
    length varies: the parser judges a phrase by it before asking difflib), and noise."""
    phrases = sorted({s.name for s in build_registry().specs() if " " in s.name})
    word = st.text(alphabet="abcdeilnoprstuwy0123", min_size=1, max_size=12)

    @st.composite
    def mutated(draw: st.DrawFn) -> tuple[str, str]:
        name = draw(st.sampled_from(phrases))
        first, _, second = name.partition(" ")
        i = draw(st.integers(0, len(second)))
        cut = draw(st.integers(0, 3))
        extra = draw(st.text(alphabet="abcdeilnorstuy", max_size=4))
        second = (second[:i] + extra + second[i + cut :]) or "x"
        if draw(st.booleans()):
            j = draw(st.integers(0, len(first) - 1))
            first = first[:j] + draw(st.sampled_from("aeinorst")) + first[j + 1 :]
        return first, second

    return st.one_of(mutated(), st.tuples(word, word))


@given(words=_two_words())
@settings(max_examples=400, deadline=None)
def test_a_mistyped_command_of_two_words_is_caught_whatever_the_second_word(
    words: tuple[str, str],
) -> None:
    """Two words that are no command but close to one get "Did you mean" exactly when
    difflib itself finds the command; otherwise they are a prompt."""
    registry = build_registry()
    first, second = words
    if any(spec.words[0] == first for spec in registry.specs()):
        return  # a command word: parsed as that command, not as a near miss
    text = f"{first} {second}"
    expected = _reference_suggestion(registry, first, 0.8) or _reference_suggestion(
        registry, text, 0.8
    )
    if expected is None:
        assert registry.parse(text) == Freeform(text, False)
    else:
        with pytest.raises(UsageError, match=f"Did you mean `{expected}`"):
            registry.parse(text)
