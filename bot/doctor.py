"""``chatbot doctor``: check the configuration before running the bot.

Each check prints one line, ``ok``, ``FAIL`` or ``skip`` (not configured, so nothing to check),
then its name and what it found: the database is reachable and migrated, the model loads (or
the model server answers), the Slack tokens are valid (``auth.test``,
``apps.connections.open``), HTTP mode has its signing secret, the Discord token is valid
(``GET /users/@me``) and its Message Content intent on, the export directory is writable. The
exit status is 0 when nothing failed, 1 otherwise. A check never raises: whatever goes wrong is
its line. Nothing is changed: no migration runs, no file stays behind.

It talks to the platforms through their SDKs and HTTP APIs directly, not through the adapters,
so that checking a token never starts a bot.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

import aiohttp
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from bot.config import Settings
from bot.storage import Database, StorageError

#: Weights up to this size are loaded for real; larger ones only have their headers read.
FULL_LOAD_BYTES = 2 << 30
#: Seconds a platform or model server gets to answer.
NETWORK_TIMEOUT = 15.0
#: Discord application flags saying the Message Content intent is on (portal switch).
_MESSAGE_CONTENT_FLAGS = (1 << 18) | (1 << 19)
_DISCORD_PORTAL = "https://discord.com/developers/applications"

Status = Literal["ok", "FAIL", "skip"]


@dataclass(frozen=True, slots=True)
class Finding:
    """What one check found."""

    check: str
    status: Status
    detail: str

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    def line(self) -> str:
        # One line whatever the detail holds: errors from libraries can span several.
        detail = " ".join(self.detail.split())
        return f"{self.status:<4} {self.check}: {detail}"


def ok(check: str, detail: str) -> Finding:
    return Finding(check, "ok", detail)


def fail(check: str, detail: str) -> Finding:
    return Finding(check, "FAIL", detail)


def skip(check: str, detail: str) -> Finding:
    return Finding(check, "skip", detail)


def doctor(settings: Settings, *, out: TextIO) -> int:
    """Run every check, one line each on ``out`` as it finishes; 0 when none failed, else 1."""

    async def run() -> bool:
        failed = False
        async for finding in diagnose(settings):
            print(finding.line(), file=out, flush=True)
            failed = failed or finding.failed
        return failed

    return 1 if asyncio.run(run()) else 0


async def diagnose(settings: Settings) -> AsyncIterator[Finding]:
    """Every check's finding, in a fixed order; blocking checks run in a thread."""
    yield await _guarded("database", asyncio.to_thread(check_database, settings))
    yield await _guarded("model", check_model(settings))
    for finding in await _guarded_many("slack", check_slack(settings)):
        yield finding
    yield await _guarded("slack signing secret", _sync(check_signing_secret, settings))
    for finding in await _guarded_many("discord", check_discord(settings)):
        yield finding
    yield await _guarded("export directory", asyncio.to_thread(check_export_dir, settings))


async def _sync(check: Callable[[Settings], Finding], settings: Settings) -> Finding:
    return check(settings)


async def _guarded(check: str, work: Awaitable[Finding]) -> Finding:
    """The check's finding; an error it did not expect is a failure line, not a traceback."""
    try:
        return await work
    except Exception as error:
        return fail(check, f"the check itself failed: {type(error).__name__}: {error}")


async def _guarded_many(check: str, work: Awaitable[list[Finding]]) -> list[Finding]:
    try:
        return await work
    except Exception as error:
        return [fail(check, f"the check itself failed: {type(error).__name__}: {error}")]


# --------------------------------------------------------------------------- database


