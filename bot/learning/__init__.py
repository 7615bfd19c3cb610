"""Learning data: what the bot's conversations give back as training data, and what users and
admins control about it.

- :mod:`bot.learning.exporter`: the export of good exchanges as fine-tuning shards
  (:class:`Exporter`, its options, result and errors; its docstring tells the whole story),
  orchestrating
  :mod:`~bot.learning.selection` (which exchanges: the pick into a scratch table,
  near-duplicate supersession, the export marks),
  :mod:`~bot.learning.writing` (one part of a shard: the message stream, the lines of every
  format, redacted, with their context),
  :mod:`~bot.learning.shards` (a shard on disk: file names, the manifest, fsyncs, publishing and
  recovery of temporary folders),
  :mod:`~bot.learning.workers` (the worker processes of a large export),
  :mod:`~bot.learning.lease` (the database lease that makes instances take turns) and
  :mod:`~bot.learning.errors` (:class:`ExportError` and how failures are worded);
- :mod:`bot.learning.redaction`: personal data out of every exported line, user ids as keyed
  pseudonyms;
- :mod:`bot.learning.commands`: the ``export``, ``forget-me``, ``correct`` and ``training`` chat
  commands (:class:`LearningActions`), and the pseudonym key;
- :mod:`bot.learning.scheduler`: the scheduled export (``EXPORT_SCHEDULE``, APScheduler).

Reading shards back for training goes here too, as ``bot.learning.training_data``, beside
:mod:`~bot.learning.shards`, whose names it needs.

The names below are imported from their modules on first use, so importing one module of the
package imports nothing else of it: every export worker process imports
:mod:`bot.learning.workers` by its path, and neither it nor ``bot.cli`` at startup should pay
for the chat commands or APScheduler.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot.learning.commands import LearningActions, load_pseudonym_key
    from bot.learning.errors import ExportError
    from bot.learning.exporter import (
        Exporter,
        ExportOptions,
        ExportResult,
        ProgressCallback,
        StepCallback,
    )
    from bot.learning.redaction import DEFAULT_PHONE_REGIONS, Pseudonymizer, redact
    from bot.learning.scheduler import ExportScheduler, ScheduleError, parse_schedule
    from bot.learning.shards import (
        FORMATS,
        SCHEMA_VERSION,
        data_files,
        part_name,
        shard_files,
        shard_folders,
    )
    from bot.learning.workers import peak_memory_mb
    from bot.learning.writing import Formatter, Pseudonymize

#: Each public name, and the module of this package it comes from.
_MODULES = {
    "LearningActions": "commands",
    "load_pseudonym_key": "commands",
    "ExportError": "errors",
    "ExportOptions": "exporter",
    "Exporter": "exporter",
    "ExportResult": "exporter",
    "ProgressCallback": "exporter",
    "StepCallback": "exporter",
    "DEFAULT_PHONE_REGIONS": "redaction",
    "Pseudonymizer": "redaction",
    "redact": "redaction",
    "ExportScheduler": "scheduler",
    "ScheduleError": "scheduler",
    "parse_schedule": "scheduler",
    "FORMATS": "shards",
    "SCHEMA_VERSION": "shards",
    "data_files": "shards",
    "part_name": "shards",
    "shard_files": "shards",
    "shard_folders": "shards",
    "peak_memory_mb": "workers",
    "Formatter": "writing",
    "Pseudonymize": "writing",
}

__all__ = [
    "DEFAULT_PHONE_REGIONS",
    "FORMATS",
    "SCHEMA_VERSION",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "ExportScheduler",
    "Exporter",
    "Formatter",
    "LearningActions",
    "ProgressCallback",
    "Pseudonymize",
    "Pseudonymizer",
    "ScheduleError",
    "StepCallback",
    "data_files",
    "load_pseudonym_key",
    "parse_schedule",
    "part_name",
    "peak_memory_mb",
    "redact",
    "shard_files",
    "shard_folders",
]


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
