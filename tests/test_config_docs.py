"""docs/configuration.md and the CLI's flags are generated from the settings' declarations."""

from __future__ import annotations

import argparse
from pathlib import Path

from service.cli import commands, parser
from service.config import COMMANDS, Settings, declared
from service.config.declaring import BOOLEAN
from service.config.docs import PAGE, REGENERATE, configuration_page

ROOT = Path(__file__).resolve().parent.parent


def test_the_page_is_up_to_date() -> None:
    written = (ROOT / PAGE).read_bytes()
    assert written == configuration_page().encode(), f"{PAGE} is out of date: run `{REGENERATE}`"


def test_the_page_names_every_variable_and_flag() -> None:
    page = configuration_page()
    for spec in declared():
        assert f"| `{spec.env}` |" in page, spec.name
        assert (f"`{spec.flag}`" in page) == bool(spec.commands), spec.name


def test_every_field_of_settings_is_declared() -> None:
    names = [spec.name for spec in declared()]
    assert names == list(Settings.__dataclass_fields__)
    for spec in declared():
        assert spec.help and spec.section.title, spec.name
        assert set(spec.commands) <= set(COMMANDS), spec.name


def _flags(sub: argparse.ArgumentParser) -> set[str]:
    return {option for action in sub._actions for option in action.option_strings}


def test_each_command_takes_the_flags_of_the_settings_it_declares() -> None:
    built = parser.build()
    (subcommands,) = (a for a in built._actions if isinstance(a, argparse._SubParsersAction))
    assert list(subcommands.choices) == list(COMMANDS) == list(commands.COMMANDS)
    # Flags of a command's own, declared by hand: recover's, the bulk actions' filter, and
    # a queue's settings.
    own = {"-h", "--help", "--dry-run"}
    own |= {"--state", "--type", "--tag", "--finished-before", "--finished-after"}
    queue_flags = {"--rate", "--burst", "--concurrency", "--no-rate", "--no-concurrency"}
    for command, sub in subcommands.choices.items():
        expected = set()
        for spec in declared():
            if command in spec.commands:
                expected.add(spec.flag)
                if spec.kind is BOOLEAN:
                    expected.add("--no-" + spec.flag.removeprefix("--"))
        hand_made = own | queue_flags if command == "queues" else own
        assert _flags(sub) - hand_made == expected, command


def test_dev_changes_only_the_defaults_it_declares() -> None:
    changed = {spec.name: spec.default_for("dev") for spec in declared() if spec.dev_default}
    assert changed == {"host": "127.0.0.1", "allow_delete_all": True}