def check_database(settings: Settings) -> Finding:
    """Reachable, and its schema at the newest migration (``chatbot db upgrade`` applies it)."""
    check = "database"
    url = settings.resolved_database_url
    try:
        parsed = make_url(url)
    except Exception:
        return fail(check, f"DATABASE_URL is not a valid SQLAlchemy URL: {url!r}")
    shown = parsed.render_as_string(hide_password=True)
    is_sqlite_file = parsed.get_backend_name() == "sqlite" and parsed.database not in (
        None,
        "",
        ":memory:",
    )
    # Connecting would create the file: say it is missing instead.
    if is_sqlite_file and not Path(str(parsed.database)).is_file():
        return fail(
            check,
            f"no database at {parsed.database} yet: run `chatbot db upgrade` "
            "(`chatbot run` also creates it)",
        )
    try:
        database = Database(url)
    except StorageError as error:
        return fail(check, str(error))
    try:
        database.check_connection()
        from bot.migrations import current_revision

        current = current_revision(database.engine)
    except StorageError as error:
        return fail(check, str(error))
    except SQLAlchemyError as error:
        reason = str(getattr(error, "orig", error)).strip().splitlines()[0]
        return fail(check, f"cannot read the schema of {shown}: {reason}")
    finally:
        database.dispose()
    heads = _migration_heads()
    if current in heads:
        return ok(check, f"{shown} is reachable, schema at revision {current} (the newest)")
    upgrade = "run `chatbot db upgrade` (`chatbot run` also does it on start)"
    if current is None:
        return fail(check, f"{shown} is reachable but not migrated (no schema): {upgrade}")
    if current not in _known_revisions():
        return fail(
            check,
            f"{shown} is at revision {current}, which this version does not know "
            "(migrated by a newer version of the bot?)",
        )
    return fail(check, f"{shown} is at revision {current}, not {heads[0]}: {upgrade}")


def _script() -> Any:
    from alembic.script import ScriptDirectory

    from bot.migrations import alembic_config

    return ScriptDirectory.from_config(alembic_config())


def _migration_heads() -> list[str]:
    return list(_script().get_heads())


def _known_revisions() -> set[str]:
    return {revision.revision for revision in _script().walk_revisions()}


# --------------------------------------------------------------------------- model


async def check_model(settings: Settings) -> Finding:
    """The local model folder loads, or the model server answers (``MODEL_BACKEND=remote``)."""
    if settings.model_backend == "remote":
        return await _check_remote_model(settings)
    return await asyncio.to_thread(_check_local_model, settings)


async def _check_remote_model(settings: Settings) -> Finding:
    from model.remote import RemoteModel, RemoteModelError

    remote = RemoteModel(
        url=settings.model_url,
        model_name=settings.model_name,
        api_key=settings.model_api_key,
        timeout=NETWORK_TIMEOUT,
        connect_timeout=NETWORK_TIMEOUT,
        stall_timeout=NETWORK_TIMEOUT,
        retries=0,
    )
    try:
        await asyncio.wait_for(remote.start(), NETWORK_TIMEOUT * 2)
    except RemoteModelError as error:
        return fail("model", str(error))
    except TimeoutError:
        return fail("model", f"the model server at {settings.model_url} did not answer in time")
    finally:
        await remote.close()
    return ok("model", f"the model server at {settings.model_url} serves {remote.served_model}")


