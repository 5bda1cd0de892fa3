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

Writes are atomic (a temporary file beside the target, fsynced, then renamed): a failed
write (a full disk) leaves the last good file. Reading trusts nothing: a file that is not
such an archive raises :class:`HistoryFileError` with the reason; within a good file, sites
whose id is not a valid site id, and samples that are not finite, lie outside the window
asked for, or hold a power outside the messages' bounds or negative, are dropped and counted.
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from broker.messages import MAX_POWER_W
from broker.topics import ID_PATTERN

FORMAT = 1
#: The most sites and samples per site a file may hold (a bound on what reading it costs).
MAX_SITES = 1_000_000
MAX_SAMPLES_PER_SITE = 100_000

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


def write_histories(path: Path, histories: Mapping[str, SiteHistory]) -> None:
    """Write ``histories`` to ``path`` atomically (the old file stays if this fails; the
    ``OSError`` is raised for the caller to report)."""
    names = sorted(histories)
    counts = np.array([len(histories[n].ts) for n in names], dtype=np.int64)

    def column(field: str) -> NDArray[np.float64]:
        parts = [np.asarray(getattr(histories[n], field), dtype=np.float64) for n in names]
        return np.concatenate(parts) if parts else np.zeros(0)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                format=np.array(FORMAT),
                sites=np.array(names, dtype=np.str_),
                counts=counts,
                ts=column("ts"),
                pv_w=column("pv_w"),
                load_w=column("load_w"),
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_format(path: Path, fmt: NDArray[np.generic]) -> None:
    if fmt.shape != () or fmt.dtype.kind not in "iu" or int(fmt) != FORMAT:
        raise HistoryFileError(
            f"{path}: history format {fmt.tolist()!r}, this coordinator reads {FORMAT}"
        )


def read_histories(path: Path, *, not_before_ts: float, not_after_ts: float) -> LoadedHistory:
    """The histories in ``path``, samples within ``[not_before_ts, not_after_ts]`` only.

    Raises :class:`HistoryFileError` when the file is not a history file (not an archive,
    another format version, missing or inconsistent arrays, pickled objects) and
    ``FileNotFoundError`` when there is none."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            _check_format(path, archive["format"])
            arrays = {k: archive[k] for k in ("sites", "counts", "ts", "pv_w", "load_w")}
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
    return LoadedHistory(out, int(total - good.sum()), dropped_sites)
