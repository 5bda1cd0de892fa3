"""The historian: the coordinator's time series in InfluxDB 2 (v2 write API, influxdb-client).

Off by default: the coordinator runs one when its configuration has a ``[historian]`` section
(:func:`settings_from_config`). It records what the bus carries, one point per message and
device (a forecast gives one point per step)::

    settings = HistorianSettings.from_mapping(config["historian"], "coordinator.toml")
    async with Historian(settings) as historian:
        historian.record_telemetry("house-1", telemetry)     # never blocks, never raises I/O
        ...

Schema (the contract the Grafana dashboards in ``config/grafana/dashboards`` and their test
use; :data:`SCHEMA` holds the same as data and every point is checked against it)
-----------------------------------------------------------------------------------------

============  ==================  ==================================================================
measurement   tags                fields
============  ==================  ==================================================================
site          site                grid_power_w, pv_power_w, battery_power_w, load_power_w,
                                  battery_soc_pct, controller_code
device        site, device, kind  available, power_w, energy_wh, soc_pct, import_energy_wh,
                                  export_energy_wh, setpoint_w, rated_power_w, capacity_wh
clearing                          interval, price_per_kwh, volume_kwh, utility_import_kwh,
                                  utility_export_kwh, bids, retail_price_per_kwh,
                                  feed_in_price_per_kwh
award         site                interval, price_per_kwh, quantity_kwh
settlement    site                interval, energy_kwh, award_kwh, amount, imbalance_amount,
                                  rebate_amount, baseline_amount, savings, estimated
forecast      site                pv_power_w, load_power_w, price_per_kwh, lead_s
feeder        feeder              flow_w, import_limit_w, export_limit_w, mode_code
dispatch      site, priority      battery_power_w, load_limit_w, duration_s
dispatch_ack  site, outcome       acks, applied_battery_power_w, applied_load_limit_w
============  ==================  ==================================================================

Meaning (docs/architecture.md section 4 conventions: power positive when importing from the grid,
battery power positive when discharging, PV and load positive; prices in currency per kWh):

* ``site``: the site totals of one :class:`~broker.messages.Telemetry` message (fields that the
  message leaves out are not written; no point when it has none). ``controller_code`` is the
  edge's active control layer, :data:`CONTROLLER_CODES` (0 fallback, 1 market, 2 dispatch,
  3 emergency, 4 safety).
* ``device``: one point per :class:`~broker.messages.DeviceReading`; ``kind`` is the reading's
  kind; ``available`` is 1 or 0 (always written); the other fields when present.
* ``clearing``: one :class:`~broker.messages.Clearing`; the tariffs when the coordinator passes
  them to :meth:`Historian.record_clearing`.
* ``award``: one site's :class:`~broker.messages.Award` (``quantity_kwh`` positive = import).
* ``settlement``: one site's settled interval: ``energy_kwh`` metered (import positive),
  ``award_kwh``, ``amount`` what the site paid net in currency units (negative: it was paid),
  ``imbalance_amount`` the part of it for deviating from the award, ``rebate_amount`` the part
  the community account paid back (a credit, so negative like every amount the site received),
  ``baseline_amount`` what the utility alone would have billed,
  ``savings = baseline_amount - amount``, ``estimated`` 1 when the metering was estimated.
  Timestamp: the ``ts`` the caller gives (the interval's start).
* ``forecast``: one point per step at its target time ``start_ts + i * step_s``; ``lead_s`` is
  how far ahead of the forecast's ``ts`` that target lies. A newer forecast overwrites the older
  one's values at the same target times (InfluxDB keeps the last write of a point).
* ``feeder``: one :class:`~broker.messages.GridState`; ``mode_code`` is :data:`MODE_CODES`
  (0 normal, 1 constrained, 2 emergency).
* ``dispatch``: a :class:`~broker.messages.Dispatch` sent to a site (``duration_s`` until it
  expires); ``dispatch_ack``: the site's :class:`~broker.messages.DispatchAck` (``acks`` is 1,
  so a sum counts acknowledgements per ``outcome``).

Every value is numeric: floats, except ``interval``, ``bids``, ``available``, ``estimated``,
``acks``, ``controller_code`` and ``mode_code`` which are integers (:data:`INTEGER_FIELDS`; a
field's type never changes, which InfluxDB requires). Strings would be lost on servers that
take numbers only (VictoriaMetrics stores them as 0), hence the codes. Timestamps are the
message ``ts`` (float seconds since the epoch) written with millisecond precision: a float's
resolution at today's epoch is below a microsecond, VictoriaMetrics keeps milliseconds, and no
two messages of one series are that close.

Writing, failures and the disk buffer
-------------------------------------
``record_*`` only turns the message into line protocol and appends it to an in-memory queue:
it never blocks on I/O. One asyncio task (``historian-writer``, in the historian's TaskGroup)
sends the queue in batches of ``batch_size`` points, at the latest every ``flush_interval_s``,
through influxdb-client's *synchronous* write API run in a worker thread
(``asyncio.to_thread``). Its batching mode is not used because it reports failures only to a
callback; here every failure is an exception the writer handles:

1. A failed write (connection error, timeout, HTTP 5xx, 401/403/404, 429) is retried up to
   ``retries`` times, waiting a jittered, doubling delay from ``retry_backoff_s`` capped at
   ``retry_backoff_max_s``. Retried points are counted in ``retried``.
2. Past the retries, the batch and everything queued behind it go into the disk buffer
   (:class:`PointBuffer`, one SQLite file at ``buffer_path``), counted in ``buffered``. From
   then on, to keep the order, every new point goes to the buffer too until it is empty again;
   the writer tries the oldest ``batch_size`` buffered points once per (growing, capped) delay
   and, once a write succeeds, replays the whole buffer oldest first (``replayed``), deleting
   each batch only after the server acknowledged it. A buffer left by a previous run is replayed
   the same way after start (``recovered``).
3. The buffer holds at most ``buffer_max_points``; beyond that the OLDEST points are deleted
   (the newest readings are worth the most). They are counted in ``dropped`` and a warning is
   logged when dropping starts and when the episode ends. The in-memory queue is bounded by
   ``max_pending_points`` the same way (it only grows when the disk buffer itself fails).
4. A batch the server refuses as invalid (HTTP 400 or 422) is not retried: its points are
   counted in ``rejected`` and logged with the server's message. The historian writes only
   points it checked against :data:`SCHEMA`, so this means a server-side conflict (e.g. a
   field type written differently by someone else).

Nothing is dropped silently: at any quiet moment ``recorded + recovered == written + rejected +
dropped + pending + buffer_points`` (:class:`HistorianStats`). A point is at risk only while it
is in memory (at most ``flush_interval_s`` plus one write with its retries); closing the
historian writes or buffers everything, and a cancelled writer moves its queue to the buffer.
A write whose response was lost may be sent again; the server keeps one copy (same series and
timestamp), so replays are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import re
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self
from urllib.parse import urlsplit

from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic import model_validator as _model_validator

from broker.messages import (
    Award,
    Clearing,
    Dispatch,
    DispatchAck,
    Forecast,
    GridState,
    Telemetry,
)
from coordinator.ledger import MICRO, SettlementResult

__all__ = [
    "CONTROLLER_CODES",
    "INTEGER_FIELDS",
    "MODE_CODES",
    "SCHEMA",
    "Historian",
    "HistorianClosed",
    "HistorianConfigError",
    "HistorianError",
    "HistorianSettings",
    "HistorianStats",
    "PointBuffer",
    "settings_from_config",
]

logger = logging.getLogger(__name__)

#: measurement -> (tags, fields): everything the historian writes. The Grafana dashboards'
#: queries are checked against this (tests/test_grafana_config.py).
SCHEMA: Final[Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "site": (
        ("site",),
        (
            "grid_power_w",
            "pv_power_w",
            "battery_power_w",
            "load_power_w",
            "battery_soc_pct",
            "controller_code",
        ),
    ),
    "device": (
        ("site", "device", "kind"),
        (
            "available",
            "power_w",
            "energy_wh",
            "soc_pct",
            "import_energy_wh",
            "export_energy_wh",
            "setpoint_w",
            "rated_power_w",
            "capacity_wh",
        ),
    ),
    "clearing": (
        (),
        (
            "interval",
            "price_per_kwh",
            "volume_kwh",
            "utility_import_kwh",
            "utility_export_kwh",
            "bids",
            "retail_price_per_kwh",
            "feed_in_price_per_kwh",
        ),
    ),
    "award": (("site",), ("interval", "price_per_kwh", "quantity_kwh")),
    "settlement": (
        ("site",),
        (
            "interval",
            "energy_kwh",
            "award_kwh",
            "amount",
            "imbalance_amount",
            "rebate_amount",
            "baseline_amount",
            "savings",
            "estimated",
        ),
    ),
    "forecast": (("site",), ("pv_power_w", "load_power_w", "price_per_kwh", "lead_s")),
    "feeder": (("feeder",), ("flow_w", "import_limit_w", "export_limit_w", "mode_code")),
    "dispatch": (("site", "priority"), ("battery_power_w", "load_limit_w", "duration_s")),
    "dispatch_ack": (
        ("site", "outcome"),
        ("acks", "applied_battery_power_w", "applied_load_limit_w"),
    ),
}

#: Fields written as integers; every other field is a float.
INTEGER_FIELDS: Final = frozenset(
    {"interval", "bids", "available", "estimated", "acks", "controller_code", "mode_code"}
)
#: ``Telemetry.controller`` -> ``site.controller_code`` (ordered by precedence, lowest first).
CONTROLLER_CODES: Final[Mapping[str, int]] = {
    "fallback": 0,
    "market": 1,
    "dispatch": 2,
    "emergency": 3,
    "safety": 4,
}
#: ``GridState.mode`` -> ``feeder.mode_code``.
MODE_CODES: Final[Mapping[str, int]] = {"normal": 0, "constrained": 1, "emergency": 2}

#: Timestamps are written in milliseconds (see the module docs).
PRECISION: Final = WritePrecision.MS

_WH_PER_KWH: Final = 1000
_REJECTED_STATUS: Final = frozenset({400, 422})
_MAX_ERROR_CHARS: Final = 300

_SCHEMA_SETS: Final = {m: (frozenset(t), frozenset(f)) for m, (t, f) in SCHEMA.items()}


# --- errors -------------------------------------------------------------------------------


class HistorianError(Exception):
    """Base of the historian's errors."""


