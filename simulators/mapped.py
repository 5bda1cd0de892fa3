"""One simulator for any register map: every map gets a software twin with plausible physics.

:class:`MapDeviceSim` serves the registers a map describes (each in the unit the map puts it)
and fills them from what the point *is*, judged by its name and unit:

- meter points (``power_total_w``, ``power_l1_w``, ``voltage_l1_v``, ``frequency_hz``,
  ``import_energy_wh`` ...) measure the site's grid connection, positive importing, with this
  device's own PV and battery included; energies accumulate from a lifetime start (an
  accumulator at 0 reads as "not counted" on many devices);
- ``pv_power_w`` is clear-sky PV with seeded clouds at the site (``pv_peak_w`` peak),
  ``pv_energy_wh`` its yield, ``ac_power_w`` PV plus battery, ``consumption_l*_w`` the load;
- the ``[battery]`` points hold a battery that integrates its state of charge
  (:func:`simulators.physics.battery_step`) under the setpoint written through the map's
  ``[battery.control]``: the prepare points must hold their values for a command to act, and
  the device drops a command after its own revert timeout (fixed, or the timeout point's);
- other points read a plausible constant by unit (230 V, 50 Hz, ...), their ``default``
  (a device's factory value) or, for writable points, what was last written.

Writes must cover whole writable holding points; a battery setpoint beyond the rated power
answers exception 3. Values are written to the registers with the drivers' own encoder, so
twin and driver share the map and nothing else.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable

from pymodbus.constants import ExcCodes
from pymodbus.simulator import DataType, SimAction, SimData, SimDevice

from drivers.regmap import RegisterMap, RegisterPoint, decode_point, encode_point
from simulators import physics
from simulators.devices import NOMINAL_FREQUENCY_HZ, NOMINAL_VOLTAGE_V, SimSite, SimulatedDevice

#: Points further apart than this are served as separate blocks (reads between answer 2).
_CLUSTER_GAP = 125
_PHASES = (1, 2, 3)
#: A 48 V-class battery bank's voltage, V.
_BATTERY_VOLTAGE_V = 52.0


def _clusters(addresses: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, count) blocks covering every (address, count), split where the gap is long."""
    blocks: list[list[int]] = []
    for address, count in sorted(addresses):
        if blocks and address - blocks[-1][1] <= _CLUSTER_GAP:
            blocks[-1][1] = max(blocks[-1][1], address + count)
        else:
            blocks.append([address, address + count])
    return [(start, end - start) for start, end in blocks]


