"""The status report, shared by the chat command and ``podbay status``."""

from __future__ import annotations

import time
from collections.abc import Sequence

from podbay.engine.core import StatusReport
from podbay.engine.store import ProjectRow
from podbay.transports.base import TransportState


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d"


def _size(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}".replace(".0", "")
        n = n / 1024  # type: ignore[assignment]
    return f"{n}G"


def _project_line(report: StatusReport, project: ProjectRow, now: float) -> str:
    parts = [f"`{project.name}`", project.stack or "base"]
    container = report.containers.get(project.name)
    if project.state != "ready":
        parts.append(project.state)
    elif container is None:
        parts.append("⚠ container missing" if not report.notes else "container unknown")
    else:
        parts.append(container.label)
        if container.state == "running" and container.status_text.startswith("Up "):
            parts.append(container.status_text.lower().split(" (")[0])
    if project.ssh_port:
        parts.append(f"ssh {project.ssh_port}")
    stats = report.stats.get(project.name)
    if stats is not None and container is not None and container.state == "running":
        cpu = "" if stats.cpu_percent is None else f"cpu {stats.cpu_percent:.0f}% "
        # Figures come from a background sample: their age says how current they are.
        age = _age(now - stats.sampled_at)
        parts.append(f"{cpu}mem {_size(stats.memory_bytes)} (sampled {age} ago)")
    return " · ".join(parts)


def _transports_line(transports: Sequence[TransportState], serving: bool) -> str | None:
    shown = [t for t in transports if not t.local]
    if not shown:
        return None
    if not serving:
        return "**Transports**: podbay is not running (`podbay run` serves them)"
    marks = {"connected": "", "starting": "", "stopped": "", "reconnecting": "⚠ ", "failed": "⛔ "}
    return "**Transports**: " + " · ".join(marks[t.status] + t.describe() for t in shown)


def render_status(
    report: StatusReport,
    now: float | None = None,
    *,
    transports: Sequence[TransportState] = (),
    serving: bool = True,
) -> str:
    """Compact Markdown, readable on a phone. ``transports`` are the chat transports'
    states (the local console is left out); ``serving`` is False when no podbay runs."""
    now = time.time() if now is None else now
    lines: list[str] = []
    if (line := _transports_line(transports, serving)) is not None:
        lines.append(line)
    if report.projects:
        lines.append(f"**Projects ({len(report.projects)})**")
        for project in report.projects:
            lines.append("• " + _project_line(report, project, now))
    else:
        lines.append("**Projects**: none yet — `new project <name>` creates one.")
    for orphan in report.orphans:
        lines.append(
            f"• ⚠ container `{orphan.name}` is labelled for project `{orphan.project}`, "
            "which podbay does not know (left alone)"
        )
    if report.active_runs:
        lines.append(f"**Runs ({len(report.active_runs)} active)**")
        for run in report.active_runs:
            since = run.started_at or run.created_at
            target = f" → `{run.project}`" if run.project else ""
            lines.append(
                f"• #{run.id} {run.session_key}{target} · {run.status} {_age(now - since)}"
            )
    else:
        lines.append("**Runs**: none active")
    queued = {k: n for k, n in report.queue_depths.items() if n}
    if queued:
        lines.append("**Queues**: " + ", ".join(f"{k} {n}" for k, n in sorted(queued.items())))
    if report.sessions:
        lines.append("**Conversations (last 24 h)**")
        for session in report.sessions[:10]:
            using = f" → `{session.active_project}`" if session.active_project else ""
            lines.append(
                f"• {session.session_key}{using} · last activity "
                f"{_age(now - session.last_activity)} ago"
            )
    if report.jobs:
        lines.append("**Jobs**")
        for job in report.jobs:
            since = job.started_at or job.created_at
            lines.append(f"• {job.kind} `{job.project}` · {job.status} {_age(now - since)}")
    lines.extend(report.notes)
    return "\n".join(lines)