class HistorianConfigError(HistorianError, ValueError):
    """The ``[historian]`` section is wrong; the message names the file and the field."""


class HistorianClosed(HistorianError):
    """A point was recorded after the historian was closed (or while it closes)."""


# --- settings -----------------------------------------------------------------------------

_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class HistorianSettings(BaseModel):
    """Where and how to write. In a TOML file the token is not given: ``token_env`` names the
    environment variable holding it (see :meth:`from_mapping`).

    Relative ``buffer_path`` values are relative to the coordinator's working directory.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="InfluxDB 2 base URL, e.g. http://127.0.0.1:8086")
    org: str = Field(min_length=1, max_length=256)
    bucket: str = Field(min_length=1, max_length=256)
    token: str = Field(min_length=1, repr=False, description="API token (write access)")
    batch_size: int = Field(default=1000, ge=1, le=50_000, description="points per request")
    flush_interval_s: float = Field(default=1.0, gt=0, le=3600)
    timeout_s: float = Field(default=10.0, gt=0, le=600, description="per HTTP request")
    retries: int = Field(default=3, ge=0, le=100, description="retries of a failed write")
    retry_backoff_s: float = Field(default=0.5, gt=0, le=3600, description="first retry delay")
    retry_backoff_max_s: float = Field(default=30.0, gt=0, le=86400)
    buffer_path: Path = Path("historian-buffer.sqlite")
    buffer_max_points: int = Field(default=1_000_000, ge=1, le=1_000_000_000)
    max_pending_points: int = Field(default=100_000, ge=1, le=100_000_000)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools(cls, value: object) -> object:
        # pydantic would read true as 1; no setting is a flag, so a bool is a mistake.
        if isinstance(value, bool):
            raise ValueError("must be a number or string, not a boolean")  # noqa: TRY004
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return value.rstrip("/")

    @_model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.retry_backoff_max_s < self.retry_backoff_s:
            raise ValueError("retry_backoff_max_s must be >= retry_backoff_s")
        if self.max_pending_points < self.batch_size:
            raise ValueError("max_pending_points must be >= batch_size")
        return self

    @classmethod
    def from_mapping(
        cls,
        section: Mapping[str, object],
        source: str,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> HistorianSettings:
        """Validate a ``[historian]`` TOML section read from ``source`` (a file name).

        Keys: ``url``, ``org``, ``bucket``, ``token_env`` (default ``WATTMESH_INFLUX_TOKEN``:
        the environment variable holding the token) and the optional tuning fields of this
        class. Raises :class:`HistorianConfigError` naming ``source`` and the field
        (``coordinator.toml: historian.batch_size: ...``).
        """
        env = os.environ if environ is None else environ
        if not isinstance(section, Mapping):
            raise HistorianConfigError(f"{source}: historian: must be a table")
        data = dict(section)
        errors: list[str] = []
        if "token" in data:
            errors.append(
                f"{source}: historian.token: do not put the token in the file; set the "
                "environment variable named by historian.token_env"
            )
            del data["token"]
        token_env = data.pop("token_env", "WATTMESH_INFLUX_TOKEN")
        if not isinstance(token_env, str) or not re.match(_ENV_NAME, token_env):
            errors.append(
                f"{source}: historian.token_env: must be an environment variable name, "
                f"got {token_env!r}"
            )
        else:
            token = env.get(token_env, "")
            if not token:
                errors.append(
                    f"{source}: historian.token_env: the environment variable {token_env} "
                    "is not set (it must hold the InfluxDB API token)"
                )
            data["token"] = token or "unset"
        try:
            settings = cls.model_validate(data)
        except ValidationError as err:
            for e in err.errors():
                where = ".".join(str(p) for p in e["loc"])
                field = f"historian.{where}" if where else "historian"
                errors.append(f"{source}: {field}: {e['msg']}")
        if errors:
            raise HistorianConfigError("\n".join(errors))
        return settings


def settings_from_config(
    config: Mapping[str, object], source: str, *, environ: Mapping[str, str] | None = None
) -> HistorianSettings | None:
    """The historian's settings from a whole coordinator configuration, or ``None`` (off)
    when it has no ``[historian]`` section."""
    section = config.get("historian")
    if section is None:
        return None
    if not isinstance(section, Mapping):
        raise HistorianConfigError(f"{source}: historian: must be a table")
    return HistorianSettings.from_mapping(section, source, environ=environ)


# --- points -------------------------------------------------------------------------------


def _ts_ms(ts: float) -> int:
    if not math.isfinite(ts) or ts <= 0:
        raise ValueError(f"ts must be a positive finite number of seconds, got {ts!r}")
    return round(ts * 1000)


#: Tag values: printable, no backslash (line protocol escapes commas, equals signs, spaces).
_TAG_VALUE = re.compile(r"^[^\\\x00-\x1f\x7f]{1,256}$")
_ESCAPE = str.maketrans({",": "\\,", "=": "\\=", " ": "\\ "})


def _tag(name: str, value: str) -> str:
    if not isinstance(value, str) or not _TAG_VALUE.match(value):
        raise ValueError(
            f"tag {name} must be 1-256 printable characters without a backslash, got {value!r}"
        )
    return value.translate(_ESCAPE)


def _line(
    measurement: str,
    tags: Mapping[str, str],
    fields: Mapping[str, float | int | bool | None],
    ts_ms: int,
) -> str | None:
    """One point in line protocol (``None`` when it has no field), checked against SCHEMA.

    Measurement, tag and field names come from SCHEMA (letters, digits, underscores: nothing
    to escape); tags are sorted by name, as InfluxDB recommends.
    """
    tag_names, field_names = _SCHEMA_SETS[measurement]
    if not tags.keys() <= tag_names or not fields.keys() <= field_names:
        raise AssertionError(f"{measurement}: {tags.keys()} / {fields.keys()} not in SCHEMA")
    parts: list[str] = []
    for name, value in fields.items():
        if value is None:
            continue
        if name in INTEGER_FIELDS:
            parts.append(f"{name}={int(value)}i")
        else:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"{measurement}.{name} must be finite, got {value!r}")
            parts.append(f"{name}={number!r}")
    if not parts:
        return None
    key = measurement + "".join(f",{k}={_tag(k, tags[k])}" for k in sorted(tags))
    return f"{key} {','.join(parts)} {ts_ms}"


def _lines(*candidates: str | None) -> list[str]:
    return [c for c in candidates if c is not None]


def _telemetry_lines(site: str, msg: Telemetry) -> list[str]:
    """``site`` and ``device`` points of one telemetry message."""
    ts = _ts_ms(msg.ts)
    out = _lines(
        _line(
            "site",
            {"site": site},
            {
                "grid_power_w": msg.grid_power_w,
                "pv_power_w": msg.pv_power_w,
                "battery_power_w": msg.battery_power_w,
                "load_power_w": msg.load_power_w,
                "battery_soc_pct": msg.battery_soc_pct,
                "controller_code": (
                    None if msg.controller is None else CONTROLLER_CODES[msg.controller]
                ),
            },
            ts,
        )
    )
    for d in msg.devices:
        out += _lines(
            _line(
                "device",
                {"site": site, "device": d.device, "kind": d.kind},
                {
                    "available": int(d.available),
                    "power_w": d.power_w,
                    "energy_wh": d.energy_wh,
                    "soc_pct": d.soc_pct,
                    "import_energy_wh": d.import_energy_wh,
                    "export_energy_wh": d.export_energy_wh,
                    "setpoint_w": d.setpoint_w,
                    "rated_power_w": d.rated_power_w,
                    "capacity_wh": d.capacity_wh,
                },
                ts,
            )
        )
    return out


# --- the disk buffer ----------------------------------------------------------------------

#: ``PRAGMA application_id`` of a historian buffer ("WMHB").
BUFFER_APPLICATION_ID: Final = 0x574D4842
_BUFFER_VERSION: Final = 1


class PointBuffer:
    """A bounded FIFO of line-protocol points in one SQLite file (millisecond timestamps).

    ``append`` commits its points in one transaction and, past ``max_points``, deletes the
    oldest in the same transaction, returning how many it deleted. ``peek`` reads the oldest,
    ``remove_through`` deletes them once written. Sequence numbers only grow. WAL journal with
    ``synchronous=NORMAL``: an appended point survives the process being killed. The file is
    locked exclusively while open (a second coordinator on it gets :class:`HistorianError`).
    Thread-safe (one lock), so the writer may call it from worker threads.
    """

    def __init__(self, path: str | os.PathLike[str], max_points: int) -> None:
        if max_points < 1:
            raise ValueError("max_points must be >= 1")
        self.path = Path(path)
        self.max_points = max_points
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=1.0
            )
        except (OSError, sqlite3.Error) as err:
            raise HistorianError(f"{self.path}: cannot open the historian buffer: {err}") from err
        try:
            self._setup()
            row = self._db.execute("SELECT count(*) FROM points").fetchone()
        except sqlite3.Error as err:
            self._db.close()
            raise HistorianError(f"{self.path}: not a usable historian buffer: {err}") from err
        self._count: int = row[0]

    def _setup(self) -> None:
        db = self._db
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id == 0 and tables == 0:
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "CREATE TABLE points (seq INTEGER PRIMARY KEY AUTOINCREMENT, line TEXT NOT NULL)"
            )
            db.execute(f"PRAGMA application_id={BUFFER_APPLICATION_ID}")
            db.execute(f"PRAGMA user_version={_BUFFER_VERSION}")
            db.execute("COMMIT")
        elif app_id != BUFFER_APPLICATION_ID:
            raise sqlite3.DatabaseError("the file is another SQLite database")
        else:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version != _BUFFER_VERSION:
                raise sqlite3.DatabaseError(f"buffer version {version}, expected 1")

    def __len__(self) -> int:
        return self._count

    def append(self, lines: Sequence[str]) -> int:
        """Store ``lines`` after the existing points; return how many old points the bound
        forced out (the oldest first; also the oldest of ``lines`` if they alone exceed it)."""
        if not lines:
            return 0
        with self._lock:
            skipped = max(0, len(lines) - self.max_points)
            keep = lines[skipped:]
            excess = max(0, self._count + len(keep) - self.max_points)
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                if excess:
                    db.execute(
                        "DELETE FROM points WHERE seq IN "
                        "(SELECT seq FROM points ORDER BY seq LIMIT ?)",
                        (excess,),
                    )
                db.executemany("INSERT INTO points (line) VALUES (?)", ((x,) for x in keep))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._count += len(keep) - excess
            return excess + skipped

    def peek(self, limit: int) -> list[tuple[int, str]]:
        """The oldest ``limit`` points as ``(seq, line)``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, line FROM points ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [(int(seq), str(line)) for seq, line in rows]

    def remove_through(self, seq: int) -> int:
        """Delete every point up to and including ``seq``; return how many."""
        with self._lock:
            cur = self._db.execute("DELETE FROM points WHERE seq <= ?", (seq,))
            self._count -= cur.rowcount
            return int(cur.rowcount)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the historian ------------------------------------------------------------------------


