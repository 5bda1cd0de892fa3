"""The coordinator's pure grid balancing (coordinator.grid) on hand-checkable cases; no MQTT."""

from __future__ import annotations

import math

import pytest

from coordinator.config import GridSection
from coordinator.grid import (
    Relief,
    SiteGrid,
    active_reliefs,
    battery_headroom_w,
    feeder_mode,
    holding_grid,
    plan_relief,
    reissue_due,
    relief_target_w,
)

# 100 kW of import, 50 kW of export; act at 90 %, aim for 80 %, release at 70 %.
GRID = GridSection(
    import_limit_w=100_000.0,
    export_limit_w=50_000.0,
    act_at_pct=90.0,
    target_pct=80.0,
    release_pct=70.0,
    dispatch_expiry_s=300,
)


def site(
    battery_w: float = 0.0,
    headroom: tuple[float, float] = (0.0, 0.0),
    readings: int = 10,
    grid_w: float = 10_000.0,
    role: str | None = "prosumer",
) -> SiteGrid:
    return SiteGrid(
        grid_power_w=grid_w,
        battery_power_w=battery_w,
        headroom_w=headroom,
        readings=readings,
        role=role,
    )


def test_headroom_is_rated_less_present_power_within_soc_bounds() -> None:
    assert battery_headroom_w(10_000.0, 4000.0, 50.0) == (6000.0, 14_000.0)
    assert battery_headroom_w(10_000.0, -4000.0, None) == (14_000.0, 6000.0)
    assert battery_headroom_w(10_000.0, 0.0, 6.0) == (0.0, 10_000.0)  # too empty to discharge
    assert battery_headroom_w(10_000.0, 0.0, 6.5)[0] == 10_000.0  # the reserve's energy is used
    assert battery_headroom_w(10_000.0, 0.0, 98.0) == (10_000.0, 0.0)  # too full to charge


def test_mode_has_hysteresis_between_release_and_act() -> None:
    kw = {"emergency": False, "grid": GRID}
    assert feeder_mode(91_000.0, {}, previous="normal", **kw) == "constrained"
    assert feeder_mode(85_000.0, {}, previous="normal", **kw) == "normal"
    assert feeder_mode(85_000.0, {}, previous="constrained", **kw) == "constrained"
    assert feeder_mode(70_000.0, {}, previous="constrained", **kw) == "normal"
    # Export is measured against the export limit: 46 kW of 50 kW is 92 %.
    assert feeder_mode(-46_000.0, {}, previous="normal", **kw) == "constrained"


def test_mode_counts_the_flow_without_our_relief() -> None:
    # 65 kW seen, but 30 kW of it is our batteries' relief: the feeder would be at 95 %.
    relief = {"a": Relief(30_000.0, 0.0, 0.0, 1e9, 0)}
    mode = feeder_mode(65_000.0, relief, previous="constrained", emergency=False, grid=GRID)
    assert mode == "constrained"


def test_an_emergency_overrides_and_ends_in_normal() -> None:
    assert feeder_mode(0.0, {}, previous="normal", emergency=True, grid=GRID) == "emergency"
    assert feeder_mode(85e3, {}, previous="emergency", emergency=False, grid=GRID) == "normal"


def test_expired_reliefs_are_dropped() -> None:
    reliefs = {"a": Relief(1.0, 0.0, 0.0, 100.0, 0), "b": Relief(1.0, 0.0, 0.0, 200.0, 0)}
    assert list(active_reliefs(reliefs, 100.0)) == ["b"]


def test_target_is_the_target_share_of_the_limit_in_the_flow_direction() -> None:
    assert relief_target_w(95_000.0, GRID) == 80_000.0
    assert relief_target_w(-48_000.0, GRID) == 40_000.0


def test_excess_is_shared_pro_rata_to_headroom() -> None:
    # 110 kW against a target of 80 kW: 30 kW to relieve; headroom 30 kW and 10 kW.
    sites = {"a": site(0.0, (30_000.0, 0.0)), "b": site(2000.0, (10_000.0, 0.0))}
    plan = plan_relief(110_000.0, 80_000.0, sites, {}, now_ts=1000.0, expiry_s=300.0)
    (a_w, a), (b_w, b) = plan.batteries["a"], plan.batteries["b"]
    assert (a_w, b_w) == (pytest.approx(22_500.0), pytest.approx(9500.0))
    assert (a.flow_w, a.pending_w, a.base_w) == (pytest.approx(22_500.0), 22_500.0, 0.0)
    assert (b.flow_w, b.base_w, b.expires_ts, b.readings_at_order) == (7500.0, 2000.0, 1300.0, 10)
    assert plan.load_limits_w == {}


def test_export_excess_charges_batteries() -> None:
    sites = {"a": site(0.0, (0.0, 20_000.0))}
    plan = plan_relief(-50_000.0, 40_000.0, sites, {}, now_ts=0.0, expiry_s=300.0)
    assert plan.batteries["a"][0] == pytest.approx(-10_000.0)


