"""The learning-data commands: export, forget-me, corrections, the review queue and
per-channel opt-out.

They plug into :class:`bot.commands.Commands` as actions, so every platform gets them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

from bot.commands import Command, CommandAction, CommandRequest
from bot.learning.errors import ExportError
from bot.learning.exporter import Exporter
from bot.learning.model_commands import who
from bot.learning.redaction import Pseudonymizer
from bot.storage import (
    ReviewVerdict,
    Store,
    correct_exchange,
    forget_user,
    pending_review_count,
    record_correction,
    review_exchange,
    review_queue,
    set_training_opt_out,
)

logger = logging.getLogger(__name__)


def load_pseudonym_key(*, configured: str, data_dir: Path) -> bytes:
    """The secret behind user pseudonyms: ``PSEUDONYM_KEY``, or a random key kept (0600) in
    ``DATA_DIR/pseudonym.key`` so pseudonyms stay stable across restarts."""
    if configured:
        return configured.encode()
    path = data_dir / "pseudonym.key"
    if path.exists():
        return path.read_bytes().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32).encode()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key)
    return key


class LearningActions:
    """Actions for the ``export``, ``forget-me``, ``correct``, ``review`` and ``training``
    commands."""

    def __init__(
        self,
        *,
        store: Store,
        exporter: Exporter,
        pseudonymize: Pseudonymizer,
        serving_learned_from: Callable[[str], bool] | None = None,
        after_forget: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """``serving_learned_from(pseudonym)``: whether the serving model was trained on that
        user's data (the registry's lineage); ``after_forget``: run once a user is forgotten
        (a retrain, when RETRAIN_ON_FORGET is set)."""
        self.store = store
        self.exporter = exporter
        self.pseudonymize = pseudonymize
        self.serving_learned_from = serving_learned_from
        self.after_forget = after_forget
        self._export_lock = asyncio.Lock()
        self._retraining: asyncio.Future[object] | None = None

    def actions(self) -> dict[Command, CommandAction]:
        return {
            Command.EXPORT: self.export,
            Command.FORGET_ME: self.forget_me,
            Command.CORRECT: self.correct,
            Command.TRAINING: self.training,
            Command.REVIEW: self.review,
        }

    async def export(self, request: CommandRequest) -> str:
        async with self._export_lock:  # one export per process; the lease covers the rest
            try:
                result = await asyncio.to_thread(self.exporter.run)
            except ExportError as error:
                logger.error("export requested by %s failed: %s", request.user_id, error)
                return f"Export failed: {error}"
        return result.describe()

    async def forget_me(self, request: CommandRequest) -> str:
        pseudonym = self.pseudonymize(request.platform, request.user_id)
        forgotten = await self.store.run(
            forget_user,
            platform=request.platform,
            user_id=request.user_id,
            user_pseudonym=pseudonym,
        )
        logger.warning(
            "forget-me: deleted %d messages and %d exchanges of a %s user",
            forgotten.messages,
            forgotten.exchanges,
            request.platform,
        )
        answer = (
            f"Done. I deleted {forgotten.messages} messages, {forgotten.exchanges} exchanges and "
            f"{forgotten.ratings} ratings of yours. None of it will be used for training, and "
            "training data exported earlier drops your lines at the next retrain."
        )
        if self.serving_learned_from is not None:
            if await asyncio.to_thread(self.serving_learned_from, pseudonym):
                answer += (
                    " The model answering now learned from your messages; the next retrain "
                    "will not."
                )
                if self.after_forget is not None:
                    self._retraining = asyncio.ensure_future(self.after_forget())
                    answer += " A retrain without them has started."
            else:
                answer += " The model answering now did not learn from your messages."
        return answer

    async def correct(self, request: CommandRequest) -> str:
        better = request.arguments.strip()
        if not better:
            return (
                "Reply to one of my messages, or write in the thread I answered in, with "
                "`!correct <better answer>`."
            )
        # Without a replied-to message (Slack has no replies), the thread names the answer:
        # the bot's newest reply in this channel and thread is the one corrected.
        exchange = await self.store.run(
            record_correction,
            platform=request.platform,
            channel=request.channel,
            thread=request.thread,
            corrected_message_id=request.replied_to,
            text=better,
            admin_id=request.user_id,
            admin_name=request.user_name,
        )
        if exchange is None:
            return "I couldn't find a reply of mine to correct here."
        return "Thanks, I stored your correction; it will be used for training."

    async def training(self, request: CommandRequest) -> str:
        setting = request.arguments.strip().lower()
        if setting not in {"on", "off"}:
            return "Use `training off` or `training on`."
        await self.store.run(
            set_training_opt_out,
            platform=request.channel_platform or request.platform,
            channel=request.channel,
            opt_out=setting == "off",
            updated_by=request.user_id,
        )
        if setting == "off":
            return (
                "Training is now off in this channel: nothing said here will be used for "
                "training. I'll still answer here."
            )
        return (
            "Training is back on in this channel for what is said from now on; what was said "
            "while it was off stays out."
        )

    async def review(self, request: CommandRequest) -> str:
        """``review``: how many answers wait and the oldest few; ``review approve N``,
        ``review reject N``, ``review edit N <better answer>``: a verdict on exchange N."""
        word, rest = _first_word(request.arguments)
        word = word.lower()
        if word in ("", "list"):
            return await self._review_summary()
        number, answer = _first_word(rest)
        if word not in REVIEW_WORDS or not number.isdigit():
            return REVIEW_USAGE
        exchange_id = int(number)
        if word == "edit":
            if not answer.strip():
                return REVIEW_USAGE
            outcome = await self.store.run(
                correct_exchange,
                exchange_id=exchange_id,
                answer=answer,
                reviewer=who(request),
                admin_id=request.user_id,
                admin_name=request.user_name,
            )
        else:
            outcome = await self.store.run(
                review_exchange,
                exchange_id=exchange_id,
                verdict=REVIEW_WORDS[word],
                reviewer=who(request),
            )
        return outcome.message

    async def _review_summary(self) -> str:
        waiting = await self.store.run(pending_review_count)
        if not waiting:
            return "No answers are waiting for review."
        oldest = await self.store.run(review_queue, limit=REVIEW_SUMMARY_ITEMS)
        ids = ", ".join(str(item.exchange_id) for item in oldest)
        return (
            f"{waiting} answers are waiting for review; the oldest: {ids}. "
            "`review approve N`, `review reject N` or `review edit N <better answer>`."
        )


REVIEW_WORDS = {
    "approve": ReviewVerdict.APPROVED,
    "reject": ReviewVerdict.REJECTED,
    "edit": ReviewVerdict.CORRECTED,
}
REVIEW_USAGE = "Usage: `review`, `review approve N`, `review reject N` or `review edit N <answer>`."
#: How many of the oldest waiting exchanges ``review`` names.
REVIEW_SUMMARY_ITEMS = 5


def _first_word(text: str) -> tuple[str, str]:
    """``"edit 12 a better\nanswer"`` -> ``("edit", "12 a better\nanswer")``."""
    parts = text.strip().split(maxsplit=1)
    return (parts[0], parts[1] if len(parts) > 1 else "") if parts else ("", "")
