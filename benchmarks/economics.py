"""The economics yardstick: wattmesh against what the sites would do without it, on the stepped
engine (``wattmesh.backtest``), in both settlement regimes and against both baselines.

Run: ``python benchmarks/economics.py [--days 7] [--seeds 7 8 9] [--quick]``. ``--quick`` is
one summer day, one seed, the time-of-use tariff: a check that everything runs.

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

Tariffs: ``tou`` (the demo's: 0.32 from 07:00 to 22:00 local, 0.22 at night, feed-in 0.08) and
``flat`` (0.30, feed-in 0.08). The feeder's 15-minute peak import and the energy above its
limit are printed for ours and (ii). Today's figures are printed as they are, poor or not.
The perfect-foresight LP per run and an industrial tariff for the factory are not in this
first version.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.config import CoordinatorConfig, TariffSection
from coordinator.sharing import connection_point_cost, energy_sharing_cost
from simulators.scenario import ScenarioConfig, load_scenario
from wattmesh.backtest import BacktestResult, default_coordinator_config, run_backtest

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
}
REGIMES = ("a", "b")


@dataclass(frozen=True)
class Figures:
    """One variant of one run, billed in one regime (currency; kW; kWh)."""

    cost: float  # including the value of the energy left in batteries
    peak_kw: float
    above_limit_kwh: float


def stored_value(result: BacktestResult) -> float:
    """The value (currency) of the battery energy gained over the run, at the last interval's
    retail tariff divided by each site's charge efficiency (negative when drained)."""
    if len(result.retail_per_kwh) == 0:
        return 0.0
    price = float(result.retail_per_kwh[-1])
    return sum(
        (s.stored_end_kwh - s.stored_start_kwh) * price / result.charge_efficiency[name]
        for name, s in result.sites.items()
    )


def figures(result: BacktestResult, regime: str, local_charge_per_kwh: float) -> Figures:
    """Bill a run's metered energy in ``regime`` and measure its feeder."""
    names = sorted(result.metered_kwh)
    metered = np.array([result.metered_kwh[n] for n in names])
    retail, feed_in = result.retail_per_kwh, result.feed_in_per_kwh
    if regime == "a":
        bill = float(
            connection_point_cost(metered, retail_per_kwh=retail, feed_in_per_kwh=feed_in).sum()
        )
    else:
        bill = float(
            energy_sharing_cost(
                metered,
                retail_per_kwh=retail,
                feed_in_per_kwh=feed_in,
                local_price_per_kwh=(retail + feed_in) / 2.0,
                local_network_charge_per_kwh=local_charge_per_kwh,
            ).sum()
        )
    feeder_kwh = metered.sum(axis=0)
    limit_kwh = result.feeder_limit_w / 1000.0 * 0.25
    return Figures(
        cost=bill - stored_value(result),
        peak_kw=float(feeder_kwh.max(initial=0.0)) * 4.0,
        above_limit_kwh=float(np.maximum(feeder_kwh - limit_kwh, 0.0).sum()),
    )


def coordinator_for(scenario: ScenarioConfig, tariff: str) -> CoordinatorConfig:
    """The default coordinator with the named tariff (its ledger path is not used)."""
    config = default_coordinator_config(scenario, Path("unused.sqlite"), 60.0)
    override = TARIFFS[tariff]
    if override is None:
        return config
    return config.model_copy(update={"tariff": TariffSection.model_validate(override)})


def saving_pct(ours: float, base: float) -> str:
    """Ours against a baseline in % of the baseline's cost, when that cost means something."""
    if abs(base) < 1.0:
        return "n/a"
    return f"{100.0 * (base - ours) / abs(base):+.1f}"


def main(argv: list[str] | None = None) -> int:
    """Run every season, seed and tariff; print each run and the summary."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--days", type=float, default=7.0, help="simulated days per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 8, 9])
    parser.add_argument("--seasons", nargs="+", default=list(SEASONS), choices=list(SEASONS))
    parser.add_argument("--tariffs", nargs="+", default=list(TARIFFS), choices=list(TARIFFS))
    parser.add_argument(
        "--local-charge", type=float, default=0.03, help="regime (b) network charge per kWh"
    )
    parser.add_argument("--quick", action="store_true", help="one summer day, one seed, tou")
    args = parser.parse_args(argv)
    if args.quick:
        args.days, args.seeds, args.seasons, args.tariffs = 1.0, [7], ["summer"], ["tou"]
    base = load_scenario(SCENARIO)
    wall0 = time.perf_counter()
    print(
        f"economics: {len(base.sites)} sites, {args.days:g} days per run, seeds "
        f"{' '.join(map(str, args.seeds))}; costs in currency with stored energy valued; "
        "saving in % of the baseline's cost",
        flush=True,
    )
    print(
        f"{'season':<7} {'seed':>4} {'tariff':<6} {'reg':<3} {'ours':>9} {'(i) idle':>9} "
        f"{'(ii) local':>10} {'vs (i) %':>9} {'vs (ii) %':>9} {'peak kW ours/(ii)':>18} "
        f"{'kWh over limit ours/(ii)':>25} {'wall s':>7}"
    )
    savings: dict[tuple[str, str], list[float]] = {}
    week_wall: list[float] = []
    for season in args.seasons:
        for seed in args.seeds:
            scenario = base.model_copy(update={"start": SEASONS[season], "seed": seed})
            for tariff in args.tariffs:
                config = coordinator_for(scenario, tariff)
                t0 = time.perf_counter()
                runs = {
                    v: run_backtest(scenario, days=args.days, coordinator=config, variant=v)
                    for v in ("wattmesh", "idle", "self_consumption")
                }
                wall = time.perf_counter() - t0
                week_wall.append(runs["wattmesh"].wall_s)
                for regime in REGIMES:
                    f = {v: figures(r, regime, args.local_charge) for v, r in runs.items()}
                    ours, idle, local = f["wattmesh"], f["idle"], f["self_consumption"]
                    if abs(local.cost) >= 1.0:
                        savings.setdefault((season, regime), []).append(
                            100.0 * (local.cost - ours.cost) / abs(local.cost)
                        )
                    print(
                        f"{season:<7} {seed:>4} {tariff:<6} {regime:<3} {ours.cost:>9.2f} "
                        f"{idle.cost:>9.2f} {local.cost:>10.2f} "
                        f"{saving_pct(ours.cost, idle.cost):>9} "
                        f"{saving_pct(ours.cost, local.cost):>9} "
                        f"{ours.peak_kw:>8.1f}/{local.peak_kw:<9.1f} "
                        f"{ours.above_limit_kwh:>12.1f}/{local.above_limit_kwh:<12.1f} "
                        f"{wall:>7.1f}",
                        flush=True,
                    )
    limit_kw = default_coordinator_config(base, Path("unused"), 60.0).grid.import_limit_w / 1e3
    print(f"\nfeeder import limit {limit_kw:.0f} kW")
    print("saving against (ii) local control, % of its cost, over seeds and tariffs:")
    for (season, regime), values in savings.items():
        print(
            f"  {season:<7} regime ({regime}): mean {statistics.fmean(values):+.1f} %, "
            f"worst {min(values):+.1f} % ({len(values)} runs)"
        )
    print(
        f"wall time: {time.perf_counter() - wall0:.1f} s in all; wattmesh on the engine "
        f"{max(week_wall):.2f} s at most per {args.days:g}-day run"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