@dataclass(frozen=True)
class HistorianStats:
    """Counts of points since the historian started (a snapshot).

    ``recorded``: accepted by ``record_*``; ``recovered``: found in the disk buffer at start;
    ``written``: acknowledged by the server (``replayed`` of them came from the disk buffer);
    ``retried``: re-sent after a failed attempt (once per retry); ``write_errors``: failed
    requests; ``buffered``: moved to the disk buffer; ``dropped``: forced out by a bound;
    ``rejected``: refused by the server as invalid; ``pending``: in memory now;
    ``buffer_points``: in the disk buffer now. When nothing is in flight,
    ``recorded + recovered == written + rejected + dropped + pending + buffer_points``.
    """

    recorded: int = 0
    recovered: int = 0
    written: int = 0
    replayed: int = 0
    retried: int = 0
    write_errors: int = 0
    buffered: int = 0
    dropped: int = 0
    rejected: int = 0
    pending: int = 0
    buffer_points: int = 0


@dataclass
class _Counts:
    recorded: int = 0
    recovered: int = 0
    written: int = 0
    replayed: int = 0
    retried: int = 0
    write_errors: int = 0
    buffered: int = 0
    dropped: int = 0
    rejected: int = 0


@dataclass(frozen=True)
class _Result:
    ok: bool
    rejected: bool = False
    error: str = ""


