"""SunSpec discovery: find the 'SunS' marker and walk the model chain to its end marker."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from drivers.coalesce import Image, ReadBlock, Span, SpanReader
from drivers.errors import DeviceUnavailable, GatewayUnavailable, ModbusException, SunSpecError
from drivers.sunspec.models import (
    BASE_ADDRESSES,
    END_MODEL_ID,
    SUNS_MARKER,
    ModelDef,
    ModelLayout,
    PlacedPoint,
    Value,
    decode_points,
    encode_point,
    model_def,
    model_layout,
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

    def find_all(self, model_id: int) -> list[ModelInstance]:
        """Every instance of ``model_id`` in chain order (a device may carry two meters)."""
        return [m for m in self.models if m.id == model_id]

    @property
    def model_ids(self) -> list[int]:
        """Ids of the models in chain order."""
        return [m.id for m in self.models]


async def discover(transport: ModbusTransport, unit: int) -> SunSpecMap:
    """Find a device's SunSpec map: 'SunS' at 40000, else at 0, else at 50000.

    Every base address is tried even when one times out or is refused (some devices stay
    silent at 40000 and answer at 50000). Raises ``SunSpecError`` when no base address holds
    the marker or the chain is malformed, and ``DeviceUnavailable`` when the device did not
    answer at any base (or a gateway could not reach it).
    """
    tried: list[str] = []
    unavailable: list[DeviceUnavailable] = []
    for base in BASE_ADDRESSES:
        try:
            marker = await transport.read_registers(unit, base, 2)
        except ModbusException as err:
            tried.append(f"{base}: exception {err.code}")
            continue
        except GatewayUnavailable:
            raise
        except DeviceUnavailable as err:
            tried.append(f"{base}: no answer")
            unavailable.append(err)
            continue
        if tuple(marker) == SUNS_MARKER:
            return SunSpecMap(base, await _walk(transport, unit, base + 2))
        tried.append(f"{base}: no marker")
    if len(unavailable) == len(BASE_ADDRESSES):
        raise unavailable[-1]
    raise SunSpecError(f"unit {unit} has no SunSpec map ({'; '.join(tried)})")


async def _walk(transport: ModbusTransport, unit: int, address: int) -> tuple[ModelInstance, ...]:
    """The model chain from ``address``: every header, whatever its length (as pysunspec2)."""
    models: list[ModelInstance] = []
    for _ in range(MAX_MODELS):
        if address > 0xFFFF - 1:
            raise SunSpecError(f"model chain runs past the end of the address space at {address}")
        model_id, length = await transport.read_registers(unit, address, 2)
        if model_id == END_MODEL_ID or (model_id == 0 and length == 0):
            return tuple(models)
        models.append(ModelInstance(model_id, address, length))
        address += 2 + length
    raise SunSpecError(f"no end marker after {MAX_MODELS} models")


def model_spans(
    inst: ModelInstance, index: int, layout: ModelLayout | None, names: Sequence[str] | None
) -> list[Span]:
    """One span per point to read (with the scale factors they use), or per raw register.

    ``index`` is the model's place in the chain; the group instance number (0 for the fixed
    block) is the second level of each span's path, so a refused read splits per model, then
    per group, then per point. Without a layout (an unknown model) every register of the
    model is one span.
    """
    if layout is None:
        return [Span("holding", inst.address + i, 1, (index, 0)) for i in range(2, inst.length + 2)]
    chosen = (
        list(layout.points[2:])
        if names is None
        else [layout.get(n) for n in names if n not in layout.beyond]
    )
    wanted: dict[str, PlacedPoint] = {}
    for p in chosen:
        wanted[p.name] = p
        if isinstance(p.sf, PlacedPoint):
            wanted.setdefault(p.sf.name, p.sf)
    spans = []
    groups: dict[str, int] = {"": 0}
    for p in wanted.values():
        prefix = p.name.rsplit(".", 1)[0] if "." in p.name else ""
        key = groups.setdefault(prefix, len(groups))
        spans.append(Span("holding", inst.address + p.point.offset, p.point.size, (index, key)))
    return spans


@dataclass(frozen=True, slots=True)
class _Wanted:
    inst: ModelInstance
    layout: ModelLayout | None
    points: tuple[PlacedPoint, ...]
    beyond: tuple[str, ...]  # wanted points beyond the model's announced length
    first: int = 0  # offset of the first register the points (and their SFs) use
    end: int = 0  # one past the last


def _extent(points: Sequence[PlacedPoint]) -> tuple[int, int]:
    """(first, end) offsets of the registers ``points`` and their scale factors occupy."""
    used = [p.point for p in points] + [p.sf.point for p in points if isinstance(p.sf, PlacedPoint)]
    if not used:
        return 0, 0
    return min(p.offset for p in used), max(p.offset + p.size for p in used)


class SunSpecReader:
    """Polls chosen points of chosen models with the fewest requests, and writes points.

    ``wanted`` maps a model id (its first instance) or a :class:`ModelInstance` to the names
    of the points to read (None: every point; for a model without a definition, its raw
    registers). Reads survive refusals (see :class:`~drivers.coalesce.SpanReader`): after a
    poll, :attr:`missing` says which points could not be read and why.
    """

    def __init__(
        self,
        transport: ModbusTransport,
        unit: int,
        sunspec_map: SunSpecMap,
        wanted: Mapping[int, Sequence[str]] | Mapping[ModelInstance, Sequence[str] | None],
        layouts: Mapping[ModelInstance, ModelLayout] | None = None,
    ) -> None:
        self.transport = transport
        self.unit = unit
        self.map = sunspec_map
        self._wanted: list[_Wanted] = []
        self.last_image = Image()
        self.missing: dict[ModelInstance, dict[str, str]] = {}
        spans: list[Span] = []
        for key, names in wanted.items():
            inst = key if isinstance(key, ModelInstance) else sunspec_map.find(key)
            if inst is None:
                continue
            index = sunspec_map.models.index(inst)
            definition = inst.definition
            layout = (layouts or {}).get(inst)
            if layout is None and definition is not None:
                layout = model_layout(definition, inst.length)
            spans += model_spans(inst, index, layout, names)
            if layout is None:
                points: tuple[PlacedPoint, ...] = ()
            elif names is None:
                points = layout.data_points
            else:  # points beyond a short model's announced length are reported missing
                points = tuple(layout.get(n) for n in names if n not in layout.beyond)
            beyond = () if layout is None else layout.beyond
            if names is not None:
                beyond = tuple(n for n in names if n in beyond)
            self._wanted.append(_Wanted(inst, layout, points, beyond, *_extent(points)))
        readable = {
            "holding": [
                (sunspec_map.base_address, sunspec_map.end_address - sunspec_map.base_address)
            ]
        }
        self.reads = SpanReader(spans, readable=readable)

    @property
    def blocks(self) -> list[ReadBlock]:
        """The read requests one poll makes now."""
        return self.reads.blocks

    async def poll(self) -> dict[int, dict[str, Value]]:
        """One poll: model id -> decoded values of the wanted points (first instance)."""
        self.last_image = await self.reads.read(self.transport, self.unit)
        return self.decode(self.last_image)

    async def poll_instances(self) -> dict[ModelInstance, dict[str, Value]]:
        """One poll: every wanted model instance -> its decoded values."""
        self.last_image = await self.reads.read(self.transport, self.unit)
        return self.decode_instances(self.last_image)

    def decode(self, image: Image) -> dict[int, dict[str, Value]]:
        """Decode the wanted points from a register image (model id -> values)."""
        out: dict[int, dict[str, Value]] = {}
        for inst, values in self.decode_instances(image).items():
            out.setdefault(inst.id, values)
        return out

    def decode_instances(self, image: Image) -> dict[ModelInstance, dict[str, Value]]:
        """Decode the wanted points from a register image (model instance -> values)."""
        out: dict[ModelInstance, dict[str, Value]] = {}
        self.missing = {}
        for w in self._wanted:
            words = image.region("holding", w.inst.address + w.first, w.end - w.first)
            if w.first:
                words = [*([None] * w.first), *words]
            values, missing = decode_points(w.points, words)
            for name in w.beyond:
                values[name] = None
                missing[name] = f"beyond the model's announced length L={w.inst.length}"
            out[w.inst] = values
            if missing:
                self.missing[w.inst] = missing
        return out

    @property
    def missing_points(self) -> dict[str, str]:
        """Points the last poll could not read: 'model.point' -> why."""
        return {
            f"{inst.id}.{name}": why
            for inst, reasons in self.missing.items()
            for name, why in reasons.items()
        }

    def raw_words(self, inst: ModelInstance) -> list[int | None]:
        """The registers of a model after ID and L from the last poll (None: not read)."""
        return self.last_image.region("holding", inst.address + 2, inst.length)

    def scale_factor(self, model_id: int, sf_name: str) -> int:
        """A scale factor's value from the last poll (the SF of a point polled before)."""
        inst = self.map.find(model_id)
        if inst is None:
            raise SunSpecError(f"device has no model {model_id}")
        point = model_def(model_id).point(sf_name)
        try:
            raw = self.last_image["holding", inst.address + point.offset]
        except KeyError as err:
            raise SunSpecError(f"model {model_id} scale factor {sf_name} was not read") from err
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
