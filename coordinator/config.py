"""The coordinator's TOML file: feeder, broker, market, tariffs, grid limits, ledger.

Every mistake is reported with the file and the field. Prices are per kWh, powers in W.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from broker.settings import BrokerConnection, ClockSettings, read_toml, validation_lines
from broker.topics import ID_PATTERN
from coordinator.history_db import HistoryTable
from coordinator.ledger import Ledger, RebateRule
from coordinator.ledger_sql import is_postgres_url


class CoordinatorConfigError(ValueError):
    """A coordinator file is wrong; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CoordinatorSection(_Strict):
    """Which feeder this coordinator runs and where it is."""

    feeder: str = Field(default="feeder-1", pattern=ID_PATTERN)
    latitude_deg: float = Field(default=48.0, ge=-90, le=90)
    longitude_deg: float = Field(default=11.0, ge=-180, le=180)
    utc_offset_h: float = Field(default=0.0, ge=-14, le=14)
    ledger: Path = Path("ledger.sqlite")
    #: A PostgreSQL ledger instead of the file ``ledger``: ``postgresql://user@host:port/db``
    #: (no password in it: that comes from the environment variable ``ledger_password_env``).
    ledger_url: str | None = None
    ledger_password_env: str | None = "WATTMESH_LEDGER_PASSWORD"
    #: Telemetry ingest in this many worker processes (0: in the coordinator's own process).
    #: Each connects as broker user ``{username}-ingest-{i}`` (``wattmesh broker init
    #: --ingest-workers N``) and takes its share of a shared subscription; see
    #: coordinator/ingest.py.
    ingest_workers: int = Field(default=0, ge=0, le=64)
    #: Wall seconds between two batches of validated readings from the ingest workers.
    ingest_flush_s: float = Field(default=0.1, ge=0.01, le=1.0)
    #: Keep the forecasting history (a week of each site's PV and load) on disk, so that a
    #: restarted coordinator forecasts from it (coordinator/history_store.py).
    keep_history: bool = True
    #: Where: by default beside a SQLite ledger (``ledger.sqlite`` -> ``ledger.history.npz``);
    #: with a PostgreSQL ledger, in its database (coordinator/history_db.py: a standby on
    #: another machine takes over with it), unless this names a file.
    history_file: Path | None = None
    #: Seconds (on the coordinator's clock) between two writes of the history; it is also
    #: written on a clean stop.
    history_save_s: float = Field(default=900.0, ge=10.0, le=86_400.0)

    @field_validator("ledger_url")
    @classmethod
    def _postgres_url(cls, url: str | None) -> str | None:
        if url is not None:
            if not is_postgres_url(url):
                raise ValueError("must be a postgresql:// URL (a SQLite ledger goes in ledger)")
            if urlsplit(url).password is not None:
                raise ValueError("must not hold a password: set it in ledger_password_env")
        return url

    def history_path(self) -> Path | None:
        """The history file, or None when the history is not kept in one (``keep_history``
        off, or a PostgreSQL ledger without ``history_file``: :meth:`history_table`)."""
        if not self.keep_history:
            return None
        if self.history_file is not None:
            return self.history_file
        if self.ledger_url is not None:
            return None
        return self.ledger.with_name(f"{self.ledger.stem}.history.npz")

    def history_table(self) -> HistoryTable | None:
        """Where the history is kept in the PostgreSQL ledger's database (a PostgreSQL ledger,
        ``keep_history`` on and no ``history_file``), else None."""
        if not self.keep_history or self.history_file is not None or self.ledger_url is None:
            return None
        return HistoryTable(self.ledger_url, self.feeder, self._ledger_password())

    def _ledger_password(self) -> str | None:
        return os.environ.get(self.ledger_password_env) if self.ledger_password_env else None

    def open_ledger(self) -> Ledger:
        """The ledger: PostgreSQL at ``ledger_url`` (password from ``$ledger_password_env``
        when set, else libpq's own sources), or else the SQLite file ``ledger``. Raises
        :class:`~coordinator.ledger.LedgerStorageError` naming the cause (psycopg missing,
        server unreachable, password refused)."""
        if self.ledger_url is None:
            return Ledger(self.ledger)
        return Ledger(self.ledger_url, password=self._ledger_password())


