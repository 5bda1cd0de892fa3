"""Scenarios: a TOML file of sites and devices, started together on one scaled clock.

A scenario names its sites; each site has an optional load profile and a list of devices.
Every device is served over Modbus TCP on its own port, or over RTU on a serial line (a real
one given by ``serial``, else a socat pseudo-terminal pair whose client end is printed).
Devices on RTU that name the same ``bus`` share one line, each with its own unit id.
"""

from __future__ import annotations

import contextlib
import tomllib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drivers.errors import RegisterMapError
from drivers.regmap import RegisterMap, builtin_map_names, load_builtin_map, load_register_map
from simulators.clock import Clock
from simulators.devices import (
    BatterySim,
    LoadSpec,
    PvInverterSim,
    Sdm630MeterSim,
    SimSite,
    SimulatedDevice,
    SunSpecMeterSim,
)
from simulators.mapped import MapDeviceSim
from simulators.server import DeviceServer, SerialPair


class ScenarioError(ValueError):
    """A scenario file is wrong; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _DeviceBase(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    unit: int = Field(default=1, ge=1, le=247)
    transport: Literal["tcp", "rtu"] = "tcp"
    port: int = Field(default=0, ge=0, le=65535, description="TCP port; 0 picks a free one")
    serial: str | None = Field(default=None, description="a real serial device for RTU")
    bus: str | None = Field(default=None, description="RTU devices naming one bus share a line")
    baud: int = Field(default=9600, gt=0)


class PvConfig(_DeviceBase):
    """A PV inverter (SunSpec 1, 103, 120, 123)."""

    kind: Literal["pv_inverter"]
    rated_ac_w: float = Field(gt=0)
    rated_dc_w: float | None = Field(default=None, gt=0)


class BatteryConfig(_DeviceBase):
    """A battery inverter (SunSpec 1, 124, 802)."""

    kind: Literal["battery"]
    capacity_wh: float = Field(gt=0)
    rated_power_w: float = Field(gt=0)
    soc_pct: float = Field(default=50.0, ge=0, le=100)
    soc_min_pct: float = Field(default=5.0, ge=0, le=100)
    soc_max_pct: float = Field(default=100.0, ge=0, le=100)
    charge_efficiency: float = Field(default=0.95, gt=0, le=1)
    discharge_efficiency: float = Field(default=0.95, gt=0, le=1)

    @model_validator(mode="after")
    def _bounds(self) -> BatteryConfig:
        if not self.soc_min_pct <= self.soc_pct <= self.soc_max_pct:
            raise ValueError("need soc_min_pct <= soc_pct <= soc_max_pct")
        return self


class SunSpecMeterConfig(_DeviceBase):
    """A site meter at the grid connection (SunSpec 1, 203)."""

    kind: Literal["sunspec_meter"]
    max_power_w: float = Field(default=100e3, gt=0)


class Sdm630Config(_DeviceBase):
    """An Eastron SDM630 at the grid connection; RTU by default, like the real meter."""

    kind: Literal["sdm630"]
    transport: Literal["tcp", "rtu"] = "rtu"


class MapConfig(_DeviceBase):
    """Any register map's twin (:class:`simulators.mapped.MapDeviceSim`): a built-in map's
    name or a TOML file. ``unit`` defaults to the map's unit id; points the map puts in other
    units are served under those on the same port or line."""

    kind: Literal["map"]
    map: str = Field(min_length=1)
    unit: int | None = Field(default=None, ge=1, le=247)  # type: ignore[assignment]
    pv_peak_w: float = Field(default=5000.0, gt=0)
    capacity_wh: float = Field(default=10_000.0, gt=0)
    rated_power_w: float = Field(default=5000.0, gt=0)
    soc_pct: float = Field(default=50.0, ge=0, le=100)

    @model_validator(mode="after")
    def _known_map(self) -> MapConfig:
        self.register_map()  # a wrong map is a wrong scenario
        return self

    def register_map(self) -> RegisterMap:
        """The map, built-in or from a file; ValueError naming what is wrong."""
        try:
            if self.map in builtin_map_names():
                return load_builtin_map(self.map)
            return load_register_map(self.map)
        except RegisterMapError as err:
            raise ValueError(str(err)) from err


AnyDeviceConfig = PvConfig | BatteryConfig | SunSpecMeterConfig | Sdm630Config | MapConfig
DeviceConfig = Annotated[AnyDeviceConfig, Field(discriminator="kind")]


class LoadConfig(_Strict):
    """A site's consumption (see simulators.physics.load_power_w)."""

    profile: Literal["household", "factory", "office"]
    base_w: float = Field(ge=0)
    peak_w: float = Field(gt=0)


