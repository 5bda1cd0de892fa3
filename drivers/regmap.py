"""Declarative register maps for Modbus devices that are not SunSpec.

A map is a TOML data file (one per device type, the built-in ones live in ``drivers/maps``)
listing named points; :func:`decode_point` and :func:`encode_point` are the only code that
turns register words into values and back. Addresses are 0-based wire addresses. Words are
16-bit and big-endian on the wire; ``word_order = "little"`` means the low word comes first.
Decoded values are ``raw * scale`` in the SI unit of the point.

A point may live in another Modbus unit than the device's (``unit_id``: a Victron GX answers
for the system, its settings and each inverter under their own unit ids). A ``[battery]``
table says which points hold a battery's state of charge, power and limits, and
``[battery.control]`` describes how the vendor's documented writes command its power: the
setpoint point(s), a mode point with its values, points to set first, the device's own revert
timeout (fixed, or written to a point) and how often the device may be written (flash wear).
Every reference is checked against the points when the map is loaded.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
import struct
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

from drivers.errors import RegisterMapError

__all__ = [
    "UNITS",
    "BatteryControl",
    "BatterySpec",
    "DataType",
    "RegisterMap",
    "RegisterPoint",
    "Table",
    "WordOrder",
    "builtin_map_names",
    "decode_map",
    "decode_point",
    "encode_point",
    "load_builtin_map",
    "load_register_map",
]

Table = Literal["input", "holding"]
DataType = Literal["uint16", "int16", "uint32", "int32", "float32", "uint64", "int64", "float64"]
WordOrder = Literal["big", "little"]

#: Units a point may carry: SI (plus % and degC), never scaled prefixes such as kWh.
UNITS = frozenset({"", "W", "V", "A", "Hz", "Wh", "VA", "var", "VAh", "varh", "%", "s", "degC"})

# data_type -> (struct format character, number of 16-bit registers)
_FORMATS: dict[str, tuple[str, int]] = {
    "uint16": ("H", 1),
    "int16": ("h", 1),
    "uint32": ("I", 2),
    "int32": ("i", 2),
    "float32": ("f", 2),
    "uint64": ("Q", 4),
    "int64": ("q", 4),
    "float64": ("d", 4),
}
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_LAST_ADDRESS = 0xFFFF


def _one_of(field: str, value: str, allowed: Iterable[str]) -> None:
    choices = list(allowed)
    if value not in choices:
        shown = ", ".join(c or '""' for c in choices)
        raise ValueError(f'{field} "{value}" is not one of {shown}')


@dataclass(frozen=True, slots=True)
class RegisterPoint:
    """One named value held in one or more consecutive registers of one table."""

    name: str
    address: int
    table: Table
    data_type: DataType
    word_order: WordOrder = "big"
    scale: float = 1.0
    unit: str = ""
    writable: bool = False
    description: str = ""
    #: The Modbus unit holding this point when it is not the device's own (None: the device's).
    unit_id: int | None = None
    #: What the device holds out of the box (its factory default), in the point's unit.
    default: float | None = None

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f'name "{self.name}" is not snake_case ([a-z][a-z0-9_]*)')
        if self.unit_id is not None and not 0 <= self.unit_id <= 247:
            raise ValueError(f"unit_id {self.unit_id} is outside 0..247")
        _one_of("table", self.table, get_args(Table))
        _one_of("data_type", self.data_type, get_args(DataType))
        _one_of("word_order", self.word_order, get_args(WordOrder))
        _one_of("unit", self.unit, sorted(UNITS))
        if not 0 <= self.address <= _LAST_ADDRESS:
            raise ValueError(f"address {self.address} is outside 0..{_LAST_ADDRESS}")
        if self.address + self.count - 1 > _LAST_ADDRESS:
            raise ValueError(
                f"address {self.address} + count {self.count} runs past the last "
                f"register {_LAST_ADDRESS}"
            )
        if self.scale == 0 or not math.isfinite(self.scale):
            raise ValueError(f"scale {self.scale} must be a finite non-zero number")
        if self.writable and self.table == "input":
            raise ValueError("writable: input registers are read-only in Modbus")

    @property
    def count(self) -> int:
        """Number of 16-bit registers the point occupies."""
        return _FORMATS[self.data_type][1]


SetpointKind = Literal["signed", "magnitude"]


@dataclass(frozen=True, slots=True)
class BatteryControl:
    """How a vendor's documented writes command a battery's power (``[battery.control]``).

    ``setpoint`` is a writable point in W. ``setpoint_kind`` "signed": positive discharges
    (give the point a negative scale when the vendor counts charging positive); "magnitude":
    the power's size, its direction set by ``mode`` (``charge_setpoint``, when given, takes
    the size of a charge instead). ``mode`` takes ``mode_charge``, ``mode_discharge`` or
    ``mode_idle``. ``prepare`` points are written first, each command (e.g. "forced mode").
    The device's own revert timeout: ``timeout`` names a writable point (s) written with each
    command, up to ``revert_timeout_max_s`` (also written when no timeout is asked for);
    otherwise ``revert_timeout_s`` is fixed by the device (0: holds until told otherwise).
    ``min_write_interval_s`` and ``deadband_w`` feed the write path
    (:class:`drivers.writeguard.WritePolicy`). Write order: prepare, timeout, setpoints, mode.
    """

    setpoint: str
    setpoint_kind: SetpointKind = "signed"
    charge_setpoint: str | None = None
    mode: str | None = None
    mode_idle: int | None = None
    mode_charge: int | None = None
    mode_discharge: int | None = None
    prepare: tuple[tuple[str, float], ...] = ()
    timeout: str | None = None
    revert_timeout_s: float = 0.0
    revert_timeout_max_s: float | None = None
    min_write_interval_s: float = 0.0
    deadband_w: float = 50.0

    def __post_init__(self) -> None:
        _one_of("setpoint_kind", self.setpoint_kind, get_args(SetpointKind))
        modes = (self.mode_idle, self.mode_charge, self.mode_discharge)
        if self.mode is not None and None in modes:
            raise ValueError("mode needs mode_idle, mode_charge and mode_discharge")
        if self.mode is None and any(m is not None for m in modes):
            raise ValueError("mode_idle/mode_charge/mode_discharge need a mode point")
        if self.setpoint_kind == "magnitude" and self.mode is None:
            raise ValueError('setpoint_kind "magnitude" needs a mode point for the direction')
        if self.charge_setpoint is not None and self.setpoint_kind != "magnitude":
            raise ValueError('charge_setpoint needs setpoint_kind "magnitude"')
        for name in ("revert_timeout_s", "min_write_interval_s", "deadband_w"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} {value} must be a finite number >= 0")
        if self.timeout is not None and self.revert_timeout_s:
            raise ValueError("give either a timeout point or a fixed revert_timeout_s, not both")
        if (self.timeout is None) != (self.revert_timeout_max_s is None):
            raise ValueError("a timeout point and revert_timeout_max_s go together")
        if self.revert_timeout_max_s is not None and not self.revert_timeout_max_s > 0:
            raise ValueError(f"revert_timeout_max_s {self.revert_timeout_max_s} must be > 0")

    @property
    def writes(self) -> list[str]:
        """Every point a command writes, in the order it writes them."""
        names = [n for n, _ in self.prepare]
        names += [self.timeout] if self.timeout else []
        names += [self.setpoint] + ([self.charge_setpoint] if self.charge_setpoint else [])
        return names + ([self.mode] if self.mode else [])


@dataclass(frozen=True, slots=True)
class BatterySpec:
    """Which points hold a battery's state (``[battery]``); limits are points or constants.

    ``power_w`` is positive when discharging (a negative scale turns a vendor's sign). When
    the device gives only the power's size, ``direction`` names a status point whose
    ``charging_mask`` / ``discharging_mask`` bits give its sign. Constants (numbers) stand
    for a datasheet's values where the device has no register for them.
    """

    soc_pct: str
    power_w: str
    rated_charge_w: str | float
    rated_discharge_w: str | float
    capacity_wh: str | float | None = None
    soc_min_pct: str | float = 0.0
    soc_max_pct: str | float = 100.0
    direction: str | None = None
    charging_mask: int = 0
    discharging_mask: int = 0
    control: BatteryControl | None = None

    def __post_init__(self) -> None:
        if (self.direction is None) != (self.charging_mask == self.discharging_mask == 0):
            raise ValueError("direction needs charging_mask and discharging_mask (and back)")
        for name in ("rated_charge_w", "rated_discharge_w", "capacity_wh"):
            value = getattr(self, name)
            if isinstance(value, float) and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} {value} must be a finite number > 0")
        for name in ("soc_min_pct", "soc_max_pct"):
            value = getattr(self, name)
            if isinstance(value, float) and not 0 <= value <= 100:
                raise ValueError(f"{name} {value} is outside 0..100")

    @property
    def reads(self) -> list[str]:
        """Every point the battery's state needs (limits given as points included)."""
        names = [self.soc_pct, self.power_w]
        for ref in (
            self.rated_charge_w,
            self.rated_discharge_w,
            self.capacity_wh,
            self.soc_min_pct,
            self.soc_max_pct,
            self.direction,
        ):
            if isinstance(ref, str):
                names.append(ref)
        return names


@dataclass(frozen=True, slots=True)
class RegisterMap:
    """A device type's points; ``source`` is the file path or ``"builtin:<name>"``.

    ``unit_id`` is the unit the vendor's document gives the device (None: no default);
    ``max_read_registers`` caps one read request (some meters accept fewer than 125).
    """

    name: str
    manufacturer: str
    model: str
    description: str
    points: tuple[RegisterPoint, ...]
    source: str
    unit_id: int | None = None
    max_read_registers: int = 125
    battery: BatterySpec | None = None

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f'name "{self.name}" is not snake_case ([a-z][a-z0-9_]*)')
        if self.unit_id is not None and not 0 <= self.unit_id <= 247:
            raise ValueError(f"unit_id {self.unit_id} is outside 0..247")
        if not 1 <= self.max_read_registers <= 125:
            raise ValueError(f"max_read_registers {self.max_read_registers} is outside 1..125")
        seen: dict[str, int] = {}
        for i, p in enumerate(self.points):
            if p.name in seen:
                first = seen[p.name]
                raise ValueError(f'points[{i}] ("{p.name}"): name duplicates points[{first}]')
            seen[p.name] = i
        if self.battery is not None:
            self._check_battery(self.battery)
        ordered = sorted(
            enumerate(self.points), key=lambda ip: (ip[1].unit_id or -1, ip[1].table, ip[1].address)
        )
        for (i, a), (j, b) in itertools.pairwise(ordered):
            if a.unit_id == b.unit_id and a.table == b.table and b.address < a.address + a.count:
                raise ValueError(
                    f'points[{j}] ("{b.name}"): address {b.address} overlaps points[{i}] '
                    f'("{a.name}"), {a.table} registers {a.address}..{a.address + a.count - 1}'
                )

    def _check_battery(self, spec: BatterySpec) -> None:
        """Every point the battery names exists; every point a command writes is writable."""
        names = {p.name for p in self.points}
        for ref in spec.reads:
            if ref not in names:
                raise ValueError(f'battery: no point "{ref}" in this map')
        control = spec.control
        if control is None:
            return
        for ref in control.writes:
            if ref not in names:
                raise ValueError(f'battery.control: no point "{ref}" in this map')
            if not self.point(ref).writable:
                raise ValueError(f'battery.control: point "{ref}" is not writable')
        for setpoint in (control.setpoint, control.charge_setpoint):
            if setpoint is not None and self.point(setpoint).unit != "W":
                raise ValueError(f'battery.control: setpoint "{setpoint}" must have unit "W"')
        if control.timeout is not None and self.point(control.timeout).unit != "s":
            raise ValueError(f'battery.control: timeout "{control.timeout}" must have unit "s"')

    def unit_groups(
        self, names: Iterable[str] | None = None
    ) -> dict[int | None, list[RegisterPoint]]:
        """The named points (all when None) by the unit holding them (None: the device's)."""
        groups: dict[int | None, list[RegisterPoint]] = {}
        for p in self._select(names):
            groups.setdefault(p.unit_id, []).append(p)
        return groups

    def point(self, name: str) -> RegisterPoint:
        """The point called ``name``; KeyError naming the map when there is none."""
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(f'register map "{self.name}" ({self.source}) has no point "{name}"')

    def spans(self, names: Iterable[str] | None = None) -> list[tuple[str, int, int]]:
        """``(table, address, count)`` of the named points (all when None), in the order given."""
        return [(p.table, p.address, p.count) for p in self._select(names)]

    def _select(self, names: Iterable[str] | None) -> Sequence[RegisterPoint]:
        return self.points if names is None else [self.point(n) for n in names]


