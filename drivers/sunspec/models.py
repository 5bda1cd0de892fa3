"""SunSpec model layouts and the one codec that decodes and encodes them.

Point layouts come from the SunSpec Alliance's model definitions (the JSON files that
``pysunspec2`` ships), never from offsets typed by hand. Offsets here count from the model's
``ID`` register (``ID`` at 0, ``L`` at 1, the first point at 2).

Decoding applies scale factors (value x 10**sf) and reads the "not implemented" sentinels as
missing (``None``), never as zero: 0x8000 for int16 and sunssf, 0xFFFF for uint16, enum16 and
bitfield16, 0x80000000 for int32, 0xFFFFFFFF for uint32, enum32 and bitfield32, 0 for the
accumulators, NaN for float32, all-zero strings.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

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
    """One point of a model: where it is, how it is encoded, and what scales it."""

    name: str
    offset: int
    size: int
    type: str
    sf: str | int | None = None
    units: str = ""
    writable: bool = False
    mandatory: bool = False
    symbols: tuple[tuple[str, int], ...] = ()

    def symbol(self, value: int) -> str | None:
        """The symbol name of an enum value, if the model defines one."""
        return next((name for name, v in self.symbols if v == value), None)


@dataclass(frozen=True, slots=True)
class ModelDef:
    """A SunSpec model's fixed block. ``length`` excludes the ID and L registers."""

    id: int
    name: str
    label: str
    length: int
    points: tuple[PointDef, ...]

    def point(self, name: str) -> PointDef:
        """The point called ``name``; ``KeyError`` names the model when it has none."""
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(f"SunSpec model {self.id} ({self.name}) has no point {name!r}")

    def span(self, names: Sequence[str]) -> tuple[int, int]:
        """(first offset, register count) covering ``names`` and the scale factors they use."""
        wanted = [self.point(n) for n in names]
        wanted += [self.point(p.sf) for p in wanted if isinstance(p.sf, str)]
        first = min(p.offset for p in wanted)
        last = max(p.offset + p.size for p in wanted)
        return first, last - first


@cache
def model_def(model_id: int) -> ModelDef:
    """The layout of SunSpec model ``model_id``, read from the SunSpec model definitions.

    Only the fixed block is described; repeating groups are not decoded.
    """
    try:
        text = (
            resources.files("sunspec2") / "models" / "json" / f"model_{model_id}.json"
        ).read_text()
    except FileNotFoundError as err:
        raise SunSpecError(f"no SunSpec definition for model {model_id}") from err
    group = json.loads(text)["group"]
    points: list[PointDef] = []
    offset = 0
    for p in group["points"]:
        size = int(p["size"])
        sf = p.get("sf")
        points.append(
            PointDef(
                name=p["name"],
                offset=offset,
                size=size,
                type=p["type"],
                sf=int(sf)
                if isinstance(sf, int) or (isinstance(sf, str) and sf.lstrip("-").isdigit())
                else sf,
                units=p.get("units", "").strip(),
                writable=p.get("access") == "RW",
                mandatory=p.get("mandatory") == "M",
                symbols=tuple((s["name"], int(s["value"])) for s in p.get("symbols", ())),
            )
        )
        offset += size
    return ModelDef(
        id=model_id,
        name=group["name"],
        label=group.get("label", group["name"]),
        length=offset - 2,
        points=tuple(points),
    )


_ONE_REGISTER = {"int16", "uint16", "count", "acc16", "enum16", "bitfield16", "sunssf", "pad"}
_TWO_REGISTERS = {"int32", "uint32", "acc32", "enum32", "bitfield32", "ipaddr"}
_SIGNED = {"int16", "sunssf", "int32"}


def _raw(point: PointDef, words: Sequence[int]) -> int | float | str | None:
    """The unscaled value of one point from its registers, ``None`` if not implemented."""
    kind, at = point.type, point.offset
    if len(words) < at + point.size:
        raise SunSpecError(
            f"point {point.name}: needs registers up to offset {at + point.size}, got {len(words)}"
        )
    if kind in _ONE_REGISTER or kind in _TWO_REGISTERS:  # the hot path: no struct, no bytes
        if kind in _ONE_REGISTER:
            raw, bits = words[at], 16
        else:
            raw, bits = (words[at] << 16) | words[at + 1], 32
        if raw == _NOT_IMPLEMENTED.get(kind):
            return None
        if kind in _SIGNED and raw >> (bits - 1):
            return raw - (1 << bits)
        return raw
    chunk = list(words[at : at + point.size])
    if point.type == "string":
        data = b"".join(w.to_bytes(2, "big") for w in chunk)
        text = data.split(b"\x00", 1)[0].decode("utf-8", "replace").strip()
        return text or None
    fmt = _STRUCT.get(point.type)
    if fmt is None:
        return None  # ipv6addr, eui48: not decoded
    data = b"".join(w.to_bytes(2, "big") for w in chunk)
    value: int | float = struct.unpack(fmt, data)[0]
    if isinstance(value, float):
        return None if math.isnan(value) else value
    unsigned = int.from_bytes(data, "big")
    if _NOT_IMPLEMENTED.get(point.type) == unsigned:
        return None
    return value


def decode_model(
    model: ModelDef, words: Sequence[int], names: Sequence[str] | None = None
) -> dict[str, Value]:
    """Decode a model's registers into values with scale factors applied.

    ``words`` holds the model's registers from its ID register on (at least up to the last
    point decoded). Missing values (sentinels, or a missing scale factor) are ``None``.
    Scale factor points themselves are not returned; pads are skipped.
    """
    out: dict[str, Value] = {}
    for p, sf_point in _plan(model.id, None if names is None else tuple(names)):
        raw = _raw(p, words)
        if raw is None or p.sf is None or isinstance(raw, str):
            out[p.name] = raw
            continue
        sf = sf_point if isinstance(sf_point, int) else _raw(sf_point, words)
        if sf is None:
            out[p.name] = None
        elif sf == 0:
            out[p.name] = raw
        else:
            out[p.name] = raw * 10.0 ** int(sf)
    return out


@cache
def _plan(
    model_id: int, names: tuple[str, ...] | None
) -> tuple[tuple[PointDef, PointDef | int], ...]:
    """The points to decode with their scale factor (a point or a fixed exponent), cached."""
    model = model_def(model_id)
    points = model.points[2:] if names is None else tuple(model.point(n) for n in names)
    return tuple(
        (p, model.point(p.sf) if isinstance(p.sf, str) else (p.sf or 0))
        for p in points
        if p.type not in ("sunssf", "pad")
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
