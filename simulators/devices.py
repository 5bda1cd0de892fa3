"""Simulated devices: the registers a Modbus server serves, with physics behind them.

Every device belongs to a :class:`SimSite`. A site advances all its devices together to the
clock's time before any request is answered, so a meter always sees the PV, load and battery
of the same instant: ``grid_w = load_w - pv_w - battery_w`` (positive = importing).
"""

from __future__ import annotations

import asyncio
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pymodbus.constants import ExcCodes
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.regmap import RegisterMap, encode_point, load_builtin_map
from drivers.sunspec.models import Value
from simulators import physics
from simulators.clock import Clock
from simulators.sunspec_image import ModelSpec, SunSpecImage, accumulator_sf, fitting_sf

NOMINAL_VOLTAGE_V = 230.0
NOMINAL_FREQUENCY_HZ = 50.0


class SimulatedDevice(ABC):
    """A device a Modbus server can serve: a register image and an action callback."""

    kind: str = "device"
    #: Devices of other kinds than the built-in ones step after those, lowest first
    #: (producers before meters, so that a meter sees what they changed).
    step_order: int = 1

    def __init__(self, name: str, unit_id: int, site: SimSite) -> None:
        if not 0 <= unit_id <= 247:
            raise ValueError(f"{name}: unit id {unit_id} outside 0..247")
        self.name = name
        self.unit_id = unit_id
        self.site = site
        self.requests = 0
        self.writes = 0
        self._answering = asyncio.Event()
        self._answering.set()
        self._silent_at: int | None = None
        site.add(self)

    # -- faults, for tests and demonstrations --------------------------------------------
    def go_silent(self, after_requests: int = 0) -> None:
        """Stop answering (after ``after_requests`` more): requests hang until :meth:`resume`.

        The client times out. With ``after_requests`` the device dies in the middle of a poll
        that needs several requests.
        """
        if after_requests <= 0:
            self._answering.clear()
        else:
            self._silent_at = self.requests + after_requests

    def resume(self) -> None:
        """Answer requests again."""
        self._answering.set()

    @property
    def silent(self) -> bool:
        """Whether the device is ignoring requests."""
        return not self._answering.is_set()

    # -- what subclasses provide ------------------------------------------------------------
    @abstractmethod
    def step(self, now: float, dt_s: float) -> None:
        """Advance the physics to ``now`` (``dt_s`` since the last step)."""

    @abstractmethod
    def simdevice(self) -> SimDevice:
        """The pymodbus device description with this device's registers and action."""

    @abstractmethod
    def sync(self, function_code: int, start_address: int, registers: list[int]) -> None:
        """Copy the live image into pymodbus's register list for a read."""

    @abstractmethod
    def write(self, function_code: int, address: int, values: list[int]) -> ExcCodes | None:
        """Apply a write to the live image, or refuse it with an exception code."""

    async def action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        """pymodbus calls this on every request, before answering it."""
        if self._silent_at is not None and self.requests >= self._silent_at:
            self._silent_at = None
            self._answering.clear()
        await self._answering.wait()
        self.requests += 1
        self.site.advance()
        if set_values is None:
            self.sync(function_code, start_address, registers)
            return None
        self.writes += 1
        return self.write(function_code, address, [int(v) for v in set_values])


