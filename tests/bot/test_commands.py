"""Commands on a real database: permissions, help, status, not-yet-available features."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from bot.commands import Command, CommandRequest, Commands, parse_bang_command
from bot.storage import Database, Store, record_incoming
from tests.conftest import make_message


def request(command: str, *, admin: bool, arguments: str = "") -> CommandRequest:
    return CommandRequest(
        command=command,
        arguments=arguments,
        platform="slack",
        workspace="W1",
        channel="C1",
        user_id="U-someone",
        user_name="Someone",
        user_is_admin=admin,
    )


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("!status", ("status", "")),
        ("  !Retrain now please ", ("retrain", "now please")),
        ("!forget-me", ("forget-me", "")),
        ("status", None),
        ("!", None),
        ("!! shout", None),
        ("", None),
    ],
)
def test_parse_bang_command(text: str, parsed: tuple[str, str] | None) -> None:
    assert parse_bang_command(text) == parsed


async def test_admin_commands_refuse_non_admins_politely_and_log(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    commands = Commands(store=Store(database), model_version=lambda: "v1")
    with caplog.at_level(logging.WARNING):
        for command in ("retrain", "export", "status", "rollback"):
            assert await commands.run(request(command, admin=False)) == (
                f"Sorry, only admins can use `{command}`."
            )
    refusals = [r for r in caplog.records if "refused admin command" in r.getMessage()]
    assert len(refusals) == 4 and all("U-someone" in r.getMessage() for r in refusals)


async def test_a_channel_moderator_may_switch_training_but_nothing_shared(
    database: Database,
) -> None:
    commands = Commands(store=Store(database), model_version=lambda: "v1")
    moderator = replace(
        request("training", admin=False, arguments="off"), user_manages_channel=True
    )

    # Allowed (no action is registered here, so it says so instead of refusing).
    assert await commands.run(moderator) == "`training` is not available yet."
    for command in ("status", "export", "correct", "retrain", "rollback"):
        assert await commands.run(replace(moderator, command=command)) == (
            f"Sorry, only admins can use `{command}`."
        )
    member = replace(moderator, user_manages_channel=False)
    assert await commands.run(member) == "Sorry, only admins can use `training`."


async def test_status_reports_version_and_counts(database: Database) -> None:
    with database.session() as session:
        record_incoming(session=session, message=make_message("hi"))
    commands = Commands(store=Store(database), model_version=lambda: "default-abc123")
    reply = await commands.run(request("status", admin=True))
    assert "Model: default-abc123" in reply
    assert "Conversations: 1, messages: 1, exchanges: 0" in reply
    assert "Last export: never" in reply


async def test_everyone_gets_help_and_unknown_commands_point_to_it(database: Database) -> None:
    commands = Commands(store=Store(database), model_version=lambda: "v1")
    help_text = await commands.run(request("help", admin=False))
    assert all(f"`{c.value}`" in help_text for c in Command)
    unknown = await commands.run(request("dance", admin=False))
    assert unknown.startswith("I don't know the command `dance`.") and "`help`" in unknown


async def test_features_not_built_yet_say_so_until_an_action_is_registered(
    database: Database,
) -> None:
    calls: list[CommandRequest] = []

    async def export(req: CommandRequest) -> str:
        calls.append(req)
        return "exported 3 exchanges"

    bare = Commands(store=Store(database), model_version=lambda: "v1")
    assert await bare.run(request("export", admin=True)) == "`export` is not available yet."
    assert await bare.run(request("forget-me", admin=False)) == "`forget-me` is not available yet."
    wired = Commands(
        store=Store(database), model_version=lambda: "v1", actions={Command.EXPORT: export}
    )
    assert await wired.run(request("export", admin=True)) == "exported 3 exchanges"
    assert len(calls) == 1
