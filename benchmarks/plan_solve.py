"""How long a site plan takes (edge/plan.py): the median and p95 wall time of
:func:`edge.plan.plan_site` for a 192-step (48 h of 15-minute intervals) horizon, alone and with
a feeder reservation (which adds the pessimistic scenario), after a warm-up solve; and a
rolling re-plan (the horizon one step on each time, the battery where the last plan left it, with
a reservation) cold and from the last plan's basis (:class:`edge.plan.WarmStart`, as the agent and
the stepped engine re-plan), with the median simplex iterations.

Run: ``python benchmarks/plan_solve.py [--steps 192] [--runs 50]``. The issue's goal: a
192-step plan in at most 50 ms (median) on the development machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace

import numpy as np

from edge.plan import (
    PlanBattery,
    WarmStart,
    pessimistic_net_kwh,
    plan_site,
    stored_value_per_kwh,
)


def case(steps: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A household's load and PV (kWh per 15 minutes) and a time-of-use price, with noise."""
    rng = np.random.default_rng(seed)
    hour = (np.arange(steps) * 0.25) % 24
    load = 0.15 + 0.25 * np.exp(-((hour - 19) ** 2) / 4) + rng.uniform(0, 0.05, steps)
    pv = np.maximum(0.0, np.sin((hour - 6) / 12 * np.pi)) * 1.2 * rng.uniform(0.4, 1.0, steps)
    price = np.where((hour >= 7) & (hour < 22), 0.32, 0.22)
    return load, pv, price


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--steps", type=int, default=192)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args(argv)
    battery = PlanBattery(
        stored_kwh=5.0, min_kwh=0.5, max_kwh=10.0, max_charge_kw=5.0, max_discharge_kw=5.0
    )
    floor = np.full(args.steps, np.nan)
    floor[74:80] = 6.0  # hold 6 kWh through the first evening
    cap = np.full(args.steps, np.nan)
    cap[76:84] = -1.0  # and export 1 kW then
    figures = {}
    for name, reserved in (("plain", False), ("with a reservation", True)):
        times = []
        for run in range(args.runs + 1):
            load, pv, price = case(args.steps, run)
            plan = plan_site(
                load - pv,
                price,
                price,
                battery,
                step_h=0.25,
                stored_value_per_kwh=stored_value_per_kwh(price, 0.95, 0.95),
                floor_kwh=floor if reserved else None,
                import_cap_kw=cap if reserved else None,
                pessimistic_net_kwh=pessimistic_net_kwh(load, pv) if reserved else None,
            )
            if run:  # the first solve loads the solver
                times.append(plan.solve_s * 1000.0)
        times.sort()
        figures[name] = (statistics.median(times), times[int(0.95 * (len(times) - 1))])
    print(f"site plan, {args.steps} steps of 15 minutes, {args.runs} solves each (HiGHS):")
    for name, (median, p95) in figures.items():
        print(f"  {name:<20} median {median:6.1f} ms   p95 {p95:6.1f} ms")
    for name, warm in (("re-plan, cold", None), ("re-plan, warm start", WarmStart())):
        times, iterations = _rolling(args.steps, args.runs, battery, floor, cap, warm)
        times.sort()
        print(
            f"  {name:<20} median {statistics.median(times):6.1f} ms   "
            f"p95 {times[int(0.95 * (len(times) - 1))]:6.1f} ms   "
            f"{statistics.median(iterations):5.0f} simplex iterations (median)"
        )
    return 0


def _rolling(
    steps: int,
    runs: int,
    battery: PlanBattery,
    floor: np.ndarray,
    cap: np.ndarray,
    warm: WarmStart | None,
) -> tuple[list[float], list[int]]:
    """``runs`` re-plans of a horizon moving on one step each time (after a first plan)."""
    load, pv, price = case(steps + runs + 1, 0)
    stored = battery.stored_kwh
    times: list[float] = []
    iterations: list[int] = []
    for run in range(runs + 1):
        now = slice(run, run + steps)
        plan = plan_site(
            load[now] - pv[now],
            price[now],
            price[now],
            replace(battery, stored_kwh=stored),
            step_h=0.25,
            stored_value_per_kwh=stored_value_per_kwh(price[now], 0.95, 0.95),
            floor_kwh=np.roll(floor, -run),
            import_cap_kw=np.roll(cap, -run),
            pessimistic_net_kwh=pessimistic_net_kwh(load[now], pv[now]),
            warm=warm,
        )
        stored = float(plan.stored_kwh[0])
        if run:
            times.append(plan.solve_s * 1000.0)
            iterations.append(plan.iterations)
    return times, iterations


if __name__ == "__main__":
    sys.exit(main())
