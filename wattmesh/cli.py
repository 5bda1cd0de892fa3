"""The ``wattmesh`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from broker.clock import Clock, ScaledClock, WallClock
from broker.messages import Dispatch, DispatchAck, Status
from broker.settings import ClockSettings
from drivers.errors import DriverError
from drivers.regmap import builtin_map_names, load_builtin_map, load_register_map
from drivers.transport import ModbusTransport
from simulators.scenario import ScenarioError, ScenarioRunner, load_scenario
from wattmesh import __version__, api_cli, status_cli
from wattmesh import backtest as backtest_cli
from wattmesh.archive_cli import archive_app
from wattmesh.broker_cli import broker_app
from wattmesh.ledger_cli import ledger_app
from wattmesh.scan import ScanResult, scan_device
from wattmesh.service import (
    GIVE_UP_AFTER,
    JsonLogFormatter,  # noqa: F401 - re-exported (tests, other tools)
    LogFormat,
    run_service,
    service_logging,
    set_up_logging,
)
from wattmesh.service import clock_from as _clock
from wattmesh.service import describe as _describe
from wattmesh.service import password_source as _password_source
from wattmesh.service import say as _say
from wattmesh.service import serve as _serve
from wattmesh.service import stop_on_signals as _stop_on_signals
from wattmesh.service import use_log_format as _use_log_format
from wattmesh.weather import weather_app

_display_type_rich = typer.core.TyperOption.display_type_rich


def _no_type_for_flags(self: typer.core.TyperOption, ctx: Any) -> str | None:
    """A flag takes no value: show no ``<bool>`` type next to it in ``--help``."""
    return None if self.is_flag else _display_type_rich(self, ctx)


# Typer's rich help prints every option's type, flags included ("--json <bool>"), which
# reads as if the flag took a value. One place for every command (tests/test_first_hour.py).
typer.core.TyperOption.display_type_rich = _no_type_for_flags  # type: ignore[method-assign]

app = typer.Typer(
    name="wattmesh",
    help="Local energy trading and grid balancing: device simulators, Modbus drivers and tools.",
    no_args_is_help=True,
    add_completion=False,
)
sim_app = typer.Typer(
    help="Simulated devices: whole sites as real Modbus servers.", no_args_is_help=True
)
app.add_typer(sim_app, name="sim")
app.add_typer(broker_app, name="broker")
app.add_typer(weather_app, name="weather")
coordinator_app = typer.Typer(help="The community coordinator.", no_args_is_help=True)
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(ledger_app, name="ledger")
app.add_typer(archive_app, name="archive")
edge_app = typer.Typer(help="The site gateway agent.", no_args_is_help=True)
app.add_typer(edge_app, name="edge")
app.command("status")(status_cli.status)
app.add_typer(api_cli.api_app, name="api")
app.command("mcp")(api_cli.mcp)
app.command("backtest")(backtest_cli.backtest)

# Piped output gets a width that fits the report tables; a terminal keeps its own.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"wattmesh {__version__}")
        raise typer.Exit


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose",
            "-v",
            count=True,
            help="-v: wattmesh's debug lines (plans, bids, decisions); -vv: also pymodbus's "
            "protocol dumps. Services log their info lines without it.",
        ),
    ] = 0,
) -> None:
    """wattmesh: edge agents, simulators and tools for a local energy community."""
    set_up_logging(verbose)


def _fail(message: str, code: int = 2) -> typer.Exit:
    # Messages quote patterns like [a-z0-9]: not markup. One line per problem, never wrapped.
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


class DemoRegime(enum.StrEnum):
    """The demo report's settlement regime (``wattmesh.demo_report.Regime``)."""

    a = "a"
    b = "b"


LogFormatOption = Annotated[
    LogFormat,
    typer.Option(
        "--log-format",
        case_sensitive=False,
        help="text for a terminal, or json: one JSON object per line (ts, time, level, logger, "
        "message) for journald or log files; the start-up line and a final error too.",
    ),
]