class SiteConfig(_Strict):
    """The devices behind one grid connection."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    load: LoadConfig | None = None
    devices: list[DeviceConfig] = Field(min_length=1)


class ScenarioConfig(_Strict):
    """A whole simulated community."""

    name: str
    start: datetime = Field(description="simulated start time, UTC")
    speed: float = Field(default=60.0, gt=0, description="simulated seconds per real second")
    seed: int = 0
    latitude_deg: float = Field(ge=-90, le=90)
    longitude_deg: float = Field(ge=-180, le=180)
    utc_offset_h: float = Field(default=0.0, ge=-14, le=14)
    host: str = "127.0.0.1"
    pty_dir: str | None = Field(
        default=None, description="where RTU pseudo-terminal links go (default: a temp dir)"
    )
    sites: list[SiteConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> ScenarioConfig:
        names = [d.name for s in self.sites for d in s.devices]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"device names must be unique; repeated: {', '.join(dupes)}")
        sites = [s.id for s in self.sites]
        if len(set(sites)) != len(sites):
            raise ValueError("site ids must be unique")
        return self

    def with_free_ports(self) -> ScenarioConfig:
        """A copy whose TCP devices take free ports and whose RTU links go to a temp dir."""
        sites = [
            s.model_copy(update={"devices": [d.model_copy(update={"port": 0}) for d in s.devices]})
            for s in self.sites
        ]
        return self.model_copy(update={"sites": sites, "pty_dir": None})

    @property
    def start_ts(self) -> float:
        """The start as epoch seconds (a naive time is taken as UTC)."""
        start = self.start if self.start.tzinfo else self.start.replace(tzinfo=UTC)
        return start.timestamp()


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("pv_inverter", "battery", "sunspec_meter", "sdm630", "map"):
            continue  # the discriminator's branch name adds nothing for the reader
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def parse_scenario(data: dict[str, object], source: str) -> ScenarioConfig:
    """Validate a scenario mapping; errors name ``source`` and each wrong field."""
    try:
        return ScenarioConfig.model_validate(data)
    except ValidationError as err:
        lines = [f"{source}: {_where(e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ScenarioError("\n".join(lines)) from err


def load_scenario(path: str | Path) -> ScenarioConfig:
    """Read and validate a scenario TOML file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as err:
        raise ScenarioError(f"{p}: cannot read: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{p}: not valid TOML: {err}") from err
    return parse_scenario(data, str(p))


@dataclass(frozen=True, slots=True)
class RunningDevice:
    """Where a started device can be reached."""

    site: str
    name: str
    kind: str
    url: str
    unit: int
    device: SimulatedDevice

    def line(self) -> str:
        """``<name> <kind> <url> unit=<n>``, as ``wattmesh sim run`` prints it."""
        return f"{self.name} {self.kind} {self.url} unit={self.unit}"


def build_device(cfg: AnyDeviceConfig, site: SimSite, seed: int) -> SimulatedDevice:
    """The simulated device a configuration describes."""
    if isinstance(cfg, PvConfig):
        return PvInverterSim(cfg.name, cfg.unit, site, cfg.rated_ac_w, cfg.rated_dc_w, seed=seed)
    if isinstance(cfg, BatteryConfig):
        return BatterySim(
            cfg.name,
            cfg.unit,
            site,
            cfg.capacity_wh,
            cfg.rated_power_w,
            soc_pct=cfg.soc_pct,
            soc_min_pct=cfg.soc_min_pct,
            soc_max_pct=cfg.soc_max_pct,
            charge_efficiency=cfg.charge_efficiency,
            discharge_efficiency=cfg.discharge_efficiency,
        )
    if isinstance(cfg, SunSpecMeterConfig):
        return SunSpecMeterSim(cfg.name, cfg.unit, site, cfg.max_power_w)
    if isinstance(cfg, MapConfig):
        return MapDeviceSim(
            cfg.name,
            site,
            cfg.register_map(),
            cfg.unit,
            pv_peak_w=cfg.pv_peak_w,
            capacity_wh=cfg.capacity_wh,
            rated_power_w=cfg.rated_power_w,
            soc_pct=cfg.soc_pct,
            seed=seed,
        )
    return Sdm630MeterSim(cfg.name, cfg.unit, site)


