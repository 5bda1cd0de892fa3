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

import math
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from broker.messages import (
    MAX_CLEAR_SKY_INDEX,
    MAX_FORECAST_POINTS,
    MAX_WEATHER_SITES,
    WEATHER_MAX_AHEAD_S,
    WEATHER_MAX_PAST_S,
    WeatherForecast,
)
from broker.topics import ID_PATTERN
from coordinator import forecast as fc

#: Forecasts kept for the history's index (a week of 6-hourly runs is 28).
MAX_KEPT = 32
#: A kept forecast that ended longer ago than this (s) is dropped (the history is 7 days).
KEEP_S = 8 * 86_400.0

#: Why a weather forecast was refused (besides ``invalid``, which the caller counts).
REASONS = ("future", "stale", "superseded", "off")


@dataclass(frozen=True, slots=True)
class Steps:
    """A series of step means prepared for reading at many times: what
    :func:`coordinator.forecast.step_series_at` computes from ``(start_ts, step_s, values)``
    on each call, computed once (a kept forecast is read at every interval)."""

    start_ts: float
    step_s: float
    end_ts: float
    #: Centres [s] and values of the finite steps (what ``np.interp`` reads between).
    centres: NDArray[np.float64]
    known_values: NDArray[np.float64]
    #: Whether each step's value is finite.
    known: NDArray[np.bool_]

    @classmethod
    def of(cls, start_ts: float, step_s: float, values: NDArray[np.float64]) -> Steps | None:
        """The prepared series; None when no step is finite (it reads NaN everywhere)."""
        known = np.isfinite(values)
        if not known.any():
            return None
        centres = (start_ts + step_s * (np.arange(values.size) + 0.5)).astype(np.float64)
        return cls(
            start_ts, step_s, start_ts + step_s * values.size, centres[known], values[known], known
        )

    def covers(self, ts: NDArray[np.float64]) -> NDArray[np.bool_]:
        """Whether each of ``ts`` [s] lies in ``[start_ts, end_ts)`` (False for NaN)."""
        return (ts >= self.start_ts) & (ts < self.end_ts)

    def read(self, ts: NDArray[np.float64]) -> NDArray[np.float64]:
        """The series at ``ts`` [s], all covered (:meth:`covers`): exactly
        :func:`coordinator.forecast.step_series_at` there."""
        value = np.interp(ts, self.centres, self.known_values)
        nearest = np.clip(np.floor((ts - self.start_ts) / self.step_s), 0, self.known.size - 1)
        return np.where(self.known[nearest.astype(np.int64)], value, np.nan)


@dataclass(frozen=True, slots=True)
class KeptForecast:
    """One accepted forecast as arrays: issued ``ts``, the steps, the area's index (None: only
    per-site series) and each site's own index series; each series also :class:`Steps`
    prepared for reading (``area_steps``, ``site_steps``; absent: it has no finite step)."""

    ts: float
    start_ts: float
    step_s: float
    area: NDArray[np.float64] | None
    sites: dict[str, NDArray[np.float64]]
    area_steps: Steps | None = field(init=False, repr=False, compare=False)
    site_steps: dict[str, Steps] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        area = None if self.area is None else Steps.of(self.start_ts, self.step_s, self.area)
        sites = {name: Steps.of(self.start_ts, self.step_s, v) for name, v in self.sites.items()}
        object.__setattr__(self, "area_steps", area)
        object.__setattr__(self, "site_steps", {n: s for n, s in sites.items() if s is not None})

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


class HistoryIndexCache:
    """Each site's history index from the last :meth:`WeatherSnapshot.indices`, for sites with
    their own series (an area-only forecast is read for all rows at once, uncached).

    A sample's index depends only on its time and the kept forecasts, and between two
    forecasts the kept ones stay the same while the history gains a sample an interval: so
    only samples not seen before are read (bit-identical to reading all). Any change of the
    kept forecasts empties it. Memory: a site's sample times and indices (16 bytes a sample).
    Safe across threads (a lock).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: tuple[KeptForecast, ...] = ()
        self._rows: dict[str, tuple[NDArray[np.float64], NDArray[np.float64]]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def row(
        self, kept: tuple[KeptForecast, ...], name: str, ts: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        """Site ``name``'s index at its history times ``ts`` (1-D; NaN where not finite)."""
        with self._lock:
            if len(kept) != len(self._kept) or any(
                a is not b for a, b in zip(kept, self._kept, strict=True)
            ):
                self._kept, self._rows = kept, {}
            where = np.flatnonzero(np.isfinite(ts))
            t = ts[where]
            out = np.full(ts.shape, np.nan)
            todo = where
            seen = self._rows.get(name)
            if seen is not None and seen[0].size and t.size:
                at = np.minimum(np.searchsorted(seen[0], t), seen[0].size - 1)
                hit = seen[0][at] == t
                out[where[hit]] = seen[1][at[hit]]
                todo = where[~hit]
            if todo.size:
                out[todo] = _row_index(kept, name, ts[todo])
            if t.size < 2 or bool(np.all(np.diff(t) > 0)):  # searchsorted needs them sorted
                self._rows[name] = (t.copy(), out[where])
            else:
                self._rows.pop(name, None)
            return out


