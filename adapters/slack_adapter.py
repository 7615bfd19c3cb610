"""The Slack adapter: slack-bolt's async app in Socket Mode or HTTP mode.

Socket Mode when ``SLACK_APP_TOKEN`` is set; otherwise HTTP mode, where Events API requests,
interactivity and slash commands arrive on ``POST /slack/events`` (port ``SLACK_PORT``) and are
verified with ``SLACK_SIGNING_SECRET``. ``SLACK_BOT_TOKEN`` is always needed, and
``SLACK_API_URL`` points the Web API client elsewhere (proxies, gateways, tests).

This module only translates: a Slack event becomes a :class:`adapters.routing.MessageEvent`
(or an edit, a deletion, a rating), and a :class:`adapters.slack_replies.ThreadReply` says how
to answer it (:mod:`adapters.slack_people` says who people are). What the event is (ignored, a
command, an agent's answer, a turn) is the shared :class:`adapters.routing.Router`'s decision.
Every event is acknowledged at once; the work (generation included) runs afterwards in tracked
tasks. Exactly one reply per message, across Slack's retries, the double delivery of a channel
mention as ``app_mention`` and ``message``, restarts and several instances: the pipeline dedupes
on the event id and on (channel, ts), and commands on their delivery, in the database.

Mentions are stored as Slack writes them (``<@U0123>``): a mentioned person's name never enters
the message text (the export's redaction turns the mention into ``<USER>``); the author's
display name is kept only as the message's author name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from aiohttp import web
from multidict import MultiMapping
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.respond.async_respond import AsyncRespond
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from adapters.routing import (
    ContextLoader,
    EventTasks,
    MessageEvent,
    RoutedHandler,
    Router,
    deliver_queued_replies,
)
from adapters.slack_format import (
    escape,
    mentioned_user_ids,
    rating_of,
    timestamp_of,
    to_plain_text,
    without_leading_mention,
)
from adapters.slack_people import SlackPeople, SlackUser
from adapters.slack_replies import ThreadReply, post_queued_reply
from adapters.slack_scopes import LISTENED_EVENTS, SLASH_COMMAND
from adapters.slack_signature import SLACK_CONTENT_TYPES, SlackSignatureVerifier
from bot.commands import CommandRequest, Commands, parse_bang_command
from bot.config import ConfigurationError, Settings
from bot.conversation import IncomingMessage, Platform, Role
from bot.storage import UndeliveredReply

logger = logging.getLogger(__name__)

PLATFORM = Platform.SLACK.value
EVENTS_PATH = "/slack/events"
#: Message subtypes that are people writing; every other subtype (joins, topic changes, …)
#: is not a conversation turn.
_CONVERSATION_SUBTYPES = frozenset({None, "thread_broadcast", "file_share", "me_message"})


@dataclass(frozen=True, slots=True)
class BotIdentity:
    """Who the bot is in this workspace (from ``auth.test``)."""

    user_id: str
    bot_id: str
    team_id: str
    name: str


class _Stopping(Exception):
    """A listener refused an event because the adapter is stopping; bolt then answers with a
    non-200 status (no Socket Mode ack), so Slack delivers the event again."""


class SlackAdapter:
    """Connects the reply pipeline and the chat commands to one Slack workspace."""

    name = "slack"

    def __init__(
        self,
        *,
        settings: Settings,
        handler: RoutedHandler,
        commands: Commands,
        host: str = "0.0.0.0",
        thread_history_limit: int | None = None,
        thread_page_size: int = 200,
        retry_interval: float = 30.0,
        rate_limit_retries: int = 3,
        name_cache_size: int = 1_000,
        name_cache_seconds: float = 3_600.0,
    ) -> None:
        """``host`` is the HTTP mode listening address; ``retry_interval`` the seconds between
        two passes over the queue of replies that could not be posted; ``thread_history_limit``
        how many of a thread's newest earlier messages are stored when the bot is first called
        into it (``Settings.history_turns`` by default), read ``thread_page_size`` at a time;
        what ``users.info`` says (names, admin flags) is cached for ``name_cache_seconds``.
        """
        if not settings.slack_bot_token:
            raise ConfigurationError("SLACK_BOT_TOKEN is required for Slack")
        if not settings.slack_app_token and not settings.slack_signing_secret:
            raise ConfigurationError(
                "Slack needs SLACK_APP_TOKEN (Socket Mode) or SLACK_SIGNING_SECRET (HTTP mode)"
            )
        self.settings = settings
        self.handler = handler
        self.commands = commands
        self.router = Router(handler=handler, commands=commands)
        self.tasks = EventTasks(platform=PLATFORM)
        self.host = host
        self.retry_interval = retry_interval
        self.thread_history_limit = (
            settings.history_turns if thread_history_limit is None else thread_history_limit
        )
        self.thread_page_size = thread_page_size
        self.uses_socket_mode = bool(settings.slack_app_token)
        self.admin_ids = frozenset(settings.slack_admin_ids)
        self.agent_ids = frozenset(settings.slack_agent_ids)

        base_url = settings.slack_api_url
        self.client = AsyncWebClient(
            token=settings.slack_bot_token,
            base_url=base_url if base_url.endswith("/") else base_url + "/",
            # slack_sdk retries a 429 only with this handler; it waits for Retry-After.
            retry_handlers=[
                AsyncConnectionErrorRetryHandler(),
                AsyncRateLimitErrorRetryHandler(max_retry_count=rate_limit_retries),
            ],
        )
        self.app = AsyncApp(
            client=self.client,
            signing_secret=settings.slack_signing_secret,
            # HTTP requests are verified in _serve_http before bolt parses them, so that a
            # stranger's malformed body gets 401, not 400; Socket Mode needs no signature.
            request_verification_enabled=False,
            # Our listeners only start a tracked task and return, so bolt may answer Slack
            # after them: the ack still comes at once, and the work is ours to await on stop.
            process_before_response=True,
            logger=logging.getLogger("slack_bolt"),
        )
        # deploy/slack-manifest.yml subscribes to exactly these (adapters/slack_scopes.py).
        listeners = {
            "app_mention": self._on_message_event,
            "message": self._on_message_event,
            "reaction_added": self._on_reaction_added,
            "reaction_removed": self._on_reaction_removed,
        }
        for event in LISTENED_EVENTS:
            self.app.event(event)(listeners[event])
        self.app.command(SLASH_COMMAND)(self._on_slash_command)
        self.app.error(self._on_listener_error)

        self.identity: BotIdentity | None = None
        self.port: int | None = None  # the bound HTTP port, once started
        self.people = SlackPeople(
            client=self.client, cache_size=name_cache_size, cache_seconds=name_cache_seconds
        )
        self._retry_loop: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._socket: AsyncSocketModeHandler | None = None
        self._stop_requested = asyncio.Event()
        self._drain_within: float | None = None

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        """Serve until :meth:`request_stop` or cancellation; 0 on a clean stop."""
        await self.start()
        try:
            await self._stop_requested.wait()
        finally:
            await self.stop(drain_within=self._drain_within)
        return 0

    def request_stop(self, *, drain_within: float) -> None:
        """Stop taking events now, let the replies in flight finish for at most
        ``drain_within`` seconds, then close; :meth:`run` returns 0. Safe to call twice."""
        if self._stop_requested.is_set():
            return
        self._drain_within = drain_within
        # New events are refused from here on: HTTP requests get 503 and Socket Mode
        # envelopes no ack, so Slack delivers them again (to another instance).
        self.tasks.close()
        logger.warning("Slack: stopping; draining replies in flight for up to %ss", drain_within)
        self._stop_requested.set()

    async def start(self) -> None:
        """Learn who the bot is, connect (Socket Mode) or listen (HTTP), start the retry queue.

        Raises:
            ConfigurationError: Slack refused the token or cannot be reached.
        """
        # One session for every Web API call: without one, slack_sdk opens and closes a
        # connection per call (a TLS handshake for each placeholder and each edit). Bolt's
        # per-request clients share it too.
        self.client.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.client.timeout)
        )
        try:
            await self._connect()
        except BaseException:
            await self._close_session()
            raise
        self._retry_loop = asyncio.create_task(self._retry_undelivered_forever())

    async def _connect(self) -> None:
        self.identity = await self._authenticate()
        if self.uses_socket_mode:
            # The Socket Mode client retries a failed connection forever; one check of the app
            # token first turns a revoked or mistyped token into a clear error.
            try:
                await self.client.apps_connections_open(app_token=self.settings.slack_app_token)
            except SlackApiError as error:
                raise ConfigurationError(
                    f"Slack refused SLACK_APP_TOKEN: {error.response.get('error', error)}"
                ) from None
            self._socket = AsyncSocketModeHandler(self.app, self.settings.slack_app_token)
            await self._socket.connect_async()
            logger.warning("Slack: connected in Socket Mode as %s", self.identity.name)
        else:
            server = web.Application(middlewares=[self._refuse_while_stopping()])
            server.router.add_post(EVENTS_PATH, self._serve_http)
            self._runner = web.AppRunner(server, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.settings.slack_port)
            try:
                await site.start()
            except OSError as error:
                await self._runner.cleanup()
                raise ConfigurationError(
                    f"cannot listen on {self.host}:{self.settings.slack_port} (SLACK_PORT): {error}"
                ) from None
            self.port = self._runner.addresses[0][1]
            logger.warning(
                "Slack: listening on http://%s:%s%s as %s",
                self.host,
                self.port,
                EVENTS_PATH,
                self.identity.name,
            )

    async def stop(self, *, drain_within: float | None = None) -> None:
        """Stop taking events, finish the work in flight (for at most ``drain_within``
        seconds; what still runs then is cancelled), close the connection."""
        self.tasks.close()
        if self._retry_loop is not None:
            self._retry_loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry_loop
            self._retry_loop = None
        if self._socket is not None:
            # Closed first: Slack sends what comes next to the app's other connections.
            await self._socket.close_async()
            self._socket = None
        await self.tasks.finish(within=drain_within)
        if self._runner is not None:
            # Kept open while draining, answering 503, so Slack retries instead of timing out.
            await self._runner.cleanup()
            self._runner = None
        await self._close_session()

    async def _close_session(self) -> None:
        session, self.client.session = self.client.session, None
        if session is not None:
            await session.close()

    async def drain(self) -> None:
        """Wait until every event received so far is fully handled."""
        await self.tasks.drain()

    def _refuse_while_stopping(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        tasks = self.tasks

        @web.middleware
        async def refuse_while_stopping(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            if not tasks.accepting:
                logger.warning("Slack: stopping, so a request was answered 503 (Slack retries)")
                return web.json_response(
                    {"error": "shutting down"}, status=503, headers={"Retry-After": "1"}
                )
            return await handler(request)

        return refuse_while_stopping

    async def _authenticate(self) -> BotIdentity:
        try:
            response = await self.client.auth_test()
        except SlackApiError as error:
            raise ConfigurationError(
                f"Slack refused SLACK_BOT_TOKEN: {error.response.get('error', error)}"
            ) from None
        except (SlackClientError, OSError) as error:
            raise ConfigurationError(
                f"cannot reach Slack at SLACK_API_URL={self.client.base_url}: {error}"
            ) from None
        identity = BotIdentity(
            user_id=str(response.get("user_id") or ""),
            bot_id=str(response.get("bot_id") or ""),
            team_id=str(response.get("team_id") or ""),
            name=str(response.get("user") or "chatbot"),
        )
        self.people.remember(identity.user_id, SlackUser(identity.name, is_workspace_admin=False))
        return identity

    # ------------------------------------------------------------------ HTTP mode

    async def _serve_http(self, request: web.Request) -> web.StreamResponse:
        # Every refusal is a 4xx with a JSON error and one warning, never a 5xx: strangers can
        # reach this endpoint, so nothing they send may turn into a traceback. The order
        # matters: size first (before reading), the signature on the raw bytes next, and only
        # a request known to come from Slack is decoded and parsed.
        limit = request.client_max_size  # aiohttp's body limit (0: none)
        declared = request.content_length
        raw: bytes | None = None
        if not (limit and declared is not None and declared > limit):
            # Without a Content-Length, read() itself stops once the body outgrows the limit.
            with contextlib.suppress(web.HTTPRequestEntityTooLarge):
                raw = await request.read()
        if raw is None:
            logger.warning("Slack: refused a request body over %s bytes", limit)
            too_large = web.json_response(
                {"error": f"request body too large (the limit is {limit} bytes)"}, status=413
            )
            # The rest of the body is not wanted: close instead of reading it to reuse the line.
            too_large.force_close()
            return too_large
        if not self._has_valid_signature(raw, request.headers):
            logger.warning("Slack: rejected a request with a bad or stale signature")
            return web.json_response({"error": "invalid signature"}, status=401)
        if not raw:
            logger.warning("Slack: ignored a signed request with an empty body")
            return web.json_response({"error": "empty body"}, status=400)
        if request.content_type not in SLACK_CONTENT_TYPES:
            logger.warning("Slack: ignored a request of content type %.80r", request.content_type)
            return web.json_response({"error": "unsupported content type"}, status=415)
        try:
            body = raw.decode("utf-8")
        except UnicodeDecodeError:
            logger.warning("Slack: ignored a request body that is not UTF-8")
            return web.json_response({"error": "body is not UTF-8"}, status=400)
        try:
            bolt_request = AsyncBoltRequest(
                body=body,
                query=request.query_string,
                headers={key.lower(): value for key, value in request.headers.items()},
            )
        # Bolt assumes a JSON object: malformed JSON raises ValueError, and any other JSON value
        # (a list, null, a number) an AttributeError or TypeError while it reads the payload.
        except (ValueError, AttributeError, TypeError) as error:
            logger.warning("Slack: ignored a malformed request body: %.200s", error)
            return web.json_response({"error": "malformed body"}, status=400)
        retry = request.headers.get("X-Slack-Retry-Num")
        if retry is not None:
            # Only logged, never parsed: the pipeline dedupes on the event id. %r with a cap keeps
            # a huge or non-UTF-8 value (a lone surrogate once decoded) safe for any log sink.
            logger.info(
                "Slack: retry %.20r of an event (%.60r)",
                retry,
                request.headers.get("X-Slack-Retry-Reason"),
            )
        return await to_aiohttp_response(await self.app.async_dispatch(bolt_request))

    def _has_valid_signature(self, body: bytes, headers: MultiMapping[str]) -> bool:
        # Over the raw bytes, before anything decodes them; see adapters/slack_signature.py
        # for why slack_sdk's SignatureVerifier is not used here.
        secret = self.settings.slack_signing_secret
        if not secret:
            return False
        return SlackSignatureVerifier(secret).is_valid_request(body=body, headers=headers)

    # ------------------------------------------------------------------ bolt listeners

    async def _on_message_event(self, event: dict[str, Any], body: dict[str, Any]) -> None:
        self._take(
            self._handle_message_event(
                event, event_id=body.get("event_id"), team=body.get("team_id")
            ),
            what="message event",
        )

    async def _on_reaction_added(self, event: dict[str, Any]) -> None:
        self._take(self._handle_reaction(event, added=True), what="reaction")

    async def _on_reaction_removed(self, event: dict[str, Any]) -> None:
        self._take(self._handle_reaction(event, added=False), what="reaction")

    async def _on_slash_command(
        self, ack: AsyncAck, command: dict[str, Any], respond: AsyncRespond
    ) -> None:
        self._take(self._handle_slash_command(command, respond), what="slash command")
        await ack()

    def _take(self, work: Coroutine[Any, Any, None], *, what: str) -> None:
        if not self.tasks.spawn(work, what=what):
            raise _Stopping(what)

    async def _on_listener_error(self, error: Exception) -> None:
        # Bolt has answered 500 (no Socket Mode ack) either way; Slack delivers it again.
        if not isinstance(error, _Stopping):
            logger.error("Slack: a listener failed", exc_info=error)

    # ------------------------------------------------------------------ messages

    async def _handle_message_event(
        self, event: dict[str, Any], *, event_id: str | None, team: str | None
    ) -> None:
        subtype = event.get("subtype")
        if subtype == "message_changed":
            await self._handle_edit(event)
            return
        if subtype == "message_deleted":
            await self._handle_deletion(event)
            return
        from_bot = self._is_from_a_bot(event)
        if subtype not in _CONVERSATION_SUBTYPES and not from_bot:
            return  # not a person writing: a join, a topic change, …
        identity = self._identity()
        author = event.get("user") or event.get("bot_id")
        channel, ts = event.get("channel"), event.get("ts")
        if not (isinstance(author, str) and isinstance(channel, str) and isinstance(ts, str)):
            logger.warning("Slack: ignored a message event without user, channel or ts")
            return
        raw_text = str(event.get("text") or "")
        is_direct = event.get("channel_type") == "im" or channel.startswith("D")
        thread_ts = event.get("thread_ts")
        # A DM is one conversation unless the user threads; a channel mention starts a thread.
        thread = str(thread_ts or ("" if is_direct else ts))
        message = IncomingMessage(
            platform=PLATFORM,
            workspace=str(team or event.get("team") or identity.team_id),
            channel=channel,
            thread=thread,
            author_id=author,
            author_name=author,  # the display name is looked up once the event is not ignored
            role=Role.USER,
            text=self._plain_text(raw_text),
            timestamp=timestamp_of(ts),
            message_id=ts,
            event_id=event_id,
            is_direct=is_direct,
            mentions_bot=identity.user_id in mentioned_user_ids(raw_text),
        )
        routed = MessageEvent(
            message=message,
            from_bot=from_bot,
            is_addressed=is_direct or message.mentions_bot,
            in_thread=bool(thread_ts),
            author_is_agent=author in self.agent_ids,
            author_is_admin=author in self.admin_ids,
        )
        # Called into a thread that was going on without the bot: its earlier messages are
        # the context of the question.
        called_into_thread = bool(thread_ts) and thread_ts != ts
        await self.router.route(
            routed,
            reply=ThreadReply(
                client=self.client, channel=channel, thread_ts=thread or None, asker=author
            ),
            load_context=self._thread_context(message) if called_into_thread else None,
            enrich=self._with_author,
        )

    async def _with_author(self, event: MessageEvent) -> MessageEvent:
        user = await self.people.user(event.message.author_id)
        return replace(
            event,
            message=replace(event.message, author_name=user.name),
            author_manages_channel=user.is_workspace_admin,
        )

    def _thread_context(self, message: IncomingMessage) -> ContextLoader:
        """Loads the thread's newest earlier messages (``thread_history_limit``), oldest first."""

        async def load() -> list[IncomingMessage]:
            earlier = await self._earlier_thread_messages(message)
            context = []
            for item in earlier:
                user_id, ts = str(item["user"]), str(item["ts"])
                context.append(
                    replace(
                        message,
                        author_id=user_id,
                        author_name=(await self.people.user(user_id)).name,
                        role=Role.HUMAN_AGENT if user_id in self.agent_ids else Role.USER,
                        text=self._plain_text(str(item.get("text") or "")),
                        timestamp=timestamp_of(ts),
                        message_id=ts,
                        event_id=None,
                        mentions_bot=False,
                    )
                )
            return context

        return load

    async def _earlier_thread_messages(self, message: IncomingMessage) -> list[dict[str, Any]]:
        # Slack pages a thread oldest first; a long thread's newest turns are on its last
        # pages, so every page up to the question is read and only the newest are kept.
        kept: deque[dict[str, Any]] = deque(maxlen=self.thread_history_limit)
        cursor: str | None = None
        while True:
            try:
                response = await self.client.conversations_replies(
                    channel=message.channel,
                    ts=message.thread,
                    limit=self.thread_page_size,
                    cursor=cursor,
                )
            except SlackClientError as error:
                # Without channels:history the bot still answers, from what it has.
                logger.warning("Slack: could not read thread %s: %s", message.thread, error)
                break
            reached_question = False
            for earlier in response.get("messages") or []:
                if earlier.get("ts") == message.message_id:
                    reached_question = True  # the rest came after it
                    break
                if self._is_context_turn(earlier):
                    kept.append(earlier)
            cursor = (response.get("response_metadata") or {}).get("next_cursor") or None
            if reached_question or not response.get("has_more") or cursor is None:
                break
        return list(kept)

    def _is_context_turn(self, earlier: Mapping[str, Any]) -> bool:
        """A person's message in a thread, not a command to the bot."""
        is_human_turn = earlier.get("subtype") in _CONVERSATION_SUBTYPES
        has_ids = isinstance(earlier.get("ts"), str) and isinstance(earlier.get("user"), str)
        if not (is_human_turn and has_ids) or self._is_from_a_bot(earlier):
            return False
        return parse_bang_command(self._plain_text(str(earlier.get("text") or ""))) is None

    def _is_from_a_bot(self, event: Mapping[str, Any]) -> bool:
        identity = self._identity()
        return bool(
            event.get("bot_id")
            or event.get("subtype") == "bot_message"
            or event.get("user") == identity.user_id
        )

    async def _handle_edit(self, event: dict[str, Any]) -> None:
        edited = event.get("message") or {}
        previous = event.get("previous_message") or {}
        channel = event.get("channel")
        if not isinstance(channel, str) or not isinstance(edited.get("ts"), str):
            return
        # Slack also sends message_changed when a thread gets a reply or a link unfurls;
        # only a changed text is an edit.
        if self._is_from_a_bot(edited) or edited.get("text") == previous.get("text"):
            return
        updated = await self.router.edited(
            platform=PLATFORM,
            channel=channel,
            message_id=edited["ts"],
            text=self._plain_text(str(edited.get("text") or "")),
        )
        logger.info("Slack: edit of %s in %s stored: %s", edited["ts"], channel, updated)

    async def _handle_deletion(self, event: dict[str, Any]) -> None:
        channel, deleted_ts = event.get("channel"), event.get("deleted_ts")
        if isinstance(channel, str) and isinstance(deleted_ts, str):
            removed = await self.router.deleted(
                platform=PLATFORM, channel=channel, message_id=deleted_ts
            )
            logger.info("Slack: deletion of %s in %s applied: %s", deleted_ts, channel, removed)

    # ------------------------------------------------------------------ reactions

    async def _handle_reaction(self, event: dict[str, Any], *, added: bool) -> None:
        value = rating_of(str(event.get("reaction") or ""))
        item = event.get("item") or {}
        rater, channel, ts = event.get("user"), item.get("channel"), item.get("ts")
        if value is None or item.get("type") != "message":
            return
        if not (isinstance(rater, str) and isinstance(channel, str) and isinstance(ts, str)):
            return
        item_user = event.get("item_user")
        if item_user is not None and item_user != self._identity().user_id:
            return  # a reaction on someone else's message rates nothing
        stored = await self.router.rated(
            platform=PLATFORM,
            channel=channel,
            message_id=ts,
            rater_id=rater,
            value=value,
            added=added,
        )
        logger.info("Slack: rating %+d on %s (added=%s) stored: %s", value, ts, added, stored)

    # ------------------------------------------------------------------ slash commands

    async def _handle_slash_command(self, command: dict[str, Any], respond: AsyncRespond) -> None:
        word, _, arguments = str(command.get("text") or "").strip().partition(" ")
        user_id = str(command.get("user_id") or "")
        user = await self.people.user(user_id)
        request = CommandRequest(
            command=word or "help",
            arguments=arguments.strip(),
            platform=PLATFORM,
            workspace=str(command.get("team_id") or self._identity().team_id),
            channel=str(command.get("channel_id") or ""),
            user_id=user_id,
            user_name=user.name,
            user_is_admin=user_id in self.admin_ids,
            user_manages_channel=user.is_workspace_admin,
        )
        trigger_id = command.get("trigger_id")
        if trigger_id:
            # The trigger id names this invocation: a replayed request carries the same one.
            text = await self.router.run_command(request, delivery_key=f"slash:{trigger_id}")
            if text is None:
                return
        else:
            logger.info("Slack: a slash command without trigger_id runs without dedupe")
            text = await self.commands.run(request)
        # Only the person who asked sees the answer: status and refusals are nobody else's.
        if command.get("response_url"):
            await respond(text=escape(text), response_type="ephemeral")
        else:
            await self.client.chat_postEphemeral(
                channel=request.channel, user=user_id, text=escape(text)
            )

    # ------------------------------------------------------------------ retry queue

    async def _retry_undelivered_forever(self) -> None:
        while True:
            try:
                await self.deliver_undelivered()
            except Exception:
                logger.exception("Slack: the retry queue pass failed")
            await asyncio.sleep(self.retry_interval)

    async def deliver_undelivered(self) -> int:
        """Post the stored replies that could not be posted before; returns how many went out."""
        return await deliver_queued_replies(
            self.handler,
            platform=PLATFORM,
            post=self.post_queued_reply,
            transient_errors=(SlackClientError,),
        )

    async def post_queued_reply(self, reply: UndeliveredReply) -> str:
        """Post one queued reply; returns the ts of its first message (the one rated)."""
        return await post_queued_reply(self.client, reply)

    # ------------------------------------------------------------------ people

    def _plain_text(self, text: str) -> str:
        """Slack markup to stored text: the bot's own leading mention dropped, other mentions
        kept as ids."""
        return to_plain_text(without_leading_mention(text, self._identity().user_id)).strip()

    def _identity(self) -> BotIdentity:
        if self.identity is None:
            raise RuntimeError("SlackAdapter.start() has not run")
        return self.identity
