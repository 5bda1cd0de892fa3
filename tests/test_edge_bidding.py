"""Bid curves: the shape the market accepts, on hand-checked cases."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.messages import Bid, BidStep
from edge.bidding import bid_curve

PRICES = {
    "max_buy_price_per_kwh": 1.0,
    "min_sell_price_per_kwh": 0.0,
    "charge_price_per_kwh": 0.12,
    "discharge_price_per_kwh": 0.25,
}


def test_a_need_is_bought_firmly_and_the_battery_covers_part_of_it_when_dear() -> None:
    curve = bid_curve(2.0, charge_kwh=1.0, discharge_kwh=0.5, **PRICES)
    assert curve.buy == ((1.0, 1.5), (0.25, 0.5), (0.12, 1.0))
    assert curve.sell == ()


def test_a_battery_larger_than_the_need_sells_the_rest_above_its_discharge_price() -> None:
    curve = bid_curve(0.5, charge_kwh=0.0, discharge_kwh=2.0, **PRICES)
    assert curve.buy == ((0.25, 0.5),)
    assert curve.sell == ((pytest.approx(0.2501), 1.5),)


def test_a_surplus_is_sold_and_the_battery_keeps_what_it_can_store_when_cheap() -> None:
    curve = bid_curve(-3.0, charge_kwh=1.0, discharge_kwh=0.0, **PRICES)
    assert curve.buy == ()
    assert curve.sell == ((0.0, 2.0), (pytest.approx(0.1201), 1.0))


def test_roles_limit_what_the_battery_trades_but_every_site_bids_its_own_need() -> None:
    producer = bid_curve(2.0, charge_kwh=1.0, discharge_kwh=0.0, role="producer", **PRICES)
    assert producer.buy == ((1.0, 2.0),)  # its own auxiliary load, but no charging from the grid
    consumer = bid_curve(0.5, charge_kwh=0.0, discharge_kwh=3.0, role="consumer", **PRICES)
    assert consumer.buy == ((0.25, 0.5),)  # its battery covers its need when dear ...
    assert consumer.sell == ()  # ... and sells nothing beyond it
    surplus = bid_curve(-2.0, charge_kwh=0.0, discharge_kwh=0.0, role="consumer", **PRICES)
    assert surplus.sell == ((0.0, 2.0),)


@given(net=st.floats(-50, 50), charge=st.floats(0, 20), discharge=st.floats(0, 20))
def test_every_curve_is_a_valid_bid_message(net: float, charge: float, discharge: float) -> None:
    curve = bid_curve(net, charge_kwh=charge, discharge_kwh=discharge, **PRICES)
    bid = Bid(
        ts=1e9,
        interval=1,
        buy=[BidStep(price_per_kwh=p, quantity_kwh=q) for p, q in curve.buy],
        sell=[BidStep(price_per_kwh=p, quantity_kwh=q) for p, q in curve.sell],
    )
    bought = sum(s.quantity_kwh for s in bid.buy)
    # At a very high price the site buys only its firm need: never more than it needs.
    firm = sum(s.quantity_kwh for s in bid.buy if s.price_per_kwh >= 1.0)
    assert firm <= max(net, 0.0) + 1e-9
    assert bought <= max(net, 0.0) + charge + 1e-9
