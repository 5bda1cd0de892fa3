"""The economics yardstick: wattmesh against what the sites would do without it, on the stepped
engine (``wattmesh.backtest``), in both settlement regimes and against both baselines.

Run: ``python benchmarks/economics.py [--days 7] [--seeds 7 8 9] [--quick] [--no-weather]``.
``--quick`` is one summer day, one seed, the time-of-use tariff: a check that everything runs.
``--no-weather``: the coordinator forecasts PV from history alone, without the simulated weather
service's forecasts (``wattmesh/weather.py``).

Each run is the five-site community (``config/scenarios/community.toml``) from a season's
Monday for ``--days`` days with one seed and one tariff, three times on the same weather and
loads:

- ours: wattmesh (bids, market clearing, grid balancing, dispatch);
- (i) idle: no market, no balancing, every battery idle;
- (ii) local: no market, no balancing, every battery under its own site's controller (self-
  consumption; the factory's keeps its peak-shaving configuration): what an owner would run
  anyway. This is the baseline the headline compares with.

Each run's metered energy per site and 15-minute interval is billed the same way for all three,
in each regime (``coordinator.sharing``):

- (a) one connection point: the utility bills the feeder's net at retail / feed-in;
- (b) energy sharing with individual meters: each site with its own supplier at the same
  tariffs; energy one site exports while another imports in the same interval is shared at the
  local price (the mid-point of retail and feed-in) plus ``--local-charge`` per kWh of network
  charge for the receiver.

Battery energy at the end is valued the same way for everyone: each kWh stored beyond (short
of) the run's start is credited (charged) at the last interval's retail tariff divided by the
site's charge efficiency, the price of putting it back.

Tariffs: ``tou`` (the demo's: 0.32 from 07:00 to 22:00 local, 0.22 at night, feed-in 0.08),
``flat`` (0.30, feed-in 0.08) and ``industrial``: the ``tou`` energy prices plus a demand
charge of 15 per kW-month (prorated to the run) on the largest 15-minute mean import, the
structure of US commercial and industrial tariffs (PG&E's B-19) and of the German grid fee
for interval-metered customers (Leistungspreis). In regime (b) the factory alone is on it (its
own meter's peak); in regime (a) the connection point is (the feeder's peak), as an industrial
park behind one meter would be. The engine runs for ``industrial`` are the ``tou`` runs (the
market clears on the same energy prices; wattmesh does not know of the demand charge).

The perfect-foresight LP per run (:func:`wattmesh.foresight.perfect_foresight`): the cheapest
schedule of every battery over the whole run, knowing every load, PV output and price, within
each battery's power, energy and efficiencies, the feeder's limits as constraints (10 per kWh
beyond them when they cannot be kept), its stored energy valued as above, and in each regime's
and tariff's terms. Its schedule is billed by the same functions as the others. ``captured``
is the share of the LP's improvement over (ii) that ours captures (n/a when the LP improves on
(ii) by less than 1: e.g. when keeping the feeder's limit costs the LP more than (ii) pays).
The feeder's 15-minute peak import and the energy above its limit are printed for ours, (ii)
and the LP. Today's figures are printed as they are, poor or not.

``bound``, the feeder-goal bound: the cheapest cost of any schedule meeting issue #10's feeder
goal, "at most 5 % above the import limit in any 15-minute interval and at most 10 % of (ii)'s
energy above it", the goal that applies in runs where the LP keeps every 15-minute mean within
the limit (printed only for those; ``-`` elsewhere). It is the same LP with that slack free
(``over_limit_cap_kwh`` = 5 % of the limit per interval, ``over_limit_budget_kwh`` = 10 % of
(ii)'s energy above the limit over the run; the feeder's flow is the sum of the sites' metered
energy in both regimes), its schedule billed as the LP's is. With the same tariffs at every
site the LP's free allocation of shared energy bills as the pro-rata rule does, so the billed
cost is the LP's optimum (the summary prints the largest gap between the two): no schedule
within the goal costs less, in the LP's model. The summary lists the runs where ``bound`` is
above (ii)'s cost: there no schedule meets both "no run costs more than (ii)" and the feeder
goal, and the runs where it is not, with how far ours is above the bound (room to improve).
In runs where the goal does not apply (the LP cannot keep the limit either) and ours costs more
than (ii), ``bound`` is marked ``*``: the held-feeder bound, the cheapest schedule that holds the
feeder at least as well as ours did (never above ours' 15-minute peak, no more energy above the
limit than ours). Above (ii) ("held costs"), ours costs more than (ii) only by holding the
feeder better than (ii) does; below it, ours has room to improve at the feeder it kept.
Caveat: the LP and the bound are a model (15-minute energies; each battery's rated power,
energy bounds and constant efficiencies; perfect foresight of loads and PV, which only lowers
the bound); the engine's physics runs at finer steps. Billing and the goal count 15-minute
energies, and a battery cannot do better within an interval than its net energy there, so the
model should be the more permissive of the two, but the bound is proved for the model only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from coordinator.config import CoordinatorConfig, TariffSection
from edge.config import EdgeConfig
from simulators.scenario import ScenarioConfig, load_scenario
from wattmesh.backtest import (
    BacktestResult,
    default_coordinator_config,
    default_edge_configs,
    run_backtest,
)
from wattmesh.economics import (
    FACTORY,
    INTERVALS_PER_H,
    Contract,
    Figures,
    captured_pct,
    figures,
    measure,
    saving_pct,
    value_per_kwh,
)
from wattmesh.foresight import LpBattery, perfect_foresight

SCENARIO = Path(__file__).resolve().parents[1] / "config" / "scenarios" / "community.toml"
#: A Monday in each season (the profiles know weekdays from weekends).
SEASONS = {
    "summer": datetime.fromisoformat("2026-06-22T00:00:00+00:00"),
    "autumn": datetime.fromisoformat("2026-09-21T00:00:00+00:00"),
    "winter": datetime.fromisoformat("2026-12-21T00:00:00+00:00"),
}
TARIFFS: dict[str, dict[str, Any] | None] = {
    "tou": None,  # the demo's, as default_coordinator_config has it
    "flat": {"retail_per_kwh": 0.30, "feed_in_per_kwh": 0.08, "periods": []},
    "industrial": None,  # the demo's energy prices plus the factory's demand charge
}
REGIMES = ("a", "b")
#: The industrial contract's demand charge, per kW of the month's largest 15-minute mean
#: import (the structure of US commercial and industrial tariffs such as PG&E's B-19, and of
#: the German grid fee for interval-metered customers, the Leistungspreis), prorated to the run.
DEMAND_CHARGE_PER_KW_MONTH = 15.0
#: Days of history the coordinator has at the start (a running one keeps a week).
HISTORY_DAYS = 7.0
#: The LP's penalty per kWh of feeder flow beyond a limit: high enough that it keeps to the
#: limits whenever it can.
OVER_LIMIT_PER_KWH = 10.0
#: Issue #10's feeder goal: at most this share of the import limit above it in any interval,
GOAL_OVER_PER_INTERVAL = 0.05
#: and at most this share of (ii)'s energy above the limit over the run.
GOAL_OVER_SHARE_OF_LOCAL = 0.10
#: Energy above the limit (kWh over the run) the LP may leave and still count as keeping it
#: (the solver's tolerance).
KEPT_KWH = 1e-3


def demand_charge_per_kw(tariff: str, days: float) -> float:
    """The industrial contract's demand charge for a run of ``days``, per kW."""
    return DEMAND_CHARGE_PER_KW_MONTH * days / 30.0 if tariff == "industrial" else 0.0


