"""Physics of the simulated devices: sun, clouds, PV, battery and loads.

Every function here is pure: no I/O, no clock, no logging, no hidden state. Inputs are
float64 numpy arrays (scalars and sequences are accepted and broadcast); outputs are float64
arrays with the broadcast shape of the inputs (0-d arrays for scalar inputs).

Units are in the names (docs/architecture.md section 4):

- ``ts``: UTC timestamps, float seconds since the Unix epoch.
- ``*_deg``: degrees; latitude positive north, longitude positive east.
- ``*_w``, ``*_w_per_m2``, ``*_wh``, ``*_pct``, ``*_c``, ``*_s``: watts, watts per square
  metre, watt-hours, percent, degrees Celsius, seconds.

Signs: PV power and load power are positive (>= 0). Battery power is positive when
discharging (energy leaving the battery at its AC terminals) and negative when charging.

Randomness (clouds, load noise) is a pure function of ``(ts, seed)``: values at knots are drawn
from a counter-based hash (splitmix64 on the seed, a stream constant and the knot index, in
wrapping uint64 arithmetic) and cosine-interpolated between knots, so any instant can be
evaluated without state and the same seed always gives the same values.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "battery_step",
    "clear_sky_ghi_w_per_m2",
    "cloud_index",
    "cloud_index_slow",
    "haurwitz_ghi_w_per_m2",
    "load_power_w",
    "pv_ac_power_w",
    "solar_zenith_deg",
]

_SECONDS_PER_DAY = 86_400.0
_SECONDS_PER_HOUR = 3_600.0
_HOURS_PER_DAY = 24.0

CLOUD_INDEX_MIN = 0.05
CLOUD_INDEX_MAX = 1.05

# Ratio of the slow to the fast cloud octave's knot spacing, and their weights (a^2 + b^2 = 1).
_CLOUD_SLOW_FACTOR = 6.0
_CLOUD_SLOW_WEIGHT = 0.8
_CLOUD_FAST_WEIGHT = 0.6

# Load noise: knot spacing and relative standard deviation (time-averaged).
_LOAD_NOISE_KNOT_S = 300.0
_LOAD_NOISE_STD = 0.03

# Stream constants keep the hash sequences of different uses independent for one seed.
_STREAM_CLOUD_FAST = 0x243F6A8885A308D3
_STREAM_CLOUD_SLOW = 0x13198A2E03707344
_STREAM_LOAD = {
    "household": 0xA4093822299F31D0,
    "factory": 0x082EFA98EC4E6C89,
    "office": 0x452821E638D01377,
}

_MASK64 = (1 << 64) - 1

LoadProfile = Literal["household", "factory", "office"]


# --------------------------------------------------------------------------------------------
# helpers


def _f64(x: ArrayLike) -> NDArray[np.float64]:
    """Return ``x`` as a float64 ndarray (0-d for scalars, never a numpy scalar)."""
    return np.asarray(x, dtype=np.float64)


def _finite_or_zero(ts: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Replace non-finite timestamps by 0 so integer casts stay defined; return the mask."""
    finite = np.isfinite(ts)
    return np.where(finite, ts, 0.0), finite


def _splitmix64(x: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """splitmix64 finaliser (Steele, Lea and Flood 2014) in wrapping uint64 arithmetic.

    ``x`` must be an array of at least one dimension so numpy uses its wrapping array loops.
    """
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hash_uniform(seed: int, stream: int, index: NDArray[np.int64]) -> NDArray[np.float64]:
    """Uniform values in [0, 1) from a counter-based hash of (seed, stream, index)."""
    key = np.array([(seed ^ stream) & _MASK64], dtype=np.uint64)
    key = _splitmix64(key)
    counter = np.atleast_1d(index).astype(np.uint64)  # negative indices wrap, still unique
    h = _splitmix64(counter + key)
    h = _splitmix64(h ^ key)
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / 9_007_199_254_740_992.0)  # 2**-53
    return u.reshape(np.shape(index))


