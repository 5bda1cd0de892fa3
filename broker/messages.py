"""Message models: the single source of truth for every bus payload (docs/architecture.md s. 3).

Strict validation: no unknown fields, finite numbers, bounded prices and quantities, bids
listed as monotone curves, expiries after their start. Every message carries
``schema_version``, a unique ``id`` and ``ts`` (UTC epoch seconds); receivers are idempotent on
``id``. Out: ``model_dump_json()``; in: ``model_validate_json()`` (or :func:`decode`).
Identity comes from the topic, never from a payload field.
"""

from __future__ import annotations

import itertools
import json
import math
import uuid
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

SCHEMA_VERSION: Literal[1] = 1

#: Bounds that catch nonsense (a unit slip, a corrupted value) without limiting real sites.
MAX_PRICE_PER_KWH = 100.0
MAX_QUANTITY_KWH = 1e6
MAX_POWER_W = 1e9
MAX_BID_STEPS = 64
MAX_FORECAST_POINTS = 7 * 96


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Finite = Annotated[float, AfterValidator(_finite)]
PowerW = Annotated[float, Field(ge=-MAX_POWER_W, le=MAX_POWER_W), AfterValidator(_finite)]
Price = Annotated[
    float, Field(ge=-MAX_PRICE_PER_KWH, le=MAX_PRICE_PER_KWH), AfterValidator(_finite)
]
Quantity = Annotated[float, Field(gt=0, le=MAX_QUANTITY_KWH), AfterValidator(_finite)]
Percent = Annotated[float, Field(ge=0, le=100), AfterValidator(_finite)]
Timestamp = Annotated[float, Field(gt=0, lt=4.1e9), AfterValidator(_finite)]
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


def new_id() -> str:
    """A fresh unique message id."""
    return uuid.uuid4().hex


class Message(BaseModel):
    """Fields every message has."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    id: str = Field(
        default_factory=new_id, min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$"
    )
    ts: Timestamp


CounterKey = Annotated[str, Field(min_length=1, max_length=64)]
Count = Annotated[int, Field(ge=0)]


class Status(Message):
    """``site/{site}/status``: retained; the last will publishes ``online=False``.

    The edge's health counters are optional (absent from older agents): ``spool_state``
    (``ok``, or ``degraded`` while its spool is unusable), ``telemetry_dropped`` (messages
    lost since the agent started), ``telemetry_direct`` (published without the spool),
    ``rejected`` (inbound messages refused, by topic kind then reason) and
    ``dispatch_outcomes`` (acknowledgements sent, by outcome) and ``setpoint_writes``
    (battery setpoint commands written since the agent started, by device).
    """

    online: bool
    role: Literal["producer", "consumer", "prosumer"] | None = None
    capabilities: list[Name] = Field(default_factory=list, max_length=32)
    software_version: str = Field(default="", max_length=32)
    spool_state: Literal["ok", "degraded"] | None = None
    telemetry_dropped: Count = 0
    telemetry_direct: Count = 0
    rejected: dict[CounterKey, Annotated[dict[CounterKey, Count], Field(max_length=32)]] = Field(
        default_factory=dict, max_length=32
    )
    dispatch_outcomes: dict[CounterKey, Count] = Field(default_factory=dict, max_length=16)
    setpoint_writes: dict[CounterKey, Count] = Field(default_factory=dict, max_length=64)


class DeviceReading(BaseModel):
    """One device's reading within a telemetry message; missing values are ``None``.

    A battery's ``setpoint_writes`` counts the setpoint commands written to it since the
    agent started, ``setpoint_refreshes`` those of them that only renewed an unchanged
    setpoint before the device's own revert timeout.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    device: Name
    kind: Literal["pv_inverter", "battery", "sunspec_meter", "sdm630", "meter"]
    available: bool
    error: str | None = Field(default=None, max_length=200)
    power_w: PowerW | None = None
    energy_wh: Annotated[float, Field(ge=0), AfterValidator(_finite)] | None = None
    soc_pct: Percent | None = None
    import_energy_wh: Annotated[float, Field(ge=0), AfterValidator(_finite)] | None = None
    export_energy_wh: Annotated[float, Field(ge=0), AfterValidator(_finite)] | None = None
    setpoint_w: PowerW | None = None
    rated_power_w: Annotated[float, Field(ge=0, le=MAX_POWER_W)] | None = None
    capacity_wh: Annotated[float, Field(ge=0)] | None = None
    setpoint_writes: Count | None = None
    setpoint_refreshes: Count | None = None


