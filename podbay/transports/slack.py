"""Slack transport on slack-bolt's ``AsyncApp``: slash commands, mentions, DMs, threads and
buttons, over the HTTP Events API or Socket Mode.

- **Where messages come from.** ``/podbay <command>`` (acked at once, the work goes on in
  the background), ``app_mention`` in channels (the ``<@U…>`` pill is stripped), and every
  message in a DM (``message`` with ``channel_type = im``). Bots, podbay itself, edits and
  deletions (``subtype``) are ignored. A retried delivery names the same message, so the
  inbox (keyed by channel and ts) executes it once.
- **Sessions.** The channel, or channel + thread ts for a message in a thread; replies go
  to that thread. Senders are ``slack:<user id>`` in ``[access]``.
- **Replies.** mrkdwn from the shared renderer, one section block per chunk of at most
  3,000 characters (Slack's limit), posted with ``chat.postMessage``; longer output than
  ``file_threshold_chars`` is uploaded as a file with a short summary. Replies meant for
  one person (``Reply.private_to``) are ephemeral in channels. Where the bot is not in the
  channel, the slash command's ``response_url`` is used instead.
- **Edits** (``chat.update``) are throttled to one per ``EDIT_INTERVAL_S`` per message: a
  newer edit replaces a waiting one, and the last always lands.
- **Buttons** (Block Kit) carry a typed :class:`~podbay.messages.Action`; a click becomes
  an Inbound with that action. Whether the clicker may decide is the command layer's call.
- **Working indicator.** While an agent runs, the message that started it carries
  ``:hourglass_flowing_sand:``.
- **Errors.** Web API calls retry 429s (``Retry-After``), 500/503 and connection errors
  through slack_sdk's retry handlers. A call that still fails is logged with its method and
  Slack's error code, never a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import importlib
import json
import logging
import math
import re
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from podbay.configbase import TransportSection, http_url
from podbay.errors import TransportError
from podbay.messages import (
    Action,
    ActionKind,
    Inbound,
    MessageRef,
    Reply,
    Sender,
    SessionKey,
)
from podbay.retry import Backoff, describe, is_transient
from podbay.transports.base import Capabilities, Health, Submit, TransportFailed
from podbay.transports.plugins import DoctorReport, TransportContext, TransportPlugin
from podbay.transports.render import split_rendered
from podbay.transports.render_chat import markdown_to_mrkdwn

if TYPE_CHECKING:
    from aiohttp import web

    from podbay.config import Settings
    from podbay.transports.http import WebhookServer

log = logging.getLogger(__name__)

EVENTS_PATH = "/slack/events"
SECTION_LIMIT = 3000  # characters of mrkdwn in one section block
TEXT_LIMIT = 40000  # characters of a message's text
MAX_BLOCKS = 50
EDIT_INTERVAL_S = 1.5
WORKING_REACTION = "hourglass_flowing_sand"
ACTION_PREFIX = "podbay."
# Slack errors that no retry or fallback can fix: the token is wrong or revoked.
FATAL_ERRORS = frozenset(
    {"invalid_auth", "not_authed", "account_inactive", "token_revoked", "not_allowed_token_type"}
)
# The bot cannot post there; the slash command's response_url still can.
NOT_IN_CHANNEL = frozenset({"not_in_channel", "channel_not_found", "is_archived"})


class SlackTransportConfig(TransportSection):
    enabled: bool = Field(False, description="Serve Slack in `podbay run`.")
    mode: Literal["http", "socket"] = Field(
        "http",
        description='"http": events at POST /slack/events on [http]; "socket": Socket Mode.',
    )
    bot_token: SecretStr = Field(SecretStr(""), description="Bot token (xoxb-…).")
    signing_secret: SecretStr = Field(
        SecretStr(""), description="Signing secret (required in http mode)."
    )
    app_token: SecretStr = Field(
        SecretStr(""), description="App-level token, xapp-… (required in socket mode)."
    )
    api_base_url: str = Field("https://slack.com/api/", description="Slack Web API base URL.")
    slash_command: str = Field("/podbay", description="The slash command podbay answers.")
    file_threshold_chars: int = Field(
        12000, ge=1000, le=TEXT_LIMIT, description="Longer replies are uploaded as a file."
    )

    @field_validator("api_base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        value = http_url(value, "https://slack.com/api/")
        return value if value.endswith("/") else value + "/"

    @field_validator("slash_command")
    @classmethod
    def _command(cls, value: str) -> str:
        if not re.fullmatch(r"/[a-z0-9_-]{1,31}", value):
            raise ValueError('expected a slash command such as "/podbay"')
        return value

    @model_validator(mode="after")
    def _secrets(self) -> SlackTransportConfig:
        if not self.enabled:
            return self
        missing = [] if self.bot_token.get_secret_value() else ["bot_token"]
        if self.mode == "http" and not self.signing_secret.get_secret_value():
            missing.append("signing_secret (required when mode = http)")
        if self.mode == "socket" and not self.app_token.get_secret_value():
            missing.append("app_token (required when mode = socket)")
        if missing:
            raise ValueError(f"expected {', '.join(missing)} when enabled = true")
        return self


@dataclass
class _Edit:
    reply: Reply
    task: asyncio.Task[None] | None = None
    last_at: float = 0.0


_PILL = re.compile(r"<([@#!])([^<>|]+)(?:\|([^<>]*))?>")
_LINK = re.compile(r"<([a-z][a-z0-9+.-]*:[^<>|]*)(?:\|([^<>]*))?>", re.IGNORECASE)


def plain_text(text: str, bot_user_id: str = "") -> str:
    """What a user typed, from Slack's markup: the bot's pill removed, other pills and
    links as their text (``<https://x|x>`` → ``https://x``), entities decoded."""

    def pill(match: re.Match[str]) -> str:
        kind, ident, label = match.group(1), match.group(2), match.group(3)
        if kind == "@" and ident == bot_user_id:
            return ""
        if kind == "@":
            return f"@{label or ident}"
        if kind == "#":
            return f"#{label or ident}"
        return f"@{label or ident}"  # <!here>, <!channel>

    def link(match: re.Match[str]) -> str:
        # The label is what the user typed ("github.com"), the URL what Slack made of it.
        return match.group(2) or match.group(1).removeprefix("mailto:")

    return html.unescape(_LINK.sub(link, _PILL.sub(pill, text))).strip()


class SlackTransport:
    name = "slack"
    capabilities = Capabilities(
        max_message_length=TEXT_LIMIT, edits=True, threads=True, buttons=True, typing=True
    )

    def __init__(
        self,
        config: SlackTransportConfig,
        http: WebhookServer | None = None,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.health = Health(self.name)
        self._sleep = sleep
        self._submit: Submit | None = None
        self._client: Any = None
        self._app: Any = None
        self._socket: Any = None
        self.bot_user_id = ""
        self.bot_id = ""
        self._tasks: set[asyncio.Task[None]] = set()
        # The message that started the work in a session (for the working reaction), and
        # the one that carries it now.
        self._latest: dict[SessionKey, str] = {}
        self._working: dict[SessionKey, str] = {}
        # A slash command's response_url per channel: the way in where the bot is not.
        self._response_urls: OrderedDict[str, str] = OrderedDict()
        self._edits: dict[tuple[str, str], _Edit] = {}
        self._names: dict[str, str] = {}
        self._verifier: Any = None
        if config.mode == "http" and http is not None:
            http.add_route("POST", EVENTS_PATH, self._http_events)

    @classmethod
    def from_context(cls, context: TransportContext) -> SlackTransport:
        return cls(context.config("slack"), context.http)

    # -- lifecycle --------------------------------------------------------------------

    def _build(self) -> None:
        from slack_bolt.async_app import AsyncApp
        from slack_sdk.http_retry.builtin_async_handlers import (
            AsyncConnectionErrorRetryHandler,
            AsyncRateLimitErrorRetryHandler,
            AsyncServerErrorRetryHandler,
        )
        from slack_sdk.web.async_client import AsyncWebClient

        cfg = self.config
        self._client = AsyncWebClient(
            token=cfg.bot_token.get_secret_value(),
            base_url=cfg.api_base_url,
            retry_handlers=[
                AsyncConnectionErrorRetryHandler(max_retry_count=2),
                AsyncRateLimitErrorRetryHandler(max_retry_count=3),
                # 500 and 503: Slack did not take the call; retried with backoff.
                AsyncServerErrorRetryHandler(max_retry_count=3),
            ],
        )
        http_mode = cfg.mode == "http"
        if http_mode:
            from slack_sdk.signature import SignatureVerifier

            self._verifier = SignatureVerifier(cfg.signing_secret.get_secret_value())
        app = AsyncApp(
            # A name, or bolt finds one with inspect.stack(): tens of ms on the event loop.
            name="podbay",
            client=self._client,
            # Requests are verified in _http_events, before anything parses them.
            signing_secret=None,
            request_verification_enabled=False,
            logger=logging.getLogger("podbay.transports.slack.bolt"),
        )
        app.command(cfg.slash_command)(self._on_command)
        app.event("app_mention")(self._on_mention)
        app.event("message")(self._on_message)
        app.action(re.compile(rf"^{re.escape(ACTION_PREFIX)}(confirm|cancel)$"))(self._on_action)
        app.error(self._on_error)
        self._app = app

    async def start(self, submit: Submit) -> None:
        self._submit = submit
        # slack_bolt and slack_sdk take a while to import: not on the event loop.
        await asyncio.to_thread(_import_sdk, self.config.mode)
        self._build()
        await self._whoami()
        if self.config.mode == "socket":
            from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler

            self._socket = AsyncSocketModeHandler(
                self._app, self.config.app_token.get_secret_value()
            )
            try:
                await self._socket.connect_async()
            except Exception as exc:
                error = _slack_error(exc)
                if error in FATAL_ERRORS:
                    raise TransportFailed(
                        f"Slack refused the app token ({error}); check "
                        "`transports.slack.app_token` (an xapp- token with connections:write)"
                    ) from exc
                raise TransportError(f"Slack Socket Mode did not connect: {describe(exc)}") from exc
        self.health.connected()

    async def _whoami(self) -> None:
        """``auth.test``: who podbay is on Slack (to ignore its own messages); a rejected
        token ends podbay with a clear message, an unreachable Slack is retried a while."""
        backoff = Backoff()
        for attempt in range(1, 6):
            try:
                response = await self._client.auth_test()
            except Exception as exc:
                error = _slack_error(exc)
                if error in FATAL_ERRORS:
                    raise TransportFailed(
                        f"Slack rejected the bot token ({error}); check "
                        "`transports.slack.bot_token`"
                    ) from exc
                if attempt == 5 or not (error or is_transient(exc)):
                    raise TransportError(
                        f"Slack API {self.config.api_base_url} not reachable: "
                        f"{error or describe(exc)}"
                    ) from exc
                self.health.reconnecting(attempt, error or describe(exc))
                await self._sleep(backoff.next_delay())
                continue
            self.bot_user_id = str(response.get("user_id") or "")
            self.bot_id = str(response.get("bot_id") or "")
            return

    async def stop(self) -> None:
        self.health.stopped()
        for key, pending in list(self._edits.items()):
            if pending.task is not None and not pending.task.done():
                pending.task.cancel()
                with contextlib.suppress(BaseException):
                    await pending.task
                with contextlib.suppress(Exception):
                    await self._update(key[0], key[1], pending.reply)
        self._edits.clear()
        if self._socket is not None:
            with contextlib.suppress(Exception):
                await self._socket.close_async()
            self._socket = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._client is not None:
            session = getattr(self._client, "session", None)
            if session is not None:
                await session.close()

    async def redact(self, session: SessionKey, platform_id: str, reason: str) -> bool:
        return False  # a bot token cannot delete a user's message

    # -- inbound ----------------------------------------------------------------------

    async def _http_events(self, request: web.Request) -> web.StreamResponse:
        """Signature first (Slack's v0 HMAC of the raw body, 5 minutes), then podbay parses
        the body itself and hands bolt the result: nothing unsigned reaches a parser, a
        malformed signed body is a 400, and a slash command's text may say "payload"."""
        from aiohttp import web
        from slack_bolt.adapter.aiohttp import to_aiohttp_response
        from slack_bolt.request.async_request import AsyncBoltRequest

        if self._app is None or self._verifier is None:
            return web.Response(status=503, text="podbay is starting")
        raw = await request.read()
        if not self._verifier.is_valid_request(raw, dict(request.headers)):
            return web.Response(status=401, text="invalid signature")
        try:
            body = parse_body(raw, request.content_type)
        except (ValueError, RecursionError, UnicodeDecodeError):
            log.warning("Slack: a signed request with an unreadable body was refused")
            return web.Response(status=400, text="unreadable body")
        try:
            # Already verified and parsed: bolt takes a parsed body only as "socket_mode"
            # (which changes nothing else for a request podbay has checked itself).
            bolt_request = AsyncBoltRequest(
                body=body,
                query=request.query_string,
                headers=dict(request.headers),
                mode="socket_mode",
            )
            bolt_response = await self._app.async_dispatch(bolt_request)
        except Exception as exc:
            log.warning("Slack: a request bolt could not handle was refused: %s", describe(exc))
            return web.Response(status=400, text="unexpected request")
        if bolt_response.status >= 500:
            # bolt answers 500 when a matcher trips over a malformed (signed) payload; a
            # retry by Slack would not fare better.
            log.warning("Slack: a request of an unexpected shape was refused")
            return web.Response(status=400, text="unexpected request")
        return await to_aiohttp_response(bolt_response)

    def _background(self, work: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Slack: handling an event failed")

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, inbound: Inbound) -> None:
        assert self._submit is not None
        await self._submit(inbound)

    async def _sender(self, user_id: str, fallback: str = "") -> Sender:
        name = self._names.get(user_id) or fallback
        if not name:
            with contextlib.suppress(Exception):
                info = await self._client.users_info(user=user_id)
                user = info.get("user") or {}
                profile = user.get("profile") or {}
                found = profile.get("display_name") or user.get("real_name") or user.get("name")
                name = str(found or "")
        if name:
            self._names[user_id] = name
            if len(self._names) > 5000:
                self._names.pop(next(iter(self._names)))
        return Sender(self.name, user_id, name or "")

    async def _on_command(self, ack: Any, body: dict[str, Any]) -> None:
        await ack()  # within Slack's 3 s, whatever the work takes
        channel, user = body.get("channel_id"), body.get("user_id")
        if not _strings(channel, user, body.get("text", "")) or not channel or not user:
            return
        if url := body.get("response_url"):
            self._response_urls[channel] = str(url)
            self._response_urls.move_to_end(channel)
            if len(self._response_urls) > 1000:
                self._response_urls.popitem(last=False)
        text = plain_text(str(body.get("text") or ""), self.bot_user_id)
        sender = Sender(self.name, user, str(body.get("user_name") or ""))
        inbound = Inbound(
            session=SessionKey(self.name, channel),
            sender=sender,
            text=text or "help",
            platform_id=f"command:{body.get('trigger_id') or time.time_ns()}",
            is_direct=channel.startswith("D"),
            mentioned=True,
        )
        self._background(self._deliver(inbound))

    async def _on_mention(self, ack: Any, event: dict[str, Any]) -> None:
        await ack()
        if self._ignored(event):
            return
        self._background(self._message(event, mentioned=True))

    async def _on_message(self, ack: Any, event: dict[str, Any]) -> None:
        await ack()
        # Channels arrive as app_mention; only DMs are read as they come.
        if event.get("channel_type") != "im" or self._ignored(event):
            return
        self._background(self._message(event, mentioned=False))

    def _ignored(self, event: dict[str, Any]) -> bool:
        """Bots (podbay too), edits, deletions and other subtypes are not messages to us."""
        if event.get("subtype") or event.get("bot_id") or event.get("bot_profile"):
            return True
        user = event.get("user")
        return not user or user == self.bot_user_id

    async def _message(self, event: dict[str, Any], *, mentioned: bool) -> None:
        channel, ts, text = event.get("channel"), event.get("ts"), event.get("text", "")
        # Only strings: a number or an object where text belongs is not a message.
        if not _strings(channel, ts, event.get("user"), text) or not channel or not ts:
            return
        thread_ts = event.get("thread_ts") or ""
        if not isinstance(thread_ts, str):
            return
        direct = event.get("channel_type") == "im" or channel.startswith("D")
        thread = thread_ts
        session = SessionKey(self.name, channel, thread if thread and thread != ts else "")
        self._latest.pop(session, None)
        self._latest[session] = ts  # newest last: the oldest sessions are forgotten first
        if len(self._latest) > 5000:
            self._latest.pop(next(iter(self._latest)))
        await self._deliver(
            Inbound(
                session=session,
                sender=await self._sender(str(event["user"])),
                text=plain_text(str(event.get("text") or ""), self.bot_user_id),
                # The same message may come as app_mention and as message, or again as a
                # retry: one platform id, so the inbox keeps it once.
                platform_id=f"{channel}:{ts}",
                received_at=_float(ts) or time.time(),
                is_direct=direct,
                mentioned=mentioned or direct,
                ambient=direct,
            )
        )

    async def _on_action(self, ack: Any, body: dict[str, Any]) -> None:
        await ack()
        actions = body.get("actions")
        channel = _dict(body.get("channel")).get("id")
        user = _dict(body.get("user")).get("id")
        if not isinstance(actions, list) or not actions or not _strings(channel, user):
            return
        clicked = _dict(actions[0])
        if not channel or not user or not isinstance(clicked.get("value"), str):
            return
        kind: ActionKind = (
            "confirm" if str(clicked.get("action_id")).endswith("confirm") else "cancel"
        )
        message = _dict(body.get("message"))
        thread = str(message.get("thread_ts") or "")
        session = SessionKey(self.name, channel, thread if thread != message.get("ts") else "")
        sender = await self._sender(str(user), str((body.get("user") or {}).get("name") or ""))
        inbound = Inbound(
            session=session,
            sender=sender,
            text=kind,
            platform_id=f"action:{clicked.get('action_ts') or body.get('trigger_id')}",
            is_direct=channel.startswith("D"),
            mentioned=True,
            action=Action(kind, str(clicked.get("value") or "")),
        )
        self._background(self._deliver(inbound))

    async def _on_error(self, error: Exception, body: dict[str, Any]) -> None:
        log.error("Slack: a listener failed: %s", describe(error))

    # -- outbound ---------------------------------------------------------------------

    def _blocks(self, reply: Reply, whole: str | None = None) -> tuple[str, list[dict[str, Any]]]:
        """The message text and its blocks; ``whole`` is the reply already rendered (most
        replies fit one section, and are then rendered once)."""
        whole = markdown_to_mrkdwn(reply.text or " ") if whole is None else whole
        if len(whole) <= SECTION_LIMIT:
            rendered = [whole or " "]
        else:
            chunks = split_rendered(reply.text, SECTION_LIMIT, markdown_to_mrkdwn)
            rendered = [markdown_to_mrkdwn(chunk) or " " for chunk in chunks]
        blocks: list[dict[str, Any]] = [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}} for text in rendered
        ]
        if reply.buttons:
            blocks.append(
                {
                    "type": "actions",
                    "elements": [
                        {
                            "type": "button",
                            "text": {"type": "plain_text", "text": button.label},
                            "action_id": f"{ACTION_PREFIX}{button.action.kind}",
                            "value": button.action.target,
                            **({"style": button.style} if button.style else {}),
                        }
                        for button in reply.buttons
                    ],
                }
            )
        return "\n\n".join(rendered)[:TEXT_LIMIT], blocks

    async def send(self, session: SessionKey, reply: Reply) -> MessageRef:
        channel, thread = session.conversation, session.thread or None
        whole = markdown_to_mrkdwn(reply.text or " ")
        if len(whole) > self.config.file_threshold_chars:
            await self._upload(session, reply)
            return MessageRef(session, ())
        text, blocks = self._blocks(reply, whole)
        private = reply.private_to
        if private is not None and not channel.startswith("D"):
            await self._call(
                "chat.postEphemeral",
                self._client.chat_postEphemeral,
                channel=channel,
                user=private.user_id,
                text=text,
                blocks=blocks,
                thread_ts=thread,
            )
            return MessageRef(session, ())
        return await self._post(session, reply, text, blocks)

    async def _post(
        self,
        session: SessionKey,
        reply: Reply,
        text: str | None = None,
        blocks: list[dict[str, Any]] | None = None,
    ) -> MessageRef:
        if text is None or blocks is None:
            text, blocks = self._blocks(reply)
        channel = session.conversation
        try:
            response = await self._call(
                "chat.postMessage",
                self._client.chat_postMessage,
                channel=channel,
                text=text,
                blocks=blocks,
                thread_ts=session.thread or None,
            )
        except SlackCallError as exc:
            url = self._response_urls.get(channel)
            if url is None or exc.error not in NOT_IN_CHANNEL:
                raise
            await self._respond(url, text, blocks)
            return MessageRef(session, ())
        return MessageRef(session, (str(response.get("ts")),))

    async def _respond(self, url: str, text: str, blocks: list[dict[str, Any]]) -> None:
        """Post through a slash command's response_url (where the bot is not a member)."""
        from slack_sdk.webhook.async_client import AsyncWebhookClient

        response = await AsyncWebhookClient(url).send(
            text=text, blocks=blocks, response_type="in_channel"
        )
        if response.status_code != 200:
            log.warning("Slack response_url failed: HTTP %s", response.status_code)
            raise TransportError(f"Slack response_url answered HTTP {response.status_code}")

    async def _upload(self, session: SessionKey, reply: Reply) -> None:
        lines = reply.text.count("\n") + 1
        first = next((line.strip() for line in reply.text.splitlines() if line.strip()), "")
        summary = markdown_to_mrkdwn(
            f"{first[:200]}\n\n(The whole reply, {lines} lines, is in the attached file.)"
        )
        await self._call(
            "files.upload",
            self._client.files_upload_v2,
            channel=session.conversation,
            thread_ts=session.thread or None,
            content=reply.text,
            filename="podbay-reply.md",
            title="podbay reply",
            initial_comment=summary,
            request_file_info=False,
        )

    async def edit(self, ref: MessageRef, reply: Reply) -> MessageRef:
        if not ref.ids:
            return await self.send(ref.session, reply)
        key = (ref.session.conversation, ref.ids[0])
        pending = self._edits.get(key)
        now = time.monotonic()
        if pending is None:
            pending = self._edits[key] = _Edit(reply)
        pending.reply = reply
        if pending.task is not None and not pending.task.done():
            return ref  # the waiting edit will carry this content
        wait = pending.last_at + EDIT_INTERVAL_S - now
        if wait <= 0:
            pending.last_at = now
            await self._update(key[0], key[1], reply)
            return ref
        pending.task = asyncio.create_task(self._later(key, wait))
        return ref

    async def _later(self, key: tuple[str, str], wait: float) -> None:
        await asyncio.sleep(wait)  # the throttle itself: one chat.update per interval
        pending = self._edits.get(key)
        if pending is None:
            return
        pending.last_at = time.monotonic()
        pending.task = None
        try:
            await self._update(key[0], key[1], pending.reply)
        except Exception:
            log.warning("Slack: a deferred chat.update failed", exc_info=False)
        if len(self._edits) > 500:
            for old in [k for k, e in self._edits.items() if e.task is None][:250]:
                del self._edits[old]

    async def _update(self, channel: str, ts: str, reply: Reply) -> None:
        text, blocks = self._blocks(reply)
        await self._call(
            "chat.update",
            self._client.chat_update,
            channel=channel,
            ts=ts,
            text=text,
            blocks=blocks[:MAX_BLOCKS],
        )

    async def typing(self, session: SessionKey, active: bool) -> None:
        if active:
            ts = self._latest.get(session)
            if ts is None or self._working.get(session) == ts:
                return
            await self.typing(session, False)
            self._working[session] = ts
            with contextlib.suppress(TransportError):
                await self._call(
                    "reactions.add",
                    self._client.reactions_add,
                    channel=session.conversation,
                    timestamp=ts,
                    name=WORKING_REACTION,
                )
        elif (ts := self._working.pop(session, None)) is not None:
            with contextlib.suppress(TransportError):
                await self._call(
                    "reactions.remove",
                    self._client.reactions_remove,
                    channel=session.conversation,
                    timestamp=ts,
                    name=WORKING_REACTION,
                )

    async def _call(self, method: str, call: Callable[..., Awaitable[Any]], **args: Any) -> Any:
        """One Web API call (retried by slack_sdk's handlers); failures are logged with the
        method and Slack's error code, and raised as TransportError."""
        args = {k: v for k, v in args.items() if v is not None}
        try:
            return await call(**args)
        except Exception as exc:
            error = _slack_error(exc) or describe(exc)
            log.warning("Slack %s failed: %s", method, error)
            if error in FATAL_ERRORS:
                self.health.failed(f"Slack rejected the bot token ({error})")
            raise SlackCallError(method, error) from exc


