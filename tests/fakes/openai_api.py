"""A fake OpenAI Responses API for the real ``codex`` CLI.

It speaks ``POST /v1/responses`` with the documented SSE stream (``response.created``,
``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta`` / ``.done``, ``response.content_part.done``,
``response.output_item.done``, ``response.completed`` with ``usage``) and the documented
error bodies. Each test scripts the model's turns:

    async with FakeOpenAI() as fake:
        fake.script(shell("printf 'hi\\n' > hello.txt"), Text("Wrote hello.txt."))
        (codex_home / "config.toml").write_text(fake.codex_config())
        ... run codex exec --json ...
        first, second = fake.turn_requests
        assert second.body["input"][-1]["type"] == "function_call_output"

Every request (any path) is recorded in ``fake.requests`` with all its headers and the
JSON body. A request consumes the next scripted turn; when the script is empty the fake
answers ``Text("done")``. ``GET /v1/models`` answers a one-model list.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from fakes.llm_common import RecordedRequest, RecordingServer, sse, start_sse

DEFAULT_API_KEY = "sk-proj-test-0123456789abcdef"
# A model codex 0.171 has metadata for: with an unknown name it emits an "error" item
# ("Model metadata ... not found") and offers no apply_patch tool.
DEFAULT_MODEL = "gpt-5.5"
PROVIDER_ID = "fake"
# The environment variable the generated codex config names as the key's source.
ENV_KEY = "PODBAY_TEST_OPENAI_KEY"
INPUT_TOKENS = 150
CACHED_TOKENS = 20
OUTPUT_TOKENS = 40
REASONING_TOKENS = 8


# -- scripted turns --------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    """An assistant ``message`` item with one ``output_text`` part; the turn ends.

    ``reasoning`` (on every output turn) first sends a ``reasoning`` item with that summary.
    """

    text: str
    reasoning: str = ""
    kind: str = field(default="text", init=False)


@dataclass(frozen=True)
class FunctionCall:
    """A ``function_call`` item (``arguments`` is the JSON string the API sends)."""

    name: str
    arguments: dict[str, Any]
    text: str = ""
    reasoning: str = ""
    kind: str = field(default="function_call", init=False)


@dataclass(frozen=True)
class CustomToolCall:
    """A ``custom_tool_call`` item: a freeform tool such as codex's ``apply_patch``."""

    name: str
    input: str
    text: str = ""
    reasoning: str = ""
    kind: str = field(default="custom_tool_call", init=False)


@dataclass(frozen=True)
class ApiError:
    """An HTTP error with the documented body ``{"error": {message, type, param, code}}``.

    ``times`` is how many consecutive requests get it (the CLI retries 429 and 5xx).
    """

    status: int
    error_type: str
    code: str
    message: str
    retry_after: int | None = None
    times: int = 1
    kind: str = field(default="error", init=False)


@dataclass(frozen=True)
class Hang:
    """Send ``response.created`` and a first text delta, then nothing until the fake closes."""

    text: str = "Working on it"
    kind: str = field(default="hang", init=False)


Turn = Text | FunctionCall | CustomToolCall | ApiError | Hang


def shell(
    command: str, workdir: str | None = None, text: str = "", reasoning: str = ""
) -> FunctionCall:
    """Codex's ``exec_command`` tool (``cmd``: one shell command string, run in the turn's cwd)."""
    arguments: dict[str, Any] = {"cmd": command}
    if workdir is not None:
        arguments["workdir"] = workdir
    return FunctionCall("exec_command", arguments, text=text, reasoning=reasoning)


def apply_patch(patch: str, text: str = "", reasoning: str = "") -> CustomToolCall:
    """Codex's freeform ``apply_patch`` tool (``*** Begin Patch`` ... ``*** End Patch``)."""
    return CustomToolCall("apply_patch", patch, text=text, reasoning=reasoning)


def add_file(path: str, content: str, text: str = "", reasoning: str = "") -> CustomToolCall:
    """An ``apply_patch`` that creates ``path`` (relative to codex's working dir)."""
    lines = "".join(f"+{line}\n" for line in content.splitlines())
    patch = f"*** Begin Patch\n*** Add File: {path}\n{lines}*** End Patch\n"
    return apply_patch(patch, text=text, reasoning=reasoning)