class Telemetry(Message):
    """``site/{site}/telemetry``: one message per poll cycle with every device's reading.

    Site totals (W): ``grid_power_w`` positive when importing, ``battery_power_w`` positive
    when discharging, ``pv_power_w`` and ``load_power_w`` positive.
    """

    devices: list[DeviceReading] = Field(max_length=64)
    grid_power_w: PowerW | None = None
    pv_power_w: PowerW | None = None
    battery_power_w: PowerW | None = None
    load_power_w: PowerW | None = None
    battery_soc_pct: Percent | None = None
    controller: Literal["safety", "emergency", "dispatch", "market", "plan", "fallback"] | None = (
        None
    )


class BidStep(BaseModel):
    """Up to ``quantity_kwh`` at a limit price: buy at or below it, sell at or above it."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    price_per_kwh: Price
    quantity_kwh: Quantity


class Bid(Message):
    """``site/{site}/bid``: the site's curve for one interval.

    ``buy`` steps are listed by falling price and ``sell`` steps by rising price, so the
    site's net demand falls as the price rises (a monotone curve). A site never offers to
    sell at or below a price it bids to buy at.
    """

    interval: int = Field(ge=0)
    buy: list[BidStep] = Field(default_factory=list, max_length=MAX_BID_STEPS)
    sell: list[BidStep] = Field(default_factory=list, max_length=MAX_BID_STEPS)

    @model_validator(mode="after")
    def _monotone(self) -> Self:
        buy = [s.price_per_kwh for s in self.buy]
        sell = [s.price_per_kwh for s in self.sell]
        if any(a < b for a, b in itertools.pairwise(buy)):
            raise ValueError("buy steps must be listed by falling price")
        if any(a > b for a, b in itertools.pairwise(sell)):
            raise ValueError("sell steps must be listed by rising price")
        if buy and sell and max(buy) >= min(sell):
            raise ValueError("a site must not offer to sell at or below its own buy price")
        return self


class Award(Message):
    """``site/{site}/award``: what the site won in one interval (positive = import)."""

    interval: int = Field(ge=0)
    price_per_kwh: Price
    quantity_kwh: Annotated[
        float, Field(ge=-MAX_QUANTITY_KWH, le=MAX_QUANTITY_KWH), AfterValidator(_finite)
    ]


class Dispatch(Message):
    """``site/{site}/dispatch``: a battery setpoint and/or a load limit, valid until expiry.

    ``battery_power_w`` positive discharges; ``load_limit_w`` caps the site's import. An
    ``emergency`` order outranks ordinary dispatch (docs/architecture.md section 5).
    """

    battery_power_w: PowerW | None = None
    load_limit_w: Annotated[float, Field(ge=0, le=MAX_POWER_W), AfterValidator(_finite)] | None = (
        None
    )
    expires_ts: Timestamp
    priority: Literal["dispatch", "emergency"] = "dispatch"
    reason: str = Field(default="", max_length=200)

    @model_validator(mode="after")
    def _sane(self) -> Self:
        if self.battery_power_w is None and self.load_limit_w is None:
            raise ValueError("a dispatch needs battery_power_w or load_limit_w")
        if self.expires_ts <= self.ts:
            raise ValueError("expires_ts must be after ts")
        if self.expires_ts - self.ts > 24 * 3600:
            raise ValueError("a dispatch may last at most 24 h; renew it instead")
        return self


class DispatchAck(Message):
    """``site/{site}/dispatch/ack``: what the edge did with a dispatch command."""

    command_id: str = Field(min_length=1, max_length=64)
    outcome: Literal["accepted", "clamped", "refused", "expired", "duplicate", "invalid"]
    applied_battery_power_w: PowerW | None = None
    applied_load_limit_w: PowerW | None = None
    detail: str = Field(default="", max_length=300)


class Clearing(Message):
    """``market/clearing``: one interval's result, retained."""

    interval: int = Field(ge=0)
    price_per_kwh: Price
    volume_kwh: Annotated[float, Field(ge=0, le=MAX_QUANTITY_KWH * 1e3), AfterValidator(_finite)]
    utility_import_kwh: Annotated[float, Field(ge=0), AfterValidator(_finite)] = 0.0
    utility_export_kwh: Annotated[float, Field(ge=0), AfterValidator(_finite)] = 0.0
    bids: int = Field(default=0, ge=0)


