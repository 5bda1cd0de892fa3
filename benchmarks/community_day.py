"""Benchmark a simulated day of the community against its baseline and a perfect-foresight LP.

Run: ``python benchmarks/community_day.py [--speed 800] [--hours 24] [--seed N] [--quick]``.
It runs the demo's built-in community (``wattmesh demo``'s plumbing: Mosquitto, every device as
a Modbus server, an edge agent per site, the coordinator and its ledger, on a ScaledClock) and
prints, next to the goals (MISSED when one is not met):

- cost saving: baseline cost minus the community's cost, in % of the baseline (goal >= 20 %);
- feeder peak import reduction against the baseline, on 15-minute means (goal >= 30 %; see
  "Feeder peak" below);
- ours as a share of the saving a perfect-foresight schedule reaches (goal >= 80 %);
- wall time of the run, per simulated day (goal < 120 s; the default 800x takes 108 s of
  scaled clock per day, and the run must keep up with it).

``--quick`` is 6 simulated hours at 1440x, a check that everything works. Exit status: 0 when
every goal is met, 1 when one is missed, 2 when the run could not be measured (nothing
settled, an unbalanced ledger, interrupted).

The three costs (currency, over the run's settled market intervals)
-------------------------------------------------------------------
- Baseline (docs/architecture.md section 6): every site billed alone by the utility at the
  tariffs, no trading, batteries idle: ``wattmesh.demo.baseline`` (simulators stepped every 60 s).
- Ours: the sum of the sites' settled costs in the ledger (``wattmesh.demo._report``), i.e.
  the utility's bill of the feeder plus what the community account kept after paying its
  surplus back to the sites (the coordinator's ``[market] rebate``, on by default: then only
  rounding is kept). The goals use this; the output also shows the saving and the share on the
  utility bill alone, and what the community account kept.
- Perfect foresight: the minimum utility bill of the netted feeder flow with every battery
  scheduled optimally, knowing the day's true PV and load (``coordinator.schedule``): the
  utility bills the community's net exchange at the feeder (retail on import, feed-in on
  export) and trading among the sites nets their flows, so where a battery sits does not
  matter. Its inputs come from the same simulators with the batteries idle (one pass like the
  baseline's, recording each site's ``load_w`` and ``pv_w`` every 60 s; the pass re-derives the
  baseline's costs as a check), averaged over the 15-minute market intervals, which are what
  the ledger bills: the LP's steps are those intervals, so it prices each interval's energy as
  the ledger's utility posting does. Each battery keeps its scenario limits (capacity, rated
  power, SOC bounds, charge and discharge efficiencies, initial SOC), including the factory's,
  which our system keeps for peak shaving. The feeder's import and export limits
  (``wattmesh.demo.COORDINATOR["grid"]``) bound the flow, with a slack at 100 per kWh so the LP
  stays feasible; the output says whether the slack was needed. PV is not curtailed.

  LP, per battery b and interval t (h = 0.25 h): charge c, discharge d in [0, rated power];
  stored energy e[t] = e[t-1] + h (eta_c c[t] - d[t] / eta_d) within the SOC bounds; per
  interval import, export >= 0 with import - export = sum of the sites' (load - pv) +
  sum_b (c - d); minimise sum_t h (retail[t] import[t] - feed_in[t] export[t]) + slack
  penalties - stored-energy value (below). Solved with scipy's HiGHS (well under a second).

End of the day: stored energy is valued, the same way for ours and the LP
-------------------------------------------------------------------------
The batteries may end the day with more or less energy than they started with. Each kWh
stored at the end beyond (short of) the start is credited (charged) at the price of putting it
back: the retail tariff of the last interval divided by the battery's charge efficiency (the
default day ends at 01:00 local, off-peak: 0.22 / 0.95). The LP optimises that credit together
with the bill; ours gets it from the SOC its sites report (edge telemetry, capacity-weighted per
site; the demo samples it every 0.5 s of wall time, so the sample nearest the end of the span
is moved on to it at the battery power reported with it). The baseline's batteries are idle, so
its credit is zero. The "ours" and "perfect foresight" costs below include the credit; the
output also shows ours without it and, for reference, the LP with a hard end rule instead
(every battery ends with at least its initial energy). Both start from the scenario's SOC (or
the reported one when the first interval did not settle).

Ours is billed on the energy the ledger metered (the coordinator integrates the sites'
telemetry), the baseline and the LP on the simulators' energy. For the sites without a battery
both should agree; the output prints how far apart they are, over the span and in its last
interval (the agents stop at the end, so that interval may be metered short).

Feeder peak
-----------
The peak the goal is checked on is the largest 15-minute mean import at the feeder (what
demand charges bill, and what a 15-minute market and its balancing can act on): ours from the
ledger's metered energy per interval (the feeder's net), the baseline's from the profile pass,
so both are measured the same way. The highest flow the demo sampled (the coordinator's view,
every 0.5 s of wall time, against the baseline's 1-minute steps) is printed for information,
not as a goal: at 800x one poll of the sites (0.1 s of wall time) is 80 simulated seconds,
and the grid loop orders again only on a reading taken after its last order, so it answers
within two to three polls, 3-4 simulated minutes in which a cloud passing over the solar farm
moves the feeder by tens of kW; at real time the same loop answers within a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from rich.console import Console

from broker.clock import ManualClock
from broker.errors import BrokerError
from broker.mosquitto import find_mosquitto
from coordinator.config import CoordinatorConfig
from coordinator.ledger import Ledger, to_currency
from coordinator.schedule import Battery, Schedule, interval_means, perfect_foresight
from simulators.scenario import BatteryConfig, ScenarioConfig, stepped_sites
from wattmesh.demo import (
    COORDINATOR,
    Run,
    _coordinator_config,
    _report,
    _rtu_over_tcp,
    _run,
    _settled_span,
    baseline,
    builtin_scenario,
)

GOAL_SAVING_PCT = 20.0
GOAL_PEAK_REDUCTION_PCT = 30.0
GOAL_SHARE_OF_FORESIGHT_PCT = 80.0
GOAL_WALL_S_PER_DAY = 120.0
INTERVAL_S = 900.0
PROFILE_STEP_S = 60.0
POLL_S = 0.1


@dataclass
class Profiles:
    """Each site's load and PV (W) at every profile step, batteries idle."""

    start_ts: float
    step_s: float
    load_w: dict[str, NDArray[np.float64]]
    pv_w: dict[str, NDArray[np.float64]]


