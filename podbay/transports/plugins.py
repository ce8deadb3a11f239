"""Transports are plugins.

A transport module declares one :class:`TransportPlugin`: its name (the
``[transports.<name>]`` section and the first part of its sessions' keys), its config
class, how to build the transport, and optionally what ``podbay doctor`` should check.
Plugins are found through the ``podbay.transports`` entry-point group, so a transport
(built in or from another package) is added by declaring it in its ``pyproject.toml``::

    [project.entry-points."podbay.transports"]
    slack = "podbay.transports.slack:PLUGIN"

Nothing else changes: the configuration grows the section (see :mod:`podbay.config`),
``podbay run`` starts it when ``enabled = true``, and ``podbay init`` writes its keys.

A plugin module must stay cheap to import (the configuration imports it): the platform
SDK is imported inside the functions that need it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from podbay.configbase import TransportSection
from podbay.errors import ConfigError

if TYPE_CHECKING:
    from podbay.config import Settings
    from podbay.transports.base import Transport
    from podbay.transports.http import WebhookServer

log = logging.getLogger(__name__)

GROUP = "podbay.transports"


@dataclass(frozen=True)
class DoctorReport:
    """What a plugin's check found: lines that are fine, and (problem, fix) pairs."""

    notes: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class TransportContext:
    """What a transport may use when it is built."""

    settings: Settings
    # The webhook server: a transport mounts its routes on it while being built.
    http: WebhookServer
    # Whether an identity ("slack:U123") is listed in [access] at all.
    is_allowed: Callable[[str], bool]

    def config(self, name: str) -> Any:
        return self.settings.transport_config(name)


@dataclass(frozen=True)
class TransportPlugin:
    name: str
    config: type[TransportSection]
    create: Callable[[TransportContext], Transport]
    doctor: Callable[[Settings, Any], Awaitable[DoctorReport]] | None = None
    summary: str = ""


@functools.cache
def discover() -> dict[str, TransportPlugin]:
    """Every installed transport plugin by name, in a stable order."""
    found: dict[str, TransportPlugin] = {}
    for entry in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        plugin = entry.load()
        if not isinstance(plugin, TransportPlugin):
            raise ConfigError(f"entry point {entry.value} ({GROUP}) is not a TransportPlugin")
        if plugin.name != entry.name:
            raise ConfigError(
                f"entry point {entry.name} ({GROUP}) declares a plugin named {plugin.name!r}"
            )
        found[plugin.name] = plugin
    if not found:
        raise ConfigError(
            "no transport plugins are installed (the podbay.transports entry points are "
            "missing); reinstall podbay, e.g. `./scripts/bootstrap-venv --force`"
        )
    return found


def create_enabled(context: TransportContext) -> list[Transport]:
    """The transports whose section says ``enabled = true``."""
    transports: list[Transport] = []
    for name, plugin in discover().items():
        if context.config(name).enabled:
            transports.append(plugin.create(context))
    return transports
