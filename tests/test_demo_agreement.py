"""The real-time demo against the stepped engine (benchmarks/agreement.py), on a window where
the comparison is stable enough to test.

What this proves, and what it does not: at night there is no PV, so every site imports, the
market clears at the utility's price and the batteries have nothing to earn but the night's
planned charging; the window (00:00-03:00 UTC in midsummer, before sunrise) tests that the
engine meters, settles (awards, imbalance, rebates) and bills each site as the live services
do, with the same configuration and cadence. A known difference, left for a fix: the demo's
factory charges 2-4 kWh more in the 01:00 interval than the engine (both coordinators start
without history, and the first forecasts depend on where the first readings fall), 0.4-0.9
of the factory's cost: 0.8-3.6 % of a two-hour window's total, which made a two-hour test fail
about one run in five, 0.2-2.0 % of this three-hour one.
It does not test the daytime market, nor a whole day: over three daytime hours two demo
runs of the same window differ from each other by 10 % or more of the community's total (an
interval that clears at 0.12 in one run clears at 0.25 in the other on a few kWh of difference
in the bids, and around noon the total is near zero), and whole days differ too: on the winter
solstice the worst site was 0.2 % apart in one run and 3.4 % in another (the factory's evening
charging and one congestion price landing in different intervals), on a summer day 1.2-8 %.
So no window longer than the night holds the 3 % bar reliably; whole days are measured by the
benchmark (``python benchmarks/agreement.py``), not by a test.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from benchmarks.agreement import run_agreement


def test_at_night_the_demo_and_the_engine_settle_each_site_within_3_pct_of_the_total(
    tmp_path: Path,
) -> None:
    start = datetime(2026, 6, 22, 0, 0, tzinfo=UTC)
    agreement = run_agreement(start, hours=3.0, speed=800.0, poll=0.1, out=tmp_path)
    assert agreement is not None
    assert agreement.intervals >= 10  # of the 12 in three hours (the first has no clearing)
    assert set(agreement.demo) == {"solar-farm", "factory", "house-1", "house-2", "school"}
    assert sum(agreement.demo.values()) > 10.0  # a total that the percentages can stand on
    assert agreement.worst_pct < 3.0, (agreement.demo, agreement.engine)
