"""The edge agent's lean service path: ``wattmesh edge run`` and ``wattmesh-edge`` (the systemd
unit's command) load only what the agent uses, and every other command line still reaches the
full ``wattmesh`` command line unchanged."""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker import topics
from broker.messages import Status
from broker.mosquitto import BrokerFiles, MosquittoProcess
from tests.broker_fixtures import MqttClientFactory, free_port
from wattmesh.cli import app
from wattmesh.edge_service import fast_edge_run, parse_edge_args

ROOT = Path(__file__).resolve().parent.parent

#: Top-level packages the running agent must never load (benchmarks/edge_footprint.py too).
#: prometheus_client: only with [metrics] (edge/metrics.py); scipy: the site planner calls
#: HiGHS through highspy (scipy alone would add about 40 MB).
NOT_ON_THE_SERVICE_PATH = {
    "simulators", "coordinator", "rich", "typer", "click", "cryptography", "prometheus_client",
    "scipy",
}  # fmt: skip
#: ... and what it must not load at start-up either: the site planner loads highspy in a
#: worker thread once the agent has a forecast, never before; difflib only words a mistake in a
#: register map (drivers/regmap.py).
NOT_AT_START_UP = NOT_ON_THE_SERVICE_PATH | {"highspy", "difflib"}
#: What it must load: the agent and the libraries it works with (the parsing is no vacuum).
ON_THE_SERVICE_PATH = {"edge", "broker", "drivers", "pydantic", "aiomqtt", "paho", "pymodbus", "numpy"}

IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \| +([\w.]+)$", re.MULTILINE)