def _check_local_model(settings: Settings) -> Finding:
    check = "model"
    from bot.retraining import serving_path

    path_text = serving_path(settings)
    path = Path(path_text).expanduser()
    if settings.uses_default_model and path == settings.default_model_dir and not path.exists():
        return fail(
            check,
            f"the default model is not built yet at {path}: run `chatbot model init` "
            "(`chatbot run` builds it on first start, in about 2 minutes)",
        )
    names_a_folder = path_text.startswith(("/", ".", "~")) or path_text.count("/") >= 2
    if not path.exists() and not names_a_folder:
        return skip(check, f"{path_text} is a Hugging Face hub id: fetched when the bot starts")
    if not path.is_dir():
        return fail(check, f"MODEL_PATH {path} is not a folder")
    missing = [
        what
        for what, present in (
            ("config.json", (path / "config.json").is_file()),
            (
                "a tokenizer (tokenizer.json or tokenizer_config.json)",
                any((path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")),
            ),
            ("weights (*.safetensors or *.bin)", bool(_weight_files(path))),
        )
        if not present
    ]
    if missing:
        return fail(check, f"{path} is not a model folder: it has no {', no '.join(missing)}")
    try:
        return ok(check, _load_model(path))
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        return fail(check, f"{path} does not load: {type(error).__name__}: {reason}")


def _weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in {".safetensors", ".bin"})


def _load_model(path: Path) -> str:
    """Load the folder's config, tokenizer and weights (only the weights' headers when they
    are large, so that the check stays quick); what loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    AutoTokenizer.from_pretrained(path)
    weights = _weight_files(path)
    size = sum(p.stat().st_size for p in weights)
    architecture = ", ".join(getattr(config, "architectures", None) or [config.model_type])
    if size <= FULL_LOAD_BYTES:
        model = AutoModelForCausalLM.from_pretrained(path)
        parameters = sum(p.numel() for p in model.parameters())
        return f"{path} loads: {architecture}, {parameters:,} parameters"
    from safetensors import safe_open

    tensors = 0
    for file in weights:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as opened:
                tensors += len(list(opened.keys()))
    return (
        f"{path}: config, tokenizer and {len(weights)} weight file(s) read ({architecture}, "
        f"{size / 2**30:.1f} GiB, {tensors} tensors; loaded in full when the bot starts)"
    )


# --------------------------------------------------------------------------- Slack


async def check_slack(settings: Settings) -> list[Finding]:
    """``auth.test`` with the bot token; ``apps.connections.open`` with the app token."""
    if not settings.slack_bot_token:
        return [skip("slack token", "SLACK_BOT_TOKEN not set")]
    from slack_sdk.errors import SlackApiError, SlackClientError
    from slack_sdk.web.async_client import AsyncWebClient

    base_url = settings.slack_api_url
    client = AsyncWebClient(
        token=settings.slack_bot_token,
        base_url=base_url if base_url.endswith("/") else base_url + "/",
        timeout=int(NETWORK_TIMEOUT),
    )
    unreachable = (SlackClientError, aiohttp.ClientError, OSError, TimeoutError)

    async def call(check: str, what: str, hint: str, request: Awaitable[Any]) -> Finding | Any:
        try:
            return await asyncio.wait_for(request, NETWORK_TIMEOUT * 2)
        except SlackApiError as error:
            code = error.response.get("error") if error.response else None
            return fail(check, f"Slack refused {what}: {code or error}{hint}")
        except unreachable as error:
            return fail(check, f"cannot reach Slack at SLACK_API_URL={base_url}: {error!r}")

    findings: list[Finding] = []
    if settings.slack_bot_token.startswith("xapp-"):
        findings.append(
            fail(
                "slack token",
                "SLACK_BOT_TOKEN holds an app-level token (xapp-…): it needs the Bot User "
                "OAuth Token (xoxb-…) from OAuth & Permissions",
            )
        )
    else:
        answer = await call(
            "slack token",
            "SLACK_BOT_TOKEN",
            " (use the Bot User OAuth Token, xoxb-…, from OAuth & Permissions)",
            client.auth_test(),
        )
        if isinstance(answer, Finding):
            findings.append(answer)
        else:
            findings.append(
                ok(
                    "slack token",
                    f"valid: bot @{answer.get('user')} in team {answer.get('team')} "
                    f"({answer.get('team_id')})",
                )
            )
    if settings.slack_app_token:
        answer = await call(
            "slack app token",
            "SLACK_APP_TOKEN",
            " (an app-level token, xapp-…, with connections:write, from Basic Information)",
            client.apps_connections_open(app_token=settings.slack_app_token),
        )
        findings.append(
            answer
            if isinstance(answer, Finding)
            else ok("slack app token", "valid: Socket Mode connections open")
        )
    return findings


def check_signing_secret(settings: Settings) -> Finding:
    """HTTP mode (no app token) needs the signing secret to verify Slack's requests."""
    check = "slack signing secret"
    if not settings.slack_bot_token:
        return skip(check, "Slack is not configured")
    if settings.slack_app_token:
        return ok(check, "not needed: Socket Mode (SLACK_APP_TOKEN set)")
    if settings.slack_signing_secret:
        return ok(check, f"set for HTTP mode (Slack posts to port {settings.slack_port})")
    return fail(
        check,
        "HTTP mode (no SLACK_APP_TOKEN) needs SLACK_SIGNING_SECRET, from Basic Information -> "
        "App Credentials (or set SLACK_APP_TOKEN for Socket Mode)",
    )


# --------------------------------------------------------------------------- Discord


async def check_discord(settings: Settings) -> list[Finding]:
    """``GET /users/@me`` with the bot token, then the application's Message Content flag."""
    if not settings.discord_bot_token:
        return [skip("discord token", "DISCORD_BOT_TOKEN not set")]
    api = settings.discord_api_url.rstrip("/")
    headers = {"Authorization": f"Bot {settings.discord_bot_token}"}
    timeout = aiohttp.ClientTimeout(total=NETWORK_TIMEOUT)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        user = await _discord_get(session, api, "/users/@me", check="discord token")
        if isinstance(user, Finding):
            return [user]
        findings = [ok("discord token", f"valid: bot {user.get('username')} ({user.get('id')})")]
        application = await _discord_get(
            session, api, "/oauth2/applications/@me", check="discord intent"
        )
    if isinstance(application, Finding):
        findings.append(application)
    elif int(application.get("flags") or 0) & _MESSAGE_CONTENT_FLAGS:
        findings.append(ok("discord intent", "Message Content is on"))
    else:
        findings.append(
            fail(
                "discord intent",
                f"Message Content is off: turn it on at {_DISCORD_PORTAL} -> your app -> Bot -> "
                "Privileged Gateway Intents (without it the bot answers only DMs and mentions)",
            )
        )
    return findings


async def _discord_get(
    session: aiohttp.ClientSession, api: str, path: str, *, check: str
) -> dict[str, Any] | Finding:
    try:
        async with session.get(api + path) as response:
            if response.status == 401:
                return fail(
                    check,
                    "Discord refused DISCORD_BOT_TOKEN (401 Unauthorized): copy the bot's "
                    f"token from {_DISCORD_PORTAL} -> your app -> Bot -> Reset Token",
                )
            if response.status != 200:
                return fail(check, f"Discord answered {response.status} to GET {path}")
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as error:
        return fail(check, f"cannot reach Discord at DISCORD_API_URL={api}: {error!r}")
    if not isinstance(body, dict):
        return fail(check, f"Discord answered GET {path} with something other than an object")
    return body


# --------------------------------------------------------------------------- export directory


def check_export_dir(settings: Settings) -> Finding:
    """The export directory (or, for the default one, where it will be created) is writable."""
    check = "export directory"
    directory = settings.resolved_export_dir
    if directory.exists():
        if not directory.is_dir():
            return fail(check, f"{directory} is not a directory")
        problem = _write_probe(directory)
        return fail(check, problem) if problem else ok(check, f"{directory} is writable")
    if settings.export_dir is not None:
        return fail(
            check,
            f"EXPORT_DIR {directory} does not exist: create it (the bot creates only the "
            "default DATA_DIR/exports)",
        )
    parent = directory.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return fail(check, f"{directory} cannot be created: {parent} is not a directory")
    problem = _write_probe(parent)
    if problem:
        return fail(check, f"{directory} cannot be created: {problem}")
    return ok(check, f"{directory} is created on the first export ({parent} is writable)")


def _write_probe(directory: Path) -> str | None:
    """None when a file can be written in ``directory`` (and is removed again), else why not.
    Writing, not ``os.access``: a read-only mount or a full disk passes ``os.access``."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{directory} is not writable"
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".chatbot-doctor-") as probe:
            probe.write(b"ok")
            probe.flush()
    except OSError as error:
        return f"{directory} is not writable: {error.strerror or error}"
    return None
