"""Feeder reservation: battery energy and power set aside across the sites, from the forecasts,
to keep the feeder within its limits over the horizon. Pure functions, no I/O.

The coordinator computes it each interval when it publishes forecasts and sends each site its
share (:class:`broker.messages.Reservation`); each site's plan (:mod:`edge.plan`) must respect
it, and the live grid loop (:mod:`coordinator.grid`) remains the backstop for forecast errors.
docs/architecture.md section 5 ("Planning") describes the protocol.

Units and signs: energies in kWh per step (``step_h`` hours), positive when importing; powers
in kW; stored energies on the batteries' DC side, as :mod:`edge.plan` has them.

The fleet (all the sites' batteries together) is sized backwards from the horizon's end: in a
step where the forecast feeder import ``F`` exceeds its limit ``L`` the fleet must discharge
``F - L`` (as far as its power allows); in a step below the limit it may charge from the
headroom ``L - F`` (as far as its power allows). The energy the fleet must hold at the end of
step ``t`` is then ``R[t-1] = max(R_min, R[t] + need[t] / eta_d - eta_c s room[t])``: what
the later needs take, less what the later headroom can put back, counting no PV and only the
share ``s`` (:data:`REFILL_SHARE`) of the headroom, so that the batteries refill early rather
than in the last intervals before a peak. Export
beyond the export limit is handled within the step (export caps: the fleet must charge); the
reservation does not yet empty batteries ahead of a forecast export excess.

When the fleet's stored energy now cannot hold the limit through the forecast (the
requirement before the first step, or a later one, exceeds what it holds or can hold), the
reservation plans instead to the lowest import level it can hold
(:attr:`FeederReservation.import_level_kw`, bisection on the same backward sizing, on the
forecast without the sizing margin), and the grid loop aims there
(:func:`coordinator.grid.holding_grid`): what cannot be avoided is spread over the whole
overload instead of the batteries emptying before its end and leaving its last hours at the
full overload. Each interval's re-computation lowers the level again as soon as it can.

Each site's share is by usable capacity (``max - min`` stored energy): its floor is its
minimum plus its share of the fleet's requirement above the fleet's minimum, and in every
step where the fleet's power could overload the feeder (the headroom is smaller than the
fleet's charge power, or the room below the export limit smaller than its discharge power) its
import is capped at its own forecast net load plus its share of the headroom (negative: it
must export), and its export likewise. A share beyond a site's power is not re-assigned (the
grid loop handles what is left).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import ArrayLike, NDArray

from coordinator.schedule import Battery, ScheduleSteps, at_once, perfect_foresight_steps

#: Share of the feeder's limits the reservation plans to: headroom left for forecast errors.
PLAN_TO_SHARE = 0.95
#: The share of the forecast feeder import by which the fleet's requirement is sized above
#: the forecast: load forecasts err by about this much in an evening (benchmarks/
#: forecast_skill.py), and a reservation sized on the forecast alone runs out before the peak
#: ends whenever the forecast is low.
SIZING_MARGIN = 0.1
#: The share of the headroom before a forecast overload that the sizing counts on to refill
#: the batteries: a reservation that leaves the refill to the last intervals before the peak
#: (all a flat tariff gives the plans a reason to do) runs short whenever those intervals'
#: load, or a site's charging power, falls short of the forecast (a September morning peak
#: found the batteries empty at 171 kW with all of it counted, 156 kW with half).
REFILL_SHARE = 0.5


class ReservationError(ValueError):
    """The reservation cannot be computed from the given input."""


@dataclass(frozen=True, slots=True)
class FleetBattery:
    """One site's batteries together: stored energy now and its bounds (kWh), powers (kW),
    one-way efficiencies (-)."""

    stored_kwh: float
    min_kwh: float
    max_kwh: float
    max_charge_kw: float
    max_discharge_kw: float
    charge_efficiency: float = 0.95
    discharge_efficiency: float = 0.95


@dataclass(frozen=True, slots=True)
class SiteReservation:
    """One site's share, per step (NaN: nothing asked in that step): energy to hold at the
    step's end (kWh), import cap and export cap (kW; a negative import cap asks for export)."""

    floor_kwh: NDArray[np.float64]
    import_cap_kw: NDArray[np.float64]
    export_cap_kw: NDArray[np.float64]
    #: The site's share of the community schedule's stored energy at each step's end (kWh,
    #: NaN: none): not a constraint, a tie-breaker for the site's plan (edge/plan.py).
    suggested_kwh: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))

    @property
    def empty(self) -> bool:
        """Nothing is asked of the site over the horizon."""
        return not (
            np.isfinite(self.floor_kwh).any()
            or np.isfinite(self.import_cap_kw).any()
            or np.isfinite(self.export_cap_kw).any()
        )


