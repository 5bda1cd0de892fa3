"""A simulated day of the community on the live services, against what the sites would pay
without wattmesh.

Run: ``python benchmarks/community_day.py [--speed 800] [--hours 24] [--seed N] [--start
2026-12-21] [--quick]``. It runs ``wattmesh demo``'s stack (Mosquitto, every device as a Modbus
server, an edge agent per site, the coordinator and its ledger, on a scaled clock), then bills
the day as the demo's report does (:mod:`wattmesh.demo_report`, :mod:`wattmesh.economics`) in
both settlement regimes:

- ours: the live run's metered energy from its ledger;
- (i) idle: every battery idle; (ii) local: every battery under its own site's controller
  (what an owner would run anyway; the headline compares with it); both on the stepped engine
  over the same scenario, start and intervals, with no market and no grid balancing;

all three with the battery energy gained or drained valued at the last retail tariff over the
charge efficiency. It prints each regime's costs, the savings in % of each baseline's cost,
the feeder's largest 15-minute mean import and the energy above its limit, and the wall time
per simulated day (goal: under 120 s). ``--quick`` is 6 simulated hours at 1440x.

The first version of this benchmark printed a 49.6 % "saving" against every site billed alone
with idle batteries: mostly the netting of one connection point, which needs no software. That
comparison is gone. The perfect-foresight LP, seasons, seeds and tariffs are in
``benchmarks/economics.py`` (on the stepped engine). Exit status: 0 measured; 2 when nothing
settled, the ledger did not balance, or the run was interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from broker.errors import BrokerError
from broker.mosquitto import find_mosquitto
from coordinator.ledger import Ledger
from wattmesh.backtest import BacktestResult
from wattmesh.demo import _coordinator_config, _run, builtin_scenario, parse_start
from wattmesh.demo_report import REGIME_NAMES, VARIANTS, Regime, baseline_runs, compare, live_usage
from wattmesh.economics import Usage, saving_pct
from wattmesh.up import rtu_over_tcp

GOAL_WALL_S_PER_DAY = 120.0
POLL_S = 0.1


def print_regimes(ours: Usage, baselines: dict[str, BacktestResult], limit_kw: float) -> None:
    """Ours, (i) and (ii) billed in each regime: costs, savings, the feeder."""
    for regime in Regime:
        c = compare(ours, baselines, regime)
        f = c.figures
        print(
            f"\nregime ({regime.value}) {REGIME_NAMES[regime]}, {len(c.intervals)} intervals; "
            "cost with stored energy valued, % of the baseline's cost (+: ours cheaper)"
        )
        for key, name in VARIANTS.items():
            print(
                f"  {name:<11} cost {f[key].cost:>9.2f}   feeder peak {f[key].peak_kw:6.1f} kW"
                f" (limit {limit_kw:.0f}), above the limit {f[key].above_limit_kwh:6.1f} kWh"
            )
        print(
            f"  ours against (i) idle {saving_pct(f['ours'].cost, f['idle'].cost)} %, "
            f"against (ii) local {saving_pct(f['ours'].cost, f['local'].cost)} %"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the day, bill it both ways, print; the exit status of the module docstring."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--speed", type=float, default=800.0, help="simulated s per wall s")
    parser.add_argument("--hours", type=float, default=24.0, help="simulated hours")
    parser.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    parser.add_argument("--start", default=None, help="ISO 8601 start, UTC (e.g. 2026-12-21)")
    parser.add_argument("--quick", action="store_true", help="6 simulated hours at 1440x")
    parser.add_argument("--out", type=Path, default=None, help="keep the ledger here")
    args = parser.parse_args(argv)
    hours, speed = (6.0, 1440.0) if args.quick else (args.hours, args.speed)
    scenario = builtin_scenario()
    if args.start is not None:
        scenario = scenario.model_copy(update={"start": parse_start(args.start)})
    if args.seed is not None:
        scenario = scenario.model_copy(update={"seed": args.seed})
    if shutil.which("socat") is None:
        scenario, _ = rtu_over_tcp(scenario)
    try:
        find_mosquitto()
        embedded = False
    except BrokerError:
        embedded = True
    out = args.out or Path(tempfile.mkdtemp(prefix="wattmesh-community-day-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "ledger.sqlite").unlink(missing_ok=True)
    print(
        f"community day: {len(scenario.sites)} sites from {scenario.start.isoformat()}, "
        f"{hours:g} simulated hours at {speed:g}x, seed {scenario.seed}, broker "
        f"{'embedded (Mosquitto is not installed)' if embedded else 'Mosquitto'}",
        flush=True,
    )
    quiet = Console(file=io.StringIO())
    try:
        wall0 = time.perf_counter()
        run = asyncio.run(_run(scenario, hours, speed, POLL_S, out, quiet, embedded))
        wall_s = time.perf_counter() - wall0
        config = _coordinator_config(scenario, out, 1, POLL_S, speed)
        interval_s = float(config.market.interval_s)
        with Ledger(out / "ledger.sqlite") as ledger:
            balanced = ledger.check_balanced()
            ours = live_usage(ledger, scenario, run.rows, config.grid.import_limit_w, interval_s)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    if not ours.intervals or not balanced or run.interrupted:
        print(
            "nothing to measure: "
            + ("no interval settled" if not ours.intervals else "")
            + ("; the ledger does not balance" if not balanced else "")
            + ("; interrupted" if run.interrupted else "")
        )
        return 2
    t0 = time.perf_counter()
    baselines = baseline_runs(scenario, config, (ours.intervals[-1] + 1) * interval_s)
    engine_s = time.perf_counter() - t0
    print_regimes(ours, baselines, config.grid.import_limit_w / 1000.0)
    per_day = wall_s * 24.0 / hours
    print(
        f"\nwall time: {wall_s:.0f} s for {hours:g} simulated hours, {per_day:.0f} s per "
        f"simulated day (goal < {GOAL_WALL_S_PER_DAY:.0f} s: "
        f"{'ok' if per_day < GOAL_WALL_S_PER_DAY else 'MISSED'}); baselines on the engine "
        f"{engine_s:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
