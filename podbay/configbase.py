"""The base of every configuration section (podbay's own and each transport plugin's).

It lives apart from :mod:`podbay.config` so that a transport module can define its
``[transports.<name>]`` section without importing the whole configuration (which is built
from the plugins, see :mod:`podbay.transports.plugins`).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TransportSection(Section):
    """Every ``[transports.<name>]`` section has ``enabled``."""

    enabled: bool = False


def http_url(value: str, example: str) -> str:
    """``value`` unless it is set and not an http(s) URL (then a message with ``example``)."""
    if value and not re.match(r"^https?://[^\s/]+", value):
        raise ValueError(f'expected an http(s) URL, e.g. "{example}"')
    return value
