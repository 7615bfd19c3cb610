"""A fake Discord: REST API and gateway websocket on loopback, speaking the real protocol.

The real ``discord.py`` client connects to it through ``DISCORD_API_URL`` and
``DISCORD_GATEWAY_URL``. The gateway does HELLO, heartbeat/ACK, IDENTIFY → READY + GUILD_CREATE,
dispatches with sequence numbers, and RESUME → replay of missed dispatches + RESUMED after the
server drops the socket. REST keeps channels and messages in memory, records every request,
can answer a route with a 429 first, and can hold a request until the test releases it (to kill
a bot process at that very moment).

Usage in a test::

    server = FakeDiscord()
    await server.start()
    ...  # run the adapter with server.api_url / server.gateway_url
    await server.dispatch("MESSAGE_CREATE", server.user_message(...))
    await server.wait_for(lambda: server.bot_messages(channel_id))
    await server.stop()
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import aiohttp
from aiohttp import WSMsgType, web

from tests.fakes.holds import Hold
from tests.fakes.loopback import serve_on_loopback

logger = logging.getLogger(__name__)

T = TypeVar("T")
Json = dict[str, Any]

BOT_ID = "900000000000000001"
APPLICATION_ID = "900000000000000002"
GUILD_ID = "900000000000000010"
OWNER_ID = "900000000000000011"  # owns the guild
APP_OWNER_ID = "900000000000000012"  # owns the bot's application (GET /oauth2/applications/@me)
GENERAL_CHANNEL_ID = "900000000000000020"
THREAD_ID = "900000000000000030"
ADMIN_ROLE_ID = "900000000000000040"
MANAGER_ROLE_ID = "900000000000000041"
#: A second guild the bot is in, with a role of its own.
OTHER_GUILD_ID = "900000000000000050"
OTHER_CHANNEL_ID = "900000000000000051"
OTHER_ADMIN_ROLE_ID = "900000000000000052"

#: Permission bits (https://discord.com/developers/docs/topics/permissions).
MANAGE_GUILD = 1 << 5
VIEW_AND_SEND = (1 << 10) | (1 << 11) | (1 << 16) | (1 << 38)
#: The gateway intent bit and the application flag of Message Content
#: (https://discord.com/developers/docs/topics/gateway#gateway-intents).
MESSAGE_CONTENT_INTENT = 1 << 15
GATEWAY_MESSAGE_CONTENT_LIMITED = 1 << 19

_snowflakes = itertools.count(1_000_000_000_000_000_000)


def snowflake() -> str:
    """A fresh id, increasing like Discord's (so newer messages have larger ids)."""
    return str(next(_snowflakes))


def _now() -> str:
    return datetime.now(UTC).isoformat()


