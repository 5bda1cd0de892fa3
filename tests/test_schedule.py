"""The perfect-foresight battery schedule (coordinator.schedule)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from coordinator.schedule import (
    Battery,
    ScheduleError,
    compressed_rows,
    interval_means,
    perfect_foresight,
    perfect_foresight_steps,
    resumed,
    utility_bill,
)
from simulators.physics import battery_step

HOUR_S = 3600.0


def test_interval_means_drops_a_partial_group() -> None:
    assert interval_means([1, 3, 5, 7, 9], 2).tolist() == [2.0, 6.0]
    assert interval_means([[1, 3], [5, 7]], 2).tolist() == [[2.0], [6.0]]
    with pytest.raises(ScheduleError):
        interval_means([1.0], 0)


def test_utility_bill_prices_import_at_retail_and_export_at_feed_in() -> None:
    # 2 kW import for an hour at 0.30, 1 kW export for an hour at 0.08.
    assert utility_bill([2000.0, -1000.0], 0.30, 0.08, HOUR_S) == pytest.approx(0.60 - 0.08)
    assert utility_bill([1000.0, 1000.0], [0.2, 0.4], [0.0, 0.1], HOUR_S) == pytest.approx(0.6)


def test_without_batteries_the_bill_is_the_netted_flow() -> None:
    net = [3000.0, -2000.0, 500.0]
    s = perfect_foresight(net, [], [0.3, 0.3, 0.2], 0.08, 900.0)
    assert s.bill == pytest.approx(utility_bill(net, [0.3, 0.3, 0.2], 0.08, 900.0))
    assert s.cost == s.bill
    assert s.battery_w.shape == (0, 3)
    assert s.feeder_w == pytest.approx(net)


def test_lossless_arbitrage_charges_cheap_and_discharges_expensive() -> None:
    bat = Battery(10_000, 5_000, soc_pct=50, soc_min_pct=0, charge_efficiency=1,
                  discharge_efficiency=1)  # fmt: skip
    s = perfect_foresight([10_000.0, 10_000.0], [bat], [0.2, 0.4], 0.0, HOUR_S)
    # Charge 5 kWh at 0.2 (15 kWh imported), discharge 5 kWh at 0.4 (5 kWh imported).
    assert s.cost == pytest.approx(15 * 0.2 + 5 * 0.4)
    assert s.battery_w[0] == pytest.approx([-5000.0, 5000.0])
    assert s.soc_pct[0] == pytest.approx([50.0, 100.0, 50.0])


def test_efficiencies_and_the_end_rule_limit_the_discharge() -> None:
    bat = Battery(10_000, 5_000, soc_pct=50, soc_min_pct=0, charge_efficiency=0.9,
                  discharge_efficiency=0.9)  # fmt: skip
    s = perfect_foresight([10_000.0, 10_000.0], [bat], [0.2, 0.4], 0.0, HOUR_S)
    # 5 kWh charged stores 4.5; ending at the start leaves 4.5 * 0.9 = 4.05 kWh to discharge.
    assert s.battery_w[0] == pytest.approx([-5000.0, 4050.0])
    assert s.cost == pytest.approx(15 * 0.2 + (10 - 4.05) * 0.4)
    assert s.soc_pct[0, -1] == pytest.approx(50.0)


def test_the_hard_end_rule_forbids_borrowing_from_tomorrow() -> None:
    bat = Battery(10_000, 5_000, soc_pct=50)
    s = perfect_foresight([4_000.0], [bat], 0.4, 0.1, HOUR_S)
    assert s.cost == pytest.approx(4 * 0.4)
    assert s.battery_w[0, 0] == pytest.approx(0.0, abs=1e-6)


def test_valued_end_energy_is_credited_or_charged() -> None:
    bat = Battery(10_000, 5_000, soc_pct=50, soc_min_pct=0, charge_efficiency=0.9,
                  discharge_efficiency=0.9)  # fmt: skip
    # Stored energy worth 0.3 per kWh: discharging it at 0.4 * 0.9 = 0.36 pays; charging at
    # 0.2 / 0.9 = 0.22 per stored kWh pays too.
    s = perfect_foresight(
        [10_000.0, 10_000.0], [bat], [0.2, 0.4], 0.0, HOUR_S, end_value_per_kwh=[0.3]
    )
    assert s.battery_w[0] == pytest.approx([-5000.0, 5000.0])
    assert s.bill == pytest.approx(15 * 0.2 + 5 * 0.4)
    end_kwh = (5.0 + 4.5 - 5.0 / 0.9) - 5.0
    assert s.stored_value == pytest.approx(0.3 * end_kwh)
    assert s.cost == pytest.approx(s.bill - s.stored_value)
    # Worth more than the peak price: keep everything, charge what the rating allows.
    s = perfect_foresight([1_000.0], [bat], 0.4, 0.1, HOUR_S, end_value_per_kwh=[1.0])
    assert s.battery_w[0, 0] == pytest.approx(-5000.0)
    assert s.stored_value == pytest.approx(4.5)


def test_surplus_pv_is_stored_for_the_evening_not_exported() -> None:
    bat = Battery(20_000, 10_000, soc_pct=10, soc_min_pct=10)
    s = perfect_foresight([-8_000.0, 6_000.0], [bat], 0.30, 0.08, HOUR_S)
    # It stores just what covers the evening (6 kWh / 0.95^2); exporting the rest at once
    # earns the same feed-in without the losses.
    charged_w = 6000.0 / 0.95**2
    assert s.battery_w[0] == pytest.approx([-charged_w, 6000.0])
    assert s.feeder_w == pytest.approx([-(8000.0 - charged_w), 0.0], abs=1e-6)
    assert s.cost == pytest.approx(-(8000.0 - charged_w) / 1000 * 0.08)


def test_feeder_limits_are_kept_when_possible_and_reported_when_not() -> None:
    bat = Battery(100_000, 20_000, soc_pct=50, soc_min_pct=0, charge_efficiency=1,
                  discharge_efficiency=1)  # fmt: skip
    s = perfect_foresight([100_000.0, 130_000.0], [bat], 0.3, 0.08, HOUR_S,
                          import_limit_w=120_000.0)  # fmt: skip
    assert s.import_excess_w == 0.0
    assert s.penalty == 0.0
    assert np.max(s.feeder_w) <= 120_000.0 + 1e-6
    s = perfect_foresight([100_000.0, 150_000.0], [bat], 0.3, 0.08, HOUR_S,
                          import_limit_w=120_000.0)  # fmt: skip
    assert s.import_excess_w == pytest.approx(10_000.0)  # the rating caps the relief at 20 kW
    assert s.penalty > 0
    s = perfect_foresight([-50_000.0], [], 0.3, 0.08, HOUR_S, export_limit_w=40_000.0)
    assert s.export_excess_w == pytest.approx(10_000.0)


def test_schedule_replays_through_the_battery_physics() -> None:
    rng = np.random.default_rng(3)
    net = rng.normal(20_000, 15_000, 96)
    retail = np.where((np.arange(96) >= 28) & (np.arange(96) < 88), 0.32, 0.22)
    bats = [
        Battery(60_000, 30_000, soc_pct=50, soc_min_pct=10, soc_max_pct=90),
        Battery(10_000, 5_000, soc_pct=40, charge_efficiency=0.9, discharge_efficiency=0.92),
    ]
    s = perfect_foresight(net, bats, retail, 0.08, 900.0)
    assert s.simultaneous_wh == pytest.approx(0.0, abs=1e-3)
    for b, bat in enumerate(bats):
        assert np.all(np.abs(s.battery_w[b]) <= bat.rated_power_w + 1e-6)
        assert s.soc_pct[b].min() >= bat.soc_min_pct - 1e-6
        assert s.soc_pct[b].max() <= bat.soc_max_pct + 1e-6
        assert s.soc_pct[b, -1] >= bat.soc_pct - 1e-6
        soc = bat.soc_pct
        for t, power in enumerate(s.battery_w[b]):
            new, delivered = battery_step(
                soc,
                power,
                900.0,
                bat.capacity_wh,
                charge_efficiency=bat.charge_efficiency,
                discharge_efficiency=bat.discharge_efficiency,
                soc_min_pct=bat.soc_min_pct,
                soc_max_pct=bat.soc_max_pct,
            )
            assert float(delivered) == pytest.approx(power, abs=1e-3)
            soc = float(new)
            assert soc == pytest.approx(s.soc_pct[b, t + 1], abs=1e-6)
    idle = utility_bill(net, retail, 0.08, 900.0)
    assert s.cost < idle


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"net_load_w": []}, "non-empty"),
        ({"net_load_w": [float("nan")]}, "finite"),
        ({"feed_in_per_kwh": 0.5}, "feed-in"),
        ({"step_s": 0.0}, "step_s"),
        ({"import_limit_w": 0.0}, "positive"),
        ({"end_value_per_kwh": [0.1, 0.2]}, "one finite value per battery"),
    ],
)
def test_bad_inputs_raise(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "net_load_w": [1000.0],
        "batteries": [Battery(1000, 500, soc_pct=50)],
        "retail_per_kwh": 0.3,
        "feed_in_per_kwh": 0.08,
        "step_s": 900.0,
    }
    args.update(kwargs)
    with pytest.raises(ScheduleError, match=message):
        perfect_foresight(**args)  # type: ignore[arg-type]


def test_battery_limits_are_checked() -> None:
    with pytest.raises(ScheduleError):
        Battery(0, 500, soc_pct=50)
    with pytest.raises(ScheduleError):
        Battery(1000, 500, soc_pct=2, soc_min_pct=5)
    with pytest.raises(ScheduleError):
        Battery(1000, 500, soc_pct=50, charge_efficiency=1.2)


def test_compressed_rows_are_the_matrix_scipy_builds_with_repeated_terms_summed() -> None:
    from scipy import sparse

    rng = np.random.default_rng(3)
    rows = [rng.integers(0, 7, 30) for _ in range(4)]
    cols = [rng.integers(0, 11, 30) for _ in range(4)]
    terms = [(r, c, v) for r, c, v in zip(rows, cols, (1.0, -2.5, 0.25, 3.0), strict=True)]
    start, index, value = compressed_rows(terms, 9)  # two empty rows at the end
    reference = sparse.csr_array(
        (
            np.concatenate([np.full(30, v) for v in (1.0, -2.5, 0.25, 3.0)]),
            (np.concatenate(rows), np.concatenate(cols)),
        ),
        shape=(9, 11),
    )
    reference.sum_duplicates()
    np.testing.assert_array_equal(start, reference.indptr)
    np.testing.assert_array_equal(index, reference.indices)
    np.testing.assert_allclose(value, reference.data, rtol=1e-15)


def test_a_schedule_in_steps_solved_in_another_thread_is_the_schedule_made_at_once() -> None:
    # The stepped engine builds the community schedule's programme in its own thread and
    # solves it in a planning thread (perfect_foresight_steps, then resumed): the same
    # schedule, prices included, as perfect_foresight.
    bat = Battery(10_000, 5_000, soc_pct=50, soc_min_pct=0, charge_efficiency=0.9,
                  discharge_efficiency=0.9)  # fmt: skip
    args = ([10_000.0, -4_000.0, 10_000.0], [bat], [0.2, 0.3, 0.4], 0.05, HOUR_S)
    at_once = perfect_foresight(*args, import_limit_w=9_000.0)
    steps = perfect_foresight_steps(*args, import_limit_w=9_000.0)
    job = next(steps)
    with ThreadPoolExecutor(1) as pool:
        in_steps = resumed(steps, pool.submit(job).result())
    assert in_steps.cost == at_once.cost
    np.testing.assert_array_equal(in_steps.battery_w, at_once.battery_w)
    np.testing.assert_array_equal(in_steps.price_per_kwh, at_once.price_per_kwh)


def test_a_schedule_solve_that_fails_elsewhere_fails_the_schedule() -> None:
    steps = perfect_foresight_steps([1_000.0], [], 0.3, 0.1, HOUR_S)
    next(steps)
    with pytest.raises(ScheduleError, match="did not solve"):
        resumed(steps, ScheduleError("HiGHS did not solve the schedule: Infeasible"))
