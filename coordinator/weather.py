"""The weather forecasts a coordinator has received, as clear-sky indices for its PV forecasts.

A weather service publishes a ``WeatherForecast`` (broker/messages.py) on the retained
``weather/forecast`` topic. :class:`WeatherStore` takes each one that passes its checks (not
from the future, not stale, newer than the last) and keeps a bounded number of them; a
:class:`WeatherSnapshot` of it (immutable, safe in a worker thread) gives, for the sites being
forecast, the two arrays :func:`coordinator.forecast.pv_forecast_sites_w` takes:

- the index the service gave for each *history* sample (the latest-issued kept forecast that
  covers the sample's time: what the site's weather capacity is learned from), and
- the index of the newest forecast, while it is fresh, at each *forecast* time (NaN beyond it).

A site with its own series (``sites``) uses it; others use the area's. A GHI series becomes an
index through the clear-sky GHI at the coordinator's position at each step's centre.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from broker.messages import WeatherForecast
from coordinator import forecast as fc

#: Forecasts kept for the history's index (a week of 6-hourly runs is 28).
MAX_KEPT = 32
#: A kept forecast that ended longer ago than this (s) is dropped (the history is 7 days).
KEEP_S = 8 * 86_400.0

#: Why a weather forecast was refused (besides ``invalid``, which the caller counts).
REASONS = ("future", "stale", "superseded", "off")


@dataclass(frozen=True, slots=True)
class KeptForecast:
    """One accepted forecast as arrays: issued ``ts``, the steps, the area's index (None: only
    per-site series) and each site's own index series."""

    ts: float
    start_ts: float
    step_s: float
    area: NDArray[np.float64] | None
    sites: dict[str, NDArray[np.float64]]

    @property
    def end_ts(self) -> float:
        """The end of the last step [s]."""
        series = self.area if self.area is not None else next(iter(self.sites.values()))
        return self.start_ts + self.step_s * len(series)

    def series(self, site: str) -> NDArray[np.float64] | None:
        """The site's own index series, else the area's (None: neither)."""
        return self.sites.get(site, self.area)


def kept_forecast(msg: WeatherForecast, latitude_deg: float, longitude_deg: float) -> KeptForecast:
    """``msg`` as arrays of clear-sky index; a GHI series is divided by the clear-sky GHI at
    the coordinator's position at each step's centre (:func:`coordinator.forecast.
    clear_sky_index_from_ghi`; NaN at night)."""
    area: NDArray[np.float64] | None = None
    if msg.clear_sky_index:
        area = np.array(msg.clear_sky_index, dtype=np.float64)
    elif msg.ghi_w_per_m2:
        centres = msg.start_ts + msg.step_s * (np.arange(len(msg.ghi_w_per_m2)) + 0.5)
        clear = fc.clear_sky_ghi_w_per_m2(centres, latitude_deg, longitude_deg)
        area = fc.clear_sky_index_from_ghi(np.array(msg.ghi_w_per_m2), clear)
    sites = {name: np.array(v, dtype=np.float64) for name, v in msg.sites.items()}
    return KeptForecast(msg.ts, msg.start_ts, float(msg.step_s), area, sites)


@dataclass(frozen=True, slots=True)
class WeatherSnapshot:
    """The kept forecasts (oldest issued first) and whether the newest is fresh."""

    kept: tuple[KeptForecast, ...] = ()
    fresh: bool = False

    def indices(
        self, names: Sequence[str], history_ts: NDArray[np.float64], times: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]] | None:
        """(history index ``(n, samples)``, forecast index ``(n, len(times))``) for the sites
        ``names`` whose history times are the rows of ``history_ts``; None without a forecast.
        """
        if not self.kept:
            return None
        history = np.full(history_ts.shape, np.nan)
        for kept in self.kept:  # oldest first: a newer forecast overwrites what it covers
            _fill(history, kept, names, history_ts)
        ahead = np.full((len(names), len(times)), np.nan)
        if self.fresh:
            _fill(ahead, self.kept[-1], names, np.broadcast_to(times, ahead.shape))
        return history, ahead


def _fill(
    out: NDArray[np.float64],
    kept: KeptForecast,
    names: Sequence[str],
    ts: NDArray[np.float64],
) -> None:
    """Write ``kept``'s index at ``ts`` (row ``i`` site ``names[i]``) where it covers them."""
    if kept.area is not None:  # the area's series for every row at once
        value = fc.step_series_at(kept.start_ts, kept.step_s, kept.area, ts)
        rows = np.array([name not in kept.sites for name in names], dtype=bool)
        np.copyto(out, value, where=rows[:, None] & np.isfinite(value))
    for i, name in enumerate(names):
        own = kept.sites.get(name)
        if own is not None:
            value = fc.step_series_at(kept.start_ts, kept.step_s, own, ts[i])
            np.copyto(out[i], value, where=np.isfinite(value))


@dataclass
class WeatherStore:
    """The accepted weather forecasts, bounded (:data:`MAX_KEPT`, :data:`KEEP_S`).

    ``max_age_s``: a forecast issued longer ago is stale (not used ahead); ``future_skew_s``:
    one issued further in the future than this is refused.
    """

    latitude_deg: float
    longitude_deg: float
    max_age_s: float
    future_skew_s: float = 30.0
    enabled: bool = True
    kept: list[KeptForecast] = field(default_factory=list)
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def offer(self, msg: WeatherForecast, now: float) -> str | None:
        """Keep ``msg`` if it passes; else the reason it did not (:data:`REASONS`), counted."""
        reason = self._check(msg, now)
        if reason is not None:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
            return reason
        self.kept.append(kept_forecast(msg, self.latitude_deg, self.longitude_deg))
        self.kept = [k for k in self.kept if k.end_ts >= now - KEEP_S][-MAX_KEPT:]
        self.accepted += 1
        return None

    def _check(self, msg: WeatherForecast, now: float) -> str | None:
        if not self.enabled:
            return "off"
        if msg.ts > now + self.future_skew_s:
            return "future"
        if now - msg.ts > self.max_age_s:
            return "stale"
        if self.kept and msg.ts <= self.kept[-1].ts:
            return "superseded"
        return None

    def snapshot(self, now: float) -> WeatherSnapshot:
        """The forecasts kept now; the newest is fresh while at most ``max_age_s`` old."""
        if not self.kept:
            return WeatherSnapshot()
        fresh = now - self.kept[-1].ts <= self.max_age_s
        return WeatherSnapshot(tuple(self.kept), fresh)
