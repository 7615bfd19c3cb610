"""A fault-injecting OpenAI-compatible completions server on loopback (aiohttp.web).

It answers ``GET /v1/models`` and ``POST /v1/completions`` (streamed as server-sent events when
the request says ``"stream": true``, else one JSON body) and records every request. Each
completion request takes the next scripted action, or :attr:`CompletionsServer.default` once
the script is used up::

    async with CompletionsServer() as server:
        server.script(Fail(503), Respond(("Hello", " there")))
        model = RemoteModel(url=server.url, backoff=0.01)

Faults are what a real server or the network does: a status with a body and headers
(:class:`Fail`), no answer at all or a stream that stops (:class:`Stall`,
``Respond(stall_after=n)``), a body that is not JSON (:class:`Garbage`), a connection closed
without an answer (:class:`Disconnect`), an error event in the stream (:class:`StreamError`).
Stalled handlers wake when the server closes, so shutting it down never waits on them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

from tests.fakes.loopback import serve_on_loopback

#: The fields transformers serve accepts in a completions request (it answers 422 to others).
OPENAI_COMPLETION_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "stop",
        "stream",
        "seed",
        "suffix",
        "frequency_penalty",
        "presence_penalty",
        "n",
        "logprobs",
        "echo",
        "best_of",
        "user",
        "logit_bias",
        "stream_options",
    }
)


@dataclass(frozen=True)
class Respond:
    """A completion made of ``pieces``: one SSE event each, or joined in one JSON body.

    ``stall_after``: the stream stops (the connection stays open) after that many pieces.
    ``disconnect_after``: the connection is closed after that many pieces.
    ``done``: end the stream with ``data: [DONE]`` (transformers serve does not send it).
    ``delay``: seconds between pieces.
    """

    pieces: tuple[str, ...] = ("Hello", " there", "!")
    stall_after: int | None = None
    disconnect_after: int | None = None
    done: bool = True
    delay: float = 0.0


@dataclass(frozen=True)
class Fail:
    """Answer with ``status`` (and a JSON error body unless ``body`` is given)."""

    status: int
    body: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Stall:
    """Accept the request and never answer (until the server closes)."""


@dataclass(frozen=True)
class Garbage:
    """Answer 200 with a body that is not JSON (in the stream: a ``data:`` line that is not)."""

    text: str = "<html>502 Bad Gateway</html>"


@dataclass(frozen=True)
class Disconnect:
    """Close the connection without answering."""


@dataclass(frozen=True)
class StreamError:
    """Start streaming, send ``pieces``, then an error event as transformers serve does."""

    message: str = "CUDA out of memory"
    pieces: tuple[str, ...] = ()


Action = Respond | Fail | Stall | Garbage | Disconnect | StreamError


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: Mapping[str, str]
    body: Mapping[str, Any]
    at: float  # time.monotonic() when it arrived


class CompletionsServer:
    """The fake server; use it as an async context manager (see the module docstring)."""

    def __init__(
        self,
        *,
        model_id: str = "fake-model",
        default: Action | None = None,
        known_fields: frozenset[str] | None = None,
        models_status: int = 200,
        adds_bos: bool = False,
    ) -> None:
        """``known_fields``: answer 422 naming any other request field (as transformers serve
        does); None accepts all. ``models_status``: what ``GET /v1/models`` answers.
        ``adds_bos``: the server's tokenizer puts a bos token before every prompt (as Llama-2's
        does), which shows in the usage's ``prompt_tokens``."""
        self.model_id = model_id
        self.default: Action = default or Respond()
        self.known_fields = known_fields
        self.models_status = models_status
        self.adds_bos = adds_bos
        self.requests: list[RecordedRequest] = []
        self._script: deque[Action] = deque()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """The API base, as MODEL_URL takes it."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def completions(self) -> list[RecordedRequest]:
        """The streamed completion requests (replies, not the backend's probes)."""
        return [r for r in self.requests if r.path == "/v1/completions" and r.body.get("stream")]

    def script(self, *actions: Action) -> None:
        """Queue actions for the next completion requests, in order."""
        self._script.extend(actions)

    async def __aenter__(self) -> CompletionsServer:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/health", self._health)
        self._runner, self.port = await serve_on_loopback(app)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # --- handlers ---------------------------------------------------------------------------

    async def _record(self, request: web.Request) -> RecordedRequest:
        body: Mapping[str, Any] = {}
        if request.can_read_body:
            body = await request.json()
        recorded = RecordedRequest(
            request.method, request.path, dict(request.headers), body, time.monotonic()
        )
        self.requests.append(recorded)
        return recorded

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        await self._record(request)
        if self.models_status != 200:
            return web.json_response({"error": "no"}, status=self.models_status)
        return web.json_response(
            {"object": "list", "data": [{"id": self.model_id, "object": "model"}]}
        )

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        recorded = await self._record(request)
        if self.known_fields is not None:
            unexpected = set(recorded.body) - self.known_fields
            if unexpected:
                detail = f"Unexpected fields in the request: {unexpected}"
                return web.json_response({"detail": detail}, status=422)
        action = self._script.popleft() if self._script else self.default
        streaming = bool(recorded.body.get("stream"))
        match action:
            case Fail(status=status, body=body, headers=headers):
                text = body if body is not None else json.dumps({"error": f"status {status}"})
                return web.Response(
                    status=status, text=text, headers=headers, content_type="application/json"
                )
            case Stall():
                await self._closing.wait()
                return web.Response(status=503)
            case Garbage(text=text):
                if streaming:
                    response = await self._start_stream(request)
                    await response.write(f"data: {text}\n\n".encode())
                    return response
                return web.Response(text=text, content_type="application/json")
            case Disconnect():
                if request.transport is not None:
                    request.transport.close()
                return web.Response()
            case StreamError(message=message, pieces=pieces):
                response = await self._start_stream(request)
                for piece in pieces:
                    await response.write(self._event(piece))
                await response.write(f"data: {json.dumps({'error': message})}\n\n".encode())
                return response
            case Respond():
                prompt = str(recorded.body.get("prompt", ""))
                return await self._respond(
                    request, action, streaming=streaming, prompt_tokens=self.count_tokens(prompt)
                )
        raise AssertionError(f"unknown action {action!r}")

    def count_tokens(self, prompt: str) -> int:
        """A word-level stand-in for a tokenizer: one token per ``<s>`` and per word, plus the
        bos the server adds."""
        rest = prompt.replace("<s>", " ")
        return prompt.count("<s>") + len(rest.split()) + int(self.adds_bos)

    async def _respond(
        self, request: web.Request, action: Respond, *, streaming: bool, prompt_tokens: int
    ) -> web.StreamResponse:
        if not streaming:
            return web.json_response(
                {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "model": self.model_id,
                    "choices": [
                        {"index": 0, "text": "".join(action.pieces), "finish_reason": "stop"}
                    ],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": len(action.pieces),
                        "total_tokens": prompt_tokens + len(action.pieces),
                    },
                }
            )
        response = await self._start_stream(request)
        for index, piece in enumerate(action.pieces):
            if action.stall_after is not None and index >= action.stall_after:
                await self._closing.wait()
                return response
            if action.disconnect_after is not None and index >= action.disconnect_after:
                if request.transport is not None:
                    request.transport.close()
                return response
            if action.delay:
                await asyncio.sleep(action.delay)
            await response.write(self._event(piece))
        await response.write(self._event("", finish_reason="stop"))
        if action.done:
            await response.write(b"data: [DONE]\n\n")
        return response

    async def _start_stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        return response

    def _event(self, text: str, finish_reason: str | None = None) -> bytes:
        choice: dict[str, Any] = {"index": 0, "text": text}
        if finish_reason is not None:
            choice["finish_reason"] = finish_reason
        chunk = {"id": "cmpl-1", "object": "text_completion", "model": self.model_id}
        return f"data: {json.dumps({**chunk, 'choices': [choice]})}\n\n".encode()
