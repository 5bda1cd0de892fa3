"""The demo's truthful report: billing every alternative the same way (wattmesh.economics),
stored energy valued, both baselines, the ledger's words, the options and the plot."""

from __future__ import annotations

import numpy as np
import pytest

from wattmesh.economics import (
    Contract,
    SiteEnergy,
    Usage,
    figures,
    saving_pct,
    site_costs,
    stored_value,
    usage_of,
)


def _usage() -> Usage:
    # Two sites, two intervals: "a" imports 10 then exports 4 kWh; "factory" exports 6 then
    # imports 2 kWh. Retail 0.30 / feed-in 0.10, then 0.20 / 0.10.
    return Usage(
        intervals=(7, 8),
        sites={"a": SiteEnergy(5.0, 7.0), "factory": SiteEnergy(0.0, 0.0)},
        metered_kwh={"a": np.array([10.0, -4.0]), "factory": np.array([-6.0, 2.0])},
        retail_per_kwh=np.array([0.30, 0.20]),
        feed_in_per_kwh=np.array([0.10, 0.10]),
        charge_efficiency={"a": 0.8, "factory": 1.0},
        feeder_limit_w=12_000.0,  # 3 kWh per 15 minutes
    )


def test_stored_energy_is_valued_at_the_last_retail_tariff_over_the_charge_efficiency() -> None:
    # "a" gained 2 kWh: 2 * 0.20 / 0.8 = 0.50.
    assert stored_value(_usage()) == pytest.approx(0.50)


def test_regime_a_bills_the_feeder_net_and_credits_stored_energy() -> None:
    # Feeder net: +4 kWh at 0.30, then -2 kWh at 0.10: 1.20 - 0.20 = 1.00; minus 0.50 stored.
    f = figures(_usage(), Contract("a"))
    assert f.cost == pytest.approx(0.50)
    assert f.peak_kw == pytest.approx(16.0)  # 4 kWh in 15 minutes
    assert f.above_limit_kwh == pytest.approx(1.0)  # 4 kWh against 3
    assert site_costs(_usage(), Contract("a")) is None  # no per-site bill behind one meter


def test_regime_b_bills_each_site_with_shared_energy_at_the_local_price() -> None:
    # Interval 1: 6 kWh shared from factory to a at the local price 0.20 (+0.03 charge);
    # a buys 4 more at 0.30. Interval 2: 2 kWh shared from a to factory at 0.15 (+0.03); a
    # sells 2 more at 0.10.
    costs = site_costs(_usage(), Contract("b", local_charge_per_kwh=0.03))
    assert costs is not None
    a = 6 * 0.23 + 4 * 0.30 - 2 * 0.15 - 2 * 0.10 - 0.50
    factory = -6 * 0.20 + 2 * 0.18
    assert costs == pytest.approx({"a": a, "factory": factory})
    assert figures(_usage(), Contract("b")).cost == pytest.approx(a + factory)


def test_a_run_restricted_to_common_intervals_keeps_only_those() -> None:
    kept = usage_of(_usage(), (7, 8), (8, 9))
    assert kept.intervals == (8,)
    assert kept.metered_kwh["a"].tolist() == [-4.0]
    assert kept.retail_per_kwh.tolist() == [0.20]


def test_percentages_only_where_the_baseline_cost_means_something() -> None:
    assert saving_pct(90.0, 100.0) == "+10.0"
    assert saving_pct(-0.5, 0.4) == "n/a"
    assert saving_pct(110.0, -100.0) == "-210.0"
