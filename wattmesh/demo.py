"""``wattmesh demo``: a simulated community's devices, polled and driven through the drivers.

Every device of the scenario is a real Modbus server (TCP, and RTU over a socat pair for the
factory's SDM630). The demo polls each one through ``drivers``, runs the edge's local
self-consumption controller on every battery (``edge.control``), and compares each site with
its baseline: the same PV and load with the battery idle.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import shutil
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from broker.clock import ScaledClock
from drivers.devices import Battery, Inverter, Meter, RegisterMapMeter, SunSpecMeter
from drivers.errors import DriverError, SetpointRejected
from drivers.regmap import load_builtin_map
from drivers.transport import BusPool
from edge.control import self_consumption_setpoint_w
from simulators.scenario import (
    ScenarioConfig,
    ScenarioError,
    ScenarioRunner,
    load_scenario,
    parse_scenario,
)


def builtin_scenario() -> ScenarioConfig:
    """The community scenario shipped with wattmesh (config/scenarios/community.toml)."""
    text = (resources.files("simulators") / "scenarios" / "community.toml").read_text()
    return parse_scenario(tomllib.loads(text), "builtin:community.toml").with_free_ports()


@dataclass
class SiteState:
    """One site's devices and what the demo measured of it."""

    site_id: str
    meter: Meter | None = None
    inverters: list[Inverter] = field(default_factory=list)
    batteries: list[Battery] = field(default_factory=list)
    grid_w: float = 0.0
    pv_w: float = 0.0
    battery_w: float = 0.0
    soc_pct: float | None = None
    import_wh: float = 0.0
    export_wh: float = 0.0
    baseline_import_wh: float = 0.0
    baseline_export_wh: float = 0.0
    peak_import_w: float = 0.0
    baseline_peak_import_w: float = 0.0
    rejected: int = 0
    unavailable: int = 0

    @property
    def load_w(self) -> float:
        """Consumption: grid + PV + battery (the balance at the connection)."""
        return self.grid_w + self.pv_w + self.battery_w

    def cost(self, retail: float, feed_in: float, baseline: bool = False) -> float:
        """Energy cost at flat tariffs, currency (import pays retail, export earns feed-in)."""
        imp = self.baseline_import_wh if baseline else self.import_wh
        exp = self.baseline_export_wh if baseline else self.export_wh
        return (imp * retail - exp * feed_in) / 1000.0


async def _connect(runner: ScenarioRunner, pool: BusPool) -> dict[str, SiteState]:
    sites = {s.id: SiteState(s.id) for s in runner.config.sites}
    for dev in runner.devices:
        transport = pool.get(dev.url)
        state = sites[dev.site]
        if dev.kind == "pv_inverter":
            state.inverters.append(await Inverter.connect(transport, dev.unit))
        elif dev.kind == "battery":
            state.batteries.append(await Battery.connect(transport, dev.unit))
        elif dev.kind == "sunspec_meter":
            state.meter = await SunSpecMeter.connect(transport, dev.unit)
        elif dev.kind == "sdm630":
            state.meter = RegisterMapMeter(transport, dev.unit, load_builtin_map("sdm630"))
    return sites


async def _poll_and_control(state: SiteState, poll_s: float) -> None:
    """Read the site, then command its batteries with the self-consumption controller."""
    try:
        if state.meter is not None:
            state.grid_w = (await state.meter.read()).power_w or 0.0
        state.pv_w = sum([(await inv.read()).ac_power_w or 0.0 for inv in state.inverters])
        readings = [await b.read() for b in state.batteries]
    except DriverError:
        state.unavailable += 1
        return
    state.battery_w = sum(r.power_w or 0.0 for r in readings)
    socs = [r.soc_pct for r in readings if r.soc_pct is not None]
    state.soc_pct = sum(socs) / len(socs) if socs else None
    for battery, r in zip(state.batteries, readings, strict=True):
        share = 1.0 / len(state.batteries)
        setpoint = float(
            self_consumption_setpoint_w(
                state.grid_w * share,
                r.power_w or 0.0,
                r.soc_pct if r.soc_pct is not None else 50.0,
                soc_min_pct=r.soc_min_pct,
                soc_max_pct=r.soc_max_pct,
                max_charge_w=r.rated_charge_w or 0.0,
                max_discharge_w=r.rated_discharge_w or 0.0,
            )
        )
        try:
            await battery.set_power_w(round(setpoint), revert_timeout_s=math.ceil(3 * poll_s))
        except SetpointRejected:
            state.rejected += 1
        except DriverError:
            state.unavailable += 1


