"""Command dedupe: a command delivery runs once, however often the platform delivers it."""

from __future__ import annotations

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from bot.conversation import utcnow
from bot.storage.tables import HandledCommandRecord


def claim_command(*, session: Session, platform: str, delivery_key: str, command: str) -> bool:
    """Record that this command delivery is being run; ``False`` when it already was.

    The unique key (platform, delivery_key) decides, so two instances receiving the same
    delivery, or one instance receiving it again after a restart, never both run it.
    """
    record = HandledCommandRecord(
        platform=platform,
        delivery_key=delivery_key[:255],
        command=command[:64],
        handled_at=utcnow(),
    )
    try:
        with session.begin_nested():
            session.add(record)
    except IntegrityError:
        session.commit()
        return False
    session.commit()
    return True
