"""``wattmesh scan``: discover one device and read every point it has."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from drivers.coalesce import plan_reads, read_blocks
from drivers.regmap import RegisterMap, decode_map
from drivers.sunspec.discovery import SunSpecReader, discover
from drivers.sunspec.models import Value, model_def
from drivers.transport import ModbusTransport


@dataclass(frozen=True, slots=True)
class ScannedModel:
    """One SunSpec model found on the device."""

    id: int
    name: str
    address: int
    length: int


@dataclass(slots=True)
class ScanResult:
    """What a scan found: models (SunSpec) and values per block, with units."""

    url: str
    unit: int
    description: str
    models: list[ScannedModel] = field(default_factory=list)
    values: dict[str, dict[str, tuple[Value, str]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return {
            "url": self.url,
            "unit": self.unit,
            "description": self.description,
            "models": [
                {"id": m.id, "name": m.name, "address": m.address, "length": m.length}
                for m in self.models
            ],
            "values": {
                block: {name: {"value": v, "units": u} for name, (v, u) in vals.items()}
                for block, vals in self.values.items()
            },
        }


async def scan_device(
    transport: ModbusTransport, unit: int, regmap: RegisterMap | None = None
) -> ScanResult:
    """Read a register-mapped device when ``regmap`` is given, else discover SunSpec."""
    url = str(transport.endpoint)
    if regmap is not None:
        image = await read_blocks(transport, unit, plan_reads(regmap.spans()))
        decoded = decode_map(regmap, image)
        result = ScanResult(url, unit, f"{regmap.manufacturer} {regmap.model} ({regmap.source})")
        result.values[regmap.name] = {
            p.name: (None if math.isnan(decoded[p.name]) else decoded[p.name], p.unit)
            for p in regmap.points
        }
        return result
    smap = await discover(transport, unit)
    result = ScanResult(url, unit, f"SunSpec map at {smap.base_address}")
    wanted: dict[int, tuple[str, ...]] = {}
    for inst in smap.models:
        definition = inst.definition
        name = definition.name if definition else "unknown"
        result.models.append(ScannedModel(inst.id, name, inst.address, inst.length))
        if definition is not None:
            wanted[inst.id] = tuple(
                p.name for p in definition.points[2:] if p.type not in ("sunssf", "pad")
            )
    values = await SunSpecReader(transport, unit, smap, wanted).poll()
    for model_id, points in values.items():
        definition = model_def(model_id)
        result.values[f"{model_id} {definition.name}"] = {
            name: (value, definition.point(name).units) for name, value in points.items()
        }
    if common := values.get(1):
        result.description = (
            f"{common.get('Mn') or '?'} {common.get('Md') or '?'} serial "
            f"{common.get('SN') or '?'}, SunSpec map at {smap.base_address}"
        )
    return result
