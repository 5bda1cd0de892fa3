"""The grid loop's refill (coordinator.grid): a fleet short of the feeder reservation's
requirement charges into the feeder's measured headroom. Hand-checkable cases; no MQTT."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.config import GridSection
from coordinator.grid import (
    Relief,
    SiteGrid,
    holding_grid,
    plan_refill,
    refill_level_w,
    refill_max_w,
    refilling,
    required_now_kwh,
)


def battery_site(battery_w: float, charge_room_w: float, readings: int = 10) -> SiteGrid:
    return SiteGrid(
        grid_power_w=20_000.0,
        battery_power_w=battery_w,
        headroom_w=(0.0, charge_room_w),
        readings=readings,
        role="prosumer",
    )


def test_the_requirement_now_is_the_one_at_the_end_of_the_present_step() -> None:
    required = np.array([10.0, 20.0, 30.0])  # steps of 900 s from t = 1000
    assert required_now_kwh(required, 1000.0, 900.0, 1000.0) == 10.0
    assert required_now_kwh(required, 1000.0, 900.0, 1899.0) == 10.0
    assert required_now_kwh(required, 1000.0, 900.0, 2800.0) == 30.0
    assert required_now_kwh(required, 1000.0, 900.0, 999.0) == 10.0  # made for the next step
    assert required_now_kwh(required, 1000.0, 900.0, 99.0) is None  # before the horizon
    assert required_now_kwh(required, 1000.0, 900.0, 3700.0) is None  # after it
    assert required_now_kwh(np.array([np.nan]), 0.0, 900.0, 10.0) is None


def test_refilling_starts_beyond_a_share_of_capacity_and_stops_when_the_shortfall_is_gone() -> None:
    # a 400 kWh fleet starts at more than 1 % (4 kWh) short, and once started goes on to 0
    assert not refilling(297.0, 300.0, 400.0, active=False)
    assert refilling(295.0, 300.0, 400.0, active=False)
    assert refilling(299.0, 300.0, 400.0, active=True)
    assert not refilling(300.0, 300.0, 400.0, active=True)
    assert not refilling(350.0, 300.0, 400.0, active=True)


def test_the_refill_level_sits_between_release_and_target_of_the_held_limit() -> None:
    g = GridSection(import_limit_w=150_000.0, act_at_pct=100.0, target_pct=99.0, release_pct=93.0)
    assert refill_level_w(g) == pytest.approx(150_000.0 * 0.97)  # 99 - (99 - 93) / 3
    assert refill_level_w(g.model_copy(update={"refill_pct": 95.0})) == pytest.approx(142_500.0)
    # while the reservation holds 160 kW (the target's level), the refill fills to just below it
    held = holding_grid(g, 160.0)
    assert refill_level_w(held) == pytest.approx(160_000.0 * 97.0 / 99.0)
    with pytest.raises(ValueError, match="refill_pct"):
        GridSection(target_pct=80.0, release_pct=70.0, refill_pct=85.0)


def test_headroom_is_charged_pro_rata_to_each_batterys_charge_room() -> None:
    # 130 kW against a 145 kW level: 15 kW to charge; "a" discharges 10 kW with 30 kW of
    # charge room (rated 20 kW), "b" idles with 15 kW: 10 kW and 5 kW more charge
    sites = {"a": battery_site(10_000.0, 30_000.0), "b": battery_site(0.0, 15_000.0)}
    orders = plan_refill(130_000.0, 145_000.0, sites, {}, now_ts=100.0, expiry_s=300.0)
    (a_w, a), (b_w, b) = orders["a"], orders["b"]
    assert (a_w, b_w) == (pytest.approx(0.0), pytest.approx(-5000.0))
    assert (a.flow_w, a.base_w, a.pending_w) == (pytest.approx(-10_000.0), 10_000.0, -10_000.0)
    assert (b.expires_ts, b.readings_at_order) == (400.0, 10)


def test_a_refill_is_limited_by_each_batterys_charge_room() -> None:
    sites = {"a": battery_site(0.0, 4000.0)}
    orders = plan_refill(100_000.0, 145_000.0, sites, {}, now_ts=0.0, expiry_s=300.0)
    assert orders["a"][0] == pytest.approx(-4000.0)


def test_no_refill_without_measured_headroom() -> None:
    sites = {"a": battery_site(0.0, 50_000.0)}
    assert plan_refill(146_000.0, 145_000.0, sites, {}, now_ts=0.0, expiry_s=300.0) == {}


def test_an_order_not_yet_in_the_readings_takes_its_headroom_first() -> None:
    # "a" was ordered 6 kW more charge at reading 10 and has sent one reading since: of the
    # 10 kW headroom, 4 kW are left, for "b"
    refills = {"a": Relief(-6000.0, -6000.0, 0.0, 1e9, 10)}
    sites = {"a": battery_site(0.0, 50_000.0, readings=11), "b": battery_site(0.0, 50_000.0)}
    orders = plan_refill(135_000.0, 145_000.0, sites, refills, now_ts=0.0, expiry_s=300.0)
    assert list(orders) == ["b"]
    assert orders["b"][0] == pytest.approx(-4000.0)


def test_above_the_level_a_refill_hands_back_but_never_past_its_base() -> None:
    # the flow rose to 150 kW against 145 kW: "a" (base 8 kW discharging, charging 2 kW now:
    # 10 kW given) and "b" (base 0, charging 10 kW: 10 kW given) hand back 2.5 kW each
    refills = {
        "a": Relief(-10_000.0, 0.0, 8000.0, 1e9, 0),
        "b": Relief(-10_000.0, 0.0, 0.0, 1e9, 0),
    }
    sites = {"a": battery_site(-2000.0, 50_000.0), "b": battery_site(-10_000.0, 50_000.0)}
    orders = plan_refill(150_000.0, 145_000.0, sites, refills, now_ts=0.0, expiry_s=300.0)
    assert orders["a"][0] == pytest.approx(500.0)
    assert orders["b"][0] == pytest.approx(-7500.0)
    # far above: each goes back to its base, no further (a refill never adds discharge)
    orders = plan_refill(200_000.0, 145_000.0, sites, refills, now_ts=0.0, expiry_s=300.0)
    assert (orders["a"][0], orders["b"][0]) == (8000.0, 0.0)
    assert orders["a"][1].flow_w == 0.0
    # a battery that was never refilled is not ordered above the level
    assert plan_refill(150_000.0, 145_000.0, sites, {}, now_ts=0.0, expiry_s=300.0) == {}


def test_a_refill_charges_at_most_the_shortfall_over_one_step() -> None:
    # 6 kWh short over a 900 s step: 24 kW of extra charge at most, with what the standing
    # refill at "a" (10 kW more, in the readings) already gives: 14 kW more, all at "b"
    assert refill_max_w(6.0, 900.0) == pytest.approx(24_000.0)
    assert refill_max_w(-1.0, 900.0) == 0.0
    refills = {"a": Relief(-10_000.0, -10_000.0, 0.0, 1e9, 5)}
    sites = {"a": battery_site(-10_000.0, 0.0), "b": battery_site(0.0, 50_000.0)}
    orders = plan_refill(
        100_000.0, 145_000.0, sites, refills, now_ts=0.0, expiry_s=300.0, max_w=24_000.0
    )
    assert list(orders) == ["b"]
    assert orders["b"][0] == pytest.approx(-14_000.0)
