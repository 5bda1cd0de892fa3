"""The stepped simulation engine (wattmesh.backtest): same physics, deterministic, balanced."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from broker.clock import ManualClock
from coordinator.config import parse_coordinator_config
from coordinator.ledger import Ledger
from simulators import physics
from simulators.devices import BatterySim, SimSite
from simulators.scenario import load_scenario, parse_scenario, stepped_sites
from wattmesh import backtest
from wattmesh.backtest import (
    BacktestError,
    Engine,
    SiteResult,
    SteppedBattery,
    _profiles,
    default_edge_configs,
    run_backtest,
)
from wattmesh.cli import app
from wattmesh.replay import Series

COMMUNITY = Path(__file__).resolve().parents[1] / "config" / "scenarios" / "community.toml"


def test_profiles_are_the_simulators_own_load_and_pv() -> None:
    scenario = load_scenario(COMMUNITY)
    times = scenario.start_ts + 60.0 * np.arange(0, 24 * 60, 7)  # a day, every 7 minutes
    _, profiles = _profiles(scenario, times)
    clock = ManualClock(float(times[0]))
    sites = stepped_sites(scenario, clock)
    for k, t in enumerate(times):
        clock.ts = float(t)
        for name, site in sites.items():
            site.advance()
            load, pv = profiles[name]
            assert load[k] == pytest.approx(site.load_w, rel=1e-12, abs=1e-9)
            assert pv[k] == pytest.approx(site.pv_w, rel=1e-12, abs=1e-9)
    assert max(float(profiles["solar-farm"][1].max()), 0.0) > 100_000.0  # midsummer noon


def test_a_stepped_battery_follows_setpoints_as_the_simulated_device_does() -> None:
    clock = ManualClock(1_000_000.0)
    site = SimSite("s", clock)
    sim = BatterySim("b", 1, site, 10_000.0, 5000.0, soc_pct=20.0, soc_min_pct=10.0)
    stepped = SteppedBattery.of(sim)
    sim.step(clock.ts, 0.0)
    stepped.step(0.0)
    # Discharge 4 kW into the minimum, then charge 2.5 kW, then hold; 60-s steps.
    for setpoint in [4000.0] * 12 + [-2500.0] * 10 + [0.0] * 3:
        pct = 100.0 * abs(setpoint) / 5000.0
        sim.image.set_many(
            124,
            {
                "OutWRte": pct if setpoint > 0 else 0.0,
                "InWRte": pct if setpoint < 0 else 0.0,
                "StorCtl_Mod": 2 if setpoint > 0 else 1 if setpoint < 0 else 0,
            },
        )
        sim.written(124, {"StorCtl_Mod"})
        stepped.command(setpoint)
        assert stepped.power_w == pytest.approx(sim.power_w, abs=1e-9)
        clock.ts += 60.0
        sim.step(clock.ts, 60.0)
        stepped.step(60.0)
        assert stepped.soc_pct == pytest.approx(sim.soc_pct, abs=1e-9)
        assert stepped.power_w == pytest.approx(sim.power_w, abs=1e-9)
    assert stepped.soc_pct > 10.0  # it charged after reaching the minimum


def test_a_community_day_is_deterministic_and_its_ledger_balances(tmp_path: Path) -> None:
    scenario = load_scenario(COMMUNITY)
    first = run_backtest(scenario, days=1, ledger_path=tmp_path / "a.sqlite")
    again = run_backtest(scenario, days=1, ledger_path=tmp_path / "b.sqlite")
    other = run_backtest(scenario.model_copy(update={"seed": 8}), days=1)
    assert first.ledger_balanced and again.ledger_balanced and other.ledger_balanced
    assert first.intervals == 95  # every interval of the day but the first, which had no gate
    assert {n: s.net_cost for n, s in first.sites.items()} == {
        n: s.net_cost for n, s in again.sites.items()
    }
    assert first.feeder_peak_w == again.feeder_peak_w
    assert first.total_cost != other.total_cost  # the seed matters
    assert set(first.sites) == {"solar-farm", "factory", "house-1", "house-2", "school"}
    assert first.sites["solar-farm"].net_cost < 0 < first.sites["factory"].net_cost
    # The plans keep the factory's peaks off the feeder; without planning the grid loop
    # (the backstop) has to act on them.
    unplanned = {
        name: e.model_copy(update={"plan": e.plan.model_copy(update={"enabled": False})})
        for name, e in default_edge_configs(scenario, 60.0).items()
    }
    rules = run_backtest(scenario, days=1, edges=unplanned)
    assert rules.dispatches > 0
    # With batteries idle the feeder's 15-minute peak passes its 150 kW limit that day; the
    # plans and the grid policy's battery orders (the backstop, acting at the limit itself)
    # keep it within 2 % of it.
    idle = run_backtest(scenario, days=1, variant="idle")
    assert idle.feeder_peak_w > 1.1 * first.feeder_limit_w
    assert first.feeder_peak_w < 1.02 * first.feeder_limit_w


def test_plans_and_schedules_in_threads_give_the_results_of_running_in_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine solves the sites' plans and the community schedule in threads while it steps
    # on; each starts from its inputs as they were and is collected before anything reads it,
    # so the ledger is the one an engine making each in turn writes, row for row.
    scenario = load_scenario(COMMUNITY)
    threaded = run_backtest(scenario, days=1, ledger_path=tmp_path / "threads.sqlite")
    monkeypatch.setattr(backtest, "_plan_pool", lambda: None)  # one core: all in turn
    in_turn = run_backtest(scenario, days=1, ledger_path=tmp_path / "in-turn.sqlite")
    assert threaded.total_cost == in_turn.total_cost
    assert threaded.dispatches == in_turn.dispatches > 0
    rows = {}
    for name in ("threads", "in-turn"):
        with sqlite3.connect(tmp_path / f"{name}.sqlite") as db:
            rows[name] = list(db.iterdump())
    assert rows["threads"] == rows["in-turn"]
    assert any("INSERT INTO" in line for line in rows["threads"])


def test_forecasts_made_early_are_taken_only_when_nothing_they_read_has_changed(
    tmp_path: Path,
) -> None:
    # While the schedule is solved the engine makes the next clearing's site forecasts; that
    # clearing takes them only for the same horizon, histories and weather, else makes its own.
    scenario = load_scenario(COMMUNITY)
    engine = Engine(scenario, days=0.25, ledger_path=tmp_path / "l.sqlite", history_days=1.0)
    try:
        now = scenario.start_ts + 6 * 3600.0 - 60.0
        start = now + 960.0
        made = engine._site_forecasts(start, now)
        assert made is not None
        version = engine._history_version
        weather = engine.weather.snapshot(now)
        assert weather.kept  # the simulated weather service's runs

        def taken(early: tuple[float, int, object]) -> bool:
            engine._early = (*early, made)  # type: ignore[assignment]
            return engine._site_forecasts(start, now) is made

        assert taken((start, version, weather))
        assert engine._early is None  # used once
        assert not taken((start + 900.0, version, weather))  # another horizon
        assert not taken((start, version - 1, weather))  # a history sample added since
        older = replace(weather, kept=weather.kept[:-1])
        assert not taken((start, version, older))  # a weather run issued since
        assert not taken((start, version, replace(weather, fresh=not weather.fresh)))
        again = engine._site_forecasts(start, now)  # made anew: the same figures
        assert again is not None
        np.testing.assert_array_equal(again.pv_w, made.pv_w)
        np.testing.assert_array_equal(again.load_w, made.load_w)
    finally:
        engine.close()


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


def test_one_house_on_a_flat_tariff_pays_retail_for_what_it_imports(tmp_path: Path) -> None:
    # No PV, no battery, about 1 kW all day (a flat profile with +-3 % noise), retail 0.30 at
    # all hours, no imbalance premium: whatever its award, every kWh costs 0.30, so 23.75 h
    # (the first interval has no market) cost about 0.30 * 23.75 = 7.125.
    scenario = parse_scenario(_one_house(), "test")
    config = parse_coordinator_config(
        {
            "tariff": {"retail_per_kwh": 0.30, "feed_in_per_kwh": 0.08},
            "market": {"imbalance_premium_per_kwh": 0.0, "rebate": "none"},
        },
        "test",
    )
    result = run_backtest(scenario, days=1, coordinator=config, ledger_path=tmp_path / "l.sqlite")
    house = result.sites["house"]
    times = scenario.start_ts + 900.0 + 60.0 * np.arange(95 * 15)
    site_seed = scenario.seed * 1000  # simulators.scenario.build_sites: seed * 1000 + index
    load_w = physics.load_power_w(times, "household", 1000.0, 1000.0, seed=site_seed)
    kwh = float(load_w.sum()) * 60.0 / 3.6e6
    assert house.import_kwh == pytest.approx(kwh, abs=95 * 0.5e-3)  # metered in whole Wh
    assert house.net_cost == pytest.approx(0.30 * kwh, abs=0.001)
    assert house.net_cost == pytest.approx(7.125, rel=0.03)
    assert house.baseline_cost == pytest.approx(house.net_cost, abs=0.001)
    assert result.feeder_peak_w == pytest.approx(1000.0, rel=0.07)
    assert result.ledger_balanced


def test_a_step_that_does_not_divide_the_interval_is_refused(tmp_path: Path) -> None:
    scenario = parse_scenario(_one_house(), "test")
    with pytest.raises(BacktestError, match="divide"):
        Engine(scenario, days=1, ledger_path=tmp_path / "l.sqlite", step_s=7 * 60)


def test_the_command_prints_costs_peak_and_wall_time(tmp_path: Path) -> None:
    path = tmp_path / "one.toml"
    path.write_text(
        'name = "one-house"\nstart = 2026-06-22T00:00:00Z\nlatitude_deg = 48.0\n'
        'longitude_deg = 11.0\n[[sites]]\nid = "house"\n'
        'load = { profile = "household", base_w = 300, peak_w = 3000 }\n'
        'devices = [{ name = "meter", kind = "sunspec_meter" }]\n'
    )
    result = CliRunner().invoke(app, ["backtest", str(path), "--days", "0.5"])
    assert result.exit_code == 0, result.output
    assert "house" in result.output
    assert "feeder 15-minute peak import" in result.output
    assert "ledger balanced: yes" in result.output
    assert "wall time" in result.output


def test_the_command_names_a_bad_scenario(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\nstart = 2026-06-22T00:00:00Z\nlatitude_deg = 95.0\n')
    result = CliRunner().invoke(app, ["backtest", str(path)])
    assert result.exit_code == 2
    assert "latitude_deg" in result.output
    assert "Traceback" not in result.output


def test_baselines_neither_trade_nor_balance_and_idle_batteries_stay_put() -> None:
    scenario = load_scenario(COMMUNITY)
    idle = run_backtest(scenario, days=0.5, variant="idle")
    local = run_backtest(scenario, days=0.5, variant="self_consumption")
    for r in (idle, local):
        assert r.dispatches == 0 and r.ledger_balanced
    assert all(s.stored_end_kwh == s.stored_start_kwh for s in idle.sites.values())
    # Self-consumption covers the school's night and morning load from its battery and
    # stores its PV surplus by noon: it imports and exports less than with the battery idle.
    school, school_idle = local.sites["school"], idle.sites["school"]
    assert school.import_kwh < school_idle.import_kwh
    assert school.export_kwh < school_idle.export_kwh
    assert school.stored_end_kwh > school.stored_start_kwh
    # The metered energy per interval is what the ledger settled, for the economics.
    assert len(idle.settled) == idle.intervals == 47
    total = sum(float(m.sum()) for m in idle.metered_kwh.values())
    assert total == pytest.approx(
        sum(s.import_kwh - s.export_kwh for s in idle.sites.values()), abs=1e-6
    )
    with pytest.raises(BacktestError, match="variant"):
        run_backtest(scenario, days=0.5, variant="clever")  # type: ignore[arg-type]


def test_with_batteries_idle_each_site_meters_the_load_minus_pv_the_lp_is_given() -> None:
    scenario = load_scenario(COMMUNITY)
    result = run_backtest(scenario, days=0.25, variant="idle")
    assert set(result.net_kwh) == set(result.metered_kwh)
    for name, net in result.net_kwh.items():
        assert len(net) == result.intervals
        # the ledger meters in whole Wh
        assert result.metered_kwh[name] == pytest.approx(net, abs=0.5e-3)
    assert [b.soc_pct for b in result.batteries["factory"]] == [60.0]  # as at the start


def test_at_the_live_poll_cadence_each_reading_is_metered_until_the_next(tmp_path: Path) -> None:
    # Steps of 60 s, polls every 120 s (which does not divide the 900-s interval): each
    # reading of the house's load holds for 120 s, split between the intervals it spans, as
    # the live coordinator meters telemetry.
    scenario = parse_scenario(_one_house(), "test")
    result = run_backtest(scenario, days=0.25, step_s=60.0, poll_s=120.0, grid_period_s=120.0)
    polls = scenario.start_ts + 120.0 * np.arange(round(0.25 * 86_400 / 120))
    load_w = physics.load_power_w(polls, "household", 1000.0, 1000.0, seed=scenario.seed * 1000)
    for j, k in enumerate(result.settled):
        lo, hi = k * 900.0, (k + 1) * 900.0
        overlap_s = np.clip(np.minimum(polls + 120.0, hi) - np.maximum(polls, lo), 0.0, None)
        expected_kwh = float((load_w * overlap_s).sum()) / 3.6e6
        assert result.metered_kwh["house"][j] == pytest.approx(expected_kwh, abs=0.5e-3)
    assert any(k * 900.0 % 120.0 for k in result.settled)  # some readings do span two intervals


def test_a_poll_period_that_is_not_a_multiple_of_the_step_is_refused(tmp_path: Path) -> None:
    scenario = parse_scenario(_one_house(), "test")
    with pytest.raises(BacktestError, match="poll_s must be a multiple"):
        Engine(scenario, days=1, ledger_path=tmp_path / "l.sqlite", step_s=60.0, poll_s=90.0)


def test_with_trust_checks_an_implausible_site_is_refused_and_settled_as_estimated(
    tmp_path: Path,
) -> None:
    # The house draws about 1 kW against a declared 500 W connection: the coordinator refuses
    # every reading (beyond 500 W + 10 %), so each interval is settled as estimated (at its
    # award); its meter still counts. Its bids (about 0.25 kWh) pass: within what 500 W and
    # the 1 kW storage cap a site reporting no battery gets (1.5 kW: 0.41 kWh an interval).
    scenario = parse_scenario(_one_house(), "test")
    config = parse_coordinator_config(
        {"sites": {"house": {"connection_w": 500.0}}, "coordinator": {"ledger": "unused"}},
        "test",
    )
    path = tmp_path / "l.sqlite"
    days = 0.125
    result = run_backtest(scenario, days=days, coordinator=config, ledger_path=path, trust=True)
    assert result.rejected["house"] == round(days * 86_400 / 60)  # every reading
    with Ledger(path) as ledger:
        for k in result.settled:
            settlement = ledger.settlement(k)
            assert settlement is not None
            (house,) = settlement.sites
            assert house.estimated and house.metered_wh == house.award_wh > 0
    assert result.metered_kwh["house"] == pytest.approx(result.net_kwh["house"], abs=0.5e-3)
    believed = run_backtest(scenario, days=days, coordinator=config)
    assert believed.rejected["house"] == 0


def _farm_and_store(absorb: bool, tmp_path: Path) -> dict[str, SiteResult]:
    """Two hours around a June noon: a 30 kW PV farm (1 kW of load) and a store whose
    10 kW / 50 kWh battery idles of itself (no market, no plan, an idle fallback)."""
    scenario = parse_scenario(
        {
            "name": "farm-and-store",
            "start": "2026-06-22T10:00:00Z",
            "seed": 3,
            "latitude_deg": 48.0,
            "longitude_deg": 11.0,
            "sites": [
                {
                    "id": "farm",
                    "load": {"profile": "household", "base_w": 1000.0, "peak_w": 1000.0},
                    "devices": [
                        {"name": "pv", "kind": "pv_inverter", "port": 0, "rated_ac_w": 30_000},
                        {"name": "m1", "kind": "sunspec_meter", "port": 0},
                    ],
                },
                {
                    "id": "store",
                    "load": {"profile": "household", "base_w": 500.0, "peak_w": 500.0},
                    "devices": [
                        {
                            "name": "battery",
                            "kind": "battery",
                            "port": 0,
                            "capacity_wh": 50_000,
                            "rated_power_w": 10_000,
                            "soc_pct": 20,
                        },
                        {"name": "m2", "kind": "sunspec_meter", "port": 0},
                    ],
                },
            ],
        },
        "test",
    )
    edges = default_edge_configs(scenario, 60.0)
    edges["store"] = edges["store"].model_copy(
        update={
            "market": edges["store"].market.model_copy(update={"enabled": False}),
            "plan": edges["store"].plan.model_copy(update={"enabled": False}),
            "fallback": edges["store"].fallback.model_copy(update={"mode": "idle"}),
        }
    )
    config = parse_coordinator_config(
        {
            "tariff": {"retail_per_kwh": 0.30, "feed_in_per_kwh": 0.08},
            "grid": {"absorb_export": absorb},
        },
        "test",
    )
    # the store's load: 12 kW for its first quarter hour (its peak: absorbing never sets a new
    # one for a site's own meter), then 0.5 kW
    start = scenario.start_ts
    ts = start + 900.0 * np.arange(9)
    load = np.where(np.arange(9) == 0, 12_000.0, 500.0)
    result = run_backtest(
        scenario,
        days=2 / 24,
        coordinator=config,
        edges=edges,
        ledger_path=tmp_path / f"{absorb}.sqlite",
        history_days=0.0,
        replay={"store": Series(ts, load, np.zeros(9))},
    )
    return result.sites


def test_the_engine_stores_what_the_feeder_would_export(tmp_path: Path) -> None:
    # The farm's export at noon is mostly above the battery's 10 kW (clouds pass); without
    # absorbing the store's battery idles, with it the grid loop charges it into the export
    # once the store's load has fallen below its 12 kW peak: at most 10 kW for the last 1.75 h
    # less 5 % charging losses (16.6 kWh), at least two thirds of that; the farm's export as
    # it was.
    left = _farm_and_store(False, tmp_path)
    stored = _farm_and_store(True, tmp_path)
    assert left["store"].stored_end_kwh == pytest.approx(left["store"].stored_start_kwh)
    gained = stored["store"].stored_end_kwh - stored["store"].stored_start_kwh
    most = 10.0 * 1.75 * 0.95
    assert 2.0 / 3.0 * most < gained <= most
    # bought inside the feeder: the store's metered import grows by what it charged (in the
    # seven settled intervals: none cleared for the first)
    bought = stored["store"].import_kwh - left["store"].import_kwh
    assert bought == pytest.approx(gained / 0.95, rel=0.05)
    assert stored["farm"].export_kwh == pytest.approx(left["farm"].export_kwh)
