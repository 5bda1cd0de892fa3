"""Perfect-foresight battery scheduling for a community behind one feeder (a linear program).

The utility bills the community's net exchange at the feeder (docs/architecture.md s. 6): retail
per kWh imported, feed-in per kWh exported, per step. Trading between sites only moves money inside
the community, and the sites' flows net at the feeder, so the cheapest the community can be
billed for a known future is the minimum utility bill of the feeder flow

    ``feeder_w[t] = net_load_w[t] + sum_b (charge_w[b, t] - discharge_w[b, t])``

over every battery's schedule, where ``net_load_w`` is the sum over the sites of load minus PV
(batteries idle). Where a battery sits does not matter: nothing limits flows inside the
community. :func:`perfect_foresight` solves it with HiGHS (highspy).

Variables (powers are means over a step of ``step_s`` seconds, ``h = step_s / 3600``):

- per battery ``b`` and step ``t``: ``charge_w``, ``discharge_w`` in ``[0, rated_power_w]`` (AC
  side) and the stored energy at the end of the step ``e_wh`` in
  ``[soc_min, soc_max] * capacity``, with
  ``e[t] = e[t-1] + h * (eta_c * charge[t] - discharge[t] / eta_d)`` from the initial SOC
  (the same model as :func:`simulators.physics.battery_step`);
- per step: feeder import and export ``>= 0`` with ``import - export = feeder_w`` and
  non-negative slacks ``import <= import_limit + slack_in``, ``export <= export_limit +
  slack_out``, so the problem is always feasible; a slack costs ``limit_penalty_per_kwh``, far
  above any tariff, so it is used only when no schedule keeps the feeder inside its limits.

Objective: ``sum_t h / 1000 * (retail[t] * import[t] - feed_in[t] * export[t])`` plus the
slack penalties. End of the horizon, one of two rules so that the schedule cannot borrow energy
from the next day for free:

- ``end_value_per_kwh=None`` (the default): every battery ends with at least its initial stored
  energy, ``e[T] >= e[0]``;
- ``end_value_per_kwh=[v_b, ...]``: the end energy is free within the SOC bounds and the
  objective subtracts ``v_b * (e[T] - e[0]) / 1000`` (a credit for energy stored beyond the
  start, a charge for energy short of it; e.g. what it would cost to put it back).
 Since
``feed_in < retail`` a step never imports and exports at once. With positive prices a battery
gains nothing by charging and discharging in the same step (it only loses energy), except to
burn energy that would otherwise break the export limit, which a real battery cannot do; the
result reports how much of that there was (``simultaneous_wh``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from functools import partial, wraps
from typing import Any, ParamSpec, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "DEFAULT_LIMIT_PENALTY_PER_KWH",
    "Battery",
    "Schedule",
    "ScheduleError",
    "interval_means",
    "perfect_foresight",
    "utility_bill",
]

#: Cost per kWh of feeder flow beyond its limits (far above any tariff).
DEFAULT_LIMIT_PENALTY_PER_KWH = 100.0


class ScheduleError(ValueError):
    """The inputs do not describe a schedulable problem, or the solver failed."""


@dataclass(frozen=True, slots=True)
class Battery:
    """A battery's limits (the fields of ``simulators.scenario.BatteryConfig``)."""

    capacity_wh: float
    rated_power_w: float
    soc_pct: float
    soc_min_pct: float = 5.0
    soc_max_pct: float = 100.0
    charge_efficiency: float = 0.95
    discharge_efficiency: float = 0.95

    def __post_init__(self) -> None:
        if not self.capacity_wh > 0 or not self.rated_power_w > 0:
            raise ScheduleError("capacity_wh and rated_power_w must be positive")
        if not 0 <= self.soc_min_pct <= self.soc_pct <= self.soc_max_pct <= 100:
            raise ScheduleError("need 0 <= soc_min_pct <= soc_pct <= soc_max_pct <= 100")
        for eff in (self.charge_efficiency, self.discharge_efficiency):
            if not 0 < eff <= 1:
                raise ScheduleError("efficiencies must be in (0, 1]")

    def stored_wh(self, soc_pct: float) -> float:
        """Energy stored at ``soc_pct`` (Wh)."""
        return soc_pct / 100.0 * self.capacity_wh


