"""Tests for simulators.physics with hand-checkable values."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulators.physics import (
    battery_step,
    clear_sky_ghi_w_per_m2,
    cloud_index,
    haurwitz_ghi_w_per_m2,
    load_power_w,
    pv_ac_power_w,
    solar_zenith_deg,
)

DAY_S = 86_400.0
OBLIQUITY_DEG = 23.44

Profile = Literal["household", "factory", "office"]


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    """UTC epoch seconds of a calendar time."""
    return datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()


def minutes_of_day(year: int, month: int, day: int) -> np.ndarray:
    """Epoch seconds of every minute of one UTC day."""
    return utc(year, month, day) + np.arange(0.0, DAY_S, 60.0)


# ------------------------------------------------------------------------------------- sun


def test_zenith_at_solar_noon_on_june_solstice_is_latitude_minus_obliquity() -> None:
    zenith = solar_zenith_deg(minutes_of_day(2024, 6, 21), 52.0, 0.0)
    assert zenith.min() == pytest.approx(52.0 - OBLIQUITY_DEG, abs=1.0)  # 28.56


def test_zenith_at_solar_noon_on_march_equinox_is_latitude() -> None:
    zenith = solar_zenith_deg(minutes_of_day(2024, 3, 20), 52.0, 0.0)
    assert zenith.min() == pytest.approx(52.0, abs=1.0)


def test_zenith_at_solar_noon_on_equator_at_equinox_is_near_zero() -> None:
    zenith = solar_zenith_deg(minutes_of_day(2024, 3, 20), 0.0, 0.0)
    assert zenith.min() < 1.0


def test_zenith_in_southern_hemisphere_on_december_solstice() -> None:
    # Sydney: noon zenith = |lat| - declination = 33.9 - 23.44 = 10.46 deg
    zenith = solar_zenith_deg(minutes_of_day(2024, 12, 21), -33.9, 151.2)
    assert zenith.min() == pytest.approx(33.9 - OBLIQUITY_DEG, abs=1.0)


def test_solar_noon_follows_equation_of_time() -> None:
    # Early November the sun is about 16.4 min fast: noon at Greenwich near 11:43.6 UTC.
    ts = minutes_of_day(2024, 11, 3)
    noon_min = float(np.argmin(solar_zenith_deg(ts, 51.5, 0.0)))
    assert noon_min == pytest.approx(12 * 60 - 16.4, abs=3.0)


def test_solar_noon_moves_four_minutes_per_degree_of_longitude() -> None:
    ts = minutes_of_day(2024, 6, 21)
    noon_greenwich = int(np.argmin(solar_zenith_deg(ts, 45.0, 0.0)))
    noon_90_east = int(np.argmin(solar_zenith_deg(ts, 45.0, 90.0)))
    assert noon_greenwich - noon_90_east == pytest.approx(360, abs=1)


def test_sun_is_below_horizon_at_midnight() -> None:
    assert solar_zenith_deg(utc(2024, 1, 15, 0), 52.0, 0.0) > 90.0


def test_zenith_scalar_gives_zero_dim_float64_and_nan_propagates() -> None:
    zenith = solar_zenith_deg(utc(2024, 6, 21, 12), 52.0, 0.0)
    assert isinstance(zenith, np.ndarray)
    assert zenith.ndim == 0
    assert zenith.dtype == np.float64
    out = solar_zenith_deg([math.nan, utc(2024, 6, 21, 12)], 52.0, 0.0)
    assert np.isnan(out[0])
    assert np.isfinite(out[1])


def test_haurwitz_ghi_at_known_zenith_angles() -> None:
    ghi = haurwitz_ghi_w_per_m2([0.0, 60.0, 90.0, 120.0])
    assert ghi[0] == pytest.approx(1098.0 * math.exp(-0.057))  # 1037.2
    assert ghi[0] == pytest.approx(1037.16, abs=0.01)
    assert ghi[1] == pytest.approx(549.0 * math.exp(-0.114))  # 489.9
    assert ghi[2] == 0.0
    assert ghi[3] == 0.0


def test_clear_sky_ghi_is_zero_at_night_and_haurwitz_by_day() -> None:
    night = clear_sky_ghi_w_per_m2(utc(2024, 6, 21, 0), 52.0, 0.0)
    assert night == 0.0
    noon = utc(2024, 6, 21, 12)
    zenith = float(solar_zenith_deg(noon, 52.0, 0.0))
    cos_z = math.cos(math.radians(zenith))
    expected = 1098.0 * cos_z * math.exp(-0.057 / cos_z)
    assert clear_sky_ghi_w_per_m2(noon, 52.0, 0.0) == pytest.approx(expected)
    assert 850.0 < expected < 950.0


def test_clear_sky_ghi_is_never_negative_over_a_year() -> None:
    ts = utc(2024, 1, 1) + np.arange(0.0, 366 * DAY_S, 1800.0)
    ghi = clear_sky_ghi_w_per_m2(ts, 52.0, 13.0)
    assert ghi.min() == 0.0
    assert ghi.max() < 1037.2


# ----------------------------------------------------------------------------------- clouds

SPAN_TS = utc(2024, 1, 1) + np.arange(0.0, 60 * DAY_S, 60.0)


def test_cloud_index_same_seed_gives_same_values() -> None:
    np.testing.assert_array_equal(cloud_index(SPAN_TS, 42), cloud_index(SPAN_TS, 42))


def test_cloud_index_different_seed_gives_different_values() -> None:
    a = cloud_index(SPAN_TS, 1)
    b = cloud_index(SPAN_TS, 2)
    assert np.mean(np.abs(a - b)) > 0.05


def test_cloud_index_is_stateless_single_time_equals_array_element() -> None:
    series = cloud_index(SPAN_TS[:500], 7)
    assert cloud_index(SPAN_TS[321], 7) == series[321]


def test_cloud_index_stays_in_bounds() -> None:
    for seed in range(3):
        k = cloud_index(SPAN_TS, seed, mean_clear_sky_index=0.9, variability=0.5)
        assert k.min() >= 0.05
        assert k.max() <= 1.05


def test_cloud_index_mean_and_std_follow_parameters_when_not_clipped() -> None:
    # 0.6 +- 2.8 * 0.15 stays inside [0.05, 1.05], so no clipping bias.
    k = cloud_index(SPAN_TS, 3, mean_clear_sky_index=0.6, variability=0.15)
    assert k.mean() == pytest.approx(0.6, abs=0.02)
    assert k.std() == pytest.approx(0.15, abs=0.02)


def test_cloud_index_default_mean_is_roughly_the_parameter() -> None:
    k = cloud_index(SPAN_TS, 5)
    assert k.mean() == pytest.approx(0.8, abs=0.05)


def test_cloud_index_changes_smoothly_second_to_second() -> None:
    ts = utc(2024, 5, 1) + np.arange(0.0, DAY_S, 1.0)
    k = cloud_index(ts, 9)
    assert np.max(np.abs(np.diff(k))) < 0.01


def test_cloud_index_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="knot_s"):
        cloud_index(0.0, 1, knot_s=0.0)
    with pytest.raises(ValueError, match="variability"):
        cloud_index(0.0, 1, variability=-0.1)
    with pytest.raises(ValueError, match="mean_clear_sky_index"):
        cloud_index(0.0, 1, mean_clear_sky_index=1.5)


# --------------------------------------------------------------------------------------- PV


def test_pv_ac_at_stc_irradiance_hand_value() -> None:
    # t_cell = 20 + 25/800*1000 = 51.25 C; factor = 1 - 0.004*26.25 = 0.895
    # dc = 5000 * 0.895 = 4475 W; ac = 4475 * 0.96 = 4296 W
    assert pv_ac_power_w(1000.0, 5000.0, 10_000.0) == pytest.approx(4296.0)


def test_pv_ac_at_noct_conditions_hand_value() -> None:
    # G = 800, t_amb = 20: t_cell = 45 C; factor = 0.92; dc = 5000*0.8*0.92 = 3680 W
    assert pv_ac_power_w(800.0, 5000.0, 10_000.0) == pytest.approx(3680.0 * 0.96)


def test_pv_ac_is_clipped_at_rated_ac() -> None:
    assert pv_ac_power_w(1000.0, 5000.0, 4000.0) == pytest.approx(4000.0)


def test_pv_ac_is_clipped_at_curtailment_limit_vectorised() -> None:
    out = pv_ac_power_w(
        [1000.0, 1000.0, 1000.0, 1000.0],
        5000.0,
        4000.0,
        curtail_limit_w=[np.inf, 2500.0, 0.0, -100.0],
    )
    np.testing.assert_allclose(out, [4000.0, 2500.0, 0.0, 0.0])


def test_pv_ac_is_zero_at_zero_or_negative_irradiance() -> None:
    np.testing.assert_array_equal(pv_ac_power_w([0.0, -5.0], 5000.0, 4000.0), [0.0, 0.0])


def test_pv_ac_decreases_with_ambient_temperature() -> None:
    cold, mild, hot = pv_ac_power_w(700.0, 5000.0, 10_000.0, ambient_c=[0.0, 20.0, 40.0])
    assert cold > mild > hot
    # 20 K warmer lowers dc by 0.004 * 20 = 8 % of STC: 5000 * 0.7 * 0.08 * 0.96 = 268.8 W
    assert mild - hot == pytest.approx(268.8)


# ---------------------------------------------------------------------------------- battery


def test_battery_charging_1000_w_for_an_hour_adds_9_5_points() -> None:
    soc, delivered = battery_step(50.0, -1000.0, 3600.0, 10_000.0)
    assert soc == pytest.approx(59.5, abs=1e-12)
    assert delivered == -1000.0


def test_battery_discharging_draws_more_from_storage_than_delivered() -> None:
    soc, delivered = battery_step(50.0, 1000.0, 3600.0, 10_000.0)
    assert delivered == 1000.0
    # 1000 Wh out needs 1000 / 0.95 = 1052.63 Wh from storage: -10.526 points
    assert soc == pytest.approx(50.0 - 100.0 / 9.5)
    assert (50.0 - soc) / 100.0 * 10_000.0 > 1000.0


def test_battery_stops_at_soc_min_and_delivers_exactly_what_was_available() -> None:
    # 1 point above 5 % of 10 kWh = 100 Wh stored -> 95 Wh at the terminals over 1 h
    soc, delivered = battery_step(6.0, 1000.0, 3600.0, 10_000.0)
    assert soc == 5.0
    assert delivered == pytest.approx(95.0)


def test_battery_stops_at_soc_max_and_takes_exactly_what_fits() -> None:
    # 100 Wh headroom at 95 % charge efficiency: 100 / 0.95 = 105.26 W for 1 h
    soc, delivered = battery_step(99.0, -1000.0, 3600.0, 10_000.0)
    assert soc == 100.0
    assert delivered == pytest.approx(-100.0 / 0.95)


def test_battery_at_limits_delivers_nothing_in_the_blocked_direction() -> None:
    soc, delivered = battery_step([5.0, 100.0], [500.0, -500.0], 60.0, 10_000.0)
    np.testing.assert_array_equal(soc, [5.0, 100.0])
    np.testing.assert_array_equal(delivered, [0.0, 0.0])


def test_battery_zero_dt_or_zero_power_changes_nothing() -> None:
    soc, delivered = battery_step([40.0, 40.0], [0.0, 2000.0], [60.0, 0.0], 10_000.0)
    np.testing.assert_array_equal(soc, [40.0, 40.0])
    np.testing.assert_array_equal(delivered, [0.0, 2000.0])


def test_battery_step_is_vectorised_and_matches_scalar_calls() -> None:
    socs = np.array([50.0, 6.0, 99.0, 30.0])
    powers = np.array([-1000.0, 1000.0, -1000.0, 250.0])
    soc, delivered = battery_step(socs, powers, 3600.0, 10_000.0)
    assert soc.shape == delivered.shape == (4,)
    for i in range(4):
        s, d = battery_step(socs[i], powers[i], 3600.0, 10_000.0)
        assert soc[i] == s
        assert delivered[i] == d


def test_battery_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="capacity_wh"):
        battery_step(50.0, 0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="charge_efficiency"):
        battery_step(50.0, 0.0, 1.0, 1000.0, charge_efficiency=1.2)
    with pytest.raises(ValueError, match="soc_min_pct"):
        battery_step(50.0, 0.0, 1.0, 1000.0, soc_min_pct=60.0, soc_max_pct=40.0)
    with pytest.raises(ValueError, match="dt_s"):
        battery_step(50.0, 0.0, -1.0, 1000.0)


@given(
    soc_frac=st.floats(0.0, 1.0),
    power_w=st.floats(-1e6, 1e6),
    dt_s=st.floats(0.0, 86_400.0),
    capacity_wh=st.floats(1.0, 1e6),
    eta_c=st.floats(0.5, 1.0),
    eta_d=st.floats(0.5, 1.0),
    soc_min_pct=st.floats(0.0, 50.0),
    soc_max_pct=st.floats(50.0, 100.0),
)
def test_battery_step_keeps_soc_in_bounds_and_conserves_energy(
    *,
    soc_frac: float,
    power_w: float,
    dt_s: float,
    capacity_wh: float,
    eta_c: float,
    eta_d: float,
    soc_min_pct: float,
    soc_max_pct: float,
) -> None:
    soc_pct = soc_min_pct + soc_frac * (soc_max_pct - soc_min_pct)
    new_soc, delivered = battery_step(
        soc_pct, power_w, dt_s, capacity_wh, eta_c, eta_d, soc_min_pct, soc_max_pct
    )
    new, got = float(new_soc), float(delivered)
    assert soc_min_pct <= new <= soc_max_pct
    # delivered never exceeds the request and never reverses it
    assert abs(got) <= abs(power_w)
    assert got * power_w >= 0.0
    # storage change equals terminal energy through the efficiency
    stored_change_wh = (new - soc_pct) / 100.0 * capacity_wh
    terminal_wh = got * dt_s / 3600.0
    expected_wh = -terminal_wh / eta_d if got > 0.0 else -terminal_wh * eta_c
    assert stored_change_wh == pytest.approx(expected_wh, rel=1e-9, abs=1e-9 * capacity_wh)


@given(
    soc_pct=st.floats(-5.0, 105.0),
    power_w=st.floats(-1e6, 1e6) | st.just(0.0),
    dt_s=st.floats(0.0, 86_400.0) | st.just(0.0),
    capacity_wh=st.floats(1.0, 1e6),
    eta_c=st.floats(0.5, 1.0),
    eta_d=st.floats(0.5, 1.0),
    soc_min_pct=st.floats(0.0, 50.0),
    soc_max_pct=st.floats(50.0, 100.0),
)
def test_battery_step_gives_the_same_for_plain_floats_as_for_arrays(
    *,
    soc_pct: float,
    power_w: float,
    dt_s: float,
    capacity_wh: float,
    eta_c: float,
    eta_d: float,
    soc_min_pct: float,
    soc_max_pct: float,
) -> None:
    """Plain floats take a scalar path (a simulated week calls it ~10^5 times); it must be the
    array equations exactly, also for a battery outside its bounds, no power or no time."""
    args = (capacity_wh, eta_c, eta_d, soc_min_pct, soc_max_pct)
    soc_s, got_s = battery_step(soc_pct, power_w, dt_s, *args)
    soc_a, got_a = battery_step(np.array([soc_pct]), np.array([power_w]), np.array([dt_s]), *args)
    assert float(soc_s) == float(soc_a[0])
    assert float(got_s) == float(got_a[0])


# ------------------------------------------------------------------------------------ loads

# 2024-06-09 is a Sunday, 2024-06-12 a Wednesday, 2024-06-15 a Saturday.
BASE_W = 100.0
PEAK_W = 1000.0


def test_factory_sunday_night_is_near_base() -> None:
    p = load_power_w(utc(2024, 6, 9, 2), "factory", BASE_W, PEAK_W, seed=1)
    assert p == pytest.approx(BASE_W, rel=0.1)


def test_factory_sunday_noon_is_near_base() -> None:
    p = load_power_w(utc(2024, 6, 9, 12), "factory", BASE_W, PEAK_W, seed=1)
    assert p == pytest.approx(BASE_W, rel=0.1)


def test_factory_weekday_10_00_is_near_peak() -> None:
    p = load_power_w(utc(2024, 6, 12, 10), "factory", BASE_W, PEAK_W, seed=1)
    assert p == pytest.approx(PEAK_W, rel=0.1)


def test_factory_weekday_night_is_near_base() -> None:
    p = load_power_w(utc(2024, 6, 12, 3), "factory", BASE_W, PEAK_W, seed=1)
    assert p == pytest.approx(BASE_W, rel=0.1)


def test_factory_saturday_is_reduced() -> None:
    p = float(load_power_w(utc(2024, 6, 15, 10), "factory", BASE_W, PEAK_W, seed=1))
    assert 2 * BASE_W < p < 0.8 * PEAK_W


def test_factory_uses_local_time_offset() -> None:
    # 05:00 UTC is before the shift in UTC, but 07:00 local at UTC+2.
    ts = utc(2024, 6, 12, 5)
    assert load_power_w(ts, "factory", BASE_W, PEAK_W, seed=1) < 1.2 * BASE_W
    shifted = load_power_w(ts, "factory", BASE_W, PEAK_W, seed=1, utc_offset_h=2.0)
    assert shifted == pytest.approx(PEAK_W, rel=0.1)


def test_household_evening_exceeds_midday_on_every_weekday() -> None:
    for day in range(10, 15):  # Monday 2024-06-10 to Friday 2024-06-14
        evening = load_power_w(utc(2024, 6, day, 19), "household", 200.0, 3000.0, seed=4)
        midday = load_power_w(utc(2024, 6, day, 13), "household", 200.0, 3000.0, seed=4)
        assert evening > 2 * midday


def test_household_weekend_midday_is_higher_than_weekday_midday() -> None:
    weekday = load_power_w(utc(2024, 6, 12, 13), "household", 200.0, 3000.0, seed=4)
    weekend = load_power_w(utc(2024, 6, 15, 13), "household", 200.0, 3000.0, seed=4)
    assert weekend > 1.5 * weekday


def test_office_open_on_weekday_hours_only() -> None:
    open_w = load_power_w(utc(2024, 6, 12, 10), "office", 500.0, 5000.0, seed=2)
    night_w = load_power_w(utc(2024, 6, 12, 3), "office", 500.0, 5000.0, seed=2)
    saturday_w = load_power_w(utc(2024, 6, 15, 10), "office", 500.0, 5000.0, seed=2)
    assert open_w == pytest.approx(5000.0, rel=0.1)
    assert night_w == pytest.approx(500.0, rel=0.1)
    assert saturday_w == pytest.approx(500.0, rel=0.1)


@pytest.mark.parametrize("profile", ["household", "factory", "office"])
def test_load_is_deterministic_by_seed(profile: Profile) -> None:
    ts = SPAN_TS[: 7 * 1440]
    a = load_power_w(ts, profile, BASE_W, PEAK_W, seed=11)
    b = load_power_w(ts, profile, BASE_W, PEAK_W, seed=11)
    c = load_power_w(ts, profile, BASE_W, PEAK_W, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("profile", ["household", "factory", "office"])
def test_load_stays_non_negative_between_base_and_peak(profile: Profile) -> None:
    p = load_power_w(SPAN_TS[: 30 * 1440], profile, BASE_W, PEAK_W, seed=3)
    assert p.min() >= 0.9 * BASE_W
    assert p.max() <= 1.1 * PEAK_W
    zero_base = load_power_w(SPAN_TS[:1440], profile, 0.0, PEAK_W, seed=3)
    assert zero_base.min() >= 0.0


def test_load_rejects_unknown_profile_and_inverted_range() -> None:
    with pytest.raises(ValueError, match="unknown load profile"):
        load_power_w(0.0, "stadium", BASE_W, PEAK_W, seed=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="base_w"):
        load_power_w(0.0, "office", PEAK_W, BASE_W, seed=1)
