"""coordinator.plausibility: hand-checkable cases of what a site may and may not claim."""

from __future__ import annotations

import pytest

from broker.messages import Bid, BidStep, DeviceReading, Telemetry
from coordinator import plausibility as pl

NOW = 1_782_043_200.0  # 2026-06-21 12:00 UTC, an interval boundary (900 s)
WINDOW = pl.TimeWindow(future_skew_s=30.0, max_age_s=86400.0)
LIMITS = pl.SiteLimits(connection_w=20_000.0, generation_w=10_000.0, storage_w=5_000.0)


def _telemetry(ts: float = NOW, **values: float) -> Telemetry:
    return Telemetry(ts=ts, devices=[], **values)


def test_a_reading_within_every_limit_is_plausible() -> None:
    msg = _telemetry(
        grid_power_w=-3000.0, pv_power_w=9000.0, battery_power_w=-4000.0, load_power_w=2000.0
    )
    assert pl.check_telemetry(msg, LIMITS, NOW, WINDOW, 0.1) is None


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({"grid_power_w": -1e9}, "grid_power"),  # the fake meter of the attack
        ({"grid_power_w": 22_500.0}, "grid_power"),  # beyond 20 kW + 10 %
        ({"pv_power_w": 11_500.0}, "pv_power"),
        ({"pv_power_w": -2_000.0}, "pv_power"),
        ({"battery_power_w": 6_000.0}, "battery_power"),
        ({"battery_power_w": -6_000.0}, "battery_power"),
        ({"load_power_w": 40_000.0}, "load_power"),  # more than 20 + 10 + 5 kW + 10 %
    ],
)
def test_a_power_beyond_the_sites_limits_is_refused(values: dict[str, float], reason: str) -> None:
    assert pl.check_telemetry(_telemetry(**values), LIMITS, NOW, WINDOW, 0.1) == reason


def test_the_tolerance_allows_meter_error_at_a_limit() -> None:
    at_limit = _telemetry(grid_power_w=21_900.0)  # 9.5 % over 20 kW
    assert pl.check_telemetry(at_limit, LIMITS, NOW, WINDOW, 0.1) is None
    assert pl.check_telemetry(at_limit, LIMITS, NOW, WINDOW, 0.05) == "grid_power"


def test_a_device_claiming_a_huge_rating_is_refused() -> None:
    device = DeviceReading(device="inv", kind="pv_inverter", available=True, rated_power_w=1e8)
    msg = Telemetry(ts=NOW, devices=[device])
    assert pl.check_telemetry(msg, LIMITS, NOW, WINDOW, 0.1) == "rating"


def test_readings_from_the_future_are_refused_and_replays_from_the_past_are_not() -> None:
    assert pl.check_telemetry(_telemetry(ts=4.0e9), LIMITS, NOW, WINDOW, 0.1) == "future"
    assert pl.check_telemetry(_telemetry(ts=NOW + 31.0), LIMITS, NOW, WINDOW, 0.1) == "future"
    assert pl.check_telemetry(_telemetry(ts=NOW + 29.0), LIMITS, NOW, WINDOW, 0.1) is None
    assert pl.check_telemetry(_telemetry(ts=NOW - 3600.0), LIMITS, NOW, WINDOW, 0.1) is None
    assert pl.check_telemetry(_telemetry(ts=NOW - 90000.0), LIMITS, NOW, WINDOW, 0.1) == "too_old"


def _derive(**kwargs: float | None) -> pl.SiteLimits:
    args: dict[str, float | None] = {
        "connection_w": None,
        "generation_w": None,
        "storage_w": None,
        "reported_generation_w": 0.0,
        "reported_storage_w": 0.0,
        "base_connection_w": 20_000.0,
        "max_connection_w": 1e6,
        "max_ratio": 2.0,
    }
    args.update(kwargs)
    return pl.derive_limits(**args)  # type: ignore[arg-type]


def test_derived_limits_cap_what_a_site_reports() -> None:
    # A huge claimed inverter widens the connection to the cap at most.
    assert _derive(reported_generation_w=1e9, reported_storage_w=3_000.0) == pl.SiteLimits(
        1e6, 2e6, 3_000.0
    )
    # A PV farm larger than the base connection gets room for its rating.
    assert _derive(reported_generation_w=300_000.0) == pl.SiteLimits(300_000.0, 300_000.0, 600_000.0)
    # A declared connection and ratings are what count.
    assert _derive(
        connection_w=20_000.0, generation_w=8_000.0, storage_w=1_000.0, reported_generation_w=1e9
    ) == pl.SiteLimits(20_000.0, 8_000.0, 1_000.0)
    assert _derive(connection_w=20_000.0, reported_generation_w=1e9) == pl.SiteLimits(
        20_000.0, 40_000.0, 40_000.0
    )
    # Nothing reported: the base connection, and the ratings capped by it.
    assert _derive() == pl.SiteLimits(20_000.0, 40_000.0, 40_000.0)


def test_reported_ratings_sum_by_device_kind() -> None:
    msg = Telemetry(
        ts=NOW,
        devices=[
            DeviceReading(device="a", kind="pv_inverter", available=True, rated_power_w=5000.0),
            DeviceReading(device="b", kind="pv_inverter", available=False, rated_power_w=3000.0),
            DeviceReading(device="c", kind="battery", available=True, rated_power_w=2500.0),
            DeviceReading(device="m", kind="sunspec_meter", available=True),
        ],
    )
    assert pl.reported_ratings_w(msg) == (8000.0, 2500.0)


def test_the_open_interval_moves_on_at_each_gate() -> None:
    k = int(NOW // 900)  # NOW is the start of interval k
    assert pl.open_interval(NOW, 900, 60) == k + 1
    assert pl.open_interval(NOW + 839.0, 900, 60) == k + 1  # gate of k+1 at +840
    assert pl.open_interval(NOW + 840.0, 900, 60) == k + 2


def _bid(interval: int, buy_kwh: float = 1.0, sell_kwh: float = 0.0) -> Bid:
    return Bid(
        ts=NOW,
        interval=interval,
        buy=[BidStep(price_per_kwh=0.3, quantity_kwh=buy_kwh)] if buy_kwh else [],
        sell=[BidStep(price_per_kwh=0.4, quantity_kwh=sell_kwh)] if sell_kwh else [],
    )


def _check(bid: Bid) -> str | None:
    return pl.check_bid(
        bid, LIMITS, now_ts=NOW, interval_s=900, gate_s=60, bids_ahead=4, tolerance=0.1
    )


def test_bids_only_for_the_open_interval_and_a_few_after_it() -> None:
    k = int(NOW // 900)
    assert _check(_bid(k)) == "bid_closed"
    for ahead in range(5):
        assert _check(_bid(k + 1 + ahead)) is None
    assert _check(_bid(k + 6)) == "bid_too_far_ahead"


def test_a_bid_larger_than_the_connection_can_carry_is_refused() -> None:
    k = int(NOW // 900) + 1
    # 20 kW of connection and 5 kW of battery over 15 minutes: 6.25 kWh, 6.875 with 10 %.
    assert _check(_bid(k, buy_kwh=6.8)) is None
    assert _check(_bid(k, buy_kwh=6.9)) == "bid_quantity"
    assert _check(_bid(k, buy_kwh=0.0, sell_kwh=7.0)) == "bid_quantity"
