"""Declarative register maps for Modbus devices that are not SunSpec.

A map is a TOML data file (one per device type, the built-in ones live in ``drivers/maps``)
listing named points; :func:`decode_point` and :func:`encode_point` are the only code that
turns register words into values and back. Addresses are 0-based wire addresses. Words are
16-bit and big-endian on the wire; ``word_order = "little"`` means the low word comes first.
Decoded values are ``raw * scale`` in the SI unit of the point.
"""

from __future__ import annotations

import difflib
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

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f'name "{self.name}" is not snake_case ([a-z][a-z0-9_]*)')
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


@dataclass(frozen=True, slots=True)
class RegisterMap:
    """A device type's points; ``source`` is the file path or ``"builtin:<name>"``."""

    name: str
    manufacturer: str
    model: str
    description: str
    points: tuple[RegisterPoint, ...]
    source: str

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f'name "{self.name}" is not snake_case ([a-z][a-z0-9_]*)')
        seen: dict[str, int] = {}
        for i, p in enumerate(self.points):
            if p.name in seen:
                first = seen[p.name]
                raise ValueError(f'points[{i}] ("{p.name}"): name duplicates points[{first}]')
            seen[p.name] = i
        ordered = sorted(enumerate(self.points), key=lambda ip: (ip[1].table, ip[1].address))
        for (i, a), (j, b) in itertools.pairwise(ordered):
            if a.table == b.table and b.address < a.address + a.count:
                raise ValueError(
                    f'points[{j}] ("{b.name}"): address {b.address} overlaps points[{i}] '
                    f'("{a.name}"), {a.table} registers {a.address}..{a.address + a.count - 1}'
                )

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
    return float(raw) * point.scale


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
    "points": ("non-empty array of tables", True),
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
}


def _check_fields(raw: Mapping[str, Any], schema: Mapping[str, tuple[str, bool]]) -> dict[str, Any]:
    """Missing, unknown and wrongly typed fields, as ValueError naming the field."""
    for key in raw:
        if key not in schema:
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
        out[key] = float(value) if kind == "number" else value
    return out


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
