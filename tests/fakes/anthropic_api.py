"""A fake Anthropic Messages API for the real ``claude`` CLI (Claude Code).

It speaks ``POST /v1/messages`` with the documented SSE stream (``message_start``,
``content_block_start`` / ``content_block_delta`` (``text_delta``, ``input_json_delta``) /
``content_block_stop``, ``message_delta`` with ``stop_reason`` and ``usage``,
``message_stop``), and the documented error bodies. Each test scripts the model's turns:

    async with FakeAnthropic() as fake:
        fake.script(write("hello.txt", "hi\\n"), Text("Wrote hello.txt."))
        env = {"ANTHROPIC_BASE_URL": fake.base_url, "ANTHROPIC_API_KEY": fake.api_key, ...}
        ... run claude ...
        first, second = fake.turn_requests
        assert second.body["messages"][-1]["content"][0]["type"] == "tool_result"

Every request (any path) is recorded in ``fake.requests`` with all its headers and the
JSON body. A request consumes the next scripted turn; when the script is empty the fake
answers ``Text("done")``. Side calls the CLI makes on its own (a session title or other
small helper prompts, see ``is_side_call``) are answered without consuming the script.
"""

from __future__ import annotations

import json
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from fakes.llm_common import RecordedRequest, RecordingServer, sse, start_sse

DEFAULT_API_KEY = "sk-ant-test-0123456789abcdef"
# Token counts the fake reports for every turn (so tests can check the CLI's totals).
INPUT_TOKENS = 120
OUTPUT_TOKENS = 30


# -- scripted turns --------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    """The model answers with text and ends its turn (``stop_reason: end_turn``)."""

    text: str
    kind: str = field(default="text", init=False)


@dataclass(frozen=True)
class ToolUse:
    """The model calls a tool (``stop_reason: tool_use``), optionally after some text."""

    name: str
    input: dict[str, Any]
    text: str = ""
    id: str = ""
    kind: str = field(default="tool_use", init=False)


@dataclass(frozen=True)
class ApiError:
    """An HTTP error with the documented body ``{"type": "error", "error": {...}}``.

    ``times`` is how many consecutive requests get this error: the CLI retries some
    errors (429, 5xx, 529) itself, so a test that wants the CLI to give up scripts the
    error for every retry.
    """

    status: int
    error_type: str
    message: str
    retry_after: int | None = None
    times: int = 1
    kind: str = field(default="error", init=False)


@dataclass(frozen=True)
class Hang:
    """Start the stream (``message_start`` and a first text delta) and never finish it.

    The response stays open until the fake is closed; ``fake.hanging`` is set once the
    partial stream has been sent.
    """

    text: str = "Working on it"
    kind: str = field(default="hang", init=False)


Turn = Text | ToolUse | ApiError | Hang


def write(file_path: str, content: str, text: str = "") -> ToolUse:
    """A ``Write`` tool call, as Claude Code's own tool schema names its fields."""
    return ToolUse("Write", {"file_path": file_path, "content": content}, text=text)


def bash(command: str, text: str = "") -> ToolUse:
    return ToolUse("Bash", {"command": command, "description": "Run a command"}, text=text)


def rate_limited(retry_after: int = 0, times: int = 1) -> ApiError:
    return ApiError(
        429,
        "rate_limit_error",
        "Number of request tokens has exceeded your per-minute rate limit",
        retry_after=retry_after,
        times=times,
    )


def auth_error(times: int = 1) -> ApiError:
    return ApiError(401, "authentication_error", "invalid x-api-key", times=times)


def overloaded(times: int = 1) -> ApiError:
    return ApiError(529, "overloaded_error", "Overloaded", times=times)


# -- the server ------------------------------------------------------------------


