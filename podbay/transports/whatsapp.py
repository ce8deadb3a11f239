"""WhatsApp transport: Meta's Cloud API or Twilio, on podbay's webhook server.

- **Meta** (``provider = "meta"``). ``GET /whatsapp/webhook`` answers Meta's verification
  (``hub.mode = subscribe`` with the right ``hub.verify_token`` echoes ``hub.challenge``,
  anything else is 403). ``POST /whatsapp/webhook`` must carry ``X-Hub-Signature-256``, an
  HMAC-SHA256 of the raw body keyed with the app secret (compared in constant time):
  otherwise 401 and nothing happens. A verified delivery is answered 200 at once and
  handled in the background. Text messages become Inbound values (the sender's wa_id is
  the conversation), reply-button clicks typed actions, status callbacks are ignored, and
  a repeated wamid is dropped by the inbox. Replies go to
  ``{graph_api_base}/{version}/{phone_number_id}/messages``, split at 4,096 characters on
  block boundaries; confirmations carry reply buttons. Inbound messages are marked read,
  and the typing indicator shows while an agent works.
- **Twilio** (``provider = "twilio"``). ``POST /whatsapp/twilio`` must carry a valid
  ``X-Twilio-Signature`` (HMAC-SHA1 of the public URL and the sorted form fields, keyed
  with the auth token), checked against ``public_url`` or, where
  ``trust_forwarded_headers`` allows, ``X-Forwarded-Proto``/``X-Forwarded-Host``. Replies
  go through the Messages API in segments of at most 1,600 characters. Buttons need
  Twilio content templates, so confirmations are the text ``confirm``/``cancel``.
- **Both.** Senders are ``whatsapp:+<number>`` in ``[access]``. When the platform refuses a
  reply because the 24-hour customer-service window is closed, the transport raises
  :class:`DeliveryRefused` (no retry); the dispatcher logs it and records it on the run.
  Rate limits and server errors are retried a few times with backoff; secrets and bodies
  are never logged.

Hand-written on aiohttp rather than pywa: see the issue note for the evaluation.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from podbay.configbase import TransportSection, http_url
from podbay.errors import TransportError
from podbay.messages import Action, ActionKind, Inbound, MessageRef, Reply, Sender, SessionKey
from podbay.retry import Backoff, describe
from podbay.transports.base import (
    Capabilities,
    DeliveryRefused,
    Health,
    Submit,
    TransportFailed,
)
from podbay.transports.plugins import DoctorReport, TransportContext, TransportPlugin
from podbay.transports.render import split_rendered
from podbay.transports.render_chat import markdown_to_whatsapp

if TYPE_CHECKING:
    import aiohttp
    from aiohttp import web

    from podbay.config import Settings
    from podbay.transports.http import WebhookServer

log = logging.getLogger(__name__)

META_PATH = "/whatsapp/webhook"
TWILIO_PATH = "/whatsapp/twilio"
META_LIMIT = 4096
TWILIO_LIMIT = 1600
BUTTON_BODY_LIMIT = 1024
TYPING_RENEW_S = 20.0  # the Cloud API shows "typing…" for up to 25 s per request
BUTTON_PREFIX = "podbay."
# The customer-service window is closed: only templates may be sent. Retrying cannot help.
META_WINDOW_CLOSED = frozenset({131047, 131026})
TWILIO_WINDOW_CLOSED = frozenset({63016})
META_AUTH_ERRORS = frozenset({190})
TWILIO_AUTH_ERRORS = frozenset({20003})
_ATTEMPTS = 4


class WhatsAppTransportConfig(TransportSection):
    enabled: bool = Field(False, description="Serve WhatsApp in `podbay run`.")
    provider: Literal["meta", "twilio"] = Field(
        "meta", description='"meta" (WhatsApp Cloud API) or "twilio".'
    )
    verify_token: SecretStr = Field(
        SecretStr(""), description="Meta: the webhook verify token you chose."
    )
    app_secret: SecretStr = Field(
        SecretStr(""), description="Meta: the app secret (signs every webhook)."
    )
    access_token: SecretStr = Field(SecretStr(""), description="Meta: the access token.")
    phone_number_id: str = Field("", description="Meta: the sending phone number's ID.")
    graph_api_base: str = Field("https://graph.facebook.com", description="Meta: Graph API URL.")
    graph_api_version: str = Field("v21.0", description="Meta: Graph API version.")
    account_sid: str = Field("", description="Twilio: the account SID (AC…).")
    auth_token: SecretStr = Field(
        SecretStr(""), description="Twilio: the auth token (signs every webhook)."
    )
    from_number: str = Field("", description='Twilio: the sender, e.g. "whatsapp:+15550100".')
    twilio_api_base: str = Field("https://api.twilio.com", description="Twilio: API URL.")
    public_url: str = Field(
        "", description="Twilio: the public URL of podbay's server (else http.public_url)."
    )
    trust_forwarded_headers: bool = Field(
        False, description="Twilio: check signatures against X-Forwarded-Proto/-Host."
    )

    @field_validator("graph_api_base", "twilio_api_base", "public_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return http_url(value, "https://bot.example.org").rstrip("/")

    @field_validator("graph_api_version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not value or not value.startswith("v"):
            raise ValueError('expected a Graph API version such as "v21.0"')
        return value

    @model_validator(mode="after")
    def _secrets(self) -> WhatsAppTransportConfig:
        if not self.enabled:
            return self
        if self.provider == "meta":
            wanted = {
                "verify_token": self.verify_token.get_secret_value(),
                "app_secret": self.app_secret.get_secret_value(),
                "access_token": self.access_token.get_secret_value(),
                "phone_number_id": self.phone_number_id,
            }
        else:
            wanted = {
                "account_sid": self.account_sid,
                "auth_token": self.auth_token.get_secret_value(),
                "from_number": self.from_number,
            }
        missing = [key for key, value in wanted.items() if not value]
        if missing:
            raise ValueError(
                f'expected {", ".join(missing)} when enabled = true (provider = "{self.provider}")'
            )
        if self.provider == "twilio" and not self.from_number.startswith("whatsapp:+"):
            raise ValueError('expected from_number like "whatsapp:+15550100"')
        return self


def meta_signature_ok(body: bytes, header: str | None, app_secret: str) -> bool:
    """``X-Hub-Signature-256`` is ``sha256=`` + the HMAC-SHA256 of the raw body."""
    if not header or not header.startswith("sha256=") or not app_secret:
        return False
    expected = hmac.new(app_secret.encode(), body, hashlib.sha256).hexdigest()
    return _same(expected, header.removeprefix("sha256="))


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison of what a request says with what it should say; as bytes,
    so a header with characters outside ASCII is a mismatch, not an error."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


def twilio_signature(url: str, params: Mapping[str, str], auth_token: str) -> str:
    """Twilio's signature: base64 HMAC-SHA1 of the URL followed by every form field's
    name and value, sorted by name."""
    payload = url + "".join(f"{key}{params[key]}" for key in sorted(params))
    digest = hmac.new(auth_token.encode(), payload.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _button_action(value: str) -> Action | None:
    """``podbay.confirm:<proposal>`` → the typed action it stands for."""
    kind, sep, target = value.removeprefix(BUTTON_PREFIX).partition(":")
    if not value.startswith(BUTTON_PREFIX) or not sep or kind not in ("confirm", "cancel"):
        return None
    action_kind: ActionKind = "confirm" if kind == "confirm" else "cancel"
    return Action(action_kind, target)


class WhatsAppTransport:
    name = "whatsapp"

    def __init__(
        self,
        config: WhatsAppTransportConfig,
        http: WebhookServer | None = None,
        *,
        public_url: str = "",
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.provider = config.provider
        self.health = Health(self.name)
        self.capabilities = Capabilities(
            max_message_length=META_LIMIT if self.provider == "meta" else TWILIO_LIMIT,
            buttons=self.provider == "meta",
            typing=self.provider == "meta",
        )
        self._public_url = (config.public_url or public_url).rstrip("/")
        self._sleep = sleep
        self._submit: Submit | None = None
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._latest: OrderedDict[SessionKey, str] = OrderedDict()  # newest inbound wamid
        self._typing: dict[SessionKey, asyncio.Task[None]] = {}
        if http is not None:
            if self.provider == "meta":
                http.add_route("GET", META_PATH, self._meta_verify)
                http.add_route("POST", META_PATH, self._meta_webhook)
            else:
                http.add_route("POST", TWILIO_PATH, self._twilio_webhook)

    @classmethod
    def from_context(cls, context: TransportContext) -> WhatsAppTransport:
        return cls(
            context.config("whatsapp"),
            context.http,
            public_url=context.settings.http.public_url,
        )

    # -- lifecycle --------------------------------------------------------------------

    async def start(self, submit: Submit) -> None:
        import aiohttp

        self._submit = submit
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        self.health.connected()

    async def stop(self) -> None:
        self.health.stopped()
        tasks = [*self._tasks, *self._typing.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._typing.clear()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def redact(self, session: SessionKey, platform_id: str, reason: str) -> bool:
        return False  # a business account cannot delete what a customer sent

    def _background(self, work: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("WhatsApp: handling a webhook failed")

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- Meta webhooks ----------------------------------------------------------------

    async def _meta_verify(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        query = request.query
        token = query.get("hub.verify_token", "")
        expected = self.config.verify_token.get_secret_value()
        if query.get("hub.mode") == "subscribe" and _same(token, expected):
            return web.Response(text=query.get("hub.challenge", ""))
        log.warning("WhatsApp: a webhook verification with a wrong verify token was refused")
        return web.Response(status=403, text="verification refused")

    async def _meta_webhook(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        body = await request.read()
        secret = self.config.app_secret.get_secret_value()
        if not meta_signature_ok(body, request.headers.get("X-Hub-Signature-256"), secret):
            log.warning("WhatsApp: a webhook with a missing or wrong signature was refused")
            return web.Response(status=401, text="bad signature")
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            return web.Response(status=400, text="not JSON")
        if not isinstance(payload, dict):
            return web.Response(status=400, text="not a webhook payload")
        self._background(self._meta_payload(payload))
        return web.Response(text="ok")

    async def _meta_payload(self, payload: dict[str, Any]) -> None:
        for entry in _list(payload.get("entry")):
            for change in _list(_dict(entry).get("changes")):
                value = _dict(_dict(change).get("value"))
                names = {
                    str(c.get("wa_id")): str(_dict(c.get("profile")).get("name") or "")
                    for c in map(_dict, _list(value.get("contacts")))
                }
                # value.statuses (sent, delivered, read, failed) are not messages: ignored.
                for message in map(_dict, _list(value.get("messages"))):
                    await self._meta_message(message, names)

    async def _meta_message(self, message: dict[str, Any], names: dict[str, str]) -> None:
        wa_id, wamid = message.get("from"), message.get("id")
        # Only strings: a number or a list where text belongs is not a message.
        if not isinstance(wa_id, str) or not isinstance(wamid, str) or not wamid:
            return
        if not (wa_id.isascii() and wa_id.isdigit()):
            return
        kind = message.get("type")
        action: Action | None = None
        if kind == "text":
            body = _dict(message.get("text")).get("body")
            if not isinstance(body, str):
                return
            text = body
        elif kind == "interactive":
            reply = _dict(_dict(message.get("interactive")).get("button_reply"))
            action = _button_action(str(reply.get("id") or ""))
            if action is None:
                return
            text = action.kind
        elif kind == "button":  # a template's quick reply: its text counts as typed
            text = str(_dict(message.get("button")).get("text") or "")
        else:
            return  # media, locations, reactions …: not for podbay
        session = SessionKey(self.name, wa_id)
        self._latest.pop(session, None)
        self._latest[session] = wamid
        if len(self._latest) > 5000:
            self._latest.popitem(last=False)
        await self._deliver(
            Inbound(
                session=session,
                sender=Sender(self.name, f"+{wa_id}", names.get(wa_id, "")),
                text=text,
                platform_id=wamid,
                received_at=_float(message.get("timestamp")) or time.time(),
                is_direct=True,
                mentioned=True,
                action=action,
            )
        )
        with contextlib.suppress(TransportError):
            await self._graph({"status": "read", "message_id": wamid})

    async def _deliver(self, inbound: Inbound) -> None:
        assert self._submit is not None
        await self._submit(inbound)

    # -- Twilio webhooks --------------------------------------------------------------

    def _twilio_url(self, request: web.Request) -> str:
        if self.config.trust_forwarded_headers:
            proto = request.headers.get("X-Forwarded-Proto", request.scheme)
            host = request.headers.get("X-Forwarded-Host", request.host)
            return f"{proto}://{host}{request.rel_url}"
        return f"{self._public_url}{request.rel_url}"

    async def _twilio_webhook(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        try:
            form = {key: str(value) for key, value in (await request.post()).items()}
        except web.HTTPException:
            raise  # 413 and friends answer for themselves
        except Exception as exc:
            log.warning("WhatsApp: an unreadable Twilio webhook body was refused (%s)", exc)
            return web.Response(status=400, text="unreadable form")
        signature = request.headers.get("X-Twilio-Signature", "")
        token = self.config.auth_token.get_secret_value()
        expected = twilio_signature(self._twilio_url(request), form, token)
        if not signature or not _same(signature, expected):
            log.warning("WhatsApp: a Twilio webhook with a missing or wrong signature was refused")
            return web.Response(status=403, text="bad signature")
        sender, sid = form.get("From", ""), form.get("MessageSid", "")
        if sender.startswith("whatsapp:+") and sid:
            action = _button_action(form.get("ButtonPayload", ""))
            number = sender.removeprefix("whatsapp:")
            self._background(
                self._deliver(
                    Inbound(
                        session=SessionKey(self.name, number),
                        sender=Sender(self.name, number, form.get("ProfileName", "")),
                        text=action.kind if action else form.get("Body", ""),
                        platform_id=sid,
                        is_direct=True,
                        mentioned=True,
                        action=action,
                    )
                )
            )
        # An empty TwiML answer: the reply comes later through the Messages API.
        return web.Response(text="<Response/>", content_type="text/xml")

    # -- outbound ---------------------------------------------------------------------

    async def send(self, session: SessionKey, reply: Reply) -> MessageRef:
        limit = META_LIMIT if self.provider == "meta" else TWILIO_LIMIT
        whole = markdown_to_whatsapp(reply.text or " ") or " "
        if len(whole) <= limit:
            rendered = [whole]  # most replies: rendered once
        else:
            chunks = split_rendered(reply.text, limit, markdown_to_whatsapp)
            rendered = [markdown_to_whatsapp(chunk) or " " for chunk in chunks]
        ids: list[str] = []
        buttons = reply.buttons if self.provider == "meta" else ()
        if buttons and len(rendered[-1]) <= BUTTON_BODY_LIMIT:
            body = rendered.pop()
        elif buttons:
            body = "Confirm or cancel?"
        for text in rendered:
            ids.append(await self._send_text(session.conversation, text))
        if buttons:
            ids.append(await self._send_buttons(session.conversation, body, reply))
        return MessageRef(session, tuple(ids))

    async def edit(self, ref: MessageRef, reply: Reply) -> MessageRef:
        return await self.send(ref.session, reply)  # WhatsApp messages cannot be edited

    async def _send_text(self, to: str, text: str) -> str:
        if self.provider == "twilio":
            return await self._twilio({"To": f"whatsapp:{to}", "Body": text})
        return await self._graph(
            {
                "recipient_type": "individual",
                "to": to,
                "type": "text",
                "text": {"body": text, "preview_url": False},
            }
        )

    async def _send_buttons(self, to: str, body: str, reply: Reply) -> str:
        return await self._graph(
            {
                "recipient_type": "individual",
                "to": to,
                "type": "interactive",
                "interactive": {
                    "type": "button",
                    "body": {"text": body},
                    "action": {
                        "buttons": [
                            {
                                "type": "reply",
                                "reply": {
                                    "id": f"{BUTTON_PREFIX}{b.action.kind}:{b.action.target}",
                                    "title": b.label[:20],
                                },
                            }
                            for b in reply.buttons[:3]
                        ]
                    },
                },
            }
        )

    async def typing(self, session: SessionKey, active: bool) -> None:
        task = self._typing.pop(session, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if active and self.provider == "meta" and session in self._latest:
            self._typing[session] = asyncio.create_task(self._keep_typing(session))

    async def _keep_typing(self, session: SessionKey) -> None:
        # The indicator goes with a read receipt for the message being answered, and lasts
        # until the reply or 25 s: renewed while the agent works.
        while True:
            wamid = self._latest.get(session)
            if wamid is None:
                return
            with contextlib.suppress(TransportError):
                await self._graph(
                    {"status": "read", "message_id": wamid, "typing_indicator": {"type": "text"}}
                )
            await asyncio.sleep(TYPING_RENEW_S)

    # -- HTTP calls -------------------------------------------------------------------

    async def _graph(self, body: dict[str, Any]) -> str:
        cfg = self.config
        url = f"{cfg.graph_api_base}/{cfg.graph_api_version}/{cfg.phone_number_id}/messages"
        headers = {"Authorization": f"Bearer {cfg.access_token.get_secret_value()}"}
        data = await self._post(
            "messages", url, json={"messaging_product": "whatsapp", **body}, headers=headers
        )
        messages = data.get("messages") or [{}]
        return str(_dict(messages[0]).get("id") or "")

    async def _twilio(self, form: dict[str, str]) -> str:
        cfg = self.config
        url = f"{cfg.twilio_api_base}/2010-04-01/Accounts/{cfg.account_sid}/Messages.json"
        # HTTP Basic auth with the account SID and auth token (built here: aiohttp.BasicAuth
        # is deprecated in recent aiohttp).
        pair = f"{cfg.account_sid}:{cfg.auth_token.get_secret_value()}".encode()
        headers = {"Authorization": "Basic " + base64.b64encode(pair).decode()}
        data = await self._post(
            "Messages", url, data={"From": cfg.from_number, **form}, headers=headers
        )
        return str(data.get("sid") or "")

    async def _post(self, what: str, url: str, **kwargs: Any) -> dict[str, Any]:
        """POST with a few retries on 429, 5xx and connection errors; a refused window or
        rejected credentials are not retried. Never logs the body or a token."""
        if self._http is None:
            raise TransportError("WhatsApp transport is not started")
        backoff = Backoff(base=0.5, cap=8.0)
        failure = ""
        for attempt in range(1, _ATTEMPTS + 1):
            retry_after: float | None = None
            try:
                async with self._http.post(url, **kwargs) as response:
                    status = response.status
                    text = await response.text()
                    retry_after = _float(response.headers.get("Retry-After")) or None
            except (TimeoutError, OSError) as exc:
                status, text, failure = 0, "", describe(exc)
            else:
                data = _json(text)
                if 200 <= status < 300:
                    return data
                code, message = self._error(data)
                failure = f"HTTP {status}, error {code}: {message}"[:300]
                if code in META_WINDOW_CLOSED | TWILIO_WINDOW_CLOSED:
                    raise DeliveryRefused(
                        f"WhatsApp refused the reply: the 24-hour customer-service window is "
                        f"closed (error {code}); the user must write first"
                    )
                if code in META_AUTH_ERRORS | TWILIO_AUTH_ERRORS or status == 401:
                    self.health.failed(f"WhatsApp rejected podbay's credentials ({failure})")
                    raise TransportFailed(f"WhatsApp {what} failed: {failure}")
                if status != 429 and status < 500:
                    log.warning("WhatsApp %s failed: %s", what, failure)
                    raise TransportError(f"WhatsApp {what} failed: {failure}")
            if attempt < _ATTEMPTS:
                delay = backoff.next_delay(retry_after)
                log.warning("WhatsApp %s failed (%s); retrying in %.1f s", what, failure, delay)
                await self._sleep(delay)
        raise TransportError(f"WhatsApp {what} failed after {_ATTEMPTS} attempts: {failure}")

    def _error(self, data: dict[str, Any]) -> tuple[int | None, str]:
        if self.provider == "meta":
            error = _dict(data.get("error"))
            code = error.get("code")
            return (code if isinstance(code, int) else None), str(error.get("message") or "")
        code = data.get("code")
        return (code if isinstance(code, int) else None), str(data.get("message") or "")


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _json(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _float(value: object) -> float:
    """A finite number, or 0.0 ("nan" and "1e999" are not timestamps)."""
    try:
        number = float(str(value))
    except ValueError:
        return 0.0
    return number if math.isfinite(number) else 0.0


async def _doctor(settings: Settings, cfg: WhatsAppTransportConfig) -> DoctorReport:
    """Where Meta or Twilio must send webhooks."""
    from podbay.transports.http import WebhookServer

    server = WebhookServer(settings.http)
    base = cfg.public_url or settings.http.public_url
    if cfg.provider == "meta":
        url = f"{base}{META_PATH}" if base else server.local_url(META_PATH)
        notes = [f"WhatsApp (Meta) callback URL: {url} (verify token: the one configured)"]
    else:
        url = f"{base}{TWILIO_PATH}" if base else server.local_url(TWILIO_PATH)
        notes = [f"WhatsApp (Twilio) webhook URL, HTTP POST: {url}"]
    problems: list[tuple[str, str]] = []
    if not base:
        problems.append(
            (
                "no public URL for WhatsApp webhooks",
                "set `http.public_url` (or `transports.whatsapp.public_url`) to the https "
                "URL that reaches podbay's webhook server",
            )
        )
    return DoctorReport(notes=notes, problems=problems)


PLUGIN = TransportPlugin(
    name="whatsapp",
    config=WhatsAppTransportConfig,
    create=WhatsAppTransport.from_context,
    doctor=_doctor,
    summary="WhatsApp: Meta Cloud API or Twilio.",
)
