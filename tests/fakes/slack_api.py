"""A fake Slack platform: the Web API, response URLs, file uploads and Socket Mode.

It is a real aiohttp server on 127.0.0.1 speaking Slack's documented wire format, so the
real ``slack_sdk.web.async_client.AsyncWebClient(base_url=fake.base_url)`` and slack_bolt's
``AsyncSocketModeHandler`` talk to it unchanged:

    async with FakeSlack() as fake:
        client = AsyncWebClient(token=fake.bot_token, base_url=fake.base_url)
        await client.chat_postMessage(channel="C1", text="hi")
        [call] = await fake.wait_for("chat.postMessage")
        assert call.args["text"] == "hi"

Every Web API call (also the refused ones, with ``failed=True``) is recorded in
``fake.calls`` with its arguments normalised: slack_sdk sends the chat methods as JSON and
most others as query-string parameters on an empty POST, and JSON-valued fields such as
``blocks`` or ``files`` arrive as strings there; ``args`` holds the merged, decoded view.

The checks are Slack's: tokens (``not_authed`` / ``invalid_auth`` /
``not_allowed_token_type``), required arguments, message size limits, known timestamps
for ``chat.update``, reaction state, channel membership (``set_channel_members``).
``fail_next`` injects failures (an error answer, HTTP 429 with ``Retry-After``, HTTP 500).
Socket Mode: ``apps.connections.open`` (app token) hands out a ``ws://`` URL; the socket
says ``hello``; ``send_envelope`` delivers an envelope and returns the client's ack
(``slash_command`` and ``event_callback`` build the payloads Slack sends).

Not modelled: ack deadlines and envelope redelivery, rate limits other than injected ones,
users who are not found (any ``U…``/``W…`` id exists unless ``add_user`` says more).
Uploads (``POST /upload/<id>``) and response URLs (``POST /response/<key>``) are
recorded as methods ``"upload"`` and ``"response_url"`` (``target`` holds the id / key).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiohttp import WSCloseCode, WSMsgType, web

MAX_TEXT = 40_000
MAX_BLOCKS = 50
MAX_SECTION_TEXT = 3_000
# Fields Slack takes as JSON; in form or query encoding they arrive as JSON strings.
JSON_FIELDS = ("blocks", "attachments", "files", "metadata")
_BASE_TS_US = 1_700_000_000 * 1_000_000
APP_ID = "AFAKE"


@dataclass
class SlackCall:
    """One request the fake answered."""

    method: str  # "chat.postMessage"; "upload" and "response_url" for those endpoints
    args: dict[str, Any]
    token: str  # the token presented ("" when none, as for uploads and response URLs)
    at: float  # time.monotonic() on arrival
    failed: bool = False  # answered with ok:false or a non-200 status
    error: str | None = None  # the error answered, when failed
    target: str = ""  # the response_url key or the uploaded file id
    response: dict[str, Any] | None = None  # the JSON answered (Web API methods)


@dataclass
class _Failure:
    status: int
    error: str | None
    retry_after: int | None


@dataclass
class _File:
    filename: str
    length: int
    content: bytes | None = None


@dataclass
class _Method:
    handler: Callable[[dict[str, Any]], dict[str, Any]]
    token: str = "bot"  # which token it wants: "bot", "app" or "any"


class SlackError(Exception):
    """Raised by a method handler: the fake answers ``{"ok": false, "error": error}``."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