class SunSpecDevice(SimulatedDevice):
    """A simulated device whose registers are a SunSpec map at 40000."""

    def __init__(
        self,
        name: str,
        unit_id: int,
        site: SimSite,
        models: Sequence[ModelSpec],
        base_address: int = 40000,
    ) -> None:
        self.image = SunSpecImage(models, base_address)
        super().__init__(name, unit_id, site)

    def simdevice(self) -> SimDevice:
        """One shared register block holding the whole map."""
        return SimDevice(
            id=self.unit_id,
            simdata=[
                SimData(
                    self.image.base_address,
                    values=list(self.image.words),
                    datatype=DataType.REGISTERS,
                )
            ],
            action=self.action,
        )

    def sync(self, function_code: int, start_address: int, registers: list[int]) -> None:
        """Copy the image into the block (both function 3 and 4 read it)."""
        offset = self.image.base_address - start_address
        registers[offset : offset + len(self.image.words)] = self.image.words

    def write(self, function_code: int, address: int, values: list[int]) -> ExcCodes | None:
        """Accept writes to writable points only; let the device check the new values."""
        touched: dict[int, set[str]] = {}
        for i in range(len(values)):
            where = self.image.locate(address + i)
            if where is None or not where[1].writable:
                return ExcCodes.ILLEGAL_ADDRESS
            touched.setdefault(where[0], set()).add(where[1].name)
        index = address - self.image.base_address
        before = self.image.words[index : index + len(values)]
        self.image.words[index : index + len(values)] = values
        for model_id, names in touched.items():
            if (code := self.check_write(model_id, names)) is not None:
                self.image.words[index : index + len(values)] = before
                return code
        for model_id, names in touched.items():
            self.written(model_id, names)
        return None

    def check_write(self, model_id: int, names: set[str]) -> ExcCodes | None:
        """Refuse written values the device would not accept (after they are in the image)."""
        return None

    def written(self, model_id: int, names: set[str]) -> None:
        """React to an accepted write."""

    def common_model(self, manufacturer: str, model: str, serial: str) -> ModelSpec:
        """SunSpec model 1 for this device."""
        return ModelSpec(
            1,
            {
                "Mn": manufacturer,
                "Md": model,
                "SN": serial,
                "Vr": "0.1.0",
                "Opt": self.kind,
                "DA": self.unit_id,
            },
            {},
        )


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """A site's consumption profile (see :func:`simulators.physics.load_power_w`)."""

    profile: Literal["household", "factory", "office"]
    base_w: float
    peak_w: float


class SimSite:
    """The devices behind one grid connection, advanced together on one clock."""

    def __init__(
        self,
        site_id: str,
        clock: Clock,
        load: LoadSpec | None = None,
        seed: int = 0,
        latitude_deg: float = 48.0,
        longitude_deg: float = 11.0,
        utc_offset_h: float = 0.0,
    ) -> None:
        self.site_id = site_id
        self.clock = clock
        self.load = load
        self.seed = seed
        self.latitude_deg = latitude_deg
        self.longitude_deg = longitude_deg
        self.utc_offset_h = utc_offset_h
        self.devices: list[SimulatedDevice] = []
        self.last_ts: float | None = None
        self.load_w = 0.0
        self.pv_w = 0.0
        self.battery_w = 0.0
        self.grid_w = 0.0

    def add(self, device: SimulatedDevice) -> None:
        """Attach a device (done by the device's constructor)."""
        self.devices.append(device)

    def advance(self) -> None:
        """Bring every device to the clock's time: producers, storage, then meters."""
        now = self.clock.now()
        dt_s = 0.0 if self.last_ts is None else now - self.last_ts
        if self.last_ts is not None and dt_s <= 0:
            return
        self.last_ts = now
        self.load_w = 0.0
        if self.load is not None:
            self.load_w = float(
                physics.load_power_w(
                    now,
                    self.load.profile,
                    self.load.base_w,
                    self.load.peak_w,
                    seed=self.seed,
                    utc_offset_h=self.utc_offset_h,
                )
            )
        order = (PvInverterSim, BatterySim, SunSpecMeterSim, Sdm630MeterSim)
        for cls in order:
            for device in self.devices:
                if isinstance(device, cls):
                    device.step(now, dt_s)
            if cls is BatterySim:
                self.pv_w = sum(d.ac_power_w for d in self.devices if isinstance(d, PvInverterSim))
                self.battery_w = sum(d.power_w for d in self.devices if isinstance(d, BatterySim))
                self.grid_w = self.load_w - self.pv_w - self.battery_w
        others = [d for d in self.devices if not isinstance(d, order)]
        for device in sorted(others, key=lambda d: d.step_order):
            device.step(now, dt_s)


