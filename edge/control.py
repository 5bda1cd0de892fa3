"""The edge's local fallback controller: pure functions, vectorised, units in names.

Signs (docs/architecture.md section 4): site power positive when importing; battery power
positive when discharging.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray


def keep_peak_reserve_w(
    target_w: ArrayLike,
    net_w: ArrayLike,
    soc_pct: ArrayLike,
    *,
    import_cap_w: float | None,
    reserve_soc_pct: float | None,
) -> NDArray[np.float64]:
    """A battery setpoint ``target_w`` (W, positive discharges) that keeps the peak reserve.

    At or below ``reserve_soc_pct`` the energy is kept for peak shaving: the battery discharges
    no more than what ``net_w`` (the site's load net of PV with the battery idle, W, positive
    importing) exceeds ``import_cap_w`` (nothing without a cap). Charging is never limited.
    """
    target = np.asarray(target_w, dtype=np.float64)
    if reserve_soc_pct is None:
        return target
    net = np.asarray(net_w, dtype=np.float64)
    above_cap_w = np.maximum(net - import_cap_w, 0.0) if import_cap_w is not None else 0.0 * net
    reserved = np.asarray(soc_pct, dtype=np.float64) <= reserve_soc_pct
    return np.where(reserved, np.minimum(target, above_cap_w), target)


def self_consumption_setpoint_w(
    site_power_w: ArrayLike,
    battery_power_w: ArrayLike,
    soc_pct: ArrayLike,
    *,
    soc_min_pct: float,
    soc_max_pct: float,
    max_charge_w: float,
    max_discharge_w: float,
    import_cap_w: float | None = None,
    reserve_soc_pct: float | None = None,
) -> NDArray[np.float64]:
    """Battery setpoint, W (positive discharges), that keeps the site's exchange near zero.

    The site's load net of PV, as it would be with the battery idle, is
    ``net_w = site_power_w + battery_power_w``; self-consumption sets the battery to ``net_w``
    (discharge to cover an import, charge from a surplus), clipped to the rated powers and to
    zero in the direction a state-of-charge bound forbids.

    Peak shaving: with ``import_cap_w`` the battery covers at least the import above the cap;
    the energy below ``reserve_soc_pct`` is kept for that (:func:`keep_peak_reserve_w`).
    """
    net_w = np.asarray(site_power_w, dtype=np.float64) + np.asarray(battery_power_w, np.float64)
    soc = np.asarray(soc_pct, dtype=np.float64)
    target = keep_peak_reserve_w(
        net_w, net_w, soc, import_cap_w=import_cap_w, reserve_soc_pct=reserve_soc_pct
    )
    if import_cap_w is not None:
        target = np.where(net_w > import_cap_w, np.maximum(target, net_w - import_cap_w), target)
    target = np.clip(target, -max_charge_w, max_discharge_w)
    target = np.where((target > 0) & (soc <= soc_min_pct), 0.0, target)
    return np.where((target < 0) & (soc >= soc_max_pct), 0.0, target)
