"""The demo's truthful report: billing every alternative the same way (wattmesh.economics),
stored energy valued, both baselines, the ledger's words, the options and the plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from coordinator.ledger import Ledger
from simulators.scenario import load_scenario
from wattmesh.backtest import run_backtest
from wattmesh.demo import DemoError, _coordinator_config, parse_start
from wattmesh.demo_report import Regime, Storage, baseline_runs, compare, live_usage, soc_at
from wattmesh.economics import (
    Contract,
    SiteEnergy,
    Usage,
    figures,
    saving_pct,
    site_costs,
    stored_value,
    usage_of,
)


def _usage() -> Usage:
    # Two sites, two intervals: "a" imports 10 then exports 4 kWh; "factory" exports 6 then
    # imports 2 kWh. Retail 0.30 / feed-in 0.10, then 0.20 / 0.10.
    return Usage(
        intervals=(7, 8),
        sites={"a": SiteEnergy(5.0, 7.0), "factory": SiteEnergy(0.0, 0.0)},
        metered_kwh={"a": np.array([10.0, -4.0]), "factory": np.array([-6.0, 2.0])},
        retail_per_kwh=np.array([0.30, 0.20]),
        feed_in_per_kwh=np.array([0.10, 0.10]),
        charge_efficiency={"a": 0.8, "factory": 1.0},
        feeder_limit_w=12_000.0,  # 3 kWh per 15 minutes
    )


def test_stored_energy_is_valued_at_the_last_retail_tariff_over_the_charge_efficiency() -> None:
    # "a" gained 2 kWh: 2 * 0.20 / 0.8 = 0.50.
    assert stored_value(_usage()) == pytest.approx(0.50)


def test_regime_a_bills_the_feeder_net_and_credits_stored_energy() -> None:
    # Feeder net: +4 kWh at 0.30, then -2 kWh at 0.10: 1.20 - 0.20 = 1.00; minus 0.50 stored.
    f = figures(_usage(), Contract("a"))
    assert f.cost == pytest.approx(0.50)
    assert f.peak_kw == pytest.approx(16.0)  # 4 kWh in 15 minutes
    assert f.above_limit_kwh == pytest.approx(1.0)  # 4 kWh against 3
    assert site_costs(_usage(), Contract("a")) is None  # no per-site bill behind one meter


def test_regime_b_bills_each_site_with_shared_energy_at_the_local_price() -> None:
    # Interval 1: 6 kWh shared from factory to a at the local price 0.20 (+0.03 charge);
    # a buys 4 more at 0.30. Interval 2: 2 kWh shared from a to factory at 0.15 (+0.03); a
    # sells 2 more at 0.10.
    costs = site_costs(_usage(), Contract("b", local_charge_per_kwh=0.03))
    assert costs is not None
    a = 6 * 0.23 + 4 * 0.30 - 2 * 0.15 - 2 * 0.10 - 0.50
    factory = -6 * 0.20 + 2 * 0.18
    assert costs == pytest.approx({"a": a, "factory": factory})
    assert figures(_usage(), Contract("b")).cost == pytest.approx(a + factory)


def test_a_run_restricted_to_common_intervals_keeps_only_those() -> None:
    kept = usage_of(_usage(), (7, 8), (8, 9))
    assert kept.intervals == (8,)
    assert kept.metered_kwh["a"].tolist() == [-4.0]
    assert kept.retail_per_kwh.tolist() == [0.20]


def test_percentages_only_where_the_baseline_cost_means_something() -> None:
    assert saving_pct(90.0, 100.0) == "+10.0"
    assert saving_pct(-0.5, 0.4) == "n/a"
    assert saving_pct(110.0, -100.0) == "-210.0"


# --- the demo's report on real runs ---------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
COMMUNITY = ROOT / "config" / "scenarios" / "community.toml"
WATTMESH = [sys.executable, "-m", "wattmesh"]
#: A summer Monday's late morning: PV surplus, so local control charges batteries.
MORNING = datetime(2026, 6, 22, 9, 0, tzinfo=UTC)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "140"}


def test_soc_at_moves_the_nearest_sample_on_at_its_reported_power() -> None:
    storage = Storage(
        capacity_wh=10_000.0, soc_pct=50.0, charge_efficiency=0.9, discharge_efficiency=0.8
    )
    rows = [
        {"ts": 0.0, "site": "s", "soc_pct": 50.0, "battery_w": -2000.0},
        {"ts": 3000.0, "site": "s", "soc_pct": 70.0, "battery_w": 1000.0},
        {"ts": 0.0, "site": "other", "soc_pct": 10.0, "battery_w": 0.0},
    ]
    # Nearest to 1200 s is the first: charging 2 kW for 1200 s stores 2000 * 0.9 / 3 Wh = 6 %.
    assert soc_at(rows, "s", 1200.0, storage) == pytest.approx(56.0)
    # Nearest to 3600 s is the second: discharging 1 kW for 600 s drains 1000 / 0.8 / 6 Wh.
    assert soc_at(rows, "s", 3600.0, storage) == pytest.approx(
        70.0 - 100 * 208.333 / 10_000, abs=1e-3
    )
    assert soc_at(rows, "nobody", 0.0, storage) is None


def test_the_live_usage_is_what_the_ledger_metered_at_the_tariffs_it_settled(
    tmp_path: Path,
) -> None:
    # The engine writes a real ledger; read back as the demo reads its own, it is the
    # engine's metered energy (whole Wh) and tariffs, interval by interval.
    scenario = load_scenario(COMMUNITY).model_copy(update={"start": MORNING})
    result = run_backtest(scenario, days=2 / 24, ledger_path=tmp_path / "ledger.sqlite")
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        usage = live_usage(ledger, scenario, [], result.feeder_limit_w, 900.0)
    assert usage.intervals == result.settled
    assert len(usage.intervals) == 7  # the first interval has no clearing to settle
    for name, kwh in result.metered_kwh.items():
        assert usage.metered_kwh[name] == pytest.approx(kwh, abs=1e-9)
    assert usage.retail_per_kwh == pytest.approx(result.retail_per_kwh)
    assert usage.feed_in_per_kwh == pytest.approx(result.feed_in_per_kwh)
    # No telemetry: the stored energy is taken as unchanged from the scenario's.
    assert usage.sites["school"].stored_start_kwh == pytest.approx(30.0)  # 50 % of 60 kWh
    assert usage.sites["school"].stored_end_kwh == pytest.approx(30.0)
    assert usage.charge_efficiency["house-2"] == 1.0


def test_the_baselines_cover_the_same_intervals_and_only_local_control_moves_batteries() -> None:
    scenario = load_scenario(COMMUNITY).model_copy(update={"start": MORNING})
    config = _coordinator_config(scenario, Path("unused"), 1, 0.1, 800.0)
    end_ts = scenario.start_ts + 2 * 3600.0
    runs = baseline_runs(scenario, config, end_ts)
    assert set(runs) == {"idle", "local"}
    for run in runs.values():
        assert run.settled[0] * 900 >= scenario.start_ts
        assert (run.settled[-1] + 1) * 900 == end_ts
    idle, local = runs["idle"], runs["local"]
    assert all(s.stored_end_kwh == s.stored_start_kwh for s in idle.sites.values())
    # In the late-morning surplus the school's own controller charges its battery.
    assert local.sites["school"].stored_end_kwh > local.sites["school"].stored_start_kwh
    # Ours billed over fewer intervals: all three are billed over the common ones only.
    ours = usage_of(local, local.settled, local.settled[1:])
    c = compare(ours, runs, Regime.b)
    assert c.intervals == local.settled[1:]
    assert all(len(u.retail_per_kwh) == len(local.settled) - 1 for u in c.usage.values())
    assert c.site_costs is not None
    for key in ("ours", "idle", "local"):
        assert sum(c.site_costs[key].values()) == pytest.approx(c.figures[key].cost)
    # Regime (a) bills the connection point only: no per-site lines, a smaller bill (netting).
    a = compare(ours, runs, Regime.a)
    assert a.site_costs is None
    assert a.figures["idle"].cost < c.figures["idle"].cost


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--start", "yesterday"], "is not an ISO 8601 date or time"),
        (["--start", "2026-06-22T10:07Z"], "is not on a 15-minute boundary"),
        (["--regime", "c"], "'c' is not one of"),
    ],
)
def test_bad_demo_options_are_one_clear_error(args: list[str], message: str) -> None:
    result = subprocess.run(
        [*WATTMESH, "demo", *args], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_parse_start_takes_dates_and_utc_times() -> None:
    assert parse_start("2026-12-21") == datetime(2026, 12, 21, tzinfo=UTC)
    assert parse_start("2026-12-21T07:15+01:00") == datetime(2026, 12, 21, 6, 15, tzinfo=UTC)
    with pytest.raises(DemoError, match="boundary"):
        parse_start("2026-12-21T06:01")


def _ledger_money(stdout: str) -> dict[str, tuple[str, str, str]]:
    """The site rows' net cost, baseline and savings cells of the printed table whose header
    has those columns."""
    out: dict[str, tuple[str, str, str]] = {}
    columns: list[int] = []
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│")[1:-1]]
        if "net cost" in cells:
            columns = [cells.index(name) for name in ("net cost", "baseline", "savings")]
        elif columns and len(cells) > max(columns) and not cells[0].startswith("community"):
            out[cells[0]] = (cells[columns[0]], cells[columns[1]], cells[columns[2]])
        elif line.startswith("└"):
            columns = []
    return out


def test_the_demo_reports_a_chosen_start_and_regime_in_the_ledgers_words(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *WATTMESH,
            "demo",
            "--hours",
            "1.5",
            "--speed",
            "1440",
            "--start",
            "2026-06-22T09:00Z",
            "--regime",
            "b",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    said = " ".join(result.stdout.split())
    assert "from Mon 2026-06-22 09:00 UTC" in said
    assert "regime (b) energy sharing with individual meters" in said
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["regime"] == "b"
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        settled = ledger.settled_intervals()
    # The run started at the given time: every interval it settled lies in its 1.5 hours.
    assert settled
    assert all(MORNING.timestamp() <= k * 900 < MORNING.timestamp() + 5400 for k in settled)
    # Each site's net cost, baseline and savings are printed as `wattmesh ledger report`
    # prints them.
    ledger_out = subprocess.run(
        [*WATTMESH, "ledger", "report", str(tmp_path / "ledger.sqlite")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
        check=True,
    ).stdout
    demo_cells, ledger_cells = _ledger_money(result.stdout), _ledger_money(ledger_out)
    assert set(ledger_cells) == set(report["sites"])
    assert demo_cells == ledger_cells
    # Regime (b): each site has a cost for ours and both baselines, and they add up.
    for key in ("ours", "idle", "local"):
        total = sum(s["costs"][key] for s in report["sites"].values())
        assert report["community"]["costs"][key] == pytest.approx(total)
    assert report["billed_intervals"] == len(settled)
    assert report["community"]["stored_gain_kwh"]["idle"] == 0.0
    assert (tmp_path / "day.png").read_bytes().startswith(b"\x89PNG")
