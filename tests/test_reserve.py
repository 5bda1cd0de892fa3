"""The feeder reservation (coordinator/reserve.py) on hand-checkable cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coordinator.reserve import (
    FleetBattery,
    ReservationError,
    after_award,
    community_schedule,
    flatten,
    reserve,
    unflatten,
)


def fleet(capacity: float, power: float, stored: float = 0.0) -> FleetBattery:
    return FleetBattery(
        stored_kwh=stored,
        min_kwh=0.0,
        max_kwh=capacity,
        max_charge_kw=power,
        max_discharge_kw=power,
        charge_efficiency=1.0,
        discharge_efficiency=0.8,
    )


def test_an_evening_excess_is_reserved_ahead_and_shared_by_capacity() -> None:
    # Two sites each forecast 60 kW (15 kWh a step) but for 2 evening steps 90 kW; the feeder
    # takes 150 kW (37.5 kWh), planned to 100 % here. Steps 4-5 exceed it by 30 kW (7.5 kWh).
    base = np.array([10.0, 10.0, 10.0, 10.0, 22.5, 22.5, 10.0, 10.0])
    out = reserve(
        {"a": base, "b": base, "c": np.zeros(8)},
        {"a": fleet(30.0, 40.0), "b": fleet(10.0, 40.0)},
        step_h=0.25,
        import_limit_kw=150.0,
        export_limit_kw=150.0,
        plan_to_share=1.0,
        sizing_margin=0.0,
        refill_share=1.0,
    )
    # the fleet discharges 7.5 kWh AC in steps 4 and 5: 9.375 kWh stored each (eta_d 0.8);
    # before them the headroom (17.5 kWh a step) can charge: 18.75 at the end of step 3,
    # 1.25 at the end of step 2, nothing earlier
    np.testing.assert_allclose(out.required_kwh[:5], [0.0, 0.0, 1.25, 18.75, 9.375])
    np.testing.assert_allclose(out.required_kwh[5:], 0.0)
    a, b, c = out.sites["a"], out.sites["b"], out.sites["c"]
    np.testing.assert_allclose(a.floor_kwh[2:5], 0.75 * out.required_kwh[2:5])
    np.testing.assert_allclose(b.floor_kwh[2:5], 0.25 * out.required_kwh[2:5])
    assert np.isnan(a.floor_kwh[:2]).all() and np.isnan(a.floor_kwh[5:]).all()
    # in the excess steps each site imports at most its net less its share of the excess
    np.testing.assert_allclose(a.import_cap_kw[4:6], (22.5 - 0.75 * 7.5) / 0.25)
    np.testing.assert_allclose(b.import_cap_kw[4:6], (22.5 - 0.25 * 7.5) / 0.25)
    # elsewhere the headroom (17.5 kWh) is below the fleet's charge power (20 kWh a step):
    # charging is capped to each site's share of it
    np.testing.assert_allclose(a.import_cap_kw[0], (10.0 + 0.75 * 17.5) / 0.25)
    assert c.empty  # no battery, nothing asked
    assert not np.any(out.unavoidable_kwh)


def test_headroom_between_two_peaks_refills_what_the_first_took() -> None:
    # peaks at steps 1 and 5; in steps 2-4 the feeder has 5 kWh a step of headroom
    feeder = np.array([30.0, 40.0, 32.5, 32.5, 32.5, 40.0])
    out = reserve(
        {"a": feeder},
        {"a": fleet(100.0, 40.0)},
        step_h=0.25,
        import_limit_kw=150.0,
        export_limit_kw=150.0,
        plan_to_share=1.0,
        sizing_margin=0.0,
        refill_share=1.0,
    )
    # step 5 needs 2.5 kWh AC = 3.125 stored; steps 2-4 could put back 15: no reserve needed
    # before step 1 beyond step 1's own 3.125
    np.testing.assert_allclose(out.required_kwh, [3.125, 0.0, 0.0, 0.0, 3.125, 0.0])


def test_an_excess_beyond_the_fleets_power_is_reported_unavoidable() -> None:
    out = reserve(
        {"a": np.array([0.0, 50.0])},
        {"a": fleet(100.0, 20.0)},
        step_h=0.25,
        import_limit_kw=100.0,
        export_limit_kw=100.0,
        plan_to_share=1.0,
        sizing_margin=0.0,
    )
    np.testing.assert_allclose(out.unavoidable_kwh, [0.0, 50.0 - 25.0 - 5.0])


def test_bad_input_is_refused() -> None:
    with pytest.raises(ReservationError, match="no sites"):
        reserve({}, {}, step_h=0.25, import_limit_kw=1.0, export_limit_kw=1.0)
    with pytest.raises(ReservationError, match="without a forecast"):
        reserve({"a": [1.0]}, {"b": fleet(1, 1)}, step_h=0.25, import_limit_kw=1, export_limit_kw=1)
    with pytest.raises(ReservationError, match="finite"):
        reserve({"a": [np.nan]}, {}, step_h=0.25, import_limit_kw=1.0, export_limit_kw=1.0)


def test_a_reservation_survives_its_message_form() -> None:
    values = np.array([1.5, np.nan, -2.0])
    assert flatten(values) == [1.5, None, -2.0]
    np.testing.assert_array_equal(unflatten(flatten(values)), values)


def test_the_community_schedule_prices_energy_as_the_batteries_together_see_it() -> None:
    # 40 kWh of surplus then 40 kWh of need; the fleet (20 kWh, 40 kW, lossless, empty)
    # fills in two steps and exports the rest at feed-in: an extra kWh of surplus is worth
    # 0.08 anywhere in the first half, an extra kWh of need costs retail in the second
    out = community_schedule(
        np.array([-10.0] * 4 + [10.0] * 4),
        [
            FleetBattery(
                stored_kwh=0.0,
                min_kwh=0.0,
                max_kwh=20.0,
                max_charge_kw=40.0,
                max_discharge_kw=40.0,
                charge_efficiency=1.0,
                discharge_efficiency=1.0,
            )
        ],
        retail_per_kwh=0.30,
        feed_in_per_kwh=0.08,
        step_h=0.25,
        import_limit_kw=1000.0,
        export_limit_kw=1000.0,
    )
    np.testing.assert_allclose(out.price_per_kwh, [0.08] * 4 + [0.30] * 4, atol=1e-9)
    assert out.stored_kwh is not None
    np.testing.assert_allclose(out.stored_kwh[:4], [10.0, 20.0, 20.0, 20.0], atol=1e-6)


def test_without_batteries_the_price_is_the_tariff_on_the_feeders_side() -> None:
    out = community_schedule(
        np.array([-1.0, 1.0]),
        [],
        retail_per_kwh=0.30,
        feed_in_per_kwh=0.08,
        step_h=0.25,
        import_limit_kw=1.0,
        export_limit_kw=1.0,
    )
    np.testing.assert_allclose(out.price_per_kwh, [0.08, 0.30])
    assert out.stored_kwh is None


def test_each_site_is_suggested_its_share_of_the_fleets_stored_energy() -> None:
    out = reserve(
        {"a": np.zeros(3), "b": np.zeros(3)},
        {"a": fleet(30.0, 10.0), "b": fleet(10.0, 10.0)},
        step_h=0.25,
        import_limit_kw=100.0,
        export_limit_kw=100.0,
        fleet_stored_kwh=[8.0, 20.0, 40.0],
    )
    np.testing.assert_allclose(out.sites["a"].suggested_kwh, [6.0, 15.0, 30.0])
    np.testing.assert_allclose(out.sites["b"].suggested_kwh, [2.0, 5.0, 10.0])


def test_the_requirement_is_sized_with_a_margin_over_the_forecast() -> None:
    # 140 kW forecast against 150 kW: no excess on the forecast, but 10 % more (154 kW) needs
    # 1 kWh AC in that step (1.25 stored at eta_d 0.8) reserved before it
    args = {"step_h": 0.25, "import_limit_kw": 150.0, "export_limit_kw": 150.0}
    flat = {"a": np.array([0.0, 35.0])}
    none = reserve(flat, {"a": fleet(100.0, 40.0)}, plan_to_share=1.0, sizing_margin=0.0, **args)
    some = reserve(flat, {"a": fleet(100.0, 40.0)}, plan_to_share=1.0, sizing_margin=0.1, **args)
    np.testing.assert_allclose(none.required_kwh, [0.0, 0.0])
    np.testing.assert_allclose(some.required_kwh, [1.25, 0.0])


def test_a_fleet_that_cannot_hold_the_limit_plans_to_the_lowest_level_it_can_hold() -> None:
    # four steps at 40 kWh against a 25 kWh limit (100 kW at 0.25 h): 60 kWh above it, but the
    # fleet holds 30 kWh (lossless): it can hold 25 + 30 / 4 = 32.5 kWh a step throughout
    out = reserve(
        {"a": np.array([40.0, 40.0, 40.0, 40.0])},
        {"a": FleetBattery(30.0, 0.0, 100.0, 100.0, 100.0, 1.0, 1.0)},
        step_h=0.25,
        import_limit_kw=100.0,
        export_limit_kw=100.0,
        plan_to_share=1.0,
        sizing_margin=0.0,
    )
    assert out.import_level_kw == pytest.approx(32.5 / 0.25, rel=2e-3)
    assert out.import_level_kw >= 32.5 / 0.25  # never a level the fleet cannot hold
    # the floors then ask for what that level needs: 7.5 kWh a step from the fleet
    np.testing.assert_allclose(out.required_kwh[:3], [22.5, 15.0, 7.5], atol=0.1)


def test_a_fleet_that_holds_the_limit_plans_to_the_limit() -> None:
    out = reserve(
        {"a": np.array([40.0, 40.0])},
        {"a": FleetBattery(100.0, 0.0, 100.0, 100.0, 100.0, 1.0, 1.0)},
        step_h=0.25,
        import_limit_kw=100.0,
        export_limit_kw=100.0,
        plan_to_share=0.95,
    )
    assert out.import_level_kw == pytest.approx(95.0)
    no_fleet = reserve(
        {"a": np.array([40.0])}, {}, step_h=0.25, import_limit_kw=100.0, export_limit_kw=1.0
    )
    assert no_fleet.import_level_kw == pytest.approx(95.0)


def test_a_later_need_beyond_the_fleets_capacity_raises_the_level_too() -> None:
    # a full 10 kWh fleet cannot carry 2 x 20 kWh above the limit with no refill in between
    out = reserve(
        {"a": np.array([45.0, 45.0, 45.0])},
        {"a": FleetBattery(10.0, 0.0, 10.0, 100.0, 100.0, 1.0, 1.0)},
        step_h=0.25,
        import_limit_kw=100.0,
        export_limit_kw=100.0,
        plan_to_share=1.0,
        sizing_margin=0.0,
    )
    assert out.import_level_kw == pytest.approx((45.0 - 10.0 / 3) / 0.25, rel=2e-3)


def test_the_fleet_is_planned_from_where_the_interval_just_cleared_leaves_it() -> None:
    b = FleetBattery(50.0, 5.0, 100.0, 20.0, 40.0, 0.8, 0.5)
    # forecast 6 kWh of net load, 1 kWh bought: the battery gives 5 kWh AC, 10 kWh stored
    assert after_award(b, 6.0, 1.0, 0.25).stored_kwh == pytest.approx(40.0)
    # 2 kWh of surplus, 2 kWh sold: the battery is idle; 4 kWh bought on 1 kWh of need: it
    # stores 3 kWh AC at 80 %
    assert after_award(b, -2.0, -2.0, 0.25).stored_kwh == pytest.approx(50.0)
    assert after_award(b, 1.0, 4.0, 0.25).stored_kwh == pytest.approx(52.4)
    # within its power (40 kW over a quarter hour: 10 kWh AC) and its bounds
    assert after_award(b, 30.0, 0.0, 0.25).stored_kwh == pytest.approx(30.0)
    assert after_award(b, 300.0, 0.0, 2.0).stored_kwh == pytest.approx(5.0)
    # no award (the site did not bid) or no forecast: as it is
    assert after_award(b, 6.0, None, 0.25) is b
    assert after_award(b, None, 1.0, 0.25) is b
    assert after_award(b, math.nan, 1.0, 0.25) is b


def test_only_part_of_the_headroom_before_a_peak_is_counted_as_refill_by_default() -> None:
    # the peak at step 5 needs 2.5 kWh AC (3.125 stored); steps 2-4 have 5 kWh of headroom
    # each. Counting all of it, nothing need be held before step 4; counting half (the
    # default), the batteries hold what step 4's half cannot put back, and refill earlier.
    feeder = np.array([30.0, 30.0, 32.5, 32.5, 32.5, 40.0])
    args = {"step_h": 0.25, "import_limit_kw": 150.0, "export_limit_kw": 150.0}
    full = reserve(
        {"a": feeder},
        {"a": fleet(100.0, 40.0)},
        plan_to_share=1.0,
        sizing_margin=0.0,
        refill_share=1.0,
        **args,
    )
    half = reserve(
        {"a": feeder}, {"a": fleet(100.0, 40.0)}, plan_to_share=1.0, sizing_margin=0.0, **args
    )
    np.testing.assert_allclose(full.required_kwh[:5], [0.0, 0.0, 0.0, 0.0, 3.125])
    np.testing.assert_allclose(half.required_kwh[:5], [0.0, 0.0, 0.0, 0.625, 3.125])


def test_before_a_need_beyond_the_full_fleet_the_floors_ask_for_all_it_can_hold() -> None:
    # 37.4 kWh sized (34 forecast + 10 %) against 25 kWh: 12.4 kWh, more than the 10 kWh fleet
    # holds. The forecast itself (9 kWh) it can carry, so the limit stays; before that step
    # the fleet must be full, and before that full less the half of step 1's 3 kWh of sized
    # headroom counted as refill (lossless): 8.5 kWh, not nothing.
    out = reserve(
        {"a": np.array([20.0, 20.0, 34.0])},
        {"a": FleetBattery(10.0, 0.0, 10.0, 100.0, 100.0, 1.0, 1.0)},
        step_h=0.25,
        import_limit_kw=100.0,
        export_limit_kw=100.0,
        plan_to_share=1.0,
        sizing_margin=0.1,
    )
    assert out.import_level_kw == pytest.approx(100.0)
    np.testing.assert_allclose(out.required_kwh, [8.5, 10.0, 0.0])
    np.testing.assert_allclose(out.sites["a"].floor_kwh[:2], [8.5, 10.0])
