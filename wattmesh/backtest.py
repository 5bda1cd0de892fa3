"""``wattmesh backtest``: the stepped simulation engine.

A scenario's sites run in one process on a manual clock, step by step (``step_s`` simulated
seconds, 60 by default), with no broker, no Modbus and no waiting on wall time, through the
code the live services run:

- device physics: the scenario's simulators (``simulators.scenario.build_sites``, the same
  seeds); their load and PV from the pure functions of :mod:`simulators.physics` the devices
  call, computed for the whole run at once, and each battery stepped by
  :func:`simulators.physics.battery_step` exactly as :class:`simulators.devices.BatterySim`
  steps it (:class:`SteppedBattery`, without its registers);
- each edge: :mod:`edge.policy` (precedence layers, safety clamp, sharing among batteries,
  bid energy and curve) and :func:`edge.trust.order_window` for dispatch orders;
- the coordinator: forecasts (:func:`coordinator.service.sites_forecast_w`), market clearing
  (:func:`coordinator.service.clear_bids`), grid balancing (:mod:`coordinator.grid`) and
  settlement in a SQLite ledger (:class:`coordinator.ledger.Ledger`).

Each step, in the order the live system runs them: settle the interval that just ended;
advance the physics; each edge reads its devices and controls its batteries; the
coordinator meters the readings (held until the next, as it integrates telemetry) and
balances the feeder, and a dispatch it sends is applied at once; then bids are made and
cleared when their times come (``bid_lead_s`` + ``gate_s`` and ``gate_s`` before the
interval).

By default everything reads once a step. ``poll_s`` and ``grid_period_s`` (multiples of the
step) give the live cadence instead: the batteries integrate every step, but each edge reads
and controls, and the coordinator takes readings (each held until the next, as it meters
telemetry), every ``poll_s``; the grid is checked every ``grid_period_s``, so an order waits
for two fresh readings as long as it does live.

Differences from a live run, by design: readings are exact (the live agent reads registers
with their scale factors, e.g. SOC in 0.1 %); a setpoint is not quantised to the battery's
register resolution; each edge's forecast holds only the next interval (the one it bids for).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import typer
from numpy.typing import NDArray
from rich.console import Console

from broker.clock import ManualClock
from broker.messages import Bid, BidStep, Telemetry
from coordinator import forecast as fc
from coordinator import grid
from coordinator import plausibility as pl
from coordinator import reserve as rs
from coordinator.config import CoordinatorConfig, GridSection, parse_coordinator_config
from coordinator.history_store import SiteHistory
from coordinator.ledger import Ledger, to_currency
from coordinator.plausibility import open_interval
from coordinator.schedule import ScheduleError, ScheduleJob, ScheduleSteps, made_here, resumed
from coordinator.schedule import Solved as ScheduleSolved
from coordinator.service import (
    HISTORY_STEP_S,
    RingBuffer,
    clear_bids,
    fill_clear_sky,
    forecast_sites,
    history_snapshot,
    new_history,
)
from coordinator.weather import KeptForecast, WeatherSnapshot, WeatherStore, kept_forecast
from edge.bidding import CurveSteps
from edge.config import EdgeConfig, parse_edge_config
from edge.plan import (
    Horizon,
    IntervalPlan,
    PlanError,
    PlanSteps,
    Solved,
    WarmStart,
    aligned,
    plan_interval_steps,
    resume_steps,
)
from edge.policy import (
    BatteryView,
    Command,
    Commitment,
    PlanStep,
    clamp_to_rating_w,
    decide_setpoint_w,
    expected_net_kwh,
    interval_bid,
    setpoint_due,
    share_among_batteries_w,
)
from edge.trust import order_window
from simulators import physics
from simulators.devices import BatterySim, PvInverterSim, SimSite
from simulators.scenario import ScenarioConfig, ScenarioError, build_sites, load_scenario
from simulators.weather import RUN_PERIOD_S, latest_run_ts
from wattmesh.replay import ReplayError, Series, read_series, replayed_w
from wattmesh.weather import scenario_pv, simulated_forecast

#: Days of history the coordinator has at the start unless told otherwise: a running one
#: keeps a week, and forecasts from nothing would judge the first day unfairly.
DEFAULT_HISTORY_DAYS = 7.0
#: Simulated seconds per step unless told otherwise.
DEFAULT_STEP_S = 60.0
#: The coordinator keeps one history sample every 15 minutes per site for 7 days, as the
#: live one does (coordinator.service.HISTORY_STEP_S, HISTORY_SAMPLES).
HISTORY_SAMPLE_S = HISTORY_STEP_S
#: Awards an edge keeps (the live agent keeps the last 8).
AWARDS_KEPT = 8


Steps = tuple[tuple[float, float], ...]
#: What runs the batteries: wattmesh (market, dispatch, grid balancing), or a baseline with
#: no market and no grid balancing: each site's own fallback controller (self-consumption and
#: its peak shaving, as configured) or batteries held idle.
Variant = Literal["wattmesh", "self_consumption", "idle"]
VARIANTS: tuple[Variant, ...] = ("wattmesh", "self_consumption", "idle")


class BacktestError(ValueError):
    """A backtest cannot run as asked (bad scenario, step or configuration)."""


def _check_run(variant: str, days: float, history_days: float) -> None:
    if variant not in VARIANTS:
        raise BacktestError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if not days > 0:
        raise BacktestError(f"days must be positive, got {days}")
    if not 0 <= history_days <= 7:
        raise BacktestError(f"history_days must be within 0-7, got {history_days}")


def _aligned(
    start: float, step_s: float, series_start: float, values: NDArray[np.float64]
) -> NDArray[np.float64]:
    return aligned(start, step_s, len(values), series_start, step_s, values)


def _interval_net_kwh(
    forecast: tuple[float, NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]] | None,
    start_ts: float,
    interval_s: float,
) -> float | None:
    """The forecast net load (kWh, + imports) of the interval from ``start_ts``, from the
    forecast a site holds (None when it has none for that interval)."""
    if forecast is None:
        return None
    index = round((start_ts - forecast[0]) / interval_s)
    if not 0 <= index < len(forecast[1]):
        return None
    return float(forecast[2][index] - forecast[1][index]) * interval_s / 3.6e6


#: The engine's planning threads (where there are two cores): they solve the sites' plans and
#: the community schedule.
PLAN_THREADS = 2


def _plan_pool() -> ThreadPoolExecutor | None:
    """Two threads for the sites' plans where there are two cores (none on one core)."""
    return ThreadPoolExecutor(PLAN_THREADS, "wattmesh-plan") if (os.cpu_count() or 1) > 1 else None


def fleet_battery(batteries: list[SteppedBattery]) -> rs.FleetBattery:
    """A site's batteries as the coordinator's reservation sees them (from their readings)."""
    return rs.FleetBattery(
        stored_kwh=sum(b.stored_wh for b in batteries) / 1000.0,
        min_kwh=sum(b.soc_min_pct * b.capacity_wh for b in batteries) / 1e5,
        max_kwh=sum(b.soc_max_pct * b.capacity_wh for b in batteries) / 1e5,
        max_charge_kw=sum(b.rated_power_w for b in batteries) / 1000.0,
        max_discharge_kw=sum(b.rated_power_w for b in batteries) / 1000.0,
    )


def default_coordinator_config(
    scenario: ScenarioConfig, ledger_path: Path, step_s: float
) -> CoordinatorConfig:
    """The demo's feeder and tariffs (``wattmesh.demo.COORDINATOR``) for ``scenario``, with
    dispatch timing scaled to the step as the demo scales it to its polls."""
    from wattmesh.demo import COORDINATOR  # noqa: PLC0415 - the demo pulls in rich views

    return parse_coordinator_config(
        {
            "coordinator": {
                "latitude_deg": scenario.latitude_deg,
                "longitude_deg": scenario.longitude_deg,
                "utc_offset_h": scenario.utc_offset_h,
                "ledger": str(ledger_path),
            },
            "broker": {"password_env": None},
            "grid": {
                **COORDINATOR["grid"],
                "dispatch_expiry_s": max(300, int(6 * step_s)),
                "reissue_s": max(60, int(step_s)),
            },
            "tariff": COORDINATOR["tariff"],
        },
        "backtest",
    )


