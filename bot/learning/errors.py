""":class:`ExportError`, and how an export words what went wrong: one line, for a log or a
chat reply, from the exporting process and its workers alike."""

from __future__ import annotations

import errno
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError


class ExportError(Exception):
    """The export could not run; nothing was written and nothing was marked."""


def reason(error: SQLAlchemyError) -> str:
    return str(getattr(error, "orig", error)).strip().splitlines()[0]


def describe_database_error(error: SQLAlchemyError) -> str:
    return f"database error during export: {reason(error)}"


def describe_os_error(error: OSError, directory: Path) -> str:
    if error.errno == errno.ENOSPC:
        return f"export directory {directory} is full ({error.strerror})"
    if error.errno in {errno.EROFS, errno.EACCES, errno.EPERM}:
        return f"export directory {directory} is not writable ({error.strerror})"
    return f"cannot write to export directory {directory}: {error}"
