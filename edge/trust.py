"""What the edge makes of an order's own times: judged on the receiver's clock, never the sender's.

A dispatch says when it was made (``ts``) and when it ends (``expires_ts``), on the sender's
clock. The edge believes neither further than it must: an order stamped too far ahead of its
own clock or too long ago is refused, and an order it accepts ends at the earlier of its
``expires_ts`` and the time it was received plus a maximum duration, both on the edge's clock.
So a sender with a wrong clock (or a forged far-future stamp) cannot hold a battery longer than
the site allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["OrderWindow", "order_window"]


@dataclass(frozen=True, slots=True)
class OrderWindow:
    """The verdict on an order's times.

    ``verdict``: ``"ok"`` (in force until ``end_ts``), ``"expired"``, ``"future"`` (stamped
    beyond the allowed skew ahead of the receiver) or ``"stale"`` (stamped longer ago than
    allowed). ``shortened`` is True when the maximum duration ends it before its ``expires_ts``.
    """

    verdict: Literal["ok", "expired", "future", "stale"]
    end_ts: float
    shortened: bool
    detail: str


def order_window(
    ts: float,
    expires_ts: float,
    received_ts: float,
    *,
    max_skew_s: float,
    max_age_s: float,
    max_duration_s: float,
) -> OrderWindow:
    """Judge an order stamped ``ts`` and ending ``expires_ts`` (s), received at ``received_ts``.

    All times are UTC epoch seconds; ``received_ts`` is on the receiver's clock. The order is
    in force from receipt until ``end_ts = min(expires_ts, received_ts + max_duration_s)``.
    Checks, in order: expired (``expires_ts <= received_ts``), future
    (``ts > received_ts + max_skew_s``), stale (``ts < received_ts - max_age_s``).
    """
    if expires_ts <= received_ts:
        return OrderWindow(
            "expired", expires_ts, False, f"expired {received_ts - expires_ts:.0f} s ago"
        )
    if ts > received_ts + max_skew_s:
        return OrderWindow(
            "future",
            received_ts,
            False,
            f"stamped {ts - received_ts:.0f} s ahead of this site's clock (at most "
            f"{max_skew_s:.0f} s allowed): check the sender's clock",
        )
    if ts < received_ts - max_age_s:
        return OrderWindow(
            "stale",
            received_ts,
            False,
            f"stamped {received_ts - ts:.0f} s before it arrived (at most {max_age_s:.0f} s "
            "allowed): too old to act on",
        )
    limit_ts = received_ts + max_duration_s
    if expires_ts > limit_ts:
        return OrderWindow(
            "ok",
            limit_ts,
            True,
            f"ends {max_duration_s:.0f} s after receipt (this site's maximum), "
            f"{expires_ts - limit_ts:.0f} s before its expires_ts",
        )
    return OrderWindow("ok", expires_ts, False, "")
