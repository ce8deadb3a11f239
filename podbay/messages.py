"""Values that flow between transports, the dispatcher and commands.

Markdown is the source format of every reply; transports render it for their platform.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, order=True)
class SessionKey:
    """One conversation: a room, a channel (optionally a thread in it), a DM or the console."""

    transport: str
    conversation: str
    thread: str = ""

    def __str__(self) -> str:
        base = f"{self.transport}:{self.conversation}"
        return f"{base}/{self.thread}" if self.thread else base

    @classmethod
    def parse(cls, text: str) -> SessionKey:
        """Inverse of ``str()``; a thread follows the last ``/``."""
        transport, sep, rest = text.partition(":")
        if not sep or not transport:
            raise ValueError(f"not a session key: {text!r}")
        conversation, slash, thread = rest.rpartition("/")
        return cls(transport, conversation, thread) if slash else cls(transport, rest)


@dataclass(frozen=True)
class Sender:
    """Who wrote a message. ``identity`` is what ``[access]`` lists."""

    transport: str
    user_id: str
    display_name: str = ""

    @property
    def identity(self) -> str:
        return f"{self.transport}:{self.user_id}"

    @property
    def name(self) -> str:
        return self.display_name or self.user_id


@dataclass(frozen=True)
class Inbound:
    """One message from a platform, already stripped of platform markup by the transport.

    ``platform_id`` is the platform's own id for the message; a second Inbound with the
    same (transport, platform_id) is a redelivery. ``is_direct`` marks a private 1:1
    conversation. ``mentioned`` says the platform flagged the bot as addressed (a pill,
    ``<@U…>``); ``aliases`` lists extra names the bot answers to in this conversation.
    """

    session: SessionKey
    sender: Sender
    text: str
    platform_id: str
    received_at: float = field(default_factory=time.time)
    is_direct: bool = False
    mentioned: bool = False
    aliases: tuple[str, ...] = ()
    # False in busy group rooms: there, freeform text counts only when the bot is addressed.
    ambient: bool = True
    # A button click or a reaction: a typed decision, not text. ``text`` then only says
    # what it was ("confirm") for the inbox and the audit log.
    action: Action | None = None


ActionKind = Literal["confirm", "cancel"]


@dataclass(frozen=True)
class Action:
    """A decision taken by clicking (a Slack button, a ✅ reaction on Matrix).

    ``target`` names what is decided: the id of a proposal for confirm/cancel. Whether the
    one who clicked may decide is the command layer's call, never the transport's.
    """

    kind: ActionKind
    target: str


@dataclass(frozen=True)
class Button:
    label: str
    action: Action
    style: Literal["primary", "danger", ""] = ""


ReplyKind = Literal["info", "progress", "error", "agent", "confirm", "denied"]


@dataclass(frozen=True)
class Reply:
    """A Markdown reply. ``buttons`` are offered where the transport supports them.

    ``private_to`` marks a reply meant for one person only (connection details, an error
    about their own request): a transport that can show it to them alone does (Slack's
    ephemeral messages); others post it in the conversation as usual.
    """

    text: str
    kind: ReplyKind = "info"
    buttons: tuple[Button, ...] = ()
    private_to: Sender | None = None


@dataclass(frozen=True)
class MessageRef:
    """Handle to a sent message, for later edits. ``ids`` holds one id per sent chunk."""

    session: SessionKey
    ids: tuple[str, ...]