def rate_limited(retry_after: int = 0, times: int = 1) -> ApiError:
    return ApiError(
        429,
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests per min (RPM): Limit 3, Used 3, Requested 1.",
        retry_after=retry_after,
        times=times,
    )


def auth_error(times: int = 1) -> ApiError:
    return ApiError(
        401,
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided: sk-****. You can find your API key at the dashboard.",
        times=times,
    )


# -- the server ------------------------------------------------------------------


class FakeOpenAI(RecordingServer):
    def __init__(self, api_key: str = DEFAULT_API_KEY, model: str = DEFAULT_MODEL) -> None:
        super().__init__()
        self.api_key = api_key
        self.model = model
        self._script: deque[Turn] = deque()
        self._error_repeats = 0

    def script(self, *turns: Turn) -> None:
        """Append turns; each ``/v1/responses`` request consumes the next one."""
        self._script.extend(turns)

    @property
    def pending(self) -> int:
        return len(self._script)

    @property
    def base_url(self) -> str:
        """The model provider's ``base_url`` (codex appends ``/responses``)."""
        return f"{self.origin}/v1"

    @property
    def turn_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.handled_as in ("script", "default")]

    def codex_config(self, *, retries: int = 0) -> str:
        """A ``$CODEX_HOME/config.toml`` that points codex at this fake and nowhere else.

        ``retries`` sets the provider's request and stream retries: codex retries 429
        and 5xx itself (with back-off), so tests of errors use 0 to see them at once.
        Measured with strace (codex 0.171): without ``[analytics] enabled = false`` codex
        resolves ab.chatgpt.com, and without ``[features] plugins = false`` it resolves
        chatgpt.com and api.github.com (plugin sync); with both it only talks to the fake.
        """
        return (
            f'model = "{self.model}"\n'
            f'model_provider = "{PROVIDER_ID}"\n'
            "check_for_update_on_startup = false\n"
            "\n"
            f"[model_providers.{PROVIDER_ID}]\n"
            'name = "Fake OpenAI"\n'
            f'base_url = "{self.base_url}"\n'
            'wire_api = "responses"\n'
            f'env_key = "{ENV_KEY}"\n'
            f"request_max_retries = {retries}\n"
            f"stream_max_retries = {retries}\n"
            "\n"
            "[analytics]\n"
            "enabled = false\n"
            "\n"
            "[features]\n"
            "plugins = false\n"
        )

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/v1/models", self._models)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record(request)
        recorded.handled_as = "models"
        self._notify(recorded)
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "fake"}],
            }
        )

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record(request)
        body = recorded.body if isinstance(recorded.body, dict) else {}
        turn: Turn
        if self._script:
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
        if isinstance(turn, ApiError):
            return _error_response(turn)
        return await self._stream(request, turn, str(body.get("model") or self.model))

    async def _stream(self, request: web.Request, turn: Turn, model: str) -> web.StreamResponse:
        response = await start_sse(request, {"x-request-id": f"req_{uuid.uuid4().hex}"})
        seq = _Sequence()
        resp: dict[str, Any] = {
            "id": f"resp_{uuid.uuid4().hex}",
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "model": model,
            "output": [],
            "usage": None,
        }
        await response.write(seq.event("response.created", response=dict(resp)))
        await response.write(seq.event("response.in_progress", response=dict(resp)))
        if isinstance(turn, Hang):
            item_id = f"msg_{uuid.uuid4().hex}"
            await response.write(
                seq.event(
                    "response.output_item.added",
                    output_index=0,
                    item={
                        "id": item_id,
                        "type": "message",
                        "status": "in_progress",
                        "role": "assistant",
                        "content": [],
                    },
                )
            )
            await response.write(
                seq.event(
                    "response.output_text.delta",
                    item_id=item_id,
                    output_index=0,
                    content_index=0,
                    delta=turn.text,
                )
            )
            await self._hang(response)
            return response
        output: list[dict[str, Any]] = []
        assert not isinstance(turn, ApiError)
        if turn.reasoning:
            output.append(await _reasoning_item(response, seq, len(output), turn.reasoning))
        if turn.text:
            output.append(await _message_item(response, seq, len(output), turn.text))
        if isinstance(turn, FunctionCall | CustomToolCall):
            item: dict[str, Any]
            if isinstance(turn, FunctionCall):
                item = {
                    "id": f"fc_{uuid.uuid4().hex}",
                    "type": "function_call",
                    "status": "completed",
                    "call_id": f"call_{uuid.uuid4().hex[:24]}",
                    "name": turn.name,
                    "arguments": json.dumps(turn.arguments),
                }
            else:
                item = {
                    "id": f"ctc_{uuid.uuid4().hex}",
                    "type": "custom_tool_call",
                    "status": "completed",
                    "call_id": f"call_{uuid.uuid4().hex[:24]}",
                    "name": turn.name,
                    "input": turn.input,
                }
            index = len(output)
            await response.write(
                seq.event(
                    "response.output_item.added",
                    output_index=index,
                    item={**item, "status": "in_progress"},
                )
            )
            await response.write(
                seq.event("response.output_item.done", output_index=index, item=item)
            )
            output.append(item)
        resp.update(
            status="completed",
            output=output,
            usage={
                "input_tokens": INPUT_TOKENS,
                "input_tokens_details": {"cached_tokens": CACHED_TOKENS},
                "output_tokens": OUTPUT_TOKENS,
                "output_tokens_details": {"reasoning_tokens": REASONING_TOKENS},
                "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
            },
        )
        await response.write(seq.event("response.completed", response=resp))
        await response.write_eof()
        return response


