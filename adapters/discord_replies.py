"""Answering on Discord: typing, the streamed and split reply (referencing the question),
private answers to commands, and posting queued replies (editing their first message when it
is already there, adopting one that landed before a crash)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import aiohttp
import discord

from bot.conversation import IncomingMessage
from bot.replies import split_reply
from bot.service import PartialDelivery
from bot.storage import UndeliveredReply

logger = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000  # characters per Discord message
TYPING_REFRESH = 8.0  # seconds; Discord shows "typing…" for about 10 s per trigger
LANDED_SCAN = 50  # messages after a question searched for a queued reply already posted
#: What a failed REST call raises: Discord's answer, or the connection to it.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (discord.HTTPException, aiohttp.ClientError)
DM_REFUSED = (
    "I couldn't send you the answer as a direct message. Allow direct messages from this "
    "server's members (Privacy Settings) and ask again, or use `/chatbot`."
)


class DiscordReply:
    """How one Discord message is answered: typing, the streamed and split reply, and private
    answers to commands (the router's :class:`adapters.routing.Replier`)."""

    def __init__(self, *, message: discord.Message) -> None:
        self.message = message
        self.first: discord.Message | None = None
        self._typing: asyncio.Task[None] | None = None

    async def progress(self, *, text: str, in_reply_to: IncomingMessage) -> str | None:
        """Typing first (no message, so no id), then the first chunk, posted and edited."""
        if not text:
            await self._start_typing()
            return str(self.first.id) if self.first is not None else None
        shown = split_reply(text, limit=MESSAGE_LIMIT)[0]
        if self.first is None:
            self.first = await self._post(shown, ping=True)
        elif self.first.content != shown:
            self.first = await self.first.edit(content=shown)
        return str(self.first.id)

    async def send(self, *, text: str, in_reply_to: IncomingMessage) -> str:
        """Post (or finish streaming) the reply; the id of its first message, which carries it.

        Raises :class:`PartialDelivery` when its start is on Discord but not all of it, with
        how many chunks are complete there.
        """
        self.stop_typing()
        chunks = split_reply(text, limit=MESSAGE_LIMIT) or ["…"]
        if self.first is None:
            self.first = await self._post(chunks[0], ping=True)  # fails: nothing was posted
        first_id = str(self.first.id)
        complete = 0
        try:
            if self.first.content != chunks[0]:
                self.first = await self.first.edit(content=chunks[0])
            complete = 1
            for chunk in chunks[1:]:
                await self._post(chunk, ping=False)
                complete += 1
        except Exception as error:
            raise PartialDelivery(first_id, str(error), chunks_sent=complete) from error
        return first_id

    async def send_private(self, *, text: str) -> None:
        """In a DM, reply there; in a server, send the answer to the asker as a DM."""
        chunks = split_reply(text, limit=MESSAGE_LIMIT) or ["Done."]
        if is_direct(self.message.channel):
            for index, chunk in enumerate(chunks):
                await self._post(chunk, ping=index == 0)
            return
        try:
            direct = await self.message.author.create_dm()
            for chunk in chunks:
                await direct.send(chunk, allowed_mentions=allowed_mentions(ping=False))
        except discord.Forbidden as error:
            # The asker does not take DMs from server members: say so, not what was asked.
            logger.warning("could not DM Discord user %s: %s", self.message.author.id, error)
            await self._post(DM_REFUSED, ping=True)

    async def attach(self, *, path: Path, text: str) -> None:
        """The file as an attachment of a reply to the command, ``text`` as its content."""
        await self.message.channel.send(
            text,
            file=discord.File(path, filename=path.name),
            reference=self.message.to_reference(fail_if_not_exists=False),
            allowed_mentions=allowed_mentions(ping=False),
        )

    async def _post(self, text: str, *, ping: bool) -> discord.Message:
        return await self.message.channel.send(
            text,
            reference=self.message.to_reference(fail_if_not_exists=False),
            allowed_mentions=allowed_mentions(ping=ping),
        )

    async def _start_typing(self) -> None:
        if self._typing is not None:
            return
        # The first trigger is awaited, like Slack's placeholder: the indicator is up before
        # generation starts, and a stop at this point leaves nothing behind on Discord.
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await self.message.channel.typing()
        self._typing = asyncio.create_task(self._keep_typing())

    def stop_typing(self) -> None:
        if self._typing is not None:
            self._typing.cancel()
            self._typing = None

    async def _keep_typing(self) -> None:
        # Typing is cosmetic: whatever stops it (Discord, the connection, a closed client)
        # must not surface as an error.
        with contextlib.suppress(*TRANSIENT_ERRORS, RuntimeError):
            while True:
                await asyncio.sleep(TYPING_REFRESH)  # one trigger is shown for about 10 s
                await self.message.channel.typing()


async def post_queued_reply(
    client: discord.Client, pending: UndeliveredReply, *, bot_user_id: int | None
) -> str | None:
    """Post one queued reply: edit its placeholder (the start of it already on Discord)
    when it has one and its first chunk is not complete, then post the chunks not yet on
    Discord as replies to the question.

    Raises:
        PartialDelivery: it failed part-way again; says how many chunks are complete now.
    """
    channel = client.get_partial_messageable(int(pending.channel))
    chunks = split_reply(pending.text, limit=MESSAGE_LIMIT) or ["…"]
    first_id: str | None = None
    complete = 0  # how many of the reply's chunks are on Discord
    if pending.placeholder_id and pending.chunks_sent > 0:
        # Chunks 1..chunks_sent went up before: only what follows is posted.
        first_id, complete = pending.placeholder_id, pending.chunks_sent
    elif not pending.placeholder_id:
        # Posted before, with no id recorded (the bot died while Discord answered): the
        # messages already there are the reply's start; only the rest is posted.
        landed = await _landed(channel, pending, chunks, bot_user_id=bot_user_id)
        if landed:
            first_id, complete = landed[0], len(landed)
    else:
        try:
            await channel.get_partial_message(int(pending.placeholder_id)).edit(content=chunks[0])
        except discord.NotFound:
            logger.warning(
                "the start of reply %d was deleted from Discord; posting it in full",
                pending.answer_id,
            )
        else:
            first_id, complete = pending.placeholder_id, 1
    reference = (
        discord.MessageReference(
            message_id=int(pending.in_reply_to),
            channel_id=int(pending.channel),
            fail_if_not_exists=False,
        )
        if pending.in_reply_to
        else None
    )
    for chunk in chunks[complete:]:
        try:
            sent = await channel.send(
                chunk,
                reference=reference,  # type: ignore[arg-type]
                allowed_mentions=allowed_mentions(ping=first_id is None),
            )
        except Exception as error:
            if first_id is None:
                raise  # nothing of the reply is on Discord
            raise PartialDelivery(first_id, str(error), chunks_sent=complete) from error
        first_id = first_id or str(sent.id)
        complete += 1
    return first_id


async def _landed(
    channel: discord.PartialMessageable,
    pending: UndeliveredReply,
    chunks: list[str],
    *,
    bot_user_id: int | None,
) -> list[str]:
    """The ids of the bot's messages replying to ``pending``'s question that already show
    its first chunks, in order (none when it has no question or Discord cannot tell)."""
    if not pending.in_reply_to or bot_user_id is None:
        return []
    question = int(pending.in_reply_to)
    replies: list[discord.Message] = []
    try:
        # Replies follow their question closely: the messages right after it suffice.
        async for message in channel.history(limit=LANDED_SCAN, after=discord.Object(question)):
            reference = message.reference
            if message.author.id == bot_user_id and (
                reference is not None and reference.message_id == question
            ):
                replies.append(message)
    except discord.HTTPException as error:
        # Posting the reply (perhaps twice) beats losing it.
        logger.warning("could not look for reply %d on Discord: %s", pending.answer_id, error)
        return []
    landed: list[str] = []
    for message, chunk in zip(replies, chunks, strict=False):
        if message.content != chunk:
            break
        landed.append(str(message.id))
    return landed


def allowed_mentions(*, ping: bool) -> discord.AllowedMentions:
    # Model output must never ping @everyone, roles or users; only the asker, once.
    return discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=ping)


def is_direct(channel: Any) -> bool:
    """Whether ``channel`` is a DM (or group DM), also when only partly known."""
    if isinstance(channel, discord.DMChannel | discord.GroupChannel):
        return True
    return isinstance(channel, discord.PartialMessageable) and channel.guild_id is None
