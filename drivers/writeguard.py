"""When to write a held setpoint again: a deadband, a refresh before the device reverts, and a
minimum interval between writes (some devices keep setpoints in flash that wears).

Pure decisions on numbers and times (float seconds from the caller's clock); the facades do
the I/O. A setpoint is written when it is the first, when it moved by at least the deadband
since the last write (but not sooner than the minimum interval after it), or when the last
write is ``refresh_s`` old (so a device that drops a setpoint after its own revert timeout
never does while it is held).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

#: Why a setpoint is written: never written, moved beyond the deadband, refreshed.
WriteReason = Literal["first", "change", "refresh"]

#: Share of the device's revert timeout after which a held setpoint is written again.
REFRESH_SHARE = 0.5


@dataclass(frozen=True, slots=True)
class WritePolicy:
    """How often a held setpoint may and must be written.

    ``deadband_w``: a change smaller than this (W) is not written. ``min_interval_s``: no two
    writes closer than this (s); a change waits until it has passed. ``refresh_s``: an unchanged
    setpoint is written again this long (s) after its last write; None never refreshes (a
    device that holds setpoints until told otherwise).
    """

    deadband_w: float = 50.0
    min_interval_s: float = 0.0
    refresh_s: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.deadband_w) and self.deadband_w >= 0):
            raise ValueError(f"deadband_w {self.deadband_w} must be a finite number >= 0")
        if not (math.isfinite(self.min_interval_s) and self.min_interval_s >= 0):
            raise ValueError(f"min_interval_s {self.min_interval_s} must be finite and >= 0")
        if self.refresh_s is not None and not (
            math.isfinite(self.refresh_s) and self.refresh_s >= max(self.min_interval_s, 1e-9)
        ):
            raise ValueError(
                f"refresh_s {self.refresh_s} must be finite, > 0 and at least min_interval_s "
                f"{self.min_interval_s}"
            )

    def with_revert_timeout(self, revert_timeout_s: float) -> WritePolicy:
        """This policy refreshing at :data:`REFRESH_SHARE` of a device revert timeout (s).

        A timeout of 0 means the device holds the setpoint: the policy's own refresh stays.
        The refresh never falls below the minimum interval; ValueError when the minimum
        interval is too long to refresh before the timeout.
        """
        if revert_timeout_s <= 0:
            return self
        refresh = revert_timeout_s * REFRESH_SHARE
        if self.refresh_s is not None:
            refresh = min(refresh, self.refresh_s)
        if self.min_interval_s >= revert_timeout_s:
            raise ValueError(
                f"minimum write interval {self.min_interval_s:g} s does not allow a refresh "
                f"before the device's revert timeout of {revert_timeout_s:g} s"
            )
        return WritePolicy(self.deadband_w, self.min_interval_s, max(refresh, self.min_interval_s))


def write_due(
    policy: WritePolicy,
    value_w: float,
    now_s: float,
    last_value_w: float | None,
    last_write_s: float | None,
) -> WriteReason | None:
    """Why ``value_w`` must be written at ``now_s`` given the last write, or None to skip.

    "change" needs a move of at least the deadband (W) and the minimum interval (s) since the
    last write; "refresh" needs ``refresh_s`` since the last write. A clock that went back
    (``now_s`` before the last write) counts as a long time since, so nothing stalls.
    """
    if last_write_s is None:
        return "first"
    since_s = now_s - last_write_s
    if since_s < 0:
        since_s = math.inf
    # An unknown last value (a write the device did not confirm) is retried as a change.
    changed = last_value_w is None or abs(value_w - last_value_w) >= max(policy.deadband_w, 1e-9)
    if changed and since_s >= policy.min_interval_s:
        return "change"
    if policy.refresh_s is not None and since_s >= policy.refresh_s:
        return "refresh"
    return None


@dataclass(slots=True)
class WriteCounter:
    """What a held setpoint's writes were: counts by reason and the last write."""

    policy: WritePolicy
    writes: int = 0
    skipped: int = 0
    refreshes: int = 0
    last_value_w: float | None = None
    last_write_s: float | None = None

    def due(self, value_w: float, now_s: float) -> WriteReason | None:
        """See :func:`write_due`; counts a skip when nothing is due."""
        reason = write_due(self.policy, value_w, now_s, self.last_value_w, self.last_write_s)
        if reason is None:
            self.skipped += 1
        return reason

    def failed(self, now_s: float) -> None:
        """A write at ``now_s`` that the device did not confirm: retried after the minimum
        interval, not at once."""
        self.writes += 1
        self.last_value_w = None
        self.last_write_s = now_s

    def wrote(self, value_w: float, now_s: float, reason: WriteReason) -> None:
        """Record a write of ``value_w`` at ``now_s``."""
        self.writes += 1
        self.refreshes += reason == "refresh"
        self.last_value_w = value_w
        self.last_write_s = now_s
