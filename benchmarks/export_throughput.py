"""Export throughput and memory on SQLite and PostgreSQL, against a plain SELECT → json.dumps loop.

Seeds N exchanges (default 1,000,000) with realistic texts: starter-corpus questions and answers
with variations (ticket numbers, platforms, names) so that near-duplicate dedupe keeps them
apart; half answered by human agents, half bot replies rated 👍, a few messages of context in
each conversation; one channel of 500 has training turned off (``OPTED_OUT``: 0.2% of the
conversations, left out by the export's pick). Then, each in a fresh process so peak RSS is
its own:

- ``export``: the real ``chatbot export`` path (Exporter.run: selection, dedupe, context,
  redaction, three formats, fsync, commit), with its default number of processes (one per
  core, at most four);
- ``baseline``: ``SELECT`` question and answer text joined through exchanges → ``json.dumps``
  → a file, the least an export could do.

Usage::

    python benchmarks/export_throughput.py                 # 1,000,000 exchanges, both databases
    python benchmarks/export_throughput.py --exchanges 100000 --databases sqlite
    python benchmarks/export_throughput.py --growth        # also 250k vs 1M: is memory flat?

PostgreSQL: ``TEST_POSTGRES_URL`` (default postgresql+psycopg://postgres@127.0.0.1:5432/test);
a scratch database is created and dropped.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from bot.storage import Database, text_key  # noqa: E402
from model.corpus import load_starter_corpus  # noqa: E402

POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
PLATFORMS = ("slack", "discord")
VARIATIONS = (
    "{q}",
    "{q} (ticket #{n})",
    "Hi, {q} I'm on macOS {n}.",
    "{q} Asking for team {n}.",
    "Quick one: {q} thanks! [{n}]",
)


#: The channel with training off: (platform, channel, when) for ``channel_settings``.
OPTED_OUT = ("slack", "C0")
OPT_OUT_SQL = (
    "INSERT INTO channel_settings (platform, channel, training_opt_out, updated_by, updated_at) "
    f"VALUES ('{OPTED_OUT[0]}', '{OPTED_OUT[1]}', TRUE, 'benchmark', '2026-01-01 00:00:00+00')"
)


def exchanges_per_conversation(rng: random.Random) -> int:
    return rng.choice((1, 1, 2, 3, 4))


def rows(n: int, seed: int = 7):
    """Yield (conversations, messages, exchanges, ratings) rows for ``n`` exchanges."""
    corpus = load_starter_corpus()
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    message_id = exchange_id = conversation_id = 0
    made = 0
    while made < n:
        conversation_id += 1
        platform = PLATFORMS[conversation_id % 2]
        channel = f"C{conversation_id % 500}"
        yield (
            "conversation",
            (conversation_id, platform, "W1", channel, f"T{conversation_id}", start),
        )
        for _ in range(min(exchanges_per_conversation(rng), n - made)):
            made += 1
            question, answer = corpus[rng.randrange(len(corpus))]
            question = rng.choice(VARIATIONS).format(q=question, n=made)
            when = start + timedelta(seconds=made)
            by_agent = made % 2 == 0
            user = f"U{rng.randrange(50_000)}"
            message_id += 1
            question_id = message_id
            yield (
                "message",
                (
                    question_id,
                    conversation_id,
                    platform,
                    channel,
                    f"m{question_id}",
                    user,
                    "user",
                    question,
                    text_key(question),
                    "answered",
                    None,
                    when,
                ),
            )
            message_id += 1
            yield (
                "message",
                (
                    message_id,
                    conversation_id,
                    platform,
                    channel,
                    f"m{message_id}",
                    "AGENT" if by_agent else "bot",
                    "human_agent" if by_agent else "assistant",
                    answer,
                    text_key(answer),
                    None,
                    "sent",
                    when,
                ),
            )
            exchange_id += 1
            yield (
                "exchange",
                (
                    exchange_id,
                    conversation_id,
                    question_id,
                    message_id,
                    "human_agent" if by_agent else "bot",
                    when,
                ),
            )
            if not by_agent:
                yield ("rating", (exchange_id, exchange_id, user, 1, when))


INSERTS = {
    "conversation": (
        "INSERT INTO conversations (id, platform, workspace, channel, thread, created_at) "
        "VALUES ({})"
    ),
    "message": (
        "INSERT INTO messages (id, conversation_id, platform, channel, platform_message_id, "
        "author_id, role, text, text_key, answer_state, delivery_state, sent_at, author_name, "
        "is_direct, mentions_bot, stored_at) VALUES ({}, '', FALSE, FALSE, {})"
    ),
    "exchange": (
        "INSERT INTO exchanges (id, conversation_id, user_message_id, answer_message_id, "
        "answered_by, created_at, for_training) VALUES ({}, TRUE)"
    ),
    "rating": "INSERT INTO ratings (id, exchange_id, rater_id, value, created_at) VALUES ({})",
}
WIDTH = {"conversation": 6, "message": 12, "exchange": 6, "rating": 5}
COPY_COLUMNS = {
    "conversation": "conversations (id, platform, workspace, channel, thread, created_at)",
    "message": (
        "messages (id, conversation_id, platform, channel, platform_message_id, author_id, role, "
        "text, text_key, answer_state, delivery_state, sent_at, author_name, is_direct, "
        "mentions_bot, stored_at)"
    ),
    "exchange": (
        "exchanges (id, conversation_id, user_message_id, answer_message_id, answered_by, "
        "created_at, for_training)"
    ),
    "rating": "ratings (id, exchange_id, rater_id, value, created_at)",
}


def seed_sqlite(path: Path, n: int) -> None:
    import sqlite3

    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=OFF")
    batches: dict[str, list[tuple]] = {kind: [] for kind in INSERTS}
    sql = {}
    for kind, template in INSERTS.items():
        marks = ", ".join("?" * WIDTH[kind])
        if kind == "message":
            sql[kind] = template.format(marks, "?")
        else:
            sql[kind] = template.format(marks)

    def flush() -> None:
        for kind in ("conversation", "message", "exchange", "rating"):
            if batches[kind]:
                connection.executemany(sql[kind], batches[kind])
                batches[kind].clear()

    for kind, row in rows(n):
        if kind == "message":
            row = (*row, row[-1])
        batches[kind].append(
            tuple(
                v.replace(tzinfo=None).isoformat(sep=" ") if isinstance(v, datetime) else v
                for v in row
            )
        )
        if len(batches["message"]) >= 50_000:
            flush()
    flush()
    connection.execute(OPT_OUT_SQL)
    connection.commit()
    connection.close()


def seed_postgres(url: str, n: int) -> None:
    import psycopg

    plain = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain) as connection, connection.cursor() as cursor:
        buffers = {kind: io.StringIO() for kind in INSERTS}

        def cell(value: object) -> str:
            if value is None:
                return "\\N"
            if isinstance(value, datetime):
                return value.isoformat()
            return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")

        def flush() -> None:
            for kind in ("conversation", "message", "exchange", "rating"):
                data = buffers[kind].getvalue()
                if data:
                    with cursor.copy(f"COPY {COPY_COLUMNS[kind]} FROM STDIN") as copy:
                        copy.write(data)
                    buffers[kind] = io.StringIO()

        for count, (kind, row) in enumerate(rows(n), start=1):
            if kind == "message":
                row = (*row, "", "f", "f", row[-1])
            elif kind == "exchange":
                row = (*row, "t")
            buffers[kind].write("\t".join(cell(v) for v in row) + "\n")
            if count % 200_000 == 0:
                flush()
        flush()
        cursor.execute(OPT_OUT_SQL)
        for table in ("conversations", "messages", "exchanges", "ratings"):
            cursor.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"(SELECT MAX(id) FROM {table}))"
            )
        connection.commit()
    # What autovacuum does to tables built up over months; here it would otherwise start in
    # the middle of the measurements (a million fresh rows trigger it) and take a core.
    with psycopg.connect(plain, autocommit=True) as connection:
        connection.execute("VACUUM (ANALYZE)")
        connection.execute("CHECKPOINT")  # the seeding's gigabyte of WAL is not the export's


# --------------------------------------------------------------------------- measured runs


def run_export(url: str, directory: Path) -> dict[str, Any]:
    from bot.learning import Exporter, ExportOptions, Pseudonymizer
    from model.prompt import format_prompt

    exporter = Exporter(
        database=Database(url),
        options=ExportOptions(directory=directory, create_directory=True),
        formatter=format_prompt,
        pseudonymize=Pseudonymizer(b"benchmark"),
    )
    started = time.perf_counter()
    result = exporter.run()
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "exchanges": result.exchanges + result.superseded,
        "processes": result.processes,
        "worker_peaks_mb": list(result.worker_peak_memory_mb),
    }


def run_baseline(url: str, directory: Path) -> dict[str, Any]:
    engine = create_engine(url)
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    count = 0
    with engine.connect() as connection, open(directory / "baseline.jsonl", "w") as out:
        result = connection.execute(
            text(
                "SELECT q.text, a.text FROM exchanges e "
                "JOIN messages q ON q.id = e.user_message_id "
                "JOIN messages a ON a.id = e.answer_message_id"
            ).execution_options(stream_results=True, yield_per=5000)
        )
        for question, answer in result:
            out.write(json.dumps({"user": question, "agent": answer}) + "\n")
            count += 1
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "exchanges": count, "processes": 1, "worker_peaks_mb": []}


def measured(kind: str, url: str, directory: Path) -> dict[str, float]:
    """Run one measurement in a fresh process; adds its peak RSS in MB."""
    output = subprocess.run(
        [sys.executable, __file__, "--measure", kind, "--url", url, "--dir", str(directory)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure_main(kind: str, url: str, directory: Path) -> None:
    from bot.learning import peak_memory_mb

    figures = run_export(url, directory) if kind == "export" else run_baseline(url, directory)
    # VmHWM, not ru_maxrss: the latter survives exec and would report the peak of the large
    # seeding process this one was started from.
    own = peak_memory_mb()
    figures["peak_rss_mb"] = max([own, *figures["worker_peaks_mb"]])
    figures["total_rss_mb"] = own + sum(figures["worker_peaks_mb"])
    print(json.dumps(figures))


# --------------------------------------------------------------------------- orchestration


def fresh_postgres() -> tuple[str, callable]:  # type: ignore[valid-type]
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"chatbot_bench_{uuid.uuid4().hex[:10]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return url, drop


def bench(database: str, n: int, workdir: Path) -> list[dict[str, Any]]:
    if database == "sqlite":
        path = workdir / f"bench-{n}.db"
        url = f"sqlite:///{path}"
        Database(url).upgrade()
        seed = lambda: seed_sqlite(path, n)  # noqa: E731
        drop = lambda: path.unlink()  # noqa: E731
    else:
        url, drop = fresh_postgres()
        Database(url).upgrade()
        seed = lambda: seed_postgres(url, n)  # noqa: E731
    started = time.perf_counter()
    seed()
    os.sync()  # write the seeding's dirty pages out now, not during the measurements
    seeded = time.perf_counter() - started
    print(f"  {database}: seeded {n:,} exchanges in {seeded:.1f}s", file=sys.stderr)
    baseline = measured("baseline", url, workdir / f"{database}-{n}-baseline")
    export = measured("export", url, workdir / f"{database}-{n}-export")
    drop()
    results = []
    for name, figures in (("baseline SELECT→json.dumps", baseline), ("chatbot export", export)):
        results.append(
            {
                "database": database,
                "rows": n,
                "what": name,
                "seconds": figures["seconds"],
                "per_second": figures["exchanges"] / figures["seconds"],
                "peak_rss_mb": figures["peak_rss_mb"],
                "total_rss_mb": figures["total_rss_mb"],
                "processes": figures["processes"],
                "exchanges": figures["exchanges"],
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--exchanges", type=int, default=1_000_000)
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--growth", action="store_true", help="also run at a quarter of the size")
    parser.add_argument("--measure", choices=["export", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure_main(args.measure, args.url, args.dir)
        return
    sizes = [args.exchanges // 4, args.exchanges] if args.growth else [args.exchanges]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="chatbot-bench-") as workdir:
        for database in args.databases.split(","):
            for n in sizes:
                results.extend(bench(database, n, Path(workdir)))
    print()
    print(
        "| database | exchanges | what | seconds | exchanges/s | vs baseline | processes "
        "| peak RSS, largest process (MB) | peak RSS, all processes (MB) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    baselines = {(r["database"], r["rows"]): r for r in results if r["what"].startswith("baseline")}
    for r in results:
        base = baselines[(r["database"], r["rows"])]
        ratio = float(r["per_second"]) / float(base["per_second"])
        print(
            f"| {r['database']} | {r['rows']:,} | {r['what']} | {r['seconds']:.1f} | "
            f"{r['per_second']:,.0f} | {ratio:.2f}× | {r['processes']} | "
            f"{r['peak_rss_mb']:.0f} | {r['total_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
