"""A shard on disk: the names of its folders and files, its manifest, and the fsyncs and
renames that make it appear whole or not at all (the layout and the crash safety are told in
:mod:`bot.learning.exporter`).

Reading a shard back needs only the names here: :func:`shard_folders`, then
:func:`shard_files` or :func:`data_files` for one format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bot.conversation import utcnow

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: formats in parts (``messages-00000-of-00002.jsonl``), listed per key
SHARD_PREFIX = "shard-"
TEMP_PREFIX = ".tmp-"
#: Every file kind of a shard: key -> (name stem, extension).
FORMATS = {
    "completions": ("completions", "jsonl"),
    "instruct": ("instruct", "jsonl"),
    "messages": ("messages", "jsonl"),
    "index": ("index", "tsv"),
}


def part_name(key: str, part: int, parts: int) -> str:
    """The file name of one part of one format, as Hugging Face names data files."""
    stem, extension = FORMATS[key]
    return f"{stem}-{part:05d}-of-{parts:05d}.{extension}"


def shard_files(shard: Path, key: str) -> list[Path]:
    """The files of one format in a shard, in order."""
    stem, extension = FORMATS[key]
    return sorted(shard.glob(f"{stem}-*-of-*.{extension}"))


def data_files(shard: Path, key: str) -> str:
    """A glob of one format's files, for ``datasets.load_dataset("json", data_files=...)``."""
    stem, extension = FORMATS[key]
    return str(shard / f"{stem}-*-of-*.{extension}")


def shard_folders(directory: Path) -> list[Path]:
    """The published shards in ``directory``, oldest first."""
    return sorted(p for p in directory.glob(f"{SHARD_PREFIX}*") if p.is_dir())


def new_shard_name() -> str:
    """A fresh shard name: the UTC time, then a few random characters."""
    return f"{SHARD_PREFIX}{utcnow():%Y%m%dT%H%M%S.%fZ}-{secrets.token_hex(3)}"


def temporary_folder(directory: Path, name: str) -> Path:
    """Where shard ``name`` is written, hidden, until it is published."""
    return directory / f"{TEMP_PREFIX}{name}"


def fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish(temporary: Path) -> Path:
    """Rename a committed shard's temporary folder into place (fsynced); its final path."""
    final = temporary.parent / temporary.name.removeprefix(TEMP_PREFIX)
    temporary.rename(final)
    fsync_directory(temporary.parent)
    return final


def recover_folders(directory: Path, committed: set[str]) -> None:
    """Publish the temporary folders of ``committed`` shards that a killed export left
    unpublished; delete every other temporary folder (its shard never was committed)."""
    for temporary in directory.glob(f"{TEMP_PREFIX}{SHARD_PREFIX}*"):
        name = temporary.name.removeprefix(TEMP_PREFIX)
        if name in committed and not (directory / name).exists():
            logger.warning("recovery: publishing committed shard %s", name)
            publish(temporary)
        else:
            logger.warning("recovery: removing uncommitted shard folder %s", temporary.name)
            shutil.rmtree(temporary, ignore_errors=True)


@dataclass(slots=True)
class PartResult:
    """What writing one part of a shard left in its folder, for the manifest."""

    part: int
    files: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # key: name, hash, lines
    exchanges: int = 0
    too_long: int = 0
    sources: dict[str, int] = field(default_factory=dict)


def write_manifest(
    folder: Path,
    name: str,
    results: list[PartResult],
    processes: int,
    time_range: tuple[datetime | None, datetime | None],
) -> dict[str, Any]:
    """Drop the files of parts without lines, name the rest in order, and write the
    manifest (fsynced). Counts are over every part; ``time_range`` is the exported exchanges'
    first and last time."""
    kept = sorted((r for r in results if r.exchanges), key=lambda r: r.part)
    files: dict[str, list[dict[str, Any]]] = {key: [] for key in FORMATS}
    for position, result in enumerate(kept):
        for key, (temporary, digest, lines) in result.files.items():
            final = part_name(key, position, len(kept))
            if final != temporary:
                (folder / temporary).rename(folder / final)
            files[key].append({"name": final, "sha256": digest, "lines": lines})
    listed = {entry["name"] for entries in files.values() for entry in entries}
    for leftover in folder.iterdir():  # the files of parts without lines
        if leftover.name not in listed:
            leftover.unlink()
    sources: dict[str, int] = {}
    for result in results:
        for source, count in result.sources.items():
            sources[source] = sources.get(source, 0) + count
    first, last = time_range
    content = hashlib.sha256()
    for entry in sorted((f for entries in files.values() for f in entries), key=_by_name):
        content.update(f"{entry['name']}:{entry['sha256']}\n".encode())
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "shard": name,
        "processes": processes,
        "created_at": utcnow().isoformat(),
        "exchanges": sum(r.exchanges for r in results),
        "skipped_too_long": sum(r.too_long for r in results),
        "sources": dict(sorted(sources.items())),
        "time_range": {
            "first": first.isoformat() if first else None,
            "last": last.isoformat() if last else None,
        },
        "files": files,
        "content_hash": content.hexdigest(),
        "formats": {
            "completions": 'dictionary form: {"user": ..., "agent": ...}',
            "instruct": 'Llama-2 [INST] text: {"text": ...}',
            "messages": 'conversational: {"messages": [{"role", "content"}, ...]}',
            "index": "exchange id, user pseudonym, question key, source (tab-separated)",
        },
    }
    with open(folder / "manifest.json", "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    fsync_directory(folder)
    return manifest


def _by_name(entry: dict[str, Any]) -> str:
    return str(entry["name"])
