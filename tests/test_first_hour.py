"""What a newcomer meets in the first hour: help that is true, failures that speak."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from broker import topics
from broker.client import BusClient, BusSettings
from broker.messages import CoordinatorStatus, Dispatch, DispatchAck, Status
from broker.mosquitto import BrokerFiles, MosquittoProcess
from tests.broker_fixtures import MqttClientFactory, free_port
from wattmesh.cli import JsonLogFormatter, app

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


# -- failures that speak: a refused service, every dispatch outcome -------------------------

ROOT = Path(__file__).resolve().parent.parent
NOT_FOR_USERS = ("TaskGroup", "sub-exception", "Traceback")


def _wattmesh(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``python -m wattmesh ARGS`` from this checkout, its output captured."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WATTMESH_")}
    full_env.update({"PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "wattmesh", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def _speaks(result: subprocess.CompletedProcess[str]) -> str:
    """stderr, after checking that no Python internals reached the user."""
    for word in NOT_FOR_USERS:
        assert word not in result.stderr, result.stderr
    return " ".join(result.stderr.split())


def _site_file(tmp_path: Path, files: BrokerFiles) -> Path:
    """house-1's site file on the test broker; its one device listens nowhere (unavailable)."""
    path = tmp_path / "house-1.toml"
    path.write_text(
        f"""
[site]
id = "house-1"
[broker]
host = "{files.connect_host}"
port = {files.port}
password_env = "WATTMESH_MQTT_PASSWORD"
[[devices]]
name = "meter"
kind = "sunspec_meter"
url = "tcp://127.0.0.1:{free_port()}"
[spool]
path = "{tmp_path / "spool.sqlite"}"
"""
    )
    return path


def _coordinator_file(tmp_path: Path, files: BrokerFiles) -> Path:
    path = tmp_path / "coordinator.toml"
    path.write_text(
        f"""
[coordinator]
ledger = "{tmp_path / "ledger.sqlite"}"
[broker]
host = "{files.connect_host}"
port = {files.port}
password_env = "WATTMESH_COORDINATOR_PASSWORD"
"""
    )
    return path