@dataclass(frozen=True)
class Schedule:
    """The optimal schedule. Powers are step means (W), positive = import / discharge.

    ``bill`` is the utility bill alone (currency, penalties excluded); ``stored_value`` the
    value of the energy stored at the end beyond the start (0 with the hard end rule);
    ``cost = bill - stored_value``; ``penalty`` what the limit slacks cost; ``feeder_w`` the
    scheduled feeder flow per step; ``battery_w`` each battery's AC power per step (shape
    ``(batteries, steps)``, positive discharging);
    ``soc_pct`` each battery's SOC at the start and the end of every step (``steps + 1``);
    ``import_excess_w`` / ``export_excess_w`` the largest mean flow beyond each limit (0 when the
    limits held); ``simultaneous_wh`` the energy charged while the same battery discharged.
    """

    bill: float
    stored_value: float
    penalty: float
    feeder_w: NDArray[np.float64]
    battery_w: NDArray[np.float64]
    soc_pct: NDArray[np.float64]
    import_excess_w: float
    export_excess_w: float
    simultaneous_wh: float
    solve_s: float
    #: The marginal price of feeder energy per step (currency per kWh): what one more kWh of
    #: net load in that step would add to the optimum (the dual of the step's feeder balance).
    price_per_kwh: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))

    @property
    def cost(self) -> float:
        """The bill less the value of the energy stored beyond the start (currency)."""
        return self.bill - self.stored_value


def interval_means(samples: ArrayLike, per_interval: int) -> NDArray[np.float64]:
    """Means of consecutive groups of ``per_interval`` samples along the last axis.

    A trailing partial group is dropped. ``interval_means([1, 3, 5, 7], 2) == [2, 6]``.
    """
    a = np.asarray(samples, dtype=np.float64)
    if per_interval < 1:
        raise ScheduleError("per_interval must be >= 1")
    n = a.shape[-1] // per_interval
    means: NDArray[np.float64] = (
        a[..., : n * per_interval].reshape(*a.shape[:-1], n, per_interval).mean(axis=-1)
    )
    return means


def utility_bill(
    feeder_w: ArrayLike, retail_per_kwh: ArrayLike, feed_in_per_kwh: ArrayLike, step_s: float
) -> float:
    """The utility's bill (currency) for a feeder flow of step means: retail on import, feed-in
    on export, step by step."""
    flow = np.asarray(feeder_w, dtype=np.float64)
    kwh = flow * step_s / 3.6e6
    price = np.where(kwh > 0, np.asarray(retail_per_kwh), np.asarray(feed_in_per_kwh))
    return float(np.sum(kwh * price))


@dataclass(frozen=True, slots=True)
class _Layout:
    """Column offsets: charge, discharge, energy (B*T each), import, export, slacks (T each)."""

    n_b: int
    n_t: int

    @property
    def bt(self) -> int:
        return self.n_b * self.n_t

    @property
    def charge(self) -> int:
        return 0

    @property
    def discharge(self) -> int:
        return self.bt

    @property
    def energy(self) -> int:
        return 2 * self.bt

    @property
    def imp(self) -> int:
        return 3 * self.bt

    @property
    def exp(self) -> int:
        return self.imp + self.n_t

    @property
    def s_in(self) -> int:
        return self.imp + 2 * self.n_t

    @property
    def s_out(self) -> int:
        return self.imp + 3 * self.n_t

    @property
    def n_var(self) -> int:
        return self.imp + 4 * self.n_t


@dataclass(frozen=True)
class _Program:
    """Minimise ``cost @ x`` within ``bounds`` (columns lower, upper) subject to the rows of
    the compressed-row matrix (``start``, ``index``, ``value``): the first ``n_eq`` rows
    ``== b_eq``, the rest ``<= b_ub``."""

    cost: NDArray[np.float64]
    start: NDArray[np.int32]
    index: NDArray[np.int32]
    value: NDArray[np.float64]
    n_eq: int
    b_eq: NDArray[np.float64]
    b_ub: NDArray[np.float64]
    bounds: NDArray[np.float64]