class BrokerSection(BrokerConnection):
    """How to reach the MQTT broker with the coordinator's credentials."""

    username: str | None = "coordinator"
    password_env: str | None = "WATTMESH_COORDINATOR_PASSWORD"
    client_id: str | None = "wattmesh-coordinator"
    #: The ingest workers' password (one for all their users), with ``ingest_workers`` > 0.
    ingest_password_env: str | None = "WATTMESH_INGEST_PASSWORD"
    #: The listener the ingest workers log in on (default: ``port``). Behind a ``mount_point``
    #: it must be another listener, one without a mount point (a many-feeders broker's
    #: operator listener, where ``broker init --feeders`` puts the ingest users): Mosquitto
    #: puts the mount point in front of ``$share/...``, which makes a shared subscription an
    #: ordinary one that matches nothing (coordinator/ingest.py).
    ingest_port: int | None = Field(default=None, gt=0, le=65535)

    def ingest_password(self) -> str:
        """The ingest workers' password from ``$ingest_password_env``; ``ValueError`` if unset."""
        value = os.environ.get(self.ingest_password_env) if self.ingest_password_env else None
        if value is None:
            raise ValueError(
                f"broker.ingest_password_env: ${self.ingest_password_env} is not set "
                "(coordinator.ingest_workers > 0 needs the ingest users' password)"
            )
        return value


class MarketSection(_Strict):
    """Market intervals (s) and settlement."""

    interval_s: int = Field(default=900, ge=60, le=86400)
    gate_s: int = Field(default=60, ge=0)
    settle_delay_s: int = Field(default=120, ge=0, description="wait for late telemetry")
    imbalance_premium_per_kwh: float = Field(default=0.05, ge=0, le=10)
    rebate: RebateRule = Field(
        default="traded_energy",
        description="pay the community account's balance of each interval back to the sites",
    )
    forecast_horizon_h: float = Field(default=24.0, gt=0, le=168)

    @model_validator(mode="after")
    def _order(self) -> MarketSection:
        if self.gate_s >= self.interval_s:
            raise ValueError("gate_s must be shorter than interval_s")
        return self


class TariffPeriod(_Strict):
    """A time-of-use window in local hours [start_h, end_h) with its prices."""

    start_h: float = Field(ge=0, lt=24)
    end_h: float = Field(gt=0, le=24)
    retail_per_kwh: float = Field(ge=-10, le=10)
    feed_in_per_kwh: float = Field(ge=-10, le=10)


class TariffSection(_Strict):
    """The utility's prices at the point of connection; periods override the defaults."""

    retail_per_kwh: float = Field(default=0.30, ge=-10, le=10)
    feed_in_per_kwh: float = Field(default=0.08, ge=-10, le=10)
    periods: list[TariffPeriod] = Field(default_factory=list)

    @model_validator(mode="after")
    def _spread(self) -> TariffSection:
        pairs = [(self.retail_per_kwh, self.feed_in_per_kwh)]
        pairs += [(p.retail_per_kwh, p.feed_in_per_kwh) for p in self.periods]
        if any(not feed_in < retail for retail, feed_in in pairs):
            raise ValueError("feed_in_per_kwh must be below retail_per_kwh")
        return self

    def at(self, ts: float, utc_offset_h: float) -> tuple[float, float]:
        """(retail, feed-in) per kWh in force at ``ts``."""
        hour = ((ts / 3600.0) + utc_offset_h) % 24.0
        for p in self.periods:
            inside = (
                (p.start_h <= hour < p.end_h)
                if p.start_h < p.end_h
                else (hour >= p.start_h or hour < p.end_h)
            )
            if inside:
                return p.retail_per_kwh, p.feed_in_per_kwh
        return self.retail_per_kwh, self.feed_in_per_kwh