def decode_point(point: RegisterPoint, words: Sequence[int]) -> float:
    """The value of ``point`` from its ``point.count`` wire words: ``raw * scale``.

    A NaN float register decodes as NaN (the caller treats it as missing).
    """
    fmt, count = _FORMATS[point.data_type]
    if len(words) != count:
        raise ValueError(f'point "{point.name}" needs {count} words, got {len(words)}')
    ordered = list(words) if point.word_order == "big" else list(reversed(words))
    try:
        packed = struct.pack(f">{count}H", *ordered)
    except struct.error as err:
        raise ValueError(f'point "{point.name}": words {list(words)} are not all 16-bit') from err
    (raw,) = struct.unpack(f">{fmt}", packed)
    return float(raw) * point.scale + 0.0  # + 0.0: a negative scale gives 0.0, not -0.0


def encode_point(point: RegisterPoint, value: float) -> list[int]:
    """The wire words holding ``value`` (inverse of :func:`decode_point`).

    ``value / scale`` is rounded to the register's resolution (nearest integer for integer
    types, nearest float for float types); ValueError when it does not fit the data type.
    """
    fmt, count = _FORMATS[point.data_type]
    raw = value / point.scale
    if not math.isfinite(raw):
        raise ValueError(f'point "{point.name}": cannot encode {value}')
    try:
        packed = struct.pack(f">{fmt}", raw if fmt in "fd" else round(raw))
    except (struct.error, OverflowError) as err:
        raise ValueError(
            f'point "{point.name}": {value} is out of range for {point.data_type} ({err})'
        ) from err
    words = list(struct.unpack(f">{count}H", packed))
    return words if point.word_order == "big" else words[::-1]