class SlackCallError(TransportError):
    """A Web API call failed for good; ``error`` is Slack's code (or what went wrong)."""

    def __init__(self, method: str, error: str) -> None:
        super().__init__(f"Slack {method} failed: {error}")
        self.method = method
        self.error = error


def parse_body(raw: bytes, content_type: str) -> dict[str, Any]:
    """A Slack request body as bolt expects it: the JSON of an Events API call, the form
    of a slash command, or the JSON inside an interactivity form's single ``payload``."""
    text = raw.decode("utf-8")
    if content_type == "application/json" or text.startswith("{"):
        body = json.loads(text)
    else:
        form = dict(urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=False))
        body = json.loads(form["payload"]) if set(form) == {"payload"} else form
    if not isinstance(body, dict):
        raise ValueError("not an object")
    return body


def _import_sdk(mode: str) -> None:
    modules = [
        "slack_bolt.async_app",
        "slack_bolt.adapter.aiohttp",
        "slack_sdk.webhook.async_client",
    ]
    if mode == "socket":
        modules.append("slack_bolt.adapter.socket_mode.async_handler")
    for module in modules:
        importlib.import_module(module)


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _strings(*values: object) -> bool:
    return all(isinstance(v, str) for v in values)


def _slack_error(exc: BaseException) -> str:
    """Slack's error code of a failed call ("not_in_channel"), or ""."""
    response = getattr(exc, "response", None)
    if response is None:
        return ""
    with contextlib.suppress(Exception):
        return str(response.get("error") or "")
    return ""


