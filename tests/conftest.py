"""Shared fixtures: a real database (SQLite and PostgreSQL) and messages in the shared format."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from bot.conversation import IncomingMessage, Platform, Role
from bot.storage import Database

#: The machine's PostgreSQL (trust auth). Storage tests run on it and on SQLite.
POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@contextlib.contextmanager
def scratch_postgres(prefix: str = "chatbot_test") -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped afterwards; skips the test where there is no
    PostgreSQL (never in CI)."""
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as error:
        admin.dispose()
        if IN_CI:
            raise
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {error.orig}")
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    with scratch_postgres() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_database(postgres_url: str) -> Iterator[Database]:
    database = Database(postgres_url)
    database.upgrade()
    yield database
    database.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated, empty database: a SQLite file, then the real PostgreSQL."""
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path / 'chatbot.db'}")
        db.upgrade()
        yield db
        db.dispose()
        return
    db = request.getfixturevalue("postgres_database")
    with db.engine.begin() as connection:
        connection.execute(
            text(
                "TRUNCATE ratings, exchanges, messages, conversations, export_shards, "
                "export_marks, channel_settings, deletions, leases, handled_commands, "
                "exchange_reviews RESTART IDENTITY CASCADE"
            )
        )
    yield db


_counter = iter(range(1, 10**9))


def make_message(
    text: str = "How do I reset my password?",
    *,
    platform: str = Platform.CONSOLE.value,
    channel: str = "C1",
    thread: str = "T1",
    author_id: str = "U1",
    role: Role = Role.USER,
    message_id: str | None = None,
    event_id: str | None = None,
    is_direct: bool = False,
) -> IncomingMessage:
    """An incoming message in the shared format, with fresh ids unless given."""
    n = next(_counter)
    return IncomingMessage(
        platform=platform,
        workspace="W1",
        channel=channel,
        thread=thread,
        author_id=author_id,
        author_name=f"name-{author_id}",
        role=role,
        text=text,
        timestamp=datetime(2026, 11, 28, 12, 0, tzinfo=UTC),
        message_id=message_id or f"m{n}",
        event_id=event_id,
        is_direct=is_direct,
        mentions_bot=True,
    )


# --------------------------------------------------------------------------- the tiny model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real model folder: the TINY model trained on TINY_EXCHANGES (the seed exchanges among
    them), built once per test session in a few seconds."""
    from model.bootstrap import TINY, TINY_EXCHANGES, build_default_model

    output = tmp_path_factory.mktemp("tiny-model") / "model"
    return build_default_model(
        output, exchanges=TINY_EXCHANGES, config=TINY, progress=lambda _line: None
    )


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):
    """The tiny model served by the model service (batched), shared by the whole session."""
    from model.service import ModelService

    service = ModelService.load(tiny_model_dir, device="cpu")
    yield service
    service.close()


@pytest.fixture(scope="session")
def tiny_model_token_by_token(tiny_model_dir: Path):
    """The tiny model served with every token handed to its stream as it comes (the default
    hands them over in runs): for tests of what a reader sees as a reply grows."""
    from model.batch_requests import BatchSettings
    from model.service import ModelService

    service = ModelService.load(
        tiny_model_dir, device="cpu", batch=BatchSettings(stream_interval=0.0)
    )
    yield service
    service.close()
