"""Billing a run the same way for every alternative: wattmesh, (i) batteries idle, (ii) each
battery under its own local controller, the perfect-foresight LP.

A run is billed on what each site's meter counted in each settled 15-minute interval (kWh, +
imports), at the interval's tariffs, in one of the two settlement regimes of
:mod:`coordinator.sharing`:

- (a) one connection point: the utility bills the feeder's net at retail / feed-in;
- (b) energy sharing with individual meters: each site with its own supplier at the same
  tariffs; energy one site exports while another imports in the same interval is shared at the
  local price (the mid-point of retail and feed-in) plus a network charge per kWh for the
  receiver.

Battery energy at the end is valued the same way for everyone: each kWh stored beyond (short
of) the run's start is credited (charged) at the last interval's retail tariff divided by the
site's charge efficiency, the price of putting it back. Costs are in currency, positive when
paid. ``benchmarks/economics.py`` and the ``wattmesh demo`` report both bill through here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from coordinator.sharing import connection_point_cost, energy_sharing_cost

#: The site on the industrial contract (its demand charge in regime (b)).
FACTORY = "factory"
#: Regime (b)'s network charge on shared energy unless told otherwise, per kWh.
LOCAL_CHARGE_PER_KWH = 0.03
#: Market intervals per hour (metered energy per interval x 4 = mean kW).
INTERVALS_PER_H = 4.0


class Stored(Protocol):
    """A site's battery energy at the start and the end of a run (kWh)."""

    @property
    def stored_start_kwh(self) -> float:
        """Stored at the start, kWh."""

    @property
    def stored_end_kwh(self) -> float:
        """Stored at the end, kWh."""


class Billable(Protocol):
    """What billing needs of a run (:class:`wattmesh.backtest.BacktestResult` is one)."""

    @property
    def sites(self) -> Mapping[str, Stored]:
        """Each site's stored energy."""

    @property
    def metered_kwh(self) -> Mapping[str, NDArray[np.float64]]:
        """Per site, the energy its meter counted in each settled interval (kWh, + imports)."""

    @property
    def retail_per_kwh(self) -> NDArray[np.float64]:
        """The retail tariff in each settled interval."""

    @property
    def feed_in_per_kwh(self) -> NDArray[np.float64]:
        """The feed-in tariff in each settled interval."""

    @property
    def charge_efficiency(self) -> Mapping[str, float]:
        """Each site's batteries' capacity-weighted charge efficiency (1 without a battery)."""

    @property
    def feeder_limit_w(self) -> float:
        """The feeder's import limit, W."""


@dataclass(frozen=True)
class SiteEnergy:
    """A site's battery energy at the start and the end of a run (kWh)."""

    stored_start_kwh: float
    stored_end_kwh: float


@dataclass(frozen=True)
class Usage:
    """A run as billing sees it (see :class:`Billable`); ``intervals`` are the settled ones."""

    intervals: tuple[int, ...]
    sites: dict[str, SiteEnergy]
    metered_kwh: dict[str, NDArray[np.float64]]
    retail_per_kwh: NDArray[np.float64]
    feed_in_per_kwh: NDArray[np.float64]
    charge_efficiency: dict[str, float]
    feeder_limit_w: float


def usage_of(run: Billable, settled: tuple[int, ...], keep: tuple[int, ...]) -> Usage:
    """``run`` (whose intervals are ``settled``) restricted to the intervals in ``keep``."""
    kept = set(keep)
    where = [j for j, k in enumerate(settled) if k in kept]
    return Usage(
        intervals=tuple(settled[j] for j in where),
        sites={n: SiteEnergy(s.stored_start_kwh, s.stored_end_kwh) for n, s in run.sites.items()},
        metered_kwh={n: np.asarray(m)[where] for n, m in run.metered_kwh.items()},
        retail_per_kwh=np.asarray(run.retail_per_kwh)[where],
        feed_in_per_kwh=np.asarray(run.feed_in_per_kwh)[where],
        charge_efficiency=dict(run.charge_efficiency),
        feeder_limit_w=run.feeder_limit_w,
    )


@dataclass(frozen=True)
class Figures:
    """One variant of one run, billed in one regime (currency; kW; kWh)."""

    cost: float  # including the value of the energy left in batteries
    peak_kw: float
    above_limit_kwh: float


@dataclass(frozen=True)
class Contract:
    """How a run is billed: the regime, regime (b)'s network charge on shared energy, and the
    industrial contract's demand charge (currency per kW of the run's largest 15-minute mean
    import: the feeder's in (a), the factory's own in (b)), zero without one."""

    regime: str
    local_charge_per_kwh: float = LOCAL_CHARGE_PER_KWH
    demand_charge_per_kw: float = 0.0


