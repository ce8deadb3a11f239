"""podbay: drive many coding projects from chat."""

from __future__ import annotations

__version__ = "0.1.0"