def default_edge_configs(scenario: ScenarioConfig, step_s: float) -> dict[str, EdgeConfig]:
    """Each site's edge configuration as the demo writes it (roles and peak-shaving
    fallbacks of ``wattmesh.demo``), polling once a step."""
    from wattmesh.demo import FALLBACK, ROLES  # noqa: PLC0415 - the demo pulls in rich views

    out = {}
    for site in scenario.sites:
        devices = [
            {"name": d.name, "kind": d.kind, "url": f"tcp://{scenario.host}:{d.port}"}
            for d in site.devices
        ]
        out[site.id] = parse_edge_config(
            {
                "site": {
                    "id": site.id,
                    "role": ROLES.get(site.id, "prosumer"),
                    "poll_interval_s": step_s,
                },
                "devices": devices,
                "dispatch_revert_s": max(60, int(6 * step_s)),
                **({"fallback": FALLBACK[site.id]} if site.id in FALLBACK else {}),
            },
            f"backtest site {site.id}",
        )
    return out


@dataclass
class SteppedBattery:
    """One battery stepped as :meth:`simulators.devices.BatterySim.step` steps it, without
    its registers: the state of charge integrates the power held since the last step, then
    the power becomes what the setpoint can deliver (:func:`simulators.physics.battery_step`).
    Powers in W (+ discharges), SOC in %."""

    name: str
    capacity_wh: float
    rated_power_w: float
    soc_pct: float
    soc_min_pct: float
    soc_max_pct: float
    charge_efficiency: float
    discharge_efficiency: float
    setpoint_w: float = 0.0
    power_w: float = 0.0

    @classmethod
    def of(cls, sim: BatterySim) -> SteppedBattery:
        """The battery a scenario's simulator describes, at its initial state."""
        return cls(
            sim.name,
            sim.capacity_wh,
            sim.rated_power_w,
            sim.soc_pct,
            sim.soc_min_pct,
            sim.soc_max_pct,
            sim.charge_efficiency,
            sim.discharge_efficiency,
        )

    def _physics(self, power_w: float, dt_s: float) -> tuple[float, float]:
        if power_w == 0.0:
            return self.soc_pct, 0.0  # what battery_step gives for no power, without the cost
        soc, delivered = physics.battery_step(
            self.soc_pct,
            power_w,
            dt_s,
            self.capacity_wh,
            charge_efficiency=self.charge_efficiency,
            discharge_efficiency=self.discharge_efficiency,
            soc_min_pct=self.soc_min_pct,
            soc_max_pct=self.soc_max_pct,
        )
        return float(soc), float(delivered)

    def step(self, dt_s: float) -> None:
        """Integrate ``dt_s`` seconds at the present power, then follow the setpoint."""
        if dt_s > 0:
            self.soc_pct, _ = self._physics(self.power_w, dt_s)
        _, self.power_w = self._physics(self.setpoint_w, 1.0)

    def command(self, power_w: float) -> None:
        """A new setpoint, within the rating, in effect at once (as a register write is)."""
        self.setpoint_w = max(-self.rated_power_w, min(self.rated_power_w, power_w))
        self.step(0.0)

    def view(self) -> BatteryView:
        """The battery as the edge's policy sees it."""
        return BatteryView(
            rated_discharge_w=self.rated_power_w,
            rated_charge_w=self.rated_power_w,
            soc_pct=self.soc_pct,
            soc_min_pct=self.soc_min_pct,
            soc_max_pct=self.soc_max_pct,
            capacity_wh=self.capacity_wh,
        )

    @property
    def stored_wh(self) -> float:
        """Energy stored, Wh."""
        return self.soc_pct / 100.0 * self.capacity_wh


@dataclass
class _Site:
    """One site: its physics, its edge's state and what the coordinator knows of it."""

    name: str
    edge: EdgeConfig
    load_w: NDArray[np.float64]
    pv_w: NDArray[np.float64]
    batteries: list[SteppedBattery]
    grid_w: float = 0.0
    battery_w: float = 0.0
    # the edge
    awards: OrderedDict[int, Commitment] = field(default_factory=OrderedDict)
    order: tuple[Command, float] | None = None  # the dispatch in force and its end
    history: deque[tuple[float, float]] = field(default_factory=deque)
    written: dict[int, tuple[float, float]] = field(default_factory=dict)
    forecast: tuple[float, NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]] | None = (
        None  # (start ts, pv W, load W, price per kWh) per interval, as the Forecast message
    )
    reservation: rs.SiteReservation | None = None  # aligned with the forecast
    plans: OrderedDict[int, PlanStep] = field(default_factory=OrderedDict)
    planned: int = 0  # intervals planned
    plan_fallbacks: int = 0  # intervals the plan failed for (today's rules instead)
    warm: WarmStart = field(default_factory=WarmStart)  # EdgeAgent's: the last plan's basis
    plan_solve_s: float = 0.0
    controller: str = "fallback"
    next_bid: int = 0  # the next interval to bid for
    reported_generation_w: float = 0.0  # the PV and battery ratings its devices report
    reported_storage_w: float = 0.0
    # the coordinator
    limits: pl.SiteLimits | None = None  # fixed at its first reading, as the live ones are
    suspect: set[int] = field(default_factory=set)  # intervals with an implausible reading
    rejected: int = 0  # readings and bids the coordinator refused
    readings: int = 0
    peak_import_w: float | None = None  # SiteState.peak_import_w
    energy_wh: dict[int, float] = field(default_factory=dict)
    meter_wh: dict[int, float] = field(default_factory=dict)  # the utility's: every reading
    forecast_history: RingBuffer = field(default_factory=new_history)  # SiteState.history
    last_history_ts: float = -math.inf

    @property
    def soc_pct(self) -> float | None:
        """The capacity-weighted state of charge, as the edge's snapshot has it."""
        if not self.batteries:
            return None
        return sum(b.soc_pct * b.capacity_wh for b in self.batteries) / sum(
            b.capacity_wh for b in self.batteries
        )


@dataclass(frozen=True, slots=True)
class _Bidding:
    """A site's bid as it starts: what its agent knew then (the plan aside)."""

    site: _Site
    interval: int
    now: float
    forecast: tuple[float, NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]] | None
    recent_net_w: tuple[float, ...]  # the site's net flow over its recent readings, W
    limits: pl.SiteLimits | None  # the coordinator's limits to check the bid (None: no check)


@dataclass(frozen=True, slots=True)
class _SiteForecasts:
    """The sites' PV and load forecasts (W, a row per site in ``known``) at ``times``."""

    start: float
    times: NDArray[np.float64]
    known: list[_Site]
    pv_w: NDArray[np.float64]
    load_w: NDArray[np.float64]


def _same_weather(a: WeatherSnapshot, b: WeatherSnapshot) -> bool:
    """Whether two snapshots hold the same forecasts (the same objects) and freshness."""
    return (
        a.fresh == b.fresh
        and len(a.kept) == len(b.kept)
        and all(x is y for x, y in zip(a.kept, b.kept, strict=True))
    )


def _feeder_schedule(
    net_w: NDArray[np.float64],
    net_kwh: dict[str, NDArray[np.float64]],
    fleet: dict[str, rs.FleetBattery],
    tariffs: NDArray[np.float64],
    step_h: float,
    g: GridSection,
) -> ScheduleSteps[tuple[NDArray[np.float64], rs.FeederReservation]]:
    """Coordinator.publish_forecasts's community schedule and feeder reservation: the local
    price per step and each site's share, from the community's net load (W) and each site's
    (kWh), the batteries as the cleared interval leaves them and the tariffs per step; in
    steps (the schedule's solve may run in another thread)."""
    community = yield from rs.community_schedule_steps(
        net_w * step_h / 1000.0,
        list(fleet.values()),
        retail_per_kwh=tariffs[:, 0],
        feed_in_per_kwh=tariffs[:, 1],
        step_h=step_h,
        import_limit_kw=g.import_limit_w * g.target_pct / 1e5,
        export_limit_kw=g.export_limit_w * g.target_pct / 1e5,
    )
    reservation = rs.reserve(
        net_kwh,
        fleet,
        step_h=step_h,
        import_limit_kw=g.import_limit_w / 1000.0,
        export_limit_kw=g.export_limit_w / 1000.0,
        plan_to_share=g.target_pct / 100.0,
        fleet_stored_kwh=community.stored_kwh,
    )
    return community.price_per_kwh, reservation


#: Tariff look-ups the engine keeps (a few days of forecast steps).
TARIFFS_KEPT = 1024

#: a site's forecast PV and load, W per step
_Shape = tuple[NDArray[np.float64], NDArray[np.float64]]
#: the community schedule's price and reservation
_Reserved = tuple[NDArray[np.float64], rs.FeederReservation]


@dataclass(frozen=True, slots=True)
class _Scheduling:
    """The community schedule being made: its steps, and its programme's solve (in a
    planning thread, or to run)."""

    steps: ScheduleSteps[_Reserved]
    solve: Future[ScheduleSolved] | ScheduleJob

    def made(self) -> _Reserved:
        """The schedule's results, once its programme is solved (raises ScheduleError)."""
        if not isinstance(self.solve, Future):
            return made_here(self.steps, self.solve)
        try:
            solved: ScheduleSolved | ScheduleError = self.solve.result()
        except ScheduleError as err:
            solved = err
        return resumed(self.steps, solved)