class PvInverterSim(SunSpecDevice):
    """A PV inverter: models 1, 103, 120, 123. Clear-sky irradiance times seeded clouds."""

    kind = "pv_inverter"

    def __init__(
        self,
        name: str,
        unit_id: int,
        site: SimSite,
        rated_ac_w: float,
        rated_dc_w: float | None = None,
        seed: int = 0,
        lifetime_energy_wh: float | None = None,
    ) -> None:
        if not rated_ac_w > 0:
            raise ValueError(f"{name}: rated_ac_w must be positive")
        self.rated_ac_w = float(rated_ac_w)
        self.rated_dc_w = float(rated_dc_w or rated_ac_w * 1.15)
        self.seed = seed
        self.ac_power_w = 0.0
        # A SunSpec accumulator of 0 reads as "not implemented": an inverter in the field has
        # a lifetime yield; by default about two years' worth (1250 full-load hours a year).
        self.energy_wh = float(
            lifetime_energy_wh if lifetime_energy_wh is not None else 2500.0 * self.rated_ac_w
        )
        self.limit_set_ts: float | None = None
        w_sf = fitting_sf(self.rated_ac_w * 1.2)
        super().__init__(
            name,
            unit_id,
            site,
            [
                ModelSpec(1, {}, {}),
                ModelSpec(
                    103,
                    {
                        "W": 0,
                        "WH": self.energy_wh,
                        "St": 2,
                        "Hz": NOMINAL_FREQUENCY_HZ,
                        "PhVphA": NOMINAL_VOLTAGE_V,
                        "PhVphB": NOMINAL_VOLTAGE_V,
                        "PhVphC": NOMINAL_VOLTAGE_V,
                        "A": 0,
                        "AphA": 0,
                        "AphB": 0,
                        "AphC": 0,
                        "DCW": 0,
                        "TmpCab": 25.0,
                        "Evt1": 0,
                        "Evt2": 0,
                    },
                    {
                        "A_SF": fitting_sf(self.rated_ac_w / 690 * 1.2),
                        "V_SF": -1,
                        "W_SF": w_sf,
                        "Hz_SF": -2,
                        "WH_SF": accumulator_sf(self.energy_wh),
                        "DCW_SF": w_sf,
                        "Tmp_SF": -1,
                    },
                ),
                ModelSpec(
                    120,
                    {
                        "DERTyp": 4,
                        "WRtg": self.rated_ac_w,
                        "VARtg": self.rated_ac_w,
                        "VArRtgQ1": 0,
                        "VArRtgQ2": 0,
                        "VArRtgQ3": 0,
                        "VArRtgQ4": 0,
                        "ARtg": self.rated_ac_w / 690,
                        "PFRtgQ1": 1,
                        "PFRtgQ2": 1,
                        "PFRtgQ3": 1,
                        "PFRtgQ4": 1,
                    },
                    {
                        "WRtg_SF": w_sf,
                        "VARtg_SF": w_sf,
                        "VArRtg_SF": w_sf,
                        "ARtg_SF": fitting_sf(self.rated_ac_w / 690 * 1.2),
                        "PFRtg_SF": 0,
                    },
                ),
                ModelSpec(
                    123,
                    {
                        "Conn": 1,
                        "WMaxLimPct": 100,
                        "WMaxLimPct_WinTms": 0,
                        "WMaxLimPct_RvrtTms": 0,
                        "WMaxLimPct_RmpTms": 0,
                        "WMaxLim_Ena": 0,
                        "OutPFSet": 1,
                        "OutPFSet_Ena": 0,
                        "VArPct_Ena": 0,
                    },
                    {"WMaxLimPct_SF": -1, "OutPFSet_SF": -3, "VArPct_SF": 0},
                ),
            ],
        )
        self.image.set_many(1, self.common_model("wattmesh", "SIM-PV", f"PV-{name}").values)

    @property
    def curtail_limit_w(self) -> float:
        """The active output limit (inf when none)."""
        if self.image.get(123, "WMaxLim_Ena") != 1 or self.image.get(123, "Conn") == 0:
            return math.inf if self.image.get(123, "Conn") != 0 else 0.0
        pct = self.image.get(123, "WMaxLimPct")
        return self.rated_ac_w * float(pct or 0.0) / 100.0

    def step(self, now: float, dt_s: float) -> None:
        """Irradiance -> AC power under the curtailment limit; integrate energy."""
        revert = self.image.get(123, "WMaxLimPct_RvrtTms")
        if (
            self.limit_set_ts is not None
            and isinstance(revert, int | float)
            and revert > 0
            and now - self.limit_set_ts >= revert
        ):
            self.image.set(123, "WMaxLim_Ena", 0)
            self.limit_set_ts = None
        self.energy_wh += self.ac_power_w * dt_s / 3600.0
        site = self.site
        ghi = physics.clear_sky_ghi_w_per_m2(now, site.latitude_deg, site.longitude_deg)
        ghi = ghi * physics.cloud_index(now, seed=self.seed)
        limit = self.curtail_limit_w
        ac = float(
            physics.pv_ac_power_w(ghi, self.rated_dc_w, self.rated_ac_w, curtail_limit_w=limit)
        )
        self.ac_power_w = ac
        unclipped = float(physics.pv_ac_power_w(ghi, self.rated_dc_w, self.rated_ac_w))
        status = 2 if unclipped <= 0 else 5 if unclipped > ac + 1e-6 else 4
        amps = ac / (3 * NOMINAL_VOLTAGE_V)
        self.image.set_many(
            103,
            {
                "W": ac,
                "WH": self.energy_wh,
                "St": status,
                "DCW": ac / 0.96,
                "A": 3 * amps,
                "AphA": amps,
                "AphB": amps,
                "AphC": amps,
            },
        )

    def written(self, model_id: int, names: set[str]) -> None:
        """A new curtailment limit starts its revert timer."""
        if model_id == 123 and names & {"WMaxLimPct", "WMaxLim_Ena", "WMaxLimPct_RvrtTms"}:
            self.limit_set_ts = self.site.clock.now()

    def check_write(self, model_id: int, names: set[str]) -> ExcCodes | None:
        """WMaxLimPct must be 0..100 %; Conn and WMaxLim_Ena 0 or 1."""
        if model_id != 123:
            return None
        pct = self.image.get(123, "WMaxLimPct")
        if pct is None or not 0 <= float(pct) <= 100:
            return ExcCodes.ILLEGAL_VALUE
        if self.image.get(123, "WMaxLim_Ena") not in (0, 1) or self.image.get(123, "Conn") not in (
            0,
            1,
        ):
            return ExcCodes.ILLEGAL_VALUE
        return None


