"""The ``chatbot`` command, and the composition root.

This module is the one place that imports ``bot``, ``adapters`` and ``model`` together and
wires them (the model through :mod:`bot.model_wiring`, the retrain through
:mod:`bot.retraining`): adapters and the model service depend only on ``bot``'s conversation
format.

Usage::

    chatbot run                 # every configured platform; the local chat when none is
    chatbot chat [--json]       # the local chat (reads piped stdin line by line too)
    chatbot db upgrade          # apply database migrations
    chatbot model init [--force]  # build the default model into DATA_DIR/model
    chatbot model list | use N | rollback  # the model versions; switch the serving one
    chatbot export [--include-unrated]     # export new training data now
    chatbot train [--dry-run]              # export, fine-tune, evaluate, promote or keep
    chatbot doctor              # check the configuration: one line per check, exit 1 on a problem
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bot.config import ConfigurationError, Settings, load_settings
from bot.heap import settle_heap
from bot.model_wiring import (
    CommandError,
    close_generator,
    load_generator,
    start_generator,
)
from bot.model_wiring import (
    progress as _progress,
)
from bot.storage import Database, StorageError, Store

if TYPE_CHECKING:
    from fastapi import APIRouter

    from adapters.base import Adapter
    from bot.commands import Commands
    from bot.contracts import PipelineObserver
    from bot.learning import Exporter
    from bot.observability.metrics import Metrics
    from bot.service import ReplyGenerator, ReplyPipeline
    from bot.web import WebServer
    from model.retrain import ModelControl

logger = logging.getLogger("chatbot")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatbot", description="A self-hosted chat bot.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("run", help="start every configured adapter (the local chat when none is)")
    chat = commands.add_parser("chat", help="chat in the terminal; reads piped stdin too")
    chat.add_argument("--json", action="store_true", help='print {"user", "agent"} JSON lines')
    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    db_commands.add_parser("upgrade", help="apply every pending migration")
    model = commands.add_parser("model", help="model maintenance")
    model_commands = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    init = model_commands.add_parser("init", help="build the default model")
    init.add_argument("--force", action="store_true", help="rebuild even if it exists")
    model_commands.add_parser("list", help="the model versions, the serving one marked")
    use = model_commands.add_parser("use", help="serve version N (0: the base model)")
    use.add_argument("number", type=int)
    model_commands.add_parser("rollback", help="serve the version served before")
    train = commands.add_parser(
        "train", help="export, fine-tune on every shard, evaluate, promote or keep"
    )
    train.add_argument(
        "--dry-run", action="store_true", help="report the data it would use; train nothing"
    )
    export = commands.add_parser("export", help="export new good exchanges as training data")
    export.add_argument(
        "--include-unrated", action="store_true", help="also export unrated bot replies"
    )
    commands.add_parser(
        "doctor", help="check the configuration (database, model, tokens, export directory)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``chatbot`` console script."""
    args = build_parser().parse_args(argv)
    try:
        try:
            settings = load_settings()
        except ConfigurationError as error:
            if args.command != "doctor":
                raise
            print(f"FAIL settings: {error}", flush=True)  # the doctor's one line, exit 1
            return 1
        from bot.observability.structured_logs import configure_logging

        configure_logging(level=settings.log_level, log_format=settings.log_format)
        return _dispatch(args, settings)
    except (ConfigurationError, StorageError, CommandError) as error:
        print(f"chatbot: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    command = args.command or "run"
    if command == "doctor":
        from bot.doctor import doctor

        return doctor(settings, out=sys.stdout)
    if command == "db":
        database = Database(settings.resolved_database_url)
        database.upgrade()
        print(f"database at {_describe_db(database)} is up to date")
        return 0
    if command == "model":
        if args.model_command == "init":
            return _model_init(settings, force=args.force)
        from bot.retraining import model_command

        return model_command(
            settings, action=args.model_command, number=getattr(args, "number", None)
        )
    if command == "train":
        from bot.retraining import train_command

        if settings.model_backend != "local":
            raise CommandError("chatbot train needs the local model backend (MODEL_BACKEND=local)")
        return train_command(settings, dry_run=args.dry_run)
    if command == "export":
        return _export(settings, include_unrated=args.include_unrated)
    json_lines = bool(getattr(args, "json", False))
    return asyncio.run(_serve(settings, chat_only=command == "chat", json_lines=json_lines))


def _describe_db(database: Database) -> str:
    return database.engine.url.render_as_string(hide_password=True)


def _model_init(settings: Settings, *, force: bool) -> int:
    from model.bootstrap import build_default_model
    from model.loading import ModelLoadError

    target = settings.default_model_dir
    if target.exists() and not force:
        print(f"the default model already exists at {target} (use --force to rebuild)")
        return 0
    try:
        build_default_model(target, progress=_progress)
    except ModelLoadError as error:  # the seed answers never held: nothing was saved
        raise CommandError(str(error)) from None
    print(f"default model saved to {target}")
    return 0


def build_exporter(settings: Settings, database: Database, **overrides: Any) -> Exporter:
    """The exporter, formatting training text with the model service's prompt formatter."""
    from bot.learning import Exporter, ExportOptions, Pseudonymizer, load_pseudonym_key
    from model.prompt import format_prompt

    options = ExportOptions(
        directory=settings.resolved_export_dir,
        include_unrated=settings.export_include_unrated,
        context_turns=settings.export_context_turns,
        create_directory=settings.export_dir is None,
        workers=settings.export_workers,
        phone_regions=tuple(settings.phone_regions),
    )
    if overrides:
        options = dataclasses.replace(options, **overrides)
    key = load_pseudonym_key(configured=settings.pseudonym_key, data_dir=settings.data_dir)
    return Exporter(
        database=database,
        options=options,
        formatter=format_prompt,
        pseudonymize=Pseudonymizer(key),
    )


def _export(settings: Settings, *, include_unrated: bool) -> int:
    from tqdm import tqdm

    from bot.learning import ExportError

    database = Database(settings.resolved_database_url)
    database.upgrade()
    overrides = {"include_unrated": True} if include_unrated else {}
    exporter = build_exporter(settings, database, **overrides)
    with tqdm(desc="exporting", unit=" exchanges", file=sys.stderr, disable=None) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            result = exporter.run(progress=progress)
        except ExportError as error:
            raise CommandError(str(error)) from None
        finally:
            database.dispose()
    print(result.describe())
    return 0


def build_pipeline(
    settings: Settings,
    *,
    generator: ReplyGenerator | None = None,
    observer: PipelineObserver | None = None,
) -> ReplyPipeline:
    """Wire storage, the model service and the pipeline from ``settings`` (``observer``: told
    of every message handled, e.g. the metrics)."""
    from bot.service import PipelineOptions, ReplyPipeline

    database = Database(settings.resolved_database_url)
    database.upgrade()
    options = PipelineOptions(
        system_prompt=settings.system_prompt,
        max_new_tokens=settings.max_new_tokens,
        history_turns=settings.history_turns,
        max_message_chars=settings.max_message_chars,
        unanswered_max_age=settings.unanswered_max_age_seconds,
        instance_lease=settings.instance_lease_seconds,
        delivery_grace=settings.delivery_grace_seconds,
        progress_edits_per_second=settings.progress_edits_per_second,
        placeholder_delay=settings.placeholder_delay_seconds,
    )
    return ReplyPipeline(
        store=Store(database),
        generator=generator if generator is not None else load_generator(settings),
        options=options,
        observer=observer,
    )


def build_commands(
    settings: Settings, pipeline: ReplyPipeline, *, control: Any | None = None
) -> Commands:
    """The chat commands, reporting on the pipeline's store and model; ``control`` is the
    model side of retrain and rollback (built here when not given)."""
    from bot.commands import Commands
    from bot.learning import LearningActions, Pseudonymizer, load_pseudonym_key
    from bot.learning.model_commands import ModelActions
    from bot.learning.training_data import forgotten_users
    from bot.retraining import build_model_control

    database = pipeline.store.database
    key = load_pseudonym_key(configured=settings.pseudonym_key, data_dir=settings.data_dir)
    if control is None:
        control, _registry = build_model_control(
            settings, database=database, generator=pipeline.generator
        )

    async def retrain_after_forget() -> str:
        return await control.retrain_for(requested_by="forget-me")

    async def model_status() -> str:
        forgotten = await asyncio.to_thread(forgotten_users, database)
        return await asyncio.to_thread(control.describe_status, forgotten)

    learning = LearningActions(
        store=pipeline.store,
        exporter=build_exporter(settings, database),
        pseudonymize=Pseudonymizer(key),
        serving_learned_from=control.learned_from,
        after_forget=retrain_after_forget if settings.retrain_on_forget else None,
    )
    return Commands(
        store=pipeline.store,
        model_version=lambda: pipeline.generator.version,
        actions={**learning.actions(), **ModelActions(control).actions()},
        model_status=model_status,
    )


def platform_adapters(
    settings: Settings, *, pipeline: ReplyPipeline, commands: Commands
) -> list[Adapter]:
    """An adapter for every platform whose credentials are configured."""
    adapters: list[Adapter] = []
    if settings.slack_configured:
        from adapters.slack_adapter import SlackAdapter

        adapters.append(
            SlackAdapter(
                settings=settings,
                handler=pipeline,
                commands=commands,
                retry_interval=settings.delivery_retry_seconds,
            )
        )
    if settings.discord_configured:
        from adapters.discord_adapter import DiscordAdapter

        adapters.append(
            DiscordAdapter(
                settings=settings,
                handler=pipeline,
                commands=commands,
                retry_interval=settings.delivery_retry_seconds,
            )
        )
    return adapters


def web_routers(
    settings: Settings, pipeline: ReplyPipeline, commands: Commands, control: ModelControl
) -> list[APIRouter]:
    """The routers the bot's HTTP server serves beside /healthz, /readyz and /metrics: the
    admin dashboard (DASHBOARD_TOKEN), acting through ``commands`` like a chat admin."""
    from bot.dashboard import (
        Dashboard,
        DashboardActions,
        DashboardAuth,
        DashboardSources,
        QueueDepth,
    )
    from bot.learning import Pseudonymizer, load_pseudonym_key

    generator = pipeline.generator
    retrainer = getattr(control, "retrainer", None)

    def queue_depth() -> QueueDepth | None:
        stats = getattr(generator, "stats", None)  # the local model service's scheduler
        if stats is None:
            return None
        now = stats()
        return QueueDepth(active=now.active, waiting=now.waiting)

    key = load_pseudonym_key(configured=settings.pseudonym_key, data_dir=settings.data_dir)
    sources = DashboardSources(
        store=pipeline.store,
        registry=control.registry,
        serving_version=lambda: generator.version,
        queue_depth=queue_depth,
        training_running=retrainer.running if retrainer is not None else lambda: None,
        pseudonymize=Pseudonymizer(key),
        export_dir=settings.resolved_export_dir,
    )
    dashboard = Dashboard(
        sources=sources,
        auth=DashboardAuth(token=settings.dashboard_token),
        actions=DashboardActions(commands=commands),
    )
    return [dashboard.router()]


def _announce_dashboard(settings: Settings, routers: Sequence[APIRouter], address: str) -> None:
    """Say where the dashboard is, on stderr (stdout is the local chat's): with a one-time
    login link when no platform is configured (a new user's first run) or no token is (the
    link is then the only way in)."""
    from bot.dashboard import DashboardRouter

    for router in routers:
        if not isinstance(router, DashboardRouter):
            continue
        first_run = not (settings.slack_configured or settings.discord_configured)
        if first_run or not router.dashboard.auth.token_configured:
            link = router.dashboard.login_link(address)
            if settings.log_format == "json":  # every line on stderr one JSON object
                logger.warning("Dashboard: %s/ (log in once with %s)", address, link)
            else:
                print(
                    f"Dashboard: {address}/ (log in once with {link})", file=sys.stderr, flush=True
                )
        else:
            logger.warning("dashboard at %s/ (log in with DASHBOARD_TOKEN)", address)


async def _start_web(
    settings: Settings,
    *,
    pipeline: ReplyPipeline,
    commands: Commands,
    control: ModelControl,
    metrics: Metrics,
) -> WebServer | None:
    """Start the HTTP server (None with DASHBOARD_PORT=-1); a port in use is one error line."""
    if settings.dashboard_port < 0:
        return None
    from bot.web import ServiceReadiness, WebServer, WebServerError, build_web_app

    routers = web_routers(settings, pipeline, commands, control)
    app = build_web_app(
        ready=ServiceReadiness(store=pipeline.store, generator=pipeline.generator),
        routers=routers,
        metrics=metrics,
    )
    server = WebServer(app=app, host=settings.dashboard_host, port=settings.dashboard_port)
    try:
        await server.start()
    except WebServerError as error:
        raise CommandError(str(error)) from None
    # Logged, not printed: stdout is the local chat's answers (piped in CI).
    logger.warning("HTTP server at %s (/healthz, /readyz, /metrics)", server.address)
    _announce_dashboard(settings, routers, server.address)
    return server


async def _serve(settings: Settings, *, chat_only: bool, json_lines: bool) -> int:
    from adapters.console import ConsoleChat
    from bot.learning import ExportScheduler, parse_schedule
    from bot.observability.metrics import Metrics

    trigger = parse_schedule(settings.export_schedule)
    metrics = Metrics()
    pipeline = build_pipeline(settings, observer=metrics)
    try:
        await start_generator(pipeline.generator)
    except CommandError:
        pipeline.store.database.dispose()
        raise
    from bot.retraining import build_model_control, retrain_when_due, watch_models

    watcher = asyncio.ensure_future(watch_models(settings, pipeline.generator))
    database = pipeline.store.database
    # One model side for the commands and the scheduled retrain.
    control, _registry = build_model_control(
        settings, database=database, generator=pipeline.generator
    )
    metrics.watch(generator=lambda: pipeline.generator, database=database, training=control)
    scheduler = None
    web = None
    if trigger is not None:
        after_export = None
        if settings.retrain_after_exported:
            after_export = retrain_when_due(settings, database=database, control=control)
        scheduler = ExportScheduler(
            exporter=build_exporter(settings, pipeline.store.database),
            trigger=trigger,
            after_export=after_export,
        )
        scheduler.start()
    try:
        commands = build_commands(settings, pipeline, control=control)
        if not chat_only:  # `chatbot run`; `chatbot chat` is the terminal alone
            web = await _start_web(
                settings, pipeline=pipeline, commands=commands, control=control, metrics=metrics
            )
        adapters = (
            [] if chat_only else platform_adapters(settings, pipeline=pipeline, commands=commands)
        )
        if not adapters:
            _tolerant_console_streams()
            return await ConsoleChat(
                handler=pipeline, commands=commands, json_lines=json_lines
            ).run()
        logger.warning("serving %s", ", ".join(adapter.name for adapter in adapters))
        return await _serve_adapters(settings, pipeline=pipeline, adapters=adapters)
    finally:
        if web is not None:
            await web.stop()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if scheduler is not None:
            scheduler.shutdown()
        await close_generator(pipeline.generator)
        pipeline.store.database.dispose()


#: After the drain time, how long the adapters get to close their connections.
CLOSE_GRACE_SECONDS = 5.0


async def _serve_adapters(
    settings: Settings, *, pipeline: ReplyPipeline, adapters: Sequence[Adapter]
) -> int:
    """Run the adapters and the recovery loop until the adapters end or SIGTERM / SIGINT.

    On a signal: stop taking events, let the replies in flight finish (at most
    ``SHUTDOWN_DRAIN_SECONDS``), close the adapters, drop this instance's lease; 0.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    drain = settings.shutdown_drain_seconds

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            return
        logger.warning(
            "%s: stopping; replies in flight get up to %.0f s to finish", signum.name, drain
        )
        stop.set()
        for adapter in adapters:
            adapter.request_stop(drain_within=drain)

    handled = (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
        loop.add_signal_handler(signum, on_signal, signum)
    settle_heap()
    settling = asyncio.create_task(_settle_heap_once_connected(adapters))
    maintenance = asyncio.create_task(
        pipeline.maintain(
            platforms=[adapter.name for adapter in adapters],
            interval=settings.recovery_interval_seconds,
            stop=stop,
        )
    )
    serving: asyncio.Future[list[int]] = asyncio.gather(*(adapter.run() for adapter in adapters))
    stopping: asyncio.Future[Any] = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():
            try:
                await asyncio.wait_for(asyncio.shield(serving), drain + CLOSE_GRACE_SECONDS)
            except TimeoutError:
                # Cancelled replies leave their messages to recovery (another instance, or
                # this one after its restart), so nothing is lost.
                logger.warning("adapters still busy after %.0f s; cancelling them", drain)
                serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
                return 0
        return max(serving.result(), default=0)
    finally:
        stop.set()
        stopping.cancel()
        settling.cancel()
        for signum in handled:
            loop.remove_signal_handler(signum)
        with contextlib.suppress(asyncio.CancelledError):
            await settling
        with contextlib.suppress(asyncio.CancelledError):
            await maintenance
        await pipeline.close()


async def _settle_heap_once_connected(adapters: Sequence[Adapter]) -> None:
    """Settle the heap again once the adapters that connect first are connected: the
    platform's state they were sent (Discord's guilds, channels, members) is as long-lived as
    the libraries settled before serving."""
    from adapters.base import ConnectsFirst

    connecting = [adapter for adapter in adapters if isinstance(adapter, ConnectsFirst)]
    if connecting:
        # One that never connects (it failed, or stopped first) has no state to settle.
        await asyncio.gather(
            *(adapter.wait_until_ready() for adapter in connecting), return_exceptions=True
        )
        settle_heap()


def _tolerant_console_streams() -> None:
    """Undecodable input bytes become U+FFFD instead of crashing the chat."""
    for stream, errors in ((sys.stdin, "replace"), (sys.stdout, "backslashreplace")):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors=errors)


if __name__ == "__main__":
    raise SystemExit(main())