def profiles(scenario: ScenarioConfig, start_ts: float, end_ts: float) -> Profiles:
    """Step the scenario's simulators like ``wattmesh.demo.baseline`` and record load and PV."""
    clock = ManualClock(start_ts)
    sites = stepped_sites(scenario, clock)
    n = math.ceil((end_ts - start_ts) / PROFILE_STEP_S - 1e-9)
    load_w = {name: np.zeros(n) for name in sites}
    pv_w = {name: np.zeros(n) for name in sites}
    for k in range(n):
        clock.ts = start_ts + k * PROFILE_STEP_S
        for name, site in sites.items():
            site.advance()
            load_w[name][k] = site.load_w
            pv_w[name][k] = site.pv_w
    return Profiles(start_ts, PROFILE_STEP_S, load_w, pv_w)


def profile_costs(p: Profiles, config: CoordinatorConfig) -> dict[str, float]:
    """Each site billed alone at the tariffs from the profiles (what ``baseline`` computes)."""
    n = len(next(iter(p.load_w.values())))
    tariffs = np.array(
        [
            config.tariff.at(p.start_ts + k * p.step_s, config.coordinator.utc_offset_h)
            for k in range(n)
        ]
    ).reshape(n, 2)
    costs = {}
    for name in p.load_w:
        kwh = (p.load_w[name] - p.pv_w[name]) * p.step_s / 3.6e6
        costs[name] = float(np.sum(kwh * np.where(kwh > 0, tariffs[:, 0], tariffs[:, 1])))
    return costs


@dataclass(frozen=True)
class Storage:
    """A site's batteries taken together (capacity-weighted SOC and efficiencies)."""

    capacity_wh: float
    soc_pct: float  # the scenario's initial SOC
    charge_efficiency: float
    discharge_efficiency: float


def batteries_of(scenario: ScenarioConfig) -> list[tuple[str, BatteryConfig]]:
    """(site, battery) for every battery in the scenario."""
    return [(s.id, d) for s in scenario.sites for d in s.devices if isinstance(d, BatteryConfig)]


def storage_of(scenario: ScenarioConfig) -> dict[str, Storage]:
    """Each site with batteries: its batteries taken together."""
    out = {}
    for site in sorted({s for s, _ in batteries_of(scenario)}):
        mine = [b for s, b in batteries_of(scenario) if s == site]
        capacity = np.array([b.capacity_wh for b in mine])
        weights = capacity / capacity.sum()
        out[site] = Storage(
            float(capacity.sum()),
            float(np.dot(weights, [b.soc_pct for b in mine])),
            float(np.dot(weights, [b.charge_efficiency for b in mine])),
            float(np.dot(weights, [b.discharge_efficiency for b in mine])),
        )
    return out


