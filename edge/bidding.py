"""Bid curves for one market interval: pure functions, energies in kWh, prices per kWh.

A site's net demand in an interval is its expected load minus PV (positive = it must import).
Its battery adds flexibility: it can charge (buy more) when the price is low and discharge
(buy less, or sell) when it is high. The curve is expressed as buy steps by falling price and
sell steps by rising price, the shape ``broker.messages.Bid`` accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Quantities below this are not worth a step (kWh).
MIN_STEP_KWH = 1e-3


@dataclass(frozen=True, slots=True)
class CurveSteps:
    """Buy steps (price, kWh) by falling price and sell steps by rising price."""

    buy: tuple[tuple[float, float], ...]
    sell: tuple[tuple[float, float], ...]


def bid_curve(
    net_demand_kwh: float,
    *,
    charge_kwh: float,
    discharge_kwh: float,
    max_buy_price_per_kwh: float,
    min_sell_price_per_kwh: float,
    charge_price_per_kwh: float,
    discharge_price_per_kwh: float,
    role: str = "prosumer",
) -> CurveSteps:
    """The step curve for an interval.

    - The inflexible part: ``net_demand_kwh`` > 0 is bought at up to ``max_buy_price_per_kwh``
      (the site would pay the retail tariff anyway); < 0 (a surplus) is offered from
      ``min_sell_price_per_kwh``.
    - The battery: up to ``charge_kwh`` more is bought at ``charge_price_per_kwh`` or less;
      up to ``discharge_kwh`` is released at ``discharge_price_per_kwh`` or more, first by
      buying less of the inflexible need, the rest offered for sale.

    Every site bids its own need or surplus. Roles limit what its battery trades: a producer's
    battery only sells (it never buys to charge), a consumer's only serves the site (it never
    sells beyond the site's need). Prices must satisfy min_sell <= charge < discharge <=
    max_buy for a coherent curve.
    """
    if not charge_price_per_kwh < discharge_price_per_kwh:
        raise ValueError("the charge price must be below the discharge price")
    charge_kwh, discharge_kwh = max(charge_kwh, 0.0), max(discharge_kwh, 0.0)
    if role == "producer":
        charge_kwh = min(charge_kwh, max(-net_demand_kwh, 0.0))  # stores only its own surplus
    elif role == "consumer":
        discharge_kwh = min(discharge_kwh, max(net_demand_kwh, 0.0))  # serves only itself
    buy: list[tuple[float, float]] = []
    sell: list[tuple[float, float]] = []
    if net_demand_kwh > 0:
        # Discharging covers part of the need when the price is high enough.
        covered = min(discharge_kwh, net_demand_kwh)
        firm = net_demand_kwh - covered
        if firm > MIN_STEP_KWH:
            buy.append((max_buy_price_per_kwh, firm))
        if covered > MIN_STEP_KWH:
            buy.append((discharge_price_per_kwh, covered))
        spare = discharge_kwh - covered
        if spare > MIN_STEP_KWH:
            # Sold only above the discharge price: strictly above every buy price.
            sell.append((discharge_price_per_kwh + 1e-4, spare))
        if charge_kwh > MIN_STEP_KWH:
            buy.append((charge_price_per_kwh, charge_kwh))
    else:
        # A surplus: sold, except what the battery would rather store when the price is
        # at or below the charge price. Buying to charge while exporting makes no sense.
        surplus = -net_demand_kwh
        absorbed = min(charge_kwh, surplus)
        firm = surplus - absorbed
        if firm > MIN_STEP_KWH:
            sell.append((min_sell_price_per_kwh, firm))
        if absorbed > MIN_STEP_KWH:
            sell.append((max(min_sell_price_per_kwh, charge_price_per_kwh + 1e-4), absorbed))
        if discharge_kwh > MIN_STEP_KWH:
            sell.append((max(min_sell_price_per_kwh, discharge_price_per_kwh), discharge_kwh))
    buy.sort(key=lambda s: -s[0])
    sell.sort(key=lambda s: s[0])
    if buy and sell and max(p for p, _ in buy) >= min(p for p, _ in sell):
        # Keep the curve coherent: drop sell steps at or below the highest buy price.
        top = max(p for p, _ in buy)
        sell = [s for s in sell if s[0] > top]
    return CurveSteps(tuple(buy), tuple(sell))


def interval_energy_kwh(power_w: float, interval_s: float) -> float:
    """Energy of a constant power over an interval, kWh."""
    return power_w * interval_s / 3.6e6
