"""The coordinator's forecasting history on disk, so that a restart keeps its forecasts.

A coordinator forecasts each site's PV and load from a week of its own telemetry (a sample
every 15 minutes, coordinator/service.py). Held only in memory, a restart (an update, a crash,
a standby taking over on shared storage) would forecast from nothing for a week: flat load
profiles, no PV capacity, and plans made on them. This module writes the histories to one
file and reads them back.

Format: a NumPy ``.npz`` archive (no pickled objects; read with ``allow_pickle=False``) with
``format`` (the version, 1), ``sites`` (the site ids, unicode), ``counts`` (samples per site)
and ``ts`` / ``pv_w`` / ``load_w``, every site's samples concatenated in the order of
``sites`` (UTC epoch s, W; NaN for a value the site did not report). The clear-sky GHI the
forecasters also keep is not stored: it follows from the time and the feeder's position,
and the coordinator computes it again on loading.

The same file keeps the weather forecasts the coordinator holds (coordinator/weather.py), so
that a restart does not forecast PV without them until the weather service's next run and a
day's history under it: ``weather_ts``, ``weather_start_ts`` and ``weather_step_s`` (issue
time, first step's start, step; s), ``weather_steps`` (steps per series), ``weather_has_area``
(whether it has an area series), ``weather_site_counts`` (its site series), ``weather_area``
(the area series of those that have one, concatenated), ``weather_sites`` (the site ids,
unicode) and ``weather_site_values`` (their series, concatenated), one entry per forecast,
oldest issued first, each index the clear-sky index [-] the coordinator kept (NaN where a
GHI forecast's night gave none). A file without them (written before) holds no forecast.

Writes are atomic (a temporary file beside the target, fsynced, then renamed): a failed
write (a full disk) leaves the last good file. Reading trusts nothing: a file that is not
such an archive raises :class:`HistoryFileError` with the reason; within a good file, sites
whose id is not a valid site id, and samples that are not finite, lie outside the window
asked for, or hold a power outside the messages' bounds or negative, are dropped and counted;
weather forecasts that are not what a valid message makes (:func:`coordinator.weather.
kept_problem`), or repeat a site, are dropped and counted, and weather arrays that do not fit
together drop every forecast (the histories stay). When a forecast is too old or from the
future is for :meth:`coordinator.weather.WeatherStore.restore` to say.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from broker.messages import MAX_FORECAST_POINTS, MAX_POWER_W, MAX_WEATHER_SITES
from broker.topics import ID_PATTERN
from coordinator.weather import KeptForecast, restored_forecast

FORMAT = 1
#: The most sites and samples per site a file may hold (a bound on what reading it costs).
MAX_SITES = 1_000_000
MAX_SAMPLES_PER_SITE = 100_000
#: The most weather forecasts a file may hold (the coordinator keeps at most 32).
MAX_FORECASTS = 1_000

#: The weather arrays: (name, dtype kind), one entry per forecast for the first six.
_WEATHER = (
    ("weather_ts", "f"),
    ("weather_start_ts", "f"),
    ("weather_step_s", "f"),
    ("weather_steps", "iu"),
    ("weather_has_area", "b"),
    ("weather_site_counts", "iu"),
    ("weather_area", "f"),
    ("weather_sites", "U"),
    ("weather_site_values", "f"),
)

_ID = re.compile(ID_PATTERN)


class HistoryFileError(ValueError):
    """The history file cannot be read as one (the message says why)."""


@dataclass(frozen=True, slots=True)
class SiteHistory:
    """One site's samples, oldest first: ``ts`` (UTC epoch s), ``pv_w`` and ``load_w`` (W,
    >= 0, NaN where unknown)."""

    ts: NDArray[np.float64]
    pv_w: NDArray[np.float64]
    load_w: NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class LoadedHistory:
    """What :func:`read_histories` kept, and how many samples and sites it dropped."""

    sites: dict[str, SiteHistory]
    dropped_samples: int
    dropped_sites: int
    #: The weather forecasts kept, in the file's order, and how many were dropped.
    weather: list[KeptForecast] = field(default_factory=list)
    dropped_forecasts: int = 0


def _weather_arrays(weather: Sequence[KeptForecast]) -> dict[str, Any]:
    """The weather forecasts as the file's arrays (module docstring)."""
    steps = [
        len(k.area if k.area is not None else next(iter(k.sites.values()), ())) for k in weather
    ]
    names = [name for k in weather for name in k.sites]
    parts = [k.area for k in weather if k.area is not None]
    values = [v for k in weather for v in k.sites.values()]
    return {
        "weather_ts": np.array([k.ts for k in weather], dtype=np.float64),
        "weather_start_ts": np.array([k.start_ts for k in weather], dtype=np.float64),
        "weather_step_s": np.array([k.step_s for k in weather], dtype=np.float64),
        "weather_steps": np.array(steps, dtype=np.int64),
        "weather_has_area": np.array([k.area is not None for k in weather], dtype=np.bool_),
        "weather_site_counts": np.array([len(k.sites) for k in weather], dtype=np.int64),
        "weather_area": np.concatenate(parts).astype(np.float64) if parts else np.zeros(0),
        "weather_sites": np.array(names, dtype=np.str_),
        "weather_site_values": np.concatenate(values).astype(np.float64) if values else np.zeros(0),
    }


