"""``wattmesh demo``: a whole community trading energy on one machine.

A Mosquitto broker with per-site credentials and ACL, every device of the community scenario
as a real Modbus server (TCP, and RTU over a socat pair for the factory's SDM630), an edge
agent per site, and the coordinator with its ledger, all on one scaled clock: the stack of
``wattmesh up`` (``wattmesh.up.LocalStack``) with the demo's roles and tariffs. A live view
shows the market and the feeder; the report (:mod:`wattmesh.demo_report`) gives the ledger's
settlement and compares the run's cost, stored energy valued, with (i) every battery idle and
(ii) every battery under its own site's controller, in the chosen settlement regime.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import shutil
import signal
import tempfile
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from broker.clock import ScaledClock
from broker.errors import BrokerError
from broker.mosquitto import find_mosquitto
from coordinator.config import CoordinatorConfig, parse_coordinator_config
from coordinator.history_store import write_histories
from coordinator.ledger import Ledger
from coordinator.service import Coordinator
from edge.config import parse_edge_config
from simulators.scenario import (
    BatteryConfig,
    PvConfig,
    ScenarioConfig,
    ScenarioError,
    load_scenario,
    parse_scenario,
)
from wattmesh.backtest import DEFAULT_HISTORY_DAYS, scenario_history, scenario_weather
from wattmesh.demo_report import REGIME_NAMES, Regime, plot, print_report, report_json
from wattmesh.demo_report import build as build_report
from wattmesh.up import LocalStack, StackConfig
from wattmesh.up import rtu_over_tcp as _rtu_over_tcp

#: Each site's part in the market; others are prosumers.
ROLES = {"solar-farm": "producer", "factory": "consumer", "house-2": "consumer"}
#: Sites that keep their battery for peak shaving rather than offering it to the market.
FALLBACK = {"factory": {"import_cap_w": 150_000.0, "reserve_soc_pct": 100.0}}
#: The feeder and the tariffs (config/coordinator.toml has the same).
COORDINATOR: dict[str, dict[str, Any]] = {
    "tariff": {
        "retail_per_kwh": 0.22,
        "feed_in_per_kwh": 0.08,
        "periods": [{"start_h": 7, "end_h": 22, "retail_per_kwh": 0.32, "feed_in_per_kwh": 0.08}],
    },
    # The feeder reservation plans the sites' batteries to keep the feeder at 99.5 % of its
    # limit (149.25 kW of import), or at the lowest level they can hold when they cannot hold
    # that; the live grid loop is the backstop for forecast errors: it dispatches batteries
    # once the feeder reaches the limit, relieves it to that level and hands back below 92 %.
    "grid": {
        "import_limit_w": 150_000.0,
        "export_limit_w": 220_000.0,
        "act_at_pct": 100.0,
        "target_pct": 99.5,
        "release_pct": 92.0,
    },
}


class DemoError(ValueError):
    """The demo cannot run as asked (a bad option)."""


def parse_start(text: str, interval_s: float = 900.0) -> datetime:
    """``--start``: an ISO 8601 date or time (``2026-12-21``, ``2026-12-21T06:00Z``; naive
    means UTC) on a market interval's boundary."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise DemoError(
            f"--start {text!r} is not an ISO 8601 date or time like 2026-12-21 or 2026-12-21T06:00Z"
        ) from None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    if when.timestamp() % interval_s:
        raise DemoError(
            f"--start {text!r} is not on a {interval_s / 60:g}-minute boundary (the market "
            "interval): give e.g. 06:00 or 06:15"
        )
    return when.astimezone(UTC)


def builtin_scenario() -> ScenarioConfig:
    """The community scenario shipped with wattmesh, on free ports."""
    text = (resources.files("simulators") / "scenarios" / "community.toml").read_text()
    return parse_scenario(tomllib.loads(text), "builtin:community.toml").with_free_ports()


@dataclass
class Run:
    """What the demo measured while it ran."""

    end_ts: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    feeder_peak_w: float = 0.0
    interrupted: bool = False


def declared_sites(scenario: ScenarioConfig) -> dict[str, dict[str, float]]:
    """Each simulated site's limits as its operator would declare them (W): the connection
    carries the peak load with the batteries charging, or the PV with the batteries
    discharging, whichever is larger; PV and battery ratings from the devices."""
    declared: dict[str, dict[str, float]] = {}
    for site in scenario.sites:
        pv_w = sum(d.rated_ac_w for d in site.devices if isinstance(d, PvConfig))
        battery_w = sum(d.rated_power_w for d in site.devices if isinstance(d, BatteryConfig))
        load_w = site.load.peak_w if site.load is not None else 0.0
        connection_w = max(load_w + battery_w, pv_w + battery_w, 1000.0)
        entry: dict[str, float] = {"connection_w": connection_w}
        if pv_w > 0:
            entry["pv_w"] = pv_w
        if battery_w > 0:
            entry["battery_w"] = battery_w
        declared[site.id] = entry
    return declared


