"""deploy/slack-manifest.yml grants exactly what the Slack adapter really uses.

Three links, each checked against the code rather than a copy of it: the events and the slash
command the adapter registers with bolt (recorded while it builds its app), the Web API methods
its modules call (read from their source), and the manifest's lists.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import yaml
from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_base_client import AsyncBaseClient
from slack_sdk.web.async_client import AsyncWebClient

from adapters import slack_scopes
from adapters.slack_adapter import SlackAdapter
from bot.commands import Commands
from bot.config import Settings
from bot.storage import Database, Store

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy" / "slack-manifest.yml"


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    loaded = yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def registered_with_bolt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[list[str], list[str]]:
    """The events and commands a real SlackAdapter registers on its bolt app."""
    events: list[str] = []
    commands: list[str] = []
    real_event, real_command = AsyncApp.event, AsyncApp.command

    def event(self: AsyncApp, name: Any, *args: Any, **kwargs: Any) -> Any:
        events.append(name)
        return real_event(self, name, *args, **kwargs)

    def command(self: AsyncApp, name: Any, *args: Any, **kwargs: Any) -> Any:
        commands.append(name)
        return real_command(self, name, *args, **kwargs)

    monkeypatch.setattr(AsyncApp, "event", event)
    monkeypatch.setattr(AsyncApp, "command", command)
    database = Database(f"sqlite:///{tmp_path / 'chatbot.db'}")
    try:
        SlackAdapter(
            settings=Settings(  # type: ignore[call-arg]
                _env_file=None, slack_bot_token="xoxb-test", slack_app_token="xapp-test"
            ),
            handler=None,  # type: ignore[arg-type]  # nothing is handled: only built
            commands=Commands(store=Store(database), model_version=lambda: "v"),
        )
    finally:
        database.dispose()
    return events, commands


def web_api_calls() -> set[str]:
    """The slack_sdk Web API methods called anywhere in the Slack adapter's modules."""
    api_methods = {
        name
        for name in set(dir(AsyncWebClient)) - set(dir(AsyncBaseClient))
        if not name.startswith("_")
    }
    called: set[str] = set()
    for path in (REPO / "adapters").glob("slack*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in api_methods
            ):
                called.add(node.func.attr)
    return called


def test_the_manifest_subscribes_to_exactly_the_events_the_adapter_registers(
    manifest: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    events, commands = registered_with_bolt(monkeypatch, tmp_path)

    assert sorted(events) == sorted(slack_scopes.LISTENED_EVENTS)
    assert commands == [slack_scopes.SLASH_COMMAND]
    subscribed = manifest["settings"]["event_subscriptions"]["bot_events"]
    assert sorted(subscribed) == sorted(slack_scopes.bot_events())
    # Every listener is fed, and nothing is subscribed that no listener takes.
    assert {event.split(".")[0] for event in subscribed} == set(events)
    declared = [entry["command"] for entry in manifest["features"]["slash_commands"]]
    assert declared == commands


def test_the_manifest_grants_exactly_the_scopes_the_adapter_needs(
    manifest: dict[str, Any],
) -> None:
    # A new Web API call fails this until its scope is listed in adapters/slack_scopes.py.
    assert web_api_calls() == set(slack_scopes.WEB_API_SCOPES)
    scopes = manifest["oauth_config"]["scopes"]["bot"]
    assert len(scopes) == len(set(scopes))
    assert set(scopes) == slack_scopes.bot_scopes()
    assert "user" not in manifest["oauth_config"]["scopes"]  # no user token is ever used


def test_the_manifest_sets_up_socket_mode_and_a_messages_tab(manifest: dict[str, Any]) -> None:
    settings = manifest["settings"]
    assert settings["socket_mode_enabled"] is True
    assert settings["interactivity"]["is_enabled"] is False  # no listener for it
    assert settings["token_rotation_enabled"] is False  # the adapter keeps one bot token
    assert manifest["features"]["bot_user"]["display_name"]
    home = manifest["features"]["app_home"]
    assert home["messages_tab_enabled"] is True  # people can DM the bot
    assert home["messages_tab_read_only_enabled"] is False
    assert manifest["display_information"]["name"]
