"""Fake WhatsApp providers: Meta's Cloud API (Graph) and Twilio's Messages API.

Each is a real aiohttp server on 127.0.0.1 speaking the provider's documented wire format.
``FakeGraph`` serves ``POST /{version}/{phone_number_id}/messages`` (JSON, bearer token):
text (≤ 4096), reply buttons (body ≤ 1024, 1–3 buttons, id ≤ 256, title ≤ 20), reactions
and read receipts (``status: read``, optional typing indicator), refusing with Graph error
objects (190 bad token, 100 invalid parameter or other phone number id); it builds the
webhook payloads Meta POSTs (``text_message``, ``button_reply``, ``status_update``) and
their ``X-Hub-Signature-256`` (``sign``). ``FakeTwilio`` serves ``POST /2010-04-01/Accounts/
{sid}/Messages.json`` (form, HTTP Basic auth: 20003; Body ≤ 1600: 21617) and builds the
inbound webhook form (``inbound``) and its ``X-Twilio-Signature`` (``sign``).

Both record every request to their endpoint (refused ones too, ``failed=True``) in
``calls``; ``wait_for`` waits for them; ``fail_next`` injects the provider's errors. The
real APIs report a closed 24-hour window later, as a ``failed`` status: the synchronous
131047 / 63016 injected here is the simpler stand-in. Not modelled: media, templates.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, Self, TypeVar

from aiohttp import web

MAX_TEXT, MAX_BUTTON_BODY, MAX_BUTTONS, MAX_BUTTON_ID, MAX_BUTTON_TITLE = 4096, 1024, 3, 256, 20
MAX_TWILIO_BODY = 1600
WINDOW_DETAILS = (
    "Message failed to send because more than 24 hours have passed since the customer "
    "last replied to this number."
)
# status -> the (code, message) fail_next injects when it is given no code.
GRAPH_FAILURES = {
    400: (131047, "Re-engagement message"),
    429: (130429, "Rate limit hit"),
    500: (131000, "Something went wrong"),
}
TWILIO_FAILURES = {
    400: (
        63016,
        "Failed to send freeform message because you are outside the allowed window. "
        "If you are using WhatsApp, please use a Message Template.",
    ),
    429: (20429, "Too Many Requests"),
    500: (20500, "Internal Server Error"),
}


@dataclass
class GraphCall:
    """One request to the Graph messages endpoint."""

    path: str
    body: dict[str, Any]  # the JSON sent ({} when it was not a JSON object)
    token: str  # the bearer token presented ("" when none)
    at: float  # time.monotonic() on arrival
    failed: bool = False
    error_code: int | None = None  # the Graph error code answered, when failed
    response: dict[str, Any] | None = None  # the JSON answered

    @property
    def kind(self) -> str:
        """``"text"``, ``"interactive"``, ``"reaction"``, or ``"read"`` (a read receipt)."""
        return "read" if self.body.get("status") == "read" else str(self.body.get("type", ""))


@dataclass
class TwilioCall:
    """One request to the Twilio Messages endpoint."""

    path: str
    form: dict[str, str]  # the form fields sent
    account_sid: str  # the Basic auth user presented ("" when none)
    at: float
    failed: bool = False
    error_code: int | None = None  # the Twilio error code answered, when failed
    response: dict[str, Any] | None = None


class _Call(Protocol):
    path: str
    failed: bool
    error_code: int | None
    response: dict[str, Any] | None


C = TypeVar("C", bound=_Call)


class ApiError(Exception):
    """Raised by a handler: the fake answers the provider's error with this HTTP status."""

    def __init__(self, status: int, code: int, message: str, details: str = "") -> None:
        super().__init__(f"{code} {message}")
        self.status, self.code, self.message, self.details = status, code, message, details


def _invalid(details: str) -> ApiError:
    return ApiError(400, 100, "(#100) Invalid parameter", details)


