"""What the reply pipeline and its neighbours agree on: the model (:class:`ReplyGenerator`), the
adapters' senders (:class:`ReplySender`, :class:`ProgressSink`, :class:`PartialDelivery`), the
pipeline's options and results. :mod:`bot.service` re-exports all of it."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

from bot.conversation import IncomingMessage
from bot.storage.delivery import PENDING_GRACE_SECONDS


@dataclass(frozen=True, slots=True)
class GeneratedReply:
    """A reply and what produced it, as the model service returns it."""

    #: The reply itself: what is stored, shown and (once vetted) trained on.
    text: str
    #: The version of the model that actually generated it (a hot swap may have happened since).
    model_version: str
    #: A short remark for the user, sent after the reply but never stored as part of it (and
    #: so never trained on): e.g. that older messages of a long conversation were left out.
    note: str = ""


class ModelBusy(Exception):
    """The model service's queue is full: the user is told to try again shortly."""


class ReplyStream(AsyncIterator[str]):
    """The pieces of one reply as they are generated; :attr:`reply` is set once they end.

    ``produce`` is an async generator function given this stream: it yields the pieces and
    sets :attr:`reply` before it ends.
    """

    def __init__(self, produce: Callable[[ReplyStream], AsyncGenerator[str, None]]) -> None:
        self.reply: GeneratedReply | None = None
        self._pieces = produce(self)

    async def __anext__(self) -> str:
        return await self._pieces.__anext__()

    async def aclose(self) -> None:
        """Stop early: the producer is closed (its request leaves the batch or the server)."""
        await self._pieces.aclose()


class ReplyGenerator(Protocol):
    """Turns chat messages into the bot's reply (the model service implements this).

    ``generate`` returns the reply text, or a :class:`GeneratedReply` when it knows more (the
    model version that produced it, a note for the user); a plain string was produced by
    ``version``. It raises :class:`ModelBusy` when it cannot take more requests now.
    """

    @property
    def version(self) -> str:
        """The model new requests are answered by."""
        ...

    async def generate(
        self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int
    ) -> str | GeneratedReply: ...


@runtime_checkable
class StreamingReplyGenerator(ReplyGenerator, Protocol):
    """A generator that can also yield its reply piece by piece as it is produced (a
    :class:`ReplyStream` carries the version and note once it ends)."""

    def stream(
        self, *, messages: Sequence[Mapping[str, str]], max_new_tokens: int
    ) -> AsyncIterator[str]: ...


class PartialDelivery(Exception):
    """Raised by a :class:`ReplySender` (or a queued-reply poster) that put the start of a
    reply on the platform (the message ``message_id``) but not all of it.

    ``chunks_sent`` is how many of the reply's chunks are complete on the platform: 0 when
    the first message still shows a placeholder or partial text, ``k`` when chunks 1..k are
    there. The retry edits the first message only when it is 0 and posts the chunks after
    the ``chunks_sent`` first, so no part of the reply is ever posted twice.
    """

    def __init__(self, message_id: str, reason: str = "", *, chunks_sent: int) -> None:
        super().__init__(
            f"reply only partly sent (first message {message_id}, "
            f"{chunks_sent} chunk(s) complete): {reason}"
        )
        self.message_id = message_id
        self.chunks_sent = chunks_sent


class ReplySender(Protocol):
    """Sends text back to where ``in_reply_to`` came from; returns the platform's message id."""

    async def __call__(self, *, text: str, in_reply_to: IncomingMessage) -> str | None: ...


#: Ends the text of a reply shown while it is still generated: a partial reply never looks
#: whole, and the final text is always a change of its own.
UNFINISHED = " …"


class ProgressSink(Protocol):
    """Shows a reply while it is generated (a placeholder, then edits).

    Called once with ``text=""`` when the reply is not ready ``PipelineOptions.placeholder_delay``
    seconds after generation starts (at once when that is 0; never for a reply ready sooner),
    then with the text so far (ending in :data:`UNFINISHED`) at most once per
    ``PipelineOptions.progress_interval`` seconds; the final text goes to the sender. Other
    callers (a command's progress) show status lines as they are.
    Returns the platform id of the placeholder or partial reply once one is posted (``None``
    before that, or when the platform shows progress without a message, e.g. typing).
    """

    async def __call__(self, *, text: str, in_reply_to: IncomingMessage) -> str | None: ...


class Outcome(StrEnum):
    ANSWERED = "answered"
    DUPLICATE = "duplicate"  # already handled: no second reply
    IGNORED = "ignored"  # nothing to answer
    REFUSED = "refused"  # refused with a reason, told to the user
    FAILED = "failed"  # apologised; the message stays unanswered


@dataclass(frozen=True, slots=True)
class PipelineResult:
    outcome: Outcome
    reply: str | None = None
    message_id: int | None = None  # our database id of the incoming message
    exchange_id: int | None = None
    delivered: bool = False


class PipelineObserver(Protocol):
    """Told of every message the pipeline handled (the metrics): ``seconds`` from its arrival
    to the end of its handling, the reply sent (or not) included."""

    def handled(self, *, platform: str, result: PipelineResult, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True)
class PipelineOptions:
    """The settings the pipeline needs (taken from :class:`bot.config.Settings`)."""

    system_prompt: str = ""
    max_new_tokens: int = 128
    history_turns: int = 20
    max_message_chars: int = 1_000_000
    bot_id: str = "chatbot"
    bot_name: str = "chatbot"
    progress_interval: float = 1.0  # seconds between streamed edits (platform rate limits)
    # A reply not ready this many seconds after generation starts shows a placeholder (then
    # edits); one ready sooner is sent as it is, without (0: a placeholder before generating).
    placeholder_delay: float = 1.0
    # Streamed edits a second, all replies of one workspace together (0: no limit); see
    # bot.pacing.
    progress_edits_per_second: float = 1.0
    # Crash recovery: unanswered messages younger than this are answered after a crash;
    # older ones are marked gave_up.
    unanswered_max_age: float = 600.0
    # The instance's heartbeat: its claims are its own while its lease (renewed every third
    # of this) runs; a crashed instance's claims are free this long after its last renewal.
    instance_lease: float = 60.0
    # How long a message waits for the earlier messages of its conversation to be answered.
    turn_wait: float = 30.0
    turn_poll_interval: float = 0.1  # how often a waiting message looks again (replicas)
    # A reply recorded but not sent this long after belongs to the retry queue.
    delivery_grace: float = PENDING_GRACE_SECONDS


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What one recovery pass did."""

    answered: int = 0  # answered and queued for the retry queue
    failed: int = 0  # tried and failed again (left for the next pass)
    gave_up: int = 0  # too old: marked gave_up
