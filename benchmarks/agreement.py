"""The real-time demo against the stepped engine: each site's settled cost, same hours.

Run: ``python benchmarks/agreement.py [--start 2026-06-22T00:00:00Z] [--hours 24]
[--speed 800] [--poll 0.1] [--no-weather]``. It runs the demo (Mosquitto, Modbus, the edge
agents and the coordinator in real time at ``--speed``), then the engine
(``wattmesh.backtest``) on the same scenario, coordinator and edge configuration, at the demo's
cadence (polls every ``poll * speed`` simulated seconds, grid checks every half of that, the
coordinator's plausibility checks on), both coordinators starting with the same history and
the simulated weather service's runs over it (``--no-weather``: both without the service), and
prints each site's settled cost over the intervals both settled, and the difference in % of
the community's total. The issue's bar is 3 % per site.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from coordinator.ledger import Ledger
from wattmesh import demo
from wattmesh.backtest import DEFAULT_HISTORY_DAYS, default_edge_configs, run_backtest
from wattmesh.up import rtu_over_tcp


def site_costs(path: Path) -> dict[int, dict[str, float]]:
    """Per settled interval, what each site paid (currency, + pays), from a ledger."""
    out = {}
    with Ledger(path) as ledger:
        for k in ledger.settled_intervals():
            settlement = ledger.settlement(k)
            if settlement is not None:
                out[k] = {s.site: -s.total_micro / 1e6 for s in settlement.sites}
    return out


def engine_step_s(sim_poll_s: float) -> float:
    """The longest step (s) that divides the poll period, its half and the 900-s interval."""
    for step in (60.0, 30.0, 20.0, 15.0, 10.0, 5.0, 4.0, 2.0, 1.0):
        if (sim_poll_s / 2) % step == 0 and 900 % step == 0:
            return step
    raise SystemExit(f"no engine step divides a poll of {sim_poll_s} s")


@dataclass(frozen=True)
class Agreement:
    """Each site's settled cost (currency, + pays) in the demo and on the engine, summed over
    the intervals both settled."""

    intervals: int
    demo: dict[str, float]
    engine: dict[str, float]
    demo_wall_s: float
    engine_wall_s: float
    step_s: float
    sim_poll_s: float

    def diff_pct(self, site: str) -> float:
        """The engine's cost minus the demo's, in % of the demo community's total."""
        return 100.0 * (self.engine[site] - self.demo[site]) / abs(sum(self.demo.values()))

    @property
    def worst_pct(self) -> float:
        """The largest difference of a site, % of the community's total."""
        return max(abs(self.diff_pct(s)) for s in self.demo)


def run_agreement(
    start: datetime,
    hours: float,
    speed: float,
    poll: float,
    out: Path,
    history_days: float = DEFAULT_HISTORY_DAYS,
    *,
    weather: bool = True,
) -> Agreement | None:
    """Run the demo (files in ``out``), then the engine at its cadence, both coordinators
    starting with ``history_days`` of the sites' history and the simulated weather service's
    runs over it (``weather`` False: both without the service); None when no interval was
    settled by both."""
    scenario, _ = rtu_over_tcp(demo.builtin_scenario().model_copy(update={"start": start}))
    demo.seed_history(scenario, out, history_days)
    quiet = Console(file=(out / "demo.log").open("w"))
    wall0 = time.perf_counter()
    asyncio.run(demo._run(scenario, hours, speed, poll, out, quiet, False, weather=weather))
    demo_wall = time.perf_counter() - wall0
    sim_poll_s = round(poll * speed, 6)
    config = demo._coordinator_config(
        scenario, out / "engine.sqlite", 1, poll, speed, weather=weather
    )
    step = engine_step_s(sim_poll_s)
    edges = {
        name: e.model_copy(update={"dispatch_revert_s": max(60, int(6 * sim_poll_s))})
        for name, e in default_edge_configs(scenario, step).items()
    }
    result = run_backtest(
        scenario,
        days=hours / 24.0,
        coordinator=config,
        edges=edges,
        ledger_path=out / "engine.sqlite",
        step_s=step,
        poll_s=sim_poll_s,
        grid_period_s=sim_poll_s / 2,
        trust=True,
        history_days=history_days,  # the history the demo's coordinator started with
    )
    live, engine = site_costs(out / "ledger.sqlite"), site_costs(out / "engine.sqlite")
    common = sorted(set(live) & set(engine))
    if not common:
        return None
    sites = sorted(live[common[0]])
    return Agreement(
        intervals=len(common),
        demo={s: sum(live[k].get(s, 0.0) for k in common) for s in sites},
        engine={s: sum(engine[k].get(s, 0.0) for k in common) for s in sites},
        demo_wall_s=demo_wall,
        engine_wall_s=result.wall_s,
        step_s=step,
        sim_poll_s=sim_poll_s,
    )


def main(argv: list[str] | None = None) -> int:
    """Run both, print the table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--start", default="2026-06-22T00:00:00+00:00")
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--speed", type=float, default=800.0)
    parser.add_argument("--poll", type=float, default=0.1, help="wall seconds between polls")
    parser.add_argument(
        "--history-days",
        type=float,
        default=DEFAULT_HISTORY_DAYS,
        help="days of history both coordinators start with (0-7)",
    )
    parser.add_argument(
        "--no-weather",
        action="store_true",
        help="both without the simulated weather service's forecasts",
    )
    args = parser.parse_args(argv)
    start = datetime.fromisoformat(args.start.replace("Z", "+00:00")).astimezone(UTC)
    out = Path(tempfile.mkdtemp(prefix="wattmesh-agreement-"))
    a = run_agreement(
        start,
        args.hours,
        args.speed,
        args.poll,
        out,
        args.history_days,
        weather=not args.no_weather,
    )
    if a is None:
        print("no interval settled by both")
        return 1
    print(
        f"{args.hours:g} h from {start.isoformat()}: {a.intervals} intervals settled by both; "
        f"demo {a.demo_wall_s:.0f} s wall at {args.speed:g}x, engine {a.engine_wall_s:.1f} s "
        f"(step {a.step_s:g} s, polls every {a.sim_poll_s:g} s)"
    )
    print(f"{'site':<12} {'demo':>9} {'engine':>9} {'diff, % of community':>21}")
    for s in a.demo:
        print(f"{s:<12} {a.demo[s]:>9.2f} {a.engine[s]:>9.2f} {a.diff_pct(s):>+21.1f}")
    print(f"{'community':<12} {sum(a.demo.values()):>9.2f} {sum(a.engine.values()):>9.2f}")
    print(f"worst site: {a.worst_pct:.1f} % of the community's total (bar: 3 %); files in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