def _site_file(tmp_path: Path, files: BrokerFiles) -> Path:
    """house-1 on the test broker, with a battery (so the controller's numpy runs) that listens
    nowhere (unavailable) and a spool in ``tmp_path``."""
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
name = "battery"
kind = "battery"
url = "tcp://127.0.0.1:{free_port()}"
[spool]
path = "{tmp_path / "spool.sqlite"}"
"""
    )
    return path


@pytest.mark.parametrize(
    "command",
    [("wattmesh", "edge", "run"), ("wattmesh.edge_service",)],
    ids=["wattmesh edge run", "wattmesh-edge"],
)
async def test_the_running_agent_never_imports_the_cli_simulators_or_cryptography(
    command: tuple[str, ...],
    mosquitto: MosquittoProcess,
    broker_files: BrokerFiles,
    mqtt_client: MqttClientFactory,
    tmp_path: Path,
) -> None:
    site_file = _site_file(tmp_path, broker_files)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTMESH_")}
    env.update(PYTHONPATH=str(ROOT), WATTMESH_MQTT_PASSWORD=broker_files.credentials["house-1"])
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", *command, str(site_file)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        async with mqtt_client("monitor") as monitor:
            await monitor.subscribe(topics.site_topic("house-1", "status"), qos=1)
            async with asyncio.timeout(30):
                async for message in monitor.messages:
                    assert isinstance(message.payload, bytes)
                    if Status.model_validate_json(message.payload).online:
                        break
        assert process.poll() is None  # connected, running
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=30)
    assert process.returncode == 0, stderr
    loaded = {name.split(".")[0] for name in IMPORTED.findall(stderr)}
    assert loaded >= ON_THE_SERVICE_PATH
    assert not loaded & NOT_ON_THE_SERVICE_PATH


def _mapped(pid: int, name: str) -> bool:
    """Whether process ``pid`` has a file whose path contains ``name`` mapped (a library)."""
    return name in Path(f"/proc/{pid}/maps").read_text()


async def test_a_planning_agent_loads_the_solver_at_start_before_any_forecast(
    mosquitto: MosquittoProcess,
    broker_files: BrokerFiles,
    mqtt_client: MqttClientFactory,
    tmp_path: Path,
) -> None:
    site_file = _site_file(tmp_path, broker_files)  # a battery, planning on (the default)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATTMESH_")}
    env.update(PYTHONPATH=str(ROOT), WATTMESH_MQTT_PASSWORD=broker_files.credentials["house-1"])
    process = subprocess.Popen(
        [sys.executable, "-m", "wattmesh.edge_service", str(site_file)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        async with mqtt_client("coordinator") as coordinator:
            await coordinator.subscribe(topics.site_topic("house-1", "status"), qos=1)
            await coordinator.subscribe(topics.site_topic("house-1", "telemetry"), qos=1)
            online = cycles = 0
            async with asyncio.timeout(30):
                async for message in coordinator.messages:
                    assert isinstance(message.payload, bytes)
                    if message.topic.matches(topics.site_topic("house-1", "status")):
                        online += Status.model_validate_json(message.payload).online
                    else:
                        cycles += 1
                    if online and cycles >= 2:  # running, and two cycles done
                        break
            # no forecast yet: the solver is loaded all the same, so that the first plan is
            # not late for its import (at a demo's 800x, 0.2 s of import is minutes)
            async with asyncio.timeout(30):
                while not _mapped(process.pid, "highspy"):  # noqa: ASYNC110 - another process
                    await asyncio.sleep(0.05)
        assert process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(process.communicate, timeout=30)
    assert process.returncode == 0, stderr


def test_importing_the_agent_as_the_service_path_does_loads_no_scipy_or_cli() -> None:
    code = (
        "import sys, wattmesh.entry\n"
        "from wattmesh.edge_service import import_agent\n"
        "import_agent()\n"
        "print(' '.join(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    loaded = {name.split(".")[0] for name in result.stdout.split()}
    assert loaded >= ON_THE_SERVICE_PATH
    assert not loaded & NOT_AT_START_UP


_THREADS = (
    "import os, wattmesh.entry\n"
    "from wattmesh.edge_service import import_agent\n"
    "import_agent()\n"
    "print(len(os.listdir('/proc/self/task')), os.environ['OPENBLAS_NUM_THREADS'])"
)


@pytest.mark.parametrize(
    ("given", "threads"),
    [(None, "1 1"), ("2", f"{min(2, os.cpu_count() or 1)} 2")],  # OpenBLAS: at most one a CPU
)
def test_the_agent_starts_no_blas_threads_unless_the_environment_asks(
    given: str | None, threads: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    if given is not None:
        env["OPENBLAS_NUM_THREADS"] = given
    result = subprocess.run(
        [sys.executable, "-c", _THREADS], capture_output=True, text=True, timeout=60, check=True,
        env=env,
    )  # fmt: skip
    assert result.stdout.split() == threads.split()  # the process's threads, the setting


def test_a_plan_solves_in_a_process_whose_first_solve_was_the_community_schedule() -> None:
    # HiGHS sizes one scheduler per process at its first solve; a planner that asked for
    # another size (threads = 1) then failed every plan with "Not Set", as in the engine,
    # which runs the coordinator's schedule and the sites' plans in one process
    code = (
        "import numpy as np\n"
        "from coordinator.reserve import FleetBattery, community_schedule\n"
        "from edge.plan import PlanBattery, plan_site\n"
        "community_schedule(np.array([-1.0, 1.0] * 4), [FleetBattery(0.0, 0.0, 2.0, 4.0, 4.0)], "
        "retail_per_kwh=0.3, feed_in_per_kwh=0.1, step_h=0.25, import_limit_kw=9.0, "
        "export_limit_kw=9.0)\n"
        "plan = plan_site([0.5, -0.5, 0.5, 0.2] * 24, 0.3, 0.1, PlanBattery(1.0, 0.0, 2.0, 1.0, "
        "1.0), step_h=0.25, stored_value_per_kwh=0.2)\n"
        "print(plan.cost)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout) != 0.0  # solved


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--version", "edge", "run", "site.toml"],
        ["sim", "run", "site.toml"],
        ["edge"],
        ["edge", "run"],
        ["edge", "run", "--help"],
        ["edge", "run", "-h", "site.toml"],
        ["edge", "run", "-v", "site.toml"],  # -v belongs before `edge`
        ["edge", "run", "--bogus", "site.toml"],
        ["edge", "run", "--give-up", "2", "site.toml"],  # no abbreviations
        ["edge", "run", "--give-up-after", "-1", "site.toml"],
        ["edge", "run", "--give-up-after", "x", "site.toml"],
        ["edge", "run", "--log-format", "xml", "site.toml"],
        ["edge", "run", "a.toml", "b.toml"],
    ],
)
def test_anything_but_a_well_formed_edge_run_goes_to_the_full_command_line(
    argv: list[str],
) -> None:
    assert fast_edge_run(argv) is None


def test_a_well_formed_edge_run_takes_the_lean_path_with_the_cli_options(tmp_path: Path) -> None:
    bad = tmp_path / "site.toml"
    bad.write_text("[site]\nid = 'Bad Site!'\n")
    result = subprocess.run(
        [sys.executable, "-m", "wattmesh", "-v", "edge", "run", "--log-format", "JSON",
         "--give-up-after=0", str(bad)],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "site.toml: site.id: String should match pattern" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_full_command_lines_edge_run_runs_the_same_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYDANTIC_DISABLE_PLUGINS", "__all__")  # as the service path sets it
    bad = tmp_path / "site.toml"
    bad.write_text("[site]\nid = 'Bad Site!'\n")
    result = CliRunner().invoke(app, ["edge", "run", str(bad)])
    assert result.exit_code == 2
    assert "site.toml: devices: Field required" in result.output


def test_the_systemd_unit_runs_the_wattmesh_edge_script_with_options_it_accepts() -> None:
    unit = (ROOT / "config" / "systemd" / "wattmesh-edge@.service").read_text()
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", unit, re.MULTILINE)
    program, *args = shlex.split(exec_start.replace("%i", "house-1"))
    assert program == "/opt/wattmesh/venv/bin/wattmesh-edge"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["wattmesh-edge"] == "wattmesh.edge_service:main"
    assert scripts["wattmesh"] == "wattmesh.entry:main"
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function))
    options = parse_edge_args(args)
    assert options.site_file == Path("/etc/wattmesh/house-1.toml")
    assert options.give_up_after == 0
    assert options.log_format == "json"
