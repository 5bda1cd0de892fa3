"""A simulated weather service: forecasts of the simulated world's clouds, as a numerical weather
prediction (NWP) would issue them. Pure functions of time and seed (docs/architecture.md s. 5).

The world's clear-sky index (:func:`simulators.physics.cloud_index`) has two octaves: a slow one
with knots every hour (passing weather) and a fast one every 10 minutes (single clouds). A
weather model can know the first, not the second, and its knowledge fades with lead time. So
the forecast, issued by a run at ``issued_ts`` (runs every :data:`RUN_PERIOD_S`, at 00, 06, 12
and 18 UTC, each reaching :data:`HORIZON_S` ahead), is

``k_f(t) = clip(k_slow(t) + sigma(t - issued_ts) z_run(t), 0, 1.2)``

- ``k_slow``: :func:`simulators.physics.cloud_index_slow`, the world's own slow octave;
- ``z_run``: seeded noise of unit time-averaged standard deviation (bounded by +-2), smooth with
  knots every :data:`ERROR_KNOT_S` (forecast errors are correlated over hours: a front early or
  late), drawn afresh for every run, so that a newer run does not repeat an older run's error;
- ``sigma(lead)``: :data:`ERROR_STD_1H` at one hour, growing linearly to :data:`ERROR_STD_24H`
  at 24 hours, at most :data:`ERROR_STD_MAX` (and at least the 1-hour value before it).

Skill (measured on the community scenario's PV seeds for 7, 8 and 9 over weeks in summer, autumn
and winter at 48 N; ``tests/test_sim_weather.py`` checks one case): the hourly GHI nRMSE (RMSE
over daylight hours divided by their mean GHI) against the world's GHI is about 27 % (21-32 %)
for the day-ahead forecast (24-30 h lead), about 12 % for the same day (0-6 h lead), and 9 %
for a perfect forecast of the slow octave: the single clouds, which no model can forecast. Real
day-ahead NWP GHI forecasts have an nRMSE of 20-40 % (lower in sunny climates), so this service
sits in the middle of that range; the error's growth from 0.05 to 0.175 is what puts it there.
A forecast never
peeks at the world beyond what it encodes: the slow octave plus an error that only depends on
the run and the seed.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from simulators import physics
from simulators.physics import _smooth_noise  # the one seeded-noise generator

__all__ = [
    "ERROR_KNOT_S",
    "ERROR_STD_1H",
    "ERROR_STD_24H",
    "ERROR_STD_MAX",
    "HORIZON_S",
    "RUN_PERIOD_S",
    "error_std",
    "forecast_clear_sky_index",
    "latest_run_ts",
]

#: A new forecast every 6 h (at 00, 06, 12 and 18 UTC), each reaching 48 h ahead.
RUN_PERIOD_S = 6 * 3600.0
HORIZON_S = 48 * 3600.0
#: The forecast error's standard deviation at 1 h and 24 h lead, its cap, and its knot spacing.
ERROR_STD_1H = 0.05
ERROR_STD_24H = 0.175
ERROR_STD_MAX = 0.2
ERROR_KNOT_S = 3 * 3600.0
#: The upper bound of a forecast index (broker.messages.MAX_CLEAR_SKY_INDEX).
MAX_INDEX = 1.2

_STREAM_WEATHER = 0xBE5466CF34E90C6C
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def latest_run_ts(now_ts: float) -> float:
    """The issue time [s] of the newest run at or before ``now_ts`` (a multiple of 6 h)."""
    return float(np.floor(now_ts / RUN_PERIOD_S) * RUN_PERIOD_S)


def error_std(lead_s: ArrayLike) -> NDArray[np.float64]:
    """The forecast error's standard deviation [-] at ``lead_s`` [s] after the run.

    ``sigma = clip(0.05 + (0.175 - 0.05) (lead_h - 1) / 23, 0.05, 0.2)``: 0.05 at 1 h, 0.175 at
    24 h, 0.2 from about 28.5 h.
    """
    lead_h = np.asarray(lead_s, dtype=np.float64) / 3600.0
    sigma = ERROR_STD_1H + (ERROR_STD_24H - ERROR_STD_1H) * (lead_h - 1.0) / 23.0
    return np.asarray(np.clip(sigma, ERROR_STD_1H, ERROR_STD_MAX), dtype=np.float64)


def forecast_clear_sky_index(
    ts: ArrayLike, issued_ts: float, seed: int, *, knot_s: float = 600.0
) -> NDArray[np.float64]:
    """The clear-sky index [-] that the run issued at ``issued_ts`` forecasts at ``ts`` for the
    clouds of ``seed`` (:func:`simulators.physics.cloud_index` with its default parameters and
    ``knot_s``), in [0, 1.2]; NaN before the run or past its horizon, or for non-finite ``ts``.
    See the module docstring."""
    times = np.asarray(ts, dtype=np.float64)
    truth = physics.cloud_index_slow(times, seed, knot_s=knot_s)
    run = round(issued_ts / RUN_PERIOD_S)
    stream = (_STREAM_WEATHER + run * _GOLDEN) & _MASK64
    z = 4.0 * (_smooth_noise(times, seed, stream, ERROR_KNOT_S) - 0.5)
    lead_s = times - issued_ts
    index = np.clip(truth + error_std(lead_s) * z, 0.0, MAX_INDEX)
    covered = (lead_s >= 0.0) & (lead_s < HORIZON_S)
    return np.asarray(np.where(covered, index, np.nan), dtype=np.float64)
