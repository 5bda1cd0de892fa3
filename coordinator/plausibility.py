"""Plausibility of what a site says: pure checks of readings and bids against its limits.

A site's word is not its meter. Every reading and bid is checked, before it touches any state,
against the site's declared limits (configuration, else defaults derived from what the site
reported the first time it was seen, capped) and the coordinator's own clock:

- timestamps: at most ``future_skew_s`` ahead of the coordinator's clock (a reading from the
  future would otherwise hold the feeder flow hostage), at most ``max_age_s`` behind (replayed
  spool data from the past is fine within that window);
- powers (W, site convention: grid positive importing, battery positive discharging): the
  grid exchange within the connection limit, PV within the site's generation rating, battery
  power within its storage rating, load within what connection, PV and battery can supply, each
  with a ``tolerance`` for meter error; device ratings no larger than the site could have;
- bids: only for the interval whose gate is still open and ``bids_ahead`` intervals after it,
  each side's total quantity (kWh) no more than the connection and the batteries can carry
  over an interval.

Each check returns ``None`` (plausible) or a short reason; the caller counts, logs and decides.
No I/O, no clock and no state here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

from broker.messages import Bid, Telemetry

Reason = Literal[
    "invalid",
    "unknown_site",
    "future",
    "too_old",
    "grid_power",
    "pv_power",
    "battery_power",
    "load_power",
    "device_power",
    "rating",
    "bid_closed",
    "bid_too_far_ahead",
    "bid_quantity",
]

#: Every reason, for counters and documentation.
REASONS: Final[tuple[str, ...]] = Reason.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class SiteLimits:
    """What a site can physically do, W (all >= 0).

    ``connection_w``: the most its grid connection carries either way; ``generation_w``: its
    PV rating; ``storage_w``: its batteries' rated power (charge or discharge).
    """

    connection_w: float
    generation_w: float
    storage_w: float


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Readings are accepted from ``now - max_age_s`` to ``now + future_skew_s`` (s)."""

    future_skew_s: float
    max_age_s: float


def reported_ratings_w(msg: Telemetry) -> tuple[float, float]:
    """(generation, storage) W: the sums of the rated powers the site's devices report."""
    generation = sum(d.rated_power_w or 0.0 for d in msg.devices if d.kind == "pv_inverter")
    storage = sum(d.rated_power_w or 0.0 for d in msg.devices if d.kind == "battery")
    return generation, storage


def derive_limits(
    *,
    connection_w: float | None,
    generation_w: float | None,
    storage_w: float | None,
    reported_generation_w: float,
    reported_storage_w: float,
    base_connection_w: float,
    max_connection_w: float,
    max_ratio: float,
) -> SiteLimits:
    """A site's limits (W): declared values where given, else derived from what it reported.

    An undeclared connection is ``base_connection_w``, or the site's reported PV and battery
    ratings together if larger, at most ``max_connection_w``. A reported rating is trusted
    only up to ``max_ratio`` times the connection, so a site cannot loosen its own limits by
    claiming a huge inverter; a site that reports no rating (0: no such device, or one that
    does not say) gets that cap.
    """
    if connection_w is None:
        reported_w = reported_generation_w + reported_storage_w
        connection_w = min(max(base_connection_w, reported_w), max_connection_w)
    cap_w = connection_w * max_ratio

    def pick(declared: float | None, reported: float) -> float:
        if declared is not None:
            return declared
        return min(reported, cap_w) if reported > 0 else cap_w

    return SiteLimits(
        connection_w=connection_w,
        generation_w=pick(generation_w, reported_generation_w),
        storage_w=pick(storage_w, reported_storage_w),
    )


def check_time(ts: float, now_ts: float, window: TimeWindow) -> Reason | None:
    """``future`` beyond the skew, ``too_old`` beyond the age window, else None."""
    if ts > now_ts + window.future_skew_s:
        return "future"
    if ts < now_ts - window.max_age_s:
        return "too_old"
    return None


def _beyond(value_w: float | None, bound_w: float, tolerance: float) -> bool:
    return value_w is not None and abs(value_w) > bound_w * (1.0 + tolerance) + 1.0


class ReadingSummary(NamedTuple):
    """What the checks, the metering and the history need of a reading (W, site signs).

    Built once per reading by :func:`summarise` (in the coordinator, or in an ingest worker
    process that sends it on: a tuple pickles cheaply). ``generation_rating_w`` and
    ``storage_rating_w`` are :func:`reported_ratings_w`; ``max_device_rating_w`` the largest
    rated power any device reports and ``max_device_power_w`` the largest absolute device power
    (None when no device reports one).
    """

    ts: float
    grid_power_w: float | None
    pv_power_w: float | None
    battery_power_w: float | None
    load_power_w: float | None
    generation_rating_w: float
    storage_rating_w: float
    max_device_rating_w: float | None
    max_device_power_w: float | None