class FakeSlack:
    """The fake Slack server; ``async with FakeSlack() as fake:`` runs it."""

    def __init__(
        self,
        *,
        bot_token: str = "xoxb-fake-bot-token-0123456789",
        app_token: str = "xapp-fake-app-token-0123456789",
        bot_user_id: str = "UPODBAY",
        bot_id: str = "BPODBAY",
        team_id: str = "TFAKE",
        signing_secret: str = "fake-signing-secret-0123456789",
    ) -> None:
        self.bot_token, self.app_token = bot_token, app_token
        self.bot_user_id, self.bot_id, self.team_id = bot_user_id, bot_id, team_id
        self.signing_secret = signing_secret
        self.calls: list[SlackCall] = []
        # Socket Mode: set while a client is connected; envelopes sent and not acked yet;
        # every ack received (in order); how many connections were ever opened.
        self.socket_connected = asyncio.Event()
        self.unacked: set[str] = set()
        self.acks: list[dict[str, Any]] = []
        self.socket_connections = 0
        self._cond = asyncio.Condition()
        self._failures: dict[str, deque[_Failure]] = defaultdict(deque)
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._ts_n = 0
        self._messages: dict[tuple[str, str], dict[str, Any]] = {}
        self._reactions: set[tuple[str, str, str]] = set()
        self._members: dict[str, set[str]] = {}
        self._users: dict[str, dict[str, Any]] = {}
        self._files: dict[str, _File] = {}
        self._tickets: set[str] = set()
        self._sockets: list[web.WebSocketResponse] = []
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._methods: dict[str, _Method] = {
            "auth.test": _Method(self._auth_test, token="any"),
            "chat.postMessage": _Method(self._post_message),
            "chat.postEphemeral": _Method(self._post_ephemeral),
            "chat.update": _Method(self._update),
            "reactions.add": _Method(self._reactions_add),
            "reactions.remove": _Method(self._reactions_remove),
            "users.info": _Method(self._users_info),
            "conversations.info": _Method(self._conversations_info),
            "apps.connections.open": _Method(self._connections_open, token="app"),
            "files.getUploadURLExternal": _Method(self._get_upload_url),
            "files.completeUploadExternal": _Method(self._complete_upload),
        }

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_post("/response/{key}", self._response_url)
        app.router.add_post("/upload/{file_id}", self._upload)
        app.router.add_get("/socket", self._socket)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY)
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    @property
    def base_url(self) -> str:
        return f"{self.origin}/api/"

    # -- what tests use --------------------------------------------------------------

    def calls_to(self, method: str) -> list[SlackCall]:
        return [c for c in self.calls if c.method == method]

    async def wait_for(
        self,
        method: str,
        predicate: Callable[[SlackCall], bool] | None = None,
        *,
        count: int = 1,
        timeout: float = 15,
    ) -> list[SlackCall]:
        """All calls to ``method`` matching ``predicate`` (failed ones too), once there are
        at least ``count``; ``TimeoutError`` naming the calls seen otherwise."""

        def matching() -> list[SlackCall]:
            return [c for c in self.calls_to(method) if predicate is None or predicate(c)]

        try:
            async with asyncio.timeout(timeout), self._cond:
                await self._cond.wait_for(lambda: len(matching()) >= count)
        except TimeoutError:
            seen = ", ".join(c.method + (f" ({c.error})" if c.failed else "") for c in self.calls)
            raise TimeoutError(
                f"{len(matching())} of {count} matching {method} call(s) after {timeout}s; "
                f"calls seen: {seen or 'none'}"
            ) from None
        return matching()

    def fail_next(
        self,
        method: str,
        *,
        status: int = 200,
        error: str | None = None,
        retry_after: int | None = None,
        times: int = 1,
    ) -> None:
        """The next ``times`` calls to ``method`` (also "upload", "response_url") fail."""
        for _ in range(times):
            self._failures[method].append(_Failure(status, error, retry_after))

    def sign(
        self, body: bytes, *, timestamp: int | None = None, secret: str | None = None
    ) -> dict[str, str]:
        """The signature headers Slack sends with an HTTP request carrying ``body``."""
        ts = int(time.time()) if timestamp is None else timestamp
        key = (self.signing_secret if secret is None else secret).encode()
        digest = hmac.new(key, f"v0:{ts}:".encode() + body, hashlib.sha256).hexdigest()
        return {"X-Slack-Request-Timestamp": str(ts), "X-Slack-Signature": f"v0={digest}"}

    def response_url(self, key: str = "r1") -> str:
        return f"{self.origin}/response/{key}"

    def uploaded(self, file_id: str) -> bytes:
        """The bytes uploaded for ``file_id`` (KeyError when nothing was uploaded)."""
        content = self._files[file_id].content
        if content is None:
            raise KeyError(file_id)
        return content

    def set_channel_members(self, channel: str, members: list[str]) -> None:
        """Only these users (the bot is ``bot_user_id``) are in ``channel``."""
        self._members[channel] = set(members)

    def add_user(
        self, user_id: str, name: str, *, real_name: str = "", display_name: str = ""
    ) -> None:
        self._users[user_id] = {
            "id": user_id,
            "team_id": self.team_id,
            "name": name,
            "real_name": real_name or name,
            "is_bot": False,
            "profile": {"display_name": display_name or name, "real_name": real_name or name},
        }

    def message(self, channel: str, ts: str) -> dict[str, Any]:
        """The current state of a message the bot posted (after any chat.update)."""
        return self._messages[(channel, ts)]

    def reactions_on(self, channel: str, ts: str) -> set[str]:
        return {name for (c, t, name) in self._reactions if (c, t) == (channel, ts)}

    def slash_command(
        self,
        text: str,
        *,
        command: str = "/podbay",
        user_id: str = "UALICE",
        channel_id: str = "C0001",
        response_key: str = "r1",
    ) -> dict[str, Any]:
        """A ``slash_commands`` envelope payload, as Slack sends it."""
        return {
            "token": "deprecated-verification-token",
            "team_id": self.team_id,
            "team_domain": "fake",
            "channel_id": channel_id,
            "channel_name": "general",
            "user_id": user_id,
            "user_name": user_id.lower(),
            "command": command,
            "text": text,
            "api_app_id": APP_ID,
            "is_enterprise_install": "false",
            "response_url": self.response_url(response_key),
            "trigger_id": f"1.{uuid.uuid4().hex[:12]}",
        }

    def event_callback(self, event: dict[str, Any]) -> dict[str, Any]:
        """An ``events_api`` envelope payload wrapping ``event``."""
        return {
            "token": "deprecated-verification-token",
            "team_id": self.team_id,
            "api_app_id": APP_ID,
            "event": event,
            "type": "event_callback",
            "event_id": f"Ev{uuid.uuid4().hex[:10].upper()}",
            "event_time": int(time.time()),
            "authorizations": [
                {
                    "team_id": self.team_id,
                    "user_id": self.bot_user_id,
                    "is_bot": True,
                    "is_enterprise_install": False,
                }
            ],
        }

    async def send_envelope(
        self,
        type: str,
        payload: dict[str, Any],
        *,
        accepts_response_payload: bool = False,
        timeout: float = 10,
    ) -> dict[str, Any]:
        """Send an envelope on the newest socket; the client's ack message."""
        envelope_id = str(uuid.uuid4())
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self.socket_connected.wait()
                self._pending[envelope_id] = future
                self.unacked.add(envelope_id)
                await self._sockets[-1].send_json(
                    {
                        "envelope_id": envelope_id,
                        "type": type,
                        "payload": payload,
                        "accepts_response_payload": accepts_response_payload,
                        "retry_attempt": 0,
                        "retry_reason": "",
                    }
                )
                return await future
        except TimeoutError:
            connected = "sent, never acked" if envelope_id in self.unacked else "no socket"
            raise TimeoutError(
                f"no ack for {type} envelope within {timeout}s ({connected})"
            ) from None
        finally:
            self._pending.pop(envelope_id, None)

    # -- plumbing --------------------------------------------------------------------

    async def _record(self, call: SlackCall) -> None:
        async with self._cond:
            self.calls.append(call)
            self._cond.notify_all()

    def _take_failure(self, method: str) -> _Failure | None:
        queue = self._failures.get(method)
        return queue.popleft() if queue else None

    def _failure_response(self, failure: _Failure) -> tuple[web.Response, str]:
        retry_after: int | None
        if failure.status == 429:
            error, retry_after = failure.error or "ratelimited", failure.retry_after
            retry_after = 1 if retry_after is None else retry_after
        else:
            default = "internal_error" if failure.status >= 500 else "fatal_error"
            error, retry_after = failure.error or default, failure.retry_after
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        body = {"ok": False, "error": error}
        return web.json_response(body, status=failure.status, headers=headers), error

    async def _parse(self, request: web.Request) -> tuple[dict[str, Any], str]:
        """Arguments from the query, a form or a JSON body; the token presented."""
        args: dict[str, Any] = dict(request.query)
        if request.body_exists:
            if request.content_type == "application/json":
                try:
                    body = await request.json()
                except ValueError:
                    raise SlackError("invalid_json") from None
                if not isinstance(body, dict):
                    raise SlackError("invalid_json")
                args.update(body)
            else:
                for key, value in (await request.post()).items():
                    if isinstance(value, str | bytes | bytearray):
                        args[key] = value
                    else:  # a multipart file part
                        args[key] = value.file.read()
        for key in JSON_FIELDS:
            if isinstance(args.get(key), str):
                try:
                    args[key] = json.loads(args[key])
                except ValueError:
                    raise SlackError("invalid_arguments") from None
        token = str(args.pop("token", ""))
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            token = auth.removeprefix("Bearer ").strip()
        return args, token

    def _check_token(self, token: str, wanted: str) -> None:
        if not token:
            raise SlackError("not_authed")
        kind = {self.bot_token: "bot", self.app_token: "app"}.get(token)
        if kind is None:
            raise SlackError("invalid_auth")
        if wanted not in ("any", kind):
            raise SlackError("not_allowed_token_type")

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        call = SlackCall(method, {}, "", time.monotonic())
        try:
            call.args, call.token = await self._parse(request)
            failure = self._take_failure(method)
            if failure is not None:
                response, call.error = self._failure_response(failure)
                call.failed, call.response = True, {"ok": False, "error": call.error}
                return response
            spec = self._methods.get(method)
            if spec is None:
                raise SlackError("unknown_method")
            self._check_token(call.token, spec.token)
            call.response = {"ok": True, **spec.handler(call.args)}
        except SlackError as e:
            call.failed, call.error = True, e.error
            call.response = {"ok": False, "error": e.error}
        finally:
            await self._record(call)
        return web.json_response(call.response)

    async def _response_url(self, request: web.Request) -> web.Response:
        call = SlackCall("response_url", {}, "", time.monotonic(), target=request.match_info["key"])
        try:
            failure = self._take_failure("response_url")
            if failure is not None:
                response, call.error = self._failure_response(failure)
                call.failed = True
                return response
            try:
                call.args = await request.json()
            except ValueError:
                call.failed, call.error = True, "invalid_payload"
                return web.Response(status=400, text="invalid_payload")
            return web.json_response({"ok": True})
        finally:
            await self._record(call)

    async def _upload(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file_id"]
        call = SlackCall("upload", {"file_id": file_id}, "", time.monotonic(), target=file_id)
        try:
            failure = self._take_failure("upload")
            if failure is not None:
                response, call.error = self._failure_response(failure)
                call.failed = True
                return response
            if request.content_type.startswith("multipart/"):
                part = await (await request.multipart()).next()
                content = b"" if part is None else await part.read()  # type: ignore[union-attr]
            else:
                content = await request.read()
            call.args["content"] = content
            upload = self._files.get(file_id)
            if upload is None or len(content) != upload.length:
                call.failed = True
                call.error = "file_not_found" if upload is None else "length_mismatch"
                return web.Response(status=404 if upload is None else 400, text=call.error)
            upload.content = content
            return web.Response(text=f"OK - {len(content)}")
        finally:
            await self._record(call)

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("ticket") not in self._tickets:
            return web.Response(status=401, text="invalid ticket")
        ws = web.WebSocketResponse()  # answers the client's pings (autoping)
        await ws.prepare(request)
        self.socket_connections += 1
        self._sockets.append(ws)
        try:
            await ws.send_json(
                {
                    "type": "hello",
                    "num_connections": len(self._sockets),
                    "debug_info": {
                        "host": "applink-fake",
                        "build_number": 1,
                        "approximate_connection_time": 18060,
                    },
                    "connection_info": {"app_id": APP_ID},
                }
            )
            self.socket_connected.set()
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self._on_socket_text(msg.data)
        finally:
            self._sockets.remove(ws)
            if not self._sockets:
                self.socket_connected.clear()
        return ws

    def _on_socket_text(self, data: str) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            return
        envelope_id = message.get("envelope_id") if isinstance(message, dict) else None
        if not envelope_id:
            return
        self.acks.append(message)
        self.unacked.discard(envelope_id)
        future = self._pending.get(envelope_id)
        if future is not None and not future.done():
            future.set_result(message)

    # -- methods ---------------------------------------------------------------------

    @staticmethod
    def _need(args: dict[str, Any], key: str, error: str) -> str:
        value = args.get(key)
        if value is None or value == "":
            raise SlackError(error)
        return str(value)

    def _next_ts(self) -> str:
        self._ts_n += 1
        total = _BASE_TS_US + self._ts_n * 100
        return f"{total // 1_000_000}.{total % 1_000_000:06d}"

    def _in_channel(self, channel: str, user: str) -> bool:
        members = self._members.get(channel)
        return members is None or user in members

    @staticmethod
    def _check_content(args: dict[str, Any]) -> None:
        text, blocks = args.get("text") or "", args.get("blocks")
        if not text and not blocks and not args.get("attachments"):
            raise SlackError("no_text")
        if len(str(text)) > MAX_TEXT:
            raise SlackError("msg_too_long")
        if blocks is None:
            return
        if not isinstance(blocks, list) or len(blocks) > MAX_BLOCKS:
            raise SlackError("invalid_blocks")
        for block in blocks:
            if not isinstance(block, dict) or not isinstance(block.get("type"), str):
                raise SlackError("invalid_blocks")
            inner = block.get("text")
            if (
                block["type"] == "section"
                and isinstance(inner, dict)
                and len(str(inner.get("text", ""))) > MAX_SECTION_TEXT
            ):
                raise SlackError("invalid_blocks")

    def _message(self, args: dict[str, Any], ts: str) -> dict[str, Any]:
        message: dict[str, Any] = {
            "type": "message",
            "user": self.bot_user_id,
            "bot_id": self.bot_id,
            "text": args.get("text") or "",
            "ts": ts,
            "team": self.team_id,
        }
        for key in ("blocks", "attachments", "thread_ts"):
            if args.get(key):
                message[key] = args[key]
        return message

    def _auth_test(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "url": "https://fake.slack.com/",
            "team": "Fake",
            "user": "podbay",
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _post_message(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = self._need(args, "channel", "channel_not_found")
        self._check_content(args)
        if not self._in_channel(channel, self.bot_user_id):
            raise SlackError("not_in_channel")
        ts = self._next_ts()
        message = self._messages[(channel, ts)] = self._message(args, ts)
        return {"channel": channel, "ts": ts, "message": dict(message)}

    def _post_ephemeral(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = self._need(args, "channel", "channel_not_found")
        user = self._need(args, "user", "user_not_found")
        self._check_content(args)
        if not self._in_channel(channel, self.bot_user_id):
            raise SlackError("not_in_channel")
        if not self._in_channel(channel, user):
            raise SlackError("user_not_in_channel")
        return {"message_ts": self._next_ts()}

    def _update(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = self._need(args, "channel", "channel_not_found")
        ts = self._need(args, "ts", "message_not_found")
        message = self._messages.get((channel, ts))
        if message is None:
            raise SlackError("message_not_found")
        self._check_content(args)
        message["text"] = args.get("text") or ""
        if "blocks" in args:
            message["blocks"] = args["blocks"]
        message["edited"] = {"user": self.bot_user_id, "ts": self._next_ts()}
        return {"channel": channel, "ts": ts, "text": message["text"], "message": dict(message)}

    def _reaction_key(self, args: dict[str, Any]) -> tuple[str, str, str]:
        return (
            self._need(args, "channel", "channel_not_found"),
            self._need(args, "timestamp", "no_item_specified"),
            self._need(args, "name", "invalid_name"),
        )

    def _reactions_add(self, args: dict[str, Any]) -> dict[str, Any]:
        key = self._reaction_key(args)
        if key in self._reactions:
            raise SlackError("already_reacted")
        self._reactions.add(key)
        return {}

    def _reactions_remove(self, args: dict[str, Any]) -> dict[str, Any]:
        key = self._reaction_key(args)
        if key not in self._reactions:
            raise SlackError("no_reaction")
        self._reactions.remove(key)
        return {}

    def _users_info(self, args: dict[str, Any]) -> dict[str, Any]:
        user = self._need(args, "user", "user_not_found")
        if user not in self._users:
            if user[0] not in "UW":
                raise SlackError("user_not_found")
            self.add_user(user, user.lower())  # any Slack-shaped id exists
        return {"user": self._users[user]}

    def _conversations_info(self, args: dict[str, Any]) -> dict[str, Any]:
        channel = self._need(args, "channel", "channel_not_found")
        if channel[0] not in "CDG":
            raise SlackError("channel_not_found")
        return {
            "channel": {
                "id": channel,
                "name": channel.lower(),
                "is_im": channel.startswith("D"),
                "is_channel": channel.startswith("C"),
                "is_private": not channel.startswith("C"),
                "is_member": self._in_channel(channel, self.bot_user_id),
            }
        }

    def _connections_open(self, args: dict[str, Any]) -> dict[str, Any]:
        ticket = uuid.uuid4().hex
        self._tickets.add(ticket)
        return {"url": f"ws://127.0.0.1:{self._port}/socket?ticket={ticket}"}

    def _get_upload_url(self, args: dict[str, Any]) -> dict[str, Any]:
        filename = self._need(args, "filename", "invalid_arguments")
        try:
            length = int(self._need(args, "length", "invalid_arguments"))
        except ValueError:
            raise SlackError("invalid_arguments") from None
        if length < 0:
            raise SlackError("invalid_arguments")
        file_id = f"F{len(self._files) + 123:06d}"
        self._files[file_id] = _File(filename, length)
        return {"upload_url": f"{self.origin}/upload/{file_id}", "file_id": file_id}

    def _complete_upload(self, args: dict[str, Any]) -> dict[str, Any]:
        files = args.get("files")
        if not isinstance(files, list) or not files:
            raise SlackError("invalid_arguments")
        done = []
        for item in files:
            upload = self._files.get(item.get("id", "")) if isinstance(item, dict) else None
            if upload is None or upload.content is None:
                raise SlackError("file_not_found")
            done.append(
                {
                    "id": item["id"],
                    "name": upload.filename,
                    "size": upload.length,
                    "title": item.get("title") or upload.filename,
                }
            )
        return {"files": done}
