"""``transformers serve`` on a free loopback port, for the serving benchmark's row (c)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

#: Seconds ``transformers serve`` may take to answer /health.
SERVE_STARTUP_TIMEOUT = 300.0


class ServeUnavailable(RuntimeError):
    """``transformers serve`` did not start; the message says why."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def transformers_command() -> list[str]:
    """The ``transformers`` command line tool next to this Python, else on PATH."""
    beside = Path(sys.executable).with_name("transformers")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("transformers")
    if found is None:
        raise ServeUnavailable("no `transformers` command (pip install 'transformers[serving]')")
    return [found]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextlib.asynccontextmanager
async def transformers_serve(
    path: Path, *, continuous_batching: bool, log_file: Path
) -> AsyncIterator[str]:
    """Run ``transformers serve`` for ``path`` on a free loopback port; yields its /v1 URL."""
    port = free_port()
    options = ["--host", "127.0.0.1", "--device", "cpu", "--dtype", "float32"]
    batching = "--continuous-batching" if continuous_batching else "--no-continuous-batching"
    command = [*transformers_command(), "serve", str(path), *options, "--port", str(port), batching]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    with log_file.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=output, stderr=asyncio.subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + SERVE_STARTUP_TIMEOUT
        health = f"http://127.0.0.1:{port}/health"
        while not await asyncio.to_thread(_healthy, health):
            if process.returncode is not None or time.monotonic() > deadline:
                text = await asyncio.to_thread(log_file.read_text, errors="replace")
                tail = " | ".join(text.strip().splitlines()[-5:])
                what = "did not answer /health" if process.returncode is None else "exited"
                raise ServeUnavailable(f"transformers serve {what}: {tail}")
            await asyncio.sleep(0.25)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
