"""The reply pipeline every adapter uses.

dedupe → store the incoming message → load the conversation history → format → generate →
store the reply and the exchange → hand the reply to the adapter to send.

The incoming message is committed before generation starts, so a failure later loses nothing:
the user gets a short apology, one trace is logged, and the message stays marked unanswered.

Nothing lost, nothing twice: the message is stored claimed by this instance (its id), and
:meth:`ReplyPipeline.recover` (run at start and then periodically) answers the messages whose
claimant is gone (crashed, killed, cancelled) while they are young enough, queueing the reply
for the adapters' retry queue; older ones are marked ``gave_up``. The messages of one
conversation are answered one after the other, in the order they were stored, so each prompt
sees the answers to the earlier ones, across replicas too (see
:meth:`ReplyPipeline._history_in_turn`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

# The pipeline's contracts live in bot.contracts; importing them from here works too.
from bot.contracts import (
    UNFINISHED,
    GeneratedReply,
    ModelBusy,
    Outcome,
    PartialDelivery,
    PipelineObserver,
    PipelineOptions,
    PipelineResult,
    ProgressSink,
    RecoveryReport,
    ReplyGenerator,
    ReplySender,
    ReplyStream,
    StreamingReplyGenerator,
)
from bot.conversation import IncomingMessage, Role, Turn, to_chat_messages, utcnow
from bot.observability.structured_logs import request_context
from bot.pacing import EditBudgets
from bot.platform_records import PlatformRecords
from bot.storage import (
    AnsweredBy,
    AnswerState,
    DeliveryState,
    StorageError,
    Store,
    StoreTime,
    conversation_history,
    record_answer,
    record_incoming,
)
from bot.storage.claims import (
    claim_unanswered,
    drop_instance_lease,
    give_up_unanswered,
    instance_id,
    release_answer_claim,
    renew_instance_lease,
    set_reply_placeholder,
)
from bot.storage.history import history_in_turn, record_incoming_in_turn
from bot.storage.tables import MessageRecord

logger = logging.getLogger(__name__)

APOLOGY = (
    "Sorry, something went wrong while I was answering. "
    "Your message is saved; please try again in a moment."
)
BUSY_REPLY = "Sorry, I'm answering a lot of messages right now. Please try again shortly."
STORAGE_APOLOGY = (
    "Sorry, I can't reach my database right now, so I can't answer. Please try again in a moment."
)


class ReplyPipeline(PlatformRecords):
    """One async pipeline shared by every adapter (what it records of platform events besides
    messages to answer: :class:`bot.platform_records.PlatformRecords`)."""

    def __init__(
        self,
        *,
        store: Store,
        generator: ReplyGenerator,
        options: PipelineOptions,
        instance: str | None = None,
        observer: PipelineObserver | None = None,
    ) -> None:
        """``instance`` names this instance in the claims (default: host, pid and a random
        part, unique per pipeline); ``observer`` is told of every message handled."""
        self.store = store
        self.generator = generator
        self._checked_generator: object = None
        self._streaming: StreamingReplyGenerator | None = None
        self.options = options
        self.observer = observer
        self.instance = instance or instance_id()
        self._lease_renewed_at: float | None = None
        self._edits = EditBudgets(rate=options.progress_edits_per_second)
        # One condition per conversation with messages waiting for their turn: woken when a
        # message of it is done, so a waiting one goes on at once within this process.
        self._turns: weakref.WeakValueDictionary[int, asyncio.Condition] = (
            weakref.WeakValueDictionary()
        )

    async def handle(
        self,
        message: IncomingMessage,
        *,
        send: ReplySender,
        progress: ProgressSink | None = None,
    ) -> PipelineResult:
        """Answer ``message`` once, however often it is delivered.

        With ``progress``, the reply is streamed to it while it is generated (when the model
        can stream); ``send`` always gets the final text.
        """
        started = time.perf_counter()
        request_id = request_id_for(message.platform, message.event_id or message.message_id)
        with request_context(request_id), Store.timed() as store_time:
            result = await self._handle(
                message, send=send, progress=progress, store_time=store_time
            )
            if self.observer is not None:
                self.observer.handled(
                    platform=message.platform, result=result, seconds=time.perf_counter() - started
                )
            return result

    async def _handle(
        self,
        message: IncomingMessage,
        *,
        send: ReplySender,
        progress: ProgressSink | None,
        store_time: StoreTime,
    ) -> PipelineResult:
        received = time.perf_counter()
        limit = self.options.max_message_chars
        if len(message.text) > limit:
            return await self._refuse(message, send=send)

        # Dedupe and store, claimed by this instance, committed before anything can fail later;
        # in the same call, the history when it is the message's turn.
        try:
            stored, turns = await self.store.run(
                record_incoming_in_turn,
                message=message,
                claimed_by=self.instance,
                lease_seconds=self._lease_due(),
                since=self._unanswered_since(),
                limit=self.options.history_turns,
            )
        except StorageError:
            logger.exception("could not store an incoming %s message", message.platform)
            delivered = await self._send_quietly(send, STORAGE_APOLOGY, message)
            return PipelineResult(Outcome.FAILED, reply=STORAGE_APOLOGY, delivered=delivered)
        if stored is None:
            logger.info(
                "duplicate delivery of %s message %s ignored", message.platform, message.message_id
            )
            return PipelineResult(Outcome.DUPLICATE)
        assert stored.id is not None
        if message.role != Role.USER or not message.text.strip():
            return PipelineResult(Outcome.IGNORED, message_id=stored.id)

        # Its turn → history → prompt messages → generation → the reply stored.
        try:
            generated, answer_id, exchange_id = await self._answer(
                stored,
                progress=progress,
                message=message,
                delivery=DeliveryState.PENDING,
                busy_state=AnswerState.REFUSED,
                received=received,
                store_time=store_time,
                turns=turns,
            )
        except ModelBusy:
            # Told to try again: not answered later behind the user's back (state refused).
            logger.warning("the model is busy; %s message %s refused", message.platform, stored.id)
            delivered = await self._send_quietly(send, BUSY_REPLY, message)
            return PipelineResult(
                Outcome.REFUSED, reply=BUSY_REPLY, message_id=stored.id, delivered=delivered
            )
        except Exception:
            logger.exception("failed to answer %s message %s", message.platform, message.message_id)
            delivered = await self._send_quietly(send, APOLOGY, message)
            return PipelineResult(
                Outcome.FAILED, reply=APOLOGY, message_id=stored.id, delivered=delivered
            )

        # Send; the reply is already stored, so a failed send can be retried later. Delivery is
        # recorded the moment the platform accepted it: a crash in between is the one window
        # where the retry could post the reply a second time. The note (older history left
        # out...) is for the user only: the stored reply, the one trained on, goes without it.
        reply = generated.text
        shown = f"{reply}\n\n{generated.note}" if generated.note else reply
        try:
            platform_id = await send(text=shown, in_reply_to=message)
        except PartialDelivery as partial:
            logger.warning(
                "the reply to %s message %s was only partly sent: %s",
                message.platform,
                message.message_id,
                partial,
            )
            await self._queue_partial(answer_id, partial.message_id, partial.chunks_sent)
            return PipelineResult(
                Outcome.ANSWERED, reply=reply, message_id=stored.id, exchange_id=exchange_id
            )
        except asyncio.CancelledError:
            await self._set_delivery(answer_id, DeliveryState.FAILED, None)
            raise
        except Exception:
            logger.exception(
                "failed to send the reply to %s message %s", message.platform, message.message_id
            )
            await self._set_delivery(answer_id, DeliveryState.FAILED, None)
            return PipelineResult(
                Outcome.ANSWERED, reply=reply, message_id=stored.id, exchange_id=exchange_id
            )
        await self._set_delivery(answer_id, DeliveryState.SENT, platform_id)
        return PipelineResult(
            Outcome.ANSWERED,
            reply=reply,
            message_id=stored.id,
            exchange_id=exchange_id,
            delivered=True,
        )

    async def _refuse(self, message: IncomingMessage, *, send: ReplySender) -> PipelineResult:
        """Refuse a message over the size limit, once however often it is delivered: it is
        stored (cut to the limit, state ``refused``) so redeliveries are duplicates."""
        limit = self.options.max_message_chars
        reason = (
            f"Sorry, your message is too long for me ({len(message.text):,} characters; "
            f"the limit is {limit:,})."
        )
        try:
            stored = await self.store.run(
                record_incoming,
                message=replace(message, text=message.text[:limit]),
                state=AnswerState.REFUSED,
            )
            duplicate = stored is None
        except StorageError:
            # Without the database there is no dedupe; the refusal is still owed.
            logger.warning("could not store a refused %s message", message.platform)
            duplicate = False
        if duplicate:
            logger.info(
                "duplicate delivery of refused %s message %s ignored",
                message.platform,
                message.message_id,
            )
            return PipelineResult(Outcome.DUPLICATE)
        logger.warning(
            "refused a %d-character message from %s", len(message.text), message.platform
        )
        delivered = await self._send_quietly(send, reason, message)
        return PipelineResult(Outcome.REFUSED, reply=reason, delivered=delivered)

    async def _answer(
        self,
        stored: MessageRecord,
        *,
        progress: ProgressSink | None,
        message: IncomingMessage | None,
        delivery: DeliveryState,
        busy_state: AnswerState = AnswerState.UNANSWERED,
        received: float | None = None,
        store_time: StoreTime | None = None,
        turns: list[Turn] | None = None,
    ) -> tuple[GeneratedReply, int, int | None]:
        """Generate and store the reply to ``stored`` (claimed by this instance), in its
        conversation's turn; returns the reply, the stored answer's id and the exchange id.
        A busy model leaves the message in ``busy_state``. ``received`` is the
        ``time.perf_counter()`` the message arrived at and ``store_time`` the run time of its
        store calls so far, for the timing log line; ``turns`` its history, when read in its
        turn already."""
        assert stored.id is not None
        started = time.perf_counter()
        received = started if received is None else received
        try:
            if turns is None:
                turns, looked = await self._history_in_turn(stored)
            else:
                looked = time.perf_counter()
            fetched = time.perf_counter()
            chat = to_chat_messages(turns, system_prompt=self.options.system_prompt)
            asked = time.perf_counter()
            generated = await self._generate(chat, message, progress, stored.id)
            generated = replace(generated, text=generated.text.strip())
            answered = time.perf_counter()
            if not generated.text:
                raise ValueError("the model produced an empty reply")
            answer, exchange = await self.store.run(
                record_answer,
                user_message_id=stored.id,
                text=generated.text,
                answered_by=AnsweredBy.BOT,
                author_id=self.options.bot_id,
                author_name=self.options.bot_name,
                model_version=generated.model_version,
                delivery=delivery,
            )
            # The split the serving benchmark reads: our own work against the model's (waiting
            # for the conversation's earlier turns is neither; the last look for them is ours).
            # ``work`` leaves out the waiting for the store's thread and the event loop too:
            # the store calls' own run time and the formatting.
            pipeline = (started - received) + (asked - looked) + (time.perf_counter() - answered)
            work = pipeline if store_time is None else store_time.seconds + (asked - fetched)
            logger.info(
                "answered message %d: pipeline %.1f ms (work %.1f ms), model %.1f ms",
                stored.id,
                pipeline * 1000,
                work * 1000,
                (answered - asked) * 1000,
            )
        except asyncio.CancelledError:
            # Stopped (a shutdown past its drain time): the message stays answerable.
            await self._release(stored.id, AnswerState.PENDING)
            raise
        except ModelBusy:
            await self._release(stored.id, busy_state)
            raise
        except Exception:
            await self._release(stored.id, AnswerState.UNANSWERED)
            raise
        finally:
            # Released (or answered) before the next message of the conversation wakes.
            await self._turn_done(stored.conversation_id)
        assert answer.id is not None
        return generated, answer.id, exchange.id

    def _unanswered_since(self) -> datetime:
        """Messages stored before this are too old to wait for: they are never answered."""
        return utcnow() - timedelta(seconds=self.options.unanswered_max_age)

    async def _history_in_turn(self, stored: MessageRecord) -> tuple[list[Turn], float]:
        """The conversation's history up to ``stored``, read once the earlier messages of the
        conversation are answered (waiting at most ``turn_wait`` seconds), so the prompt holds
        their answers; and the ``time.perf_counter()`` of the look that found it its turn.

        The database decides, so a message handled by another replica waits too; within this
        process a finished message wakes the waiting ones at once, across processes they look
        again every poll interval."""
        assert stored.id is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.turn_wait
        since = self._unanswered_since()
        condition = self._turns.get(stored.conversation_id)
        if condition is None:
            condition = asyncio.Condition()
            self._turns[stored.conversation_id] = condition
        while True:
            looked = time.perf_counter()
            turns = await self.store.run(
                history_in_turn,
                conversation_id=stored.conversation_id,
                message_id=stored.id,
                since=since,
                limit=self.options.history_turns,
            )
            if turns is not None:
                return turns, looked
            remaining = deadline - loop.time()
            if remaining <= 0:
                logger.warning(
                    "message %d did not get its turn within %.0f s; answering it anyway",
                    stored.id,
                    self.options.turn_wait,
                )
                looked = time.perf_counter()
                turns = await self.store.run(
                    conversation_history,
                    conversation_id=stored.conversation_id,
                    up_to_message_id=stored.id,
                    limit=self.options.history_turns,
                )
                return turns, looked
            async with condition:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        condition.wait(), min(remaining, self.options.turn_poll_interval)
                    )

    async def _turn_done(self, conversation_id: int) -> None:
        condition = self._turns.get(conversation_id)
        if condition is not None:
            async with condition:
                condition.notify_all()

    async def _generate(
        self,
        chat: list[dict[str, str]],
        message: IncomingMessage | None,
        progress: ProgressSink | None,
        message_id: int,
    ) -> GeneratedReply:
        limit = self.options.max_new_tokens
        if progress is None or message is None:
            return self._as_reply(
                await self.generator.generate(messages=chat, max_new_tokens=limit)
            )
        shown_in = Placeholder(pipeline=self, progress=progress, message=message, id=message_id)
        delay = self.options.placeholder_delay
        later = asyncio.create_task(shown_in.show_after(delay)) if delay > 0 else None
        if later is None:
            await shown_in.show("")
        try:
            return await self._generate_shown(chat, message, shown_in, later)
        except asyncio.CancelledError:
            if later is not None:
                later.cancel()
                later = None
            raise
        finally:
            if later is not None:
                await shown_in.settle(later)

    async def _generate_shown(
        self,
        chat: list[dict[str, str]],
        message: IncomingMessage,
        shown_in: Placeholder,
        later: asyncio.Task[None] | None,
    ) -> GeneratedReply:
        """Generate, streaming edits into ``shown_in`` once its placeholder is up (``later``
        done, or ``None``: it went up first)."""
        limit = self.options.max_new_tokens
        streaming = self._streaming_generator()
        if streaming is None:
            return self._as_reply(
                await self.generator.generate(messages=chat, max_new_tokens=limit)
            )
        text = ""
        shown = ""
        last_update = time.monotonic()
        stream = streaming.stream(messages=chat, max_new_tokens=limit)
        async for piece in stream:
            text += piece
            now = time.monotonic()
            if (
                (later is None or later.done())
                and now - last_update >= self.options.progress_interval
                and text.strip() != shown
                and self._edits.take(platform=message.platform, workspace=message.workspace)
            ):
                shown = text.strip()
                last_update = now
                await shown_in.show(shown + UNFINISHED)
        if isinstance(stream, ReplyStream) and stream.reply is not None:
            return stream.reply
        return self._as_reply(text)

    def _streaming_generator(self) -> StreamingReplyGenerator | None:
        """The generator if it streams; checked once per generator (an isinstance check
        against a runtime protocol inspects every member: some 10 microseconds a message)."""
        generator = self.generator
        if generator is not self._checked_generator:
            self._checked_generator = generator
            self._streaming = generator if isinstance(generator, StreamingReplyGenerator) else None
        return self._streaming

    def _as_reply(self, generated: str | GeneratedReply) -> GeneratedReply:
        """A generator's answer as a :class:`GeneratedReply` (a plain string is ``version``'s)."""
        if isinstance(generated, GeneratedReply):
            return generated
        return GeneratedReply(text=generated, model_version=self.generator.version)

    async def _send_quietly(self, send: ReplySender, text: str, message: IncomingMessage) -> bool:
        try:
            await send(text=text, in_reply_to=message)
        except Exception:
            logger.exception("failed to send a notice to %s", message.platform)
            return False
        return True

    # ------------------------------------------------------------------ crash recovery

    async def recover(self, *, platforms: Sequence[str], batch: int = 20) -> RecoveryReport:
        """One recovery pass over the messages of ``platforms`` (those with an adapter to post
        the replies): the ones too old to answer are marked gave_up; the unanswered ones nobody
        alive is answering are claimed and answered through the normal path, the replies
        queued for the adapters' retry queue (which replaces any placeholder left behind)."""
        if not platforms:
            return RecoveryReport()
        await self._keep_lease()
        max_age = self.options.unanswered_max_age
        gave_up = await self.store.run(
            give_up_unanswered, platforms=list(platforms), max_age_seconds=max_age
        )
        if gave_up:
            logger.warning("gave up on %d message(s) older than %.0f s", gave_up, max_age)
        claimed = await self.store.run(
            claim_unanswered,
            holder=self.instance,
            platforms=list(platforms),
            max_age_seconds=max_age,
            limit=batch,
        )
        answered = failed = 0
        for record in claimed:
            assert record.id is not None
            try:
                # The same request id as when it arrived: one search finds its whole story.
                origin = record.event_id or record.platform_message_id or f"db{record.id}"
                with request_context(request_id_for(record.platform, origin)):
                    await self._answer(
                        record, progress=None, message=None, delivery=DeliveryState.FAILED
                    )
            except asyncio.CancelledError:
                # The rest of the batch was claimed but not started: give it back.
                for rest in claimed[claimed.index(record) + 1 :]:
                    await self._release(rest.id, AnswerState.PENDING)  # type: ignore[arg-type]
                raise
            except Exception:
                logger.exception("recovery failed to answer message %d", record.id)
                failed += 1
                continue
            answered += 1
        if answered:
            logger.warning("recovered %d unanswered message(s); replies queued", answered)
        return RecoveryReport(answered=answered, failed=failed, gave_up=gave_up)

    async def maintain(
        self, *, platforms: Sequence[str], interval: float, stop: asyncio.Event
    ) -> None:
        """Until ``stop``: renew this instance's lease (the heartbeat) every third of its
        length and run a recovery pass at once and then every ``interval`` seconds."""
        heartbeat = asyncio.create_task(self._heartbeat(stop))
        try:
            while not stop.is_set():
                try:
                    await self.recover(platforms=platforms)
                except StorageError as error:
                    logger.warning("recovery pass skipped: %s", error)
                except Exception:
                    logger.exception("the recovery pass failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat

    async def close(self) -> None:
        """A clean stop: drop this instance's lease, so whatever it still claims is free."""
        try:
            await self.store.run(drop_instance_lease, holder=self.instance)
        except StorageError as error:
            logger.warning("could not drop the instance lease: %s", error)

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._keep_lease()
            except StorageError as error:
                logger.warning("could not renew the instance lease: %s", error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.options.instance_lease / 3)

    def _lease_due(self) -> float | None:
        """The lease length when this instance's lease is due for renewal (a third of it has
        passed), to renew it together with the next claim; ``None`` when it is not due."""
        now = time.monotonic()
        if self._lease_renewed_at is not None and (
            now - self._lease_renewed_at < self.options.instance_lease / 3
        ):
            return None
        self._lease_renewed_at = now
        return self.options.instance_lease

    async def _keep_lease(self) -> None:
        """Renew this instance's lease now."""
        await self.store.run(
            renew_instance_lease, holder=self.instance, seconds=self.options.instance_lease
        )
        self._lease_renewed_at = time.monotonic()

    async def _release(self, message_id: int, state: AnswerState) -> None:
        await self._record(
            f"release message {message_id}",
            release_answer_claim,
            message_id=message_id,
            holder=self.instance,
            state=state,
        )


def request_id_for(platform: str, event_id: str) -> str:
    """The request id of a platform event (its event id, or else the message's id)."""
    return f"{platform}-{event_id}"


@dataclass
class Placeholder:
    """Shows the reply to one message while it is generated, and records the placeholder's
    platform id on the message the moment the sink reports it: a reply recovered or retried
    after a crash then replaces that message instead of posting a second one next to it."""

    pipeline: ReplyPipeline
    progress: ProgressSink
    message: IncomingMessage
    id: int  # our database id of the message
    recorded: str | None = None
    due: bool = False  # the delayed placeholder is being posted (or was)

    async def show_after(self, delay: float) -> None:
        """Show the placeholder ``delay`` seconds from now (cancelled when the reply is ready
        sooner: a quick reply needs none, and costs the platform one call instead of two)."""
        await asyncio.sleep(delay)
        self.due = True
        await self.show("")

    async def settle(self, later: asyncio.Task[None]) -> None:
        """Once the reply (or its failure) is known: a placeholder still waiting for its delay
        is called off; one being posted is let finish, so the reply or the apology edits it
        instead of going up beside it (a post cut short leaves its outcome unknown)."""
        if self.due:
            await later
        else:
            later.cancel()

    async def show(self, text: str) -> None:
        # A failed placeholder or edit must not cost the reply itself.
        try:
            platform_id = await self.progress(text=text, in_reply_to=self.message)
        except Exception as error:
            logger.warning("could not show reply progress on %s: %s", self.message.platform, error)
            return
        if platform_id is None or platform_id == self.recorded:
            return
        try:
            await self.pipeline.store.run(
                set_reply_placeholder, message_id=self.id, placeholder_id=str(platform_id)
            )
        except StorageError as error:
            logger.warning("could not record the placeholder of message %d: %s", self.id, error)
            return
        self.recorded = platform_id
