"""``wattmesh scan``: discover one device and read every point it has."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from drivers.devices import MapReader
from drivers.regmap import RegisterMap
from drivers.sunspec.discovery import ModelInstance, SunSpecReader, discover
from drivers.sunspec.models import ModelLayout, Value, model_layout
from drivers.transport import ModbusTransport


@dataclass(frozen=True, slots=True)
class ScannedModel:
    """One SunSpec model found on the device (``block`` is its key in the values)."""

    id: int
    name: str
    address: int
    length: int
    block: str = ""
    problems: tuple[str, ...] = ()


@dataclass(slots=True)
class ScanResult:
    """What a scan found: models (SunSpec) and values per block, with units.

    ``missing`` says, per block, why points have no value (refused by the device, beyond the
    model's length); ``raw`` holds the registers of models without a definition (vendor
    models), None where the device refused them.
    """

    url: str
    unit: int
    description: str
    models: list[ScannedModel] = field(default_factory=list)
    values: dict[str, dict[str, tuple[Value, str]]] = field(default_factory=dict)
    missing: dict[str, dict[str, str]] = field(default_factory=dict)
    raw: dict[str, list[int | None]] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {
            "url": self.url,
            "unit": self.unit,
            "description": self.description,
            "models": [
                {
                    "id": m.id,
                    "name": m.name,
                    "address": m.address,
                    "length": m.length,
                    "block": m.block,
                    "problems": list(m.problems),
                }
                for m in self.models
            ],
            "values": {
                block: {name: {"value": v, "units": u} for name, (v, u) in vals.items()}
                for block, vals in self.values.items()
            },
            "missing": self.missing,
            "raw": self.raw,
        }


def _block_name(inst: ModelInstance, name: str, seen: dict[int, int]) -> str:
    """'203 ac_meter' for a model's first instance, '203 ac_meter #2' for the second."""
    seen[inst.id] = seen.get(inst.id, 0) + 1
    return f"{inst.id} {name}" + (f" #{seen[inst.id]}" if seen[inst.id] > 1 else "")


async def scan_device(
    transport: ModbusTransport, unit: int, regmap: RegisterMap | None = None
) -> ScanResult:
    """Read a register-mapped device when ``regmap`` is given, else discover SunSpec.

    A map's points are read from ``unit``, or from their own unit where the map says so.

    A SunSpec scan reads every model twice: first the fixed blocks (they hold the counts of
    the repeating groups), then every point of every instance, including repeating groups;
    models without a definition are read as raw registers. Registers the device refuses
    are reported in :attr:`ScanResult.missing` instead of failing the scan.
    """
    url = str(transport.endpoint)
    if regmap is not None:
        map_reader = MapReader(regmap)
        decoded = await map_reader.read(transport, unit)
        result = ScanResult(url, unit, f"{regmap.manufacturer} {regmap.model} ({regmap.source})")
        if map_reader.missing:
            result.missing[regmap.name] = dict(map_reader.missing)
        result.values[regmap.name] = {
            p.name: (None if math.isnan(decoded[p.name]) else decoded[p.name], p.unit)
            for p in regmap.points
        }
        return result
    smap = await discover(transport, unit)
    result = ScanResult(url, unit, f"SunSpec map at {smap.base_address}")
    fixed: dict[ModelInstance, Sequence[str] | None] = {}
    for inst in smap.models:
        definition = inst.definition
        if definition is not None and definition.groups:
            fixed[inst] = [
                p.name
                for p in model_layout(definition, inst.length).points[2:]
                if "." not in p.name
            ]
    layouts: dict[ModelInstance, ModelLayout] = {}
    if fixed:
        first = SunSpecReader(transport, unit, smap, fixed)
        await first.poll_instances()
        for inst in fixed:
            words = first.last_image.region("holding", inst.address, inst.length + 2)
            if (definition := inst.definition) is not None:
                layouts[inst] = model_layout(definition, inst.length, words)
    reader = SunSpecReader(transport, unit, smap, dict.fromkeys(smap.models, None), layouts=layouts)
    values = await reader.poll_instances()
    seen: dict[int, int] = {}
    for inst in smap.models:
        definition = inst.definition
        name = definition.name if definition else "vendor" if inst.id >= 64000 else "unknown"
        block = _block_name(inst, name, seen)
        layout = layouts.get(inst) or (
            model_layout(definition, inst.length) if definition is not None else None
        )
        result.models.append(
            ScannedModel(
                inst.id,
                name,
                inst.address,
                inst.length,
                block,
                layout.problems if layout is not None else (),
            )
        )
        if definition is None or layout is None:
            raw = reader.raw_words(inst)
            result.raw[block] = raw
            result.values[block] = {
                "registers": (" ".join("----" if w is None else f"{w:04x}" for w in raw), "")
            }
            if any(w is None for w in raw):
                result.missing[block] = {
                    "registers": f"{sum(w is None for w in raw)} register(s) refused by the device"
                }
            continue
        units = {p.name: p.point.units for p in layout.points}
        result.values[block] = {
            point: (value, units.get(point, "")) for point, value in values[inst].items()
        }
        if inst in reader.missing:
            result.missing[block] = reader.missing[inst]
    if common := values.get(smap.models[0]) if smap.models and smap.models[0].id == 1 else None:
        result.description = (
            f"{common.get('Mn') or '?'} {common.get('Md') or '?'} serial "
            f"{common.get('SN') or '?'}, SunSpec map at {smap.base_address}"
        )
    return result