def decode_map(
    regmap: RegisterMap,
    image: Mapping[tuple[str, int], int],
    names: Iterable[str] | None = None,
) -> dict[str, float]:
    """Decode the named points (all when None) from ``image``: (table, address) -> wire word."""
    values: dict[str, float] = {}
    for p in regmap._select(names):
        try:
            words = [image[(p.table, p.address + k)] for k in range(p.count)]
        except KeyError as err:
            raise KeyError(
                f'point "{p.name}" of map "{regmap.name}": {p.table} register '
                f"{err.args[0][1]} is not in the image"
            ) from err
        values[p.name] = decode_point(p, words)
    return values


# ---- loading and validation -------------------------------------------------------------

_KINDS: dict[str, Callable[[object], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "non-empty array of tables": lambda v: (
        isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)
    ),
    "table": lambda v: isinstance(v, dict),
    "point name or number": lambda v: isinstance(v, str | int | float) and not isinstance(v, bool),
    "table of point names to numbers": lambda v: (
        isinstance(v, dict)
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v.values())
    ),
}
_TOML_TYPES = {
    str: "string",
    int: "integer",
    float: "float",
    bool: "boolean",
    list: "array",
    dict: "table",
}

# field -> (kind, required); defaults come from the dataclasses.
_MAP_FIELDS = {
    "name": ("string", True),
    "manufacturer": ("string", True),
    "model": ("string", True),
    "description": ("string", False),
    "unit_id": ("integer", False),
    "max_read_registers": ("integer", False),
    "points": ("non-empty array of tables", True),
    "battery": ("table", False),
}
_BATTERY_FIELDS = {
    "soc_pct": ("string", True),
    "power_w": ("string", True),
    "rated_charge_w": ("point name or number", True),
    "rated_discharge_w": ("point name or number", True),
    "capacity_wh": ("point name or number", False),
    "soc_min_pct": ("point name or number", False),
    "soc_max_pct": ("point name or number", False),
    "direction": ("string", False),
    "charging_mask": ("integer", False),
    "discharging_mask": ("integer", False),
    "control": ("table", False),
}
_CONTROL_FIELDS = {
    "setpoint": ("string", True),
    "setpoint_kind": ("string", False),
    "charge_setpoint": ("string", False),
    "mode": ("string", False),
    "mode_idle": ("integer", False),
    "mode_charge": ("integer", False),
    "mode_discharge": ("integer", False),
    "prepare": ("table of point names to numbers", False),
    "timeout": ("string", False),
    "revert_timeout_s": ("number", False),
    "revert_timeout_max_s": ("number", False),
    "min_write_interval_s": ("number", False),
    "deadband_w": ("number", False),
}
_POINT_FIELDS = {
    "name": ("string", True),
    "address": ("integer", True),
    "table": ("string", True),
    "data_type": ("string", True),
    "word_order": ("string", False),
    "scale": ("number", False),
    "unit": ("string", False),
    "writable": ("boolean", False),
    "description": ("string", False),
    "unit_id": ("integer", False),
    "default": ("number", False),
}