def seed_history(scenario: ScenarioConfig, out: Path, days: float) -> Path:
    """Write the coordinator's history file in ``out`` (where :func:`_coordinator_config`'s
    ledger puts it): ``days`` of the sites' load and PV before the start, from the
    simulators' physics (as the stepped engine's warm-up), and the simulated weather
    service's runs issued over those days (as the engine issues them); with ``days`` 0 the
    last run's file is removed, so the coordinator starts from nothing."""
    path = out / "ledger.history.npz"
    path.unlink(missing_ok=True)
    if days > 0:
        start = scenario.start_ts
        write_histories(
            path,
            scenario_history(scenario, start, days),
            scenario_weather(scenario, start, days),
        )
    return path


def _coordinator_config(
    scenario: ScenarioConfig,
    out: Path,
    port: int,
    poll_s: float,
    speed: float,
    *,
    weather: bool = True,
) -> CoordinatorConfig:
    """The demo's coordinator; ``weather`` False: without the simulated weather service."""
    return parse_coordinator_config(
        {
            "coordinator": {
                "latitude_deg": scenario.latitude_deg,
                "longitude_deg": scenario.longitude_deg,
                "utc_offset_h": scenario.utc_offset_h,
                "ledger": str(out / "ledger.sqlite"),
            },
            "broker": {"port": port, "password_env": None},
            "market": {"settle_delay_s": max(120, int(4 * poll_s * speed))},
            "grid": {
                **COORDINATOR["grid"],
                "period_s": max(0.02, poll_s / 2),
                "dispatch_expiry_s": max(300, int(6 * poll_s * speed)),
                "reissue_s": max(60, int(poll_s * speed)),
            },
            "tariff": COORDINATOR["tariff"],
            "sites": declared_sites(scenario),
            "weather": {"enabled": weather},
        },
        "demo",
    )


@dataclass(frozen=True)
class SiteLine:
    """One site's row in the live view: W and %, None when the site has no such device."""

    name: str
    grid_w: float | None
    pv_w: float | None
    battery_w: float | None
    soc_pct: float | None


def live_view(
    now_ts: float,
    progress: float,
    market: str,
    feeder: str,
    sites: list[SiteLine],
) -> Group:
    """The live view, within 80 columns: time and progress, market, feeder, a row per site."""
    when = datetime.fromtimestamp(now_ts, UTC).strftime("%a %H:%M UTC")
    top = Table.grid(padding=(0, 1))
    top.add_column(no_wrap=True)
    top.add_column(no_wrap=True)
    top.add_column(no_wrap=True, justify="right")
    top.add_row(
        f"[bold]{when}[/bold]",
        ProgressBar(total=1.0, completed=min(1.0, max(0.0, progress)), width=40),
        f"{100 * min(1.0, max(0.0, progress)):3.0f} %",
    )
    table = Table(box=None, padding=(0, 1), pad_edge=False)
    table.add_column("site", no_wrap=True, min_width=10)
    for col in ("grid kW", "PV kW", "battery kW", "SOC %"):
        table.add_column(col, justify="right", no_wrap=True)
    for s in sites:
        table.add_row(
            s.name,
            "—" if s.grid_w is None else f"{s.grid_w / 1000:+.1f}",
            "—" if s.pv_w is None else f"{s.pv_w / 1000:.1f}",
            "—" if s.battery_w is None else f"{s.battery_w / 1000:+.1f}",
            "—" if s.soc_pct is None else f"{s.soc_pct:.0f}",
        )
    return Group(top, Text(market, overflow="fold"), Text(feeder, overflow="fold"), table)


def _view(coordinator: Coordinator, start_ts: float, end_ts: float, limit_w: float) -> Group:
    now = coordinator.clock.now()
    clearing = coordinator.last_clearing
    market = (
        f"market: price {clearing.price_per_kwh:.3f}/kWh, traded {clearing.volume_kwh:.1f} kWh"
        if clearing
        else "market: no clearing yet"
    )
    feeder = (
        f"feeder: {coordinator.flow_w / 1000:+.1f} kW of {limit_w / 1000:.0f} kW "
        f"({coordinator.mode})"
    )
    sites = [
        SiteLine(name, t.grid_power_w, t.pv_power_w, t.battery_power_w, t.battery_soc_pct)
        for name, s in sorted(coordinator.sites.items())
        if (t := s.latest) is not None
    ]
    return live_view(now, (now - start_ts) / (end_ts - start_ts), market, feeder, sites)


