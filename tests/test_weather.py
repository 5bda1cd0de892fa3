"""The weather forecast: its message, its topic, and the PV forecasting math that uses it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from broker import topics
from broker.messages import BY_KIND, WeatherForecast
from coordinator import forecast as fc
from coordinator.weather import KeptForecast, WeatherSnapshot, WeatherStore, kept_forecast

T0 = 1_782_086_400.0  # 2026-06-22 00:00 UTC
LAT, LON = 48.14, 11.58


# -- the message ------------------------------------------------------------------------------


def test_a_weather_forecast_with_an_area_index_or_ghi_or_site_series_is_valid() -> None:
    area = WeatherForecast(ts=T0, start_ts=T0, step_s=3600, clear_sky_index=[0.5, 1.1])
    assert area.steps == 2
    ghi = WeatherForecast(ts=T0, start_ts=T0, step_s=900, ghi_w_per_m2=[0.0, 800.0, 1400.0])
    assert ghi.steps == 3
    sites = WeatherForecast(ts=T0, start_ts=T0, step_s=900, sites={"house-1": [0.3]})
    assert WeatherForecast.model_validate_json(sites.model_dump_json()) == sites
    assert BY_KIND["weather/forecast"] is WeatherForecast


@pytest.mark.parametrize(
    "fields",
    [
        {"clear_sky_index": [0.5], "ghi_w_per_m2": [100.0]},  # both area kinds
        {},  # no series at all
        {"clear_sky_index": []},  # an empty series
        {"clear_sky_index": [0.5, 0.6], "sites": {"house-1": [0.5]}},  # lengths differ
        {"clear_sky_index": [1.3]},  # index out of range
        {"clear_sky_index": [-0.1]},
        {"clear_sky_index": [math.nan]},
        {"ghi_w_per_m2": [math.inf]},
        {"ghi_w_per_m2": [2000.0]},  # a unit slip (not W/m^2)
        {"sites": {"House 1": [0.5]}},  # not a site id
        {"clear_sky_index": [0.5], "step_s": 30},  # step too short
        {"clear_sky_index": [0.5], "step_s": 7200},  # step too long
        {"clear_sky_index": [0.5] * 673},  # too many steps
        {"clear_sky_index": [0.5], "start_ts": T0 - 3 * 86_400},  # starts long before ts
        {"clear_sky_index": [0.5] * 200, "step_s": 3600},  # reaches 8+ days past ts
        {"clear_sky_index": [0.5], "surprise": 1},  # unknown field
    ],
)
def test_malformed_weather_forecasts_are_refused(fields: dict[str, object]) -> None:
    data: dict[str, object] = {"ts": T0, "start_ts": T0, "step_s": 900, **fields}
    with pytest.raises(ValidationError):
        WeatherForecast.model_validate(data)


def test_too_many_site_series_are_refused() -> None:
    with pytest.raises(ValidationError):
        WeatherForecast(ts=T0, start_ts=T0, step_s=900, sites={f"s{i}": [0.5] for i in range(257)})


def test_the_weather_topic_is_in_the_scheme() -> None:
    assert topics.WEATHER_FORECAST == "wattmesh/v1/weather/forecast"
    assert topics.parse_topic(topics.WEATHER_FORECAST).kind == "weather/forecast"
    with pytest.raises(ValueError, match="not in the v1 scheme"):
        topics.parse_topic("wattmesh/v1/weather/other")


# -- the math ---------------------------------------------------------------------------------


def test_clear_sky_index_of_a_ghi_forecast_is_the_ratio_clipped_and_nan_at_night() -> None:
    got = fc.clear_sky_index_from_ghi([400.0, 1000.0, 10.0, 0.0], [800.0, 800.0, 20.0, 500.0])
    np.testing.assert_allclose(got[[0, 1, 3]], [0.5, 1.2, 0.0])
    assert np.isnan(got[2])  # clear-sky GHI below 50 W/m^2


def test_a_step_series_is_read_between_step_centres_and_nan_outside() -> None:
    got = fc.step_series_at(0.0, 3600.0, [0.2, 0.6], [0.0, 1800.0, 3600.0, 5400.0, 7199.0, 7200.0])
    np.testing.assert_allclose(got[:5], [0.2, 0.2, 0.4, 0.6, 0.6])
    assert np.isnan(got[5])
    assert np.isnan(fc.step_series_at(0.0, 3600.0, [0.2], [-1.0, math.nan])).all()
    # a NaN step is NaN around its own centre
    gap = fc.step_series_at(0.0, 3600.0, [0.2, math.nan, 0.6], [1800.0, 5400.0, 9000.0])
    np.testing.assert_allclose(gap[[0, 2]], [0.2, 0.6])
    assert np.isnan(gap[1])


def _history(days: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three days at 15 minutes before T0, PV = 5 kW per 1000 W/m^2 of clear-sky GHI times a
    weather index that alternates 0.4 and 1.0 by day (times, power W, index)."""
    ts = T0 - 900.0 * np.arange(days * 96, 0, -1)
    index = np.where(((ts - T0) // 86_400) % 2 == 0, 0.4, 1.0)
    power = 5.0 * fc.clear_sky_ghi_w_per_m2(ts, LAT, LON) * index
    return ts, power, index


def test_the_weather_capacity_divides_the_service_index_out() -> None:
    ts, power, index = _history()
    assert fc.pv_weather_capacity_w(ts, power, index, LAT, LON) == pytest.approx(5000.0)
    # the effective capacity is the typical cloudy output instead: 0.4 or 1.0 times 5000
    c = fc.pv_effective_capacity_w(ts, power, LAT, LON)
    assert c == pytest.approx(2000.0) or c == pytest.approx(5000.0)
    assert math.isnan(fc.pv_weather_capacity_w(ts, power, np.full(ts.shape, np.nan), LAT, LON))


def _sites_forecast(
    ts: np.ndarray,
    power: np.ndarray,
    times: np.ndarray,
    history_index: np.ndarray | None,
    forecast_index: np.ndarray | None,
) -> np.ndarray:
    return fc.pv_forecast_sites_w(
        ts[None, :],
        power[None, :],
        times,
        LAT,
        LON,
        history_weather_index=None if history_index is None else history_index[None, :],
        forecast_weather_index=None if forecast_index is None else forecast_index[None, :],
    )[0]


def test_a_weather_forecast_sets_the_pv_forecast_beyond_the_persistence_hours() -> None:
    ts, power, index = _history()
    times = T0 + 900.0 * (np.arange(96) + 0.5)  # the next day
    clear = fc.clear_sky_ghi_w_per_m2(times, LAT, LON)
    forecast_index = np.full(times.shape, 0.8)
    got = _sites_forecast(ts, power, times, index, forecast_index)
    # the last daylight sample was last evening: persistence has decayed to exp(-10) by sunrise
    np.testing.assert_allclose(got, 5.0 * clear * 0.8, rtol=1e-4, atol=1e-6)


def test_without_a_covering_weather_forecast_the_pv_forecast_is_unchanged() -> None:
    ts, power, index = _history()
    times = T0 + 900.0 * (np.arange(96) + 0.5)
    before = _sites_forecast(ts, power, times, None, None)
    np.testing.assert_array_equal(before, fc.pv_forecast_w(ts, power, times, LAT, LON))
    stale = _sites_forecast(ts, power, times, index, np.full(times.shape, np.nan))
    np.testing.assert_array_equal(stale, before)
    # covered for the first 12 hours only: the rest is as without weather
    half = np.where(np.arange(96) < 48, 0.8, np.nan)
    mixed = _sites_forecast(ts, power, times, index, half)
    np.testing.assert_array_equal(mixed[48:], before[48:])
    clear = fc.clear_sky_ghi_w_per_m2(times[:48], LAT, LON)
    np.testing.assert_allclose(mixed[:48], 5.0 * clear * 0.8, rtol=1e-4, atol=1e-6)


def test_the_weather_is_not_used_before_enough_history_samples_had_it() -> None:
    ts, power, index = _history()
    times = T0 + 900.0 * (np.arange(96) + 0.5)
    few = np.where(ts >= T0 - 2 * 3600.0, index, np.nan)  # the last 2 h: night, no daylight
    got = _sites_forecast(ts, power, times, few, np.full(times.shape, 0.8))
    np.testing.assert_array_equal(got, _sites_forecast(ts, power, times, None, None))


def test_persistence_still_leads_the_first_hour_with_weather() -> None:
    ts, power, index = _history()
    noon = T0 - 86_400.0 + 11 * 3600.0  # history until yesterday 11:00 UTC (a clear day)
    keep = ts <= noon
    times = noon + 900.0 * (np.arange(16) + 0.5)
    clear = fc.clear_sky_ghi_w_per_m2(times, LAT, LON)
    got = _sites_forecast(ts[keep], power[keep], times, index[keep], np.full(times.shape, 0.4))
    lead = times - noon
    expected = clear / 1000.0 * (2000.0 + 3000.0 * np.exp(-lead / 3600.0))  # c_now = 5000
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_weather_arrays_of_the_wrong_shape_are_refused() -> None:
    ts, power, index = _history(1)
    times = T0 + 900.0 * np.arange(4)
    with pytest.raises(fc.ForecastInputError, match="forecast_weather_index"):
        _sites_forecast(ts, power, times, index, np.full(5, 0.5))
    with pytest.raises(fc.ForecastInputError, match="history_weather_index"):
        _sites_forecast(ts, power, times, index[:-1], np.full(4, 0.5))


# -- what the coordinator keeps ---------------------------------------------------------------


def _store(max_age_h: float = 18.0) -> WeatherStore:
    return WeatherStore(LAT, LON, max_age_h * 3600.0, future_skew_s=30.0)


def test_the_newest_forecast_leads_and_a_site_series_beats_the_area() -> None:
    store = _store()
    old = WeatherForecast(ts=T0, start_ts=T0, step_s=3600, clear_sky_index=[0.2] * 4)
    new = WeatherForecast(
        ts=T0 + 3600,
        start_ts=T0 + 3600,
        step_s=3600,
        clear_sky_index=[0.6] * 4,
        sites={"b": [0.9] * 4},
    )
    assert store.offer(old, T0) is None
    assert store.offer(new, T0 + 3600) is None
    history_ts = np.array([[T0 + 1800.0, T0 + 5400.0]] * 2)
    times = np.array([T0 + 9000.0, T0 + 6 * 3600.0])
    got = store.snapshot(T0 + 3600).indices(["a", "b"], history_ts, times)
    assert got is not None
    history, ahead = got
    np.testing.assert_allclose(history, [[0.2, 0.6], [0.2, 0.9]])  # old covers 00-01 h only
    np.testing.assert_allclose(ahead[:, 0], [0.6, 0.9])
    assert np.isnan(ahead[:, 1]).all()  # past the newest forecast's end


def test_future_stale_superseded_forecasts_are_refused_and_a_stale_one_is_not_used_ahead() -> None:
    store = _store(max_age_h=6.0)
    f = WeatherForecast(ts=T0, start_ts=T0, step_s=3600, clear_sky_index=[0.5] * 24)
    assert store.offer(f, T0 - 60.0) == "future"
    assert store.offer(f, T0 + 7 * 3600.0) == "stale"
    assert store.offer(f, T0) is None
    assert store.offer(f, T0) == "superseded"
    assert store.rejected == {"future": 1, "stale": 1, "superseded": 1}
    times = np.array([T0 + 8 * 3600.0])
    got = store.snapshot(T0 + 7 * 3600.0).indices(["a"], np.array([[T0 + 60.0]]), times)
    assert got is not None
    np.testing.assert_allclose(got[0], [[0.5]])  # still what the past looked like
    assert np.isnan(got[1]).all()  # but not used ahead
    assert _store().snapshot(T0).indices(["a"], np.array([[T0]]), times) is None


def test_a_ghi_forecast_is_kept_as_a_clear_sky_index() -> None:
    noon = T0 + 11 * 3600.0
    clear = float(fc.clear_sky_ghi_w_per_m2(noon + 450.0, LAT, LON))
    msg = WeatherForecast(ts=noon, start_ts=noon, step_s=900, ghi_w_per_m2=[clear / 2.0])
    kept = kept_forecast(msg, LAT, LON)
    assert kept.area is not None
    np.testing.assert_allclose(kept.area, [0.5])


def _reference_history_index(
    kept: tuple[KeptForecast, ...], names: list[str], history_ts: np.ndarray
) -> np.ndarray:
    """The history index by its definition: every kept forecast read at every sample with
    :func:`coordinator.forecast.step_series_at`, oldest first, a finite value overwriting."""
    out = np.full(history_ts.shape, np.nan)
    for k in kept:
        for i, name in enumerate(names):
            series = k.series(name)
            if series is not None:
                value = fc.step_series_at(k.start_ts, k.step_s, series, history_ts[i])
                np.copyto(out[i], value, where=np.isfinite(value))
    return out


def _random_kept(rng: np.random.Generator, issued: float, names: list[str]) -> KeptForecast:
    steps = int(rng.integers(1, 40))
    step_s = float(rng.choice([900.0, 1800.0, 3600.0]))

    def series(n: int) -> np.ndarray:
        values = rng.uniform(0.0, 1.2, n)
        values[rng.random(n) < 0.2] = np.nan  # night steps of a GHI forecast
        return values

    area = series(steps) if rng.random() < 0.7 else None
    own = [n for n in names if rng.random() < 0.4] or ([] if area is not None else names[:1])
    start = issued + float(rng.uniform(-3600.0, 3600.0))
    return KeptForecast(issued, start, step_s, area, {n: series(steps) for n in own})


@pytest.mark.parametrize("seed", range(12))
def test_the_history_index_is_the_latest_finite_forecast_value_also_from_the_cache(
    seed: int,
) -> None:
    """The fast path (newest first, per-site rows cached between intervals) gives exactly the
    definition's arrays, as the history grows, forecasts arrive and old ones go."""
    rng = np.random.default_rng(seed)
    names = ["a", "b", "c", "d"]
    store = _store()
    kept: list[KeptForecast] = []
    samples = T0 + 900.0 * np.arange(200) + rng.uniform(0.0, 60.0, 200)
    for step in range(40):
        if step % 6 == 0:  # a new run; the oldest leaves after five
            kept = [*kept, _random_kept(rng, T0 + 900.0 * (step + 150), names)][-5:]
        end = 160 + step
        history_ts = np.full((len(names), 160), np.nan)
        for i in range(len(names)):
            row = samples[end - 160 + i * 3 : end]  # rows of different lengths, NaN in front
            history_ts[i, 160 - len(row) :] = row
        snapshot = WeatherSnapshot(tuple(kept), True, store.cache)
        got = snapshot.indices(names, history_ts, np.array([T0]))
        assert got is not None
        np.testing.assert_array_equal(
            got[0], _reference_history_index(tuple(kept), names, history_ts)
        )
    assert len(store.cache) > 0  # the cached path was the one taken