class MapDeviceSim(SimulatedDevice):
    """A device described by ``regmap``, served under ``unit_id`` (default: the map's, else 1)
    and under every other unit its points name: serve all of :attr:`devices`.
    """

    kind = "map"

    def __init__(
        self,
        name: str,
        site: SimSite,
        regmap: RegisterMap,
        unit_id: int | None = None,
        *,
        pv_peak_w: float = 5000.0,
        soc_pct: float = 50.0,
        capacity_wh: float = 10_000.0,
        rated_power_w: float = 5000.0,
        lifetime_import_wh: float = 2.0e6,
        lifetime_export_wh: float = 1.0e6,
        seed: int = 0,
    ) -> None:
        self.regmap = regmap
        self.pv_peak_w = float(pv_peak_w)
        self.seed = seed
        self.words: dict[tuple[int, str], dict[int, int]] = {}
        unit = unit_id if unit_id is not None else regmap.unit_id if regmap.unit_id else 1
        self._unit_of = {p.name: unit if p.unit_id is None else p.unit_id for p in regmap.points}
        names = {p.name for p in regmap.points}
        self.has_pv = "pv_power_w" in names
        self.spec = regmap.battery
        self.control = self.spec.control if self.spec else None
        self.capacity_wh = (
            float(self.spec.capacity_wh)
            if self.spec and isinstance(self.spec.capacity_wh, float)
            else float(capacity_wh)
        )
        self.rated_power_w = float(rated_power_w)
        self.soc_pct = float(soc_pct)
        self.battery_w = 0.0
        self.pv_w = 0.0
        self.grid_w = 0.0
        self.pv_energy_wh = 3.0e6
        self.import_energy_wh = float(lifetime_import_wh)
        self.export_energy_wh = float(lifetime_export_wh)
        self.command_ts: float | None = None
        #: Producers step before meter-only devices, so a meter sees their power.
        self.step_order = 0 if (self.has_pv or self.spec is not None) else 1
        for p in regmap.points:
            self._put(p.name, self._initial(p))
        super().__init__(name, unit, site)
        self.devices: list[SimulatedDevice] = [self]
        for other in sorted({u for u in self._unit_of.values() if u != unit}):
            self.devices.append(_UnitView(self, other))

    # -- the register image -----------------------------------------------------------------
    def _initial(self, p: RegisterPoint) -> float:
        if p.default is not None:
            return p.default
        if self.spec is not None and p.name == self.spec.capacity_wh:
            return self.capacity_wh
        if p.name in ("rated_power_w", "nominal_power_w"):
            return self.pv_peak_w
        if p.name.startswith("max_") and p.unit == "W":
            return self.rated_power_w
        return self._plausible(p)

    def _plausible(self, p: RegisterPoint) -> float:
        """A constant a working device might show for a point nothing else computes."""
        if p.unit == "V":
            return (
                _BATTERY_VOLTAGE_V
                if p.name.startswith("battery")
                else 350.0
                if "pv" in p.name
                else NOMINAL_VOLTAGE_V
            )
        if p.unit == "Hz":
            return NOMINAL_FREQUENCY_HZ
        if p.unit == "%":
            return 100.0
        if p.unit in ("Wh", "VAh", "varh"):
            return 1.0e6
        return 0.0

    def _put(self, name: str, value: float) -> None:
        p = self.regmap.point(name)
        try:
            words = encode_point(p, value)
        except ValueError:  # beyond the register's range: the device shows its limit
            words = encode_point(p, 0.0)
        table = self.words.setdefault((self._unit_of[name], p.table), {})
        for k, w in enumerate(words):
            table[p.address + k] = w

    def get(self, name: str) -> float:
        """A point's current value, decoded from the registers as a client would."""
        p = self.regmap.point(name)
        table = self.words[(self._unit_of[name], p.table)]
        return decode_point(p, [table[p.address + k] for k in range(p.count)])

    def _num(self, ref: str | float | None, fallback: float) -> float:
        if ref is None:
            return fallback
        return ref if isinstance(ref, float) else self.get(ref)

    def simdevice_for(self, unit: int, action: SimAction) -> SimDevice:
        """The pymodbus device for one unit: its holding and input blocks."""
        tables = []
        for table in ("holding", "input"):
            spans = [
                (p.address, p.count)
                for p in self.regmap.points
                if p.table == table and self._unit_of[p.name] == unit
            ]
            blocks = [
                SimData(start, values=[0] * count, datatype=DataType.REGISTERS)
                for start, count in _clusters(spans)
            ]
            tables.append(blocks or [SimData(0, count=1, datatype=DataType.INVALID)])
        bits = [SimData(0, values=False, datatype=DataType.BITS)]
        return SimDevice(
            id=unit,
            simdata=(bits, bits, tables[0], tables[1]),
            action=action,
        )

    def simdevice(self) -> SimDevice:
        """This device's own unit."""
        return self.simdevice_for(self.unit_id, self.action)

    def sync_unit(
        self, unit: int, function_code: int, start_address: int, registers: list[int]
    ) -> None:
        """Copy the live image of one unit's table into pymodbus's register list."""
        table = self.words.get((unit, "input" if function_code == 4 else "holding"), {})
        for address, word in table.items():
            i = address - start_address
            if 0 <= i < len(registers):
                registers[i] = word

    def sync(self, function_code: int, start_address: int, registers: list[int]) -> None:
        """See :meth:`sync_unit`."""
        self.sync_unit(self.unit_id, function_code, start_address, registers)

    def write_unit(self, unit: int, address: int, values: list[int]) -> ExcCodes | None:
        """Apply a write of whole writable holding points, or refuse it."""
        points = sorted(
            (
                p
                for p in self.regmap.points
                if p.table == "holding"
                and self._unit_of[p.name] == unit
                and address <= p.address < address + len(values)
            ),
            key=lambda p: p.address,
        )
        if (
            not points
            or points[0].address != address
            or sum(p.count for p in points) != len(values)
            or any(b.address != a.address + a.count for a, b in itertools.pairwise(points))
        ):
            return ExcCodes.ILLEGAL_ADDRESS
        if not all(p.writable for p in points):
            return ExcCodes.ILLEGAL_ADDRESS
        new: dict[str, float] = {}
        for p in points:
            offset = p.address - address
            new[p.name] = decode_point(p, values[offset : offset + p.count])
        if self.control is not None:
            rated = max(
                self._num(self.spec.rated_charge_w if self.spec else None, self.rated_power_w),
                self._num(self.spec.rated_discharge_w if self.spec else None, self.rated_power_w),
            )
            for setpoint in (self.control.setpoint, self.control.charge_setpoint):
                if setpoint in new and abs(new[setpoint]) > rated * 1.0001:
                    return ExcCodes.ILLEGAL_VALUE
        table = self.words[(unit, "holding")]
        for k, word in enumerate(values):
            table[address + k] = word
        if self.control is not None and set(new) & set(self.control.writes):
            # A command restarts the revert timer and takes effect at once; the site's grid
            # sees it from its next step.
            self.command_ts = self.site.clock.now()
            self._revert_if_due(self.command_ts)
            self._battery_step(0.0)
            self._publish(self.command_ts)
        return None

    def write(self, function_code: int, address: int, values: list[int]) -> ExcCodes | None:
        """See :meth:`write_unit`."""
        return self.write_unit(self.unit_id, address, values)

    # -- physics ------------------------------------------------------------------------------
    def commanded_w(self) -> float:
        """The power the written command asks for, W (positive discharges); 0 when none."""
        c = self.control
        if c is None:
            return 0.0
        if any(not math.isclose(self.get(n), v) for n, v in c.prepare):
            return 0.0  # not in the mode the command needs: the device runs on its own
        mode = None if c.mode is None else self.get(c.mode)
        if mode is not None and mode == c.mode_idle:
            return 0.0
        if c.setpoint_kind == "signed":
            return self.get(c.setpoint)
        if mode == c.mode_discharge:
            return abs(self.get(c.setpoint))
        if mode == c.mode_charge:
            return -abs(self.get(c.charge_setpoint or c.setpoint))
        return 0.0

    def revert_at(self) -> float | None:
        """When the device drops the last command by its own revert timeout (None: never)."""
        c = self.control
        if c is None or self.command_ts is None:
            return None
        timeout = self.get(c.timeout) if c.timeout is not None else c.revert_timeout_s
        return self.command_ts + timeout if timeout > 0 else None

    def _revert_if_due(self, now: float) -> None:
        c = self.control
        at = self.revert_at()
        if c is None or at is None or now < at:
            return
        if c.mode is not None and c.mode_idle is not None:
            self._put(c.mode, float(c.mode_idle))
        else:
            self._put(c.setpoint, 0.0)
        self.command_ts = None

    def _battery_step(self, dt_s: float) -> None:
        spec = self.spec
        if spec is None:
            return
        soc_min = self._num(spec.soc_min_pct, 0.0)
        soc_max = self._num(spec.soc_max_pct, 100.0)
        if dt_s > 0:
            soc, _ = physics.battery_step(
                self.soc_pct,
                self.battery_w,
                dt_s,
                self.capacity_wh,
                soc_min_pct=soc_min,
                soc_max_pct=soc_max,
            )
            self.soc_pct = float(soc)
        want = self.commanded_w()
        limit = self._num(spec.rated_discharge_w if want > 0 else spec.rated_charge_w, 0.0)
        want = max(-limit, min(limit, want))
        _, deliverable = physics.battery_step(
            self.soc_pct,
            want,
            1.0,
            self.capacity_wh,
            soc_min_pct=soc_min,
            soc_max_pct=soc_max,
        )
        self.battery_w = float(deliverable)

    def step(self, now: float, dt_s: float) -> None:
        """PV and battery first, then the grid connection they change; publish every point."""
        site = self.site
        at = self.revert_at()
        if at is not None and at <= now:  # run under the command until it lapsed, then idle
            before = min(dt_s, max(0.0, at - (now - dt_s)))
            self._battery_step(before)
            self._revert_if_due(now)
            self._battery_step(0.0)
            self._battery_step(dt_s - before)
        else:
            self._battery_step(dt_s)
        if dt_s > 0:
            self.pv_energy_wh += self.pv_w * dt_s / 3600.0
            energy = self.grid_w * dt_s / 3600.0
            if energy > 0:
                self.import_energy_wh += energy
            else:
                self.export_energy_wh -= energy
        if self.has_pv:
            ghi = physics.clear_sky_ghi_w_per_m2(now, site.latitude_deg, site.longitude_deg)
            ghi = ghi * physics.cloud_index(now, seed=self.seed)
            self.pv_w = float(physics.pv_ac_power_w(ghi, self.pv_peak_w, self.pv_peak_w))
        # The site stepped its own devices first; this device's PV and battery change what
        # the site imports, and a meter-only device (stepped after the producers) sees them.
        site.pv_w += self.pv_w
        site.battery_w += self.battery_w
        site.grid_w -= self.pv_w + self.battery_w
        self.grid_w = site.grid_w
        self._publish(now)

    def _publish(self, now: float) -> None:
        idx = physics.cloud_index([now, now + 7e5, now + 1.4e6], seed=self.site.seed + 99)
        volts = [NOMINAL_VOLTAGE_V * (1.0 + 0.02 * (float(x) - 0.8)) for x in idx]
        phase_w = self.grid_w / 3.0
        values: dict[str, float] = {
            "power_total_w": self.grid_w,
            "grid_power_w": self.grid_w,
            "frequency_hz": NOMINAL_FREQUENCY_HZ,
            "import_energy_wh": self.import_energy_wh,
            "export_energy_wh": self.export_energy_wh,
            "total_energy_wh": self.import_energy_wh + self.export_energy_wh,
            "apparent_power_total_va": abs(self.grid_w),
            "pv_power_w": self.pv_w,
            "pv_energy_wh": self.pv_energy_wh,
            "ac_power_w": self.pv_w + self.battery_w,
        }
        for i, v in zip(_PHASES, volts, strict=True):
            values |= {
                f"voltage_l{i}_v": v,
                f"power_l{i}_w": phase_w,
                f"grid_l{i}_w": phase_w,
                f"current_l{i}_a": abs(phase_w) / v,
                f"consumption_l{i}_w": self.site.load_w / 3.0,
            }
        spec = self.spec
        if spec is not None:
            for q in self.regmap.points:  # a second view of the battery (a Victron Multi's)
                if q.name.endswith("soc_pct") and not q.writable:
                    values[q.name] = self.soc_pct
            values["battery_current_a"] = self.battery_w / _BATTERY_VOLTAGE_V
            values["battery_voltage_v"] = _BATTERY_VOLTAGE_V
            values[spec.soc_pct] = self.soc_pct
            values[spec.power_w] = abs(self.battery_w) if spec.direction else self.battery_w
            if spec.direction is not None:
                bits = (
                    spec.charging_mask
                    if self.battery_w < 0
                    else spec.discharging_mask
                    if self.battery_w > 0
                    else 0
                )
                values[spec.direction] = float(bits | (1 if self.pv_w > 0 else 0))
        names = {p.name: p for p in self.regmap.points}
        for name, value in values.items():
            p = names.get(name)
            if p is not None and not p.writable:
                self._put(name, value)


class _UnitView(SimulatedDevice):
    """Another unit id of a :class:`MapDeviceSim` (a Victron GX's Multi): same device."""

    kind = "map-unit"

    def __init__(self, owner: MapDeviceSim, unit_id: int) -> None:
        self.owner = owner
        self.step_order = 2
        super().__init__(f"{owner.name}@{unit_id}", unit_id, owner.site)

    def step(self, now: float, dt_s: float) -> None:
        """The owner steps the physics."""

    def simdevice(self) -> SimDevice:
        """This unit's blocks of the owner's map."""
        return self.owner.simdevice_for(self.unit_id, self.action)

    def sync(self, function_code: int, start_address: int, registers: list[int]) -> None:
        """The owner's image of this unit."""
        self.owner.sync_unit(self.unit_id, function_code, start_address, registers)

    def write(self, function_code: int, address: int, values: list[int]) -> ExcCodes | None:
        """A write to the owner's image of this unit."""
        self.owner.writes += 1
        return self.owner.write_unit(self.unit_id, address, values)
