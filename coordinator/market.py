"""Market clearing: a uniform-price double auction per interval, the utility as outside option.

Pure, vectorised numpy; no I/O, logging or clock (docs/architecture.md, sections 4 and 6).

Model
-----
A :class:`Book` holds every site's bid steps for one interval. A step with ``quantity_kwh > 0``
is a buy ("I import up to q at any price <= p"); ``quantity_kwh < 0`` is a sell ("I export up to
|q| at any price >= p"). The utility is the outside option behind the community's single feeder:
it sells without limit at the retail tariff and buys without limit at the feed-in tariff
(feed-in < retail), but its energy crosses the feeder, so it supplies at most
``import_capacity_kwh`` into the community and takes at most ``export_capacity_kwh`` out of it.
:func:`clear` therefore treats the utility as one sell step at retail of size ``import_capacity``
and one buy step at feed-in of size ``export_capacity``, and clears everything together.

Allocation
----------
Welfare-maximising: demand sorted by descending limit price, supply by ascending limit price
(utility steps included), traded volume ``Q* = max_p min(D(p), S(p))`` with
``D(p)`` = demand priced >= p and ``S(p)`` = supply priced <= p. Every buy priced above the
marginal buy price and every sell priced below the marginal sell price is filled completely.
Among equal-welfare allocations the one with the largest volume is chosen (zero-surplus trades,
a buy and a sell at the same price, are made). Steps tied at a marginal price share what is left
pro-rata to their size (the long side is rationed; the short side is filled), community steps
before the utility's step at the same price ("local first"). Because rationing is pro-rata, a
step's award does not depend on where it sits among its ties, so no site or step-index
tie-break is needed: the sort (numpy's default, not stable, which is several times faster) only
groups equal prices, and the order inside a group changes nothing but the rounding of prefix
sums in the last bits. The result is a deterministic function of the book, and a permuted book
gives the permuted awards up to that rounding.

Price rule
----------
Let ``[lo, hi]`` be the competitive interval: ``lo = max(s_m, d_r)``, ``hi = min(d_m, s_r)``
with ``d_m``/``s_m`` the lowest awarded buy price / highest awarded sell price and ``d_r``/``s_r``
the highest buy price / lowest sell price with capacity left over (each over the community and
utility steps; a missing term is -inf/+inf). Every price in it clears the market: no awarded
step is above its limit and no unfilled step would want to trade. The price is

1. the midpoint of ``[lo, hi]`` intersected with the tariff band ``[feed_in, retail]``;
   if they do not overlap, the tariff nearest to ``[lo, hi]``;
2. then moved, if needed, into ``[s_m, d_m]`` so that every award is individually rational.

When neither feeder limit binds, ``[lo, hi]`` lies inside the band, so step 2 never acts and the
price is competitive and between feed-in and retail; an empty book clears at the midpoint of the
tariffs; a book that does not cross (and no utility trade) clears at the midpoint of the gap
between its best unfilled bid and its best unfilled offer (the tariffs count as a bid and an
offer while the feeder has capacity). Whenever the utility supplies energy the price is retail
(or higher) and whenever it takes energy it is feed-in (or lower). The price leaves the band only
when a feeder limit binds and a site was awarded at a limit beyond the tariff (e.g. a battery
selling above retail into a congested feeder): then it is that site's limit, the nearest price
at which every award is individually rational.

Budget
------
Sites pay or are paid the uniform price; the community account pays the utility retail for
imports and is paid feed-in for exports. The account's balance
``price*(bought - sold) - retail*import + feed_in*export`` equals
``import*(price - retail) + export*(feed_in - price)``, which the price rule makes zero except
when a feeder limit binds, and never negative (it is then the congestion rent).

The reference oracle :func:`clear_lp` solves the same welfare maximisation as a linear
programme with HiGHS; it is for tests and benchmarks, not for production.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "Book",
    "Clearing",
    "MarketInputError",
    "Tariff",
    "clear",
    "clear_lp",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

# Relative slack (of a side's total kWh) within which a side counts as completely filled.
_FILL_RTOL = 1e-12


class MarketInputError(ValueError):
    """A book or tariff is malformed; the message names the field."""


@dataclass(frozen=True, eq=False)
class Book:
    """The bid steps of one interval, one row per step.

    Parameters
    ----------
    site:
        Site index of each step (int64, >= 0).
    price_per_kwh:
        Limit price of each step in currency per kWh (finite float64).
    quantity_kwh:
        Energy of each step in kWh (finite, nonzero): positive to buy (import) up to
        ``quantity_kwh`` at any price <= ``price_per_kwh``, negative to sell (export) up to
        ``-quantity_kwh`` at any price >= ``price_per_kwh``.

    The arrays are converted to contiguous int64/float64 (without a copy when they already are)
    and must not be mutated afterwards.
    """

    site: IntArray
    price_per_kwh: FloatArray
    quantity_kwh: FloatArray

    def __post_init__(self) -> None:
        raw_site = np.asarray(self.site)
        if raw_site.size and raw_site.dtype.kind not in "iu":
            raise MarketInputError(f"Book.site must hold integers, got dtype {raw_site.dtype}")
        site = np.ascontiguousarray(raw_site, dtype=np.int64)
        price = np.ascontiguousarray(self.price_per_kwh, dtype=np.float64)
        quantity = np.ascontiguousarray(self.quantity_kwh, dtype=np.float64)
        for name, arr in (("site", site), ("price_per_kwh", price), ("quantity_kwh", quantity)):
            if arr.ndim != 1:
                raise MarketInputError(f"Book.{name} must be one-dimensional, got {arr.ndim} dims")
        if not site.shape == price.shape == quantity.shape:
            raise MarketInputError(
                "Book arrays must have equal lengths, got "
                f"site={site.size}, price_per_kwh={price.size}, quantity_kwh={quantity.size}"
            )
        if site.size:
            if not np.isfinite(price).all():
                raise MarketInputError("Book.price_per_kwh must be finite")
            if not np.isfinite(quantity).all():
                raise MarketInputError("Book.quantity_kwh must be finite")
            if not quantity.all():
                raise MarketInputError("Book.quantity_kwh must be nonzero")
            if site.min() < 0:
                raise MarketInputError("Book.site must be >= 0")
        object.__setattr__(self, "site", site)
        object.__setattr__(self, "price_per_kwh", price)
        object.__setattr__(self, "quantity_kwh", quantity)

    @classmethod
    def from_steps(cls, steps: Sequence[tuple[int, float, float]]) -> Book:
        """Build a book from ``(site, price_per_kwh, quantity_kwh)`` tuples."""
        if not steps:
            return cls.empty()
        site, price, quantity = zip(*steps, strict=True)
        return cls(
            site=np.asarray(site, dtype=np.int64),
            price_per_kwh=np.asarray(price, dtype=np.float64),
            quantity_kwh=np.asarray(quantity, dtype=np.float64),
        )

    @classmethod
    def empty(cls) -> Book:
        """A book without steps."""
        return cls(
            site=np.zeros(0, dtype=np.int64),
            price_per_kwh=np.zeros(0, dtype=np.float64),
            quantity_kwh=np.zeros(0, dtype=np.float64),
        )

    def __len__(self) -> int:
        return int(self.quantity_kwh.size)


@dataclass(frozen=True)
class Tariff:
    """The utility's prices and the feeder's capacities for one interval.

    Parameters
    ----------
    retail_price_per_kwh:
        Price the utility charges for energy imported into the community (currency per kWh).
    feed_in_price_per_kwh:
        Price the utility pays for energy exported from the community (currency per kWh);
        must be strictly below retail.
    import_capacity_kwh:
        Most energy the feeder carries into the community in the interval (kWh, >= 0, may be inf).
    export_capacity_kwh:
        Most energy the feeder carries out of the community in the interval (kWh, >= 0, may be
        inf).
    """

    retail_price_per_kwh: float
    feed_in_price_per_kwh: float
    import_capacity_kwh: float = math.inf
    export_capacity_kwh: float = math.inf

    def __post_init__(self) -> None:
        retail = float(self.retail_price_per_kwh)
        feed_in = float(self.feed_in_price_per_kwh)
        if not (math.isfinite(retail) and math.isfinite(feed_in)):
            raise MarketInputError("Tariff prices must be finite")
        if not feed_in < retail:
            raise MarketInputError(
                f"Tariff.feed_in_price_per_kwh ({feed_in}) must be below "
                f"retail_price_per_kwh ({retail})"
            )
        for name in ("import_capacity_kwh", "export_capacity_kwh"):
            value = float(getattr(self, name))
            if not value >= 0.0:  # also rejects nan
                raise MarketInputError(f"Tariff.{name} must be >= 0 (inf allowed), got {value}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "retail_price_per_kwh", retail)
        object.__setattr__(self, "feed_in_price_per_kwh", feed_in)


@dataclass(frozen=True, eq=False)
class Clearing:
    """The result of clearing one interval.

    Attributes
    ----------
    price_per_kwh:
        The uniform clearing price (currency per kWh).
    awarded_kwh:
        Award of each book step in kWh, same order and sign convention as
        ``Book.quantity_kwh``, ``0 <= |award| <= |quantity|``.
    site:
        The book's site index of each step (the same array, not a copy).
    utility_import_kwh:
        Energy bought from the utility into the community (kWh, >= 0).
    utility_export_kwh:
        Energy sold from the community to the utility (kWh, >= 0).
    welfare:
        Total surplus in currency: ``sum(price_limit * award)`` over the steps (buys add,
        sells subtract) ``- retail * import + feed_in * export``.
    community_balance:
        What the community account keeps (currency): sites' payments at the uniform price minus
        payments to sites, minus the utility bill, plus the utility's feed-in payment. Zero up to
        rounding unless a feeder limit binds, never negative (congestion rent).
    """

    price_per_kwh: float
    awarded_kwh: FloatArray
    site: IntArray = field(repr=False)
    utility_import_kwh: float
    utility_export_kwh: float
    welfare: float
    community_balance: float

    @property
    def bought_kwh(self) -> float:
        """Energy awarded to buy steps (kWh)."""
        return float(self.awarded_kwh[self.awarded_kwh > 0].sum())

    @property
    def sold_kwh(self) -> float:
        """Energy awarded to sell steps (kWh, positive)."""
        return float(-self.awarded_kwh[self.awarded_kwh < 0].sum())

    @property
    def local_volume_kwh(self) -> float:
        """Energy traded between sites, i.e. not to or from the utility (kWh)."""
        return max(0.0, min(self.bought_kwh, self.sold_kwh))

    def site_net_award_kwh(self, n_sites: int = 0) -> FloatArray:
        """Net award per site in kWh (positive = import), indexed by site, at least ``n_sites``."""
        net = np.bincount(self.site, weights=self.awarded_kwh, minlength=n_sites)
        return np.asarray(net, dtype=np.float64)


def clear(book: Book, tariff: Tariff) -> Clearing:
    """Clear one interval's book against the utility; see the module docstring for the rules.

    O(n log n) in the number of steps (one sort, then prefix sums and binary searches), with
    no Python loop over steps.

    Parameters
    ----------
    book:
        The interval's bid steps.
    tariff:
        Retail and feed-in prices (currency per kWh) and feeder capacities (kWh).

    Returns
    -------
    Clearing
        Uniform price, per-step awards, utility flows, welfare and the community balance.
    """
    retail = tariff.retail_price_per_kwh
    feed_in = tariff.feed_in_price_per_kwh
    price = book.price_per_kwh
    quantity = book.quantity_kwh

    # One sort by price, then split: supply ascending, demand descending. Ties are grouped by
    # price; their order within a group only affects rounding, never who is served.
    order = np.argsort(price)
    buy_sorted = (quantity > 0)[order]
    s_idx = order[np.flatnonzero(~buy_sorted)]
    d_idx = order[np.flatnonzero(buy_sorted)[::-1]]
    s_qty = -quantity[s_idx]
    d_qty = quantity[d_idx]
    s_cum = np.cumsum(s_qty)
    d_cum = np.cumsum(d_qty)
    # The utility never trades more than the opposite community side, so infinite capacities
    # are trimmed to that (the trimmed curves have the same optimum).
    total_sell = float(s_cum[-1]) if s_cum.size else 0.0
    total_buy = float(d_cum[-1]) if d_cum.size else 0.0
    export_kwh_max = min(tariff.export_capacity_kwh, total_sell)
    import_kwh_max = min(tariff.import_capacity_kwh, total_buy)
    demand = _Side.build(-1.0, d_idx, -price[d_idx], d_qty, d_cum, feed_in, export_kwh_max)
    supply = _Side.build(1.0, s_idx, price[s_idx], s_qty, s_cum, retail, import_kwh_max)

    volume = _traded_volume(demand, supply)
    d_margin = demand.margin(volume)
    s_margin = supply.margin(volume)
    clearing_price = _clearing_price(d_margin, s_margin, tariff)

    awarded = np.zeros(quantity.size, dtype=np.float64)
    if volume > 0.0:
        demand.award_into(awarded, d_margin)
        supply.award_into(awarded, s_margin)
    import_kwh = s_margin.utility_kwh
    export_kwh = d_margin.utility_kwh
    welfare = float(np.dot(price, awarded)) - retail * import_kwh + feed_in * export_kwh
    balance = clearing_price * float(awarded.sum()) - retail * import_kwh + feed_in * export_kwh
    return Clearing(
        price_per_kwh=clearing_price,
        awarded_kwh=awarded,
        site=book.site,
        utility_import_kwh=import_kwh,
        utility_export_kwh=export_kwh,
        welfare=welfare,
        community_balance=balance,
    )


class _Margin(NamedTuple):
    """How one side of the market ends at the traded volume (prices in currency per kWh)."""

    price_per_kwh: float  # marginal (worst awarded) limit price; +-inf if nothing trades
    fraction: float  # pro-rata fill of the community steps at the marginal price
    utility_kwh: float  # the utility's award on this side (kWh)
    next_price_per_kwh: float  # best price beyond the margin, nothing awarded (+-inf if none)
    rationed: bool  # a step at the marginal price keeps capacity (the side is long)


def _clearing_price(demand: _Margin, supply: _Margin, tariff: Tariff) -> float:
    """The uniform price from the two margins (module docstring, "Price rule")."""
    retail = tariff.retail_price_per_kwh
    feed_in = tariff.feed_in_price_per_kwh
    d_m = demand.price_per_kwh
    s_m = supply.price_per_kwh
    # Best prices with capacity left over, the utility's included while its feeder has room.
    d_r = max(demand.next_price_per_kwh, d_m if demand.rationed else -math.inf)
    if demand.utility_kwh < tariff.export_capacity_kwh:
        d_r = max(d_r, feed_in)
    s_r = min(supply.next_price_per_kwh, s_m if supply.rationed else math.inf)
    if supply.utility_kwh < tariff.import_capacity_kwh:
        s_r = min(s_r, retail)
    lo = max(s_m, d_r)  # the competitive interval [lo, hi]
    hi = min(d_m, s_r)
    a = max(lo, feed_in)
    b = min(hi, retail)
    if a <= b:
        target = min(max(a + 0.5 * (b - a), a), b)
    elif lo > retail:
        target = retail
    else:
        target = feed_in
    return float(min(max(target, s_m), d_m))


def _traded_volume(demand: _Side, supply: _Side) -> float:
    """Welfare-maximising volume ``Q* = max_p min(D(p), S(p))`` (kWh).

    The maximum is reached at a demand price. Along the demand curve (descending price, index
    k) the running demand ``D_k`` rises and the supply ``S_k`` offered at or below the k-th
    demand price falls, and ``max_k min(D_k, S_k)`` equals ``Q*`` (``D_k`` is exact at the
    last step of each price group and smaller elsewhere). So ``Q*`` sits where they cross:
    with ``k*`` the first k with ``D_k >= S_k``, ``Q* = max(D_{k*-1}, S_{k*})``. ``k*`` is
    found by a two-level search (every ~sqrt(n)-th step, then inside one block), which costs
    O(sqrt(n) log n) instead of a binary search per demand step.
    """
    n = demand.cum.size
    if n == 0 or supply.cum.size == 0:
        return 0.0
    supply_cum0 = np.concatenate(([0.0], supply.cum))

    def supply_at(lo: int, hi: int, step: int) -> FloatArray:
        n_le = np.searchsorted(supply.key, -demand.key[lo:hi:step], side="right")
        return supply_cum0[n_le]

    step = max(1, math.isqrt(n))
    coarse = demand.cum[step - 1 :: step] >= supply_at(step - 1, n, step)
    j = int(np.argmax(coarse)) if coarse.any() else coarse.size
    lo = j * step
    hi = min(n, (j + 1) * step)
    fine = demand.cum[lo:hi] >= supply_at(lo, hi, 1)
    k = lo + (int(np.argmax(fine)) if fine.any() else hi - lo)
    volume = float(demand.cum[k - 1]) if k > 0 else 0.0
    if k < n:
        n_le = int(np.searchsorted(supply.key, -demand.key[k], side="right"))
        volume = max(volume, float(supply_cum0[n_le]))
    return volume


@dataclass(frozen=True, eq=False)
class _Side:
    """One side of the market sorted by ascending ``key = sign * price`` (sign -1 for demand,
    +1 for supply). ``key``/``cum`` include the utility's step at index ``util``, after its
    community ties (``util == -1`` when the utility has no capacity on this side)."""

    sign: float
    idx: IntArray  # book index of each community step, in key order
    key_c: FloatArray  # community keys
    qty_c: FloatArray  # community sizes (kWh, positive)
    key: FloatArray  # keys with the utility's step
    cum: FloatArray  # running sizes with the utility's step (kWh)
    util: int
    util_qty: float

    @classmethod
    def build(
        cls,
        sign: float,
        idx: IntArray,
        key_c: FloatArray,
        qty_c: FloatArray,
        cum_c: FloatArray,
        util_price: float,
        util_qty: float,
    ) -> _Side:
        if not util_qty > 0.0:
            return cls(sign, idx, key_c, qty_c, key_c, cum_c, -1, 0.0)
        util_key = sign * util_price
        u = int(np.searchsorted(key_c, util_key, side="right"))
        before = float(cum_c[u - 1]) if u > 0 else 0.0
        key = np.concatenate((key_c[:u], [util_key], key_c[u:]))
        cum = np.concatenate((cum_c[:u], [before + util_qty], cum_c[u:] + util_qty))
        return cls(sign, idx, key_c, qty_c, key, cum, u, util_qty)

    def margin(self, volume: float) -> _Margin:
        """Where this side ends when ``volume`` kWh trade; community before utility at ties."""
        key, cum, util, sign = self.key, self.cum, self.util, self.sign
        n = key.size
        if not volume > 0.0:
            first = float(key[0]) if n else math.inf
            return _Margin(-sign * math.inf, 1.0, 0.0, sign * first, rationed=False)
        k = min(int(np.searchsorted(cum, volume, side="left")), n - 1)
        marginal = float(key[k])
        g0 = int(np.searchsorted(key, marginal, side="left"))
        g1 = int(np.searchsorted(key, marginal, side="right"))
        before = float(cum[g0 - 1]) if g0 > 0 else 0.0
        through = float(cum[g1 - 1])
        util_in_group = g0 <= util < g1
        if util_in_group:  # the utility's step is last in its group
            community_tied = (float(cum[util - 1]) if util > 0 else 0.0) - before
        else:
            community_tied = through - before

        # This side is short when its steps up to the margin fit into the volume. The slack
        # absorbs rounding in the prefix sums, so an exactly balanced book (say 0.1 + 0.2
        # against 0.3) is not treated as rationed by 1 ulp.
        if through <= volume + _FILL_RTOL * float(cum[-1]):
            frac = 1.0
            util_award = self.util_qty if 0 <= util < g1 else 0.0
            rationed = False
        else:
            take = max(volume - before, 0.0)
            take_community = min(take, community_tied)
            frac = min(take_community / community_tied, 1.0) if community_tied > 0.0 else 1.0
            util_award = 0.0
            if util_in_group:
                util_award = min(max(take - take_community, 0.0), self.util_qty)
            elif 0 <= util < g0:
                util_award = self.util_qty
            rationed = True
        nxt = float(key[g1]) if g1 < n else math.inf
        return _Margin(sign * marginal, frac, util_award, sign * nxt, rationed)

    def award_into(self, awarded: FloatArray, margin: _Margin) -> None:
        """Write this side's awards into ``awarded`` (book order and sign convention): full
        before the marginal price, ``margin.fraction`` at it, nothing beyond."""
        marginal_key = self.sign * margin.price_per_kwh
        n_before = int(np.searchsorted(self.key_c, marginal_key, side="left"))
        n_through = int(np.searchsorted(self.key_c, marginal_key, side="right"))
        award = self.qty_c[:n_through] * -self.sign
        award[n_before:] *= margin.fraction
        awarded[self.idx[:n_through]] = award


def clear_lp(book: Book, tariff: Tariff) -> Clearing:
    """Reference oracle: the welfare-maximising allocation by linear programming (HiGHS).

    Maximise ``sum_b p_b x_b - sum_s p_s y_s - retail * I + feed_in * E`` subject to
    ``sum_b x_b + E = sum_s y_s + I``, ``0 <= x_b <= q_b``, ``0 <= y_s <= |q_s|``,
    ``0 <= I <= import_capacity``, ``0 <= E <= export_capacity``. The price reported is the
    dual of the balance constraint (a competitive price, not necessarily the one :func:`clear`
    picks). Among optimal allocations HiGHS returns any one. For tests and benchmarks only;
    needs scipy.
    """
    from scipy.optimize import linprog  # noqa: PLC0415  (optional dependency, oracle only)

    price = book.price_per_kwh
    quantity = book.quantity_kwh
    n = quantity.size
    retail = tariff.retail_price_per_kwh
    feed_in = tariff.feed_in_price_per_kwh
    # Variables: |award| of each step, then import I, then export E; minimise -welfare.
    sign = np.sign(quantity)
    cost = np.concatenate((-sign * price, [retail, -feed_in]))
    a_eq = np.concatenate((sign, [-1.0, 1.0]))[np.newaxis, :]
    bounds = np.zeros((n + 2, 2))
    bounds[:n, 1] = np.abs(quantity)
    bounds[n, 1] = tariff.import_capacity_kwh
    bounds[n + 1, 1] = tariff.export_capacity_kwh
    result = linprog(cost, A_eq=a_eq, b_eq=np.zeros(1), bounds=bounds, method="highs")
    if result.status != 0:
        raise RuntimeError(f"LP oracle failed: {result.message}")
    x = np.asarray(result.x, dtype=np.float64)
    awarded = sign * x[:n]
    import_kwh = max(0.0, float(x[n]))  # also turns HiGHS' -0.0 into 0.0
    export_kwh = max(0.0, float(x[n + 1]))
    lp_price = float(-result.eqlin.marginals[0])
    welfare = float(-result.fun)
    balance = lp_price * float(awarded.sum()) - retail * import_kwh + feed_in * export_kwh
    return Clearing(
        price_per_kwh=lp_price,
        awarded_kwh=awarded,
        site=book.site,
        utility_import_kwh=import_kwh,
        utility_export_kwh=export_kwh,
        welfare=welfare,
        community_balance=balance,
    )