@dataclass
class LedgerFigures:
    """What the ledger says about the settled span."""

    intervals: int
    utility_bill: float  # what the community paid the utility, net
    peak_w: float  # largest interval mean of the feeder's metered net import
    metered_wh: dict[str, NDArray[np.float64]]  # per site and interval of the span


def ledger_figures(out: Path, span: tuple[float, float], sites: list[str]) -> LedgerFigures:
    """Read the settled intervals inside ``span`` (900-s intervals from its start)."""
    n = round((span[1] - span[0]) / INTERVAL_S)
    metered = {site: np.zeros(n) for site in sites}
    bill_micro, peak_w, count = 0, -math.inf, 0
    with Ledger(out / "ledger.sqlite") as ledger:
        for i in ledger.settled_intervals():
            k = round((i * INTERVAL_S - span[0]) / INTERVAL_S)
            result = ledger.settlement(i)
            if result is None or not 0 <= k < n:
                continue
            count += 1
            bill_micro += result.utility_micro
            peak_w = max(peak_w, result.community_net_wh * 3600.0 / INTERVAL_S)
            for s in result.sites:
                if s.site in metered:
                    metered[s.site][k] = s.metered_wh
    return LedgerFigures(count, float(to_currency(bill_micro)), peak_w, metered)


def soc_at(run: Run, site: str, ts: float, storage: Storage) -> float | None:
    """The site's SOC (%) at ``ts`` from its telemetry: the sample nearest to ``ts``, moved on
    (or back) to ``ts`` at the battery power it reported then (the demo samples the telemetry
    every 0.5 s of wall time, 400 simulated seconds at 800x)."""
    rows = [r for r in run.rows if r["site"] == site and r["soc_pct"] is not None]
    if not rows:
        return None
    row = min(rows, key=lambda r: abs(r["ts"] - ts))
    power_w = float(row["battery_w"] or 0.0)
    eta = 1.0 / storage.discharge_efficiency if power_w > 0 else storage.charge_efficiency
    change_wh = -power_w * eta * (ts - row["ts"]) / 3600.0
    return float(min(100.0, max(0.0, row["soc_pct"] + 100.0 * change_wh / storage.capacity_wh)))


def metering_error_pct(
    true_wh: dict[str, NDArray[np.float64]], led: LedgerFigures, sites: list[str]
) -> tuple[float, float]:
    """For ``sites`` (those without batteries): the ledger's metered energy against the
    simulators' per interval, as % of the true energy moved: (all intervals, the last one)."""
    if not sites:
        return math.nan, math.nan
    err = np.sum([np.abs(true_wh[s] - led.metered_wh[s]) for s in sites], axis=0)
    size = np.sum([np.abs(true_wh[s]) for s in sites], axis=0)
    return _pct(float(err.sum()), float(size.sum())), _pct(float(err[-1]), float(size[-1]))


def interval_net_wh(p: Profiles) -> dict[str, NDArray[np.float64]]:
    """Each site's load minus PV (batteries idle) per 900-s interval, Wh."""
    per = round(INTERVAL_S / p.step_s)
    return {
        name: interval_means(p.load_w[name] - p.pv_w[name], per) * INTERVAL_S / 3600.0
        for name in p.load_w
    }


def foresight(
    scenario: ScenarioConfig,
    config: CoordinatorConfig,
    p: Profiles,
    soc_start: dict[str, float],
    refill_retail: float | None,
) -> Schedule:
    """The perfect-foresight schedule over the profiles' span, each battery starting at its
    site's ``soc_start``. ``refill_retail`` None: hard end constraint instead of a credit."""
    net_w = np.sum(list(interval_net_wh(p).values()), axis=0) * 3600.0 / INTERVAL_S
    off = config.coordinator.utc_offset_h
    prices = np.array(
        [config.tariff.at(p.start_ts + k * INTERVAL_S, off) for k in range(net_w.size)]
    ).reshape(-1, 2)
    bats = batteries_of(scenario)
    return perfect_foresight(
        net_w,
        [
            Battery(
                b.capacity_wh,
                b.rated_power_w,
                min(b.soc_max_pct, max(b.soc_min_pct, soc_start.get(site, b.soc_pct))),
                b.soc_min_pct,
                b.soc_max_pct,
                b.charge_efficiency,
                b.discharge_efficiency,
            )
            for site, b in bats
        ],
        prices[:, 0],
        prices[:, 1],
        INTERVAL_S,
        import_limit_w=float(COORDINATOR["grid"]["import_limit_w"]),
        export_limit_w=float(COORDINATOR["grid"]["export_limit_w"]),
        end_value_per_kwh=(
            None
            if refill_retail is None
            else [refill_retail / b.charge_efficiency for _, b in bats]
        ),
    )


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / abs(whole) if whole else math.nan