GiveUpAfter = Annotated[
    int,
    typer.Option(
        "--give-up-after",
        min=0,
        help="Exit when the broker refuses the connection (bad password, not authorised) this "
        "many times in a row before the first connection; 0 keeps retrying. Later refusals "
        "are logged and retried.",
    ),
]


async def _run_until_interrupted(
    runner: ScenarioRunner, quiet: bool, clock: ScaledClock, clock_file: Path | None
) -> None:
    stop = _stop_on_signals()
    async with runner:
        if clock_file is not None:
            clock_file.parent.mkdir(parents=True, exist_ok=True)
            clock_file.write_text(json.dumps(clock.to_json()))  # noqa: ASYNC240 - tiny, once
        for dev in runner.devices:
            print(dev.line(), flush=True)
        if not quiet:
            err_console.print(
                f"{len(runner.devices)} device(s) of scenario {runner.config.name!r} running at "
                f"{runner.config.speed:g}x; Ctrl-C stops.",
                highlight=False,
            )
        await stop.wait()


@sim_app.command("run")
def sim_run(
    scenario: Annotated[Path, typer.Argument(help="Scenario TOML (see config/scenarios/).")],
    speed: Annotated[float | None, typer.Option(help="Override the scenario's speed.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override the scenario's seed.")] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only the device lines.")
    ] = False,
    clock_file: Annotated[
        Path | None,
        typer.Option(
            help="Write the simulated clock here, for edge agents to follow "
            "(\\[clock] file = ... in their site file)."
        ),
    ] = None,
    free_ports: Annotated[
        bool, typer.Option("--free-ports", help="Ignore the scenario's ports: pick free ones.")
    ] = False,
) -> None:
    """Start every device of a scenario and print `<name> <kind> <url> unit=<n>` per device.

    Runs until interrupted (Ctrl-C or SIGTERM). SunSpec devices listen on TCP; RTU devices
    are served on socat pseudo-terminal pairs, and the printed rtu:// path is the client end.
    """
    try:
        config = load_scenario(scenario)
    except ScenarioError as err:
        raise _fail(str(err)) from err
    updates: dict[str, Any] = {}
    if speed is not None:
        if speed <= 0:
            raise _fail("--speed must be positive")
        updates["speed"] = speed
    if seed is not None:
        updates["seed"] = seed
    config = config.model_copy(update=updates)
    if free_ports:
        config = config.with_free_ports()
    try:
        clock = ScaledClock(config.start_ts, config.speed)
        asyncio.run(_run_until_interrupted(ScenarioRunner(config, clock), quiet, clock, clock_file))
    except (OSError, RuntimeError) as err:
        raise _fail(f"cannot start the scenario: {err}", 1) from err


def _print_scan(result: ScanResult) -> None:
    console.print(
        f"[bold]{result.url}[/bold] unit {result.unit}: {result.description}", highlight=False
    )
    if result.models:
        table = Table("model", "name", "address", "length", title="SunSpec models")
        for m in result.models:
            table.add_row(str(m.id), m.name, str(m.address), str(m.length))
        console.print(table)
    for block, values in result.values.items():
        table = Table("point", "value", "units", title=block)
        for name, (value, units) in values.items():
            shown = (
                "—" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)
            )
            table.add_row(name, shown, units)
        console.print(table)


@app.command()
def scan(
    url: Annotated[str, typer.Argument(help="tcp://HOST:PORT or rtu:///dev/ttyX?baud=9600")],
    unit: Annotated[
        int | None,
        typer.Option(help="Modbus unit id (default: the map's, else 1).", min=0, max=247),
    ] = None,
    register_map: Annotated[
        str | None,
        typer.Option(
            "--map",
            help=f"A register map for a non-SunSpec device: a TOML file or one of "
            f"{', '.join(builtin_map_names())}.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each answer.")] = 1.0,
) -> None:
    """Discover a device and print its models and live values.

    SunSpec devices are found by their 'SunS' marker (at 40000, else 0, else 50000). A device
    that is not SunSpec is read with --map.
    """
    try:
        transport = ModbusTransport.from_url(url, timeout_s=timeout)
    except ValueError as err:
        raise _fail(str(err)) from err
    regmap = None
    if register_map is not None:
        try:
            regmap = (
                load_builtin_map(register_map)
                if register_map in builtin_map_names()
                else load_register_map(register_map)
            )
        except DriverError as err:
            raise _fail(str(err)) from err
    if unit is None:
        unit = regmap.unit_id if regmap is not None and regmap.unit_id is not None else 1

    async def run() -> ScanResult:
        async with transport:
            return await scan_device(transport, unit, regmap)

    try:
        result = asyncio.run(run())
    except DriverError as err:
        raise _fail(str(err), 1) from err
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        _print_scan(result)


