"""SunSpec model layouts and the one codec that decodes and encodes them.

Point layouts come from the SunSpec Alliance's model definitions (the JSON files that
``pysunspec2`` ships), never from offsets typed by hand. Offsets here count from the model's
``ID`` register (``ID`` at 0, ``L`` at 1, the first point at 2).

Decoding follows pysunspec2 (the SunSpec Alliance's client): scale factors are applied
(value x 10**sf, rounded to the factor's step); a scale factor that is not implemented leaves
the raw value. The "not implemented" sentinels read as missing (``None``), never as zero:
0x8000 for int16 and sunssf, 0xFFFF for uint16, enum16 and bitfield16, 0x80000000 for int32,
0xFFFFFFFF for uint32, enum32 and bitfield32, 0 for the accumulators and ipaddr, NaN for
floats, strings starting with NUL, all-zero eui48 and ipv6addr.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from typing import Any

from drivers.errors import SunSpecError

#: The two registers 'SunS' that mark a SunSpec register map.
SUNS_MARKER = (0x5375, 0x6E53)
#: Model id of the end marker.
END_MODEL_ID = 0xFFFF
#: Where a SunSpec map may begin, in the order a client tries them (0-based wire addresses).
BASE_ADDRESSES = (40000, 0, 50000)

Value = float | int | str | None

_SIZES = {
    "int16": 1,
    "uint16": 1,
    "count": 1,
    "acc16": 1,
    "enum16": 1,
    "bitfield16": 1,
    "sunssf": 1,
    "pad": 1,
    "int32": 2,
    "uint32": 2,
    "acc32": 2,
    "enum32": 2,
    "bitfield32": 2,
    "float32": 2,
    "ipaddr": 2,
    "int64": 4,
    "uint64": 4,
    "acc64": 4,
    "float64": 4,
    "ipv6addr": 8,
    "eui48": 4,
}
_STRUCT = {
    "int16": ">h",
    "uint16": ">H",
    "count": ">H",
    "acc16": ">H",
    "enum16": ">H",
    "bitfield16": ">H",
    "sunssf": ">h",
    "pad": ">H",
    "int32": ">i",
    "uint32": ">I",
    "acc32": ">I",
    "enum32": ">I",
    "bitfield32": ">I",
    "ipaddr": ">I",
    "float32": ">f",
    "int64": ">q",
    "uint64": ">Q",
    "acc64": ">Q",
    "float64": ">d",
}
_NOT_IMPLEMENTED: dict[str, int] = {
    "int16": 0x8000,
    "sunssf": 0x8000,
    "uint16": 0xFFFF,
    "count": 0xFFFF,
    "enum16": 0xFFFF,
    "bitfield16": 0xFFFF,
    "acc16": 0,
    "int32": 0x80000000,
    "uint32": 0xFFFFFFFF,
    "enum32": 0xFFFFFFFF,
    "bitfield32": 0xFFFFFFFF,
    "acc32": 0,
    "int64": 0x8000000000000000,
    "uint64": 0xFFFFFFFFFFFFFFFF,
    "acc64": 0,
    "ipaddr": 0,
}


@dataclass(frozen=True, slots=True)
class PointDef:
    """One point of a model: where it is, how it is encoded, and what scales it.

    ``offset`` counts from the model's ``ID`` register for points of the fixed block and of
    placed group instances, and from the group's start inside a :class:`GroupDef`.
    """

    name: str
    offset: int
    size: int
    type: str
    sf: str | int | None = None
    units: str = ""
    writable: bool = False
    mandatory: bool = False
    symbols: tuple[tuple[str, int], ...] = ()
    value: int | None = None

    def symbol(self, value: int) -> str | None:
        """The symbol name of an enum value, if the model defines one."""
        return next((name for name, v in self.symbols if v == value), None)


@dataclass(frozen=True, slots=True)
class GroupDef:
    """A group of points inside a model, possibly repeated.

    ``count`` is None for a group that occurs once, an integer for a fixed number of
    repetitions (0: as many as fit the model's announced length), or the name of a point of
    the model's fixed block that holds the number of repetitions.
    """

    name: str
    count: str | int | None
    points: tuple[PointDef, ...]
    groups: tuple[GroupDef, ...] = ()

    @property
    def points_length(self) -> int:
        """Registers of the group's own points (nested groups excluded)."""
        return sum(p.size for p in self.points)


@dataclass(frozen=True, slots=True)
class ModelDef:
    """A SunSpec model: its fixed block and its groups. ``length`` excludes the ID and L registers
    and counts the fixed block only."""

    id: int
    name: str
    label: str
    length: int
    points: tuple[PointDef, ...]
    groups: tuple[GroupDef, ...] = ()

    def point(self, name: str) -> PointDef:
        """The point called ``name``; ``KeyError`` names the model when it has none."""
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(f"SunSpec model {self.id} ({self.name}) has no point {name!r}")

    def span(self, names: Sequence[str]) -> tuple[int, int]:
        """(first offset, register count) covering ``names`` and the scale factors they use.

        No names: the empty span (2, 0) just after ID and L.
        """
        wanted = [self.point(n) for n in names]
        wanted += [self.point(p.sf) for p in wanted if isinstance(p.sf, str)]
        if not wanted:
            return 2, 0
        first = min(p.offset for p in wanted)
        last = max(p.offset + p.size for p in wanted)
        return first, last - first


def _point_def(p: Mapping[str, Any], offset: int) -> PointDef:
    sf = p.get("sf")
    value = p.get("value")
    return PointDef(
        name=p["name"],
        offset=offset,
        size=int(p["size"]),
        type=p["type"],
        sf=int(sf)
        if isinstance(sf, int) or (isinstance(sf, str) and sf.lstrip("-").isdigit())
        else sf,
        units=p.get("units", "").strip(),
        writable=p.get("access") == "RW",
        mandatory=p.get("mandatory") == "M",
        symbols=tuple((s["name"], int(s["value"])) for s in p.get("symbols", ())),
        value=value if isinstance(value, int) else None,
    )


def _group_def(group: Mapping[str, Any]) -> GroupDef:
    points: list[PointDef] = []
    offset = 0
    for p in group.get("points", ()):
        points.append(_point_def(p, offset))
        offset += int(p["size"])
    count = group.get("count")
    if isinstance(count, str) and count.isdigit():
        count = int(count)
    return GroupDef(
        name=group["name"],
        count=count,
        points=tuple(points),
        groups=tuple(_group_def(g) for g in group.get("groups", ())),
    )


@cache
def model_def(model_id: int) -> ModelDef:
    """The layout of SunSpec model ``model_id``, read from the SunSpec model definitions."""
    try:
        text = (
            resources.files("sunspec2") / "models" / "json" / f"model_{model_id}.json"
        ).read_text()
    except FileNotFoundError as err:
        raise SunSpecError(f"no SunSpec definition for model {model_id}") from err
    group = _group_def(json.loads(text)["group"])
    return ModelDef(
        id=model_id,
        name=group.name,
        label=json.loads(text)["group"].get("label", group.name),
        length=group.points_length - 2,
        points=group.points,
        groups=group.groups,
    )


@dataclass(frozen=True, slots=True)
class PlacedPoint:
    """A point at its place in one device's model: ``point.offset`` counts from the ID register.

    ``name`` is the point's path: ``W`` in the fixed block, ``module[2].DCA`` in the second
    instance of a repeating group (instances count from 1, as pysunspec2 does). ``sf`` is
    the scale factor: a fixed exponent, the placed sunssf point, or None.
    """

    name: str
    point: PointDef
    sf: PlacedPoint | int | None = None


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """Where every point of one model instance lies, given its announced length and counts.

    ``beyond`` names points the definition has but the announced length leaves out;
    ``problems`` says where the device's model disagrees with its definition.
    """

    model: ModelDef
    length: int
    points: tuple[PlacedPoint, ...]
    beyond: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    def get(self, name: str) -> PlacedPoint:
        """The placed point called ``name`` (a path for group points)."""
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(f"SunSpec model {self.model.id} has no point {name!r} on this device")

    @property
    def data_points(self) -> tuple[PlacedPoint, ...]:
        """Points that carry values: not ID, L, scale factors or pads."""
        return tuple(
            p
            for p in self.points
            if p.point.type not in ("sunssf", "pad") and p.name not in ("ID", "L")
        )


def _count_value(model: ModelDef, name: str, words: Sequence[int | None] | None) -> int | None:
    """The value of the fixed-block count point ``name`` in ``words``, None when unknown."""
    try:
        point = model.point(name)
    except KeyError:
        return None
    if words is None or len(words) < point.offset + point.size:
        return None
    raw = _raw(point, words)
    return raw if isinstance(raw, int) else None


def model_layout(
    model: ModelDef, length: int, words: Sequence[int | None] | None = None
) -> ModelLayout:
    """Place every point of ``model`` for a device that announces ``length`` (L) registers.

    Follows pysunspec2: a repeating group's count comes from the fixed-block point its
    definition names (read from ``words``, the model's registers from ID on), or is a
    constant; a count of 0 means as many instances as the announced length holds after the
    fixed block. Model 1 announced with L=65 has no Pad. Scale factors are found in the
    point's own group instance, then in the fixed block.
    """
    problems: list[str] = []
    placed: list[PlacedPoint] = []
    beyond: list[str] = []
    end = length + 2

    def place(
        points: Sequence[PointDef], base: int, prefix: str, scope: dict[str, PlacedPoint]
    ) -> int:
        local: dict[str, PlacedPoint] = {}
        pending: list[PointDef] = []
        for p in points:
            if model.id == 1 and length == 65 and p.name == "Pad":
                continue
            at = base + p.offset
            if at + p.size > end:
                beyond.append(prefix + p.name)
                continue
            local[p.name] = PlacedPoint(prefix + p.name, replace(p, offset=at))
            pending.append(p)
        for p in pending:
            sf: PlacedPoint | int | None = None
            if isinstance(p.sf, int):
                sf = p.sf
            elif isinstance(p.sf, str):
                sf = local.get(p.sf) or scope.get(p.sf)
                if sf is None:
                    problems.append(
                        f"scale factor {p.sf} of {prefix + p.name} is not on the device"
                    )
            placed.append(replace(local[p.name], sf=sf))
        return base + sum(p.size for p in points)

    offset = place(model.points, 0, "", {})
    top = {p.name: p for p in placed}

    def place_groups(groups: Sequence[GroupDef], base: int, prefix: str) -> int:
        for g in groups:
            if g.count is None:
                base = place_group(g, base, f"{prefix}{g.name}.")
                continue
            count = g.count if isinstance(g.count, int) else _count_value(model, g.count, words)
            if count is None:
                problems.append(f"count {g.count} of group {prefix}{g.name} is not implemented")
                count = 0
            if count == 0:
                size = _group_length(g, model, words)
                remaining = end - base
                count = remaining // size if size and remaining > 0 else 0
                if size and remaining > 0 and remaining % size:
                    problems.append(
                        f"group {prefix}{g.name}: {remaining} registers left is not a "
                        f"multiple of its length {size}"
                    )
            for i in range(1, count + 1):
                base = place_group(g, base, f"{prefix}{g.name}[{i}].")
        return base

    def place_group(g: GroupDef, base: int, prefix: str) -> int:
        after = place(g.points, base, prefix, top)
        return place_groups(g.groups, after, prefix)

    offset = place_groups(model.groups, offset, "")
    if offset != end and not (model.id == 1 and length == 65):
        problems.append(
            f"model {model.id}: announced length {length}, its definition gives {offset - 2}"
        )
    return ModelLayout(model, length, tuple(placed), tuple(beyond), tuple(problems))


def _group_length(g: GroupDef, model: ModelDef, words: Sequence[int | None] | None) -> int:
    """Registers one instance of ``g`` takes (nested groups with their counts)."""
    size = g.points_length
    for sub in g.groups:
        if sub.count is None:
            n = 1
        elif isinstance(sub.count, int):
            n = sub.count
        else:
            n = _count_value(model, sub.count, words) or 0
        size += n * _group_length(sub, model, words)
    return size


_ONE_REGISTER = {"int16", "uint16", "count", "acc16", "enum16", "bitfield16", "sunssf", "pad"}
_TWO_REGISTERS = {"int32", "uint32", "acc32", "enum32", "bitfield32", "ipaddr"}
_SIGNED = {"int16", "sunssf", "int32"}


def _raw(point: PointDef, words: Sequence[int | None]) -> int | float | str | None:
    """The unscaled value of one point from its registers, ``None`` if not implemented.

    Values as pysunspec2 gives them: eui48 as ``XX:XX:XX:XX:XX:XX`` (its last six bytes),
    ipv6addr as four groups of eight hex digits, ipaddr as an integer, strings cut at
    trailing NULs.
    """
    kind, at = point.type, point.offset
    if len(words) < at + point.size:
        raise SunSpecError(
            f"point {point.name}: needs registers up to offset {at + point.size}, got {len(words)}"
        )
    if kind in _ONE_REGISTER or kind in _TWO_REGISTERS:  # the hot path: no struct, no bytes
        if kind in _ONE_REGISTER:
            raw, bits = words[at], 16
        else:
            hi, lo = words[at], words[at + 1]
            raw = None if hi is None or lo is None else (hi << 16) | lo
            bits = 32
        if raw is None:
            raise _NotRead(point.name)
        if kind == "pad":
            return raw
        if raw == _NOT_IMPLEMENTED.get(kind):
            return None
        if kind in _SIGNED and raw >> (bits - 1):
            return raw - (1 << bits)
        return raw
    chunk = words[at : at + point.size]
    if any(w is None for w in chunk):
        raise _NotRead(point.name)
    data = b"".join(int(w).to_bytes(2, "big") for w in chunk)  # type: ignore[arg-type]
    if kind == "string":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not text or text[0] == "\x00":
            return None
        return text[0] + text[1:].rstrip("\x00")
    if kind == "eui48":
        if not any(data) or data[2:] == b"\xff" * 6:
            return None
        return ":".join(f"{b:02X}" for b in data[2:8])
    if kind == "ipv6addr":
        if not any(data):
            return None
        return ":".join(data[i : i + 4].hex().upper() for i in range(0, 16, 4))
    fmt = _STRUCT.get(kind)
    if fmt is None:
        return None
    value: int | float = struct.unpack(fmt, data)[0]
    if isinstance(value, float):
        return None if math.isnan(value) else value
    unsigned = int.from_bytes(data, "big")
    if _NOT_IMPLEMENTED.get(kind) == unsigned:
        return None
    return value


class _NotRead(Exception):
    """A register of the point was not read (the device refused it)."""


def _scaled(raw: int | float, sf: int | float | str | None) -> Value:
    """``raw`` x 10**sf rounded to the scale factor's step, as pysunspec2 computes it.

    A scale factor that is not implemented (0x8000) or 0 leaves the raw value.
    """
    if not isinstance(sf, int) or sf == 0:
        return raw
    return round(raw * math.pow(10, sf), -sf)


def decode_points(
    points: Sequence[PlacedPoint], words: Sequence[int | None]
) -> tuple[dict[str, Value], dict[str, str]]:
    """Decode placed points from a model's registers (ID first; None = a register not read).

    Returns (values, missing): values hold every point (None when not implemented or not
    read); ``missing`` says why for the points whose registers (or whose scale factor's)
    were not read.
    """
    out: dict[str, Value] = {}
    missing: dict[str, str] = {}
    for placed in points:
        try:
            raw = _raw(placed.point, words)
        except _NotRead:
            out[placed.name] = None
            missing[placed.name] = "not read: the device refused its registers"
            continue
        sf_point = placed.sf
        if raw is None or sf_point is None or isinstance(raw, str):
            out[placed.name] = raw
            continue
        if isinstance(sf_point, PlacedPoint):
            try:
                sf = _raw(sf_point.point, words)
            except _NotRead:
                out[placed.name] = None
                missing[placed.name] = (
                    f"not read: the device refused its scale factor {sf_point.name}"
                )
                continue
        else:
            sf = sf_point
        out[placed.name] = _scaled(raw, sf)
    return out, missing


def decode_model(
    model: ModelDef, words: Sequence[int], names: Sequence[str] | None = None
) -> dict[str, Value]:
    """Decode fixed-block points of a model's registers, scale factors applied.

    ``words`` holds the model's registers from its ID register on (at least up to the last
    point decoded). Not-implemented values are ``None``; a not-implemented scale factor
    leaves the raw value (as pysunspec2 does). Scale factor points themselves are not
    returned; pads are skipped.
    """
    return decode_points(_plan(model.id, None if names is None else tuple(names)), words)[0]


@cache
def _plan(model_id: int, names: tuple[str, ...] | None) -> tuple[PlacedPoint, ...]:
    """The fixed-block points to decode with their scale factors, cached."""
    model = model_def(model_id)
    points = model.points[2:] if names is None else tuple(model.point(n) for n in names)

    def sf_of(p: PointDef) -> PlacedPoint | int | None:
        if isinstance(p.sf, str):
            return PlacedPoint(p.sf, model.point(p.sf))
        return p.sf

    return tuple(
        PlacedPoint(p.name, p, sf_of(p)) for p in points if p.type not in ("sunssf", "pad")
    )


def encode_point(point: PointDef, value: Value, sf: int = 0) -> list[int]:
    """The registers of one point holding ``value`` (``None`` writes the sentinel).

    ``value`` is in engineering units; it is divided by 10**sf and rounded. A value that does
    not fit the point's type raises ``ValueError`` naming the point.
    """
    if point.type == "string":
        data = (str(value or "")).encode()[: point.size * 2].ljust(point.size * 2, b"\x00")
        return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if value is None:
        if point.type in ("float32", "float64"):
            data = struct.pack(_STRUCT[point.type], math.nan)
        else:
            sentinel = _NOT_IMPLEMENTED.get(point.type, 0)
            data = sentinel.to_bytes(point.size * 2, "big")
    else:
        fmt = _STRUCT[point.type]
        if point.type in ("float32", "float64"):
            data = struct.pack(fmt, float(value) / 10.0**sf)
        else:
            scaled = round(float(value) / 10.0**sf)
            try:
                data = struct.pack(fmt, scaled)
            except struct.error as err:
                raise ValueError(
                    f"point {point.name}: {value} (raw {scaled}, sf {sf}) does not fit {point.type}"
                ) from err
    return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]


def encode_model(
    model: ModelDef, values: Mapping[str, Value], scale_factors: Mapping[str, int] | None = None
) -> list[int]:
    """Registers of a whole model (ID and L first) holding ``values``; others not implemented.

    ``scale_factors`` gives the sunssf points' values; they are written too.
    """
    sfs = dict(scale_factors or {})
    words = [0] * (model.length + 2)
    for p in model.points:
        if p.name == "ID":
            chunk = [model.id]
        elif p.name == "L":
            chunk = [model.length]
        elif p.type == "sunssf":
            chunk = encode_point(p, sfs.get(p.name))
        elif p.type == "pad":
            chunk = [0x8000]
        else:
            sf = p.sf if isinstance(p.sf, int) else sfs.get(p.sf, 0) if p.sf else 0
            chunk = encode_point(p, values.get(p.name), sf)
        words[p.offset : p.offset + p.size] = chunk
    return words
