"""The edge's local fallback controller: pure functions, vectorised, units in names.

Signs (design section 3): site power positive when importing; battery power positive when
discharging.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray


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

    Peak shaving: with ``import_cap_w`` and ``reserve_soc_pct``, the energy below
    ``reserve_soc_pct`` is kept for shaving: there the battery discharges only by what the
    import exceeds the cap.
    """
    net_w = np.asarray(site_power_w, dtype=np.float64) + np.asarray(battery_power_w, np.float64)
    soc = np.asarray(soc_pct, dtype=np.float64)
    target = net_w.copy()
    if import_cap_w is not None:
        above_cap_w = np.maximum(net_w - import_cap_w, 0.0)
        reserved = soc <= (reserve_soc_pct if reserve_soc_pct is not None else soc_min_pct)
        target = np.where(reserved & (net_w > 0), above_cap_w, np.maximum(target, above_cap_w))
    target = np.clip(target, -max_charge_w, max_discharge_w)
    target = np.where((target > 0) & (soc <= soc_min_pct), 0.0, target)
    return np.where((target < 0) & (soc >= soc_max_pct), 0.0, target)
