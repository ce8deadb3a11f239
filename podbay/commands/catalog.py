"""The registry of every built-in command."""

from __future__ import annotations

from collections.abc import Iterable

from podbay.commands import builtin, projects, runs
from podbay.commands.registry import Registry


def build_registry(bot_name: str = "podbay", aliases: Iterable[str] = ()) -> Registry:
    registry = Registry(bot_name, aliases)
    builtin.register(registry)
    projects.register(registry)
    runs.register(registry)
    builtin.register_session_commands(registry)
    return registry