async def test_edge_run_with_a_wrong_password_exits_with_the_brokers_reason(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    site_file = _site_file(tmp_path, broker_files)
    result = await asyncio.to_thread(
        _wattmesh, "edge", "run", str(site_file), env={"WATTMESH_MQTT_PASSWORD": "wrong"}
    )
    said = _speaks(result)
    assert result.returncode == 1
    assert "refused user 'house-1' 3 times: Not authorized (reason code 135)" in said
    assert "Check $WATTMESH_MQTT_PASSWORD" in said
    # The first refusal was logged at ERROR with the reason, before giving up.
    assert "ERROR broker.client: the broker at" in result.stderr
    assert "refused the connection of user 'house-1': Not authorized" in result.stderr


async def test_coordinator_run_with_an_empty_password_exits_after_the_given_count(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    config = _coordinator_file(tmp_path, broker_files)
    result = await asyncio.to_thread(
        _wattmesh,
        "coordinator",
        "run",
        str(config),
        "--give-up-after",
        "2",
        env={"WATTMESH_COORDINATOR_PASSWORD": ""},
    )
    said = _speaks(result)
    assert result.returncode == 1
    assert "refused user 'coordinator' 2 times: Not authorized (reason code 135)" in said
    assert "Check $WATTMESH_COORDINATOR_PASSWORD" in said


async def test_coordinator_run_standby_without_a_postgres_ledger_says_what_it_needs(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    config = _coordinator_file(tmp_path, broker_files)
    result = await asyncio.to_thread(
        _wattmesh,
        "coordinator",
        "run",
        str(config),
        "--standby",
        env={"WATTMESH_COORDINATOR_PASSWORD": broker_files.credentials["coordinator"]},
    )
    said = _speaks(result)
    assert result.returncode == 1
    assert "a standby needs a PostgreSQL ledger: set [coordinator] ledger_url" in said
    assert "Traceback" not in result.stderr


async def test_coordinator_run_with_its_password_runs_until_stopped(
    mosquitto: MosquittoProcess,
    broker_files: BrokerFiles,
    mqtt_client: MqttClientFactory,
    tmp_path: Path,
) -> None:
    config = _coordinator_file(tmp_path, broker_files)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTMESH_")}
    env.update(
        PYTHONPATH=str(ROOT), WATTMESH_COORDINATOR_PASSWORD=broker_files.credentials["coordinator"]
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "wattmesh", "coordinator", "run", str(config)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        async with mqtt_client("monitor") as monitor:
            await monitor.subscribe(topics.coordinator_status_topic("feeder-1"), qos=1)
            async with asyncio.timeout(30):
                async for message in monitor.messages:
                    assert isinstance(message.payload, bytes)
                    if CoordinatorStatus.model_validate_json(message.payload).started_ts > 0:
                        break
        assert process.poll() is None  # connected: it does not give up
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=30)
    assert process.returncode == 0, stderr
    assert "refused" not in stderr


def test_dispatch_says_when_the_broker_is_unreachable() -> None:
    port = free_port()
    result = _wattmesh(
        "dispatch", "house-1", "--battery-w", "1000", "--port", str(port),
        env={"WATTMESH_OPERATOR_PASSWORD": "x"},
    )  # fmt: skip
    assert result.returncode == 1
    assert f"cannot reach the broker at 127.0.0.1:{port}" in _speaks(result)


async def _dispatch(files: BrokerFiles, site: str, *args: str, password: str | None = None,
                    wait_s: float = 5.0) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = {} if password == "" else {
        "WATTMESH_OPERATOR_PASSWORD": files.credentials["operator"] if password is None else password
    }  # fmt: skip
    return await asyncio.to_thread(
        _wattmesh, "dispatch", site, "--battery-w", "1000", "--host", files.connect_host,
        "--port", str(files.port), "--wait", str(wait_s), *args, env=env,
    )  # fmt: skip


async def test_dispatch_says_when_the_operator_password_is_wrong(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles
) -> None:
    result = await _dispatch(broker_files, "house-1", password="wrong")
    said = _speaks(result)
    assert result.returncode == 1
    assert "refused user 'operator': Not authorized (reason code 135)" in said
    assert "check $WATTMESH_OPERATOR_PASSWORD" in said


async def test_dispatch_says_when_the_password_variable_is_not_set(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles
) -> None:
    result = await _dispatch(broker_files, "house-1", password="")
    assert result.returncode == 1
    assert "$WATTMESH_OPERATOR_PASSWORD is not set" in _speaks(result)


async def test_dispatch_says_when_no_agent_ever_reported_for_the_site(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles
) -> None:
    result = await _dispatch(broker_files, "ghost", wait_s=1.0)
    said = _speaks(result)
    assert result.returncode == 1
    assert "no acknowledgement from ghost within 1 s" in said
    assert "the broker has no status from an agent for 'ghost'" in said


async def test_dispatch_says_when_the_sites_agent_is_offline(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, mqtt_client: MqttClientFactory
) -> None:
    async with mqtt_client("house-1") as house:
        offline = Status(ts=time.time(), online=False)
        await house.publish(
            topics.site_topic("house-1", "status"), offline.model_dump_json(), qos=1, retain=True
        )
    result = await _dispatch(broker_files, "house-1", wait_s=1.0)
    assert result.returncode == 1
    assert "its agent is offline" in _speaks(result)


@contextlib.asynccontextmanager
async def _answering_site(
    make: MqttClientFactory, outcome: str, detail: str
) -> AsyncIterator[None]:
    """house-1 on the broker, answering every dispatch order with ``outcome``."""
    async with make("house-1") as house:
        await house.subscribe(topics.site_topic("house-1", "dispatch"), qos=1)

        async def answer() -> None:
            async for message in house.messages:
                assert isinstance(message.payload, bytes)
                order = Dispatch.model_validate_json(message.payload)
                ack = DispatchAck(
                    ts=order.ts, command_id=order.id, outcome=outcome, detail=detail,  # type: ignore[arg-type]
                )  # fmt: skip
                await house.publish(
                    topics.site_topic("house-1", "dispatch/ack"), ack.model_dump_json(), qos=1
                )

        task = asyncio.create_task(answer())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.mark.parametrize(
    ("outcome", "code", "says"),
    [
        ("accepted", 0, None),
        ("clamped", 0, "note: house-1 accepted the order with changes: beyond the rated power"),
        ("refused", 1, "house-1 refused the order: beyond the rated power"),
        ("expired", 1, "house-1 judged the order expired on its own clock: beyond"),
        ("duplicate", 1, "house-1 had already handled an order with this id"),
        ("invalid", 1, "house-1 could not read the order: beyond the rated power"),
    ],
)
async def test_dispatch_reports_each_acknowledgement_status(
    mosquitto: MosquittoProcess,
    broker_files: BrokerFiles,
    mqtt_client: MqttClientFactory,
    outcome: str,
    code: int,
    says: str | None,
) -> None:
    async with _answering_site(mqtt_client, outcome, "beyond the rated power"):
        result = await _dispatch(broker_files, "house-1")
    said = _speaks(result)
    assert result.returncode == code, said
    assert json.loads(result.stdout)["outcome"] == outcome
    if says is None:
        assert said == ""
    else:
        assert says in said


@pytest.mark.parametrize(
    ("protocol", "reason"),
    # paho 2 reports MQTT 3.1.1's return code 5 (not authorised) as MQTT 5's 135 too.
    [(5, "Not authorized (reason code 135)"), (4, "Not authorized (reason code 135)")],
)
async def test_bus_client_logs_a_refusal_with_the_brokers_reason_then_with_backoff(
    mosquitto: MosquittoProcess,
    broker_files: BrokerFiles,
    caplog: pytest.LogCaptureFixture,
    protocol: int,
    reason: str,
) -> None:
    settings = BusSettings(
        host=broker_files.connect_host,
        port=broker_files.port,
        username="house-1",
        password="wrong",
        client_id="house-1",
        backoff_initial_s=0.01,
        backoff_max_s=0.02,
        protocol=protocol,
    )
    with caplog.at_level(logging.DEBUG, logger="broker.client"):
        async with BusClient(settings) as bus:
            async with asyncio.timeout(30):
                while bus.refusals < 9:
                    with contextlib.suppress(TimeoutError):
                        await bus.wait_connected(0.01)
            connected, refusal = bus.connected, bus.refusal
    assert not connected
    assert refusal == reason
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    # Refusals 1, 2, 4 and 8 are logged (the 9th is not): loud at first, then backing off.
    assert len(errors) == 4, errors
    assert errors[0].endswith(f"refused the connection of user 'house-1': {reason}; retrying")
    assert "(8 times in a row)" in errors[-1]


async def test_edge_run_logs_json_lines_with_log_format_json(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles, tmp_path: Path
) -> None:
    site_file = _site_file(tmp_path, broker_files)
    result = await asyncio.to_thread(
        _wattmesh, "edge", "run", str(site_file), "--log-format", "json", "--give-up-after", "2",
        env={"WATTMESH_MQTT_PASSWORD": "wrong"},
    )  # fmt: skip
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stderr.splitlines()]  # every line is JSON
    assert all(set(doc) == {"ts", "time", "level", "logger", "message"} for doc in lines)
    assert lines[0]["level"] == "INFO"
    assert lines[0]["message"].startswith("edge agent for site 'house-1'")
    refusals = [d for d in lines if d["logger"] == "broker.client"]
    assert refusals[0]["level"] == "ERROR"
    assert "refused the connection of user 'house-1': Not authorized" in refusals[0]["message"]
    assert lines[-1]["level"] == "ERROR"
    assert lines[-1]["logger"] == "wattmesh"
    assert "refused user 'house-1' 2 times" in lines[-1]["message"]
    assert lines[-1]["time"].endswith("+00:00")


def test_json_log_formatter_writes_one_object_per_record_with_the_traceback() -> None:
    try:
        raise ValueError("boom")  # noqa: TRY301 - a real exception with a real traceback
    except ValueError:
        record = logging.getLogger("t").makeRecord(
            "t", logging.WARNING, __file__, 1, "spool %s: %d", ("degraded", 3), sys.exc_info()
        )
    line = JsonLogFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["message"] == "spool degraded: 3"
    assert doc["level"] == "WARNING"
    assert doc["exc"].startswith("Traceback") and doc["exc"].endswith("ValueError: boom")


def test_status_says_when_the_broker_is_unreachable() -> None:
    port = free_port()
    result = _wattmesh("status", "--port", str(port), "--wait", "1",
                       env={"WATTMESH_OPERATOR_PASSWORD": "x"})  # fmt: skip
    assert result.returncode == 1
    said = " ".join(result.stdout.split())
    assert f"cannot read the status from 127.0.0.1:{port}: cannot reach the broker" in said
    _speaks(result)


async def test_status_says_when_the_broker_refuses_the_user(
    mosquitto: MosquittoProcess, broker_files: BrokerFiles
) -> None:
    result = await asyncio.to_thread(
        _wattmesh, "status", "--host", broker_files.connect_host, "--port",
        str(broker_files.port), "--user", "monitor", "--wait", "1",
        env={"WATTMESH_OPERATOR_PASSWORD": "wrong"},
    )  # fmt: skip
    assert result.returncode == 1
    said = " ".join(result.stdout.split())
    assert "the broker refused user 'monitor': Not authorized (reason code 135)" in said
    _speaks(result)
