"""Site planning: each site's batteries scheduled over a rolling horizon by a linear programme.

Pure functions (no I/O, no clock): :class:`edge.agent.EdgeAgent` and the stepped engine
(:mod:`wattmesh.backtest`) call them once per market interval, from the coordinator's
forecasts, and fall back to today's rules (:mod:`edge.policy`) when a plan fails.
docs/architecture.md section 5 ("Planning") describes how the plan is used.

Signs and units: energies in kWh per step, positive when the site imports (grid) or the
battery discharges (battery, AC side); prices per kWh; money in currency, positive when paid.
The site's batteries are planned as one (their sum; :func:`edge.policy.share_among_batteries_w`
shares the setpoint among them).

The programme, per step ``t`` of ``step_h`` hours, with charge ``c``, discharge ``d`` (each at
most the rated power times ``step_h``), stored energy ``E`` at the step's end within the
battery's bounds (``E[t] = E[t-1] + eta_c c[t] - d[t] / eta_d``) and grid import/export ``i``,
``x`` (``i - x = net + c - d``) minimises

    sum(buy i - sell x) - stored_value * E[last]
      + penalty * (flow beyond the site's limits and the coordinator's caps
                   + stored energy short of the coordinator's floors).

**Forecast error.** A reservation from the coordinator (floors, caps) must hold even when the
forecast is optimistic: with one, the programme carries a second, pessimistic scenario (PV
times ``1 - pv_downside``, load times ``1 + load_upside``) that shares the first step's grid
exchange (what the site bids for now) and must keep the same floors and caps, at no energy
cost. So the plan never spends now energy it could not win back by the reservation's time if PV
disappoints; later steps are re-decided at the next re-plan, with fresh forecasts and state of
charge (recourse). Without a reservation there is nothing to protect and the plan is the
nominal scenario's optimum.

**Marginal value.** The dual of each step's energy balance is what one more kWh stored at that
step's end is worth to the site (currency per kWh): the bid offers the battery's energy at
that value (divided by the discharge efficiency) and buys to charge below it (times the charge
efficiency) (:func:`plan_bid`); a planned discharge at most a tick below the price expected
for the step, so that a tie (the value is the expected price itself) still clears.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from edge.bidding import MIN_STEP_KWH, CurveSteps
from edge.config import LimitsSection, MarketSection, PlanSection
from edge.policy import BatteryView, PlanStep

#: Currency per kWh of flow beyond a limit or cap: far above any tariff, so the plan keeps
#: them whenever it can and minimises the excess if not.
PENALTY_PER_KWH = 5.0
#: Currency per kWh of stored energy short of a floor: above any tariff but below the caps'
#: penalty (a floor only serves later caps: breaking a cap now to keep one is no gain).
FLOOR_PENALTY_PER_KWH = 1.0
#: Currency per kWh of import beyond the site's own soft target (``[plan] peak_import_w``):
#: above the tariffs, below the coordinator's caps.
TARGET_PENALTY_PER_KWH = 0.5
#: Currency per kWh per step that the plan's stored energy differs from the coordinator's
#: suggestion: a tie-breaker among equally cheap plans, below any real price difference.
FOLLOW_PER_KWH = 0.001
#: Variable blocks per scenario in the programme.
BLOCKS = 9
#: The pessimistic scenario's PV shortfall and load excess, as shares of the forecast.
PV_DOWNSIDE = 0.5
LOAD_UPSIDE = 0.2


class PlanError(ValueError):
    """A plan cannot be set up (bad input) or the solver found no optimum."""


#: A solved programme: the optimum (every variable), the duals of the equality rows, the
#: simplex iterations and the solve's wall time [s].
Solved = tuple[NDArray[np.float64], NDArray[np.float64], int, float]
#: A programme ready to solve, in any thread (it holds everything it needs; HiGHS solves
#: without Python's lock). Raises :class:`PlanError` when there is no optimum.
SolveJob = Callable[[], Solved]
_T = TypeVar("_T")
_P = ParamSpec("_P")
#: A plan made in steps (:func:`plan_interval_steps`): it yields its programme's
#: :data:`SolveJob` once and is sent the job's result; it returns the plan.
PlanSteps = Generator[SolveJob, Solved, _T]


def run_steps(steps: PlanSteps[_T], job: SolveJob | None = None) -> _T:
    """Make a plan given in steps here, solving its programmes in this thread (``job``: the
    one it has already yielded)."""
    try:
        if job is None:
            job = next(steps)
        while True:
            try:
                solved = job()
            except PlanError as err:
                job = steps.throw(err)
            else:
                job = steps.send(solved)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def resume_steps(steps: PlanSteps[_T], solved: Solved | PlanError) -> _T:
    """Go on with a plan in steps whose programme was solved elsewhere (``solved``: what its
    job returned, or the :class:`PlanError` it raised); raises :class:`PlanError` as the plan
    does."""
    try:
        job = steps.throw(solved) if isinstance(solved, PlanError) else steps.send(solved)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    return run_steps(steps, job)


class WarmStart:
    """What one site's next plan starts from: the simplex basis of its last plan (one step
    earlier, so mostly still the right one: a re-plan of the five-site community's week takes
    about 30 simplex iterations instead of about 560). A programme of another shape (another
    horizon length, a reservation appearing or lapsing) starts cold. The optimum is the same
    either way (where several plans cost the same, the solver may pick another of them). One
    per site, used by one plan at a time (not thread-safe). Moving the basis on by one step
    was tried: fewer iterations, but converting it in Python cost more than they saved."""

    __slots__ = ("basis", "matrix", "shape")

    def __init__(self) -> None:
        self.basis: Any = None
        self.shape: tuple[int, list[int]] | None = None
        #: The last programme's constraint matrix (compressed rows) and what it was built
        #: from: a re-plan of the same shape and coefficients reuses it.
        self.matrix: (
            tuple[object, NDArray[np.int64], NDArray[np.int32], NDArray[np.float64]] | None
        ) = None


@dataclass(frozen=True, slots=True)
class PlanBattery:
    """A site's batteries taken together: energies in kWh, powers in kW, efficiencies (-)."""

    stored_kwh: float
    min_kwh: float
    max_kwh: float
    max_charge_kw: float
    max_discharge_kw: float
    charge_efficiency: float = 0.95
    discharge_efficiency: float = 0.95


