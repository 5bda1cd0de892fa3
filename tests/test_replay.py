"""CSV replay (wattmesh.replay, ``wattmesh backtest --csv``): measured series in the engine."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from simulators.scenario import parse_scenario
from wattmesh.backtest import BacktestError, run_backtest
from wattmesh.cli import app
from wattmesh.replay import ReplayError, mean_power_w, read_series

START = datetime(2026, 6, 22, tzinfo=UTC).timestamp()


def _one_house() -> dict[str, object]:
    return {
        "name": "one-house",
        "start": "2026-06-22T00:00:00Z",
        "seed": 3,
        "latitude_deg": 48.0,
        "longitude_deg": 11.0,
        "sites": [
            {
                "id": "house",
                "load": {"profile": "household", "base_w": 1000.0, "peak_w": 1000.0},
                "devices": [{"name": "meter", "kind": "sunspec_meter", "port": 0}],
            }
        ],
    }


def _series(path: Path, hours: float = 7.0, step_s: float = 430.0) -> tuple[list[float], ...]:
    """A load and PV series at an odd step (430 s), from 10 minutes before the start; midday
    PV above the load, so the house exports part of the time."""
    ts = START - 600.0 + step_s * np.arange(int((hours * 3600 + 1800) / step_s))
    hour = (ts - START) / 3600.0
    load = 600.0 + 500.0 * (np.sin(hour) ** 2) + 37.0 * (np.arange(len(ts)) % 5)
    pv = np.maximum(0.0, 4000.0 * np.sin(np.pi * (hour - 1.0) / 5.0))
    load, pv = np.round(load, 3), np.round(pv, 3)  # as written
    rows = ["time,pv_w,load_w,note"]
    rows += [f"{t:.0f},{p},{w},x" for t, p, w in zip(ts, pv, load, strict=True)]
    path.write_text("\n".join(rows) + "\n")
    return list(ts), list(load), list(pv)


def test_replaying_a_known_series_meters_the_energy_the_file_implies(tmp_path: Path) -> None:
    ts, load, pv = _series(tmp_path / "house.csv")
    scenario = parse_scenario(_one_house(), "test")
    result = run_backtest(
        scenario, days=0.25, replay={"house": read_series(tmp_path / "house.csv")}
    )
    # What the file implies, second by second: each row holds until the next.
    net = np.array(load) - np.array(pv)
    for j, k in enumerate(result.settled):
        seconds = np.arange(k * 900.0, (k + 1) * 900.0)
        row = np.searchsorted(ts, seconds, side="right") - 1
        implied_kwh = float(net[row].sum()) / 3.6e6
        assert result.metered_kwh["house"][j] == pytest.approx(implied_kwh, abs=0.5e-3)
        assert result.net_kwh["house"][j] == pytest.approx(implied_kwh, abs=1e-9)
    assert result.intervals == 23  # 6 hours but the first interval
    assert result.sites["house"].export_kwh > 1.0  # the replayed PV, not the scenario's (none)


def test_iso_times_with_offsets_read_as_the_same_instants(tmp_path: Path) -> None:
    path = tmp_path / "iso.csv"
    path.write_text(
        "time,load_w,pv_w\n"
        "2026-06-22T00:00:00Z,100,0\n"
        "2026-06-22T02:15:00+02:00,200,5\n"  # 00:15 UTC
        "2026-06-22T00:30:00,300,0\n"  # no offset: UTC, as in scenario files
    )
    series = read_series(path)
    assert list(series.ts) == [START, START + 900.0, START + 1800.0]
    assert series.end_ts == START + 2700.0
    assert list(series.load_w) == [100.0, 200.0, 300.0]


def test_the_mean_over_a_window_integrates_the_steps_exactly() -> None:
    # 100 W for 10 s then 400 W for 10 s (the last row holds for the step before it): the
    # window [5, 15) holds 5 s of each, mean 250 W.
    mean = mean_power_w([0.0, 10.0], [100.0, 400.0], [5.0, 0.0, 10.0], 10.0)
    assert list(mean) == pytest.approx([250.0, 100.0, 400.0])
    with pytest.raises(ValueError, match="outside"):
        mean_power_w([0.0, 10.0], [100.0, 400.0], [15.0], 10.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("time,load_w\n0,1\n60,1\n", "missing pv_w"),
        ("time,load_w,pv_w\n0,1,0\n0,1,0\n", "line 3: time does not increase"),
        ("time,load_w,pv_w\n0,1,0\n60,abc,0\n", "line 3: load_w 'abc' is not a number"),
        ("time,load_w,pv_w\n0,1,-5\n60,1,0\n", "line 2: pv_w must be a finite power >= 0"),
        ("time,load_w,pv_w\n0,1,0\nyesterday,1,0\n", "neither ISO 8601 nor epoch"),
        ("time,load_w,pv_w\n0,1,0\n", "at least two rows"),
        ("time,load_w,pv_w\n0,1,0\n60,1\n", "fewer fields"),
    ],
)
def test_a_bad_file_is_refused_with_what_and_where(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ReplayError, match=message):
        read_series(path)


def test_a_series_that_does_not_cover_the_run_or_an_unknown_site_is_refused(
    tmp_path: Path,
) -> None:
    _series(tmp_path / "house.csv", hours=2.0)
    series = read_series(tmp_path / "house.csv")
    scenario = parse_scenario(_one_house(), "test")
    with pytest.raises(BacktestError, match=r"site house: the series covers .* the run needs"):
        run_backtest(scenario, days=0.25, replay={"house": series})
    with pytest.raises(BacktestError, match="no site 'barn'"):
        run_backtest(scenario, days=0.05, replay={"barn": series})


def test_the_command_replays_a_csv_and_explains_a_bad_one(tmp_path: Path) -> None:
    scenario = tmp_path / "one.toml"
    scenario.write_text(
        'name = "one-house"\nstart = 2026-01-01T00:00:00Z\nlatitude_deg = 48.0\n'
        'longitude_deg = 11.0\n[[sites]]\nid = "house"\n'
        'load = { profile = "household", base_w = 300, peak_w = 3000 }\n'
        'devices = [{ name = "meter", kind = "sunspec_meter" }]\n'
    )
    _series(tmp_path / "house.csv", hours=2.0)
    runner = CliRunner()
    ok = runner.invoke(
        app,
        [
            "backtest",
            str(scenario),
            "--days",
            "0.0625",
            "--start",
            "2026-06-22T00:00:00",
            "--csv",
            f"house={tmp_path / 'house.csv'}",
        ],
    )
    assert ok.exit_code == 0, ok.output
    assert "house" in ok.output
    (tmp_path / "bad.csv").write_text("when,load_w,pv_w\n0,1,0\n")
    bad = runner.invoke(app, ["backtest", str(scenario), "--csv", f"house={tmp_path / 'bad.csv'}"])
    assert bad.exit_code == 2
    assert "missing time" in bad.output
    assert runner.invoke(app, ["backtest", str(scenario), "--csv", "house"]).exit_code == 2
