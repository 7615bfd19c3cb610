"""Answer claims: every user message answered exactly once across crashes and replicas.

The instance answering a user message writes its id into ``messages.answer_claimed_by``. Each
instance keeps a lease row ``instance:<id>`` in ``leases`` alive while it runs (a heartbeat,
:func:`renew_instance_lease`). A claim is free again when its holder's lease has expired or is
gone, or when the holder is a process of this host that no longer runs (a restart after SIGKILL
takes over at once). Taking a claim over is a conditional update on the holder seen, so two
instances never both take one.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta

from sqlalchemy import bindparam, exists
from sqlalchemy import delete as sql_delete
from sqlalchemy import update as sql_update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar

from bot.conversation import utcnow
from bot.storage.database import run_statement
from bot.storage.delivery import rare
from bot.storage.tables import (
    AnswerState,
    ExchangeRecord,
    LeaseRecord,
    MessageRecord,
)

#: User messages that still wait for an answer (recovery answers them; turns wait for them).
WAITING_STATES = (AnswerState.PENDING.value, AnswerState.UNANSWERED.value)


def instance_id() -> str:
    """A fresh id for one running instance: ``host:pid:random`` (short enough for a lease
    name), so a process of this host can tell that a holder no longer runs."""
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{os.urandom(4).hex()}"


def _lease_name(holder: str) -> str:
    return f"instance:{holder}"


def holder_is_gone_here(holder: str) -> bool:
    """Whether ``holder`` is a process of this host that no longer runs (checked at once,
    without waiting for its lease to expire)."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname()[:32] or not pid_text.isdigit() or int(pid_text) <= 0:
        return False
    if int(pid_text) == os.getpid():
        return False  # this process: alive, whatever the random part says
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def renew_instance_lease(*, session: Session, holder: str, seconds: float) -> None:
    """The heartbeat: keep ``holder``'s claims its own for ``seconds`` more; expired leases of
    other instances are dropped on the way (their claims are free either way)."""
    session.execute(
        sql_delete(LeaseRecord)
        .execution_options(synchronize_session=False)
        .where(
            col(LeaseRecord.name).like("instance:%"),
            col(LeaseRecord.expires_at) < utcnow(),
            col(LeaseRecord.name) != _lease_name(holder),
        )
    )
    renew_lease(session=session, holder=holder, seconds=seconds)
    session.commit()


def renew_lease(*, session: Session, holder: str, seconds: float) -> None:
    name = _lease_name(holder)
    expires = utcnow() + timedelta(seconds=seconds)
    renewed = run_statement(session, _RENEW, {"lease_name": name, "expires": expires})
    if renewed.rowcount == 0:
        try:
            with session.begin_nested():
                session.add(LeaseRecord(name=name, holder=holder, expires_at=expires))
        except IntegrityError:
            pass  # written at the same moment by another task of this instance


#: Every stored message renews its instance's lease: one statement, built once.
_RENEW = (
    sql_update(LeaseRecord)
    .where(col(LeaseRecord.name) == bindparam("lease_name"))
    .values(expires_at=bindparam("expires"))
)


def drop_instance_lease(*, session: Session, holder: str) -> None:
    """A clean stop: ``holder``'s remaining claims are free at once."""
    session.execute(sql_delete(LeaseRecord).where(col(LeaseRecord.name) == _lease_name(holder)))
    session.commit()


def _live_holders(*, session: Session, now: datetime) -> set[str]:
    rows = session.exec(
        select(LeaseRecord.holder).where(
            col(LeaseRecord.name).like("instance:%"), col(LeaseRecord.expires_at) > now
        )
    ).all()
    return {holder for holder in rows if not holder_is_gone_here(holder)}


def release_answer_claim(
    *, session: Session, message_id: int, holder: str, state: AnswerState
) -> None:
    """``holder`` stops answering the message: it becomes ``state`` (``PENDING`` after a
    cancellation, ``UNANSWERED`` after a failure) and free for recovery. Nothing changes when
    it was answered meanwhile or another instance took the claim over."""
    session.execute(
        sql_update(MessageRecord)
        .execution_options(synchronize_session=False)
        .where(
            col(MessageRecord.id) == message_id,
            col(MessageRecord.answer_claimed_by) == holder,
            col(MessageRecord.answer_state).in_(WAITING_STATES),
        )
        .values(answer_state=state.value, answer_claimed_by=None, answer_claimed_at=None)
    )
    session.commit()