def history_bytes(
    histories: Mapping[str, SiteHistory], weather: Sequence[KeptForecast] = ()
) -> bytes:
    """``histories`` and the kept ``weather`` forecasts (oldest issued first) as the archive's
    bytes (what a history file, or coordinator/history_db.py's row, holds)."""
    names = sorted(histories)
    counts = np.array([len(histories[n].ts) for n in names], dtype=np.int64)

    def column(field: str) -> NDArray[np.float64]:
        parts = [np.asarray(getattr(histories[n], field), dtype=np.float64) for n in names]
        return np.concatenate(parts) if parts else np.zeros(0)

    out = io.BytesIO()
    np.savez(
        out,
        format=np.array(FORMAT),
        sites=np.array(names, dtype=np.str_),
        counts=counts,
        ts=column("ts"),
        pv_w=column("pv_w"),
        load_w=column("load_w"),
        **_weather_arrays(weather),
    )
    return out.getvalue()


def write_histories(
    path: Path, histories: Mapping[str, SiteHistory], weather: Sequence[KeptForecast] = ()
) -> None:
    """Write ``histories`` and the kept ``weather`` forecasts (oldest issued first) to
    ``path`` atomically (the old file stays if this fails; the ``OSError`` is raised for the
    caller to report)."""
    content = history_bytes(histories, weather)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_format(where: object, fmt: NDArray[np.generic]) -> None:
    if fmt.shape != () or fmt.dtype.kind not in "iu" or int(fmt) != FORMAT:
        raise HistoryFileError(
            f"{where}: history format {fmt.tolist()!r}, this coordinator reads {FORMAT}"
        )


def read_histories(path: Path, *, not_before_ts: float, not_after_ts: float) -> LoadedHistory:
    """The histories in ``path``, samples within ``[not_before_ts, not_after_ts]`` only.

    Raises :class:`HistoryFileError` when the file is not a history file (not an archive,
    another format version, missing or inconsistent arrays, pickled objects) and
    ``FileNotFoundError`` when there is none."""
    return _read(path, path, not_before_ts=not_before_ts, not_after_ts=not_after_ts)


def parse_histories(
    content: bytes, where: object, *, not_before_ts: float, not_after_ts: float
) -> LoadedHistory:
    """:func:`read_histories` of an archive's bytes (``where`` names them in errors)."""
    return _read(io.BytesIO(content), where, not_before_ts=not_before_ts, not_after_ts=not_after_ts)