class BatterySim(SunSpecDevice):
    """A battery inverter: models 1, 124, 802. Obeys model 124 setpoints with a revert timer.

    Setpoint: discharge at OutWRte % of WChaMax when StorCtl_Mod has the DISCHARGE bit, charge
    at InWRte % when it has the CHARGE bit, hold otherwise. A non-zero InOutWRte_RvrtTms sends
    the battery back to idle when no fresh command arrives within that many seconds.
    """

    kind = "battery"

    def __init__(
        self,
        name: str,
        unit_id: int,
        site: SimSite,
        capacity_wh: float,
        rated_power_w: float,
        soc_pct: float = 50.0,
        soc_min_pct: float = 5.0,
        soc_max_pct: float = 100.0,
        charge_efficiency: float = 0.95,
        discharge_efficiency: float = 0.95,
    ) -> None:
        if not capacity_wh > 0 or not rated_power_w > 0:
            raise ValueError(f"{name}: capacity_wh and rated_power_w must be positive")
        if not 0 <= soc_min_pct <= soc_pct <= soc_max_pct <= 100:
            raise ValueError(f"{name}: need 0 <= soc_min_pct <= soc_pct <= soc_max_pct <= 100")
        self.capacity_wh = float(capacity_wh)
        self.rated_power_w = float(rated_power_w)
        self.soc_pct = float(soc_pct)
        self.charge_efficiency = charge_efficiency
        self.discharge_efficiency = discharge_efficiency
        self.power_w = 0.0
        self.command_ts: float | None = None
        w_sf = fitting_sf(self.rated_power_w * 1.2)
        wh_sf = fitting_sf(self.capacity_wh * 1.2, bits=16)
        super().__init__(
            name,
            unit_id,
            site,
            [
                ModelSpec(1, {}, {}),
                ModelSpec(
                    124,
                    {
                        "WChaMax": self.rated_power_w,
                        "WChaGra": 100,
                        "WDisChaGra": 100,
                        "StorCtl_Mod": 0,
                        "MinRsvPct": soc_min_pct,
                        "ChaState": soc_pct,
                        "ChaSt": 6,
                        "OutWRte": 0,
                        "InWRte": 0,
                        "InOutWRte_WinTms": 0,
                        "InOutWRte_RvrtTms": 0,
                        "InOutWRte_RmpTms": 0,
                        "ChaGriSet": 1,
                        "InBatV": 400.0,
                    },
                    {
                        "WChaMax_SF": w_sf,
                        "WChaDisChaGra_SF": 0,
                        "MinRsvPct_SF": -1,
                        "ChaState_SF": -1,
                        "InBatV_SF": -1,
                        "InOutWRte_SF": -2,
                    },
                ),
                ModelSpec(
                    802,
                    {
                        "AHRtg": self.capacity_wh / 400.0,
                        "WHRtg": self.capacity_wh,
                        "WChaRteMax": self.rated_power_w,
                        "WDisChaRteMax": self.rated_power_w,
                        "SoCMax": soc_max_pct,
                        "SoCMin": soc_min_pct,
                        "SoC": soc_pct,
                        "ChaSt": 6,
                        "LocRemCtl": 1,
                        "AlmRst": 0,
                        "Typ": 4,
                        "State": 2,
                        "Evt1": 0,
                        "Evt2": 0,
                        "EvtVnd1": 0,
                        "EvtVnd2": 0,
                        "V": 400.0,
                        "A": 0.0,
                        "W": 0.0,
                        "SetOp": 1,
                        "SetInvState": 1,
                    },
                    {
                        "AHRtg_SF": fitting_sf(self.capacity_wh / 400.0 * 1.2, bits=16),
                        "WHRtg_SF": wh_sf,
                        "WChaDisChaMax_SF": w_sf,
                        "SoC_SF": -1,
                        "V_SF": -1,
                        "CellV_SF": -3,
                        "A_SF": fitting_sf(self.rated_power_w / 400 * 1.2),
                        "AMax_SF": 0,
                        "W_SF": w_sf,
                    },
                ),
            ],
        )
        self.image.set_many(1, self.common_model("wattmesh", "SIM-BAT", f"BAT-{name}").values)

    @property
    def soc_min_pct(self) -> float:
        """The lower bound: the larger of 802 SoCMin and 124 MinRsvPct."""
        return max(
            float(self.image.get(802, "SoCMin") or 0.0),
            float(self.image.get(124, "MinRsvPct") or 0.0),
        )

    @property
    def soc_max_pct(self) -> float:
        """The upper bound (802 SoCMax)."""
        return float(self.image.get(802, "SoCMax") or 100.0)

    @property
    def setpoint_w(self) -> float:
        """The commanded power, W (positive discharges)."""
        mode = self.image.get(124, "StorCtl_Mod")
        if not isinstance(mode, int):
            return 0.0
        w_max = float(self.image.get(124, "WChaMax") or 0.0)
        p = 0.0
        if mode & 2:
            p += w_max * float(self.image.get(124, "OutWRte") or 0.0) / 100.0
        if mode & 1:
            p -= w_max * float(self.image.get(124, "InWRte") or 0.0) / 100.0
        return max(-self.rated_power_w, min(self.rated_power_w, p))

    def step(self, now: float, dt_s: float) -> None:
        """Integrate the state of charge under the setpoint, then publish the new state."""
        revert = self.image.get(124, "InOutWRte_RvrtTms")
        if (
            self.command_ts is not None
            and isinstance(revert, int | float)
            and revert > 0
            and now - self.command_ts >= revert
        ):
            self.image.set_many(124, {"StorCtl_Mod": 0, "OutWRte": 0, "InWRte": 0})
            self.command_ts = None
        setpoint = self.setpoint_w
        if dt_s > 0:
            soc, _ = physics.battery_step(
                self.soc_pct,
                self.power_w,
                dt_s,
                self.capacity_wh,
                charge_efficiency=self.charge_efficiency,
                discharge_efficiency=self.discharge_efficiency,
                soc_min_pct=self.soc_min_pct,
                soc_max_pct=self.soc_max_pct,
            )
            self.soc_pct = float(soc)
        # What the battery can deliver from here on: nothing beyond its bounds.
        _, deliverable = physics.battery_step(
            self.soc_pct,
            setpoint,
            1.0,
            self.capacity_wh,
            charge_efficiency=self.charge_efficiency,
            discharge_efficiency=self.discharge_efficiency,
            soc_min_pct=self.soc_min_pct,
            soc_max_pct=self.soc_max_pct,
        )
        self.power_w = float(deliverable)
        if self.power_w > 0:
            status = 3
        elif self.power_w < 0:
            status = 4
        elif self.soc_pct >= self.soc_max_pct - 1e-9:
            status = 5
        elif self.soc_pct <= self.soc_min_pct + 1e-9:
            status = 2
        else:
            status = 6
        self.image.set_many(124, {"ChaState": self.soc_pct, "ChaSt": status})
        self.image.set_many(
            802,
            {
                "SoC": self.soc_pct,
                "W": self.power_w,
                "ChaSt": status,
                "A": self.power_w / 400.0,
                # Running once it steps: CONNECTED, inverter STARTED (INITIALIZING until then).
                "State": 3,
                "SetInvState": 3,
            },
        )

    def check_write(self, model_id: int, names: set[str]) -> ExcCodes | None:
        """Rates within +-100 %, WChaMax within the rating, MinRsvPct within 0..100."""
        if model_id != 124:
            return None
        for name in ("OutWRte", "InWRte"):
            v = self.image.get(124, name)
            if v is None or not -100.0 <= float(v) <= 100.0:
                return ExcCodes.ILLEGAL_VALUE
        w_max = self.image.get(124, "WChaMax")
        if w_max is None or not 0 <= float(w_max) <= self.rated_power_w * 1.0001:
            return ExcCodes.ILLEGAL_VALUE
        reserve = self.image.get(124, "MinRsvPct")
        if reserve is not None and not 0 <= float(reserve) <= 100:
            return ExcCodes.ILLEGAL_VALUE
        mode = self.image.get(124, "StorCtl_Mod")
        if not isinstance(mode, int) or mode > 3:
            return ExcCodes.ILLEGAL_VALUE
        return None

    def written(self, model_id: int, names: set[str]) -> None:
        """A command restarts the revert timer and takes effect at once."""
        if model_id == 124 and names & {"StorCtl_Mod", "OutWRte", "InWRte", "InOutWRte_RvrtTms"}:
            self.command_ts = self.site.clock.now()
            self.step(self.command_ts, 0.0)


