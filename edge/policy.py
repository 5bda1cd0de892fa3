"""The edge's decisions as pure functions: no I/O, no clock, no logging.

:class:`edge.agent.EdgeAgent` wires them to the bus and the devices; the stepped simulation
engine (:mod:`wattmesh.backtest`) calls the same functions on simulated devices.

Signs (docs/architecture.md section 4): site power positive when importing; battery
power positive when discharging. Precedence (docs/architecture.md section 5, highest first):
device safety limits > a grid emergency order > an unexpired dispatch command > the
interval's market commitment > the local fallback controller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from edge.bidding import CurveSteps, bid_curve, interval_energy_kwh
from edge.config import FallbackSection, LimitsSection, MarketSection
from edge.control import keep_peak_reserve_w, self_consumption_setpoint_w

#: A renewed setpoint is written again only when it moved by at least this share of the
#: battery's rated discharge power (or 50 W, whichever is larger).
RENEW_STEP_SHARE = 0.01


@dataclass(frozen=True, slots=True)
class BatteryView:
    """One available battery as the policy sees it (W, %, Wh; None when not reported)."""

    rated_discharge_w: float | None
    rated_charge_w: float | None
    soc_pct: float | None
    soc_min_pct: float
    soc_max_pct: float
    capacity_wh: float | None = None


@dataclass(frozen=True, slots=True)
class Command:
    """The order in force (an emergency or a dispatch): battery power W (+ discharges) or a
    load limit W on the site's import."""

    priority: str
    battery_power_w: float | None = None
    load_limit_w: float | None = None


@dataclass(frozen=True, slots=True)
class Commitment:
    """The current interval's award: net import kWh (+ buys) at the clearing price."""

    quantity_kwh: float
    price_per_kwh: float


@dataclass(frozen=True, slots=True)
class PlanStep:
    """What the site's plan (:mod:`edge.plan`) asks of the interval it was made for: the
    site's grid exchange (W, + imports) and the price below which its batteries buy to charge
    (per kWh)."""

    grid_w: float
    charge_price_per_kwh: float


def rated_totals_w(batteries: Sequence[BatteryView]) -> tuple[float, float]:
    """(total rated charge W, total rated discharge W) of the batteries; unknown counts 0."""
    return (
        sum(b.rated_charge_w or 0.0 for b in batteries),
        sum(b.rated_discharge_w or 0.0 for b in batteries),
    )


def _clamp(value: float, low: float, high: float) -> float:
    """``value`` within ``[low, high]`` (``high`` if they cross; NaN stays NaN), as
    ``np.clip`` gives it for one number, without numpy's cost per call (the control runs
    every poll)."""
    return float(min(max(value, low), high))


def safety_clamp_w(
    target_w: float,
    net_load_w: float | None,
    *,
    import_limit_w: float | None,
    export_limit_w: float | None,
    max_charge_w: float,
    max_discharge_w: float,
) -> float:
    """The safety layer: the connection limits, then the rated powers, W (+ discharges).

    With the site's load net of PV ``net_load_w`` (batteries idle), the site imports
    ``net_load_w - target_w``: the battery discharges at least ``net_load_w - import_limit_w``
    and at most ``net_load_w + export_limit_w``; then ``-max_charge_w <= target <=
    max_discharge_w``.
    """
    if net_load_w is not None and import_limit_w is not None:
        target_w = max(target_w, net_load_w - import_limit_w)
    if net_load_w is not None and export_limit_w is not None:
        target_w = min(target_w, net_load_w + export_limit_w)
    return _clamp(target_w, -max_charge_w, max_discharge_w)