def _credit(value: float) -> str:
    """``- x credit`` for stored energy beyond the start, ``+ x charge`` for a shortfall."""
    return f"- {value:.2f} credit" if value >= 0 else f"+ {-value:.2f} charge for energy short"


@dataclass
class Measured:
    """Everything the benchmark prints."""

    hours: float
    speed: float
    start_ts: float
    wall_s: float
    span: tuple[float, float]
    intervals: int
    table: str  # the demo's per-site report
    base_cost: float
    ours_settled: float
    ours_bill: float
    credit: float  # ours: value of the energy stored at the end beyond the start
    refill_retail: float
    soc_start: dict[str, float]
    soc_end: dict[str, float]
    metering_error: tuple[float, float]  # % (all intervals, the last), sites without batteries
    lp: Schedule
    lp_hard: Schedule
    lp_sites: list[str]
    lp_wall_s: float
    profile_mismatch: float
    peak_15_w: float
    base_peak_15_w: float
    peak_demo_w: float
    base_peak_demo_w: float

    @property
    def ours(self) -> float:
        return self.ours_settled - self.credit

    @property
    def saving_pct(self) -> float:
        return _pct(self.base_cost - self.ours, self.base_cost)

    @property
    def lp_saving_pct(self) -> float:
        return _pct(self.base_cost - self.lp.cost, self.base_cost)

    @property
    def share_pct(self) -> float:
        lp_saving = self.base_cost - self.lp.cost
        return _pct(self.base_cost - self.ours, lp_saving) if lp_saving > 0 else math.nan

    @property
    def wall_per_day_s(self) -> float:
        return self.wall_s * 24.0 / self.hours


def measure(
    scenario: ScenarioConfig, hours: float, speed: float, out: Path, embedded: bool
) -> Measured | str:
    """Run the community, then the baseline and the LPs; a reason when there is nothing."""
    started = time.perf_counter()
    run = asyncio.run(_run(scenario, hours, speed, POLL_S, out, Console(stderr=True), embedded))
    wall_s = time.perf_counter() - started
    if run.interrupted:
        return "interrupted"
    span = _settled_span(out, run, scenario.start_ts, INTERVAL_S)
    config = _coordinator_config(scenario, out, 1, POLL_S, speed)
    base = baseline(scenario, config, *span)
    table = Console(file=io.StringIO(), width=100)
    report = _report(out, base, run, table, config.market.interval_s)
    storage = storage_of(scenario)
    led = ledger_figures(out, span, [site.id for site in scenario.sites])
    if led.intervals == 0 or not report["balanced"]:
        return f"{led.intervals} settled intervals, ledger balanced: {report['balanced']}"

    started = time.perf_counter()
    prof = profiles(scenario, *span)
    check = profile_costs(prof, config)
    true_net_wh = interval_net_wh(prof)
    # The SOC at the start of the span: the scenario's, or (when the first interval did not
    # settle) the telemetry's; at its end: the telemetry's.
    soc_start: dict[str, float] = {}
    soc_end: dict[str, float] = {}
    for site, st in storage.items():
        reported = soc_at(run, site, span[0], st)
        soc_start[site] = (
            st.soc_pct if span[0] <= scenario.start_ts or reported is None else reported
        )
        end = soc_at(run, site, span[1], st)
        soc_end[site] = soc_start[site] if end is None else end
    refill_retail = config.tariff.at(span[1] - 1.0, config.coordinator.utc_offset_h)[0]
    lp = foresight(scenario, config, prof, soc_start, refill_retail)
    lp_hard = foresight(scenario, config, prof, soc_start, None)
    lp_wall_s = time.perf_counter() - started
    credit = sum(
        (soc_end[s] - soc_start[s])
        / 100.0
        * st.capacity_wh
        / 1000.0
        * refill_retail
        / st.charge_efficiency
        for s, st in storage.items()
    )
    base_net_w = np.sum(list(true_net_wh.values()), axis=0) * 3600.0 / INTERVAL_S
    return Measured(
        hours=hours,
        speed=speed,
        start_ts=scenario.start_ts,
        wall_s=wall_s,
        span=span,
        intervals=led.intervals,
        table=table.file.getvalue() if isinstance(table.file, io.StringIO) else "",
        base_cost=report["community"]["baseline_cost"],
        ours_settled=report["community"]["cost"],
        ours_bill=led.utility_bill,
        credit=credit,
        refill_retail=refill_retail,
        soc_start=soc_start,
        soc_end=soc_end,
        metering_error=metering_error_pct(
            true_net_wh, led, [x.id for x in scenario.sites if x.id not in storage]
        ),
        lp=lp,
        lp_hard=lp_hard,
        lp_sites=[s for s, _ in batteries_of(scenario)],
        lp_wall_s=lp_wall_s,
        profile_mismatch=max(abs(check[n] - base[n]["cost"]) for n in check),
        peak_15_w=led.peak_w,
        base_peak_15_w=float(np.max(base_net_w)),
        peak_demo_w=run.feeder_peak_w,
        base_peak_demo_w=base["_feeder"]["peak_import_w"],
    )