def summarise(msg: Telemetry) -> ReadingSummary:
    """The :class:`ReadingSummary` of a validated reading."""
    generation, storage = reported_ratings_w(msg)
    ratings = [d.rated_power_w for d in msg.devices if d.rated_power_w is not None]
    powers = [abs(d.power_w) for d in msg.devices if d.power_w is not None]
    return ReadingSummary(
        ts=msg.ts,
        grid_power_w=msg.grid_power_w,
        pv_power_w=msg.pv_power_w,
        battery_power_w=msg.battery_power_w,
        load_power_w=msg.load_power_w,
        generation_rating_w=generation,
        storage_rating_w=storage,
        max_device_rating_w=max(ratings) if ratings else None,
        max_device_power_w=max(powers) if powers else None,
    )


def check_telemetry(
    msg: Telemetry, limits: SiteLimits, now_ts: float, window: TimeWindow, tolerance: float
) -> Reason | None:
    """The first reason ``msg`` is implausible for a site with ``limits``, or None
    (:func:`check_reading` on its :func:`summarise`)."""
    return check_reading(summarise(msg), limits, now_ts, window, tolerance)


def check_reading(
    s: ReadingSummary, limits: SiteLimits, now_ts: float, window: TimeWindow, tolerance: float
) -> Reason | None:
    """The first reason a reading (its summary ``s``) is implausible for a site with
    ``limits``, or None.

    Powers in W with the site conventions; ``tolerance`` is the fraction of a limit allowed
    for meter error and brief overload. A device rating beyond what the site could have is
    reported before a device power beyond it.
    """
    late = check_time(s.ts, now_ts, window)
    if late is not None:
        return late
    if _beyond(s.grid_power_w, limits.connection_w, tolerance):
        return "grid_power"
    if s.pv_power_w is not None and (
        s.pv_power_w < -0.05 * limits.generation_w - 50.0
        or _beyond(s.pv_power_w, limits.generation_w, tolerance)
    ):
        return "pv_power"
    if _beyond(s.battery_power_w, limits.storage_w, tolerance):
        return "battery_power"
    supply_w = limits.connection_w + limits.generation_w + limits.storage_w
    if s.load_power_w is not None and (
        s.load_power_w < -0.05 * supply_w - 50.0 or _beyond(s.load_power_w, supply_w, tolerance)
    ):
        return "load_power"
    device_cap_w = max(supply_w, limits.connection_w)
    if s.max_device_rating_w is not None and s.max_device_rating_w > device_cap_w * (
        1.0 + tolerance
    ):
        return "rating"
    if _beyond(s.max_device_power_w, device_cap_w, tolerance):
        return "device_power"
    return None


def open_interval(now_ts: float, interval_s: int, gate_s: int) -> int:
    """The first interval whose gate (``gate_s`` before its start) has not closed at ``now_ts``."""
    k = math.floor(now_ts / interval_s) + 1
    if now_ts >= k * interval_s - gate_s:
        k += 1
    return k


def check_bid(
    bid: Bid,
    limits: SiteLimits,
    *,
    now_ts: float,
    interval_s: int,
    gate_s: int,
    bids_ahead: int,
    tolerance: float,
) -> Reason | None:
    """The first reason ``bid`` is not acceptable now, or None.

    Accepted: the open interval and ``bids_ahead`` after it; each side's total quantity (kWh)
    within what the connection and the batteries (W) carry over one interval, with
    ``tolerance``.
    """
    first = open_interval(now_ts, interval_s, gate_s)
    if bid.interval < first:
        return "bid_closed"
    if bid.interval > first + bids_ahead:
        return "bid_too_far_ahead"
    # What the site could take or give over the interval: its connection, and its batteries
    # on top (a bid may offer charging and still cover its load; the clearing caps the rest).
    most_w = limits.connection_w + limits.storage_w
    most_kwh = most_w / 1000.0 * interval_s / 3600.0 * (1.0 + tolerance) + 1e-6
    if sum(s.quantity_kwh for s in bid.buy) > most_kwh:
        return "bid_quantity"
    if sum(s.quantity_kwh for s in bid.sell) > most_kwh:
        return "bid_quantity"
    return None