@app.command()
def demo(
    hours: Annotated[float, typer.Option(help="Simulated hours to run.", min=0.1)] = 24.0,
    speed: Annotated[
        float, typer.Option(help="Simulated seconds per real second.", min=1, max=5000)
    ] = 800.0,
    sites: Annotated[
        int | None, typer.Option(help="Use only the scenario's first N sites.", min=1)
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Override the scenario's seed.")] = None,
    scenario: Annotated[
        Path | None, typer.Option(help="Scenario TOML; default: the built-in community.")
    ] = None,
    poll: Annotated[
        float, typer.Option(help="Wall seconds between an agent's polls.", min=0.05, max=5)
    ] = 0.1,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Keep the ledger, day.csv, day.png and report.json here "
            "(default: a temporary directory)."
        ),
    ] = None,
    broker: Annotated[
        str,
        typer.Option(
            help="auto (Mosquitto when installed), mosquitto, or embedded "
            "(pure Python, MQTT 3.1.1, no access control: for trying only)."
        ),
    ] = "auto",
    start: Annotated[
        str | None,
        typer.Option(
            help="Start the simulated run here instead of at the scenario's start: an ISO "
            "8601 date or time in UTC on a 15-minute boundary, e.g. 2026-12-21 (a winter "
            "Monday) or 2026-06-22T06:00Z.",
        ),
    ] = None,
    regime: Annotated[
        DemoRegime,
        typer.Option(
            help="How the report bills the community. a: one connection point (the utility "
            "bills the feeder's net at retail and feed-in; a campus, an industrial park). b: "
            "energy sharing with individual meters (each site its own supplier; energy one "
            "site exports while another imports in the same 15 minutes is shared at the "
            "mid-point of retail and feed-in plus 0.03 per kWh of network charge; the EU "
            "renewable-energy-community model).",
            case_sensitive=False,
        ),
    ] = DemoRegime.a,
    history_days: Annotated[
        float,
        typer.Option(
            help="Days (0-7) of each site's load and PV before the start that the "
            "coordinator forecasts from at the start, as a running one would (written to "
            "its history file, ledger.history.npz); 0: it starts knowing nothing.",
            min=0,
            max=7,
        ),
    ] = 7.0,
) -> None:
    """Run a whole community on this machine: broker, devices, edge agents, coordinator.

    Starts Mosquitto with per-site credentials, every device of the community scenario as a
    real Modbus server, an edge agent per site and the coordinator, on one simulated clock
    (--speed 800: a day in under two minutes). Shows the market and the feeder live, stops
    cleanly on Ctrl-C, and reports each site's settlement (as `wattmesh ledger report`) and
    the community's cost, with the energy left in batteries valued, against (i) every battery
    idle and (ii) every battery under its own site's self-consumption controller, in the same
    regime and tariffs (both run on the stepped engine over the same span), the feeder's peak
    against its limit, and the files written. Uses Mosquitto when installed (else an embedded
    broker); socat for the RTU meter.
    """
    from wattmesh.demo import DemoError, parse_start, run_demo  # noqa: PLC0415 - fast --help
    from wattmesh.demo_report import Regime  # noqa: PLC0415

    try:
        start_at = None if start is None else parse_start(start)
    except DemoError as err:
        raise _fail(str(err)) from err

    code = run_demo(
        hours=hours,
        speed=speed,
        scenario=scenario,
        seed=seed,
        console=console,
        sites=sites,
        poll_s=poll,
        out=out,
        broker=broker,
        start=start_at,
        regime=Regime(regime.value),
        history_days=history_days,
    )
    if code:
        raise typer.Exit(code)


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="The config folder to write.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
    feeders: Annotated[
        bool,
        typer.Option(
            "--feeders",
            help="Two feeders on one broker: also feeders.toml (north: solar-farm, factory, "
            "house-1; south: school, house-2) and coordinators/south.toml (south's own grid "
            "limits).",
        ),
    ] = False,
) -> None:
    """Write the community example as a config folder for `wattmesh up`.

    scenario.toml (the simulated devices), coordinator.toml and sites/<site>.toml, whose
    devices name the scenario's devices (sim = "factory-meter") instead of addresses. With
    --feeders the same community as two feeders, each with its own coordinator.
    """
    from wattmesh.up import UpError, init_folder  # noqa: PLC0415 - keeps `wattmesh --help` fast

    try:
        written = init_folder(directory, overwrite=force, feeders=feeders)
    except UpError as err:
        raise _fail(str(err)) from err
    for path in written:
        console.print(str(path), highlight=False)
    console.print(f"run it with: wattmesh up {directory}", highlight=False)


