"""A SunSpec register map held in memory: 'SunS', the models, the end marker.

Simulators keep their live values here; the Modbus server serves these words. Layouts and
encoding come from ``drivers.sunspec.models`` so the simulator and the driver cannot disagree
about where a point is, while decoding on the client side is independent of this class.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from drivers.sunspec.models import (
    END_MODEL_ID,
    SUNS_MARKER,
    ModelDef,
    PointDef,
    Value,
    decode_model,
    encode_model,
    encode_point,
    model_def,
)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model to put in the map: its initial values and its scale factors."""

    model_id: int
    values: Mapping[str, Value]
    scale_factors: Mapping[str, int]


class SunSpecImage:
    """Registers of a SunSpec device from ``base_address`` on (0-based wire addresses)."""

    def __init__(self, models: Sequence[ModelSpec], base_address: int = 40000) -> None:
        self.base_address = base_address
        self.words: list[int] = list(SUNS_MARKER)
        self._where: dict[int, int] = {}  # model id -> index of its ID register in words
        self._sfs: dict[int, dict[str, int]] = {}
        for spec in models:
            definition = model_def(spec.model_id)
            self._where[spec.model_id] = len(self.words)
            self._sfs[spec.model_id] = dict(spec.scale_factors)
            self.words += encode_model(definition, spec.values, spec.scale_factors)
        self.words += [END_MODEL_ID, 0]

    def __len__(self) -> int:
        return len(self.words)

    def model_address(self, model_id: int) -> int:
        """Wire address of a model's ID register."""
        return self.base_address + self._where[model_id]

    def _point(self, model_id: int, name: str) -> tuple[ModelDef, PointDef, int]:
        definition = model_def(model_id)
        point = definition.point(name)
        return definition, point, self._where[model_id] + point.offset

    def sf(self, model_id: int, point: PointDef) -> int:
        """The scale factor this image uses for ``point``."""
        if isinstance(point.sf, int):
            return point.sf
        return self._sfs[model_id].get(point.sf, 0) if point.sf else 0

    def set(self, model_id: int, name: str, value: Value) -> None:
        """Store ``value`` (engineering units; None = not implemented) in a point."""
        _, point, index = self._point(model_id, name)
        self.words[index : index + point.size] = encode_point(
            point, value, self.sf(model_id, point)
        )

    def set_many(self, model_id: int, values: Mapping[str, Value]) -> None:
        """Store several points of one model."""
        for name, value in values.items():
            self.set(model_id, name, value)

    def get(self, model_id: int, name: str) -> Value:
        """A point's value in engineering units (None when not implemented)."""
        definition = model_def(model_id)
        start = self._where[model_id]
        words = self.words[start : start + definition.length + 2]
        return decode_model(definition, words, [name])[name]

    def locate(self, address: int) -> tuple[int, PointDef] | None:
        """(model id, point) of the point holding wire register ``address``, if any."""
        index = address - self.base_address
        for model_id, start in self._where.items():
            definition = model_def(model_id)
            if start <= index < start + definition.length + 2:
                for p in definition.points:
                    if start + p.offset <= index < start + p.offset + p.size:
                        return model_id, p
        return None


def fitting_sf(max_abs_value: float, bits: int = 15) -> int:
    """The smallest scale factor (>= -3) whose integer range holds ``max_abs_value``.

    For int16 points ``bits`` is 15: value / 10**sf must stay below 32767.
    """
    limit = 2**bits - 1
    sf = -3
    while abs(max_abs_value) / 10.0**sf > limit:
        sf += 1
    return sf


def accumulator_sf(start_value: float, growth: float = 10.0) -> int:
    """The smallest scale factor (>= 0) whose acc32 range holds ``growth`` x ``start_value``.

    An accumulator keeps counting: leave room for it to grow before it wraps.
    """
    sf = 0
    while abs(start_value) * growth / 10.0**sf > 0xFFFFFFFF:
        sf += 1
    return sf