def value_per_kwh(run: Billable, site: str) -> float:
    """What a kWh stored at the end is worth at ``site``: the last retail tariff over the
    site's charge efficiency, the price of putting it back."""
    return float(run.retail_per_kwh[-1]) / run.charge_efficiency[site]


def site_stored_value(run: Billable, site: str) -> float:
    """The value (currency) of the battery energy ``site`` gained over the run (negative when
    drained); zero for a run with no settled interval."""
    if len(run.retail_per_kwh) == 0:
        return 0.0
    s = run.sites[site]
    return (s.stored_end_kwh - s.stored_start_kwh) * value_per_kwh(run, site)


def stored_value(run: Billable) -> float:
    """The value (currency) of the battery energy gained over the run, at the last interval's
    retail tariff divided by each site's charge efficiency (negative when drained)."""
    return sum(site_stored_value(run, name) for name in run.sites)


def _site_bills(
    run: Billable, metered_kwh: NDArray[np.float64], contract: Contract
) -> NDArray[np.float64]:
    """Regime (b): each site's bill (currency, sites in sorted order), before stored energy."""
    retail, feed_in = run.retail_per_kwh, run.feed_in_per_kwh
    energy = energy_sharing_cost(
        metered_kwh,
        retail_per_kwh=retail,
        feed_in_per_kwh=feed_in,
        local_price_per_kwh=(retail + feed_in) / 2.0,
        local_network_charge_per_kwh=contract.local_charge_per_kwh,
    ).sum(axis=1)
    names = sorted(run.metered_kwh)
    if FACTORY in names and contract.demand_charge_per_kw:
        i = names.index(FACTORY)
        peak_kw = float(metered_kwh[i].max(initial=0.0)) * INTERVALS_PER_H
        energy[i] += contract.demand_charge_per_kw * max(peak_kw, 0.0)
    return np.asarray(energy, dtype=np.float64)


def bill(run: Billable, metered_kwh: NDArray[np.float64], contract: Contract) -> float:
    """The community's bill (currency) for ``metered_kwh`` (sites in sorted order, settled
    intervals) at the run's tariffs under ``contract``, before stored energy."""
    if contract.regime == "a":
        energy = connection_point_cost(
            metered_kwh, retail_per_kwh=run.retail_per_kwh, feed_in_per_kwh=run.feed_in_per_kwh
        )
        peak_kw = float(metered_kwh.sum(axis=0).max(initial=0.0)) * INTERVALS_PER_H
        return float(energy.sum()) + contract.demand_charge_per_kw * max(peak_kw, 0.0)
    return float(_site_bills(run, metered_kwh, contract).sum())


def metered_matrix(run: Billable) -> NDArray[np.float64]:
    """The run's metered energy as ``(sites in sorted order, intervals)``, kWh."""
    names = sorted(run.metered_kwh)
    if not names:
        return np.zeros((0, 0))
    return np.array([run.metered_kwh[n] for n in names], dtype=np.float64)


def site_costs(run: Billable, contract: Contract) -> dict[str, float] | None:
    """Each site's cost (currency, stored energy valued) in regime (b), where each site has
    its own bill; None in regime (a), where the utility bills only the connection point."""
    if contract.regime == "a":
        return None
    names = sorted(run.metered_kwh)
    bills = _site_bills(run, metered_matrix(run), contract)
    return {n: float(bills[i]) - site_stored_value(run, n) for i, n in enumerate(names)}


def measure(
    run: Billable,
    metered_kwh: NDArray[np.float64],
    gained_value: float,
    contract: Contract,
) -> Figures:
    """Bill ``metered_kwh``, value the stored energy gained, and measure the feeder."""
    feeder_kwh = metered_kwh.sum(axis=0)
    limit_kwh = run.feeder_limit_w / 1000.0 / INTERVALS_PER_H
    return Figures(
        cost=bill(run, metered_kwh, contract) - gained_value,
        peak_kw=float(feeder_kwh.max(initial=0.0)) * INTERVALS_PER_H,
        above_limit_kwh=float(np.maximum(feeder_kwh - limit_kwh, 0.0).sum()),
    )


def figures(run: Billable, contract: Contract) -> Figures:
    """A run billed under ``contract``."""
    return measure(run, metered_matrix(run), stored_value(run), contract)


def saving_pct(ours: float, base: float) -> str:
    """Ours against a baseline in % of the baseline's cost, when that cost means something
    (at least 1 in currency); ``"n/a"`` otherwise."""
    if abs(base) < 1.0:
        return "n/a"
    return f"{100.0 * (base - ours) / abs(base):+.1f}"


def captured_pct(ours: float, local: float, lp: float) -> float | None:
    """The share (%) of the LP's improvement over (ii) that ours captures, when the LP
    improves on (ii) by at least 1 (currency)."""
    if local - lp < 1.0:
        return None
    return 100.0 * (local - ours) / (local - lp)