@app.command()
def up(
    directory: Annotated[
        Path,
        typer.Argument(
            help="Config folder: scenario.toml, coordinator.toml, sites/; for many feeders "
            "also feeders.toml and optionally coordinators/<id>.toml."
        ),
    ],
    state: Annotated[
        Path | None,
        typer.Option(
            help="Where the ledger, spools, broker files, credentials, clock.json and "
            "ports.json go (default: DIRECTORY/state)."
        ),
    ] = None,
    speed: Annotated[
        float | None,
        typer.Option(help="Simulated seconds per real second (default: the scenario's).", min=1),
    ] = None,
    fixed_ports: Annotated[
        bool,
        typer.Option(
            "--fixed-ports",
            help="Use the scenario's device ports, the coordinator file's broker port (many "
            "feeders: feeders.toml's ports) and the default HTTP ports (\\[api], \\[metrics], "
            "\\[proxy]) instead of free ones. Without it, only a port a file names is kept.",
        ),
    ] = False,
    embedded: Annotated[
        bool,
        typer.Option(
            "--embedded-broker",
            help="The pure-Python broker (MQTT 3.1.1, no access control) instead of Mosquitto.",
        ),
    ] = False,
    summary_every: Annotated[
        float, typer.Option(help="Wall seconds between summary lines.", min=0.1)
    ] = 10.0,
    history_days: Annotated[
        float,
        typer.Option(
            help="On a fresh state (no history file yet), days (0-7) of the sites' simulated "
            "load and PV, and the simulated weather service's runs, before the start that each "
            "coordinator forecasts from, as a running one does (0: from nothing).",
            min=0.0,
            max=7.0,
        ),
    ] = 7.0,
) -> None:
    """Run a whole local stack from a config folder: broker, simulators, agents, coordinator.

    Starts Mosquitto with generated credentials, every device of scenario.toml as a real
    Modbus server, an edge agent per site file and the coordinator, in one process on the
    scenario's clock. Ports are free ones; STATE/ports.json says where everything listens and
    STATE/broker/credentials.toml holds the passwords (operator for `wattmesh dispatch`).
    Prints a line per component, then a summary now and then; Ctrl-C or SIGTERM stops it all.
    `wattmesh init DIR` writes an example folder.

    Many feeders: with DIR/feeders.toml (the format of `wattmesh broker init --feeders`: each
    feeder's id, port and sites) one Mosquitto serves every feeder on its own listener (mount
    point feeder/<id>/), and each feeder has its own coordinator (coordinator.toml, with
    coordinators/<id>.toml merged over it if present; ledger STATE/ledger-<id>.sqlite). Every
    site file's site must be in exactly one feeder. `wattmesh status --broker-dir
    STATE/broker` shows every feeder. `wattmesh init DIR --feeders` writes an example.
    """
    from wattmesh.up import UpError, load_stack_config, run_up  # noqa: PLC0415

    try:
        config = load_stack_config(directory)
    except UpError as err:
        raise _fail(str(err)) from err
    state_dir = (state or directory / "state").absolute()

    def say(line: str) -> None:
        console.print(line, highlight=False, soft_wrap=True, markup=False)

    try:
        asyncio.run(
            run_up(
                config,
                state_dir,
                speed=speed,
                embedded=embedded,
                fixed_ports=fixed_ports,
                summary_every_s=summary_every,
                history_days=history_days,
                say=say,
            )
        )
    except Exception as err:  # told in words: no TaskGroup wrapper, no traceback
        logging.getLogger("wattmesh").debug("up failed", exc_info=err)
        raise _fail(f"wattmesh up: {_describe(err)}", 1) from err