def print_costs(m: Measured) -> None:
    """The costs, the end SOCs, the LP's limits and timing, the peaks and the wall time."""
    lp, grid = m.lp, COORDINATOR["grid"]
    print(m.table, end="")
    print(
        f"settled intervals: {m.intervals} of the run's {round(m.hours * 3600 / INTERVAL_S)} "
        f"({(m.span[1] - m.span[0]) / 3600:g} h from "
        f"{(m.span[0] - m.start_ts) / 3600:g} h); ledger balanced: yes"
    )
    print(
        "\ncosts over the settled span (currency); energy stored at the end beyond the start "
        f"is credited at {m.refill_retail:.2f} / eta_c per kWh"
    )
    print(f"  baseline: sites alone, batteries idle     {m.base_cost:9.2f}")
    print(
        f"  ours: sum of settled site costs           {m.ours:9.2f}  = {m.ours_settled:.2f} "
        f"settled {_credit(m.credit)}; utility bill {m.ours_bill:.2f}, the community account "
        f"kept {m.ours_settled - m.ours_bill:.2f}"
    )
    print(
        f"  perfect foresight: LP, 15-min steps       {lp.cost:9.2f}  = {lp.bill:.2f} "
        f"utility bill {_credit(lp.stored_value)}"
    )
    print(
        f"  perfect foresight, end SOC >= start       {m.lp_hard.cost:9.2f}  "
        f"(saving {_pct(m.base_cost - m.lp_hard.cost, m.base_cost):.1f} %)"
    )
    ours = ", ".join(
        f"{s} {m.soc_start[s]:.0f}->{m.soc_end.get(s, math.nan):.0f}" for s in sorted(m.soc_start)
    )
    theirs = ", ".join(
        f"{s} {lp.soc_pct[i, 0]:.0f}->{lp.soc_pct[i, -1]:.0f}"
        f" ({m.lp_hard.soc_pct[i, -1]:.0f} hard-end)"
        for i, s in enumerate(m.lp_sites)
    )
    print(f"  SOC % start->end: ours {ours}; LP {theirs}")
    print(
        f"  ledger's metered energy vs the simulators' for the sites without batteries: "
        f"{m.metering_error[0]:.1f} % off over the span, {m.metering_error[1]:.1f} % in its last "
        "interval"
    )
    if lp.import_excess_w > 0 or lp.export_excess_w > 0:
        limits = (
            f"the LP had to exceed them (penalised slack): import by up to "
            f"{lp.import_excess_w / 1000:.1f} kW, export by up to "
            f"{lp.export_excess_w / 1000:.1f} kW"
        )
    else:
        limits = "the LP kept inside them"
    print(
        f"  feeder limits {grid['import_limit_w'] / 1000:.0f} kW import, "
        f"{grid['export_limit_w'] / 1000:.0f} kW export: {limits}"
    )
    print(
        f"  LP: {lp.feeder_w.size} intervals x {lp.battery_w.shape[0]} batteries; HiGHS "
        f"{lp.solve_s:.2f} s (+ {m.lp_hard.solve_s:.2f} s end-constrained); profile pass and "
        f"both LPs {m.lp_wall_s:.1f} s; the pass matches baseline() to {m.profile_mismatch:.0e}"
    )
    print(
        f"\nfeeder peak import: ours {m.peak_15_w / 1000:.1f} kW, baseline "
        f"{m.base_peak_15_w / 1000:.1f} kW (15-min means: ledger, profiles); demo's figures "
        f"{m.peak_demo_w / 1000:.1f} kW (sampled flow) vs {m.base_peak_demo_w / 1000:.1f} kW "
        f"(1-min); LP {float(np.max(lp.feeder_w)) / 1000:.1f} kW"
    )
    print(
        f"wall time: {m.wall_s:.1f} s for {m.hours:g} simulated hours at {m.speed:g}x (the "
        f"scaled clock alone: {m.hours * 3600.0 / m.speed:.1f} s)"
    )


