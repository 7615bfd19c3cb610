"""Logging set-up: readable lines or one JSON object per line, and the request id.

A request id names one incoming message from the moment the pipeline receives it to its reply:
:func:`request_context` sets it for the current task (and what it starts: tasks, threads of
``asyncio.to_thread`` and of the store), and :class:`RequestIdFilter` puts it on every log
record, so every line about one message can be found with one search.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
import uuid
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"

#: Record attributes every record has: the rest were passed in ``extra`` and go into the JSON.
_STANDARD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "request_id",
    "request_tag",
    "color_message",
}


def current_request_id() -> str | None:
    """The request id of the message being handled here, if any."""
    return _request_id.get()


def new_request_id() -> str:
    """A fresh id, for work that no platform event names (a recovery pass's message)."""
    return uuid.uuid4().hex[:16]


@contextlib.contextmanager
def request_context(request_id: str | None) -> Iterator[str]:
    """Within the block, log records carry ``request_id`` (a fresh one when ``None``)."""
    value = request_id or new_request_id()
    token = _request_id.set(value)
    try:
        yield value
    finally:
        _request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (``None`` outside a request) and ``request_tag`` (`` [id]`` or
    empty, for the text format) to every record a handler emits."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = getattr(record, "request_id", None) or _request_id.get()
        record.request_id = request_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ``time`` (UTC, ISO 8601), ``level``,
    ``logger``, ``message``, ``request_id`` when set, ``exception`` (the formatted traceback)
    when there is one, and whatever was passed in ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or _request_id.get()
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                entry[key] = value
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(
    *, level: str, log_format: Literal["text", "json"], stream: TextIO | None = None
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) in ``log_format``, replacing the root
    logger's handlers; returns the handler. With ``json``, Python warnings go through logging
    too, so that every line on stderr is one JSON object."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(log_format == "json")
    if log_format == "json":
        # Hugging Face's progress bars (loading weights) would write to stderr between the
        # lines; read when huggingface_hub is imported, which is later (with the model).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return handler
