"""How long device polls take: a fixed-bucket histogram each poller keeps (no dependencies).

The optional metrics port (:mod:`edge.metrics`) reads it at scrape time as a Prometheus
histogram; without ``[metrics]`` it costs one addition and a short bucket search per poll.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

#: Upper bounds of the buckets, wall seconds: a Modbus TCP read on a LAN takes milliseconds,
#: one at 9600 baud hundreds, a timeout the device's ``timeout_s`` (1 s by default).
POLL_BUCKETS_S: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass
class LatencyHistogram:
    """Durations (wall s) counted into buckets with upper bounds ``bounds_s`` and one more
    for anything longer; ``sum_s`` and ``count`` over every observation."""

    bounds_s: tuple[float, ...] = POLL_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    """Observations per bucket (not cumulative); the last is beyond every bound."""
    sum_s: float = 0.0
    count: int = 0
    last_s: float | None = None
    """The latest observation, s."""

    def __post_init__(self) -> None:
        if list(self.bounds_s) != sorted(set(self.bounds_s)):
            raise ValueError("bucket bounds must be strictly increasing")
        self.counts = [0] * (len(self.bounds_s) + 1)

    def observe(self, duration_s: float) -> None:
        """Count one duration (s); a bound is inclusive (``duration_s <= bound``)."""
        self.counts[bisect.bisect_left(self.bounds_s, duration_s)] += 1
        self.sum_s += duration_s
        self.count += 1
        self.last_s = duration_s

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound s, observations at most that long), ending with (inf, count).

        Reads the counts through one copy, so another thread's ``observe`` cannot make the
        buckets disagree with each other."""
        out: list[tuple[float, int]] = []
        running = 0
        counts = self.counts.copy()
        for bound, n in zip((*self.bounds_s, float("inf")), counts, strict=True):
            running += n
            out.append((bound, running))
        return out
