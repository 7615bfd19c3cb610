"""Reading the exported shards back as training data (the retrain's input).

Every committed shard under the export directory is read, in both layouts its manifest can
declare: schema 1 (``messages.jsonl`` and ``index.tsv``, one file each) and schema 2 (parts,
``messages-00000-of-00002.jsonl`` ..., listed in order under ``files``). The index says, line by
line, whose each line is (the user's pseudonym) and its question key, so:

- the lines of a user who asked to be forgotten after the shard was written are dropped (the
  deletion is recorded under the same pseudonym; a later conversation of theirs is theirs again);
- among lines with the same question key, only the newest shard's answer is kept;
- once there are at least ``holdout_from`` exchanges, a fixed share of question keys (chosen by
  a hash of the key, so the same ones across retrains) is held out for evaluation; below that,
  everything is trained on (a bot taught 20 answers must learn all 20).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class TrainingDataError(Exception):
    """A shard that cannot be read (a damaged or unknown layout)."""


@dataclass(frozen=True, slots=True)
class TrainingExchange:
    """One exported exchange: the conversation ending with the answer, and whose it is."""

    messages: tuple[dict[str, str], ...]
    pseudonym: str
    question_key: str
    source: str
    shard: str

    @property
    def question(self) -> str:
        return self.messages[-2]["content"] if len(self.messages) > 1 else ""

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]


@dataclass(frozen=True, kw_only=True)
class TrainingData:
    """What a retrain learns from, and what it left out."""

    train: list[TrainingExchange]
    held_out: list[TrainingExchange]
    #: Lines used per shard, in shard order.
    shards: dict[str, int] = field(default_factory=dict)
    forgotten_lines: int = 0
    superseded_lines: int = 0
    #: The shards' content hashes, in order: the same data gives the same fingerprint.
    fingerprint: str = ""

    @property
    def exchanges(self) -> int:
        return len(self.train) + len(self.held_out)

    def pseudonyms(self) -> set[str]:
        """Whose data the training learns from (lineage)."""
        return {exchange.pseudonym for exchange in self.train}

    def describe(self) -> str:
        shards = ", ".join(f"{name} ({count})" for name, count in self.shards.items()) or "none"
        return (
            f"{len(self.train)} exchanges to train on, {len(self.held_out)} held out, "
            f"from {len(self.shards)} shards: {shards}; "
            f"{self.forgotten_lines} lines of forgotten users and "
            f"{self.superseded_lines} older answers left out"
        )


def shard_folders(directory: Path) -> list[Path]:
    """The committed shards under ``directory``, oldest first (their names start with the UTC
    time they were written)."""
    if not directory.is_dir():
        return []
    return sorted(
        path
        for path in directory.iterdir()
        if path.is_dir() and path.name.startswith("shard-") and (path / MANIFEST).is_file()
    )


def held_out_key(question_key: str, *, percent: int) -> bool:
    """Whether exchanges with this question key are held out (stable across retrains)."""
    digest = hashlib.sha256(question_key.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < percent


def read_training_data(
    directory: Path,
    *,
    forgotten: Mapping[str, datetime],
    holdout_from: int = 200,
    holdout_percent: int = 10,
) -> TrainingData:
    """Every shard's exchanges, as the module docstring says. ``forgotten`` maps a forgotten
    user's pseudonym to when they asked.

    Raises:
        TrainingDataError: a shard's manifest or files cannot be read.
    """
    newest: dict[str, TrainingExchange] = {}
    forgotten_lines = superseded = 0
    hashes = hashlib.sha256()
    for folder in shard_folders(directory):
        manifest = _manifest(folder)
        hashes.update(f"{folder.name}:{manifest.get('content_hash', '')}\n".encode())
        written = _written_at(manifest)
        for exchange in _lines(folder, manifest):
            asked = forgotten.get(exchange.pseudonym)
            if asked is not None and (written is None or written <= asked):
                forgotten_lines += 1
                continue
            if exchange.question_key in newest:
                superseded += 1
            newest[exchange.question_key] = exchange
    exchanges = list(newest.values())
    train, held_out = exchanges, []
    if len(exchanges) >= holdout_from:
        held_out = [e for e in exchanges if held_out_key(e.question_key, percent=holdout_percent)]
        train = [e for e in exchanges if not held_out_key(e.question_key, percent=holdout_percent)]
    counts: dict[str, int] = {}
    for exchange in exchanges:
        counts[exchange.shard] = counts.get(exchange.shard, 0) + 1
    hashes.update(f"forgotten:{forgotten_lines}\n".encode())
    return TrainingData(
        train=train,
        held_out=held_out,
        shards=dict(sorted(counts.items())),
        forgotten_lines=forgotten_lines,
        superseded_lines=superseded,
        fingerprint=hashes.hexdigest(),
    )


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest: dict[str, Any] = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise TrainingDataError(f"cannot read the manifest of {folder.name}: {error}") from error
    if manifest.get("schema_version") not in (1, 2):
        raise TrainingDataError(
            f"{folder.name} has schema version {manifest.get('schema_version')!r}; "
            "this bot reads 1 and 2"
        )
    return manifest


def parse_utc(value: Any) -> datetime | None:
    """An ISO time as written in manifests and version metadata (naive ones are UTC); ``None``
    when missing or unreadable."""
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _written_at(manifest: Mapping[str, Any]) -> datetime | None:
    return parse_utc(manifest.get("created_at"))


def _files(folder: Path, manifest: Mapping[str, Any], key: str) -> list[Path]:
    """The files of one format in order: one (schema 1) or the listed parts (schema 2)."""
    listed = manifest.get("files", {}).get(key)
    if listed is None:
        raise TrainingDataError(f"{folder.name} lists no {key} files")
    entries = [listed] if isinstance(listed, dict) else list(listed)
    return [folder / str(entry["name"]) for entry in entries]


def _lines(folder: Path, manifest: Mapping[str, Any]) -> Iterator[TrainingExchange]:
    """The shard's messages lines zipped with its index lines."""
    messages = list(_read_lines(_files(folder, manifest, "messages")))
    index = list(_read_lines(_files(folder, manifest, "index")))
    if len(messages) != len(index):
        raise TrainingDataError(
            f"{folder.name} has {len(messages)} messages lines but {len(index)} index lines"
        )
    for number, (line, row) in enumerate(zip(messages, index, strict=True), start=1):
        try:
            conversation = json.loads(line)["messages"]
            _exchange_id, pseudonym, question_key, source = row.rstrip("\n").split("\t")
        except (ValueError, KeyError, TypeError) as error:
            raise TrainingDataError(f"{folder.name}, line {number}: {error}") from error
        yield TrainingExchange(
            messages=tuple({"role": m["role"], "content": m["content"]} for m in conversation),
            pseudonym=pseudonym,
            question_key=question_key,
            source=source,
            shard=folder.name,
        )