def compressed_rows(
    terms: Sequence[tuple[NDArray[np.int64], NDArray[np.int64], float]], n_rows: int
) -> tuple[NDArray[np.int32], NDArray[np.int32], NDArray[np.float64]]:
    """The matrix with ``value`` at every (row, column) of each term, in compressed-row form
    (start, column index, value), columns ascending within a row and repeated entries summed:
    what ``scipy.sparse.csr_array((data, (rows, cols)))`` builds, without scipy's cost."""
    rows = np.concatenate([r for r, _, _ in terms])
    cols = np.concatenate([c for _, c, _ in terms])
    vals = np.concatenate([np.full(len(r), v, dtype=np.float64) for r, _, v in terms])
    width = int(cols.max()) + 1 if len(cols) else 1
    flat = rows * width + cols
    order = np.argsort(flat, kind="stable")
    flat = flat[order]
    first = np.flatnonzero(np.diff(flat, prepend=-1))  # each (row, column) once
    keys = flat[first]
    start = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys // width, minlength=n_rows), out=start[1:])
    value = np.add.reduceat(vals[order], first) if len(first) else vals[:0]
    return start.astype(np.int32), (keys % width).astype(np.int32), value


def _battery_rows(
    lay: _Layout, batteries: Sequence[Battery], h: float
) -> tuple[list[tuple[NDArray[np.int64], NDArray[np.int64], float]], NDArray[np.float64]]:
    """Energy balance rows ``e[t] - e[t-1] - h eta_c c[t] + h d[t] / eta_d = 0``, one block
    per battery (``e[-1]``, the initial energy, moved to the right-hand side)."""
    n_t = lay.n_t
    t = np.arange(n_t)
    terms: list[tuple[NDArray[np.int64], NDArray[np.int64], float]] = []
    rhs = np.zeros(lay.bt)
    for b, bat in enumerate(batteries):
        base = b * n_t
        r = base + t
        terms += [
            (r, lay.energy + base + t, 1.0),
            (r[1:], lay.energy + base + t[:-1], -1.0),
            (r, lay.charge + base + t, -h * bat.charge_efficiency),
            (r, lay.discharge + base + t, h / bat.discharge_efficiency),
        ]
        rhs[base] = bat.stored_wh(bat.soc_pct)
    return terms, rhs


def _program(
    net: NDArray[np.float64],
    batteries: Sequence[Battery],
    retail: NDArray[np.float64],
    feed_in: NDArray[np.float64],
    h: float,
    limits_w: tuple[float, float],
    penalty_per_kwh: float,
    end_value_per_kwh: NDArray[np.float64] | None,
) -> tuple[_Layout, _Program]:
    lay = _Layout(len(batteries), net.size)
    n_t, bt = lay.n_t, lay.bt
    t = np.arange(n_t)
    cost = np.zeros(lay.n_var)
    cost[lay.imp : lay.exp] = h / 1000.0 * retail
    cost[lay.exp : lay.s_in] = -h / 1000.0 * feed_in
    cost[lay.s_in :] = h / 1000.0 * penalty_per_kwh

    lower = np.zeros(lay.n_var)
    upper = np.full(lay.n_var, np.inf)
    for b, bat in enumerate(batteries):
        block = slice(b * n_t, (b + 1) * n_t)
        for start in (lay.charge, lay.discharge):
            upper[start:][block] = bat.rated_power_w
        lower[lay.energy :][block] = bat.stored_wh(bat.soc_min_pct)
        upper[lay.energy :][block] = bat.stored_wh(bat.soc_max_pct)
        last = lay.energy + (b + 1) * n_t - 1
        if end_value_per_kwh is None:  # it ends with at least what it started with
            lower[last] = bat.stored_wh(bat.soc_pct)
        else:  # or each Wh at the end is worth end_value / 1000 (constant e[0] part dropped)
            cost[last] -= end_value_per_kwh[b] / 1000.0

    terms, battery_rhs = _battery_rows(lay, batteries, h)
    # Feeder balance: imp[t] - exp[t] - sum_b (c[b, t] - d[b, t]) = net[t].
    r = bt + t
    terms += [(r, lay.imp + t, 1.0), (r, lay.exp + t, -1.0)]
    for b in range(lay.n_b):
        terms += [(r, lay.charge + b * n_t + t, -1.0), (r, lay.discharge + b * n_t + t, 1.0)]
    # Limits with slack: import - s_in <= import limit, export - s_out <= export limit.
    n_eq = bt + n_t
    terms += [
        (n_eq + t, lay.imp + t, 1.0),
        (n_eq + n_t + t, lay.exp + t, 1.0),
        (n_eq + t, lay.s_in + t, -1.0),
        (n_eq + n_t + t, lay.s_out + t, -1.0),
    ]
    row_start, index, value = compressed_rows(terms, n_eq + 2 * n_t)
    b_ub = np.concatenate(
        [np.full(n_t, min(limits_w[0], 1e15)), np.full(n_t, min(limits_w[1], 1e15))]
    )
    program = _Program(
        cost,
        row_start,
        index,
        value,
        n_eq,
        np.concatenate([battery_rhs, net]),
        b_ub,
        np.column_stack([lower, upper]),
    )
    return lay, program