class GridSection(_Strict):
    """The feeder's limits (W) and how the coordinator keeps inside them."""

    import_limit_w: float = Field(default=1e9, gt=0)
    export_limit_w: float = Field(default=1e9, gt=0)
    act_at_pct: float = Field(default=90.0, gt=0, le=100, description="start dispatching")
    target_pct: float = Field(default=80.0, gt=0, le=100, description="aim for this much")
    release_pct: float = Field(default=70.0, gt=0, le=100, description="stop re-issuing")
    refill_pct: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="charge batteries short of the feeder reservation into the measured "
        "headroom up to this much (default: target_pct less a third of the gap to release_pct)",
    )
    absorb_export: bool = Field(
        default=True,
        description="charge the feeder's export into the batteries, pro rata to their charge "
        "room, rather than sell it at the feed-in tariff (what a missed forecast leaves over)",
    )
    period_s: float = Field(default=1.0, gt=0, le=60, description="wall seconds per check")
    dispatch_expiry_s: int = Field(default=300, ge=10, le=3600)
    reissue_s: int = Field(default=60, ge=1, le=3600)

    @model_validator(mode="after")
    def _order(self) -> GridSection:
        if not self.release_pct <= self.target_pct <= self.act_at_pct:
            raise ValueError("need release_pct <= target_pct <= act_at_pct")
        refill = self.refill_pct
        if refill is not None and not self.release_pct <= refill <= self.target_pct:
            raise ValueError("need release_pct <= refill_pct <= target_pct")
        return self

    @property
    def refill_level_pct(self) -> float:
        """The import the grid loop refills batteries up to, % of the import limit."""
        if self.refill_pct is not None:
            return self.refill_pct
        return self.target_pct - (self.target_pct - self.release_pct) / 3.0


class TrustSection(_Strict):
    """How far the coordinator believes a site (coordinator.plausibility).

    Readings stamped more than ``future_skew_s`` ahead of the coordinator's clock, or more than
    ``max_age_s`` behind it, are rejected, as are powers beyond a site's limits (+ ``tolerance``)
    and bids outside the open interval and ``bids_ahead`` after it. A site without a
    ``[sites.NAME]`` entry gets ``default_connection_w`` (by default the feeder's larger limit,
    at most 1 MW), or the PV and battery ratings its devices report if larger, at most
    ``max_connection_w``; and those ratings, each capped at ``max_rating_ratio`` times its
    connection. Declare real sites: a site's first report is otherwise what bounds it.
    """

    future_skew_s: float = Field(default=30.0, ge=0, le=3600)
    max_age_s: float = Field(default=7 * 86400.0, gt=0, le=90 * 86400)
    tolerance: float = Field(default=0.1, ge=0, le=10, description="fraction of a limit")
    default_connection_w: float | None = Field(
        default=None,
        gt=0,
        le=1e9,
        description="a site's connection when undeclared; default: the feeder's larger limit, "
        "at most 1 MW",
    )
    max_connection_w: float = Field(
        default=1_000_000.0, gt=0, le=1e9, description="most an undeclared site may claim"
    )
    max_rating_ratio: float = Field(default=2.0, gt=0, le=100)
    bids_ahead: int = Field(default=4, ge=0, le=96, description="intervals after the open one")
    max_sites: int = Field(default=20_000, ge=1, le=1_000_000)
    max_hold_s: float = Field(
        default=300.0, gt=0, le=86400, description="longest gap one reading is metered over"
    )
    settle_window_s: int = Field(
        default=900, ge=0, description="longest wait past settle_delay_s for late telemetry"
    )
    correction_window_s: int = Field(
        default=6 * 3600, ge=0, description="telemetry this late still corrects a settlement"
    )


class MetricsSection(_Strict):
    """Prometheus metrics on ``http://host:port/metrics`` (off without this section)."""

    host: str = "127.0.0.1"
    port: int = Field(default=9108, ge=0, le=65535, description="0 picks a free port")


class ApiSection(_Strict):
    """The HTTP API on ``http://host:port/api/v1`` (off without this section).

    ``tokens_file`` holds the hashed bearer tokens (``wattmesh api token add``); relative to
    the coordinator's file.
    """

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535, description="0 picks a free port")
    tokens_file: Path = Path("api-tokens.toml")
    ack_timeout_s: float = Field(default=10.0, gt=0, le=300)