class FakeAnthropic(RecordingServer):
    def __init__(self, api_key: str = DEFAULT_API_KEY) -> None:
        super().__init__()
        self.api_key = api_key
        self._script: deque[Turn] = deque()
        self._error_repeats = 0  # how many more requests the current ApiError answers

    def script(self, *turns: Turn) -> None:
        """Append turns; each main ``/v1/messages`` request consumes the next one."""
        self._script.extend(turns)

    @property
    def pending(self) -> int:
        return len(self._script)

    @property
    def base_url(self) -> str:
        """The value for ``ANTHROPIC_BASE_URL`` (no ``/v1``: the CLI appends it)."""
        return self.origin

    @property
    def turn_requests(self) -> list[RecordedRequest]:
        """The main ``/v1/messages`` requests (scripted or default), in order."""
        return [r for r in self.requests if r.handled_as in ("script", "default")]

    @property
    def side_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.handled_as == "side"]

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        # Without CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC the CLI first probes the base
        # URL with ``HEAD /api/hello`` (and resolves api.anthropic.com on its own).
        app.router.add_get("/api/hello", self._hello)  # GET and HEAD

    async def _hello(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record(request)
        recorded.handled_as = "hello"
        self._notify(recorded)
        return web.Response(status=200)

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record(request)
        recorded.handled_as = "count_tokens"
        self._notify(recorded)
        return web.json_response({"input_tokens": max(1, len(recorded.raw) // 4)})

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record(request)
        body = recorded.body if isinstance(recorded.body, dict) else {}
        turn: Turn
        if is_side_call(body):
            recorded.handled_as = "side"
            turn = Text(_side_answer(body))
        elif self._script:
            recorded.handled_as = "script"
            turn = self._script[0]
            if isinstance(turn, ApiError):
                self._error_repeats += 1
                if self._error_repeats >= turn.times:
                    self._script.popleft()
                    self._error_repeats = 0
            else:
                self._script.popleft()
        else:
            recorded.handled_as = "default"
            turn = Text("done")
        recorded.turn_kind = turn.kind
        self._notify(recorded)
        model = str(body.get("model") or "claude-sonnet-4-5")
        if isinstance(turn, ApiError):
            return _error_response(turn)
        if not body.get("stream"):
            if isinstance(turn, Hang):
                self.hanging.set()
                await self._closing.wait()
                return web.Response(status=503)
            return web.json_response(_whole_message(turn, model), headers=_headers())
        return await self._stream(request, turn, model)

    async def _stream(self, request: web.Request, turn: Turn, model: str) -> web.StreamResponse:
        response = await start_sse(request, _headers())
        message_id = f"msg_{uuid.uuid4().hex[:24]}"
        await response.write(
            sse(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": message_id,
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {
                            "input_tokens": INPUT_TOKENS,
                            "cache_creation_input_tokens": 0,
                            "cache_read_input_tokens": 0,
                            "output_tokens": 1,
                        },
                    },
                },
            )
        )
        await response.write(sse("ping", {"type": "ping"}))
        if isinstance(turn, Hang):
            await response.write(_text_block_start(0))
            await response.write(_text_delta(0, turn.text))
            await self._hang(response)
            return response
        assert not isinstance(turn, ApiError)
        index = 0
        text = turn.text
        if text:
            await response.write(_text_block_start(index))
            # Two deltas, as the real API splits text: parsers must concatenate them.
            half = len(text) // 2
            for piece in (text[:half], text[half:]):
                if piece:
                    await response.write(_text_delta(index, piece))
            await response.write(_block_stop(index))
            index += 1
        stop_reason = "end_turn"
        if isinstance(turn, ToolUse):
            stop_reason = "tool_use"
            await response.write(
                sse(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {
                            "type": "tool_use",
                            "id": turn.id or _tool_id(),
                            "name": turn.name,
                            "input": {},
                        },
                    },
                )
            )
            payload = json.dumps(turn.input)
            half = len(payload) // 2
            for piece in (payload[:half], payload[half:]):
                await response.write(
                    sse(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": piece},
                        },
                    )
                )
            await response.write(_block_stop(index))
        await response.write(
            sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": OUTPUT_TOKENS},
                },
            )
        )
        await response.write(sse("message_stop", {"type": "message_stop"}))
        await response.write_eof()
        return response


# -- helpers ---------------------------------------------------------------------


def is_side_call(body: dict[str, Any]) -> bool:
    """An auxiliary request the CLI makes on its own, not a turn of the conversation.

    Claude Code's conversation turns always carry its tool list; its helper prompts
    (session titles, summaries, "is this a new topic?" checks, quota probes) are sent
    without tools.
    """
    return not body.get("tools")


def _side_answer(body: dict[str, Any]) -> str:
    system = json.dumps(body.get("system", ""))
    if "json" in system.lower():
        return '{"title": "Test session", "isNewTopic": false}'
    return "Test session"


def _headers() -> dict[str, str]:
    return {"request-id": f"req_{uuid.uuid4().hex[:24]}", "anthropic-organization-id": "org-fake"}


def _tool_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def _text_block_start(index: int) -> bytes:
    return sse(
        "content_block_start",
        {
            "type": "content_block_start",
            "index": index,
            "content_block": {"type": "text", "text": ""},
        },
    )


def _text_delta(index: int, text: str) -> bytes:
    return sse(
        "content_block_delta",
        {
            "type": "content_block_delta",
            "index": index,
            "delta": {"type": "text_delta", "text": text},
        },
    )


def _block_stop(index: int) -> bytes:
    return sse("content_block_stop", {"type": "content_block_stop", "index": index})


def _error_response(turn: ApiError) -> web.Response:
    headers = _headers()
    if turn.retry_after is not None:
        headers["retry-after"] = str(turn.retry_after)
    if turn.status == 429:
        headers["anthropic-ratelimit-requests-remaining"] = "0"
        headers["anthropic-ratelimit-tokens-remaining"] = "0"
    return web.json_response(
        {
            "type": "error",
            "error": {"type": turn.error_type, "message": turn.message},
            "request_id": headers["request-id"],
        },
        status=turn.status,
        headers=headers,
    )


def _whole_message(turn: Turn, model: str) -> dict[str, Any]:
    """The non-streaming answer (``"stream": false``)."""
    content: list[dict[str, Any]] = []
    stop_reason = "end_turn"
    text = turn.text if isinstance(turn, Text | ToolUse | Hang) else ""
    if text:
        content.append({"type": "text", "text": text})
    if isinstance(turn, ToolUse):
        stop_reason = "tool_use"
        content.append(
            {
                "type": "tool_use",
                "id": turn.id or _tool_id(),
                "name": turn.name,
                "input": turn.input,
            }
        )
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS},
    }
