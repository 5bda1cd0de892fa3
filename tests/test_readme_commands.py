"""Every command in the README's ```sh blocks is run here, or listed with why it is not.

The commands run as written, through bash, with ``wattmesh`` being this checkout's, in a
sandbox folder holding a copy of ``config/`` and of the vendors' scenario. What is fixed in
those files and in the commands is moved the same way in both (``MOVES``): the ports (the
broker's 1883, the simulators' 150xx, the API's 8080, the historian's 8086, the MCP
server's 8765) to free ones,
``/tmp/wattmesh-community`` and the production paths (``/var/lib/wattmesh``, ``/backup``,
``/srv/lake``, ``/etc/wattmesh``) into the sandbox, and a placeholder password (``...``,
``<from credentials.toml>``) to the user's password from the broker's credentials.toml. So
another stack, or another copy of this suite, on the machine collides with nothing. Where a
command is shortened, ``RUN`` says so. The copy of ``config/coordinator.toml`` has its
commented ``[api]`` and ``[historian]`` sections switched on, as the README describes, with
VictoriaMetrics as the historian's server. A README command that is in neither table fails
``test_every_readme_command_is_run_or_listed_with_a_reason``; an entry the README no longer
has fails ``test_the_tables_name_only_commands_the_readme_has_and_each_once``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SH_BLOCK = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)


def readme_commands(text: str) -> list[str]:
    """The commands of every ```sh block: continuations joined, comments and spaces dropped,
    ``a && b`` split into its commands."""
    commands: list[str] = []
    for block in SH_BLOCK.findall(text):
        for raw in block.replace("\\\n", " ").splitlines():
            line = " ".join(re.sub(r"(^|\s)#\s.*$", "", raw).split())
            commands += [part.strip() for part in line.split(" && ") if part.strip()]
    return commands


# -- what is not run, and why ----------------------------------------------------------------

_PI = "installs on a Raspberry Pi as root (system user, /opt, /etc, systemd): not on a test machine"
_BRIDGE = (
    "a core and an edge machine (a host name, files copied between them); "
    "tests/test_bridge.py runs the same two commands through the CLI and starts the brokers "
    "they write on this machine"
)
_POSTGRES = (
    "a PostgreSQL server at db-host; tests/test_ledger_cli_postgres.py runs report, check, "
    "audit, backup, restore and archive export through the CLI against a throwaway server "
    "(a URL, --config's ledger_url, the password from the environment)"
)
_HW = "a real device at a documentation address (RFC 5737) or serial adapter: nothing answers here"

NOT_RUN: dict[str, str] = {
    "sudo apt-get install -y mosquitto socat python3-venv": "installs Debian packages as root",
    "python3 -m venv .venv": "makes a virtualenv; the tests already run in one",
    ". .venv/bin/activate": "activates that virtualenv in the user's shell",
    "pip install .": "installs the package from the registry's dependencies; the tests run "
    "this checkout",
    "./scripts/test.sh": "runs this test suite itself (and installs Debian packages)",
    "sudo apt-get install python3-venv": _PI,
    "sudo useradd --system --home /var/lib/wattmesh --groups dialout wattmesh": _PI,
    "sudo python3 -m venv /opt/wattmesh/venv": _PI,
    "sudo /opt/wattmesh/venv/bin/pip install .": _PI,
    "sudo install -d -o root -g wattmesh -m 750 /etc/wattmesh": _PI,
    "sudo cp config/sites/house-1.toml /etc/wattmesh/house-1.toml": _PI,
    "echo 'WATTMESH_MQTT_PASSWORD=...' | sudo tee /etc/wattmesh/house-1.env": _PI,
    "sudo chmod 640 /etc/wattmesh/house-1.env": _PI,
    "sudo cp config/systemd/wattmesh-edge@.service /etc/systemd/system/": _PI,
    "sudo systemctl enable --now wattmesh-edge@house-1": _PI,
    "journalctl -u wattmesh-edge@house-1 -f": _PI,
    "wattmesh scan tcp://192.0.2.20:502 --map huawei_sun2000": _HW,
    "wattmesh scan tcp://192.0.2.21:502 --map sungrow_sh": _HW,
    "wattmesh scan tcp://192.0.2.22:502 --map victron_gx": _HW,
    "wattmesh scan tcp://192.0.2.23:502 --map goodwe_et": _HW,
    "wattmesh scan rtu:///dev/ttyUSB0?baud=9600 --map eastron_sdm72d": _HW,
    "wattmesh scan rtu:///dev/ttyUSB0?baud=9600 --map carlo_gavazzi_em24": _HW,
    "wattmesh scan tcp://192.0.2.24:502 --map carlo_gavazzi_em24_e1": _HW,
    "wattmesh scan rtu:///dev/ttyUSB0?baud=9600 --map sdm630": _HW,
    "wattmesh ledger check /var/lib/wattmesh/ledger.sqlite --strict --max-age 1h": "judges "
    "ages on the wall clock, for a live ledger; the simulated one here is months from it "
    "(tests/test_ledger_cli_durable.py runs --strict; the same check without it runs here)",
    **dict.fromkeys(
        (
            "WATTMESH_LEDGER_PASSWORD=... wattmesh ledger report "
            "postgresql://wattmesh@db-host:5432/wattmesh",
            "WATTMESH_LEDGER_PASSWORD=... wattmesh ledger check --config "
            "/etc/wattmesh/coordinator.toml",
            "WATTMESH_LEDGER_PASSWORD=... wattmesh ledger backup "
            "postgresql://wattmesh@db-host:5432/wattmesh /backup/ledger-$(date +%F).sqlite",
            "createdb -h db-host -U wattmesh wattmesh_restored",
            "WATTMESH_LEDGER_PASSWORD=... wattmesh ledger restore "
            "/backup/ledger-2026-12-06.sqlite postgresql://wattmesh@db-host:5432/wattmesh_restored",
        ),
        _POSTGRES,
    ),
    "wattmesh status --broker-dir /tmp/wattmesh-community/feeders": "needs that broker running "
    "with a coordinator per feeder; tests/test_feeders.py runs this command against one",
    "wattmesh up area": "a second whole stack here would add its start-up to the suite's "
    "budget; tests/test_up_feeders.py runs the folder `wattmesh init area --feeders` writes "
    "on the same stack (real Mosquitto and Modbus) until each feeder's coordinator cleared",
    "wattmesh status --broker-dir area/state/broker": "needs `wattmesh up area` running; "
    "tests/test_up_feeders.py runs `wattmesh status --broker-dir STATE/broker` against such "
    "a stack",
    "wattmesh broker bridge-user /var/lib/wattmesh/broker --edge north --sites house-1,house-2": (
        _BRIDGE
    ),
    "wattmesh broker edge /var/lib/wattmesh/edge-north --kit ./bridge-north --core "
    "core.example.net --host 0.0.0.0": _BRIDGE,
    "wattmesh broker run /var/lib/wattmesh/edge-north": _BRIDGE,
    "wattmesh broker bridge-user /var/lib/wattmesh/feeders --feeder south --edge substation-7 "
    "--sites school,house-2": "a core that serves many feeders on another machine; "
    "tests/test_feeders_bridge.py runs bridge-user --feeder through the CLI and bridges an "
    "edge broker into a running many-feeders core",
    "WATTMESH_API_TOKEN=<a token> wattmesh mcp --api http://127.0.0.1:8080": "an MCP server "
    "on stdin/stdout for a desktop agent; tests/test_mcp.py drives it with the MCP SDK's client",
    **{
        f"python benchmarks/{name}.py": "a benchmark: minutes of CPU on a shared machine; its "
        "figures are in the README"
        for name in (
            "modbus_poll",
            "edge_footprint",
            "spool_throughput",
            "clearing",
            "coordinator_ingest",
            "dispatch_latency",
            "community_day",
            "forecast_skill",
            "api",
            "economics",
            "plan_solve",
            "agreement",
        )
    },
}


# -- what is run, and what it must print ------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """How a README command runs: ``extra`` arguments appended (``note`` says why), a
    ``background`` service stopped with Ctrl-C at the end (exit 0 then), and text its output
    must contain (regular expressions: ``says`` on stdout, ``err_says`` on stderr, where the
    services write their lines)."""

    says: tuple[str, ...] = ()
    err_says: tuple[str, ...] = ()
    extra: str = ""
    note: str = ""
    background: bool = False


RUN: dict[str, Run] = {
    "wattmesh demo": Run(
        says=(r"community", r"--out DIR keeps its files"),
        extra="--hours 0.5 --speed 1440 --sites 2",
        note="shortened with the README's --hours, --speed and --sites",
    ),
    "wattmesh init mesh": Run(says=(r"mesh/scenario\.toml", r"run it with: wattmesh up mesh")),
    "wattmesh init area --feeders": Run(
        says=(r"area/feeders\.toml", r"area/coordinators/south\.toml", r"wattmesh up area")
    ),
    "wattmesh up mesh": Run(
        says=(
            r"^broker: mosquitto on 127\.0\.0\.1:",
            r"^coordinator: feeder 'feeder-1'",
            r"^wattmesh up: 5 site\(s\)",
            r"5/5 sites reporting",
            r"^stopped$",
        ),
        extra="--speed 600 --summary-every 1",
        note="the README's --speed 600 and --summary-every",
        background=True,
    ),
    "wattmesh sim run config/scenarios/community.toml --clock-file "
    "/tmp/wattmesh-community/clock.json": Run(
        says=(
            r"^farm-pv pv_inverter tcp://127\.0\.0\.1:\d+ unit=1$",
            r"^factory-meter sdm630 rtu://\S+\?baud=9600 unit=1$",
        ),
        background=True,
    ),
    "wattmesh broker init /tmp/wattmesh-community/broker --sites "
    "solar-farm,factory,house-1,house-2,school": Run(
        says=(r"credentials\.toml",),
        extra="--port {broker_port}",
        note="the README's port 1883 moved to a free one, as everywhere here",
    ),
    "wattmesh broker init /tmp/wattmesh-community/feeders --feeders config/feeders.toml": Run(
        says=(r"feeder north: listener 127\.0\.0\.1:\d+, mount point feeder/north/",)
    ),
    "wattmesh broker run /tmp/wattmesh-community/broker": Run(background=True),
    "WATTMESH_MQTT_PASSWORD=<from credentials.toml> wattmesh edge run "
    "config/sites/house-1.toml": Run(
        err_says=(r"edge agent for site 'house-1': 3 device\(s\), broker 127\.0\.0\.1:\d+",),
        background=True,
    ),
    "WATTMESH_COORDINATOR_PASSWORD=... wattmesh coordinator run config/coordinator.toml": Run(
        err_says=(r"coordinator for feeder 'feeder-1': broker 127\.0\.0\.1:\d+",),
        background=True,
    ),
    "wattmesh status --user monitor --broker-dir /tmp/wattmesh-community/broker": Run(
        says=(r"coordinator of feeder-1", r"house-1 +│ yes"),
    ),
    "wattmesh dispatch house-1 --battery-w -3000 --for 15m --broker-dir "
    "/tmp/wattmesh-community/broker --clock-file /tmp/wattmesh-community/clock.json": Run(
        says=(r'"outcome": "(accepted|clamped)"', r'"applied_battery_power_w": -3000'),
    ),
    "wattmesh api token add config/api-tokens.toml --name grafana --role viewer": Run(
        says=(r"^\S{20,}$",)
    ),
    "wattmesh api token add config/api-tokens.toml --name house-1-owner --role site "
    "--site house-1": Run(says=(r"^\S{20,}$",)),
    "wattmesh api token add config/api-tokens.toml --name control-room --role operator": Run(
        says=(r"^\S{20,}$",)
    ),
    'curl -H "Authorization: Bearer $TOKEN" '
    "http://127.0.0.1:8080/api/v1/sites/house-1/statement": Run(says=(r'"site": ?"house-1"',)),
    "curl -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' -d "
    '\'{"battery_power_w": -3000, "duration_s": 900}\' '
    "http://127.0.0.1:8080/api/v1/sites/house-1/dispatch": Run(
        says=(r'"outcome": ?"(accepted|clamped)"',)
    ),
    "wattmesh mcp --transport http --port 8765 --api http://127.0.0.1:8080": Run(background=True),
    "wattmesh ledger report /tmp/wattmesh-community/ledger.sqlite": Run(says=(r"house-1",)),
    "wattmesh ledger check /tmp/wattmesh-community/ledger.sqlite": Run(
        says=(r"ledger\.sqlite: balanced \([1-9]\d* settled interval",)
    ),
    "wattmesh ledger audit /tmp/wattmesh-community/ledger.sqlite --kind correction "
    "--since 2026-12-06T00:00Z": Run(),
    "wattmesh ledger backup /var/lib/wattmesh/ledger.sqlite /backup/ledger-$(date +%F).sqlite": Run(
        says=(r"ledger-\d{4}-\d\d-\d\d\.sqlite",)
    ),
    "wattmesh ledger restore /backup/ledger-2026-12-06.sqlite /var/lib/wattmesh/ledger.sqlite": Run(
        says=(r"pre-restore",), note="the backup's date is today's: the one backup made"
    ),
    "wattmesh archive export /srv/lake --config /etc/wattmesh/coordinator.toml "
    "--from 2026-06-01 --to 2026-07-01": Run(says=(r"^settlements: \d+ row", r"file\(s\) in")),
    "wattmesh scan tcp://127.0.0.1:15021 --unit 1": Run(says=(r"\b103\b", r"\bW\b")),
    "wattmesh scan rtu:///dev/ttyUSB0?baud=9600 --unit 1 --map sdm630": Run(
        says=(r"sdm630",), note="/dev/ttyUSB0 is the simulated factory meter's RTU link"
    ),
    "wattmesh scan tcp://127.0.0.1:15021 --json": Run(says=(r"^\{", r'"models"')),
    "wattmesh sim run simulators/scenarios/vendors.toml": Run(
        says=(r"^huawei map tcp://127\.0\.0\.1:\d+ unit=\d+$",), background=True
    ),
    "wattmesh scan tcp://127.0.0.1:15041 --map huawei_sun2000": Run(says=(r"huawei_sun2000",)),
    "wattmesh backtest config/scenarios/community.toml --days 7": Run(
        says=(r"factory", r"peak"),
        extra="--days 0.1",
        note="a week takes 40 s: 0.1 day (the last --days counts)",
    ),
    "wattmesh backtest config/scenarios/community.toml --start 2026-05-01T00:00:00Z --days 31 "
    "--csv factory=factory-may.csv": Run(
        says=(r"factory", r"peak"),
        extra="--days 0.1",
        note="0.1 day of a month; the test writes factory-may.csv (hourly load_w and pv_w)",
    ),
}


def unaccounted(text: str) -> list[str]:
    """The commands of ``text``'s ```sh blocks that are neither run nor listed."""
    return [c for c in readme_commands(text) if c not in RUN and c not in NOT_RUN]


def test_every_readme_command_is_run_or_listed_with_a_reason() -> None:
    assert len(readme_commands(README.read_text())) > 40
    assert unaccounted(README.read_text()) == []  # add it to RUN and ORDER, or to NOT_RUN


def test_a_new_readme_command_in_neither_table_is_caught() -> None:
    text = README.read_text() + "\n```sh\nwattmesh frobnicate --all   # new\n```\n"
    assert unaccounted(text) == ["wattmesh frobnicate --all"]


def test_the_tables_name_only_commands_the_readme_has_and_each_once() -> None:
    commands = set(readme_commands(README.read_text()))
    assert sorted(set(RUN) - commands) == []
    assert sorted(set(NOT_RUN) - commands) == []
    assert set(RUN).isdisjoint(NOT_RUN)
    assert all(reason.strip() for reason in NOT_RUN.values())
    assert sorted(ORDER) == sorted(RUN)


def test_the_block_parser_joins_continuations_drops_comments_and_splits_chains() -> None:
    text = "x\n```sh\na --b \\\n    c   # d\ne && f # g\n```\n```toml\nh = 1\n```\n"
    assert readme_commands(text) == ["a --b c", "e", "f"]


# -- the sandbox the commands run in ----------------------------------------------------------

#: Fixed ports in the files and the commands: each moves to a free port.
FIXED_PORT = re.compile(r"(?<![\d.])(1883|8080|8086|8765|150\d\d)(?![\d.])")
PLACEHOLDER_PASSWORD = re.compile(
    r"\bWATTMESH_(MQTT|COORDINATOR|OPERATOR|MONITOR)_PASSWORD=(\.\.\.|<from credentials\.toml>)"
)
USER_OF = {
    "MQTT": "house-1",
    "COORDINATOR": "coordinator",
    "OPERATOR": "operator",
    "MONITOR": "monitor",
}


def _free_port(taken: Collection[int] = ()) -> int:
    """A port free now, below the ephemeral range and not in ``taken``.

    The sandbox picks its ports when it starts and some services bind theirs minutes later; a
    port the kernel hands out for ``bind(0)`` is in the ephemeral range, where any outgoing
    connection in between (a client to the broker) may take it as its local port.
    """
    low, high = _ephemeral_range()
    top = min(low, 32_768)
    bottom = 20_000 if top > 21_000 else 1_024
    for _ in range(1000):
        port = random.randrange(bottom, top)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port below the ephemeral range {low}-{high}")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999


@dataclass
class Result:
    """A command as it ran, and what it printed."""

    command: str
    code: int | None
    out: str
    err: str


@dataclass
class Service:
    """A background command; its output is collected while it runs."""

    command: str
    process: subprocess.Popen[str]
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)

    readers: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err)):
            if stream is not None:
                reader = threading.Thread(target=_collect, args=(stream, lines), daemon=True)
                reader.start()
                self.readers.append(reader)

    def wait_for(self, ready: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.process.poll() is not None:
                for reader in self.readers:
                    reader.join(timeout=10)  # the rest of its output
                pytest.fail(
                    f"{self.command} exited {self.process.returncode}:\n"
                    f"{''.join(self.out)}\n{''.join(self.err)}"
                )
            assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
            time.sleep(0.1)

    def stop(self) -> Result:
        """Ctrl-C to its process group, as a terminal sends it; SIGKILL after 60 s."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for reader in self.readers:
            reader.join(timeout=10)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()
        return Result(self.command, self.process.returncode, "".join(self.out), "".join(self.err))


