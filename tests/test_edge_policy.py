"""The edge's pure policy (edge.policy): precedence, safety, sharing, bid energy; no MQTT."""

from __future__ import annotations

import pytest

from edge.config import FallbackSection, LimitsSection, MarketSection
from edge.policy import (
    BatteryView,
    Command,
    Commitment,
    bid_energy_kwh,
    clamp_to_rating_w,
    decide_setpoint_w,
    expected_net_kwh,
    interval_bid,
    safety_clamp_w,
    setpoint_due,
    share_among_batteries_w,
)

MARKET = MarketSection()  # 900-s intervals, charge below 0.12, discharge from 0.25
SELF = FallbackSection()
NO_LIMITS = LimitsSection()


def battery(
    rated_w: float = 5000.0, soc_pct: float | None = 50.0, capacity_wh: float | None = 10_000.0
) -> BatteryView:
    return BatteryView(
        rated_discharge_w=rated_w,
        rated_charge_w=rated_w,
        soc_pct=soc_pct,
        soc_min_pct=10.0,
        soc_max_pct=90.0,
        capacity_wh=capacity_wh,
    )


def decide(
    net_w: float | None,
    *,
    batteries: list[BatteryView] | None = None,
    soc_pct: float | None = 50.0,
    command: Command | None = None,
    award: Commitment | None = None,
    fallback: FallbackSection = SELF,
    limits: LimitsSection = NO_LIMITS,
) -> tuple[float | None, str]:
    return decide_setpoint_w(
        [battery()] if batteries is None else batteries,
        net_w,
        soc_pct,
        command=command,
        award=award,
        market=MARKET,
        fallback=fallback,
        limits=limits,
    )


def test_without_batteries_there_is_no_setpoint() -> None:
    assert decide(1000.0, batteries=[]) == (None, "fallback")


def test_fallback_self_consumption_covers_the_net_load() -> None:
    assert decide(1200.0) == (1200.0, "fallback")
    assert decide(-800.0) == (-800.0, "fallback")


def test_fallback_idle_holds_the_battery() -> None:
    assert decide(1200.0, fallback=FallbackSection(mode="idle")) == (0.0, "fallback")


def test_market_keeps_the_award() -> None:
    # 2 kW of net load, an award to import 0.25 kWh in 900 s (1 kW): discharge 1 kW.
    assert decide(2000.0, award=Commitment(0.25, 0.20)) == (pytest.approx(1000.0), "market")


def test_market_does_not_buy_dear_energy_to_charge() -> None:
    # Award to import 3 kW while the net load is 2 kW: charging 1 kW at 0.20 (> 0.12) is refused.
    assert decide(2000.0, award=Commitment(0.75, 0.20)) == (0.0, "market")
    # At a cheap price the battery charges to keep the award.
    assert decide(2000.0, award=Commitment(0.75, 0.10)) == (pytest.approx(-1000.0), "market")


def test_market_keeps_the_peak_reserve_below_its_soc() -> None:
    fb = FallbackSection(import_cap_w=3000.0, reserve_soc_pct=60.0)
    # At 50 % (below the 60 % reserve) the battery discharges only what exceeds the 3 kW cap.
    assert decide(4000.0, award=Commitment(0.0, 0.30), fallback=fb) == (1000.0, "market")
    assert decide(2000.0, award=Commitment(0.0, 0.30), fallback=fb) == (0.0, "market")


def test_a_dispatch_overrides_the_award_and_an_emergency_is_reported_as_such() -> None:
    award = Commitment(0.25, 0.20)
    command = Command("dispatch", -3000.0)
    assert decide(2000.0, award=award, command=command) == (-3000.0, "dispatch")
    assert decide(2000.0, command=Command("emergency", 4000.0)) == (4000.0, "emergency")


def test_a_load_limit_discharges_what_the_net_load_exceeds() -> None:
    assert decide(3000.0, command=Command("dispatch", load_limit_w=1000.0)) == (2000.0, "dispatch")
    assert decide(500.0, command=Command("dispatch", load_limit_w=1000.0)) == (0.0, "dispatch")
    assert decide(None, command=Command("dispatch", load_limit_w=1000.0)) == (None, "dispatch")


def test_safety_clamps_to_rated_power_and_says_so() -> None:
    assert decide(2000.0, command=Command("dispatch", 9000.0)) == (5000.0, "safety")


def test_safety_keeps_the_connection_limits() -> None:
    limits = LimitsSection(import_limit_w=2000.0, export_limit_w=1000.0)
    # Net load 6 kW, idle ordered: must discharge 4 kW to import no more than 2 kW.
    assert decide(6000.0, command=Command("dispatch", 0.0), limits=limits) == (4000.0, "safety")
    # Net load -500 W, ordered to discharge 3 kW: at most 500 W + 1 kW export.
    assert decide(-500.0, command=Command("dispatch", 3000.0), limits=limits) == (500.0, "safety")


