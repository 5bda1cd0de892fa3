"""The grid loop's absorbing (coordinator.grid.plan_absorb): what the feeder exports is charged
into the batteries instead of being sold at feed-in. Hand-checkable cases; no MQTT."""

from __future__ import annotations

from dataclasses import replace

import pytest

from coordinator.config import GridSection
from coordinator.grid import Relief, SiteGrid, absorb_expiry_s, battery_headroom_w, plan_absorb


def battery_site(battery_w: float, charge_room_w: float, readings: int = 10) -> SiteGrid:
    return SiteGrid(
        grid_power_w=-5000.0,
        battery_power_w=battery_w,
        headroom_w=(0.0, charge_room_w),
        readings=readings,
        role="prosumer",
    )


def test_the_export_is_charged_pro_rata_to_each_batterys_charge_room() -> None:
    # the feeder exports 12 kW; "a" discharges 10 kW with 30 kW of charge room, "b" idles
    # with 10 kW: 9 kW and 3 kW more charge, so "a" discharges only 1 kW and "b" charges 3
    sites = {"a": battery_site(10_000.0, 30_000.0), "b": battery_site(0.0, 10_000.0)}
    orders = plan_absorb(-12_000.0, sites, {}, now_ts=100.0, expiry_s=300.0)
    (a_w, a), (b_w, b) = orders["a"], orders["b"]
    assert (a_w, b_w) == (pytest.approx(1000.0), pytest.approx(-3000.0))
    assert (a.flow_w, a.base_w, a.pending_w) == (pytest.approx(-9000.0), 10_000.0, -9000.0)
    assert (b.expires_ts, b.readings_at_order) == (400.0, 10)


def test_absorbing_is_limited_by_the_charge_room_and_needs_it() -> None:
    # 50 kW exported, 4 kW of room: 4 kW; a site without a battery (no room) gets no order
    sites = {"a": battery_site(0.0, 4000.0), "pv": battery_site(0.0, 0.0)}
    orders = plan_absorb(-50_000.0, sites, {}, now_ts=0.0, expiry_s=300.0)
    assert list(orders) == ["a"]
    assert orders["a"][0] == pytest.approx(-4000.0)
    # a full battery has no charge room (coordinator.grid.CHARGE_CEILING_SOC_PCT, 98 %)
    assert battery_headroom_w(5000.0, 0.0, 99.0)[1] == 0.0


def test_an_importing_feeder_is_left_alone_without_standing_orders() -> None:
    sites = {"a": battery_site(2000.0, 50_000.0)}
    assert plan_absorb(3000.0, sites, {}, now_ts=0.0, expiry_s=300.0) == {}
    assert plan_absorb(0.0, sites, {}, now_ts=0.0, expiry_s=300.0) == {}


def test_once_the_feeder_imports_the_extra_charge_is_handed_back_but_never_past_its_base() -> None:
    # "a" discharged 2 kW before absorbing and charges 4 kW now (6 kW given); the feeder
    # imports 1.5 kW: 1.5 kW handed back; far above, back to its 2 kW discharge, no further
    absorbing = {"a": Relief(-6000.0, 0.0, 2000.0, 1e9, 0)}
    sites = {"a": battery_site(-4000.0, 50_000.0)}
    orders = plan_absorb(1500.0, sites, absorbing, now_ts=0.0, expiry_s=300.0)
    assert orders["a"][0] == pytest.approx(-2500.0)
    orders = plan_absorb(50_000.0, sites, absorbing, now_ts=0.0, expiry_s=300.0)
    assert orders["a"][0] == pytest.approx(2000.0)
    assert orders["a"][1].flow_w == 0.0
    # balanced (no flow): the charge is held
    assert plan_absorb(0.0, sites, absorbing, now_ts=0.0, expiry_s=300.0)["a"][0] == -4000.0


def test_a_battery_back_at_its_base_is_left_to_its_site() -> None:
    # "a" has handed all its extra charge back (it discharges 2 kW, its base): while the
    # feeder imports or is balanced no order renews it there, so the last one lapses and its
    # plan and award take over; an export orders it again
    absorbing = {"a": Relief(0.0, 0.0, 2000.0, 1e9, 0)}
    sites = {"a": battery_site(2000.0, 50_000.0)}
    assert plan_absorb(1500.0, sites, absorbing, now_ts=0.0, expiry_s=300.0) == {}
    assert plan_absorb(0.0, sites, absorbing, now_ts=0.0, expiry_s=300.0) == {}
    assert plan_absorb(-1000.0, sites, absorbing, now_ts=0.0, expiry_s=300.0)["a"][0] == 1000.0


def test_an_order_not_yet_in_the_readings_takes_the_export_first() -> None:
    # "a" was ordered 6 kW more charge at reading 10 and has sent one reading since: of the
    # 10 kW exported, 4 kW are left, for "b"
    absorbing = {"a": Relief(-6000.0, -6000.0, 0.0, 1e9, 10)}
    sites = {"a": battery_site(0.0, 50_000.0, readings=11), "b": battery_site(0.0, 50_000.0)}
    orders = plan_absorb(-10_000.0, sites, absorbing, now_ts=0.0, expiry_s=300.0)
    assert list(orders) == ["b"]
    assert orders["b"][0] == pytest.approx(-4000.0)


def test_absorbing_never_sets_a_new_peak_for_a_sites_own_meter() -> None:
    # the feeder exports 12 kW; "a" imports 8 kW against the 10 kW the grid loop has seen
    # there at most: 2 kW of room, not its 30 kW of charge room; shared pro rata to 2 and
    # 30 kW of room with "b" (no peak known): 0.75 kW and 11.25 kW
    a = replace(battery_site(0.0, 30_000.0), grid_power_w=8000.0, peak_import_w=10_000.0)
    b = battery_site(0.0, 30_000.0)
    orders = plan_absorb(-12_000.0, {"a": a, "b": b}, {}, now_ts=0.0, expiry_s=300.0)
    assert orders["a"][0] == pytest.approx(-12_000.0 * 2 / 32)
    assert orders["b"][0] == pytest.approx(-12_000.0 * 30 / 32)
    # at its peak already: no order
    at_peak = replace(a, grid_power_w=10_000.0)
    assert plan_absorb(-12_000.0, {"a": at_peak}, {}, now_ts=0.0, expiry_s=300.0) == {}


def test_an_absorbing_order_never_outlives_its_market_interval() -> None:
    # 900 s intervals, orders for 300 s: at 100 s into one, 300 s; at 800 s, the 100 s left;
    # at the boundary, a whole order in the new interval
    assert absorb_expiry_s(9000.0 + 100.0, 900.0, 300.0) == 300.0
    assert absorb_expiry_s(9000.0 + 800.0, 900.0, 300.0) == pytest.approx(100.0)
    assert absorb_expiry_s(9900.0, 900.0, 300.0) == 300.0


def test_absorbing_is_on_by_default_and_can_be_switched_off() -> None:
    assert GridSection().absorb_export
    assert not GridSection(absorb_export=False).absorb_export
