"""The coordinator's grid balancing as pure functions: no I/O, no clock, no logging.

:class:`coordinator.service.Coordinator` wires them to the bus (dispatch orders, the retained
grid state); the stepped simulation engine (:mod:`wattmesh.backtest`) calls the same
functions. Signs (docs/architecture.md section 4): feeder and site power positive when
importing; battery power positive when discharging. Powers in W, times in the coordinator's
clock seconds.

Each check: the feeder's mode from its flow with hysteresis (:func:`feeder_mode`); while it is
constrained, the excess over the target is spread over the batteries with headroom, pro rata
(:func:`plan_relief`), then what batteries cannot cover becomes load limits for consumers.
Otherwise, a fleet short of the feeder reservation is refilled into the measured headroom
(:func:`plan_refill`), and the feeder's export is charged into the batteries
(:func:`plan_absorb`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from coordinator.config import GridSection

GridMode = Literal["normal", "constrained", "emergency"]
#: A battery is not asked to discharge at or below this state of charge, %: just above the
#: reserve the feeder reservation assumes (coordinator/reserve.py ASSUMED_SOC_MIN_PCT, 5 %),
#: so that the energy the reservation counts on is energy the grid loop will use; a battery
#: with a higher reserve of its own is held there by its edge's safety clamp.
DISCHARGE_FLOOR_SOC_PCT = 6.0
#: A battery is not asked to charge at or above this state of charge, %.
CHARGE_CEILING_SOC_PCT = 98.0


@dataclass(frozen=True, slots=True)
class Relief:
    """What the grid orders to one site's batteries do (battery power, W, + discharges).

    ``flow_w`` is how much the order moves the site's battery from ``base_w``, its power before
    the episode's first order (and so how much it moves the feeder's flow); ``pending_w`` the
    change the last order asked for, not visible until two readings have arrived after it
    (``readings_at_order``); the relief lapses with the order at ``expires_ts``.
    """

    flow_w: float
    pending_w: float
    base_w: float
    expires_ts: float
    readings_at_order: int

    @property
    def setpoint_w(self) -> float:
        """The battery power the order asks for, W (+ discharges)."""
        return self.base_w + self.flow_w


@dataclass(frozen=True, slots=True)
class SiteGrid:
    """What the grid policy needs of one site that has reported: its latest grid exchange
    (W, + importing), battery power (W, + discharging), battery headroom (W, see
    :func:`battery_headroom_w`), role, and how many readings it has sent so far."""

    grid_power_w: float | None
    battery_power_w: float
    headroom_w: tuple[float, float]
    readings: int
    role: str | None = None
    #: The largest import (W) the grid loop has seen at the site so far; None: unknown.
    peak_import_w: float | None = None


@dataclass(frozen=True, slots=True)
class ReliefPlan:
    """Orders for one check: each battery's (setpoint W, relief) and consumers' load limits
    (W of import), in the order they are to be sent."""

    batteries: dict[str, tuple[float, Relief]] = field(default_factory=dict)
    load_limits_w: dict[str, float] = field(default_factory=dict)


def battery_headroom_w(
    rated_w: float, battery_power_w: float, soc_pct: float | None
) -> tuple[float, float]:
    """(more discharge, more charge) a site's batteries could take on now, W.

    ``rated_w`` is the available batteries' rated power, ``battery_power_w`` their power now
    (+ discharging). Discharge headroom is ``rated - power``, none at or below
    :data:`DISCHARGE_FLOOR_SOC_PCT`; charge headroom ``rated + power``, none at or above
    :data:`CHARGE_CEILING_SOC_PCT`. An unknown SOC does not limit either.
    """
    can_discharge = soc_pct is None or soc_pct > DISCHARGE_FLOOR_SOC_PCT
    can_charge = soc_pct is None or soc_pct < CHARGE_CEILING_SOC_PCT
    return (
        max(0.0, rated_w - battery_power_w) if can_discharge else 0.0,
        max(0.0, rated_w + battery_power_w) if can_charge else 0.0,
    )


def active_reliefs(reliefs: Mapping[str, Relief], now_ts: float) -> dict[str, Relief]:
    """The reliefs whose orders have not expired at ``now_ts``."""
    return {n: r for n, r in reliefs.items() if r.expires_ts > now_ts}


def feeder_mode(
    flow_w: float,
    reliefs: Mapping[str, Relief],
    *,
    previous: GridMode,
    emergency: bool,
    grid: GridSection,
) -> GridMode:
    """The feeder's mode after a check of its net flow ``flow_w`` (W, + importing).

    An operator's emergency overrides all. Otherwise the load is ``max(|flow|, |flow + sum of
    reliefs' flow_w|)`` in % of the limit in the flow's direction: the flow as it would be
    without our orders counts, so that relieving the feeder does not by itself end the relief
    (and start the overload again). Constrained from ``act_at_pct``, back to normal at or below
    ``release_pct`` (or at once when an emergency ends); in between the mode stays.
    """
    limit = grid.import_limit_w if flow_w > 0 else grid.export_limit_w
    underlying = flow_w + sum(r.flow_w for r in reliefs.values())
    load_pct = 100.0 * max(abs(flow_w), abs(underlying)) / limit
    if emergency:
        return "emergency"  # operator orders override market and balancing
    if load_pct >= grid.act_at_pct:
        return "constrained"
    if load_pct <= grid.release_pct or previous == "emergency":
        return "normal"
    return previous


def holding_grid(grid: GridSection, import_level_kw: float | None) -> GridSection:
    """The grid section the loop acts on: ``grid``, or, when the feeder reservation found
    that the batteries cannot hold the import limit through the forecast and plans to a
    higher ``import_level_kw`` (kW, :attr:`coordinator.reserve.FeederReservation.
    import_level_kw`), with the import limit raised so that the loop's target is that level:
    the batteries then spread what cannot be avoided over the whole episode instead of
    emptying before its end and leaving its last hours at the full overload."""
    if import_level_kw is None or not math.isfinite(import_level_kw):
        return grid
    limit_w = import_level_kw * 1000.0 / (grid.target_pct / 100.0)
    if limit_w <= grid.import_limit_w:
        return grid
    return grid.model_copy(update={"import_limit_w": limit_w})


def relief_target_w(flow_w: float, grid: GridSection) -> float:
    """The flow (W, magnitude) relief aims for: ``target_pct`` of the limit in its direction."""
    limit = grid.import_limit_w if flow_w > 0 else grid.export_limit_w
    return limit * grid.target_pct / 100.0


def headroom_w(
    excess_w: float,
    importing: bool,
    sites: Mapping[str, SiteGrid],
    reliefs: Mapping[str, Relief],
) -> tuple[float, dict[str, float]]:
    """The excess (W) less what orders not yet in the readings will relieve, and the headroom
    (W, in the direction that relieves) of every site that can be ordered now.

    A site can be ordered again once two readings have arrived since its last order (the
    first may have been taken before the order landed); until then its pending change is taken
    off the excess and its headroom is left out.
    """
    sign = 1.0 if importing else -1.0
    room: dict[str, float] = {}
    for name, site in sites.items():
        relief = reliefs.get(name)
        if relief is not None and site.readings < relief.readings_at_order + 2:
            excess_w -= sign * relief.pending_w  # ordered, not yet in the flow we see
            continue
        room[name] = site.headroom_w[0 if importing else 1]
    return excess_w, room


def battery_orders(
    excess_w: float,
    room_w: Mapping[str, float],
    importing: bool,
    sites: Mapping[str, SiteGrid],
    reliefs: Mapping[str, Relief],
    *,
    now_ts: float,
    expiry_s: float,
) -> dict[str, tuple[float, Relief]]:
    """Each site's share of ``excess_w`` (pro rata to ``room_w``) as a battery setpoint (W)
    and the relief it gives, expiring ``expiry_s`` after ``now_ts``.

    The setpoint is the battery's present power plus its share, so re-issuing it while the flow
    sits at the target keeps the relief in place; with a negative excess the share hands
    relief back. It never goes past the battery's power before the episode's first order (or
    idle, if it was charging on import or discharging on export) in the wrong direction, so a
    battery is never told to charge from (or discharge into) the overloaded feeder. Every
    battery at its limit: the relief stays in place.
    """
    sign = 1.0 if importing else -1.0
    total = sum(room_w.values())
    orders: dict[str, tuple[float, Relief]] = {}
    for name, room in room_w.items():
        site = sites[name]
        relief = reliefs.get(name)
        if relief is None and (room <= 0 or excess_w <= 0):
            continue
        if total <= 0:
            share = 0.0  # every battery is at its limit: keep the relief in place
        elif excess_w > 0:
            share = min(room, excess_w * room / total)
        else:
            share = excess_w * room / total
        current = site.battery_power_w
        # The episode's base: the battery's power before its first order, but never a charge
        # on import (a discharge on export): stopping that is relief, yet the flow without
        # our orders must not count on it going on for hours (a battery charging to a plan
        # at the first order would otherwise hold the feeder "constrained" long after).
        idle_side = max(current, 0.0) if importing else min(current, 0.0)
        base = idle_side if relief is None else relief.base_w
        setpoint = current + sign * share
        floor = min(base, current) if importing else max(base, current)
        setpoint = max(setpoint, floor) if importing else min(setpoint, floor)
        orders[name] = _order(setpoint, current, base, now_ts + expiry_s, site.readings)
    return orders


def _order(
    setpoint_w: float, current_w: float, base_w: float, expires_ts: float, readings: int
) -> tuple[float, Relief]:
    """A battery order to ``setpoint_w`` (W) and the relief it gives against ``base_w``, the
    battery's power before our orders (``current_w`` its power now)."""
    return setpoint_w, Relief(
        flow_w=setpoint_w - base_w,
        pending_w=setpoint_w - current_w,
        base_w=base_w,
        expires_ts=expires_ts,
        readings_at_order=readings,
    )