def served_units(device: SimulatedDevice) -> list[SimulatedDevice]:
    """What a server must serve for ``device``: a map twin answers under several units."""
    return device.devices if isinstance(device, MapDeviceSim) else [device]


def build_sites(
    config: ScenarioConfig, clock: Clock
) -> list[tuple[SiteConfig, AnyDeviceConfig, SimulatedDevice]]:
    """Every site and device of a scenario on ``clock``, not yet served.

    Seeds follow the scenario's seed, so the same scenario always has the same clouds and
    loads, served or stepped directly (as a baseline is).
    """
    built: list[tuple[SiteConfig, AnyDeviceConfig, SimulatedDevice]] = []
    for i, site_cfg in enumerate(config.sites):
        load = site_cfg.load
        site = SimSite(
            site_cfg.id,
            clock,
            LoadSpec(load.profile, load.base_w, load.peak_w) if load else None,
            seed=config.seed * 1000 + i,
            latitude_deg=config.latitude_deg,
            longitude_deg=config.longitude_deg,
            utc_offset_h=config.utc_offset_h,
        )
        for j, dev_cfg in enumerate(site_cfg.devices):
            built.append((site_cfg, dev_cfg, build_device(dev_cfg, site, site.seed * 100 + j)))
    return built


def stepped_sites(config: ScenarioConfig, clock: Clock) -> dict[str, SimSite]:
    """The scenario's sites with their devices, to step directly with ``site.advance()``."""
    return {cfg.id: device.site for cfg, _, device in build_sites(config, clock)}


class ScenarioRunner:
    """Starts every device of a scenario; an async context manager.

    ``clock`` tells the simulated time; a scaled clock at the scenario's start and speed
    (``broker.clock.ScaledClock(config.start_ts, config.speed)``) runs it as configured.
    """

    def __init__(self, config: ScenarioConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.sites: dict[str, SimSite] = {}
        self.devices: list[RunningDevice] = []
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> ScenarioRunner:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    async def _start(self) -> None:
        cfg = self.config
        built = build_sites(cfg, self.clock)
        self.sites = {site_cfg.id: device.site for site_cfg, _, device in built}
        lines: dict[str, list[tuple[SiteConfig, AnyDeviceConfig, SimulatedDevice]]] = {}
        for site_cfg, dev_cfg, device in built:
            if dev_cfg.transport == "tcp":
                server = DeviceServer(served_units(device), tcp=(cfg.host, dev_cfg.port))
                await self._stack.enter_async_context(server)
                self._add(site_cfg.id, dev_cfg, device, server.url)
            else:
                lines.setdefault(dev_cfg.bus or dev_cfg.serial or dev_cfg.name, []).append(
                    (site_cfg, dev_cfg, device)
                )
        for bus, members in lines.items():
            first = members[0][1]
            if first.serial:
                server_end, client_end = first.serial, first.serial
            else:
                pair = await self._stack.enter_async_context(
                    SerialPair(directory=cfg.pty_dir, name=bus)
                )
                server_end, client_end = pair.server_end, pair.client_end
            server = DeviceServer(
                [unit for m in members for unit in served_units(m[2])],
                serial_port=server_end,
                baud=first.baud,
            )
            await self._stack.enter_async_context(server)
            for site_cfg, dev_cfg, device in members:
                self._add(site_cfg.id, dev_cfg, device, f"rtu://{client_end}?baud={first.baud}")

    def _add(self, site: str, cfg: AnyDeviceConfig, device: SimulatedDevice, url: str) -> None:
        self.devices.append(
            RunningDevice(site, device.name, device.kind, url, device.unit_id, device)
        )

    def device(self, name: str) -> RunningDevice:
        """A started device by name."""
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(f"scenario {self.config.name!r} has no device {name!r}")