def _read(
    source: Path | io.BytesIO, where: object, *, not_before_ts: float, not_after_ts: float
) -> LoadedHistory:
    path = where
    try:
        with np.load(source, allow_pickle=False) as archive:
            _check_format(path, archive["format"])
            arrays = {k: archive[k] for k in ("sites", "counts", "ts", "pv_w", "load_w")}
            stored = {k: archive[k] for k, _ in _WEATHER if k in archive.files}
    except (FileNotFoundError, HistoryFileError):
        raise
    except KeyError as err:
        raise HistoryFileError(f"{path}: not a history file (no array {err})") from err
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise HistoryFileError(f"{path}: not a history file ({err})") from err
    sites, counts = arrays["sites"], arrays["counts"]
    if sites.ndim != 1 or sites.dtype.kind != "U" or len(sites) > MAX_SITES:
        raise HistoryFileError(f"{path}: the site list is malformed")
    if counts.shape != sites.shape or counts.dtype.kind not in "iu":
        raise HistoryFileError(f"{path}: the sample counts do not match the sites")
    if np.any(counts < 0) or np.any(counts > MAX_SAMPLES_PER_SITE):
        raise HistoryFileError(f"{path}: a site's sample count is out of range")
    total = int(counts.sum())
    columns = [arrays[k] for k in ("ts", "pv_w", "load_w")]
    if any(c.shape != (total,) or c.dtype.kind != "f" for c in columns):
        raise HistoryFileError(f"{path}: the sample arrays do not match the counts")
    ts, pv, load = (np.asarray(c, dtype=np.float64) for c in columns)
    good = np.isfinite(ts) & (ts >= not_before_ts) & (ts <= not_after_ts)
    for values in (pv, load):
        good &= np.isnan(values) | ((values >= 0) & (values <= MAX_POWER_W))
    out: dict[str, SiteHistory] = {}
    dropped_sites = 0
    ends = np.cumsum(counts)
    for name, end, count in zip(sites.tolist(), ends.tolist(), counts.tolist(), strict=True):
        if not _ID.fullmatch(name) or name in out:
            dropped_sites += 1
            good[end - count : end] = False
            continue
        keep = np.flatnonzero(good[end - count : end]) + (end - count)
        order = keep[np.argsort(ts[keep], kind="stable")]
        out[name] = SiteHistory(ts[order], pv[order], load[order])
    weather, dropped_forecasts = _read_weather(stored)
    return LoadedHistory(out, int(total - good.sum()), dropped_sites, weather, dropped_forecasts)


def _read_weather(stored: Mapping[str, NDArray[np.generic]]) -> tuple[list[KeptForecast], int]:
    """The weather forecasts in the file's arrays ``stored`` and how many were dropped: every
    one when the arrays do not fit together (none in a file written before they were kept)."""
    if not stored:
        return [], 0
    per_forecast = [stored.get(k) for k, _ in _WEATHER[:6]]
    lengths = [len(v) for v in per_forecast if v is not None and v.ndim == 1]
    every = min(max(lengths, default=1), MAX_FORECASTS)  # what was dropped when all are
    if set(stored) != {k for k, _ in _WEATHER}:
        return [], every
    if any(stored[k].ndim != 1 or stored[k].dtype.kind not in kind for k, kind in _WEATHER):
        return [], every
    n = len(stored["weather_ts"])
    if n > MAX_FORECASTS or any(len(stored[k]) != n for k, _ in _WEATHER[:6]):
        return [], every
    steps = stored["weather_steps"].astype(np.int64)
    counts = stored["weather_site_counts"].astype(np.int64)
    has_area = stored["weather_has_area"].astype(np.bool_)
    if np.any((steps < 0) | (steps > MAX_FORECAST_POINTS)):
        return [], every
    if np.any((counts < 0) | (counts > MAX_WEATHER_SITES)):
        return [], every
    area, names = stored["weather_area"], stored["weather_sites"]
    values = stored["weather_site_values"]
    if len(area) != int(steps[has_area].sum()) or len(names) != int(counts.sum()):
        return [], every
    if len(values) != int((steps * counts).sum()):
        return [], every
    kept: list[KeptForecast] = []
    area_at = name_at = value_at = 0
    for i in range(n):
        step_count, site_count = int(steps[i]), int(counts[i])
        own = None
        if has_area[i]:
            own = np.asarray(area[area_at : area_at + step_count], dtype=np.float64)
            area_at += step_count
        ids = [str(x) for x in names[name_at : name_at + site_count].tolist()]
        name_at += site_count
        series = {}
        for name in ids:
            series[name] = np.asarray(values[value_at : value_at + step_count], dtype=np.float64)
            value_at += step_count
        if len(series) != len(ids):  # a site given twice
            continue
        k = restored_forecast(
            float(stored["weather_ts"][i]),
            float(stored["weather_start_ts"][i]),
            float(stored["weather_step_s"][i]),
            own,
            series,
        )
        if k is not None:
            kept.append(k)
    return kept, n - len(kept)