@dataclass(frozen=True, slots=True)
class FeederReservation:
    """The fleet's requirement (kWh at each step's end), the flow beyond the limits the fleet
    cannot take (kWh per step, + import beyond the import limit, - export beyond the export
    limit) and each site's share."""

    required_kwh: NDArray[np.float64]
    unavoidable_kwh: NDArray[np.float64]
    sites: dict[str, SiteReservation]
    #: The feeder import the reservation plans to (kW): the limit times ``plan_to_share``
    #: when the fleet's stored energy can hold it over the horizon, else the lowest level it
    #: can hold (the grid loop then aims there, spreading what cannot be avoided).
    import_level_kw: float = math.inf


@dataclass(frozen=True, slots=True)
class _Rates:
    """The fleet as the backward sizing sees it: per-step charge and discharge (kWh),
    efficiencies, lowest and highest stored energy (kWh)."""

    charge_kwh: float
    discharge_kwh: float
    eta_c: float
    eta_d: float
    low: float
    high: float


def _requirement(
    sized_kwh: NDArray[np.float64], level_kwh: float, rates: _Rates, refill_share: float = 1.0
) -> tuple[NDArray[np.float64], float]:
    """The stored energy the fleet needs at each step's end to keep the import ``sized_kwh``
    at or below ``level_kwh`` per step (within ``[low, high]``), and what it needs now, before
    the first step (not capped at ``high``: more than the fleet holds means it cannot; infinite
    when a later need is more than the full fleet can carry).

    Before a need the full fleet cannot carry, the requirement is the full fleet (``high``)
    less what the headroom in between can put back: the batteries then go into it with all
    they can hold, rather than with nothing asked of them before it."""
    need = np.minimum(np.maximum(sized_kwh - level_kwh, 0.0), rates.discharge_kwh)
    room = np.minimum(np.maximum(level_kwh - sized_kwh, 0.0), rates.charge_kwh) * refill_share
    n_t = len(sized_kwh)
    low, high, eta_c, eta_d = rates.low, rates.high, rates.eta_c, rates.eta_d
    required = [low] * n_t  # a backward recursion: on Python floats, not numpy scalars
    need_kwh, room_kwh = need.tolist(), room.tolist()
    now = low
    short = False
    for t in range(n_t - 1, -1, -1):
        r = max(low, required[t] + need_kwh[t] / eta_d - eta_c * room_kwh[t])
        if t == 0:
            now = r
        else:
            short = short or r > high + 1e-9  # a later need the full fleet cannot carry
            required[t - 1] = min(high, r)
    return np.array(required, dtype=np.float64), math.inf if short else now


def _holds(sized_kwh: NDArray[np.float64], level_kwh: float, stored: float, r: _Rates) -> bool:
    """Whether the fleet, holding ``stored`` kWh now, keeps every step at ``level_kwh``."""
    return _requirement(sized_kwh, level_kwh, r)[1] <= stored + 1e-6


