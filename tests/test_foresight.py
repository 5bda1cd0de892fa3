"""The perfect-foresight LP (wattmesh.foresight) on cases checked by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from coordinator.sharing import connection_point_cost, energy_sharing_cost
from simulators.scenario import load_scenario
from wattmesh.backtest import run_backtest
from wattmesh.foresight import ForesightError, LpBattery, perfect_foresight

QUARTER_H = 0.25


def _battery(**kw: float) -> LpBattery:
    # 20 kWh, 40 kW: at most 10 kWh per 15-minute interval; empty unless told otherwise
    args: dict[str, float] = {
        "capacity_wh": 20_000.0,
        "rated_power_w": 40_000.0,
        "soc_pct": 0.0,
        "soc_min_pct": 0.0,
        "charge_efficiency": 0.9,
        "discharge_efficiency": 0.9,
    }
    args.update(kw)
    return LpBattery(site=0, **args)


def test_it_charges_in_the_cheap_interval_and_discharges_in_the_dear_one() -> None:
    # Interval 0 at 0.10, interval 1 at 0.40 with 10 kWh of load. Each kWh charged returns
    # 0.9 * 0.9 = 0.81 kWh, worth 0.324 > 0.10: charge the full 10 kWh the rating allows,
    # discharge 8.1 kWh. Cost 10 * 0.10 + (10 - 8.1) * 0.40 = 1.76.
    result = perfect_foresight(
        [[0.0, 10.0]],
        [_battery()],
        interval_h=QUARTER_H,
        regime="a",
        retail_per_kwh=[0.10, 0.40],
        feed_in_per_kwh=0.0,
    )
    assert result.metered_kwh == pytest.approx(np.array([[10.0, 1.9]]))
    assert result.stored_kwh == pytest.approx(np.array([[9.0, 0.0]]))
    assert result.objective == pytest.approx(1.76)
    bill = connection_point_cost(
        result.metered_kwh, retail_per_kwh=[0.10, 0.40], feed_in_per_kwh=0.0
    )
    assert float(bill.sum()) == pytest.approx(result.objective)


def test_a_spread_smaller_than_the_round_trip_loss_leaves_the_battery_idle() -> None:
    # 0.81 * 0.35 = 0.2835 < 0.30: cycling loses money.
    result = perfect_foresight(
        [[0.0, 10.0]],
        [_battery()],
        interval_h=QUARTER_H,
        regime="a",
        retail_per_kwh=[0.30, 0.35],
        feed_in_per_kwh=0.0,
    )
    assert result.metered_kwh == pytest.approx(np.array([[0.0, 10.0]]))
    assert result.objective == pytest.approx(3.5)


def test_the_feeder_limit_binds_even_without_a_price_spread() -> None:
    # Flat price, lossless battery, 5 kWh per interval allowed at the feeder: 5 kWh move.
    result = perfect_foresight(
        [[0.0, 10.0]],
        [_battery(charge_efficiency=1.0, discharge_efficiency=1.0)],
        interval_h=QUARTER_H,
        regime="a",
        retail_per_kwh=0.30,
        feed_in_per_kwh=0.0,
        import_limit_kwh=5.0,
    )
    assert result.metered_kwh == pytest.approx(np.array([[5.0, 5.0]]))
    assert result.objective == pytest.approx(3.0)


def test_energy_above_the_limit_is_minimised_when_the_limit_cannot_be_kept() -> None:
    # No battery: 10 kWh against a 4 kWh limit leaves 6 kWh over, at 10 per kWh.
    result = perfect_foresight(
        [[10.0]],
        [],
        interval_h=QUARTER_H,
        regime="a",
        retail_per_kwh=0.3,
        feed_in_per_kwh=0.0,
        import_limit_kwh=4.0,
    )
    assert result.objective == pytest.approx(3.0 + 60.0)


def test_stored_energy_at_the_end_is_credited_at_its_value() -> None:
    # Worth 0.5 per stored kWh, bought at 0.10 with 90 % charge efficiency: charge 10 kWh,
    # store 9; objective 10 * 0.10 - 9 * 0.5 = -3.5.
    result = perfect_foresight(
        [[0.0]],
        [_battery(stored_value_per_kwh=0.5)],
        interval_h=QUARTER_H,
        regime="a",
        retail_per_kwh=0.10,
        feed_in_per_kwh=0.0,
    )
    assert result.stored_kwh == pytest.approx(np.array([[9.0]]))
    assert result.objective == pytest.approx(-3.5)


def test_a_demand_charge_makes_a_full_battery_shave_the_peak() -> None:
    # 10 kWh in one quarter hour is 40 kW; at 1.0 per kW the peak costs 40 (43 with the energy).
    # Draining 10 kWh of the full lossless battery into it costs their stored value, 3, and
    # leaves nothing to buy: objective 3.
    result = perfect_foresight(
        [[10.0, 0.0]],
        [
            _battery(
                soc_pct=100.0,
                charge_efficiency=1.0,
                discharge_efficiency=1.0,
                stored_value_per_kwh=0.3,
            )
        ],
        interval_h=QUARTER_H,
        regime="a",
        retail_per_kwh=0.30,
        feed_in_per_kwh=0.0,
        demand_charge_per_kw=1.0,
    )
    assert result.metered_kwh == pytest.approx(np.array([[0.0, 0.0]]), abs=1e-9)
    assert result.objective == pytest.approx(3.0)


def test_energy_sharing_without_batteries_costs_what_the_sharing_bill_says() -> None:
    # Site 0 exports 4 kWh while site 1 imports 6: 4 kWh shared. 6 * 0.3 - 4 * 0.1
    # - 4 * (0.3 - 0.1 - 0.05) = 0.8.
    net = [[-4.0], [6.0]]
    result = perfect_foresight(
        net,
        [],
        interval_h=QUARTER_H,
        regime="b",
        retail_per_kwh=0.3,
        feed_in_per_kwh=0.1,
        local_price_per_kwh=0.2,
        local_network_charge_per_kwh=0.05,
    )
    bill = energy_sharing_cost(
        net,
        retail_per_kwh=0.3,
        feed_in_per_kwh=0.1,
        local_price_per_kwh=0.2,
        local_network_charge_per_kwh=0.05,
    )
    assert result.objective == pytest.approx(0.8)
    assert float(bill.sum()) == pytest.approx(0.8)


def test_energy_sharing_moves_a_battery_to_absorb_a_neighbours_export() -> None:
    # Site 0 exports 10 kWh in interval 0 and nothing later; site 1 (the battery's, lossless)
    # needs 10 kWh in interval 1. Buying the export locally at 0.2 + 0.02 and storing it beats
    # retail 0.3 later: site 1 charges 10 kWh in interval 0.
    bat = LpBattery(
        site=1,
        capacity_wh=20_000.0,
        rated_power_w=40_000.0,
        soc_pct=0.0,
        soc_min_pct=0.0,
        charge_efficiency=1.0,
        discharge_efficiency=1.0,
    )
    result = perfect_foresight(
        [[-10.0, 0.0], [0.0, 10.0]],
        [bat],
        interval_h=QUARTER_H,
        regime="b",
        retail_per_kwh=0.3,
        feed_in_per_kwh=0.1,
        local_price_per_kwh=0.2,
        local_network_charge_per_kwh=0.02,
    )
    assert result.metered_kwh == pytest.approx(np.array([[-10.0, 0.0], [10.0, 0.0]]), abs=1e-9)
    # the community pays 10 * 0.22 and the farm is paid 10 * 0.2: 0.2 net
    assert result.objective == pytest.approx(0.2)


#: A day with two import peaks against a 5 kWh limit (1 and 2 kWh above it), under a flat
#: tariff (0.30, no feed-in). The battery starts empty and returns 80 % of what it charges
#: (charge 0.8, discharge 1.0): each kWh shaved costs 1.25 kWh bought, 0.075 of losses.
PEAKS_KWH = [[2.0, 6.0, 2.0, 7.0]]
LIMIT_KWH = 5.0
FLAT = 0.30


def _peaks(**allowance: float) -> tuple[float, NDArray[np.float64]]:
    result = perfect_foresight(
        PEAKS_KWH,
        [_battery(charge_efficiency=0.8, discharge_efficiency=1.0)],
        interval_h=QUARTER_H,
        regime="a",
        retail_per_kwh=FLAT,
        feed_in_per_kwh=0.0,
        import_limit_kwh=LIMIT_KWH,
        **allowance,
    )
    bill = connection_point_cost(result.metered_kwh, retail_per_kwh=FLAT, feed_in_per_kwh=0.0)
    assert float(bill.sum()) == pytest.approx(result.objective)
    return result.objective, result.metered_kwh.sum(axis=0)


def test_without_an_allowance_keeping_the_limit_pays_the_storage_losses() -> None:
    # 3 kWh shaved need 3.75 kWh charged off-peak: 17.75 kWh bought, 5.325 against 5.1 idle.
    cost, feeder = _peaks()
    assert cost == pytest.approx(FLAT * (17.0 + 0.25 * 3.0))
    assert feeder.max() == pytest.approx(LIMIT_KWH)


def test_an_allowance_covering_the_excess_leaves_the_battery_idle() -> None:
    # 2 kWh per interval and 3 kWh in all cover both peaks: nothing to shave, the idle cost.
    cost, feeder = _peaks(over_limit_cap_kwh=2.0, over_limit_budget_kwh=3.0)
    assert cost == pytest.approx(FLAT * 17.0)
    assert feeder == pytest.approx(np.array(PEAKS_KWH[0]))


def test_a_budget_below_the_excess_shaves_exactly_the_excess_beyond_it() -> None:
    # 3 kWh above the limit, 1.2 kWh free in all (at most 1.5 in one interval): 1.8 kWh shaved,
    # at least 0.5 of them in the 7 kWh interval; 2.25 kWh charged, 17.45 kWh bought.
    cost, feeder = _peaks(over_limit_cap_kwh=1.5, over_limit_budget_kwh=1.2)
    assert cost == pytest.approx(FLAT * 17.45)
    above = np.maximum(feeder - LIMIT_KWH, 0.0)
    assert above.sum() == pytest.approx(1.2)
    assert above.max() <= 1.5 + 1e-9


def test_a_cap_per_interval_below_the_excess_shaves_what_goes_beyond_the_cap() -> None:
    # 0.5 kWh free per interval, no budget: 0.5 and 1.5 kWh shaved, 2.5 kWh charged.
    cost, feeder = _peaks(over_limit_cap_kwh=0.5)
    assert cost == pytest.approx(FLAT * 17.5)
    assert feeder[[1, 3]] == pytest.approx(np.array([5.5, 5.5]))


def test_the_allowance_applies_to_the_sum_of_the_sites_in_energy_sharing() -> None:
    # Regime (b): the feeder carries 2 then 6 kWh (4 + 2 of two sites) against 5; the battery
    # at site 1 shaves what goes beyond 0.6 kWh free: 0.4 kWh, for 0.5 kWh charged.
    battery = LpBattery(
        site=1,
        capacity_wh=20_000.0,
        rated_power_w=40_000.0,
        soc_pct=0.0,
        soc_min_pct=0.0,
        charge_efficiency=0.8,
        discharge_efficiency=1.0,
    )
    result = perfect_foresight(
        [[1.0, 4.0], [1.0, 2.0]],
        [battery],
        interval_h=QUARTER_H,
        regime="b",
        retail_per_kwh=FLAT,
        feed_in_per_kwh=0.0,
        import_limit_kwh=LIMIT_KWH,
        over_limit_cap_kwh=0.6,
    )
    assert result.metered_kwh == pytest.approx(np.array([[1.0, 4.0], [1.5, 1.6]]))
    assert result.objective == pytest.approx(FLAT * 8.1)


def test_no_allowance_is_the_programme_as_it_was() -> None:
    # A zero cap or a zero budget is no allowance: the same optimum as without the arguments.
    plain, _ = _peaks()
    assert _peaks(over_limit_cap_kwh=0.0, over_limit_budget_kwh=5.0)[0] == plain
    assert _peaks(over_limit_cap_kwh=5.0, over_limit_budget_kwh=0.0)[0] == plain


def test_a_negative_allowance_is_refused() -> None:
    with pytest.raises(ForesightError, match="over_limit_cap_kwh"):
        _peaks(over_limit_cap_kwh=-1.0)


def test_feed_in_at_or_above_retail_is_refused() -> None:
    with pytest.raises(ForesightError, match="below retail"):
        perfect_foresight(
            [[1.0]], [], interval_h=QUARTER_H, regime="a", retail_per_kwh=0.1, feed_in_per_kwh=0.1
        )


def test_on_a_backtest_the_lp_is_no_dearer_than_the_idle_batteries_it_could_have_kept() -> None:
    # Idle batteries are one schedule the LP may choose (no limits, stored energy worth 0.2):
    # its optimum costs at most their bill, and less, since the tariff's spread pays cycling.
    community = Path(__file__).resolve().parents[1] / "config" / "scenarios" / "community.toml"
    idle = run_backtest(load_scenario(community), days=0.25, variant="idle")
    names = sorted(idle.net_kwh)
    batteries = [
        LpBattery(
            site=names.index(name),
            capacity_wh=b.capacity_wh,
            rated_power_w=b.rated_power_w,
            soc_pct=b.soc_pct,
            soc_min_pct=b.soc_min_pct,
            soc_max_pct=b.soc_max_pct,
            charge_efficiency=b.charge_efficiency,
            discharge_efficiency=b.discharge_efficiency,
            stored_value_per_kwh=0.2,
        )
        for name in names
        for b in idle.batteries[name]
    ]
    assert len(batteries) == 3
    lp = perfect_foresight(
        np.array([idle.net_kwh[n] for n in names]),
        batteries,
        interval_h=QUARTER_H,
        regime="a",
        retail_per_kwh=idle.retail_per_kwh,
        feed_in_per_kwh=idle.feed_in_per_kwh,
    )
    metered = np.array([idle.metered_kwh[n] for n in names])
    bill = float(
        connection_point_cost(
            metered, retail_per_kwh=idle.retail_per_kwh, feed_in_per_kwh=idle.feed_in_per_kwh
        ).sum()
    )
    assert lp.objective < bill - 1.0
    assert np.all(lp.stored_kwh >= -1e-9)
