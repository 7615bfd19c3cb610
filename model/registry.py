"""Model versions: plain Hugging Face folders with their metadata, and a pointer to the one
that serves.

Layout (``DATA_DIR/models`` by default)::

    models/
        versions/0001/        a model folder (config, weights, tokenizer, chat template)
            version.json      parent, data, metrics, timing, who asked, DP parameters
            loss.png          the loss curve
        versions/.tmp-0002-…  a version being written (removed by :meth:`Registry.clean_up`)
        current.json          {"version": 1, "previous": [0]}

Version 0 is the base model (``MODEL_PATH``, or the default model), which is never copied.
A version is written into a temporary folder, fsynced, and renamed into place; the pointer is
written to a temporary file, fsynced, and renamed over ``current.json``. So a process killed at
any moment leaves the registry as it was before the step or after it, never half-way, and a
leftover temporary folder is cleaned up by the next start. Every replica watches the pointer
(:func:`watch_pointer`) and hot-swaps its model service when it changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.learning.shards import fsync_directory

logger = logging.getLogger(__name__)

POINTER = "current.json"
METADATA = "version.json"
TEMP_PREFIX = ".tmp-"
BASE_VERSION = 0


class RegistryError(Exception):
    """A version that does not exist, or a registry that cannot be written."""


@dataclass(frozen=True, kw_only=True)
class ModelVersion:
    """One version: its number, folder and metadata (``{}`` for the base model)."""

    number: int
    path: Path
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "base model" if self.number == BASE_VERSION else f"version {self.number}"


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path``: a temporary file, fsynced, renamed over it."""
    temporary = path.with_name(f"{TEMP_PREFIX}{path.name}-{secrets.token_hex(4)}")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_directory(path.parent)


class Registry:
    """The versions under ``root`` and the pointer to the serving one; ``base`` is version 0."""

    def __init__(self, root: Path, *, base: str) -> None:
        self.root = root
        self.base = base
        self.versions_dir = root / "versions"

    # --- reading -------------------------------------------------------------------------

    def versions(self) -> list[ModelVersion]:
        """Every version, the base model first."""
        found = [ModelVersion(number=BASE_VERSION, path=Path(self.base))]
        if self.versions_dir.is_dir():
            for folder in sorted(self.versions_dir.iterdir()):
                if folder.name.isdigit() and (folder / METADATA).is_file():
                    found.append(self._version_at(folder))
        return found

    def version(self, number: int) -> ModelVersion:
        if number == BASE_VERSION:
            return ModelVersion(number=BASE_VERSION, path=Path(self.base))
        folder = self.versions_dir / f"{number:04d}"
        if not (folder / METADATA).is_file():
            raise RegistryError(f"there is no model version {number}")
        return self._version_at(folder)

    def _version_at(self, folder: Path) -> ModelVersion:
        metadata = json.loads((folder / METADATA).read_text(encoding="utf-8"))
        return ModelVersion(number=int(folder.name), path=folder, metadata=metadata)

    def pointer(self) -> tuple[int, list[int]]:
        """The serving version's number and the versions served before it (oldest first)."""
        path = self.root / POINTER
        if not path.is_file():
            return BASE_VERSION, []
        data = json.loads(path.read_text(encoding="utf-8"))
        return int(data["version"]), [int(n) for n in data.get("previous", [])]

    def current(self) -> ModelVersion:
        """The version that serves (the base model until one is promoted)."""
        return self.version(self.pointer()[0])

    # --- writing -------------------------------------------------------------------------

    def clean_up(self) -> list[Path]:
        """Remove what a killed training or promotion left half-written; the paths removed."""
        removed: list[Path] = []
        for parent in (self.versions_dir, self.root):
            if not parent.is_dir():
                continue
            for leftover in parent.iterdir():
                if leftover.name.startswith(TEMP_PREFIX):
                    if leftover.is_dir():
                        shutil.rmtree(leftover, ignore_errors=True)
                    else:
                        leftover.unlink(missing_ok=True)
                    removed.append(leftover)
        for path in removed:
            logger.info("removed the unfinished %s", path)
        return removed

    def next_number(self) -> int:
        numbers = [version.number for version in self.versions()]
        return max(numbers) + 1

    def new_folder(self) -> tuple[int, Path]:
        """A number and a temporary folder to write a new version into."""
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        number = self.next_number()
        folder = self.versions_dir / f"{TEMP_PREFIX}{number:04d}-{secrets.token_hex(4)}"
        folder.mkdir()
        return number, folder

    def add(self, number: int, folder: Path, metadata: dict[str, Any]) -> ModelVersion:
        """Make the model written in ``folder`` version ``number``: metadata written, every
        file fsynced, the folder renamed into place. It does not serve until :meth:`use`."""
        final = self.versions_dir / f"{number:04d}"
        if final.exists():
            raise RegistryError(f"model version {number} exists already")
        (folder / METADATA).write_text(
            json.dumps({"version": number, **metadata}, indent=2, sort_keys=True) + "\n",
            encoding="utf-8",
        )
        for path in folder.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        fsync_directory(folder)
        os.rename(folder, final)
        fsync_directory(self.versions_dir)
        return self._version_at(final)

    def use(self, number: int) -> ModelVersion:
        """Serve version ``number`` from now on (every replica follows the pointer)."""
        version = self.version(number)
        current, history = self.pointer()
        if number == current:
            return version
        self._write_pointer(number, [*history, current])
        return version

    def rollback(self) -> ModelVersion:
        """Serve the version served before the current one.

        Raises:
            RegistryError: nothing was served before it.
        """
        current, history = self.pointer()
        if not history:
            raise RegistryError(f"{self.version(current).label} is the first one served")
        previous = history[-1]
        self.version(previous)  # still there
        self._write_pointer(previous, history[:-1])
        return self.version(previous)

    def _write_pointer(self, number: int, previous: list[int]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"version": number, "previous": previous[-50:]}) + "\n"
        write_atomically(self.root / POINTER, text)
        logger.info("model version %d is now the current one", number)

    def update_metadata(self, number: int, changes: dict[str, Any]) -> None:
        """Merge ``changes`` into a version's metadata (atomically)."""
        version = self.version(number)
        if number == BASE_VERSION:
            raise RegistryError("the base model has no metadata to change")
        write_atomically(
            version.path / METADATA,
            json.dumps({**version.metadata, **changes}, indent=2, sort_keys=True) + "\n",
        )


async def watch_pointer(
    registry: Registry,
    *,
    serving: Callable[[], Path | None],
    swap: Callable[[Path], Awaitable[Any]],
    interval: float = 2.0,
) -> None:
    """Swap to the registry's current version whenever the pointer names another folder than
    the one ``serving()`` says serves; runs until cancelled. A folder that fails to load is
    logged and tried again only once the pointer changes."""
    failed: Path | None = None
    while True:
        try:
            target = await asyncio.to_thread(lambda: registry.current().path)
        except (OSError, ValueError, KeyError, RegistryError) as error:
            logger.warning("cannot read the model pointer: %s", error)
            target = None
        if target is not None and target != failed:
            here = serving()
            if here is None or target.resolve() != here.resolve():
                try:
                    await swap(target)
                    failed = None
                except Exception as error:
                    logger.error("could not switch to the model at %s: %s", target, error)
                    failed = target
        await asyncio.sleep(interval)


def remove_version(registry: Registry, number: int) -> None:
    """Delete a version that does not serve (disk space)."""
    if number in (BASE_VERSION, registry.pointer()[0]):
        raise RegistryError(f"version {number} serves or is the base model")
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(registry.version(number).path)