def _row_index(
    kept: tuple[KeptForecast, ...], name: str, ts: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Site ``name``'s index at finite times ``ts``: each from the latest-issued kept forecast
    (its own series, else the area's) with a finite value there."""
    out = np.full(ts.shape, np.nan)
    open_ = np.ones(ts.shape, dtype=bool)
    for forecast in reversed(kept):
        steps = forecast.site_steps.get(name) if name in forecast.sites else forecast.area_steps
        if steps is not None:
            _write(out, open_, open_ & steps.covers(ts), steps, ts)
            if not open_.any():
                break
    return out


@dataclass(frozen=True, slots=True)
class WeatherSnapshot:
    """The kept forecasts (oldest issued first), whether the newest is fresh, and the store's
    :class:`HistoryIndexCache` (None: read every sample each time; same results)."""

    kept: tuple[KeptForecast, ...] = ()
    fresh: bool = False
    cache: HistoryIndexCache | None = field(default=None, compare=False)

    def indices(
        self, names: Sequence[str], history_ts: NDArray[np.float64], times: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]] | None:
        """(history index ``(n, samples)``, forecast index ``(n, len(times))``) for the sites
        ``names`` whose history times are the rows of ``history_ts``; None without a forecast.

        A history sample takes the index of the latest-issued kept forecast that has a finite
        value there (its own series, else the area's).
        """
        if not self.kept:
            return None
        own = set().union(*(k.sites for k in self.kept))
        mine = [i for i, name in enumerate(names) if name in own]
        history = np.full(history_ts.shape, np.nan)
        open_ = np.isfinite(history_ts)
        if len(mine) < len(names):  # the area's series for the other rows at once, newest first
            open_[mine] = False
            for kept in reversed(self.kept):
                if kept.area_steps is not None:
                    want = open_ & kept.area_steps.covers(history_ts)
                    _write(history, open_, want, kept.area_steps, history_ts)
        cache = self.cache if self.cache is not None else HistoryIndexCache()
        for i in mine:
            history[i] = cache.row(self.kept, names[i], history_ts[i])
        ahead = np.full((len(names), len(times)), np.nan)
        if self.fresh:
            ahead_ts = np.broadcast_to(times, ahead.shape)
            _fill(
                ahead,
                np.isfinite(ahead_ts),
                self.kept[-1],
                {name: i for i, name in enumerate(names)},
                ahead_ts,
            )
        return history, ahead


def _fill(
    out: NDArray[np.float64],
    open_: NDArray[np.bool_],
    kept: KeptForecast,
    rows: dict[str, int],
    ts: NDArray[np.float64],
) -> None:
    """Write ``kept``'s index at ``ts`` (row ``rows[name]`` site ``name``) where it covers them,
    is finite and ``open_`` still is; close what was written."""
    if kept.area_steps is not None:  # the area's series for every row without its own at once
        want = open_ & kept.area_steps.covers(ts)
        if kept.sites:
            own = [rows[name] for name in kept.sites if name in rows]
            want[own] = False
        _write(out, open_, want, kept.area_steps, ts)
    for name, steps in kept.site_steps.items():
        i = rows.get(name)
        if i is not None:
            _write(out[i], open_[i], open_[i] & steps.covers(ts[i]), steps, ts[i])


def _write(
    out: NDArray[np.float64],
    open_: NDArray[np.bool_],
    want: NDArray[np.bool_],
    steps: Steps,
    ts: NDArray[np.float64],
) -> None:
    """``steps`` read at ``ts[want]`` into ``out`` where finite; those close in ``open_``."""
    if not want.any():
        return
    where = np.nonzero(want)
    value = steps.read(ts[where])
    good = np.isfinite(value)
    hit = tuple(axis[good] for axis in where)
    out[hit] = value[good]
    open_[hit] = False


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
    cache: HistoryIndexCache = field(default_factory=HistoryIndexCache, repr=False)

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
        return WeatherSnapshot(tuple(self.kept), fresh, self.cache)

    def restore(self, kept: Iterable[KeptForecast], now: float) -> int:
        """Take the forecasts an earlier run kept (coordinator/history_store.py) in place of
        the kept ones, as if each had been accepted live when issued; the number dropped.

        Trusts nothing: drops a forecast that :func:`kept_problem` refuses, that was issued
        more than ``future_skew_s`` after ``now``, that ended more than :data:`KEEP_S` before
        ``now``, or that was not issued after the one before it (as :meth:`offer` refuses a
        superseded one); then keeps the newest :data:`MAX_KEPT`. None is stale here: they were
        fresh when taken; whether the newest still is, :meth:`snapshot` decides. With the
        store off (``enabled`` False) nothing is kept. ``accepted`` counts messages only and
        is not changed."""
        offered = list(kept)
        taken: list[KeptForecast] = []
        for k in offered if self.enabled else ():
            problem = kept_problem(k.ts, k.start_ts, k.step_s, k.area, k.sites)
            if problem is not None or k.ts > now + self.future_skew_s:
                continue
            if k.end_ts < now - KEEP_S or (taken and k.ts <= taken[-1].ts):
                continue
            taken.append(k)
        self.kept = taken[-MAX_KEPT:]
        return len(offered) - len(self.kept)


_SITE_ID = re.compile(ID_PATTERN)


def kept_problem(
    ts: float,
    start_ts: float,
    step_s: float,
    area: object,
    sites: Mapping[str, object],
) -> str | None:
    """Why these cannot be a :class:`KeptForecast` that :func:`kept_forecast` made of a valid
    ``WeatherForecast`` (broker/messages.py), else None: ``ts`` and ``start_ts`` [UTC epoch s]
    finite, positive and before 4.1e9; ``step_s`` a whole number of seconds in 60-3600; the
    area's series (or None) and at most 256 site series (valid site ids) 1-D float arrays of
    one length in 1-672, at least one of them; the steps from at most 2 days before ``ts`` to
    at most 8 days after it; every index in [0, 1.2], finite except the area's NaN (where a
    GHI forecast's clear sky is too low: night). For what is read back from a file."""
    times = (ts, start_ts, step_s)
    if not all(isinstance(t, float | int) and math.isfinite(t) for t in times):
        return "a time is not a finite number"
    if not (0 < ts < 4.1e9 and 0 < start_ts < 4.1e9):
        return "a timestamp is out of range"
    if not (60 <= step_s <= 3600 and step_s == round(step_s)):
        return "the step is not a whole number of seconds in 60-3600"
    if len(sites) > MAX_WEATHER_SITES or not all(
        isinstance(name, str) and _SITE_ID.fullmatch(name) for name in sites
    ):
        return "too many site series, or an invalid site id"
    given = ([] if area is None else [area]) + list(sites.values())
    if not given:
        return "no series"
    series: list[NDArray[np.float64]] = []
    for values in given:
        if not isinstance(values, np.ndarray) or values.ndim != 1 or values.dtype.kind != "f":
            return "a series is not a 1-D float array"
        series.append(values)
    lengths = {len(values) for values in series}
    steps = lengths.pop()
    if lengths or not 1 <= steps <= MAX_FORECAST_POINTS:
        return "the series differ in length or have none or too many steps"
    if start_ts < ts - WEATHER_MAX_PAST_S or start_ts + steps * step_s > ts + WEATHER_MAX_AHEAD_S:
        return "the steps lie too far from the issue time"
    for i, values in enumerate(series):
        inside = (values >= 0.0) & (values <= MAX_CLEAR_SKY_INDEX)
        night = np.isnan(values) if (i == 0 and area is not None) else False
        if not np.all(inside | night):
            return "an index is out of range or not finite"
    return None


def restored_forecast(
    ts: float,
    start_ts: float,
    step_s: float,
    area: NDArray[np.float64] | None,
    sites: Mapping[str, NDArray[np.float64]],
) -> KeptForecast | None:
    """A :class:`KeptForecast` of copies of these arrays, or None when :func:`kept_problem`
    refuses them (checked before it is built)."""
    if kept_problem(ts, start_ts, step_s, area, sites) is not None:
        return None
    return KeptForecast(
        float(ts),
        float(start_ts),
        float(step_s),
        None if area is None else np.array(area, dtype=np.float64),
        {name: np.array(v, dtype=np.float64) for name, v in sites.items()},
    )
