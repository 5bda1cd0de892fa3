"""What a newcomer meets in the first hour: help that is true, failures that speak."""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from wattmesh.cli import app

#: A bracketed word in help source, escaped for Rich (``\[clock]``) or not (``[clock]``).
BRACKETED = re.compile(r"\\?\[([A-Za-z_][\w.]*)\]")


def _commands(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every command under ``command`` (Typer's click objects), with its path of names."""
    found = [(path, command)]
    sub_commands: dict[str, Any] = getattr(command, "commands", {})
    for name, sub in sorted(sub_commands.items()):
        found += _commands(sub, (*path, name))
    return found


COMMANDS = _commands(typer.main.get_command(app))


def _help(path: tuple[str, ...]) -> str:
    """The rendered ``--help`` of a command, box drawing removed and whitespace collapsed."""
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    text = re.sub(r"[│╭╮╰╯─]", " ", result.output)
    return " ".join(text.split())


def _sources(command: Any) -> str:
    texts = [command.help or ""]
    texts += [getattr(p, "help", None) or "" for p in command.params]
    return "\n".join(texts)


def test_every_command_is_walked() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"sim run", "ledger report", "edge run", "coordinator run", "dispatch"} <= names


@pytest.mark.parametrize(
    ("path", "command"), COMMANDS, ids=[" ".join(path) or "wattmesh" for path, _ in COMMANDS]
)
def test_help_keeps_bracketed_words_and_shows_no_bool_metavar(
    path: tuple[str, ...], command: Any
) -> None:
    shown = _help(path)
    assert "<bool>" not in shown
    for word in BRACKETED.findall(_sources(command)):
        assert f"[{word}]" in shown, word


def test_sim_run_help_names_the_clock_section() -> None:
    assert "([clock] file = ... in their site file)" in _help(("sim", "run"))


def test_ledger_report_help_names_the_market_rebate_setting() -> None:
    assert "(coordinator [market] rebate;" in _help(("ledger", "report"))


def test_flags_show_no_type_but_valued_options_do() -> None:
    shown = _help(("dispatch",))
    assert "--emergency An emergency order" in shown
    assert "--battery-w <float>" in shown


def test_edge_run_help_names_its_password_variable() -> None:
    shown = _help(("edge", "run"))
    assert "WATTMESH_MQTT_PASSWORD" in shown
    assert "[broker] password_env" in shown


def test_coordinator_run_help_names_its_environment_variables() -> None:
    shown = _help(("coordinator", "run"))
    assert "WATTMESH_COORDINATOR_PASSWORD" in shown
    assert "WATTMESH_INFLUX_TOKEN" in shown


def test_dispatch_for_says_which_clock_it_counts() -> None:
    shown = _help(("dispatch",))
    assert "Counted in simulated time with --clock-file" in shown
    assert "else in wall-clock time" in shown
    assert "WATTMESH_OPERATOR_PASSWORD" in shown
