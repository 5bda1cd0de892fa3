"""Benchmark market clearing against the LP oracle.

Run: ``python benchmarks/clearing.py``. For each scenario and book size it prints the median
time of ``coordinator.market.clear`` (the Book is built beforehand; its validation time is shown
separately), the LP oracle's time (scipy's linprog with HiGHS), the speed-up, and whether both
reach the same welfare. Exits 1 if the welfares differ anywhere; the speed goals are reported.

Books are random and seeded: a tenth as many sites as steps, half the steps buys and half
sells, sizes 0.01 + Exp(2) kWh, limit prices ~ N(0.18, 0.06) per kWh; retail 0.30, feed-in
0.08, import and export capacity each 5 % of the book's buy (resp. sell) volume, so the feeder
limits bind. Two scenarios differ only in the prices:

- ``continuous``: prices as drawn (what strategies that optimise their bids send);
- ``0.1-cent grid``: prices rounded to 0.001, so many steps tie. HiGHS' presolve merges tied
  columns, which makes the oracle 50-100x faster than on continuous prices.

clear() itself takes about the same time in both.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import scipy

from coordinator.market import Book, Clearing, Tariff, clear, clear_lp

SIZES = (1_000, 10_000, 100_000, 1_000_000)
GOAL_1M_MS = 250.0
GOAL_10K_SPEEDUP = 500.0
WELFARE_RTOL = 1e-6
CLEAR_REPEATS = 7


@dataclass(frozen=True)
class Scenario:
    name: str
    price_decimals: int | None  # None: continuous prices
    oracle_max_steps: int
    oracle_skip_reason: str


SCENARIOS = (
    Scenario("continuous", None, 10_000, "HiGHS needs minutes at 100k continuous-price steps"),
    Scenario("0.1-cent grid", 3, 100_000, "oracle not run above 100k steps"),
)


def random_market(n_steps: int, price_decimals: int | None, seed: int = 0) -> tuple[Book, Tariff]:
    """A seeded random book of ``n_steps`` steps and its tariff (see the module docstring)."""
    rng = np.random.default_rng(seed)
    is_buy = rng.random(n_steps) < 0.5
    size_kwh = 0.01 + rng.exponential(2.0, n_steps)
    price_per_kwh = rng.normal(0.18, 0.06, n_steps)
    if price_decimals is not None:
        price_per_kwh = np.round(price_per_kwh, price_decimals)
    book = Book(
        site=rng.integers(0, max(1, n_steps // 10), n_steps),
        price_per_kwh=price_per_kwh,
        quantity_kwh=np.where(is_buy, size_kwh, -size_kwh),
    )
    tariff = Tariff(
        retail_price_per_kwh=0.30,
        feed_in_price_per_kwh=0.08,
        import_capacity_kwh=0.05 * float(size_kwh[is_buy].sum()),
        export_capacity_kwh=0.05 * float(size_kwh[~is_buy].sum()),
    )
    return book, tariff


def median_seconds(
    fn: Callable[[], Clearing], repeats: int, *, warm_up: bool
) -> tuple[float, Clearing]:
    """Median wall time of ``repeats`` calls and the last result."""
    if warm_up:
        fn()
    times = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    assert result is not None
    return statistics.median(times), result


def run_scenario(scenario: Scenario) -> tuple[bool, dict[int, float], dict[int, float]]:
    """Print one table; return (all welfares equal, clear ms by size, speed-up by size)."""
    print(f"\nscenario: {scenario.name} prices")
    header = (
        f"{'steps':>9}  {'book ms':>8}  {'clear ms':>9}  {'oracle ms':>10}  {'speed-up':>9}  "
        f"{'welfare':>14}  {'oracle welfare':>14}  {'equal':>5}  {'price/kWh':>9}"
    )
    print(header)
    print("-" * len(header))
    all_equal = True
    clear_ms: dict[int, float] = {}
    speedup: dict[int, float] = {}
    for n in SIZES:
        book, tariff = random_market(n, scenario.price_decimals)
        start = time.perf_counter()  # validation only: the arrays already have the dtypes
        Book(site=book.site, price_per_kwh=book.price_per_kwh, quantity_kwh=book.quantity_kwh)
        book_ms = (time.perf_counter() - start) * 1e3
        seconds, result = median_seconds(partial(clear, book, tariff), CLEAR_REPEATS, warm_up=True)
        clear_ms[n] = seconds * 1e3
        if n <= scenario.oracle_max_steps:
            repeats = 3 if n <= 10_000 else 1
            lp_seconds, oracle = median_seconds(
                partial(clear_lp, book, tariff), repeats, warm_up=False
            )
            speedup[n] = lp_seconds / seconds
            tolerance = WELFARE_RTOL * max(1.0, abs(oracle.welfare))
            equal = abs(result.welfare - oracle.welfare) <= tolerance
            all_equal &= equal
            oracle_cols = (
                f"{lp_seconds * 1e3:>10.1f}  {speedup[n]:>8.0f}x  {result.welfare:>14.6f}  "
                f"{oracle.welfare:>14.6f}  {'yes' if equal else 'NO':>5}"
            )
        else:
            oracle_cols = f"{'skipped':>10}  {'-':>9}  {result.welfare:>14.6f}  {'-':>14}  {'-':>5}"
        print(
            f"{n:>9,}  {book_ms:>8.2f}  {clear_ms[n]:>9.3f}  {oracle_cols}  "
            f"{result.price_per_kwh:>9.4f}"
        )
    print(
        f"oracle skipped above {scenario.oracle_max_steps:,} steps: {scenario.oracle_skip_reason}"
    )
    return all_equal, clear_ms, speedup


def main() -> int:
    print(
        f"wattmesh market clearing benchmark (numpy {np.__version__}, scipy {scipy.__version__},"
        f" {os.cpu_count()} CPUs)"
    )
    print(
        f"goals: 1M steps cleared in < {GOAL_1M_MS:.0f} ms; at 10k steps >= "
        f"{GOAL_10K_SPEEDUP:.0f}x faster than the LP oracle with equal welfare"
    )
    print(
        f"clear ms: median of {CLEAR_REPEATS} runs after a warm-up; oracle ms: median of 3 runs "
        "(1 run at 100k)"
    )
    all_equal = True
    verdicts = []
    for scenario in SCENARIOS:
        equal, clear_ms, speedup = run_scenario(scenario)
        all_equal &= equal
        ms_1m = clear_ms[1_000_000]
        x_10k = speedup[10_000]
        verdicts.append(
            f"  {scenario.name:>14}: 1M steps {ms_1m:.1f} ms "
            f"({'met' if ms_1m < GOAL_1M_MS else 'MISSED'}); 10k steps {x_10k:.0f}x the "
            f"oracle ({'met' if x_10k >= GOAL_10K_SPEEDUP and equal else 'MISSED'})"
        )
    print("\ngoals:")
    print("\n".join(verdicts))
    print(f"welfare equal to the oracle wherever it ran: {'yes' if all_equal else 'NO'}")
    return 0 if all_equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
