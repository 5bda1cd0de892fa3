"""Forecasts for the coordinator: per-site PV and load, and the community's clearing price.

Pure, vectorised numpy; no I/O, logging, clock or hidden state (docs/architecture.md section 4).
The ingest side keeps the ring buffers of telemetry; every function here takes that history as
arrays and returns arrays aligned to the requested timestamps.

Conventions
-----------
- ``*_ts``: UTC timestamps, float seconds since the Unix epoch; histories may be irregular and
  unsorted. A history sample whose timestamp or value is not finite (NaN, inf) is ignored.
- ``*_w``: power in W, positive (PV production and site load are both >= 0); the community's
  net load is ``sum(load) - sum(PV)``, positive when the community imports.
- ``*_per_kwh``: price in currency per kWh.
- Forecast outputs have the shape of ``forecast_ts``; a non-finite forecast timestamp gives NaN.

Methods
-------
PV (:func:`pv_forecast_w`): clear-sky GHI from the NOAA/Spencer solar position and the Haurwitz
model (:func:`clear_sky_ghi_w_per_m2`) times a site index learned from telemetry. The index is
an *effective capacity* ``c = P / (GHI_cs / 1000)`` [W]: the site's AC output per 1000 W/m^2 of
clear-sky GHI, the analogue of PVWatts' ``pdc0`` (pvlib ``pvsystem.pvwatts_dc``) with the
average cloudiness, orientation, temperature and inverter losses folded in. It is the weighted
median of the per-sample ratios over daylight samples (clear-sky GHI >= a threshold), with
weights ``GHI_cs * 0.5 ** (age / half_life)``; weighting the ratios by ``GHI_cs`` makes the
median the in-sample minimiser of the recency-weighted absolute power error
``sum w |P - c GHI_cs / 1000|`` (least-absolute-deviations regression through the origin), so
the forecast is tuned for MAE and robust to outliers (curtailment, a dead string for an hour). For
the next hours it blends persistence in: the latest index ``c_now`` (same estimator over the
last daylight hour) decays exponentially toward the climatological ``c`` with the time since
that hour. ``c`` divided by the site's nameplate is its clear-sky index times its efficiency.

Weather (:func:`pv_forecast_sites_w` with a weather service's clear-sky index ``k``, GHI / clear-sky
GHI, per history sample and per forecast time): the effective capacity ``c`` folds the average
cloudiness in, so multiplying it by a forecast index would count the clouds twice. Instead the
site learns its *weather capacity* ``c_w``, the LAD regression through the origin of its PV
power on ``GHI_cs k / 1000`` over the daylight history samples the weather service covered
(:func:`pv_weather_capacity_w`): the weighted median of ``1000 P / (GHI_cs k)`` with weights
``GHI_cs k`` and the same recency. This is model output statistics in the simplest form: the
ratio absorbs the site's losses and orientation *and* the weather service's own bias (a service
that calls 0.9 what the site sees as 0.8 gets a smaller ``c_w``), which dividing ``c`` by the
history's mean index would not; and it needs no clear days, which a clear-day capacity (an upper
quantile of ``P / GHI_cs``) would. Where the forecast covers a time ``c_w k(t)`` replaces
``c_clim``; persistence still leads the first hour(s). Beyond the weather's horizon, without a
forecast (or a stale one: the caller passes NaN) and while fewer than ``min_weather_samples``
history samples have a weather index, the forecast is exactly the one without weather.
:func:`clear_sky_index_from_ghi` turns a GHI forecast into an index; :func:`step_series_at`
reads a forecast's steps at any times.

Load (:func:`load_forecast_w`): a same-time-of-day profile (:func:`load_profile_w`): the
weighted mean of past samples in the same local time-of-day slot and the same day class
(weekday/weekend by default), each day weighted ``0.5 ** (age_days / half_life_days)``; then a
level correction: the ratio of the load observed over the last hours to what the profile (built
from the history before those hours) predicted for them, applied as a multiplicative factor
that decays exponentially to 1 over the horizon.

Price (:func:`price_forecast_per_kwh`): a heuristic, not a market model. It reads the clearing
rule of :mod:`coordinator.market`: when the community imports from the utility the price is
retail, when it exports the price is feed-in, and near balance the bids decide somewhere in
between. The forecast is feed-in for clear export, retail for clear import and a smoothstep
blend within ``balance_band_w`` of balance; it is always within ``[feed_in, retail]``.

Scoring: :func:`mae` and the baselines :func:`persistence_forecast` (last observed value held)
and :func:`seasonal_naive_forecast` (the value one period, by default one day, earlier) with the
same calling convention as the forecasters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "DAY_CLASSES_ALL_ALIKE",
    "DAY_CLASSES_WEEKDAY_SATURDAY_SUNDAY",
    "DAY_CLASSES_WEEKDAY_WEEKEND",
    "ForecastInputError",
    "clear_sky_ghi_w_per_m2",
    "clear_sky_index_from_ghi",
    "community_net_load_w",
    "haurwitz_ghi_w_per_m2",
    "load_forecast_sites_w",
    "load_forecast_w",
    "load_profile_w",
    "mae",
    "persistence_forecast",
    "price_forecast_per_kwh",
    "pv_effective_capacity_w",
    "pv_forecast_sites_w",
    "pv_forecast_w",
    "pv_weather_capacity_w",
    "seasonal_naive_forecast",
    "solar_zenith_deg",
    "step_series_at",
]

_SECONDS_PER_DAY = 86_400.0
_SECONDS_PER_HOUR = 3_600.0
_HOURS_PER_DAY = 24.0
_DAYS_PER_WEEK = 7
_EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday; Monday = 0

#: Day classes for the load profile, indexed Monday (0) to Sunday (6): days of one class share a
#: profile. Weekdays / weekend (households, offices).
DAY_CLASSES_WEEKDAY_WEEKEND: tuple[int, ...] = (0, 0, 0, 0, 0, 1, 1)
#: Weekdays / Saturday / Sunday (sites with a Saturday shift, e.g. factories).
DAY_CLASSES_WEEKDAY_SATURDAY_SUNDAY: tuple[int, ...] = (0, 0, 0, 0, 0, 1, 2)
#: Every day alike (loads without a weekly pattern).
DAY_CLASSES_ALL_ALIKE: tuple[int, ...] = (0, 0, 0, 0, 0, 0, 0)


class ForecastInputError(ValueError):
    """A forecast input is malformed: mismatched history arrays or a parameter out of range."""


# --------------------------------------------------------------------------------------------
# helpers


def _f64(x: ArrayLike) -> NDArray[np.float64]:
    """Return ``x`` as a float64 ndarray (0-d for scalars, never a numpy scalar)."""
    return np.asarray(x, dtype=np.float64)


def _clean_history(
    history_ts: ArrayLike, history_values: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Flatten a history, drop samples with a non-finite time or value, sort by time (stable).

    Raises:
        ForecastInputError: if the two arrays do not have the same shape.
    """
    ts = _f64(history_ts)
    values = _f64(history_values)
    if ts.shape != values.shape:
        raise ForecastInputError(
            f"history timestamps and values must have the same shape, got {ts.shape} and "
            f"{values.shape}"
        )
    ts = ts.ravel()
    values = values.ravel()
    keep = np.isfinite(ts) & np.isfinite(values)
    ts = ts[keep]
    values = values[keep]
    order = np.argsort(ts, kind="stable")
    return ts[order], values[order]


