"""The local fallback controller: self-consumption and peak shaving on hand-checked values."""

from __future__ import annotations

import numpy as np
import pytest

from edge.control import keep_peak_reserve_w, self_consumption_setpoint_w

LIMITS = {
    "soc_min_pct": 10.0,
    "soc_max_pct": 95.0,
    "max_charge_w": 3000.0,
    "max_discharge_w": 4000.0,
}


def test_import_is_covered_by_discharging() -> None:
    # Site imports 1500 W with the battery idle: discharge 1500 W.
    assert self_consumption_setpoint_w(1500.0, 0.0, 50.0, **LIMITS) == pytest.approx(1500.0)


def test_surplus_is_stored_and_the_current_battery_power_is_accounted_for() -> None:
    # Site exports 800 W while the battery already charges 1000 W: surplus is 1800 W.
    assert self_consumption_setpoint_w(-800.0, -1000.0, 50.0, **LIMITS) == pytest.approx(-1800.0)


def test_rated_powers_clip_the_setpoint() -> None:
    out = self_consumption_setpoint_w([9000.0, -9000.0], 0.0, 50.0, **LIMITS)
    np.testing.assert_allclose(out, [4000.0, -3000.0])


def test_soc_bounds_stop_the_forbidden_direction_only() -> None:
    out = self_consumption_setpoint_w(
        [1000.0, -1000.0, 1000.0, -1000.0], 0.0, [10.0, 10.0, 95.0, 95.0], **LIMITS
    )
    np.testing.assert_allclose(out, [0.0, -1000.0, 1000.0, 0.0])


def test_peak_shaving_keeps_the_reserve_for_imports_above_the_cap() -> None:
    out = self_consumption_setpoint_w(
        [2500.0, 6000.0, 2500.0],
        0.0,
        [25.0, 25.0, 60.0],
        import_cap_w=5000.0,
        reserve_soc_pct=30.0,
        **LIMITS,
    )
    # In the reserve: nothing below the cap, the excess above it; above the reserve: all.
    np.testing.assert_allclose(out, [0.0, 1000.0, 2500.0])


def test_with_a_cap_a_surplus_is_still_stored() -> None:
    out = self_consumption_setpoint_w(
        [-2000.0, -2000.0], 0.0, [25.0, 60.0], import_cap_w=5000.0, reserve_soc_pct=30.0, **LIMITS
    )
    np.testing.assert_allclose(out, [-2000.0, -2000.0])


def test_a_reserve_without_a_cap_keeps_its_energy_and_still_charges() -> None:
    out = self_consumption_setpoint_w(
        [2500.0, 2500.0, -1000.0], 0.0, [25.0, 60.0, 25.0], reserve_soc_pct=30.0, **LIMITS
    )
    np.testing.assert_allclose(out, [0.0, 2500.0, -1000.0])


def test_the_reserve_limits_a_market_setpoint_and_never_charging() -> None:
    # The site needs 12 kW with a 10 kW cap. Inside the reserve (20 %) a setpoint asking 5 kW
    # is cut to the 2 kW above the cap; above it (60 %) it is kept, and so is one asking only
    # 1 kW (the cap is the fallback's floor, not the market's); charging is left alone.
    out = keep_peak_reserve_w(
        [5000.0, 5000.0, 1000.0, -3000.0],
        12_000.0,
        [20.0, 60.0, 60.0, 20.0],
        import_cap_w=10_000.0,
        reserve_soc_pct=30.0,
    )
    np.testing.assert_allclose(out, [2000.0, 5000.0, 1000.0, -3000.0])