def _lowest_level(
    sized_kwh: NDArray[np.float64], level_kwh: float, stored: float, r: _Rates
) -> float:
    """The lowest import per step (kWh, at least ``level_kwh``) the fleet can hold from
    ``stored`` kWh (bisection to a thousandth of the level: the requirement falls as the
    level rises, and at the horizon's highest import nothing is needed)."""
    lo, hi = level_kwh, max(level_kwh, float(sized_kwh.max()))
    while hi - lo > 1e-3 * level_kwh:
        mid = (lo + hi) / 2.0
        if _holds(sized_kwh, mid, stored, r):
            hi = mid
        else:
            lo = mid
    return hi


def reserve(
    net_kwh: Mapping[str, ArrayLike],
    batteries: Mapping[str, FleetBattery],
    *,
    step_h: float,
    import_limit_kw: float,
    export_limit_kw: float,
    plan_to_share: float = PLAN_TO_SHARE,
    fleet_stored_kwh: ArrayLike | None = None,
    sizing_margin: float = SIZING_MARGIN,
    refill_share: float = REFILL_SHARE,
) -> FeederReservation:
    """The reservation for sites whose forecast net load (load - PV, kWh per step, + imports)
    is ``net_kwh``, with ``batteries`` at some of them (see the module docstring); the fleet's
    requirement is sized on the feeder's forecast import plus ``sizing_margin`` of it,
    counting ``refill_share`` of the headroom before a need as refill. With the
    community schedule's ``fleet_stored_kwh`` (the fleet's stored energy at each step's end,
    :func:`community_schedule`), each site also gets its share of it as ``suggested_kwh``."""
    names = sorted(net_kwh)
    if not names:
        raise ReservationError("no sites to reserve for")
    try:
        net = np.array([np.asarray(net_kwh[n], dtype=np.float64) for n in names])
    except ValueError as err:
        raise ReservationError(f"the sites' forecasts differ in length: {err}") from err
    if net.ndim != 2 or net.shape[1] == 0 or not np.all(np.isfinite(net)):
        raise ReservationError("every site needs a finite forecast of the same, non-zero length")
    if not step_h > 0 or not import_limit_kw > 0 or not export_limit_kw > 0:
        raise ReservationError("step_h and the feeder's limits must be positive")
    unknown = sorted(set(batteries) - set(names))
    if unknown:
        raise ReservationError(f"batteries at sites without a forecast: {', '.join(unknown)}")
    fleet = [batteries[n] for n in names if n in batteries]
    n_t = net.shape[1]
    feeder = net.sum(axis=0)
    limit_in = import_limit_kw * plan_to_share * step_h
    limit_out = export_limit_kw * plan_to_share * step_h
    charge_kwh = sum(b.max_charge_kw for b in fleet) * step_h
    discharge_kwh = sum(b.max_discharge_kw for b in fleet) * step_h
    eta_c = _weighted(fleet, "charge_efficiency")
    eta_d = _weighted(fleet, "discharge_efficiency")
    low = sum(b.min_kwh for b in fleet)
    high = sum(b.max_kwh for b in fleet)
    sized = feeder + sizing_margin * np.maximum(feeder, 0.0)  # the requirement's import
    fleet_now = sum(b.stored_kwh for b in fleet)
    rates = _Rates(charge_kwh, discharge_kwh, eta_c, eta_d, low, high)
    unavoidable = np.maximum(feeder - limit_in - discharge_kwh, 0.0) - np.maximum(
        -feeder - limit_out - charge_kwh, 0.0
    )
    if fleet and not _holds(feeder, limit_in, fleet_now, rates):  # on the forecast itself
        limit_in = _lowest_level(feeder, limit_in, fleet_now, rates)
    required, _ = _requirement(sized, limit_in, rates, refill_share)
    share = _shares(names, batteries)
    headroom = (limit_in - feeder, limit_out + feeder)
    tight = (headroom[0] < charge_kwh, headroom[1] < discharge_kwh)
    fleet_e = None if fleet_stored_kwh is None else np.asarray(fleet_stored_kwh, np.float64)
    sites = {}
    for row, name in enumerate(names):
        w, b = share.get(name, 0.0), batteries.get(name)
        if b is None or w <= 0:
            none = np.full(n_t, np.nan)
            sites[name] = SiteReservation(none, none, none, none)
            continue
        above = (required - low) * w
        suggested = np.full(n_t, np.nan)
        if fleet_e is not None:
            suggested[: len(fleet_e)] = b.min_kwh + w * np.maximum(fleet_e[:n_t] - low, 0.0)
        sites[name] = SiteReservation(
            floor_kwh=np.where(above > 1e-9, b.min_kwh + above, np.nan),
            import_cap_kw=np.where(tight[0], (net[row] + w * headroom[0]) / step_h, np.nan),
            export_cap_kw=np.where(tight[1], (-net[row] + w * headroom[1]) / step_h, np.nan),
            suggested_kwh=suggested,
        )
    return FeederReservation(required, unavoidable, sites, limit_in / step_h)


