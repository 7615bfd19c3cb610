"""Replies from a model served elsewhere: any OpenAI-compatible completions server.

Usage::

    model = RemoteModel(url="http://gpu-host:8000/v1", api_key="...", tokenizer=tokenizer)
    await model.start()                      # learns the served model's id: model.version
    reply = await model.generate(messages=[{"role": "user", "content": "Hi"}], max_new_tokens=64)
    stream = model.stream(messages=..., max_new_tokens=64)
    async for piece in stream: ...           # stream.reply once it ends
    await model.close()

``MODEL_BACKEND=remote`` sends the prompt of :func:`model.prompt.format_prompt` (the one
formatter) to ``POST {url}/completions`` of any OpenAI-compatible server (vLLM, TGI, llama.cpp's
server, ``transformers serve``) and streams the reply back; the model can run on GPUs, as
replicas behind a load balancer, and the bot stays the same.

Prompt: the history is fitted first (:func:`model.context_fit.fit_prompt`), by token count with
the model folder's tokenizer, else by a safe estimate (:class:`ByteEstimate`). A server whose
tokenizer adds a bos of its own (Llama-2's does, the default model's does not) gets the prompt
without its leading ``<s>``: the tokenizer tells, else the server's token counts for ``<s>`` and
``<s><s>`` (:meth:`RemoteModel.start`).

Decoding: temperature, top-p and ``stop`` (every control string and stop string) are OpenAI
fields; the rest goes as the server's own extension, vLLM's top-level fields first, then (when
they are rejected) ``transformers serve``'s ``generation_config``, then none. Replies are cleaned
like the local model's (:class:`model.generation.ReplyFilter`: control strings, stop strings),
so no ``[INST]``/``[/INST]``/``<s>`` fragment reaches a user whatever the server does.

Faults never hang: ``connect_timeout`` for connecting, ``stall_timeout`` for each wait for data
(headers, every chunk), ``timeout`` for the whole request, retries included. Connection errors,
429 and 5xx are retried with exponential backoff (a small ``Retry-After`` honoured), never once
a piece of the reply was yielded. Any other fault (a stall, a body that is not JSON, an error
event, an empty completion, another status) raises :class:`RemoteModelError`, whose message
never holds the API key; the pipeline answers with an apology.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import random
import time
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from typing import Any, Final

import aiohttp

from bot.contracts import GeneratedReply, ModelBusy, ReplyStream
from model.context_fit import FittedPrompt, fit_prompt
from model.generation import GenerationSettings, ReplyFilter
from model.prompt import B_INST, BOS, CONTROL_STRINGS, EOS, format_prompt
from model.prompt_encoding import PromptEncoder

logger = logging.getLogger(__name__)

#: A ``Retry-After`` longer than this (seconds) is not waited out: the request fails at once.
MAX_RETRY_AFTER: Final = 10.0
#: The request fields that are the server's own extensions, by dialect, in the order tried.
DIALECTS: Final = ("vllm", "transformers", "openai")
_EXTENSION_FIELDS: Final = {
    "vllm": ("repetition_penalty", "stop_token_ids", "ignore_eos", "skip_special_tokens"),
    "transformers": ("generation_config",),
    "openai": (),
}
#: How much of an error body goes into a message.
_BODY_EXCERPT: Final = 200


class RemoteModelError(Exception):
    """The model server gave no usable reply (unreachable, stalled, failed, nonsense).

    The message says what happened and where, never the API key; the pipeline logs it and
    answers the user with an apology. ``status`` is the HTTP status that caused it, if any.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RemoteModelBusy(RemoteModelError, ModelBusy):
    """The server kept answering 429 (too many requests): the user is told to try again."""