@edge_app.command("run")
def edge_run(
    site_file: Annotated[Path, typer.Argument(help="The site's TOML (see config/sites/).")],
    give_up_after: GiveUpAfter = GIVE_UP_AFTER,
    log_format: LogFormatOption = LogFormat.text,
) -> None:
    """Run the site gateway agent: poll devices, publish telemetry and bids, obey dispatch.

    Telemetry is spooled to disk while the broker is away and replayed in order; with no
    coordinator the batteries follow the local fallback controller. Stops on Ctrl-C/SIGTERM.

    Environment: the broker password is read from the variable the site file's \\[broker]
    password_env names (WATTMESH_MQTT_PASSWORD in the example site files), unless
    password_file is given. The site's password is in the broker's credentials.toml.
    """
    from wattmesh.edge_service import run_edge  # noqa: PLC0415 - keeps `wattmesh --help` fast

    code = run_edge(site_file, give_up_after, log_format)
    if code:
        raise typer.Exit(code)


@coordinator_app.command("run")
def coordinator_run(
    config_file: Annotated[
        Path, typer.Argument(help="Coordinator TOML (config/coordinator.toml).")
    ],
    give_up_after: GiveUpAfter = GIVE_UP_AFTER,
    log_format: LogFormatOption = LogFormat.text,
    standby: Annotated[
        bool,
        typer.Option(
            "--standby",
            help="Share the feeder with other coordinators on the same PostgreSQL ledger "
            "(\\[coordinator] ledger_url): run while holding the feeder's lease, stand by "
            "otherwise, and take over within a second when the active one dies.",
        ),
    ] = False,
) -> None:
    """Run the coordinator: ingest, forecasts, market clearing, settlement, grid balancing.

    Clears every interval at its gate closure, publishes awards and the clearing, settles each
    interval in the ledger once its telemetry is in, and dispatches batteries when the feeder
    nears its limits. Stops on Ctrl-C/SIGTERM.

    Environment: the broker password is read from the variable the file's \\[broker]
    password_env names (WATTMESH_COORDINATOR_PASSWORD in config/coordinator.toml), unless
    password_file is given; with \\[coordinator] ingest_workers, the ingest users' password
    from the one ingest_password_env names (WATTMESH_INGEST_PASSWORD); with a \\[historian]
    section, the InfluxDB token from the variable its token_env names (default
    WATTMESH_INFLUX_TOKEN).
    """
    from coordinator.config import load_coordinator_config  # noqa: PLC0415
    from coordinator.service import Coordinator  # noqa: PLC0415

    try:
        config = load_coordinator_config(config_file)
        clock: Clock = config.clock.build() if config.clock else WallClock()
        password = config.broker.password()
        if config.coordinator.ingest_workers:
            config.broker.ingest_password()  # set? (the workers read it when they start)
    except ValueError as err:
        raise _fail(str(err)) from err

    ledger = config.coordinator.ledger_url or config.coordinator.ledger

    async def run() -> str | None:
        stop = _stop_on_signals()
        if standby:
            from coordinator.standby import StandbyError, serve  # noqa: PLC0415

            _say(
                f"coordinator for feeder {config.coordinator.feeder!r} as a standby: broker "
                f"{config.broker.host}:{config.broker.port}, ledger {ledger}; Ctrl-C stops.",
                log_format,
            )
            try:
                await serve(config, clock, stop, password=password)
            except StandbyError as err:
                return str(err)
            return None
        async with Coordinator(config, clock, password=password) as coordinator:
            _say(
                f"coordinator for feeder {coordinator.feeder!r}: broker "
                f"{config.broker.host}:{config.broker.port}, ledger {ledger}; Ctrl-C stops.",
                log_format,
            )
            return await _serve(
                coordinator.bus, stop, give_up_after, _password_source(config.broker)
            )

    service_logging()
    _use_log_format(log_format)
    code = run_service(run, log_format)
    if code:
        raise typer.Exit(code)


