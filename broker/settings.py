"""Settings pieces shared by the edge's and the coordinator's configuration files."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from broker.clock import ScaledClock


class ClockSettings(BaseModel):
    """Simulated time, to follow ``wattmesh sim run``; absent = the real clock.

    Either ``file`` (the clock file ``wattmesh sim run --clock-file`` writes) or ``start``
    with ``speed`` and ``anchor_wall_ts`` (the wall time at which simulated time was start).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: Path | None = None
    start: datetime | None = None
    speed: float = Field(default=1.0, gt=0)
    anchor_wall_ts: float | None = None

    @model_validator(mode="after")
    def _one(self) -> ClockSettings:
        if (self.file is None) == (self.start is None):
            raise ValueError("give either file or start")
        return self

    def build(self) -> ScaledClock:
        """The clock described; ``ValueError`` naming ``clock.file`` if it cannot be read."""
        if self.file is not None:
            try:
                data = json.loads(self.file.read_text())
                return ScaledClock(
                    float(data["start_ts"]), float(data["speed"]), float(data["anchor_wall_ts"])
                )
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"clock.file: cannot use {self.file}: {err}") from err
        assert self.start is not None
        start = self.start if self.start.tzinfo else self.start.replace(tzinfo=UTC)
        return ScaledClock(start.timestamp(), self.speed, self.anchor_wall_ts)


def validation_lines(err: ValidationError, source: str) -> str:
    """One line per problem: ``<source>: <field path>: <message>``."""
    lines = []
    for e in err.errors():
        where = ""
        for part in e["loc"]:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
        lines.append(f"{source}: {where or '(top level)'}: {e['msg']}")
    return "\n".join(lines)