def demo_stack_config(
    scenario: ScenarioConfig, out: Path, poll_s: float, speed: float, *, weather: bool = True
) -> StackConfig:
    """The demo's stack: the scenario's sites with the demo's roles and fallbacks, every
    device by its scenario name, and the demo's coordinator (``COORDINATOR``)."""
    sites = []
    for site in scenario.sites:
        devices = [
            {"name": d.name, "kind": d.kind, "sim": d.name, "unit": d.unit, "timeout_s": 0.5}
            for d in site.devices
        ]
        sites.append(
            parse_edge_config(
                {
                    "site": {
                        "id": site.id,
                        "role": ROLES.get(site.id, "prosumer"),
                        "poll_interval_s": poll_s,
                    },
                    "devices": devices,
                    "dispatch_revert_s": max(60, int(6 * poll_s * speed)),
                    **({"fallback": FALLBACK[site.id]} if site.id in FALLBACK else {}),
                },
                "demo",
            )
        )
    coordinator = _coordinator_config(scenario, out, 1883, poll_s, speed, weather=weather)
    return StackConfig(scenario, coordinator, tuple(sites))


async def _run(
    scenario: ScenarioConfig,
    hours: float,
    speed: float,
    poll_s: float,
    out: Path,
    console: Console,
    embedded: bool,
    *,
    weather: bool = True,
) -> Run:
    clock = ScaledClock(scenario.start_ts, speed)
    end_ts = scenario.start_ts + hours * 3600.0
    run = Run(end_ts)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)  # Ctrl-C: stop, clean up, report
    config = demo_stack_config(scenario, out, poll_s, speed, weather=weather)
    # The broker's files go to a temporary directory Mosquitto's own user can reach.
    stack = LocalStack(config, out, clock, embedded=embedded, broker_in_state=False)
    async with stack:
        coord = stack.coordinator
        assert coord is not None
        await _watch(scenario, coord, clock, run, stop, poll_s, hours, console)
        # Settle what ended before the end (its telemetry is in: the watch ran a few polls
        # past it) while the coordinator's ledger is still open.
        for interval in sorted(coord.cleared):
            if (interval + 1) * coord.config.market.interval_s <= run.end_ts:
                coord.settle(interval)
    return run


async def _watch(
    scenario: ScenarioConfig,
    coord: Coordinator,
    clock: ScaledClock,
    run: Run,
    stop: asyncio.Event,
    poll_s: float,
    hours: float,
    console: Console,
) -> None:
    """Sample and show the running community until its end or ``stop``."""
    end_ts = run.end_ts
    limit = coord.config.grid.import_limit_w
    with Live(console=console, auto_refresh=False, transient=False) as live:
        next_hour = scenario.start_ts
        while (now := clock.now()) < end_ts and not stop.is_set():
            _sample(coord, now, run)
            if console.is_terminal:
                live.update(_view(coord, scenario.start_ts, end_ts, limit), refresh=True)
            elif now >= next_hour:
                console.print(
                    f"simulated {(now - scenario.start_ts) / 3600:4.1f} h of "
                    f"{hours:g} h, feeder {coord.flow_w / 1000:+.1f} kW",
                    highlight=False,
                )
                next_hour += 3600.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    stop.wait(),
                    min(0.5, max(0.05, (clock.sim_to_wall_s(end_ts - clock.now())))),
                )
        if not stop.is_set():
            # A few more polls so the last interval's telemetry reaches its end.
            await asyncio.sleep(3 * poll_s)
        if stop.is_set():
            run.interrupted, run.end_ts = True, clock.now()
            console.print("interrupted: stopping cleanly and reporting what ran", highlight=False)


def _sample(coord: Coordinator, now: float, run: Run) -> None:
    """One row per reporting site; ``feeder_w`` is the sum of these rows' ``grid_w`` (the
    coordinator's own estimate, which holds each site's reading to its own time, is
    ``coordinator_flow_w``)."""
    run.feeder_peak_w = max(run.feeder_peak_w, coord.flow_w)
    clearing = coord.last_clearing
    latest = [(name, s.latest) for name, s in coord.sites.items() if s.latest is not None]
    feeder_w = round(sum(t.grid_power_w or 0.0 for _, t in latest if t is not None), 1)
    for name, t in latest:
        assert t is not None
        run.rows.append(
            {
                "ts": round(now, 1),
                "site": name,
                "grid_w": t.grid_power_w,
                "pv_w": t.pv_power_w,
                "load_w": t.load_power_w,
                "battery_w": t.battery_power_w,
                "soc_pct": t.battery_soc_pct,
                "feeder_w": feeder_w,
                "coordinator_flow_w": round(coord.flow_w, 1),
                "price_per_kwh": clearing.price_per_kwh if clearing else None,
            }
        )


