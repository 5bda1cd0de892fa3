"""Settlement regimes on metered energy (coordinator.sharing): hand-checked and summed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from coordinator.sharing import (
    alone_cost,
    connection_point_cost,
    energy_sharing_cost,
    shared_energy_kwh,
)

# Interval 0: A imports 3, B imports 1, C exports 2 -> 2 kWh shared (A 1.5, B 0.5; C 2).
# Interval 1: A exports 4, B imports 1, C imports 1 -> 2 kWh shared (B 1, C 1; A 2 of its 4).
METERED = np.array([[3.0, -4.0], [1.0, 1.0], [-2.0, 1.0]])


def test_shared_energy_is_allocated_pro_rata_on_both_sides() -> None:
    s = shared_energy_kwh(METERED)
    np.testing.assert_allclose(s.shared_kwh, [2.0, 2.0])
    np.testing.assert_allclose(s.received_kwh, [[1.5, 0.0], [0.5, 1.0], [0.0, 1.0]])
    np.testing.assert_allclose(s.given_kwh, [[0.0, 2.0], [0.0, 0.0], [2.0, 0.0]])
    np.testing.assert_allclose(s.supplier_import_kwh, [[1.5, 0.0], [0.5, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(s.supplier_export_kwh, [[0.0, 2.0], [0.0, 0.0], [0.0, 0.0]])


def test_energy_sharing_cost_by_hand() -> None:
    cost = energy_sharing_cost(
        METERED,
        retail_per_kwh=0.30,
        feed_in_per_kwh=0.08,
        local_price_per_kwh=0.15,
        local_network_charge_per_kwh=0.05,
    )
    # Shared energy costs 0.15 + 0.05 to receive and earns 0.15 to give. A buys 1.5 kWh
    # from its supplier and receives 1.5, then sells 2 to its supplier and gives 2; B buys
    # 0.5 and receives 0.5, then receives 1; C gives 2, then receives 1.
    expected = [[0.75, -0.46], [0.25, 0.20], [-0.30, 0.20]]
    np.testing.assert_allclose(cost, expected)


def test_connection_point_and_alone_costs_by_hand() -> None:
    np.testing.assert_allclose(
        connection_point_cost(METERED, retail_per_kwh=0.30, feed_in_per_kwh=0.08),
        [2.0 * 0.30, -2.0 * 0.08],
    )
    np.testing.assert_allclose(
        alone_cost(METERED, retail_per_kwh=0.30, feed_in_per_kwh=0.08),
        [[0.90, -0.32], [0.30, 0.30], [-0.16, 0.30]],
    )


def test_a_bad_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="sites, intervals"):
        shared_energy_kwh([1.0, -1.0])


@given(arrays(np.float64, (4, 6), elements=st.floats(-50.0, 50.0)))
def test_each_intervals_shared_energy_sums_on_both_sides(metered: np.ndarray) -> None:
    s = shared_energy_kwh(metered)
    imports = np.maximum(metered, 0.0)
    exports = np.maximum(-metered, 0.0)
    shared = np.minimum(imports.sum(axis=0), exports.sum(axis=0))
    np.testing.assert_allclose(s.received_kwh.sum(axis=0), shared, atol=1e-9)
    np.testing.assert_allclose(s.given_kwh.sum(axis=0), shared, atol=1e-9)
    assert np.all(s.received_kwh <= imports + 1e-12) and np.all(s.given_kwh <= exports + 1e-12)
    # What each site meters is what it shares plus what its supplier sees.
    net = s.received_kwh + s.supplier_import_kwh - s.given_kwh - s.supplier_export_kwh
    np.testing.assert_allclose(net, metered, atol=1e-9)
    # Sharing at the local price moves money between sites only: with no network charge the
    # community's total equals every site alone less the shared energy's spread.
    costs = energy_sharing_cost(
        metered, retail_per_kwh=0.3, feed_in_per_kwh=0.1, local_price_per_kwh=0.2
    )
    alone = alone_cost(metered, retail_per_kwh=0.3, feed_in_per_kwh=0.1)
    np.testing.assert_allclose(
        costs.sum(axis=0), alone.sum(axis=0) - shared * (0.3 - 0.1), atol=1e-9
    )


@given(
    arrays(np.float64, (3, 5), elements=st.floats(-20.0, 20.0)),
    st.floats(0.0, 0.1),
)
def test_money_under_energy_sharing_balances_each_interval(
    metered: np.ndarray, charge: float
) -> None:
    # What the sites pay in an interval is exactly what their suppliers bill and pay, plus the
    # network charge on the shared energy: the local payments cancel between the sites.
    retail, feed_in, local = 0.30, 0.08, 0.19
    costs = energy_sharing_cost(
        metered,
        retail_per_kwh=retail,
        feed_in_per_kwh=feed_in,
        local_price_per_kwh=local,
        local_network_charge_per_kwh=charge,
    )
    s = shared_energy_kwh(metered)
    suppliers = (
        s.supplier_import_kwh.sum(axis=0) * retail - s.supplier_export_kwh.sum(axis=0) * feed_in
    )
    np.testing.assert_allclose(costs.sum(axis=0), suppliers + s.shared_kwh * charge, atol=1e-9)
