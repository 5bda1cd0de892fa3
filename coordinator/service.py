"""The coordinator service: ingest, forecasts, market clearing, settlement, grid balancing.

One MQTT session (coordinator credentials) and four clock-driven tasks:

- ingest: every site's status, telemetry, bids and dispatch acks, validated (invalid messages
  are counted per site and logged once per site and topic); a site's identity is its topic.
  Telemetry is deduplicated by a per-site high-water mark of (ts, id), kept in bounded numpy
  ring buffers for forecasting, and integrated into metered energy per market interval
  (sample and hold: a reading's power holds until the next reading).
- market: at each gate closure, clear the interval's bids (coordinator.market) with the
  utility as outside option, publish each bidder's award and the retained clearing.
- settlement: ``settle_delay_s`` after an interval ends, settle it in the ledger from metered
  energy against awards (idempotent; a site with no telemetry is settled as its award and
  flagged estimated).
- forecasts: before each gate, publish every site's PV, load and price forecast (retained),
  computed for many sites at once in a worker thread so that ingest goes on meanwhile.
- grid: every ``period_s``, the feeder's net flow from the latest telemetry; when it nears a
  limit, dispatch batteries with headroom pro rata (then load limits to consumers), re-issued
  while needed and left to expire when not; the grid state is published retained.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import ValidationError

from broker import topics
from broker.client import BusClient, BusSettings
from broker.clock import Clock
from broker.errors import BusUnavailable
from broker.messages import (
    MAX_POWER_W,
    Award,
    Bid,
    Clearing,
    CoordinatorStatus,
    Dispatch,
    DispatchAck,
    Forecast,
    GridState,
    Reservation,
    Status,
    Telemetry,
    WeatherForecast,
    new_id,
)
from coordinator import forecast as fc
from coordinator import grid, reserve
from coordinator import plausibility as pl
from coordinator.api import ApiServer, build_app, load_tokens
from coordinator.config import CoordinatorConfig, CoordinatorSection, GridSection
from coordinator.historian import Historian, HistorianError, HistorianSettings
from coordinator.history_db import HistoryDbError, HistoryTable
from coordinator.history_store import (
    HistoryFileError,
    LoadedHistory,
    SiteHistory,
    history_bytes,
    parse_histories,
    read_histories,
    write_histories,
)
from coordinator.ingest import IngestPool, Invalid, Record, error_line, worker_specs
from coordinator.ledger import ClearedInterval, ClearingConflict, Ledger, LedgerError
from coordinator.market import Book, Tariff, clear
from coordinator.market import Clearing as MarketClearing
from coordinator.metrics import MetricsServer, registry_for
from coordinator.weather import KeptForecast, WeatherSnapshot, WeatherStore

log = logging.getLogger(__name__)

_SITE_PREFIX = f"{topics.PREFIX}/site/"
#: Wall seconds between two publications of the coordinator's status.
STATUS_PERIOD_S = 5.0
#: Seconds between two history samples a site keeps for forecasting, and how many it keeps:
#: what the forecasters use (and benchmarks/forecast_skill.py scores them on): 15-minute
#: steps, the load profile's slot, over a week, its day classes and half-life.
HISTORY_STEP_S = 900.0
HISTORY_SAMPLES = 7 * 86_400 // 900
#: History samples whose clear-sky GHI is computed together (see Coordinator._fill_ghi).
GHI_BATCH = 4096
#: Sites forecast together in one worker-thread call (bounds the arrays' memory).
FORECAST_CHUNK_SITES = 256
#: Distinct telemetry ids a site may send with the same ts (beyond: counted as duplicates).
MAX_IDS_AT_NEWEST = 8
#: With ingest workers, the accepted readings a site keeps (ts, id, grid W) so that one that
#: two workers handed over out of order is still metered in its place (within these).
RECENT_READINGS = 8


def clear_bids(
    curves: Mapping[str, tuple[Sequence[tuple[float, float]], Sequence[tuple[float, float]]]],
    *,
    retail_per_kwh: float,
    feed_in_per_kwh: float,
    interval_s: float,
    import_limit_w: float,
    export_limit_w: float,
) -> tuple[MarketClearing, dict[str, float], float]:
    """Clear one interval's bids (each site's buy and sell steps, (price per kWh, kWh)) with
    the utility as the
    outside option within the feeder's limits (:func:`coordinator.market.clear`).

    Returns the clearing, each site's net award (kWh, + buys) and the price (per kWh) the
    ledger records, kept within +-100.
    """
    hours = interval_s / 3600.0
    names = sorted(curves)
    steps: list[tuple[int, float, float]] = []
    for i, name in enumerate(names):
        buy, sell = curves[name]
        steps += [(i, price, kwh) for price, kwh in buy]
        steps += [(i, price, -kwh) for price, kwh in sell]
    book = Book.from_steps(steps) if steps else Book.empty()
    result = clear(
        book,
        Tariff(
            retail_per_kwh,
            feed_in_per_kwh,
            import_limit_w / 1000.0 * hours,
            export_limit_w / 1000.0 * hours,
        ),
    )
    net = result.site_net_award_kwh(len(names))
    price = float(np.clip(result.price_per_kwh, -100.0, 100.0))
    return result, {name: float(net[i]) for i, name in enumerate(names)}, price


def sites_forecast_w(
    history_ts: NDArray[np.float64],
    history: NDArray[np.float64],
    times: NDArray[np.float64],
    where: CoordinatorSection,
    weather: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """PV and load forecasts (W, ``(n_sites, n_times)``, unknown: 0) of many sites at once
    from their histories: ``history_ts`` ``(n_sites, n_samples)`` (NaN-padded) and ``history``
    ``(n_sites, n_samples, 3)`` of PV W, load W and clear-sky GHI W/m^2 at each sample
    (:func:`coordinator.forecast.pv_forecast_sites_w`,
    :func:`coordinator.forecast.load_forecast_sites_w`); ``weather``: the weather service's
    clear-sky index at each history sample and each forecast time (NaN: none;
    :meth:`coordinator.weather.WeatherSnapshot.indices`). Pure: safe in a worker thread."""
    pv_f = fc.pv_forecast_sites_w(
        history_ts,
        history[..., 0],
        times,
        where.latitude_deg,
        where.longitude_deg,
        history_clear_sky_ghi_w_per_m2=history[..., 2],
        history_weather_index=None if weather is None else weather[0],
        forecast_weather_index=None if weather is None else weather[1],
    )
    load_f = fc.load_forecast_sites_w(
        history_ts, history[..., 1], times, utc_offset_h=where.utc_offset_h
    )
    return np.nan_to_num(pv_f), np.nan_to_num(load_f)


def forecast_sites(
    names: Sequence[str],
    history_ts: NDArray[np.float64],
    history: NDArray[np.float64],
    times: NDArray[np.float64],
    where: CoordinatorSection,
    weather: WeatherSnapshot,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """:func:`sites_forecast_w` of the sites ``names`` (rows of the histories) with the
    weather forecasts of ``weather``; what the coordinator and the stepped engine both run
    (in a worker thread)."""
    indices = weather.indices(names, history_ts, times)
    return sites_forecast_w(history_ts, history, times, where, indices)


def new_history() -> RingBuffer:
    """A site's forecasting history: a sample every HISTORY_STEP_S (s) of PV W, load W and
    the clear-sky GHI (W/m^2) at it, float32, for HISTORY_SAMPLES samples (7 days)."""
    return RingBuffer(HISTORY_SAMPLES, columns=3, dtype=np.float32)


def fill_clear_sky(
    pending: Sequence[tuple[RingBuffer, int, float]], where: CoordinatorSection
) -> None:
    """Store the clear-sky GHI of each pending (history, slot, ts) sample, in one vectorised
    computation (a scalar one per sample would cost ingest ~35 us each); a slot overwritten
    since is left alone."""
    if not pending:
        return
    ghi = fc.clear_sky_ghi_w_per_m2(
        np.array([ts for _, _, ts in pending]), where.latitude_deg, where.longitude_deg
    )
    for (ring, slot, ts), value in zip(pending, ghi.tolist(), strict=True):
        if slot < len(ring.ts) and ring.ts[slot] == ts:  # not overwritten since
            ring.values[slot, 2] = value


def history_snapshot(
    rings: Sequence[RingBuffer],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Copies of the sites' histories for :func:`sites_forecast_w`: ts ``(n, samples)`` and
    values ``(n, samples, 3)``, each row right-aligned (the newest sample last) and padded in
    front with NaN."""
    rows = [ring.arrays() for ring in rings]
    width = max(len(ts) for ts, _ in rows)
    ts_out = np.full((len(rows), width), np.nan)
    values_out = np.full((len(rows), width, 3), np.nan)
    for i, (ts, values) in enumerate(rows):
        ts_out[i, width - len(ts) :] = ts
        values_out[i, width - len(ts) :] = values
    return ts_out, values_out


def award_messages(record: ClearedInterval, now: float) -> list[tuple[str, str]]:
    """(topic, JSON) of each awarded site's award, by site; pure, for a worker thread.

    Built without re-validation: every value is bounded (receivers validate).
    """
    return [
        (
            topics.site_topic(name, "award"),
            Award.model_construct(
                id=new_id(),
                ts=now,
                interval=record.interval,
                price_per_kwh=record.clearing_price_per_kwh,
                quantity_kwh=min(max(float(quantity), -1e6), 1e6),
            ).model_dump_json(),
        )
        for name, quantity in sorted(record.awards_kwh.items())
    ]


def _f64(x: NDArray[Any]) -> NDArray[np.float64]:
    return np.asarray(x, dtype=np.float64)