class SiteSection(_Strict):
    """A site's declared limits, W: its grid connection, PV rating and battery power."""

    connection_w: float = Field(gt=0, le=1e9)
    pv_w: float | None = Field(default=None, ge=0, le=1e9)
    battery_w: float | None = Field(default=None, ge=0, le=1e9)


class WeatherSection(_Strict):
    """A weather service's forecast (``weather/forecast``) in the PV forecasts.

    ``enabled = false`` ignores it (the PV forecast then comes from history alone); a forecast
    issued more than ``max_age_h`` ago is stale and not used ahead (a numerical weather
    prediction runs every 6 h: 18 h lets two runs go missing).
    """

    enabled: bool = True
    max_age_h: float = Field(default=18.0, gt=0, le=168)


#: The default connection of an undeclared site is at most this (W).
MAX_DEFAULT_CONNECTION_W = 1_000_000.0


class CoordinatorConfig(_Strict):
    """A whole coordinator file."""

    coordinator: CoordinatorSection = CoordinatorSection()
    broker: BrokerSection = BrokerSection()
    market: MarketSection = MarketSection()
    tariff: TariffSection = TariffSection()
    grid: GridSection = GridSection()
    trust: TrustSection = TrustSection()
    sites: dict[str, SiteSection] = Field(default_factory=dict)
    metrics: MetricsSection | None = None
    api: ApiSection | None = None
    clock: ClockSettings | None = None
    historian: dict[str, Any] | None = None
    weather: WeatherSection = WeatherSection()

    def default_connection_w(self) -> float:
        """The connection limit (W) of a site without a ``[sites.NAME]`` entry."""
        if self.trust.default_connection_w is not None:
            return self.trust.default_connection_w
        feeder_w = max(self.grid.import_limit_w, self.grid.export_limit_w)
        return min(feeder_w, MAX_DEFAULT_CONNECTION_W)

    @model_validator(mode="after")
    def _ingest_listener(self) -> CoordinatorConfig:
        b = self.broker
        if self.coordinator.ingest_workers and b.mount_point and b.ingest_port in (None, b.port):
            raise ValueError(
                "coordinator.ingest_workers with broker.mount_point needs broker.ingest_port: "
                "the port of a listener without a mount point (on a many-feeders broker the "
                "operator listener, [broker] port in credentials.toml). Mosquitto (2.0.11 and "
                "later 2.0 releases) puts the mount point in front of the workers' $share/... "
                f"subscription ({b.mount_point}$share/...), which makes it an ordinary "
                "subscription that matches no topic: the workers would receive nothing"
            )
        return self

    @field_validator("sites")
    @classmethod
    def _site_names(cls, sites: dict[str, SiteSection]) -> dict[str, SiteSection]:
        bad = [name for name in sites if not re.fullmatch(ID_PATTERN, name)]
        if bad:
            raise ValueError(f"not a site id: {', '.join(bad)}")
        return sites


def parse_coordinator_config(data: dict[str, object], source: str) -> CoordinatorConfig:
    """Validate a coordinator mapping; errors name ``source`` and each wrong field."""
    try:
        config = CoordinatorConfig.model_validate(data)
    except ValidationError as err:
        raise CoordinatorConfigError(validation_lines(err, source)) from err
    ledger = config.coordinator.ledger
    if not ledger.is_absolute() and source.endswith(".toml"):
        section = config.coordinator.model_copy(update={"ledger": Path(source).parent / ledger})
        config = config.model_copy(update={"coordinator": section})
    api = config.api
    if api is not None and not api.tokens_file.is_absolute() and source.endswith(".toml"):
        moved = api.model_copy(update={"tokens_file": Path(source).parent / api.tokens_file})
        config = config.model_copy(update={"api": moved})
    return config


def load_coordinator_config(path: str | Path) -> CoordinatorConfig:
    """Read and validate a coordinator TOML file (a relative ledger path is next to it)."""
    p = Path(path)
    return parse_coordinator_config(read_toml(p, CoordinatorConfigError), str(p))