def _check_fields(raw: Mapping[str, Any], schema: Mapping[str, tuple[str, bool]]) -> dict[str, Any]:
    """Missing, unknown and wrongly typed fields, as ValueError naming the field."""
    for key in raw:
        if key not in schema:
            import difflib  # noqa: PLC0415 - only for a mistake, off the agent's start-up

            close = difflib.get_close_matches(key, schema, n=1)
            hint = f'did you mean "{close[0]}"?' if close else f"known: {', '.join(schema)}"
            raise ValueError(f'unknown field "{key}" ({hint})')
    out: dict[str, Any] = {}
    for key, (kind, required) in schema.items():
        if key not in raw:
            if required:
                raise ValueError(f'missing required field "{key}"')
            continue
        value = raw[key]
        if not _KINDS[kind](value):
            got = _TOML_TYPES.get(type(value), type(value).__name__)
            raise ValueError(f"{key}: expected {kind}, got {got} {value!r}")
        if kind == "number" or (kind == "point name or number" and not isinstance(value, str)):
            value = float(value)
        elif kind == "table of point names to numbers":
            value = tuple((str(k), float(v)) for k, v in value.items())
        out[key] = value
    return out


def _battery(raw: Mapping[str, Any], label: str) -> BatterySpec:
    """``[battery]`` and its ``[battery.control]``; errors name the table."""
    where = f"{label}: battery"
    try:
        fields = _check_fields(raw, _BATTERY_FIELDS)
        control = fields.pop("control", None)
        if control is not None:
            where = f"{label}: battery.control"
            fields["control"] = BatteryControl(**_check_fields(control, _CONTROL_FIELDS))
            where = f"{label}: battery"
        return BatterySpec(**fields)
    except ValueError as err:
        raise RegisterMapError(f"{where}: {err}") from err


