"""The edge agent's site file (TOML): site, broker, devices, limits, fallback, market, spool
and how far dispatch orders are trusted.

Every mistake is reported with the file and the field (``site.toml: devices[1].unit: ...``).
Secrets do not belong in the file: the broker password comes from ``password_env`` (an
environment variable) or ``password_file`` (a file readable by the agent only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from broker.settings import BrokerConnection, ClockSettings, read_toml, validation_lines
from broker.topics import ID_PATTERN


class EdgeConfigError(ValueError):
    """A site file is wrong; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteSection(_Strict):
    """Who this gateway is."""

    id: str = Field(pattern=ID_PATTERN, description="the site id; also its MQTT user name")
    role: Literal["producer", "consumer", "prosumer"] = "prosumer"
    poll_interval_s: float = Field(
        default=1.0, gt=0, le=3600, description="one poll cycle and telemetry message per this"
    )
    status_interval_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="changed counters are republished in the retained status at most this "
        "often (wall seconds)",
    )


class DeviceSection(_Strict):
    """One device the gateway polls."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", max_length=64)
    kind: Literal["pv_inverter", "battery", "sunspec_meter", "sdm630"]
    url: str = Field(default="", description="tcp://HOST:PORT or rtu:///dev/ttyX?baud=9600")
    sim: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="a device of the scenario `wattmesh up` runs, by name; `up` sets url",
    )
    unit: int = Field(default=1, ge=0, le=247)
    poll_interval_s: float | None = Field(default=None, gt=0, le=3600)
    register_map: str | None = Field(default=None, description="for non-SunSpec meters")
    timeout_s: float = Field(default=1.0, gt=0, le=30)

    @model_validator(mode="after")
    def _url(self) -> DeviceSection:
        if not self.url and self.sim is None:
            raise ValueError("give url (a device) or sim (a simulated device, for wattmesh up)")
        if self.url and not self.url.startswith(("tcp://", "rtu://")):
            raise ValueError("url must start with tcp:// or rtu://")
        return self


class LimitsSection(_Strict):
    """The site's connection limits (W): safety, above every other controller layer."""

    import_limit_w: float | None = Field(default=None, gt=0)
    export_limit_w: float | None = Field(default=None, gt=0)


class FallbackSection(_Strict):
    """The local controller used when nothing above it is in force."""

    mode: Literal["self_consumption", "idle"] = "self_consumption"
    import_cap_w: float | None = Field(default=None, gt=0, description="peak shaving cap")
    reserve_soc_pct: float | None = Field(
        default=None,
        ge=0,
        le=100,
        description="energy below this SOC is kept for peak shaving and grid orders: "
        "not offered to the market, discharged only above import_cap_w",
    )


class MarketSection(_Strict):
    """Market intervals and the bid strategy's prices (currency per kWh)."""

    interval_s: int = Field(default=900, ge=60, le=86400)
    gate_s: int = Field(default=60, ge=0)
    bid_lead_s: int = Field(default=120, ge=1, description="bid this long before gate closure")
    enabled: bool = True
    max_buy_price_per_kwh: float = Field(default=1.0, ge=0, le=100)
    min_sell_price_per_kwh: float = Field(default=0.0, ge=-100, le=100)
    battery_charge_price_per_kwh: float = Field(default=0.12, ge=-100, le=100)
    battery_discharge_price_per_kwh: float = Field(default=0.25, ge=-100, le=100)

    @model_validator(mode="after")
    def _order(self) -> MarketSection:
        if self.gate_s + self.bid_lead_s >= self.interval_s:
            raise ValueError("gate_s + bid_lead_s must be shorter than interval_s")
        if not self.battery_charge_price_per_kwh < self.battery_discharge_price_per_kwh:
            raise ValueError(
                "battery_charge_price_per_kwh must be below battery_discharge_price_per_kwh"
            )
        return self


class SpoolSection(_Strict):
    """The on-disk store-and-forward outbox for telemetry."""

    path: Path = Path("spool.sqlite")
    max_messages: int = Field(default=100_000, ge=10)
    retry_max_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="an unusable spool (disk full, read-only, corrupt) is retried after a "
        "growing delay up to this many wall seconds",
    )


class DispatchSection(_Strict):
    """How far the edge trusts a dispatch's own times; it judges them on its own clock.

    The skew and age are real seconds (clock disagreement and delivery delay are physical);
    on a simulated clock they count ``speed`` times as many simulated seconds. The durations
    are on the agent's clock (simulated seconds in a simulation).
    """

    max_clock_skew_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="a dispatch stamped further ahead of the agent's clock is refused",
    )
    max_age_s: float = Field(
        default=300.0,
        ge=0,
        le=86400,
        description="a dispatch stamped longer ago than this (held up on the way) is refused",
    )
    max_duration_s: float = Field(
        default=3600.0,
        gt=0,
        le=86400,
        description="a dispatch ends at the latest this long after it was received",
    )
    max_emergency_duration_s: float = Field(
        default=7200.0,
        gt=0,
        le=86400,
        description="an emergency order ends at the latest this long after it was received",
    )


class EdgeConfig(_Strict):
    """A whole site file."""

    site: SiteSection
    broker: BrokerConnection = BrokerConnection()
    devices: list[DeviceSection] = Field(min_length=1, max_length=64)
    limits: LimitsSection = LimitsSection()
    fallback: FallbackSection = FallbackSection()
    market: MarketSection = MarketSection()
    spool: SpoolSection = SpoolSection()
    dispatch: DispatchSection = DispatchSection()
    clock: ClockSettings | None = None
    dispatch_revert_s: int = Field(
        default=30, ge=2, le=3600, description="battery reverts to idle if not renewed"
    )

    @model_validator(mode="after")
    def _devices(self) -> EdgeConfig:
        names = [d.name for d in self.devices]
        if len(set(names)) != len(names):
            raise ValueError("device names must be unique")
        meters = [d for d in self.devices if d.kind in ("sunspec_meter", "sdm630")]
        if len(meters) > 1:
            raise ValueError("a site has one grid meter")
        return self


def parse_edge_config(data: dict[str, object], source: str) -> EdgeConfig:
    """Validate a site mapping; errors name ``source`` and each wrong field."""
    try:
        config = EdgeConfig.model_validate(data)
    except ValidationError as err:
        raise EdgeConfigError(validation_lines(err, source)) from err
    if not config.spool.path.is_absolute() and source.endswith(".toml"):
        spool = Path(source).parent / config.spool.path
        config = config.model_copy(
            update={"spool": config.spool.model_copy(update={"path": spool})}
        )
    return config


def load_edge_config(path: str | Path, *, allow_sim: bool = False) -> EdgeConfig:
    """Read and validate a site TOML file (a relative spool path is next to the file).

    A device given only by ``sim`` needs ``wattmesh up`` to resolve it: refused unless
    ``allow_sim``.
    """
    p = Path(path)
    config = parse_edge_config(read_toml(p, EdgeConfigError), str(p))
    if not allow_sim:
        for i, d in enumerate(config.devices):
            if not d.url:
                raise EdgeConfigError(
                    f"{p}: devices[{i}].sim: {d.sim!r} is a simulated device that only "
                    "`wattmesh up` resolves; give url to run this agent on its own"
                )
    return config
