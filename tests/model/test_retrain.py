"""The retrain's process handling (model/retrain.py): a killed bot leaves no trainer behind and
the registry as it was; a failed trainer is reported, not raised; a held lease is refused."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from model.registry import Registry

REPO = Path(__file__).resolve().parents[2]

RUN_A_LONG_RETRAIN = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from bot.learning.training_data import TrainingData, TrainingExchange
    from model.registry import Registry
    from model.retrain import Retrainer, RetrainSettings
    from model.train import Recipe

    class Lease:
        def acquire(self): return True
        def renew(self): pass
        def release(self): pass

    async def export(): return "Nothing new to export."
    async def data():
        exchange = TrainingExchange(
            messages=({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}),
            pseudonym="p", question_key="hi", source="agent", shard="shard-1",
        )
        return TrainingData(train=[exchange] * 50, held_out=[])

    registry = Registry(Path(sys.argv[1]), base=sys.argv[2])
    retrainer = Retrainer(
        registry=registry, export=export, data=data, lease=Lease(), swap=None, replay=[],
        settings=RetrainSettings(recipe=Recipe(epochs=100000, batch_size=1)),
    )
    print(asyncio.run(retrainer.retrain(requested_by="test")).text, flush=True)
    """
)


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_killed_bot_leaves_no_trainer_and_no_version(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    bot = subprocess.Popen(
        [sys.executable, "-c", RUN_A_LONG_RETRAIN, str(models), str(tiny_model_dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        trainers: list[int] = []
        while time.monotonic() < deadline and not trainers:
            trainers = children_of(bot.pid)
            time.sleep(0.1)
        assert trainers, "the trainer never started"
        (trainer,) = trainers
        # Under nice, at a lower priority than the bot.
        assert os.getpriority(os.PRIO_PROCESS, trainer) > os.getpriority(os.PRIO_PROCESS, bot.pid)
        time.sleep(3)  # well into the training
        assert alive(trainer) and bot.poll() is None
        os.kill(bot.pid, signal.SIGKILL)
        bot.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and alive(trainer):
            time.sleep(0.1)
        assert not alive(trainer), "the trainer outlived the bot"
    finally:
        if bot.poll() is None:
            bot.kill()
    registry = Registry(models, base=str(tiny_model_dir))
    assert registry.current().number == 0
    assert [version.number for version in registry.versions()] == [0]
    leftovers = [p for p in (models / "versions").iterdir() if p.name.startswith(".tmp-")]
    assert leftovers  # the partial folder of the killed training...
    assert registry.clean_up() == leftovers  # ...which the next training removes first
    assert registry.next_number() == 1