def test_a_site_ordered_without_two_new_readings_is_not_ordered_again() -> None:
    # "a" was ordered 8 kW more at reading 10 and has sent only one reading since: its 8 kW
    # are taken off the 30 kW excess; "b" takes the remaining 22 kW (within its 40 kW).
    reliefs = {"a": Relief(8000.0, 8000.0, 0.0, 1e9, 10)}
    sites = {"a": site(0.0, (30_000.0, 0.0), readings=11), "b": site(0.0, (40_000.0, 0.0))}
    plan = plan_relief(110_000.0, 80_000.0, sites, reliefs, now_ts=0.0, expiry_s=300.0)
    assert list(plan.batteries) == ["b"]
    assert plan.batteries["b"][0] == pytest.approx(22_000.0)


def test_handing_back_relief_stops_at_the_episode_base() -> None:
    # Flow 60 kW under the 80 kW target: hand back 20 kW, but the battery (base 5 kW
    # discharging before the episode, now 12 kW) never goes below its base.
    reliefs = {"a": Relief(7000.0, 0.0, 5000.0, 1e9, 0)}
    sites = {"a": site(12_000.0, (8000.0, 0.0))}
    plan = plan_relief(60_000.0, 80_000.0, sites, reliefs, now_ts=0.0, expiry_s=300.0)
    setpoint, relief = plan.batteries["a"]
    assert setpoint == 5000.0
    assert relief.flow_w == 0.0


def test_what_batteries_cannot_cover_becomes_load_limits_for_importers() -> None:
    # 30 kW excess, 10 kW of battery headroom at "a": 20 kW left for the importing
    # consumers "c" (25 kW) and "p" (15 kW); the producer and the exporter are not asked.
    sites = {
        "a": site(0.0, (10_000.0, 0.0), grid_w=5000.0),
        "c": site(grid_w=25_000.0, role="consumer"),
        "p": site(grid_w=15_000.0, role="prosumer"),
        "farm": site(grid_w=2000.0, role="producer"),
        "x": site(grid_w=-3000.0, role="consumer"),
    }
    plan = plan_relief(110_000.0, 80_000.0, sites, {}, now_ts=0.0, expiry_s=300.0)
    assert plan.batteries["a"][0] == pytest.approx(10_000.0)
    assert plan.load_limits_w == {"c": 15_000.0, "p": 5000.0}


def test_reissue_waits_reissue_s() -> None:
    assert reissue_due(None, 0.0, 60.0)
    assert not reissue_due(100.0, 159.0, 60.0)
    assert reissue_due(100.0, 160.0, 60.0)


def test_a_battery_charging_at_the_first_order_does_not_hold_the_feeder_constrained() -> None:
    # 110 kW against an 80 kW target while "a" charges at 40 kW to its plan: the order cuts
    # the charge by the 30 kW excess (to 10 kW). The episode's base is idle, not the charge.
    sites = {"a": site(-40_000.0, (80_000.0, 0.0))}
    plan = plan_relief(110_000.0, 80_000.0, sites, {}, now_ts=0.0, expiry_s=300.0)
    setpoint, relief = plan.batteries["a"]
    assert (setpoint, relief.base_w) == (pytest.approx(-10_000.0), 0.0)
    # Two readings later the feeder is still at 95 kW: 15 kW more, a 5 kW discharge.
    sites = {"a": site(-10_000.0, (70_000.0, 0.0), readings=12)}
    plan = plan_relief(95_000.0, 80_000.0, sites, {"a": relief}, now_ts=60.0, expiry_s=300.0)
    setpoint, relief = plan.batteries["a"]
    assert (setpoint, relief.flow_w) == (pytest.approx(5000.0), pytest.approx(5000.0))
    # At night the feeder is at 30 kW: the flow without our orders is 35 kW, not 75 kW (as
    # if the battery would otherwise have kept charging at 40 kW), so the mode returns to
    # normal instead of re-issuing the discharge all night and blocking every recharge.
    mode = feeder_mode(30_000.0, {"a": relief}, previous="constrained", emergency=False, grid=GRID)
    assert mode == "normal"


def test_holding_grid_raises_the_limit_so_that_the_target_is_the_reservations_level() -> None:
    g = GridSection(import_limit_w=150_000.0, act_at_pct=100.0, target_pct=98.0, release_pct=92.0)
    assert holding_grid(g, None) is g
    assert holding_grid(g, 140.0) is g  # the limit's own target is higher: nothing to raise
    assert holding_grid(g, math.inf) is g
    raised = holding_grid(g, 160.0)
    assert relief_target_w(1.0, raised) == pytest.approx(160_000.0)
    assert raised.export_limit_w == g.export_limit_w
