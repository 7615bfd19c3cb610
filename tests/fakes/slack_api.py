"""A fake Slack: the Web API and a Socket Mode websocket server, on loopback.

The real ``slack_sdk`` client talks to :class:`FakeSlackWebApi` through ``SLACK_API_URL``; it
records every call and answers the way Slack does. It can be told to answer a method with 429
(``Retry-After``) or with an error a number of times. ``apps.connections.open`` returns the URL
of a :class:`FakeSocketModeServer`, which says ``hello``, sends envelopes and records the acks.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from tests.fakes.holds import Hold
from tests.fakes.loopback import serve_on_loopback

BOT_USER_ID = "UBOT"
BOT_ID = "BBOT"
TEAM_ID = "T0TEAM"
BOT_NAME = "chatbot"


@dataclass(frozen=True)
class ApiCall:
    """One request the fake received: the Web API method and its parameters."""

    method: str
    params: dict[str, Any]
    status: int  # the HTTP status the fake answered with


@dataclass
class _Failure:
    times: int
    status: int
    error: str
    retry_after: str | None
    when: Callable[[dict[str, Any]], bool] | None = None


@dataclass
class HeldCall(Hold):
    """A Web API call the fake holds until :meth:`release` (see :meth:`FakeSlackWebApi.hold`)."""

    method: str = ""
    when: Callable[[dict[str, Any]], bool] = lambda _params: True
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class FakeSlackWebApi:
    """Slack's Web API on ``http://127.0.0.1:<ephemeral>/api/``."""

    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    socket_url: str = ""
    calls: list[ApiCall] = field(default_factory=list)
    #: Thread messages ``conversations.replies`` returns, oldest first, by thread ts.
    threads: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: Each posted message by ts, with the text it shows now (after edits).
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        #: Each client connection (its peer address) that sent the Web API a request.
        self.connections: set[tuple[str, int]] = set()
        self._failures: dict[str, _Failure] = {}
        self._failures_when: list[tuple[str, _Failure]] = []
        self._holds: list[HeldCall] = []
        self._ts = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.port = 0
        #: Uploaded file contents by file id (files_upload_v2's second step).
        self.uploads: dict[str, bytes] = {}
        #: Each completed upload: its file ids, channel, thread and comment.
        self.shared_files: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    @property
    def response_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/respond/{uuid.uuid4().hex}"

    async def start(self) -> None:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_post("/api/{method}", self._api)
        app.router.add_get("/api/{method}", self._api)  # users.info and a few others are GETs
        app.router.add_post("/respond/{token}", self._respond)
        app.router.add_post("/upload/{file_id}", self._upload)
        self._runner, self.port = await serve_on_loopback(app)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ----------------------------------------------------------------- scripting

    def fail(
        self,
        method: str,
        *,
        times: int,
        status: int = 200,
        error: str = "internal_error",
        retry_after: str | None = None,
        when: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        """Answer the next ``times`` calls of ``method`` with an error (429 with Retry-After);
        with ``when``, only the next ``times`` calls whose parameters satisfy it (each such
        failure counts on its own, next to the others)."""
        failure = _Failure(times, status, error, retry_after, when)
        if when is None:
            self._failures[method] = failure
        else:
            self._failures_when.append((method, failure))

    def rate_limit(self, method: str, *, times: int, retry_after: str = "0") -> None:
        self.fail(method, times=times, status=429, error="ratelimited", retry_after=retry_after)

    def hold(
        self,
        method: str,
        *,
        when: Callable[[dict[str, Any]], bool] = lambda _params: True,
        apply_first: bool = False,
        answer_on_release: bool = False,
    ) -> HeldCall:
        """Hold the next call of ``method`` whose parameters satisfy ``when``, until the
        test calls ``release()``. By default the call is never applied (as if it never
        reached Slack) and is answered with an error when released; with ``apply_first`` it
        is applied at once and only the answer is held (it reached Slack, the client never
        heard back); with ``answer_on_release`` it is applied and answered when released (a
        slow call). ``arrived`` is set when the call comes in."""
        held = HeldCall(
            method=method,
            when=when,
            apply_first=apply_first,
            answer_on_release=answer_on_release,
        )
        self._holds.append(held)
        return held

    def release_all(self) -> None:
        for held in self._holds:
            held.release()

    # ----------------------------------------------------------------- inspection

    def calls_of(self, method: str, *, ok_only: bool = True) -> list[ApiCall]:
        return [
            call
            for call in self.calls
            if call.method == method and (call.status == 200 or not ok_only)
        ]

    def ephemerals(self) -> list[dict[str, Any]]:
        """The parameters of every ``chat.postEphemeral`` that went through (channel, user,
        thread_ts, text), oldest first."""
        return [call.params for call in self.calls_of("chat.postEphemeral")]

    def posted(self) -> list[dict[str, Any]]:
        """Every message posted, oldest first: ts, channel, thread_ts (when threaded), the
        ``text`` it shows now (after edits) and the ``posted_text`` it was posted with."""
        return list(self.messages.values())

    async def wait_for(
        self, condition: Callable[[], bool], *, within: float = 20.0, what: str = "condition"
    ) -> None:
        """Poll ``condition`` until it holds; fail the test after ``within`` seconds."""
        deadline = time.monotonic() + within
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; calls: {self.calls}")
            await asyncio.sleep(0.02)

    # ----------------------------------------------------------------- handlers

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            self.connections.add((str(peer[0]), int(peer[1])))
        params = await _params(request)
        held = next(
            (
                h
                for h in self._holds
                if h.method == method and not h.arrived.is_set() and h.when(params)
            ),
            None,
        )
        if held is not None:
            held.params = params

            async def apply() -> web.Response:
                self.calls.append(ApiCall(method, params, 200))
                return web.json_response(self._answer(method, params))

            def refuse() -> web.Response:
                self.calls.append(ApiCall(method, params, 503))
                return web.json_response({"ok": False, "error": "held"}, status=503)

            return await held.serve(apply=apply, refuse=refuse)
        failure = next(
            (
                f
                for m, f in self._failures_when
                if m == method and f.times > 0 and f.when is not None and f.when(params)
            ),
            self._failures.get(method),
        )
        if failure is not None and failure.times > 0:
            failure.times -= 1
            self.calls.append(ApiCall(method, params, failure.status))
            headers = {"Retry-After": failure.retry_after} if failure.retry_after else None
            return web.json_response(
                {"ok": False, "error": failure.error}, status=failure.status, headers=headers
            )
        self.calls.append(ApiCall(method, params, 200))
        return web.json_response(self._answer(method, params))

    async def _upload(self, request: web.Request) -> web.Response:
        self.uploads[request.match_info["file_id"]] = await request.read()
        return web.Response(text="OK - uploaded")

    async def _respond(self, request: web.Request) -> web.Response:
        self.calls.append(ApiCall("response_url", await _params(request), 200))
        return web.Response(text="ok")

    def _posted_in(self, channel: str, *, thread_ts: str | None) -> list[dict[str, Any]]:
        """The bot's messages in ``channel`` as Slack lists them (in the thread ``thread_ts``,
        or outside threads)."""
        return [
            {"ts": m["ts"], "text": m["text"], "user": m["user"], "thread_ts": m.get("thread_ts")}
            for m in self.messages.values()
            if m["channel"] == channel and m.get("thread_ts") == thread_ts
        ]

    def _answer(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if method == "auth.test":
            return {
                "ok": True,
                "url": "https://test.slack.com/",
                "team": "Test",
                "user": BOT_NAME,
                "team_id": TEAM_ID,
                "user_id": BOT_USER_ID,
                "bot_id": BOT_ID,
            }
        if method == "users.info":
            user_id = str(params.get("user"))
            user = self.users.get(user_id)
            if user is None:
                user = {"id": user_id, "name": f"user-{user_id.lower()}"}
                user["profile"] = {"display_name": f"Person {user_id}", "real_name": ""}
            return {"ok": True, "user": user}
        if method == "chat.postMessage":
            ts = f"{1_800_000_000 + next(self._ts)}.000100"
            message = {"ts": ts, "text": params.get("text", ""), "user": BOT_USER_ID}
            if params.get("thread_ts"):
                message["thread_ts"] = params["thread_ts"]
            self.messages[ts] = {
                **message,
                "channel": params.get("channel"),
                "posted_text": message["text"],
            }
            return {"ok": True, "channel": params.get("channel"), "ts": ts, "message": message}
        if method == "chat.update":
            ts = str(params.get("ts"))
            if ts not in self.messages:
                return {"ok": False, "error": "message_not_found"}
            self.messages[ts]["text"] = params.get("text", "")
            return {"ok": True, "channel": params.get("channel"), "ts": ts, "text": params["text"]}
        if method == "chat.postEphemeral":
            return {"ok": True, "message_ts": f"{1_800_000_000 + next(self._ts)}.000200"}
        if method == "conversations.replies":
            thread_ts = str(params.get("ts"))
            posted = self._posted_in(str(params.get("channel")), thread_ts=thread_ts)
            thread = self.threads.get(thread_ts)
            if thread is None and not posted:
                return {"ok": False, "error": "thread_not_found"}
            # What the test put in the thread, and what the bot posted there since.
            thread = sorted([*(thread or []), *posted], key=lambda m: _ts_key(m["ts"]))
            # Pages of ``limit`` messages, oldest first; the cursor is the next page's offset.
            limit = int(params.get("limit") or 1000)
            start = int(params.get("cursor") or 0)
            page = thread[start : start + limit]
            has_more = start + limit < len(thread)
            return {
                "ok": True,
                "messages": page,
                "has_more": has_more,
                "response_metadata": {"next_cursor": str(start + limit) if has_more else ""},
            }
        if method == "conversations.history":
            # The bot's messages outside threads (a DM's replies), newest first.
            oldest = _ts_key(params.get("oldest") or "0")
            newest_first = sorted(
                (
                    m
                    for m in self._posted_in(str(params.get("channel")), thread_ts=None)
                    if _ts_key(m["ts"]) > oldest
                ),
                key=lambda m: _ts_key(m["ts"]),
                reverse=True,
            )
            limit = int(params.get("limit") or 100)
            return {"ok": True, "messages": newest_first[:limit], "has_more": False}
        if method == "files.getUploadURLExternal":
            file_id = f"F{next(self._ts):06d}"
            upload_url = f"http://127.0.0.1:{self.port}/upload/{file_id}"
            return {"ok": True, "upload_url": upload_url, "file_id": file_id}
        if method == "files.completeUploadExternal":
            files = params.get("files")
            listed = json.loads(files) if isinstance(files, str) else list(files or [])
            if any(entry.get("id") not in self.uploads for entry in listed):
                return {"ok": False, "error": "file_not_uploaded"}
            self.shared_files.append(
                {
                    "files": [entry["id"] for entry in listed],
                    "channel": params.get("channel_id"),
                    "thread_ts": params.get("thread_ts"),
                    "initial_comment": params.get("initial_comment"),
                }
            )
            return {"ok": True, "files": [{"id": entry["id"]} for entry in listed]}
        if method == "apps.connections.open":
            return {"ok": True, "url": self.socket_url}
        return {"ok": False, "error": "unknown_method"}


def _ts_key(ts: object) -> tuple[int, ...]:
    return tuple(int(part) for part in str(ts).split("."))


async def _params(request: web.Request) -> dict[str, Any]:
    """The call's arguments: the query string (slack_sdk sends some methods' arguments there,
    files.completeUploadExternal's for one, as Slack accepts) and the body."""
    query = dict(request.query)
    if request.method == "GET":
        return query
    if request.content_type == "application/json":
        body = await request.json()
        return {**query, **(dict(body) if isinstance(body, dict) else {"body": body})}
    return {**query, **dict(await request.post())}


# --------------------------------------------------------------------------- Socket Mode


@dataclass
class FakeSocketModeServer:
    """Slack's Socket Mode websocket on ``ws://127.0.0.1:<ephemeral>/link``."""

    acks: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._socket: web.WebSocketResponse | None = None
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/link"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/link", self._link)
        self._runner, self.port = await serve_on_loopback(app)

    async def close(self) -> None:
        if self._socket is not None:
            await self._socket.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_connected(self, *, within: float = 10.0) -> None:
        await asyncio.wait_for(self._connected.wait(), within)

    async def wait_disconnected(self, *, within: float = 10.0) -> None:
        """Wait until the connected client has closed the websocket."""
        await asyncio.wait_for(self._disconnected.wait(), within)

    async def send(self, *, kind: str, payload: dict[str, Any], retry_attempt: int = 0) -> str:
        """Send one envelope (``events_api``, ``slash_commands``, …); returns its id."""
        assert self._socket is not None, "no client connected"
        envelope_id = uuid.uuid4().hex
        await self._socket.send_json(
            {
                "envelope_id": envelope_id,
                "type": kind,
                "payload": payload,
                "accepts_response_payload": kind != "events_api",
                "retry_attempt": retry_attempt,
                "retry_reason": "timeout" if retry_attempt else "",
            }
        )
        return envelope_id

    async def wait_for_ack(self, envelope_id: str, *, within: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for ack in self.acks:
                if ack.get("envelope_id") == envelope_id:
                    return ack
            await asyncio.sleep(0.02)
        raise AssertionError(f"no ack for envelope {envelope_id}; acks: {self.acks}")

    async def _link(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self._socket = socket
        await socket.send_json(
            {
                "type": "hello",
                "num_connections": 1,
                "connection_info": {"app_id": "A0APP"},
                "debug_info": {"host": "fake", "approximate_connection_time": 3600},
            }
        )
        self._connected.set()
        async for frame in socket:
            if frame.type == aiohttp.WSMsgType.TEXT:
                self.acks.append(json.loads(frame.data))
        self._disconnected.set()
        return socket


# --------------------------------------------------------------------------- requests from Slack


def event_callback(
    event: dict[str, Any], *, event_id: str | None = None, team_id: str = TEAM_ID
) -> dict[str, Any]:
    """An Events API ``event_callback`` body around ``event``."""
    return {
        "token": "legacy-verification-token",
        "team_id": team_id,
        "api_app_id": "A0APP",
        "event": {"event_ts": event.get("ts", "1700000000.000100"), **event},
        "type": "event_callback",
        "event_id": event_id or f"Ev{uuid.uuid4().hex[:10].upper()}",
        "event_time": int(time.time()),
        "authorizations": [
            {"team_id": team_id, "user_id": BOT_USER_ID, "is_bot": True, "enterprise_id": None}
        ],
    }


def slash_command_form(
    *,
    text: str,
    user_id: str,
    response_url: str,
    channel: str = "C1",
    trigger_id: str | None = None,
) -> str:
    """A ``/chatbot`` slash command body, form-encoded the way Slack posts it (each with a
    trigger id of its own unless given)."""
    return urlencode(
        {
            "token": "legacy-verification-token",
            "team_id": TEAM_ID,
            "channel_id": channel,
            "channel_name": "general",
            "user_id": user_id,
            "user_name": f"user-{user_id.lower()}",
            "command": "/chatbot",
            "text": text,
            "api_app_id": "A0APP",
            "response_url": response_url,
            "trigger_id": trigger_id or f"{int(time.time())}.{uuid.uuid4().int % 10**12}",
        }
    )


def signed_headers(
    body: str | bytes,
    *,
    secret: str,
    timestamp: int | None = None,
    content_type: str = "application/json",
) -> dict[str, str]:
    """The headers Slack sends: ``v0=`` HMAC-SHA256 of ``v0:{timestamp}:{body}``."""
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    raw = body.encode() if isinstance(body, str) else body
    digest = hmac.new(secret.encode(), b"v0:" + stamp.encode() + b":" + raw, hashlib.sha256)
    return {
        "Content-Type": content_type,
        "X-Slack-Request-Timestamp": stamp,
        "X-Slack-Signature": "v0=" + digest.hexdigest(),
    }