@dataclass(frozen=True, slots=True)
class _Planning:
    """A site's plan being made: its steps, and its programme's solve (in a planning thread,
    or done: the result or the error)."""

    steps: PlanSteps[IntervalPlan]
    solve: Future[Solved] | Solved | PlanError


def _plan_made(planning: _Planning | None) -> IntervalPlan | None:
    """The plan ``planning`` makes once its programme is solved (None: it failed)."""
    if planning is None:
        return None
    solve = planning.solve
    if isinstance(solve, Future):
        try:
            solve = solve.result()
        except PlanError as err:
            solve = err
    try:
        return resume_steps(planning.steps, solve)
    except PlanError:
        return None


@dataclass(frozen=True)
class SiteResult:
    """One site over the settled intervals: money in currency (+ pays), energy in kWh."""

    site: str
    net_cost: float
    baseline_cost: float
    import_kwh: float
    export_kwh: float
    stored_start_kwh: float
    stored_end_kwh: float


@dataclass(frozen=True)
class BacktestResult:
    """What a backtest measured."""

    scenario: str
    start_ts: float
    end_ts: float
    step_s: float
    intervals: int  # settled market intervals
    sites: dict[str, SiteResult]
    feeder_peak_w: float  # largest 15-minute (interval) mean import at the feeder, metered
    feeder_limit_w: float
    ledger_balanced: bool
    dispatches: int
    wall_s: float
    variant: Variant = "wattmesh"
    #: The settled intervals, and per site the energy its meter counted in each (kWh, +
    #: imports): what the utility bills, even where the ledger settled the site as estimated.
    settled: tuple[int, ...] = ()
    metered_kwh: dict[str, NDArray[np.float64]] = field(default_factory=dict)
    #: The utility's tariffs in each settled interval, per kWh.
    retail_per_kwh: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    feed_in_per_kwh: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    #: Each site's batteries' capacity-weighted charge efficiency (1 without a battery).
    charge_efficiency: dict[str, float] = field(default_factory=dict)
    #: Per site, its load minus its PV in each settled interval (kWh): what it would meter
    #: with its batteries idle.
    net_kwh: dict[str, NDArray[np.float64]] = field(default_factory=dict)
    #: Per site, its batteries as they were at the start.
    batteries: dict[str, tuple[SteppedBattery, ...]] = field(default_factory=dict)
    #: Per site, the readings and bids the coordinator refused as implausible.
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def total_cost(self) -> float:
        """The community's settled cost, currency (+ pays)."""
        return sum(s.net_cost for s in self.sites.values())


def _for_variant(edges: dict[str, EdgeConfig], variant: Variant) -> dict[str, EdgeConfig]:
    """The edges as a baseline runs them: no bids; idle batteries for ``"idle"``."""
    if variant == "wattmesh":
        return edges
    out = {}
    for name, e in edges.items():
        fallback = e.fallback
        if variant == "idle":
            fallback = fallback.model_copy(update={"mode": "idle"})
        market = e.market.model_copy(update={"enabled": False})
        out[name] = e.model_copy(update={"market": market, "fallback": fallback})
    return out


def scenario_history(
    scenario: ScenarioConfig, start_ts: float, days: float
) -> dict[str, SiteHistory]:
    """Each site's load and PV (W, batteries idle) every HISTORY_SAMPLE_S over the ``days``
    before ``start_ts``, from the simulators' physics: the history a coordinator that had
    been running would forecast from (the engine's warm-up; the demo's coordinator starts
    with it as its history file)."""
    count = round(days * 86_400 / HISTORY_SAMPLE_S)
    times = start_ts - HISTORY_SAMPLE_S * np.arange(count, 0, -1, dtype=np.float64)
    if not count:
        return {}
    _, before = _profiles(scenario, times)
    return {name: SiteHistory(times, pv, load) for name, (load, pv) in before.items()}


def first_weather_run_ts(start_ts: float, history_days: float) -> float:
    """The issue time [s] of the simulated weather service's first run a coordinator starting
    at ``start_ts`` with ``history_days`` of history holds: the run at or before the history's
    start (the engine issues it and every later one by the start)."""
    return latest_run_ts(start_ts - history_days * 86_400.0)


def scenario_weather(scenario: ScenarioConfig, start_ts: float, days: float) -> list[KeptForecast]:
    """The simulated weather service's runs (wattmesh/weather.py) over the ``days`` before
    ``start_ts``, as a coordinator keeps them, oldest first: from
    :func:`first_weather_run_ts` to the last before the run the live service publishes on
    starting (``latest_run_ts(start_ts)``). With :func:`scenario_history`, the demo's
    coordinator's history file: it then holds the runs the engine's has at the start."""
    pv = scenario_pv(scenario)
    if not pv or days <= 0:
        return []
    first = first_weather_run_ts(start_ts, days)
    runs = np.arange(first, latest_run_ts(start_ts), RUN_PERIOD_S, dtype=np.float64)
    lat, lon = scenario.latitude_deg, scenario.longitude_deg
    return [kept_forecast(simulated_forecast(pv, float(run)), lat, lon) for run in runs]


def _profiles(
    scenario: ScenarioConfig, times: NDArray[np.float64]
) -> tuple[dict[str, SimSite], dict[str, tuple[NDArray[np.float64], NDArray[np.float64]]]]:
    """Each site's load and PV (W) at ``times``: the simulators' own physics, vectorised."""
    clock = ManualClock(float(times[0]))
    sites: dict[str, SimSite] = {}
    for _, _, device in build_sites(scenario, clock):
        sites.setdefault(device.site.site_id, device.site)
    out = {}
    for name, site in sites.items():
        load = np.zeros_like(times)
        if site.load is not None:
            load = physics.load_power_w(
                times,
                site.load.profile,
                site.load.base_w,
                site.load.peak_w,
                seed=site.seed,
                utc_offset_h=site.utc_offset_h,
            )
        pv = np.zeros_like(times)
        clear_sky = None
        for d in site.devices:
            if isinstance(d, PvInverterSim):
                if clear_sky is None:
                    clear_sky = physics.clear_sky_ghi_w_per_m2(
                        times, site.latitude_deg, site.longitude_deg
                    )
                ghi = clear_sky * physics.cloud_index(times, seed=d.seed)
                pv = pv + physics.pv_ac_power_w(ghi, d.rated_dc_w, d.rated_ac_w)
        out[name] = (load, pv)
    return sites, out


@dataclass
class _Refill:
    """What the grid loop takes from the feeder reservation, as the coordinator's does: the
    import level it holds (kW), the fleet's requirement (its first step's start, kWh at each
    step's end), and its refill: the orders standing, whether it refills; and the orders that
    charge the feeder's export into batteries (Coordinator._absorbing)."""

    import_level_kw: float | None = None
    required: tuple[float, NDArray[np.float64]] | None = None
    orders: dict[str, grid.Relief] = field(default_factory=dict)
    active: bool = False
    absorbing: dict[str, grid.Relief] = field(default_factory=dict)


