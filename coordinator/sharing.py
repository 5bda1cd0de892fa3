"""Settlement regimes as pure functions on metered energy: no I/O, no clock, no logging.

docs/architecture.md section 6. Energies in kWh per market interval, positive when the site
imports; prices per kWh; money in currency, positive when the site pays. Arrays are
``(sites, intervals)``; tariffs broadcast against them (one value, one per interval, or one per
site and interval).

- Regime (a), one connection point: the utility bills the feeder's net exchange each interval
  (:func:`connection_point_cost`).
- Regime (b), energy sharing with individual meters (the EU renewable-energy-community model):
  each site keeps its own supplier; in each interval the energy exported by some sites while
  others import is shared, ``shared = min(total import, total export)``, allocated to the
  importers pro rata to their import and taken from the exporters pro rata to their export
  (:func:`shared_energy_kwh`). An importer pays the local price plus the network charge for
  local energy on what it receives; an exporter is paid the local price on what it gives; the
  rest goes to and from the suppliers at the site's own retail and feed-in tariffs
  (:func:`energy_sharing_cost`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray


@dataclass(frozen=True)
class Sharing:
    """Regime (b)'s allocation, each ``(sites, intervals)`` in kWh (all >= 0)."""

    received_kwh: NDArray[np.float64]  # shared energy each importer receives
    given_kwh: NDArray[np.float64]  # shared energy each exporter gives
    supplier_import_kwh: NDArray[np.float64]  # bought from its supplier
    supplier_export_kwh: NDArray[np.float64]  # sold to its supplier

    @property
    def shared_kwh(self) -> NDArray[np.float64]:
        """Energy shared in each interval, kWh."""
        return np.asarray(self.received_kwh.sum(axis=0), dtype=np.float64)


def _metered(metered_kwh: ArrayLike) -> NDArray[np.float64]:
    m = np.asarray(metered_kwh, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"metered_kwh must be (sites, intervals), got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError("metered_kwh must be finite")
    return m


def shared_energy_kwh(metered_kwh: ArrayLike) -> Sharing:
    """Regime (b)'s allocation of each interval's shared energy.

    With ``I = sum of imports`` and ``E = sum of exports`` in an interval, ``S = min(I, E)``
    is shared: importer ``i`` receives ``S * import_i / I``, exporter ``j`` gives
    ``S * export_j / E``; so what the importers receive and what the exporters give both sum to
    ``S``, and no site shares more than it metered.
    """
    m = _metered(metered_kwh)
    imports = np.maximum(m, 0.0)
    exports = np.maximum(-m, 0.0)
    total_in = imports.sum(axis=0)
    total_out = exports.sum(axis=0)
    shared = np.minimum(total_in, total_out)
    with np.errstate(divide="ignore", invalid="ignore"):
        in_share = np.where(total_in > 0, shared / total_in, 0.0)
        out_share = np.where(total_out > 0, shared / total_out, 0.0)
    received = imports * in_share
    given = exports * out_share
    return Sharing(received, given, imports - received, exports - given)


def energy_sharing_cost(
    metered_kwh: ArrayLike,
    *,
    retail_per_kwh: ArrayLike,
    feed_in_per_kwh: ArrayLike,
    local_price_per_kwh: ArrayLike,
    local_network_charge_per_kwh: ArrayLike = 0.0,
) -> NDArray[np.float64]:
    """Each site's cost per interval under regime (b), currency (+ pays), ``(sites,
    intervals)``: ``supplier import * retail - supplier export * feed-in + received * (local +
    network charge) - given * local``."""
    s = shared_energy_kwh(metered_kwh)
    local = np.asarray(local_price_per_kwh, dtype=np.float64)
    charge = np.asarray(local_network_charge_per_kwh, dtype=np.float64)
    return np.asarray(
        s.supplier_import_kwh * np.asarray(retail_per_kwh, dtype=np.float64)
        - s.supplier_export_kwh * np.asarray(feed_in_per_kwh, dtype=np.float64)
        + s.received_kwh * (local + charge)
        - s.given_kwh * local,
        dtype=np.float64,
    )


def connection_point_cost(
    metered_kwh: ArrayLike, *, retail_per_kwh: ArrayLike, feed_in_per_kwh: ArrayLike
) -> NDArray[np.float64]:
    """The utility's bill of the feeder under regime (a) per interval, currency (+ the
    community pays): the net ``n = sum of sites`` at retail when ``n > 0``, at feed-in when
    exporting."""
    n = _metered(metered_kwh).sum(axis=0)
    return np.asarray(
        np.where(
            n > 0,
            n * np.asarray(retail_per_kwh, dtype=np.float64),
            n * np.asarray(feed_in_per_kwh, dtype=np.float64),
        ),
        dtype=np.float64,
    )


def alone_cost(
    metered_kwh: ArrayLike, *, retail_per_kwh: ArrayLike, feed_in_per_kwh: ArrayLike
) -> NDArray[np.float64]:
    """Each site billed alone by its supplier per interval, currency (+ pays): import at
    retail, export at feed-in (regime (b) with nothing shared)."""
    m = _metered(metered_kwh)
    return np.asarray(
        np.where(
            m > 0,
            m * np.asarray(retail_per_kwh, dtype=np.float64),
            m * np.asarray(feed_in_per_kwh, dtype=np.float64),
        ),
        dtype=np.float64,
    )