def load_limits_w(
    uncovered_w: float,
    sites: Mapping[str, SiteGrid],
    *,
    exclude: set[str],
) -> dict[str, float]:
    """Import limits (W) that share ``uncovered_w`` equally among the importing consumers and
    prosumers not in ``exclude`` (those with a battery order, or whose order stands)."""
    consumers = [
        n
        for n, s in sites.items()
        if s.role in ("consumer", "prosumer") and (s.grid_power_w or 0.0) > 0 and n not in exclude
    ]
    return {
        n: max(0.0, (sites[n].grid_power_w or 0.0) - uncovered_w / len(consumers))
        for n in consumers
    }


def plan_relief(
    flow_w: float,
    target_w: float,
    sites: Mapping[str, SiteGrid],
    reliefs: Mapping[str, Relief],
    *,
    now_ts: float,
    expiry_s: float,
) -> ReliefPlan:
    """The orders that bring the feeder's flow ``flow_w`` (W) towards ``target_w`` (W,
    magnitude): battery orders pro rata to headroom (:func:`battery_orders`), then, on import,
    load limits for what the batteries cannot cover (:func:`load_limits_w`)."""
    importing = flow_w > 0
    excess, room = headroom_w(abs(flow_w) - target_w, importing, sites, reliefs)
    total = sum(room.values())
    batteries = battery_orders(
        excess, room, importing, sites, reliefs, now_ts=now_ts, expiry_s=expiry_s
    )
    uncovered = excess - min(max(excess, 0.0), total)
    limits: dict[str, float] = {}
    if importing and uncovered > 0:
        limits = load_limits_w(uncovered, sites, exclude=set(batteries) | set(reliefs))
    return ReliefPlan(batteries, limits)