@dataclass(frozen=True, slots=True)
class SitePlan:
    """A solved plan, one value per step from the first planned step on.

    ``grid_kwh`` the planned import (+) or export (-), ``battery_kwh`` the batteries' AC
    energy (+ discharges), ``stored_kwh`` the energy stored at each step's end,
    ``value_per_kwh`` the marginal value of stored energy at each step's end, ``cost`` the
    nominal scenario's energy cost (currency, + paid, without penalties and stored value),
    ``penalty_kwh`` the flow beyond limits and the floor shortfall the plan could not avoid
    (nominal and pessimistic scenarios), ``solve_s`` the solver's wall time, ``iterations``
    its simplex iterations."""

    grid_kwh: NDArray[np.float64]
    battery_kwh: NDArray[np.float64]
    stored_kwh: NDArray[np.float64]
    value_per_kwh: NDArray[np.float64]
    cost: float
    penalty_kwh: float
    solve_s: float
    iterations: int = 0


def _steps(value: ArrayLike | None, n: int, what: str) -> NDArray[np.float64]:
    """``value`` broadcast to ``n`` steps (NaN: no constraint in that step)."""
    if value is None:
        return np.full(n, np.nan)
    try:
        return np.broadcast_to(np.asarray(value, dtype=np.float64), (n,)).copy()
    except ValueError as err:
        raise PlanError(f"{what} does not fit {n} steps: {err}") from err