def _smooth_noise(
    ts: NDArray[np.float64], seed: int, stream: int, knot_s: float
) -> NDArray[np.float64]:
    """Cosine-interpolated hash noise in [0, 1): mean 1/2, time-averaged std exactly 1/4.

    At a knot the value is uniform (variance 1/12); between knots ``(1 - w) a + w b`` with
    ``w = (1 - cos(pi x)) / 2`` has variance ``((1 - w)^2 + w^2) / 12``, whose average over x in
    [0, 1) is ``(3/4) / 12 = 1/16``.
    """
    safe_ts, finite = _finite_or_zero(ts)
    pos = safe_ts / knot_s
    k = np.floor(pos)
    frac = pos - k
    k_int = k.astype(np.int64)
    a = _hash_uniform(seed, stream, k_int)
    b = _hash_uniform(seed, stream, k_int + 1)
    w = 0.5 * (1.0 - np.cos(np.pi * frac))
    return _f64(np.where(finite, a + (b - a) * w, np.nan))


def _smoothstep(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Cubic smoothstep ``3x^2 - 2x^3`` of ``x`` clipped to [0, 1]."""
    c = np.clip(x, 0.0, 1.0)
    return _f64(c * c * (3.0 - 2.0 * c))


def _window(
    hour: NDArray[np.float64], start_h: float, end_h: float, ramp_h: float
) -> NDArray[np.float64]:
    """1 between ``start_h`` and ``end_h``, smooth ramps of ``ramp_h`` outside them, else 0."""
    up = _smoothstep((hour - (start_h - ramp_h)) / ramp_h)
    down = _smoothstep(((end_h + ramp_h) - hour) / ramp_h)
    return _f64(up * down)


def _bump(hour: NDArray[np.float64], centre_h: float, width_h: float) -> NDArray[np.float64]:
    """Gaussian bump on the 24 h circle, 1 at ``centre_h``, standard deviation ``width_h``."""
    d = (hour - centre_h + 12.0) % _HOURS_PER_DAY - 12.0
    return _f64(np.exp(-0.5 * (d / width_h) ** 2))


# --------------------------------------------------------------------------------------------
# sun


def solar_zenith_deg(
    ts: ArrayLike, latitude_deg: float, longitude_deg: float
) -> NDArray[np.float64]:
    """Solar zenith angle in degrees at UTC epoch seconds ``ts``.

    NOAA "General Solar Position Calculations" (Spencer 1971 Fourier series):

    - fractional year ``g = 2 pi / N * (doy - 1 + (hour_utc - 12) / 24)`` [rad], N = days in
      the year (365 or 366), doy = day of year (1 on 1 January);
    - declination ``d = 0.006918 - 0.399912 cos g + 0.070257 sin g - 0.006758 cos 2g
      + 0.000907 sin 2g - 0.002697 cos 3g + 0.00148 sin 3g`` [rad];
    - equation of time ``E = 229.18 (0.000075 + 0.001868 cos g - 0.032077 sin g
      - 0.014615 cos 2g - 0.040849 sin 2g)`` [min];
    - true solar time ``tst = 60 hour_utc + E + 4 longitude_deg`` [min], hour angle
      ``h = tst / 4 - 180`` [deg];
    - ``cos z = sin(lat) sin(d) + cos(lat) cos(d) cos(h)``.

    Accuracy: geometric (no atmospheric refraction). Against the Astronomical Almanac's
    low-precision solar position (0.01 degree) the zenith error is about 0.3 degree RMS and at
    most 0.65 degree over 2000-2050 (0.8 degree by 2100), dominated by the declination: the
    calendar-based fractional year puts the equinoxes up to about 1.3 days late. Enough for
    irradiance simulation, not for sun tracking. Values above 90 degrees mean the sun is below the
    horizon. Non-finite ``ts`` give NaN.

    Args:
        ts: UTC timestamps [s since the Unix epoch].
        latitude_deg: site latitude [deg], positive north.
        longitude_deg: site longitude [deg], positive east.

    Returns:
        Zenith angle [deg] in [0, 180], shape of ``ts`` broadcast with the coordinates.
    """
    ts_arr = _f64(ts)
    safe_ts, finite = _finite_or_zero(ts_arr)
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
        - 0.006758 * np.cos(2 * g)
        + 0.000907 * np.sin(2 * g)
        - 0.002697 * np.cos(3 * g)
        + 0.00148 * np.sin(3 * g)
    )
    eot_min = 229.18 * (
        0.000075
        + 0.001868 * np.cos(g)
        - 0.032077 * np.sin(g)
        - 0.014615 * np.cos(2 * g)
        - 0.040849 * np.sin(2 * g)
    )
    true_solar_time_min = 60.0 * hour_utc + eot_min + 4.0 * np.asarray(longitude_deg)
    hour_angle_rad = np.radians(true_solar_time_min / 4.0 - 180.0)
    lat_rad = np.radians(np.asarray(latitude_deg, dtype=np.float64))
    cos_z = np.sin(lat_rad) * np.sin(decl_rad) + np.cos(lat_rad) * np.cos(decl_rad) * np.cos(
        hour_angle_rad
    )
    zenith = np.degrees(np.arccos(np.clip(cos_z, -1.0, 1.0)))
    return _f64(np.where(finite, zenith, np.nan))


def haurwitz_ghi_w_per_m2(zenith_deg: ArrayLike) -> NDArray[np.float64]:
    """Haurwitz clear-sky global horizontal irradiance [W/m^2] from the zenith angle.

    ``GHI = 1098 cos(z) exp(-0.057 / cos(z))`` for ``cos(z) > 0``, else 0
    (Haurwitz 1945; as in pvlib ``clearsky.haurwitz``). At z = 0: 1037.2 W/m^2.

    Args:
        zenith_deg: solar zenith angle [deg].

    Returns:
        Clear-sky GHI [W/m^2], >= 0.
    """
    cos_z = np.cos(np.radians(_f64(zenith_deg)))
    day = cos_z > 0.0
    safe_cos = np.where(day, cos_z, 1.0)
    ghi = 1098.0 * safe_cos * np.exp(-0.057 / safe_cos)
    return _f64(np.where(day, ghi, np.where(np.isnan(cos_z), np.nan, 0.0)))


def clear_sky_ghi_w_per_m2(
    ts: ArrayLike, latitude_deg: float, longitude_deg: float
) -> NDArray[np.float64]:
    """Clear-sky global horizontal irradiance [W/m^2] at UTC epoch seconds ``ts``.

    Haurwitz model on the NOAA zenith: ``GHI = 1098 cos(z) exp(-0.057 / cos(z))`` for
    ``cos(z) > 0``, else 0. See :func:`solar_zenith_deg` and :func:`haurwitz_ghi_w_per_m2`.

    Args:
        ts: UTC timestamps [s since the Unix epoch].
        latitude_deg: site latitude [deg], positive north.
        longitude_deg: site longitude [deg], positive east.

    Returns:
        Clear-sky GHI [W/m^2], 0 at night.
    """
    return haurwitz_ghi_w_per_m2(solar_zenith_deg(ts, latitude_deg, longitude_deg))


# --------------------------------------------------------------------------------------------
# clouds


def cloud_index(
    ts: ArrayLike,
    seed: int,
    mean_clear_sky_index: float = 0.8,
    variability: float = 0.25,
    knot_s: float = 600.0,
) -> NDArray[np.float64]:
    """Seeded clear-sky index (GHI / clear-sky GHI) in [0.05, 1.05], a pure function of time.

    Two octaves of cosine-interpolated hash noise (see the module docstring), a slow one with
    knots every ``6 * knot_s`` (passing weather) and a fast one every ``knot_s`` (single
    clouds), each ``n_i`` uniform in [0, 1) at its knots with time-averaged std 1/4:

    ``k = clip(m + v * 4 * (0.8 (n_slow - 1/2) + 0.6 (n_fast - 1/2)), 0.05, 1.05)``

    Before clipping the process has mean ``m`` and time-averaged standard deviation ``v``
    (0.8^2 + 0.6^2 = 1) and stays within ``m +- 2.8 v``; clipping pulls the mean slightly
    towards the middle when ``m +- 2 v`` reaches a bound (defaults: mean about 0.78).

    Args:
        ts: UTC timestamps [s since the Unix epoch].
        seed: any Python int; the same seed always gives the same series.
        mean_clear_sky_index: target mean ``m`` [-], in [0.05, 1.05].
        variability: target standard deviation ``v`` [-], >= 0.
        knot_s: spacing of the fast knots [s], > 0; sets how fast clouds change.

    Returns:
        Clear-sky index [-] in [0.05, 1.05] (NaN for non-finite ``ts``).

    Raises:
        ValueError: if a parameter is out of range.
    """
    if not CLOUD_INDEX_MIN <= mean_clear_sky_index <= CLOUD_INDEX_MAX:
        raise ValueError(
            f"mean_clear_sky_index must be in [{CLOUD_INDEX_MIN}, {CLOUD_INDEX_MAX}], "
            f"got {mean_clear_sky_index}"
        )
    if not variability >= 0.0:
        raise ValueError(f"variability must be >= 0, got {variability}")
    if not knot_s > 0.0:
        raise ValueError(f"knot_s must be > 0, got {knot_s}")
    ts_arr = _f64(ts)
    slow = _smooth_noise(ts_arr, seed, _STREAM_CLOUD_SLOW, knot_s * _CLOUD_SLOW_FACTOR)
    fast = _smooth_noise(ts_arr, seed, _STREAM_CLOUD_FAST, knot_s)
    unit = 4.0 * (_CLOUD_SLOW_WEIGHT * (slow - 0.5) + _CLOUD_FAST_WEIGHT * (fast - 0.5))
    k = mean_clear_sky_index + variability * unit
    return _f64(np.clip(k, CLOUD_INDEX_MIN, CLOUD_INDEX_MAX))


def cloud_index_slow(
    ts: ArrayLike,
    seed: int,
    mean_clear_sky_index: float = 0.8,
    variability: float = 0.25,
    knot_s: float = 600.0,
) -> NDArray[np.float64]:
    """The slow octave of :func:`cloud_index` alone (the hour-scale weather, no single clouds).

    ``k_slow = clip(m + v * 4 * 0.8 (n_slow - 1/2), 0.05, 1.05)``: the same ``n_slow`` as
    :func:`cloud_index` for the same arguments, so ``cloud_index - k_slow`` is the fast octave's
    contribution (mean 0, time-averaged std ``0.6 v`` before clipping). It is what a perfect
    weather model could know; single clouds it could not.

    Args:
        ts, seed, mean_clear_sky_index, variability, knot_s: as :func:`cloud_index`.

    Returns:
        Clear-sky index [-] in [0.05, 1.05] (NaN for non-finite ``ts``).
    """
    cloud_index(0.0, seed, mean_clear_sky_index, variability, knot_s)  # checks the arguments
    slow = _smooth_noise(_f64(ts), seed, _STREAM_CLOUD_SLOW, knot_s * _CLOUD_SLOW_FACTOR)
    k = mean_clear_sky_index + variability * 4.0 * _CLOUD_SLOW_WEIGHT * (slow - 0.5)
    return _f64(np.clip(k, CLOUD_INDEX_MIN, CLOUD_INDEX_MAX))


# --------------------------------------------------------------------------------------------
# PV


def pv_ac_power_w(
    ghi_w_per_m2: ArrayLike,
    rated_dc_w: float,
    rated_ac_w: float,
    temp_coeff_per_c: float = -0.004,
    ambient_c: ArrayLike = 20.0,
    noct_c: float = 45.0,
    inverter_efficiency: float = 0.96,
    curtail_limit_w: ArrayLike = np.inf,
) -> NDArray[np.float64]:
    """PVWatts-style AC power [W] of a PV system from plane irradiance.

    - cell temperature (NOCT model): ``t_cell = t_amb + (noct - 20) / 800 * G``
    - DC power (PVWatts, pvlib ``pvsystem.pvwatts_dc``):
      ``p_dc = rated_dc * G / 1000 * (1 + gamma * (t_cell - 25))``
    - AC power: ``p_ac = clip(min(p_dc * eta_inv, rated_ac, curtail_limit), 0, inf)``

    Example: G = 1000, t_amb = 20, NOCT = 45 gives t_cell = 51.25 C and, with gamma = -0.004,
    p_dc = 0.895 rated_dc. Negative irradiance is treated as 0; the output is never negative.

    Args:
        ghi_w_per_m2: irradiance on the modules [W/m^2] (GHI for flat modules).
        rated_dc_w: DC nameplate at STC (1000 W/m^2, 25 C) [W].
        rated_ac_w: inverter AC rating [W]; output is clipped at it.
        temp_coeff_per_c: power temperature coefficient gamma [1/C], typically -0.002..-0.005.
        ambient_c: ambient air temperature [C].
        noct_c: nominal operating cell temperature [C] (800 W/m^2, 20 C ambient).
        inverter_efficiency: DC to AC efficiency [-], in (0, 1].
        curtail_limit_w: active power limit set by the operator [W]; inf means none.

    Returns:
        AC power [W], >= 0.
    """
    ghi = np.clip(_f64(ghi_w_per_m2), 0.0, None)
    t_cell_c = _f64(ambient_c) + (noct_c - 20.0) / 800.0 * ghi
    temp_factor = np.clip(1.0 + temp_coeff_per_c * (t_cell_c - 25.0), 0.0, None)
    p_dc_w = rated_dc_w * ghi / 1000.0 * temp_factor
    p_ac_w = np.minimum(np.minimum(p_dc_w * inverter_efficiency, rated_ac_w), curtail_limit_w)
    return _f64(np.clip(p_ac_w, 0.0, None))


# --------------------------------------------------------------------------------------------
# battery


def battery_step(
    soc_pct: ArrayLike,
    power_w: ArrayLike,
    dt_s: ArrayLike,
    capacity_wh: float,
    charge_efficiency: float = 0.95,
    discharge_efficiency: float = 0.95,
    soc_min_pct: float = 5.0,
    soc_max_pct: float = 100.0,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Advance a battery's state of charge by one step of constant AC power.

    Sign: ``power_w > 0`` discharges (energy leaves at the AC terminals), ``< 0`` charges.
    With stored energy ``E = soc / 100 * capacity`` [Wh] and ``dt_h = dt_s / 3600``:

    - charging (P < 0): ``dE = |P| dt_h eta_c``, limited so that ``soc <= soc_max``;
    - discharging (P > 0): ``dE = -P dt_h / eta_d``, limited so that ``soc >= soc_min``.

    The delivered power is the requested power reduced exactly to what the limit allows, so
    ``E_new - E_old == -P_delivered dt_h / eta_d`` (discharge) or ``-P_delivered dt_h eta_c``
    (charge) always holds; when a limit binds the new SOC is exactly the bound. A battery
    outside its bounds may only move back towards them. Example: 10 kWh, eta_c = 0.95,
    charging at 1000 W for 3600 s stores 950 Wh, +9.5 points.

    Args:
        soc_pct: state of charge [%].
        power_w: requested AC power [W], positive discharging.
        dt_s: step length [s], >= 0.
        capacity_wh: usable capacity [Wh], > 0.
        charge_efficiency: AC to storage efficiency [-], in (0, 1].
        discharge_efficiency: storage to AC efficiency [-], in (0, 1].
        soc_min_pct: lowest allowed state of charge [%].
        soc_max_pct: highest allowed state of charge [%].

    Returns:
        ``(new_soc_pct, delivered_power_w)``, broadcast over the array arguments.

    Raises:
        ValueError: if a parameter is out of range.
    """
    if not capacity_wh > 0.0:
        raise ValueError(f"capacity_wh must be > 0, got {capacity_wh}")
    for name, eff in (
        ("charge_efficiency", charge_efficiency),
        ("discharge_efficiency", discharge_efficiency),
    ):
        if not 0.0 < eff <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {eff}")
    if not 0.0 <= soc_min_pct <= soc_max_pct <= 100.0:
        raise ValueError(
            f"need 0 <= soc_min_pct <= soc_max_pct <= 100, got {soc_min_pct}, {soc_max_pct}"
        )
    if (
        isinstance(soc_pct, float | int)
        and isinstance(power_w, float | int)
        and isinstance(dt_s, float | int)
        and math.isfinite(soc_pct)
        and math.isfinite(power_w)
        and math.isfinite(dt_s)
    ):
        if dt_s < 0.0:
            raise ValueError("dt_s must be >= 0")
        return _battery_step_scalar(
            float(soc_pct),
            float(power_w),
            float(dt_s),
            capacity_wh,
            charge_efficiency,
            discharge_efficiency,
            soc_min_pct,
            soc_max_pct,
        )
    dt = _f64(dt_s)
    if np.any(dt < 0.0):
        raise ValueError("dt_s must be >= 0")

    soc, power, dt = np.broadcast_arrays(_f64(soc_pct), _f64(power_w), dt)
    dt_h = dt / _SECONDS_PER_HOUR
    headroom_wh = np.clip((soc_max_pct - soc) / 100.0 * capacity_wh, 0.0, None)
    available_wh = np.clip((soc - soc_min_pct) / 100.0 * capacity_wh, 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        max_charge_w = np.where(headroom_wh > 0.0, headroom_wh / (dt_h * charge_efficiency), 0.0)
        max_discharge_w = np.where(
            available_wh > 0.0, available_wh * discharge_efficiency / dt_h, 0.0
        )
    charging = power < 0.0
    charge_limited = charging & (-power >= max_charge_w)
    discharge_limited = ~charging & (power > 0.0) & (power >= max_discharge_w)
    delivered = np.where(
        charging, -np.minimum(-power, max_charge_w), np.minimum(power, max_discharge_w)
    )
    delivered = np.where(power == 0.0, 0.0, delivered)
    delta_wh = np.where(
        charging, -delivered * dt_h * charge_efficiency, -delivered * dt_h / discharge_efficiency
    )
    new_soc = soc + delta_wh / capacity_wh * 100.0
    new_soc = np.where(charge_limited & (max_charge_w > 0.0), soc_max_pct, new_soc)
    new_soc = np.where(discharge_limited & (max_discharge_w > 0.0), soc_min_pct, new_soc)
    return _f64(new_soc), _f64(delivered)


def _battery_step_scalar(
    soc: float,
    power: float,
    dt_s: float,
    capacity_wh: float,
    charge_efficiency: float,
    discharge_efficiency: float,
    soc_min_pct: float,
    soc_max_pct: float,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """:func:`battery_step` for one battery and finite numbers: the same equations in plain
    floats, as a simulated week calls it tens of thousands of times (tests/test_physics.py
    checks the two agree)."""
    dt_h = dt_s / _SECONDS_PER_HOUR
    headroom_wh = max((soc_max_pct - soc) / 100.0 * capacity_wh, 0.0)
    available_wh = max((soc - soc_min_pct) / 100.0 * capacity_wh, 0.0)
    max_charge_w = 0.0
    if headroom_wh > 0.0:
        max_charge_w = headroom_wh / (dt_h * charge_efficiency) if dt_h > 0.0 else math.inf
    max_discharge_w = 0.0
    if available_wh > 0.0:
        max_discharge_w = available_wh * discharge_efficiency / dt_h if dt_h > 0.0 else math.inf
    new_soc = soc
    if power < 0.0:
        delivered = -min(-power, max_charge_w)
        delta_wh = -delivered * dt_h * charge_efficiency
        new_soc = soc + delta_wh / capacity_wh * 100.0
        if -power >= max_charge_w > 0.0:
            new_soc = soc_max_pct
    elif power > 0.0:
        delivered = min(power, max_discharge_w)
        delta_wh = -delivered * dt_h / discharge_efficiency
        new_soc = soc + delta_wh / capacity_wh * 100.0
        if power >= max_discharge_w > 0.0:
            new_soc = soc_min_pct
    else:
        delivered = 0.0
    return np.asarray(new_soc, dtype=np.float64), np.asarray(delivered, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# loads


def _household_shape(hour: NDArray[np.float64], weekend: NDArray[np.bool_]) -> NDArray[np.float64]:
    """Household demand shape in [0, 1]: night ~0, morning peak, strong evening peak."""
    weekday_shape = 0.45 * _bump(hour, 7.25, 0.9) + 0.12 * _bump(hour, 13.0, 2.5)
    weekday_shape = weekday_shape + 1.0 * _bump(hour, 19.25, 1.5)
    weekend_shape = 0.5 * _bump(hour, 9.0, 1.4) + 0.32 * _bump(hour, 13.5, 2.5)
    weekend_shape = weekend_shape + 1.0 * _bump(hour, 19.0, 1.7)
    return _f64(np.clip(np.where(weekend, weekend_shape, weekday_shape), 0.0, 1.0))


def _factory_shape(hour: NDArray[np.float64], weekday: NDArray[np.int64]) -> NDArray[np.float64]:
    """Factory shape: two shifts 06-22 on weekdays, one reduced shift Saturday, base Sunday."""
    two_shifts = 0.97 * _window(hour, 6.0, 22.0, 0.5)
    saturday = 0.55 * _window(hour, 6.0, 14.0, 0.5)
    return _f64(np.where(weekday < 5, two_shifts, np.where(weekday == 5, saturday, 0.0)))


def _office_shape(hour: NDArray[np.float64], weekday: NDArray[np.int64]) -> NDArray[np.float64]:
    """Office shape: weekdays 08-18 with ramps and a small lunch dip, base otherwise."""
    open_hours = _window(hour, 8.0, 18.0, 1.0) * (1.0 - 0.1 * _bump(hour, 12.5, 0.5))
    return _f64(np.where(weekday < 5, open_hours, 0.0))


def load_power_w(
    ts: ArrayLike,
    profile: LoadProfile,
    base_w: float,
    peak_w: float,
    seed: int,
    utc_offset_h: float = 0.0,
) -> NDArray[np.float64]:
    """Deterministic site load [W] from time-of-day and shift patterns with seeded noise.

    ``P = (base + (peak - base) * s(hour, weekday)) * (1 + 0.03 * n(ts))``, clipped at 0, where
    ``s`` in [0, 1] is the profile's shape in local time (``ts + 3600 utc_offset_h``):

    - ``household``: night ~base, a morning peak (07:15 weekdays, 09:00 weekends), a low
      midday (higher at weekends) and the strongest peak in the evening (~19:00);
    - ``factory``: two shifts 06:00-22:00 Monday to Friday at 97 % of the span, a reduced
      06:00-14:00 Saturday shift at 55 %, base on Sunday and at night, 30 min smooth ramps;
    - ``office``: Monday to Friday 08:00-18:00 with 1 h ramps and a small lunch dip.

    ``n`` is cosine-interpolated hash noise (knots every 300 s, unit time-averaged std, range
    +-2), a pure function of ``(ts, seed, profile)``, so the load stays within about
    ``[0.94 base, 1.06 peak]``.

    Args:
        ts: UTC timestamps [s since the Unix epoch].
        profile: ``"household"``, ``"factory"`` or ``"office"``.
        base_w: minimum (night or idle) load [W], >= 0.
        peak_w: peak load [W], >= base_w.
        seed: any Python int; the same seed always gives the same series.
        utc_offset_h: local time minus UTC [h], e.g. 1.0 for CET.

    Returns:
        Load power [W], >= 0 (NaN for non-finite ``ts``).

    Raises:
        ValueError: for an unknown profile or ``base_w``/``peak_w`` out of range.
    """
    if profile not in _STREAM_LOAD:
        raise ValueError(
            f"unknown load profile {profile!r}, expected one of {sorted(_STREAM_LOAD)}"
        )
    if not 0.0 <= base_w <= peak_w:
        raise ValueError(f"need 0 <= base_w <= peak_w, got {base_w}, {peak_w}")
    ts_arr = _f64(ts)
    safe_ts, _ = _finite_or_zero(ts_arr)
    local_s = safe_ts + utc_offset_h * _SECONDS_PER_HOUR
    days = np.floor(local_s / _SECONDS_PER_DAY)
    hour = (local_s - days * _SECONDS_PER_DAY) / _SECONDS_PER_HOUR
    weekday = (days.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
    if profile == "household":
        shape = _household_shape(hour, weekday >= 5)
    elif profile == "factory":
        shape = _factory_shape(hour, weekday)
    else:
        shape = _office_shape(hour, weekday)
    noise = 4.0 * (_smooth_noise(ts_arr, seed, _STREAM_LOAD[profile], _LOAD_NOISE_KNOT_S) - 0.5)
    power = (base_w + (peak_w - base_w) * shape) * (1.0 + _LOAD_NOISE_STD * noise)
    return _f64(np.clip(power, 0.0, None))
