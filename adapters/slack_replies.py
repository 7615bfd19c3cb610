"""Answering on Slack: a placeholder, streamed edits, the final reply in chunks, private
command answers, and posting queued replies (editing their placeholder when there is one)."""

from __future__ import annotations

import logging
from pathlib import Path

from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack_format import SLACK_MESSAGE_LIMIT, escape
from bot.conversation import IncomingMessage
from bot.replies import split_reply
from bot.service import PartialDelivery
from bot.storage import UndeliveredReply

logger = logging.getLogger(__name__)

#: Shown in the thread while the reply is generated, then edited into the reply.
PLACEHOLDER = "…"
#: Messages after a question searched for a queued reply that already landed.
LANDED_SCAN = 50


class ThreadReply:
    """Answers one message on Slack (a :class:`adapters.routing.Replier`): a placeholder in
    the thread, streamed edits, the final text; command answers go to the asker alone."""

    def __init__(
        self, *, client: AsyncWebClient, channel: str, thread_ts: str | None, asker: str
    ) -> None:
        self.client = client
        self.channel = channel
        self.thread_ts = thread_ts
        self.asker = asker
        self.placeholder_ts: str | None = None

    async def progress(self, *, text: str, in_reply_to: IncomingMessage) -> str | None:
        """Post the placeholder, then edit the text so far into it; returns its ts."""
        preview = escape(_chunks(text)[0]) if text else PLACEHOLDER
        if self.placeholder_ts is None:
            response = await self.client.chat_postMessage(
                channel=self.channel, thread_ts=self.thread_ts, text=preview
            )
            self.placeholder_ts = str(response["ts"])
        else:
            await self.client.chat_update(
                channel=self.channel, ts=self.placeholder_ts, text=preview
            )
        return self.placeholder_ts

    async def send(self, *, text: str, in_reply_to: IncomingMessage) -> str:
        """Post the final reply; returns the ts of its first message, the one rated.

        Raises:
            PartialDelivery: the placeholder or the reply's first message is in the thread
                but the reply is not complete (with how many chunks are); the retry
                finishes it without posting any chunk again.
            SlackClientError: nothing of the reply reached Slack.
        """
        chunks = _chunks(text)
        if self.placeholder_ts is None:
            return await _post_chunks(
                self.client, channel=self.channel, thread_ts=self.thread_ts, chunks=chunks
            )
        try:
            await self.client.chat_update(
                channel=self.channel, ts=self.placeholder_ts, text=escape(chunks[0])
            )
        except SlackClientError as error:
            raise PartialDelivery(self.placeholder_ts, str(error), chunks_sent=0) from error
        await _post_chunks(
            self.client,
            channel=self.channel,
            thread_ts=self.thread_ts,
            chunks=chunks[1:],
            first_ts=self.placeholder_ts,
            chunks_before=1,
        )
        return self.placeholder_ts

    async def send_private(self, *, text: str) -> None:
        """An ephemeral message to the asker, in the thread: nobody else sees it."""
        for chunk in _chunks(text):
            await self.client.chat_postEphemeral(
                channel=self.channel, user=self.asker, thread_ts=self.thread_ts, text=escape(chunk)
            )

    async def attach(self, *, path: Path, text: str) -> None:
        """Upload the file into the thread (``files_upload_v2``), ``text`` as its comment."""
        await self.client.files_upload_v2(
            channel=self.channel,
            thread_ts=self.thread_ts,
            file=str(path),
            filename=path.name,
            title=path.name,
            initial_comment=escape(text),
        )


def _chunks(text: str) -> list[str]:
    return split_reply(text, limit=SLACK_MESSAGE_LIMIT) or [PLACEHOLDER]


async def _post_chunks(
    client: AsyncWebClient,
    *,
    channel: str,
    thread_ts: str | None,
    chunks: list[str],
    first_ts: str | None = None,
    chunks_before: int = 0,
) -> str:
    """Post each chunk as a message of its own; returns the first message's ts.

    ``first_ts`` is the reply's first message when it is already in the thread, and
    ``chunks_before`` how many of the reply's chunks are complete there before ``chunks``.

    Raises:
        PartialDelivery: a chunk failed after the reply's first message went up, with the
            number of the reply's chunks that are complete.
    """
    for posted, chunk in enumerate(chunks):
        try:
            response = await client.chat_postMessage(
                channel=channel, thread_ts=thread_ts, text=escape(chunk)
            )
        except SlackClientError as error:
            if first_ts is not None:
                raise PartialDelivery(
                    first_ts, str(error), chunks_sent=chunks_before + posted
                ) from error
            raise
        first_ts = first_ts or str(response["ts"])
    return first_ts or ""


