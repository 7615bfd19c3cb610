"""The model registry (model/registry.py): versions, the atomic pointer, rollback, clean-up of
what a killed process left, and replicas following the pointer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from model.registry import (
    BASE_VERSION,
    POINTER,
    Registry,
    RegistryError,
    remove_version,
    watch_pointer,
)


def a_version(registry: Registry, **metadata: object) -> int:
    number, folder = registry.new_folder()
    (folder / "config.json").write_text("{}")
    registry.add(number, folder, {"parent": registry.pointer()[0], **metadata})
    return number


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    base = tmp_path / "base-model"
    base.mkdir()
    return Registry(tmp_path / "models", base=str(base))


def test_the_base_model_serves_until_a_version_is_used(registry: Registry) -> None:
    assert registry.current().number == BASE_VERSION
    assert registry.current().path == Path(registry.base)
    first = a_version(registry, triggered_by="slack:U1")
    assert first == 1
    assert registry.current().number == BASE_VERSION  # added, not serving
    registry.use(first)
    assert registry.current().number == 1
    assert registry.current().metadata["triggered_by"] == "slack:U1"
    assert [v.number for v in registry.versions()] == [0, 1]


def test_rollback_walks_back_through_what_served(registry: Registry) -> None:
    one, two = a_version(registry), a_version(registry)
    registry.use(one)
    registry.use(two)
    assert registry.rollback().number == one
    assert registry.rollback().number == BASE_VERSION
    with pytest.raises(RegistryError, match="first one served"):
        registry.rollback()
    registry.use(two)  # "use N" works for any version
    assert registry.current().number == two


def test_unknown_versions_are_refused(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="no model version 7"):
        registry.use(7)
    assert registry.current().number == BASE_VERSION


def test_a_version_that_serves_cannot_be_removed(registry: Registry) -> None:
    one, two = a_version(registry), a_version(registry)
    registry.use(one)
    with pytest.raises(RegistryError):
        remove_version(registry, one)
    remove_version(registry, two)
    assert [v.number for v in registry.versions()] == [0, 1]


def test_clean_up_removes_what_a_killed_training_left(registry: Registry) -> None:
    number, folder = registry.new_folder()
    (folder / "model.safetensors").write_bytes(b"half written")
    assert [v.number for v in registry.versions()] == [0]  # a partial folder is no version
    assert registry.clean_up() == [folder]
    assert not folder.exists()
    assert registry.next_number() == number  # the number is free again


def test_metadata_updates_are_merged(registry: Registry) -> None:
    one = a_version(registry, metrics={"new": 1})
    registry.update_metadata(one, {"promoted": True})
    assert registry.version(one).metadata["metrics"] == {"new": 1}
    assert registry.version(one).metadata["promoted"] is True


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from model.registry import Registry
    registry = Registry(Path(sys.argv[1]), base=sys.argv[2])
    real_replace = os.replace
    def replace_then_die(source, target):
        if sys.argv[3] == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(source, target)
        os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace_then_die
    registry.use(int(sys.argv[4]))
    """
)


@pytest.mark.parametrize("moment", ["before", "after"])
def test_a_process_killed_while_switching_leaves_a_whole_pointer(
    registry: Registry, moment: str
) -> None:
    one = a_version(registry)
    registry.use(one)
    two = a_version(registry)
    done = subprocess.run(
        [sys.executable, "-c", KILLER, str(registry.root), registry.base, moment, str(two)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == -signal.SIGKILL
    json.loads((registry.root / POINTER).read_text())  # whole, never half-written
    assert registry.current().number == (one if moment == "before" else two)
    registry.clean_up()
    assert not [p for p in os.listdir(registry.root) if p.startswith(".tmp-")]


async def test_replicas_follow_the_pointer(registry: Registry) -> None:
    serving: list[Path] = [Path(registry.base)]
    swapped = asyncio.Event()

    async def swap(path: Path) -> None:
        if path.name == "0002":
            raise RuntimeError("corrupt weights")
        serving.append(path)
        swapped.set()

    watcher = asyncio.create_task(
        watch_pointer(registry, serving=lambda: serving[-1], swap=swap, interval=0.01)
    )
    try:
        one, two = a_version(registry), a_version(registry)
        registry.use(one)
        await asyncio.wait_for(swapped.wait(), 5)
        assert serving[-1] == registry.version(one).path
        registry.use(two)  # fails to load: the replica keeps serving version 1
        await asyncio.sleep(0.1)
        assert serving[-1] == registry.version(one).path
        swapped.clear()
        registry.rollback()  # back to 1: nothing to do
        registry.rollback()  # back to the base model
        await asyncio.wait_for(swapped.wait(), 5)
        assert serving[-1] == Path(registry.base)
    finally:
        watcher.cancel()
