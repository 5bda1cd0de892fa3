"""Tests for coordinator.market: hand-checked books, and properties against the LP oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from scipy.optimize import linprog

from coordinator.market import Book, Clearing, MarketInputError, Tariff, clear, clear_lp

RETAIL = 0.30
FEED_IN = 0.05
TOL = 1e-9


def _book(*steps: tuple[int, float, float]) -> Book:
    return Book.from_steps(list(steps))


def _tariff(import_kwh: float = math.inf, export_kwh: float = math.inf) -> Tariff:
    return Tariff(
        retail_price_per_kwh=RETAIL,
        feed_in_price_per_kwh=FEED_IN,
        import_capacity_kwh=import_kwh,
        export_capacity_kwh=export_kwh,
    )


# --- hand-checked examples ------------------------------------------------------------------


def test_one_buyer_one_seller_cross_at_the_midpoint() -> None:
    # Buy 5 kWh up to 0.25, sell 5 kWh from 0.15: all 5 kWh trade locally. The competitive
    # interval is [0.15, 0.25] (retail 0.30 and feed-in 0.05 lie outside it); midpoint 0.20.
    result = clear(_book((0, 0.25, 5.0), (1, 0.15, -5.0)), _tariff())
    assert result.price_per_kwh == pytest.approx(0.20)
    np.testing.assert_allclose(result.awarded_kwh, [5.0, -5.0])
    assert result.utility_import_kwh == 0.0
    assert result.utility_export_kwh == 0.0
    assert result.local_volume_kwh == pytest.approx(5.0)
    assert result.welfare == pytest.approx(5.0 * (0.25 - 0.15))
    assert result.community_balance == pytest.approx(0.0)


def test_books_that_do_not_cross_use_the_utility() -> None:
    # Buyer 4 kWh up to 0.35 and seller 3 kWh from 0.40: the seller is dearer than retail,
    # so the buyer imports from the utility at retail.
    result = clear(_book((0, 0.35, 4.0), (1, 0.40, -3.0)), _tariff())
    assert result.price_per_kwh == pytest.approx(RETAIL)
    np.testing.assert_allclose(result.awarded_kwh, [4.0, 0.0])
    assert result.utility_import_kwh == pytest.approx(4.0)
    assert result.utility_export_kwh == 0.0
    assert result.local_volume_kwh == 0.0
    assert result.welfare == pytest.approx(4.0 * (0.35 - RETAIL))
    # Mirror image: seller 3 kWh from 0.02, buyer 2 kWh up to 0.01: the seller exports at
    # feed-in.
    result = clear(_book((0, 0.01, 2.0), (1, 0.02, -3.0)), _tariff())
    assert result.price_per_kwh == pytest.approx(FEED_IN)
    np.testing.assert_allclose(result.awarded_kwh, [0.0, -3.0])
    assert result.utility_export_kwh == pytest.approx(3.0)
    assert result.welfare == pytest.approx(3.0 * (FEED_IN - 0.02))


def test_no_crossing_and_no_utility_trade_prices_the_middle_of_the_gap() -> None:
    # Bid 0.10 < offer 0.20, both inside the tariff band: nothing trades, and the price is
    # the midpoint of the gap between the best unfilled bid and offer.
    result = clear(_book((0, 0.10, 5.0), (1, 0.20, -5.0)), _tariff())
    assert result.price_per_kwh == pytest.approx(0.15)
    np.testing.assert_array_equal(result.awarded_kwh, [0.0, 0.0])
    assert result.welfare == 0.0


def test_only_buyers_are_served_from_the_utility_at_retail() -> None:
    result = clear(_book((0, 0.40, 3.0), (1, 0.35, 2.0)), _tariff(import_kwh=10.0))
    assert result.price_per_kwh == pytest.approx(RETAIL)
    np.testing.assert_allclose(result.awarded_kwh, [3.0, 2.0])
    assert result.utility_import_kwh == pytest.approx(5.0)
    assert result.community_balance == pytest.approx(0.0)


def test_only_sellers_export_at_feed_in() -> None:
    result = clear(_book((0, 0.00, -3.0), (1, 0.04, -2.0), (2, 0.06, -1.0)), _tariff())
    assert result.price_per_kwh == pytest.approx(FEED_IN)
    np.testing.assert_allclose(result.awarded_kwh, [-3.0, -2.0, 0.0])
    assert result.utility_export_kwh == pytest.approx(5.0)


def test_binding_import_capacity_rations_tied_buyers_pro_rata() -> None:
    # 8 kWh wanted at 0.40 by two tied buyers, 4 kWh can come in: each gets half.
    result = clear(_book((0, 0.40, 6.0), (1, 0.40, 2.0)), _tariff(import_kwh=4.0))
    np.testing.assert_allclose(result.awarded_kwh, [3.0, 1.0])
    assert result.utility_import_kwh == pytest.approx(4.0)
    # The competitive interval is {0.40}, above retail; no award needs more than retail.
    assert result.price_per_kwh == pytest.approx(RETAIL)
    assert result.community_balance == pytest.approx(0.0)


def test_binding_import_capacity_serves_higher_bids_first_then_pro_rata() -> None:
    book = _book((0, 0.50, 3.0), (1, 0.40, 2.0), (2, 0.40, 4.0))
    result = clear(book, _tariff(import_kwh=5.0))
    np.testing.assert_allclose(result.awarded_kwh, [3.0, 2.0 / 3.0, 4.0 / 3.0])
    assert result.price_per_kwh == pytest.approx(RETAIL)


def test_binding_export_capacity_rations_tied_sellers_pro_rata() -> None:
    book = _book((0, 0.01, -3.0), (1, 0.01, -1.0), (2, 0.00, -1.0))
    result = clear(book, _tariff(export_kwh=3.0))
    np.testing.assert_allclose(result.awarded_kwh, [-1.5, -0.5, -1.0])
    assert result.utility_export_kwh == pytest.approx(3.0)
    assert result.price_per_kwh == pytest.approx(FEED_IN)


def test_congested_feeder_lets_a_local_seller_above_retail_set_the_price() -> None:
    # The feeder brings in 5 kWh; a battery sells 3 kWh from 0.40 to a buyer who wants
    # 10 kWh up to 0.50. Serving it is efficient, so the price is the battery's limit and the
    # community account keeps the congestion rent 5 kWh * (0.40 - 0.30).
    book = _book((0, 0.50, 10.0), (1, 0.40, -3.0))
    result = clear(book, _tariff(import_kwh=5.0, export_kwh=0.0))
    np.testing.assert_allclose(result.awarded_kwh, [8.0, -3.0])
    assert result.utility_import_kwh == pytest.approx(5.0)
    assert result.price_per_kwh == pytest.approx(0.40)
    assert result.community_balance == pytest.approx(0.5)
    assert result.welfare == pytest.approx(8 * 0.50 - 3 * 0.40 - 5 * RETAIL)


def test_local_steps_are_served_before_the_utility_at_the_same_price() -> None:
    # A seller at exactly retail ties with the utility; it is served first.
    result = clear(_book((0, 0.40, 5.0), (1, RETAIL, -3.0)), _tariff())
    np.testing.assert_allclose(result.awarded_kwh, [5.0, -3.0])
    assert result.utility_import_kwh == pytest.approx(2.0)
    assert result.price_per_kwh == pytest.approx(RETAIL)


def test_long_side_of_a_local_trade_is_rationed_pro_rata() -> None:
    book = _book((0, 0.25, 4.0), (1, 0.25, 2.0), (2, 0.20, -3.0))
    result = clear(book, _tariff(import_kwh=0.0, export_kwh=0.0))
    np.testing.assert_allclose(result.awarded_kwh, [2.0, 1.0, -3.0])
    # The rationed buyers are indifferent: the price is their limit.
    assert result.price_per_kwh == pytest.approx(0.25)


@pytest.mark.parametrize(("import_kwh", "export_kwh"), [(math.inf, math.inf), (0.0, 0.0)])
def test_empty_book_prices_the_midpoint_of_the_tariffs(
    import_kwh: float, export_kwh: float
) -> None:
    result = clear(Book.empty(), _tariff(import_kwh, export_kwh))
    assert result.price_per_kwh == pytest.approx((RETAIL + FEED_IN) / 2)
    assert result.awarded_kwh.shape == (0,)
    assert result.utility_import_kwh == 0.0
    assert result.utility_export_kwh == 0.0
    assert result.welfare == 0.0
    assert result.site_net_award_kwh(n_sites=3).tolist() == [0.0, 0.0, 0.0]


def test_site_net_award_sums_each_sites_steps() -> None:
    book = _book((0, 0.25, 5.0), (2, 0.15, -5.0), (2, 0.28, 1.0), (0, 0.01, -1.0))
    result = clear(book, _tariff())
    expected = np.zeros(4)
    np.add.at(expected, book.site, result.awarded_kwh)
    np.testing.assert_allclose(result.site_net_award_kwh(n_sites=4), expected)


def test_lp_oracle_agrees_on_a_hand_checked_book() -> None:
    book = _book((0, 0.50, 10.0), (1, 0.40, -3.0))
    lp = clear_lp(book, _tariff(import_kwh=5.0, export_kwh=0.0))
    np.testing.assert_allclose(lp.awarded_kwh, [8.0, -3.0], atol=1e-9)
    assert lp.welfare == pytest.approx(1.3)


@pytest.mark.parametrize(
    ("site", "price", "quantity", "match"),
    [
        ([0, 1], [0.1], [1.0], "equal lengths"),
        ([0], [math.nan], [1.0], "price_per_kwh must be finite"),
        ([0], [0.1], [math.inf], "quantity_kwh must be finite"),
        ([0], [0.1], [0.0], "nonzero"),
        ([-1], [0.1], [1.0], "site must be >= 0"),
        ([0.5], [0.1], [1.0], "site must hold integers"),
        ([[0]], [[0.1]], [[1.0]], "one-dimensional"),
    ],
)
def test_book_rejects_malformed_steps(
    site: list[int], price: list[float], quantity: list[float], match: str
) -> None:
    with pytest.raises(MarketInputError, match=match):
        Book(
            site=np.asarray(site),
            price_per_kwh=np.asarray(price),
            quantity_kwh=np.asarray(quantity),
        )


@pytest.mark.parametrize(
    ("retail", "feed_in", "import_kwh", "export_kwh", "match"),
    [
        (0.1, 0.1, 1.0, 1.0, "must be below"),
        (0.1, 0.2, 1.0, 1.0, "must be below"),
        (math.inf, 0.1, 1.0, 1.0, "finite"),
        (0.3, 0.1, -1.0, 1.0, "import_capacity_kwh"),
        (0.3, 0.1, 1.0, math.nan, "export_capacity_kwh"),
    ],
)
def test_tariff_rejects_bad_values(
    retail: float, feed_in: float, import_kwh: float, export_kwh: float, match: str
) -> None:
    with pytest.raises(MarketInputError, match=match):
        Tariff(retail, feed_in, import_kwh, export_kwh)


# --- properties against the LP oracle -------------------------------------------------------

# Prices on a 0.01 grid and quantities on a 0.1 grid make ties (the hard cases) common, and
# make every non-zero surplus at least 0.001, far above the LP's tolerances.
_grid_price = st.integers(-10, 50).map(lambda cents: cents / 100)
_grid_qty = st.integers(1, 100).map(lambda tenths: tenths / 10)
_capacity = st.one_of(
    st.just(math.inf), st.just(0.0), st.integers(1, 200).map(lambda tenths: tenths / 10)
)


@st.composite
def _markets(draw: st.DrawFn, *, grid: bool = True) -> tuple[Book, Tariff]:
    n = draw(st.integers(0, 60))
    if grid:
        price_st = _grid_price
        qty_st = _grid_qty
    else:
        price_st = st.floats(-0.1, 0.5, allow_nan=False)
        qty_st = st.floats(1e-3, 10.0, allow_nan=False)
    prices = draw(st.lists(price_st, min_size=n, max_size=n))
    sizes = draw(st.lists(qty_st, min_size=n, max_size=n))
    buys = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    sites = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
    feed_in_cents = draw(st.integers(-5, 30))
    feed_in = feed_in_cents / 100
    retail = (feed_in_cents + draw(st.integers(1, 30))) / 100  # on the grid exactly
    book = Book(
        site=np.asarray(sites, dtype=np.int64),
        price_per_kwh=np.asarray(prices, dtype=np.float64),
        quantity_kwh=np.where(buys, 1.0, -1.0) * np.asarray(sizes, dtype=np.float64),
    )
    tariff = Tariff(retail, feed_in, draw(_capacity), draw(_capacity))
    return book, tariff


def _volume_kwh(result: Clearing) -> float:
    """Energy cleared through the auction: bought by sites plus exported to the utility."""
    return result.bought_kwh + result.utility_export_kwh


def _max_volume_among_optima(book: Book, tariff: Tariff, welfare: float) -> float:
    """Second-stage LP: the largest cleared volume among allocations with optimal welfare."""
    q = book.quantity_kwh
    n = q.size
    sign = np.sign(q)
    welfare_row = np.concatenate(
        (sign * book.price_per_kwh, [-tariff.retail_price_per_kwh, tariff.feed_in_price_per_kwh])
    )
    bounds = np.zeros((n + 2, 2))
    bounds[:n, 1] = np.abs(q)
    bounds[n:, 1] = [tariff.import_capacity_kwh, tariff.export_capacity_kwh]
    volume_row = np.concatenate((np.where(sign > 0, 1.0, 0.0), [0.0, 1.0]))
    result = linprog(
        -volume_row,
        A_ub=-welfare_row[np.newaxis, :],
        b_ub=[-(welfare - 1e-7)],
        A_eq=np.concatenate((sign, [-1.0, 1.0]))[np.newaxis, :],
        b_eq=[0.0],
        bounds=bounds,
        method="highs",
    )
    assert result.status == 0, result.message
    return float(-result.fun)


def _scale(*values: float) -> float:
    return max([1.0, *(abs(v) for v in values if math.isfinite(v))])


def _check_invariants(book: Book, tariff: Tariff, result: Clearing) -> None:
    q = book.quantity_kwh
    a = result.awarded_kwh
    limit = book.price_per_kwh
    p = result.price_per_kwh
    r, f = tariff.retail_price_per_kwh, tariff.feed_in_price_per_kwh
    imp, exp = result.utility_import_kwh, result.utility_export_kwh
    scale = _scale(float(np.abs(q).sum()))
    tol = TOL * scale
    assert a.shape == q.shape
    assert math.isfinite(p)
    # Awards within their steps, same sign.
    assert np.all(a * np.sign(q) >= 0.0)
    assert np.all(np.abs(a) <= np.abs(q) * (1 + 1e-12))
    # Feeder limits, and never import and export at once.
    assert 0.0 <= imp <= tariff.import_capacity_kwh
    assert 0.0 <= exp <= tariff.export_capacity_kwh
    assert imp == 0.0 or exp == 0.0
    # Energy balance: bought + export == sold + import.
    assert float(a.sum()) == pytest.approx(imp - exp, abs=tol)
    # Individual rationality, exactly: nobody trades beyond its limit.
    assert np.all(limit[a > 0] >= p)
    assert np.all(limit[a < 0] <= p)
    # Money: sites' payments at the uniform price plus the utility leg leave the community
    # account with import*(p - retail) + export*(feed_in - p) >= 0 (zero unless congested).
    expected_balance = imp * (p - r) + exp * (f - p)
    money_tol = TOL * _scale(scale, scale * p, scale * r, scale * f)
    assert result.community_balance == pytest.approx(expected_balance, abs=money_tol)
    assert result.community_balance >= -money_tol
    payments_in = float(p * a[a > 0].sum()) + f * exp
    payments_out = float(p * -a[a < 0].sum()) + r * imp
    assert payments_in - payments_out == pytest.approx(result.community_balance, abs=money_tol)
    # Pro-rata: steps on the same side at the same limit get the same fill fraction.
    fill = np.abs(a) / np.abs(q)
    for side in (q > 0, q < 0):
        for price in np.unique(limit[side]):
            tied = fill[side & (limit == price)]
            np.testing.assert_allclose(tied, tied[0], rtol=0, atol=1e-9)
    # Welfare as defined.
    assert result.welfare == pytest.approx(
        float(np.dot(limit, a)) - r * imp + f * exp, abs=money_tol
    )
    # Site totals.
    np.testing.assert_allclose(
        result.site_net_award_kwh(n_sites=10), np.bincount(book.site, a, minlength=10)
    )
    import_binds = imp >= tariff.import_capacity_kwh - tol
    export_binds = exp >= tariff.export_capacity_kwh - tol
    if not import_binds and not export_binds:
        # Uncongested: the price is in the tariff band, budget balances exactly, and it is
        # competitive (no unfilled buy above it, no unfilled sell below it).
        assert f <= p <= r
        assert result.community_balance == pytest.approx(0.0, abs=money_tol)
        assert np.all(fill[(q > 0) & (limit > p)] == 1.0)
        assert np.all(fill[(q < 0) & (limit < p)] == 1.0)
    # Outside the band only when a feeder limit binds and an award's limit requires it.
    if p > r:
        assert import_binds
        assert p == limit[a < 0].max()
    if p < f:
        assert export_binds
        assert p == limit[a > 0].min()


_hypothesis = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_hypothesis
@given(_markets(grid=True))
def test_agrees_with_lp_oracle_on_grid_books(market: tuple[Book, Tariff]) -> None:
    book, tariff = market
    result = clear(book, tariff)
    oracle = clear_lp(book, tariff)
    _check_invariants(book, tariff, result)
    assert result.welfare == pytest.approx(oracle.welfare, rel=1e-6, abs=1e-6)
    # The optimal volume is not unique when zero-surplus trades exist (a bid and an offer at
    # the same price), and HiGHS may return any optimum. clear() picks the largest optimal
    # volume, so compare with a second LP that maximises volume subject to optimal welfare.
    # On the grid a surplus is a multiple of 0.001, so the 1e-7 welfare slack in that LP
    # moves the volume by at most 1e-4 kWh.
    best = _max_volume_among_optima(book, tariff, oracle.welfare)
    assert _volume_kwh(result) == pytest.approx(best, abs=1e-4)
    assert _volume_kwh(oracle) <= best + 1e-4


@_hypothesis
@given(_markets(grid=False))
def test_agrees_with_lp_oracle_on_continuous_books(market: tuple[Book, Tariff]) -> None:
    book, tariff = market
    result = clear(book, tariff)
    oracle = clear_lp(book, tariff)
    _check_invariants(book, tariff, result)
    assert result.welfare == pytest.approx(oracle.welfare, rel=1e-6, abs=1e-6)


@settings(max_examples=100, deadline=None)
@given(_markets(grid=True), st.data())
def test_result_does_not_depend_on_step_order(
    market: tuple[Book, Tariff], data: st.DataObject
) -> None:
    book, tariff = market
    perm: NDArray[np.int64] = np.asarray(
        data.draw(st.permutations(range(len(book)))), dtype=np.int64
    )
    shuffled = Book(
        site=book.site[perm],
        price_per_kwh=book.price_per_kwh[perm],
        quantity_kwh=book.quantity_kwh[perm],
    )
    a = clear(book, tariff)
    b = clear(shuffled, tariff)
    assert b.price_per_kwh == pytest.approx(a.price_per_kwh, abs=1e-12)
    np.testing.assert_allclose(b.awarded_kwh, a.awarded_kwh[perm], rtol=1e-12, atol=1e-12)
    assert b.utility_import_kwh == pytest.approx(a.utility_import_kwh, abs=1e-9)
    assert b.utility_export_kwh == pytest.approx(a.utility_export_kwh, abs=1e-9)


def test_same_book_gives_bitwise_identical_results() -> None:
    rng = np.random.default_rng(7)
    n = 5000
    book = Book(
        site=rng.integers(0, 100, n),
        price_per_kwh=np.round(rng.normal(0.2, 0.05, n), 2),
        quantity_kwh=np.where(rng.random(n) < 0.5, 1.0, -1.0) * rng.uniform(0.1, 5.0, n),
    )
    tariff = _tariff(import_kwh=50.0, export_kwh=50.0)
    a = clear(book, tariff)
    b = clear(book, tariff)
    assert a.price_per_kwh == b.price_per_kwh
    np.testing.assert_array_equal(a.awarded_kwh, b.awarded_kwh)