async def post_queued_reply(
    client: AsyncWebClient, reply: UndeliveredReply, *, bot_user_id: str
) -> str:
    """Post one queued reply; returns the ts of its first message (the one rated).

    When the reply's placeholder (or its start) is already in the thread, that message is
    edited into the reply (unless its first chunk is complete already) and only the chunks
    not yet in the thread are posted. With no message recorded, the bot's messages after the
    question that already show the reply's first chunks (posted just before a crash, their
    ts never recorded) count as posted.

    Raises:
        PartialDelivery: it failed part-way again; says how many chunks are complete now.
    """
    chunks = _chunks(reply.text)
    thread_ts = reply.thread or None
    if reply.placeholder_id and reply.chunks_sent > 0:
        # Chunks 1..chunks_sent are in the thread already: only what follows is posted.
        await _post_chunks(
            client,
            channel=reply.channel,
            thread_ts=thread_ts,
            chunks=chunks[reply.chunks_sent :],
            first_ts=reply.placeholder_id,
            chunks_before=reply.chunks_sent,
        )
        return reply.placeholder_id
    if reply.placeholder_id:
        try:
            await client.chat_update(
                channel=reply.channel, ts=reply.placeholder_id, text=escape(chunks[0])
            )
        except SlackApiError as error:
            if error.response.get("error") != "message_not_found":
                raise
            # Someone deleted the placeholder: the reply is posted as a new message.
            logger.info("Slack: placeholder %s is gone; posting anew", reply.placeholder_id)
        else:
            await _post_chunks(
                client,
                channel=reply.channel,
                thread_ts=thread_ts,
                chunks=chunks[1:],
                first_ts=reply.placeholder_id,
                chunks_before=1,
            )
            return reply.placeholder_id
    landed = [] if reply.placeholder_id else await _landed(client, reply, chunks, bot_user_id)
    if landed:
        logger.info("Slack: reply %d was already posted (%s)", reply.answer_id, landed[0])
    return await _post_chunks(
        client,
        channel=reply.channel,
        thread_ts=thread_ts,
        chunks=chunks[len(landed) :],
        first_ts=landed[0] if landed else None,
        chunks_before=len(landed),
    )


async def _landed(
    client: AsyncWebClient, reply: UndeliveredReply, chunks: list[str], bot_user_id: str
) -> list[str]:
    """The ts of the bot's messages right after ``reply``'s question that show its first
    chunks, in order (none when it has no question or Slack cannot tell)."""
    if not reply.in_reply_to:
        return []
    channel, question_ts = reply.channel, reply.in_reply_to
    try:
        if reply.thread:
            response = await client.conversations_replies(
                channel=channel, ts=reply.thread, oldest=question_ts, limit=LANDED_SCAN
            )
        else:  # a DM's reply is a message of its own in the conversation
            response = await client.conversations_history(
                channel=channel, oldest=question_ts, limit=LANDED_SCAN
            )
    except SlackClientError as error:
        # Posting the reply (perhaps twice) beats losing it.
        logger.warning("Slack: could not look for reply %d: %s", reply.answer_id, error)
        return []
    question = _ts_key(question_ts)
    ours = sorted(
        (
            message
            for message in response.get("messages") or []
            if message.get("user") == bot_user_id and _ts_key(message.get("ts")) > question
        ),
        key=lambda message: _ts_key(message.get("ts")),
    )
    landed: list[str] = []
    for message, chunk in zip(ours, chunks, strict=False):
        if message.get("text") != escape(chunk):
            break
        landed.append(str(message["ts"]))
    return landed


def _ts_key(ts: object) -> tuple[int, ...]:
    """A Slack ts (``"1700000000.000100"``) as a sortable key; exact, unlike a float."""
    try:
        return tuple(int(part) for part in str(ts).split("."))
    except ValueError:
        return ()
