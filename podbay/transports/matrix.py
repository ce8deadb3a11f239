"""Matrix transport on matrix-nio: one session per room.

- Login once; the access token, device id and sync token live in ``<data>/matrix/``, so a
  restart neither logs in again nor creates a device, and resumes where it stopped.
- On the very first start the history is skipped: nothing from before is ever answered.
- Invites are joined only from users in ``[access]`` (also those pending at startup).
- Every sync or send failure, including error *responses* and refused or reset
  connections, is retried through :mod:`podbay.retry` (capped exponential backoff with
  jitter; ``M_LIMIT_EXCEEDED`` honours ``retry_after_ms``). ``health`` says "reconnecting
  (attempt n, last error …)" meanwhile. Rejected credentials (``M_UNKNOWN_TOKEN``,
  ``M_FORBIDDEN`` on login, …) raise :class:`TransportFailed`: the supervisor ends
  ``podbay run`` with that message instead of retrying for ever.
- Each event is handled on its own: one that raises is logged under a reference id, its
  room is told so, and the sync goes on (``next_batch`` advances; nothing is refetched).
- A limited timeline (a burst larger than the sync filter's limit) is backfilled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, SecretStr, model_validator

from podbay.configbase import TransportSection
from podbay.errors import TransportError
from podbay.messages import Action, ActionKind, Inbound, MessageRef, Reply, Sender, SessionKey
from podbay.redact import remember_secrets
from podbay.retry import Backoff, describe, is_transient
from podbay.transports.base import Capabilities, Health, Submit, TransportFailed
from podbay.transports.plugins import DoctorReport, TransportContext, TransportPlugin
from podbay.transports.render import markdown_to_html, markdown_to_plain, split_markdown

if TYPE_CHECKING:
    from podbay.config import Settings

log = logging.getLogger(__name__)

IsAllowed = Callable[[str], bool]
# Matrix events may be 64 KiB (UTF-8 bytes, so chunks are measured in bytes); the plain body
# and the HTML both carry the text, so stay well below.
MAX_CHUNK = 12000
TYPING_TIMEOUT_MS = 30000
# Error codes that no retry can fix: the credentials are wrong, revoked or deactivated.
FATAL_ERRCODES = frozenset(
    {
        "M_UNKNOWN_TOKEN",
        "M_MISSING_TOKEN",
        "M_FORBIDDEN",
        "M_USER_DEACTIVATED",
        "M_INVALID_USERNAME",
    }
)


class MatrixTransportConfig(TransportSection):
    enabled: bool = Field(False, description="Serve Matrix rooms in `podbay run`.")
    homeserver: str = Field("", description='Homeserver URL, e.g. "https://matrix.example.org".')
    user_id: str = Field("", description='The bot\'s Matrix ID, e.g. "@podbay:example.org".')
    # Secrets: shown as ********** in repr, dumps and errors; read with get_secret_value().
    password: SecretStr = Field(
        SecretStr(""), description="Password for the first login (or use access_token)."
    )
    access_token: SecretStr = Field(
        SecretStr(""), description="Access token instead of a password."
    )
    device_id: str = Field("", description="Device to log in as (empty: the server picks one).")
    ambient_rooms: list[str] = Field(
        default_factory=list,
        description="Group rooms where freeform text needs no mention (room IDs).",
    )
    leave_when_alone: bool = Field(
        True, description="Leave rooms where no user from [access] remains."
    )
    catch_up_max_age_s: int = Field(
        600, ge=0, description="After downtime, older messages get 'missed while offline'."
    )
    sync_timeline_limit: int = Field(
        200, ge=10, description="Events per room per sync (bursts beyond it are backfilled)."
    )

    @model_validator(mode="after")
    def _credentials(self) -> MatrixTransportConfig:
        if self.enabled:
            missing = [k for k in ("homeserver", "user_id") if not getattr(self, k)]
            if not (self.password.get_secret_value() or self.access_token.get_secret_value()):
                missing.append("password or access_token")
            if missing:
                raise ValueError(f"expected {', '.join(missing)} when enabled = true")
        return self


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
        backoff: Backoff | None = None,
    ) -> None:
        self.config = config
        self.state_dir = data_dir / "matrix"
        self.is_allowed = is_allowed
        self._sleep = sleep
        # The sync loop's pace while the homeserver is unreachable.
        self._backoff = backoff or Backoff()
        self.health = Health(self.name)
        self._client: Any = None
        self._submit: Submit | None = None
        self._task: asyncio.Task[None] | None = None
        self._typing: dict[str, asyncio.Task[None]] = {}
        self._confirmations: dict[str, str] = {}  # event id of a prompt -> proposal id
        self.user_id = config.user_id
        self.ready = asyncio.Event()
        self._started_at = 0.0
        self._warned_encrypted: set[str] = set()
        self.typing_timeout_ms = TYPING_TIMEOUT_MS

    @classmethod
    def from_context(cls, context: TransportContext) -> MatrixTransport:
        """The transport ``[transports.matrix]`` describes; invites follow ``[access]``."""
        return cls(context.config("matrix"), context.settings.data_dir, context.is_allowed)

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
        token = state.get("access_token") or self.config.access_token.get_secret_value()
        if token:
            self._client.restore_login(
                self.config.user_id, state.get("device_id") or self.config.device_id, token
            )
        else:
            try:
                response = await self._login(LoginResponse)
            except BaseException:
                await self._client.close()
                self._client = None
                raise
            await asyncio.to_thread(
                self._save, access_token=response.access_token, device_id=response.device_id
            )
        # The token may come from state.json (a password login): mask it like a config secret.
        remember_secrets([self._client.access_token or ""])
        self.user_id = self._client.user_id
        self._started_at = state.get("first_started_at") or time.time()
        if "first_started_at" not in state:
            await asyncio.to_thread(self._save, first_started_at=self._started_at)
        self._task = asyncio.create_task(self._run(state.get("next_batch")), name="matrix-sync")
        self.health.watch(self._task)

    async def _login(self, login_response: type) -> Any:
        """Log in with the password; a refused password is fatal, an unreachable server is
        retried (a few times: ``podbay run`` should not hang at start without saying why)."""
        backoff = Backoff(self._backoff.base, self._backoff.cap)
        for attempt in range(1, 6):
            try:
                response = await self._client.login(
                    self.config.password.get_secret_value(), device_name="podbay"
                )
            except Exception as exc:
                if not is_transient(exc) or attempt == 5:
                    raise TransportError(
                        f"Matrix homeserver {self.config.homeserver} not reachable for the "
                        f"login as {self.config.user_id}: {describe(exc)}"
                    ) from exc
                error = describe(exc)
            else:
                if isinstance(response, login_response):
                    return response
                if getattr(response, "status_code", None) in FATAL_ERRCODES or attempt == 5:
                    raise TransportFailed(
                        f"Matrix rejected the login as {self.config.user_id} "
                        f"({response.status_code}: {response.message}); check "
                        "`transports.matrix.password`"
                    )
                error = str(response)
            self.health.reconnecting(attempt, error)
            await self._sleep(backoff.next_delay())
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        self.health.stopped()
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

        backoff = self._backoff
        first = since is None
        # nio keeps room state (members, names) in memory only: the first sync of every
        # process asks for the full state, or DMs would look like group rooms after a restart.
        full_state = True
        while True:
            try:
                response = await self._client.sync(
                    timeout=0 if first else 30000,
                    sync_filter=self._filter(),
                    since=since,
                    full_state=full_state,
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # A sync is safe to repeat (same ``since``): every failure is retried, the
                # expected ones (refused, reset, timeouts) without a traceback.
                await self._sync_failed(describe(exc), None, exc_info=not is_transient(exc))
                continue
            if not isinstance(response, SyncResponse):
                if getattr(response, "status_code", None) in FATAL_ERRCODES:
                    raise TransportFailed(
                        f"Matrix rejected podbay's access token for {self.user_id} "
                        f"({response.status_code}: {response.message}); set a fresh "
                        "`transports.matrix.access_token`, or delete "
                        f"{self.state_dir / 'state.json'} to log in again with the password"
                    )
                await self._sync_failed(_describe_response(response), _retry_after(response))
                continue
            backoff.reset()
            self.health.connected()
            if first:
                # The very first start: history is not ours to answer; only invites count.
                await self._isolated("invites", None, self._handle_invites(response))
            else:
                await self._handle(response, catching_up=not self.ready.is_set())
            # Always advance: a batch is never fetched twice, so one bad event cannot
            # make the loop retry the same batch for ever.
            since = response.next_batch
            await asyncio.to_thread(self._save, next_batch=since)
            first = full_state = False
            self.ready.set()

    async def _sync_failed(
        self, error: str, retry_after_ms: int | None, *, exc_info: bool = False
    ) -> None:
        delay = self._backoff.next_delay(
            retry_after_ms / 1000 if retry_after_ms is not None else None
        )
        attempt = self._backoff.failures
        self.health.reconnecting(attempt, error)
        log.warning(
            "Matrix sync failed (attempt %d: %s); retrying in %.1f s",
            attempt,
            error,
            delay,
            exc_info=exc_info,
        )
        await self._sleep(delay)

    async def _isolated(self, what: str, room_id: str | None, step: Awaitable[Any]) -> Any:
        """Run one step of handling a sync; a failure is logged under a reference id (and
        told to the room) instead of stopping the rest of the batch."""
        try:
            return await step
        except asyncio.CancelledError:
            raise
        except Exception:
            ref = secrets.token_hex(4)
            log.exception("Matrix: handling %s in %s failed [ref %s]", what, room_id, ref)
            if room_id is not None:
                with contextlib.suppress(Exception):
                    await self.send(
                        SessionKey("matrix", room_id),
                        Reply(
                            f"A message here could not be handled (ref {ref}); it was "
                            "skipped. Please resend it, or tell the operator the ref.",
                            "error",
                        ),
                    )
            return None

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
        await self._isolated("invites", None, self._handle_invites(response))
        for room_id, info in response.rooms.join.items():
            await self._isolated("the room", room_id, self._room(room_id, info, catching_up))

    async def _room(self, room_id: str, info: Any, catching_up: bool) -> None:
        events = list(info.timeline.events)
        if info.timeline.limited and info.timeline.prev_batch:
            backfilled = await self._isolated(
                "the backfill", None, self._backfill(room_id, info.timeline.prev_batch)
            )
            events = (backfilled or []) + events
        missed = False
        for event in events:
            what = f"event {getattr(event, 'event_id', '?')}"
            handled = await self._isolated(what, room_id, self._event(room_id, event, catching_up))
            missed = missed or handled == "missed"
        if self.config.leave_when_alone and await self._leave_if_alone(room_id):
            return
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
        content = event.source.get("content")
        relates = content.get("m.relates_to") if isinstance(content, dict) else None
        if not isinstance(relates, dict):
            return "ignored"  # not a reaction we could read: nothing to answer
        key, target = relates.get("key", ""), relates.get("event_id", "")
        if not isinstance(key, str) or not isinstance(target, str):
            return "ignored"
        answers: dict[str, ActionKind] = {"✅": "confirm", "✔️": "confirm", "❌": "cancel"}
        answer = answers.get(key)
        proposal = self._confirmations.get(target)
        if answer is None or proposal is None:
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
                action=Action(answer, proposal),
            )
        )
        return "submitted"

    def _aliases(self, room: Any) -> tuple[str, ...]:
        names = [self.user_id, self.user_id.split(":")[0].lstrip("@")]
        if room is not None and (display := room.user_name(self.user_id)):
            names.append(display)
        return tuple(dict.fromkeys(n for n in names if n))

    def _mentions_me(self, event: Any) -> bool:
        content = event.source.get("content")
        mentions = content.get("m.mentions") if isinstance(content, dict) else None
        user_ids = mentions.get("user_ids") if isinstance(mentions, dict) else None
        if isinstance(user_ids, list) and self.user_id in user_ids:
            return True
        formatted = event.formatted_body or ""
        return bool(re.search(rf"matrix\.to/#/{re.escape(self.user_id)}", formatted))

    # -- sending ----------------------------------------------------------------------

    async def _retry(self, what: str, call: Callable[[], Awaitable[Any]], attempts: int = 6) -> Any:
        from nio import ErrorResponse

        backoff = Backoff(self._backoff.base, self._backoff.cap)
        failure: str = ""
        for attempt in range(1, attempts + 1):
            try:
                response = await call()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not is_transient(exc):
                    raise TransportError(f"Matrix {what} failed: {describe(exc)}") from exc
                failure, retry_after_ms = describe(exc), None
            else:
                if not isinstance(response, ErrorResponse):
                    return response
                failure, retry_after_ms = str(response), _retry_after(response)
            if attempt == attempts:
                break
            delay = backoff.next_delay(
                retry_after_ms / 1000 if retry_after_ms is not None else None
            )
            log.warning("Matrix %s failed (%s); retrying in %.1f s", what, failure, delay)
            await self._sleep(delay)
        raise TransportError(f"Matrix {what} failed after {attempts} attempts: {failure}")

    def _content(self, text: str) -> dict[str, Any]:
        return {
            "msgtype": "m.notice",
            "body": markdown_to_plain(text),
            "format": "org.matrix.custom.html",
            "formatted_body": markdown_to_html(text),
        }

    async def send(self, session: SessionKey, reply: Reply) -> MessageRef:
        ids: list[str] = []
        for chunk in split_markdown(reply.text, MAX_CHUNK, unit="bytes") or [""]:
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
        proposal = next(
            (b.action.target for b in reply.buttons if b.action.kind == "confirm"), None
        )
        if proposal is not None and ids:
            # A ✅/❌ reaction on the prompt decides exactly this proposal.
            self._confirmations[ids[-1]] = proposal
            if len(self._confirmations) > 1000:  # bounded: old prompts have expired anyway
                self._confirmations.pop(next(iter(self._confirmations)))
        return MessageRef(session, tuple(ids))

    async def edit(self, ref: MessageRef, reply: Reply) -> MessageRef:
        if not ref.ids:
            return await self.send(ref.session, reply)
        content = self._content(
            split_markdown(reply.text, MAX_CHUNK, unit="bytes")[-1] if reply.text else ""
        )
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


def _describe_response(response: Any) -> str:
    """An error response for a status line: the HTTP status matters when a proxy in front
    of the homeserver answers (502 while Synapse restarts), the errcode otherwise."""
    status = getattr(getattr(response, "transport_response", None), "status", None)
    code = getattr(response, "status_code", None)
    message = getattr(response, "message", None) or "unknown error"
    text = f"{code}: {message}" if code else message
    return f"HTTP {status} ({text})" if isinstance(status, int) else text


async def _doctor(settings: Settings, cfg: MatrixTransportConfig) -> DoctorReport:
    """Whether the homeserver answers and still accepts podbay's access token."""
    import aiohttp

    state_file = settings.data_dir / "matrix" / "state.json"
    token = cfg.access_token.get_secret_value()
    if state_file.exists():
        token = json.loads(state_file.read_text()).get("access_token") or token
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(f"{cfg.homeserver}/_matrix/client/versions") as response:
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}")
            if token:
                async with http.get(
                    f"{cfg.homeserver}/_matrix/client/v3/account/whoami",
                    headers={"Authorization": f"Bearer {token}"},
                ) as response:
                    if response.status != 200:
                        return _problem(
                            f"Matrix rejects podbay's access token (HTTP {response.status})",
                            "set a fresh `transports.matrix.access_token`, or delete "
                            f"{state_file} to log in again with the password",
                        )
    except Exception as exc:
        return _problem(
            f"Matrix homeserver {cfg.homeserver} not reachable: {exc}",
            "check `transports.matrix.homeserver` and the network",
        )
    return DoctorReport(notes=[f"Matrix homeserver {cfg.homeserver} answers"])


def _problem(problem: str, fix: str) -> DoctorReport:
    return DoctorReport(problems=[(problem, fix)])


PLUGIN = TransportPlugin(
    name="matrix",
    config=MatrixTransportConfig,
    create=MatrixTransport.from_context,
    doctor=_doctor,
    summary="Matrix rooms (matrix-nio).",
)