def foresight(
    result: BacktestResult,
    contract: Contract,
    export_limit_w: float,
    *,
    over_limit_cap_kwh: float = 0.0,
    over_limit_budget_kwh: float = np.inf,
) -> tuple[Figures, float]:
    """The perfect-foresight LP on the run's loads, PV, batteries and tariffs, billed as the
    run is (the LP's own pro-rata-free sharing replaced by the real allocation), and the LP's
    own objective (currency); import above the feeder's limit free within the allowance
    (kWh per interval, kWh over the run; none by default)."""
    names = sorted(result.net_kwh)
    net = np.array([result.net_kwh[n] for n in names])
    batteries = [
        LpBattery(
            site=names.index(name),
            capacity_wh=b.capacity_wh,
            rated_power_w=b.rated_power_w,
            soc_pct=b.soc_pct,
            soc_min_pct=b.soc_min_pct,
            soc_max_pct=b.soc_max_pct,
            charge_efficiency=b.charge_efficiency,
            discharge_efficiency=b.discharge_efficiency,
            stored_value_per_kwh=value_per_kwh(result, name),
        )
        for name in names
        for b in result.batteries[name]
    ]
    retail, feed_in = result.retail_per_kwh, result.feed_in_per_kwh
    demand: float | NDArray[np.float64] = contract.demand_charge_per_kw
    if contract.regime == "b":
        demand = np.where(np.array(names) == FACTORY, contract.demand_charge_per_kw, 0.0)
    lp = perfect_foresight(
        net,
        batteries,
        interval_h=0.25,
        regime="a" if contract.regime == "a" else "b",
        retail_per_kwh=retail,
        feed_in_per_kwh=feed_in,
        local_price_per_kwh=(retail + feed_in) / 2.0,
        local_network_charge_per_kwh=contract.local_charge_per_kwh,
        import_limit_kwh=result.feeder_limit_w / 1000.0 * 0.25,
        export_limit_kwh=export_limit_w / 1000.0 * 0.25,
        over_limit_per_kwh=OVER_LIMIT_PER_KWH,
        demand_charge_per_kw=demand,
        over_limit_cap_kwh=over_limit_cap_kwh,
        over_limit_budget_kwh=over_limit_budget_kwh,
    )
    gained = sum(
        (float(lp.stored_kwh[j, -1]) - b.stored_kwh) * b.stored_value_per_kwh
        for j, b in enumerate(batteries)
    )
    return measure(result, lp.metered_kwh, gained, contract), lp.objective