def json_response(
    payload: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    # discord.py parses a body as JSON only when Content-Type is exactly "application/json";
    # web.json_response would add "; charset=utf-8".
    return web.Response(
        body=json.dumps(payload).encode(),
        status=status,
        headers={"Content-Type": "application/json", **(headers or {})},
    )


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str  # without the API prefix, e.g. "/channels/1/messages"
    body: Any
    query: dict[str, str]


@dataclass
class HeldRequest(Hold):
    """A REST request the fake holds until :meth:`release` (see :meth:`FakeDiscord.hold`)."""

    method: re.Pattern[str] = re.compile(".*")
    path: re.Pattern[str] = re.compile(".*")
    when: Callable[[Any], bool] = lambda _body: True
    request: RecordedRequest | None = None  # the request held, once it came in

    def matches(self, method: str, path: str, body: Any) -> bool:
        return (
            not self.arrived.is_set()
            and bool(self.method.fullmatch(method))
            and bool(self.path.fullmatch(path))
            and self.when(body)
        )


@dataclass
class _Session:
    session_id: str
    sent: list[Json] = field(default_factory=list)  # every dispatch of the session, in order
    sequence: int = 0


class FakeDiscord:
    """Two guilds (the first with a text channel and a thread, the other with a text channel
    and a role of its own), DMs, the bot user and its application."""

    api_prefix = "/api/v10"

    def __init__(self) -> None:
        self.bot_user: Json = self.make_user(BOT_ID, "chatbot", bot=True)
        self.requests: list[RecordedRequest] = []
        self.gateway_frames: list[Json] = []  # what clients sent on the gateway
        self.messages: dict[str, Json] = {}  # by message id
        self.channels: dict[str, Json] = {}
        self.roles: list[Json] = [
            {"id": GUILD_ID, "name": "@everyone", "permissions": str(VIEW_AND_SEND)},
            {"id": ADMIN_ROLE_ID, "name": "bot admins", "permissions": str(VIEW_AND_SEND)},
            {"id": MANAGER_ROLE_ID, "name": "managers", "permissions": str(MANAGE_GUILD)},
        ]
        self.other_guild_roles: list[Json] = [
            {"id": OTHER_GUILD_ID, "name": "@everyone", "permissions": str(VIEW_AND_SEND)},
            {"id": OTHER_ADMIN_ROLE_ID, "name": "admins", "permissions": str(VIEW_AND_SEND)},
        ]
        self.application_owner: Json = self.make_user(APP_OWNER_ID, "app owner")
        #: Members of the team owning the application (``team`` in application info); empty:
        #: the application belongs to ``application_owner`` alone.
        self.team_members: list[Json] = []
        #: When set, REST requests need ``Authorization: Bot <bot_token>`` (else 401) and
        #: IDENTIFY this token (else close code 4004); None accepts any token.
        self.bot_token: str | None = None
        #: The portal's Message Content switch: off, an IDENTIFY asking for the intent is
        #: closed with 4014, and message content is withheld as Discord does.
        self.message_content_intent = True
        self.connections = 0
        self.identifies = 0
        self.ready_sent = 0  # sessions whose READY and GUILD_CREATEs all went out
        self.resumes = 0
        self._rate_limits: list[tuple[str, re.Pattern[str], list[int]]] = []
        self._failures: list[tuple[str, re.Pattern[str], int, list[int]]] = []
        self._failures_when: list[
            tuple[str, re.Pattern[str], Callable[[Any], bool], list[int]]
        ] = []
        self._holds: list[HeldRequest] = []
        self._session: _Session | None = None
        self._socket: web.WebSocketResponse | None = None
        self._runner: web.AppRunner | None = None
        self._socket_lock = asyncio.Lock()
        self.port = 0
        self.add_channel({"id": GENERAL_CHANNEL_ID, "type": 0, "name": "general", "position": 0})
        self.add_channel(self.thread_payload(THREAD_ID, owner_id=OWNER_ID, name="help thread"))
        self.add_channel(
            {
                "id": OTHER_CHANNEL_ID,
                "type": 0,
                "name": "elsewhere",
                "position": 0,
                "guild_id": OTHER_GUILD_ID,
            }
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", self.api_prefix + "/{path:.*}", self._rest)
        self._runner, self.port = await serve_on_loopback(app)

    async def stop(self) -> None:
        if self._socket is not None and not self._socket.closed:
            await self._socket.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.api_prefix}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    # ------------------------------------------------------------------ payload builders

    @staticmethod
    def make_user(user_id: str, name: str, *, bot: bool = False) -> Json:
        return {
            "id": user_id,
            "username": name,
            "global_name": name,
            "discriminator": "0",
            "avatar": None,
            "bot": bot,
        }

    def member(self, user: Json, *, roles: tuple[str, ...] = (), permissions: int = 0) -> Json:
        return {
            "user": user,
            "roles": list(roles),
            "joined_at": "2025-01-01T00:00:00+00:00",
            "deaf": False,
            "mute": False,
            "flags": 0,
            "permissions": str(permissions | VIEW_AND_SEND),
        }

    @staticmethod
    def thread_payload(thread_id: str, *, owner_id: str, name: str) -> Json:
        return {
            "id": thread_id,
            "type": 11,  # public thread
            "guild_id": GUILD_ID,
            "parent_id": GENERAL_CHANNEL_ID,
            "owner_id": owner_id,
            "name": name,
            "message_count": 0,
            "member_count": 1,
            "rate_limit_per_user": 0,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 1440,
                "archive_timestamp": _now(),
                "locked": False,
            },
        }

    def add_channel(self, channel: Json) -> Json:
        if channel.get("type") != 1:
            channel.setdefault("guild_id", GUILD_ID)
        channel.setdefault("permission_overwrites", [])
        self.channels[channel["id"]] = channel
        return channel

    def dm_channel(self, user: Json) -> Json:
        for channel in self.channels.values():
            if channel["type"] == 1 and channel["recipients"][0]["id"] == user["id"]:
                return channel
        return self.add_channel({"id": snowflake(), "type": 1, "recipients": [user]})

    def guild_payload(self, guild_id: str = GUILD_ID) -> Json:
        bot_member = self.member(self.bot_user)
        in_guild = [c for c in self.channels.values() if c.get("guild_id") == guild_id]
        return {
            "id": guild_id,
            "name": "Test guild" if guild_id == GUILD_ID else "Other guild",
            "icon": None,
            "owner_id": OWNER_ID,
            "unavailable": False,
            "member_count": 2,
            "large": False,
            "features": [],
            "roles": self.roles if guild_id == GUILD_ID else self.other_guild_roles,
            "emojis": [],
            "stickers": [],
            "channels": [c for c in in_guild if c["type"] == 0],
            "threads": [c for c in in_guild if c["type"] in (10, 11, 12)],
            "members": [bot_member],
            "voice_states": [],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "joined_at": "2025-01-01T00:00:00+00:00",
        }

    def user_message(
        self,
        *,
        channel_id: str,
        author: Json,
        content: str,
        mentions: tuple[Json, ...] = (),
        reply_to: str | None = None,
        roles: tuple[str, ...] = (),
        attachments: tuple[Json, ...] = (),
        message_id: str | None = None,
    ) -> Json:
        """A MESSAGE_CREATE payload, stored so the REST API can serve it later."""
        channel = self.channels[channel_id]
        message: Json = {
            "id": message_id or snowflake(),
            "channel_id": channel_id,
            "author": author,
            "content": content,
            "timestamp": _now(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": list(mentions),
            "mention_roles": [],
            "attachments": list(attachments),
            "embeds": [],
            "pinned": False,
            "type": 19 if reply_to else 0,
            "flags": 0,
            "components": [],
        }
        if channel["type"] != 1:
            message["guild_id"] = channel["guild_id"]
            member = self.member(author, roles=roles)
            member.pop("user")
            message["member"] = member
        if reply_to is not None:
            message["message_reference"] = {
                "type": 0,
                "message_id": reply_to,
                "channel_id": channel_id,
                "guild_id": message.get("guild_id"),
            }
            parent = self.messages.get(reply_to)
            if parent is not None:
                # Discord resolves one level; the parent's own parent is not included.
                message["referenced_message"] = {
                    k: v for k, v in parent.items() if k != "referenced_message"
                }
        self.messages[message["id"]] = message
        return message

    def interaction(
        self,
        *,
        user: Json,
        group: str,
        subcommand: str,
        roles: tuple[str, ...] = (),
        permissions: int = 0,
        channel_id: str = GENERAL_CHANNEL_ID,
        arguments: str | None = None,
    ) -> Json:
        """An INTERACTION_CREATE payload for ``/group subcommand [arguments]`` in a channel."""
        options = (
            [] if arguments is None else [{"name": "arguments", "type": 3, "value": arguments}]
        )
        guild_id = self.channels[channel_id]["guild_id"]
        return {
            "id": snowflake(),
            "application_id": APPLICATION_ID,
            "type": 2,
            "data": {
                "id": snowflake(),
                "name": group,
                "type": 1,
                "options": [{"name": subcommand, "type": 1, "options": options}],
            },
            "guild_id": guild_id,
            "channel_id": channel_id,
            "channel": self.channels[channel_id],
            "member": self.member(user, roles=roles, permissions=permissions),
            "token": f"token-{snowflake()}",
            "version": 1,
            "locale": "en-US",
            "guild_locale": "en-US",
            "app_permissions": str(VIEW_AND_SEND),
            "entitlements": [],
            "authorizing_integration_owners": {"0": guild_id},
            "context": 0,
            "attachment_size_limit": 10_485_760,
        }

    # ------------------------------------------------------------------ gateway

    async def dispatch(self, event: str, data: Any) -> int:
        """Send a dispatch (op 0); while no client is connected it waits for a RESUME replay."""
        if event in {"MESSAGE_CREATE", "MESSAGE_UPDATE"} and self._content_withheld:
            data = self._as_seen_without_content(data)
        async with self._socket_lock:
            session = self._session
            assert session is not None, "no client has identified yet"
            session.sequence += 1
            frame = {"op": 0, "t": event, "s": session.sequence, "d": data}
            session.sent.append(frame)
            await self._send(frame)
            return session.sequence

    async def send_raw(self, text: str) -> None:
        """Send a text frame as is (malformed payloads)."""
        async with self._socket_lock:
            if self._socket is not None and not self._socket.closed:
                await self._socket.send_str(text)

    async def drop_connection(self, *, code: int = 4000) -> None:
        """Close the client's socket the way Discord does when it wants a reconnect."""
        async with self._socket_lock:
            socket, self._socket = self._socket, None
        if socket is not None and not socket.closed:
            await socket.close(code=code, message=b"reconnect please")

    def replay_from(self, sequence: int) -> None:
        """Make the next RESUME replay from ``sequence`` on, as if the client's ack was lost."""
        self._replay_override = sequence

    _replay_override: int | None = None
    _content_withheld = False  # the session identified without the Message Content intent

    @staticmethod
    def _as_seen_without_content(message: Json) -> Json:
        """What a bot without the Message Content intent gets: no content, attachments or
        embeds, except in DMs, in its own messages and in messages that mention it."""
        mentioned = any(user.get("id") == BOT_ID for user in message.get("mentions") or [])
        from_bot = (message.get("author") or {}).get("id") == BOT_ID
        if "guild_id" not in message or mentioned or from_bot:
            return message
        return {**message, "content": "", "attachments": [], "embeds": []}

    def _application_flags(self) -> int:
        return GATEWAY_MESSAGE_CONTENT_LIMITED if self.message_content_intent else 0

    @property
    def connected(self) -> bool:
        return self._socket is not None and not self._socket.closed

    async def _send(self, frame: Json) -> None:
        if self._socket is not None and not self._socket.closed:
            await self._socket.send_str(json.dumps(frame))

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self.connections += 1
        await socket.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 45_000}}))
        async for frame in socket:
            if frame.type != WSMsgType.TEXT:
                break
            payload = json.loads(frame.data)
            self.gateway_frames.append(payload)
            op = payload.get("op")
            if op == 1:
                await socket.send_str(json.dumps({"op": 11}))
            elif op == 2:
                await self._identify(socket, payload.get("d") or {})
            elif op == 6:
                await self._resume(socket, payload["d"])
        return socket

    async def _identify(self, socket: web.WebSocketResponse, data: Json) -> None:
        self.identifies += 1
        if self.bot_token is not None and data.get("token") != self.bot_token:
            await socket.close(code=4004, message=b"Authentication failed.")
            return
        intents = int(data.get("intents") or 0)
        if intents & MESSAGE_CONTENT_INTENT and not self.message_content_intent:
            await socket.close(code=4014, message=b"Disallowed intent(s).")
            return
        self._content_withheld = not intents & MESSAGE_CONTENT_INTENT
        async with self._socket_lock:
            self._socket = socket
            self._session = _Session(session_id=f"session-{snowflake()}")
        await self.dispatch(
            "READY",
            {
                "v": 10,
                "user": self.bot_user,
                "guilds": [
                    {"id": GUILD_ID, "unavailable": True},
                    {"id": OTHER_GUILD_ID, "unavailable": True},
                ],
                "session_id": self._session.session_id,
                "resume_gateway_url": self.gateway_url,
                "application": {"id": APPLICATION_ID, "flags": self._application_flags()},
                "private_channels": [],
            },
        )
        await self.dispatch("GUILD_CREATE", self.guild_payload(GUILD_ID))
        await self.dispatch("GUILD_CREATE", self.guild_payload(OTHER_GUILD_ID))
        self.ready_sent += 1

    async def _resume(self, socket: web.WebSocketResponse, data: Json) -> None:
        self.resumes += 1
        session = self._session
        if session is None or data.get("session_id") != session.session_id:
            await socket.send_str(json.dumps({"op": 9, "d": False}))
            return
        start = self._replay_override if self._replay_override is not None else data["seq"]
        self._replay_override = None
        async with self._socket_lock:
            self._socket = socket
            for frame in session.sent:
                if frame["s"] > (start or 0) and frame["t"] not in {"READY", "GUILD_CREATE"}:
                    await self._send(frame)
            session.sequence += 1
            resumed = {"op": 0, "t": "RESUMED", "s": session.sequence, "d": {}}
            session.sent.append(resumed)
            await self._send(resumed)

    # ------------------------------------------------------------------ REST

    def rate_limit(self, method: str, path_pattern: str, *, times: int = 1) -> None:
        """Answer the next ``times`` matching requests with a 429 and ``Retry-After``."""
        self._rate_limits.append((method, re.compile(path_pattern), [times]))

    def fail(
        self, method: str, path_pattern: str, *, status: int = 403, times: int = 1, after: int = 0
    ) -> None:
        """Answer ``times`` matching requests, from the ``after``-th on (0: the next), with an
        error discord.py does not retry (403 Missing Permissions by default)."""
        self._failures.append((method, re.compile(path_pattern), status, [after, times]))

    def fail_when(
        self, method: str, path_pattern: str, when: Callable[[Any], bool], *, times: int = 1
    ) -> None:
        """Answer the next ``times`` matching requests whose JSON body satisfies ``when`` with
        403 Missing Permissions (each such failure counts on its own, next to the others)."""
        self._failures_when.append((method, re.compile(path_pattern), when, [times]))

    def stop_failing(self) -> None:
        """Forget the failures :meth:`fail` and :meth:`fail_when` asked for."""
        self._failures.clear()
        self._failures_when.clear()

    def hold(
        self,
        method: str,
        path_pattern: str,
        *,
        when: Callable[[Any], bool] = lambda _body: True,
        apply_first: bool = False,
        answer_on_release: bool = False,
    ) -> HeldRequest:
        """Hold the next request whose method and path match (both regular expressions, e.g.
        ``"POST|PATCH"``) and whose JSON body satisfies ``when``, until the test calls
        ``release()``. By default it is never applied (as if it never reached Discord) and is
        answered with a 503 when released; with ``apply_first`` it is applied at once and only
        the answer is held (it reached Discord, the client never heard back); with
        ``answer_on_release`` it is applied and answered when released (a slow request).
        ``arrived`` is set when the request comes in."""
        held = HeldRequest(
            method=re.compile(method),
            path=re.compile(path_pattern),
            when=when,
            apply_first=apply_first,
            answer_on_release=answer_on_release,
        )
        self._holds.append(held)
        return held

    def release_all(self) -> None:
        """Release every hold (those still to come pass through unheld)."""
        for held in self._holds:
            held.release()

    async def _held(
        self, held: HeldRequest, recorded: RecordedRequest, query: Any
    ) -> web.StreamResponse:
        held.request = recorded
        return await held.serve(
            apply=lambda: self._route(recorded.method, recorded.path, recorded.body, query),
            refuse=lambda: json_response({"message": "held", "code": 0}, status=503),
        )

    def _take_failure(self, method: str, path: str) -> int | None:
        for wanted_method, pattern, status, counts in self._failures:
            if wanted_method != method or not pattern.fullmatch(path) or counts[1] <= 0:
                continue
            if counts[0] > 0:
                counts[0] -= 1
                continue
            counts[1] -= 1
            return status
        return None

    def _take_failure_when(self, method: str, path: str, body: Any) -> int | None:
        for wanted_method, pattern, when, remaining in self._failures_when:
            if (
                wanted_method == method
                and pattern.fullmatch(path)
                and remaining[0] > 0
                and when(body)
            ):
                remaining[0] -= 1
                return 403
        return None

    def _take_rate_limit(self, method: str, path: str) -> bool:
        for wanted_method, pattern, remaining in self._rate_limits:
            if wanted_method == method and pattern.fullmatch(path) and remaining[0] > 0:
                remaining[0] -= 1
                return True
        return False

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        body: Any = None
        if request.can_read_body and request.content_type == "multipart/form-data":
            body = await _multipart(request)  # a message with attachments
        elif request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
        recorded = RecordedRequest(request.method, path, body, dict(request.query))
        self.requests.append(recorded)
        if self.bot_token is not None and request.headers.get("Authorization") != (
            f"Bot {self.bot_token}"
        ):
            return json_response({"message": "401: Unauthorized", "code": 0}, status=401)
        held = next((h for h in self._holds if h.matches(request.method, path, body)), None)
        if held is not None:
            return await self._held(held, recorded, request.query)
        if self._take_rate_limit(request.method, path):
            return json_response(
                {"message": "You are being rate limited.", "retry_after": 0.1, "global": False},
                status=429,
                headers={
                    "Retry-After": "0.1",
                    "X-RateLimit-Limit": "5",
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset-After": "0.1",
                    "X-RateLimit-Bucket": "fake-bucket",
                    "X-RateLimit-Scope": "user",
                    # discord.py treats a 429 without Via as a Cloudflare ban.
                    "Via": "1.1 google",
                },
            )
        failure = self._take_failure_when(request.method, path, body) or self._take_failure(
            request.method, path
        )
        if failure is not None:
            return json_response({"message": "Missing Permissions", "code": 50013}, status=failure)
        return await self._route(request.method, path, body, request.query)

    async def _route(self, method: str, path: str, body: Any, query: Any) -> web.StreamResponse:
        parts = path.strip("/").split("/")
        match method, parts:
            case "GET", ["users", "@me"]:
                return json_response(self.bot_user)
            case "GET", ["oauth2", "applications", "@me"]:
                return json_response(self._application())
            case "GET", ["gateway", "bot"] | ["gateway"]:
                return json_response(
                    {
                        "url": self.gateway_url,
                        "shards": 1,
                        "session_start_limit": {
                            "total": 1000,
                            "remaining": 1000,
                            "reset_after": 0,
                            "max_concurrency": 1,
                        },
                    }
                )
            case "PUT", ["applications", _, "commands"]:
                commands = [
                    {**command, "id": snowflake(), "application_id": APPLICATION_ID, "version": "1"}
                    for command in body
                ]
                return json_response(commands)
            case "POST", ["users", "@me", "channels"]:
                user = self.make_user(str(body["recipient_id"]), "someone")
                return json_response(self.dm_channel(user))
            case "GET", ["channels", channel_id]:
                channel = self.channels.get(channel_id)
                return json_response(channel) if channel else _not_found("Unknown Channel", 10003)
            case "POST", ["channels", channel_id, "typing"]:
                return web.Response(status=204)
            case "POST", ["channels", channel_id, "messages"]:
                return json_response(await self._create_bot_message(channel_id, body))
            case "PATCH", ["channels", channel_id, "messages", message_id]:
                message = self.messages.get(message_id)
                if message is None:
                    return _not_found("Unknown Message", 10008)
                message["content"] = body.get("content", message["content"])
                message["edited_timestamp"] = _now()
                await self._dispatch_if_connected("MESSAGE_UPDATE", message)
                return json_response(message)
            case "GET", ["channels", channel_id, "messages", message_id]:
                message = self.messages.get(message_id)
                if message is None or message["channel_id"] != channel_id:
                    return _not_found("Unknown Message", 10008)
                return json_response(message)
            case "GET", ["channels", channel_id, "messages"]:
                return json_response(self._history(channel_id, query))
            case "POST", ["interactions", interaction_id, _, "callback"]:
                return json_response(
                    {
                        "interaction": {
                            "id": interaction_id,
                            "type": 2,
                            "response_message_loading": body.get("type") == 5,
                            "response_message_ephemeral": bool(
                                (body.get("data") or {}).get("flags", 0) & 64
                            ),
                        },
                        "resource": {"type": body.get("type")},
                    }
                )
            case ("PATCH", ["webhooks", _, _, "messages", "@original"]) | (
                "POST",
                ["webhooks", _, _],
            ):
                return json_response(self._interaction_message(body))
        return _not_found(f"no fake route for {method} {path}", 0)

    def _application(self) -> Json:
        application: Json = {
            "id": APPLICATION_ID,
            "name": "chatbot",
            "description": "",
            "icon": None,
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self.application_owner,
            "verify_key": "0" * 64,
            "flags": self._application_flags(),
        }
        if self.team_members:
            team_id = "900000000000000060"
            # Discord names a team-owned application's owner after the team.
            application["owner"] = self.make_user(team_id, "team")
            application["team"] = {
                "id": team_id,
                "name": "team",
                "icon": None,
                "owner_user_id": self.team_members[0]["id"],
                "members": [
                    {
                        "user": user,
                        "team_id": team_id,
                        "membership_state": 2,  # accepted
                        "permissions": ["*"],
                        "role": "developer",
                    }
                    for user in self.team_members
                ],
            }
        return application

    def bot_message(self, *, channel_id: str, content: str, reply_to: str | None = None) -> Json:
        """A message the bot posted earlier (before this test's client ran), stored only."""
        message: Json = {
            "id": snowflake(),
            "channel_id": channel_id,
            "author": self.bot_user,
            "content": content,
            "timestamp": _now(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": 19 if reply_to else 0,
            "flags": 0,
            "components": [],
        }
        if reply_to is not None:
            message["message_reference"] = {
                "type": 0,
                "message_id": reply_to,
                "channel_id": channel_id,
            }
        self.messages[message["id"]] = message
        return message

    async def _create_bot_message(self, channel_id: str, body: Json) -> Json:
        channel = self.channels.get(channel_id)
        message: Json = {
            "id": snowflake(),
            "channel_id": channel_id,
            "author": self.bot_user,
            "content": body.get("content") or "",
            "timestamp": _now(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [
                {
                    "id": snowflake(),
                    "filename": name,
                    "size": len(data),
                    "url": f"https://cdn.example/{name}",
                    "proxy_url": f"https://cdn.example/{name}",
                }
                for name, data in body.get("_files", {}).items()
            ],
            "embeds": [],
            "pinned": False,
            "type": 19 if body.get("message_reference") else 0,
            "flags": 0,
            "components": [],
        }
        if channel is not None and channel["type"] != 1:
            message["guild_id"] = channel["guild_id"]
        reference = body.get("message_reference")
        if reference:
            message["message_reference"] = {
                "type": 0,
                "message_id": str(reference["message_id"]),
                "channel_id": channel_id,
            }
            parent = self.messages.get(str(reference["message_id"]))
            if parent is not None:
                message["referenced_message"] = {
                    k: v for k, v in parent.items() if k != "referenced_message"
                }
        self.messages[message["id"]] = message
        # Like Discord, the bot sees its own messages on the gateway (it must ignore them).
        await self._dispatch_if_connected("MESSAGE_CREATE", message)
        return message

    def _interaction_message(self, body: Json) -> Json:
        return {
            "id": snowflake(),
            "channel_id": GENERAL_CHANNEL_ID,
            "author": self.bot_user,
            "content": (body or {}).get("content") or "",
            "timestamp": _now(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": 20,
            "flags": (body or {}).get("flags", 0),
            "components": [],
        }

    async def _dispatch_if_connected(self, event: str, data: Json) -> None:
        if self._session is not None:
            await self.dispatch(event, data)

    def _history(self, channel_id: str, query: Any) -> list[Json]:
        limit = int(query.get("limit", 50))
        before = int(query["before"]) if "before" in query else None
        after = int(query["after"]) if "after" in query else None
        found = [
            m
            for m in self.messages.values()
            if m["channel_id"] == channel_id
            and (before is None or int(m["id"]) < before)
            and (after is None or int(m["id"]) > after)
        ]
        found.sort(key=lambda m: int(m["id"]), reverse=True)
        if after is not None and before is None:
            # Like Discord: the ``limit`` messages right after ``after``, newest first.
            return found[-limit:]
        return found[:limit]

    # ------------------------------------------------------------------ assertions

    def requests_to(self, method: str, path_pattern: str) -> list[RecordedRequest]:
        pattern = re.compile(path_pattern)
        return [r for r in self.requests if r.method == method and pattern.fullmatch(r.path)]

    def bot_posts(self, channel_id: str) -> list[RecordedRequest]:
        """The bot's new messages in a channel (replies and their continuation chunks)."""
        return self.requests_to("POST", f"/channels/{channel_id}/messages")

    def bot_messages(self, channel_id: str) -> list[Json]:
        """The bot's messages in a channel as they stand now (after edits), oldest first."""
        return sorted(
            (
                m
                for m in self.messages.values()
                if m["channel_id"] == channel_id and m["author"]["id"] == BOT_ID
            ),
            key=lambda m: int(m["id"]),
        )

    def replies_to(self, message_id: str) -> list[Json]:
        return [
            m
            for m in self.messages.values()
            if m["author"]["id"] == BOT_ID
            and (m.get("message_reference") or {}).get("message_id") == message_id
        ]

    async def wait_for(
        self,
        condition: Callable[[], T | Literal[False] | None],
        *,
        within: float = 20.0,
        what: str = "condition",
    ) -> T:
        """Poll ``condition`` until it returns something truthy; fail after ``within`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            result = condition()
            if result:
                return result
            if loop.time() > deadline:
                raise AssertionError(f"timed out after {within}s waiting for {what}")
            await asyncio.sleep(0.02)


def _not_found(message: str, code: int) -> web.Response:
    return json_response({"message": message, "code": code}, status=404)


async def _multipart(request: web.Request) -> Json:
    """A multipart message create (discord.py sends files so): its ``payload_json`` with the
    files' contents under ``_files`` (file name -> bytes)."""
    body: Json = {}
    files: dict[str, bytes] = {}
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, aiohttp.BodyPartReader):
            continue
        if part.name == "payload_json":
            body.update(json.loads(await part.text()))
        elif part.filename:
            files[part.filename] = bytes(await part.read())
    body["_files"] = files
    return body