def test_safety_clamp_applies_connection_limits_then_rated_powers() -> None:
    kw = {"import_limit_w": 1000.0, "export_limit_w": None}
    assert safety_clamp_w(0.0, 10_000.0, **kw, max_charge_w=3000.0, max_discharge_w=4000.0) == 4000
    assert safety_clamp_w(-9e3, None, **kw, max_charge_w=3000.0, max_discharge_w=4000.0) == -3000


def test_sharing_is_pro_rata_to_rated_power_and_respects_soc_bounds() -> None:
    big, small = battery(6000.0), battery(2000.0)
    assert share_among_batteries_w(4000.0, [big, small]) == [3000.0, 1000.0]
    empty = battery(6000.0, soc_pct=10.0)  # at its minimum: cannot discharge
    assert share_among_batteries_w(4000.0, [empty, small]) == [0.0, 1000.0]
    assert share_among_batteries_w(-4000.0, [empty, small]) == [-3000.0, -1000.0]
    full = battery(2000.0, soc_pct=90.0)
    assert share_among_batteries_w(-4000.0, [big, full]) == [-3000.0, 0.0]
    assert share_among_batteries_w(1001.4, [battery()]) == [1001.0]


def test_bid_energy_is_bounded_by_power_room_and_reserve() -> None:
    # 10 kWh at 50 %: 4 kWh of room to 90 %, 4 kWh above 10 %; 5 kW for 0.25 h = 1.25 kWh.
    assert bid_energy_kwh([battery()], 900.0, reserve_soc_pct=None) == (1.25, 1.25)
    # Reserve at 45 %: only 0.5 kWh may be offered for discharge.
    assert bid_energy_kwh([battery()], 900.0, reserve_soc_pct=45.0) == pytest.approx((1.25, 0.5))
    # Above its reserve: nothing to discharge; unknown SOC: nothing at all.
    assert bid_energy_kwh([battery()], 900.0, reserve_soc_pct=80.0) == (1.25, 0.0)
    assert bid_energy_kwh([battery(soc_pct=None)], 900.0, reserve_soc_pct=None) == (0.0, 0.0)


def test_expected_net_uses_the_forecast_then_recent_history() -> None:
    # Forecast steps at 0, 450, 900 s: the interval [0, 900) takes the first two.
    kwh = expected_net_kwh(
        0.0,
        900.0,
        forecast_start_ts=0.0,
        forecast_step_s=450.0,
        forecast_pv_w=[0.0, 1000.0, 5000.0],
        forecast_load_w=[2000.0, 2000.0, 0.0],
        recent_net_w=[9999.0],
    )
    assert kwh == pytest.approx(1500.0 * 0.25 / 1000.0)
    assert expected_net_kwh(0.0, 900.0, recent_net_w=[400.0, 800.0]) == pytest.approx(0.15)
    assert expected_net_kwh(0.0, 900.0) == 0.0


def test_interval_bid_offers_the_need_and_the_battery() -> None:
    curve = interval_bid([battery()], 1.0, market=MARKET, fallback=SELF, role="prosumer")
    # 1 kWh of need: 1 kWh could come from the battery at 0.25, 1.25 kWh more charged at 0.12,
    # 0.25 kWh of spare discharge sold just above 0.25.
    assert curve.buy == ((0.25, 1.0), (0.12, 1.25))
    assert curve.sell == ((pytest.approx(0.2501), pytest.approx(0.25)),)


def test_a_setpoint_is_written_when_new_moved_or_due_for_renewal() -> None:
    kw = {"rated_discharge_w": 10_000.0, "renew_after_s": 30.0}  # step: max(50, 1 % of 10 kW)
    assert setpoint_due(1000.0, None, 0.0, **kw)
    assert not setpoint_due(1099.0, (1000.0, 0.0), 29.0, **kw)
    assert setpoint_due(1100.0, (1000.0, 0.0), 29.0, **kw)
    assert setpoint_due(1000.0, (1000.0, 0.0), 30.0, **kw)
    assert setpoint_due(1050.0, (1000.0, 0.0), 1.0, rated_discharge_w=None, renew_after_s=30.0)


def test_an_order_is_clamped_to_the_total_rating() -> None:
    pair = [battery(5000.0), battery(3000.0)]
    assert clamp_to_rating_w(9000.0, pair) == 8000.0
    assert clamp_to_rating_w(-9000.0, pair) == -8000.0
    assert clamp_to_rating_w(-100.0, pair) == -100.0
