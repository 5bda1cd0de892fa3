"""The ``wattmesh`` command line."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from broker.clock import Clock, ScaledClock, WallClock
from broker.settings import ClockSettings
from drivers.errors import DriverError
from drivers.regmap import builtin_map_names, load_builtin_map, load_register_map
from drivers.transport import ModbusTransport
from simulators.scenario import ScenarioError, ScenarioRunner, load_scenario
from wattmesh import __version__, status_cli
from wattmesh import backtest as backtest_cli
from wattmesh.broker_cli import broker_app
from wattmesh.ledger_cli import ledger_app
from wattmesh.scan import ScanResult, scan_device

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
coordinator_app = typer.Typer(help="The community coordinator.", no_args_is_help=True)
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(ledger_app, name="ledger")
edge_app = typer.Typer(help="The site gateway agent.", no_args_is_help=True)
app.add_typer(edge_app, name="edge")
app.command("status")(status_cli.status)
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False,
) -> None:
    """wattmesh: edge agents, simulators and tools for a local energy community."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


def _fail(message: str, code: int = 2) -> typer.Exit:
    # Messages quote patterns like [a-z0-9]: not markup. One line per problem, never wrapped.
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _clock(settings: ClockSettings | None) -> Clock:
    """The clock a site or coordinator file (or ``dispatch --clock-file``) describes; the wall
    clock when none. ``ValueError`` naming the clock file when it cannot be used."""
    return settings.build() if settings is not None else WallClock()


def _stop_on_signals() -> asyncio.Event:
    """An event set by Ctrl-C or SIGTERM (inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


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
            "([clock] file = ... in their site file)."
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
    unit: Annotated[int, typer.Option(help="Modbus unit id.", min=0, max=247)] = 1,
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
) -> None:
    """Run a whole community on this machine: broker, devices, edge agents, coordinator.

    Starts Mosquitto with per-site credentials, every device of the community scenario as a
    real Modbus server, an edge agent per site and the coordinator, on one simulated clock
    (--speed 800: a day in under two minutes). Shows the market and the feeder live, stops
    cleanly on Ctrl-C, and reports each site's settled cost against its baseline (the same
    devices and tariffs with no trading and batteries idle), the feeder's peak, and the files
    written. Uses Mosquitto when installed (else an embedded broker); socat for the RTU meter.
    """
    from wattmesh.demo import run_demo  # noqa: PLC0415 - keeps `wattmesh --help` fast

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
    )
    if code:
        raise typer.Exit(code)


@edge_app.command("run")
def edge_run(
    site_file: Annotated[Path, typer.Argument(help="The site's TOML (see config/sites/).")],
) -> None:
    """Run the site gateway agent: poll devices, publish telemetry and bids, obey dispatch.

    Telemetry is spooled to disk while the broker is away and replayed in order; with no
    coordinator the batteries follow the local fallback controller. Stops on Ctrl-C/SIGTERM.
    """
    from edge.agent import EdgeAgent  # noqa: PLC0415 - keeps `wattmesh --help` fast
    from edge.config import load_edge_config  # noqa: PLC0415

    try:
        config = load_edge_config(site_file)
        clock = _clock(config.clock)
        password = config.broker.password()
    except ValueError as err:  # EdgeConfigError, or a clock file that cannot be used
        raise _fail(str(err)) from err

    async def run() -> None:
        stop = _stop_on_signals()
        async with EdgeAgent(config, clock, password=password):
            err_console.print(
                f"edge agent for site {config.site.id!r}: {len(config.devices)} device(s), "
                f"broker {config.broker.host}:{config.broker.port}; Ctrl-C stops.",
                highlight=False,
            )
            await stop.wait()

    asyncio.run(run())


@coordinator_app.command("run")
def coordinator_run(
    config_file: Annotated[
        Path, typer.Argument(help="Coordinator TOML (config/coordinator.toml).")
    ],
) -> None:
    """Run the coordinator: ingest, forecasts, market clearing, settlement, grid balancing.

    Clears every interval at its gate closure, publishes awards and the clearing, settles each
    interval in the ledger once its telemetry is in, and dispatches batteries when the feeder
    nears its limits. Stops on Ctrl-C/SIGTERM.
    """
    from coordinator.config import load_coordinator_config  # noqa: PLC0415
    from coordinator.service import Coordinator  # noqa: PLC0415

    try:
        config = load_coordinator_config(config_file)
        clock: Clock = config.clock.build() if config.clock else WallClock()
        password = config.broker.password()
    except ValueError as err:
        raise _fail(str(err)) from err

    async def run() -> None:
        stop = _stop_on_signals()
        async with Coordinator(config, clock, password=password) as coordinator:
            err_console.print(
                f"coordinator for feeder {coordinator.feeder!r}: broker "
                f"{config.broker.host}:{config.broker.port}, ledger "
                f"{config.coordinator.ledger}; Ctrl-C stops.",
                highlight=False,
            )
            await stop.wait()

    asyncio.run(run())


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
            help="How long: 90s, 15m, 2h, counted on the clock in use (see --clock-file). The "
            "site ends an order at the latest after its own maximum (max_duration_s in its file).",
        ),
    ] = "15m",
    emergency: Annotated[
        bool,
        typer.Option(
            "--emergency", help="An emergency order: outranks dispatch and market commitments."
        ),
    ] = False,
    host: Annotated[str, typer.Option(help="Broker host.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Broker port.")] = 1883,
    user: Annotated[str, typer.Option(help="Broker user (operator or coordinator).")] = "operator",
    password_env: Annotated[
        str, typer.Option(help="Environment variable holding the password.")
    ] = "WATTMESH_OPERATOR_PASSWORD",
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
    from broker.client import BusClient, BusSettings  # noqa: PLC0415
    from broker.messages import Dispatch, DispatchAck  # noqa: PLC0415

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

    async def send() -> DispatchAck | None:
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def handle(topic: str, payload: bytes) -> None:
            await got.put(payload)

        settings = BusSettings(
            host=host,
            port=port,
            username=user,
            password=os.environ.get(password_env),
            client_id=f"wattmesh-dispatch-{order.id[:8]}",
            session_expiry_s=0,
        )
        async with BusClient(settings, handler=handle) as bus:
            await bus.subscribe(topics.site_topic(site, "dispatch/ack"))
            await bus.wait_connected(5)
            await bus.publish(topics.site_topic(site, "dispatch"), order.model_dump_json())
            async with asyncio.timeout(wait):
                while True:
                    ack = DispatchAck.model_validate_json(await got.get())
                    if ack.command_id == order.id:
                        return ack

    try:
        ack = asyncio.run(send())
    except TimeoutError:
        raise _fail(
            f"no acknowledgement from {site} within {wait:g} s (is its agent "
            "running, and may this user publish its dispatch?)",
            1,
        ) from None
    except Exception as err:
        raise _fail(f"cannot reach the broker at {host}:{port}: {err}", 1) from err
    assert ack is not None
    print(json_module.dumps(ack.model_dump(), indent=2))
    if ack.outcome not in ("accepted", "clamped"):
        raise typer.Exit(1)


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