class _MeterPhysics:
    """Grid-connection measurement shared by both meter kinds."""

    site: SimSite

    def measure(self, dt_s: float) -> None:
        grid_w = self.site.grid_w
        self.power_w = grid_w
        if dt_s > 0:
            energy = getattr(self, "_last_power_w", 0.0) * dt_s / 3600.0
            if energy > 0:
                self.import_energy_wh += energy
            else:
                self.export_energy_wh -= energy
        self._last_power_w = grid_w

    power_w: float = 0.0
    import_energy_wh: float = 0.0
    export_energy_wh: float = 0.0
    _last_power_w: float = 0.0

    def voltages_v(self, now: float) -> list[float]:
        """Phase voltages with a small, seeded, slow variation around nominal."""
        idx = physics.cloud_index(np.array([now, now + 7e5, now + 1.4e6]), seed=self.site.seed + 99)
        return [NOMINAL_VOLTAGE_V * (1.0 + 0.02 * (float(x) - 0.8)) for x in idx]


class SunSpecMeterSim(_MeterPhysics, SunSpecDevice):
    """A site meter (models 1, 203) at the grid connection: positive W = importing."""

    kind = "sunspec_meter"

    def __init__(
        self,
        name: str,
        unit_id: int,
        site: SimSite,
        max_power_w: float = 100e3,
        lifetime_import_wh: float | None = None,
        lifetime_export_wh: float | None = None,
    ) -> None:
        w_sf = fitting_sf(max_power_w * 1.5)
        # Accumulators of 0 read as "not implemented": a meter in the field has counted for a
        # while (by default 400 h of import and 100 h of export at a fifth of full scale).
        self.import_energy_wh = float(
            lifetime_import_wh if lifetime_import_wh is not None else 80.0 * max_power_w
        )
        self.export_energy_wh = float(
            lifetime_export_wh if lifetime_export_wh is not None else 20.0 * max_power_w
        )
        SunSpecDevice.__init__(
            self,
            name,
            unit_id,
            site,
            [
                ModelSpec(1, {}, {}),
                ModelSpec(
                    203,
                    {
                        "A": 0,
                        "AphA": 0,
                        "AphB": 0,
                        "AphC": 0,
                        "PhV": NOMINAL_VOLTAGE_V,
                        "PhVphA": NOMINAL_VOLTAGE_V,
                        "PhVphB": NOMINAL_VOLTAGE_V,
                        "PhVphC": NOMINAL_VOLTAGE_V,
                        "PPV": 400.0,
                        "PhVphAB": 400.0,
                        "PhVphBC": 400.0,
                        "PhVphCA": 400.0,
                        "Hz": NOMINAL_FREQUENCY_HZ,
                        "W": 0,
                        "WphA": 0,
                        "WphB": 0,
                        "WphC": 0,
                        "TotWhExp": self.export_energy_wh,
                        "TotWhImp": self.import_energy_wh,
                        "Evt": 0,
                    },
                    {
                        "A_SF": fitting_sf(max_power_w / 690 * 1.5),
                        "V_SF": -1,
                        "Hz_SF": -2,
                        "W_SF": w_sf,
                        "TotWh_SF": accumulator_sf(
                            max(self.import_energy_wh, self.export_energy_wh)
                        ),
                    },
                ),
            ],
        )
        self.image.set_many(1, self.common_model("wattmesh", "SIM-METER", f"M-{name}").values)

    def step(self, now: float, dt_s: float) -> None:
        """Measure the site's net power and integrate import and export energy."""
        self.measure(dt_s)
        phase_w = self.power_w / 3.0
        volts = self.voltages_v(now)
        amps = [abs(phase_w) / v for v in volts]
        values: dict[str, Value] = {
            "W": self.power_w,
            "WphA": phase_w,
            "WphB": phase_w,
            "WphC": phase_w,
            "PhVphA": volts[0],
            "PhVphB": volts[1],
            "PhVphC": volts[2],
            "PhV": sum(volts) / 3,
            "A": sum(amps),
            "AphA": amps[0],
            "AphB": amps[1],
            "AphC": amps[2],
            "TotWhImp": self.import_energy_wh,
            "TotWhExp": self.export_energy_wh,
        }
        self.image.set_many(203, values)


