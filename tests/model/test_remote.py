"""The remote backend against real servers on loopback: a fault-injecting fake OpenAI-compatible
server (tests/fakes/completions_server.py) for every fault, and ``transformers serve`` running
the tiny model for the real thing."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.contracts import GeneratedReply, ModelBusy, ReplyStream, StreamingReplyGenerator
from model.context_fit import MARKER
from model.corpus import SEED_EXCHANGES
from model.generation import GenerationSettings
from model.prompt import format_prompt
from model.remote import ByteEstimate, RemoteModel, RemoteModelBusy, RemoteModelError
from tests.fakes.completions_server import (
    OPENAI_COMPLETION_FIELDS,
    CompletionsServer,
    Disconnect,
    Fail,
    Garbage,
    Respond,
    Stall,
    StreamError,
)

QUESTION = [{"role": "user", "content": "How do I reset my password?"}]


@pytest.fixture
async def server() -> AsyncIterator[CompletionsServer]:
    async with CompletionsServer() as fake:
        yield fake


def remote_model(url: str, **options: Any) -> RemoteModel:
    """A backend with fast retries and short timeouts, so the fault tests take little time."""
    defaults: dict[str, Any] = {"backoff": 0.01, "stall_timeout": 0.5, "timeout": 10.0}
    return RemoteModel(url=url, **{**defaults, **options})


@pytest.fixture
async def model(server: CompletionsServer) -> AsyncIterator[RemoteModel]:
    backend = remote_model(server.url)
    await backend.start()
    yield backend
    await backend.close()


async def collect(stream: ReplyStream) -> list[str]:
    return [piece async for piece in stream]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- requests and replies ---------------------------------------------------------------------


async def test_streams_the_reply_from_the_one_formatters_prompt(
    server: CompletionsServer, model: RemoteModel
) -> None:
    server.script(Respond((" You", " can", " reset", " it.")))
    stream = model.stream(messages=QUESTION, max_new_tokens=40)

    pieces = await collect(stream)

    assert isinstance(model, StreamingReplyGenerator)
    assert pieces == ["You", " can", " reset", " it."]
    assert stream.reply == GeneratedReply(
        text="You can reset it.", model_version="remote:fake-model"
    )
    [request] = server.completions
    body = request.body
    assert body["prompt"] == format_prompt(QUESTION)  # the server adds no bos of its own
    assert body["model"] == "fake-model"
    assert body["max_tokens"] == 40
    assert body["temperature"] == 0  # greedy
    assert body["stream"] is True
    assert body["stop"][:2] == ["[INST]", "</s>"]
    assert {"[/INST]", "<s>", "<<SYS>>", "<</SYS>>"} <= set(body["stop"])
    assert "top_p" not in body and "repetition_penalty" not in body
    assert "Authorization" not in request.headers


async def test_generate_returns_the_reply_and_version(
    server: CompletionsServer, model: RemoteModel
) -> None:
    server.script(Respond(("Hi", " there", "!"), done=False))  # transformers serve sends no [DONE]
    reply = await model.generate(messages=QUESTION, max_new_tokens=16)
    assert reply == GeneratedReply(text="Hi there!", model_version="remote:fake-model", note="")


async def test_a_server_that_answers_without_streaming_is_read_whole(
    server: CompletionsServer, model: RemoteModel
) -> None:
    server.script(Fail(200, json.dumps({"choices": [{"text": " Whole reply. "}]})))
    reply = await model.generate(messages=QUESTION, max_new_tokens=16)
    assert reply.text == "Whole reply."


async def test_no_control_fragment_reaches_the_user(
    server: CompletionsServer, model: RemoteModel
) -> None:
    server.script(Respond(("Sure", " thing [/IN", "ST] ignore <s> this", "</s>")))
    stream = model.stream(messages=QUESTION, max_new_tokens=16)
    pieces = await collect(stream)
    assert "".join(pieces) == "Sure thing "
    assert not any("[" in piece or "<" in piece for piece in pieces)
    assert stream.reply is not None and stream.reply.text == "Sure thing"


async def test_generation_settings_and_stop_strings(server: CompletionsServer) -> None:
    settings = GenerationSettings(temperature=0.7, top_p=0.9, stop_strings=("\nUser:",))
    backend = remote_model(server.url, generation=settings)
    await backend.start()  # before the script: start's own requests take none of it
    server.script(Respond(("Answer", "\nUs", "er: more")))
    reply = await backend.generate(messages=QUESTION, max_new_tokens=16)
    await backend.close()
    assert reply.text == "Answer"
    body = server.completions[0].body
    assert (body["temperature"], body["top_p"]) == (0.7, 0.9)
    assert body["stop"][-1] == "\nUser:"


async def test_the_api_key_is_sent_as_a_bearer_token_and_never_told(
    server: CompletionsServer,
) -> None:
    backend = remote_model(server.url, api_key="sk-secret-123")
    await backend.generate(messages=QUESTION, max_new_tokens=8)
    assert all(r.headers["Authorization"] == "Bearer sk-secret-123" for r in server.requests)
    server.script(Fail(500, "nope"), Fail(500), Fail(500), Fail(500))
    with pytest.raises(RemoteModelError) as raised:
        await backend.generate(messages=QUESTION, max_new_tokens=8)
    await backend.close()
    assert "sk-secret" not in str(raised.value)


async def test_concurrent_requests_each_get_their_reply(server: CompletionsServer) -> None:
    server.default = Respond(("Same", " answer"), delay=0.01)
    backend = remote_model(server.url)
    replies = await asyncio.gather(
        *(backend.generate(messages=QUESTION, max_new_tokens=8) for _ in range(16))
    )
    await backend.close()
    assert [reply.text for reply in replies] == ["Same answer"] * 16


# --- faults: each a RemoteModelError, quickly -------------------------------------------------


async def test_connection_refused() -> None:
    backend = remote_model(f"http://127.0.0.1:{free_port()}/v1", retries=2)
    started = time.monotonic()
    with pytest.raises(RemoteModelError, match=r"127\.0\.0\.1"):
        await backend.generate(messages=QUESTION, max_new_tokens=8)
    with pytest.raises(RemoteModelError, match="no connection"):
        await backend.start()
    await backend.close()
    assert time.monotonic() - started < 3


async def test_a_server_that_stalls_before_answering(
    server: CompletionsServer, model: RemoteModel
) -> None:
    server.script(Stall())
    started = time.monotonic()
    with pytest.raises(RemoteModelError, match="stalled"):
        await model.generate(messages=QUESTION, max_new_tokens=8)
    assert time.monotonic() - started < 2
    assert len(server.completions) == 1  # a stall is not retried: the server is overloaded


async def test_a_stall_mid_stream_ends_the_stream_with_an_error(
    server: CompletionsServer, model: RemoteModel
) -> None:
    server.script(Respond(("First", " part", " never"), stall_after=2))
    stream = model.stream(messages=QUESTION, max_new_tokens=8)
    pieces: list[str] = []
    with pytest.raises(RemoteModelError, match="stalled"):
        async for piece in stream:
            pieces.append(piece)
    assert pieces == ["First", " part"]
    assert stream.reply is None


async def test_the_whole_request_has_a_timeout(server: CompletionsServer) -> None:
    backend = remote_model(server.url, timeout=0.5, stall_timeout=5)
    await backend.start()
    server.script(Respond(tuple(f" w{i}" for i in range(100)), delay=0.05))
    started = time.monotonic()
    with pytest.raises(RemoteModelError, match=r"within 0\.5 s"):
        await backend.generate(messages=QUESTION, max_new_tokens=100)
    await backend.close()
    assert time.monotonic() - started < 1.5


async def test_a_500_is_retried_then_reported(
    server: CompletionsServer, model: RemoteModel
) -> None:
    server.script(*[Fail(500, '{"error": "boom"}')] * 4)
    with pytest.raises(RemoteModelError, match=r"answered 500.*boom.*4 attempts"):
        await model.generate(messages=QUESTION, max_new_tokens=8)
    assert len(server.completions) == 4  # the first try and 3 retries


async def test_a_body_that_is_not_json(server: CompletionsServer, model: RemoteModel) -> None:
    server.script(Fail(200, "<html>Bad Gateway</html>"))  # 200, application/json, not JSON
    with pytest.raises(RemoteModelError, match="not JSON"):
        await model.generate(messages=QUESTION, max_new_tokens=8)
    server.script(Garbage())  # a streamed event that is not JSON
    with pytest.raises(RemoteModelError, match="not JSON"):
        await model.generate(messages=QUESTION, max_new_tokens=8)


@pytest.mark.parametrize("pieces", [(), ("",), ("   ",), ("</s>",), ("[INST] a turn",)])
async def test_an_empty_completion(
    server: CompletionsServer, model: RemoteModel, pieces: tuple[str, ...]
) -> None:
    server.script(Respond(pieces))
    with pytest.raises(RemoteModelError, match="empty"):
        await model.generate(messages=QUESTION, max_new_tokens=8)


async def test_an_error_event_in_the_stream(server: CompletionsServer, model: RemoteModel) -> None:
    server.script(StreamError("CUDA out of memory"))
    with pytest.raises(RemoteModelError, match="CUDA out of memory"):
        await model.generate(messages=QUESTION, max_new_tokens=8)


async def test_another_status_is_not_retried(server: CompletionsServer, model: RemoteModel) -> None:
    server.script(Fail(400, '{"error": "prompt too long"}'))
    with pytest.raises(RemoteModelError, match=r"400.*prompt too long") as raised:
        await model.generate(messages=QUESTION, max_new_tokens=8)
    assert raised.value.status == 400
    assert len(server.completions) == 1


# --- retries ----------------------------------------------------------------------------------


async def test_a_503_is_retried_with_backoff(server: CompletionsServer) -> None:
    backend = remote_model(server.url, backoff=0.2)
    await backend.start()
    server.script(Fail(503))
    reply = await backend.generate(messages=QUESTION, max_new_tokens=8)
    await backend.close()
    assert reply.text == "Hello there!"
    first, second = server.completions
    assert second.at - first.at >= 0.2 * 0.75  # the backoff, less its jitter


async def test_a_429_honours_a_small_retry_after(server: CompletionsServer) -> None:
    backend = remote_model(server.url, backoff=0.01)
    await backend.start()
    server.script(Fail(429, headers={"Retry-After": "0.3"}))
    reply = await backend.generate(messages=QUESTION, max_new_tokens=8)
    await backend.close()
    assert reply.text == "Hello there!"
    first, second = server.completions
    assert second.at - first.at >= 0.3


async def test_a_server_that_stays_busy_is_model_busy(
    server: CompletionsServer, model: RemoteModel
) -> None:
    server.script(*[Fail(429)] * 4)
    with pytest.raises(RemoteModelBusy) as raised:
        await model.generate(messages=QUESTION, max_new_tokens=8)
    assert isinstance(raised.value, ModelBusy)  # "busy, try again shortly"
    server.script(Fail(503, headers={"Retry-After": "120"}))  # too long to wait: at once
    started = time.monotonic()
    with pytest.raises(RemoteModelError, match="retry in 120 s"):
        await model.generate(messages=QUESTION, max_new_tokens=8)
    assert time.monotonic() - started < 1
    assert len(server.completions) == 5


async def test_a_dropped_connection_is_retried_before_the_reply_starts(
    server: CompletionsServer, model: RemoteModel
) -> None:
    server.script(Disconnect(), Respond(("Hello",), disconnect_after=0))
    reply = await model.generate(messages=QUESTION, max_new_tokens=8)
    assert reply.text == "Hello there!"
    assert len(server.completions) == 3


async def test_never_retried_once_part_of_the_reply_was_yielded(
    server: CompletionsServer, model: RemoteModel
) -> None:
    server.script(Respond(("Half", " a reply", " lost"), disconnect_after=2))
    stream = model.stream(messages=QUESTION, max_new_tokens=8)
    pieces: list[str] = []
    with pytest.raises(RemoteModelError, match="after part of the reply"):
        async for piece in stream:
            pieces.append(piece)
    assert pieces == ["Half", " a reply"]
    assert len(server.completions) == 1


# --- the server's own request fields ----------------------------------------------------------


async def test_vllm_extensions_then_transformers_serve_then_none() -> None:
    settings = GenerationSettings(repetition_penalty=1.2)
    async with CompletionsServer(known_fields=OPENAI_COMPLETION_FIELDS) as server:
        backend = remote_model(server.url, generation=settings)
        assert (await backend.generate(messages=QUESTION, max_new_tokens=8)).text
        assert (await backend.generate(messages=QUESTION, max_new_tokens=8)).text
        await backend.close()
    vllm, transformers, plain, again = (r.body for r in server.completions)
    assert vllm["repetition_penalty"] == 1.2 and vllm["skip_special_tokens"] is False
    assert json.loads(transformers["generation_config"]) == {"repetition_penalty": 1.2}
    assert set(plain) <= OPENAI_COMPLETION_FIELDS and plain == again  # remembered

    fields = OPENAI_COMPLETION_FIELDS | {"generation_config"}
    async with CompletionsServer(known_fields=fields) as server:
        backend = remote_model(server.url, generation=settings)
        await backend.generate(messages=QUESTION, max_new_tokens=8)
        await backend.close()
    assert [set(r.body) - OPENAI_COMPLETION_FIELDS for r in server.completions] == [
        {"skip_special_tokens", "repetition_penalty"},
        {"generation_config"},
    ]


async def test_ignore_eos_asks_for_exactly_the_token_limit(server: CompletionsServer) -> None:
    backend = remote_model(server.url, generation=GenerationSettings(ignore_eos=True))
    await backend.start()
    server.script(Respond(("</s>",)))  # cleaned away, but no fault: a fixed-length benchmark
    reply = await backend.generate(messages=QUESTION, max_new_tokens=32)
    await backend.close()
    assert reply.text == ""
    body = server.completions[0].body
    assert body["ignore_eos"] is True and "stop" not in body


# --- start: the served model, the bos -------------------------------------------------------


async def test_start_checks_the_served_model(server: CompletionsServer) -> None:
    named = remote_model(server.url, model_name="fake-model")
    await named.start()
    assert named.version == "remote:fake-model"
    await named.close()
    wrong = remote_model(server.url, model_name="llama-70b")
    with pytest.raises(RemoteModelError, match=r"does not serve 'llama-70b'.*'fake-model'"):
        await wrong.start()
    await wrong.close()


async def test_a_server_without_a_model_list_needs_model_name() -> None:
    async with CompletionsServer(models_status=404) as server:
        named = remote_model(server.url, model_name="mine")
        assert (await named.generate(messages=QUESTION, max_new_tokens=8)).model_version == (
            "remote:mine"
        )
        await named.close()
        unnamed = remote_model(server.url)
        with pytest.raises(RemoteModelError, match="404"):
            await unnamed.start()
        await unnamed.close()


@pytest.mark.parametrize("adds_bos", [False, True])
async def test_the_prompt_has_one_bos_whether_or_not_the_server_adds_one(adds_bos: bool) -> None:
    async with CompletionsServer(adds_bos=adds_bos) as server:
        backend = remote_model(server.url)
        await backend.generate(messages=QUESTION, max_new_tokens=8)
        await backend.close()
    assert backend.server_adds_bos is adds_bos
    prompt = server.completions[0].body["prompt"]
    assert prompt == format_prompt(QUESTION).removeprefix("<s>" if adds_bos else "")


def test_a_bad_url_is_refused() -> None:
    with pytest.raises(ValueError, match="http"):
        RemoteModel(url="gpu-host:8000/v1")


# --- history fit --------------------------------------------------------------------------------


def long_history(pairs: int, words: int = 30) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are the support bot."}]
    for index in range(pairs):
        messages.append({"role": "user", "content": f"question {index} " + "word " * words})
        messages.append({"role": "assistant", "content": f"answer {index} " + "word " * words})
    messages.append({"role": "user", "content": "And the newest question?"})
    return messages


async def test_a_history_far_longer_than_the_window_is_fitted_by_estimate(
    server: CompletionsServer, model: RemoteModel
) -> None:
    model.context_window = 512
    messages = long_history(pairs=200)  # ~100 times the window
    reply = await model.generate(messages=messages, max_new_tokens=64)
    prompt = server.completions[0].body["prompt"]
    assert len(prompt.encode()) <= 512 - 64  # the estimate: a token a byte
    assert prompt.startswith(format_prompt(messages[:1] + messages[-1:])[:40])  # system kept
    assert prompt.endswith("[INST] And the newest question? [/INST]")
    assert "question 199 " in prompt and "question 0 " not in prompt  # newest turns kept
    assert "left out" in reply.note


async def test_a_newest_message_too_long_is_cut_from_the_middle(
    server: CompletionsServer, model: RemoteModel
) -> None:
    model.context_window = 256
    text = "Beginning here. " + "filler " * 2000 + "So what is the question?"
    reply = await model.generate(messages=[{"role": "user", "content": text}], max_new_tokens=32)
    prompt = server.completions[0].body["prompt"]
    assert MARKER in prompt
    assert "Beginning here." in prompt and "what is the question? [/INST]" in prompt
    assert reply.note


def test_the_byte_estimate_counts_high_and_decodes_back(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    estimate = ByteEstimate()
    for text in ["How do I reset my password?", "Grüße aus Köln — ça va?", "日本語のテキスト 🎉"]:
        ids = estimate.encode_text(text)
        assert estimate.decode(ids) == text
        assert len(ids) >= len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert estimate.decode(estimate.encode_text("é")[:1]) == ""  # half a character: left out


async def test_with_the_tokenizer_it_fits_by_token_count(
    server: CompletionsServer, tiny_model_dir: Path
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    backend = remote_model(server.url, tokenizer=tokenizer, context_window=256)
    messages = long_history(pairs=100)
    reply = await backend.generate(messages=messages, max_new_tokens=32)
    await backend.close()
    body = server.completions[0].body
    assert len(tokenizer(body["prompt"])["input_ids"]) <= 256 - 32
    assert reply.note
    assert backend.server_adds_bos is False  # from the tokenizer: no probe
    assert not [r for r in server.requests if r.path == "/v1/completions" and not r.body["stream"]]
    controls = {tokenizer.convert_tokens_to_ids(token) for token in ["</s>", "[INST]", "[/INST]"]}
    assert controls <= set(body["stop_token_ids"])


# --- a real server: transformers serve with the tiny model -------------------------------------


@pytest.fixture(scope="module")
def served_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``transformers serve`` with the tiny model on a free loopback port; its API base URL.

    Skips (printing why, with the server's last output) only when the server cannot start.
    """
    executable = Path(sys.executable).parent / "transformers"
    if not executable.exists():
        pytest.skip(f"transformers serve cannot start: no {executable}")
    port = free_port()
    log = tmp_path_factory.mktemp("transformers-serve") / "server.log"
    command = [str(executable), "serve", str(tiny_model_dir), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                state = (
                    f"exited with {process.returncode}"
                    if process.poll() is not None
                    else ("not healthy after 60 s")
                )
                pytest.skip(f"transformers serve cannot start ({state}):\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def local_replies(tiny_model_dir: Path) -> dict[str, str]:
    """The local model's greedy replies to the seed questions: plain ``model.generate``."""
    from model.local_model import LocalModel

    local = LocalModel.load(tiny_model_dir)
    return {
        question: local.generate_sync(
            messages=[{"role": "user", "content": question}], max_new_tokens=48
        )
        for question, _answer in SEED_EXCHANGES
    }


@pytest.mark.parametrize("with_tokenizer", [False, True])
async def test_transformers_serve_streams_the_local_models_replies(
    served_model: str, tiny_model_dir: Path, local_replies: dict[str, str], with_tokenizer: bool
) -> None:
    tokenizer = None
    if with_tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    backend = RemoteModel(url=served_model, tokenizer=tokenizer, stall_timeout=30, timeout=60)
    await backend.start()
    assert backend.version == f"remote:{tiny_model_dir}"
    assert backend.server_adds_bos is False
    try:
        for question, answer in SEED_EXCHANGES:
            messages = [{"role": "user", "content": question}]
            stream = backend.stream(messages=messages, max_new_tokens=48)
            pieces = await collect(stream)
            assert len(pieces) > 3  # streamed, not in one piece
            assert stream.reply is not None
            assert stream.reply.text == "".join(pieces).strip() == local_replies[question]
            assert stream.reply.text == answer
            reply = await backend.generate(messages=messages, max_new_tokens=48)
            assert reply.text == answer
    finally:
        await backend.close()


async def test_transformers_serve_with_concurrent_requests_and_a_repetition_penalty(
    served_model: str,
) -> None:
    settings = GenerationSettings(repetition_penalty=1.0001)  # via its generation_config
    backend = RemoteModel(url=served_model, generation=settings, stall_timeout=30, timeout=60)
    questions = [question for question, _answer in SEED_EXCHANGES] * 2
    try:
        replies = await asyncio.gather(
            *(
                backend.generate(messages=[{"role": "user", "content": q}], max_new_tokens=48)
                for q in questions
            )
        )
    finally:
        await backend.close()
    answers = dict(SEED_EXCHANGES)
    assert [reply.text for reply in replies] == [answers[q] for q in questions]