def _integrate(state: SiteState, dt_s: float) -> None:
    baseline_w = state.grid_w + state.battery_w
    for grid_w, imp, exp in (
        (state.grid_w, "import_wh", "export_wh"),
        (baseline_w, "baseline_import_wh", "baseline_export_wh"),
    ):
        energy_wh = grid_w * dt_s / 3600.0
        if energy_wh > 0:
            setattr(state, imp, getattr(state, imp) + energy_wh)
        else:
            setattr(state, exp, getattr(state, exp) - energy_wh)
    state.peak_import_w = max(state.peak_import_w, state.grid_w)
    state.baseline_peak_import_w = max(state.baseline_peak_import_w, baseline_w)


def _view(sites: dict[str, SiteState], sim_ts: float, progress: float, feeder_w: float) -> Table:
    when = datetime.fromtimestamp(sim_ts, UTC).strftime("%Y-%m-%d %H:%M UTC")
    table = Table(title=f"{when}  {progress:5.1%}  feeder {feeder_w / 1000:8.1f} kW (+ imports)")
    for col in ("site", "PV kW", "load kW", "battery kW", "SOC %", "grid kW"):
        table.add_column(col, justify="right" if col != "site" else "left")
    for s in sites.values():
        table.add_row(
            s.site_id,
            f"{s.pv_w / 1000:.1f}",
            f"{s.load_w / 1000:.1f}",
            f"{s.battery_w / 1000:+.1f}",
            "—" if s.soc_pct is None else f"{s.soc_pct:.1f}",
            f"{s.grid_w / 1000:+.1f}",
        )
    return table


def _report(
    sites: dict[str, SiteState],
    retail: float,
    feed_in: float,
    feeder_peak_w: float,
    baseline_feeder_peak_w: float,
) -> Table:
    table = Table(title=f"Report (tariffs: retail {retail:.2f}, feed-in {feed_in:.2f} per kWh)")
    for col in (
        "site",
        "in kWh",
        "out kWh",
        "cost",
        "baseline",
        "saving",
        "peak kW",
        "base peak",
    ):
        table.add_column(col, justify="right" if col != "site" else "left", no_wrap=True)
    for s in sites.values():
        cost, base = s.cost(retail, feed_in), s.cost(retail, feed_in, baseline=True)
        table.add_row(
            s.site_id,
            f"{s.import_wh / 1000:.1f}",
            f"{s.export_wh / 1000:.1f}",
            f"{cost:.2f}",
            f"{base:.2f}",
            f"{base - cost:.2f}",
            f"{s.peak_import_w / 1000:.1f}",
            f"{s.baseline_peak_import_w / 1000:.1f}",
        )
    total = sum(s.cost(retail, feed_in) for s in sites.values())
    total_base = sum(s.cost(retail, feed_in, baseline=True) for s in sites.values())
    table.add_row(
        "community",
        "",
        "",
        f"{total:.2f}",
        f"{total_base:.2f}",
        f"{total_base - total:.2f}",
        f"{feeder_peak_w / 1000:.1f}",
        f"{baseline_feeder_peak_w / 1000:.1f}",
        style="bold",
    )
    return table


