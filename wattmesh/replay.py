"""Measured load and PV series for the stepped engine (``wattmesh backtest --csv SITE=FILE``).

A series file is CSV with a header naming the columns ``time``, ``load_w`` and ``pv_w`` (in
any order; other columns are ignored). ``time`` is ISO 8601 (a time without an offset is UTC,
as in scenario files) or epoch seconds; rows strictly increase in time, at any step, even an
irregular one. Each row's powers (W, >= 0) hold from its time until the next row's (a meter's
interval mean, labelled by the interval's start); the last row holds for as long as the step
before it. :func:`mean_power_w` resamples such a series to the engine's steps by integrating
it exactly, so the energy a replayed site meters is the energy the file implies.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike, NDArray

COLUMNS = ("time", "load_w", "pv_w")


class ReplayError(ValueError):
    """A series file cannot be used: what is wrong, and where."""


@dataclass(frozen=True)
class Series:
    """A measured series: row start times (epoch s), load and PV (W), each held to the next
    row (the last for the step before it)."""

    ts: NDArray[np.float64]
    load_w: NDArray[np.float64]
    pv_w: NDArray[np.float64]

    @property
    def end_ts(self) -> float:
        """When the last row's power stops holding, epoch s."""
        return float(self.ts[-1] + (self.ts[-1] - self.ts[-2]))


def _time(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ReplayError(f"{where}: time {text!r} is neither ISO 8601 nor epoch seconds") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _power(text: str, column: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ReplayError(f"{where}: {column} {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ReplayError(f"{where}: {column} must be a finite power >= 0 W, got {text!r}")
    return value


def read_series(path: Path) -> Series:
    """The series in the CSV file at ``path`` (see the module's docstring)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ReplayError(f"{path}: cannot read: {err}") from err
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in reader.fieldnames or []]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise ReplayError(
            f"{path}: the header needs the columns {', '.join(COLUMNS)}; "
            f"missing {', '.join(missing)} (found {', '.join(header) or 'nothing'})"
        )
    reader.fieldnames = header
    ts: list[float] = []
    load: list[float] = []
    pv: list[float] = []
    for row in reader:
        where = f"{path}, line {reader.line_num}"
        if any(row.get(c) is None for c in COLUMNS):
            raise ReplayError(f"{where}: fewer fields than the header names")
        t = _time(row["time"].strip(), where)
        if ts and not t > ts[-1]:
            raise ReplayError(f"{where}: time does not increase (rows must be in time order)")
        ts.append(t)
        load.append(_power(row["load_w"].strip(), "load_w", where))
        pv.append(_power(row["pv_w"].strip(), "pv_w", where))
    if len(ts) < 2:
        raise ReplayError(f"{path}: at least two rows are needed, found {len(ts)}")
    return Series(np.array(ts), np.array(load), np.array(pv))


def mean_power_w(
    ts: ArrayLike, power_w: ArrayLike, start_ts: ArrayLike, step_s: float
) -> NDArray[np.float64]:
    """The mean of a step series over ``[start, start + step_s)`` for each start, W.

    The series holds ``power_w[i]`` from ``ts[i]`` to ``ts[i + 1]`` (the last for the step
    before it). Its integral ``F`` is piecewise linear with knots at the row times, so
    ``mean = (F(start + step) - F(start)) / step`` is exact. Every window must lie inside the
    series (ValueError otherwise).
    """
    t = np.asarray(ts, dtype=np.float64)
    p = np.asarray(power_w, dtype=np.float64)
    starts = np.asarray(start_ts, dtype=np.float64)
    knots = np.append(t, t[-1] + (t[-1] - t[-2]))
    integral_ws = np.concatenate([[0.0], np.cumsum(p * np.diff(knots))])
    if starts.size and (starts.min() < knots[0] or starts.max() + step_s > knots[-1]):
        raise ValueError("a window lies outside the series")
    ends = np.interp(starts + step_s, knots, integral_ws)
    return np.asarray((ends - np.interp(starts, knots, integral_ws)) / step_s, dtype=np.float64)


def replayed_w(
    series: Series, times: NDArray[np.float64], step_s: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Load and PV (W) at the engine's ``times``: each the series' mean over the step that
    starts there (the last time, which starts no step, repeats the one before)."""
    steps = times[:-1]
    if times[0] < series.ts[0] or times[-1] > series.end_ts:
        raise ReplayError(
            f"the series covers {_iso(series.ts[0])} to {_iso(series.end_ts)}; the run needs "
            f"{_iso(times[0])} to {_iso(times[-1])} (give the scenario's start with --start)"
        )
    load = mean_power_w(series.ts, series.load_w, steps, step_s)
    pv = mean_power_w(series.ts, series.pv_w, steps, step_s)
    return np.append(load, load[-1]), np.append(pv, pv[-1])


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(float(ts), UTC).isoformat().replace("+00:00", "Z")