def reissue_due(last_sent_ts: float | None, now_ts: float, reissue_s: float) -> bool:
    """Whether a site may be sent an order now: never sent, or ``reissue_s`` since the last."""
    return last_sent_ts is None or now_ts - last_sent_ts >= reissue_s


# -- refill: the backstop for a fleet the forecast left short ---------------------------------
#: The fleet's shortfall below the feeder reservation's requirement, as a share of its
#: capacity, at which the grid loop starts refilling; it goes on until the shortfall is gone.
REFILL_START_SHARE = 0.01


@dataclass(slots=True)
class Refilling:
    """The refill between two checks: its standing orders (site -> the refill each order
    gives) and whether the fleet is being refilled (:func:`refilling`'s hysteresis)."""

    orders: dict[str, Relief] = field(default_factory=dict)
    active: bool = False


def required_now_kwh(
    required_kwh: NDArray[np.float64] | Sequence[float],
    start_ts: float,
    step_s: float,
    now_ts: float,
) -> float | None:
    """The stored energy (kWh) the feeder reservation (:attr:`coordinator.reserve.
    FeederReservation.required_kwh`, per step of ``step_s`` from ``start_ts``) asks the fleet
    to hold at the end of the step that holds ``now_ts`` (of the first step in the step before
    it: a reservation is made at the gate, for the intervals after the one running); None
    outside its horizon."""
    if not step_s > 0:
        return None
    index = math.floor((now_ts - start_ts) / step_s)
    index = 0 if index == -1 else index
    if not 0 <= index < len(required_kwh):
        return None
    value = float(required_kwh[index])
    return value if math.isfinite(value) else None


