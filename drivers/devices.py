"""Typed device facades: inverter, battery and meter readings in SI units, checked setpoints.

Signs (docs/architecture.md s. 4): meter power is positive when the site imports; battery
power is positive when discharging; PV power is positive. Missing values (a point the device
does not implement, or refuses to give) are ``None``, never zero; a SunSpec facade's
``missing`` says which points the last poll could not read and why.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from drivers.coalesce import Span, SpanReader, plan_reads, read_blocks
from drivers.errors import RegisterMapError, SetpointRejected, SunSpecError, WriteNotConfirmed
from drivers.regmap import BatteryControl, RegisterMap, decode_map, decode_point, encode_point
from drivers.sunspec.discovery import SunSpecMap, SunSpecReader, discover
from drivers.sunspec.models import Value
from drivers.transport import ModbusTransport
from drivers.writeguard import WriteCounter, WritePolicy

INVERTER_MODELS = (103, 101, 102, 113, 111, 112)
METER_MODELS = (203, 201, 202, 204, 213, 211, 212, 214)

_INVERTER_STATUS = {
    1: "off",
    2: "sleeping",
    3: "starting",
    4: "mppt",
    5: "throttled",
    6: "shutting_down",
    7: "fault",
    8: "standby",
}
_CHARGE_STATUS = {
    1: "off",
    2: "empty",
    3: "discharging",
    4: "charging",
    5: "full",
    6: "holding",
    7: "testing",
}


def _f(value: Value) -> float | None:
    """A decoded numeric value as float, None when missing."""
    if value is None or isinstance(value, str):
        return None
    return float(value)


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """Identity from SunSpec model 1 (or a register map's name)."""

    manufacturer: str | None
    model: str | None
    serial: str | None
    version: str | None


@dataclass(frozen=True, slots=True)
class InverterReading:
    """A PV inverter's state. Power in W (positive = producing), energy in Wh."""

    ac_power_w: float | None
    energy_wh: float | None
    rated_power_w: float | None
    curtail_limit_w: float | None
    frequency_hz: float | None
    voltage_v: float | None
    dc_power_w: float | None
    status: str | None


@dataclass(frozen=True, slots=True)
class BatteryReading:
    """A battery inverter's state. ``power_w`` positive = discharging; ``setpoint_w`` likewise."""

    soc_pct: float | None
    power_w: float | None
    setpoint_w: float | None
    rated_charge_w: float | None
    rated_discharge_w: float | None
    soc_min_pct: float
    soc_max_pct: float
    capacity_wh: float | None
    charge_status: str | None


@dataclass(frozen=True, slots=True)
class MeterReading:
    """A meter's state. ``power_w`` positive = importing from the grid; energies in Wh."""

    power_w: float | None
    power_phase_w: tuple[float | None, float | None, float | None]
    voltage_phase_v: tuple[float | None, float | None, float | None]
    frequency_hz: float | None
    import_energy_wh: float | None
    export_energy_wh: float | None


async def _info(transport: ModbusTransport, unit: int, smap: SunSpecMap) -> DeviceInfo:
    if smap.find(1) is None:
        return DeviceInfo(None, None, None, None)
    common = (await SunSpecReader(transport, unit, smap, {1: ("Mn", "Md", "SN", "Vr")}).poll())[1]
    return DeviceInfo(
        *(
            v if isinstance(v, str) else None
            for v in (common["Mn"], common["Md"], common["SN"], common["Vr"])
        )
    )


class Inverter:
    """A SunSpec PV inverter: models 101-103 or 111-113, 120 (nameplate), 123 (controls)."""

    def __init__(
        self, transport: ModbusTransport, unit: int, smap: SunSpecMap, info: DeviceInfo
    ) -> None:
        inverter = smap.find(*INVERTER_MODELS)
        if inverter is None:
            raise SunSpecError(f"unit {unit} has no inverter model (models {smap.model_ids})")
        self.inverter_model = inverter.id
        self.info = info
        self.map = smap
        self._reader = SunSpecReader(
            transport,
            unit,
            smap,
            {
                inverter.id: ("W", "WH", "St", "Hz", "PhVphA", "DCW"),
                120: ("WRtg",),
                123: ("WMaxLimPct", "WMaxLim_Ena"),
            },
        )
        self._zero_limit_written = False

    @property
    def missing(self) -> dict[str, str]:
        """Points the last poll could not read ('103.Hz' -> refused, beyond the length...)."""
        return self._reader.missing_points

    @classmethod
    async def connect(cls, transport: ModbusTransport, unit: int) -> Inverter:
        """Discover the device and check it is an inverter."""
        smap = await discover(transport, unit)
        return cls(transport, unit, smap, await _info(transport, unit, smap))

    async def read(self) -> InverterReading:
        """One poll.

        ``curtail_limit_w`` is None when model 123 has no limit enabled, and also when it
        holds WMaxLim_Ena = 1 with WMaxLimPct = 0 that this facade did not write: that pair
        is a factory default on many inverters (which then produce at full power), so it
        reads as "no limit set" rather than a 0 W limit. A 0 W limit written through
        :meth:`set_curtailment_w` reads back as 0.0.
        """
        values = await self._reader.poll()
        inv = values[self.inverter_model]
        rated = _f(values.get(120, {}).get("WRtg"))
        ctl = values.get(123, {})
        limit = None
        pct = _f(ctl.get("WMaxLimPct"))
        # Enabled with 0 % is many inverters' factory default, not a command to stop: it
        # reads as "no limit set" unless this facade wrote the 0 % itself.
        if (
            ctl.get("WMaxLim_Ena") == 1
            and rated is not None
            and pct is not None
            and (pct > 0.0 or self._zero_limit_written)
        ):
            limit = rated * pct / 100.0
        status = inv.get("St")
        return InverterReading(
            ac_power_w=_f(inv["W"]),
            energy_wh=_f(inv["WH"]),
            rated_power_w=rated,
            curtail_limit_w=limit,
            frequency_hz=_f(inv["Hz"]),
            voltage_v=_f(inv["PhVphA"]),
            dc_power_w=_f(inv["DCW"]),
            status=_INVERTER_STATUS.get(status) if isinstance(status, int) else None,
        )

    async def set_curtailment_w(self, limit_w: float | None, revert_timeout_s: int = 0) -> None:
        """Limit AC output to ``limit_w`` through model 123 (None lifts the limit).

        ``revert_timeout_s`` > 0 makes the inverter drop the limit by itself after that long.
        A limit below zero or above the rated power is refused before anything is written.
        """
        if self.map.find(123) is None:
            raise SunSpecError("inverter has no model 123: it cannot be curtailed")
        reading = await self.read()
        if limit_w is None:
            await self._reader.write_points(123, {"WMaxLim_Ena": 0})
            self._zero_limit_written = False
            return
        rated = reading.rated_power_w
        if rated is None or rated <= 0:
            raise SetpointRejected("inverter reports no rated power (model 120 WRtg)")
        if not 0.0 <= limit_w <= rated or not math.isfinite(limit_w):
            raise SetpointRejected(f"curtailment limit {limit_w} W outside 0..{rated} W")
        await self._reader.write_points(
            123,
            {
                "WMaxLimPct": 100.0 * limit_w / rated,
                "WMaxLimPct_WinTms": 0,
                "WMaxLimPct_RvrtTms": revert_timeout_s,
                "WMaxLimPct_RmpTms": 0,
                "WMaxLim_Ena": 1,
            },
        )
        self._zero_limit_written = 100.0 * limit_w / rated < 10.0 ** self._reader.scale_factor(
            123, "WMaxLimPct_SF"
        )
        check = await self.read()
        step = rated * 10.0 ** self._reader.scale_factor(123, "WMaxLimPct_SF") / 100.0
        if check.curtail_limit_w is None or abs(check.curtail_limit_w - limit_w) > step:
            raise WriteNotConfirmed(
                f"curtailment {limit_w} W written, read back {check.curtail_limit_w}"
            )


def check_battery_setpoint(now: BatteryReading, power_w: float) -> None:
    """SetpointRejected when ``power_w`` (W, positive discharges) is beyond the battery's
    rated power, or would push the state of charge further past its bounds."""
    if not math.isfinite(power_w):
        raise SetpointRejected(f"battery setpoint {power_w} W is not a number")
    rated = now.rated_discharge_w if power_w > 0 else now.rated_charge_w
    if rated is None:
        raise SetpointRejected("battery reports no rated power")
    if abs(power_w) > rated:
        direction = "discharge" if power_w > 0 else "charge"
        raise SetpointRejected(
            f"{abs(power_w):.0f} W exceeds the rated {direction} power of {rated:.0f} W"
        )
    if now.soc_pct is not None and power_w > 0 and now.soc_pct <= now.soc_min_pct:
        raise SetpointRejected(
            f"state of charge {now.soc_pct:.1f}% is at its minimum "
            f"{now.soc_min_pct:.1f}%: cannot discharge"
        )
    if now.soc_pct is not None and power_w < 0 and now.soc_pct >= now.soc_max_pct:
        raise SetpointRejected(
            f"state of charge {now.soc_pct:.1f}% is at its maximum "
            f"{now.soc_max_pct:.1f}%: cannot charge"
        )


class BatteryDevice(Protocol):
    """What every battery facade offers (SunSpec :class:`Battery`, map :class:`MapBattery`)."""

    info: DeviceInfo
    writes: int
    held: WriteCounter
    write_policy: WritePolicy
    applied_w: float | None

    async def read(self) -> BatteryReading:
        """One poll."""
        ...

    async def set_power_w(self, power_w: float, revert_timeout_s: int = 0) -> float:
        """Command the battery (W, positive discharges); the read-back setpoint."""
        ...

    async def hold_power_w(self, power_w: float, now_s: float, revert_timeout_s: int = 0) -> bool:
        """Hold a setpoint through the write path; True when it wrote."""
        ...


class HeldSetpoint:
    """The safe write path shared by battery facades: hold a setpoint with few writes.

    :meth:`hold_power_w` is called every poll with the wanted power; it writes (through the
    facade's ``set_power_w``, with its limit checks and read-back) only when the setpoint moved
    by the policy's deadband, or to refresh it before the device's own revert timeout.
    ``writes`` counts every setpoint command written (held or direct); ``held`` says how many
    holds were skipped and refreshed; ``applied_w`` is the setpoint the device reported after
    the last write (W, None before the first).
    """

    write_policy: WritePolicy
    writes: int
    held: WriteCounter
    applied_w: float | None

    def _init_writes(self, policy: WritePolicy | None) -> None:
        self.write_policy = policy or WritePolicy()
        self.writes = 0
        self.held = WriteCounter(self.write_policy)
        self.applied_w = None

    def revert_timeout_for(self, revert_timeout_s: int) -> float:
        """The device's own revert timeout, s, when commanded with ``revert_timeout_s``."""
        return float(revert_timeout_s)

    async def set_power_w(self, power_w: float, revert_timeout_s: int = 0) -> float:
        """Command the battery (facades implement this)."""
        raise NotImplementedError

    async def hold_power_w(self, power_w: float, now_s: float, revert_timeout_s: int = 0) -> bool:
        """Keep the battery at ``power_w`` (W, positive discharges); True when it wrote.

        ``now_s`` is the caller's clock (s). Written when first held, when it moved by at
        least the deadband (after the minimum write interval), or when the last write is half
        the device's revert timeout old. Between writes nothing is sent. A write the device
        does not confirm raises WriteNotConfirmed and is retried after the minimum interval.
        """
        policy = self.write_policy.with_revert_timeout(self.revert_timeout_for(revert_timeout_s))
        self.held.policy = policy
        reason = self.held.due(power_w, now_s)
        if reason is None:
            return False
        try:
            self.applied_w = await self.set_power_w(power_w, revert_timeout_s)
        except WriteNotConfirmed:
            self.held.failed(now_s)
            raise
        self.held.wrote(power_w, now_s, reason)
        return True


class Battery(HeldSetpoint):
    """A SunSpec battery inverter: model 124 (storage controls) and 802 (battery base).

    ``write_policy`` (deadband, minimum write interval) comes from the device's description
    in the site file; the refresh follows the revert timeout written with each command.
    """

    def __init__(
        self,
        transport: ModbusTransport,
        unit: int,
        smap: SunSpecMap,
        info: DeviceInfo,
        write_policy: WritePolicy | None = None,
    ) -> None:
        self._init_writes(write_policy)
        if smap.find(124) is None:
            raise SunSpecError(f"unit {unit} has no storage model 124 (models {smap.model_ids})")
        self.info = info
        self.map = smap
        self._reader = SunSpecReader(
            transport,
            unit,
            smap,
            {
                124: (
                    "WChaMax",
                    "StorCtl_Mod",
                    "MinRsvPct",
                    "ChaState",
                    "ChaSt",
                    "OutWRte",
                    "InWRte",
                    "InOutWRte_WinTms",
                    "InOutWRte_RvrtTms",
                    "InOutWRte_RmpTms",
                ),
                802: ("WHRtg", "WChaRteMax", "WDisChaRteMax", "SoCMax", "SoCMin", "SoC", "W"),
            },
        )

    @property
    def missing(self) -> dict[str, str]:
        """Points the last poll could not read ('103.Hz' -> refused, beyond the length...)."""
        return self._reader.missing_points

    @classmethod
    async def connect(
        cls, transport: ModbusTransport, unit: int, write_policy: WritePolicy | None = None
    ) -> Battery:
        """Discover the device and check it is a battery inverter.

        A device without model 124, or whose model 124 is empty (WChaMax not implemented
        or 0, as PV-only inverters that announce the storage model report it), is refused
        with :class:`SunSpecError`: its setpoints could not be expressed.
        """
        smap = await discover(transport, unit)
        battery = cls(transport, unit, smap, await _info(transport, unit, smap), write_policy)
        await battery.check_storage()
        return battery

    async def check_storage(self) -> None:
        """Raise :class:`SunSpecError` unless model 124 reports a usable WChaMax (W > 0)."""
        values = await self._reader.poll()
        w_cha_max = _f(values.get(124, {}).get("WChaMax"))
        if w_cha_max is None or w_cha_max <= 0:
            inst = self.map.find(124)
            where = f" at {inst.address}" if inst is not None else ""
            got = "not implemented" if w_cha_max is None else f"{w_cha_max:g} W"
            raise SunSpecError(
                f"model 124{where} is empty (WChaMax {got}): the device has no "
                "controllable storage (a PV-only inverter?)"
            )

    async def read(self) -> BatteryReading:
        """One poll."""
        values = await self._reader.poll()
        ctl, bat = values[124], values.get(802, {})
        w_cha_max = _f(ctl["WChaMax"])
        mode = ctl["StorCtl_Mod"]
        setpoint = None
        if isinstance(mode, int) and w_cha_max is not None:
            out_pct, in_pct = _f(ctl["OutWRte"]) or 0.0, _f(ctl["InWRte"]) or 0.0
            setpoint = 0.0
            if mode & 2:
                setpoint += w_cha_max * out_pct / 100.0
            if mode & 1:
                setpoint -= w_cha_max * in_pct / 100.0
        soc_min = max(_f(bat.get("SoCMin")) or 0.0, _f(ctl["MinRsvPct"]) or 0.0)
        charge_status = ctl["ChaSt"]
        return BatteryReading(
            soc_pct=_f(bat.get("SoC")) if bat.get("SoC") is not None else _f(ctl["ChaState"]),
            power_w=_f(bat.get("W")),
            setpoint_w=setpoint,
            rated_charge_w=_f(bat.get("WChaRteMax")) or w_cha_max,
            rated_discharge_w=_f(bat.get("WDisChaRteMax")) or w_cha_max,
            soc_min_pct=soc_min,
            soc_max_pct=_f(bat.get("SoCMax")) or 100.0,
            capacity_wh=_f(bat.get("WHRtg")),
            charge_status=(
                _CHARGE_STATUS.get(charge_status) if isinstance(charge_status, int) else None
            ),
        )

    async def set_power_w(self, power_w: float, revert_timeout_s: int = 0) -> float:
        """Command the battery to ``power_w`` (positive discharges, negative charges, 0 holds).

        Writes model 124's rates (OutWRte/InWRte as % of WChaMax) and revert timeout, then
        StorCtl_Mod, and confirms by reading back. Refused before anything is written when
        the power exceeds the rated charge or discharge power, or would push the state of
        charge further past its bounds. Returns the setpoint the device reports, W.
        """
        if not math.isfinite(power_w):
            raise SetpointRejected(f"battery setpoint {power_w} W is not a number")
        if not 0 <= revert_timeout_s <= 0xFFFF:
            raise SetpointRejected(f"revert timeout {revert_timeout_s} s outside 0..65535")
        check_battery_setpoint(await self.read(), power_w)
        w_cha_max = float(self._reader.decode(self._reader.last_image)[124]["WChaMax"] or 0.0)
        if w_cha_max <= 0:
            raise SetpointRejected("battery reports no WChaMax: rates cannot be expressed")
        pct = 100.0 * abs(power_w) / w_cha_max
        self.writes += 1
        await self._reader.write_points(
            124,
            {
                "OutWRte": pct if power_w > 0 else 0.0,
                "InWRte": pct if power_w < 0 else 0.0,
                "InOutWRte_WinTms": 0,
                "InOutWRte_RvrtTms": revert_timeout_s,
                "InOutWRte_RmpTms": 0,
            },
        )
        mode = 2 if power_w > 0 else 1 if power_w < 0 else 0
        await self._reader.write_points(124, {"StorCtl_Mod": mode})
        check = await self.read()
        step = w_cha_max * 10.0 ** self._reader.scale_factor(124, "InOutWRte_SF") / 100.0
        if check.setpoint_w is None or abs(check.setpoint_w - power_w) > step:
            raise WriteNotConfirmed(f"setpoint {power_w} W written, read back {check.setpoint_w}")
        return check.setpoint_w


class Meter(Protocol):
    """Anything that reads like a meter."""

    async def read(self) -> MeterReading:
        """One poll."""
        ...


class SunSpecMeter:
    """A SunSpec meter: models 201-204 (integer + SF) or 211-214 (float)."""

    def __init__(
        self, transport: ModbusTransport, unit: int, smap: SunSpecMap, info: DeviceInfo
    ) -> None:
        meter = smap.find(*METER_MODELS)
        if meter is None:
            raise SunSpecError(f"unit {unit} has no meter model (models {smap.model_ids})")
        self.meter_model = meter.id
        self.info = info
        self._reader = SunSpecReader(
            transport,
            unit,
            smap,
            {
                meter.id: (
                    "W",
                    "WphA",
                    "WphB",
                    "WphC",
                    "PhVphA",
                    "PhVphB",
                    "PhVphC",
                    "Hz",
                    "TotWhImp",
                    "TotWhExp",
                )
            },
        )

    @property
    def missing(self) -> dict[str, str]:
        """Points the last poll could not read ('103.Hz' -> refused, beyond the length...)."""
        return self._reader.missing_points

    @classmethod
    async def connect(cls, transport: ModbusTransport, unit: int) -> SunSpecMeter:
        """Discover the device and check it is a meter."""
        smap = await discover(transport, unit)
        return cls(transport, unit, smap, await _info(transport, unit, smap))

    async def read(self) -> MeterReading:
        """One poll."""
        m = (await self._reader.poll())[self.meter_model]
        return MeterReading(
            power_w=_f(m["W"]),
            power_phase_w=(_f(m["WphA"]), _f(m["WphB"]), _f(m["WphC"])),
            voltage_phase_v=(_f(m["PhVphA"]), _f(m["PhVphB"]), _f(m["PhVphC"])),
            frequency_hz=_f(m["Hz"]),
            import_energy_wh=_f(m["TotWhImp"]),
            export_energy_wh=_f(m["TotWhExp"]),
        )


#: Register-map point names a meter map must provide, by reading field.
MAP_METER_POINTS = {
    "power_w": "power_total_w",
    "power_l1_w": "power_l1_w",
    "power_l2_w": "power_l2_w",
    "power_l3_w": "power_l3_w",
    "voltage_l1_v": "voltage_l1_v",
    "voltage_l2_v": "voltage_l2_v",
    "voltage_l3_v": "voltage_l3_v",
    "frequency_hz": "frequency_hz",
    "import_energy_wh": "import_energy_wh",
    "export_energy_wh": "export_energy_wh",
}


class MapReader:
    """Reads a register map's points every poll with the fewest requests the map's
    ``max_read_registers`` allows, surviving refusals as the SunSpec reader does
    (:class:`drivers.coalesce.SpanReader`, one per unit): a read the device refuses is split
    down to the point; a point refused on its own decodes as NaN (missing), its reason in
    :attr:`missing`, and is not asked for again."""

    def __init__(self, regmap: RegisterMap, names: Iterable[str] | None = None) -> None:
        self.regmap = regmap
        self._groups: list[tuple[int | None, list[str], SpanReader]] = []
        for unit_id, points in regmap.unit_groups(names).items():
            spans = [
                Span("input" if p.table == "input" else "holding", p.address, p.count, (i,))
                for i, p in enumerate(points)
            ]
            reader = SpanReader(spans, max_registers=regmap.max_read_registers)
            self._groups.append((unit_id, [p.name for p in points], reader))
        #: Points the device refused, with the reason.
        self.missing: dict[str, str] = {}

    async def read(self, transport: ModbusTransport, unit: int) -> dict[str, float]:
        """One poll: every point's value (NaN where missing). Other errors propagate."""
        values: dict[str, float] = {}
        for unit_id, names, reader in self._groups:
            image = await reader.read(transport, unit if unit_id is None else unit_id)
            for name in names:
                p = self.regmap.point(name)
                words = [image.get((p.table, p.address + k)) for k in range(p.count)]
                if any(w is None for w in words):
                    values[name] = math.nan
                    span = Span(p.table, p.address, p.count)
                    self.missing[name] = next(
                        (why for s, why in reader.refused.items() if s.address == span.address),
                        "not read: the device refused its registers",
                    )
                    continue
                values[name] = decode_point(p, [w for w in words if w is not None])
        return values


async def read_map_points(
    transport: ModbusTransport,
    unit: int,
    regmap: RegisterMap,
    names: Iterable[str] | None = None,
) -> dict[str, float]:
    """Read and decode the named points (all when None) once, each from the unit that holds
    it, surviving refusals (:class:`MapReader`): a refused point is NaN (missing). NaN float
    registers decode as NaN too."""
    return await MapReader(regmap, names).read(transport, unit)


class RegisterMapMeter:
    """A meter described by a register map (e.g. the Eastron SDM630)."""

    def __init__(self, transport: ModbusTransport, unit: int, regmap: RegisterMap) -> None:
        missing = [p for p in MAP_METER_POINTS.values() if p not in {q.name for q in regmap.points}]
        if missing:
            raise SunSpecError(f"register map {regmap.source} lacks meter points {missing}")
        self.transport = transport
        self.unit = unit
        self.regmap = regmap
        self.info = DeviceInfo(regmap.manufacturer, regmap.model, None, None)
        self.blocks = plan_reads(
            regmap.spans(MAP_METER_POINTS.values()), max_registers=regmap.max_read_registers
        )
        self._reader = MapReader(regmap, MAP_METER_POINTS.values())

    @property
    def missing(self) -> dict[str, str]:
        """Points the meter refused, with the reason."""
        return self._reader.missing

    async def read(self) -> MeterReading:
        """One poll; points the meter refuses read as None (see :attr:`missing`)."""
        v = await self._reader.read(self.transport, self.unit)

        def get(name: str) -> float | None:
            x = v[MAP_METER_POINTS[name]]
            return None if math.isnan(x) else x

        return MeterReading(
            power_w=get("power_w"),
            power_phase_w=(get("power_l1_w"), get("power_l2_w"), get("power_l3_w")),
            voltage_phase_v=(get("voltage_l1_v"), get("voltage_l2_v"), get("voltage_l3_v")),
            frequency_hz=get("frequency_hz"),
            import_energy_wh=get("import_energy_wh"),
            export_energy_wh=get("export_energy_wh"),
        )

    async def write(self, name: str, value: float) -> None:
        """Write one writable holding-register point, and confirm it by reading back."""
        point = self.regmap.point(name)
        if not point.writable or point.table != "holding":
            raise SetpointRejected(f"{self.regmap.source}: point {name} is not writable")
        unit = self.unit if point.unit_id is None else point.unit_id
        await self.transport.write_registers(unit, point.address, encode_point(point, value))
        image = await read_blocks(self.transport, self.unit, plan_reads(self.regmap.spans([name])))
        back = decode_map(self.regmap, image, [name])[name]
        if not math.isclose(back, value, rel_tol=1e-6, abs_tol=abs(point.scale)):
            raise WriteNotConfirmed(f"{name}: wrote {value}, read back {back}")


class MapBattery(HeldSetpoint):
    """A battery described by a register map's ``[battery]`` table: the same interface as
    :class:`Battery` (read, set_power_w with limit checks and read-back, hold_power_w).

    The write policy's deadband and minimum write interval come from the map's
    ``[battery.control]`` unless one is given. The device's own revert timeout is the map's:
    written to its timeout point with each command (the caller's ``revert_timeout_s``, or
    the map's longest when 0), or fixed by the device (``revert_timeout_s`` in the map; a
    device that holds setpoints refuses a command that asks for a timeout).
    """

    def __init__(
        self,
        transport: ModbusTransport,
        unit: int,
        regmap: RegisterMap,
        write_policy: WritePolicy | None = None,
    ) -> None:
        if regmap.battery is None:
            raise RegisterMapError(f"register map {regmap.source} describes no battery")
        self.spec = regmap.battery
        self.control: BatteryControl | None = self.spec.control
        if write_policy is None and self.control is not None:
            write_policy = WritePolicy(
                deadband_w=self.control.deadband_w,
                min_interval_s=self.control.min_write_interval_s,
            )
        self._init_writes(write_policy)
        self.transport = transport
        self.unit = unit
        self.regmap = regmap
        self.info = DeviceInfo(regmap.manufacturer, regmap.model, None, None)
        names = list(self.spec.reads)
        if self.control is not None:
            names += [
                n
                for n in (self.control.setpoint, self.control.charge_setpoint, self.control.mode)
                if n is not None
            ]
        self._names = list(dict.fromkeys(names))
        self._reader = MapReader(regmap, self._names)

    def _setpoint_w(self, v: dict[str, float]) -> float | None:
        """The commanded power the device holds, W (positive discharges); None when unknown."""
        c = self.control
        if c is None:
            return None
        mode = None if c.mode is None else v[c.mode]
        if mode is not None and mode == c.mode_idle:
            return 0.0
        if c.setpoint_kind == "signed":
            sp = v[c.setpoint]
            return None if math.isnan(sp) else sp
        if mode == c.mode_discharge:
            return abs(v[c.setpoint])
        if mode == c.mode_charge:
            return -abs(v[c.charge_setpoint or c.setpoint])
        return None  # another mode (e.g. the device's own self-consumption)

    async def read(self) -> BatteryReading:
        """One poll."""
        v = await self._reader.read(self.transport, self.unit)

        def num(ref: str | float | None) -> float | None:
            if ref is None or isinstance(ref, float):
                return ref
            return None if math.isnan(v[ref]) else v[ref]

        spec = self.spec
        power = num(spec.power_w)
        if power is not None and spec.direction is not None:
            direction = v[spec.direction]
            if math.isnan(direction):
                power = None  # a magnitude whose direction the device did not give
            else:
                status = int(direction)
                power = (
                    -abs(power)
                    if status & spec.charging_mask
                    else abs(power)
                    if status & spec.discharging_mask
                    else 0.0
                )
        soc = num(spec.soc_pct)
        soc_min, soc_max = num(spec.soc_min_pct) or 0.0, num(spec.soc_max_pct) or 100.0
        if power is None:
            charge_status = None
        elif power > 0:
            charge_status = "discharging"
        elif power < 0:
            charge_status = "charging"
        elif soc is not None and soc >= soc_max:
            charge_status = "full"
        elif soc is not None and soc <= soc_min:
            charge_status = "empty"
        else:
            charge_status = "holding"
        return BatteryReading(
            soc_pct=soc,
            power_w=power,
            setpoint_w=self._setpoint_w(v),
            rated_charge_w=num(spec.rated_charge_w),
            rated_discharge_w=num(spec.rated_discharge_w),
            soc_min_pct=soc_min,
            soc_max_pct=soc_max,
            capacity_wh=num(spec.capacity_wh),
            charge_status=charge_status,
        )

    def revert_timeout_for(self, revert_timeout_s: int) -> float:
        """The device's own revert timeout, s, when commanded with ``revert_timeout_s``."""
        c = self.control
        if c is None:
            return 0.0
        if c.timeout is not None:
            return float(revert_timeout_s or c.revert_timeout_max_s or 0.0)
        return c.revert_timeout_s

    def _command(self, power_w: float, revert_timeout_s: int) -> list[tuple[str, float]]:
        """The (point, value) writes of one command, in the map's order."""
        c = self.control
        if c is None:
            raise SetpointRejected(f"register map {self.regmap.source} documents no control")
        writes = list(c.prepare)
        if c.timeout is not None:
            limit = c.revert_timeout_max_s or 0.0
            if revert_timeout_s > limit:
                raise SetpointRejected(
                    f"revert timeout {revert_timeout_s} s exceeds the device's {limit:g} s"
                )
            writes.append((c.timeout, float(revert_timeout_s or limit)))
        elif revert_timeout_s and not c.revert_timeout_s:
            raise SetpointRejected(
                f"{self.regmap.model} holds setpoints until told otherwise: it cannot revert "
                f"after {revert_timeout_s} s"
            )
        if c.setpoint_kind == "signed":
            writes.append((c.setpoint, power_w))
        elif power_w < 0 and c.charge_setpoint is not None:
            writes.append((c.charge_setpoint, -power_w))
        else:
            writes.append((c.setpoint, abs(power_w)))
        if c.mode is not None:
            mode = (
                c.mode_discharge if power_w > 0 else c.mode_charge if power_w < 0 else c.mode_idle
            )
            writes.append((c.mode, float(mode or 0)))
        return writes

    async def set_power_w(self, power_w: float, revert_timeout_s: int = 0) -> float:
        """Command the battery to ``power_w`` (positive discharges, negative charges, 0 holds).

        Writes the map's command (prepare, timeout, setpoint(s), mode) and confirms by reading
        back. Refused before anything is written when beyond the rated power or the state of
        charge bounds, or when a value does not fit its register. Returns the setpoint the
        device reports, W.
        """
        if not 0 <= revert_timeout_s <= 0xFFFF:
            raise SetpointRejected(f"revert timeout {revert_timeout_s} s outside 0..65535")
        check_battery_setpoint(await self.read(), power_w)
        encoded = []
        for name, value in self._command(power_w, revert_timeout_s):
            point = self.regmap.point(name)
            try:
                words = encode_point(point, value)
            except ValueError as err:
                raise SetpointRejected(f"{name}: {err}") from err
            encoded.append((self.unit if point.unit_id is None else point.unit_id, point, words))
        self.writes += 1
        for unit, point, words in encoded:
            await self.transport.write_registers(unit, point.address, words)
        check = await self.read()
        control = self.control
        assert control is not None  # _command refused a map without control
        step = abs(self.regmap.point(control.setpoint).scale)
        if check.setpoint_w is None or abs(check.setpoint_w - power_w) > step:
            raise WriteNotConfirmed(f"setpoint {power_w} W written, read back {check.setpoint_w}")
        return check.setpoint_w