def print_goals(m: Measured) -> list[str]:
    """The figures next to their goals; the names of the goals missed."""
    peak_15 = _pct(m.base_peak_15_w - m.peak_15_w, m.base_peak_15_w)
    peak_demo = _pct(m.base_peak_demo_w - m.peak_demo_w, m.base_peak_demo_w)
    rows: list[tuple[str, str, str, bool | None]] = [
        (
            "cost saving",
            f"{m.saving_pct:.1f} %",
            f">= {GOAL_SAVING_PCT:g} %",
            m.saving_pct >= GOAL_SAVING_PCT,
        ),
        (
            "  without the end-SOC adjustment",
            f"{_pct(m.base_cost - m.ours_settled, m.base_cost):.1f} %",
            "",
            None,
        ),
        (
            "  on the utility bill, credited",
            f"{_pct(m.base_cost - (m.ours_bill - m.credit), m.base_cost):.1f} %",
            "",
            None,
        ),
        (
            "feeder peak reduction, 15-min",
            f"{peak_15:.1f} %",
            f">= {GOAL_PEAK_REDUCTION_PCT:g} %",
            peak_15 >= GOAL_PEAK_REDUCTION_PCT,
        ),
        ("  highest sampled flow (information)", f"{peak_demo:.1f} %", "", None),
        ("perfect-foresight saving", f"{m.lp_saving_pct:.1f} %", "", None),
        (
            "ours as a share of it",
            f"{m.share_pct:.1f} %",
            f">= {GOAL_SHARE_OF_FORESIGHT_PCT:g} %",
            m.share_pct >= GOAL_SHARE_OF_FORESIGHT_PCT,
        ),
        (
            "  on the utility bill, credited",
            f"{_pct(m.base_cost - (m.ours_bill - m.credit), m.base_cost - m.lp.cost):.1f} %",
            "",
            None,
        ),
        (
            "wall time per simulated day",
            f"{m.wall_per_day_s:.1f} s",
            f"< {GOAL_WALL_S_PER_DAY:g} s",
            m.wall_per_day_s < GOAL_WALL_S_PER_DAY,
        ),
    ]
    print(f"\n{'':34}{'figure':>9}  {'goal':>9}")
    for name, figure, goal, ok in rows:
        status = "" if ok is None else "ok" if ok else "MISSED"
        print(f"{name:34}{figure:>9}  {goal:>9}  {status}")
    return [name for name, _, _, ok in rows if ok is False]


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run, print; the exit status of the module docstring."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--speed", type=float, default=800.0, help="simulated s per wall s")
    parser.add_argument("--hours", type=float, default=24.0, help="simulated hours")
    parser.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    parser.add_argument("--quick", action="store_true", help="6 simulated hours at 1440x")
    parser.add_argument("--out", type=Path, default=None, help="keep the ledger here")
    args = parser.parse_args(argv)
    hours, speed = (6.0, 1440.0) if args.quick else (args.hours, args.speed)

    scenario = builtin_scenario()
    if args.seed is not None:
        scenario = scenario.model_copy(update={"seed": args.seed})
    if shutil.which("socat") is None:
        scenario, _ = _rtu_over_tcp(scenario)
    try:
        find_mosquitto()
        embedded = False
    except BrokerError:
        embedded = True
    out = args.out or Path(tempfile.mkdtemp(prefix="wattmesh-community-day-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "ledger.sqlite").unlink(missing_ok=True)
    print(
        f"community day: {len(scenario.sites)} sites, {hours:g} simulated hours at {speed:g}x, "
        f"seed {scenario.seed}, broker "
        f"{'embedded (Mosquitto is not installed)' if embedded else 'Mosquitto'}",
        flush=True,
    )
    try:
        m = measure(scenario, hours, speed, out, embedded)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    if isinstance(m, str):
        print(f"nothing to measure: {m}")
        return 2
    print_costs(m)
    missed = print_goals(m)
    print(f"\n{len(missed)} goal(s) missed" + (f": {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