def _weighted(fleet: Sequence[FleetBattery], what: str) -> float:
    """An efficiency of the fleet, weighted by capacity (0.95 without a battery)."""
    total = sum(b.max_kwh for b in fleet)
    if total <= 0:
        return 0.95
    return float(sum(getattr(b, what) * b.max_kwh for b in fleet) / total)


def _shares(names: Sequence[str], batteries: Mapping[str, FleetBattery]) -> dict[str, float]:
    """Each site's share of the fleet, by usable capacity."""
    usable = {n: max(0.0, b.max_kwh - b.min_kwh) for n, b in batteries.items() if n in names}
    total = sum(usable.values())
    return {n: u / total for n, u in usable.items()} if total > 0 else {}


def flatten(values: ArrayLike) -> list[float | None]:
    """A per-step array as a message carries it: NaN becomes None."""
    return [None if not np.isfinite(v) else round(float(v), 4) for v in np.asarray(values)]


def unflatten(values: Sequence[float | None]) -> NDArray[np.float64]:
    """A message's per-step list as an array: None becomes NaN."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


#: The stored energy the reservation assumes a battery keeps (its readings carry no bounds),
#: % of its capacity.
ASSUMED_SOC_MIN_PCT = 5.0


def after_award(
    battery: FleetBattery, net_kwh: float | None, award_kwh: float | None, step_h: float
) -> FleetBattery:
    """``battery`` at the end of the interval just cleared, if its site keeps its award
    (``award_kwh``, + bought) against its forecast net load (``net_kwh``, load - PV, + imports):
    the battery covers the difference (+ discharging) within its power and energy bounds. The
    forecasts are made at that interval's gate, so the first step they plan starts when it
    ends; counting the interval as if the battery stayed idle would plan with energy it will
    have spent (or without what it will have stored). Without a forecast or an award (the site
    did not bid): the battery as it is."""
    if net_kwh is None or award_kwh is None:
        return battery
    if not (math.isfinite(net_kwh) and math.isfinite(award_kwh) and step_h > 0):
        return battery
    b = battery
    ac_kwh = min(max(net_kwh - award_kwh, -b.max_charge_kw * step_h), b.max_discharge_kw * step_h)
    eta = 1.0 / b.discharge_efficiency if ac_kwh > 0 else b.charge_efficiency
    change = -ac_kwh * eta
    low, high = min(b.min_kwh, b.stored_kwh), max(b.max_kwh, b.stored_kwh)
    return replace(b, stored_kwh=min(max(b.stored_kwh + change, low), high))


def fleet_from_readings(
    readings: Sequence[tuple[float | None, float | None, float | None]],
) -> FleetBattery | None:
    """A site's batteries as the reservation sees them, from each battery's latest reading
    ``(soc %, capacity Wh, rated power W)``; None when none reports all three."""
    known = [
        (soc, cap, power)
        for soc, cap, power in readings
        if soc is not None and cap is not None and power is not None and cap > 0
    ]
    if not known:
        return None
    return FleetBattery(
        stored_kwh=sum(soc / 100.0 * cap for soc, cap, _ in known) / 1000.0,
        min_kwh=sum(ASSUMED_SOC_MIN_PCT / 100.0 * cap for _, cap, _ in known) / 1000.0,
        max_kwh=sum(cap for _, cap, _ in known) / 1000.0,
        max_charge_kw=sum(power for _, _, power in known) / 1000.0,
        max_discharge_kw=sum(power for _, _, power in known) / 1000.0,
    )


@dataclass(frozen=True, slots=True)
class CommunityPlan:
    """The community's batteries scheduled as one on the forecast: the price to expect per
    step (currency per kWh) and the fleet's stored energy at each step's end (kWh; None
    without batteries)."""

    price_per_kwh: NDArray[np.float64]
    stored_kwh: NDArray[np.float64] | None


def community_schedule_steps(
    feeder_net_kwh: ArrayLike,
    fleet: Sequence[FleetBattery],
    *,
    retail_per_kwh: ArrayLike,
    feed_in_per_kwh: ArrayLike,
    step_h: float,
    import_limit_kw: float,
    export_limit_kw: float,
) -> ScheduleSteps[CommunityPlan]:
    """The local price to expect per step (currency per kWh): the marginal price of feeder
    energy when the community's batteries, taken as one, are scheduled at their best over the
    forecast (:func:`coordinator.schedule.perfect_foresight` on the forecast feeder flow,
    ``feeder_net_kwh``, + imports), clipped to each step's feed-in and retail tariffs.

    A price-taking plan against the tariffs alone (retail while the feeder imports, feed-in
    while it exports) expects every battery to fill from a midday surplus that the batteries
    together would exhaust; this price already counts what they do together, so each site's
    plan sees what energy is worth to the community (the value of storage where the batteries
    are neither full nor empty). Energy left at the end is valued as :mod:`edge.plan` values
    it (what it costs to put back, at most what it displaces). The schedule's stored energy
    goes with it: the reservation shares it out as each site's suggestion. In steps
    (:data:`coordinator.schedule.ScheduleSteps`; :func:`community_schedule` makes it at
    once)."""
    net = np.asarray(feeder_net_kwh, dtype=np.float64)
    retail = np.broadcast_to(np.asarray(retail_per_kwh, dtype=np.float64), net.shape)
    feed_in = np.broadcast_to(np.asarray(feed_in_per_kwh, dtype=np.float64), net.shape)
    fleet = [b for b in fleet if b.max_kwh > 0 and max(b.max_charge_kw, b.max_discharge_kw) > 0]
    if not fleet:
        return CommunityPlan(np.clip(np.where(net > 0, retail, feed_in), feed_in, retail), None)
    capacity = sum(b.max_kwh for b in fleet)
    low = sum(b.min_kwh for b in fleet) / capacity * 100.0
    stored = sum(b.stored_kwh for b in fleet) / capacity * 100.0
    eta_c = _weighted(fleet, "charge_efficiency")
    eta_d = _weighted(fleet, "discharge_efficiency")
    battery = Battery(
        capacity_wh=capacity * 1000.0,
        rated_power_w=sum(max(b.max_charge_kw, b.max_discharge_kw) for b in fleet) * 1000.0,
        soc_pct=float(np.clip(stored, low, 100.0)),
        soc_min_pct=low,
        soc_max_pct=100.0,
        charge_efficiency=eta_c,
        discharge_efficiency=eta_d,
    )
    end_value = min(float(retail.min()) / eta_c, float(np.median(retail)) * eta_d)
    schedule = yield from perfect_foresight_steps(
        net / step_h * 1000.0,
        [battery],
        retail,
        feed_in,
        step_h * 3600.0,
        import_limit_w=import_limit_kw * 1000.0,
        export_limit_w=export_limit_kw * 1000.0,
        end_value_per_kwh=[end_value],
    )
    stored_kwh = schedule.soc_pct[0, 1:] / 100.0 * capacity
    return CommunityPlan(np.clip(schedule.price_per_kwh, feed_in, retail), stored_kwh)


#: :func:`community_schedule_steps` made at once (solved in this thread).
community_schedule = at_once(community_schedule_steps)