def set_reply_placeholder(*, session: Session, message_id: int, placeholder_id: str) -> None:
    """Record the platform id of the placeholder or partial reply shown for a user message,
    so a reply recovered or retried after a crash replaces it instead of adding another (a new
    placeholder shows none of the reply's chunks yet)."""
    params = {"message_id": message_id, "placeholder_id": placeholder_id[:255]}
    run_statement(session, _SET_PLACEHOLDER, params)
    session.commit()


#: Every streamed reply records its placeholder: one statement, built once.
_SET_PLACEHOLDER = (
    sql_update(MessageRecord)
    .where(col(MessageRecord.id) == bindparam("message_id"))
    .values(reply_placeholder_id=bindparam("placeholder_id"), reply_chunks_sent=None)
)


def answer_queue(
    *, platforms: list[str], since: datetime, limit: int, dialect: str
) -> SelectOfScalar[MessageRecord]:
    """The select of user messages still waiting for an answer, stored after ``since``,
    oldest first. It goes through ``ix_messages_answer_queue`` (answer_state, stored_at)."""
    answered = exists().where(col(ExchangeRecord.user_message_id) == MessageRecord.id)
    return (
        select(MessageRecord)
        .where(
            rare(col(MessageRecord.answer_state).in_(WAITING_STATES), dialect=dialect),
            col(MessageRecord.stored_at) >= since,
            col(MessageRecord.platform).in_(platforms),
            col(MessageRecord.deleted_at).is_(None),
            ~answered,
        )
        .order_by(col(MessageRecord.stored_at), col(MessageRecord.id))
        .limit(limit)
    )


def claim_unanswered(
    *,
    session: Session,
    holder: str,
    platforms: list[str],
    max_age_seconds: float,
    limit: int = 20,
) -> list[MessageRecord]:
    """Claim for ``holder`` the user messages of ``platforms`` that are still unanswered,
    younger than ``max_age_seconds`` and claimed by nobody alive; oldest first.

    Each claim is a conditional update on the holder seen, so when several instances run
    this at once every message goes to one of them.
    """
    now = utcnow()
    query = answer_queue(
        platforms=platforms,
        since=now - timedelta(seconds=max_age_seconds),
        limit=limit,
        dialect=session.get_bind().dialect.name,
    )
    candidates = list(session.exec(query).all())
    live = _live_holders(session=session, now=now)
    claimed: list[MessageRecord] = []
    for record in candidates:
        seen = record.answer_claimed_by
        if seen == holder or (seen is not None and seen in live):
            continue  # being answered (by this instance, or one that is alive)
        same_holder = (
            col(MessageRecord.answer_claimed_by).is_(None)
            if seen is None
            else col(MessageRecord.answer_claimed_by) == seen
        )
        taken = session.execute(
            sql_update(MessageRecord)
            .execution_options(synchronize_session=False)
            .where(
                col(MessageRecord.id) == record.id,
                col(MessageRecord.answer_state).in_(WAITING_STATES),
                same_holder,
            )
            .values(answer_claimed_by=holder, answer_claimed_at=now)
        )
        session.commit()
        if taken.rowcount == 1:  # type: ignore[attr-defined]
            record.answer_claimed_by = holder
            record.answer_claimed_at = now
            claimed.append(record)
    return claimed


def give_up_unanswered(*, session: Session, platforms: list[str], max_age_seconds: float) -> int:
    """Mark ``GAVE_UP`` the user messages of ``platforms`` still unanswered after
    ``max_age_seconds`` (an answer that late would only confuse); returns how many."""
    cutoff = utcnow() - timedelta(seconds=max_age_seconds)
    result = session.execute(
        sql_update(MessageRecord)
        .execution_options(synchronize_session=False)
        .where(
            col(MessageRecord.answer_state).in_(WAITING_STATES),
            col(MessageRecord.stored_at) < cutoff,
            col(MessageRecord.platform).in_(platforms),
        )
        .values(answer_state=AnswerState.GAVE_UP.value)
    )
    session.commit()
    return int(result.rowcount)  # type: ignore[attr-defined]