def refilling(
    stored_kwh: float,
    required_kwh: float,
    capacity_kwh: float,
    *,
    active: bool,
    start_share: float = REFILL_START_SHARE,
) -> bool:
    """Whether the grid loop refills the fleet: it starts when the fleet's stored energy
    (``stored_kwh``) is short of the reservation's requirement (``required_kwh``) by more than
    ``start_share`` of its capacity (``capacity_kwh``), and, once ``active``, goes on until the
    shortfall is gone (hysteresis)."""
    shortfall = required_kwh - stored_kwh
    return shortfall > (0.0 if active else start_share * max(capacity_kwh, 0.0))


def refill_max_w(shortfall_kwh: float, step_s: float) -> float:
    """The most extra charge a refill orders (W): the fleet's shortfall (kWh) spread over one
    reservation step (``step_s``, s). A refill corrects the forecast's error step by step; a
    fleet nearly at its requirement is not charged at full power into, say, a morning ramp."""
    return max(shortfall_kwh, 0.0) * 3.6e6 / step_s


def refill_level_w(grid: GridSection) -> float:
    """The feeder import (W) refilling charges up to: ``refill_level_pct`` of the import limit
    (of :func:`holding_grid`'s limit while the reservation holds a higher level)."""
    return grid.import_limit_w * grid.refill_level_pct / 100.0


def plan_refill(
    flow_w: float,
    level_w: float,
    sites: Mapping[str, SiteGrid],
    refills: Mapping[str, Relief],
    *,
    now_ts: float,
    expiry_s: float,
    max_w: float = math.inf,
) -> dict[str, tuple[float, Relief]]:
    """Battery setpoints (W, + discharging) that charge into the measured headroom below
    ``level_w`` (the feeder import, W; :func:`refill_level_w`) while the feeder flow is
    ``flow_w`` (W, + importing), and the refill each gives (a :class:`Relief` whose
    ``flow_w`` is the extra charge, W, negative), expiring ``expiry_s`` after ``now_ts``.

    The headroom ``level - flow``, less what orders not yet in the readings will take
    (:func:`headroom_w`), and at most ``max_w`` of extra charge in all (with what the
    standing refills already ordered), is shared pro rata to each battery's charge headroom;
    a setpoint is the battery's power now less its share. Above the level (negative headroom)
    the refills hand back their extra charge pro rata to it, never past the battery's power
    before the first refill order (its base): a refill never makes a battery discharge more,
    and never takes the feeder above the level by what it orders.
    """
    room_w, room = headroom_w(level_w - flow_w, False, sites, refills)
    room_w = min(room_w, max_w - sum(max(-r.flow_w, 0.0) for r in refills.values()))
    total = sum(room.values())
    given = {
        n: max(r.base_w - sites[n].battery_power_w, 0.0) for n, r in refills.items() if n in room
    }
    given_total = sum(given.values())
    orders: dict[str, tuple[float, Relief]] = {}
    for name, charge_room in room.items():
        site = sites[name]
        refill = refills.get(name)
        current = site.battery_power_w
        if room_w > 0:
            if charge_room <= 0 or total <= 0:
                continue
            share = min(charge_room, room_w * charge_room / total)
        else:
            if refill is None or given_total <= 0:
                continue
            share = room_w * given.get(name, 0.0) / given_total
        base = current if refill is None else refill.base_w
        setpoint = min(current - share, max(base, current))
        orders[name] = _order(setpoint, current, base, now_ts + expiry_s, site.readings)
    return orders