class Engine:
    """One backtest run; :meth:`run` steps it to the end."""

    #: bids started and not yet made (see _start_bids): each site's, and the plans by site
    _bidding: tuple[list[_Bidding], dict[str, _Planning | None]] | None = None
    #: forecasts being made (see _forecast): the sites', their shapes, the schedule's results
    _forecasting: tuple[_SiteForecasts, dict[str, _Shape], _Scheduling | _Reserved] | None = None
    #: the sites' forecasts made early (see _forecasts_made), with the history version and
    #: weather they were made from
    _early: tuple[float, int, WeatherSnapshot, _SiteForecasts | None] | None = None
    #: counts the samples added to the sites' forecasting histories
    _history_version: int = 0
    sent_ts: dict[str, float]  # when the grid loop last sent each site an order
    _tariffs: dict[float, tuple[float, float]]  # see _tariff_at

    def __init__(
        self,
        scenario: ScenarioConfig,
        *,
        days: float,
        ledger_path: Path,
        step_s: float = DEFAULT_STEP_S,
        coordinator: CoordinatorConfig | None = None,
        edges: dict[str, EdgeConfig] | None = None,
        variant: Variant = "wattmesh",
        replay: dict[str, Series] | None = None,
        poll_s: float | None = None,
        grid_period_s: float | None = None,
        trust: bool = False,
        history_days: float = DEFAULT_HISTORY_DAYS,
        weather: bool | None = None,
    ) -> None:
        _check_run(variant, days, history_days)
        self.scenario = scenario
        self.step_s = float(step_s)
        self.config = coordinator or default_coordinator_config(scenario, ledger_path, step_s)
        m = self.config.market
        if not 0 < step_s <= m.interval_s or m.interval_s % step_s:
            raise BacktestError(
                f"step_s must divide the market interval ({m.interval_s} s), got {step_s}"
            )
        self.trust = trust
        self.poll_s = float(poll_s or step_s)
        self.grid_period_s = float(grid_period_s or step_s)
        for name, value in (("poll_s", self.poll_s), ("grid_period_s", self.grid_period_s)):
            if value < step_s or value % step_s:
                raise BacktestError(f"{name} must be a multiple of step_s ({step_s}), got {value}")
        self.variant = variant
        self.edges = _for_variant(edges or default_edge_configs(scenario, step_s), variant)
        for name, e in self.edges.items():
            if e.market.interval_s != m.interval_s:
                raise BacktestError(f"site {name}: market interval differs from the coordinator's")
        self.start_ts = scenario.start_ts
        n = round(days * 86_400 / step_s)
        self.times = self.start_ts + step_s * np.arange(n + 1, dtype=np.float64)
        self.end_ts = float(self.times[-1])
        sims, profiles = _profiles(scenario, self.times)
        missing = sorted(set(sims) - set(self.edges))
        if missing:
            raise BacktestError(f"no edge configuration for site(s) {', '.join(missing)}")
        for name, series in (replay or {}).items():
            if name not in profiles:
                raise BacktestError(
                    f"no site {name!r} to replay in scenario {scenario.name!r} "
                    f"(its sites: {', '.join(sorted(profiles))})"
                )
            try:
                profiles[name] = replayed_w(series, self.times, self.step_s)
            except ReplayError as err:
                raise BacktestError(f"site {name}: {err}") from err
        self.sites = {
            name: _Site(
                name,
                self.edges[name],
                *profiles[name],
                [SteppedBattery.of(d) for d in sim.devices if isinstance(d, BatterySim)],
                reported_generation_w=sum(
                    d.rated_ac_w for d in sim.devices if isinstance(d, PvInverterSim)
                ),
                reported_storage_w=sum(
                    d.rated_power_w for d in sim.devices if isinstance(d, BatterySim)
                ),
            )
            for name, sim in sims.items()
        }
        self.ghi_pending: list[tuple[RingBuffer, int, float]] = []  # Coordinator._ghi_pending
        self._init_weather(weather, history_days, set(replay or {}))
        if history_days > 0:
            self._warm_up(scenario, history_days, set(replay or {}))
        self.window = pl.TimeWindow(self.config.trust.future_skew_s, self.config.trust.max_age_s)
        self.stored_start_wh = {
            n: sum(b.stored_wh for b in s.batteries) for n, s in self.sites.items()
        }
        self.batteries_start = {
            n: tuple(replace(b) for b in s.batteries) for n, s in self.sites.items()
        }
        self.ledger = Ledger(ledger_path)
        self.reliefs: dict[str, grid.Relief] = {}
        self.refill = _Refill()
        self.mode: grid.GridMode = "normal"
        self.sent_ts, self._tariffs = {}, {}
        self.bids: dict[int, dict[str, tuple[Steps, Steps]]] = {}
        self.cleared: set[int] = set()
        self._pool = _plan_pool()  # the sites' planning threads
        self.meter_wh: dict[str, dict[int, float]] = {name: {} for name in self.sites}
        self.dispatches = 0
        self._next_clear = first = open_interval(self.start_ts, m.interval_s, m.gate_s)
        for site in self.sites.values():
            site.next_bid = first

    def _init_weather(self, on: bool | None, history_days: float, replayed: set[str]) -> None:
        """The simulated weather service (wattmesh/weather.py) and the coordinator's store of
        its forecasts (coordinator/weather.py), with the runs issued over the history; ``on``
        None: as the coordinator's ``[weather] enabled``. Replayed sites get no forecast (the
        simulated clouds are not theirs)."""
        c = self.config
        self.weather = WeatherStore(
            c.coordinator.latitude_deg,
            c.coordinator.longitude_deg,
            c.weather.max_age_h * 3600.0,
            c.trust.future_skew_s,
            enabled=c.weather.enabled if on is None else on,
        )
        pv = scenario_pv(self.scenario) if self.weather.enabled else {}
        self.weather_pv = {n: v for n, v in pv.items() if n not in replayed}
        self.next_run_ts = first_weather_run_ts(self.start_ts, history_days)
        self._issue_weather(self.start_ts)

    def _issue_weather(self, now: float) -> None:
        """Every run of the simulated weather service issued by ``now``, to the coordinator,
        each as it arrived when issued (a live coordinator receives each run then)."""
        while self.weather_pv and self.next_run_ts <= now:
            run = self.next_run_ts
            self.weather.offer(simulated_forecast(self.weather_pv, run), run)
            self.next_run_ts += RUN_PERIOD_S

    def _warm_up(self, scenario: ScenarioConfig, days: float, replayed: set[str]) -> None:
        """Give the coordinator ``days`` of history before the start, as a running one has:
        each site's load and PV (its batteries idle) every HISTORY_SAMPLE_S; replayed sites
        get none (their measured series starts at the start)."""
        for name, h in scenario_history(scenario, self.start_ts, days).items():
            site = self.sites[name]
            if name in replayed or not len(h.ts):
                continue
            for t, load_w, pv_w in zip(
                h.ts.tolist(), h.load_w.tolist(), h.pv_w.tolist(), strict=True
            ):
                slot = site.forecast_history.append(t, pv_w, load_w, None)
                self._history_version += 1
                self.ghi_pending.append((site.forecast_history, slot, t))
            site.last_history_ts = float(h.ts[-1])

    # -- the edge ----------------------------------------------------------------------------
    def _control(self, site: _Site, now: float) -> None:
        """The edge's control (EdgeAgent._control): decide, share, write what changed."""
        if site.order is not None and site.order[1] <= now:
            site.order = None
        m = site.edge.market
        award = site.awards.get(int(now // m.interval_s))
        views = [b.view() for b in site.batteries]
        total, site.controller = decide_setpoint_w(
            views,
            site.grid_w + site.battery_w,
            site.soc_pct,
            command=None if site.order is None else site.order[0],
            award=award,
            market=m,
            fallback=site.edge.fallback,
            limits=site.edge.limits,
            plan=site.plans.get(int(now // m.interval_s)),
        )
        if total is None or not site.batteries:
            return
        revert_s = math.ceil(max(site.edge.dispatch_revert_s, 3 * self.poll_s))
        for i, (battery, share) in enumerate(
            zip(site.batteries, share_among_batteries_w(total, views), strict=True)
        ):
            if not setpoint_due(
                share,
                site.written.get(i),
                now,
                rated_discharge_w=battery.rated_power_w,
                renew_after_s=revert_s / 2.0,
            ):
                continue
            battery.command(share)
            site.written[i] = (share, now)

    def _dispatch(self, site: _Site, now: float, command: Command, expires_ts: float) -> None:
        """A dispatch received by the edge (EdgeAgent._dispatch): judged, clamped, applied."""
        trust = site.edge.dispatch
        window = order_window(
            now,
            expires_ts,
            now,
            max_skew_s=trust.max_clock_skew_s,
            max_age_s=trust.max_age_s,
            max_duration_s=trust.max_duration_s,
        )
        if window.verdict != "ok" or (command.battery_power_w is not None and not site.batteries):
            return
        if command.battery_power_w is not None:
            clamped = clamp_to_rating_w(command.battery_power_w, [b.view() for b in site.batteries])
            command = Command(command.priority, clamped, command.load_limit_w)
        site.order = (command, window.end_ts)
        self._control(site, now)

    def _bid(self, bid: _Bidding, plans: dict[str, IntervalPlan | None]) -> None:
        """EdgeAgent.bid: the plan's bid (``plans``, by site; None: it failed), or today's
        rules when there is no plan, from what the site knew when it bid (``bid``)."""
        site, interval, now, f = bid.site, bid.interval, bid.now, bid.forecast
        m = site.edge.market
        start = interval * m.interval_s
        curve = None
        if site.name in plans:
            curve = self._planned_bid(site, interval, plans[site.name])
        if curve is None:
            recent = list(bid.recent_net_w)
            if f is not None:
                net_kwh = expected_net_kwh(
                    start,
                    m.interval_s,
                    forecast_start_ts=f[0],
                    forecast_step_s=m.interval_s,
                    forecast_pv_w=f[1],
                    forecast_load_w=f[2],
                    recent_net_w=recent,
                )
            else:
                net_kwh = expected_net_kwh(start, m.interval_s, recent_net_w=recent)
            curve = interval_bid(
                [b.view() for b in site.batteries],
                net_kwh,
                market=m,
                fallback=site.edge.fallback,
                role=site.edge.site.role,
            )
        if bid.limits is not None and not self._plausible_bid(
            bid.limits, interval, curve.buy, curve.sell, now
        ):
            site.rejected += 1
            return
        self.bids.setdefault(interval, {})[site.name] = (curve.buy, curve.sell)

    @staticmethod
    def _plans(site: _Site) -> bool:
        """Whether the site's agent plans (planning on, a battery, a forecast)."""
        return site.edge.plan.enabled and bool(site.batteries) and site.forecast is not None

    def _start_bids(self, due: list[tuple[_Site, int]], now: float) -> None:
        """EdgeAgent.bid for the sites due now. Each agent's plan starts from what it knows
        now (forecast, reservation, battery readings): its programme is built here and solved
        in a planning thread where one is free (HiGHS solves without Python's lock), else
        here, while the engine steps on; :meth:`_finish_bids` makes the plans and bids before
        anything reads a bid or a plan (the clearing, the next round, the end), each from what
        its site knew now: the results are as if made at once. (Only the solves leave this
        thread: Python in three threads at once spends much of its time handing its lock
        over.)"""
        self._forecasts_made()
        self._finish_bids()
        plans: dict[str, _Planning | None] = {}
        for s, k in due:
            if self._plans(s):
                solving = [p.solve for p in plans.values() if p is not None]
                busy = sum(isinstance(f, Future) and not f.done() for f in solving)
                plans[s.name] = self._start_plan(s, k, here=busy >= PLAN_THREADS)
        bids = [
            _Bidding(
                site=s,
                interval=k,
                now=now,
                forecast=s.forecast,
                recent_net_w=tuple(w for _, w in s.history),
                limits=self._limits(s, False) if self.trust else None,
            )
            for s, k in due
        ]
        self._bidding = (bids, plans)

    def _finish_bids(self) -> None:
        """The bids started by :meth:`_start_bids`, in the order the sites bid."""
        if self._bidding is None:
            return
        bids, started = self._bidding
        self._bidding = None
        solving = {
            p.solve: name for name, p in started.items() if p and isinstance(p.solve, Future)
        }
        plans = {n: _plan_made(p) for n, p in started.items() if n not in solving.values()}
        for solved in as_completed(solving):  # each plan made as its solve ends, the bids after
            plans[solving[solved]] = _plan_made(started[solving[solved]])
        for bid in bids:
            self._bid(bid, plans)

    def _start_plan(self, site: _Site, interval: int, *, here: bool) -> _Planning | None:
        """EdgeAgent's planning, from the forecast, reservation and battery readings as they
        are now, up to its programme's solve, which starts in a planning thread (``here``, or
        without one, it is solved here); :func:`_plan_made` makes the plan (None: it failed,
        today's rules instead). Nothing changes but the site's warm start."""
        m = site.edge.market
        f = site.forecast
        assert f is not None  # _plans() checked
        start = interval * m.interval_s
        n = len(f[1])
        r = site.reservation
        nan = np.full(n, np.nan)
        horizon = Horizon(
            start_ts=start,
            step_s=float(m.interval_s),
            pv_w=_aligned(start, m.interval_s, f[0], f[1]),
            load_w=_aligned(start, m.interval_s, f[0], f[2]),
            price_per_kwh=_aligned(start, m.interval_s, f[0], f[3]),
            floor_kwh=nan if r is None else _aligned(start, m.interval_s, f[0], r.floor_kwh),
            import_cap_kw=nan
            if r is None
            else _aligned(start, m.interval_s, f[0], r.import_cap_kw),
            export_cap_kw=nan
            if r is None
            else _aligned(start, m.interval_s, f[0], r.export_cap_kw),
            suggested_kwh=None
            if r is None or len(r.suggested_kwh) != n
            else _aligned(start, m.interval_s, f[0], r.suggested_kwh),
        )
        edge = site.edge
        steps = plan_interval_steps(
            horizon,
            [b.view() for b in site.batteries],
            config=edge.plan,
            market=edge.market,
            limits=edge.limits,
            role=edge.site.role,
            warm=site.warm,
        )
        try:
            job = next(steps)
        except PlanError:
            return None
        if self._pool is not None and not here:
            return _Planning(steps, self._pool.submit(job))
        try:
            return _Planning(steps, job())
        except PlanError as err:
            return _Planning(steps, err)

    def _planned_bid(
        self, site: _Site, interval: int, planned: IntervalPlan | None
    ) -> CurveSteps | None:
        """EdgeAgent's bookkeeping of a plan: keep the interval's step for control and bid
        it; None (today's rules) when the plan failed."""
        if planned is None:
            site.plan_fallbacks += 1
            return None
        site.planned += 1
        site.plan_solve_s += planned.plan.solve_s
        site.plans[interval] = planned.step
        while len(site.plans) > AWARDS_KEPT:
            site.plans.popitem(last=False)
        return planned.bid

    def _plausible_bid(
        self, limits: pl.SiteLimits, interval: int, buy: Steps, sell: Steps, now: float
    ) -> bool:
        """Coordinator.ingest_bid's check of a bid against the site's limits."""
        bid = Bid.model_construct(
            ts=now,
            interval=interval,
            buy=[BidStep.model_construct(price_per_kwh=p, quantity_kwh=q) for p, q in buy],
            sell=[BidStep.model_construct(price_per_kwh=p, quantity_kwh=q) for p, q in sell],
        )
        c = self.config
        return not pl.check_bid(
            bid,
            limits,
            now_ts=now,
            interval_s=c.market.interval_s,
            gate_s=c.market.gate_s,
            bids_ahead=c.trust.bids_ahead,
            tolerance=c.trust.tolerance,
        )

    # -- the coordinator ---------------------------------------------------------------------
    def _limits(self, site: _Site, reported: bool) -> pl.SiteLimits:
        """Coordinator._limits: declared in [sites.NAME], else derived once from its report."""
        if site.limits is not None:
            return site.limits
        t = self.config.trust
        declared = self.config.sites.get(site.name)
        limits = pl.derive_limits(
            connection_w=declared.connection_w if declared else None,
            generation_w=declared.pv_w if declared else None,
            storage_w=declared.battery_w if declared else None,
            reported_generation_w=site.reported_generation_w if reported else 0.0,
            reported_storage_w=site.reported_storage_w if reported else 0.0,
            base_connection_w=self.config.default_connection_w(),
            max_connection_w=t.max_connection_w,
            max_ratio=t.max_rating_ratio,
        )
        if reported:
            site.limits = limits
        return limits

    def _ingest(self, site: _Site, now: float, pv_w: float) -> None:
        """Coordinator.ingest_telemetry: a reading checked against the site's limits (an
        implausible one is refused and marks its interval suspect), then the latest reading,
        the minute history, metered energy (the reading held until the next poll, split among
        the intervals it spans, as ``Coordinator._meter`` splits it). The reading carries the
        site totals; per-device powers are not checked (each device here is one of a kind,
        whose power the totals' checks bound)."""
        interval_s = self.config.market.interval_s
        load_w = max(site.grid_w + pv_w + site.battery_w, 0.0)
        held = []  # the reading held until the next poll, per interval: (interval, Wh)
        t0, t1 = now, now + self.poll_s
        while t0 < t1:
            k = int(t0 // interval_s)
            end = min(t1, (k + 1) * interval_s)
            held.append((k, site.grid_w * (end - t0) / 3600.0))
            t0 = end
        for k, wh in held:  # the utility's meter counts it whatever the coordinator thinks
            site.meter_wh[k] = site.meter_wh.get(k, 0.0) + wh
        if self.trust:
            reading = Telemetry.model_construct(
                ts=now,
                devices=[],
                grid_power_w=site.grid_w,
                pv_power_w=pv_w,
                battery_power_w=site.battery_w if site.batteries else None,
                load_power_w=load_w,
            )
            t = self.config.trust
            limits = self._limits(site, True)
            if pl.check_telemetry(reading, limits, now, self.window, t.tolerance):
                site.rejected += 1
                site.suspect.add(int(now // interval_s))
                return
        site.readings += 1
        if now >= site.last_history_ts + HISTORY_SAMPLE_S:
            site.last_history_ts = now
            slot = site.forecast_history.append(now, pv_w, load_w, None)
            self._history_version += 1
            self.ghi_pending.append((site.forecast_history, slot, now))
        for k, wh in held:
            site.energy_wh[k] = site.energy_wh.get(k, 0.0) + wh

    def _balance(self, now: float) -> None:
        """Coordinator.balance: the feeder's mode, then battery orders and load limits."""
        self._forecasts_made(now)
        g = grid.holding_grid(self.config.grid, self.refill.import_level_kw)
        flow = sum(s.grid_w for s in self.sites.values())
        self.reliefs = grid.active_reliefs(self.reliefs, now)
        self.mode = grid.feeder_mode(
            flow, self.reliefs, previous=self.mode, emergency=False, grid=g
        )
        views = {}
        for name, s in self.sites.items():
            rated = sum(b.rated_power_w for b in s.batteries)
            s.peak_import_w = max(s.peak_import_w or 0.0, s.grid_w)
            views[name] = grid.SiteGrid(
                grid_power_w=s.grid_w,
                battery_power_w=s.battery_w,
                headroom_w=grid.battery_headroom_w(rated, s.battery_w, s.soc_pct),
                readings=s.readings,
                role=s.edge.site.role,
                peak_import_w=s.peak_import_w,
            )
        plan = grid.ReliefPlan()
        if self.mode == "constrained":
            plan = grid.plan_relief(
                flow,
                grid.relief_target_w(flow, g),
                views,
                self.reliefs,
                now_ts=now,
                expiry_s=g.dispatch_expiry_s,
            )
        orders: list[tuple[str, Command, grid.Relief | None]] = [
            (name, Command("dispatch", battery_power_w=setpoint), relief)
            for name, (setpoint, relief) in plan.batteries.items()
        ]
        orders += [
            (name, Command("dispatch", load_limit_w=limit), None)
            for name, limit in plan.load_limits_w.items()
        ]
        for name, command, relief in orders:
            if not grid.reissue_due(self.sent_ts.get(name), now, g.reissue_s):
                continue
            self.sent_ts[name] = now
            if relief is not None:
                self.reliefs[name] = relief
            self.dispatches += 1
            self._dispatch(self.sites[name], now, command, now + g.dispatch_expiry_s)
        relieved = set(plan.batteries) | set(self.reliefs)  # relief goes first
        self._refill(flow, g, {n: v for n, v in views.items() if n not in relieved}, now)
        if g.absorb_export:
            busy = relieved | set(self.refill.orders)
            self._absorb(flow, g, {n: v for n, v in views.items() if n not in busy}, now)

    def _absorb(
        self, flow: float, g: GridSection, views: dict[str, grid.SiteGrid], now: float
    ) -> None:
        """Coordinator._absorb: while the feeder exports, charge the export into the
        batteries (:func:`coordinator.grid.plan_absorb`); sites under a relief or refill order
        are left out of ``views``."""
        self.refill.absorbing = {
            n: a for n, a in grid.active_reliefs(self.refill.absorbing, now).items() if n in views
        }
        orders = grid.plan_absorb(
            flow,
            views,
            self.refill.absorbing,
            now_ts=now,
            expiry_s=grid.absorb_expiry_s(now, self.config.market.interval_s, g.dispatch_expiry_s),
        )
        for name, (setpoint, absorbed) in orders.items():
            if not grid.reissue_due(self.sent_ts.get(name), now, g.reissue_s):
                continue
            self.sent_ts[name] = now
            self.refill.absorbing[name] = absorbed
            self.dispatches += 1
            command = Command("dispatch", battery_power_w=setpoint)
            self._dispatch(self.sites[name], now, command, absorbed.expires_ts)

    def _refill(
        self, flow: float, g: GridSection, views: dict[str, grid.SiteGrid], now: float
    ) -> None:
        """Coordinator._refill: while the fleet is short of the reservation's requirement,
        charge its batteries into the feeder's measured headroom (:func:`coordinator.grid.
        plan_refill`)."""
        r = self.refill
        r.orders = {n: o for n, o in grid.active_reliefs(r.orders, now).items() if n in views}
        if r.required is None:
            return
        start, required_kwh = r.required
        interval_s = self.config.market.interval_s
        required = grid.required_now_kwh(required_kwh, start, interval_s, now)
        fleet = [s.batteries for s in self.sites.values() if s.batteries]
        if required is None or not fleet:
            r.active = False
            return
        # the fleet's stored and largest energy, kWh, summed as fleet_battery() sums them
        stored = sum(sum(b.stored_wh for b in site) / 1000.0 for site in fleet)
        r.active = grid.refilling(
            stored,
            required,
            sum(sum(b.soc_max_pct * b.capacity_wh for b in site) / 1e5 for site in fleet),
            active=r.active,
        )
        if not r.active:
            return
        battery_sites = {n: v for n, v in views.items() if self.sites[n].batteries}
        orders = grid.plan_refill(
            flow,
            grid.refill_level_w(g),
            battery_sites,
            r.orders,
            now_ts=now,
            expiry_s=g.dispatch_expiry_s,
            max_w=grid.refill_max_w(required - stored, interval_s),
        )
        for name, (setpoint, refill) in orders.items():
            if not grid.reissue_due(self.sent_ts.get(name), now, g.reissue_s):
                continue
            self.sent_ts[name] = now
            r.orders[name] = refill
            self.reliefs.pop(name, None)  # the refill's order replaces a lapsing relief
            self.refill.absorbing.pop(name, None)  # ... and an absorbing one
            self.dispatches += 1
            command = Command("dispatch", battery_power_w=setpoint)
            self._dispatch(self.sites[name], now, command, now + g.dispatch_expiry_s)

    def _clear(self, interval: int, now: float) -> None:
        """Coordinator.clear_interval: clear, commit, award; then the next forecasts."""
        m = self.config.market
        self._forecasts_made()
        forecasts = self._site_forecasts((interval + 1) * m.interval_s, now)
        self._finish_bids()
        retail, feed_in = self.config.tariff.at(
            interval * m.interval_s, self.config.coordinator.utc_offset_h
        )
        bids = self.bids.pop(interval, {})
        for stale in [k for k in self.bids if k < interval]:  # too late: as the service does
            del self.bids[stale]
        _, awards_kwh, price = clear_bids(
            bids,
            retail_per_kwh=retail,
            feed_in_per_kwh=feed_in,
            interval_s=m.interval_s,
            import_limit_w=self.config.grid.import_limit_w,
            export_limit_w=self.config.grid.export_limit_w,
        )
        record = self.ledger.record_clearing(
            interval,
            clearing_price_per_kwh=price,
            retail_price_per_kwh=retail,
            feed_in_price_per_kwh=feed_in,
            awards_kwh=awards_kwh,
            imbalance_premium_per_kwh=m.imbalance_premium_per_kwh,
            rebate=m.rebate,
            cleared_ts=now,
        )
        self.cleared.add(interval)
        for name, quantity in record.awards_kwh.items():
            awards = self.sites[name].awards
            awards[interval] = Commitment(quantity, record.clearing_price_per_kwh)
            while len(awards) > AWARDS_KEPT:
                awards.popitem(last=False)
        self._forecast(forecasts)

    def _site_forecasts(self, start: float, now: float) -> _SiteForecasts | None:
        """Coordinator.publish_forecasts, its first part: each site's PV and load over the
        horizon from ``start`` (None: no site has history). It reads only the sites'
        histories and the weather, not the bids or the clearing, so the engine makes it
        while the sites' plans are being made."""
        m = self.config.market
        c = self.config
        early, self._early = self._early, None
        version, weather = self._forecast_inputs(now)
        if early is not None and early[:2] == (start, version) and _same_weather(early[2], weather):
            return early[3]  # made early (see _forecasts_made) from the same inputs
        steps = int(m.forecast_horizon_h * 3600 // m.interval_s)
        times = np.asarray(start + m.interval_s * (np.arange(steps) + 0.5), dtype=np.float64)
        known = [s for s in self.sites.values() if len(s.forecast_history)]
        if not known:
            return None
        pending, self.ghi_pending = self.ghi_pending, []
        fill_clear_sky(pending, c.coordinator)
        ts, history = history_snapshot([s.forecast_history for s in known])
        pv_w, load_w = forecast_sites(
            [s.name for s in known], ts, history, times, c.coordinator, weather
        )
        return _SiteForecasts(start, times, known, pv_w, load_w)

    def _forecast_inputs(self, now: float) -> tuple[int, WeatherSnapshot]:
        """What the sites' forecasts read besides the horizon: the histories' version and
        the weather as of ``now`` (every run issued by then delivered)."""
        self._issue_weather(now)
        return self._history_version, self.weather.snapshot(now)

    def _forecast(self, forecasts: _SiteForecasts | None) -> None:
        """Coordinator.publish_forecasts, the rest: the local price from the community's net
        load, and the feeder reservation (after the clearing: it reads the awards)."""
        if forecasts is None:
            return
        m = self.config.market
        c = self.config
        start, times, known = forecasts.start, forecasts.times, forecasts.known
        pv_w, load_w = forecasts.pv_w, forecasts.load_w
        shapes = {s.name: (pv_w[i], load_w[i]) for i, s in enumerate(known)}
        net_w = sum(load - pv for pv, load in shapes.values())
        tariffs = np.array([self._tariff_at(float(t)) for t in times])
        step_h = m.interval_s / 3600.0
        cleared = int(start // m.interval_s) - 1  # its awards are known, the batteries run it
        fleet = {
            s.name: rs.after_award(
                fleet_battery(s.batteries),
                _interval_net_kwh(s.forecast, start - m.interval_s, m.interval_s),
                None if cleared not in s.awards else s.awards[cleared].quantity_kwh,
                step_h,
            )
            for s in known
            if s.batteries
        }
        if self.variant == "wattmesh" and fleet:
            net_kwh = {n: (ld - pv) * step_h / 1000.0 for n, (pv, ld) in shapes.items()}
            steps = _feeder_schedule(net_w, net_kwh, fleet, tariffs, step_h, c.grid)
            # the schedule's programme is built here and solved in a planning thread while the
            # engine steps on to the next reading of its results (the grid loop's refill, the
            # next bids); the rest is made here when they are read
            try:
                job = next(steps)
            except StopIteration as done:
                self._forecasting = (forecasts, shapes, done.value)
                return
            solve = job if self._pool is None else self._pool.submit(job)
            self._forecasting = (forecasts, shapes, _Scheduling(steps, solve))
            return
        price = fc.price_forecast_per_kwh(net_w, tariffs[:, 0], tariffs[:, 1])
        self._publish_forecasts(forecasts, shapes, price, None)

    def _forecasts_made(self, now: float | None = None) -> None:
        """The forecasts started by :meth:`_forecast`, published to the sites and the grid
        loop (before anything reads them). With ``now``, while the schedule is still being
        solved, the sites' forecasts for the next clearing are made from what is known now:
        that clearing takes them if nothing they read has changed by then."""
        if self._forecasting is None:
            return
        forecasts, shapes, made = self._forecasting
        self._forecasting = None
        if isinstance(made, _Scheduling):
            solving = made.solve
            if now is not None and isinstance(solving, Future) and not solving.done():
                start = (self._next_clear + 1) * self.config.market.interval_s
                version, weather = self._forecast_inputs(now)
                self._early = (start, version, weather, self._site_forecasts(start, now))
            made = made.made()
        price, reservation = made
        self._publish_forecasts(forecasts, shapes, price, reservation)

    def _tariff_at(self, ts: float) -> tuple[float, float]:
        """The tariff's (retail, feed-in) per kWh at ``ts``, each step's looked up once (a
        day's horizon moves on by one step an interval)."""
        known = self._tariffs.get(ts)
        if known is None:
            c = self.config
            known = self._tariffs[ts] = c.tariff.at(ts, c.coordinator.utc_offset_h)
            if len(self._tariffs) > TARIFFS_KEPT:
                for old in list(self._tariffs)[: TARIFFS_KEPT // 2]:
                    del self._tariffs[old]
        return known

    def _publish_forecasts(
        self,
        forecasts: _SiteForecasts,
        shapes: dict[str, _Shape],
        price: NDArray[np.float64],
        reservation: rs.FeederReservation | None,
    ) -> None:
        start = forecasts.start
        self.refill.import_level_kw = None if reservation is None else reservation.import_level_kw
        self.refill.required = None if reservation is None else (start, reservation.required_kwh)
        for s in forecasts.known:
            pv, load = shapes[s.name]
            s.forecast = (float(start), pv, load, price)
            s.reservation = None if reservation is None else reservation.sites.get(s.name)

    def _settle(self, interval: int) -> None:
        """Coordinator.settle: every site at its metered energy, a site with an implausible
        reading in the interval as estimated."""
        metered = {
            name: s.energy_wh.pop(interval) / 1000.0
            for name, s in self.sites.items()
            if interval in s.energy_wh
        }
        for name, s in self.sites.items():
            self.meter_wh[name][interval] = s.meter_wh.pop(interval, 0.0)
        reasons = {}
        for name, s in self.sites.items():
            if interval in s.suspect:
                s.suspect.discard(interval)
                metered.pop(name, None)
                reasons[name] = "implausible telemetry in the interval"
        if interval in self.cleared:
            self.ledger.settle_cleared(
                interval,
                metered_kwh=metered,
                roster=sorted(self.sites),
                estimate_reasons=reasons,
            )
            self.cleared.discard(interval)

    # -- the loop ----------------------------------------------------------------------------
    def run(self, progress: Callable[[float], None] | None = None) -> BacktestResult:
        """Step from the scenario's start to the end; ``progress`` gets the fraction done."""
        wall0 = time.perf_counter()
        m = self.config.market
        interval_s = m.interval_s
        n = len(self.times)
        report_every = max(1, round(86_400 / self.step_s))
        poll_steps = round(self.poll_s / self.step_s)
        grid_steps = round(self.grid_period_s / self.step_s)
        for i in range(n):
            now = float(self.times[i])
            k = int(now // interval_s)
            if now % interval_s == 0:
                self._settle(k - 1)
            if i == n - 1:
                break  # the end: the last interval is settled, nothing runs past it
            dt = 0.0 if i == 0 else self.step_s
            for s in self.sites.values():
                for b in s.batteries:
                    b.step(dt)
            polled = self.sites.values() if i % poll_steps == 0 else ()
            for s in polled:  # each edge reads its devices and controls; the coordinator meters
                s.battery_w = sum(b.power_w for b in s.batteries)
                s.grid_w = float(s.load_w[i] - s.pv_w[i]) - s.battery_w
                s.history.append((now, s.grid_w + s.battery_w))
                while s.history and s.history[0][0] < now - 2 * interval_s:
                    s.history.popleft()
                self._control(s, now)
                self._ingest(s, now, float(s.pv_w[i]))
            if self.variant == "wattmesh" and i % grid_steps == 0:
                self._balance(now)
            due = []
            for s in self.sites.values():
                e = s.edge.market
                while now >= s.next_bid * interval_s - e.gate_s - e.bid_lead_s:
                    if e.enabled and now < s.next_bid * interval_s - e.gate_s:
                        due.append((s, s.next_bid))  # EdgeAgent.bid: only while the gate is open
                    s.next_bid += 1
            if due:
                self._start_bids(due, now)
            while now >= self._next_clear * interval_s - m.gate_s:
                self._clear(self._next_clear, now)
                self._next_clear += 1
            if progress is not None and i % report_every == 0:
                progress(i / (n - 1))
        self._forecasts_made()
        self._finish_bids()
        if progress is not None:
            progress(1.0)
        return self._result(time.perf_counter() - wall0)

    def _result(self, wall_s: float) -> BacktestResult:
        settled = self.ledger.settled_intervals()
        interval_s = self.config.market.interval_s
        peak_w = -math.inf
        metered = {name: np.zeros(len(settled)) for name in self.sites}
        retail, feed_in = np.zeros(len(settled)), np.zeros(len(settled))
        for j, k in enumerate(settled):
            result = self.ledger.settlement(k)
            if result is None:  # pragma: no cover - listed as settled
                continue
            wh = 0.0
            for name in self.sites:
                site_wh = round(self.meter_wh[name].get(k, 0.0))  # whole Wh, as the ledger's
                metered[name][j] = site_wh / 1000.0
                wh += site_wh
            peak_w = max(peak_w, wh * 3600.0 / interval_s)
            retail[j] = result.retail_price_micro_per_kwh / 1e6
            feed_in[j] = result.feed_in_price_micro_per_kwh / 1e6
        # each step's load and PV count in the interval it starts in (as metering counts it)
        step_interval = (self.times[:-1] // interval_s).astype(np.int64)
        column = {k: j for j, k in enumerate(settled)}
        where = np.array([column.get(int(k), -1) for k in step_interval], dtype=np.int64)
        kept = where >= 0
        net_kwh = {}
        for name, s in self.sites.items():
            step_kwh = (s.load_w[:-1] - s.pv_w[:-1]) * self.step_s / 3.6e6
            net_kwh[name] = np.bincount(
                where[kept], weights=step_kwh[kept], minlength=len(settled)
            ).astype(np.float64)
        sites = {}
        for name, s in self.sites.items():
            report = self.ledger.site_report(name) if settled else None
            sites[name] = SiteResult(
                site=name,
                net_cost=float(to_currency(report.net_cost_micro)) if report else 0.0,
                baseline_cost=float(to_currency(report.baseline_cost_micro)) if report else 0.0,
                import_kwh=report.metered_import_wh / 1000.0 if report else 0.0,
                export_kwh=report.metered_export_wh / 1000.0 if report else 0.0,
                stored_start_kwh=self.stored_start_wh[name] / 1000.0,
                stored_end_kwh=sum(b.stored_wh for b in s.batteries) / 1000.0,
            )
        return BacktestResult(
            scenario=self.scenario.name,
            start_ts=self.start_ts,
            end_ts=self.end_ts,
            step_s=self.step_s,
            intervals=len(settled),
            sites=sites,
            feeder_peak_w=peak_w if settled else 0.0,
            feeder_limit_w=self.config.grid.import_limit_w,
            ledger_balanced=self.ledger.check_balanced(),
            dispatches=self.dispatches,
            wall_s=wall_s,
            variant=self.variant,
            settled=settled,
            metered_kwh=metered,
            retail_per_kwh=retail,
            feed_in_per_kwh=feed_in,
            charge_efficiency={
                name: (
                    sum(b.charge_efficiency * b.capacity_wh for b in s.batteries)
                    / sum(b.capacity_wh for b in s.batteries)
                    if s.batteries
                    else 1.0
                )
                for name, s in self.sites.items()
            },
            net_kwh=net_kwh,
            batteries=self.batteries_start,
            rejected={name: s.rejected for name, s in self.sites.items()},
        )

    def close(self) -> None:
        """Close the ledger and the planning threads."""
        self.ledger.close()
        if self._pool is not None:
            self._pool.shutdown()


def run_backtest(
    scenario: ScenarioConfig,
    *,
    days: float,
    ledger_path: Path | None = None,
    step_s: float = DEFAULT_STEP_S,
    coordinator: CoordinatorConfig | None = None,
    edges: dict[str, EdgeConfig] | None = None,
    variant: Variant = "wattmesh",
    replay: dict[str, Series] | None = None,
    poll_s: float | None = None,
    grid_period_s: float | None = None,
    trust: bool = False,
    history_days: float = DEFAULT_HISTORY_DAYS,
    progress: Callable[[float], None] | None = None,
    weather: bool | None = None,
) -> BacktestResult:
    """Run ``scenario`` for ``days`` simulated days; the ledger goes to ``ledger_path`` (a
    temporary file, removed afterwards, when None: in memory-backed ``/dev/shm`` where there is
    one, since the ledger syncs every commit to disk and a throwaway ledger need not).
    ``replay`` replaces the named sites' synthetic load and PV by measured series.
    ``poll_s`` (simulated seconds between an edge's polls, and so between the coordinator's
    readings) and ``grid_period_s`` (between the coordinator's grid checks) default to
    ``step_s``; give the live system's (a multiple of ``step_s``) to model its latency: the
    batteries still integrate every step, but everything that reads does so at the live
    cadence, and a grid order waits for two fresh readings as the live one does. ``trust``
    makes the coordinator check every reading and bid against the site's limits as the live
    one does (:mod:`coordinator.plausibility`; by default the engine believes its own
    simulated sites): an implausible bid is dropped, an implausible reading is not taken and
    its interval is settled as estimated (``BacktestResult.metered_kwh`` is still what the
    site's meter counted). ``history_days`` (0-7) of each site's load and PV before the start
    (batteries idle) are the coordinator's history at the start, as a running coordinator has
    (replayed sites get none). ``weather``: the simulated weather service's forecasts reach
    the coordinator's PV forecasts (wattmesh/weather.py; None: as its ``[weather] enabled``)."""
    shm = Path("/dev/shm")
    where = str(shm) if ledger_path is None and shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="wattmesh-backtest-", dir=where) as tmp:
        path = ledger_path or Path(tmp) / "ledger.sqlite"
        engine = Engine(
            scenario,
            days=days,
            ledger_path=path,
            step_s=step_s,
            coordinator=coordinator,
            edges=edges,
            variant=variant,
            replay=replay,
            poll_s=poll_s,
            grid_period_s=grid_period_s,
            trust=trust,
            history_days=history_days,
            weather=weather,
        )
        try:
            return engine.run(progress)
        finally:
            engine.close()


def backtest(
    scenario: Annotated[Path, typer.Argument(help="a scenario TOML file")],
    days: Annotated[float, typer.Option(help="simulated days from the scenario's start")] = 1.0,
    step_s: Annotated[
        float, typer.Option(help="simulated seconds per step; must divide the market interval")
    ] = DEFAULT_STEP_S,
    ledger: Annotated[
        Path | None, typer.Option(help="keep the settlement ledger in this SQLite file")
    ] = None,
    variant: Annotated[
        str,
        typer.Option(
            help="wattmesh, or a baseline: self_consumption (each site's own controller) or "
            "idle (batteries idle); baselines neither trade nor balance the feeder"
        ),
    ] = "wattmesh",
    csv: Annotated[
        list[str] | None,
        typer.Option(
            metavar="SITE=FILE",
            help="replay a site's measured load and PV from a CSV file (columns time, load_w, "
            "pv_w; time in ISO 8601 or epoch seconds; any step) in place of its synthetic "
            "profiles; repeat for more sites",
        ),
    ] = None,
    start: Annotated[
        str | None,
        typer.Option(help="start here instead of at the scenario's start (ISO 8601, UTC)"),
    ] = None,
    history_days: Annotated[
        float,
        typer.Option(
            help="days (0-7) of each site's load and PV before the start that the coordinator "
            "forecasts from at the start, as a running one does"
        ),
    ] = DEFAULT_HISTORY_DAYS,
    plan: Annotated[
        bool,
        typer.Option(
            "--plan/--no-plan",
            help="sites plan their batteries (edge/plan.py) and the coordinator reserves the "
            "feeder; --no-plan: the fixed-price rules (about 5 times faster)",
        ),
    ] = True,
) -> None:
    """Simulate a scenario in-process on the live policies, market and ledger; print each
    site's settled cost and the feeder's 15-minute peak."""
    out = Console(width=None if sys.stdout.isatty() else 120)
    err = Console(stderr=True)
    if ledger is not None and ledger.exists():
        err.print(f"[red]error:[/red] {ledger} exists: give a new file for the ledger")
        raise typer.Exit(2)
    try:
        config = load_scenario(scenario)
        if start is not None:
            config = config.model_copy(update={"start": _start(start)})
        replay = _replay(csv or [])
        edges = None
        if not plan:
            edges = {
                name: e.model_copy(update={"plan": e.plan.model_copy(update={"enabled": False})})
                for name, e in default_edge_configs(config, step_s).items()
            }
        result = run_backtest(
            config,
            days=days,
            ledger_path=ledger,
            step_s=step_s,
            variant=variant,  # type: ignore[arg-type]  # checked by the engine
            replay=replay,
            history_days=history_days,
            edges=edges,
            progress=lambda f: err.print(f"simulated {100 * f:5.1f} %", highlight=False),
        )
    except (ScenarioError, BacktestError, ReplayError) as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    print_result(result, out)


def _replay(items: list[str]) -> dict[str, Series]:
    """``--csv SITE=FILE`` options read."""
    replay = {}
    for item in items:
        site, sep, file = item.partition("=")
        if not sep or not site or not file:
            raise BacktestError(f"--csv takes SITE=FILE, got {item!r}")
        replay[site] = read_series(Path(file))
    return replay


def _start(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise BacktestError(f"--start {text!r} is not an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def print_result(result: BacktestResult, console: Console) -> None:
    """The result as the command prints it."""
    days = (result.end_ts - result.start_ts) / 86_400
    console.print(
        f"{result.scenario} ({result.variant}): {days:g} simulated day(s), "
        f"{result.intervals} settled intervals, step {result.step_s:g} s",
        highlight=False,
    )
    console.print(
        f"{'site':<12} {'settled cost':>13} {'utility alone':>14} {'import kWh':>11} "
        f"{'export kWh':>11} {'stored kWh start -> end':>24}",
        highlight=False,
    )
    for s in result.sites.values():
        console.print(
            f"{s.site:<12} {s.net_cost:>13.2f} {s.baseline_cost:>14.2f} {s.import_kwh:>11.1f} "
            f"{s.export_kwh:>11.1f} {s.stored_start_kwh:>11.1f} -> {s.stored_end_kwh:>9.1f}",
            highlight=False,
        )
    console.print(f"{'community':<12} {result.total_cost:>13.2f}", highlight=False)
    console.print(
        f"feeder 15-minute peak import: {result.feeder_peak_w / 1000:.1f} kW "
        f"(limit {result.feeder_limit_w / 1000:.0f} kW); grid dispatches: {result.dispatches}",
        highlight=False,
    )
    console.print(
        f"ledger balanced: {'yes' if result.ledger_balanced else 'NO'}; "
        f"wall time {result.wall_s:.2f} s",
        highlight=False,
    )
