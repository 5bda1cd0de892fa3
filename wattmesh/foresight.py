"""The perfect-foresight bound: the community's cheapest battery schedule, knowing every load,
every PV output and every price of the whole horizon in advance.

One linear programme (solved by HiGHS through :func:`scipy.optimize.linprog`) over market
intervals of ``interval_h`` hours. Energies in kWh per interval, positive when a site imports;
prices per kWh; money in currency, positive when paid. For each battery ``b`` and interval
``t``: AC charge ``c[b,t]`` and discharge ``d[b,t]`` (each ``<= rated power * interval_h``) and
stored energy ``E[b,t]`` within ``[soc_min, soc_max]`` of the capacity, with
``E[b,t] = E[b,t-1] + eta_c c[b,t] - d[b,t] / eta_d`` (the convention of
:func:`simulators.physics.battery_step`). A site meters ``m[s,t] = net[s,t] + sum over its
batteries of (c - d)``, where ``net = load - PV``.

The cost minimised, in the regime of :mod:`coordinator.sharing`:

- ``"a"`` (one connection point): the feeder's import at retail minus its export at feed-in;
- ``"b"`` (energy sharing): each site's import at its retail minus its export at its feed-in,
  less the saving on the shared energy ``S[t] <= min(total import, total export)``; the LP may
  allocate ``S`` among the sites as it likes (a relaxation of the pro-rata rule of
  :func:`coordinator.sharing.shared_energy_kwh`: bill the returned ``metered_kwh`` with that
  function for the cost the schedule really has);

plus, in both, a demand charge per kW of the largest interval-mean import (the feeder's in
(a), each site's in (b)), ``over_limit_per_kwh`` on every kWh of feeder flow beyond its import
or export limit (so the LP stays within them when it can, and minimises the excess when it
cannot), less ``stored_value_per_kwh`` for each kWh a battery holds at the end beyond its
start (a charge when it holds less). Charging and discharging in the same interval is allowed
(the LP never gains by it unless it must burn energy).

The feeder's flow, for its limits, is the sum of the sites' metered energy in both regimes
(the connection point's net in (a)). An optional allowance on its import: up to
``over_limit_cap_kwh`` above ``import_limit_kwh`` in any interval, and up to
``over_limit_budget_kwh`` summed over the horizon, is free (variables ``allowed[t]`` in
``[0, cap]`` with ``sum allowed <= budget``; flow ``<= limit + allowed[t] + over_in[t]``);
only what goes beyond it pays ``over_limit_per_kwh``. With it the LP answers "the cheapest
schedule whose excess stays within an allowance" (e.g. a feeder goal of at most 5 % over the
limit in any interval and a tenth of a baseline's energy above it). Export limits have none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

Regime = Literal["a", "b"]


class ForesightError(ValueError):
    """The programme cannot be set up (bad input) or HiGHS found no optimum."""


@dataclass(frozen=True)
class LpBattery:
    """One battery for the LP: site row, capacity (Wh), rated power (W, both ways), SOCs (%),
    efficiencies (-) and the value (currency per kWh) of energy stored beyond the start."""

    site: int
    capacity_wh: float
    rated_power_w: float
    soc_pct: float
    soc_min_pct: float = 5.0
    soc_max_pct: float = 100.0
    charge_efficiency: float = 0.95
    discharge_efficiency: float = 0.95
    stored_value_per_kwh: float = 0.0

    @property
    def stored_kwh(self) -> float:
        """Energy stored at the start, kWh."""
        return self.soc_pct / 100.0 * self.capacity_wh / 1000.0


@dataclass(frozen=True)
class Foresight:
    """The LP's optimum: what each site meters per interval (kWh, + imports), each battery's
    stored energy at the end of each interval (kWh) and the objective (currency, including
    the over-limit penalty and the stored energy's value)."""

    metered_kwh: NDArray[np.float64]  # (sites, intervals)
    stored_kwh: NDArray[np.float64]  # (batteries, intervals)
    objective: float


class _Builder:
    """Variables in named blocks, constraints as sparse triplets."""

    def __init__(self) -> None:
        self.n = 0
        self.cost: list[NDArray[np.float64]] = []
        self.lower: list[NDArray[np.float64]] = []
        self.upper: list[NDArray[np.float64]] = []
        self.eq: tuple[list[int], list[int], list[float], list[float]] = ([], [], [], [])
        self.ub: tuple[list[int], list[int], list[float], list[float]] = ([], [], [], [])

    def block(
        self, size: int, cost: ArrayLike = 0.0, lower: ArrayLike = 0.0, upper: ArrayLike = np.inf
    ) -> NDArray[np.int64]:
        index = np.arange(self.n, self.n + size, dtype=np.int64)
        self.n += size
        for out, value in ((self.cost, cost), (self.lower, lower), (self.upper, upper)):
            out.append(np.broadcast_to(np.asarray(value, dtype=np.float64), (size,)).copy())
        return index

    def row(self, kind: str, terms: Sequence[tuple[int, float]], rhs: float) -> None:
        rows, cols, vals, rhss = self.eq if kind == "eq" else self.ub
        r = len(rhss)
        for col, val in terms:
            rows.append(r)
            cols.append(int(col))
            vals.append(float(val))
        rhss.append(float(rhs))


def perfect_foresight(
    net_kwh: ArrayLike,
    batteries: Sequence[LpBattery],
    *,
    interval_h: float,
    regime: Regime,
    retail_per_kwh: ArrayLike,
    feed_in_per_kwh: ArrayLike,
    local_price_per_kwh: ArrayLike = 0.0,
    local_network_charge_per_kwh: float = 0.0,
    import_limit_kwh: float = np.inf,
    export_limit_kwh: float = np.inf,
    over_limit_per_kwh: float = 10.0,
    demand_charge_per_kw: ArrayLike = 0.0,
    over_limit_cap_kwh: float = 0.0,
    over_limit_budget_kwh: float = np.inf,
) -> Foresight:
    """The cheapest schedule of ``batteries`` for sites whose load minus PV per interval is
    ``net_kwh`` ``(sites, intervals)``, see the module's docstring.

    Tariffs broadcast to ``(intervals,)`` in regime (a) and to ``(sites, intervals)`` in (b),
    where ``local_price_per_kwh`` broadcasts to ``(intervals,)``; ``demand_charge_per_kw`` is one
    value in (a) and one per site (or one for all) in (b), per kW of the horizon's largest
    interval-mean import. Feed-in must be below retail (else the programme is unbounded).

    ``over_limit_cap_kwh`` (kWh per interval, >= 0) and ``over_limit_budget_kwh`` (kWh over the
    horizon, >= 0) make feeder import above ``import_limit_kwh`` free within both; the defaults
    (no allowance) leave the programme as it was without them.
    """
    from scipy.optimize import linprog  # noqa: PLC0415 - scipy only where the LP runs
    from scipy.sparse import coo_matrix  # noqa: PLC0415

    net = np.asarray(net_kwh, dtype=np.float64)
    if net.ndim != 2 or not np.all(np.isfinite(net)):
        raise ForesightError(f"net_kwh must be finite (sites, intervals), got shape {net.shape}")
    if not interval_h > 0:
        raise ForesightError(f"interval_h must be positive, got {interval_h}")
    n_sites, n_t = net.shape
    shape = (n_t,) if regime == "a" else (n_sites, n_t)
    try:
        retail = np.broadcast_to(np.asarray(retail_per_kwh, dtype=np.float64), shape)
        feed_in = np.broadcast_to(np.asarray(feed_in_per_kwh, dtype=np.float64), shape)
        local = np.broadcast_to(np.asarray(local_price_per_kwh, dtype=np.float64), (n_t,))
        demand = np.broadcast_to(
            np.asarray(demand_charge_per_kw, dtype=np.float64), () if regime == "a" else (n_sites,)
        )
    except ValueError as err:
        raise ForesightError(f"a tariff does not fit {shape}: {err}") from err
    if np.any(feed_in >= retail):
        raise ForesightError("feed_in_per_kwh must be below retail_per_kwh")
    if not (over_limit_cap_kwh >= 0 and over_limit_budget_kwh >= 0):
        raise ForesightError(
            "over_limit_cap_kwh and over_limit_budget_kwh must be >= 0, got "
            f"{over_limit_cap_kwh} and {over_limit_budget_kwh}"
        )
    for b in batteries:
        if not 0 <= b.site < n_sites:
            raise ForesightError(f"battery's site row {b.site} is not in 0..{n_sites - 1}")

    lp = _Builder()
    blocks = _add_batteries(lp, batteries, n_t, interval_h)
    over_in = lp.block(n_t, cost=over_limit_per_kwh)
    over_out = lp.block(n_t, cost=over_limit_per_kwh)
    allowed: NDArray[np.int64] | None = None
    if over_limit_cap_kwh > 0 and over_limit_budget_kwh > 0:
        allowed = lp.block(n_t, upper=over_limit_cap_kwh)
        if np.isfinite(over_limit_budget_kwh):
            lp.row("ub", [(int(k), 1.0) for k in allowed], over_limit_budget_kwh)
    limits = _Limits(over_in, over_out, allowed, import_limit_kwh, export_limit_kwh)
    if regime == "a":
        _add_connection_point(lp, blocks, net, retail, feed_in, float(demand), limits, interval_h)
    else:
        prices = (retail, feed_in, local, local_network_charge_per_kwh)
        _add_sharing(lp, blocks, net, prices, demand, limits, interval_h)

    def matrix(
        parts: tuple[list[int], list[int], list[float], list[float]],
    ) -> tuple[coo_matrix, NDArray[np.float64]]:
        rows, cols, vals, rhs = parts
        return coo_matrix((vals, (rows, cols)), shape=(len(rhs), lp.n)).tocsr(), np.array(rhs)

    a_eq, b_eq = matrix(lp.eq)
    a_ub, b_ub = matrix(lp.ub)
    solution = linprog(
        np.concatenate(lp.cost),
        A_ub=a_ub,
        b_ub=np.minimum(b_ub, 1e12),
        A_eq=a_eq,
        b_eq=b_eq,
        bounds=np.column_stack([np.concatenate(lp.lower), np.concatenate(lp.upper)]),
        method="highs",
    )
    if solution.status != 0:
        raise ForesightError(f"HiGHS found no optimum: {solution.message}")
    x = np.asarray(solution.x, dtype=np.float64)
    metered = net.copy()
    for j, b in enumerate(batteries):
        metered[b.site] += x[blocks.charge[j]] - x[blocks.discharge[j]]
    return Foresight(
        metered_kwh=metered,
        stored_kwh=np.array([x[e] for e in blocks.stored]).reshape(len(batteries), n_t),
        objective=float(solution.fun) + blocks.constant,
    )


@dataclass
class _Batteries:
    """The batteries' variable blocks and the constant part of their stored value."""

    batteries: Sequence[LpBattery]
    charge: list[NDArray[np.int64]]
    discharge: list[NDArray[np.int64]]
    stored: list[NDArray[np.int64]]
    constant: float

    def terms(self, site: int, t: int) -> list[tuple[int, float]]:
        """What the site's batteries add to its metered energy in interval ``t``."""
        out: list[tuple[int, float]] = []
        for j, b in enumerate(self.batteries):
            if b.site == site:
                out += [(int(self.charge[j][t]), 1.0), (int(self.discharge[j][t]), -1.0)]
        return out


def _add_batteries(
    lp: _Builder, batteries: Sequence[LpBattery], n_t: int, interval_h: float
) -> _Batteries:
    """Charge, discharge and stored energy (at each interval's end) of each battery."""
    out = _Batteries(batteries, [], [], [], 0.0)
    for b in batteries:
        step_kwh = b.rated_power_w / 1000.0 * interval_h
        low = b.soc_min_pct / 100.0 * b.capacity_wh / 1000.0
        high = b.soc_max_pct / 100.0 * b.capacity_wh / 1000.0
        start = b.stored_kwh
        c = lp.block(n_t, upper=step_kwh)
        d = lp.block(n_t, upper=step_kwh)
        value = np.zeros(n_t)
        value[-1] = -b.stored_value_per_kwh
        # a battery that starts outside its bounds may only move back towards them
        e = lp.block(n_t, cost=value, lower=min(low, start), upper=max(high, start))
        out.constant += b.stored_value_per_kwh * start
        for t in range(n_t):
            terms = [
                (int(e[t]), 1.0),
                (int(c[t]), -b.charge_efficiency),
                (int(d[t]), 1.0 / b.discharge_efficiency),
            ]
            if t > 0:
                terms.append((int(e[t - 1]), -1.0))
            lp.row("eq", terms, start if t == 0 else 0.0)
        out.charge.append(c)
        out.discharge.append(d)
        out.stored.append(e)
    return out


@dataclass(frozen=True)
class _Limits:
    """The feeder's limits (kWh per interval) and the slack variables beyond them: penalised
    (``over_in``, ``over_out``) and free within the allowance (``allowed``, if any)."""

    over_in: NDArray[np.int64]
    over_out: NDArray[np.int64]
    allowed: NDArray[np.int64] | None
    import_kwh: float
    export_kwh: float

    def import_slack(self, t: int) -> list[tuple[int, float]]:
        """The terms taken off the feeder's import in interval ``t`` before its limit."""
        out = [(int(self.over_in[t]), -1.0)]
        if self.allowed is not None:
            out.append((int(self.allowed[t]), -1.0))
        return out


def _add_connection_point(
    lp: _Builder,
    blocks: _Batteries,
    net: NDArray[np.float64],
    retail: NDArray[np.float64],
    feed_in: NDArray[np.float64],
    demand_per_kw: float,
    limits: _Limits,
    interval_h: float,
) -> None:
    """Regime (a): the feeder's import and export, its limits and its peak."""
    n_sites, n_t = net.shape
    imp = lp.block(n_t, cost=retail)
    exp = lp.block(n_t, cost=-feed_in)
    peak = int(lp.block(1, cost=demand_per_kw)[0])
    for t in range(n_t):
        terms = [(int(imp[t]), 1.0), (int(exp[t]), -1.0)]
        for s in range(n_sites):
            terms += [(i, -v) for i, v in blocks.terms(s, t)]
        lp.row("eq", terms, float(net[:, t].sum()))
        lp.row("ub", [(int(imp[t]), 1.0), *limits.import_slack(t)], limits.import_kwh)
        lp.row("ub", [(int(exp[t]), 1.0), (int(limits.over_out[t]), -1.0)], limits.export_kwh)
        lp.row("ub", [(int(imp[t]), 1.0), (peak, -interval_h)], 0.0)


def _add_sharing(
    lp: _Builder,
    blocks: _Batteries,
    net: NDArray[np.float64],
    prices: tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], float],
    demand_per_kw: NDArray[np.float64],
    limits: _Limits,
    interval_h: float,
) -> None:
    """Regime (b): each site's import and export, what it receives and gives of the shared
    energy, the feeder's limits and each site's peak."""
    retail, feed_in, local, charge = prices
    n_sites, n_t = net.shape
    imp = [lp.block(n_t, cost=retail[s]) for s in range(n_sites)]
    exp = [lp.block(n_t, cost=-feed_in[s]) for s in range(n_sites)]
    received = [lp.block(n_t, cost=-(retail[s] - local - charge)) for s in range(n_sites)]
    given = [lp.block(n_t, cost=-(local - feed_in[s])) for s in range(n_sites)]
    peaks = [int(lp.block(1, cost=demand_per_kw[s])[0]) for s in range(n_sites)]
    for t in range(n_t):
        flow: list[tuple[int, float]] = []
        shared: list[tuple[int, float]] = []
        for s in range(n_sites):
            i, e = int(imp[s][t]), int(exp[s][t])
            batteries = [(k, -v) for k, v in blocks.terms(s, t)]
            lp.row("eq", [(i, 1.0), (e, -1.0), *batteries], float(net[s, t]))
            lp.row("ub", [(int(received[s][t]), 1.0), (i, -1.0)], 0.0)
            lp.row("ub", [(int(given[s][t]), 1.0), (e, -1.0)], 0.0)
            lp.row("ub", [(i, 1.0), (peaks[s], -interval_h)], 0.0)
            flow += [(i, 1.0), (e, -1.0)]
            shared += [(int(received[s][t]), 1.0), (int(given[s][t]), -1.0)]
        lp.row("eq", shared, 0.0)
        lp.row("ub", [*flow, *limits.import_slack(t)], limits.import_kwh)
        exported = [(k, -v) for k, v in flow]
        lp.row("ub", [*exported, (int(limits.over_out[t]), -1.0)], limits.export_kwh)