def feeder_goal_bound(
    result: BacktestResult, contract: Contract, export_limit_w: float, local_above_kwh: float
) -> tuple[Figures, float]:
    """The cheapest schedule meeting the feeder goal (see the module's docstring), billed,
    and the LP's objective: import above the limit free up to ``GOAL_OVER_PER_INTERVAL`` of
    the limit per interval and ``GOAL_OVER_SHARE_OF_LOCAL`` of (ii)'s ``local_above_kwh``."""
    limit_kwh = result.feeder_limit_w / 1000.0 / INTERVALS_PER_H
    return foresight(
        result,
        contract,
        export_limit_w,
        over_limit_cap_kwh=GOAL_OVER_PER_INTERVAL * limit_kwh,
        over_limit_budget_kwh=GOAL_OVER_SHARE_OF_LOCAL * local_above_kwh,
    )


def held_feeder_bound(
    result: BacktestResult, contract: Contract, export_limit_w: float, ours: Figures
) -> tuple[Figures, float]:
    """The cheapest schedule that holds the feeder at least as well as ours did (no interval
    above ours' peak, no more energy above the limit than ours), billed, and the LP's
    objective: for runs where the feeder goal does not apply (the LP cannot keep the limit)."""
    limit_kw = result.feeder_limit_w / 1000.0
    return foresight(
        result,
        contract,
        export_limit_w,
        over_limit_cap_kwh=max(ours.peak_kw - limit_kw, 0.0) / INTERVALS_PER_H,
        over_limit_budget_kwh=ours.above_limit_kwh,
    )


def coordinator_for(scenario: ScenarioConfig, tariff: str) -> CoordinatorConfig:
    """The default coordinator with the named tariff (its ledger path is not used)."""
    config = default_coordinator_config(scenario, Path("unused.sqlite"), 60.0)
    override = TARIFFS[tariff]
    if override is None:
        return config
    return config.model_copy(update={"tariff": TariffSection.model_validate(override)})


def industrial_edges(scenario: ScenarioConfig) -> dict[str, EdgeConfig]:
    """The demo's edges with the factory planning to keep its import under its peak-shaving
    cap (``[plan] peak_import_w``), as a factory on a demand charge would configure it."""
    edges = default_edge_configs(scenario, 60.0)
    factory = edges[FACTORY]
    cap = factory.fallback.import_cap_w
    plan = factory.plan.model_copy(update={"peak_import_w": cap})
    edges[FACTORY] = factory.model_copy(update={"plan": plan})
    return edges


