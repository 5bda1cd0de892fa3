"""The site planner (edge/plan.py) on hand-checkable cases, without MQTT or Modbus."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

from edge.plan import (
    PlanBattery,
    PlanError,
    SitePlan,
    WarmStart,
    _Programme,
    pessimistic_net_kwh,
    plan_bid,
    plan_site,
    plan_site_steps,
    resume_steps,
    stored_value_per_kwh,
)

STEP_H = 0.25


def battery(stored: float = 0.0, *, low: float = 0.0, high: float = 10.0) -> PlanBattery:
    """A 10 kWh, 4 kW battery with 95 % one-way efficiencies (90.25 % round trip)."""
    return PlanBattery(
        stored_kwh=stored, min_kwh=low, max_kwh=high, max_charge_kw=4.0, max_discharge_kw=4.0
    )


def two_prices(low: float, high: float, n: int = 16) -> np.ndarray:
    return np.where(np.arange(n) < n // 2, low, high)


def test_a_spread_larger_than_the_round_trip_losses_is_arbitraged() -> None:
    # 0.20 / 0.9025 = 0.2216 < 0.30: charging in the cheap half and serving the load in the
    # dear half pays.
    prices = two_prices(0.20, 0.30)
    plan = plan_site(
        np.full(16, 1.0), prices, prices * 0.0, battery(), step_h=STEP_H, stored_value_per_kwh=0.0
    )
    assert plan.battery_kwh[:8].sum() < -1.0  # charges while cheap
    assert plan.battery_kwh[8:].sum() > 1.0  # discharges while dear
    assert plan.cost < float(prices @ np.full(16, 1.0)) - 0.1


def test_a_spread_smaller_than_the_round_trip_losses_is_not_arbitraged() -> None:
    # 0.20 / 0.9025 = 0.2216 > 0.215: every kWh cycled would lose money.
    prices = two_prices(0.20, 0.215)
    plan = plan_site(
        np.full(16, 1.0), prices, prices * 0.0, battery(), step_h=STEP_H, stored_value_per_kwh=0.0
    )
    np.testing.assert_allclose(plan.battery_kwh, 0.0, atol=1e-6)


def test_the_reserve_is_kept_for_a_forecast_evening_peak() -> None:
    # A 3 kW import cap; a 6 kW evening peak for the last 4 steps needs 4 x 0.75 kWh AC
    # = 3.16 kWh stored. Earlier the price is a little higher, which tempts the battery to
    # serve the daytime load, but the peak is worth more (the penalty beyond the cap).
    net = np.array([0.5] * 12 + [1.5] * 4)
    prices = np.array([0.33] * 12 + [0.30] * 4)
    plan = plan_site(
        net,
        prices,
        prices * 0.0,
        battery(5.0),
        step_h=STEP_H,
        stored_value_per_kwh=0.0,
        import_limit_kw=3.0,
    )
    assert plan.penalty_kwh == pytest.approx(0.0, abs=1e-6)
    assert plan.stored_kwh[11] >= 4 * 0.75 / 0.95 - 1e-6
    np.testing.assert_array_less(plan.grid_kwh[12:], 0.75 + 1e-6)
    assert plan.battery_kwh[:12].sum() > 0.5  # what is not needed for the peak is used


def test_a_feeder_reservation_is_honoured() -> None:
    # The coordinator asks for 8 kWh at the end of step 11 and a 2 kW export (import cap
    # -2 kW) in steps 12-15. Prices alone would empty the battery into the dear first half.
    prices = np.array([0.40] * 12 + [0.20] * 4)
    floor = np.full(16, np.nan)
    floor[11] = 8.0
    cap = np.full(16, np.nan)
    cap[12:] = -2.0
    plan = plan_site(
        np.full(16, 0.5),
        prices,
        prices * 0.5,
        battery(9.0),
        step_h=STEP_H,
        stored_value_per_kwh=0.0,
        floor_kwh=floor,
        import_cap_kw=cap,
    )
    assert plan.penalty_kwh == pytest.approx(0.0, abs=1e-6)
    assert plan.stored_kwh[11] >= 8.0 - 1e-6
    np.testing.assert_array_less(plan.grid_kwh[12:], -0.5 + 1e-6)  # -2 kW x 0.25 h


def test_a_reserve_is_not_spent_on_the_strength_of_an_optimistic_pv_forecast() -> None:
    # Full at 6 kWh and asked to hold 6 kWh at step 11, with no import allowed in steps 1-11.
    # The forecast says PV will refill 0.5 kWh a step in steps 4-9, so serving the 1 kWh need
    # of step 0 at 0.50 from the battery looks free; if PV disappoints (pessimistic: none) the
    # energy cannot be won back in time.
    net = np.array([1.0] + [0.0] * 3 + [-0.5] * 6 + [0.0] * 6)
    prices = np.full(16, 0.50)
    floor = np.full(16, np.nan)
    floor[11] = 6.0
    cap = np.full(16, np.nan)
    cap[1:12] = 0.0
    full = battery(6.0, high=6.0)
    args = {"step_h": STEP_H, "stored_value_per_kwh": 0.0, "floor_kwh": floor, "import_cap_kw": cap}
    naive = plan_site(net, prices, prices * 0.1, full, **args)  # type: ignore[arg-type]
    assert naive.battery_kwh[0] == pytest.approx(1.0)  # counts on PV: spends now
    load = np.clip(net, 0.0, None)
    pv = np.clip(-net, 0.0, None)
    robust = plan_site(
        net,
        prices,
        prices * 0.1,
        full,
        pessimistic_net_kwh=pessimistic_net_kwh(load, pv, pv_downside=1.0, load_upside=0.0),
        **args,  # type: ignore[arg-type]
    )
    assert robust.battery_kwh[0] == pytest.approx(0.0, abs=1e-6)  # buys now instead
    assert robust.grid_kwh[0] == pytest.approx(1.0, abs=1e-6)
    assert robust.penalty_kwh == pytest.approx(0.0, abs=1e-6)


def test_the_marginal_value_is_what_stored_energy_is_worth_later() -> None:
    # Nothing to do but hold: a kWh stored is worth the stored value at the end.
    plan = plan_site(
        np.zeros(8), 0.30, 0.05, battery(5.0), step_h=STEP_H, stored_value_per_kwh=0.25
    )
    np.testing.assert_allclose(plan.value_per_kwh, 0.25, atol=1e-9)
    # put back at 0.08 / 0.95; never above the median 0.3 x 0.9
    assert stored_value_per_kwh([0.08, 0.3, 0.3], 0.95, 0.9) == pytest.approx(0.08 / 0.95)
    assert stored_value_per_kwh([0.3, 0.3, 0.3], 0.95, 0.9) == pytest.approx(0.27)


def made_plan(battery_kwh: float, value_per_kwh: float) -> SitePlan:
    """A one-step plan as the solver would return it."""
    one = np.ones(1)
    return SitePlan(one, one * battery_kwh, one, one * value_per_kwh, 0.0, 0.0, 0.0)


def test_the_bid_follows_the_plan_and_offers_the_rest_only_at_unexpected_prices() -> None:
    curve = plan_bid(
        made_plan(0.5, 0.19),
        0.25,
        battery(5.0),
        step_h=STEP_H,
        max_buy_price_per_kwh=1.0,
        min_sell_price_per_kwh=0.0,
        price_range_per_kwh=(0.10, 0.30),
    )
    # It needs 0.25 kWh and plans to discharge 0.5 of the 1 kWh its 4 kW give in 15 minutes:
    # those 0.5 are released above 0.19 / 0.95 = 0.2 (covering the need, then sold), the
    # other 0.5 only above the dearest expected price (0.30); the 1 kWh it could charge is
    # bought only below the cheapest expected price (0.10).
    np.testing.assert_allclose(curve.buy, [(0.2, 0.25), (0.099, 1.0)])
    np.testing.assert_allclose(curve.sell, [(0.2001, 0.25), (0.3011, 0.5)])


def test_a_planned_charge_is_bought_below_the_value_of_storage() -> None:
    curve = plan_bid(
        made_plan(-0.5, 0.19),
        0.25,
        battery(5.0),
        step_h=STEP_H,
        max_buy_price_per_kwh=1.0,
        min_sell_price_per_kwh=0.0,
        price_range_per_kwh=(0.10, 0.30),
    )
    # the need up to 0.301 (above it the battery covers it and sells 0.75 more), 0.5 more
    # at 0.19 x 0.95 = 0.1805 or less, the rest of the power below 0.10
    np.testing.assert_allclose(curve.buy, [(0.301, 0.25), (0.1805, 0.5), (0.099, 0.5)])
    np.testing.assert_allclose(curve.sell, [(0.3011, 0.75)])


def test_a_discharge_planned_at_a_tie_is_offered_just_below_the_expected_price() -> None:
    # Retail 0.32 now and all day: stored energy is worth 0.32 x 0.95 = 0.304, so the plan is
    # indifferent between discharging now and later, and plans 0.5 kWh now. At 0.304 / 0.95
    # = 0.32 the offer would clear only above retail, which the utility supplies at 0.32: the
    # battery would never discharge. It is offered a tick below the expected 0.32 instead
    # (covering the need, then sold); the other 0.5 kWh only above it, the 1 kWh it could
    # charge below 0.304 x 0.95 less a tick, as before.
    args = {
        "step_h": STEP_H,
        "max_buy_price_per_kwh": 1.0,
        "min_sell_price_per_kwh": 0.0,
        "price_range_per_kwh": (0.32, 0.32),
    }
    tie = plan_bid(made_plan(0.5, 0.304), 0.25, battery(5.0), **args)  # type: ignore[arg-type]
    np.testing.assert_allclose(tie.buy, [(0.32, 0.25), (0.2878, 1.0)])
    np.testing.assert_allclose(tie.sell, [(0.3201, 0.25), (0.3211, 0.5)])
    fixed = plan_bid(
        made_plan(0.5, 0.304),
        0.25,
        battery(5.0),
        expected_price_per_kwh=0.32,
        **args,  # type: ignore[arg-type]
    )
    np.testing.assert_allclose(fixed.buy, [(0.319, 0.25), (0.2878, 1.0)])
    np.testing.assert_allclose(fixed.sell, [(0.3191, 0.25), (0.3211, 0.5)])
    # a discharge worth less than the expected price keeps its offer at its value
    cheap = plan_bid(
        made_plan(0.5, 0.19),
        0.25,
        battery(5.0),
        expected_price_per_kwh=0.32,
        **args,  # type: ignore[arg-type]
    )
    np.testing.assert_allclose(cheap.sell[0], (0.2001, 0.25))


def test_the_bid_makes_a_forced_export_firm_and_keeps_the_floor() -> None:
    curve = plan_bid(
        made_plan(0.5, 2.0),
        0.25,
        battery(5.0),
        step_h=STEP_H,
        max_buy_price_per_kwh=1.0,
        min_sell_price_per_kwh=0.0,
        import_cap_kw=-1.0,
        floor_kwh=4.0,
    )
    # needs 0.25 kWh, must export 0.25: 0.5 kWh discharged for sure (the floor leaves 0.95);
    # the rest is worth 2.0 / 0.95 to the site: more than any buyer pays, not offered
    assert curve.buy == ()
    np.testing.assert_allclose(curve.sell, [(0.0, 0.25)])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"net_kwh": [np.nan, 1.0]}, "finite"),
        ({"net_kwh": []}, "non-empty"),
        ({"sell_per_kwh": 0.5}, "must not exceed"),
        ({"step_h": 0.0}, "step_h"),
        ({"floor_kwh": [1.0, 2.0, 3.0]}, "does not fit"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "net_kwh": [1.0, 1.0],
        "buy_per_kwh": 0.3,
        "sell_per_kwh": 0.1,
        "battery": battery(5.0),
        "step_h": STEP_H,
        "stored_value_per_kwh": 0.0,
    }
    args.update(kwargs)
    with pytest.raises(PlanError, match=message):
        plan_site(**args)  # type: ignore[arg-type]


def test_a_peak_target_is_kept_when_the_battery_allows_and_no_further() -> None:
    # a 3 kW soft target (a demand charge's peak): the 6 kW evening needs 3.16 kWh stored;
    # with only 2 kWh (and no room to charge) the plan uses it all on the peak and imports
    # the rest above the target
    net = np.array([0.5] * 12 + [1.5] * 4)
    prices = np.array([0.33] * 12 + [0.30] * 4)
    args = {"step_h": STEP_H, "stored_value_per_kwh": 0.0, "import_target_kw": 3.0}
    kept = plan_site(net, prices, prices * 0.0, battery(5.0), **args)  # type: ignore[arg-type]
    np.testing.assert_array_less(kept.grid_kwh[12:], 0.75 + 1e-6)
    full = battery(2.0, high=2.0)
    short = plan_site(net, prices, prices * 0.0, full, **args)  # type: ignore[arg-type]
    assert short.battery_kwh[:12].sum() == pytest.approx(0.0, abs=1e-6)
    assert short.battery_kwh[12:].sum() == pytest.approx(2.0 * 0.95)
    assert short.penalty_kwh == pytest.approx(0.0, abs=1e-9)  # a target is not a limit


def _rolling_plans(warm: WarmStart | None, steps: int = 8) -> list[SitePlan]:
    """Re-plan a 96-step day every step, the battery where the last plan left it, with a
    reservation from the fifth re-plan on (a new shape: the pessimistic scenario appears)."""
    hour = (np.arange(96 + steps) * STEP_H) % 24
    load = 0.3 + 0.4 * np.exp(-((hour - 19) ** 2) / 4)
    pv = np.maximum(0.0, np.sin((hour - 6) / 12 * np.pi)) * 1.5
    price = np.where((hour >= 17) & (hour < 21), 0.40, 0.20)
    stored, plans = 4.0, []
    for k in range(steps):
        day = slice(k, k + 96)
        floor = np.full(96, np.nan)
        if k >= 4:
            floor[60:70] = 6.0
        plan = plan_site(
            load[day] - pv[day],
            price[day],
            price[day] * 0.5,
            battery(stored),
            step_h=STEP_H,
            stored_value_per_kwh=0.15,
            floor_kwh=floor,
            pessimistic_net_kwh=load[day] - 0.5 * pv[day] if k >= 4 else None,
            warm=warm,
        )
        stored = float(plan.stored_kwh[0])
        plans.append(plan)
    return plans


def test_a_warm_started_re_plan_finds_the_same_optimum_in_fewer_iterations() -> None:
    cold, warm = _rolling_plans(None), _rolling_plans(WarmStart())
    for c, w in zip(cold, warm, strict=True):
        objective_c = c.cost - 0.15 * c.stored_kwh[-1]
        objective_w = w.cost - 0.15 * w.stored_kwh[-1]
        assert objective_w == pytest.approx(objective_c, abs=1e-6)
        assert w.penalty_kwh == pytest.approx(c.penalty_kwh, abs=1e-6)
    # the first plan and the first with a reservation (another shape) start cold
    assert warm[0].iterations == cold[0].iterations
    assert warm[4].iterations == cold[4].iterations
    # the others start from the last plan's basis
    for k in (1, 2, 3, 5, 6, 7):
        assert warm[k].iterations < cold[k].iterations / 2, k


def test_the_programme_rows_come_in_compressed_form_with_repeated_terms_summed() -> None:
    lp = _Programme(4)
    rows = lp.add("eq", [np.array([2, 3]), np.array([0, 1])], [1.0, -1.0], np.array([5.0, 6.0]))
    lp.add("eq", [np.array([0, 3])], [0.5], np.zeros(2), rows=rows)  # each row's column again
    lp.add("ub", [np.array([3])], [2.0], np.array([7.0]))
    start, index, value, rhs = lp.rows()
    assert start.tolist() == [0, 2, 4, 5]
    assert index.tolist() == [0, 2, 1, 3, 3]  # by row, then column
    np.testing.assert_allclose(value, [-1.0 + 0.5, 1.0, -1.0, 1.0 + 0.5, 2.0])
    assert rhs.tolist() == [5.0, 6.0, 7.0]


def test_a_re_plan_of_the_same_shape_reuses_the_matrix_and_another_shape_builds_its_own() -> None:
    battery = PlanBattery(
        stored_kwh=5.0, min_kwh=0.5, max_kwh=10.0, max_charge_kw=5.0, max_discharge_kw=5.0
    )
    hour = np.arange(48) * 0.5
    price = np.where((hour >= 7) & (hour < 22), 0.32, 0.22)
    net = 0.3 - np.maximum(0.0, np.sin((hour - 6) / 12 * np.pi))

    def plan(warm: WarmStart, shift: float = 0.0, **extra: object) -> SitePlan:
        return plan_site(
            net + shift, price, price - 0.1, battery, step_h=0.5, stored_value_per_kwh=0.2,
            warm=warm, **extra,  # type: ignore[arg-type]
        )  # fmt: skip

    warm = WarmStart()
    plan(warm)
    assert warm.matrix is not None
    built = warm.matrix[1]
    plan(warm, shift=0.1)  # other numbers, the same rows and coefficients
    assert warm.matrix[1] is built
    # a soft import target adds rows: its own matrix, the one a fresh plan builds
    targeted = plan(warm, import_target_kw=0.5)
    fresh = WarmStart()
    alone = plan(fresh, import_target_kw=0.5)
    assert warm.matrix[1] is not built and fresh.matrix is not None
    for cached, built_fresh in zip(warm.matrix[1:], fresh.matrix[1:], strict=True):
        np.testing.assert_array_equal(cached, built_fresh)
    assert targeted.cost == pytest.approx(alone.cost, abs=1e-9)
    # other efficiencies are other coefficients: same rows, another matrix
    lossy = WarmStart()
    plan(lossy)
    assert lossy.matrix is not None
    before = lossy.matrix[3]
    plan_site(
        net, price, price - 0.1, replace(battery, charge_efficiency=0.8), step_h=0.5,
        stored_value_per_kwh=0.2, warm=lossy,
    )  # fmt: skip
    after = lossy.matrix[3]
    assert after.shape == before.shape
    assert np.count_nonzero(after != before) == 48  # -eta_c of each step's charge


def test_a_plan_in_steps_solved_in_another_thread_is_the_plan_made_at_once() -> None:
    # The stepped engine builds a plan's programme in its own thread and solves it in a
    # planning thread (plan_site_steps, then resume_steps): the same plan as plan_site.
    prices = two_prices(0.20, 0.30)
    args = (np.full(16, 1.0), prices, prices * 0.0, battery(2.0))
    at_once = plan_site(*args, step_h=STEP_H, stored_value_per_kwh=0.1)
    steps = plan_site_steps(*args, step_h=STEP_H, stored_value_per_kwh=0.1)
    job = next(steps)
    with ThreadPoolExecutor(1) as pool:
        solved = pool.submit(job).result()
    in_steps = resume_steps(steps, solved)
    for field in ("grid_kwh", "battery_kwh", "stored_kwh", "value_per_kwh"):
        np.testing.assert_array_equal(getattr(in_steps, field), getattr(at_once, field))
    assert in_steps.cost == at_once.cost
    assert in_steps.iterations == at_once.iterations > 0  # counted in the solving thread
    assert in_steps.solve_s > 0.0


def test_a_solve_that_fails_elsewhere_fails_the_plan_with_its_reason() -> None:
    steps = plan_site_steps(
        np.full(4, 1.0), 0.3, 0.1, battery(), step_h=STEP_H, stored_value_per_kwh=0.0
    )
    next(steps)
    with pytest.raises(PlanError, match="no optimum: Infeasible"):
        resume_steps(steps, PlanError("HiGHS found no optimum: Infeasible"))
