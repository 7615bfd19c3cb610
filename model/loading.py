"""Finding and naming a model: local folder checks, hub ids, versions that identify the
weights, and the default model built on first use."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class ModelLoadError(Exception):
    """A model folder (or hub id) could not be loaded; the message says why."""


def _is_local_reference(path: str | Path) -> bool:
    """Whether ``path`` names a local folder (rather than a Hugging Face hub id)."""
    if isinstance(path, Path):
        return True
    text = str(path)
    return (
        Path(text).exists()
        or text.startswith((".", "/", "~", "\\"))
        or text.count("/") > 1
        or "\\" in text
        or (len(text) > 1 and text[1] == ":")
    )


#: Read this much of a weight file at a time while hashing it (weights can be gigabytes).
_HASH_BLOCK = 1 << 20


def folder_version(folder: Path) -> str:
    """``name-hash``, the hash of config.json and the weight files' contents.

    Contents, not sizes and mtimes: a copied or re-downloaded folder keeps its version, and
    weights changed in place (same size, any mtime) get a new one. Weight files are
    ``*.safetensors``, ``*.bin`` and the sharded checkpoints' ``*.index.json``, each hashed
    with its name, in name order, read in 1 MiB blocks.
    """
    digest = hashlib.sha256()
    names = sorted(
        p.name
        for p in folder.iterdir()
        if p.is_file() and p.name.endswith((".safetensors", ".bin", ".index.json"))
    )
    for name in ["config.json", *names]:
        digest.update(f"{name}\0".encode())
        with (folder / name).open("rb") as file:
            while block := file.read(_HASH_BLOCK):
                digest.update(block)
        digest.update(b"\0")
    return f"{folder.name}-{digest.hexdigest()[:10]}"


def resolve_hub_commit(reference: str) -> str | None:
    """The commit hash a hub id's default branch points to, as transformers resolves it.

    From the hub, or offline from the local cache; None where neither knows it.
    """
    from transformers.utils.hub import resolve_revision

    commit = getattr(resolve_revision(reference), "resolved", None)
    return commit if isinstance(commit, str) and commit else None


def hub_version(reference: str, *, commit: str | None, config: Any) -> str:
    """``name-commit`` for a hub model: the revision its files were loaded from.

    Falls back to a hash of the loaded config where the commit is unknown.
    """
    name = reference.rsplit("/", 1)[-1]
    if commit:
        return f"{name}-{commit[:10]}"
    config_hash = hashlib.sha256(config.to_json_string().encode()).hexdigest()
    return f"{name}-{config_hash[:10]}"


def _check_local_folder(folder: Path) -> None:
    """Raise ModelLoadError unless ``folder`` looks like a Hugging Face model folder."""
    if not folder.exists():
        raise ModelLoadError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise ModelLoadError(f"model path {folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} is not a model folder: it has no config.json "
            "(build the default model with `python -m model.bootstrap DIR`)"
        )
    if not any((folder / name).is_file() for name in _WEIGHT_FILES) and not any(
        folder.glob("*.safetensors")
    ):
        raise ModelLoadError(f"{folder} is not a model folder: it has no weight files")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelLoadError(f"{folder} is not a model folder: it has no tokenizer files")


def ensure_default_model(path: Path, *, progress: Callable[[str], None] = print) -> Path:
    """Return ``path``, first building the default model there if the folder is missing/empty.

    Raises:
        ModelLoadError: ``path`` exists with other files in it but no model (not overwritten).
    """
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ModelLoadError(
            f"{path} exists but is not a model folder; refusing to overwrite it with the "
            "default model"
        )
    from model.bootstrap import build_default_model

    progress(f"no model at {path}; building the default model (about 2 minutes)")
    return build_default_model(path, progress=progress)