def decide_setpoint_w(
    batteries: Sequence[BatteryView],
    net_load_w: float | None,
    soc_pct: float | None,
    *,
    command: Command | None,
    award: Commitment | None,
    market: MarketSection,
    fallback: FallbackSection,
    limits: LimitsSection,
    plan: PlanStep | None = None,
) -> tuple[float | None, str]:
    """The total battery setpoint (W, + discharges) and the layer it comes from.

    ``net_load_w`` is the site's load net of PV with its batteries idle (W, + importing),
    ``soc_pct`` the capacity-weighted state of charge; ``command`` the emergency or dispatch
    order in force (the emergency if both are), ``award`` the current interval's. A command
    with only a load limit discharges what the net load exceeds it by. The market layer keeps
    the award (``net - award power``) but never buys dear energy to charge (above the
    battery charge price while the site imports) and keeps the peak-shaving reserve. The
    fallback is self-consumption (or idle). With a ``plan`` for the interval, the market
    layer buys to charge only below the plan's charge price and leaves the reserve to the plan
    (which keeps what the forecast peak needs); without an award the ``"plan"`` layer keeps
    the planned grid exchange (``net - plan grid``). The result passes :func:`safety_clamp_w`;
    the layer is then ``"safety"`` if that changed it. No battery: ``(None, "fallback")``.
    """
    if not batteries:
        return None, "fallback"
    max_cha, max_dis = rated_totals_w(batteries)
    net = net_load_w
    target: float | None
    layer: str
    if command is not None:
        layer = command.priority
        target = command.battery_power_w
        if target is None and command.load_limit_w is not None and net is not None:
            target = max(0.0, net - command.load_limit_w)  # discharge to respect the cap
    elif award is not None and net is not None and plan is not None:
        layer = "market"
        target = net - award.quantity_kwh * 3.6e6 / market.interval_s
        if target < 0 < net and award.price_per_kwh > plan.charge_price_per_kwh:
            target = 0.0  # as below: the plan values stored energy below this price
    elif award is not None and net is not None:
        layer = "market"
        target = net - award.quantity_kwh * 3.6e6 / market.interval_s
        if target < 0 < net and award.price_per_kwh > market.battery_charge_price_per_kwh:
            # Keeping the award would mean buying dear energy to charge the battery (the
            # forecast overshot): deviate instead; the imbalance costs less than that.
            target = 0.0
        # The energy below the peak-shaving reserve was not offered to the market: it
        # covers a forecast shortfall only beyond the fallback's import cap (the rest is
        # imbalance). The cap itself is the fallback's: the feeder is the coordinator's.
        target = float(
            keep_peak_reserve_w(
                target,
                net,
                soc_pct if soc_pct is not None else 100.0,
                import_cap_w=fallback.import_cap_w,
                reserve_soc_pct=fallback.reserve_soc_pct if soc_pct is not None else None,
            )
        )
    elif plan is not None and net is not None:
        layer, target = "plan", net - plan.grid_w
    elif fallback.mode == "self_consumption" and net is not None:
        layer = "fallback"
        target = float(
            self_consumption_setpoint_w(
                net,
                0.0,
                soc_pct if soc_pct is not None else 50.0,
                soc_min_pct=min(b.soc_min_pct for b in batteries),
                soc_max_pct=max(b.soc_max_pct for b in batteries),
                max_charge_w=max_cha,
                max_discharge_w=max_dis,
                import_cap_w=fallback.import_cap_w,
                reserve_soc_pct=fallback.reserve_soc_pct,
            )
        )
    else:
        layer, target = "fallback", 0.0
    if target is None:
        return None, layer
    safe = safety_clamp_w(
        target,
        net,
        import_limit_w=limits.import_limit_w,
        export_limit_w=limits.export_limit_w,
        max_charge_w=max_cha,
        max_discharge_w=max_dis,
    )
    return safe, ("safety" if abs(safe - target) > 1e-6 else layer)


def share_among_batteries_w(total_w: float, batteries: Sequence[BatteryView]) -> list[float]:
    """Each battery's part of ``total_w`` (W, + discharges), rounded to whole watts.

    Pro rata to the rated discharge power when discharging (rated charge power when
    charging); a battery at its state-of-charge bound in the asked direction gets 0.
    """
    weights = [(b.rated_discharge_w if total_w > 0 else b.rated_charge_w) or 0.0 for b in batteries]
    whole = sum(weights) or 1.0
    shares = []
    for b, weight in zip(batteries, weights, strict=True):
        share = total_w * weight / whole
        soc = b.soc_pct
        if soc is not None and (
            (share > 0 and soc <= b.soc_min_pct) or (share < 0 and soc >= b.soc_max_pct)
        ):
            share = 0.0
        shares.append(float(round(share)))
    return shares


def renew_step_w(rated_discharge_w: float | None) -> float:
    """The smallest change of a battery's setpoint worth writing before its renewal, W."""
    return max(50.0, RENEW_STEP_SHARE * (rated_discharge_w or 0.0))


