"""``wattmesh archive export``: the ledger and the telemetry as Parquet files, one per day.

Layout (Hive partitioning, read by pandas/pyarrow, DuckDB and Spark as one table each)::

    DIR/settlements/date=2026-06-22/part-0.parquet
    DIR/clearings/date=2026-06-22/part-0.parquet
    DIR/awards/date=2026-06-22/part-0.parquet
    DIR/telemetry/date=2026-06-22/part-0.parquet          site totals (historian "site")
    DIR/device_telemetry/date=2026-06-22/part-0.parquet   each device (historian "device")

A row belongs to the UTC day its interval starts in (ledger) or its timestamp falls in
(telemetry); ``date`` is the partition column, not stored in the files. Each file is written
beside its place and renamed into it, so an export run again replaces whole days.

Columns keep the ledger's exact units (Wh, micro-currency, micro-currency per kWh; ints)
and the historian's (W, %, float; ``controller_code`` and ``available`` ints); ``ts`` is float
seconds since the epoch (the interval's start for the ledger) and ``time`` the same as a UTC
timestamp (ms). Settlements are each site's settled interval as it stands (corrections
included), with the interval's prices and its correction ``revision``: the rows of
``Ledger.settlement``.

The ledger is read in one read-only transaction (a read-only SQLite connection, or a
PostgreSQL REPEATABLE READ, READ ONLY transaction), so an export taken while the coordinator
settles holds whole intervals. Telemetry is read from
the historian's time-series server through VictoriaMetrics' ``/api/v1/export`` (one request
per day); a server without that API (InfluxDB 2) or one that cannot be reached is reported and
the ledger parts are exported anyway (exit code 3).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final

import httpx
import pyarrow as pa
import pyarrow.parquet as pq

from coordinator.historian import INTEGER_FIELDS, SCHEMA
from coordinator.ledger import SCHEMA_VERSION
from wattmesh.ledger_location import (
    LedgerLocation,
    LedgerLocationError,
    one_line,
    open_postgres_ledger,
    require_current_schema,
)

__all__ = [
    "DATASETS",
    "ArchiveError",
    "ExportResult",
    "TelemetryUnavailable",
    "TimeRange",
    "export_archive",
    "parse_range",
    "read_ledger_tables",
    "read_telemetry_day",
]

DAY_S: Final = 86_400
#: Longest range one export takes (days): a mistyped year should not run for hours.
MAX_RANGE_DAYS: Final = 3_660
#: Dataset name -> historian measurement, for the telemetry datasets.
TELEMETRY: Final = {"telemetry": "site", "device_telemetry": "device"}
LEDGER_DATASETS: Final = ("settlements", "clearings", "awards")
DATASETS: Final = (*LEDGER_DATASETS, *TELEMETRY)
PART: Final = "part-0.parquet"


class ArchiveError(Exception):
    """An export that cannot be done; the message says why."""


class TelemetryUnavailable(ArchiveError):
    """The time-series server cannot be read (unreachable, or no export API)."""


# --- the range --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimeRange:
    """A half-open UTC range ``[start_ts, end_ts)`` (s since the epoch)."""

    start_ts: float
    end_ts: float

    def intervals(self, interval_s: int) -> tuple[int, int]:
        """First and last market interval starting in the range (``last < first``: none)."""
        return math.ceil(self.start_ts / interval_s), math.ceil(self.end_ts / interval_s) - 1

    def days(self) -> Iterator[tuple[date, float, float]]:
        """Each UTC day the range touches, with the part of the range inside it."""
        day = int(self.start_ts // DAY_S)
        while day * DAY_S < self.end_ts:
            lo, hi = max(self.start_ts, day * DAY_S), min(self.end_ts, (day + 1) * DAY_S)
            yield _date_of(day * DAY_S), lo, hi
            day += 1


def _parse_when(text: str, option: str) -> float:
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ArchiveError(
            f"{option} {text!r}: not a date or time (2026-06-22 or 2026-06-22T06:00:00Z)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def parse_range(start: str, end: str) -> TimeRange:
    """``--from`` and ``--to`` as a :class:`TimeRange`: ISO dates or times, UTC unless they
    say otherwise; ``--to`` is exclusive. ArchiveError for an empty, reversed, pre-epoch or
    over-long range."""
    start_ts, end_ts = _parse_when(start, "--from"), _parse_when(end, "--to")
    if start_ts < 0:
        raise ArchiveError(f"--from {start!r} is before 1970")
    if end_ts <= start_ts:
        raise ArchiveError(
            f"--to {end!r} must be after --from {start!r} (--to is exclusive: one day is "
            "--from 2026-06-22 --to 2026-06-23)"
        )
    if end_ts - start_ts > MAX_RANGE_DAYS * DAY_S:
        raise ArchiveError(f"the range is longer than {MAX_RANGE_DAYS} days: export it in parts")
    return TimeRange(start_ts, end_ts)


def _date_of(ts: float) -> date:
    return datetime.fromtimestamp(ts, UTC).date()


# --- the ledger -------------------------------------------------------------------------

_SETTLEMENTS_SQL: Final = """
SELECT m.interval, m.site, m.award_wh, m.metered_wh, m.estimated, m.estimate_reason,
    COALESCE(SUM(CASE WHEN p.kind = 'trade' THEN e.amount_micro END), 0),
    COALESCE(SUM(CASE WHEN p.kind = 'imbalance' THEN e.amount_micro END), 0),
    COALESCE(SUM(CASE WHEN p.kind = 'rebate' THEN e.amount_micro END), 0),
    i.clearing_price_micro_per_kwh, i.retail_price_micro_per_kwh,
    i.feed_in_price_micro_per_kwh, i.imbalance_premium_micro_per_kwh, i.rebate_rule,
    (SELECT COALESCE(MAX(r.revision), 0) FROM revisions r WHERE r.interval = m.interval)