def _float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        return 0.0
    return number if math.isfinite(number) else 0.0


async def _doctor(settings: Settings, cfg: SlackTransportConfig) -> DoctorReport:
    """The bot token works, and where Slack must send events (http mode)."""
    from slack_sdk.web.async_client import AsyncWebClient

    notes: list[str] = []
    problems: list[tuple[str, str]] = []
    client = AsyncWebClient(token=cfg.bot_token.get_secret_value(), base_url=cfg.api_base_url)
    try:
        response = await asyncio.wait_for(client.auth_test(), 10)
        notes.append(f"Slack accepts the bot token (bot user {response.get('user_id')})")
    except Exception as exc:
        error = _slack_error(exc)
        if error:
            problems.append(
                (f"Slack rejects the bot token ({error})", "set `transports.slack.bot_token`")
            )
        else:
            problems.append(
                (
                    f"Slack API {cfg.api_base_url} not reachable: {describe(exc)}",
                    "check `transports.slack.api_base_url` and the network",
                )
            )
    finally:
        session = getattr(client, "session", None)
        if session is not None:
            await session.close()
    if cfg.mode == "http":
        from podbay.transports.http import WebhookServer

        url = WebhookServer(settings.http).public_url(EVENTS_PATH)
        notes.append(
            f"Slack request URL (Event Subscriptions, Interactivity, the slash command): {url}"
        )
        if not settings.http.public_url:
            notes.append(
                "`http.public_url` is not set: Slack needs a public https URL that reaches "
                f"{settings.http.host}:{settings.http.port} (a reverse proxy or tunnel), or "
                'use mode = "socket"'
            )
    else:
        notes.append("Slack in Socket Mode: no public URL needed")
    return DoctorReport(notes=notes, problems=problems)


PLUGIN = TransportPlugin(
    name="slack",
    config=SlackTransportConfig,
    create=SlackTransport.from_context,
    doctor=_doctor,
    summary="Slack: slash commands, mentions, DMs, threads, buttons (slack-bolt).",
)