def _read_lines(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        try:
            with open(path, encoding="utf-8") as handle:
                yield from handle
        except OSError as error:
            raise TrainingDataError(
                f"cannot read {path.parent.name}/{path.name}: {error}"
            ) from error


def forgotten_users(database: Any) -> dict[str, datetime]:
    """Each forgotten user's pseudonym and when they last asked (from the deletions table)."""
    from sqlalchemy import func, select

    from bot.storage import DeletionRecord

    table = DeletionRecord.__table__  # type: ignore[attr-defined]
    with database.engine.connect() as connection:
        rows = connection.execute(
            select(table.c.user_pseudonym, func.max(table.c.requested_at)).group_by(
                table.c.user_pseudonym
            )
        ).all()
    return {
        pseudonym: when if when.tzinfo else when.replace(tzinfo=UTC) for pseudonym, when in rows
    }


def exported_since(database: Any, since: datetime | None) -> int:
    """Exchanges exported in shards committed after ``since`` (all of them for ``None``)."""
    from sqlalchemy import func, select

    from bot.storage import ExportShardRecord

    table = ExportShardRecord.__table__  # type: ignore[attr-defined]
    query = select(func.coalesce(func.sum(table.c.exchange_count), 0))
    if since is not None:
        query = query.where(table.c.created_at > since)
    with database.engine.connect() as connection:
        return int(connection.execute(query).scalar_one())
