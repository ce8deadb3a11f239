"""Exception hierarchy.

Third-party exceptions are translated at the boundary (``raise TransportError(...) from exc``).
Only :class:`UserError` text is ever shown to a chat user; anything else is reported with a
short reference id while the traceback goes to the log under that id.
"""

from __future__ import annotations


class PodbayError(Exception):
    """Base class of every error podbay raises on purpose."""


class UserError(PodbayError):
    """A problem the user can fix; the message is shown to them verbatim."""


class UsageError(UserError):
    """A command was recognised but its arguments are wrong; the message carries the usage."""


class PermissionDenied(UserError):
    """The sender's role does not allow the command."""


class BusyError(UserError):
    """A project already has a job running."""


class NotConfigured(UserError):
    """A feature needs configuration (or a component) that is missing."""


class ConfigError(PodbayError):
    """The configuration file or environment is invalid; the message names the key."""


class TransportError(PodbayError):
    """A chat platform call failed."""


class EngineError(PodbayError):
    """The engine failed to carry out an operation (Docker, git, agent, ...)."""


class StoreError(PodbayError):
    """The database is unusable (corrupt, newer schema, ...)."""


class EngineUnavailable(UserError, EngineError):
    """The Docker engine cannot be reached (stopped, restarting, socket gone): the user is
    told so plainly, and podbay keeps running until it is back."""


class StorageFull(UserError, StoreError):
    """The disk under the data dir is full: nothing could be stored."""
