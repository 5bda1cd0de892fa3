"""The real-time demo against the stepped engine (benchmarks/agreement.py): for one day, each
site's settled cost within 3 % of the community's total (issue 9).

The day is a winter one, 24 hours from 06:00 UTC on 2026-12-21 (the end of the night tariff
there) to 06:00 the next morning, run at 1,200x (72 s of wall time): Mosquitto, Modbus, the
edge agents with their plans and the coordinator in real time, then the engine on the same
scenario and configuration at the demo's cadence. Both coordinators start with the same week
of the sites' history and the simulated weather service's runs issued over it (the demo's from
its history file, coordinator/history_store.py), and both with the service running. Before the
history file carried the runs, the demo's coordinator had only the live service's, from the
start, and learned each site's weather capacity a day later than the engine's: 3.1 % apart in
one CI run (9-39 % over three summer night hours), so the weather was off here for a while
(0.2 % then); with the runs in the file 1.0 % and 1.1 % (the solar farm) in two runs.
Without the shared history the first forecasts, and the first night's plans, depended on where
the first readings fell, and midnight-to-midnight days agreed within 0.2 % in one run and 3.4 %
in another. Why 06:00 to 06:00: the night price is flat, so when a battery charges in the night
is a tie that small differences in the readings break; a day cut at midnight cut the factory's
night charging at different points (with the shared history, midnight-to-midnight: 0.3-1.9 % in
nine runs, the 1.7-1.9 % ones all that), a day that holds the whole night does not (0.1 % and
1.4 % in two runs on a loaded machine, the 1.4 % one with the demo's factory missing three
intervals' bids and readings while other jobs took the cores; 0.2 % with the refill backstop
merged).

Not tested here, measured by the benchmark: summer days. For hours the community's supply and
demand are then close, and an interval clears at feed-in when the community has a kWh to spare
and near retail when it lacks one, so a few kWh of difference in the bids moves a whole
interval's price: 3.5 % in one run with the shared history (the solar farm's income), 1.2-8.1 %
without, and two demo runs of the same summer day differ from each other by up to 3.6 %.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from benchmarks.agreement import run_agreement


def test_for_a_winter_day_the_demo_and_the_engine_settle_each_site_within_3_pct_of_the_total(
    tmp_path: Path,
) -> None:
    start = datetime(2026, 12, 21, 6, 0, tzinfo=UTC)
    agreement = run_agreement(start, hours=24.0, speed=1200.0, poll=0.1, out=tmp_path)
    assert agreement is not None
    assert agreement.intervals >= 90  # of the 96 in a day (the first has no clearing)
    assert set(agreement.demo) == {"solar-farm", "factory", "house-1", "house-2", "school"}
    assert sum(agreement.demo.values()) > 100.0  # a total the percentages can stand on
    assert agreement.worst_pct < 3.0, (agreement.demo, agreement.engine)