def setpoint_due(
    share_w: float,
    last: tuple[float, float] | None,
    now_s: float,
    *,
    rated_discharge_w: float | None,
    renew_after_s: float,
) -> bool:
    """Whether a battery's setpoint ``share_w`` (W) must be written now: never written, moved
    by at least :func:`renew_step_w` from the last written ``(W, time s)``, or due for renewal
    ``renew_after_s`` after it (before the battery's revert timer sends it back to idle)."""
    return (
        last is None
        or abs(last[0] - share_w) >= renew_step_w(rated_discharge_w)
        or now_s - last[1] >= renew_after_s
    )


def clamp_to_rating_w(power_w: float, batteries: Sequence[BatteryView]) -> float:
    """A battery order (W, + discharges) within the batteries' total rated powers."""
    max_cha, max_dis = rated_totals_w(batteries)
    return _clamp(power_w, -max_cha, max_dis)


def bid_energy_kwh(
    batteries: Sequence[BatteryView], interval_s: float, *, reserve_soc_pct: float | None
) -> tuple[float, float]:
    """(chargeable kWh, dischargeable kWh) the batteries can offer over one interval.

    Each battery: at most its rated power for ``interval_s``, and at most the energy between
    its state of charge and its bound; energy below the larger of its minimum and the
    peak-shaving ``reserve_soc_pct`` is not offered. Batteries without SOC or capacity add 0.
    """
    hours = interval_s / 3600.0
    charge = discharge = 0.0
    for b in batteries:
        if b.soc_pct is None or b.capacity_wh is None:
            continue
        room_kwh = (b.soc_max_pct - b.soc_pct) / 100.0 * b.capacity_wh / 1000.0
        floor_pct = max(b.soc_min_pct, reserve_soc_pct or 0.0)
        avail_kwh = (b.soc_pct - floor_pct) / 100.0 * b.capacity_wh / 1000.0
        charge += max(0.0, min((b.rated_charge_w or 0.0) / 1000.0 * hours, room_kwh))
        discharge += max(0.0, min((b.rated_discharge_w or 0.0) / 1000.0 * hours, avail_kwh))
    return charge, discharge


def expected_net_kwh(
    start_ts: float,
    interval_s: float,
    *,
    forecast_start_ts: float | None = None,
    forecast_step_s: float | None = None,
    forecast_pv_w: ArrayLike = (),
    forecast_load_w: ArrayLike = (),
    recent_net_w: ArrayLike = (),
) -> float:
    """The site's expected net import (load - PV) over ``[start_ts, start_ts + interval_s)``,
    kWh: the mean of the forecast steps starting inside it; without any, the mean of the
    recent net load ``recent_net_w`` (W); without that, 0."""
    pv = np.asarray(forecast_pv_w, dtype=np.float64)
    if forecast_start_ts is not None and forecast_step_s is not None and len(pv):
        times = forecast_start_ts + forecast_step_s * np.arange(len(pv))
        mask = (times >= start_ts) & (times < start_ts + interval_s)
        if mask.any():
            net = np.asarray(forecast_load_w, dtype=np.float64)[mask] - pv[mask]
            return interval_energy_kwh(float(net.mean()), interval_s)
    recent = np.asarray(recent_net_w, dtype=np.float64)
    if len(recent):
        return interval_energy_kwh(float(np.mean(recent)), interval_s)
    return 0.0


def interval_bid(
    batteries: Sequence[BatteryView],
    net_demand_kwh: float,
    *,
    market: MarketSection,
    fallback: FallbackSection,
    role: str,
) -> CurveSteps:
    """The site's bid curve for one interval: its expected need or surplus and what its
    batteries can offer (:func:`bid_energy_kwh`) at the configured prices."""
    charge, discharge = bid_energy_kwh(
        batteries, market.interval_s, reserve_soc_pct=fallback.reserve_soc_pct
    )
    return bid_curve(
        net_demand_kwh,
        charge_kwh=charge,
        discharge_kwh=discharge,
        max_buy_price_per_kwh=market.max_buy_price_per_kwh,
        min_sell_price_per_kwh=market.min_sell_price_per_kwh,
        charge_price_per_kwh=market.battery_charge_price_per_kwh,
        discharge_price_per_kwh=market.battery_discharge_price_per_kwh,
        role=role,
    )