def _forecast_messages(
    names: Sequence[str],
    pv_w: NDArray[np.float64],
    load_w: NDArray[np.float64],
    price_per_kwh: NDArray[np.float64],
    now: float,
    start_ts: float,
    step_s: int,
) -> list[tuple[str, Forecast, str]]:
    """(site, forecast, its JSON) for each site (row) of a chunk; pure, for a worker thread.

    Built without re-validation: every value is finite and clipped to the message's bounds.
    """
    prices = [float(x) for x in np.clip(price_per_kwh, -100.0, 100.0)]
    pv_rows = np.clip(pv_w, -MAX_POWER_W, MAX_POWER_W).tolist()
    load_rows = np.clip(load_w, -MAX_POWER_W, MAX_POWER_W).tolist()
    out = []
    for name, pv, load in zip(names, pv_rows, load_rows, strict=True):
        forecast = Forecast.model_construct(
            id=new_id(),
            ts=now,
            start_ts=start_ts,
            step_s=step_s,
            pv_power_w=pv,
            load_power_w=load,
            price_per_kwh=prices,
        )
        out.append((name, forecast, forecast.model_dump_json()))
    return out


class RingBuffer:
    """A bounded history of (ts, value, ...) samples in float64 numpy arrays.

    Memory grows with the samples held (doubling from a small start) up to ``capacity``
    samples, so a site that has sent little holds little.
    """

    def __init__(
        self,
        capacity: int,
        columns: int = 1,
        initial: int = 16,
        dtype: type[np.floating[Any]] = np.float64,
    ) -> None:
        if capacity < 1 or columns < 1:
            raise ValueError("a ring buffer needs capacity >= 1 and columns >= 1")
        self.capacity = capacity
        size = min(capacity, max(initial, 1))
        self.ts = np.full(size, np.nan)
        self.values: NDArray[np.floating[Any]] = np.full((size, columns), np.nan, dtype=dtype)
        self._next = 0
        self._count = 0

    def append(self, ts: float, *values: float | None) -> int:
        """Add a sample, one value per column (None is stored as NaN, ignored by the
        forecasters); returns the slot it went to (valid until ``capacity`` more appends)."""
        if self._count == len(self.ts) < self.capacity:  # full, not yet at capacity: grow
            size = min(self.capacity, 2 * len(self.ts))
            self.ts = np.concatenate([self.ts, np.full(size - len(self.ts), np.nan)])
            grown = np.full((size, self.values.shape[1]), np.nan, dtype=self.values.dtype)
            grown[: self._count] = self.values
            self.values = grown
            self._next = self._count
        i = self._next
        self.ts[i] = ts
        self.values[i] = [np.nan if v is None else v for v in values]
        self._next = (i + 1) % len(self.ts)
        self._count = min(self._count + 1, len(self.ts))
        return i

    def extend(self, ts: NDArray[np.float64], values: NDArray[np.float64]) -> None:
        """Append many samples at once: ``ts`` ``(n,)``, ``values`` ``(n,)`` or
        ``(n, columns)``, oldest first (the newest ``capacity`` of old and new are kept)."""
        old_ts, old_values = self.arrays()
        columns = self.values.shape[1]
        all_ts = np.concatenate([old_ts, np.asarray(ts, dtype=np.float64)])[-self.capacity :]
        all_values = np.concatenate(
            [old_values.reshape(-1, columns), np.asarray(values, np.float64).reshape(-1, columns)]
        )[-self.capacity :]
        size = max(len(self.ts), len(all_ts))
        self.ts = np.full(size, np.nan)
        self.values = np.full((size, columns), np.nan, dtype=self.values.dtype)
        self.ts[: len(all_ts)] = all_ts
        self.values[: len(all_ts)] = all_values
        self._count = len(all_ts)
        self._next = self._count % size

    def arrays(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """(ts, values) in float64, oldest first; values ``(n,)`` for one column, else
        ``(n, columns)``."""
        if self._count < len(self.ts):
            ts, values = self.ts[: self._count].copy(), self.values[: self._count]
        else:
            order = np.r_[self._next : len(self.ts), 0 : self._next]
            ts, values = self.ts[order], self.values[order]
        out = values.astype(np.float64)  # a copy either way
        return ts, out[:, 0] if out.shape[1] == 1 else out

    def __len__(self) -> int:
        return self._count


@dataclass
class SiteState:
    """What the coordinator knows of one site."""

    site: str
    online: bool = False
    role: str | None = None
    _latest: Telemetry | None = field(default=None, repr=False)
    #: The latest reading as JSON, not yet validated here (it came from an ingest worker,
    #: which validated it): validated when ``latest`` is first read.
    _latest_json: bytes | None = field(default=None, repr=False)
    #: The latest reading's ts and grid exchange (W), known without validating its JSON.
    latest_ts: float | None = None
    latest_grid_w: float | None = None
    #: One sample every HISTORY_STEP_S: PV W, load W and the clear-sky GHI (W/m^2) at it
    #: (float32: 7 significant digits are plenty for a forecast; 20 bytes a sample).
    history: RingBuffer = field(default_factory=new_history)
    energy_wh: dict[int, float] = field(default_factory=dict)  # interval -> metered import
    covered_s: dict[int, float] = field(default_factory=dict)  # interval -> metered seconds
    suspect: set[int] = field(default_factory=set)  # intervals with an implausible reading
    last_sample: tuple[float, float] | None = None  # (ts, grid W) held until the next
    #: The newest accepted reading's ts and the ids accepted at exactly that ts: telemetry
    #: at or before it is a replay (see :meth:`SiteState.is_replay`).
    newest_ts: float = -math.inf
    ids_at_newest: list[str] = field(default_factory=list)
    invalid: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    limits: pl.SiteLimits | None = None
    status: Status | None = None  # the agent's last status (with its own counters)
    last_history_ts: float = -math.inf
    readings: int = 0  # telemetry messages taken as the latest so far
    peak_import_w: float | None = None  # the largest import the grid loop has seen (W)
    last_seen_ts: float = -math.inf  # the coordinator's clock at the last accepted message
    #: With ingest workers: the last ``RECENT_READINGS`` accepted readings (ts, id, grid W or
    #: None), oldest first (see :meth:`fits_recent`).
    recent: list[tuple[float, str, float | None]] | None = None

    @property
    def latest(self) -> Telemetry | None:
        """The newest accepted reading (None before the first)."""
        if self._latest_json is not None:
            data, self._latest_json = self._latest_json, None
            try:
                self._latest = Telemetry.model_validate_json(data)
            except ValidationError:  # pragma: no cover - an ingest worker validated it
                log.exception("site %s: a worker's reading failed validation", self.site)
        return self._latest

    @latest.setter
    def latest(self, msg: Telemetry | None) -> None:
        self._latest, self._latest_json = msg, None
        self.latest_ts = None if msg is None else msg.ts
        self.latest_grid_w = None if msg is None else msg.grid_power_w

    def set_latest_json(self, data: bytes, ts: float, grid_power_w: float | None) -> None:
        """Make a validated reading's JSON the latest (validated again only when read)."""
        self._latest, self._latest_json = None, data
        self.latest_ts, self.latest_grid_w = ts, grid_power_w

    def is_replay(self, ts: float, message_id: str) -> bool:
        """Whether a reading at ``ts`` with ``message_id`` is a duplicate or older than the
        newest accepted one.

        The edge publishes and replays its spool in order, so a per-site high-water mark
        replaces a set of every id seen: memory is per site, not per message. An older
        reading (a replayed batch the broker had already taken, a late copy) would not
        change the latest state or the metering, which only move forward. Readings sharing
        the newest ts are told apart by id, up to ``MAX_IDS_AT_NEWEST`` of them.
        """
        if ts != self.newest_ts:
            return ts < self.newest_ts
        return message_id in self.ids_at_newest or len(self.ids_at_newest) >= MAX_IDS_AT_NEWEST

    def fits_recent(self, ts: float, message_id: str, grid_w: float | None) -> bool:
        """Whether a reading the high-water mark calls a replay is instead one that ingest
        workers handed over out of order: a new id, between the recent readings kept (and,
        when it has a grid power, after one that has), at no ts already taken."""
        recent = self.recent
        if not recent or not recent[0][0] < ts < self.newest_ts:
            return False
        if any(t == ts or i == message_id for t, i, _ in recent):
            return False
        return grid_w is None or any(g is not None for t, _, g in recent if t < ts)

    def remember(self, ts: float, message_id: str, grid_w: float | None) -> None:
        """Keep an accepted reading among the recent ones (in ts order, the newest few)."""
        if self.recent is None:
            self.recent = []
        bisect.insort(self.recent, (ts, message_id, grid_w), key=lambda r: r[0])
        if len(self.recent) > RECENT_READINGS:
            del self.recent[0]

    def accepted(self, ts: float, message_id: str) -> None:
        """Move the high-water mark to an accepted reading (one :meth:`is_replay` let in)."""
        if ts > self.newest_ts:
            self.newest_ts = ts
            self.ids_at_newest = [message_id]
        else:
            self.ids_at_newest.append(message_id)

    @property
    def battery_headroom_w(self) -> tuple[float, float]:
        """(more discharge, more charge) the site's batteries could take on now, W."""
        t = self.latest
        if t is None:
            return 0.0, 0.0
        rated = sum(
            d.rated_power_w or 0.0 for d in t.devices if d.kind == "battery" and d.available
        )
        return grid.battery_headroom_w(rated, t.battery_power_w or 0.0, t.battery_soc_pct)

    def grid_view(self) -> grid.SiteGrid | None:
        """The site as the grid policy sees it; None before its first reading."""
        t = self.latest
        if t is None:
            return None
        if t.grid_power_w is not None:
            self.peak_import_w = max(self.peak_import_w or 0.0, t.grid_power_w)
        return grid.SiteGrid(
            grid_power_w=t.grid_power_w,
            battery_power_w=t.battery_power_w or 0.0,
            headroom_w=self.battery_headroom_w,
            readings=self.readings,
            role=self.role,
            peak_import_w=self.peak_import_w,
        )


@dataclass
class CoordinatorStats:
    """Counters for monitoring and tests."""

    telemetry: int = 0
    duplicates: int = 0
    invalid: int = 0
    bids: int = 0
    clearings: int = 0
    awards: int = 0
    settled: int = 0
    forecasts: int = 0
    dispatches: int = 0
    rejected: int = 0
    corrections: int = 0
    estimated: int = 0
    acks: dict[str, int] = field(default_factory=dict)
    #: Weather forecasts taken, and refused by reason (``invalid`` or coordinator.weather's).
    weather: int = 0
    weather_rejected: dict[str, int] = field(default_factory=dict)
    #: Weather forecasts taken from the history file at the start (kept by the last run).
    weather_restored: int = 0
    clear_latency_s: deque[float] = field(default_factory=lambda: deque(maxlen=1000))


class Coordinator:
    """The coordinator for one feeder. ``async with Coordinator(config, clock)`` runs it."""

    def __init__(
        self,
        config: CoordinatorConfig,
        clock: Clock,
        *,
        password: str | None = None,
        bus_settings: BusSettings | None = None,
        ingest_password: str | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.feeder = config.coordinator.feeder
        self.sites: dict[str, SiteState] = {}
        self.bids: dict[int, dict[str, Bid]] = {}
        self.stats = CoordinatorStats()
        self.mode: grid.GridMode = "normal"
        self.flow_w = 0.0
        #: (ts, feeder flow W) of the last day's checks at one a second, for tests and reports.
        self.flow_log: deque[tuple[float, float]] = deque(maxlen=86_400)
        self.emergency_until = -math.inf
        self.last_clearing: Clearing | None = None
        self._grid_orders: dict[str, float] = {}  # site -> wall time the order was last sent
        self._relief: dict[str, grid.Relief] = {}  # site -> the relief its orders give
        self._logged: set[tuple[str, str]] = set()
        self._unknown_rejected: dict[str, int] = {}
        self.started_ts = clock.now()
        #: Wall time (UTC epoch s) of the last clearing, 0 before the first (for monitoring).
        self.last_clearing_wall_ts = 0.0
        #: The metrics (served on [metrics] and on the API's /metrics).
        self.metrics_registry = registry_for(self)
        self.metrics: MetricsServer | None = None
        if config.metrics is not None:
            self.metrics = MetricsServer(
                self.metrics_registry, config.metrics.host, config.metrics.port
            )
        #: The HTTP API when the configuration has an [api] section (started on entry).
        self.api: ApiServer | None = None
        #: Each site's last published forecast (for the API).
        self.last_forecasts: dict[str, Forecast] = {}
        #: The weather service's forecasts (``weather/forecast``) used in the PV forecasts.
        self.weather = WeatherStore(
            config.coordinator.latitude_deg,
            config.coordinator.longitude_deg,
            config.weather.max_age_h * 3600.0,
            config.trust.future_skew_s,
            enabled=config.weather.enabled,
        )
        #: The last feeder reservation (coordinator/reserve.py), if one was made.
        self.last_reservation: reserve.FeederReservation | None = None
        self.last_reservation_ts = -math.inf
        self.last_reservation_start_ts = -math.inf  # the start of its first step
        self._level_raised = False
        self._refill_state = grid.Refilling()
        #: The standing orders that charge the feeder's export into batteries (site -> the
        #: extra charge each gives; :func:`coordinator.grid.plan_absorb`).
        self._absorbing: dict[str, grid.Relief] = {}
        self._ack_waiters: dict[str, asyncio.Future[DispatchAck]] = {}
        #: Cleared intervals not yet settled (from the ledger at start: none is lost).
        self.cleared: dict[int, ClearedInterval] = {}
        #: Settled intervals whose metering changed since (late telemetry): to correct.
        self._dirty: set[int] = set()
        self._settled_at: dict[int, float] = {}  # settled interval -> clock when settled
        self._pruned_at = -1  # the interval in which metering was last pruned
        self._own_dispatch_ids: deque[str] = deque(maxlen=10_000)
        #: History samples whose clear-sky GHI is still to be computed: (ring, slot, ts).
        self._ghi_pending: list[tuple[RingBuffer, int, float]] = []
        #: Readings that became their site's latest since the last :meth:`_take_latest`.
        self._latest_pending: dict[str, tuple[pl.ReadingSummary, Telemetry | bytes]] = {}
        self._window = pl.TimeWindow(config.trust.future_skew_s, config.trust.max_age_s)
        self._stop = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self._restore_history()
        self.ledger = self._open_ledger()
        #: Off unless the configuration has a [historian] section.
        self.historian: Historian | None = None
        #: Why a configured historian could not start (None: it did, or none is configured).
        self.historian_failed: str | None = None
        if config.historian is not None:
            self.historian = Historian(
                HistorianSettings.from_mapping(config.historian, "coordinator configuration")
            )
        b = config.broker
        self.bus = BusClient(
            bus_settings
            or b.bus_settings(
                username="coordinator",
                client_id="wattmesh-coordinator",
                password=password,
                max_inflight=1000,
            ),
            handler=self._on_message,
            fast_handler=self._on_fast,
        )
        #: The ingest worker processes, with ``[coordinator] ingest_workers`` > 0 (started on
        #: entry; see coordinator/ingest.py).
        self.ingest = self._ingest_pool(ingest_password)

    def _open_ledger(self) -> Ledger:
        """The ledger, with its cleared but unsettled intervals taken into ``cleared`` (none
        is lost across a restart)."""
        ledger = self.config.coordinator.open_ledger()
        for record in ledger.unsettled_clearings():
            self.cleared[record.interval] = record
        if self.cleared:
            log.info(
                "%d cleared interval(s) not yet settled, from the ledger: %s",
                len(self.cleared),
                ", ".join(str(k) for k in sorted(self.cleared)),
            )
        return ledger

    def _restore_history(self) -> None:
        """Load the forecasting history a previous run kept (samples of the last week, up to
        the trust window's skew ahead) and its weather forecasts (as
        :meth:`coordinator.weather.WeatherStore.restore` keeps them), from its file or the
        PostgreSQL ledger's database; damaged content is set aside (a file as ``.damaged``,
        a database row as the feeder's ``.damaged`` row), kept for inspection, and the
        coordinator starts without it."""
        #: Where the forecasting history is kept across restarts (None: not in a file).
        self.history_path = path = self.config.coordinator.history_path()
        #: ... or in the PostgreSQL ledger's database (None: not there).
        self.history_db = table = self.config.coordinator.history_table()
        self._history_saved_ts = now = self.clock.now()
        self._history_failed: str | None = None
        window = {
            "not_before_ts": now - HISTORY_SAMPLES * HISTORY_STEP_S,
            "not_after_ts": now + self.config.trust.future_skew_s,
        }
        where: object
        if table is not None:
            where = table
            from_db = self._load_history_db(table, now, window)
            if from_db is None:
                return
            loaded = from_db
        elif path is not None:
            where = path
            try:
                loaded = read_histories(path, **window)
            except FileNotFoundError:
                log.info("no forecasting history at %s yet: forecasts start from nothing", path)
                return
            except HistoryFileError as err:
                aside = path.with_name(path.name + ".damaged")
                with contextlib.suppress(OSError):
                    path.replace(aside)
                log.error("forecasting history not loaded: %s (moved to %s)", err, aside)  # noqa: TRY400
                return
        else:
            return
        self._take_history(loaded, where, now)

    @staticmethod
    def _load_history_db(
        table: HistoryTable, now: float, window: dict[str, float]
    ) -> LoadedHistory | None:
        """The history in the ledger's database (None: none, unreachable or damaged: logged,
        damaged content kept in the ``.damaged`` row)."""
        try:
            content = table.load()
        except HistoryDbError as err:
            log.error("forecasting history not loaded from %s: %s", table, err)  # noqa: TRY400
            return None
        if content is None:
            log.info("no forecasting history in %s yet: forecasts start from nothing", table)
            return None
        try:
            return parse_histories(content, table, **window)
        except HistoryFileError as err:
            with contextlib.suppress(HistoryDbError):
                table.set_aside(content, now)
            log.error("forecasting history not loaded: %s (kept as %s.damaged)", err, table.feeder)  # noqa: TRY400
            return None

    def _take_history(self, loaded: LoadedHistory, where: object, now: float) -> None:
        """The sites' histories and weather forecasts of ``loaded`` (read from ``where``)."""
        c = self.config.coordinator
        taken = 0
        for name, h in sorted(loaded.sites.items()):
            if len(self.sites) >= self.config.trust.max_sites:
                break
            if not len(h.ts):
                continue
            state = self.sites.setdefault(name, SiteState(name))
            ghi = fc.clear_sky_ghi_w_per_m2(h.ts, c.latitude_deg, c.longitude_deg)
            state.history.extend(h.ts, np.column_stack([h.pv_w, h.load_w, ghi]))
            state.last_history_ts = float(h.ts[-1])
            taken += 1
        log.info(
            "forecasting history of %d site(s) loaded from %s (%d sample(s) and %d site(s) "
            "dropped as invalid or out of the week)",
            taken,
            where,
            loaded.dropped_samples,
            loaded.dropped_sites,
        )
        if not self.weather.enabled:
            return
        dropped = self.weather.restore(loaded.weather, now) + loaded.dropped_forecasts
        self.stats.weather_restored = len(self.weather.kept)
        if self.weather.kept or dropped:
            log.info(
                "%d weather forecast(s) loaded from %s, the newest issued %.1f h ago (%d "
                "dropped as invalid, superseded, from the future or ended over 8 days ago)",
                len(self.weather.kept),
                where,
                (now - self.weather.kept[-1].ts) / 3600.0 if self.weather.kept else math.nan,
                dropped,
            )

    def _history_now(self) -> dict[str, SiteHistory]:
        """Copies of every site's forecasting history, for :func:`write_histories`."""
        out = {}
        for name, state in self.sites.items():
            ts, values = state.history.arrays()
            if len(ts):
                out[name] = SiteHistory(ts, values[:, 0], values[:, 1])
        return out

    def save_history(
        self,
        histories: Mapping[str, SiteHistory] | None = None,
        weather: Sequence[KeptForecast] | None = None,
    ) -> bool:
        """Write the forecasting history and the kept weather forecasts (``histories`` and
        ``weather``, default: as they are now) to its file or database row; False when it is
        not kept or the write failed (logged once per reason; the last good copy stays)."""
        where = self.history_db or self.history_path
        if where is None:
            return False
        histories = self._history_now() if histories is None else histories
        weather = tuple(self.weather.kept) if weather is None else weather
        try:
            if self.history_db is not None:
                self.history_db.save(history_bytes(histories, weather), self.clock.now())
            elif self.history_path is not None:
                write_histories(self.history_path, histories, weather)
        except OSError as err:
            return self._history_not_written(where, f"{type(err).__name__}: {err.strerror or err}")
        except HistoryDbError as err:
            return self._history_not_written(where, str(err).splitlines()[0])
        if self._history_failed is not None:
            log.info("forecasting history written to %s again", where)
        self._history_failed = None
        return True

    def _history_not_written(self, where: object, reason: str) -> bool:
        if reason != self._history_failed:
            log.error("forecasting history not written to %s: %s", where, reason)
        self._history_failed = reason
        return False

    async def _save_history_if_due(self) -> None:
        """Write the history every ``history_save_s`` on the clock, in a worker thread."""
        now = self.clock.now()
        if (self.history_path is None and self.history_db is None) or now - (
            self._history_saved_ts
        ) < self.config.coordinator.history_save_s:
            return
        self._history_saved_ts = now
        await asyncio.to_thread(self.save_history, self._history_now(), tuple(self.weather.kept))

    def _ingest_pool(self, password: str | None) -> IngestPool | None:
        """The ingest workers' pool with ``[coordinator] ingest_workers`` > 0, else None;
        ``password`` (default ``$[broker] ingest_password_env``) is their users' password."""
        c = self.config.coordinator
        if not c.ingest_workers:
            return None
        settings = self.bus.settings
        if settings.cert_file:
            raise ValueError(
                "coordinator.ingest_workers needs password logins: the workers have no "
                "client certificates of their own"
            )
        specs = worker_specs(
            settings,
            user=settings.username or "coordinator",
            password=password if password is not None else self.config.broker.ingest_password(),
            count=c.ingest_workers,
            group=f"wattmesh-ingest-{self.feeder}",
            port=self.config.broker.ingest_port,
        )
        return IngestPool(specs, c.ingest_flush_s, self.apply_ingest)

    @property
    def speed(self) -> float:
        """Simulated seconds per wall second."""
        return float(getattr(self.clock, "speed", 1.0))

    # -- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> Coordinator:
        if self.historian is not None:
            try:
                await self.historian.__aenter__()
            except HistorianError as err:  # degrade, never die: the market goes on without it
                log.error(  # noqa: TRY400 - the reason is the message
                    "historian off: %s (the coordinator runs without time series)", err
                )
                self.historian = None
                self.historian_failed = str(err)
        if self.metrics is not None:
            self.metrics.start()
            log.info("metrics on http://%s:%d/metrics", self.metrics.host, self.metrics.port)
        await self.bus.__aenter__()
        kinds: list[topics.SiteTopicKind] = ["status", "telemetry", "bid", "dispatch"]
        kinds.append("dispatch/ack")
        if self.ingest is not None:  # telemetry comes through the workers
            kinds.remove("telemetry")
            self.bus.on_connect = self._drop_telemetry_subscription
            await self.ingest.__aenter__()
        for kind in kinds:
            await self.bus.subscribe(topics.site_wildcard(kind))
        if self.config.weather.enabled:
            await self.bus.subscribe(topics.WEATHER_FORECAST)
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._group.create_task(self._market_loop(), name="coordinator-market")
        self._group.create_task(self._grid_loop(), name="coordinator-grid")
        self._group.create_task(self._settle_loop(), name="coordinator-settle")
        if self.config.api is not None:
            a = self.config.api
            app = build_app(self, load_tokens(a.tokens_file), ack_timeout_s=a.ack_timeout_s)
            self.api = ApiServer(app, a.host, a.port)
            await self.api.start()
            log.info("HTTP API on http://%s:%d/api/v1", a.host, self.api.port)
        if self.cleared:
            self._group.create_task(self._republish_when_connected(), name="coordinator-resend")
        return self

    async def _drop_telemetry_subscription(self) -> None:
        """With ingest workers, end the telemetry subscription a persistent session may still
        hold from a run without them (each message would otherwise come twice)."""
        with contextlib.suppress(BusUnavailable):
            await self.bus.unsubscribe(topics.site_wildcard("telemetry"))

    def apply_ingest(self, records: list[Record], invalid: list[Invalid]) -> None:
        """Apply what the ingest workers sent, as :meth:`handle` would have: the invalid
        messages counted, each reading through :meth:`ingest_reading` in the order given."""
        for site, error in invalid:
            self.invalid_message(site, "telemetry", error)
        for site, message_id, summary, payload in records:
            try:
                self.ingest_reading(site, message_id, summary, payload, reordered=True)
            except Exception as err:  # a reading must never stop ingest
                log.exception("unexpected error on a reading from site %s", site)
                self._invalid(site, "telemetry", err)
        self._take_latest()

    async def _republish_when_connected(self) -> None:
        """After a restart, send the awards of cleared intervals again once connected."""
        while not self._stop.is_set():
            try:
                await self.bus.wait_connected(1.0)
            except (TimeoutError, BusUnavailable):
                continue
            await self.republish_awards()
            return

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        assert self._group is not None
        if self.api is not None:
            await self.api.stop()
        try:
            await self._group.__aexit__(et, ev, tb)
        finally:
            if self.ingest is not None:
                await self.ingest.__aexit__(et, ev, tb)
            await self.bus.__aexit__(et, ev, tb)
            if self.historian is not None:
                await self.historian.__aexit__(et, ev, tb)
            if self.metrics is not None:
                self.metrics.stop()
            self.save_history()
            self.ledger.close()

    async def _sleep_until(self, ts: float) -> bool:
        """Sleep until simulated time ``ts``; False when stopping."""
        while not self._stop.is_set():
            wait_s = (ts - self.clock.now()) / self.speed
            if wait_s <= 0:
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), wait_s)
        return False

    async def _settle_loop(self) -> None:
        """Every grid period (wall s): settle what is due, correct, publish the status."""
        g = self.config.grid
        loop = asyncio.get_running_loop()
        last_status = -math.inf
        while not self._stop.is_set():
            self.settle_due()
            await self._save_history_if_due()
            if loop.time() - last_status >= STATUS_PERIOD_S:
                last_status = loop.time()
                with contextlib.suppress(BusUnavailable):
                    await self.bus.publish(
                        topics.coordinator_status_topic(self.feeder),
                        self.status().model_dump_json(),
                        retain=True,
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), g.period_s)

    def status(self) -> CoordinatorStatus:
        """The health counters published on ``coordinator/{feeder}/status``."""
        st = self.stats
        rejected = {n: dict(s.rejected) for n, s in self.sites.items() if s.rejected}
        historian = self.historian.stats() if self.historian is not None else None
        return CoordinatorStatus(
            ts=self.clock.now(),
            feeder=self.feeder,
            started_ts=self.started_ts,
            mode=self.mode,
            telemetry=st.telemetry,
            duplicates=st.duplicates,
            bids=st.bids,
            clearings=st.clearings,
            settled=st.settled,
            corrections=st.corrections,
            estimated=st.estimated,
            unsettled=len(self.cleared),
            dispatches=st.dispatches,
            last_cleared_interval=None
            if self.last_clearing is None
            else self.last_clearing.interval,
            rejected=rejected,
            historian="off"
            if self.config.historian is None
            else "failed"
            if self.historian_failed
            else "ok",
            historian_dropped=0 if historian is None else historian.dropped,
            historian_buffered=0 if historian is None else historian.buffer_points,
        )

    # -- ingest ----------------------------------------------------------------------------
    def _invalid(self, site: str, kind: str, err: BaseException) -> None:
        self.invalid_message(site, kind, error_line(err))

    def invalid_message(self, site: str, kind: str, error: str) -> None:
        """Count a message that failed validation (``error``: its first line), as
        :meth:`handle` does; ingest workers report theirs through here."""
        self.stats.invalid += 1
        state = self._known(site)
        if state is not None:
            state.invalid += 1
        self._reject(site, "invalid", f"invalid {kind}: {error}", log_key=f"invalid {kind}")

    def _reject(self, site: str, reason: str, detail: str, log_key: str | None = None) -> None:
        """Count a refused message per site and reason; log and audit the first of each
        (``log_key``, default the reason)."""
        self.stats.rejected += 1
        state = self.sites.get(site)
        if state is not None:
            state.rejected[reason] = state.rejected.get(reason, 0) + 1
        else:
            self._unknown_rejected[reason] = self._unknown_rejected.get(reason, 0) + 1
        key = (site, log_key or reason)
        if key in self._logged:
            return
        self._logged.add(key)
        log.warning(
            "rejected from site %s (%s; further ones counted, not logged): %s",
            site,
            reason,
            detail,
        )
        self._audit("rejection", site, {"site": site, "reason": reason, "detail": detail})

    def _audit(self, kind: str, actor: str, detail: Mapping[str, object]) -> None:
        """An append-only audit row; a failing ledger is logged, never fatal here."""
        try:
            self.ledger.audit(kind, actor, detail, self.clock.now())
        except LedgerError as err:
            log.error("audit %s not recorded: %s", kind, err)  # noqa: TRY400

    def _known(self, site: str) -> SiteState | None:
        """The site's state; None (rejected) past ``max_sites`` sites."""
        state = self.sites.get(site)
        if state is None:
            if len(self.sites) >= self.config.trust.max_sites:
                self._reject(site, "unknown_site", "more sites than trust.max_sites")
                return None
            state = self.sites[site] = SiteState(site)
        return state

    def _limits(self, state: SiteState, msg: pl.ReadingSummary | None) -> pl.SiteLimits:
        """The site's limits: declared in [sites.NAME], else derived once from its report."""
        if state.limits is not None:
            return state.limits
        t = self.config.trust
        declared = self.config.sites.get(state.site)
        generation, storage = (
            (msg.generation_rating_w, msg.storage_rating_w) if msg is not None else (0.0, 0.0)
        )
        limits = pl.derive_limits(
            connection_w=declared.connection_w if declared else None,
            generation_w=declared.pv_w if declared else None,
            storage_w=declared.battery_w if declared else None,
            reported_generation_w=generation,
            reported_storage_w=storage,
            base_connection_w=self.config.default_connection_w(),
            max_connection_w=t.max_connection_w,
            max_ratio=t.max_rating_ratio,
        )
        if msg is not None:  # fixed at the first report: a site cannot loosen them later
            state.limits = limits
        return limits

    async def _on_message(self, topic: str, payload: bytes) -> None:
        self.handle(topic, payload)

    def handle(self, topic: str, payload: bytes) -> None:
        """One inbound message, handled at once; nothing a payload holds gets past here."""
        try:
            parsed = topics.parse_topic(topic)
        except ValueError:
            return
        if parsed.kind == "weather/forecast":
            self.ingest_weather(payload)
            return
        site = parsed.site
        if site is None:
            return
        try:
            if parsed.kind == "telemetry":
                self.ingest_telemetry(site, Telemetry.model_validate_json(payload))
            elif parsed.kind == "bid":
                self.ingest_bid(site, Bid.model_validate_json(payload))
            elif parsed.kind == "status":
                status = Status.model_validate_json(payload)
                state = self._known(site)
                if state is not None:
                    state.online, state.role = status.online, status.role
                    state.status = status
            elif parsed.kind == "dispatch":
                self._seen_dispatch(site, Dispatch.model_validate_json(payload))
            elif parsed.kind == "dispatch/ack":
                ack = DispatchAck.model_validate_json(payload)
                waiter = self._ack_waiters.get(ack.command_id)
                if waiter is not None and not waiter.done():
                    waiter.set_result(ack)
                if len(self.stats.acks) < 16 or ack.outcome in self.stats.acks:
                    self.stats.acks[ack.outcome] = self.stats.acks.get(ack.outcome, 0) + 1
        except (ValidationError, ValueError, RecursionError, MemoryError) as err:
            self._invalid(site, parsed.kind, err)
        except Exception as err:  # a payload must never stop ingest
            log.exception("unexpected error on %s", topic)
            self._invalid(site, parsed.kind, err)

    def ingest_weather(self, payload: bytes) -> bool:
        """A weather forecast: validated, checked (not from the future, not stale, newer than
        the last: coordinator/weather.py) and kept; a refused one is counted and its reason
        logged once, and changes nothing."""
        try:
            msg = WeatherForecast.model_validate_json(payload)
        except (ValidationError, ValueError, RecursionError, MemoryError) as err:
            self._weather_refused("invalid", error_line(err))
            return False
        reason = self.weather.offer(msg, self.clock.now())
        if reason is not None:
            age_h = (self.clock.now() - msg.ts) / 3600.0
            self._weather_refused(reason, f"issued {age_h:.1f} h ago by {msg.source or '?'}")
            return False
        self.stats.weather += 1
        log.info(
            "weather forecast from %s: %d steps of %d s from %.0f",
            msg.source or "?",
            msg.steps,
            msg.step_s,
            msg.start_ts,
        )
        return True

    def _weather_refused(self, reason: str, detail: str) -> None:
        rejected = self.stats.weather_rejected
        rejected[reason] = rejected.get(reason, 0) + 1
        if rejected[reason] == 1 and reason != "superseded":  # a retained one seen again
            log.warning(
                "weather forecast refused (%s; further ones counted, not logged): %s",
                reason,
                detail,
            )

    async def send_operator_order(
        self, site: str, order: Dispatch, *, actor: str, timeout_s: float
    ) -> DispatchAck | None:
        """Publish an operator's order (audited under ``actor``) and wait for the site's
        acknowledgement; None when none arrives within ``timeout_s`` (wall s)."""
        self._own_dispatch_ids.append(order.id)
        self._audit(
            "emergency" if order.priority == "emergency" else "dispatch",
            actor,
            {
                "site": site,
                "id": order.id,
                "battery_power_w": order.battery_power_w,
                "load_limit_w": order.load_limit_w,
                "expires_ts": order.expires_ts,
                "reason": order.reason,
            },
        )
        if order.priority == "emergency":
            self.emergency_until = max(self.emergency_until, order.expires_ts)
        waiter: asyncio.Future[DispatchAck] = asyncio.get_running_loop().create_future()
        self._ack_waiters[order.id] = waiter
        try:
            await self.bus.publish(topics.site_topic(site, "dispatch"), order.model_dump_json())
            async with asyncio.timeout(timeout_s):
                return await waiter
        except TimeoutError:
            return None
        finally:
            self._ack_waiters.pop(order.id, None)

    def _seen_dispatch(self, site: str, order: Dispatch) -> None:
        """An order on a site's dispatch topic: ours, or an operator's (audited)."""
        if order.id in self._own_dispatch_ids:
            return
        if order.priority == "emergency":  # an operator's order: the grid is theirs
            self.emergency_until = max(self.emergency_until, order.expires_ts)
        self._audit(
            "emergency" if order.priority == "emergency" else "dispatch",
            "operator",
            {
                "site": site,
                "id": order.id,
                "battery_power_w": order.battery_power_w,
                "load_limit_w": order.load_limit_w,
                "expires_ts": order.expires_ts,
                "reason": order.reason,
            },
        )

    def _on_fast(self, topic: str, payload: bytes) -> bool:
        """Every site message, handled synchronously as it arrives: nothing queues up in the
        process whatever a site sends (the broker holds what is not read yet)."""
        if not topic.startswith(_SITE_PREFIX):
            return False
        self.handle(topic, payload)
        return True

    def ingest_bid(self, site: str, bid: Bid) -> bool:
        """Keep a plausible bid (one book per site and interval: a new one replaces it)."""
        state = self._known(site)
        if state is None:
            return False
        m = self.config.market
        t = self.config.trust
        reason = pl.check_bid(
            bid,
            self._limits(state, None),
            now_ts=self.clock.now(),
            interval_s=m.interval_s,
            gate_s=m.gate_s,
            bids_ahead=t.bids_ahead,
            tolerance=t.tolerance,
        )
        if reason is not None:
            self._reject(site, reason, f"bid for interval {bid.interval}")
            return False
        self.bids.setdefault(bid.interval, {})[site] = bid
        self.stats.bids += 1
        return True

    def ingest_telemetry(self, site: str, msg: Telemetry) -> bool:
        """Keep the latest state, the history and the metered energy of a site.

        A reading that fails the plausibility checks is refused before it touches anything;
        a refused power reading marks its interval suspect (settled as estimated).
        """
        accepted = self.ingest_reading(site, msg.id, pl.summarise(msg), msg)
        self._take_latest()
        return accepted

    def ingest_reading(
        self,
        site: str,
        message_id: str,
        s: pl.ReadingSummary,
        msg: Telemetry | bytes,
        *,
        reordered: bool = False,
    ) -> bool:
        """:meth:`ingest_telemetry` on a reading's summary ``s`` (what an ingest worker sends)
        with the reading itself, validated or as its JSON (validated here only if it becomes
        the site's latest, at the next :meth:`_take_latest`, or for the historian).

        ``reordered``: readings may come out of order (from several ingest workers): a new
        reading older than the newest, among the site's recent ones, is metered in its place
        (:meth:`_ingest_late`) instead of counted as a replay.
        """
        state = self._known(site)
        if state is None:
            return False
        late = False
        if state.is_replay(s.ts, message_id):
            late = reordered and state.fits_recent(s.ts, message_id, s.grid_power_w)
            if not late:
                self.stats.duplicates += 1
                return False
        now = self.clock.now()
        t = self.config.trust
        reason = pl.check_reading(s, self._limits(state, s), now, self._window, t.tolerance)
        if reason is not None:
            if reason not in ("future", "too_old"):
                state.suspect.add(int(s.ts // self.config.market.interval_s))
            self._reject(site, reason, f"telemetry at ts {s.ts:.0f} (clock {now:.0f})")
            return False
        state.last_seen_ts = now
        self.stats.telemetry += 1
        if self.historian is not None:
            if isinstance(msg, bytes):
                msg = Telemetry.model_validate_json(msg)
            self.historian.record_telemetry(site, msg)
        if reordered:
            state.remember(s.ts, message_id, s.grid_power_w)
        if late:
            self._ingest_late(state, s)
            return True
        state.accepted(s.ts, message_id)
        pending = self._latest_pending.get(site)
        latest_ts = pending[0].ts if pending else state.latest_ts
        if latest_ts is None or s.ts >= latest_ts:
            self._latest_pending[site] = (s, msg)
            state.readings += 1
        if s.ts >= state.last_history_ts + HISTORY_STEP_S:
            state.last_history_ts = s.ts
            slot = state.history.append(s.ts, s.pv_power_w, s.load_power_w, None)
            self._ghi_pending.append((state.history, slot, s.ts))
            if len(self._ghi_pending) >= GHI_BATCH:
                self._fill_ghi()
        if s.grid_power_w is None:
            return True
        if state.last_sample is not None and s.ts > state.last_sample[0]:
            self._meter(state, state.last_sample[0], s.ts, state.last_sample[1])
        if state.last_sample is None or s.ts > state.last_sample[0]:
            state.last_sample = (s.ts, s.grid_power_w)
        return True

    def _ingest_late(self, state: SiteState, s: pl.ReadingSummary) -> None:
        """Meter a reading that came after newer ones (already in ``state.recent``) as if it
        had come in order: the hold of the grid reading before it is cut at its ts and its
        own power holds until the next grid reading. It is not the latest, nor a history
        sample (those go forward only)."""
        state.readings += 1
        if s.grid_power_w is None or state.recent is None:
            return
        grid: list[tuple[float, float]] = []  # the first grid reading at each ts: the metered
        for t, _, g in state.recent:
            if g is not None and (not grid or grid[-1][0] != t):
                grid.append((t, g))
        i = grid.index((s.ts, s.grid_power_w))
        (a_ts, a_w), after = grid[i - 1], grid[i + 1 : i + 2]
        if after:
            b_ts = after[0][0]
            self._meter(state, a_ts, b_ts, a_w, sign=-1.0)  # what was metered, undone
            self._meter(state, a_ts, s.ts, a_w)
            self._meter(state, s.ts, b_ts, s.grid_power_w)
        elif state.last_sample == (a_ts, a_w):  # its hold was still open: it takes over
            self._meter(state, a_ts, s.ts, a_w)
            state.last_sample = (s.ts, s.grid_power_w)

    def _take_latest(self) -> None:
        """Make each reading that became its site's latest since the last call the site's
        ``latest`` (those that came as JSON from an ingest worker are validated when read)."""
        pending, self._latest_pending = self._latest_pending, {}
        for site, (summary, reading) in pending.items():
            state = self.sites.get(site)
            if state is None:
                continue
            if isinstance(reading, bytes):
                state.set_latest_json(reading, summary.ts, summary.grid_power_w)
            else:
                state.latest = reading

    def _fill_ghi(self) -> None:
        """Store the clear-sky GHI of the history samples taken since the last call."""
        pending, self._ghi_pending = self._ghi_pending, []
        fill_clear_sky(pending, self.config.coordinator)

    def _meter(
        self, state: SiteState, t0: float, t1: float, grid_w: float, sign: float = 1.0
    ) -> None:
        """Add grid_w held over [t0, t1) to the intervals it spans, Wh (``sign`` -1: take
        back what an earlier call added).

        A reading holds for at most ``trust.max_hold_s``: a longer gap is not metered (the
        interval's coverage shows it), so silence is never filled with an old value. Metering
        that lands in an interval already settled marks it for a correction.
        """
        interval_s = self.config.market.interval_s
        t1 = min(t1, t0 + self.config.trust.max_hold_s)
        while t0 < t1:
            k = int(t0 // interval_s)
            end = min(t1, (k + 1) * interval_s)
            state.energy_wh[k] = state.energy_wh.get(k, 0.0) + sign * grid_w * (end - t0) / 3600.0
            state.covered_s[k] = state.covered_s.get(k, 0.0) + sign * (end - t0)
            if k in self._settled_at:
                self._dirty.add(k)
            t0 = end

    # -- market ----------------------------------------------------------------------------
    async def _market_loop(self) -> None:
        m = self.config.market
        k = pl.open_interval(self.clock.now(), m.interval_s, m.gate_s)
        while await self._sleep_until(k * m.interval_s - m.gate_s):
            await self.clear_interval(k)
            await self.publish_forecasts(k + 1)
            k += 1

    def tariff_at(self, ts: float) -> tuple[float, float]:
        """(retail, feed-in) per kWh at ``ts``."""
        return self.config.tariff.at(ts, self.config.coordinator.utc_offset_h)

    def _award_messages(self, record: ClearedInterval) -> list[tuple[str, str]]:
        return award_messages(record, self.clock.now())

    async def republish_awards(self) -> int:
        """Send again the awards of cleared intervals that have not ended (after a restart)."""
        m = self.config.market
        now = self.clock.now()
        messages = [
            msg
            for k, record in sorted(self.cleared.items())
            if (k + 1) * m.interval_s > now
            for msg in self._award_messages(record)
        ]
        if not messages:
            return 0
        try:
            return await self.bus.publish_burst(messages)
        except BusUnavailable as err:
            log.warning("awards of cleared intervals not sent again: %s", err)
            return 0

    async def clear_interval(self, interval: int) -> Clearing | None:
        """Clear one interval's bids, commit the clearing to the ledger, then publish it.

        Nothing is published that the ledger does not hold: if the commit fails the interval
        has no market (the sites fall back to local control) and None is returned. An interval
        already cleared (a restarted coordinator) keeps its stored clearing.
        """
        t_gate = self.clock.now()
        m = self.config.market
        retail, feed_in = self.tariff_at(interval * m.interval_s)
        bids = self.bids.pop(interval, {})
        for stale in [k for k in self.bids if k < interval]:  # bounded whatever arrives
            del self.bids[stale]
        result, awards_kwh, price = clear_bids(
            {
                name: (
                    [(s.price_per_kwh, s.quantity_kwh) for s in b.buy],
                    [(s.price_per_kwh, s.quantity_kwh) for s in b.sell],
                )
                for name, b in bids.items()
            },
            retail_per_kwh=retail,
            feed_in_per_kwh=feed_in,
            interval_s=m.interval_s,
            import_limit_w=self.config.grid.import_limit_w,
            export_limit_w=self.config.grid.export_limit_w,
        )
        names = sorted(bids)
        now = self.clock.now()
        restored = False
        try:
            record = self.ledger.record_clearing(
                interval,
                clearing_price_per_kwh=price,
                retail_price_per_kwh=retail,
                feed_in_price_per_kwh=feed_in,
                awards_kwh=awards_kwh,
                imbalance_premium_per_kwh=m.imbalance_premium_per_kwh,
                rebate=m.rebate,
                cleared_ts=now,
            )
        except ClearingConflict:
            stored = self.ledger.clearing(interval)
            if stored is None:  # pragma: no cover - the conflict says it is stored
                return None
            log.warning("interval %d was cleared before a restart: its clearing stands", interval)
            record, restored = stored, True
        except LedgerError as err:
            log.error(  # noqa: TRY400 - the reason is the message; no traceback wanted
                "interval %d cleared but not committed, so not published: %s", interval, err
            )
            return None
        if not record.settled:
            self.cleared[interval] = record
        # Built in a worker thread: 10,000 awards take ~0.1 s that ingest goes on meanwhile.
        awards = await asyncio.to_thread(award_messages, record, now)
        clearing = Clearing(
            ts=now,
            interval=interval,
            price_per_kwh=record.clearing_price_per_kwh,
            volume_kwh=float(result.local_volume_kwh),
            bids=len(names),
            utility_import_kwh=float(result.utility_import_kwh),
            utility_export_kwh=float(result.utility_export_kwh),
        )
        try:
            await self.bus.publish_burst(awards)
            if not restored:  # a restored clearing's retained message is already out
                await self.bus.publish(
                    topics.MARKET_CLEARING, clearing.model_dump_json(), retain=True
                )
        except BusUnavailable as err:
            log.warning("interval %d cleared but not all of it was published: %s", interval, err)
        log.info(
            "interval %d cleared: %.4f/kWh, %.2f kWh local, %d bids",
            interval,
            clearing.price_per_kwh,
            clearing.volume_kwh,
            clearing.bids,
        )
        self.last_clearing = clearing
        self.last_clearing_wall_ts = time.time()
        if self.historian is not None:
            self.historian.record_clearing(
                clearing, retail_price_per_kwh=retail, feed_in_price_per_kwh=feed_in
            )
            for topic, payload in awards:
                self.historian.record_award(
                    topics.parse_topic(topic).site or "", Award.model_validate_json(payload)
                )
        self.stats.clearings += 1
        self.stats.awards += len(awards)
        self.stats.clear_latency_s.append((self.clock.now() - t_gate) / self.speed)
        return clearing

    # -- settlement ------------------------------------------------------------------------
    def roster(self, interval: int) -> set[str]:
        """The sites that belong in ``interval``'s settlement: those awarded in it, those
        metered in it, and those whose meter ran within the hour before it."""
        m = self.config.market
        start = interval * m.interval_s
        record = self.cleared.get(interval) or self.ledger.clearing(interval)
        names = set(record.awards_kwh) if record is not None else set()
        for name, s in self.sites.items():
            recent = s.last_sample is not None and s.last_sample[0] >= start - 3600.0
            if recent or interval in s.energy_wh or interval in s.suspect:
                names.add(name)
        return names

    def _complete(self, state: SiteState, interval: int) -> bool:
        """Whether the site's meter covers the interval and has passed its end."""
        m = self.config.market
        end = (interval + 1) * m.interval_s
        return (
            state.last_sample is not None
            and state.last_sample[0] >= end
            and state.covered_s.get(interval, 0.0) >= 0.95 * m.interval_s
        )

    def settle_due(self) -> int:
        """Settle every cleared interval that is due; correct settled ones that late telemetry
        changed; forget what is past the correction window. Returns how many were settled.

        An interval is due ``settle_delay_s`` after its end once every site of its roster has
        metering past its end, and at the latest ``settle_window_s`` after that.
        """
        m = self.config.market
        t = self.config.trust
        now = self.clock.now()
        settled = 0
        for k in sorted(self.cleared):
            end = (k + 1) * m.interval_s
            if now < end + m.settle_delay_s:
                break
            waited_out = now >= end + m.settle_delay_s + t.settle_window_s
            if not waited_out and not all(
                (s := self.sites.get(n)) is not None and self._complete(s, k)
                for n in self.roster(k)
            ):
                continue
            if self.settle(k):
                settled += 1
        self._correct(now)
        current = int(now // m.interval_s)
        if current != self._pruned_at:  # once an interval: it walks every site's tables
            self._pruned_at = current
            self._prune(now)
        return settled

    def settle(self, interval: int) -> bool:
        """Settle a cleared interval in the ledger (once): metered sites at what they metered,
        the others (incomplete or implausible telemetry) as estimated, with the reason."""
        record = self.cleared.get(interval) or self.ledger.clearing(interval)
        if record is None or record.settled:
            self.cleared.pop(interval, None)
            return False
        m = self.config.market
        metered: dict[str, float] = {}
        reasons: dict[str, str] = {}
        roster = self.roster(interval)
        for name in sorted(roster):
            s = self.sites.get(name)
            if s is not None and interval in s.suspect:
                reasons[name] = "implausible telemetry in the interval"
            elif s is not None and s.covered_s.get(interval, 0.0) >= 0.95 * m.interval_s:
                metered[name] = s.energy_wh[interval] / 1000.0
            else:
                covered = 0.0 if s is None else s.covered_s.get(interval, 0.0)
                reasons[name] = (
                    f"telemetry covers {100.0 * covered / m.interval_s:.0f} % of the interval"
                )
        try:
            result = self.ledger.settle_cleared(
                interval, metered_kwh=metered, roster=sorted(roster), estimate_reasons=reasons
            )
        except LedgerError:
            log.exception("interval %d could not be settled", interval)
            return False
        self.cleared.pop(interval, None)
        self._settled_at[interval] = self.clock.now()
        if self.historian is not None:
            self.historian.record_settlement_result(result, ts=self.clock.now())
        self.stats.settled += 1
        self.stats.estimated += len(reasons)
        log.info(
            "interval %d settled: %d sites metered, %d estimated%s",
            interval,
            len(metered),
            len(reasons),
            f" ({', '.join(sorted(reasons))})" if reasons else "",
        )
        return True

    def _correct(self, now: float) -> None:
        """Book corrections for settled intervals whose complete metering changed since."""
        window = self.config.trust.correction_window_s
        for k in sorted(self._dirty):
            settled_at = self._settled_at.get(k)
            if settled_at is None or now - settled_at > window:
                self._dirty.discard(k)
                continue
            stored = self.ledger.settlement(k)
            members = {x.site for x in stored.sites} if stored is not None else set()
            metered = {
                name: s.energy_wh[k] / 1000.0
                for name, s in self.sites.items()
                if name in members
                and k in s.energy_wh
                and k not in s.suspect
                and self._complete(s, k)
            }
            if not metered:
                continue
            ready = all(self._complete(s, k) for s in self.sites.values() if k in s.energy_wh)
            if not ready and now - settled_at < window:
                continue
            self._dirty.discard(k)
            try:
                correction = self.ledger.correct_interval(
                    k, metered_kwh=metered, reason="late telemetry", ts=now
                )
            except LedgerError:
                log.exception("interval %d could not be corrected", k)
                continue
            if correction is not None:
                self.stats.corrections += 1
                log.info("interval %d corrected from late telemetry", k)

    def _prune(self, now: float) -> None:
        """Forget metering older than the correction window (memory stays bounded)."""
        m = self.config.market
        oldest = int((now - self.config.trust.correction_window_s) // m.interval_s) - 1
        for s in self.sites.values():
            for table in (s.energy_wh, s.covered_s):
                for k in [k for k in table if k < oldest]:
                    del table[k]
            s.suspect = {k for k in s.suspect if k >= oldest}
        for k in [k for k in self._settled_at if k < oldest]:
            del self._settled_at[k]

    async def publish_forecasts(self, first_interval: int) -> None:
        """Every known site's forecast from ``first_interval`` on, and the price forecast.

        The forecasts are computed a chunk of sites at a time in a worker thread, on copies
        of the histories taken between chunks, and the messages are built there too: ingest
        goes on in the event loop meanwhile.
        """
        m = self.config.market
        c = self.config.coordinator
        steps = int(m.forecast_horizon_h * 3600 // m.interval_s)
        times = _f64((first_interval + np.arange(steps)) * float(m.interval_s) + m.interval_s / 2)
        self._fill_ghi()
        names = [name for name, s in self.sites.items() if len(s.history)]
        if not names:
            return
        weather = self.weather.snapshot(self.clock.now())
        chunks: list[tuple[list[str], NDArray[np.float64], NDArray[np.float64]]] = []
        net = np.zeros(steps)
        for first in range(0, len(names), FORECAST_CHUNK_SITES):
            chunk = names[first : first + FORECAST_CHUNK_SITES]
            ts, history = self._history_snapshot(chunk)
            pv, load = await asyncio.to_thread(
                forecast_sites, chunk, ts, history, times, c, weather
            )
            net += load.sum(axis=0) - pv.sum(axis=0)
            chunks.append((chunk, pv, load))
        tariffs = np.array([self.tariff_at(float(t)) for t in times])
        fleet = self._after_awards(self._fleet(names), first_interval - 1)
        community: reserve.CommunityPlan | None = None
        if fleet:
            step_h = m.interval_s / 3600.0
            try:
                community = await asyncio.to_thread(
                    self._community_schedule,
                    net * step_h / 1000.0,
                    list(fleet.values()),
                    tariffs,
                    step_h,
                )
            except (ValueError, ArithmeticError) as err:  # the forecasts go out regardless
                log.warning("no community schedule: %s", str(err).splitlines()[0])
        price = (
            community.price_per_kwh
            if community is not None
            else fc.price_forecast_per_kwh(net, tariffs[:, 0], tariffs[:, 1])
        )
        start_ts = float(times[0] - m.interval_s / 2)
        now = self.clock.now()
        forecasts: dict[str, Forecast] = {}
        messages: list[tuple[str, str]] = []
        for chunk, pv, load in chunks:
            built = await asyncio.to_thread(
                _forecast_messages, chunk, pv, load, price, now, start_ts, m.interval_s
            )
            for name, forecast, payload in built:
                forecasts[name] = forecast
                messages.append((topics.forecast_topic(name), payload))
        self.last_forecasts = forecasts
        try:
            messages += self._reservation_messages(chunks, start_ts, now, fleet, community)
        except (ValueError, ArithmeticError) as err:  # a bad reading must not stop forecasts
            log.warning("no feeder reservation this interval: %s", str(err).splitlines()[0])
        if self.historian is not None:
            for name, forecast in forecasts.items():
                self.historian.record_forecast(name, forecast)
        with contextlib.suppress(BusUnavailable):
            self.stats.forecasts += await self.bus.publish_burst(messages, retain=True)

    def _community_schedule(
        self,
        net_kwh: NDArray[np.float64],
        fleet: list[reserve.FleetBattery],
        tariffs: NDArray[np.float64],
        step_h: float,
    ) -> reserve.CommunityPlan:
        """:func:`coordinator.reserve.community_schedule` on the forecast (runs in a worker
        thread)."""
        g = self.config.grid
        return reserve.community_schedule(
            net_kwh,
            fleet,
            retail_per_kwh=tariffs[:, 0],
            feed_in_per_kwh=tariffs[:, 1],
            step_h=step_h,
            import_limit_kw=g.import_limit_w * g.target_pct / 1e5,
            export_limit_kw=g.export_limit_w * g.target_pct / 1e5,
        )

    def _fleet(self, names: Sequence[str]) -> dict[str, reserve.FleetBattery]:
        """The batteries of ``names`` as their latest readings describe them."""
        fleet = {}
        for name in names:
            latest = self.sites[name].latest
            if latest is None:
                continue
            battery = reserve.fleet_from_readings(
                [
                    (d.soc_pct, d.capacity_wh, d.rated_power_w)
                    for d in latest.devices
                    if d.kind == "battery" and d.available
                ]
            )
            if battery is not None:
                fleet[name] = battery
        return fleet

    def _after_awards(
        self, fleet: dict[str, reserve.FleetBattery], cleared: int
    ) -> dict[str, reserve.FleetBattery]:
        """The batteries as they will be when interval ``cleared`` (just cleared; the first
        planned step starts as it ends) has run as awarded (:func:`coordinator.reserve.
        after_award`), from each site's award and the forecast it was sent for that interval."""
        record = self.cleared.get(cleared)
        if record is None:
            return fleet
        awards = record.awards_kwh
        step_h = self.config.market.interval_s / 3600.0
        out = {}
        for name, battery in fleet.items():
            out[name] = reserve.after_award(
                battery, self._forecast_net_kwh(name, cleared), awards.get(name), step_h
            )
        return out

    def _forecast_net_kwh(self, name: str, interval: int) -> float | None:
        """The net load (kWh, + imports) the site's last forecast gave ``interval``, if any."""
        f = self.last_forecasts.get(name)
        if f is None:
            return None
        index = round((interval * self.config.market.interval_s - f.start_ts) / f.step_s)
        if f.step_s != self.config.market.interval_s or not 0 <= index < len(f.pv_power_w):
            return None
        return (f.load_power_w[index] - f.pv_power_w[index]) * f.step_s / 3.6e6

    def _reservation_messages(
        self,
        chunks: Sequence[tuple[list[str], NDArray[np.float64], NDArray[np.float64]]],
        start_ts: float,
        now: float,
        fleet: dict[str, reserve.FleetBattery],
        community: reserve.CommunityPlan | None,
    ) -> list[tuple[str, str]]:
        """Each battery site's share of the feeder reservation (coordinator/reserve.py) and
        of the community schedule's stored energy, from the forecasts just made, as retained
        messages."""
        m, g = self.config.market, self.config.grid
        step_h = m.interval_s / 3600.0
        net: dict[str, NDArray[np.float64]] = {}
        for names, pv, load in chunks:
            for row, name in enumerate(names):
                net[name] = (load[row] - pv[row]) * step_h / 1000.0
        if not fleet:
            return []
        try:
            result = reserve.reserve(
                net,
                fleet,
                step_h=step_h,
                import_limit_kw=g.import_limit_w / 1000.0,
                export_limit_kw=g.export_limit_w / 1000.0,
                plan_to_share=g.target_pct / 100.0,
                fleet_stored_kwh=None if community is None else community.stored_kwh,
            )
        except reserve.ReservationError as err:
            log.warning("no feeder reservation: %s", err)
            return []
        self.last_reservation = result
        self.last_reservation_ts = now
        self.last_reservation_start_ts = start_ts
        level = result.import_level_kw
        planned = g.import_limit_w * g.target_pct / 1e5
        raised = math.isfinite(level) and level > planned * 1.001
        if raised != self._level_raised:
            self._level_raised = raised
            if raised:
                log.warning(
                    "feeder %s: the batteries cannot hold %.0f kW through the forecast; "
                    "holding %.0f kW instead, spread over the whole overload",
                    self.feeder,
                    planned,
                    level,
                )
            else:
                log.info("feeder %s: the batteries hold the import limit again", self.feeder)
        out = []
        for name in fleet:
            share = result.sites[name]
            message = Reservation(
                ts=now,
                start_ts=start_ts,
                step_s=m.interval_s,
                floor_kwh=reserve.flatten(share.floor_kwh),
                import_cap_kw=reserve.flatten(share.import_cap_kw),
                export_cap_kw=reserve.flatten(share.export_cap_kw),
                suggested_kwh=reserve.flatten(share.suggested_kwh)
                if np.isfinite(share.suggested_kwh).any()
                else [],
            )
            out.append((topics.site_topic(name, "reservation"), message.model_dump_json()))
        return out

    def _history_snapshot(
        self, names: Sequence[str]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Copies of the sites' histories (:func:`history_snapshot`)."""
        return history_snapshot([self.sites[name].history for name in names])

    # -- grid ------------------------------------------------------------------------------
    def feeder_flow_w(self) -> float:
        """The feeder's net import, W: the sum of every site's latest grid exchange."""
        return float(
            sum(s.latest_grid_w or 0.0 for s in self.sites.values() if s.latest_grid_w is not None)
        )

    async def _grid_loop(self) -> None:
        g = self.config.grid
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            await self.balance(loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), g.period_s)

    def _import_level_kw(self, now: float) -> float | None:
        """The import level the latest feeder reservation plans to (kW), while it is recent
        (two market intervals): the grid loop holds it when the batteries cannot hold the
        limit (:func:`coordinator.grid.holding_grid`)."""
        r = self.last_reservation
        if r is None or now - self.last_reservation_ts > 2 * self.config.market.interval_s:
            return None
        return r.import_level_kw

    async def balance(self, wall_now: float) -> None:
        """Check the feeder; dispatch batteries (and load limits) while it nears a limit
        (:mod:`coordinator.grid`)."""
        flow = self.flow_w = self.feeder_flow_w()
        now = self.clock.now()
        g = grid.holding_grid(self.config.grid, self._import_level_kw(now))
        self.flow_log.append((now, flow))
        self._relief = grid.active_reliefs(self._relief, now)
        before = self.mode
        self.mode = grid.feeder_mode(
            flow, self._relief, previous=before, emergency=now < self.emergency_until, grid=g
        )
        if self.mode != before:
            log.info("feeder %s: %s -> %s at %.0f W", self.feeder, before, self.mode, flow)
            self._audit(
                "grid_mode", "coordinator", {"from": before, "to": self.mode, "flow_w": flow}
            )
        relieved: set[str] = set()
        if self.mode == "constrained":
            relieved = await self._relieve(flow, grid.relief_target_w(flow, g), wall_now)
        if self.mode == "emergency":
            self._refill_state = grid.Refilling()
            self._absorbing = {}
        else:
            await self._refill(flow, g, wall_now, relieved | set(self._relief))
            if g.absorb_export:
                busy = relieved | set(self._relief) | set(self._refill_state.orders)
                await self._absorb(flow, g, wall_now, busy)
        state = GridState(
            ts=now,
            flow_w=float(np.clip(flow, -1e9, 1e9)),
            import_limit_w=self.config.grid.import_limit_w,
            export_limit_w=g.export_limit_w,
            mode=self.mode,
        )
        if self.historian is not None:
            self.historian.record_grid_state(self.feeder, state)
        with contextlib.suppress(BusUnavailable):
            await self.bus.publish(
                topics.grid_state_topic(self.feeder), state.model_dump_json(), retain=True
            )

    async def _relieve(self, flow: float, target: float, wall_now: float) -> set[str]:
        """Send the orders of :func:`coordinator.grid.plan_relief`: battery setpoints pro rata
        to headroom, then load limits; each site at most once every ``reissue_s``. Returns the
        sites given a battery order."""
        g = self.config.grid
        now = self.clock.now()
        views = {n: v for n, s in self.sites.items() if (v := s.grid_view()) is not None}
        plan = grid.plan_relief(
            flow, target, views, self._relief, now_ts=now, expiry_s=g.dispatch_expiry_s
        )
        orders: dict[str, tuple[Dispatch, grid.Relief | None]] = {
            name: (
                Dispatch(
                    ts=now,
                    battery_power_w=setpoint,
                    expires_ts=relief.expires_ts,
                    reason=f"feeder {self.feeder} at {abs(flow):.0f} W",
                ),
                relief,
            )
            for name, (setpoint, relief) in plan.batteries.items()
        }
        for name, limit_w in plan.load_limits_w.items():
            orders[name] = (
                Dispatch(
                    ts=now,
                    load_limit_w=limit_w,
                    expires_ts=now + g.dispatch_expiry_s,
                    reason=f"feeder {self.feeder} over its limit: please limit load",
                ),
                None,
            )
        for name, (order, relief) in orders.items():
            if not self._grid_order_due(name, wall_now, g):
                continue
            if not await self._send_grid_order(name, order, wall_now):
                break
            if relief is not None:
                self._relief[name] = relief
        return set(plan.batteries)

    def _grid_order_due(self, name: str, wall_now: float, g: GridSection) -> bool:
        """Whether the grid loop may send the site another order now (at most one every
        ``reissue_s`` of simulated time, whichever loop sent the last)."""
        return grid.reissue_due(self._grid_orders.get(name), wall_now, g.reissue_s / self.speed)

    async def _send_grid_order(self, name: str, order: Dispatch, wall_now: float) -> bool:
        """Publish one of the grid loop's orders to the site and note it (the reissue clock,
        the historian, the statistics); False when the bus is unavailable (stop sending)."""
        self._own_dispatch_ids.append(order.id)
        try:
            await self.bus.publish(topics.site_topic(name, "dispatch"), order.model_dump_json())
        except BusUnavailable:
            return False
        self._grid_orders[name] = wall_now
        if self.historian is not None:
            self.historian.record_dispatch(name, order)
        self.stats.dispatches += 1
        return True

    def _required_now_kwh(self, now: float) -> float | None:
        """The fleet's stored energy the latest feeder reservation asks for now (kWh), while
        it is recent (two market intervals; :func:`coordinator.grid.required_now_kwh`)."""
        r = self.last_reservation
        interval_s = self.config.market.interval_s
        if r is None or now - self.last_reservation_ts > 2 * interval_s:
            return None
        return grid.required_now_kwh(
            r.required_kwh, self.last_reservation_start_ts, interval_s, now
        )

    async def _refill(
        self, flow: float, g: GridSection, wall_now: float, relieved: set[str]
    ) -> None:
        """While the batteries hold less than the feeder reservation asks for now, charge them
        into the feeder's measured headroom (:func:`coordinator.grid.plan_refill`), each site
        at most once every ``reissue_s``; sites under a relief order are left to it."""
        now = self.clock.now()
        state = self._refill_state
        state.orders = {
            n: r for n, r in grid.active_reliefs(state.orders, now).items() if n not in relieved
        }
        required = self._required_now_kwh(now)
        fleet = self._fleet(list(self.sites)) if required is not None else {}
        if required is None or not fleet:
            state.active = False
            return
        stored = sum(b.stored_kwh for b in fleet.values())
        interval_s = self.config.market.interval_s
        state.active = grid.refilling(
            stored,
            required,
            sum(b.max_kwh for b in fleet.values()),
            active=state.active,
        )
        if not state.active:
            return
        views = {
            n: v
            for n in fleet
            if n not in relieved and (v := self.sites[n].grid_view()) is not None
        }
        orders = grid.plan_refill(
            flow,
            grid.refill_level_w(g),
            views,
            state.orders,
            now_ts=now,
            expiry_s=g.dispatch_expiry_s,
            max_w=grid.refill_max_w(required - stored, interval_s),
        )
        for name, (setpoint, refill) in orders.items():
            if not self._grid_order_due(name, wall_now, g):
                continue
            order = Dispatch(
                ts=now,
                battery_power_w=setpoint,
                expires_ts=refill.expires_ts,
                reason=f"feeder {self.feeder}: refilling batteries short of its reservation",
            )
            if not await self._send_grid_order(name, order, wall_now):
                return
            state.orders[name] = refill
            self._relief.pop(name, None)  # the refill's order replaces a lapsing relief
            self._absorbing.pop(name, None)  # ... and an absorbing one

    async def _absorb(self, flow: float, g: GridSection, wall_now: float, busy: set[str]) -> None:
        """While the feeder exports, charge the export into the batteries pro rata to their
        charge room, and hand that charge back once it imports (:func:`coordinator.grid.
        plan_absorb`), each site at most once every ``reissue_s``; sites under a relief or
        refill order (``busy``) are left to it."""
        now = self.clock.now()
        self._absorbing = {
            n: r for n, r in grid.active_reliefs(self._absorbing, now).items() if n not in busy
        }
        views = {
            n: v
            for n, s in self.sites.items()
            if n not in busy and (v := s.grid_view()) is not None
        }
        orders = grid.plan_absorb(
            flow,
            views,
            self._absorbing,
            now_ts=now,
            expiry_s=grid.absorb_expiry_s(now, self.config.market.interval_s, g.dispatch_expiry_s),
        )
        for name, (setpoint, absorbed) in orders.items():
            if not self._grid_order_due(name, wall_now, g):
                continue
            order = Dispatch(
                ts=now,
                battery_power_w=setpoint,
                expires_ts=absorbed.expires_ts,
                reason=f"feeder {self.feeder} exporting {max(-flow, 0.0):.0f} W: storing it",
            )
            if not await self._send_grid_order(name, order, wall_now):
                return
            self._absorbing[name] = absorbed