class Sdm630MeterSim(_MeterPhysics, SimulatedDevice):
    """An Eastron SDM630 at the grid connection, speaking its own register map.

    Measurements are float32 input registers; the configuration holding registers
    (demand period, Modbus address, ...) accept writes.
    """

    kind = "sdm630"

    def __init__(
        self, name: str, unit_id: int, site: SimSite, regmap: RegisterMap | None = None
    ) -> None:
        self.regmap = regmap or load_builtin_map("sdm630")
        size = {
            t: max((p.address + p.count for p in self.regmap.points if p.table == t), default=0)
            for t in ("input", "holding")
        }
        self.input_words = [0] * size["input"]
        self.holding_words = [0] * size["holding"]
        for p in self.regmap.points:
            if p.table == "holding":
                self._put(p.name, 0.0)
        self._put("demand_period_s", 900.0)
        self._put("modbus_address", float(unit_id or 1))
        self._put("frequency_hz", NOMINAL_FREQUENCY_HZ)
        super().__init__(name, unit_id, site)

    def _put(self, name: str, value: float) -> None:
        p = self.regmap.point(name)
        words = self.input_words if p.table == "input" else self.holding_words
        words[p.address : p.address + p.count] = encode_point(p, value)

    def simdevice(self) -> SimDevice:
        """Separate input and holding tables, as on the real meter."""
        return SimDevice(
            id=self.unit_id,
            simdata=(
                [SimData(0, values=False, datatype=DataType.BITS)],
                [SimData(0, values=False, datatype=DataType.BITS)],
                [SimData(0, values=list(self.holding_words), datatype=DataType.REGISTERS)],
                [SimData(0, values=list(self.input_words), datatype=DataType.REGISTERS)],
            ),
            action=self.action,
        )

    def sync(self, function_code: int, start_address: int, registers: list[int]) -> None:
        """Function 4 reads measurements, function 3 the configuration."""
        words = self.input_words if function_code == 4 else self.holding_words
        registers[: len(words)] = words  # both tables start at address 0

    def write(self, function_code: int, address: int, values: list[int]) -> ExcCodes | None:
        """Only whole writable configuration points may be written."""
        points = [
            p
            for p in self.regmap.points
            if p.table == "holding" and address <= p.address < address + len(values)
        ]
        covered = sum(p.count for p in points)
        if not points or covered != len(values) or points[0].address != address:
            return ExcCodes.ILLEGAL_ADDRESS
        self.holding_words[address : address + len(values)] = values
        return None

    def step(self, now: float, dt_s: float) -> None:
        """Measure the site's net power per phase, with voltages, currents and energies."""
        self.measure(dt_s)
        phase_w = self.power_w / 3.0
        volts = self.voltages_v(now)
        for i, v in enumerate(volts, start=1):
            self._put(f"voltage_l{i}_v", v)
            self._put(f"power_l{i}_w", phase_w)
            self._put(f"current_l{i}_a", abs(phase_w) / v)
            self._put(f"apparent_power_l{i}_va", abs(phase_w))
            self._put(f"power_factor_l{i}", 1.0)
        self._put("power_total_w", self.power_w)
        self._put("apparent_power_total_va", abs(self.power_w))
        self._put("power_factor_total", 1.0)
        self._put("import_energy_wh", self.import_energy_wh)
        self._put("export_energy_wh", self.export_energy_wh)
        self._put("total_energy_wh", self.import_energy_wh + self.export_energy_wh)
