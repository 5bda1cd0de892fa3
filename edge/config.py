"""The edge agent's site file (TOML): site, broker, devices, limits, fallback, market, spool,
how far dispatch orders are trusted, and the optional proxy, Home Assistant and metrics ports.

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
from drivers.devices import MAP_METER_POINTS
from drivers.errors import RegisterMapError
from drivers.regmap import RegisterMap, builtin_map_names, load_builtin_map, load_register_map
from edge.homeassistant import HomeAssistantSection


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
    kind: Literal["pv_inverter", "battery", "sunspec_meter", "sdm630", "map"]
    url: str = Field(default="", description="tcp://HOST:PORT or rtu:///dev/ttyX?baud=9600")
    sim: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="a device of the scenario `wattmesh up` runs, by name; `up` sets url",
    )
    unit: int = Field(
        default=1,
        ge=0,
        le=247,
        description='kind "map": the map\'s own unit id when not given, else 1',
    )
    poll_interval_s: float | None = Field(default=None, gt=0, le=3600)
    register_map: str | None = Field(default=None, description="for non-SunSpec meters")
    timeout_s: float = Field(default=1.0, gt=0, le=30)
    map: str | None = Field(
        default=None,
        description='kind "map": a built-in register map ("victron_gx") or a map file '
        "(relative to the site file); a map with a [battery] table is a battery, "
        "else a meter",
    )
    deadband_w: float | None = Field(
        default=None,
        ge=0,
        le=1e7,
        description="batteries: a setpoint change smaller than this (W) is not written "
        "(default: the map's, else 1 % of the rated power, at least 50 W)",
    )
    min_write_interval_s: float | None = Field(
        default=None,
        ge=0,
        le=86400,
        description="batteries: no two setpoint writes closer than this (s; default: the "
        "map's, else 0)",
    )

    @model_validator(mode="after")
    def _url(self) -> DeviceSection:
        if not self.url and self.sim is None:
            raise ValueError("give url (a device) or sim (a simulated device, for wattmesh up)")
        if self.url and not self.url.startswith(("tcp://", "rtu://")):
            raise ValueError("url must start with tcp:// or rtu://")
        return self

    @model_validator(mode="after")
    def _map(self) -> DeviceSection:
        if self.kind == "map" and not self.map:
            raise ValueError('kind "map" needs map = "<built-in name or file>"')
        if self.kind != "map" and self.map is not None:
            raise ValueError('map is for kind "map" (an sdm630 takes register_map)')
        return self

    def load_map(self) -> RegisterMap:
        """The register map of a ``kind = "map"`` device; RegisterMapError when unusable."""
        if self.map is None:
            raise RegisterMapError(f'device {self.name} is not of kind "map"')
        if self.map in builtin_map_names():
            return load_builtin_map(self.map)
        return load_register_map(self.map)

    def map_unit(self, regmap: RegisterMap) -> int:
        """The unit a map device answers as: the site file's, else the map's, else 1."""
        if "unit" in self.model_fields_set or regmap.unit_id is None:
            return self.unit
        return regmap.unit_id


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


class PlanSection(_Strict):
    """Horizon planning of the site's batteries (edge/plan.py; docs/architecture.md s. 5)."""

    enabled: bool = Field(
        default=True,
        description="plan the batteries over the coordinator's forecast every interval and "
        "price bids at the plan's value of stored energy; off: today's fixed-price rules",
    )
    horizon_h: float = Field(
        default=24.0, ge=1, le=168, description="plan this far ahead (within the forecast)"
    )
    pv_downside: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="a reservation must survive PV this much below its forecast (share)",
    )
    load_upside: float = Field(
        default=0.2, ge=0, le=5, description="... and load this much above it (share)"
    )
    peak_import_w: float | None = Field(
        default=None,
        gt=0,
        description="keep the site's import under this when the batteries allow (a peak "
        "target, e.g. for a demand charge); [fallback] import_cap_w is the fallback's own",
    )
    charge_efficiency: float = Field(default=0.95, gt=0, le=1, description="AC to stored")
    discharge_efficiency: float = Field(default=0.95, gt=0, le=1, description="stored to AC")


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