@dataclass
class GoalBounds:
    """The feeder-goal bound in each run where the goal applies: ``rows`` of (run, bound,
    (ii)'s cost, ours), currency, and ``gap``, the largest |billed bound - LP objective|."""

    rows: list[tuple[str, float, float, float]] = field(default_factory=list)
    #: the same for the held-feeder bound, in runs where the goal does not apply and ours costs
    #: more than (ii)
    held: list[tuple[str, float, float, float]] = field(default_factory=list)
    gap: float = 0.0

    def add(
        self,
        name: str,
        run: BacktestResult,
        contract: Contract,
        export_limit_w: float,
        costs: tuple[Figures, Figures, Figures],
    ) -> str:
        """The ``bound`` column of one run in one regime, whose (LP, (ii), ours) figures are
        ``costs``: ``-`` unless the LP keeps every 15-minute mean within the limit."""
        lp, local, ours = costs
        if lp.above_limit_kwh > KEPT_KWH:
            if ours.cost <= local.cost or ours.above_limit_kwh <= 0.0:
                return "-"
            held, objective = held_feeder_bound(run, contract, export_limit_w, ours)
            self.gap = max(self.gap, abs(held.cost - objective))
            self.held.append((name, held.cost, local.cost, ours.cost))
            return f"{held.cost:.2f}*"
        goal, objective = feeder_goal_bound(run, contract, export_limit_w, local.above_limit_kwh)
        self.gap = max(self.gap, abs(goal.cost - objective))
        self.rows.append((name, goal.cost, local.cost, ours.cost))
        return f"{goal.cost:.2f}"

    def print(self) -> None:
        """Each run's bounds against (ii), and the runs where the goals cannot both be met."""
        if self.rows:
            print(
                f"feeder-goal bound (cheapest schedule at most {100 * GOAL_OVER_PER_INTERVAL:.0f} "
                f"% over the limit per interval and {100 * GOAL_OVER_SHARE_OF_LOCAL:.0f} % of "
                f"(ii)'s energy above it; billed vs the LP's objective: {self.gap:.4f} apart at "
                "most):"
            )
            apart = [row for row in self.rows if row[1] > row[2]]
            print(
                f"  {len(apart)} of {len(self.rows)} runs incompatible (bound above (ii): no "
                "schedule meets both 'no run costs more than (ii)' and the feeder goal, in the "
                "LP's model)"
            )
            _print_bounds(self.rows, "incompatible")
        else:
            print("feeder-goal bound: no run where the LP keeps every 15-minute mean in the limit")
        if self.held:
            print(
                "held-feeder bound* (runs where the LP cannot keep the limit and ours costs more "
                "than (ii): the cheapest schedule never above ours' peak and with no more energy "
                "above the limit than ours):"
            )
            _print_bounds(self.held, "held costs")


