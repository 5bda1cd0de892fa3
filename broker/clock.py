"""Clocks: every component takes a clock rather than calling time() (docs/architecture.md s. 4).

``ScaledClock`` runs simulations faster than real time; ``ManualClock`` moves only when told,
for tests and stepped simulations. Times are UTC epoch seconds.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Anything that tells the (possibly simulated) time as UTC epoch seconds."""

    def now(self) -> float:
        """Seconds since the epoch, UTC."""
        ...


class WallClock:
    """The real time."""

    def now(self) -> float:
        """Seconds since the epoch, UTC."""
        return time.time()


class ScaledClock:
    """Simulated time running ``speed`` times faster than real time from ``start_ts``.

    ``now() = start_ts + speed * (wall time - anchor_wall_ts)``: simulated time was
    ``start_ts`` at the wall time ``anchor_wall_ts`` (default: when the clock was made).
    Processes that share (start, speed, anchor) agree on the simulated time, so a simulator
    and an edge agent in different processes can follow one scenario.
    """

    def __init__(
        self, start_ts: float | None = None, speed: float = 1.0, anchor_wall_ts: float | None = None
    ) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be positive, got {speed}")
        self.anchor_wall_ts = time.time() if anchor_wall_ts is None else float(anchor_wall_ts)
        self.start_ts = self.anchor_wall_ts if start_ts is None else float(start_ts)
        self.speed = float(speed)

    def now(self) -> float:
        """Simulated seconds since the epoch, UTC."""
        return self.start_ts + self.speed * (time.time() - self.anchor_wall_ts)

    def to_json(self) -> dict[str, float]:
        """What another process needs to follow this clock."""
        return {
            "start_ts": self.start_ts,
            "speed": self.speed,
            "anchor_wall_ts": self.anchor_wall_ts,
        }

    def sim_to_wall_s(self, sim_s: float) -> float:
        """How many real seconds ``sim_s`` simulated seconds take."""
        return sim_s / self.speed


class ManualClock:
    """A clock that moves only when told to: for tests and stepped simulations."""

    def __init__(self, start_ts: float = 0.0) -> None:
        self.ts = float(start_ts)

    def now(self) -> float:
        """The current simulated time."""
        return self.ts

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        if seconds < 0:
            raise ValueError("time does not run backwards")
        self.ts += seconds