class _Programme:
    """A linear programme's cost, bounds and constraint rows, built a block of rows at a time."""

    def __init__(self, width: int) -> None:
        self.cost = np.zeros(width)
        self.lower = np.zeros(width)
        self.upper = np.full(width, np.inf)
        self.width = width
        #: per kind: each term's rows, columns and coefficient
        self.parts: dict[
            str, tuple[list[NDArray[np.int64]], list[NDArray[np.int64]], list[float]]
        ] = {
            "eq": ([], [], []),
            "ub": ([], [], []),
        }
        self.rhs: dict[str, list[NDArray[np.float64]]] = {"eq": [], "ub": []}
        self.count = {"eq": 0, "ub": 0}
        #: what decides the matrix: the row blocks and terms added, in order (see rows())
        self.signature: list[tuple[object, ...]] = []
        self._keys: dict[int, tuple[NDArray[np.int64], object]] = {}

    def add(
        self,
        kind: str,
        cols: list[NDArray[np.int64]],
        vals: list[float],
        rhs: NDArray[np.float64],
        rows: NDArray[np.int64] | None = None,
    ) -> NDArray[np.int64]:
        """Rows ``sum(vals[k] * x[cols[k][r]]) (= or <=) rhs[r]``; with ``rows``, terms added
        to existing rows instead (``rhs`` ignored). Returns the rows."""
        new = rows is None
        if rows is None:
            first = self.count[kind]
            rows = self.run(first, len(rhs))
            self.count[kind] += len(rhs)
            self.rhs[kind].append(np.asarray(rhs, dtype=np.float64))
        out_rows, out_cols, out_vals = self.parts[kind]
        for col, val in zip(cols, vals, strict=True):
            out_rows.append(rows)
            out_cols.append(col)
            out_vals.append(float(val))
        self.signature.append((kind, new, self._key(rows), *vals))
        self.signature.append(tuple(self._key(c) for c in cols))
        return rows

    def run(self, first: int, n: int) -> NDArray[np.int64]:
        """The indices ``first .. first + n - 1``, their key known (see :meth:`_key`)."""
        index = np.arange(first, first + n, dtype=np.int64)
        self._keys[id(index)] = (index, (first, n) if n else ())
        return index

    def part(self, index: NDArray[np.int64], start: int, stop: int) -> NDArray[np.int64]:
        """``index[start:stop]``, its key known when ``index`` is a run from :meth:`run`."""
        out = index[start:stop]
        seen = self._keys.get(id(index))
        if seen is not None and isinstance(seen[1], tuple) and len(out):
            self._keys[id(out)] = (out, (seen[1][0] + start, len(out)))
        return out

    def _key(self, index: NDArray[np.int64]) -> object:
        """:func:`_run_key` of ``index``, once per array (the blocks recur in many rows; the
        array is kept with its key, so its id is not reused while the programme lives)."""
        seen = self._keys.get(id(index))
        if seen is None:
            seen = self._keys[id(index)] = (index, _run_key(index))
        return seen[1]

    def rows(
        self, cache: WarmStart | None = None
    ) -> tuple[NDArray[np.int64], NDArray[np.int32], NDArray[np.float64], NDArray[np.float64]]:
        """Every row, equalities first, in compressed-row form (start, column index, value; a
        column's terms in one row summed) and their right-hand sides. With ``cache``, a matrix
        built from the same terms (the width, and each block's first row, length and
        coefficients and each term's first column, in the same order: every term's columns
        and rows are consecutive runs) is taken from it, and this one kept in it."""
        kinds = [k for k in ("eq", "ub") if self.count[k]]
        rhs = np.concatenate([r for k in kinds for r in self.rhs[k]])
        key = (self.width, self.count["eq"], self.count["ub"], tuple(self.signature))
        if cache is not None and cache.matrix is not None and cache.matrix[0] == key:
            return cache.matrix[1], cache.matrix[2], cache.matrix[3], rhs
        start, index, value = self._compressed(kinds)
        if cache is not None:
            cache.matrix = (key, start, index, value)
        return start, index, value, rhs

    def _compressed(
        self, kinds: list[str]
    ) -> tuple[NDArray[np.int64], NDArray[np.int32], NDArray[np.float64]]:
        offset = {"eq": 0, "ub": self.count["eq"]}
        rows = np.concatenate([r + offset[k] for k in kinds for r in self.parts[k][0]])
        cols = np.concatenate([c for k in kinds for c in self.parts[k][1]])
        vals = np.concatenate(
            [
                np.full(len(r), v)
                for k in kinds
                for r, v in zip(self.parts[k][0], self.parts[k][2], strict=True)
            ]
        )
        n_rows = self.count["eq"] + self.count["ub"]
        flat = rows * self.width + cols
        # the blocks come nearly in order: a stable sort (merging runs) is ten times faster
        order = np.argsort(flat, kind="stable")
        flat = flat[order]
        first = np.flatnonzero(np.diff(flat, prepend=-1))  # each (row, column) once
        keys = flat[first]
        start = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(keys // self.width, minlength=n_rows), out=start[1:])
        value = np.add.reduceat(vals[order], first) if len(first) else vals[:0]
        return start, (keys % self.width).astype(np.int32), value

    def blocks(self) -> list[int]:
        """The lengths of the row blocks, equalities first, in the order they were added."""
        return [len(r) for kind in ("eq", "ub") for r in self.rhs[kind]]

    def solve_job(self, warm: WarmStart | None = None) -> SolveJob:
        """The programme's solve, to run in any thread (built here): the optimum (every
        variable) and the duals of the equality rows (the change in cost per unit more on a
        row's right-hand side); :class:`PlanError` without one. With ``warm``, the simplex
        starts from the last plan's basis and keeps this one's (one solve of a site at a
        time)."""
        start, index, value, rhs = self.rows(warm)
        n_eq = self.count["eq"]
        lower = rhs.copy()
        lower[n_eq:] = -np.inf
        shape = (self.width, self.blocks())
        cost, col_lower, col_upper = self.cost, self.lower, self.upper
        started = None if warm is None else (warm, shape)

        def job() -> Solved:
            """:func:`solve_lp`, with this thread's iteration count and its wall time."""
            t0 = time.perf_counter()
            x, dual = solve_lp(
                cost, col_lower, col_upper, lower, rhs, start, index, value, n_eq, warm=started
            )
            return x, dual, _solvers.iterations, time.perf_counter() - t0

        return job


def _run_key(index: NDArray[np.int64]) -> object:
    """What identifies an index array: its first entry and length when it is a run of
    consecutive numbers (every array the plan makes), else all its entries."""
    n = len(index)
    if n == 0:
        return ()
    first = int(index[0])
    if int(index[-1]) - first == n - 1 and (n < 3 or bool(np.all(np.diff(index) == 1))):
        return (first, n)
    return index.tobytes()


@dataclass(frozen=True, slots=True)
class _Limits:
    """Per-step limits on the site's flow (kW, NaN: none) and floors on its storage (kWh)."""

    cap_in: NDArray[np.float64]
    cap_out: NDArray[np.float64]
    floor: NDArray[np.float64]
    target_in: float  # a soft cap on import (kW, NaN: none)
    target_penalty_per_kwh: float


def _scenario(
    lp: _Programme,
    base: int,
    net: NDArray[np.float64],
    battery: PlanBattery,
    limits: _Limits,
    step_h: float,
    penalty_per_kwh: float,
) -> tuple[NDArray[np.int64], ...]:
    """One scenario's variables (``BLOCKS`` blocks of ``len(net)`` from ``base``: charge,
    discharge, stored, import, export, over import, over export, floor shortfall, over the
    import target) and its rows."""
    b, n = battery, len(net)
    blocks = tuple(lp.run(base + j * n, n) for j in range(BLOCKS))
    c, d, e, i, x, oi, ox, short, ot = blocks
    lp.upper[c] = b.max_charge_kw * step_h
    lp.upper[d] = b.max_discharge_kw * step_h
    lp.lower[e] = min(b.min_kwh, b.stored_kwh)
    lp.upper[e] = max(b.max_kwh, b.stored_kwh)
    lp.cost[oi] = lp.cost[ox] = penalty_per_kwh
    lp.cost[short] = min(FLOOR_PENALTY_PER_KWH, penalty_per_kwh)
    start = np.zeros(n)
    start[0] = b.stored_kwh
    # E[t] - E[t-1] - eta_c c[t] + d[t] / eta_d = E0 at t = 0, else 0
    rows = lp.add("eq", [e, c, d], [1.0, -b.charge_efficiency, 1.0 / b.discharge_efficiency], start)
    if n > 1:
        lp.add("eq", [lp.part(e, 0, n - 1)], [-1.0], start, rows=lp.part(rows, 1, n))
    lp.add("eq", [i, x, c, d], [1.0, -1.0, -1.0, 1.0], net)  # import - export = net + c - d
    # a row for every step, limited or not (no limit: an infinite right-hand side, a free row),
    # so that re-plans share one shape and each can start from the last one's basis
    lp.add("ub", [i, x, oi], [1.0, -1.0, -1.0], _or_inf(limits.cap_in * step_h))
    lp.add("ub", [x, i, ox], [1.0, -1.0, -1.0], _or_inf(limits.cap_out * step_h))
    if math.isfinite(limits.target_in):
        lp.cost[ot] = limits.target_penalty_per_kwh
        lp.add("ub", [i, x, ot], [1.0, -1.0, -1.0], np.full(n, limits.target_in * step_h))
    lp.add("ub", [e, short], [-1.0, -1.0], _or_inf(-limits.floor))
    return blocks


def _follow(
    lp: _Programme, stored: NDArray[np.int64], first: int, suggested: NDArray[np.float64]
) -> None:
    """``E - above + below = suggested`` where there is a suggestion, each kWh of difference
    at FOLLOW_PER_KWH (the variables ``above`` and ``below`` start at ``first``)."""
    has = np.isfinite(suggested)
    if not has.any():
        return
    above = lp.run(first, len(suggested))
    below = lp.run(first + len(suggested), len(suggested))
    lp.cost[above[has]] = lp.cost[below[has]] = FOLLOW_PER_KWH
    # every step has its row (free to differ at no cost where there is no suggestion): one shape
    lp.add("eq", [stored, above, below], [1.0, -1.0, 1.0], np.where(has, suggested, 0.0))


def _or_inf(rhs: NDArray[np.float64]) -> NDArray[np.float64]:
    """``rhs`` with +inf where it is NaN (no limit at that step)."""
    return np.where(np.isnan(rhs), np.inf, rhs)


def _check(
    net: NDArray[np.float64],
    buy: NDArray[np.float64],
    sell: NDArray[np.float64],
    battery: PlanBattery,
    step_h: float,
) -> None:
    if net.ndim != 1 or len(net) == 0 or not np.all(np.isfinite(net)):
        raise PlanError(f"net_kwh must be a finite, non-empty series, got shape {net.shape}")
    if not (math.isfinite(step_h) and step_h > 0):
        raise PlanError(f"step_h must be positive, got {step_h}")
    if not (np.all(np.isfinite(buy)) and np.all(np.isfinite(sell))):
        raise PlanError("prices must be finite")
    if np.any(sell > buy + 1e-12):
        raise PlanError("sell_per_kwh must not exceed buy_per_kwh (the plan would be unbounded)")
    b = battery
    numbers = (b.stored_kwh, b.min_kwh, b.max_kwh, b.max_charge_kw, b.max_discharge_kw)
    if not all(math.isfinite(v) and v >= 0 for v in numbers) or b.min_kwh > b.max_kwh:
        raise PlanError(f"battery figures must be finite, >= 0 and min <= max: {battery}")
    if not (0 < b.charge_efficiency <= 1 and 0 < b.discharge_efficiency <= 1):
        raise PlanError("efficiencies must be in (0, 1]")


def plan_site_steps(
    net_kwh: ArrayLike,
    buy_per_kwh: ArrayLike,
    sell_per_kwh: ArrayLike,
    battery: PlanBattery,
    *,
    step_h: float,
    stored_value_per_kwh: float,
    import_limit_kw: float | None = None,
    export_limit_kw: float | None = None,
    floor_kwh: ArrayLike | None = None,
    import_cap_kw: ArrayLike | None = None,
    export_cap_kw: ArrayLike | None = None,
    pessimistic_net_kwh: ArrayLike | None = None,
    penalty_per_kwh: float = PENALTY_PER_KWH,
    import_target_kw: float | None = None,
    target_penalty_per_kwh: float = TARGET_PENALTY_PER_KWH,
    pessimistic_import_cap_kw: ArrayLike | None = None,
    suggested_kwh: ArrayLike | None = None,
    warm: WarmStart | None = None,
) -> PlanSteps[SitePlan]:
    """The site's cheapest battery schedule over ``len(net_kwh)`` steps (module docstring),
    in steps (:data:`PlanSteps`; :func:`plan_site` makes it at once).

    ``net_kwh`` is the forecast load minus PV per step (kWh, + imports); ``buy_per_kwh`` and
    ``sell_per_kwh`` the expected prices of importing and exporting (sell <= buy); the site's
    connection limits in kW; the coordinator's reservation as per-step ``floor_kwh`` (energy
    to hold at the step's end), ``import_cap_kw`` (at most this import; negative: at least
    this export) and ``export_cap_kw``, NaN where a step has none; ``pessimistic_net_kwh`` the
    net load the reservation must survive (default: none, one scenario);
    ``pessimistic_import_cap_kw`` the import caps that scenario must keep (default: the same;
    the agent lifts them by the pessimistic load's excess, which is the site's own surprise,
    not what the reservation asks of its batteries); ``import_target_kw`` a soft cap on the
    site's own import (a peak it would rather not pass, e.g. for a demand charge), kept at
    ``target_penalty_per_kwh`` beyond it; ``suggested_kwh`` the coordinator's suggested stored
    energy per step (NaN: none), followed at ``FOLLOW_PER_KWH`` per kWh of difference per step:
    enough to choose among equally cheap plans, too little to change a cheaper one; ``warm``
    the site's :class:`WarmStart` (the solve starts from its last plan's basis). Raises
    :class:`PlanError` on bad input or when HiGHS finds no optimum.
    """
    t0 = time.perf_counter()
    net = np.asarray(net_kwh, dtype=np.float64)
    n = len(net) if net.ndim == 1 else 0
    buy, sell = _steps(buy_per_kwh, n, "buy_per_kwh"), _steps(sell_per_kwh, n, "sell_per_kwh")
    _check(net, buy, sell, battery, step_h)
    cap_in = _steps(import_cap_kw, n, "import_cap_kw")
    cap_out = _steps(export_cap_kw, n, "export_cap_kw")
    cap_in_p = (
        cap_in
        if pessimistic_import_cap_kw is None
        else _steps(pessimistic_import_cap_kw, n, "pessimistic_import_cap_kw")
    )
    if import_limit_kw is not None:
        cap_in = np.fmin(cap_in, import_limit_kw)
        cap_in_p = np.fmin(cap_in_p, import_limit_kw)
    if export_limit_kw is not None:
        cap_out = np.fmin(cap_out, export_limit_kw)
    floor = _steps(floor_kwh, n, "floor_kwh")
    target = math.nan if import_target_kw is None else float(import_target_kw)
    limits = [_Limits(cap_in, cap_out, floor, target, target_penalty_per_kwh)]
    scenarios = [net]
    if pessimistic_net_kwh is not None:
        pessimistic = _steps(pessimistic_net_kwh, n, "pessimistic_net_kwh")
        if not np.all(np.isfinite(pessimistic)):
            raise PlanError("pessimistic_net_kwh must be finite")
        scenarios.append(pessimistic)
        limits.append(_Limits(cap_in_p, cap_out, floor, math.nan, 0.0))
    nv = BLOCKS * n
    lp = _Programme(nv * len(scenarios) + 2 * n)
    blocks = [
        _scenario(lp, k * nv, s, battery, limits[k], step_h, penalty_per_kwh)
        for k, s in enumerate(scenarios)
    ]
    _, _, e, i, x, *_ = blocks[0]
    lp.cost[i], lp.cost[x] = buy, -sell
    lp.cost[e[-1]] = -stored_value_per_kwh
    _follow(lp, e, nv * len(scenarios), _steps(suggested_kwh, n, "suggested_kwh"))
    if len(blocks) > 1:  # the first step's grid exchange is one decision for both scenarios
        i1, x1 = blocks[1][3], blocks[1][4]
        firsts = [lp.part(v, 0, 1) for v in (i, x, i1, x1)]
        lp.add("eq", firsts, [1.0, -1.0, -1.0, 1.0], np.zeros(1))
    built_s = time.perf_counter() - t0
    sol, eq_dual, iterations, solve_s = yield lp.solve_job(warm)
    t1 = time.perf_counter()
    c_v, d_v, e_v, i_v, x_v = (sol[blk] for blk in blocks[0][:5])
    over = sum(float(sol[np.concatenate(blk[5:8])].sum()) for blk in blocks)
    return SitePlan(
        grid_kwh=i_v - x_v,
        battery_kwh=d_v - c_v,
        stored_kwh=e_v,
        value_per_kwh=-eq_dual[:n],
        cost=float(buy @ i_v - sell @ x_v),
        penalty_kwh=over,
        solve_s=built_s + solve_s + time.perf_counter() - t1,  # not the wait for a thread
        iterations=iterations,
    )


def inline(steps: Callable[_P, PlanSteps[_T]]) -> Callable[_P, _T]:
    """A plan in steps made at once, its programme solved in the caller's thread."""

    @wraps(steps)
    def made(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        return run_steps(steps(*args, **kwargs))

    made.__name__ = made.__qualname__ = steps.__name__.removesuffix("_steps")
    made.__doc__ = f":func:`{steps.__name__}` made at once (solved in this thread)."
    return made


#: :func:`plan_site_steps` made at once; raises :class:`PlanError` on bad input or when
#: HiGHS finds no optimum.
plan_site = inline(plan_site_steps)


def load_solver() -> None:
    """Import the solver (HiGHS, through highspy): an agent does it in the background at start
    rather than in its first plan."""
    _highs()


_solvers = threading.local()


def _highs() -> Any:
    """This thread's HiGHS instance, silent (made at its first use and kept: an instance per
    solve would cost more than a small plan's solve)."""
    highs = getattr(_solvers, "highs", None)
    if highs is None:
        highs = _new_highs()
        highs.setOptionValue("presolve", "off")  # a plan is small and has little to remove
        _solvers.highs = highs
    return highs


def _new_highs() -> Any:
    """A HiGHS instance that prints nothing: highspy's ``Highs()`` prints the solver's banner
    as it is made, before any option can be set, so the bare solver it wraps is used. Its
    ``threads`` option is left alone: HiGHS sizes one scheduler per process at the first
    solve, and an instance asking for another size then fails every solve ("Not Set"), as a
    plan did after the community schedule in the engine's process."""
    import highspy  # noqa: PLC0415

    core = getattr(highspy, "_core", None)
    bare = getattr(core, "_Highs", None)
    highs = bare() if bare is not None else highspy.Highs()  # type: ignore[no-untyped-call]
    highs.setOptionValue("output_flag", False)
    return highs


def solve_lp(
    cost: NDArray[np.float64],
    col_lower: NDArray[np.float64],
    col_upper: NDArray[np.float64],
    row_lower: NDArray[np.float64],
    row_upper: NDArray[np.float64],
    start: NDArray[np.int64],
    index: NDArray[np.int32],
    value: NDArray[np.float64],
    n_eq: int,
    *,
    warm: tuple[WarmStart, tuple[int, list[int]]] | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Minimise ``cost @ x`` within column and row bounds (rows in compressed-row form) with
    HiGHS's simplex; the optimum and the duals of the first ``n_eq`` rows. :class:`PlanError`
    when there is none (infeasible, unbounded, or the solver failed). ``warm``: the
    :class:`WarmStart` to start from and keep this solve's basis in, and the programme's
    shape (column count, row block lengths)."""
    import highspy  # noqa: PLC0415 - loads with the first plan

    highs = _highs()
    passed = highs.passModel(
        len(cost),
        len(row_lower),
        len(value),
        int(highspy.MatrixFormat.kRowwise),
        int(highspy.ObjSense.kMinimize),
        0.0,
        cost,
        col_lower,
        col_upper,
        row_lower,
        row_upper,
        start.astype(np.int32),
        index,
        value,
        np.zeros(len(cost), dtype=np.int32),  # every variable continuous
    )
    if passed != highspy.HighsStatus.kOk:
        raise PlanError(f"the plan's programme is malformed (HiGHS refused it: {passed})")
    if warm is not None:
        _start_from(highs, warm[0], warm[1])
    highs.run()
    status = highs.getModelStatus()
    if status != highspy.HighsModelStatus.kOptimal:
        raise PlanError(f"HiGHS found no optimum: {highs.modelStatusToString(status)}")
    solution = highs.getSolution()
    x = np.asarray(solution.col_value, dtype=np.float64)
    _solvers.iterations = int(highs.getInfo().simplex_iteration_count)
    if warm is not None:
        warm[0].basis, warm[0].shape = highs.getBasis(), warm[1]
    return x, np.asarray(solution.row_dual, dtype=np.float64)[:n_eq]


def _start_from(highs: Any, warm: WarmStart, shape: tuple[int, list[int]]) -> None:
    """Give HiGHS ``warm``'s basis if the programme has its shape; else it starts cold."""
    if warm.basis is not None and warm.shape == shape and warm.basis.valid:
        highs.setBasis(warm.basis)


def pessimistic_net_kwh(
    load_kwh: ArrayLike,
    pv_kwh: ArrayLike,
    *,
    pv_downside: float = PV_DOWNSIDE,
    load_upside: float = LOAD_UPSIDE,
) -> NDArray[np.float64]:
    """The net load (kWh, + imports) a reservation must survive: PV short by ``pv_downside``
    and load over by ``load_upside`` of the forecast."""
    load = np.asarray(load_kwh, dtype=np.float64)
    pv = np.asarray(pv_kwh, dtype=np.float64)
    return load * (1.0 + load_upside) - np.maximum(pv, 0.0) * (1.0 - pv_downside)


def stored_value_per_kwh(
    buy_per_kwh: ArrayLike, charge_efficiency: float, discharge_efficiency: float
) -> float:
    """What a kWh left stored at the horizon's end is worth: what it costs to put back at the
    cheapest expected price (divided by the charge efficiency), but no more than the purchase
    it displaces at the median price (times the discharge efficiency). Valuing it higher
    keeps energy the next day refills more cheaply; lower, empties the battery at the end."""
    buy = np.asarray(buy_per_kwh, dtype=np.float64)
    if buy.size == 0:
        return 0.0
    return min(float(buy.min()) / charge_efficiency, float(np.median(buy)) * discharge_efficiency)


def demand_curve(
    base_kwh: float,
    charges: Sequence[tuple[float, float]],
    discharges: Sequence[tuple[float, float]],
    *,
    max_buy_price_per_kwh: float,
    min_sell_price_per_kwh: float,
) -> CurveSteps:
    """The bid for a net demand that depends on the price: ``base_kwh`` (+ a need bought at up
    to the max buy price, - a surplus sold from the min sell price), plus each ``(price,
    kWh)`` of ``charges`` bought at that price or less, less each of ``discharges`` released
    above that price (first buying less, then selling). Buy steps by falling price, sell steps
    by rising price; every sell price is above every buy price (a coherent curve)."""
    tick = 1e-4

    def net_at(price: float) -> float:
        net = base_kwh if base_kwh > 0 and price <= max_buy_price_per_kwh else 0.0
        if base_kwh < 0 and price >= min_sell_price_per_kwh:
            net = base_kwh
        net += sum(q for p, q in charges if price <= p)
        return net - sum(q for p, q in discharges if price > p)

    levels = {max_buy_price_per_kwh, min_sell_price_per_kwh}
    for p, _ in (*charges, *discharges):
        levels |= {p, p + tick}
    prices = sorted(levels)
    buy: list[tuple[float, float]] = []
    sell: list[tuple[float, float]] = []
    above = 0.0  # net demand just above the level, from the top down
    for price in reversed(prices):
        here = max(net_at(price), 0.0)
        if here - above > MIN_STEP_KWH:
            buy.append((price, here - above))
        above = max(here, above)
    below = 0.0  # net supply just below the level, from the bottom up
    for price in prices:
        here = max(-net_at(price), 0.0)
        if here - below > MIN_STEP_KWH:
            sell.append((price, here - below))
        below = max(here, below)
    return CurveSteps(tuple(buy), tuple(sell))


def plan_bid(
    plan: SitePlan,
    net_kwh: float,
    battery: PlanBattery,
    *,
    step_h: float,
    max_buy_price_per_kwh: float,
    min_sell_price_per_kwh: float,
    role: str = "prosumer",
    floor_kwh: float | None = None,
    import_cap_kw: float | None = None,
    export_cap_kw: float | None = None,
    price_range_per_kwh: tuple[float, float] | None = None,
    expected_price_per_kwh: float | None = None,
) -> CurveSteps:
    """The bid for the plan's first step, shaped by the plan and its value of storage ``v``.

    The site's forecast ``net_kwh`` is its inflexible need (or surplus); the discharge the
    coordinator's ``import_cap_kw`` forces (the charge its ``export_cap_kw`` forces) is firm.
    The rest of the planned discharge is released at ``v`` divided by the discharge efficiency
    or more, the rest of the planned charge bought at ``v`` times the charge efficiency or
    less: a battery sells only at more than its energy is worth to the site later and buys
    only at less. The batteries' remaining energy (above ``floor_kwh`` and their minimum,
    within their power and the import cap) is offered only at prices outside what the plan
    expected (``price_range_per_kwh``, the forecast's lowest and highest): the plan already
    holds what the expected prices are worth. The planned discharge is offered at no more than
    a tick below the price the plan expects for this step (``expected_price_per_kwh``): the
    plan discharges now only where that price pays at least the energy's value, and where it
    pays exactly that (a tie, e.g. retail now and retail later, so ``v`` is retail times the
    discharge efficiency), an offer at the expected price itself would never clear against the
    utility's supply at that same price, and the battery would keep what the plan meant to
    spend now (and then have no room for the midday surplus). Roles limit trade as in
    :func:`edge.bidding.bid_curve`; offers at or above ``max_buy_price_per_kwh`` are left out.
    """
    b = battery
    value = float(plan.value_per_kwh[0])
    low = max(b.min_kwh, floor_kwh if floor_kwh is not None and math.isfinite(floor_kwh) else 0)
    can_discharge = max(
        0.0, min(b.max_discharge_kw * step_h, (b.stored_kwh - low) * b.discharge_efficiency)
    )
    can_charge = max(
        0.0, min(b.max_charge_kw * step_h, (b.max_kwh - b.stored_kwh) / b.charge_efficiency)
    )
    planned = float(plan.battery_kwh[0])
    planned_out = min(max(planned, 0.0), can_discharge)
    planned_in = min(max(-planned, 0.0), can_charge)
    forced_out = forced_in = 0.0
    if import_cap_kw is not None and math.isfinite(import_cap_kw):
        forced_out = min(can_discharge, max(0.0, net_kwh - import_cap_kw * step_h))
    if export_cap_kw is not None and math.isfinite(export_cap_kw):
        forced_in = min(can_charge, max(0.0, -net_kwh - export_cap_kw * step_h))
    firm = net_kwh - forced_out + forced_in
    flex_out = max(0.0, planned_out - forced_out)
    flex_in = max(0.0, planned_in - forced_in)
    extra_out = max(0.0, can_discharge - forced_out - flex_out)
    extra_in = max(0.0, can_charge - forced_in - flex_in)
    if import_cap_kw is not None and math.isfinite(import_cap_kw):
        room = max(0.0, import_cap_kw * step_h - firm)
        flex_in = min(flex_in, room)
        extra_in = min(extra_in, room - flex_in)
    if role == "producer":  # stores only its own surplus
        flex_in = min(flex_in, max(-firm, 0.0))
        extra_in = min(extra_in, max(-firm - flex_in, 0.0))
    elif role == "consumer":  # serves only itself
        flex_out = min(flex_out, max(firm, 0.0))
        extra_out = min(extra_out, max(firm - flex_out, 0.0))
    spread = 1e-3
    top = max_buy_price_per_kwh - spread
    cheapest, dearest = price_range_per_kwh or (value, value)
    sell_at = float(np.clip(value / b.discharge_efficiency, min_sell_price_per_kwh, top))
    buy_at = float(np.clip(value * b.charge_efficiency, min_sell_price_per_kwh, sell_at - spread))
    if expected_price_per_kwh is not None and flex_out > MIN_STEP_KWH:
        # a tie: energy worth the expected price itself (e.g. retail now and retail later)
        sell_at = max(min(sell_at, expected_price_per_kwh - spread), buy_at + spread)
    extra_sell_at = min(max(sell_at, dearest) + spread, top)
    extra_buy_at = max(min(buy_at, cheapest) - spread, min_sell_price_per_kwh)
    discharges = [(sell_at, flex_out), (extra_sell_at, extra_out)]
    if value / b.discharge_efficiency >= top:
        discharges = []  # worth more kept than any buyer pays
    elif extra_sell_at >= top:
        discharges = discharges[:1]
    return demand_curve(
        firm,
        [(buy_at, flex_in), (extra_buy_at, extra_in)],
        discharges,
        max_buy_price_per_kwh=max_buy_price_per_kwh,
        min_sell_price_per_kwh=min_sell_price_per_kwh,
    )


@dataclass(frozen=True, slots=True)
class IntervalPlan:
    """A plan made for one market interval: the plan, its first step and its bid."""

    plan: SitePlan
    step: PlanStep
    bid: CurveSteps


@dataclass(frozen=True, slots=True)
class Horizon:
    """Per-step series aligned on the market intervals from ``start_ts``: forecast PV and load
    (W), price (per kWh) and the reservation (NaN: nothing asked)."""

    start_ts: float
    step_s: float
    pv_w: NDArray[np.float64]
    load_w: NDArray[np.float64]
    price_per_kwh: NDArray[np.float64]
    floor_kwh: NDArray[np.float64]
    import_cap_kw: NDArray[np.float64]
    export_cap_kw: NDArray[np.float64]
    suggested_kwh: NDArray[np.float64] | None = None


def aligned(
    start_ts: float,
    step_s: float,
    steps: int,
    series_start_ts: float,
    series_step_s: float,
    values: ArrayLike,
) -> NDArray[np.float64]:
    """``steps`` values of a series (NaN where it has none) at ``start_ts + k step_s``; the
    series must step as the plan does."""
    data = np.asarray(values, dtype=np.float64)
    out = np.full(steps, np.nan)
    if series_step_s != step_s or len(data) == 0:
        return out
    offset = (start_ts - series_start_ts) / step_s
    first = round(offset)
    if abs(offset - first) > 1e-6:
        return out
    low, high = max(first, 0), min(first + steps, len(data))  # the steps the series has
    if low < high:
        out[low - first : high - first] = data[low:high]
    return out


def aggregate(
    batteries: Sequence[BatteryView], charge_efficiency: float, discharge_efficiency: float
) -> PlanBattery:
    """The site's batteries as one; raises :class:`PlanError` if one reports no SOC or
    capacity (its energy cannot be planned)."""
    if not batteries:
        raise PlanError("no battery to plan")
    if any(b.soc_pct is None or b.capacity_wh is None for b in batteries):
        raise PlanError("a battery reports no state of charge or capacity")
    kwh = [(b.capacity_wh or 0.0) / 1000.0 for b in batteries]
    return PlanBattery(
        stored_kwh=sum((b.soc_pct or 0.0) / 100.0 * c for b, c in zip(batteries, kwh, strict=True)),
        min_kwh=sum(b.soc_min_pct / 100.0 * c for b, c in zip(batteries, kwh, strict=True)),
        max_kwh=sum(b.soc_max_pct / 100.0 * c for b, c in zip(batteries, kwh, strict=True)),
        max_charge_kw=sum((b.rated_charge_w or 0.0) for b in batteries) / 1000.0,
        max_discharge_kw=sum((b.rated_discharge_w or 0.0) for b in batteries) / 1000.0,
        charge_efficiency=charge_efficiency,
        discharge_efficiency=discharge_efficiency,
    )


def plan_interval_steps(
    horizon: Horizon,
    batteries: Sequence[BatteryView],
    *,
    config: PlanSection,
    market: MarketSection,
    limits: LimitsSection,
    role: str,
    warm: WarmStart | None = None,
) -> PlanSteps[IntervalPlan]:
    """Plan the site from ``horizon`` (its first step is the interval bid for) and make the
    interval's bid, in steps (:data:`PlanSteps`: the caller may solve the programme in another
    thread; :func:`plan_interval` makes it at once). Raises :class:`PlanError` when it cannot
    (no forecast for the interval, a battery without state, a failed solve): the caller falls
    back to today's rules."""
    step_h = horizon.step_s / 3600.0
    steps = min(len(horizon.pv_w), max(1, round(config.horizon_h / step_h)))
    pv, load = horizon.pv_w[:steps], horizon.load_w[:steps]
    price = horizon.price_per_kwh[:steps]
    known = np.isfinite(pv) & np.isfinite(load) & np.isfinite(price)
    if steps == 0 or not known[0]:
        raise PlanError("no forecast for the interval")
    usable = int(np.argmin(known)) if not known.all() else steps  # the leading known run
    pv, load, price = pv[:usable], load[:usable], price[:usable]
    battery = aggregate(batteries, config.charge_efficiency, config.discharge_efficiency)
    load_kwh, pv_kwh = load * step_h / 1000.0, np.maximum(pv, 0.0) * step_h / 1000.0
    net = load_kwh - pv_kwh
    floor = horizon.floor_kwh[:usable]
    cap_in = horizon.import_cap_kw[:usable]
    cap_out = horizon.export_cap_kw[:usable]
    reserved = bool(
        np.isfinite(floor).any() or np.isfinite(cap_in).any() or np.isfinite(cap_out).any()
    )
    plan = yield from plan_site_steps(
        net,
        price,
        price,
        battery,
        step_h=step_h,
        stored_value_per_kwh=stored_value_per_kwh(
            price, battery.charge_efficiency, battery.discharge_efficiency
        ),
        import_limit_kw=None if limits.import_limit_w is None else limits.import_limit_w / 1e3,
        export_limit_kw=None if limits.export_limit_w is None else limits.export_limit_w / 1e3,
        floor_kwh=floor,
        import_cap_kw=cap_in,
        export_cap_kw=cap_out,
        import_target_kw=None if config.peak_import_w is None else config.peak_import_w / 1e3,
        pessimistic_net_kwh=(
            pessimistic_net_kwh(
                load_kwh, pv_kwh, pv_downside=config.pv_downside, load_upside=config.load_upside
            )
            if reserved
            else None
        ),
        pessimistic_import_cap_kw=cap_in + load_kwh * config.load_upside / step_h,
        suggested_kwh=None if horizon.suggested_kwh is None else horizon.suggested_kwh[:usable],
        warm=warm,
    )
    bid = plan_bid(
        plan,
        float(net[0]),
        battery,
        step_h=step_h,
        max_buy_price_per_kwh=market.max_buy_price_per_kwh,
        min_sell_price_per_kwh=market.min_sell_price_per_kwh,
        role=role,
        floor_kwh=float(floor[0]),
        import_cap_kw=float(cap_in[0]),
        export_cap_kw=float(cap_out[0]),
        price_range_per_kwh=(float(price.min()), float(price.max())),
        expected_price_per_kwh=float(price[0]),
    )
    value = float(plan.value_per_kwh[0])
    step = PlanStep(
        grid_w=float(plan.grid_kwh[0]) / step_h * 1000.0,
        charge_price_per_kwh=value * battery.charge_efficiency,
    )
    return IntervalPlan(plan, step, bid)


#: :func:`plan_interval_steps` made at once; raises :class:`PlanError` when it cannot.
plan_interval = inline(plan_interval_steps)