FROM site_metering m
JOIN intervals i ON i.interval = m.interval
LEFT JOIN entries e ON e.interval = m.interval AND e.account = 'site:' || m.site
LEFT JOIN postings p ON p.posting_id = e.posting_id
WHERE m.interval BETWEEN ? AND ?
GROUP BY m.interval, m.site, m.award_wh, m.metered_wh, m.estimated, m.estimate_reason,
    i.clearing_price_micro_per_kwh, i.retail_price_micro_per_kwh, i.feed_in_price_micro_per_kwh,
    i.imbalance_premium_micro_per_kwh, i.rebate_rule
ORDER BY m.interval, m.site
"""
_CLEARINGS_SQL: Final = """
SELECT c.interval, c.clearing_price_micro_per_kwh, c.retail_price_micro_per_kwh,
    c.feed_in_price_micro_per_kwh, c.imbalance_premium_micro_per_kwh, c.rebate_rule,
    c.cleared_ts, c.award_count,
    EXISTS (SELECT 1 FROM intervals i WHERE i.interval = c.interval)
FROM clearings c WHERE c.interval BETWEEN ? AND ? ORDER BY c.interval
"""
_AWARDS_SQL: Final = """
SELECT interval, site, award_wh FROM clearing_awards
WHERE interval BETWEEN ? AND ? ORDER BY interval, site
"""


_TS_MS = pa.timestamp("ms", tz="UTC")


def _timestamps_ms(values: list[int]) -> pa.Array:
    """Epoch milliseconds as a UTC timestamp column."""
    return pa.array(values, type=pa.int64()).cast(_TS_MS)


def _fields(name: str) -> Sequence[tuple[str, pa.DataType]]:
    """The columns of a ledger dataset, in the order its query selects them."""
    return {
        "settlements": (
            ("interval", pa.int64()),
            ("site", pa.string()),
            ("award_wh", pa.int64()),
            ("metered_wh", pa.int64()),
            ("estimated", pa.bool_()),
            ("estimate_reason", pa.string()),
            ("trade_micro", pa.int64()),
            ("imbalance_micro", pa.int64()),
            ("rebate_micro", pa.int64()),
            ("clearing_price_micro_per_kwh", pa.int64()),
            ("retail_price_micro_per_kwh", pa.int64()),
            ("feed_in_price_micro_per_kwh", pa.int64()),
            ("imbalance_premium_micro_per_kwh", pa.int64()),
            ("rebate_rule", pa.string()),
            ("revision", pa.int64()),
        ),
        "clearings": (
            ("interval", pa.int64()),
            ("clearing_price_micro_per_kwh", pa.int64()),
            ("retail_price_micro_per_kwh", pa.int64()),
            ("feed_in_price_micro_per_kwh", pa.int64()),
            ("imbalance_premium_micro_per_kwh", pa.int64()),
            ("rebate_rule", pa.string()),
            ("cleared_ts", pa.float64()),
            ("award_count", pa.int64()),
            ("settled", pa.bool_()),
        ),
        "awards": (("interval", pa.int64()), ("site", pa.string()), ("award_wh", pa.int64())),
    }[name]


def _read_postgres_tables(
    location: LedgerLocation, span: tuple[int, int]
) -> dict[str, list[tuple[Any, ...]]]:
    """The three datasets from a PostgreSQL ledger in one REPEATABLE READ, READ ONLY
    transaction (one snapshot for every query; the coordinator goes on settling)."""
    try:
        conn = open_postgres_ledger(location)
    except LedgerLocationError as err:
        raise ArchiveError(str(err)) from err
    try:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        require_current_schema(conn, location.name)
        tables = {
            name: [tuple(r) for r in conn.execute(sql, span).fetchall()]
            for name, sql in (
                ("settlements", _SETTLEMENTS_SQL),
                ("clearings", _CLEARINGS_SQL),
                ("awards", _AWARDS_SQL),
            )
        }
        conn.execute("COMMIT")
    except LedgerLocationError as err:
        raise ArchiveError(str(err)) from err
    except conn.errors as err:
        raise ArchiveError(f"{location.name}: cannot read the ledger: {one_line(err)}") from err
    finally:
        conn.close()
    return tables


def read_ledger_tables(
    ledger: Path | LedgerLocation, first_interval: int, last_interval: int
) -> dict[str, list[tuple[Any, ...]]]:
    """Settlement, clearing and award rows of the intervals ``first..last`` (inclusive), in
    the column order of the archive, read in one read-only transaction; ``ledger`` is a
    SQLite file or a :class:`~wattmesh.ledger_location.LedgerLocation` (file or PostgreSQL)."""
    location = ledger if isinstance(ledger, LedgerLocation) else LedgerLocation(ledger)
    if location.is_postgres:
        tables = _read_postgres_tables(location, (first_interval, last_interval))
    else:
        tables = _read_sqlite_tables(location.path, (first_interval, last_interval))
    flags = {"settlements": (4,), "clearings": (8,)}  # 0/1 columns (and PostgreSQL's EXISTS)
    for name, at in flags.items():
        tables[name] = [
            tuple(bool(v) if i in at else v for i, v in enumerate(r)) for r in tables[name]
        ]
    return tables


def _read_sqlite_tables(path: Path, span: tuple[int, int]) -> dict[str, list[tuple[Any, ...]]]:
    """The three datasets from a read-only SQLite connection in one read transaction."""
    if not path.is_file():
        raise ArchiveError(f"{path}: no such ledger file")
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
    except sqlite3.Error as err:
        raise ArchiveError(f"{path}: cannot open the ledger: {err}") from err
    try:
        conn.execute("BEGIN")  # one snapshot for every query (WAL: the writer goes on)
        try:
            row = conn.execute("SELECT version FROM schema_version").fetchone()
        except sqlite3.Error as err:
            raise ArchiveError(f"{path}: not a wattmesh ledger ({err})") from err
        if row is None or row[0] != SCHEMA_VERSION:
            raise ArchiveError(
                f"{path}: ledger schema version {None if row is None else row[0]}, the archive "
                f"reads version {SCHEMA_VERSION} (open it once with the coordinator to migrate)"
            )
        tables = {
            "settlements": conn.execute(_SETTLEMENTS_SQL, span).fetchall(),
            "clearings": conn.execute(_CLEARINGS_SQL, span).fetchall(),
            "awards": conn.execute(_AWARDS_SQL, span).fetchall(),
        }
        conn.execute("COMMIT")
    except sqlite3.Error as err:
        raise ArchiveError(f"{path}: cannot read the ledger: {err}") from err
    finally:
        conn.close()
    return tables


def _ledger_table(name: str, rows: list[tuple[Any, ...]], interval_s: int) -> pa.Table:
    """Rows as a table with ``ts`` and ``time`` (the interval's start) after ``interval``."""
    fields = _fields(name)
    columns: dict[str, pa.Array] = {}
    for i, (col, dtype) in enumerate(fields):
        columns[col] = pa.array([r[i] for r in rows], type=dtype)
        if col == "interval":
            starts = [float(r[0] * interval_s) for r in rows]
            columns["ts"] = pa.array(starts, type=pa.float64())
            columns["time"] = _timestamps_ms([round(s * 1000) for s in starts])
    return pa.table(columns)


# --- the telemetry ----------------------------------------------------------------------


def _series_selector(measurement: str) -> str:
    fields = "|".join(SCHEMA[measurement][1])
    return f'{{__name__=~"{measurement}_({fields})"}}'


def read_telemetry_day(
    url: str, measurement: str, start_ts: float, end_ts: float, *, timeout_s: float = 60.0
) -> pa.Table:
    """One measurement's points in ``[start_ts, end_ts)`` from VictoriaMetrics' export API,
    one row per series key and timestamp (tags, then every field; a field the point lacks
    is null). TelemetryUnavailable when the server cannot be read."""
    tags, fields = SCHEMA[measurement]
    params = {
        "match[]": _series_selector(measurement),
        "start": f"{start_ts:.3f}",
        "end": f"{end_ts:.3f}",
    }
    rows: dict[tuple[tuple[str, ...], int], dict[str, float]] = {}
    try:
        with (
            httpx.Client(timeout=timeout_s) as client,
            client.stream("GET", f"{url.rstrip('/')}/api/v1/export", params=params) as resp,
        ):
            if resp.status_code == 404:
                raise TelemetryUnavailable(
                    f"{url} has no /api/v1/export (an InfluxDB 2 server?): only "
                    "VictoriaMetrics' export API is supported for telemetry"
                )
            if resp.status_code != 200:
                resp.read()
                raise TelemetryUnavailable(
                    f"{url}/api/v1/export answered HTTP {resp.status_code}: {resp.text[:200]}"
                )
            for line in resp.iter_lines():
                if not line.strip():
                    continue
                series = json.loads(line)
                metric = series["metric"]
                field = str(metric["__name__"]).removeprefix(f"{measurement}_")
                key_tags = tuple(str(metric.get(t, "")) for t in tags)
                for ts_ms, value in zip(series["timestamps"], series["values"], strict=True):
                    if start_ts * 1000 <= ts_ms < end_ts * 1000:
                        rows.setdefault((key_tags, int(ts_ms)), {})[field] = value
    except httpx.HTTPError as err:
        raise TelemetryUnavailable(f"cannot read telemetry from {url}: {err}") from err
    except (ValueError, KeyError, TypeError) as err:
        raise TelemetryUnavailable(f"{url}/api/v1/export sent something unreadable: {err}") from err
    keys = sorted(rows, key=lambda k: (k[1], k[0]))
    columns: dict[str, pa.Array] = {
        "ts": pa.array([k[1] / 1000 for k in keys], type=pa.float64()),
        "time": _timestamps_ms([k[1] for k in keys]),
    }
    for i, tag in enumerate(tags):
        columns[tag] = pa.array([k[0][i] for k in keys], type=pa.string())
    for f in fields:
        values = [rows[k].get(f) for k in keys]
        if f in INTEGER_FIELDS:
            columns[f] = pa.array([None if v is None else int(v) for v in values], pa.int64())
        else:
            columns[f] = pa.array(values, type=pa.float64())
    return pa.table(columns)


# --- writing ----------------------------------------------------------------------------


def _write_part(directory: Path, table: pa.Table) -> Path:
    """``table`` as ``directory/part-0.parquet``, written beside it and renamed into place."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / PART
    temp = directory / f".{PART}.{os.getpid()}.tmp"
    try:
        pq.write_table(table, temp)
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target


def _write_by_day(out: Path, name: str, table: pa.Table) -> list[Path]:
    """One partition per UTC day of the ``ts`` column."""
    if table.num_rows == 0:
        return []
    days = [_date_of(ts) for ts in table.column("ts").to_pylist()]
    written = []
    for day in sorted(set(days)):
        mask = pa.array([d == day for d in days])
        written.append(_write_part(out / name / f"date={day.isoformat()}", table.filter(mask)))
    return written


@dataclass
class ExportResult:
    """What an export wrote: rows per dataset, the files, and why telemetry is missing."""

    rows: dict[str, int]
    files: list[Path]
    telemetry_error: str | None = None


def export_archive(
    out: Path,
    time_range: TimeRange,
    *,
    ledger: Path | LedgerLocation,
    interval_s: int,
    telemetry_url: str | None,
) -> ExportResult:
    """Write the archive of ``time_range`` into ``out`` (see the module docs).

    The ledger parts are always written; telemetry when ``telemetry_url`` is given and can
    be read (else ``telemetry_error`` says why, and the days already written are kept).
    """
    first, last = time_range.intervals(interval_s)
    tables = read_ledger_tables(ledger, first, last)
    result = ExportResult(rows={}, files=[])
    for name in LEDGER_DATASETS:
        table = _ledger_table(name, tables[name], interval_s)
        result.rows[name] = table.num_rows
        result.files += _write_by_day(out, name, table)
    if telemetry_url is None:
        result.telemetry_error = "no telemetry server given (--telemetry-url or [historian])"
        return result
    for name in TELEMETRY:
        result.rows[name] = 0
    try:
        for day, lo, hi in time_range.days():
            for name, measurement in TELEMETRY.items():
                table = read_telemetry_day(telemetry_url, measurement, lo, hi)
                if table.num_rows:
                    part = out / name / f"date={day.isoformat()}"
                    result.files.append(_write_part(part, table))
                    result.rows[name] += table.num_rows
    except TelemetryUnavailable as err:
        result.telemetry_error = str(err)
    return result
