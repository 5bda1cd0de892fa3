"""Tests for coordinator.forecast: hand-checkable values, fallbacks and skill over baselines."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.forecast import (
    DAY_CLASSES_ALL_ALIKE,
    DAY_CLASSES_WEEKDAY_SATURDAY_SUNDAY,
    DAY_CLASSES_WEEKDAY_WEEKEND,
    ForecastInputError,
    clear_sky_ghi_w_per_m2,
    community_net_load_w,
    haurwitz_ghi_w_per_m2,
    load_forecast_sites_w,
    load_forecast_w,
    load_profile_w,
    mae,
    persistence_forecast,
    price_forecast_per_kwh,
    pv_effective_capacity_w,
    pv_forecast_sites_w,
    pv_forecast_w,
    seasonal_naive_forecast,
    solar_zenith_deg,
)
from simulators import physics

DAY_S = 86_400.0
HOUR_S = 3_600.0
STEP_S = 900.0
LAT_DEG = 48.14
LON_DEG = 11.58


def utc(year: int, month: int, day: int, hour: float = 0.0) -> float:
    """UTC epoch seconds of a calendar day plus ``hour`` hours."""
    return datetime(year, month, day, tzinfo=UTC).timestamp() + hour * HOUR_S


def grid(start_ts: float, days: float, step_s: float = STEP_S) -> np.ndarray:
    """Regular timestamps from ``start_ts`` over ``days`` days (end excluded)."""
    return start_ts + step_s * np.arange(round(days * DAY_S / step_s))


# ------------------------------------------------------------------------------ clear sky


@pytest.mark.parametrize("latitude_deg", [0.0, 30.0, 52.0, -33.9])
def test_zenith_at_solar_noon_on_an_equinox_is_the_latitude(latitude_deg: float) -> None:
    minutes = utc(2024, 3, 20) + np.arange(0.0, DAY_S, 60.0)
    zenith_deg = solar_zenith_deg(minutes, latitude_deg, 0.0)
    assert zenith_deg.min() == pytest.approx(abs(latitude_deg), abs=1.0)


def test_solar_noon_at_greenwich_is_near_12_utc_and_moves_with_longitude() -> None:
    minutes = utc(2024, 3, 20) + np.arange(0.0, DAY_S, 60.0)
    noon_greenwich_min = int(np.argmin(solar_zenith_deg(minutes, 45.0, 0.0)))
    noon_15_east_min = int(np.argmin(solar_zenith_deg(minutes, 45.0, 15.0)))
    assert noon_greenwich_min == pytest.approx(12 * 60 + 7.5, abs=3)  # equation of time ~ -7.5
    assert noon_greenwich_min - noon_15_east_min == pytest.approx(60, abs=1)


def test_haurwitz_at_zenith_zero() -> None:
    assert haurwitz_ghi_w_per_m2(0.0) == pytest.approx(1098.0 * math.exp(-0.057))  # 1037.17
    assert haurwitz_ghi_w_per_m2(0.0) == pytest.approx(1037.17, abs=0.01)


def test_haurwitz_at_60_degrees_and_below_the_horizon() -> None:
    assert haurwitz_ghi_w_per_m2(60.0) == pytest.approx(549.0 * math.exp(-0.114))
    np.testing.assert_array_equal(haurwitz_ghi_w_per_m2([90.0, 120.0, 180.0]), [0.0, 0.0, 0.0])
    assert np.isnan(haurwitz_ghi_w_per_m2(np.nan))


def test_clear_sky_is_zero_at_night_and_nan_for_nan_time() -> None:
    ghi = clear_sky_ghi_w_per_m2([utc(2024, 6, 21, 0.0), np.nan], LAT_DEG, LON_DEG)
    assert ghi[0] == 0.0
    assert np.isnan(ghi[1])


def test_clear_sky_matches_the_simulators_model() -> None:
    ts = grid(utc(2026, 1, 1), 365.0, 3_601.0)
    ours = clear_sky_ghi_w_per_m2(ts, LAT_DEG, LON_DEG)
    sim = physics.clear_sky_ghi_w_per_m2(ts, LAT_DEG, LON_DEG)
    np.testing.assert_allclose(ours, sim, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------ PV


def test_pv_forecast_is_index_times_clear_sky_for_an_exact_history() -> None:
    k_w = 4_200.0  # W per 1000 W/m^2 of clear-sky GHI
    hist_ts = grid(utc(2026, 6, 15), 7.0)
    hist_w = k_w * clear_sky_ghi_w_per_m2(hist_ts, LAT_DEG, LON_DEG) / 1000.0
    fc_ts = grid(hist_ts[-1] + STEP_S, 1.0)
    forecast_w = pv_forecast_w(hist_ts, hist_w, fc_ts, LAT_DEG, LON_DEG)
    expected_w = k_w * clear_sky_ghi_w_per_m2(fc_ts, LAT_DEG, LON_DEG) / 1000.0
    np.testing.assert_allclose(forecast_w, expected_w, rtol=1e-12, atol=1e-9)
    assert pv_effective_capacity_w(hist_ts, hist_w, LAT_DEG, LON_DEG) == pytest.approx(k_w)
    assert forecast_w.max() > 0.9 * k_w  # midsummer noon at 48 N: GHI_cs ~ 950 W/m^2


def test_pv_index_is_a_robust_median() -> None:
    hist_ts = grid(utc(2026, 6, 15), 7.0)
    ghi = clear_sky_ghi_w_per_m2(hist_ts, LAT_DEG, LON_DEG)
    hist_w = 5_000.0 * ghi / 1000.0
    hist_w[(hist_ts > utc(2026, 6, 18, 9.0)) & (hist_ts < utc(2026, 6, 18, 13.0))] = 0.0  # trip
    assert pv_effective_capacity_w(hist_ts, hist_w, LAT_DEG, LON_DEG) == pytest.approx(5_000.0)


def test_pv_recent_index_decays_to_the_learned_index() -> None:
    k_clim_w, k_now_w, decay_s = 5_000.0, 2_000.0, 3_600.0
    hist_ts = grid(utc(2026, 6, 15, 12.0), 7.0)  # ends at 11:45 UTC: daylight
    t_day = float(hist_ts[-1])
    ghi = clear_sky_ghi_w_per_m2(hist_ts, LAT_DEG, LON_DEG)
    k_w = np.where(hist_ts > t_day - HOUR_S, k_now_w, k_clim_w)  # the last hour is cloudy
    hist_w = k_w * ghi / 1000.0
    fc_ts = t_day + np.array([0.0, decay_s, 10.0 * decay_s])
    forecast_w = pv_forecast_w(
        hist_ts, hist_w, fc_ts, LAT_DEG, LON_DEG, persistence_decay_s=decay_s
    )
    k_expected_w = k_clim_w + (k_now_w - k_clim_w) * np.exp([0.0, -1.0, -10.0])
    ghi_fc = clear_sky_ghi_w_per_m2(fc_ts, LAT_DEG, LON_DEG)
    np.testing.assert_allclose(forecast_w, k_expected_w * ghi_fc / 1000.0, rtol=1e-12)


def test_pv_without_daylight_history_falls_back_to_rated_times_default_index() -> None:
    fc_ts = grid(utc(2026, 6, 22), 1.0)
    ghi = clear_sky_ghi_w_per_m2(fc_ts, LAT_DEG, LON_DEG)
    expected_w = 0.75 * 6_000.0 * ghi / 1000.0
    empty = pv_forecast_w([], [], fc_ts, LAT_DEG, LON_DEG, rated_w=6_000.0)
    np.testing.assert_allclose(empty, expected_w)
    night_ts = utc(2026, 6, 21, 23.0) + np.arange(4) * STEP_S  # only night samples
    night = pv_forecast_w(night_ts, np.zeros(4), fc_ts, LAT_DEG, LON_DEG, rated_w=6_000.0)
    np.testing.assert_allclose(night, expected_w)
    unknown = pv_forecast_w([], [], fc_ts, LAT_DEG, LON_DEG)
    np.testing.assert_array_equal(unknown, np.zeros_like(fc_ts))
    assert np.isnan(pv_effective_capacity_w([], [], LAT_DEG, LON_DEG))


def test_pv_ignores_nan_samples_and_accepts_unsorted_history() -> None:
    hist_ts = grid(utc(2026, 6, 15), 7.0)
    hist_w = 3_000.0 * clear_sky_ghi_w_per_m2(hist_ts, LAT_DEG, LON_DEG) / 1000.0
    fc_ts = grid(hist_ts[-1] + STEP_S, 1.0)
    clean = pv_forecast_w(hist_ts, hist_w, fc_ts, LAT_DEG, LON_DEG)
    dirty_w = hist_w.copy()
    dirty_w[::7] = np.nan
    dirty_ts = hist_ts.copy()
    dirty_ts[3::11] = np.nan
    order = np.random.default_rng(0).permutation(hist_ts.size)
    dirty = pv_forecast_w(dirty_ts[order], dirty_w[order], fc_ts, LAT_DEG, LON_DEG)
    np.testing.assert_allclose(dirty, clean, rtol=1e-12, atol=1e-9)


def test_pv_forecast_is_capped_at_the_rating_and_nan_for_nan_time() -> None:
    hist_ts = grid(utc(2026, 6, 15), 3.0)
    hist_w = 10_000.0 * clear_sky_ghi_w_per_m2(hist_ts, LAT_DEG, LON_DEG) / 1000.0
    fc_ts = np.array([utc(2026, 6, 18, 11.25), np.nan])
    forecast_w = pv_forecast_w(hist_ts, hist_w, fc_ts, LAT_DEG, LON_DEG, rated_w=8_000.0)
    assert forecast_w[0] == 8_000.0
    assert np.isnan(forecast_w[1])


def test_pv_rejects_mismatched_history_and_bad_parameters() -> None:
    with pytest.raises(ForecastInputError, match="same shape"):
        pv_forecast_w([1.0, 2.0], [1.0], [3.0], LAT_DEG, LON_DEG)
    with pytest.raises(ForecastInputError, match="half_life_s"):
        pv_forecast_w([], [], [3.0], LAT_DEG, LON_DEG, half_life_s=0.0)


# ---------------------------------------------------------------------------------- load

# 2026-06-22 is a Monday.
MONDAY_TS = utc(2026, 6, 22)


def test_load_profile_is_the_recency_weighted_mean_of_past_days() -> None:
    # Tuesday, Wednesday, Thursday at 100, 200, 300 W; one-day half-life: weights 1/4, 1/2, 1.
    hist_ts = grid(MONDAY_TS + DAY_S, 3.0)
    hist_w = np.repeat([100.0, 200.0, 300.0], 96)
    fc_ts = grid(MONDAY_TS + 4 * DAY_S, 1.0)  # Friday
    profile_w = load_profile_w(hist_ts, hist_w, fc_ts, half_life_days=1.0)
    expected_w = (0.25 * 100.0 + 0.5 * 200.0 + 1.0 * 300.0) / 1.75  # 242.857
    np.testing.assert_allclose(profile_w, expected_w)


def test_load_profile_of_identical_days_is_that_day() -> None:
    hist_ts = grid(MONDAY_TS, 5.0)  # Monday to Friday
    hour = (hist_ts % DAY_S) / HOUR_S
    hist_w = 500.0 + 100.0 * hour  # same shape every day
    fc_ts = grid(MONDAY_TS + 7 * DAY_S, 1.0)  # next Monday
    profile_w = load_profile_w(hist_ts, hist_w, fc_ts)
    np.testing.assert_allclose(profile_w, 500.0 + 100.0 * np.arange(96) / 4.0)


def test_load_profile_tells_weekdays_from_weekends_in_local_time() -> None:
    hist_ts = grid(MONDAY_TS - 2.0 * HOUR_S, 14.0)  # local midnights at UTC+2
    weekday = ((hist_ts + 2.0 * HOUR_S) // DAY_S + 3) % 7
    hist_w = np.where(weekday == 5, 60.0, np.where(weekday == 6, 40.0, 100.0))
    saturday_ts = grid(MONDAY_TS + 19 * DAY_S - 2.0 * HOUR_S, 1.0)
    monday_ts = grid(MONDAY_TS + 21 * DAY_S - 2.0 * HOUR_S, 1.0)
    monday = load_profile_w(hist_ts, hist_w, monday_ts, utc_offset_h=2.0)
    np.testing.assert_allclose(monday, 100.0)
    # weekend class: Saturdays (60 W) and Sundays (40 W), equal weights with a long half-life
    weekend = load_profile_w(hist_ts, hist_w, saturday_ts, utc_offset_h=2.0, half_life_days=1e9)
    np.testing.assert_allclose(weekend, 50.0)
    three = load_profile_w(
        hist_ts,
        hist_w,
        saturday_ts,
        utc_offset_h=2.0,
        day_classes=DAY_CLASSES_WEEKDAY_SATURDAY_SUNDAY,
    )
    np.testing.assert_allclose(three, 60.0)
    alike = load_profile_w(
        hist_ts, hist_w, saturday_ts, utc_offset_h=2.0, day_classes=DAY_CLASSES_ALL_ALIKE
    )
    assert np.all((alike > 40.0) & (alike < 100.0))


def test_load_profile_falls_back_to_other_day_classes_then_the_last_value() -> None:
    hist_ts = grid(MONDAY_TS, 1.0)  # only a Monday
    hist_w = np.full(96, 250.0)
    sunday_ts = grid(MONDAY_TS + 6 * DAY_S, 1.0)
    assert np.allclose(load_profile_w(hist_ts, hist_w, sunday_ts), 250.0)
    short_ts = MONDAY_TS + np.array([0.0, 900.0, 1800.0])  # 00:00-00:30 only
    short = load_profile_w(short_ts, [100.0, 110.0, 123.0], MONDAY_TS + np.array([3600.0, 7200.0]))
    np.testing.assert_array_equal(short, [123.0, 123.0])


def test_load_level_correction_scales_by_the_observed_ratio_and_decays() -> None:
    hist_ts = grid(MONDAY_TS, 7.0)
    hist_w = np.where(hist_ts > hist_ts[-1] - 3.0 * HOUR_S, 150.0, 100.0)  # last 3 h up 50 %
    lead_s = np.array([900.0, 3_600.0, 4.0 * 3_600.0, 15.0 * 3_600.0])
    fc_ts = hist_ts[-1] + lead_s
    forecast_w = load_forecast_w(
        hist_ts, hist_w, fc_ts, level_window_s=3.0 * HOUR_S, level_decay_s=3_600.0
    )
    np.testing.assert_allclose(forecast_w, 100.0 * (1.0 + 0.5 * np.exp(-lead_s / 3_600.0)))
    assert forecast_w[-1] == pytest.approx(100.0, abs=1e-4)
    off = load_forecast_w(hist_ts, hist_w, fc_ts, level_window_s=0.0)
    np.testing.assert_allclose(off, 100.0)


def test_load_level_ratio_is_clipped() -> None:
    hist_ts = grid(MONDAY_TS, 7.0)
    hist_w = np.where(hist_ts > hist_ts[-1] - 3.0 * HOUR_S, 1_000.0, 100.0)  # ratio 10
    forecast_w = load_forecast_w(hist_ts, hist_w, hist_ts[-1] + [STEP_S], level_decay_s=1e12)
    assert forecast_w[0] == pytest.approx(200.0)  # clipped at the default upper bound 2


def test_load_forecast_short_and_empty_history() -> None:
    short_ts = MONDAY_TS + np.array([0.0, 900.0, 1800.0])
    fc_ts = MONDAY_TS + np.array([3_600.0, 7_200.0])
    short = load_forecast_w(short_ts, [100.0, np.nan, 123.0], fc_ts)
    np.testing.assert_array_equal(short, [123.0, 123.0])
    np.testing.assert_array_equal(load_forecast_w([], [], fc_ts), [0.0, 0.0])
    np.testing.assert_array_equal(load_forecast_w([], [], fc_ts, default_w=80.0), [80.0, 80.0])


def test_load_forecast_ignores_nan_samples() -> None:
    hist_ts = grid(MONDAY_TS, 5.0)
    hist_w = np.full(hist_ts.size, 300.0)
    hist_w[5::9] = np.nan
    forecast_w = load_forecast_w(hist_ts, hist_w, grid(MONDAY_TS + 7 * DAY_S, 1.0))
    np.testing.assert_allclose(forecast_w, 300.0)


def test_load_rejects_bad_parameters() -> None:
    with pytest.raises(ForecastInputError, match="slot_s"):
        load_forecast_w([0.0], [1.0], [1.0], slot_s=7.0 * 60.0)
    with pytest.raises(ForecastInputError, match="day_classes"):
        load_profile_w([0.0], [1.0], [1.0], day_classes=(0, 1))
    with pytest.raises(ForecastInputError, match="level_ratio_bounds"):
        load_forecast_w([0.0], [1.0], [1.0], level_ratio_bounds=(1.2, 2.0))


# --------------------------------------------------------------------------------- price

RETAIL = 0.30
FEED_IN = 0.08


def test_community_net_load_is_load_minus_pv() -> None:
    load_w = [[100.0, 200.0], [50.0, 0.0]]
    pv_w = [[0.0, 500.0]]
    np.testing.assert_array_equal(community_net_load_w(load_w, pv_w), [150.0, -300.0])


def test_price_is_feed_in_in_clear_export_and_retail_in_clear_import() -> None:
    net_w = np.array([-50_000.0, -10_000.0, 10_000.0, 50_000.0])
    price = price_forecast_per_kwh(net_w, RETAIL, FEED_IN, balance_band_w=10_000.0)
    np.testing.assert_array_equal(price, [FEED_IN, FEED_IN, RETAIL, RETAIL])


def test_price_blends_near_balance() -> None:
    net_w = np.array([0.0, 5_000.0, -5_000.0])
    price = price_forecast_per_kwh(net_w, RETAIL, FEED_IN, balance_band_w=10_000.0)
    # smoothstep(0.5) = 0.5, smoothstep(0.75) = 0.84375, smoothstep(0.25) = 0.15625
    np.testing.assert_allclose(
        price, [0.19, 0.08 + 0.22 * 0.84375, 0.08 + 0.22 * 0.15625], rtol=1e-12
    )
    assert price[1] == pytest.approx(0.265625)


def test_price_without_band_is_a_step_with_time_of_use_tariffs() -> None:
    net_w = np.array([-1.0, 0.0, 1.0, 1.0])
    retail = np.array([0.30, 0.30, 0.30, 0.22])
    feed_in = np.array([0.08, 0.08, 0.08, 0.05])
    price = price_forecast_per_kwh(net_w, retail, feed_in)
    np.testing.assert_allclose(price, [0.08, 0.19, 0.30, 0.22])


@given(
    net_w=st.lists(st.floats(-1e7, 1e7), min_size=1, max_size=20),
    feed_in=st.floats(-0.5, 1.0),
    spread=st.floats(0.0, 1.0),
    band_w=st.floats(0.0, 1e6),
)
def test_price_stays_within_the_tariffs(
    net_w: list[float], feed_in: float, spread: float, band_w: float
) -> None:
    retail = feed_in + spread
    price = price_forecast_per_kwh(net_w, retail, feed_in, balance_band_w=band_w)
    assert np.all(price >= feed_in)
    assert np.all(price <= retail)


def test_price_rejects_inverted_tariffs_and_negative_band() -> None:
    with pytest.raises(ForecastInputError, match="feed_in"):
        price_forecast_per_kwh([0.0], 0.08, 0.30)
    with pytest.raises(ForecastInputError, match="balance_band_w"):
        price_forecast_per_kwh([0.0], RETAIL, FEED_IN, balance_band_w=-1.0)


# ------------------------------------------------------------------ scoring and baselines


def test_mae_hand_values_and_nan_pairs() -> None:
    assert mae([1.0, 2.0, 3.0], [2.0, 2.0, 5.0]) == pytest.approx(1.0)
    assert mae([1.0, np.nan, 3.0], [2.0, 100.0, 5.0]) == pytest.approx(1.5)
    assert math.isnan(mae([np.nan], [1.0]))
    with pytest.raises(ForecastInputError, match="shapes"):
        mae([1.0, 2.0], [1.0])


def test_persistence_holds_the_last_finite_value() -> None:
    forecast = persistence_forecast([0.0, 900.0, 1800.0], [5.0, 7.0, np.nan], [2700.0, 1e6])
    np.testing.assert_array_equal(forecast, [7.0, 7.0])
    assert np.all(np.isnan(persistence_forecast([], [], [1.0, 2.0])))


def test_seasonal_naive_is_the_same_time_yesterday() -> None:
    hist_ts = grid(MONDAY_TS, 2.0)
    hist_w = np.arange(hist_ts.size, dtype=np.float64)
    fc_ts = hist_ts[-1] + STEP_S * np.arange(1, 97 + 96)  # two days ahead
    forecast = seasonal_naive_forecast(hist_ts, hist_w, fc_ts)
    np.testing.assert_array_equal(forecast[:96], hist_w[96:])  # yesterday
    np.testing.assert_array_equal(forecast[96:192], hist_w[96:])  # the last day repeated
    irregular = seasonal_naive_forecast([0.0, 100.0], [10.0, 20.0], [DAY_S + 50.0])
    np.testing.assert_allclose(irregular, [15.0])  # interpolated at 50 s
    short = seasonal_naive_forecast([0.0, 900.0], [1.0, 2.0], [1800.0])
    np.testing.assert_array_equal(short, [2.0])  # less than a day: last value


# ------------------------------------------------------------------------------------ skill


def test_pv_and_load_forecasts_beat_persistence_and_seasonal_naive() -> None:
    """7 days of simulated history, the next 24 h at 15 min, over a week of issues and seeds."""
    loads: list[tuple[physics.LoadProfile, float, float, tuple[int, ...]]] = [
        ("household", 250.0, 4_500.0, DAY_CLASSES_WEEKDAY_WEEKEND),
        ("factory", 40e3, 180e3, DAY_CLASSES_WEEKDAY_SATURDAY_SUNDAY),
        ("office", 800.0, 3_000.0, DAY_CLASSES_WEEKDAY_WEEKEND),
    ]
    errors: dict[str, dict[str, list[float]]] = {
        "pv": {"ours": [], "persistence": [], "seasonal": []},
        "load": {"ours": [], "persistence": [], "seasonal": []},
    }
    for seed in (11, 12, 13):
        for day in range(7):
            for issue_hour in (0.0, 12.0):
                issue_ts = MONDAY_TS + day * DAY_S + issue_hour * HOUR_S
                hist_ts = grid(issue_ts - 7 * DAY_S, 7.0)
                fc_ts = grid(issue_ts, 1.0)

                def simulated_pv_w(ts: np.ndarray, seed: int = seed) -> np.ndarray:
                    ghi = physics.clear_sky_ghi_w_per_m2(ts, LAT_DEG, LON_DEG)
                    ghi = ghi * physics.cloud_index(ts, seed)
                    return physics.pv_ac_power_w(ghi, 6_900.0, 6_000.0)

                hist_pv, true_pv = simulated_pv_w(hist_ts), simulated_pv_w(fc_ts)
                ours_pv = pv_forecast_w(hist_ts, hist_pv, fc_ts, LAT_DEG, LON_DEG, rated_w=6e3)
                errors["pv"]["ours"].append(mae(ours_pv, true_pv))
                persist_pv = persistence_forecast(hist_ts, hist_pv, fc_ts)
                errors["pv"]["persistence"].append(mae(persist_pv, true_pv))
                naive_pv = seasonal_naive_forecast(hist_ts, hist_pv, fc_ts)
                errors["pv"]["seasonal"].append(mae(naive_pv, true_pv))

                for profile, base_w, peak_w, classes in loads:
                    hist_w = physics.load_power_w(hist_ts, profile, base_w, peak_w, seed, 1.0)
                    true_w = physics.load_power_w(fc_ts, profile, base_w, peak_w, seed, 1.0)
                    ours_w = load_forecast_w(
                        hist_ts, hist_w, fc_ts, utc_offset_h=1.0, day_classes=classes
                    )
                    scale = 1.0 / peak_w
                    errors["load"]["ours"].append(mae(ours_w, true_w) * scale)
                    persist_w = persistence_forecast(hist_ts, hist_w, fc_ts)
                    errors["load"]["persistence"].append(mae(persist_w, true_w) * scale)
                    naive_w = seasonal_naive_forecast(hist_ts, hist_w, fc_ts)
                    errors["load"]["seasonal"].append(mae(naive_w, true_w) * scale)

    for target, by_method in errors.items():
        mean = {method: float(np.mean(values)) for method, values in by_method.items()}
        assert mean["ours"] < mean["persistence"], (target, mean)
        assert mean["ours"] < mean["seasonal"], (target, mean)
        # a margin, not a coin flip: at least 10 % better than the best baseline
        assert mean["ours"] < 0.9 * min(mean["persistence"], mean["seasonal"]), (target, mean)


def _ragged_site_histories() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ts, PV W, load W) of sites with unlike histories: long, short, night only, gappy,
    a load that stepped up for the last hours, unsorted, empty."""
    rng = np.random.default_rng(7)
    start = datetime(2026, 6, 1, tzinfo=UTC).timestamp()
    week = start + np.arange(0.0, 7 * DAY_S, 300.0)
    ghi = clear_sky_ghi_w_per_m2(week, LAT_DEG, LON_DEG)
    sites = []
    for k in range(4):  # long, noisy histories of different sizes
        n = len(week) - 400 * k
        pv = (3000.0 + 1000 * k) * ghi[:n] / 1000.0 * rng.uniform(0.3, 1.0, n)
        load = 500.0 + 300.0 * np.sin(week[:n] / 7000.0) + rng.normal(0, 50, n)
        sites.append((week[:n].copy(), pv, load))
    ts, pv, load = sites[0][0].copy(), sites[0][1].copy(), sites[0][2].copy()
    pv[::7] = np.nan
    load[::5] = np.inf
    ts[::11] = np.nan
    sites.append((ts, pv, load))  # gappy, with non-finite samples
    night = start + np.arange(0.0, 3 * HOUR_S, 60.0)  # midnight UTC: no daylight sample
    sites.append((night, np.zeros(night.size), np.full(night.size, 800.0)))
    step = week[-600:].copy()
    stepped = np.where(step > step[-1] - 2 * HOUR_S, 1500.0, 600.0)
    sites.append((step, ghi[-600:] * 2.0, stepped))
    order = rng.permutation(step.size)
    sites.append((step[order], (ghi[-600:] * 2.0)[order], stepped[order]))  # unsorted
    sites.append((np.array([]), np.array([]), np.array([])))
    return sites