# -- absorbing: the community's surplus into its batteries, not sold at feed-in --------------
def absorb_expiry_s(now_ts: float, interval_s: float, dispatch_expiry_s: float) -> float:
    """How long an absorbing order holds (s): its usual expiry, but never past the end of the
    market interval it is sent in. The next interval has its own award and plan; an order
    renewed across intervals would hold the battery near a power (its base) taken from an
    earlier one (at worst discharging on into the night at the evening's rate)."""
    end_ts = (math.floor(now_ts / interval_s) + 1) * interval_s
    return max(0.0, min(dispatch_expiry_s, end_ts - now_ts))


def plan_absorb(
    flow_w: float,
    sites: Mapping[str, SiteGrid],
    absorbing: Mapping[str, Relief],
    *,
    now_ts: float,
    expiry_s: float,
) -> dict[str, tuple[float, Relief]]:
    """Battery setpoints (W, + discharging) that charge the feeder's export (``flow_w`` < 0,
    W, + importing) into the batteries, pro rata to each one's charge headroom, and the extra
    charge each gives (a :class:`Relief`, ``flow_w`` negative), expiring ``expiry_s`` after
    ``now_ts``: :func:`plan_refill` with the level at zero flow.

    What the community exports is sold at the feed-in tariff, while a kWh stored displaces a
    later purchase at up to retail (times the round trip's efficiency): the awards follow the
    forecast, and where it missed (a cloud passed, a load stopped), a battery that keeps its
    award (discharging, or charging less) lets the surplus leave the feeder. While orders stand
    (``absorbing``) and the feeder imports, they hand their extra charge back, never past each
    battery's power before its first order; a battery is never made to discharge more. While
    the feeder does not export, a battery whose standing order already gives no extra charge
    (it handed it all back) gets no new one: that order lapses, and its site's plan and market
    commitment take over again (renewed at its base, it would hold the battery there). With
    the feeder importing and nothing standing: no order."""
    if flow_w >= 0 and not absorbing:
        return {}
    sites = {name: _below_own_peak(site) for name, site in sites.items()}
    orders = plan_refill(flow_w, 0.0, sites, absorbing, now_ts=now_ts, expiry_s=expiry_s)
    if flow_w < 0:
        return orders
    return {
        name: order
        for name, order in orders.items()
        if order[1].flow_w < 0 or (name in absorbing and absorbing[name].flow_w < 0)
    }


def _below_own_peak(site: SiteGrid) -> SiteGrid:
    """``site`` with its charge headroom cut to what keeps its import at or below the largest
    the grid loop has seen there (``peak_import_w``): absorbing charges through the site's own
    meter, and never sets a new peak for it (its owner may pay a demand charge on it)."""
    if site.peak_import_w is None:
        return site
    room = max(0.0, site.peak_import_w - (site.grid_power_w or 0.0))
    return replace(site, headroom_w=(site.headroom_w[0], min(site.headroom_w[1], room)))
