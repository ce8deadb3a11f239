"""The summary of every benchmark: one table of goals, met or missed, and the plot.

Run: .venv/bin/python bench/summary.py   (reads bench/results/*.json; writes docs/bench.png)

Each results file may carry a ``goals`` list of {"id", "goal", "value", "limit", "unit",
"met"} and a ``ratios`` mapping; older files are read through the adapters below. A goal
whose benchmark did not run is listed as "not measured", never as met.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PLOT = ROOT / "docs" / "bench.png"

# The [bench] issue's table: id -> (benchmark file, goal as written).
GOALS: dict[int, tuple[str, str]] = {
    1: ("dispatcher", "1,000 x 10 messages: >= 5,000 msg/s and <= 2x one INSERT+commit each"),
    2: ("create", "warm `new project` until SSH accepts <= 1.0x `devcontainer up`"),
    3: ("status", "`status` with 50 running projects <= 300 ms"),
    4: ("matrix", "`help`/`status` round trip via Synapse <= 1.3x a bare nio echo bot"),
    5: ("slack", "slash command ack <= 1.2x bolt's hello app"),
    6: ("agents", "agent turn overhead over `docker exec` <= 150 ms median"),
    7: ("stop", "`stop` until the process tree is verified dead <= 2 s"),
    8: ("rss", "idle RSS of `podbay run` (Matrix + Slack) <= 120 MB"),
}


def _slack(data: dict[str, Any]) -> list[dict[str, Any]]:
    http = data["slack_http"]
    ratio = http["ratios_podbay_over_baseline"]["ack_median"]
    return [
        {
            "id": 5,
            "goal": "ack median <= 1.2x",
            "value": ratio,
            "limit": 1.2,
            "unit": "x",
            "met": ratio <= 1.2,
        }
    ]


def _agents(data: dict[str, Any]) -> list[dict[str, Any]]:
    overhead_ms = round(float(data["overhead_median_s"]) * 1000, 1)
    return [
        {
            "id": 6,
            "goal": "overhead <= 150 ms median",
            "value": overhead_ms,
            "limit": 150,
            "unit": "ms",
            "met": overhead_ms <= 150,
        }
    ]


ADAPTERS: dict[str, Callable[[dict[str, Any]], list[dict[str, Any]]]] = {
    "slack": _slack,
    "agents": _agents,
}


def _goals_in(data: object) -> list[dict[str, Any]]:
    """Every ``goals`` list anywhere in a results file."""
    found: list[dict[str, Any]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "goals" and isinstance(value, list):
                found.extend(g for g in value if isinstance(g, dict) and "met" in g)
            else:
                found.extend(_goals_in(value))
    elif isinstance(data, list):
        for item in data:
            found.extend(_goals_in(item))
    return found


def collect() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for goal_id, (name, text) in GOALS.items():
        path = RESULTS / f"{name}.json"
        if not path.exists():
            rows.append({"id": goal_id, "goal": text, "status": "not measured", "when": ""})
            continue
        data = json.loads(path.read_text())
        goals = [g for g in _goals_in(data) if g.get("id", goal_id) == goal_id]
        if not goals and name in ADAPTERS:
            goals = ADAPTERS[name](data)
        if not goals:
            rows.append({"id": goal_id, "goal": text, "status": "no goal recorded", "when": ""})
            continue
        for g in goals:
            value = f"{g['value']} {g.get('unit', '')}".strip()
            rows.append(
                {
                    "id": goal_id,
                    "goal": str(g.get("goal", text)),
                    "value": value,
                    "limit": g.get("limit"),
                    "ratio": g.get("value") if g.get("unit") == "x" else None,
                    "status": "met" if g["met"] else "missed",
                    "when": str(data.get("when", "")),
                }
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| # | goal | measured | result | when |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['id']} | {row['goal']} | {row.get('value', '—')} | {row['status']} "
            f"| {row.get('when', '')} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]]) -> bool:
    """Bars of podbay / baseline for every ratio goal, with each goal's limit marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (./scripts/bootstrap-venv --all installs it)")
        return False
    ratios = [r for r in rows if r.get("ratio") is not None]
    if not ratios:
        return False
    labels = [f"#{r['id']} {str(r['goal'])[:38]}" for r in ratios]
    values = [float(r["ratio"]) for r in ratios]
    limits = [float(r["limit"]) for r in ratios]
    colors = ["#2e7d32" if r["status"] == "met" else "#c62828" for r in ratios]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(ratios) + 1.5))
    positions = list(range(len(ratios)))
    ax.barh(positions, values, color=colors)
    for y, limit in zip(positions, limits, strict=True):
        ax.plot([limit, limit], [y - 0.4, y + 0.4], color="black", linewidth=2)
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_yticks(positions, labels)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("podbay time / baseline time in the same run (log; black mark: goal)")
    ax.set_title("podbay against its baselines (green: goal met, red: missed)")
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    rows = collect()
    print(table(rows))
    if plot(rows):
        print(f"plot: {PLOT.relative_to(ROOT)}")
    missed = [r for r in rows if r["status"] != "met"]
    print(f"{len(rows) - len(missed)} of {len(rows)} goals met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
