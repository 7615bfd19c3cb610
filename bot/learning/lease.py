"""Named database leases: the one an export holds while it runs (``export``), and the one a
training holds (``training``), so that several instances on one database take turns. A crashed
holder's lease lapses after its term, or at once when the holder was a process of this host that
no longer runs; the holder renews it while it works.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError

from bot.conversation import utcnow
from bot.learning.selection import as_datetime
from bot.storage import Database, LeaseRecord
from bot.storage.claims import holder_is_gone_here

LEASE_NAME = "export"


class Lease:
    """The lease called ``name``, for one holder, ``seconds`` long at a time."""

    def __init__(
        self, database: Database, *, holder: str, seconds: float, name: str = LEASE_NAME
    ) -> None:
        self.database = database
        self.holder = holder
        self.seconds = seconds
        self.name = name

    def acquire(self) -> bool:
        """Take the lease, or take it over when it lapsed; False when another holds it."""
        now = utcnow()
        expires = now + timedelta(seconds=self.seconds)
        table = LeaseRecord.__table__  # type: ignore[attr-defined]
        with self.database.engine.begin() as connection:
            current = connection.execute(
                select(table.c.holder, table.c.expires_at).where(table.c.name == self.name)
            ).first()
            if current is not None:
                holder, expires_at = current
                lapsed = as_datetime(expires_at) < now or holder_is_gone_here(holder)
                if not lapsed and holder != self.holder:
                    return False
                # Conditional on the holder we saw, so two instances cannot both take it over.
                taken = connection.execute(
                    update(table)
                    .where(table.c.name == self.name, table.c.holder == holder)
                    .values(holder=self.holder, expires_at=expires)
                )
                return taken.rowcount == 1
        try:
            with self.database.engine.begin() as connection:
                connection.execute(
                    table.insert().values(name=self.name, holder=self.holder, expires_at=expires)
                )
        except IntegrityError:
            return False  # another instance inserted it first
        return True

    def renew(self) -> None:
        table = LeaseRecord.__table__  # type: ignore[attr-defined]
        with self.database.engine.begin() as connection:
            connection.execute(
                update(table)
                .where(table.c.name == self.name, table.c.holder == self.holder)
                .values(expires_at=utcnow() + timedelta(seconds=self.seconds))
            )

    def release(self) -> None:
        table = LeaseRecord.__table__  # type: ignore[attr-defined]
        with self.database.engine.begin() as connection:
            connection.execute(
                delete(table).where(table.c.name == self.name, table.c.holder == self.holder)
            )
