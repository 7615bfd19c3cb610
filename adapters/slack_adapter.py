"""The Slack adapter: slack-bolt's async app in Socket Mode or HTTP mode.

Socket Mode when ``SLACK_APP_TOKEN`` is set; otherwise HTTP mode, where Events API requests,
interactivity and slash commands arrive on ``POST /slack/events`` (port ``SLACK_PORT``) and are
verified with ``SLACK_SIGNING_SECRET``. ``SLACK_BOT_TOKEN`` is always needed, and
``SLACK_API_URL`` points the Web API client elsewhere (proxies, gateways, tests).

This module only translates: a Slack event becomes a :class:`adapters.routing.MessageEvent`
(or an edit, a deletion, a rating), and a :class:`adapters.slack_replies.ThreadReply` says how
to answer it (:mod:`adapters.slack_people` says who people are, :mod:`adapters.slack_threads`
reads a thread's earlier messages, :mod:`adapters.slack_http` serves HTTP mode). What the event
is (ignored, a command, an agent's answer, a turn) is the shared
:class:`adapters.routing.Router`'s decision.
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
from collections.abc import Coroutine, Mapping
from dataclasses import replace
from typing import Any

import aiohttp
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_bolt.context.ack.async_ack import AsyncAck
from slack_bolt.context.respond.async_respond import AsyncRespond
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from adapters.routing import (
    EventTasks,
    MessageEvent,
    RoutedHandler,
    Router,
    deliver_queued_replies,
)
from adapters.slack_format import (
    CONVERSATION_SUBTYPES,
    escape,
    is_from_a_bot,
    mentioned_user_ids,
    rating_of,
    stored_text,
    timestamp_of,
)
from adapters.slack_http import EVENTS_PATH, SlackHttpEndpoint
from adapters.slack_people import BotIdentity, SlackPeople
from adapters.slack_replies import ThreadReply, post_queued_reply
from adapters.slack_scopes import LISTENED_EVENTS, SLASH_COMMAND
from adapters.slack_threads import SlackThreadContext
from bot.commands import CommandRequest, Commands
from bot.config import ConfigurationError, Settings
from bot.conversation import IncomingMessage, Platform, Role
from bot.storage import UndeliveredReply

logger = logging.getLogger(__name__)

PLATFORM = Platform.SLACK.value


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
            # HTTP requests are verified by SlackHttpEndpoint before bolt parses them, so that a
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
        self.threads = SlackThreadContext(
            client=self.client,
            people=self.people,
            agent_ids=self.agent_ids,
            history_limit=(
                settings.history_turns if thread_history_limit is None else thread_history_limit
            ),
            page_size=thread_page_size,
        )
        self._http = (
            None
            if self.uses_socket_mode
            else SlackHttpEndpoint(
                app=self.app, tasks=self.tasks, signing_secret=settings.slack_signing_secret
            )
        )
        self._retry_loop: asyncio.Task[None] | None = None
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
        self.identity = await self.people.identify_bot()
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
        elif self._http is not None:
            self.port = await self._http.start(host=self.host, port=self.settings.slack_port)
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
        if self._http is not None:
            # Kept open while draining, answering 503, so Slack retries instead of timing out.
            await self._http.close()
        await self._close_session()

    async def _close_session(self) -> None:
        session, self.client.session = self.client.session, None
        if session is not None:
            await session.close()

    async def drain(self) -> None:
        """Wait until every event received so far is fully handled."""
        await self.tasks.drain()

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
        if subtype not in CONVERSATION_SUBTYPES and not from_bot:
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
            load_context=(
                self.threads.loader(message, bot_user_id=identity.user_id)
                if called_into_thread
                else None
            ),
            enrich=self._with_author,
        )

    async def _with_author(self, event: MessageEvent) -> MessageEvent:
        user = await self.people.user(event.message.author_id)
        return replace(
            event,
            message=replace(event.message, author_name=user.name),
            author_manages_channel=user.is_workspace_admin,
        )

    def _is_from_a_bot(self, event: Mapping[str, Any]) -> bool:
        return is_from_a_bot(event, bot_user_id=self._identity().user_id)

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
        return await post_queued_reply(self.client, reply, bot_user_id=self._identity().user_id)

    # ------------------------------------------------------------------ identity

    def _plain_text(self, text: str) -> str:
        return stored_text(text, bot_user_id=self._identity().user_id)

    def _identity(self) -> BotIdentity:
        if self.identity is None:
            raise RuntimeError("SlackAdapter.start() has not run")
        return self.identity
