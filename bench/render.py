"""Render benchmark: a ~200 KB agent transcript rendered and split for every dialect.

Run: .venv/bin/python bench/render.py [--runs N]   (writes bench/results/render.json)
The transcript is generated from a fixed seed (no network, same text on every machine). Each
dialect does what its transport does with one long reply: the console renders the whole text
to plain; Matrix splits at 12,000 (UTF-8 bytes when the splitter has units, as
MatrixTransport does; characters for the baseline) and renders every chunk to a plain body
and sanitised HTML; Slack splits at 40,000 characters and renders mrkdwn (3,000-character
Block Kit sections are noted, not measured, until a section splitter exists); WhatsApp
splits at 4,096 characters and renders its own syntax. The split limits apply to the
Markdown, so each row also counts rendered messages that exceed the platform's own limit.
The markdown-it-py implementation (podbay.transports.render / render_chat) runs in the same
process as the regex renderer it replaced (bench/baseline_render.py), interleaved,
so a busy moment on a shared machine lands on both. The baseline has no Slack or WhatsApp
renderer: those rows say n/a.

Time is the median of N warm runs (the first call, which builds parsers and compiles
patterns, is reported on its own). Peak memory is tracemalloc's peak for one run, measured
apart from the timed runs because tracing slows Python down; it sees Python allocations only,
not those inside nh3's Rust code.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import json
import os
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import baseline_render  # noqa: E402

TARGET_BYTES = 200 * 1024
SEED = 11
LIMITS = {"matrix": 12000, "slack": 40000, "slack_section": 3000, "whatsapp": 4096}
# What one platform message may hold once rendered (the split limits apply to the Markdown):
# a Matrix event is at most 65,536 bytes of JSON, so body + formatted_body must stay below it;
# Slack truncates chat.postMessage text past 40,000 characters; WhatsApp refuses past 4,096.
MESSAGE_LIMITS: dict[str, tuple[int, str]] = {
    "matrix_html": (65536, "bytes"),
    "slack_mrkdwn": (40000, "chars"),
    "whatsapp": (4096, "chars"),
}

# --- transcript -------------------------------------------------------------------------------

_VOCABULARY = (
    "the agent reads config file module test fails because handler returns None when session "
    "key is missing so we guard it and add a regression test then run the suite again with "
    "coverage container volume image build cache layer port ssh host dispatcher inbox store "
    "migration schema row transaction retry backoff timeout stream parser token fence chunk "
    "limit"
)
_WORDS = tuple(_VOCABULARY.split())
_EXOTIC = (
    "café",
    "naïve",
    "Straße",
    "Ünïcödé",
    "日本語",
    "данные",
    "→",
    "✅",
    "⚠️",
    "🚀",
    "🐛",
    "👍🏽",
    "≤ 4 096",
    "½",
    "Ελληνικά",
    "عربى",
)
_LANGS = ("python", "diff", "console", "json", "yaml", "rust", "typescript", "sql", "toml", "")
_URLS = (
    "https://docs.python.org/3/library/asyncio-task.html#asyncio.TaskGroup",
    "https://github.com/executablebooks/markdown-it-py/issues/42",
    "https://spec.matrix.org/v1.11/client-server-api/#mroommessage-msgtypes",
    "https://api.slack.com/reference/surfaces/formatting#escaping",
    "mailto:ops@example.org",
)


class _Transcript:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()

    def words(self, low: int, high: int) -> str:
        rng = self.rng
        out = []
        for _ in range(rng.randint(low, high)):
            roll = rng.random()
            word = rng.choice(_WORDS)
            if roll < 0.06:
                word = rng.choice(_EXOTIC)
            elif roll < 0.10:
                word = f"`{word}_{rng.randint(0, 99)}()`"
            elif roll < 0.12:
                word = f"**{word}**"
            elif roll < 0.14:
                word = f"*{word}*"
            elif roll < 0.15:
                word = f"~~{word}~~"
            elif roll < 0.16:
                word = f"[{word}]({rng.choice(_URLS)})"
            elif roll < 0.165:
                word = rng.choice(("<kbd>Ctrl</kbd>+<kbd>C</kbd>", "<br>", f"<sub>{word}</sub>"))
            out.append(word)
        return " ".join(out)

    def paragraph(self) -> str:
        sentences = [self.words(6, 18).capitalize() + "." for _ in range(self.rng.randint(2, 5))]
        return " ".join(sentences)

    def heading(self) -> str:
        return "#" * self.rng.randint(1, 4) + " " + self.words(2, 6).capitalize()

    def nested_list(self) -> str:
        rng = self.rng
        lines = []
        ordered = rng.random() < 0.4
        for i in range(rng.randint(3, 7)):
            marker = f"{i + 1}." if ordered else "-"
            lines.append(f"{marker} {self.words(4, 14)}")
            indent = " " * len(marker + " ")
            for _ in range(rng.randint(0, 3)):
                lines.append(f"{indent}- {self.words(3, 10)}")
                if rng.random() < 0.3:
                    lines.append(f"{indent}  - {self.words(2, 8)}")
            if rng.random() < 0.1:
                lines += ["", f"{indent}```console", f"{indent}$ pytest -q -x", f"{indent}```"]
        return "\n".join(lines)

    def table(self) -> str:
        rng = self.rng
        cols = rng.randint(3, 5)
        head = [self.words(1, 2) for _ in range(cols)]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * cols) + "|"]
        for _ in range(rng.randint(3, 12)):
            cells = [self.words(1, 4).replace("|", "/") for _ in range(cols)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def code(self) -> str:
        rng = self.rng
        lang = rng.choice(_LANGS)
        lines = []
        for i in range(rng.randint(10, 140)):
            depth = rng.randint(0, 3)
            name = rng.choice(_WORDS)
            if lang == "diff":
                prefix = rng.choice(("+", "-", " ", " "))
                lines.append(f"{prefix}{'    ' * depth}{self.words(2, 9)}")
            elif lang == "console":
                lines.append(f"tests/test_{name}.py::test_{i} PASSED  [{i % 100:3d}%]")
            elif lang in ("json", "yaml", "toml"):
                lines.append(f'{"  " * depth}"{name}_{i}": {rng.randint(0, 9999)},')
            else:
                lines.append(
                    f"{'    ' * depth}{name}_{i} = {name}(x, y=<{i}>, **kw)  # {name} & co"
                )
        self.counts["code_lines"] += len(lines)
        info = f"{lang} title=out.{lang or 'txt'}" if lang and rng.random() < 0.3 else lang
        fence = "````" if rng.random() < 0.1 else "```"
        inner = ["```", "a fence inside a longer fence", "```"] if fence == "````" else []
        return "\n".join([fence + info, *lines, *inner, fence])

    def html_block(self) -> str:
        return "<details>\n<summary>Full log</summary>\n\n" + self.paragraph() + "\n\n</details>"

    def quote(self) -> str:
        return "\n".join("> " + self.words(5, 12) for _ in range(self.rng.randint(1, 4)))

    def build(self, target_bytes: int) -> str:
        rng = self.rng
        blocks: list[str] = []
        size = 0
        turn = 0
        while size < target_bytes:
            turn += 1
            part = [f"## Turn {turn}: {self.words(2, 5)}", self.paragraph()]
            for _ in range(rng.randint(3, 9)):
                kind = rng.choices(
                    ("paragraph", "heading", "list", "table", "code", "html", "quote", "rule"),
                    weights=(30, 6, 14, 5, 12, 2, 3, 1),
                )[0]
                self.counts[kind] += 1
                part.append(
                    {
                        "paragraph": self.paragraph,
                        "heading": self.heading,
                        "list": self.nested_list,
                        "table": self.table,
                        "code": self.code,
                        "html": self.html_block,
                        "quote": self.quote,
                        "rule": lambda: "---",
                    }[kind]()
                )
            text = "\n\n".join(part)
            blocks.append(text)
            size += len(text.encode()) + 2
        return "\n\n".join(blocks) + "\n"


def transcript(target_bytes: int = TARGET_BYTES, seed: int = SEED) -> tuple[str, dict[str, int]]:
    """The transcript and how many blocks of each kind it holds."""
    generator = _Transcript(seed)
    text = generator.build(target_bytes)
    return text, dict(sorted(generator.counts.items()))


# --- implementations --------------------------------------------------------------------------

Message = tuple[str, ...]  # the rendered fields of one platform message
Pipeline = Callable[[str], list[Message]]


def _accepts(func: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


def _matrix(
    split: Callable[..., list[str]], plain: Callable[[str], str], html: Callable[[str], str]
) -> Pipeline:
    # What MatrixTransport.send does: split the Markdown, then a plain body and HTML per chunk.
    def run(text: str) -> list[Message]:
        return [(plain(chunk), html(chunk)) for chunk in split(text, LIMITS["matrix"])]

    return run


def _split_then(
    split: Callable[..., list[str]], limit: int, render: Callable[..., str]
) -> Pipeline:
    def run(text: str) -> list[Message]:
        return [(render(chunk),) for chunk in split(text, limit)]

    return run


def baseline_pipelines() -> dict[str, Pipeline | None]:
    b = baseline_render
    return {
        "plain": lambda text: [(b.markdown_to_plain(text),)],
        "matrix_html": _matrix(b.split_markdown, b.markdown_to_plain, b.markdown_to_html),
        "slack_mrkdwn": None,
        "whatsapp": None,
    }


def _import(name: str) -> tuple[Any, float]:
    started = time.perf_counter()
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None, 0.0
    return module, round(time.perf_counter() - started, 4)


def new_pipelines() -> tuple[dict[str, Pipeline | None], dict[str, Any]]:
    """Import the markdown-it-py implementation; a piece that does not exist yet is None.

    Imported here, not at the top, so that the benchmark runs (baseline only) before the new
    renderers land and picks up whatever of them exists.
    """
    pipelines: dict[str, Pipeline | None] = dict.fromkeys(
        ("plain", "matrix_html", "slack_mrkdwn", "whatsapp")
    )
    render, render_s = _import("podbay.transports.render")
    how: dict[str, Any] = {"import_render_s": render_s}
    if render is None or "markdown_it" not in Path(inspect.getfile(render)).read_text():
        how["render"] = "podbay.transports.render is still the regex renderer"
        return pipelines, how
    split = render.split_markdown
    matrix_split = split
    if _accepts(split, "unit"):
        # MatrixTransport measures its chunks in UTF-8 bytes once the splitter can.
        matrix_split = partial(split, unit="bytes")
    pipelines["plain"] = lambda text: [(render.markdown_to_plain(text),)]
    pipelines["matrix_html"] = _matrix(
        matrix_split, render.markdown_to_plain, render.markdown_to_html
    )
    unit = "bytes" if matrix_split is not split else "chars"
    how["plain"] = "markdown_to_plain(text)"
    how["matrix_html"] = (
        f"split_markdown(text, {LIMITS['matrix']}, unit={unit!r}), "
        "then markdown_to_plain and markdown_to_html per chunk"
    )
    chat, chat_s = _import("podbay.transports.render_chat")
    how["import_render_chat_s"] = chat_s
    for dialect, name, limit in (
        ("slack_mrkdwn", "markdown_to_mrkdwn", LIMITS["slack"]),
        ("whatsapp", "markdown_to_whatsapp", LIMITS["whatsapp"]),
    ):
        func = getattr(chat, name, None)
        if func is None:
            how[dialect] = f"podbay.transports.render_chat.{name} missing"
            continue
        pipelines[dialect] = _split_then(split, limit, func)
        how[dialect] = f"split_markdown(text, {limit}), then {name} per chunk"
    public = [n for n in dir(chat) if not n.startswith("_")] if chat is not None else []
    sections = [n for n in public if "section" in n.lower() or "blocks" in n.lower()]
    # Slack caps a Block Kit section at 3,000 characters; measured only if a splitter exists.
    how["slack_sections_3000"] = (
        f"available, not measured: {sections}" if sections else "no section splitter exposed"
    )
    return pipelines, how


# --- measuring --------------------------------------------------------------------------------


def _peak_bytes(run: Pipeline, text: str) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        out = run(text)
        peak = tracemalloc.get_traced_memory()[1]
        del out
    finally:
        tracemalloc.stop()
    return peak - before


def _output(dialect: str, run: Pipeline, text: str) -> dict[str, Any]:
    messages = run(text)
    out: dict[str, Any] = {
        "messages": len(messages),
        "output_chars": sum(len(field) for message in messages for field in message),
        "largest_message_chars": max((sum(map(len, m)) for m in messages), default=0),
    }
    if dialect in MESSAGE_LIMITS:
        limit, unit = MESSAGE_LIMITS[dialect]
        sizes = [
            sum(len(f) if unit == "chars" else len(f.encode()) for f in message)
            for message in messages
        ]
        out[f"messages_over_{limit}_{unit}"] = sum(1 for size in sizes if size > limit)
    return out


def measure(
    sides: dict[str, dict[str, Pipeline | None]], text: str, runs: int
) -> dict[str, dict[str, Any]]:
    dialects = list(next(iter(sides.values())))
    results: dict[str, dict[str, Any]] = {d: {} for d in dialects}
    times: dict[tuple[str, str], list[float]] = {}
    for dialect in dialects:
        for side, pipelines in sides.items():
            run = pipelines[dialect]
            if run is None:
                results[dialect][side] = "n/a"
                continue
            started = time.perf_counter()
            run(text)  # first call: parser construction, pattern compilation, imports
            first = time.perf_counter() - started
            results[dialect][side] = {
                "first_call_s": round(first, 4),
                **_output(dialect, run, text),
            }
            times[(dialect, side)] = []
    for _ in range(runs):  # interleaved, so machine noise is shared by both sides
        for (dialect, side), samples in times.items():
            run = sides[side][dialect]
            assert run is not None
            started = time.perf_counter()
            run(text)
            samples.append(time.perf_counter() - started)
    for (dialect, side), samples in times.items():
        run = sides[side][dialect]
        assert run is not None
        samples.sort()
        results[dialect][side].update(
            median_s=round(statistics.median(samples), 4),
            min_s=round(samples[0], 4),
            max_s=round(samples[-1], 4),
            peak_bytes=_peak_bytes(run, text),
        )
    for row in results.values():
        new, old = row.get("new"), row.get("baseline")
        if isinstance(new, dict) and isinstance(old, dict):
            row["time_ratio_new_over_baseline"] = round(new["median_s"] / old["median_s"], 2)
            row["peak_ratio_new_over_baseline"] = round(new["peak_bytes"] / old["peak_bytes"], 2)
        else:
            row["time_ratio_new_over_baseline"] = "n/a"
            row["peak_ratio_new_over_baseline"] = "n/a"
    return results


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "platform": platform.platform(),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("markdown-it-py", "mdit-py-plugins", "nh3", "rich"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "render.json")
    args = parser.parse_args()
    text, counts = transcript()
    pipelines, how = new_pipelines()
    figures = measure({"new": pipelines, "baseline": baseline_pipelines()}, text, args.runs)
    lines = text.split("\n")
    results = {
        "benchmark": "render",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "libraries": _versions(),
        "transcript": {
            "seed": SEED,
            "bytes_utf8": len(text.encode()),
            "chars": len(text),
            "lines": len(lines),
            "blocks": counts,
            "non_ascii_chars": sum(1 for ch in text if ord(ch) > 127),
        },
        "limits_chars": LIMITS,
        "runs": args.runs,
        "method": (
            "median of N warm runs per dialect, new and baseline interleaved in one process; "
            "peak = tracemalloc peak of one separate run (Python allocations only)"
        ),
        "new_calls": how,
        "dialects": figures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