def _padded(columns: list[np.ndarray]) -> np.ndarray:
    out = np.full((len(columns), max(c.size for c in columns)), np.nan)
    for i, c in enumerate(columns):
        out[i, : c.size] = c
    return out


def test_forecasts_for_many_sites_at_once_equal_the_per_site_forecasts() -> None:
    sites = _ragged_site_histories()
    start = float(np.nanmax(sites[0][0])) + STEP_S
    target = start + np.arange(96) * STEP_S
    target[5] = np.nan
    ts = _padded([s[0] for s in sites])
    pv = pv_forecast_sites_w(ts, _padded([s[1] for s in sites]), target, LAT_DEG, LON_DEG)
    load = load_forecast_sites_w(
        ts, _padded([s[2] for s in sites]), target, utc_offset_h=2.0, default_w=123.0
    )
    assert pv.shape == load.shape == (len(sites), target.size)
    ghi = clear_sky_ghi_w_per_m2(ts, LAT_DEG, LON_DEG)
    known = pv_forecast_sites_w(
        ts,
        _padded([s[1] for s in sites]),
        target,
        LAT_DEG,
        LON_DEG,
        history_clear_sky_ghi_w_per_m2=ghi,
    )
    np.testing.assert_array_equal(known, pv)  # the GHI the caller kept: the same forecast
    for i, (site_ts, site_pv, site_load) in enumerate(sites):
        np.testing.assert_allclose(
            pv[i], pv_forecast_w(site_ts, site_pv, target, LAT_DEG, LON_DEG), rtol=1e-9
        )
        np.testing.assert_allclose(
            load[i],
            load_forecast_w(site_ts, site_load, target, utc_offset_h=2.0, default_w=123.0),
            rtol=1e-9,
        )
    assert np.all(load[-1][np.isfinite(target)] == 123.0)  # no history: the default
    assert np.all(pv[5][np.isfinite(target)] == 0.0)  # night only, no rating: nothing
    assert np.any(pv[0] > 100.0)
    assert np.isnan(pv[:, 5]).all() and np.isnan(load[:, 5]).all()
