"""Matrix transport on matrix-nio: one session per room.

- Login once; the access token, device id and sync token live in ``<data>/matrix/``, so a
  restart neither logs in again nor creates a device, and resumes where it stopped.
- On the very first start the history is skipped: nothing from before is ever answered.
- Invites are joined only from users in ``[access]`` (also those pending at startup).
- Every sync or send failure, including error *responses*, is retried with capped
  exponential backoff and jitter; ``M_LIMIT_EXCEEDED`` honours ``retry_after_ms``.
- A limited timeline (a burst larger than the sync filter's limit) is backfilled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from podbay.commands.roles import role_for
from podbay.config import MatrixTransportConfig, Settings
from podbay.errors import TransportError
from podbay.messages import Inbound, MessageRef, Reply, Sender, SessionKey
from podbay.transports.base import Capabilities, Submit
from podbay.transports.render import markdown_to_html, markdown_to_plain, split_markdown

log = logging.getLogger(__name__)

IsAllowed = Callable[[str], bool]
# Matrix events may be 64 KiB; HTML roughly doubles the text, so stay well below.
MAX_CHUNK = 12000
TYPING_TIMEOUT_MS = 30000


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, base: float = 0.5, cap: float = 60.0) -> None:
        self.base, self.cap, self.failures = base, cap, 0

    def next_delay(self, retry_after_ms: int | None = None) -> float:
        self.failures += 1
        if retry_after_ms is not None:
            return max(retry_after_ms / 1000, 0.05)
        ceiling = min(self.cap, self.base * (2 ** (self.failures - 1)))
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


class MatrixTransport:
    name = "matrix"
    capabilities = Capabilities(
        max_message_length=MAX_CHUNK, edits=True, typing=True, redaction=True
    )

    def __init__(
        self,
        config: MatrixTransportConfig,
        data_dir: Path,
        is_allowed: IsAllowed,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.state_dir = data_dir / "matrix"
        self.is_allowed = is_allowed
        self._sleep = sleep
        self._client: Any = None
        self._submit: Submit | None = None
        self._task: asyncio.Task[None] | None = None
        self._typing: dict[str, asyncio.Task[None]] = {}
        self._confirmations: dict[str, str] = {}  # event id of a confirm prompt -> room
        self.user_id = config.user_id
        self.ready = asyncio.Event()
        self._started_at = 0.0
        self._warned_encrypted: set[str] = set()
        self.typing_timeout_ms = TYPING_TIMEOUT_MS

    @classmethod
    def from_settings(cls, settings: Settings) -> MatrixTransport:
        """The transport ``[transports.matrix]`` describes; invites follow ``[access]``."""
        return cls(
            settings.transports.matrix,
            settings.data_dir,
            lambda identity: role_for(identity, settings.access) is not None,
        )

    # -- persistence ------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        path = self.state_dir / "state.json"
        if not path.exists():
            return {}
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def _save(self, **changes: Any) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        state = {**self._load(), **changes}
        tmp = self.state_dir / "state.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(state, handle)
        os.replace(tmp, self.state_dir / "state.json")

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, submit: Submit) -> None:
        from nio import AsyncClient, AsyncClientConfig, LoginResponse

        self._submit = submit
        state = await asyncio.to_thread(self._load)
        self._client = AsyncClient(
            self.config.homeserver,
            self.config.user_id,
            device_id=state.get("device_id") or self.config.device_id or None,
            config=AsyncClientConfig(max_limit_exceeded=0, max_timeouts=0),
        )
        token = state.get("access_token") or self.config.access_token
        if token:
            self._client.restore_login(
                self.config.user_id, state.get("device_id") or self.config.device_id, token
            )
        else:
            response = await self._client.login(self.config.password, device_name="podbay")
            if not isinstance(response, LoginResponse):
                await self._client.close()
                raise TransportError(f"Matrix login as {self.config.user_id} failed: {response}")
            await asyncio.to_thread(
                self._save, access_token=response.access_token, device_id=response.device_id
            )
        self.user_id = self._client.user_id
        self._started_at = state.get("first_started_at") or time.time()
        if "first_started_at" not in state:
            await asyncio.to_thread(self._save, first_started_at=self._started_at)
        self._task = asyncio.create_task(self._run(state.get("next_batch")), name="matrix-sync")

    async def stop(self) -> None:
        for task in [*self._typing.values(), self._task]:
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *[t for t in [*self._typing.values(), self._task] if t is not None],
            return_exceptions=True,
        )
        self._typing.clear()
        if self._client is not None:
            await self._client.close()
            self._client = None

    # -- sync -------------------------------------------------------------------------

    def _filter(self) -> dict[str, Any]:
        limit = self.config.sync_timeline_limit
        return {"room": {"timeline": {"limit": limit}, "state": {"lazy_load_members": False}}}

    async def _run(self, since: str | None) -> None:
        from nio import SyncResponse

        backoff = Backoff()
        first = since is None
        # nio keeps room state (members, names) in memory only: the first sync of every
        # process asks for the full state, or DMs would look like group rooms after a restart.
        full_state = True
        while True:
            response = await self._client.sync(
                timeout=0 if first else 30000,
                sync_filter=self._filter(),
                since=since,
                full_state=full_state,
            )
            if not isinstance(response, SyncResponse):
                delay = backoff.next_delay(_retry_after(response))
                log.warning("Matrix sync failed (%s); retrying in %.1f s", response, delay)
                await self._sleep(delay)
                continue
            backoff.reset()
            try:
                if first:
                    # The very first start: history is not ours to answer; only invites count.
                    await self._handle_invites(response)
                else:
                    await self._handle(response, catching_up=not self.ready.is_set())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("handling a Matrix sync failed; it will be fetched again")
                await self._sleep(backoff.next_delay())
                continue
            since = response.next_batch
            await asyncio.to_thread(self._save, next_batch=since)
            first = full_state = False
            self.ready.set()

    async def _handle_invites(self, response: Any) -> None:
        for room_id, info in response.rooms.invite.items():
            inviter = next(
                (
                    e.sender
                    for e in info.invite_state
                    if getattr(e, "membership", None) == "invite"
                    and getattr(e, "state_key", None) == self.user_id
                ),
                None,
            )
            if inviter and self.is_allowed(f"matrix:{inviter}"):
                await self._retry("join", partial(self._client.join, room_id))
            else:
                log.info("ignoring invite to %s from %s (not in [access])", room_id, inviter)

    async def _handle(self, response: Any, *, catching_up: bool) -> None:
        await self._handle_invites(response)
        for room_id, info in response.rooms.join.items():
            events = list(info.timeline.events)
            if info.timeline.limited and info.timeline.prev_batch:
                events = await self._backfill(room_id, info.timeline.prev_batch) + events
            missed = False
            for event in events:
                handled = await self._event(room_id, event, catching_up)
                missed = missed or handled == "missed"
            if self.config.leave_when_alone and await self._leave_if_alone(room_id):
                continue
            if missed:
                await self.send(
                    SessionKey("matrix", room_id),
                    Reply(
                        "Some messages arrived while podbay was offline and are too old "
                        "to act on: missed while offline — please resend.",
                        "error",
                    ),
                )

    async def _leave_if_alone(self, room_id: str) -> bool:
        """Leave a room in which no user from [access] is left (after someone left)."""
        room = self._client.rooms.get(room_id)
        if room is None or not room.users:
            return False
        others = [u for u in room.users if u != self.user_id]
        if any(self.is_allowed(f"matrix:{u}") for u in others):
            return False
        log.info("leaving %s: no user from [access] remains", room_id)
        await self._retry("leave", partial(self._client.room_leave, room_id))
        return True

    async def redact(self, session: SessionKey, platform_id: str, reason: str) -> bool:
        from nio import RoomRedactResponse

        response = await self._client.room_redact(session.conversation, platform_id, reason)
        return isinstance(response, RoomRedactResponse)

    async def _backfill(self, room_id: str, prev_batch: str) -> list[Any]:
        """Events the limited timeline skipped, oldest first (the inbox drops repeats)."""
        from nio import RoomMessagesResponse

        gathered: list[Any] = []
        token: str | None = prev_batch
        for _ in range(20):  # at most 20 pages of 100: a burst of 2,000 messages
            response = await self._retry(
                "backfill", partial(self._client.room_messages, room_id, start=token, limit=100)
            )
            if not isinstance(response, RoomMessagesResponse) or not response.chunk:
                break
            gathered.extend(response.chunk)
            oldest = min(getattr(e, "server_timestamp", 0) for e in response.chunk) / 1000
            if oldest < self._started_at or not response.end:
                break
            token = response.end
        gathered.reverse()
        return gathered

    async def _event(self, room_id: str, event: Any, catching_up: bool) -> str:
        from nio import RoomMessageText

        if getattr(event, "sender", None) == self.user_id:
            return "own"
        sent_at = getattr(event, "server_timestamp", 0) / 1000
        if sent_at and sent_at < self._started_at:
            return "history"  # from before podbay first started: never answered
        if event.source.get("type") == "m.reaction":  # nio's class for it varies by version
            return await self._reaction(room_id, event)
        if event.source.get("type") == "m.room.encrypted":
            if room_id not in self._warned_encrypted:
                self._warned_encrypted.add(room_id)
                log.warning("room %s is encrypted; podbay cannot read it", room_id)
                await self.send(
                    SessionKey("matrix", room_id),
                    Reply(
                        "This room is end-to-end encrypted, which podbay does not support yet: "
                        "it cannot read messages here. Talk to podbay in an unencrypted room.",
                        "error",
                    ),
                )
            return "encrypted"
        if not isinstance(event, RoomMessageText):
            return "ignored"
        if catching_up and time.time() - sent_at > self.config.catch_up_max_age_s:
            return "missed"
        room = self._client.rooms.get(room_id)
        display = room.user_name(event.sender) if room is not None else None
        is_direct = room is not None and room.member_count == 2
        assert self._submit is not None
        await self._submit(
            Inbound(
                session=SessionKey("matrix", room_id),
                sender=Sender("matrix", event.sender, display or event.sender),
                text=event.body,
                platform_id=event.event_id,
                received_at=sent_at or time.time(),
                is_direct=is_direct,
                mentioned=self._mentions_me(event),
                aliases=self._aliases(room),
                ambient=is_direct or room_id in self.config.ambient_rooms,
            )
        )
        return "submitted"

    async def _reaction(self, room_id: str, event: Any) -> str:
        relates = event.source.get("content", {}).get("m.relates_to", {})
        key, target = relates.get("key", ""), relates.get("event_id", "")
        answer = {"✅": "confirm", "✔️": "confirm", "❌": "cancel"}.get(key)
        if answer is None or target not in self._confirmations:
            return "ignored"
        room = self._client.rooms.get(room_id)
        display = room.user_name(event.sender) if room is not None else None
        assert self._submit is not None
        await self._submit(
            Inbound(
                session=SessionKey("matrix", room_id),
                sender=Sender("matrix", event.sender, display or event.sender),
                text=answer,
                platform_id=event.event_id,
                is_direct=room is not None and room.member_count == 2,
                mentioned=True,
                by_reaction=True,
            )
        )
        return "submitted"

    def _aliases(self, room: Any) -> tuple[str, ...]:
        names = [self.user_id, self.user_id.split(":")[0].lstrip("@")]
        if room is not None and (display := room.user_name(self.user_id)):
            names.append(display)
        return tuple(dict.fromkeys(n for n in names if n))

    def _mentions_me(self, event: Any) -> bool:
        mentions = event.source.get("content", {}).get("m.mentions", {})
        if self.user_id in mentions.get("user_ids", []):
            return True
        formatted = event.formatted_body or ""
        return bool(re.search(rf"matrix\.to/#/{re.escape(self.user_id)}", formatted))

    # -- sending ----------------------------------------------------------------------

    async def _retry(self, what: str, call: Callable[[], Awaitable[Any]], attempts: int = 6) -> Any:
        from nio import ErrorResponse

        backoff = Backoff()
        response: Any = None
        for _ in range(attempts):
            response = await call()
            if not isinstance(response, ErrorResponse):
                return response
            delay = backoff.next_delay(_retry_after(response))
            log.warning("Matrix %s failed (%s); retrying in %.1f s", what, response, delay)
            await self._sleep(delay)
        raise TransportError(f"Matrix {what} failed after {attempts} attempts: {response}")

    def _content(self, text: str) -> dict[str, Any]:
        return {
            "msgtype": "m.notice",
            "body": markdown_to_plain(text),
            "format": "org.matrix.custom.html",
            "formatted_body": markdown_to_html(text),
        }

    async def send(self, session: SessionKey, reply: Reply) -> MessageRef:
        ids: list[str] = []
        for chunk in split_markdown(reply.text, MAX_CHUNK) or [""]:
            response = await self._retry(
                "send",
                partial(
                    self._client.room_send,
                    session.conversation,
                    "m.room.message",
                    self._content(chunk),
                ),
            )
            ids.append(response.event_id)
        if reply.kind == "confirm" and ids:
            self._confirmations[ids[-1]] = session.conversation
            if len(self._confirmations) > 1000:  # bounded: old prompts have expired anyway
                self._confirmations.pop(next(iter(self._confirmations)))
        return MessageRef(session, tuple(ids))

    async def edit(self, ref: MessageRef, reply: Reply) -> MessageRef:
        if not ref.ids:
            return await self.send(ref.session, reply)
        content = self._content(split_markdown(reply.text, MAX_CHUNK)[-1] if reply.text else "")
        await self._retry(
            "edit",
            lambda: self._client.room_send(
                ref.session.conversation,
                "m.room.message",
                {
                    **content,
                    "body": "* " + content["body"],
                    "m.new_content": content,
                    "m.relates_to": {"rel_type": "m.replace", "event_id": ref.ids[0]},
                },
            ),
        )
        return ref

    async def typing(self, session: SessionKey, active: bool) -> None:
        room = session.conversation
        task = self._typing.pop(room, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if active:
            self._typing[room] = asyncio.create_task(self._keep_typing(room))
        else:
            with contextlib.suppress(Exception):
                await self._client.room_typing(room, False)

    async def _keep_typing(self, room: str) -> None:
        # Typing notices expire after their timeout; renew before that while work goes on.
        while True:
            with contextlib.suppress(Exception):
                await self._client.room_typing(room, True, timeout=self.typing_timeout_ms)
            await asyncio.sleep(self.typing_timeout_ms / 1000 * 0.66)


def _retry_after(response: Any) -> int | None:
    if getattr(response, "status_code", None) == "M_LIMIT_EXCEEDED":
        value = getattr(response, "retry_after_ms", None)
        return int(value) if value is not None else None
    return None