class _Retriable(Exception):
    """One attempt failed in a way another attempt may not (connection, 429, 5xx)."""

    def __init__(self, reason: str, *, retry_after: float | None = None, busy: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.busy = busy


class _ExtensionsRejected(Exception):
    """The server refused a field of the extensions sent (a dialect it does not speak)."""


class ByteEstimate(PromptEncoder):
    """Token counts for :func:`model.context_fit.fit_prompt` without a tokenizer: a "token"
    per UTF-8 byte, whose "id" is the byte.

    No tokenizer needs more tokens than bytes (byte-level BPE and SentencePiece fall back to
    bytes or characters), so the prompt always fits. Half the bytes is closer for English on a
    big vocabulary but not safe: the default model's small one splits unseen words almost byte
    by byte (the tiny model: 28 tokens for the 29 bytes of "Grüße aus Köln — ça va?"). Too
    long a prompt fails the reply; too short only reads less history.
    """

    def __init__(self) -> None:  # no tokenizer to read control ids from: all counted as text
        self.tokenizer = self
        self.bos = BOS
        self.eos = EOS
        self.control_ids: dict[str, int] = {}
        self.forbidden_ids: frozenset[int] = frozenset()

    def encode(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        return self.encode_text(format_prompt(messages))

    def encode_text(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``; a character cut in half at either end is left out."""
        return bytes(ids).decode("utf-8", errors="ignore")


class RemoteModel:
    """The bot's reply generator backed by an OpenAI-compatible completions server."""

    def __init__(
        self,
        *,
        url: str,
        model_name: str = "",
        api_key: str = "",
        context_window: int = 4096,
        tokenizer: Any | None = None,
        history_pairs: int | None = None,
        generation: GenerationSettings | None = None,
        timeout: float = 120.0,
        connect_timeout: float = 5.0,
        stall_timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        """``url``: the API base (``http://host:8000/v1``); ``model_name``: the served model
        (empty: the server's first); ``api_key``: sent as a bearer token when set;
        ``tokenizer``: the model folder's, for exact token counts; ``history_pairs``: at most
        this many earlier exchanges (as the local model's). Times are seconds (see the module
        docstring); ``retries`` more attempts, the first ``backoff`` seconds later, doubling.
        """
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the model server URL must start with http:// or https://: {url!r}")
        self.url = url.rstrip("/")
        self.model_name = model_name
        self.context_window = context_window
        self.history_pairs = history_pairs
        self.generation = generation or GenerationSettings()
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.version = f"remote:{model_name}" if model_name else "remote"
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeouts = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=stall_timeout
        )
        self._session: aiohttp.ClientSession | None = None
        self._starting = asyncio.Lock()
        self._ready = False
        self._dialect = 0  # index into DIALECTS
        #: The served model's id, sent with every request (learned in :meth:`start`).
        self.served_model = model_name
        self.encoder = ByteEstimate() if tokenizer is None else PromptEncoder(tokenizer)
        eos_id = getattr(tokenizer, "eos_token_id", None)
        eos_ids = [] if eos_id is None else [eos_id]
        #: Token ids that end generation where the server takes ids (the tokenizer's controls).
        self.stop_ids = list(dict.fromkeys([*eos_ids, *self.encoder.control_ids.values()]))
        bos_eos = [text for text in (self.encoder.bos, self.encoder.eos) if text]
        #: The strings no reply may contain (see :class:`model.prompt.ReplyCleaner`).
        self.reply_controls = tuple(dict.fromkeys([*CONTROL_STRINGS, *bos_eos]))
        #: Sent as ``stop``: a new user turn and the end of a turn first.
        self.stop = list(
            dict.fromkeys([B_INST, EOS, *self.reply_controls, *self.generation.stop_strings])
        )
        #: Whether the server puts its own bos before the prompt (None: not known yet).
        self.server_adds_bos = None if tokenizer is None else _tokenizer_adds_bos(tokenizer)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP session, learn the served model's id (:attr:`version`) and, without
        a tokenizer, whether the server adds a bos; nothing once started. Raises
        RemoteModelError: the server is unreachable, lists no models, or not ``model_name``."""
        async with self._starting:
            if self._ready:
                return
            session = aiohttp.ClientSession(timeout=self._timeouts, headers=self._headers)
            self._session = session
            try:
                self.served_model = await self._served_model()
                if self.server_adds_bos is None:
                    self.server_adds_bos = await self._probe_bos()
            except BaseException:
                self._session = None
                await session.close()
                raise
            self.version = f"remote:{self.served_model}"
            self._ready = True
        logger.info("%s serves %s (adds a bos: %s)", self.url, self.version, self.server_adds_bos)

    @property
    def ready(self) -> bool:
        """Whether :meth:`start` reached the server and it is not closed since."""
        return self._ready

    async def close(self) -> None:
        """Close the HTTP session (requests still in flight fail with RemoteModelError)."""
        session, self._session, self._ready = self._session, None, False
        if session is not None:
            await session.close()

    async def _served_model(self) -> str:
        try:
            listing = await self._json("GET", "/models", None)
        except RemoteModelError as error:
            if error.status == 404 and self.model_name:  # a server without a model list
                return self.model_name
            raise
        entries = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(entries, list):
            raise RemoteModelError(
                f"the model server at {self.url} answered GET /models without a model list "
                "(is MODEL_URL the API base, like http://host:8000/v1?)"
            )
        ids = [str(entry["id"]) for entry in entries if isinstance(entry, dict) and "id" in entry]
        if self.model_name:
            if ids and self.model_name not in ids:
                raise RemoteModelError(
                    f"the model server at {self.url} does not serve {self.model_name!r}; it "
                    f"serves {', '.join(map(repr, ids))} (set MODEL_NAME to one of them)"
                )
            return self.model_name
        if not ids:
            raise RemoteModelError(f"the model server at {self.url} serves no model")
        return ids[0]

    async def _probe_bos(self) -> bool:
        """Whether the server adds a bos: its prompt token counts for ``<s>`` and ``<s><s>``
        differ by what one ``<s>`` costs, so anything beyond that in the first is its own."""
        counts: list[Any] = []
        for prompt in (BOS, BOS + BOS):
            body = {"model": self.served_model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
            try:
                answer = await self._json("POST", "/completions", body)
                counts.append(answer["usage"]["prompt_tokens"])
            except (RemoteModelError, LookupError, TypeError) as error:
                logger.warning("cannot tell if %s adds a bos (%s); assuming not", self.url, error)
                return False
        one, two = counts
        return isinstance(one, int) and isinstance(two, int) and two > one and one > two - one

    # --- prompts ---------------------------------------------------------------------------

    def fit(self, messages: Sequence[Mapping[str, str]], *, max_new_tokens: int) -> FittedPrompt:
        """The messages to prompt with so that prompt and reply fit :attr:`context_window`
        (see :func:`model.context_fit.fit_prompt`; raises as there)."""
        return fit_prompt(
            messages,
            encoder=self.encoder,
            budget=self.context_window - max_new_tokens,
            history_pairs=self.history_pairs,
        )

    def prompt_text(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt sent for (fitted) ``messages``: :func:`model.prompt.format_prompt`'s,
        without its leading bos when the server adds one of its own."""
        bos = self.encoder.bos
        prompt = format_prompt(messages, bos=bos, eos=self.encoder.eos)
        if self.server_adds_bos and bos and prompt.startswith(bos):
            prompt = prompt[len(bos) :]
        return prompt

    def payload(self, prompt: str, *, max_new_tokens: int, dialect: str) -> dict[str, Any]:
        """The completions request body for ``prompt`` in ``dialect`` (one of DIALECTS)."""
        settings = self.generation
        body: dict[str, Any] = {
            "model": self.served_model,
            "prompt": prompt,
            "max_tokens": max_new_tokens,
            "temperature": settings.temperature,  # 0: greedy
            "stream": True,
        }
        if settings.sampling and settings.top_p < 1:
            body["top_p"] = settings.top_p
        stop_ids = [] if settings.ignore_eos else self.stop_ids
        if not settings.ignore_eos:
            body["stop"] = self.stop
        penalty = settings.repetition_penalty
        if dialect == "vllm":
            # Control tokens stay in the text (where stop strings and the cleaner see them).
            body["skip_special_tokens"] = False
            if penalty != 1.0:
                body["repetition_penalty"] = penalty
            if stop_ids:
                body["stop_token_ids"] = stop_ids
            if settings.ignore_eos:
                body["ignore_eos"] = True
        elif dialect == "transformers":
            config: dict[str, Any] = {}  # over the model's own generation config
            if penalty != 1.0:
                config["repetition_penalty"] = penalty
            if stop_ids:
                config["eos_token_id"] = stop_ids
            if settings.ignore_eos:
                config["min_new_tokens"] = max_new_tokens
            if config:
                body["generation_config"] = json.dumps(config)
        return body

    # --- generation ------------------------------------------------------------------------

    async def generate(
        self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int
    ) -> GeneratedReply:
        """Answer ``messages`` (ending with a user message); starts the session if need be.
        Raises RemoteModelError (RemoteModelBusy when the server stayed busy)."""
        stream = self.stream(messages=messages, max_new_tokens=max_new_tokens)
        async with contextlib.aclosing(stream):
            async for _piece in stream:
                pass
        assert stream.reply is not None  # set when the pieces end without an error
        return stream.reply

    def stream(self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int) -> ReplyStream:
        """The reply piece by piece as the server streams it, cleaned like :meth:`generate`'s
        (which is the pieces joined, stripped); ``reply`` is set once they end. Raises as
        :meth:`generate` does, from the iteration."""
        return ReplyStream(lambda stream: self._pieces(stream, messages, max_new_tokens))

    async def _pieces(
        self, stream: ReplyStream, messages: Sequence[Mapping[str, str]], max_new_tokens: int
    ) -> AsyncGenerator[str, None]:
        await self.start()
        fitted = await asyncio.to_thread(self.fit, messages, max_new_tokens=max_new_tokens)
        prompt = self.prompt_text(fitted.messages)
        deadline = asyncio.get_running_loop().time() + self.timeout
        backoff = _Backoff(retries=self.retries, backoff=self.backoff)
        yielded = False
        try:
            while True:
                shown = ReplyFilter(
                    controls=self.reply_controls, stops=self.generation.stop_strings
                )
                parts: list[str] = []
                received = False  # any text at all, before cleaning
                dialect = self._dialect
                body = self.payload(
                    prompt, max_new_tokens=max_new_tokens, dialect=DIALECTS[dialect]
                )
                try:
                    async with contextlib.aclosing(self._completion(body, deadline)) as raw:
                        async for text in raw:
                            received = True
                            piece = shown.feed(text)
                            if not parts:  # the reply starts at its first visible character
                                piece = piece.lstrip()
                            if piece:
                                parts.append(piece)
                                yielded = True
                                yield piece
                    tail = shown.finish()
                    tail = tail if parts else tail.lstrip()
                    if tail:
                        parts.append(tail)
                        yielded = True
                        yield tail
                    break
                except _ExtensionsRejected as rejected:
                    self._drop_dialect(dialect, str(rejected))
                except _Retriable as failure:
                    if yielded:  # the user saw part of a reply: a second try would repeat it
                        raise RemoteModelError(
                            f"{failure.reason} (after part of the reply)"
                        ) from failure
                    await backoff.wait(failure, deadline)
        except TimeoutError as error:
            raise RemoteModelError(
                f"no complete reply from the model server at {self.url} within {self.timeout:g} s"
            ) from error
        text = "".join(parts).strip()
        if not received:
            raise RemoteModelError(f"the model server at {self.url} sent an empty completion")
        if not text and not self.generation.ignore_eos:
            raise RemoteModelError(f"the model server at {self.url} sent an empty reply")
        stream.reply = GeneratedReply(text=text, model_version=self.version, note=fitted.note)

    def _drop_dialect(self, dialect: int, detail: str) -> None:
        if self._dialect != dialect:  # a concurrent request moved on already
            return
        self._dialect = min(dialect + 1, len(DIALECTS) - 1)
        args = (self.url, DIALECTS[dialect], detail, DIALECTS[self._dialect])
        logger.info("%s rejected %s's request fields (%s); using %s's", *args)

    # --- HTTP ------------------------------------------------------------------------------

    async def _completion(
        self, body: Mapping[str, Any], deadline: float
    ) -> AsyncGenerator[str, None]:
        """The text pieces of one completions request, streamed or in one JSON body."""
        async with asyncio.timeout_at(deadline):
            response = await self._send("POST", "/completions", body)
        finished = False
        try:
            if response.content_type != "text/event-stream":  # the server chose not to stream
                async with asyncio.timeout_at(deadline):
                    text = await self._read(response, "reading the completion")
                yield _choice_text(_parse_json(text, self.url), self.url)
            else:
                while True:
                    async with asyncio.timeout_at(deadline):
                        with self._network("reading the streamed completion"):
                            line = await response.content.readline()
                    if not line:  # the end (transformers serve sends no [DONE])
                        break
                    piece = _event_text(line, self.url)
                    if piece is None:
                        break
                    if piece:
                        yield piece
            finished = True
        finally:
            if finished:
                response.release()
            else:  # a half-read answer: the connection cannot be reused
                response.close()

    async def _json(self, method: str, path: str, body: Mapping[str, Any] | None) -> Any:
        """One JSON answer, with the retries and the timeout of a request."""
        deadline = asyncio.get_running_loop().time() + self.timeout
        backoff = _Backoff(retries=self.retries, backoff=self.backoff)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        response = await self._send(method, path, body)
                        try:
                            text = await self._read(response, f"reading the answer to {path}")
                        finally:
                            response.release()
                    return _parse_json(text, self.url)
                except _Retriable as failure:
                    await backoff.wait(failure, deadline)
        except TimeoutError as error:
            raise RemoteModelError(
                f"no answer from the model server at {self.url} within {self.timeout:g} s"
            ) from error

    async def _send(
        self, method: str, path: str, body: Mapping[str, Any] | None
    ) -> aiohttp.ClientResponse:
        """One request; a 200 answer (its body unread), or raises for any other."""
        if self._session is None:
            raise RemoteModelError(f"the connection to the model server at {self.url} is closed")
        with self._network(f"waiting for an answer to {method} {path}"):
            response = await self._session.request(method, self.url + path, json=body)
        if response.status == 200:
            return response
        try:
            text = await self._read(response, "reading an error")
        except (_Retriable, RemoteModelError):
            text = ""
        finally:
            response.release()
        status = response.status
        excerpt = " ".join(text.split())[:_BODY_EXCERPT]
        said = f"the model server at {self.url} answered {status} {response.reason or ''}".strip()
        said += f": {excerpt}" if excerpt else ""
        sent = [
            name for names in _EXTENSION_FIELDS.values() for name in names if name in (body or {})
        ]
        if status in (400, 422) and any(name in text for name in sent):
            raise _ExtensionsRejected(excerpt)
        if status == 429 or status >= 500:
            retry_after = _retry_after(response.headers.get("Retry-After"))
            raise _Retriable(said, retry_after=retry_after, busy=status == 429)
        raise RemoteModelError(said, status=status)

    async def _read(self, response: aiohttp.ClientResponse, what: str) -> str:
        with self._network(what):
            data = await response.read()
        return data.decode("utf-8", errors="replace")

    @contextlib.contextmanager
    def _network(self, what: str) -> Iterator[None]:
        """Network failures as RemoteModelError (a stall) or _Retriable (a connection)."""
        try:
            yield
        except aiohttp.SocketTimeoutError as error:  # before its bases, ClientConnectionError
            stall = f"nothing for {self._timeouts.sock_read:g} s while {what}"
            raise RemoteModelError(f"the model server at {self.url} stalled: {stall}") from error
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as error:
            cause = str(error) or type(error).__name__
            raise _Retriable(f"no connection to {self.url} while {what}: {cause}") from error
        except aiohttp.ClientError as error:
            raise RemoteModelError(f"request to {self.url} failed while {what}: {error}") from error


class _Backoff:
    """The waits between the attempts of one request."""

    def __init__(self, *, retries: int, backoff: float) -> None:
        self.retries = retries
        self.backoff = backoff
        self.attempts = 1

    async def wait(self, failure: _Retriable, deadline: float) -> None:
        """Sleep before the next attempt; raise RemoteModelError when none is left."""
        tried = f"{self.attempts} attempt{'s' if self.attempts > 1 else ''}"
        error = RemoteModelBusy if failure.busy else RemoteModelError
        if self.attempts > self.retries:
            raise error(f"{failure.reason} ({tried})") from failure
        # Jittered, so that many bots behind one balancer do not come back all at once.
        delay = self.backoff * 2 ** (self.attempts - 1) * random.uniform(0.75, 1.25)
        if (wait := failure.retry_after) is not None:
            if wait > MAX_RETRY_AFTER:
                raise error(f"{failure.reason} (it asks to retry in {wait:g} s)") from failure
            delay = max(delay, wait)
        if asyncio.get_running_loop().time() + delay >= deadline:
            raise error(f"{failure.reason} ({tried}; no time left for another)") from failure
        logger.warning("%s; retrying in %.2f s", failure.reason, delay)
        self.attempts += 1
        await asyncio.sleep(delay)


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` (as a server runs it on a prompt string) puts a bos first."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return False
    ids: list[int] = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos_id


def _retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (it is a number or an HTTP date); None if absent."""
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _parse_json(text: str, url: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        excerpt = " ".join(text.split())[:_BODY_EXCERPT]
        raise RemoteModelError(
            f"the model server at {url} answered with something that is not JSON: {excerpt!r}"
        ) from error


def _event_text(line: bytes, url: str) -> str | None:
    """The completion text in one server-sent-event line ("" for none); None at ``[DONE]``."""
    text = line.decode("utf-8", errors="replace").strip()
    if not text.startswith("data:"):  # a blank line between events, a comment, an event name
        return ""
    data = text[len("data:") :].strip()
    if data == "[DONE]":
        return None
    return _choice_text(_parse_json(data, url), url)


def _choice_text(chunk: Any, url: str) -> str:
    """The text of a completion (or a streamed chunk of one); raises for an error event."""
    if isinstance(chunk, dict) and "error" in chunk:
        error = chunk["error"]
        message = error.get("message", error) if isinstance(error, dict) else error
        raise RemoteModelError(f"the model server at {url} failed to generate: {message}")
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    if choices == []:  # a usage-only chunk
        return ""
    if isinstance(choices, list) and isinstance(choices[0], dict):
        text = choices[0].get("text") or ""
        if isinstance(text, str):
            return text
    excerpt = json.dumps(chunk)[:_BODY_EXCERPT]
    raise RemoteModelError(f"the model server at {url} sent no completion text: {excerpt}")