# -- helpers ---------------------------------------------------------------------


class _Sequence:
    """Numbers the events of one stream (``sequence_number``), as the API does."""

    def __init__(self) -> None:
        self._next = 0

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._next, **fields}
        self._next += 1
        return sse(kind, data)


async def _reasoning_item(
    response: web.StreamResponse, seq: _Sequence, index: int, summary: str
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": f"rs_{uuid.uuid4().hex}",
        "type": "reasoning",
        "summary": [],
        "encrypted_content": None,
    }
    await response.write(seq.event("response.output_item.added", output_index=index, item=item))
    done = {**item, "summary": [{"type": "summary_text", "text": summary}]}
    await response.write(seq.event("response.output_item.done", output_index=index, item=done))
    return done


async def _message_item(
    response: web.StreamResponse, seq: _Sequence, index: int, text: str
) -> dict[str, Any]:
    item_id = f"msg_{uuid.uuid4().hex}"
    item: dict[str, Any] = {
        "id": item_id,
        "type": "message",
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
    await response.write(seq.event("response.output_item.added", output_index=index, item=item))
    part = {"type": "output_text", "text": "", "annotations": []}
    where = {"item_id": item_id, "output_index": index, "content_index": 0}
    await response.write(seq.event("response.content_part.added", **where, part=part))
    half = len(text) // 2
    for piece in (text[:half], text[half:]):
        if piece:
            await response.write(seq.event("response.output_text.delta", **where, delta=piece))
    await response.write(seq.event("response.output_text.done", **where, text=text))
    done_part = {"type": "output_text", "text": text, "annotations": []}
    await response.write(seq.event("response.content_part.done", **where, part=done_part))
    item = {**item, "status": "completed", "content": [done_part]}
    await response.write(seq.event("response.output_item.done", output_index=index, item=item))
    return item


def _error_response(turn: ApiError) -> web.Response:
    headers = {"x-request-id": f"req_{uuid.uuid4().hex}"}
    if turn.retry_after is not None:
        headers["retry-after"] = str(turn.retry_after)
    if turn.status == 429:
        headers["x-ratelimit-remaining-requests"] = "0"
    return web.json_response(
        {
            "error": {
                "message": turn.message,
                "type": turn.error_type,
                "param": None,
                "code": turn.code,
            }
        },
        status=turn.status,
        headers=headers,
    )