class ProxySection(_Strict):
    """An optional Modbus TCP proxy on the gateway (``[proxy]``): Home Assistant or another
    reader shares devices that accept one client only.

    Reads are answered from the agent's own polls (the registers it reads, as of its last
    poll); writes are refused (exception 1) unless ``allow_writes``, then forwarded through
    the agent's own connection. Each device is served under its own unit id(s).
    """

    host: str = Field(default="127.0.0.1", description="listen address (0.0.0.0: every one)")
    port: int = Field(default=5020, ge=0, le=65535, description="listen port (0: any free one)")
    devices: list[str] = Field(
        default_factory=list, max_length=64, description="device names (empty: every device)"
    )
    allow_writes: bool = False


class MetricsSection(_Strict):
    """Prometheus metrics of this agent on ``http://host:port/metrics`` (``[metrics]``; off
    without the section). prometheus_client is loaded only then (edge/metrics.py)."""

    host: str = Field(default="127.0.0.1", description="listen address (0.0.0.0: every one)")
    port: int = Field(default=9109, ge=0, le=65535, description="listen port (0: any free one)")


class EdgeConfig(_Strict):
    """A whole site file."""

    site: SiteSection
    broker: BrokerConnection = BrokerConnection()
    devices: list[DeviceSection] = Field(min_length=1, max_length=64)
    limits: LimitsSection = LimitsSection()
    fallback: FallbackSection = FallbackSection()
    market: MarketSection = MarketSection()
    plan: PlanSection = PlanSection()
    spool: SpoolSection = SpoolSection()
    dispatch: DispatchSection = DispatchSection()
    clock: ClockSettings | None = None
    proxy: ProxySection | None = None
    homeassistant: HomeAssistantSection | None = None
    metrics: MetricsSection | None = None
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
    config = _check_maps(config, source)
    if config.proxy is not None:
        try:
            proxy_units(config)
        except ValueError as err:
            raise EdgeConfigError(f"{source}: proxy: {err}") from err
    return config


def proxy_units(config: EdgeConfig) -> dict[int, DeviceSection]:
    """The unit ids the ``[proxy]`` serves and the device behind each (a map device answers
    under its own unit and every other unit its map names); ValueError on a clash."""
    proxy = config.proxy
    if proxy is None:
        return {}
    by_name = {d.name: d for d in config.devices}
    unknown = [n for n in proxy.devices if n not in by_name]
    if unknown:
        raise ValueError(f"devices {unknown} are not in [[devices]]")
    units: dict[int, DeviceSection] = {}
    for name in proxy.devices or list(by_name):
        device = by_name[name]
        served = {device.unit}
        if device.kind == "map":
            regmap = device.load_map()
            served = {device.map_unit(regmap)} | {
                p.unit_id for p in regmap.points if p.unit_id is not None
            }
        for unit in sorted(served):
            other = units.get(unit)
            if other is not None and other.name != device.name:
                raise ValueError(
                    f"devices {other.name} and {device.name} both answer as unit {unit}: "
                    "proxy one of them (proxy.devices)"
                )
            units[unit] = device
    return units


def _check_maps(config: EdgeConfig, source: str) -> EdgeConfig:
    """Resolve map files next to the site file, load every map once (errors name the device)
    and count map meters against the one grid meter a site has."""
    devices = list(config.devices)
    meters = sum(d.kind in ("sunspec_meter", "sdm630") for d in devices)
    for i, given in enumerate(config.devices):
        if given.kind != "map" or given.map is None:
            continue
        path = Path(given.map)
        local = given.map not in builtin_map_names() and not path.is_absolute()
        if local and source.endswith(".toml"):
            devices[i] = given.model_copy(update={"map": str(Path(source).parent / path)})
        try:
            regmap = devices[i].load_map()
        except RegisterMapError as err:
            raise EdgeConfigError(f"{source}: devices[{i}].map: {err}") from err
        if regmap.battery is None:
            lacking = sorted(set(MAP_METER_POINTS.values()) - {p.name for p in regmap.points})
            if lacking:
                raise EdgeConfigError(
                    f"{source}: devices[{i}].map: {regmap.name} has no [battery] table and "
                    f"lacks the meter points {', '.join(lacking)}"
                )
            meters += 1
            if meters > 1:
                raise EdgeConfigError(f"{source}: devices[{i}]: a site has one grid meter")
    return config.model_copy(update={"devices": devices})


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
