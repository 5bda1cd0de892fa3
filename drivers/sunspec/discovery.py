"""SunSpec discovery: find the 'SunS' marker and walk the model chain to its end marker."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from drivers.coalesce import Image, plan_reads, read_blocks
from drivers.errors import ModbusException, SunSpecError
from drivers.sunspec.models import (
    BASE_ADDRESSES,
    END_MODEL_ID,
    SUNS_MARKER,
    ModelDef,
    Value,
    decode_model,
    encode_point,
    model_def,
)
from drivers.transport import ModbusTransport

#: A chain longer than this is taken to be garbage rather than walked for ever.
MAX_MODELS = 64


@dataclass(frozen=True, slots=True)
class ModelInstance:
    """One model in a device's chain; ``address`` is that of its ID register."""

    id: int
    address: int
    length: int

    @property
    def definition(self) -> ModelDef | None:
        """The model's layout, or None for a model we have no definition of."""
        try:
            return model_def(self.id)
        except SunSpecError:
            return None


@dataclass(frozen=True, slots=True)
class SunSpecMap:
    """What discovery found: where the map starts and the models in order."""

    base_address: int
    models: tuple[ModelInstance, ...]

    @property
    def end_address(self) -> int:
        """One past the end marker."""
        last = self.models[-1] if self.models else None
        return (last.address + 2 + last.length if last else self.base_address + 2) + 2

    def find(self, *model_ids: int) -> ModelInstance | None:
        """The first model in the chain whose id is one of ``model_ids``."""
        return next((m for m in self.models if m.id in model_ids), None)

    @property
    def model_ids(self) -> list[int]:
        """Ids of the models in chain order."""
        return [m.id for m in self.models]


async def discover(transport: ModbusTransport, unit: int) -> SunSpecMap:
    """Find a device's SunSpec map: 'SunS' at 40000, else at 0, else at 50000.

    Raises ``SunSpecError`` when no base address holds the marker or the chain is malformed,
    and ``DeviceUnavailable`` when the device does not answer at all.
    """
    tried: list[str] = []
    for base in BASE_ADDRESSES:
        try:
            marker = await transport.read_registers(unit, base, 2)
        except ModbusException as err:
            tried.append(f"{base}: exception {err.code}")
            continue
        if tuple(marker) == SUNS_MARKER:
            return SunSpecMap(base, await _walk(transport, unit, base + 2))
        tried.append(f"{base}: no marker")
    raise SunSpecError(f"unit {unit} has no SunSpec map ({'; '.join(tried)})")


async def _walk(transport: ModbusTransport, unit: int, address: int) -> tuple[ModelInstance, ...]:
    models: list[ModelInstance] = []
    for _ in range(MAX_MODELS):
        if address > 0xFFFF - 1:
            raise SunSpecError(f"model chain runs past the end of the address space at {address}")
        model_id, length = await transport.read_registers(unit, address, 2)
        if model_id == END_MODEL_ID:
            return tuple(models)
        known = ModelInstance(model_id, address, length).definition
        if known is not None and length < known.length:
            raise SunSpecError(
                f"model {model_id} at {address} claims length {length}, "
                f"shorter than its fixed block ({known.length})"
            )
        models.append(ModelInstance(model_id, address, length))
        address += 2 + length
    raise SunSpecError(f"no end marker after {MAX_MODELS} models")


class SunSpecReader:
    """Polls chosen points of chosen models with the fewest requests, and writes points."""

    def __init__(
        self,
        transport: ModbusTransport,
        unit: int,
        sunspec_map: SunSpecMap,
        wanted: Mapping[int, Sequence[str]],
    ) -> None:
        self.transport = transport
        self.unit = unit
        self.map = sunspec_map
        self._wanted: list[tuple[ModelInstance, ModelDef, tuple[str, ...], int, int]] = []
        self.last_image = Image()
        spans: list[tuple[str, int, int]] = []
        for model_id, names in wanted.items():
            inst = sunspec_map.find(model_id)
            if inst is None:
                continue
            definition = model_def(model_id)
            first, count = definition.span(names)
            spans.append(("holding", inst.address + first, count))
            self._wanted.append((inst, definition, tuple(names), first, count))
        readable = {
            "holding": [
                (sunspec_map.base_address, sunspec_map.end_address - sunspec_map.base_address)
            ]
        }
        self.blocks = plan_reads(spans, readable=readable)

    async def poll(self) -> dict[int, dict[str, Value]]:
        """One poll: model id -> decoded values of the wanted points."""
        self.last_image = await read_blocks(self.transport, self.unit, self.blocks)
        return self.decode(self.last_image)

    def decode(self, image: Image) -> dict[int, dict[str, Value]]:
        """Decode the wanted points from a register image."""
        out: dict[int, dict[str, Value]] = {}
        for inst, definition, names, first, count in self._wanted:
            words = [0] * first + image.words("holding", inst.address + first, count)
            out[inst.id] = decode_model(definition, words, names)
        return out

    def scale_factor(self, model_id: int, sf_name: str) -> int:
        """A scale factor's value from the last poll (the SF of a point polled before)."""
        inst = self.map.find(model_id)
        if inst is None:
            raise SunSpecError(f"device has no model {model_id}")
        point = model_def(model_id).point(sf_name)
        raw = self.last_image["holding", inst.address + point.offset]
        if raw == 0x8000:
            raise SunSpecError(f"model {model_id} scale factor {sf_name} is not implemented")
        return raw - 0x10000 if raw & 0x8000 else raw

    async def write_points(self, model_id: int, values: Mapping[str, Value]) -> None:
        """Write adjacent points of one model in one request (function 6 or 16).

        The points must be contiguous and writable; values are in engineering units and are
        encoded with the scale factors of the last poll.
        """
        inst = self.map.find(model_id)
        if inst is None:
            raise SunSpecError(f"device has no model {model_id}")
        definition = model_def(model_id)
        points = sorted((definition.point(n) for n in values), key=lambda p: p.offset)
        words: list[int] = []
        for p in points:
            if not p.writable:
                raise SunSpecError(f"model {model_id} point {p.name} is read-only")
            if p.offset != points[0].offset + len(words):
                raise SunSpecError(f"model {model_id}: points to write are not contiguous")
            sf = p.sf if isinstance(p.sf, int) else self.scale_factor(model_id, p.sf) if p.sf else 0
            words += encode_point(p, values[p.name], sf)
        await self.transport.write_registers(self.unit, inst.address + points[0].offset, words)