State = Literal["new", "running", "closing", "closed"]


class Historian:
    """Records messages as InfluxDB points; an async context manager (see the module docs).

    ``record_*`` may be called before entering (points wait in memory) and while running;
    after closing they raise :class:`HistorianClosed`. They raise ``ValueError`` for an empty
    tag or a non-finite number and return how many points they queued.
    """

    def __init__(self, settings: HistorianSettings) -> None:
        self.settings = settings
        self._state: State = "new"
        self._pending: deque[str] = deque()
        self._counts = _Counts()
        self._handled = 0  # recorded points that are written, buffered, rejected or dropped
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._buffer: PointBuffer | None = None
        self._client: Any = None
        self._write_api: Any = None
        self._tg: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: list[str] = []
        self._probe_delay_s = settings.retry_backoff_s
        self._next_probe = 0.0
        self._outage_since: float | None = None
        self._dropping = False
        self._dropped_in_episode = 0
        self._last_error = ""

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """``new``, ``running``, ``closing`` or ``closed``."""
        return self._state

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise HistorianError(f"a historian can be started once (it is {self._state})")
        s = self.settings
        self._buffer = await asyncio.to_thread(PointBuffer, s.buffer_path, s.buffer_max_points)
        self._counts.recovered = len(self._buffer)
        if self._counts.recovered:
            logger.info(
                "historian: %d points left in %s by a previous run; replaying them",
                self._counts.recovered,
                s.buffer_path,
            )
        self._client = InfluxDBClient(
            url=s.url, token=s.token, org=s.org, timeout=round(s.timeout_s * 1000)
        )
        self._write_api = self._client.write_api(write_options=SYNCHRONOUS)
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._task = self._tg.create_task(self._run(), name="historian-writer")
        self._state = "running"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._state != "running":
            return
        self._state = "closing"
        self._wake.set()
        tg, task = self._tg, self._task
        assert tg is not None
        assert task is not None
        try:
            # A final drain (write, else buffer), also when the body raised an error; unless
            # it was cancelled or interrupted: then the TaskGroup cancels the writer, which
            # moves its queue to the disk buffer. The body's own exception propagates as it is.
            graceful = exc_type is None or issubclass(exc_type, Exception)
            try:
                if graceful:
                    await asyncio.wait([task])
            except BaseException as err:
                await tg.__aexit__(type(err), err, err.__traceback__)
                raise
            if graceful:
                await tg.__aexit__(None, None, None)
            else:
                await tg.__aexit__(exc_type, exc, tb)
        finally:
            self._state = "closed"
            self._release_waiters()
            if self._client is not None:
                await asyncio.to_thread(self._client.close)
            if self._buffer is not None:
                self._buffer.close()
            s = self.stats()
            logger.info(
                "historian closed: %d recorded, %d written, %d buffered on disk now, "
                "%d dropped, %d rejected",
                s.recorded,
                s.written,
                s.buffer_points,
                s.dropped,
                s.rejected,
            )

    def stats(self) -> HistorianStats:
        """A snapshot of the counters (see :class:`HistorianStats`)."""
        c = self._counts
        return HistorianStats(
            recorded=c.recorded,
            recovered=c.recovered,
            written=c.written,
            replayed=c.replayed,
            retried=c.retried,
            write_errors=c.write_errors,
            buffered=c.buffered,
            dropped=c.dropped,
            rejected=c.rejected,
            pending=len(self._pending) + len(self._inflight),
            buffer_points=0 if self._buffer is None else len(self._buffer),
        )

    async def flush(self) -> None:
        """Wait until every point recorded so far is written, buffered on disk, or counted
        as dropped or rejected (it does not wait for the disk buffer to be replayed)."""
        if self._state != "running":
            raise HistorianClosed(f"the historian is {self._state}")
        target = self._counts.recorded
        if self._handled >= target:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, fut))
        self._wake.set()
        await fut

    def _mark_handled(self, n: int) -> None:
        self._handled += n
        still = []
        for target, fut in self._waiters:
            if self._handled >= target:
                if not fut.done():
                    fut.set_result(None)
            else:
                still.append((target, fut))
        self._waiters = still

    def _release_waiters(self) -> None:
        for _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(HistorianClosed("the historian closed"))
        self._waiters = []

    # -- recording ------------------------------------------------------------------------

    def _enqueue(self, lines: list[str]) -> int:
        if self._state in ("closing", "closed"):
            raise HistorianClosed(f"cannot record: the historian is {self._state}")
        self._pending.extend(lines)
        self._counts.recorded += len(lines)
        over = len(self._pending) - self.settings.max_pending_points
        if over > 0:
            for _ in range(over):
                self._pending.popleft()
            self._drop(over, where="the memory queue")
            self._mark_handled(over)
        if len(self._pending) >= self.settings.batch_size:
            self._wake.set()
        return len(lines)

    def record_telemetry(self, site: str, msg: Telemetry) -> int:
        """One ``site`` point (site totals) and one ``device`` point per device reading."""
        return self._enqueue(_telemetry_lines(site, msg))

    def record_clearing(
        self,
        msg: Clearing,
        *,
        retail_price_per_kwh: float | None = None,
        feed_in_price_per_kwh: float | None = None,
    ) -> int:
        """One ``clearing`` point, with the interval's tariffs when given."""
        line = _line(
            "clearing",
            {},
            {
                "interval": msg.interval,
                "price_per_kwh": msg.price_per_kwh,
                "volume_kwh": msg.volume_kwh,
                "utility_import_kwh": msg.utility_import_kwh,
                "utility_export_kwh": msg.utility_export_kwh,
                "bids": msg.bids,
                "retail_price_per_kwh": retail_price_per_kwh,
                "feed_in_price_per_kwh": feed_in_price_per_kwh,
            },
            _ts_ms(msg.ts),
        )
        return self._enqueue(_lines(line))

    def record_award(self, site: str, msg: Award) -> int:
        """One ``award`` point for ``site``."""
        line = _line(
            "award",
            {"site": site},
            {
                "interval": msg.interval,
                "price_per_kwh": msg.price_per_kwh,
                "quantity_kwh": msg.quantity_kwh,
            },
            _ts_ms(msg.ts),
        )
        return self._enqueue(_lines(line))

    def record_settlement(
        self,
        interval: int,
        site: str,
        energy_kwh: float,
        amount: float,
        *,
        ts: float,
        award_kwh: float | None = None,
        imbalance_amount: float | None = None,
        rebate_amount: float | None = None,
        baseline_amount: float | None = None,
        estimated: bool = False,
    ) -> int:
        """One ``settlement`` point: ``site``'s metered ``energy_kwh`` (import positive) and
        the ``amount`` it paid net (currency; negative: it was paid) for ``interval``, at
        ``ts`` (seconds; normally the interval's start). ``savings`` is written when
        ``baseline_amount`` is given."""
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
            raise ValueError(f"interval must be an int >= 0, got {interval!r}")
        savings = None if baseline_amount is None else baseline_amount - amount
        line = _line(
            "settlement",
            {"site": site},
            {
                "interval": interval,
                "energy_kwh": energy_kwh,
                "award_kwh": award_kwh,
                "amount": amount,
                "imbalance_amount": imbalance_amount,
                "rebate_amount": rebate_amount,
                "baseline_amount": baseline_amount,
                "savings": savings,
                "estimated": int(estimated),
            },
            _ts_ms(ts),
        )
        return self._enqueue(_lines(line))

    def record_settlement_result(self, result: SettlementResult, *, ts: float) -> int:
        """One ``settlement`` point per site of a ledger :class:`SettlementResult` at ``ts``.

        ``baseline_amount`` is the site's metered energy billed by the utility alone: at the
        retail tariff when it imported, at the feed-in tariff (a credit) when it exported.
        """
        count = 0
        for s in result.sites:
            tariff = (
                result.retail_price_micro_per_kwh
                if s.metered_wh > 0
                else result.feed_in_price_micro_per_kwh
            )
            count += self.record_settlement(
                result.interval,
                s.site,
                s.metered_wh / _WH_PER_KWH,
                -s.total_micro / MICRO,
                ts=ts,
                award_kwh=s.award_wh / _WH_PER_KWH,
                imbalance_amount=-s.imbalance_micro / MICRO,
                rebate_amount=-s.rebate_micro / MICRO,
                baseline_amount=s.metered_wh * tariff / _WH_PER_KWH / MICRO,
                estimated=s.estimated,
            )
        return count

    def record_forecast(self, site: str, msg: Forecast) -> int:
        """One ``forecast`` point per step, at the step's target time."""
        out: list[str] = []
        for i, (pv, load, price) in enumerate(
            zip(msg.pv_power_w, msg.load_power_w, msg.price_per_kwh, strict=True)
        ):
            target = msg.start_ts + i * msg.step_s
            out += _lines(
                _line(
                    "forecast",
                    {"site": site},
                    {
                        "pv_power_w": pv,
                        "load_power_w": load,
                        "price_per_kwh": price,
                        "lead_s": target - msg.ts,
                    },
                    _ts_ms(target),
                )
            )
        return self._enqueue(out)

    def record_grid_state(self, feeder: str, msg: GridState) -> int:
        """One ``feeder`` point."""
        line = _line(
            "feeder",
            {"feeder": feeder},
            {
                "flow_w": msg.flow_w,
                "import_limit_w": msg.import_limit_w,
                "export_limit_w": msg.export_limit_w,
                "mode_code": MODE_CODES[msg.mode],
            },
            _ts_ms(msg.ts),
        )
        return self._enqueue(_lines(line))

    def record_dispatch(self, site: str, msg: Dispatch | DispatchAck) -> int:
        """A ``dispatch`` point for a command sent to ``site``, a ``dispatch_ack`` point for
        the site's acknowledgement."""
        if isinstance(msg, Dispatch):
            line = _line(
                "dispatch",
                {"site": site, "priority": msg.priority},
                {
                    "battery_power_w": msg.battery_power_w,
                    "load_limit_w": msg.load_limit_w,
                    "duration_s": msg.expires_ts - msg.ts,
                },
                _ts_ms(msg.ts),
            )
        else:
            line = _line(
                "dispatch_ack",
                {"site": site, "outcome": msg.outcome},
                {
                    "acks": 1,
                    "applied_battery_power_w": msg.applied_battery_power_w,
                    "applied_load_limit_w": msg.applied_load_limit_w,
                },
                _ts_ms(msg.ts),
            )
        return self._enqueue(_lines(line))

    # -- the writer -----------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        buffer = self._buffer
        assert buffer is not None
        try:
            while True:
                final = self._state != "running"
                try:
                    await self._cycle(final=final)
                except Exception:
                    logger.exception("historian: unexpected error; the points stay queued")
                    if not final:
                        await asyncio.sleep(self._backoff())
                        continue
                if final:
                    break
                timeout = self.settings.flush_interval_s
                if len(buffer):
                    timeout = min(timeout, max(0.0, self._next_probe - loop.time()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                self._wake.clear()
        except asyncio.CancelledError:
            # Cancelled (the coordinator is going down hard): keep what is in memory on disk.
            self._spill_rest()
            raise
        self._spill_rest()

    def _spill_rest(self) -> None:
        rest = self._inflight + list(self._pending)
        self._inflight = []
        self._pending.clear()
        if rest:
            self._spill_sync(rest)

    async def _cycle(self, *, final: bool) -> None:
        buffer = self._buffer
        assert buffer is not None
        loop = asyncio.get_running_loop()
        if len(buffer):
            await self._spill_pending()
            if final or loop.time() >= self._next_probe:
                await self._replay(final=final)
            return
        while self._pending:
            n = min(self.settings.batch_size, len(self._pending))
            self._inflight = [self._pending.popleft() for _ in range(n)]
            ok = await self._write_with_retries(self._inflight)
            if ok:
                self._inflight = []
                self._mark_handled(n)
                continue
            batch, self._inflight = self._inflight, []
            self._pending.extendleft(reversed(batch))
            self._start_outage()
            await self._spill_pending()
            self._next_probe = loop.time() + self._backoff()
            return

    def _backoff(self) -> float:
        delay = self._probe_delay_s
        self._probe_delay_s = min(delay * 2, self.settings.retry_backoff_max_s)
        return delay * random.uniform(0.5, 1.0)  # jitter, not cryptography

    def _start_outage(self) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            logger.warning(
                "historian: cannot write to %s (%s); keeping points in %s until it is back",
                self.settings.url,
                self._last_error,
                self.settings.buffer_path,
            )

    async def _post(self, lines: Sequence[str]) -> _Result:
        body = "\n".join(lines)
        try:
            await asyncio.to_thread(
                self._write_api.write,
                bucket=self.settings.bucket,
                org=self.settings.org,
                record=body,
                write_precision=PRECISION,
            )
        except ApiException as err:
            self._counts.write_errors += 1
            detail = f"HTTP {err.status} {err.reason}: {(err.body or '')!s}"[:_MAX_ERROR_CHARS]
            self._last_error = detail
            return _Result(ok=False, rejected=err.status in _REJECTED_STATUS, error=detail)
        except Exception as err:  # connection errors, timeouts: urllib3 and OSError variants
            self._counts.write_errors += 1
            self._last_error = f"{type(err).__name__}: {err}"[:_MAX_ERROR_CHARS]
            return _Result(ok=False, error=self._last_error)
        return _Result(ok=True)

    def _reject(self, lines: Sequence[str], error: str) -> None:
        self._counts.rejected += len(lines)
        logger.error(
            "historian: the server rejected %d points as invalid (%s); first: %s",
            len(lines),
            error,
            lines[0][:200],
        )

    async def _write_with_retries(self, batch: list[str]) -> bool:
        """True when the batch is handled (written or rejected), False when it failed."""
        delay = self.settings.retry_backoff_s
        for attempt in range(self.settings.retries + 1):
            if attempt:
                self._counts.retried += len(batch)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.settings.retry_backoff_max_s)
            result = await self._post(batch)
            if result.ok:
                self._counts.written += len(batch)
                return True
            if result.rejected:
                self._reject(batch, result.error)
                return True
            logger.debug("historian: write attempt %d failed: %s", attempt + 1, result.error)
        return False

    async def _spill_pending(self) -> None:
        if not self._pending:
            return
        lines = list(self._pending)
        self._pending.clear()
        self._inflight = lines  # a cancelled writer spills these again (duplicates are harmless)
        try:
            dropped = await asyncio.to_thread(self._append_to_buffer, lines)
        except Exception:
            # Keep them in memory (the memory bound applies) and let the caller log.
            self._inflight = []
            self._pending.extendleft(reversed(lines))
            raise
        self._inflight = []
        self._counts.buffered += len(lines)
        if dropped:
            self._drop(dropped, where=f"disk buffer {self.settings.buffer_path}")
        self._mark_handled(len(lines))

    def _append_to_buffer(self, lines: Sequence[str]) -> int:
        assert self._buffer is not None
        return self._buffer.append(lines)

    def _spill_sync(self, lines: Sequence[str]) -> None:
        try:
            dropped = self._append_to_buffer(lines)
        except Exception:
            self._drop(len(lines), where="shutdown (the disk buffer failed)")
            logger.exception("historian: could not keep %d points on disk", len(lines))
            return
        self._counts.buffered += len(lines)
        if dropped:
            self._drop(dropped, where=f"disk buffer {self.settings.buffer_path}")
        self._mark_handled(len(lines))

    def _drop(self, n: int, *, where: str) -> None:
        self._counts.dropped += n
        self._dropped_in_episode += n
        if not self._dropping:
            self._dropping = True
            logger.warning(
                "historian: %s is full: dropping the oldest points (%d so far); raise "
                "buffer_max_points or fix the connection to %s",
                where,
                self._counts.dropped,
                self.settings.url,
            )

    def _end_drop_episode(self) -> None:
        if self._dropping:
            logger.warning(
                "historian: stopped dropping points; %d were dropped in this episode",
                self._dropped_in_episode,
            )
            self._dropping = False
            self._dropped_in_episode = 0

    async def _replay(self, *, final: bool) -> None:
        buffer = self._buffer
        assert buffer is not None
        loop = asyncio.get_running_loop()
        replayed = 0
        while len(buffer):
            rows = await asyncio.to_thread(buffer.peek, self.settings.batch_size)
            if not rows:
                break
            lines = [line for _, line in rows]
            result = await self._post(lines)
            if not result.ok and not result.rejected:
                self._start_outage()
                self._next_probe = loop.time() + self._backoff()
                logger.debug("historian: replay attempt failed: %s", result.error)
                return
            await asyncio.to_thread(buffer.remove_through, rows[-1][0])
            if result.ok:
                self._counts.written += len(lines)
                self._counts.replayed += len(lines)
                replayed += len(lines)
            else:
                self._reject(lines, result.error)
            if not final:
                await self._spill_pending()  # keep memory small during a long replay
        self._probe_delay_s = self.settings.retry_backoff_s
        self._end_drop_episode()
        since = self._outage_since
        self._outage_since = None
        logger.info(
            "historian: %s is back%s; replayed %d points from the disk buffer",
            self.settings.url,
            "" if since is None else f" after {time.monotonic() - since:.1f} s",
            replayed,
        )