def _text(value: Any, limit: int, param: str) -> str:
    """``value`` if it is a non-empty string of at most ``limit`` characters."""
    if not isinstance(value, str) or not value:
        raise _invalid(f"Param {param} is required.")
    if len(value) > limit:
        raise _invalid(f"Param {param} must be at most {limit} characters long.")
    return value


def _basic_auth(header: str) -> tuple[str, str]:
    """The (user, password) of an HTTP Basic ``Authorization`` header; ("", "") if none."""
    scheme, _, encoded = header.partition(" ")
    try:
        decoded = base64.b64decode(encoded, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    login, sep, password = decoded.partition(":")
    return (login, password) if scheme.lower() == "basic" and sep else ("", "")


class _Server(Generic[C]):
    """What both fakes share: the server's lifecycle, the call log and failure injection."""

    _defaults: dict[int, tuple[int, str]]
    _path: str

    def __init__(self) -> None:
        self.calls: list[C] = []
        self._cond = asyncio.Condition()
        self._failures: deque[ApiError] = deque()
        self._runner: web.AppRunner | None = None
        self._port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(self._path, self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self._port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def messages(self) -> list[C]:
        """The requests answered with success, in order."""
        return [c for c in self.calls if not c.failed]

    async def wait_for(
        self, predicate: Callable[[C], bool] | None = None, *, count: int = 1, timeout: float = 15
    ) -> list[C]:
        """All calls matching ``predicate`` (failed ones too), once there are at least
        ``count``; ``TimeoutError`` naming the calls seen otherwise."""

        def matching() -> list[C]:
            return [c for c in self.calls if predicate is None or predicate(c)]

        try:
            async with asyncio.timeout(timeout), self._cond:
                await self._cond.wait_for(lambda: len(matching()) >= count)
        except TimeoutError:
            seen = ", ".join(
                c.path + (f" ({c.error_code})" if c.failed else "") for c in self.calls
            )
            raise TimeoutError(
                f"{len(matching())} of {count} matching call(s) after {timeout}s; "
                f"calls seen: {seen or 'none'}"
            ) from None
        return matching()

    def fail_next(
        self,
        *,
        status: int = 400,
        code: int | None = None,
        message: str | None = None,
        times: int = 1,
    ) -> None:
        """The next ``times`` requests fail with the provider's error. Unless ``code`` is
        given, status 400 is the 24-hour window (Graph 131047 "Re-engagement message",
        Twilio 63016), 429 the rate limit (130429 / 20429), others internal (131000 / 20500)."""
        default_code, default_message = self._defaults.get(status, self._defaults[500])
        code = default_code if code is None else code
        for _ in range(times):
            self._failures.append(ApiError(status, code, message or default_message))

    async def _handle(self, request: web.Request) -> web.Response:
        raise NotImplementedError

    async def _answer(self, call: C, send: Callable[[], dict[str, Any]], ok: int) -> web.Response:
        """Record ``call`` and answer what ``send`` returns, or the error it (or an injected
        failure) raises."""
        status = ok
        try:
            if self._failures:
                raise self._failures.popleft()
            response = send()
        except ApiError as e:
            call.failed, call.error_code, status = True, e.code, e.status
            response = self._error_body(e)
        call.response = response
        async with self._cond:
            self.calls.append(call)
            self._cond.notify_all()
        return web.json_response(response, status=status)

    def _error_body(self, error: ApiError) -> dict[str, Any]:
        raise NotImplementedError


class FakeGraph(_Server[GraphCall]):
    """The fake Meta WhatsApp Cloud API; ``async with FakeGraph() as graph:`` runs it."""

    _defaults = GRAPH_FAILURES
    _path = "/{version}/{phone_number_id}/messages"

    def __init__(
        self,
        *,
        access_token: str = "EAAG-fake-access-token-0123456789",
        app_secret: str = "fake-app-secret-0123456789",
        verify_token: str = "fake-verify-token",
        phone_number_id: str = "1234567890",
        version: str = "v21.0",
    ) -> None:
        super().__init__()
        self.access_token, self.app_secret = access_token, app_secret
        self.verify_token, self.phone_number_id = verify_token, phone_number_id
        self.version = version
        self.display_phone_number, self.business_account_id = "15550009999", "9876543210"

    @property
    def messages_url(self) -> str:
        return f"{self.base_url}/{self.version}/{self.phone_number_id}/messages"

    def messages(self, kind: str | None = None) -> list[GraphCall]:
        """Successful message requests, optionally only those of one ``GraphCall.kind``."""
        return [c for c in super().messages() if kind is None or c.kind == kind]

    # -- webhooks (what Meta POSTs to the app) ----------------------------------------

    def _webhook(self, value: dict[str, Any]) -> dict[str, Any]:
        meta = {"display_phone_number": self.display_phone_number}
        value = {"messaging_product": "whatsapp", "metadata": meta, **value}
        meta["phone_number_id"] = self.phone_number_id
        change = {"value": value, "field": "messages"}
        entry = {"id": self.business_account_id, "changes": [change]}
        return {"object": "whatsapp_business_account", "entry": [entry]}

    def _inbound(self, message: dict[str, Any], wa_id: str, name: str) -> dict[str, Any]:
        head = {"from": wa_id, "id": f"wamid.{uuid.uuid4()}", "timestamp": str(int(time.time()))}
        contacts = [{"profile": {"name": name}, "wa_id": wa_id}]
        return self._webhook({"contacts": contacts, "messages": [{**head, **message}]})

    def text_message(
        self,
        text: str,
        *,
        wa_id: str = "15550001111",
        name: str = "Alice",
        wamid: str | None = None,
    ) -> dict[str, Any]:
        """A webhook payload carrying one text message from ``wa_id``."""
        message: dict[str, Any] = {"type": "text", "text": {"body": text}}
        return self._inbound(message | ({"id": wamid} if wamid else {}), wa_id, name)

    def button_reply(
        self,
        button_id: str,
        title: str,
        *,
        wa_id: str = "15550001111",
        name: str = "Alice",
        context_wamid: str | None = None,
    ) -> dict[str, Any]:
        """A webhook payload: ``wa_id`` pressed reply button ``button_id`` on the message
        ``context_wamid`` (the wamid the fake answered when the buttons were sent)."""
        wamid = context_wamid or f"wamid.{uuid.uuid4()}"
        context = {"from": self.display_phone_number, "id": wamid}
        reply = {"type": "button_reply", "button_reply": {"id": button_id, "title": title}}
        message = {"type": "interactive", "context": context, "interactive": reply}
        return self._inbound(message, wa_id, name)

    def status_update(
        self, wamid: str, status: str = "delivered", *, wa_id: str = "15550001111"
    ) -> dict[str, Any]:
        """A webhook payload: ``wamid`` is now ``status`` (sent, delivered, read, failed);
        a failed one carries the 131047 window error."""
        now = str(int(time.time()))
        entry: dict[str, Any] = {"id": wamid, "status": status, "timestamp": now}
        entry["recipient_id"] = wa_id
        if status == "failed":
            title = "Re-engagement message"
            error = {"code": 131047, "title": title, "message": title}
            entry["errors"] = [error | {"error_data": {"details": WINDOW_DETAILS}}]
        return self._webhook({"statuses": [entry]})

    def sign(self, body: bytes, secret: str | None = None) -> dict[str, str]:
        """The ``X-Hub-Signature-256`` header Meta sends with a webhook carrying ``body``."""
        key = (self.app_secret if secret is None else secret).encode()
        return {"X-Hub-Signature-256": "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()}

    # -- the endpoint ------------------------------------------------------------------

    def _error_body(self, error: ApiError) -> dict[str, Any]:
        details = error.details or (WINDOW_DETAILS if error.code == 131047 else error.message)
        data = {"messaging_product": "whatsapp", "details": details}
        trace = "A" + uuid.uuid4().hex[:22]
        body = {"message": error.message, "type": "OAuthException", "code": error.code}
        return {"error": body | {"error_data": data, "fbtrace_id": trace}}

    async def _handle(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        try:
            body = await request.json()
        except ValueError:
            body = None
        call = GraphCall(
            request.path, body if isinstance(body, dict) else {}, token, time.monotonic()
        )

        def send() -> dict[str, Any]:
            if not hmac.compare_digest(token.encode(), self.access_token.encode()):
                raise ApiError(401, 190, "Invalid OAuth access token - Cannot parse access token")
            number = request.match_info["phone_number_id"]
            if number != self.phone_number_id:
                raise _invalid(
                    f"Unsupported post request. Object with ID '{number}' does not exist."
                )
            if not isinstance(body, dict):
                raise _invalid("The request body is not a JSON object.")
            return self._send(body)

        return await self._answer(call, send, 200)

    def _send(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("messaging_product") != "whatsapp":
            raise _invalid("Param messaging_product must be 'whatsapp'.")
        if body.get("status") == "read":
            _text(body.get("message_id"), 1024, "message_id")
            typing = body.get("typing_indicator")
            if typing is not None and (
                not isinstance(typing, dict) or typing.get("type") != "text"
            ):
                raise _invalid("Param typing_indicator['type'] must be 'text'.")
            return {"success": True}
        to = _text(body.get("to"), 64, "to")
        kind = body.get("type", "text")
        part = body.get(kind) if isinstance(kind, str) else None
        part = part if isinstance(part, dict) else {}
        if kind == "text":
            _text(part.get("body"), MAX_TEXT, "text['body']")
        elif kind == "interactive":
            self._check_buttons(part)
        elif kind == "reaction":
            _text(part.get("message_id"), 1024, "reaction['message_id']")
            if not isinstance(part.get("emoji"), str):  # "" removes the reaction
                raise _invalid("Param reaction['emoji'] is required.")
        else:
            raise _invalid(f"Param type must be text, interactive or reaction, not {kind!r}.")
        return {
            "messaging_product": "whatsapp",
            "contacts": [{"input": to, "wa_id": to}],
            "messages": [{"id": f"wamid.{uuid.uuid4()}"}],
        }

    @staticmethod
    def _check_buttons(interactive: dict[str, Any]) -> None:
        if interactive.get("type") != "button":
            raise _invalid("Param interactive['type'] must be 'button'.")
        body = interactive.get("body")
        text = body.get("text") if isinstance(body, dict) else None
        _text(text, MAX_BUTTON_BODY, "interactive['body']['text']")
        action = interactive.get("action")
        buttons = action.get("buttons") if isinstance(action, dict) else None
        if not isinstance(buttons, list) or not 1 <= len(buttons) <= MAX_BUTTONS:
            raise _invalid("Param interactive['action']['buttons'] must have 1 to 3 buttons.")
        for i, button in enumerate(buttons):
            where = f"interactive['action']['buttons'][{i}]"
            reply = button.get("reply") if isinstance(button, dict) else None
            if not isinstance(reply, dict) or button.get("type") != "reply":
                raise _invalid(f"Param {where}['type'] must be 'reply'.")
            _text(reply.get("id"), MAX_BUTTON_ID, f"{where}['reply']['id']")
            _text(reply.get("title"), MAX_BUTTON_TITLE, f"{where}['reply']['title']")


class FakeTwilio(_Server[TwilioCall]):
    """The fake Twilio Messages API; ``async with FakeTwilio() as twilio:`` runs it."""

    _defaults = TWILIO_FAILURES
    _path = "/2010-04-01/Accounts/{sid}/Messages.json"

    def __init__(
        self,
        *,
        account_sid: str = "AC" + "0123456789abcdef" * 2,
        auth_token: str = "fake-twilio-auth-token-0123",
        from_number: str = "whatsapp:+15550009999",
    ) -> None:
        super().__init__()
        self.account_sid, self.auth_token, self.from_number = account_sid, auth_token, from_number

    @property
    def messages_url(self) -> str:
        return f"{self.base_url}/2010-04-01/Accounts/{self.account_sid}/Messages.json"

    def inbound(
        self,
        body: str,
        *,
        from_: str = "whatsapp:+15550001111",
        sid: str | None = None,
        profile_name: str = "Alice",
        button_payload: str | None = None,
    ) -> dict[str, str]:
        """The form Twilio POSTs to the webhook for a WhatsApp message from ``from_``; with
        ``button_payload``, ``from_`` pressed the quick-reply button titled ``body``."""
        sid = sid or f"SM{uuid.uuid4().hex}"
        form = {"MessageSid": sid, "AccountSid": self.account_sid, "From": from_}
        form |= {"To": self.from_number, "Body": body, "NumMedia": "0", "MessageType": "text"}
        form |= {"ProfileName": profile_name, "WaId": from_.removeprefix("whatsapp:").lstrip("+")}
        if button_payload is not None:
            form |= {"MessageType": "button", "ButtonPayload": button_payload, "ButtonText": body}
        return form

    def sign(self, url: str, params: dict[str, str], token: str | None = None) -> dict[str, str]:
        """The ``X-Twilio-Signature`` header Twilio sends with ``params`` POSTed to ``url``:
        base64 HMAC-SHA1, keyed by the auth token, of the URL followed by every parameter's
        name and value, sorted by name."""
        data = url + "".join(name + params[name] for name in sorted(params))
        key = (self.auth_token if token is None else token).encode()
        digest = hmac.new(key, data.encode(), hashlib.sha1).digest()
        return {"X-Twilio-Signature": base64.b64encode(digest).decode()}

    def _error_body(self, error: ApiError) -> dict[str, Any]:
        more_info = f"https://www.twilio.com/docs/errors/{error.code}"
        body = {"code": error.code, "message": error.message, "more_info": more_info}
        return body | {"status": error.status}

    async def _handle(self, request: web.Request) -> web.Response:
        login, password = _basic_auth(request.headers.get("Authorization", ""))
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        call = TwilioCall(request.path, form, login, time.monotonic())

        def send() -> dict[str, Any]:
            if not (
                hmac.compare_digest(login.encode(), self.account_sid.encode())
                and hmac.compare_digest(password.encode(), self.auth_token.encode())
            ):
                raise ApiError(401, 20003, "Authenticate")
            if request.match_info["sid"] != self.account_sid:
                raise ApiError(404, 20404, f"The requested resource {request.path} was not found")
            return self._send(form)

        return await self._answer(call, send, 201)

    def _send(self, form: dict[str, str]) -> dict[str, Any]:
        to, sender, body = form.get("To", ""), form.get("From", ""), form.get("Body", "")
        if not to:
            raise ApiError(400, 21604, "A 'To' phone number is required.")
        if sender != self.from_number:
            raise ApiError(400, 63007, "Twilio could not find a Channel with the From address")
        if not to.startswith("whatsapp:"):
            raise ApiError(400, 21910, "Invalid From and To pair: not the same channel")
        if not body and not form.get("ContentSid"):
            raise ApiError(400, 21602, "Message body is required.")
        if len(body) > MAX_TWILIO_BODY:
            raise ApiError(
                400, 21617, "The concatenated message body exceeds the 1600 character limit"
            )
        sid = f"SM{uuid.uuid4().hex}"
        answer = {"sid": sid, "status": "queued", "to": to, "from": sender, "body": body}
        return answer | {"account_sid": self.account_sid, "direction": "outbound-api"}