class Forecast(Message):
    """``forecast/{site}``: PV, load and price for the coming intervals, retained."""

    start_ts: Timestamp
    step_s: int = Field(gt=0, le=86400)
    pv_power_w: list[PowerW] = Field(max_length=MAX_FORECAST_POINTS)
    load_power_w: list[PowerW] = Field(max_length=MAX_FORECAST_POINTS)
    price_per_kwh: list[Price] = Field(max_length=MAX_FORECAST_POINTS)

    @model_validator(mode="after")
    def _aligned(self) -> Self:
        if not len(self.pv_power_w) == len(self.load_power_w) == len(self.price_per_kwh):
            raise ValueError("pv_power_w, load_power_w and price_per_kwh must be equally long")
        return self


StoredKwh = Annotated[float, Field(ge=0, le=MAX_QUANTITY_KWH), AfterValidator(_finite)]
CapKw = Annotated[
    float, Field(ge=-MAX_POWER_W / 1e3, le=MAX_POWER_W / 1e3), AfterValidator(_finite)
]


class Reservation(Message):
    """``site/{site}/reservation``: what the coordinator asks of the site's batteries to keep
    the feeder within its limits, retained. Per step of ``step_s`` from ``start_ts`` (``None``:
    nothing asked in that step): ``floor_kwh`` the energy to hold stored at the step's end,
    ``import_cap_kw`` the most the site should import (negative: the least it should export),
    ``export_cap_kw`` the most it should export (negative: the least it should import);
    ``suggested_kwh`` (optional) the site's share of the community schedule's stored energy,
    not a constraint but what its plan prefers among equally good ones. New in the first
    planning release; an agent that does not plan ignores it."""

    start_ts: Timestamp
    step_s: int = Field(gt=0, le=86400)
    floor_kwh: list[StoredKwh | None] = Field(max_length=MAX_FORECAST_POINTS)
    import_cap_kw: list[CapKw | None] = Field(max_length=MAX_FORECAST_POINTS)
    export_cap_kw: list[CapKw | None] = Field(max_length=MAX_FORECAST_POINTS)
    suggested_kwh: list[StoredKwh | None] = Field(
        default_factory=list, max_length=MAX_FORECAST_POINTS
    )

    @model_validator(mode="after")
    def _aligned(self) -> Self:
        if not len(self.floor_kwh) == len(self.import_cap_kw) == len(self.export_cap_kw):
            raise ValueError("floor_kwh, import_cap_kw and export_cap_kw must be equally long")
        if self.suggested_kwh and len(self.suggested_kwh) != len(self.floor_kwh):
            raise ValueError("suggested_kwh must be empty or as long as floor_kwh")
        return self


class GridState(Message):
    """``grid/{feeder}/state``: the feeder's flow against its limits, retained."""

    flow_w: PowerW
    import_limit_w: Annotated[float, Field(ge=0, le=MAX_POWER_W)]
    export_limit_w: Annotated[float, Field(ge=0, le=MAX_POWER_W)]
    mode: Literal["normal", "constrained", "emergency"]


class CoordinatorStatus(Message):
    """``coordinator/{feeder}/status``: the coordinator's health counters, retained.

    ``rejected`` counts, per site and reason (coordinator.plausibility.REASONS, or
    ``invalid`` for a payload that is not a valid message), the messages refused at ingest
    since the coordinator started; ``estimated`` the site-intervals settled as estimates;
    ``unsettled`` the cleared intervals not yet settled.
    """

    feeder: Name
    started_ts: Timestamp
    mode: Literal["normal", "constrained", "emergency"]
    telemetry: Count = 0
    duplicates: Count = 0
    bids: Count = 0
    clearings: Count = 0
    settled: Count = 0
    corrections: Count = 0
    estimated: Count = 0
    unsettled: Count = 0
    dispatches: Count = 0
    last_cleared_interval: int | None = Field(default=None, ge=0)
    rejected: dict[Name, dict[Name, Count]] = Field(default_factory=dict, max_length=100_000)
    historian: Literal["off", "ok", "failed"] = "off"
    historian_dropped: Count = 0
    historian_buffered: Count = 0


class HaState(Message):
    """``site/{site}/ha/state``: a site's sensor states for Home Assistant, retained.

    Site totals of the agent's last poll (W): ``grid_power_w`` positive when importing,
    ``battery_power_w`` positive when discharging; ``battery_soc_pct`` the capacity-weighted
    state of charge; the last clearing the agent received (``clearing_price_per_kwh`` in
    currency per kWh) and the controller layer in force. ``None`` (JSON null) is unknown.
    """

    pv_power_w: PowerW | None = None
    battery_power_w: PowerW | None = None
    battery_soc_pct: Percent | None = None
    grid_power_w: PowerW | None = None
    clearing_price_per_kwh: Price | None = None
    clearing_interval: int | None = Field(default=None, ge=0)
    controller: Literal["safety", "emergency", "dispatch", "market", "fallback"] | None = None