def _print_bounds(rows: list[tuple[str, float, float, float]], above: str) -> None:
    """A line per run: its bound against (ii)'s cost and ours against the bound."""
    for name, bound, local, ours in rows:
        verdict = above if bound > local else "compatible"
        print(
            f"  {name:<28} {verdict:<12} bound - (ii) {bound - local:+8.2f} "
            f"({100.0 * (bound - local) / abs(local):+.2f} %); ours - bound {ours - bound:+8.2f}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line's options (``--quick`` applied)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--days", type=float, default=7.0, help="simulated days per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    parser.add_argument("--seasons", nargs="+", default=list(SEASONS), choices=list(SEASONS))
    parser.add_argument("--tariffs", nargs="+", default=list(TARIFFS), choices=list(TARIFFS))
    parser.add_argument(
        "--local-charge", type=float, default=0.03, help="regime (b) network charge per kWh"
    )
    parser.add_argument("--quick", action="store_true", help="one summer day, one seed, tou")
    parser.add_argument(
        "--weather",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the simulated weather service's forecasts in the coordinator's PV forecasts",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.days, args.seeds, args.seasons, args.tariffs = 1.0, [7], ["summer"], ["tou"]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every season, seed and tariff; print each run and the summary."""
    args = parse_args(argv)
    base = load_scenario(SCENARIO)
    wall0 = time.perf_counter()
    print(
        f"economics: {len(base.sites)} sites, {args.days:g} days per run, seeds "
        f"{' '.join(map(str, args.seeds))}; weather forecast {'on' if args.weather else 'off'}; "
        "costs in currency with stored energy valued; "
        "saving in % of the baseline's cost; captured: share of the LP's improvement over "
        "(ii) that ours captures",
        flush=True,
    )
    print(
        f"{'season':<7} {'seed':>4} {'tariff':<10} {'reg':<3} {'ours':>9} {'(i) idle':>9} "
        f"{'(ii) local':>10} {'LP':>9} {'bound':>9} {'vs (i) %':>8} {'vs (ii) %':>9} "
        f"{'captured %':>10} {'peak kW ours/(ii)/LP':>22} {'kWh over limit ours/(ii)/LP':>29} "
        f"{'wall s':>7}"
    )
    savings: dict[tuple[str, str], list[float]] = {}
    captured: dict[tuple[str, str], list[float]] = {}
    week_wall: list[float] = []
    bounds = GoalBounds()
    for season in args.seasons:
        for seed in args.seeds:
            scenario = base.model_copy(update={"start": SEASONS[season], "seed": seed})
            done: dict[str, dict[str, BacktestResult]] = {}
            for tariff in args.tariffs:
                config = coordinator_for(scenario, tariff)
                t0 = time.perf_counter()
                engine_tariff = "tou" if tariff == "industrial" else tariff  # same energy prices
                if engine_tariff not in done:
                    done[engine_tariff] = {
                        v: run_backtest(
                            scenario,
                            days=args.days,
                            coordinator=config,
                            variant=v,
                            history_days=HISTORY_DAYS,
                            weather=args.weather,
                        )
                        for v in ("wattmesh", "idle", "self_consumption")
                    }
                    week_wall.append(done[engine_tariff]["wattmesh"].wall_s)
                runs = done[engine_tariff]
                if tariff == "industrial":
                    # the factory on a demand charge plans to its peak target
                    runs = {
                        **runs,
                        "wattmesh": run_backtest(
                            scenario,
                            days=args.days,
                            coordinator=config,
                            edges=industrial_edges(scenario),
                            history_days=HISTORY_DAYS,
                            weather=args.weather,
                        ),
                    }
                for regime in REGIMES:
                    contract = Contract(
                        regime, args.local_charge, demand_charge_per_kw(tariff, args.days)
                    )
                    f = {v: figures(r, contract) for v, r in runs.items()}
                    lp, _ = foresight(runs["wattmesh"], contract, config.grid.export_limit_w)
                    ours, idle, local = f["wattmesh"], f["idle"], f["self_consumption"]
                    bound_text = bounds.add(
                        f"{season} seed {seed} {tariff} ({regime})",
                        runs["wattmesh"],
                        contract,
                        config.grid.export_limit_w,
                        (lp, local, ours),
                    )
                    if abs(local.cost) >= 1.0:
                        savings.setdefault((season, regime), []).append(
                            100.0 * (local.cost - ours.cost) / abs(local.cost)
                        )
                    share = captured_pct(ours.cost, local.cost, lp.cost)
                    if share is not None:
                        captured.setdefault((season, regime), []).append(share)
                    print(
                        f"{season:<7} {seed:>4} {tariff:<10} {regime:<3} {ours.cost:>9.2f} "
                        f"{idle.cost:>9.2f} {local.cost:>10.2f} {lp.cost:>9.2f} "
                        f"{bound_text:>9} "
                        f"{saving_pct(ours.cost, idle.cost):>8} "
                        f"{saving_pct(ours.cost, local.cost):>9} "
                        f"{'n/a' if share is None else f'{share:+.0f}':>10} "
                        f"{ours.peak_kw:>8.1f}/{local.peak_kw:.1f}/{lp.peak_kw:<.1f} "
                        f"{ours.above_limit_kwh:>11.1f}/{local.above_limit_kwh:.1f}/"
                        f"{lp.above_limit_kwh:<.1f} "
                        f"{time.perf_counter() - t0:>7.1f}",
                        flush=True,
                    )
    limit_kw = default_coordinator_config(base, Path("unused"), 60.0).grid.import_limit_w / 1e3
    print(f"\nfeeder import limit {limit_kw:.0f} kW")
    print("against (ii) local control, over seeds and tariffs (saving in % of its cost):")
    for key, values in savings.items():
        season, regime = key
        shares = captured.get(key, [])
        captured_text = (
            f"; captured of the LP's improvement: mean {statistics.fmean(shares):+.0f} %, "
            f"worst {min(shares):+.0f} %"
            if shares
            else ""
        )
        print(
            f"  {season:<7} regime ({regime}): saving mean {statistics.fmean(values):+.1f} %, "
            f"worst {min(values):+.1f} % ({len(values)} runs){captured_text}"
        )
    bounds.print()
    print(
        f"wall time: {time.perf_counter() - wall0:.1f} s in all; wattmesh on the engine "
        f"{max(week_wall):.2f} s at most per {args.days:g}-day run (median "
        f"{statistics.median(week_wall):.2f} s, least {min(week_wall):.2f} s over "
        f"{len(week_wall)} runs)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