def _parse(text: str, label: str, source: str) -> RegisterMap:
    """The one validation path: every error becomes RegisterMapError naming label and field."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise RegisterMapError(f"{label}: invalid TOML: {err}") from err
    where = label
    try:
        fields = _check_fields(doc, _MAP_FIELDS)
        points = []
        for i, raw in enumerate(fields.pop("points")):
            name = raw.get("name")
            where = f"{label}: points[{i}]" + (f' ("{name}")' if isinstance(name, str) else "")
            points.append(RegisterPoint(**_check_fields(raw, _POINT_FIELDS)))
        where = label
        fields.setdefault("description", "")
        battery = fields.pop("battery", None)
        if battery is not None:
            fields["battery"] = _battery(battery, label)
        return RegisterMap(**fields, points=tuple(points), source=source)
    except ValueError as err:
        raise RegisterMapError(f"{where}: {err}") from err


def load_register_map(path: str | Path) -> RegisterMap:
    """Load and validate a register-map TOML file; RegisterMapError names the file and field."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RegisterMapError(f"{path}: cannot read register map: {err}") from err
    return _parse(text, str(path), str(path))


def builtin_map_names() -> list[str]:
    """Names of the maps shipped in ``drivers/maps`` (file names without ``.toml``)."""
    files = resources.files("drivers.maps").iterdir()
    return sorted(f.name.removesuffix(".toml") for f in files if f.name.endswith(".toml"))


@functools.cache
def load_builtin_map(name: str) -> RegisterMap:
    """Load ``drivers/maps/<name>.toml``; its source is ``"builtin:<name>"``."""
    names = builtin_map_names()
    if name not in names:
        raise RegisterMapError(f'no built-in register map "{name}" (have: {", ".join(names)})')
    text = resources.files("drivers.maps").joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return _parse(text, f"drivers/maps/{name}.toml", f"builtin:{name}")