def _duration_s(text: str) -> float:
    """'90s', '15m', '2h' or plain seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    try:
        scale = units.get(text[-1:], 1.0)
        value = float(text[:-1] if text[-1:] in units else text) * scale
    except ValueError as err:
        raise typer.BadParameter(f"{text!r} is not a duration like 90s, 15m or 2h") from err
    if not 0 < value <= 86400:
        raise typer.BadParameter("a dispatch lasts more than 0 s and at most 24 h")
    return value


@app.command()
def dispatch(
    site: Annotated[str, typer.Argument(help="The site to command.")],
    battery_w: Annotated[
        float | None,
        typer.Option(
            "--battery-w", help="Battery setpoint, W: positive discharges, negative charges."
        ),
    ] = None,
    load_limit_w: Annotated[
        float | None, typer.Option("--load-limit-w", help="Cap the site's import at this many W.")
    ] = None,
    duration: Annotated[
        str,
        typer.Option(
            "--for",
            help="How long: 90s, 15m, 2h. Counted in simulated time with --clock-file (15m is "
            "15 simulated minutes, a few wall seconds at high speed), else in wall-clock time. "
            "The site ends an order at the latest after its own maximum (max_duration_s in its "
            "file).",
        ),
    ] = "15m",
    emergency: Annotated[
        bool,
        typer.Option(
            "--emergency", help="An emergency order: outranks dispatch and market commitments."
        ),
    ] = False,
    host: Annotated[
        str | None, typer.Option(help="Broker host (default: --broker-dir's, else 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Broker port (default: --broker-dir's, else 1883).")
    ] = None,
    user: Annotated[str, typer.Option(help="Broker user (operator or coordinator).")] = "operator",
    password_env: Annotated[
        str,
        typer.Option(
            help="Environment variable holding the password (the operator's is in the broker's "
            "credentials.toml); when it is not set, --broker-dir's credentials.toml gives it."
        ),
    ] = "WATTMESH_OPERATOR_PASSWORD",
    broker_dir: Annotated[
        Path | None,
        typer.Option(
            help="The broker's directory (`wattmesh broker init DIR`, or STATE/broker of "
            "`wattmesh up`). Its credentials.toml gives the host, port and password not "
            "given otherwise, and the sites the broker is configured for: a site it does not "
            "know is refused before sending, and a known site without a status is an agent "
            "that never started.",
        ),
    ] = None,
    wait: Annotated[
        float, typer.Option(help="Seconds (real time) to wait for the site's acknowledgement.")
    ] = 10.0,
    clock_file: Annotated[
        Path | None,
        typer.Option(
            help="Stamp the order on the simulated clock that `wattmesh sim run --clock-file` "
            "writes and the agents follow (clock.file in their site files); without "
            "it, wall time. A site refuses an order stamped far from its own clock.",
        ),
    ] = None,
) -> None:
    """Send an operator's dispatch command to a site and print its acknowledgement.

    The command is stamped now and expires after --for, both on the clock in use: the wall
    clock, or the simulated clock of --clock-file. The site judges it on its own clock, ends it
    at the latest after its maximum duration, and returns to its market commitment or its
    local controller by itself then. Exit code 0 when accepted or clamped, 1 otherwise.
    """
    import json as json_module  # noqa: PLC0415

    from broker import topics  # noqa: PLC0415

    if battery_w is None and load_limit_w is None:
        raise _fail("give --battery-w and/or --load-limit-w")
    try:
        topics.check_id(site)
    except ValueError as err:
        raise _fail(str(err)) from err
    seconds = _duration_s(duration)
    try:
        clock = _clock(ClockSettings(file=clock_file) if clock_file is not None else None)
    except ValueError as err:
        raise _fail(str(err)) from err
    now = clock.now()
    try:
        order = Dispatch(
            ts=now,
            battery_power_w=battery_w,
            load_limit_w=load_limit_w,
            expires_ts=now + seconds,
            priority="emergency" if emergency else "dispatch",
            reason=f"manual dispatch by {user}",
        )
    except ValueError as err:
        raise _fail(str(err)) from err

    to = _dispatch_target(site, host, port, user, password_env, broker_dir)
    host, port = to.host, to.port
    try:
        ack, last_status = asyncio.run(
            _send_dispatch(host, port, user, to.password, site, order, wait)
        )
    except _DispatchFailed as err:
        raise _fail(_dispatch_failure(err, host, port, user, to.password_from), 1) from None
    if ack is None:
        raise _fail(_no_ack(site, wait, user, last_status, to.configured), 1)
    print(json_module.dumps(ack.model_dump(), indent=2))
    note = _ACK_NOTES[ack.outcome].format(site=site, detail=ack.detail or "no detail given")
    if ack.outcome == "refused" and clock_file is None and "clock" in ack.detail:
        note += " (against a simulation, give its --clock-file)"
    if ack.outcome not in ("accepted", "clamped"):
        raise _fail(note, 1)
    if ack.outcome == "clamped":
        err_console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)


class _Target(typing.NamedTuple):
    """Where and as whom ``wattmesh dispatch`` connects, and what the broker is configured for."""

    host: str
    port: int
    password: str | None
    password_from: str  # ``$VAR`` or the credentials file, for messages
    configured: tuple[str, ...] | None  # the broker's sites, when its files were read


def _dispatch_target(
    site: str,
    host: str | None,
    port: int | None,
    user: str,
    password_env: str,
    broker_dir: Path | None,
) -> _Target:
    """The options, completed from ``broker_dir``'s credentials.toml when given.

    Exits (code 1, nothing sent) when the broker's configuration does not know ``site``.
    """
    password = os.environ.get(password_env)
    password_from = f"${password_env}"
    if broker_dir is None:
        return _Target(host or "127.0.0.1", port or 1883, password, password_from, None)
    from broker.errors import BrokerConfigError  # noqa: PLC0415
    from broker.mosquitto import load_broker_files  # noqa: PLC0415

    try:
        files = load_broker_files(broker_dir)
    except BrokerConfigError as err:
        raise _fail(str(err)) from err
    if site not in files.sites:
        raise _fail(
            f"site {site!r} is unknown to the broker's configuration ({files.credentials_file} "
            f"names {', '.join(files.sites) or 'no site'}); nothing was sent",
            1,
        )
    if password is None and user in files.credentials:
        password = files.credentials[user]
        password_from = f"the password in {files.credentials_file}"
    return _Target(
        host or files.connect_host, port or files.port, password, password_from, files.sites
    )


#: What each acknowledgement means, one line each ({site}, {detail}).
_ACK_NOTES: dict[str, str] = {
    "accepted": "{site} accepted the order",
    "clamped": "{site} accepted the order with changes: {detail}",
    "refused": "{site} refused the order: {detail}",
    "expired": "{site} judged the order expired on its own clock: {detail}",
    "duplicate": "{site} had already handled an order with this id",
    "invalid": "{site} could not read the order: {detail}",
}


class _DispatchFailed(Exception):
    """The broker part of ``wattmesh dispatch`` failed: ``kind`` says how."""

    def __init__(self, kind: str, detail: str, code: int | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.code = code  # the broker's CONNACK reason code, for a refusal


async def _send_dispatch(
    host: str,
    port: int,
    user: str,
    password: str | None,
    site: str,
    order: Dispatch,
    wait_s: float,
) -> tuple[DispatchAck | None, Status | None]:
    """Publish ``order`` to ``site`` and wait ``wait_s`` for its acknowledgement.

    One connection, no retries: returns the acknowledgement (None if none came) and the site's
    retained status if the broker holds one; :class:`_DispatchFailed` when the broker cannot
    be reached (``unreachable``), refuses the connection (``refused``) or drops it (``lost``).
    """
    import aiomqtt  # noqa: PLC0415 - keeps `wattmesh --help` fast

    from broker import topics  # noqa: PLC0415
    from broker.client import SOCKET_OPTIONS, refusal_code, refusal_reason  # noqa: PLC0415

    client = aiomqtt.Client(
        host,
        port,
        username=user,
        password=password,
        identifier=f"wattmesh-dispatch-{order.id[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        timeout=min(10.0, max(wait_s, 1.0)),
        socket_options=SOCKET_OPTIONS,  # TCP_NODELAY: no 40 ms stall on the ack
    )
    status_topic = topics.site_topic(site, "status")
    ack_topic = topics.site_topic(site, "dispatch/ack")
    status: Status | None = None
    connected = False
    try:
        async with client:
            connected = True
            await client.subscribe(ack_topic, qos=1)
            await client.subscribe(status_topic, qos=1)
            await client.publish(
                topics.site_topic(site, "dispatch"), order.model_dump_json(), qos=1
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    async for message in client.messages:
                        payload = message.payload
                        if not isinstance(payload, bytes):
                            continue
                        try:
                            if str(message.topic) == status_topic:
                                status = Status.model_validate_json(payload)
                                continue
                            ack = DispatchAck.model_validate_json(payload)
                        except ValueError:
                            continue
                        if ack.command_id == order.id:
                            return ack, status
    except aiomqtt.MqttError as err:
        if (code := refusal_code(err)) is not None:
            raise _DispatchFailed("refused", refusal_reason(err), code) from err
        raise _DispatchFailed("lost" if connected else "unreachable", str(err)) from err
    return None, status


def _dispatch_failure(
    err: _DispatchFailed, host: str, port: int, user: str, password_from: str
) -> str:
    """One line for a broker failure; ``password_from`` is ``$VAR`` or where the file was."""
    from broker.client import CREDENTIAL_REFUSALS  # noqa: PLC0415

    where = f"the broker at {host}:{port}"
    if err.kind == "unreachable":
        return f"cannot reach {where}: {err.detail} (is it running, on this host and port?)"
    if err.kind == "lost":
        return f"lost {where} before the site answered: {err.detail}"
    if err.code in CREDENTIAL_REFUSALS:
        unset = password_from.startswith("$") and os.environ.get(password_from[1:]) is None
        given = f"{password_from} is not set" if unset else f"check {password_from}"
        return (
            f"{where} refused user {user!r}: {err.detail}; {given} (each user's password is in "
            "the broker's credentials.toml)"
        )
    return f"{where} refused the connection: {err.detail}"


def _no_ack(
    site: str, wait_s: float, user: str, status: Status | None, configured: tuple[str, ...] | None
) -> str:
    """Why no acknowledgement came; ``configured``: the broker's sites, if its files were read.

    The site's retained status can come only from the site's own credentials (the broker's
    ACL), and ``configured`` from the broker's own files: neither is unauthenticated input.
    """
    head = f"no acknowledgement from {site} within {wait_s:g} s"
    if status is None and configured is not None:
        return (
            f"{head}: its agent never started (the broker is configured for {site!r} but holds "
            "no status from its agent); start it and retry"
        )
    if status is None:
        return (
            f"{head}: the broker has no status from an agent for {site!r}: its agent never "
            "started, or the broker is not configured for the site (--broker-dir tells which)"
        )
    if not status.online:
        return f"{head}: its agent is offline (its last status says so); start it and retry"
    return (
        f"{head}: its agent is online but did not answer (may {user!r} publish dispatch "
        "orders? is it busy or on another clock?)"
    )


@app.command()
def schema(
    directory: Annotated[Path, typer.Argument(help="Where to write the JSON Schemas.")],
) -> None:
    """Write the JSON Schema of every bus message (one file per topic kind)."""
    from broker.messages import write_schemas  # noqa: PLC0415

    for path in write_schemas(directory):
        console.print(str(path), highlight=False)


def main() -> None:
    """Entry point of the ``wattmesh`` console script."""
    app()
