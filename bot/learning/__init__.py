"""Learning data: what the bot's conversations give back as training data, and what users and
admins control about it.

- :mod:`bot.learning.exporter`: the export of good exchanges as fine-tuning shards
  (:class:`Exporter`, its options, result and errors; its docstring tells the whole story);
- :mod:`bot.learning.redaction`: personal data out of every exported line, user ids as keyed
  pseudonyms;
- :mod:`bot.learning.commands`: the ``export``, ``forget-me``, ``correct`` and ``training`` chat
  commands (:class:`LearningActions`), and the pseudonym key;
- :mod:`bot.learning.scheduler`: the scheduled export (``EXPORT_SCHEDULE``, APScheduler).

The names below are imported from their modules on first use, so importing one module of the
package imports nothing else of it: every export worker process imports
:mod:`bot.learning.exporter` by its path, and neither it nor ``bot.cli`` at startup should pay
for the chat commands or APScheduler.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot.learning.commands import LearningActions, load_pseudonym_key
    from bot.learning.exporter import (
        FORMATS,
        SCHEMA_VERSION,
        Exporter,
        ExportError,
        ExportOptions,
        ExportResult,
        Formatter,
        ProgressCallback,
        Pseudonymize,
        StepCallback,
        data_files,
        part_name,
        peak_memory_mb,
        shard_files,
        shard_folders,
    )
    from bot.learning.redaction import DEFAULT_PHONE_REGIONS, Pseudonymizer, redact
    from bot.learning.scheduler import ExportScheduler, ScheduleError, parse_schedule

#: Each public name, and the module of this package it comes from.
_MODULES = {
    "LearningActions": "commands",
    "load_pseudonym_key": "commands",
    "data_files": "exporter",
    "Exporter": "exporter",
    "ExportError": "exporter",
    "ExportOptions": "exporter",
    "ExportResult": "exporter",
    "FORMATS": "exporter",
    "Formatter": "exporter",
    "part_name": "exporter",
    "peak_memory_mb": "exporter",
    "ProgressCallback": "exporter",
    "Pseudonymize": "exporter",
    "SCHEMA_VERSION": "exporter",
    "shard_files": "exporter",
    "shard_folders": "exporter",
    "StepCallback": "exporter",
    "DEFAULT_PHONE_REGIONS": "redaction",
    "Pseudonymizer": "redaction",
    "redact": "redaction",
    "ExportScheduler": "scheduler",
    "parse_schedule": "scheduler",
    "ScheduleError": "scheduler",
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