def run_demo(
    *,
    hours: float,
    speed: float,
    scenario: Path | None,
    seed: int | None,
    console: Console,
    sites: int | None = None,
    poll_s: float = 0.1,
    out: Path | None = None,
    broker: str = "auto",
    start: datetime | None = None,
    regime: Regime = Regime.a,
    history_days: float = DEFAULT_HISTORY_DAYS,
) -> int:
    """Run the demo; returns the process exit code.

    ``broker``: "mosquitto", "embedded" (amqtt, MQTT 3.1.1, no ACL) or "auto" (Mosquitto
    when installed). ``start`` replaces the scenario's start (UTC, on a market interval's
    boundary: :func:`parse_start`); ``regime`` is how the report bills the community;
    ``history_days`` (0-7) of the sites' load and PV before the start are the coordinator's
    forecasting history at the start, as a coordinator that had been running would have.
    """
    try:
        config = builtin_scenario() if scenario is None else load_scenario(scenario)
    except ScenarioError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 2
    if start is not None:
        config = config.model_copy(update={"start": start})
    if seed is not None:
        config = config.model_copy(update={"seed": seed})
    if sites is not None:
        config = config.model_copy(update={"sites": config.sites[:sites]})
    embedded = broker == "embedded"
    if broker == "auto":
        try:
            find_mosquitto()
        except BrokerError:
            embedded = True
            console.print(
                "Mosquitto is not installed: using the embedded broker (MQTT 3.1.1, "
                "no access control; apt-get install mosquitto for the real one)",
                highlight=False,
            )
    if shutil.which("socat") is None:
        config, moved = _rtu_over_tcp(config)
        if moved:
            console.print(
                f"socat is not installed: serving {', '.join(moved)} over TCP "
                "instead of RTU (apt-get install socat for the serial wire)",
                highlight=False,
            )
    if not 0 <= history_days <= 7:
        console.print(f"[red]error:[/red] history days must be within 0-7, got {history_days}")
        return 2
    args = (config, hours, speed, poll_s, console, embedded, regime, history_days)
    if out is not None:
        return _demo_in(out, True, *args)
    with tempfile.TemporaryDirectory(prefix="wattmesh-demo-") as tmp:
        return _demo_in(Path(tmp), False, *args)


def _demo_in(
    out: Path,
    keep: bool,
    config: ScenarioConfig,
    hours: float,
    speed: float,
    poll_s: float,
    console: Console,
    embedded: bool,
    regime: Regime = Regime.a,
    history_days: float = DEFAULT_HISTORY_DAYS,
) -> int:
    """Run the demo with its state in ``out``; the files are written only if ``keep``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "ledger.sqlite").unlink(missing_ok=True)
    seed_history(config, out, history_days)
    start = datetime.fromtimestamp(config.start_ts, UTC).strftime("%a %Y-%m-%d %H:%M UTC")
    console.print(
        f"wattmesh demo: {len(config.sites)} sites from {start}, {hours:g} simulated hours at "
        f"{speed:g}x, regime ({regime.value}) {REGIME_NAMES[regime]}; "
        + (f"writing to {out}" if keep else "--out DIR keeps its files"),
        highlight=False,
    )
    run = asyncio.run(_run(config, hours, speed, poll_s, out, console, embedded))
    coordinator_config = _coordinator_config(config, out, 1, poll_s, speed)
    with Ledger(out / "ledger.sqlite") as ledger:
        settled = len(ledger.settled_intervals())
    if not settled:
        interval_min = coordinator_config.market.interval_s / 60.0
        console.print(
            f"no interval was settled in {hours:g} simulated hours: an interval settles a few "
            f"minutes after its end ({interval_min:g}-minute intervals); run longer with "
            "--hours to get a report",
            highlight=False,
        )
        return 1
    console.print(
        "running the baselines (i) idle and (ii) local on the stepped engine", highlight=False
    )
    ledger_report, comparison = build_report(
        out / "ledger.sqlite", config, run.rows, coordinator_config, regime
    )
    interval_s = float(coordinator_config.market.interval_s)
    print_report(console, ledger_report, comparison, interval_s, run.feeder_peak_w)
    if keep:
        _write_csv(out / "day.csv", run)
        report = report_json(ledger_report, comparison, run.feeder_peak_w)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        png = plot(
            out / "day.png",
            run.rows,
            comparison,
            coordinator_config,
            f"wattmesh demo: {config.name}, {len(config.sites)} sites, from {start}; "
            f"regime ({regime.value})",
        )
        console.print(
            f"files: {out / 'ledger.sqlite'}, {out / 'day.csv'}, {png}, {out / 'report.json'}",
            highlight=False,
        )
    return 0


def _write_csv(path: Path, run: Run) -> None:
    columns = [
        "ts",
        "site",
        "grid_w",
        "pv_w",
        "load_w",
        "battery_w",
        "soc_pct",
        "feeder_w",
        "coordinator_flow_w",
        "price_per_kwh",
    ]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(run.rows)
