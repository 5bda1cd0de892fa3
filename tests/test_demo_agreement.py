"""The real-time demo against the stepped engine (benchmarks/agreement.py) over a whole day.

The test runs the winter solstice, 24 h: the demo (Mosquitto, the Modbus simulators, five
edge agents that plan, bid and control, the coordinator with its grid loop and ledger) at
1,200x real time, then the engine on the same scenario, configuration and cadence. Each site's
settled cost must agree within 3 % of the community's total (0.2 % when measured).

What it does not cover, and why: on a summer day the community's supply and demand are close
for hours, and the clearing price of such an interval is the feed-in tariff when the community
has a kWh to spare and the retail tariff when it lacks one (coordinator/market.py, the price
rule). Two demo runs of the same summer day then differ from each other by several % of the
community's total on the timing of a few readings, so no bar of 3 % can hold there; the
benchmark measures it (``python benchmarks/agreement.py``: 1.2-8 % on 2026-06-22).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from benchmarks.agreement import run_agreement


def test_over_a_winter_day_the_demo_and_the_engine_settle_each_site_within_3_pct_of_the_total(
    tmp_path: Path,
) -> None:
    start = datetime(2026, 12, 21, 0, 0, tzinfo=UTC)
    agreement = run_agreement(start, hours=24.0, speed=1200.0, poll=0.1, out=tmp_path)
    assert agreement is not None
    assert agreement.intervals >= 90  # of the 95 a day settles (the first has no clearing)
    assert set(agreement.demo) == {"solar-farm", "factory", "house-1", "house-2", "school"}
    assert sum(agreement.demo.values()) > 100.0  # a total the percentages can stand on
    # the solar farm sold in the market: the day tests the daytime market, not just imports
    assert agreement.demo["solar-farm"] < -50.0
    assert agreement.worst_pct < 3.0, (agreement.demo, agreement.engine)