def _solve(p: _Program) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The programme's optimum and its rows' duals (equalities first), by HiGHS's simplex
    through highspy (scipy's linprog wrapper costs as much as a small solve), always from a
    cold start: the duals are the community's price, and where they are not unique a start
    from the last schedule's basis picks others, which made the price (and the sites' plans)
    depend on the schedules before (tests/test_demo_agreement.py: 30 % apart);
    :class:`ScheduleError` when there is none."""
    import highspy  # noqa: PLC0415 - with the first schedule

    n_eq = p.n_eq
    highs = _highs()
    passed = highs.passModel(
        len(p.cost),
        n_eq + len(p.b_ub),
        len(p.value),
        int(highspy.MatrixFormat.kRowwise),
        int(highspy.ObjSense.kMinimize),
        0.0,
        p.cost,
        np.ascontiguousarray(p.bounds[:, 0]),
        np.ascontiguousarray(p.bounds[:, 1]),
        np.concatenate([p.b_eq, np.full(len(p.b_ub), -np.inf)]),
        np.concatenate([p.b_eq, p.b_ub]),
        p.start,
        p.index,
        p.value,
        np.zeros(len(p.cost), dtype=np.int32),  # every variable continuous
    )
    if passed != highspy.HighsStatus.kOk:
        raise ScheduleError(f"HiGHS refused the schedule's programme ({passed})")
    highs.run()
    status = highs.getModelStatus()
    if status != highspy.HighsModelStatus.kOptimal:
        reason = highs.modelStatusToString(status)
        raise ScheduleError(f"HiGHS did not solve the schedule: {reason}")
    solution = highs.getSolution()
    return (
        np.asarray(solution.col_value, dtype=np.float64),
        np.asarray(solution.row_dual, dtype=np.float64)[:n_eq],
    )


def _solve_timed(p: _Program) -> Solved:
    """:func:`_solve` and its wall time [s]."""
    started = time.perf_counter()
    x, row_dual = _solve(p)
    return x, row_dual, time.perf_counter() - started


#: A solved schedule programme: its optimum, its rows' duals (equalities first) and the
#: solve's wall time [s].
Solved = tuple[NDArray[np.float64], NDArray[np.float64], float]
#: A schedule's programme ready to solve, in any thread (HiGHS solves without Python's
#: lock); raises :class:`ScheduleError` when it finds no optimum.
ScheduleJob = Callable[[], Solved]
_T = TypeVar("_T")
_P = ParamSpec("_P")
#: A schedule made in steps (:func:`perfect_foresight_steps`): it yields its programme's
#: :data:`ScheduleJob` and is sent the job's result; it returns what it makes.
ScheduleSteps = Generator[ScheduleJob, Solved, _T]


def made_here(steps: ScheduleSteps[_T], job: ScheduleJob | None = None) -> _T:
    """Make a schedule given in steps here, solving its programmes in this thread (``job``:
    the one it has already yielded)."""
    try:
        if job is None:
            job = next(steps)
        while True:
            try:
                solved = job()
            except ScheduleError as err:
                job = steps.throw(err)
            else:
                job = steps.send(solved)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def resumed(steps: ScheduleSteps[_T], solved: Solved | ScheduleError) -> _T:
    """Go on with a schedule in steps whose programme was solved elsewhere (``solved``: what
    its job returned, or the :class:`ScheduleError` it raised)."""
    try:
        job = steps.throw(solved) if isinstance(solved, ScheduleError) else steps.send(solved)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    return made_here(steps, job)


def at_once(steps: Callable[_P, ScheduleSteps[_T]]) -> Callable[_P, _T]:
    """A schedule in steps made at once, its programme solved in the caller's thread."""

    @wraps(steps)
    def made(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        return made_here(steps(*args, **kwargs))

    made.__name__ = made.__qualname__ = steps.__name__.removesuffix("_steps")
    made.__doc__ = f":func:`{steps.__name__}` made at once (solved in this thread)."
    return made


_solvers = threading.local()


def _highs() -> Any:
    """This thread's silent HiGHS instance, kept between schedules."""
    highs = getattr(_solvers, "highs", None)
    if highs is None:
        import highspy  # noqa: PLC0415

        # highspy's Highs() prints the solver's banner as it is made: the bare solver it wraps
        bare = getattr(getattr(highspy, "_core", None), "_Highs", None)
        highs = bare() if bare is not None else highspy.Highs()  # type: ignore[no-untyped-call]
        highs.setOptionValue("output_flag", False)
        _solvers.highs = highs
    return highs


def perfect_foresight_steps(
    net_load_w: ArrayLike,
    batteries: Sequence[Battery],
    retail_per_kwh: ArrayLike,
    feed_in_per_kwh: ArrayLike,
    step_s: float,
    *,
    import_limit_w: float = math.inf,
    export_limit_w: float = math.inf,
    limit_penalty_per_kwh: float = DEFAULT_LIMIT_PENALTY_PER_KWH,
    end_value_per_kwh: ArrayLike | None = None,
) -> ScheduleSteps[Schedule]:
    """The cheapest utility bill for the community with every battery optimally scheduled,
    in steps (:data:`ScheduleSteps`: the caller may solve the programme in another thread).

    ``net_load_w`` is the community's feeder flow per step with the batteries idle (sum over
    the sites of load minus PV, step means, W); the prices are per step (scalars broadcast).
    See the module docstring for the program. Raises :class:`ScheduleError` on bad
    inputs or when HiGHS fails.
    """
    net = np.asarray(net_load_w, dtype=np.float64)
    if net.ndim != 1 or net.size == 0 or not np.all(np.isfinite(net)):
        raise ScheduleError("net_load_w must be a non-empty finite 1-d array")
    n_t = net.size
    retail = np.broadcast_to(np.asarray(retail_per_kwh, dtype=np.float64), (n_t,))
    feed_in = np.broadcast_to(np.asarray(feed_in_per_kwh, dtype=np.float64), (n_t,))
    if np.any(feed_in >= retail):
        raise ScheduleError("feed-in must be below retail at every step")
    if not step_s > 0:
        raise ScheduleError("step_s must be positive")
    if not (import_limit_w > 0 and export_limit_w > 0 and limit_penalty_per_kwh > 0):
        raise ScheduleError("limits and the penalty must be positive")
    values = None
    if end_value_per_kwh is not None:
        values = np.asarray(end_value_per_kwh, dtype=np.float64).reshape(-1)
        if values.size != len(batteries) or not np.all(np.isfinite(values)):
            raise ScheduleError("end_value_per_kwh needs one finite value per battery")
    h = step_s / 3600.0
    lay, p = _program(
        net,
        batteries,
        retail,
        feed_in,
        h,
        (import_limit_w, export_limit_w),
        limit_penalty_per_kwh,
        values,
    )
    x, row_dual, solve_s = yield partial(_solve_timed, p)
    n_b, bt = lay.n_b, lay.bt
    charge = x[lay.charge : lay.charge + bt].reshape(n_b, n_t)
    discharge = x[lay.discharge : lay.discharge + bt].reshape(n_b, n_t)
    energy = x[lay.energy : lay.energy + bt].reshape(n_b, n_t)
    feeder = x[lay.imp : lay.exp] - x[lay.exp : lay.s_in]
    e_start = np.array([bat.stored_wh(bat.soc_pct) for bat in batteries]).reshape(n_b, 1)
    capacity = np.array([bat.capacity_wh for bat in batteries]).reshape(n_b, 1)
    stored = 0.0
    if values is not None:
        stored = float(np.dot(values, energy[:, -1] - e_start[:, 0]) / 1000.0) if n_b else 0.0
    return Schedule(
        bill=utility_bill(feeder, retail, feed_in, step_s),
        stored_value=stored,
        penalty=float(np.dot(p.cost[lay.s_in :], x[lay.s_in :])),
        feeder_w=feeder,
        battery_w=discharge - charge,
        soc_pct=100.0 * np.concatenate([e_start, energy], axis=1) / capacity,
        import_excess_w=float(np.max(x[lay.s_in : lay.s_out], initial=0.0)),
        export_excess_w=float(np.max(x[lay.s_out :], initial=0.0)),
        simultaneous_wh=float(np.sum(np.minimum(charge, discharge)) * h),
        solve_s=solve_s,
        price_per_kwh=row_dual[bt : bt + n_t] * 1000.0 / h,
    )


#: :func:`perfect_foresight_steps` made at once; raises :class:`ScheduleError` on bad inputs
#: or when HiGHS fails.
perfect_foresight = at_once(perfect_foresight_steps)
