"""The Slack adapter: slack-bolt's async app in Socket Mode or HTTP mode.

Socket Mode when ``SLACK_APP_TOKEN`` is set; otherwise HTTP mode, where Events API requests,
interactivity and slash commands arrive on ``POST /slack/events`` (port ``SLACK_PORT``) and are
verified with ``SLACK_SIGNING_SECRET``. ``SLACK_BOT_TOKEN`` is always needed, and
``SLACK_API_URL`` points the Web API client elsewhere (proxies, gateways, tests).

Every event is acknowledged at once; the work (generation included) runs afterwards in tasks
this adapter tracks. Exactly one reply per message, across Slack's retries, the double delivery
of a channel mention as ``app_mention`` and ``message``, restarts and several instances: the
pipeline dedupes on the event id and on (channel, ts) in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Coroutine, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from aiohttp import web
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
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient

from adapters.base import MessageHandler
from adapters.slack_format import (
    SLACK_MESSAGE_LIMIT,
    escape,
    mentioned_user_ids,
    rating_of,
    timestamp_of,
    to_plain_text,
    without_leading_mention,
)
from bot.commands import CommandRequest, Commands, parse_bang_command
from bot.config import ConfigurationError, Settings
from bot.conversation import IncomingMessage, Platform, Role
from bot.replies import split_reply

logger = logging.getLogger(__name__)

PLATFORM = Platform.SLACK.value
EVENTS_PATH = "/slack/events"
#: Shown in the thread while the reply is generated, then edited into the reply.
PLACEHOLDER = "…"
#: Message subtypes that are people writing; every other subtype (joins, topic changes, …)
#: is not a conversation turn.
_CONVERSATION_SUBTYPES = frozenset({None, "thread_broadcast", "file_share", "me_message"})


class SlackHandler(MessageHandler, Protocol):
    """The pipeline as the Slack adapter uses it: it also stores context without answering."""

    async def remember(self, message: IncomingMessage) -> bool: ...


@dataclass(frozen=True, slots=True)
class BotIdentity:
    """Who the bot is in this workspace (from ``auth.test``)."""

    user_id: str
    bot_id: str
    team_id: str
    name: str


class SlackAdapter:
    """Connects the reply pipeline and the chat commands to one Slack workspace."""

    name = "slack"

    def __init__(
        self,
        *,
        settings: Settings,
        handler: SlackHandler,
        commands: Commands,
        host: str = "0.0.0.0",
        thread_history_limit: int = 50,
        retry_interval: float = 30.0,
        rate_limit_retries: int = 3,
        name_cache_size: int = 1_000,
    ) -> None:
        """``host`` is the HTTP mode listening address; ``retry_interval`` the seconds between
        two passes over the queue of replies that could not be posted; ``thread_history_limit``
        how many earlier messages of a thread are fetched when the bot is first called into it.
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
        self.host = host
        self.retry_interval = retry_interval
        self.thread_history_limit = thread_history_limit
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
        self.app.event("app_mention")(self._on_message_event)
        self.app.event("message")(self._on_message_event)
        self.app.event("reaction_added")(self._on_reaction_added)
        self.app.event("reaction_removed")(self._on_reaction_removed)
        self.app.command("/chatbot")(self._on_slash_command)
        self._verifier = (
            SignatureVerifier(settings.slack_signing_secret)
            if settings.slack_signing_secret
            else None
        )

        self.identity: BotIdentity | None = None
        self.port: int | None = None  # the bound HTTP port, once started
        self._names: OrderedDict[str, str] = OrderedDict()
        self._name_cache_size = name_cache_size
        self._recent_commands: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._retry_loop: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._socket: AsyncSocketModeHandler | None = None
        self._stop_requested = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        """Serve until :meth:`request_stop` or cancellation; 0 on a clean stop."""
        await self.start()
        try:
            await self._stop_requested.wait()
        finally:
            await self.stop()
        return 0

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def start(self) -> None:
        """Learn who the bot is, connect (Socket Mode) or listen (HTTP), start the retry queue.

        Raises:
            ConfigurationError: Slack refused the token or cannot be reached.
        """
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
            server = web.Application()
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
        self._retry_loop = asyncio.create_task(self._retry_undelivered_forever())

    async def stop(self) -> None:
        """Stop taking events, finish the work in flight, close the connection."""
        if self._retry_loop is not None:
            self._retry_loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry_loop
            self._retry_loop = None
        if self._socket is not None:
            await self._socket.close_async()
            self._socket = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.drain()

    async def drain(self) -> None:
        """Wait until every event received so far is fully handled."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

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
        self._remember_name(identity.user_id, identity.name)
        return identity

    # ------------------------------------------------------------------ HTTP mode

    async def _serve_http(self, request: web.Request) -> web.StreamResponse:
        try:
            body = (await request.read()).decode("utf-8")
        except UnicodeDecodeError:
            logger.warning("Slack: ignored a request body that is not UTF-8")
            return web.json_response({"error": "body is not UTF-8"}, status=400)
        if not self._has_valid_signature(body, request.headers):
            logger.warning("Slack: rejected a request with a bad or stale signature")
            return web.json_response({"error": "invalid signature"}, status=401)
        try:
            bolt_request = AsyncBoltRequest(
                body=body,
                query=request.query_string,
                headers={key.lower(): value for key, value in request.headers.items()},
            )
        except ValueError as error:  # malformed JSON
            logger.warning("Slack: ignored a malformed request body: %s", error)
            return web.json_response({"error": "malformed body"}, status=400)
        retry = request.headers.get("X-Slack-Retry-Num")
        if retry:
            logger.info(
                "Slack: retry %s of an event (%s)",
                retry,
                request.headers.get("X-Slack-Retry-Reason"),
            )
        return await to_aiohttp_response(await self.app.async_dispatch(bolt_request))

    def _has_valid_signature(self, body: str, headers: Mapping[str, str]) -> bool:
        if self._verifier is None:
            return False
        try:
            return self._verifier.is_valid_request(body, dict(headers))
        except ValueError:  # a timestamp header that is not a number
            return False

    # ------------------------------------------------------------------ bolt listeners

    async def _on_message_event(self, event: dict[str, Any], body: dict[str, Any]) -> None:
        self._spawn(
            self._handle_message_event(
                event, event_id=body.get("event_id"), team=body.get("team_id")
            ),
            what="message event",
        )

    async def _on_reaction_added(self, event: dict[str, Any]) -> None:
        self._spawn(self._handle_reaction(event, added=True), what="reaction")

    async def _on_reaction_removed(self, event: dict[str, Any]) -> None:
        self._spawn(self._handle_reaction(event, added=False), what="reaction")

    async def _on_slash_command(
        self, ack: AsyncAck, command: dict[str, Any], respond: AsyncRespond
    ) -> None:
        await ack()
        self._spawn(self._handle_slash_command(command, respond), what="slash command")

    def _spawn(self, work: Coroutine[Any, Any, None], *, what: str) -> None:
        task = asyncio.create_task(self._logged(work, what=what))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _logged(work: Awaitable[None], *, what: str) -> None:
        try:
            await work
        except Exception:
            logger.exception("Slack: failed to handle a %s", what)

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
        if subtype not in _CONVERSATION_SUBTYPES or self._is_from_a_bot(event):
            return
        identity = self._identity()
        user_id, channel, ts = event.get("user"), event.get("channel"), event.get("ts")
        if not (isinstance(user_id, str) and isinstance(channel, str) and isinstance(ts, str)):
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
            author_id=user_id,
            author_name=user_id,
            role=Role.USER,
            text=raw_text,
            timestamp=timestamp_of(ts),
            message_id=ts,
            event_id=event_id,
            is_direct=is_direct,
            mentions_bot=identity.user_id in mentioned_user_ids(raw_text),
        )
        is_addressed = message.is_direct or message.mentions_bot
        # Follow-ups in a thread the bot answered in need no new mention.
        in_bot_thread = (
            not is_addressed
            and bool(thread_ts)
            and await self.handler.bot_is_in_conversation(message)
        )
        if not (is_addressed or in_bot_thread):
            return  # channel chatter the bot is not part of
        # An agent writing in a bot thread without addressing the bot answers for it.
        is_agent_answer = in_bot_thread and user_id in self.agent_ids

        message = replace(
            message,
            author_name=await self._display_name(user_id),
            text=await self._plain_text(without_leading_mention(raw_text, identity.user_id)),
        )
        if is_agent_answer:
            stored = await self.handler.agent_answered(replace(message, role=Role.HUMAN_AGENT))
            logger.info("Slack: agent %s answered in %s (%s)", user_id, thread, stored)
            return
        bang = parse_bang_command(message.text)
        if bang is not None:
            await self._run_bang_command(message, *bang)
            return
        is_called_into_a_thread = bool(thread_ts) and thread_ts != ts and not in_bot_thread
        if is_called_into_a_thread and not await self.handler.bot_is_in_conversation(message):
            await self._remember_thread(message)
        reply = ThreadReply(client=self.client, channel=channel, thread_ts=thread or None)
        result = await self.handler.handle(message, send=reply.send, progress=reply.progress)
        logger.info("Slack: message %s in %s: %s", ts, channel, result.outcome)

    async def _remember_thread(self, message: IncomingMessage) -> None:
        """Store the thread's earlier messages, so that the history is the whole thread."""
        try:
            response = await self.client.conversations_replies(
                channel=message.channel, ts=message.thread, limit=self.thread_history_limit
            )
        except SlackClientError as error:
            # Without channels:history the bot still answers, from the mention alone.
            logger.warning("Slack: could not read thread %s: %s", message.thread, error)
            return
        for earlier in response.get("messages") or []:
            ts, user_id = earlier.get("ts"), earlier.get("user")
            if ts == message.message_id:
                break  # oldest first: the rest came after the mention
            is_human_turn = earlier.get("subtype") in _CONVERSATION_SUBTYPES
            if not (isinstance(ts, str) and isinstance(user_id, str)) or not is_human_turn:
                continue
            if self._is_from_a_bot(earlier):
                continue
            raw_text = str(earlier.get("text") or "")
            text = await self._plain_text(
                without_leading_mention(raw_text, self._identity().user_id)
            )
            if parse_bang_command(text) is not None:
                continue  # commands to the bot are not conversation
            await self.handler.remember(
                replace(
                    message,
                    author_id=user_id,
                    author_name=await self._display_name(user_id),
                    role=Role.HUMAN_AGENT if user_id in self.agent_ids else Role.USER,
                    text=text,
                    timestamp=timestamp_of(ts),
                    message_id=ts,
                    event_id=None,
                    mentions_bot=False,
                )
            )

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
        text = without_leading_mention(str(edited.get("text") or ""), self._identity().user_id)
        updated = await self.handler.message_edited(
            platform=PLATFORM,
            channel=channel,
            message_id=edited["ts"],
            text=await self._plain_text(text),
        )
        logger.info("Slack: edit of %s in %s stored: %s", edited["ts"], channel, updated)

    async def _handle_deletion(self, event: dict[str, Any]) -> None:
        channel, deleted_ts = event.get("channel"), event.get("deleted_ts")
        if isinstance(channel, str) and isinstance(deleted_ts, str):
            removed = await self.handler.message_deleted(
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
        change = self.handler.rating_added if added else self.handler.rating_removed
        stored = await change(
            platform=PLATFORM, channel=channel, answer_message_id=ts, rater_id=rater, value=value
        )
        logger.info("Slack: rating %+d on %s (added=%s) stored: %s", value, ts, added, stored)

    # ------------------------------------------------------------------ commands

    async def _handle_slash_command(self, command: dict[str, Any], respond: AsyncRespond) -> None:
        word, _, arguments = str(command.get("text") or "").strip().partition(" ")
        user_id = str(command.get("user_id") or "")
        request = CommandRequest(
            command=word or "help",
            arguments=arguments.strip(),
            platform=PLATFORM,
            workspace=str(command.get("team_id") or self._identity().team_id),
            channel=str(command.get("channel_id") or ""),
            user_id=user_id,
            user_name=str(command.get("user_name") or user_id),
            user_is_admin=user_id in self.admin_ids,
        )
        text = await self.commands.run(request)
        # Only the person who asked sees the answer: status and refusals are nobody else's.
        if command.get("response_url"):
            await respond(text=escape(text), response_type="ephemeral")
        else:
            await self.client.chat_postEphemeral(
                channel=request.channel, user=user_id, text=escape(text)
            )

    async def _run_bang_command(self, message: IncomingMessage, word: str, arguments: str) -> None:
        # Commands do not go through the pipeline, so its database dedupe does not cover them;
        # a recent-message memory catches the double delivery and Slack's retries.
        key = (message.channel, message.message_id)
        if key in self._recent_commands:
            return
        self._recent_commands[key] = None
        if len(self._recent_commands) > 1_000:
            self._recent_commands.popitem(last=False)
        text = await self.commands.run(
            CommandRequest(
                command=word,
                arguments=arguments,
                platform=PLATFORM,
                workspace=message.workspace,
                channel=message.channel,
                user_id=message.author_id,
                user_name=message.author_name,
                user_is_admin=message.author_id in self.admin_ids,
            )
        )
        await _post_chunks(
            self.client,
            channel=message.channel,
            thread_ts=message.thread or None,
            chunks=_chunks(text),
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
        delivered = 0
        for reply in await self.handler.undelivered_replies(platform=PLATFORM):
            try:
                ts = await _post_chunks(
                    self.client,
                    channel=reply.channel,
                    thread_ts=reply.thread or None,
                    chunks=_chunks(reply.text),
                )
            except SlackClientError as error:
                logger.warning("Slack: reply %d still cannot be posted: %s", reply.answer_id, error)
                await self.handler.reply_not_delivered(answer_id=reply.answer_id)
                continue
            except BaseException:
                # Claimed but not sent (a bug, a cancelled task): back into the queue.
                await asyncio.shield(self.handler.reply_not_delivered(answer_id=reply.answer_id))
                raise
            await self.handler.reply_delivered(answer_id=reply.answer_id, platform_message_id=ts)
            delivered += 1
        if delivered:
            logger.warning(
                "Slack: posted %d queued repl%s", delivered, "y" if delivered == 1 else "ies"
            )
        return delivered

    # ------------------------------------------------------------------ names

    async def _display_name(self, user_id: str) -> str:
        if user_id in self._names:
            self._names.move_to_end(user_id)
            return self._names[user_id]
        try:
            response = await self.client.users_info(user=user_id)
        except SlackClientError as error:
            # Not cached: the next message tries again.
            logger.warning("Slack: users.info for %s failed: %s", user_id, error)
            return user_id
        user = response.get("user") or {}
        profile = user.get("profile") or {}
        name = str(
            profile.get("display_name")
            or profile.get("real_name")
            or user.get("real_name")
            or user.get("name")
            or user_id
        )
        self._remember_name(user_id, name)
        return name

    def _remember_name(self, user_id: str, name: str) -> None:
        self._names[user_id] = name
        self._names.move_to_end(user_id)
        while len(self._names) > self._name_cache_size:
            self._names.popitem(last=False)

    async def _plain_text(self, text: str) -> str:
        names = {user_id: await self._display_name(user_id) for user_id in mentioned_user_ids(text)}
        return to_plain_text(text, names=names).strip()

    def _identity(self) -> BotIdentity:
        if self.identity is None:
            raise RuntimeError("SlackAdapter.start() has not run")
        return self.identity


class ThreadReply:
    """One reply being written into one thread: a placeholder, streamed edits, the final text."""

    def __init__(self, *, client: AsyncWebClient, channel: str, thread_ts: str | None) -> None:
        self.client = client
        self.channel = channel
        self.thread_ts = thread_ts
        self.placeholder_ts: str | None = None

    async def progress(self, *, text: str, in_reply_to: IncomingMessage) -> None:
        preview = escape(_chunks(text)[0] + " …") if text else PLACEHOLDER
        if self.placeholder_ts is None:
            response = await self.client.chat_postMessage(
                channel=self.channel, thread_ts=self.thread_ts, text=preview
            )
            self.placeholder_ts = str(response["ts"])
        else:
            await self.client.chat_update(
                channel=self.channel, ts=self.placeholder_ts, text=preview
            )

    async def send(self, *, text: str, in_reply_to: IncomingMessage) -> str:
        """Post the final reply; returns the ts of its first message, the one rated."""
        chunks = _chunks(text)
        if self.placeholder_ts is None:
            return await _post_chunks(
                self.client, channel=self.channel, thread_ts=self.thread_ts, chunks=chunks
            )
        await self.client.chat_update(
            channel=self.channel, ts=self.placeholder_ts, text=escape(chunks[0])
        )
        await _post_chunks(
            self.client, channel=self.channel, thread_ts=self.thread_ts, chunks=chunks[1:]
        )
        return self.placeholder_ts


def _chunks(text: str) -> list[str]:
    return split_reply(text, limit=SLACK_MESSAGE_LIMIT) or [PLACEHOLDER]


async def _post_chunks(
    client: AsyncWebClient, *, channel: str, thread_ts: str | None, chunks: list[str]
) -> str:
    """Post each chunk as a message of its own; returns the first message's ts."""
    first_ts = ""
    for chunk in chunks:
        response = await client.chat_postMessage(
            channel=channel, thread_ts=thread_ts, text=escape(chunk)
        )
        first_ts = first_ts or str(response["ts"])
    return first_ts