#: Weather forecast bounds: the clear-sky index (GHI / clear-sky GHI) rarely exceeds 1.1 (cloud
#: enhancement); GHI never exceeds the solar constant at the surface (about 1400 W/m^2).
MAX_CLEAR_SKY_INDEX = 1.2
MAX_GHI_W_PER_M2 = 1500.0
#: At most this many per-site series in one weather forecast.
MAX_WEATHER_SITES = 256
#: A weather forecast may start at most this long before its ``ts`` (an analysis of the recent
#: past) and reach at most this far past it [s].
WEATHER_MAX_PAST_S = 2 * 86_400
WEATHER_MAX_AHEAD_S = 8 * 86_400

ClearSkyIndex = Annotated[float, Field(ge=0, le=MAX_CLEAR_SKY_INDEX), AfterValidator(_finite)]
GhiWPerM2 = Annotated[float, Field(ge=0, le=MAX_GHI_W_PER_M2), AfterValidator(_finite)]
SiteId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]


class WeatherForecast(Message):
    """``weather/forecast``: a weather service's irradiance forecast for the community,
    retained; published by the weather-service user (or the operator), read by the coordinator.

    Per step of ``step_s`` from ``start_ts`` (each value the step's mean): for the whole area
    either ``clear_sky_index`` (GHI / clear-sky GHI [-], 0-1.2) or ``ghi_w_per_m2`` (global
    horizontal irradiance [W/m^2], 0-1500), or neither; ``sites`` optionally gives a site its
    own clear-sky index series (site id -> values), which takes precedence over the area's
    for that site. Every series has the same length (1-672 steps). ``ts`` is when the
    forecast was issued: the coordinator ignores a forecast older than its ``weather.max_age_h``.
    ``source`` names the service (free text, for logs). New in the weather release.
    """

    start_ts: Timestamp
    step_s: int = Field(ge=60, le=3600)
    clear_sky_index: list[ClearSkyIndex] = Field(
        default_factory=list, max_length=MAX_FORECAST_POINTS
    )
    ghi_w_per_m2: list[GhiWPerM2] = Field(default_factory=list, max_length=MAX_FORECAST_POINTS)
    sites: dict[SiteId, Annotated[list[ClearSkyIndex], Field(max_length=MAX_FORECAST_POINTS)]] = (
        Field(default_factory=dict, max_length=MAX_WEATHER_SITES)
    )
    source: str = Field(default="", max_length=64)

    @model_validator(mode="after")
    def _sane(self) -> Self:
        if self.clear_sky_index and self.ghi_w_per_m2:
            raise ValueError("give the area's clear_sky_index or its ghi_w_per_m2, not both")
        area = self.clear_sky_index or self.ghi_w_per_m2
        lengths = {len(v) for v in self.sites.values()} | ({len(area)} if area else set())
        if not lengths:
            raise ValueError("a weather forecast needs the area's series or a site's")
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError("every series must have the same, non-zero length")
        if self.start_ts < self.ts - WEATHER_MAX_PAST_S:
            raise ValueError("start_ts is more than 2 days before ts")
        if self.start_ts + lengths.pop() * self.step_s > self.ts + WEATHER_MAX_AHEAD_S:
            raise ValueError("the forecast reaches more than 8 days past ts")
        return self

    @property
    def steps(self) -> int:
        """The number of steps every series has."""
        series = self.clear_sky_index or self.ghi_w_per_m2 or next(iter(self.sites.values()))
        return len(series)


#: Topic kind -> model, for decoding by topic.
BY_KIND: dict[str, type[Message]] = {
    "status": Status,
    "telemetry": Telemetry,
    "bid": Bid,
    "award": Award,
    "dispatch": Dispatch,
    "dispatch/ack": DispatchAck,
    "market/clearing": Clearing,
    "forecast": Forecast,
    "reservation": Reservation,
    "grid/state": GridState,
    "coordinator/status": CoordinatorStatus,
    "weather/forecast": WeatherForecast,
}


def write_schemas(directory: str | Path) -> list[Path]:
    """Write every message's JSON Schema to ``directory``; return the files written."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, model in BY_KIND.items():
        path = out / f"{kind.replace('/', '_')}.schema.json"
        schema = model.model_json_schema(mode="validation")
        schema["$id"] = f"wattmesh/v1/{kind}"
        path.write_text(json.dumps(schema, indent=2) + "\n")
        written.append(path)
    return written
