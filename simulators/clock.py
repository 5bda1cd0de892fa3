"""What simulators need of a clock: ``now()`` in UTC epoch seconds.

The clocks themselves (scaled, manual, wall) live in ``broker.clock``; whoever composes a
simulation (the command line, a test) passes one in.
"""

from __future__ import annotations

from typing import Protocol


class Clock(Protocol):
    """Anything that tells the (possibly simulated) time as UTC epoch seconds."""

    def now(self) -> float:
        """Seconds since the epoch, UTC."""
        ...