def _collect(stream: object, lines: list[str]) -> None:
    assert hasattr(stream, "readline")
    for line in iter(stream.readline, ""):
        lines.append(line)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Sandbox:
    """The folder the commands run in, the moves applied to them, and their results."""

    def __init__(self, box: Path) -> None:
        self.box = box
        self.ports: dict[str, int] = {}
        self.paths = {
            "/tmp/wattmesh-community": box / "community",
            "/tmp/wattmesh-vendors": box / "vendors",
            "/var/lib/wattmesh/ledger.sqlite": box / "community" / "ledger.sqlite",
            "/var/lib/wattmesh/historian-buffer.sqlite": box / "community" / "historian.sqlite",
            "/backup/": box / "backup",
            "/srv/lake": box / "lake",
            "/etc/wattmesh/coordinator.toml": box / "config" / "coordinator.toml",
            "/dev/ttyUSB0": box / "community" / "factory-meter-client",
            "ledger-2026-12-06.sqlite": Path(f"ledger-{dt.date.today().isoformat()}.sqlite"),
        }
        self.results: dict[str, Result] = {}
        self.services: dict[str, Service] = {}
        self.helpers: list[Service] = []  # services the commands need that are not commands
        bin_dir = box / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "wattmesh"
        shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m wattmesh "$@"\n')
        shim.chmod(0o755)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("WATTMESH_")}
        self.env.update(PYTHONPATH=str(ROOT), COLUMNS="200", PATH=f"{bin_dir}:{os.environ['PATH']}")
        self.env["WATTMESH_INFLUX_TOKEN"] = "not-checked-by-victoria-metrics"
        (box / "backup").mkdir()
        shutil.copytree(ROOT / "config", box / "config")
        (box / "simulators" / "scenarios").mkdir(parents=True)
        shutil.copy(ROOT / "simulators/scenarios/vendors.toml", box / "simulators/scenarios")
        for path in [*box.glob("config/**/*.toml"), *box.glob("simulators/**/*.toml")]:
            path.write_text(self.move(path.read_text()))
        # "The scenario fixes ... the speed of simulated time": 3 minutes a second, so that an
        # interval settles within seconds (the agents poll every second: 3 simulated minutes,
        # within the coordinator's max_hold_s of 5).
        scenario = box / "config" / "scenarios" / "community.toml"
        scenario.write_text(re.sub(r"(?m)^speed = 60\.0", "speed = 180.0", scenario.read_text()))
        assert tomllib.loads(scenario.read_text())["speed"] == 180.0
        # "With an [api] section", "with a [historian] section": the example's commented
        # ones, switched on (the historian's server is VictoriaMetrics, see _play).
        coordinator = box / "config" / "coordinator.toml"
        coordinator.write_text(
            re.sub(
                r"^# (\[(?:api|historian)\]\n)((?:# .*\n)+)",
                lambda m: m[1] + re.sub(r"^# ", "", m[2], flags=re.MULTILINE),
                coordinator.read_text(),
                flags=re.MULTILINE,
            )
        )
        assert {"api", "historian"} <= set(tomllib.loads(coordinator.read_text()))

    def port(self, fixed: str) -> int:
        if fixed not in self.ports:
            self.ports[fixed] = _free_port(self.ports.values())
        return self.ports[fixed]

    def move(self, text: str) -> str:
        """``text`` with the fixed ports and paths moved into the sandbox."""
        text = FIXED_PORT.sub(lambda m: str(self.port(m[1])), text)
        for fixed, path in self.paths.items():
            text = text.replace(fixed, str(path) + ("/" if fixed.endswith("/") else ""))
        return text

    def shell(self, command: str) -> str:
        """The command as bash runs it: moved, passwords filled in, ``extra`` appended."""
        text = self.move(command)
        run = RUN[command]
        if run.extra:
            text += " " + run.extra.format(broker_port=self.port("1883"))
        return PLACEHOLDER_PASSWORD.sub(
            lambda m: f"WATTMESH_{m[1]}_PASSWORD={shlex.quote(self.password(USER_OF[m[1]]))}", text
        )

    def password(self, user: str) -> str:
        path = self.box / "community" / "broker" / "credentials.toml"
        return str(tomllib.loads(path.read_text())["users"][user])

    def run(self, command: str, timeout_s: float = 120.0) -> Result:
        """Run a README command to its end."""
        done = subprocess.run(
            ["bash", "-c", self.shell(command)],
            cwd=self.box,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        result = Result(command, done.returncode, done.stdout, done.stderr)
        self.results[command] = result
        return result

    def start(self, command: str) -> Service:
        """Start a README command that runs until Ctrl-C."""
        process = subprocess.Popen(
            ["bash", "-c", self.shell(command)],
            cwd=self.box,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        service = Service(command, process)
        self.services[command] = service
        return service

    def stop(self, command: str) -> None:
        self.results[command] = self.services.pop(command).stop()

    def stop_all(self) -> None:
        for command in list(self.services)[::-1]:
            self.stop(command)
        while self.helpers:
            self.helpers.pop().stop()


def _key(part: str) -> str:
    """The one RUN command containing ``part``."""
    (key,) = [c for c in RUN if part in c]
    return key


#: The order the commands run in: the README's own flow (tokens, simulators, broker, an agent,
#: the coordinator; then the commands that talk to them), then `init`/`up`, then the engine.
ORDER = [
    _key("--name grafana"),
    _key("--name house-1-owner"),
    _key("--name control-room"),
    _key("sim run config/scenarios/community.toml"),
    _key("--sites solar-farm"),
    _key("--feeders config/feeders.toml"),
    _key("broker run"),
    _key("edge run"),
    _key("coordinator run"),
    _key("status"),
    _key("dispatch house-1"),
    _key("/dispatch"),
    _key("mcp --transport http"),
    _key("15021 --unit 1"),
    _key("15021 --json"),
    _key("--unit 1 --map sdm630"),
    _key("vendors.toml"),
    _key("15041"),
    _key("statement"),
    _key("ledger report"),
    _key("ledger check /tmp"),
    _key("ledger audit"),
    _key("ledger backup"),
    _key("archive export"),
    _key("ledger restore"),
    _key("wattmesh init mesh"),
    _key("wattmesh up mesh"),
    _key("wattmesh init area"),
    _key("--days 7"),
    _key("--csv"),
    _key("wattmesh demo"),
]

COMMUNITY_DEVICES = 11


def _play(sandbox: Sandbox) -> None:
    """Run every RUN command in ORDER, waiting where a service must be up first."""
    box = sandbox.box
    (box / "factory-may.csv").write_text(
        "time,load_w,pv_w\n"
        + "".join(
            f"{ts},{80_000 + 40_000 * (6 <= (ts // 3600) % 24 < 22)},0\n"
            for ts in range(1_776_643_200, 1_777_766_400, 3600)  # 2026-04-20 .. 2026-05-03
        )
    )
    tokens: dict[str, str] = {}
    for command in ORDER:
        if command in (_key("ledger restore"),):
            for name in (
                _key("mcp --transport http"),
                _key("vendors.toml"),
                _key("coordinator run"),
                _key("edge run"),
                _key("broker run"),
                _key("sim run config/scenarios/community.toml"),
            ):
                sandbox.stop(name)
        if command == _key("/dispatch"):
            sandbox.env["TOKEN"] = tokens["control-room"]
        if command == _key("statement"):  # a statement (and a report) needs a settlement
            _wait_for_the_agent_and_the_coordinator(sandbox, settled=True)
        if command == _key("coordinator run"):
            _start_victoria_metrics(sandbox)
        if RUN[command].background:
            service = sandbox.start(command)
            _wait_until_up(sandbox, command, service)
            if command == _key("wattmesh up mesh"):
                sandbox.stop(command)
            continue
        if command == _key("status"):
            _wait_for_the_agent_and_the_coordinator(sandbox)
        result = sandbox.run(command)
        if "api token add" in command:
            tokens[command.split("--name ")[1].split()[0]] = result.out.strip()
    sandbox.stop_all()


def _wait_until_up(sandbox: Sandbox, command: str, service: Service) -> None:
    box = sandbox.box
    if "community.toml" in command:
        service.wait_for(
            lambda: sum(" unit=" in x for x in service.out) == COMMUNITY_DEVICES,
            "a line per device",
        )
    elif "vendors.toml" in command:
        service.wait_for(lambda: any(x.startswith("huawei ") for x in service.out), "huawei")
    elif "broker run" in command:
        service.wait_for(lambda: _listening(sandbox.port("1883")), "the broker's port")
    elif "mcp" in command:
        service.wait_for(lambda: _listening(sandbox.port("8765")), "the MCP server's port")
        # "one the API does not accept gets 401"
        request = urllib.request.Request(
            f"http://127.0.0.1:{sandbox.port('8765')}/mcp",
            data=b"{}",
            method="POST",
            headers={"Authorization": "Bearer not-a-token", "Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        refused.value.close()
        assert refused.value.code == 401
    elif "coordinator run" in command:
        service.wait_for(lambda: _listening(sandbox.port("8080")), "the coordinator's API")
    elif "up mesh" in command:
        service.wait_for((box / "mesh" / "state" / "ports.json").exists, "ports.json")
        service.wait_for(
            lambda: any("5/5 sites reporting" in x for x in service.out), "a summary", timeout_s=60
        )


def _start_victoria_metrics(sandbox: Sandbox) -> None:
    """The historian's server ([historian] url): VictoriaMetrics speaks InfluxDB's write API."""
    port = sandbox.port("8086")
    process = subprocess.Popen(
        [
            "victoria-metrics",
            f"-httpListenAddr=127.0.0.1:{port}",
            f"-storageDataPath={sandbox.box / 'victoria-metrics'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    service = Service("victoria-metrics", process)
    sandbox.helpers.append(service)
    service.wait_for(lambda: _listening(port), "VictoriaMetrics")


def _wait_for_the_agent_and_the_coordinator(
    sandbox: Sandbox, *, settled: bool = False, timeout_s: float = 90.0
) -> None:
    """Until the monitor sees the coordinator's status (with a settlement if ``settled``) and
    house-1 online: the README's own status command, with --json."""
    deadline = time.monotonic() + timeout_s
    command = _key("status")
    while True:
        done = subprocess.run(
            ["bash", "-c", sandbox.shell(command) + " --json --wait 2"],
            cwd=sandbox.box,
            env=sandbox.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode == 0:
            snapshot = json.loads(done.stdout)
            coordinator = snapshot["coordinators"].get("feeder-1", {})
            online = snapshot["sites"].get("house-1", {}).get("online")
            if online and (not settled or coordinator.get("settled", 0) > 0):
                return
        assert time.monotonic() < deadline, done.stdout + done.stderr
        time.sleep(0.5)


@pytest.fixture(scope="module")
def ran() -> Iterator[dict[str, Result]]:
    """Every RUN command's result (a module fixture: they run once, in ORDER)."""
    box = Path(tempfile.mkdtemp(prefix="wattmesh-readme-"))
    box.chmod(0o755)  # Mosquitto's own user enters it when the tests run as root
    sandbox = Sandbox(box)
    try:
        _play(sandbox)
        yield sandbox.results
    finally:
        sandbox.stop_all()
        shutil.rmtree(box, ignore_errors=True)


@pytest.mark.parametrize("command", ORDER, ids=[c[:72] for c in ORDER])
def test_the_readme_command_runs_and_says_what_the_readme_says(
    ran: dict[str, Result], command: str
) -> None:
    result = ran[command]
    shown = f"$ {command}\n--- stdout\n{result.out}\n--- stderr\n{result.err}"
    assert result.code == 0, shown
    assert "Traceback" not in result.err, shown
    for pattern in RUN[command].says:
        assert re.search(pattern, result.out, re.MULTILINE), f"{pattern!r} not in\n{shown}"
    for pattern in RUN[command].err_says:
        assert re.search(pattern, result.err, re.MULTILINE), f"{pattern!r} not in\n{shown}"