async def _run(
    config: ScenarioConfig,
    hours: float,
    speed: float,
    poll_s: float,
    retail: float,
    feed_in: float,
    out: Path | None,
    console: Console,
) -> int:
    clock = ScaledClock(config.start_ts, speed)
    end_ts = config.start_ts + hours * 3600.0
    rows: list[dict[str, float | str]] = []
    feeder_peak_w = baseline_feeder_peak_w = 0.0
    pool = BusPool(timeout_s=1.0, retries=2)
    async with ScenarioRunner(config, clock) as runner:
        sites = await _connect(runner, pool)
        last_ts = clock.now()
        next_hour = last_ts
        with Live(console=console, auto_refresh=False, transient=False) as live:
            while (now := clock.now()) < end_ts:
                await asyncio.gather(*[_poll_and_control(s, poll_s) for s in sites.values()])
                dt_s, last_ts = now - last_ts, now
                for s in sites.values():
                    _integrate(s, dt_s)
                    rows.append(
                        {
                            "ts": round(now, 1),
                            "site": s.site_id,
                            "pv_w": s.pv_w,
                            "load_w": s.load_w,
                            "battery_w": s.battery_w,
                            "soc_pct": s.soc_pct if s.soc_pct is not None else "",
                            "grid_w": s.grid_w,
                        }
                    )
                feeder_w = sum(s.grid_w for s in sites.values())
                feeder_peak_w = max(feeder_peak_w, feeder_w)
                baseline_feeder_peak_w = max(
                    baseline_feeder_peak_w, sum(s.grid_w + s.battery_w for s in sites.values())
                )
                progress = min(1.0, (now - config.start_ts) / (end_ts - config.start_ts))
                if console.is_terminal:
                    live.update(_view(sites, now, progress, feeder_w), refresh=True)
                elif now >= next_hour:
                    console.print(
                        f"simulated {(now - config.start_ts) / 3600:5.1f} h of "
                        f"{hours:g} h, feeder {feeder_w / 1000:+.1f} kW",
                        highlight=False,
                    )
                    next_hour += 3600.0
                wake_ts = now + poll_s
                await asyncio.sleep(max(0.0, clock.sim_to_wall_s(wake_ts - clock.now())))
        pool.close()
    console.print(_report(sites, retail, feed_in, feeder_peak_w, baseline_feeder_peak_w))
    problems = sum(s.unavailable for s in sites.values())
    if problems:
        console.print(f"[yellow]{problems} poll(s) found a device unavailable[/yellow]")
    if out is not None:
        _write_outputs(out, rows, sites, retail, feed_in, feeder_peak_w, baseline_feeder_peak_w)
        console.print(f"wrote {out / 'day.csv'} and {out / 'report.json'}", highlight=False)
    return 0


def _write_outputs(
    out: Path,
    rows: list[dict[str, float | str]],
    sites: dict[str, SiteState],
    retail: float,
    feed_in: float,
    feeder_peak_w: float,
    baseline_feeder_peak_w: float,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "day.csv").open("w", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=["ts", "site", "pv_w", "load_w", "battery_w", "soc_pct", "grid_w"]
        )
        writer.writeheader()
        writer.writerows(rows)
    report = {
        "tariffs": {"retail_per_kwh": retail, "feed_in_per_kwh": feed_in},
        "feeder_peak_import_w": feeder_peak_w,
        "baseline_feeder_peak_import_w": baseline_feeder_peak_w,
        "sites": {
            s.site_id: {
                "import_wh": s.import_wh,
                "export_wh": s.export_wh,
                "baseline_import_wh": s.baseline_import_wh,
                "baseline_export_wh": s.baseline_export_wh,
                "cost": s.cost(retail, feed_in),
                "baseline_cost": s.cost(retail, feed_in, True),
                "peak_import_w": s.peak_import_w,
                "baseline_peak_import_w": s.baseline_peak_import_w,
                "refused_setpoints": s.rejected,
                "unavailable_polls": s.unavailable,
            }
            for s in sites.values()
        },
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))


def run_demo(
    *,
    hours: float,
    speed: float,
    scenario: Path | None,
    seed: int | None,
    console: Console,
    poll_s: float = 120.0,
    retail: float = 0.30,
    feed_in: float = 0.08,
    out: Path | None = None,
) -> int:
    """Run the demo; returns the process exit code."""
    try:
        config = builtin_scenario() if scenario is None else load_scenario(scenario)
    except ScenarioError as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        return 2
    if seed is not None:
        config = config.model_copy(update={"seed": seed})
    if shutil.which("socat") is None:
        config, moved = _rtu_over_tcp(config)
        if moved:
            console.print(
                f"socat is not installed: serving {', '.join(moved)} over TCP "
                "instead of RTU (apt-get install socat for the serial wire)",
                highlight=False,
            )
    return asyncio.run(_run(config, hours, speed, poll_s, retail, feed_in, out, console))


def _rtu_over_tcp(config: ScenarioConfig) -> tuple[ScenarioConfig, list[str]]:
    """The scenario with pseudo-terminal RTU devices moved to TCP, and their names."""
    moved: list[str] = []
    sites = []
    for site in config.sites:
        devices = []
        for d in site.devices:
            if d.transport == "rtu" and not d.serial:
                moved.append(d.name)
                d = d.model_copy(update={"transport": "tcp"})  # noqa: PLW2901
            devices.append(d)
        sites.append(site.model_copy(update={"devices": devices}))
    return config.model_copy(update={"sites": sites}), moved
