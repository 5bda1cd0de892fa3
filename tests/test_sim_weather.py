"""The simulated weather service: a forecast of the slow cloud octave whose error grows with
lead time, issued like NWP runs, with a day-ahead skill in the range of real services."""

from __future__ import annotations

import numpy as np
import pytest

from simulators import physics
from simulators import weather as sw

T0 = 1_782_086_400.0  # 2026-06-22 00:00 UTC, a run time
LAT, LON = 48.14, 11.58
SEED = 700_000  # the community scenario's solar farm, seed 7


def test_runs_are_every_six_hours_and_cover_48_hours() -> None:
    assert sw.latest_run_ts(T0 + 5.9 * 3600) == T0
    assert sw.latest_run_ts(T0 + 6 * 3600) == T0 + 6 * 3600
    got = sw.forecast_clear_sky_index([T0 - 1.0, T0, T0 + 47.9 * 3600, T0 + 48 * 3600], T0, SEED)
    assert np.isnan(got[[0, 3]]).all()
    assert np.isfinite(got[[1, 2]]).all()


def test_the_error_std_grows_from_0_05_at_one_hour_to_0_175_at_a_day() -> None:
    np.testing.assert_allclose(
        sw.error_std([0.0, 3600.0, 24 * 3600.0, 48 * 3600.0]), [0.05, 0.05, 0.175, 0.2]
    )


def test_the_forecast_is_the_slow_octave_plus_a_bounded_error_per_run() -> None:
    t = T0 + 60.0 * np.arange(48 * 60)
    slow = physics.cloud_index_slow(t, SEED)
    first = sw.forecast_clear_sky_index(t, T0, SEED)
    error = first - slow
    lead = t - T0
    # z is within +-2: the error within 2 sigma (clipping to [0, 1.2] only shrinks it)
    assert np.all(np.abs(error) <= 2.0 * sw.error_std(lead) + 1e-12)
    assert np.std(error[lead < 3 * 3600]) < np.std(error[lead > 24 * 3600])
    # the same run and seed give the same forecast; the next run draws a new error
    np.testing.assert_array_equal(first, sw.forecast_clear_sky_index(t, T0, SEED))
    later = t >= T0 + 6 * 3600
    second = sw.forecast_clear_sky_index(t[later], T0 + 6 * 3600, SEED)
    assert not np.allclose(second, first[later])
    # the world's index deviates from the slow octave by the fast octave only
    world = physics.cloud_index(t, SEED)
    assert abs(float(np.mean(world - slow))) < 0.05


def test_the_day_ahead_hourly_ghi_nrmse_is_in_the_range_of_real_nwp() -> None:
    t = T0 + 60.0 * np.arange(7 * 1440)  # a summer week, minute by minute
    clear = physics.clear_sky_ghi_w_per_m2(t, LAT, LON)
    world = clear * physics.cloud_index(t, SEED)
    issued = np.floor((t - 24 * 3600.0) / sw.RUN_PERIOD_S) * sw.RUN_PERIOD_S  # 24-30 h lead
    forecast = np.empty_like(t)
    for run in np.unique(issued):
        now = issued == run
        forecast[now] = clear[now] * sw.forecast_clear_sky_index(t[now], float(run), SEED)
    hours = len(t) // 60

    def hourly(x: np.ndarray) -> np.ndarray:
        return x.reshape(hours, 60).mean(axis=1)

    day = hourly(clear) > 50.0
    error = hourly(forecast)[day] - hourly(world)[day]
    nrmse = float(np.sqrt(np.mean(error**2)) / np.mean(hourly(world)[day]))
    assert nrmse == pytest.approx(0.27, abs=0.08)  # real day-ahead services: 0.2-0.4