def _forecast_times(forecast_ts: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Forecast timestamps with non-finite ones replaced by 0, and the mask of finite ones."""
    ts = _f64(forecast_ts)
    finite = np.isfinite(ts)
    return _f64(np.where(finite, ts, 0.0)), finite


def _require_positive(name: str, value: float) -> None:
    if not value > 0.0:  # also rejects NaN
        raise ForecastInputError(f"{name} must be > 0, got {value}")


def _require_non_negative(name: str, value: float) -> None:
    if not value >= 0.0:  # also rejects NaN
        raise ForecastInputError(f"{name} must be >= 0, got {value}")


def _weighted_median(values: NDArray[np.float64], weights: NDArray[np.float64]) -> float:
    """Lower weighted median: the smallest ``v`` with ``sum(w[values <= v]) >= sum(w) / 2``.

    It minimises ``sum(w |values - m|)`` over ``m``. NaN when there are no positive weights.
    """
    positive = weights > 0.0
    values = values[positive]
    weights = weights[positive]
    if values.size == 0:
        return float("nan")
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order])
    index = int(np.searchsorted(cumulative, 0.5 * cumulative[-1], side="left"))
    return float(values[order][min(index, values.size - 1)])


# --------------------------------------------------------------------------------------------
# clear sky


def solar_zenith_deg(
    ts: ArrayLike, latitude_deg: float, longitude_deg: float
) -> NDArray[np.float64]:
    """Solar zenith angle [deg] at UTC epoch seconds ``ts``.

    NOAA "General Solar Position Calculations" with Spencer's (1971) Fourier series:

    - fractional year ``g = 2 pi / N (doy - 1 + (hour_utc - 12) / 24)`` [rad], ``N`` the days
      in the year, ``doy`` the day of the year (1 on 1 January);
    - declination ``d = 0.006918 - 0.399912 cos g + 0.070257 sin g - 0.006758 cos 2g
      + 0.000907 sin 2g - 0.002697 cos 3g + 0.00148 sin 3g`` [rad];
    - equation of time ``E = 229.18 (0.000075 + 0.001868 cos g - 0.032077 sin g
      - 0.014615 cos 2g - 0.040849 sin 2g)`` [min];
    - hour angle ``h = (60 hour_utc + E + 4 longitude_deg) / 4 - 180`` [deg];
    - ``cos z = sin(lat) sin(d) + cos(lat) cos(d) cos(h)``.

    Geometric (no refraction), accurate to well under a degree, which is plenty for an
    irradiance shape. Example: at solar noon on an equinox the zenith equals the latitude.

    Args:
        ts: UTC timestamps [s since the Unix epoch].
        latitude_deg: site latitude [deg], positive north.
        longitude_deg: site longitude [deg], positive east.

    Returns:
        Zenith angle [deg] in [0, 180] (above 90: sun below the horizon); NaN for non-finite
        ``ts``.
    """
    safe_ts, finite = _forecast_times(ts)
    days = np.floor(safe_ts / _SECONDS_PER_DAY)
    hour_utc = (safe_ts - days * _SECONDS_PER_DAY) / _SECONDS_PER_HOUR
    day = days.astype(np.int64).astype("datetime64[D]")
    year = day.astype("datetime64[Y]")
    year_start = year.astype("datetime64[D]")
    next_year_start = (year + np.timedelta64(1, "Y")).astype("datetime64[D]")
    doy = (day - year_start).astype(np.int64) + 1
    days_in_year = (next_year_start - year_start).astype(np.int64)

    g = 2.0 * np.pi / days_in_year * (doy - 1 + (hour_utc - 12.0) / _HOURS_PER_DAY)
    decl_rad = (
        0.006918
        - 0.399912 * np.cos(g)
        + 0.070257 * np.sin(g)
        - 0.006758 * np.cos(2.0 * g)
        + 0.000907 * np.sin(2.0 * g)
        - 0.002697 * np.cos(3.0 * g)
        + 0.00148 * np.sin(3.0 * g)
    )
    eot_min = 229.18 * (
        0.000075
        + 0.001868 * np.cos(g)
        - 0.032077 * np.sin(g)
        - 0.014615 * np.cos(2.0 * g)
        - 0.040849 * np.sin(2.0 * g)
    )
    hour_angle_rad = np.radians((60.0 * hour_utc + eot_min + 4.0 * longitude_deg) / 4.0 - 180.0)
    lat_rad = np.radians(latitude_deg)
    cos_z = np.sin(lat_rad) * np.sin(decl_rad) + np.cos(lat_rad) * np.cos(decl_rad) * np.cos(
        hour_angle_rad
    )
    zenith_deg = np.degrees(np.arccos(np.clip(cos_z, -1.0, 1.0)))
    return _f64(np.where(finite, zenith_deg, np.nan))


def haurwitz_ghi_w_per_m2(zenith_deg: ArrayLike) -> NDArray[np.float64]:
    """Haurwitz clear-sky global horizontal irradiance [W/m^2].

    ``GHI = 1098 cos(z) exp(-0.057 / cos(z))`` for ``cos(z) > 0``, else 0 (Haurwitz 1945; pvlib
    ``clearsky.haurwitz``). At ``z = 0``: ``1098 exp(-0.057) = 1037.17`` W/m^2.

    Args:
        zenith_deg: solar zenith angle [deg].

    Returns:
        Clear-sky GHI [W/m^2], >= 0; NaN where ``zenith_deg`` is NaN.
    """
    cos_z = np.cos(np.radians(_f64(zenith_deg)))
    up = cos_z > 0.0
    safe_cos = np.where(up, cos_z, 1.0)
    ghi = 1098.0 * safe_cos * np.exp(-0.057 / safe_cos)
    return _f64(np.where(up, ghi, np.where(np.isnan(cos_z), np.nan, 0.0)))


def clear_sky_ghi_w_per_m2(
    ts: ArrayLike, latitude_deg: float, longitude_deg: float
) -> NDArray[np.float64]:
    """Clear-sky GHI [W/m^2] at UTC epoch seconds ``ts``: Haurwitz on the NOAA zenith.

    See :func:`solar_zenith_deg` and :func:`haurwitz_ghi_w_per_m2`.

    Args:
        ts: UTC timestamps [s since the Unix epoch].
        latitude_deg: site latitude [deg], positive north.
        longitude_deg: site longitude [deg], positive east.

    Returns:
        Clear-sky GHI [W/m^2], 0 at night; NaN for non-finite ``ts``.
    """
    return haurwitz_ghi_w_per_m2(solar_zenith_deg(ts, latitude_deg, longitude_deg))


# --------------------------------------------------------------------------------------------
# PV


def _pv_ratios(
    ts: NDArray[np.float64],
    power_w: NDArray[np.float64],
    latitude_deg: float,
    longitude_deg: float,
    min_clear_sky_ghi_w_per_m2: float,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Daylight samples' times, clear-sky GHI [W/m^2] and ratios ``P / (GHI_cs / 1000)`` [W]."""
    ghi = clear_sky_ghi_w_per_m2(ts, latitude_deg, longitude_deg)
    day = ghi >= min_clear_sky_ghi_w_per_m2
    ghi_day = ghi[day]
    return ts[day], ghi_day, power_w[day] * 1000.0 / ghi_day


def pv_effective_capacity_w(
    history_ts: ArrayLike,
    history_power_w: ArrayLike,
    latitude_deg: float,
    longitude_deg: float,
    *,
    half_life_s: float = 3.0 * _SECONDS_PER_DAY,
    min_clear_sky_ghi_w_per_m2: float = 50.0,
) -> float:
    """A site's PV effective capacity [W] learned from its telemetry.

    ``c = argmin_c sum_i w_i |P_i - c G_i / 1000|``, the weighted median of the ratios
    ``r_i = 1000 P_i / G_i`` with weights ``w_i G_i``, where ``G_i`` is the clear-sky GHI
    (:func:`clear_sky_ghi_w_per_m2`) at sample ``i``, only daylight samples
    (``G_i >= min_clear_sky_ghi_w_per_m2``) count and ``w_i = 0.5 ** ((t_day - t_i) /
    half_life_s)`` weights recent samples more (``t_day``: the latest daylight one). ``c`` is the
    expected AC output at 1000 W/m^2 of clear-sky GHI, clouds and losses included (the role
    of ``pdc0`` in PVWatts, pvlib ``pvsystem.pvwatts_dc``); ``c / rated`` is the site's
    clear-sky index times its efficiency. Example: a history exactly ``k * GHI_cs / 1000``
    gives ``c = k``.

    Args:
        history_ts: telemetry timestamps [s since the Unix epoch].
        history_power_w: PV AC power [W], same shape; non-finite samples are ignored.
        latitude_deg: site latitude [deg], positive north.
        longitude_deg: site longitude [deg], positive east.
        half_life_s: age at which a sample's weight halves [s], > 0.
        min_clear_sky_ghi_w_per_m2: daylight threshold on clear-sky GHI [W/m^2], > 0.

    Returns:
        Effective capacity [W]; NaN if the history has no daylight sample.

    Raises:
        ForecastInputError: for mismatched arrays or a parameter out of range.
    """
    _require_positive("half_life_s", half_life_s)
    _require_positive("min_clear_sky_ghi_w_per_m2", min_clear_sky_ghi_w_per_m2)
    ts, power_w = _clean_history(history_ts, history_power_w)
    day_ts, ghi, ratio_w = _pv_ratios(
        ts, power_w, latitude_deg, longitude_deg, min_clear_sky_ghi_w_per_m2
    )
    if day_ts.size == 0:
        return float("nan")
    # Ages from the latest daylight sample: the same median as from the latest sample (a common
    # factor on all weights), and the newest weight is 1, so the weights cannot all underflow.
    recency = 0.5 ** ((day_ts[-1] - day_ts) / half_life_s)
    return _weighted_median(ratio_w, ghi * recency)


def pv_forecast_w(
    history_ts: ArrayLike,
    history_power_w: ArrayLike,
    forecast_ts: ArrayLike,
    latitude_deg: float,
    longitude_deg: float,
    *,
    rated_w: float = 0.0,
    default_clear_sky_index: float = 0.75,
    half_life_s: float = 3.0 * _SECONDS_PER_DAY,
    recent_window_s: float = _SECONDS_PER_HOUR,
    persistence_decay_s: float = _SECONDS_PER_HOUR,
    min_clear_sky_ghi_w_per_m2: float = 50.0,
) -> NDArray[np.float64]:
    """PV AC power forecast [W]: clear-sky GHI times a learned, persistence-blended index.

    ``P(t) = clip(c(t) GHI_cs(t) / 1000, 0, rated_w)`` with

    ``c(t) = c_clim + (c_now - c_clim) exp(-max(t - t_day, 0) / persistence_decay_s)``

    - ``GHI_cs``: :func:`clear_sky_ghi_w_per_m2` (NOAA zenith, Haurwitz);
    - ``c_clim``: :func:`pv_effective_capacity_w` over the whole history;
    - ``c_now``: the same estimator (weights ``GHI_cs``) over the daylight samples of the last
      ``recent_window_s`` before ``t_day``, the latest daylight sample.

    So the next hour follows the latest observed cloudiness and later hours the recency-weighted
    typical one. Without any daylight sample ``c = default_clear_sky_index * rated_w`` (0 if the
    rating is unknown). Limitation: one index for the whole day assumes the output follows the
    shape of horizontal clear-sky GHI; steeply tilted, east/west or shaded arrays are fitted in
    the L1 sense but their diurnal shape is not learned.

    Args:
        history_ts: telemetry timestamps [s since the Unix epoch], regular or not.
        history_power_w: PV AC power [W], same shape; non-finite samples are ignored.
        forecast_ts: timestamps to forecast [s since the Unix epoch].
        latitude_deg: site latitude [deg], positive north.
        longitude_deg: site longitude [deg], positive east.
        rated_w: AC rating [W], >= 0; caps the forecast when > 0 and sets the fallback.
        default_clear_sky_index: fallback ``c / rated_w`` [-] when there is no daylight history.
        half_life_s: recency half-life of the climatological index [s], > 0.
        recent_window_s: window of the latest index [s], > 0.
        persistence_decay_s: e-folding time of the blend from ``c_now`` to ``c_clim`` [s], > 0.
        min_clear_sky_ghi_w_per_m2: daylight threshold on clear-sky GHI [W/m^2], > 0.

    Returns:
        Forecast PV power [W], >= 0, shape of ``forecast_ts`` (NaN where it is not finite).

    Raises:
        ForecastInputError: for mismatched arrays or a parameter out of range.
    """
    _require_non_negative("rated_w", rated_w)
    _require_non_negative("default_clear_sky_index", default_clear_sky_index)
    _require_positive("half_life_s", half_life_s)
    _require_positive("recent_window_s", recent_window_s)
    _require_positive("persistence_decay_s", persistence_decay_s)
    _require_positive("min_clear_sky_ghi_w_per_m2", min_clear_sky_ghi_w_per_m2)
    ts, power_w = _clean_history(history_ts, history_power_w)
    target_ts, finite = _forecast_times(forecast_ts)
    ghi_cs = clear_sky_ghi_w_per_m2(target_ts, latitude_deg, longitude_deg)

    day_ts, ghi, ratio_w = _pv_ratios(
        ts, power_w, latitude_deg, longitude_deg, min_clear_sky_ghi_w_per_m2
    )
    if day_ts.size == 0:
        capacity_w = _f64(np.full(target_ts.shape, default_clear_sky_index * rated_w))
    else:
        t_day = float(day_ts[-1])
        recency = 0.5 ** ((t_day - day_ts) / half_life_s)  # see pv_effective_capacity_w
        c_clim = _weighted_median(ratio_w, ghi * recency)
        recent = day_ts > t_day - recent_window_s
        c_now = _weighted_median(ratio_w[recent], ghi[recent])
        lead_s = np.clip(target_ts - t_day, 0.0, None)
        capacity_w = c_clim + (c_now - c_clim) * np.exp(-lead_s / persistence_decay_s)
    power = np.clip(capacity_w * ghi_cs / 1000.0, 0.0, rated_w if rated_w > 0.0 else None)
    return _f64(np.where(finite, power, np.nan))


# --------------------------------------------------------------------------------------------
# weather

#: A weather index below this (a near-black sky) teaches nothing about a site's capacity.
_MIN_WEATHER_INDEX = 0.05


def clear_sky_index_from_ghi(
    ghi_w_per_m2: ArrayLike,
    clear_sky_ghi_w_per_m2: ArrayLike,
    *,
    max_index: float = 1.2,
    min_clear_sky_ghi_w_per_m2: float = 50.0,
) -> NDArray[np.float64]:
    """Clear-sky index [-] of a GHI forecast: ``k = clip(GHI / GHI_cs, 0, max_index)``.

    Example: 400 W/m^2 under a clear sky of 800 W/m^2 is ``k = 0.5``.

    Args:
        ghi_w_per_m2: forecast global horizontal irradiance [W/m^2].
        clear_sky_ghi_w_per_m2: clear-sky GHI at the same times [W/m^2]
            (:func:`clear_sky_ghi_w_per_m2`), same shape.
        max_index: upper bound of the index [-] (cloud enhancement), > 0.
        min_clear_sky_ghi_w_per_m2: below this clear-sky GHI (night, dawn) the index is NaN:
            a ratio of two small numbers says nothing.

    Returns:
        Clear-sky index [-] in ``[0, max_index]``; NaN at night or where an input is NaN.
    """
    _require_positive("max_index", max_index)
    _require_positive("min_clear_sky_ghi_w_per_m2", min_clear_sky_ghi_w_per_m2)
    ghi = _f64(ghi_w_per_m2)
    clear = _f64(clear_sky_ghi_w_per_m2)
    up = clear >= min_clear_sky_ghi_w_per_m2  # False for NaN
    with np.errstate(divide="ignore", invalid="ignore"):
        index = np.clip(ghi / np.where(up, clear, 1.0), 0.0, max_index)
    return _f64(np.where(up & np.isfinite(ghi), index, np.nan))


def step_series_at(
    start_ts: float, step_s: float, values: ArrayLike, ts: ArrayLike
) -> NDArray[np.float64]:
    """A series of step means (value ``i`` the mean over ``[start + i step, start + (i+1)
    step)``) read at times ``ts``: linear between the steps' centres, the first and last value
    held out to the series' edges, NaN outside ``[start_ts, start_ts + n step_s)``, where a
    value is NaN or ``ts`` is not finite.

    Example: ``start_ts = 0, step_s = 3600, values = [0.2, 0.6]`` gives 0.2 at 0-1800 s, 0.4 at
    3600 s, 0.6 from 5400 s to 7199 s and NaN at 7200 s.

    Args:
        start_ts: start of the first step [s since the Unix epoch].
        step_s: step length [s], > 0.
        values: one value per step (any unit), 1-D.
        ts: times to read [s since the Unix epoch].

    Returns:
        Values at ``ts``, shape of ``ts``.
    """
    _require_positive("step_s", step_s)
    v = _f64(values).ravel()
    target, finite = _forecast_times(ts)
    if v.size == 0:
        return _f64(np.full(target.shape, np.nan))
    centres = start_ts + step_s * (np.arange(v.size) + 0.5)
    known = np.isfinite(v)
    if not known.any():
        return _f64(np.full(target.shape, np.nan))
    read = np.interp(target, centres[known], v[known])
    # a NaN step stays NaN around its own centre (the nearest step decides)
    nearest = np.clip(np.floor((target - start_ts) / step_s), 0, v.size - 1).astype(np.int64)
    inside = finite & (target >= start_ts) & (target < start_ts + v.size * step_s)
    return _f64(np.where(inside & known[nearest], read, np.nan))


def _weather_capacity_rows(
    power_w: NDArray[np.float64],
    ghi: NDArray[np.float64],
    day: NDArray[np.bool_],
    recency: NDArray[np.float64],
    weather_index: NDArray[np.float64],
    min_samples: int,
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Each row's weather capacity [W] (:func:`pv_weather_capacity_w`) and whether it had
    ``min_samples`` daylight samples with a weather index."""
    covered = day & np.isfinite(weather_index) & (weather_index >= _MIN_WEATHER_INDEX)
    x = np.where(covered, ghi * np.where(covered, weather_index, 1.0), 1.0)  # GHI_cs k
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_w = np.where(covered, power_w * 1000.0 / x, 0.0)
    capacity_w = _weighted_median_rows(ratio_w, np.where(covered, x * recency, 0.0))
    enough = np.sum(covered, axis=1) >= max(min_samples, 1)
    return capacity_w, enough & np.isfinite(capacity_w)


def pv_weather_capacity_w(
    history_ts: ArrayLike,
    history_power_w: ArrayLike,
    history_weather_index: ArrayLike,
    latitude_deg: float,
    longitude_deg: float,
    *,
    half_life_s: float = 3.0 * _SECONDS_PER_DAY,
    min_clear_sky_ghi_w_per_m2: float = 50.0,
) -> float:
    """A site's PV *weather capacity* [W]: its AC output per 1000 W/m^2 of clear-sky GHI under
    a weather service's clear-sky index of 1.

    ``c_w = argmin_c sum_i w_i |P_i - c G_i k_i / 1000|``: the weighted median of ``1000 P_i /
    (G_i k_i)`` with weights ``w_i G_i k_i`` (``w_i`` the recency weight of
    :func:`pv_effective_capacity_w`, ``G_i`` the clear-sky GHI, ``k_i`` the weather index the
    service gave for sample ``i``), over daylight samples with ``k_i >= 0.05``. Example: a site
    that produced ``4 G k`` [W] whatever the weather has ``c_w = 4000``.

    Args:
        history_ts: telemetry timestamps [s since the Unix epoch].
        history_power_w: PV AC power [W], same shape.
        history_weather_index: the weather service's clear-sky index [-] at each sample (NaN:
            none), same shape.
        latitude_deg, longitude_deg: the site's position [deg].
        half_life_s: recency half-life [s], > 0.
        min_clear_sky_ghi_w_per_m2: daylight threshold [W/m^2], > 0.

    Returns:
        Weather capacity [W]; NaN without a covered daylight sample.

    Raises:
        ForecastInputError: for mismatched arrays or a parameter out of range.
    """
    _require_positive("half_life_s", half_life_s)
    _require_positive("min_clear_sky_ghi_w_per_m2", min_clear_sky_ghi_w_per_m2)
    ts = _f64(history_ts).ravel()
    power_w = _f64(history_power_w).ravel()
    index = _f64(history_weather_index).ravel()
    if not ts.shape == power_w.shape == index.shape:
        raise ForecastInputError("history arrays must have the same shape")
    valid = np.isfinite(ts) & np.isfinite(power_w)
    ghi = clear_sky_ghi_w_per_m2(np.where(valid, ts, 0.0), latitude_deg, longitude_deg)
    day = valid & (ghi >= min_clear_sky_ghi_w_per_m2)
    if not day.any():
        return float("nan")
    t_ref = float(np.max(ts[day]))
    recency = np.where(day, 0.5 ** ((t_ref - np.where(day, ts, t_ref)) / half_life_s), 0.0)
    capacity_w, _ = _weather_capacity_rows(
        power_w[None, :], ghi[None, :], day[None, :], recency[None, :], index[None, :], 1
    )
    return float(capacity_w[0])


# --------------------------------------------------------------------------------------------
# load


def _check_day_classes(day_classes: Sequence[int]) -> NDArray[np.int64]:
    classes = np.asarray(day_classes, dtype=np.int64)
    if classes.shape != (_DAYS_PER_WEEK,) or np.any(classes < 0):
        raise ForecastInputError(
            f"day_classes must be 7 non-negative ints (Monday..Sunday), got {day_classes!r}"
        )
    return classes


def _slots_per_day(slot_s: float) -> int:
    _require_positive("slot_s", slot_s)
    n_slots = round(_SECONDS_PER_DAY / slot_s)
    if n_slots < 1 or abs(n_slots * slot_s - _SECONDS_PER_DAY) > 1e-6:
        raise ForecastInputError(f"slot_s must divide a day (86400 s), got {slot_s}")
    return n_slots


def _day_and_slot(
    ts: NDArray[np.float64], offset_s: float, slot_s: float, n_slots: int
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Local day number since the epoch and time-of-day slot of each timestamp."""
    local_s = ts + offset_s
    days = np.floor(local_s / _SECONDS_PER_DAY)
    slot = np.floor((local_s - days * _SECONDS_PER_DAY) / slot_s).astype(np.int64)
    return days.astype(np.int64), np.clip(slot, 0, n_slots - 1)


def _profile(
    ts: NDArray[np.float64],
    power_w: NDArray[np.float64],
    target_ts: NDArray[np.float64],
    reference_day: int,
    offset_s: float,
    slot_s: float,
    n_slots: int,
    classes: NDArray[np.int64],
    half_life_days: float,
    empty_w: float,
) -> NDArray[np.float64]:
    """Weighted same-slot, same-day-class mean of a clean history at ``target_ts``.

    Falls back to the same slot over all day classes, then to ``empty_w``.
    """
    if ts.size == 0:
        return _f64(np.full(target_ts.shape, empty_w))
    day, slot = _day_and_slot(ts, offset_s, slot_s, n_slots)
    weight = 0.5 ** ((reference_day - day) / half_life_days)
    n_classes = int(classes.max()) + 1
    key = classes[(day + _EPOCH_WEEKDAY) % _DAYS_PER_WEEK] * n_slots + slot
    class_w = np.bincount(key, weight, minlength=n_classes * n_slots)
    class_sum = np.bincount(key, weight * power_w, minlength=n_classes * n_slots)
    slot_w = np.bincount(slot, weight, minlength=n_slots)
    slot_sum = np.bincount(slot, weight * power_w, minlength=n_slots)

    t_day, t_slot = _day_and_slot(target_ts, offset_s, slot_s, n_slots)
    t_key = classes[(t_day + _EPOCH_WEEKDAY) % _DAYS_PER_WEEK] * n_slots + t_slot
    cw = class_w[t_key]
    sw = slot_w[t_slot]
    with np.errstate(divide="ignore", invalid="ignore"):
        by_class = class_sum[t_key] / cw
        by_slot = slot_sum[t_slot] / sw
    return _f64(np.where(cw > 0.0, by_class, np.where(sw > 0.0, by_slot, empty_w)))


def load_profile_w(
    history_ts: ArrayLike,
    history_power_w: ArrayLike,
    forecast_ts: ArrayLike,
    *,
    utc_offset_h: float = 0.0,
    half_life_days: float = 7.0,
    slot_s: float = 900.0,
    day_classes: Sequence[int] = DAY_CLASSES_WEEKDAY_WEEKEND,
    default_w: float = 0.0,
) -> NDArray[np.float64]:
    """Same-time-of-day load profile [W]: a recency-weighted mean of past days of the same class.

    ``L(t) = sum_i w_i P_i / sum_i w_i`` over the history samples ``i`` in the same local
    time-of-day slot as ``t`` (``floor(((ts + 3600 utc_offset_h) mod 86400) / slot_s)``) whose
    day has the same class (``day_classes[weekday]``), with
    ``w_i = 0.5 ** ((d_last - d_i) / half_life_days)`` for local day numbers ``d`` (``d_last``:
    the day of the latest sample). Example: three weekdays at 100, 200 and 300 W with a one-day
    half-life give ``(0.25 * 100 + 0.5 * 200 + 300) / 1.75 = 242.86`` W.

    Fallbacks: no sample of the class in that slot: the same slot over all classes; no sample in
    the slot at all (history shorter than a day): the last observed value (a flat profile); no
    history: ``default_w``.

    Args:
        history_ts: telemetry timestamps [s since the Unix epoch], regular or not.
        history_power_w: load power [W], same shape; non-finite samples are ignored.
        forecast_ts: timestamps to forecast [s since the Unix epoch].
        utc_offset_h: local time minus UTC [h]; slots and days are local.
        half_life_days: age at which a day's weight halves [days], > 0.
        slot_s: length of a time-of-day slot [s], > 0, dividing 86400.
        day_classes: class of each weekday, Monday to Sunday (see ``DAY_CLASSES_*``).
        default_w: the forecast when the history is empty [W].

    Returns:
        Load profile [W], shape of ``forecast_ts`` (NaN where it is not finite).

    Raises:
        ForecastInputError: for mismatched arrays or a parameter out of range.
    """
    _require_positive("half_life_days", half_life_days)
    n_slots = _slots_per_day(slot_s)
    classes = _check_day_classes(day_classes)
    ts, power_w = _clean_history(history_ts, history_power_w)
    target_ts, finite = _forecast_times(forecast_ts)
    offset_s = utc_offset_h * _SECONDS_PER_HOUR
    if ts.size == 0:
        profile = _f64(np.full(target_ts.shape, default_w))
    else:
        reference_day = int(np.floor((ts[-1] + offset_s) / _SECONDS_PER_DAY))
        profile = _profile(
            ts,
            power_w,
            target_ts,
            reference_day,
            offset_s,
            slot_s,
            n_slots,
            classes,
            half_life_days,
            float(power_w[-1]),
        )
    return _f64(np.where(finite, profile, np.nan))


def load_forecast_w(
    history_ts: ArrayLike,
    history_power_w: ArrayLike,
    forecast_ts: ArrayLike,
    *,
    utc_offset_h: float = 0.0,
    half_life_days: float = 7.0,
    slot_s: float = 900.0,
    day_classes: Sequence[int] = DAY_CLASSES_WEEKDAY_WEEKEND,
    level_window_s: float = 3.0 * _SECONDS_PER_HOUR,
    level_decay_s: float = 6.0 * _SECONDS_PER_HOUR,
    level_ratio_bounds: tuple[float, float] = (0.5, 2.0),
    default_w: float = 0.0,
) -> NDArray[np.float64]:
    """Load forecast [W]: the same-time-of-day profile with a decaying level correction.

    ``F(t) = L(t) (1 + (r - 1) exp(-max(t - t_last, 0) / level_decay_s))`` where ``L`` is
    :func:`load_profile_w` and

    ``r = clip(sum_j P_j / sum_j L'(t_j), *level_ratio_bounds)``

    over the samples ``j`` of the last ``level_window_s`` (``t_j > t_last - level_window_s``,
    ``t_last`` the latest sample), ``L'`` being the profile built only from the history before
    that window, i.e. what the profile would have predicted for those hours. ``r = 1`` when the
    window is empty, the earlier history is empty or ``sum L' <= 0``. Example: a load steady at
    100 W that rose to 150 W for the last hours gives ``r = 1.5``: the forecast starts 50 % above
    the profile and the excess falls to ``1/e`` of that after ``level_decay_s``.

    Args:
        history_ts: telemetry timestamps [s since the Unix epoch], regular or not.
        history_power_w: load power [W], same shape; non-finite samples are ignored.
        forecast_ts: timestamps to forecast [s since the Unix epoch].
        utc_offset_h: local time minus UTC [h]; slots and days are local.
        half_life_days: age at which a day's weight halves [days], > 0.
        slot_s: length of a time-of-day slot [s], > 0, dividing 86400.
        day_classes: class of each weekday, Monday to Sunday (see ``DAY_CLASSES_*``).
        level_window_s: length of the window the level ratio is measured on [s], >= 0
            (0 disables the correction).
        level_decay_s: e-folding time of the correction over the horizon [s], > 0.
        level_ratio_bounds: ``(low, high)`` clip of the ratio [-], ``0 <= low <= 1 <= high``.
        default_w: the forecast when the history is empty [W].

    Returns:
        Forecast load [W], shape of ``forecast_ts`` (NaN where it is not finite).

    Raises:
        ForecastInputError: for mismatched arrays or a parameter out of range.
    """
    _require_positive("half_life_days", half_life_days)
    _require_non_negative("level_window_s", level_window_s)
    _require_positive("level_decay_s", level_decay_s)
    low, high = level_ratio_bounds
    if not 0.0 <= low <= 1.0 <= high:
        raise ForecastInputError(
            f"level_ratio_bounds must satisfy 0 <= low <= 1 <= high, got {level_ratio_bounds}"
        )
    n_slots = _slots_per_day(slot_s)
    classes = _check_day_classes(day_classes)
    ts, power_w = _clean_history(history_ts, history_power_w)
    target_ts, finite = _forecast_times(forecast_ts)
    offset_s = utc_offset_h * _SECONDS_PER_HOUR
    if ts.size == 0:
        return _f64(np.where(finite, default_w, np.nan))

    t_last = float(ts[-1])
    reference_day = int(np.floor((t_last + offset_s) / _SECONDS_PER_DAY))
    profile = _profile(
        ts,
        power_w,
        target_ts,
        reference_day,
        offset_s,
        slot_s,
        n_slots,
        classes,
        half_life_days,
        float(power_w[-1]),
    )

    ratio = 1.0
    in_window = ts > t_last - level_window_s
    before = ~in_window
    if level_window_s > 0.0 and np.any(before):
        earlier_ts = ts[before]
        earlier_w = power_w[before]
        expected = _profile(
            earlier_ts,
            earlier_w,
            ts[in_window],
            reference_day,
            offset_s,
            slot_s,
            n_slots,
            classes,
            half_life_days,
            float(earlier_w[-1]),
        )
        expected_sum = float(np.sum(expected))
        if expected_sum > 0.0:
            ratio = float(np.clip(np.sum(power_w[in_window]) / expected_sum, low, high))

    lead_s = np.clip(target_ts - t_last, 0.0, None)
    forecast = profile * (1.0 + (ratio - 1.0) * np.exp(-lead_s / level_decay_s))
    return _f64(np.where(finite, forecast, np.nan))


# --------------------------------------------------------------------------------------------
# community price


def community_net_load_w(site_load_w: ArrayLike, site_pv_w: ArrayLike) -> NDArray[np.float64]:
    """Community net load [W]: ``sum over sites of load - sum over sites of PV``.

    Positive when the community imports through its feeder (docs/architecture.md section 4).

    Args:
        site_load_w: load per site and time [W], shape ``(n_sites, n_times)`` or ``(n_times,)``.
        site_pv_w: PV per site and time [W], shape ``(n_pv_sites, n_times)`` or ``(n_times,)``.

    Returns:
        Net load [W], shape ``(n_times,)``.
    """
    load = np.atleast_2d(_f64(site_load_w))
    pv = np.atleast_2d(_f64(site_pv_w))
    return _f64(np.sum(load, axis=0) - np.sum(pv, axis=0))


def price_forecast_per_kwh(
    net_load_w: ArrayLike,
    retail_price_per_kwh: ArrayLike,
    feed_in_price_per_kwh: ArrayLike,
    *,
    balance_band_w: ArrayLike = 0.0,
) -> NDArray[np.float64]:
    """Heuristic local clearing price [currency/kWh] from the community's forecast net load.

    Not a market model: it reads :mod:`coordinator.market`'s price rule (the price is retail
    whenever the utility supplies energy and feed-in whenever it takes energy; near balance the
    sites' bids set it in between) and replaces the bids by a blend:

    ``price = (1 - s) feed_in + s retail``, ``s = smoothstep((net + band) / (2 band))`` with
    ``smoothstep(x) = 3x^2 - 2x^3`` on ``x`` clipped to [0, 1]

    so the price is feed-in when ``net <= -band`` (clear export), retail when ``net >= band``
    (clear import) and the tariffs' midpoint at balance. ``band = 0`` is a step (midpoint at
    exactly 0). A band of about the net-load forecast's error gives a smooth expected-price
    curve; ``band = 0`` on a median forecast minimises the expected absolute error. The result is
    clipped to ``[feed_in, retail]``, so it never leaves the tariffs. Example: retail 0.30,
    feed-in 0.08, band 10 kW, net +5 kW: ``s = smoothstep(0.75) = 0.84375``, price 0.265625.

    Args:
        net_load_w: community net load forecast [W], positive importing.
        retail_price_per_kwh: time-of-use retail tariff [currency/kWh], broadcast with net load.
        feed_in_price_per_kwh: time-of-use feed-in tariff [currency/kWh], <= retail.
        balance_band_w: half-width of the blend around balance [W], >= 0.

    Returns:
        Price forecast [currency/kWh] in ``[feed_in, retail]``, the broadcast shape (NaN where
        the net load is NaN).

    Raises:
        ForecastInputError: if feed-in exceeds retail or the band is negative.
    """
    net, retail, feed_in, band = np.broadcast_arrays(
        _f64(net_load_w),
        _f64(retail_price_per_kwh),
        _f64(feed_in_price_per_kwh),
        _f64(balance_band_w),
    )
    if np.any(feed_in > retail):
        raise ForecastInputError("feed_in_price_per_kwh must not exceed retail_price_per_kwh")
    if np.any(~(band >= 0.0)):
        raise ForecastInputError("balance_band_w must be >= 0")
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        x = np.clip((net + band) / (2.0 * band), 0.0, 1.0)
    smooth = x * x * (3.0 - 2.0 * x)
    step = np.where(net > 0.0, 1.0, np.where(net < 0.0, 0.0, 0.5))
    s = np.where(band > 0.0, smooth, step)
    price = np.clip((1.0 - s) * feed_in + s * retail, feed_in, retail)
    return _f64(np.where(np.isnan(net), np.nan, price))


# --------------------------------------------------------------------------------------------
# scoring and baselines


def mae(forecast: ArrayLike, actual: ArrayLike) -> float:
    """Mean absolute error ``mean(|forecast - actual|)`` over the pairs where both are finite.

    Args:
        forecast: forecast values (any unit).
        actual: observed values, same unit and shape.

    Returns:
        The MAE in the values' unit; NaN when no pair is finite.

    Raises:
        ForecastInputError: if the shapes differ.
    """
    f = _f64(forecast)
    a = _f64(actual)
    if f.shape != a.shape:
        raise ForecastInputError(f"forecast and actual shapes differ: {f.shape} vs {a.shape}")
    both = np.isfinite(f) & np.isfinite(a)
    if not np.any(both):
        return float("nan")
    return float(np.mean(np.abs(f[both] - a[both])))


def persistence_forecast(
    history_ts: ArrayLike, history_values: ArrayLike, forecast_ts: ArrayLike
) -> NDArray[np.float64]:
    """Persistence baseline: the latest observed value held for every forecast time.

    ``F(t) = v(t_last)``. Non-finite samples are ignored.

    Args:
        history_ts: sample timestamps [s since the Unix epoch].
        history_values: sample values (any unit, e.g. W), same shape.
        forecast_ts: timestamps to forecast [s since the Unix epoch].

    Returns:
        Forecast in the values' unit, shape of ``forecast_ts``; NaN when the history is empty or
        the forecast timestamp is not finite.

    Raises:
        ForecastInputError: for mismatched history arrays.
    """
    ts, values = _clean_history(history_ts, history_values)
    finite = np.isfinite(_f64(forecast_ts))
    last = float(values[-1]) if ts.size else float("nan")
    return _f64(np.where(finite, last, np.nan))


def seasonal_naive_forecast(
    history_ts: ArrayLike,
    history_values: ArrayLike,
    forecast_ts: ArrayLike,
    *,
    period_s: float = _SECONDS_PER_DAY,
) -> NDArray[np.float64]:
    """Seasonal-naive baseline: the value one period (by default a day) earlier.

    ``F(t) = v(t - k period)`` with the smallest whole ``k >= 1`` that reaches back into the
    history (``t - k period <= t_last``), so horizons beyond one period repeat the last period;
    for PV and load that is the same time yesterday. ``v`` is interpolated linearly between the
    neighbouring samples (the sample itself on a regular grid). Where ``t - k period`` falls
    before the first sample (history shorter than a period) the last value is held.

    Args:
        history_ts: sample timestamps [s since the Unix epoch], regular or not.
        history_values: sample values (any unit, e.g. W), same shape; non-finite ignored.
        forecast_ts: timestamps to forecast [s since the Unix epoch].
        period_s: season length [s], > 0.

    Returns:
        Forecast in the values' unit, shape of ``forecast_ts``; NaN when the history is empty or
        the forecast timestamp is not finite.

    Raises:
        ForecastInputError: for mismatched history arrays or a non-positive period.
    """
    _require_positive("period_s", period_s)
    ts, values = _clean_history(history_ts, history_values)
    target_ts, finite = _forecast_times(forecast_ts)
    if ts.size == 0:
        return _f64(np.full(target_ts.shape, np.nan))
    t_first = float(ts[0])
    t_last = float(ts[-1])
    k = np.maximum(np.ceil((target_ts - t_last) / period_s), 1.0)
    lookup_ts = target_ts - k * period_s
    seasonal = np.interp(lookup_ts, ts, values)
    forecast = np.where(lookup_ts >= t_first, seasonal, float(values[-1]))
    return _f64(np.where(finite, forecast, np.nan))


# --------------------------------------------------------------------------------------------
# many sites at once
#
# The coordinator forecasts every site each interval. Looping the per-site functions costs
# Python overhead per site and keeps the event loop's thread busy; these take the histories of
# many sites as 2-D arrays, one row a site, padded with NaN (rows of different lengths), and
# give each row exactly what the per-site function gives for that row's history (up to
# floating-point summation order). Their numpy work runs on whole arrays, which releases the
# GIL, so a worker thread computing them leaves the event loop free.


def _site_rows(
    history_ts: ArrayLike, history_values: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
    """2-D histories ``(n_sites, n_samples)``, and the mask of finite samples.

    Raises:
        ForecastInputError: if the arrays are not 2-D or do not have the same shape.
    """
    ts = _f64(history_ts)
    values = _f64(history_values)
    if ts.ndim != 2 or ts.shape != values.shape:
        raise ForecastInputError(
            "site histories must be 2-D arrays (n_sites, n_samples) of the same shape, got "
            f"{ts.shape} and {values.shape}"
        )
    return ts, values, np.isfinite(ts) & np.isfinite(values)


def _weighted_median_rows(
    values: NDArray[np.float64], weights: NDArray[np.float64]
) -> NDArray[np.float64]:
    """:func:`_weighted_median` of each row; entries with weight <= 0 do not count."""
    positive = weights > 0.0
    order = np.argsort(np.where(positive, values, np.inf), axis=1, kind="stable")
    sorted_values = np.take_along_axis(values, order, axis=1)
    cumulative = np.cumsum(np.take_along_axis(np.where(positive, weights, 0.0), order, 1), 1)
    total = cumulative[:, -1] if cumulative.shape[1] else np.zeros(values.shape[0])
    if values.shape[1] == 0:
        return _f64(np.full(values.shape[0], np.nan))
    index = np.argmax(cumulative >= 0.5 * total[:, None], axis=1)
    median = sorted_values[np.arange(values.shape[0]), index]
    return _f64(np.where(total > 0.0, median, np.nan))


def _newest(
    ts: NDArray[np.float64], values: NDArray[np.float64], use: NDArray[np.bool_]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Each row's newest used timestamp and its value (the last one among equal timestamps);
    (-inf, NaN) for a row with none."""
    newest_ts = np.max(np.where(use, ts, -np.inf), axis=1, initial=-np.inf)
    is_newest = use & (ts == newest_ts[:, None])
    last = ts.shape[1] - 1 - np.argmax(is_newest[:, ::-1], axis=1)
    value = values[np.arange(ts.shape[0]), last] if ts.shape[1] else np.full(ts.shape[0], 0.0)
    return _f64(newest_ts), _f64(np.where(use.any(axis=1), value, np.nan))


def pv_forecast_sites_w(
    history_ts: ArrayLike,
    history_power_w: ArrayLike,
    forecast_ts: ArrayLike,
    latitude_deg: float,
    longitude_deg: float,
    *,
    rated_w: float = 0.0,
    default_clear_sky_index: float = 0.75,
    half_life_s: float = 3.0 * _SECONDS_PER_DAY,
    recent_window_s: float = _SECONDS_PER_HOUR,
    persistence_decay_s: float = _SECONDS_PER_HOUR,
    min_clear_sky_ghi_w_per_m2: float = 50.0,
    history_clear_sky_ghi_w_per_m2: ArrayLike | None = None,
    history_weather_index: ArrayLike | None = None,
    forecast_weather_index: ArrayLike | None = None,
    min_weather_samples: int = 16,
) -> NDArray[np.float64]:
    """:func:`pv_forecast_w` for many sites at once [W], optionally with a weather forecast.

    With a weather service's clear-sky index (see the module docstring), where
    ``forecast_weather_index`` is finite and the site has at least ``min_weather_samples``
    daylight history samples with a finite ``history_weather_index``, the climatological
    ``c_clim`` of :func:`pv_forecast_w` becomes ``c_w k(t)`` (:func:`pv_weather_capacity_w`):

    ``c(t) = b(t) + (c_now - b(t)) exp(-max(t - t_day, 0) / persistence_decay_s)``,
    ``b(t) = c_w k(t)`` where covered, else ``c_clim``.

    Args:
        history_ts: timestamps [s since the Unix epoch], shape ``(n_sites, n_samples)``; pad
            shorter histories with NaN.
        history_power_w: PV AC power [W], same shape; non-finite samples are ignored.
        forecast_ts: timestamps to forecast [s since the Unix epoch], shape ``(n_times,)``.
        latitude_deg, longitude_deg, rated_w, default_clear_sky_index, half_life_s,
        recent_window_s, persistence_decay_s, min_clear_sky_ghi_w_per_m2: as
            :func:`pv_forecast_w`, the same for every site.
        history_clear_sky_ghi_w_per_m2: :func:`clear_sky_ghi_w_per_m2` at each history sample
            [W/m^2], same shape, when the caller already has it (it never changes for a
            sample, and computing it is most of the cost); None computes it.
        history_weather_index: the weather service's clear-sky index [-] at each history
            sample (NaN: none), same shape as the histories; None: no weather.
        forecast_weather_index: the weather forecast's clear-sky index [-] at each forecast
            time, ``(n_sites, n_times)`` (NaN: not covered, or stale); None: no weather.
        min_weather_samples: covered daylight history samples a site needs before its weather
            capacity is used, >= 1.

    Returns:
        Forecast PV power [W], ``(n_sites, n_times)``; row ``i`` is ``pv_forecast_w`` of row
        ``i``'s history.

    Raises:
        ForecastInputError: for malformed arrays or a parameter out of range.
    """
    _require_non_negative("rated_w", rated_w)
    _require_non_negative("default_clear_sky_index", default_clear_sky_index)
    _require_positive("half_life_s", half_life_s)
    _require_positive("recent_window_s", recent_window_s)
    _require_positive("persistence_decay_s", persistence_decay_s)
    _require_positive("min_clear_sky_ghi_w_per_m2", min_clear_sky_ghi_w_per_m2)
    ts, power_w, valid = _site_rows(history_ts, history_power_w)
    target_ts, finite = _forecast_times(forecast_ts)
    ghi_cs = clear_sky_ghi_w_per_m2(target_ts, latitude_deg, longitude_deg)

    if history_clear_sky_ghi_w_per_m2 is None:
        ghi = clear_sky_ghi_w_per_m2(np.where(valid, ts, 0.0), latitude_deg, longitude_deg)
    else:
        ghi = _f64(history_clear_sky_ghi_w_per_m2)
        if ghi.shape != ts.shape:
            raise ForecastInputError(
                f"history_clear_sky_ghi_w_per_m2 must have the histories' shape {ts.shape}, "
                f"got {ghi.shape}"
            )
        valid = valid & np.isfinite(ghi)
    day = valid & (ghi >= min_clear_sky_ghi_w_per_m2)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_w = np.where(day, power_w * 1000.0 / ghi, 0.0)
    t_day = np.max(np.where(day, ts, -np.inf), axis=1, initial=-np.inf)
    has_day: NDArray[np.bool_] = np.any(day, axis=1)
    t_ref = np.where(has_day, t_day, 0.0)[:, None]
    with np.errstate(over="ignore", invalid="ignore"):
        recency = np.where(day, 0.5 ** ((t_ref - ts) / half_life_s), 0.0)
    c_clim = _weighted_median_rows(ratio_w, np.where(day, ghi * recency, 0.0))
    recent = day & (ts > t_ref - recent_window_s)
    c_now = _weighted_median_rows(ratio_w, np.where(recent, ghi, 0.0))
    lead_s = np.clip(target_ts[None, :] - t_ref, 0.0, None)
    base_w = _f64(np.broadcast_to(c_clim[:, None], (ts.shape[0], target_ts.shape[0])))
    if history_weather_index is not None and forecast_weather_index is not None:
        base_w = _weather_base_w(
            base_w,
            power_w,
            ghi,
            day,
            recency,
            _f64(history_weather_index),
            _f64(forecast_weather_index),
            min_weather_samples,
        )
    learned_w = base_w + (c_now[:, None] - base_w) * np.exp(-lead_s / persistence_decay_s)
    capacity_w = np.where(has_day[:, None], learned_w, default_clear_sky_index * rated_w)
    power = np.clip(capacity_w * ghi_cs / 1000.0, 0.0, rated_w if rated_w > 0.0 else None)
    return _f64(np.where(finite, power, np.nan))


def _weather_base_w(
    clim_w: NDArray[np.float64],
    power_w: NDArray[np.float64],
    ghi: NDArray[np.float64],
    day: NDArray[np.bool_],
    recency: NDArray[np.float64],
    history_index: NDArray[np.float64],
    forecast_index: NDArray[np.float64],
    min_samples: int,
) -> NDArray[np.float64]:
    """``c_w k(t)`` where the weather covers a row's forecast time, else ``clim_w`` [W]."""
    if history_index.shape != power_w.shape:
        raise ForecastInputError(
            f"history_weather_index must have the histories' shape {power_w.shape}, got "
            f"{history_index.shape}"
        )
    if forecast_index.shape != clim_w.shape:
        raise ForecastInputError(
            f"forecast_weather_index must be (n_sites, n_times) = {clim_w.shape}, got "
            f"{forecast_index.shape}"
        )
    if min_samples < 1:
        raise ForecastInputError(f"min_weather_samples must be >= 1, got {min_samples}")
    capacity_w, learned = _weather_capacity_rows(
        power_w, ghi, day, recency, history_index, min_samples
    )
    use = learned[:, None] & np.isfinite(forecast_index)
    weather_w = capacity_w[:, None] * np.where(use, forecast_index, 0.0)
    return _f64(np.where(use, weather_w, clim_w))


def _profile_rows(
    ts: NDArray[np.float64],
    power_w: NDArray[np.float64],
    use: NDArray[np.bool_],
    target_ts: NDArray[np.float64],
    reference_day: NDArray[np.int64],
    offset_s: float,
    slot_s: float,
    n_slots: int,
    classes: NDArray[np.int64],
    half_life_days: float,
    empty_w: NDArray[np.float64],
) -> NDArray[np.float64]:
    """:func:`_profile` of each row's used samples at that row's ``target_ts`` (2-D)."""
    n_sites = ts.shape[0]
    n_keys = (int(classes.max()) + 1) * n_slots
    day, slot = _day_and_slot(np.where(use, ts, 0.0), offset_s, slot_s, n_slots)
    weight = 0.5 ** ((reference_day[:, None] - day) / half_life_days)
    key = classes[(day + _EPOCH_WEEKDAY) % _DAYS_PER_WEEK] * n_slots + slot
    row = np.arange(n_sites)[:, None]
    w, wp = weight[use], (weight * np.where(use, power_w, 0.0))[use]
    class_keys = (row * n_keys + key)[use]
    slot_keys = (row * n_slots + slot)[use]
    class_w = np.bincount(class_keys, w, minlength=n_sites * n_keys).reshape(n_sites, n_keys)
    class_sum = np.bincount(class_keys, wp, minlength=n_sites * n_keys).reshape(n_sites, n_keys)
    slot_w = np.bincount(slot_keys, w, minlength=n_sites * n_slots).reshape(n_sites, n_slots)
    slot_sum = np.bincount(slot_keys, wp, minlength=n_sites * n_slots).reshape(n_sites, n_slots)

    t_day, t_slot = _day_and_slot(target_ts, offset_s, slot_s, n_slots)
    t_key = classes[(t_day + _EPOCH_WEEKDAY) % _DAYS_PER_WEEK] * n_slots + t_slot
    t_key = np.broadcast_to(t_key, (n_sites, t_key.shape[-1]))
    t_slot = np.broadcast_to(t_slot, t_key.shape)
    cw = np.take_along_axis(class_w, t_key, axis=1)
    sw = np.take_along_axis(slot_w, t_slot, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        by_class = np.take_along_axis(class_sum, t_key, axis=1) / cw
        by_slot = np.take_along_axis(slot_sum, t_slot, axis=1) / sw
    return _f64(np.where(cw > 0.0, by_class, np.where(sw > 0.0, by_slot, empty_w[:, None])))


def load_forecast_sites_w(
    history_ts: ArrayLike,
    history_power_w: ArrayLike,
    forecast_ts: ArrayLike,
    *,
    utc_offset_h: float = 0.0,
    half_life_days: float = 7.0,
    slot_s: float = 900.0,
    day_classes: Sequence[int] = DAY_CLASSES_WEEKDAY_WEEKEND,
    level_window_s: float = 3.0 * _SECONDS_PER_HOUR,
    level_decay_s: float = 6.0 * _SECONDS_PER_HOUR,
    level_ratio_bounds: tuple[float, float] = (0.5, 2.0),
    default_w: float = 0.0,
) -> NDArray[np.float64]:
    """:func:`load_forecast_w` for many sites at once [W].

    Args:
        history_ts: timestamps [s since the Unix epoch], shape ``(n_sites, n_samples)``; pad
            shorter histories with NaN.
        history_power_w: load power [W], same shape; non-finite samples are ignored.
        forecast_ts: timestamps to forecast [s since the Unix epoch], shape ``(n_times,)``.
        utc_offset_h, half_life_days, slot_s, day_classes, level_window_s, level_decay_s,
        level_ratio_bounds, default_w: as :func:`load_forecast_w`, the same for every site.

    Returns:
        Forecast load [W], ``(n_sites, n_times)``; row ``i`` is ``load_forecast_w`` of row
        ``i``'s history.

    Raises:
        ForecastInputError: for malformed arrays or a parameter out of range.
    """
    _require_positive("half_life_days", half_life_days)
    _require_non_negative("level_window_s", level_window_s)
    _require_positive("level_decay_s", level_decay_s)
    low, high = level_ratio_bounds
    if not 0.0 <= low <= 1.0 <= high:
        raise ForecastInputError(
            f"level_ratio_bounds must satisfy 0 <= low <= 1 <= high, got {level_ratio_bounds}"
        )
    n_slots = _slots_per_day(slot_s)
    classes = _check_day_classes(day_classes)
    ts, power_w, valid = _site_rows(history_ts, history_power_w)
    target_ts, finite = _forecast_times(forecast_ts)
    offset_s = utc_offset_h * _SECONDS_PER_HOUR
    has: NDArray[np.bool_] = np.any(valid, axis=1)
    t_last, last_w = _newest(ts, power_w, valid)
    t_ref = np.where(has, t_last, 0.0)
    reference_day = np.floor((t_ref + offset_s) / _SECONDS_PER_DAY).astype(np.int64)
    profile = _profile_rows(
        ts,
        power_w,
        valid,
        target_ts[None, :],
        reference_day,
        offset_s,
        slot_s,
        n_slots,
        classes,
        half_life_days,
        last_w,
    )

    in_window = valid & (ts > t_ref[:, None] - level_window_s)
    before = valid & ~in_window
    ratio = np.ones(ts.shape[0])
    if level_window_s > 0.0 and np.any(before):
        _, earlier_last_w = _newest(ts, power_w, before)
        expected = _profile_rows(
            ts,
            power_w,
            before,
            np.where(in_window, ts, 0.0),
            reference_day,
            offset_s,
            slot_s,
            n_slots,
            classes,
            half_life_days,
            earlier_last_w,
        )
        expected_sum = np.sum(np.where(in_window, expected, 0.0), axis=1)
        observed_sum = np.sum(np.where(in_window, power_w, 0.0), axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            measured = np.clip(observed_sum / expected_sum, low, high)
        ratio = np.where(before.any(axis=1) & (expected_sum > 0.0), measured, 1.0)

    lead_s = np.clip(target_ts[None, :] - t_ref[:, None], 0.0, None)
    forecast = profile * (1.0 + (ratio - 1.0)[:, None] * np.exp(-lead_s / level_decay_s))
    forecast = np.where(has[:, None], forecast, default_w)
    return _f64(np.where(finite, forecast, np.nan))
